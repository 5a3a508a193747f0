//! ZeRO-1/ZeRO-2 over the MPI backend under a real `mpirun`, 2 and 4 ranks:
//! each rank computes the single-process reference itself (the same seeded
//! tiny agent and batch, `TrainStep::step` with a plain `AdamW`, and the
//! same with gradient accumulation over the ranks' row split), then runs
//! three ZeRO steps on its rows with stage 1 and with stage 2 over one
//! `MpiComm`, and checks: weights within 1e-5 of each variable's max |w| of
//! the plain step and bit-identical to the accumulation reference (the rank
//! weights 1/2 and 1/4 are exact, and the MPI backend sums in rank order
//! like the in-process one), bit-identical on every rank, gathered moments
//! within 1e-5; rank 0 gathers every rank's `state_bytes` with
//! `gather_stats` (sum = 8Ψ, largest ≤ 8Ψ/N + one shard) and the parent
//! checks they fall as 1/N from 2 to 4 ranks.
//!
//! `harness = false`: run normally, `main` relaunches this executable under
//! `gm_shard::mpirun_command` with a deadline (past it the job is killed and
//! the test fails: nothing hangs). Under `mpirun`, each process is one rank.
//! `mpirun` missing from `PATH` is a failure unless `GM_SKIP_MPI=1`.
//! Run: `cargo test -p gm-train --features mpi --test zero_mpi`.

use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gm_models::init::init_seeded;
use gm_shard::{
    launched_by_mpirun, mpirun_check_exit_code, mpirun_command, run_job, Communicator, MpiComm,
    ZeroStage,
};
use gm_train::step::narrow_obs;
use gm_train::{
    AdamW, AdamWConfig, AgentConfig, AgentNet, Grads, StepConfig, TdBatch, TrainStep, ZeroConfig,
    ZeroOptimizer,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;
use common::Data;

/// The longest one job may run.
const JOB_DEADLINE: Duration = Duration::from_secs(180);
/// Collective timeout of every rank.
const COMM_TIMEOUT: Duration = Duration::from_secs(60);
/// Rows of the global batch.
const B: usize = 16;
const STEPS: usize = 3;
/// Small shards so the tiny agent splits into many (512 parameters each).
const SHARD: u64 = 8 * 512;
/// Prefix of the lines rank 0 prints with every rank's state bytes.
const STATS: &str = "ZERO_MPI_STATE";

fn main() -> ExitCode {
    if launched_by_mpirun() {
        return match rank_main() {
            Ok(code) => code,
            Err(e) => {
                eprintln!("rank error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    parent_main()
}

// ---------------------------------------------------------------------------
// The parent: launches the jobs and checks how they ended.

fn parent_main() -> ExitCode {
    if let Some(code) = mpirun_check_exit_code("the ZeRO MPI tests") {
        return code;
    }
    println!("\nrunning 2 tests");
    let start = Instant::now();
    let mut failed = Vec::new();
    // Per stage, the largest rank's state bytes at each world size.
    let mut largest: Vec<(usize, String, u64)> = Vec::new();
    for n in [2usize, 4] {
        let name = format!("zero_mpi_{n}_ranks");
        let t = Instant::now();
        match job(n) {
            Ok(stats) => {
                println!("test {name} ... ok ({:.2?})", t.elapsed());
                for (stage, per_rank) in stats {
                    println!("    {stage} N={n}: state bytes per rank {per_rank:?}");
                    let max = per_rank.iter().copied().max().unwrap_or(0);
                    largest.push((n, stage, max));
                }
            }
            Err(why) => {
                println!("test {name} ... FAILED ({:.2?})", t.elapsed());
                failed.push((name, why));
            }
        }
    }
    // 1/N: from 2 to 4 ranks the largest rank's state halves (within a shard).
    for (n, stage, max) in largest.iter().filter(|x| x.0 == 4) {
        if let Some((_, _, max2)) = largest.iter().find(|x| x.0 == 2 && &x.1 == stage) {
            if *max > max2 / 2 + SHARD {
                failed.push((
                    format!("state_falls_as_1_over_n ({stage})"),
                    format!("largest rank at N={n}: {max} bytes, at N=2: {max2}"),
                ));
            }
        }
    }
    for (name, why) in &failed {
        println!("\n---- {name} ----\n{why}");
    }
    println!(
        "\ntest result: {}. {} passed; {} failed; finished in {:.2?}\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        2usize.saturating_sub(failed.len()),
        failed.len(),
        start.elapsed()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs the job on `n` ranks; returns rank 0's `(stage, state bytes per
/// rank)` lines.
fn job(n: usize) -> Result<Vec<(String, Vec<u64>)>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = mpirun_command(n, &exe);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let job = run_job(&mut cmd, JOB_DEADLINE).map_err(|e| format!("spawning {cmd:?}: {e}"))?;
    let (status, output) = (job.status, job.stdout + &job.stderr);
    let describe = |what: &str| {
        format!(
            "{what}: status {status:?} after {:.2?}\n--- output ---\n{output}",
            job.elapsed
        )
    };
    match status {
        None => return Err(describe("the job ran past the deadline and was killed")),
        Some(s) if !s.success() => return Err(describe("the job failed")),
        Some(_) => {}
    }
    for r in 0..n {
        if !output.contains(&format!("rank {r} ok")) {
            return Err(describe(&format!("rank {r} did not report ok")));
        }
    }
    for line in output.lines().filter(|l| l.starts_with("rank ")) {
        println!("    {line}");
    }
    let mut stats = Vec::new();
    for line in output.lines().filter(|l| l.starts_with(STATS)) {
        // "ZERO_MPI_STATE Stage1 1,2,3"
        let mut it = line.split_whitespace().skip(1);
        let stage = it.next().unwrap_or("").to_string();
        let per_rank: Result<Vec<u64>, _> = it
            .next()
            .unwrap_or("")
            .split(',')
            .map(str::parse::<u64>)
            .collect();
        let per_rank = per_rank.map_err(|e| describe(&format!("bad stats line {line:?}: {e}")))?;
        stats.push((stage, per_rank));
    }
    if stats.len() != 2 {
        return Err(describe(
            "rank 0 did not print the state bytes of both stages",
        ));
    }
    Ok(stats)
}

// ---------------------------------------------------------------------------
// One rank.

type Values = Vec<(String, Vec<f32>)>;

fn values(vm: &VarMap) -> Result<Values> {
    let data = vm.data().lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut out = Vec::new();
    for (n, v) in data.iter() {
        out.push((n.clone(), v.as_tensor().flatten_all()?.to_vec1::<f32>()?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The tiny agent, weights from `seed`, biases drawn from ±0.1 too (as in
/// `tests/zero.rs`: the tolerance is relative to each variable's max |w|).
fn agent(seed: u64) -> Result<(VarMap, AgentNet)> {
    let vm = VarMap::new();
    let net = AgentNet::new(
        &AgentConfig::tiny(),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )?;
    init_seeded(&vm, seed)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xb1a5);
    {
        let data = vm.data().lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names.into_iter().filter(|n| n.ends_with("bias")) {
            let var = &data[name];
            let b: Vec<f32> = (0..var.elem_count())
                .map(|_| rng.random_range(-0.1f32..0.1))
                .collect();
            var.set(&Tensor::from_vec(b, var.shape(), &Device::Cpu)?)?;
        }
    }
    Ok((vm, net))
}

fn step_cfg(micro: Option<usize>) -> StepConfig {
    StepConfig {
        dropout: false,
        max_grad_norm: None,
        micro_batch: micro,
        ..StepConfig::default()
    }
}

/// One process, the whole batch: weights after `STEPS` steps and the
/// optimizer.
fn reference(d: &Data, micro: Option<usize>) -> Result<(Values, AdamW)> {
    let (vm, net) = agent(3)?;
    let mut ts = TrainStep::new(step_cfg(micro), AgentConfig::tiny())?;
    let mut opt = AdamW::new(AdamWConfig::default(), Grads::empty(&vm)?.len())?;
    for s in 0..STEPS {
        ts.step(&net, &vm, &mut opt, &d.batch(), s as u64)?;
    }
    Ok((values(&vm)?, opt))
}

/// Worst per-variable `max |a − b| / max |b|`, and the worst `max |a − b|`.
fn rel_diff<'a>(
    a: impl IntoIterator<Item = &'a [f32]>,
    b: impl IntoIterator<Item = &'a [f32]>,
) -> (f64, f64) {
    let (mut rel, mut abs) = (0f64, 0f64);
    for (x, y) in a.into_iter().zip(b) {
        let scale = y.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
        let d = x
            .iter()
            .zip(y)
            .fold(0f64, |m, (p, q)| m.max(f64::from((p - q).abs())));
        abs = abs.max(d);
        rel = rel.max(if scale > 0.0 { d / scale } else { d });
    }
    (rel, abs)
}

fn moments(t: &[Option<Tensor>]) -> Result<Vec<Vec<f32>>> {
    t.iter()
        .map(|t| match t {
            Some(t) => Ok(t.flatten_all()?.to_vec1::<f32>()?),
            None => Ok(Vec::new()),
        })
        .collect()
}

fn rank_main() -> Result<ExitCode> {
    let comm = MpiComm::init(COMM_TIMEOUT).context("MpiComm::init")?;
    let (rank, world) = (comm.rank(), comm.world());
    let d = Data::new(1, B);
    let (plain, plain_opt) = reference(&d, None)?;
    let (accum, _) = reference(&d, Some(B.div_ceil(world)))?;
    let rows = B / world + usize::from(rank < B % world);
    let start: usize = (0..rank)
        .map(|q| B / world + usize::from(q < B % world))
        .sum();
    let exact = B.is_multiple_of(world) && world.is_power_of_two();
    let mut failures: Vec<String> = Vec::new();
    let mut comm: Box<dyn Communicator + Send> = Box::new(comm);
    for stage in [ZeroStage::Stage1, ZeroStage::Stage2] {
        // Rank 0's weights win: the others start elsewhere on purpose.
        let (vm, net) = agent(if rank == 0 { 3 } else { 100 + rank as u64 })?;
        let cfg = ZeroConfig {
            stage,
            max_shard_bytes: SHARD,
            ..ZeroConfig::default()
        };
        let mut zo = ZeroOptimizer::new(comm, &vm, AdamWConfig::default(), cfg)?;
        let ts = TrainStep::new(step_cfg(None), AgentConfig::tiny())?;
        let obs = narrow_obs(&d.obs, start, rows)?;
        let local = TdBatch {
            obs: &obs,
            actions: &d.actions[start..start + rows],
            targets: &d.targets[start..start + rows],
            weights: Some(&d.weights[start..start + rows]),
        };
        let t0 = Instant::now();
        for s in 0..STEPS {
            let g = ts.grads(&net, &vm, &local, s as u64)?;
            let o = zo.step(&g.grads, rows as f64 / B as f64, g.loss_scale, None)?;
            if !o.stepped {
                failures.push(format!("{stage:?}: step {s} skipped"));
            }
        }
        let elapsed = t0.elapsed();
        let w = values(&vm)?;
        let (rel, abs) = rel_diff(
            w.iter().map(|x| x.1.as_slice()),
            plain.iter().map(|x| x.1.as_slice()),
        );
        let (_, acc_abs) = rel_diff(
            w.iter().map(|x| x.1.as_slice()),
            accum.iter().map(|x| x.1.as_slice()),
        );
        if rel > 1e-5 {
            failures.push(format!(
                "{stage:?}: weights differ from the plain step by {rel:.3e} relative"
            ));
        }
        if exact && acc_abs != 0.0 {
            failures.push(format!(
                "{stage:?}: weights differ from the accumulation reference by {acc_abs:.3e}"
            ));
        }
        // Every rank ends with the same bits: compare with rank 0's.
        let mut flat: Vec<f32> = w.iter().flat_map(|x| x.1.iter().copied()).collect();
        let mine = flat.clone();
        zo.comm().broadcast(&mut flat, 0)?;
        if flat
            .iter()
            .map(|x| x.to_bits())
            .ne(mine.iter().map(|x| x.to_bits()))
        {
            failures.push(format!("{stage:?}: weights differ from rank 0's"));
        }
        if let Some(state) = zo.gather_state()? {
            let (m, pm) = (moments(&state.m)?, moments(&plain_opt.m)?);
            let (v, pv) = (moments(&state.v)?, moments(&plain_opt.v)?);
            let (m_rel, _) = rel_diff(m.iter().map(Vec::as_slice), pm.iter().map(Vec::as_slice));
            let (v_rel, _) = rel_diff(v.iter().map(Vec::as_slice), pv.iter().map(Vec::as_slice));
            if m_rel > 1e-5 || v_rel > 1e-5 || state.step != STEPS as u64 {
                failures.push(format!(
                    "{stage:?}: gathered state: m rel {m_rel:.2e}, v rel {v_rel:.2e}, step {}",
                    state.step
                ));
            }
        }
        let psi = zo.params() as u64;
        let biggest = zo
            .plan()
            .shards()
            .iter()
            .map(|s| s.bytes)
            .max()
            .unwrap_or(0);
        let stats = zo
            .comm()
            .gather_stats(&[zo.state_bytes(), zo.grad_buffer_bytes()])?;
        if let Some(stats) = stats {
            let state: Vec<u64> = stats.iter().map(|s| s[0]).collect();
            let total: u64 = state.iter().sum();
            let max = state.iter().copied().max().unwrap_or(0);
            if total != 8 * psi || max > 8 * psi / world as u64 + biggest {
                failures.push(format!(
                    "{stage:?}: state bytes {state:?}: sum {total} (8Ψ = {}), max {max} \
                     (8Ψ/N + one shard = {})",
                    8 * psi,
                    8 * psi / world as u64 + biggest
                ));
            }
            let list: Vec<String> = state.iter().map(u64::to_string).collect();
            println!("{STATS} {stage:?} {}", list.join(","));
        }
        println!(
            "rank {rank} {stage:?}: state_bytes {} grad_buffer_bytes {} (Ψ = {psi}); \
             vs plain step max abs diff {abs:.3e} (rel {rel:.3e}), vs accumulation {acc_abs:.3e}; \
             {STEPS} steps in {elapsed:.2?}, {:.2?} in collectives",
            zo.state_bytes(),
            zo.grad_buffer_bytes(),
            zo.comm_time()
        );
        comm = zo.into_comm();
    }
    // Meet before finalizing, so no rank's failure report races the others.
    comm.barrier()?;
    drop(comm);
    if failures.is_empty() {
        println!("rank {rank} ok");
        Ok(ExitCode::SUCCESS)
    } else {
        for f in &failures {
            eprintln!("rank {rank}: {f}");
        }
        bail!("rank {rank}: {} check(s) failed", failures.len())
    }
}
