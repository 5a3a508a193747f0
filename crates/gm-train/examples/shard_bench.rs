//! ZeRO data parallelism over MPI, measured: per-rank optimizer-state bytes,
//! the fraction of step time spent in collectives, and parity with one
//! process — what `cargo xtask bench shard` runs (→ `target/bench/shard.json`).
//!
//! ```sh
//! cargo run --release -p gm-train --features mpi --example shard_bench -- \
//!     [--ranks 1,2,4] [--agent full|small] [--batch 64] [--steps 4] [--stage 1|2]
//! ```
//!
//! Run directly, it relaunches itself under `mpirun -n N` for each `N` of
//! `--ranks` (gm-shard's `mpirun_command`) and prints one JSON object on
//! stdout (last line; arrays aligned with `ranks`) and a table on stderr.
//! Under mpirun, every rank builds the same agent (seeded), takes its
//! contiguous share of one fixed global batch of real market observations,
//! and runs `--steps` timed ZeRO steps after one warm-up step
//! (`TrainStep::grads` on its rows, `ZeroOptimizer::step`). Between the
//! backward pass and the ZeRO step the ranks meet at a barrier, timed apart
//! as `wait` (one rank finishing its backward pass later than another is
//! load imbalance — here, ranks sharing cores — not communication); `comm`
//! is the time inside the ZeRO step's collectives once all have arrived.
//! Rank 0 then repeats the same steps in one process on the whole batch
//! (`TrainStep::step` with `AdamW`) and reports the largest parameter
//! difference. Dropout is off so both compute the same function.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use gm_market::{GeneratorConfig, MarketData, PipelineConfig, OBS_DIM};
use gm_shard::{zero_memory, AdamPrecision, Communicator, MpiComm, ZeroStage};
use gm_train::step::narrow_obs;
use gm_train::{
    AdamW, AdamWConfig, AgentConfig, AgentNet, Grads, ObsBatch, StepConfig, TdBatch, TrainStep,
    ZeroConfig, ZeroOptimizer,
};
use serde_json::{json, Map, Value};

/// A job still running after this is killed (a hung rank must not hang
/// the bench).
const JOB_DEADLINE: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
struct Args {
    ranks: Vec<usize>,
    full: bool,
    batch: usize,
    steps: usize,
    stage: ZeroStage,
    child: bool,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        ranks: vec![1, 2, 4],
        full: true,
        batch: 64,
        steps: 4,
        stage: ZeroStage::Stage2,
        child: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--ranks" => {
                a.ranks = val()?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--ranks: a list like 1,2,4")?
            }
            "--agent" => {
                a.full = match val()?.as_str() {
                    "full" => true,
                    "small" => false,
                    o => bail!("--agent: full or small, not {o}"),
                }
            }
            "--batch" => a.batch = val()?.parse().context("--batch")?,
            "--steps" => a.steps = val()?.parse().context("--steps")?,
            "--stage" => {
                a.stage = match val()?.parse().ok().and_then(ZeroStage::from_number) {
                    Some(s @ (ZeroStage::Stage1 | ZeroStage::Stage2)) => s,
                    _ => bail!("--stage: 1 or 2"),
                }
            }
            "--child" => a.child = true,
            "-h" | "--help" => {
                eprintln!(
                    "shard_bench [--ranks 1,2,4] [--agent full|small] [--batch N] [--steps N] [--stage 1|2]"
                );
                std::process::exit(0);
            }
            o => bail!("unknown argument {o}"),
        }
    }
    if a.ranks.is_empty() || a.ranks.contains(&0) {
        bail!("--ranks: at least one rank count, each >= 1");
    }
    if a.steps == 0 || a.batch == 0 {
        bail!("--steps and --batch must be at least 1");
    }
    if let Some(&n) = a.ranks.iter().find(|&&n| n > a.batch) {
        bail!("--batch {} is smaller than {n} ranks", a.batch);
    }
    Ok(a)
}

fn main() -> Result<()> {
    let a = parse()?;
    if a.child || gm_shard::launched_by_mpirun() {
        rank_main(&a)
    } else {
        parent(&a)
    }
}

// ---------------------------------------------------------------- parent

fn parent(a: &Args) -> Result<()> {
    let exe = std::env::current_exe().context("locating this program")?;
    let mut runs: Vec<Map<String, Value>> = Vec::new();
    for &n in &a.ranks {
        let mut cmd = gm_shard::mpirun_command(n, &exe);
        cmd.args(child_args(a));
        eprintln!("==> {n} rank(s): {cmd:?}");
        cmd.stdout(std::process::Stdio::piped());
        let out = gm_shard::run_job(&mut cmd, JOB_DEADLINE)
            .with_context(|| format!("running mpirun (is Open MPI installed?) for {n} ranks"))?;
        match out.status {
            None => bail!("the {n}-rank run passed {JOB_DEADLINE:?} and was killed"),
            Some(s) if !s.success() => bail!("the {n}-rank run failed ({s})"),
            Some(_) => {}
        }
        let obj = out
            .stdout
            .lines()
            .rev()
            .find_map(|l| match serde_json::from_str::<Value>(l.trim()) {
                Ok(Value::Object(m)) => Some(m),
                _ => None,
            })
            .with_context(|| format!("the {n}-rank run printed no JSON"))?;
        runs.push(obj);
    }
    let col = |k: &str| -> Value { Value::Array(runs.iter().map(|r| r[k].clone()).collect()) };
    let mut out = Map::new();
    out.insert("agent".into(), json!(if a.full { "full" } else { "small" }));
    out.insert("stage".into(), json!(a.stage.number().to_string()));
    out.insert("batch".into(), json!(a.batch));
    out.insert("steps".into(), json!(a.steps));
    out.insert("params".into(), runs[0]["params"].clone());
    for k in [
        "ranks",
        "optimizer_state_bytes_per_rank",
        "optimizer_state_bytes_formula",
        "grad_buffer_bytes_per_rank",
        "comm_fraction",
        "wait_fraction",
        "step_ms",
        "comm_ms",
        "bytes_sent_per_step",
        "parity_max_abs_diff",
        "peak_rss_bytes_per_rank",
        "per_rank_state_bytes",
    ] {
        out.insert(k.into(), col(k));
    }
    eprintln!(
        "\n| ranks | optimizer state / rank (measured) | ZeRO formula 8Ψ/N | grad buffer / rank | step | in collectives | waiting | parity max |Δw| |"
    );
    eprintln!("|--:|--:|--:|--:|--:|--:|--:|--:|");
    for r in &runs {
        eprintln!(
            "| {} | {} | {} | {} | {:.0} ms | {:.1} % | {:.1} % | {:.2e} |",
            r["ranks"],
            r["optimizer_state_bytes_per_rank"],
            r["optimizer_state_bytes_formula"],
            r["grad_buffer_bytes_per_rank"],
            r["step_ms"].as_f64().unwrap_or(f64::NAN),
            100.0 * r["comm_fraction"].as_f64().unwrap_or(f64::NAN),
            100.0 * r["wait_fraction"].as_f64().unwrap_or(f64::NAN),
            r["parity_max_abs_diff"].as_f64().unwrap_or(f64::NAN),
        );
    }
    println!("{}", Value::Object(out));
    Ok(())
}

fn child_args(a: &Args) -> Vec<String> {
    vec![
        "--child".to_string(),
        "--agent".into(),
        if a.full { "full" } else { "small" }.into(),
        "--batch".into(),
        a.batch.to_string(),
        "--steps".into(),
        a.steps.to_string(),
        "--stage".into(),
        a.stage.number().to_string(),
    ]
}

// ---------------------------------------------------------------- ranks

/// The global batch: `rows` real observations (every 7th ready bar), with
/// actions, TD targets and weights of the learner's scale.
struct Rows {
    obs: ObsBatch,
    actions: Vec<u32>,
    targets: Vec<f32>,
    weights: Vec<f32>,
}

impl Rows {
    fn new(data: &MarketData, rows: usize) -> Result<Self> {
        let first = data.first_ready();
        let span = data.len() - first;
        let mut flat = vec![0f32; rows * OBS_DIM];
        for (i, out) in flat.chunks_mut(OBS_DIM).enumerate() {
            data.observation(first + (i * 7) % span, out)?;
        }
        Ok(Self {
            obs: ObsBatch::from_flat(&flat, rows, &Device::Cpu)?,
            actions: (0..rows).map(|i| (i % 3) as u32).collect(),
            targets: (0..rows)
                .map(|i| ((i * 37) % 200) as f32 / 100.0 - 1.0)
                .collect(),
            weights: (0..rows)
                .map(|i| 0.5 + ((i * 13) % 50) as f32 / 100.0)
                .collect(),
        })
    }

    /// Rows `start .. start + len` as a TD batch over `obs`, which the
    /// caller narrowed to those rows.
    fn td<'a>(&'a self, obs: &'a ObsBatch, start: usize, len: usize) -> TdBatch<'a> {
        let rows = start..start + len;
        TdBatch {
            obs,
            actions: &self.actions[rows.clone()],
            targets: &self.targets[rows.clone()],
            weights: Some(&self.weights[rows]),
        }
    }
}

fn agent_config(full: bool) -> AgentConfig {
    if full {
        AgentConfig::default()
    } else {
        AgentConfig::tiny()
    }
}

fn adam() -> AdamWConfig {
    AdamWConfig {
        lr: 1e-4,
        weight_decay: 0.01,
        ..AdamWConfig::default()
    }
}

fn step_config() -> StepConfig {
    StepConfig {
        dropout: false,
        ..StepConfig::default()
    }
}

fn build(full: bool) -> Result<(VarMap, AgentNet)> {
    let vm = VarMap::new();
    let net = AgentNet::new(
        &agent_config(full),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )?;
    gm_models::init::init_seeded(&vm, 1)?;
    Ok((vm, net))
}

/// `(start, len)` of rank `r`'s contiguous share of `b` rows over `n` ranks.
fn share(b: usize, n: usize, r: usize) -> (usize, usize) {
    let (q, rem) = (b / n, b % n);
    let len = q + usize::from(r < rem);
    let start = r * q + r.min(rem);
    (start, len)
}

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn values_of(vm: &VarMap) -> Result<Vec<(String, Vec<f32>)>> {
    let data = vm
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned varmap"))?;
    let mut v = data
        .iter()
        .map(|(n, var)| Ok((n.clone(), var.as_tensor().flatten_all()?.to_vec1::<f32>()?)))
        .collect::<Result<Vec<_>>>()?;
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

fn rank_main(a: &Args) -> Result<()> {
    let comm = MpiComm::init(Duration::from_secs(300))?;
    let (rank, world) = (comm.rank(), comm.world());
    let data = Arc::new(MarketData::synthetic(
        GeneratorConfig::default(),
        4_000,
        PipelineConfig::default(),
    )?);
    let rows = Rows::new(&data, a.batch)?;
    let (vm, net) = build(a.full)?;
    let params = Grads::empty(&vm)?
        .iter()
        .map(|(_, v, _)| v.elem_count() as u64)
        .sum::<u64>();
    let ts = TrainStep::new(step_config(), agent_config(a.full))?;
    let mut zero = ZeroOptimizer::new(
        Box::new(comm),
        &vm,
        adam(),
        ZeroConfig {
            stage: a.stage,
            ..ZeroConfig::default()
        },
    )?;
    let (start, len) = share(a.batch, world, rank);
    let obs = narrow_obs(&rows.obs, start, len)?;
    let td = rows.td(&obs, start, len);
    let weight = len as f64 / a.batch as f64;
    let (mut wall, mut comm_t, mut wait, mut sent) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO, 0u64);
    for k in 0..=a.steps {
        let t0 = Instant::now();
        let g = ts.grads(&net, &vm, &td, k as u64)?;
        // ranks that finished their backward pass early wait here
        let tb = Instant::now();
        zero.comm().barrier()?;
        let waited = tb.elapsed();
        let out = zero.step(&g.grads, weight, g.loss_scale, ts.cfg.max_grad_norm)?;
        if !out.stepped {
            bail!("rank {rank}: step {k} was skipped (non-finite gradients)");
        }
        if k > 0 {
            // step 0 warms caches and allocator pools
            wall += t0.elapsed();
            wait += waited;
            comm_t += out.comm;
            sent += out.bytes_sent;
        }
        if rank == 0 {
            eprintln!(
                "   rank 0/{world}: step {k} {:.0} ms (collectives {:.0} ms, barrier {:.0} ms)",
                t0.elapsed().as_secs_f64() * 1e3,
                out.comm.as_secs_f64() * 1e3,
                waited.as_secs_f64() * 1e3
            );
        }
    }
    let stats = [
        zero.state_bytes(),
        zero.grad_buffer_bytes(),
        wall.as_nanos() as u64,
        comm_t.as_nanos() as u64,
        wait.as_nanos() as u64,
        sent,
        peak_rss_bytes(),
    ];
    let gathered = zero.comm().gather_stats(&stats)?;
    let Some(all) = gathered else {
        return Ok(()); // ranks > 0 are done
    };

    // Rank 0: the one-process reference on the whole batch.
    let (ref_vm, ref_net) = build(a.full)?;
    let mut ref_ts = TrainStep::new(step_config(), agent_config(a.full))?;
    let mut opt = AdamW::new(adam(), Grads::empty(&ref_vm)?.len())?;
    let whole = rows.td(&rows.obs, 0, a.batch);
    for k in 0..=a.steps {
        ref_ts.step(&ref_net, &ref_vm, &mut opt, &whole, k as u64)?;
    }
    let mut diff = 0f64;
    for ((n1, a1), (n2, a2)) in values_of(&vm)?.iter().zip(values_of(&ref_vm)?.iter()) {
        if n1 != n2 || a1.len() != a2.len() {
            bail!("parameter layouts differ: {n1} vs {n2}");
        }
        for (x, y) in a1.iter().zip(a2) {
            diff = diff.max(f64::from((x - y).abs()));
        }
    }

    let col = |i: usize| all.iter().map(|r| r[i]).collect::<Vec<u64>>();
    let max = |i: usize| col(i).into_iter().max().unwrap_or(0);
    let (wall_ns, comm_ns, wait_ns) = (col(2), col(3), col(4));
    // fractions of the slowest rank's wall time (the step takes as long as it)
    let wall_max = wall_ns.iter().copied().max().unwrap_or(1).max(1) as f64;
    let comm_fraction = comm_ns.iter().copied().max().unwrap_or(0) as f64 / wall_max;
    let wait_fraction = wait_ns.iter().copied().max().unwrap_or(0) as f64 / wall_max;
    let formula = zero_memory(a.stage, AdamPrecision::F32, params, world)?;
    let steps = a.steps as f64;
    let out = json!({
        "ranks": world,
        "params": params,
        "optimizer_state_bytes_per_rank": max(0),
        "per_rank_state_bytes": col(0),
        "optimizer_state_bytes_formula": formula.optimizer_bytes,
        "grad_buffer_bytes_per_rank": max(1),
        "step_ms": wall_max / steps / 1e6,
        "comm_ms": comm_ns.iter().copied().max().unwrap_or(0) as f64 / steps / 1e6,
        "comm_fraction": comm_fraction,
        "wait_fraction": wait_fraction,
        "bytes_sent_per_step": max(5) as f64 / steps,
        "parity_max_abs_diff": diff,
        "peak_rss_bytes_per_rank": col(6),
    });
    println!("{out}");
    Ok(())
}
