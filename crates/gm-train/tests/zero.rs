//! ZeRO-1/ZeRO-2 data parallelism over the in-process backend
//! (`gm_shard::ThreadGroup`): N ranks each differentiating their slice of
//! the batch and stepping a `ZeroOptimizer` end with the weights of the
//! single-process `TrainStep::step` + `AdamW` (stage 1 and 2, 2 and 4 ranks,
//! uneven splits, clipping on); the optimizer state per rank falls as 1/N;
//! state gathered at N = 2 resumes at N = 4 and in a single process;
//! rebalancing moves state without changing the next step; top-k sends
//! exactly `8k` bytes and still converges; bad input and departed peers are
//! errors on every rank, never hangs.
//!
//! Parity metric: per variable, `max |w − w_ref| / max |w_ref|`, asserted
//! ≤ 1e-5 (resumes: ≤ 1e-6).

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use gm_models::init::init_seeded;
use gm_shard::{zero_memory, AdamPrecision, Communicator, ThreadComm, ThreadGroup, ZeroStage};
use gm_train::step::narrow_obs;
use gm_train::{
    AdamW, AdamWConfig, AgentConfig, AgentNet, Error, Grads, StepConfig, TdBatch, TopKAmount,
    TrainStep, ZeroConfig, ZeroOptimizer, ZeroOutcome,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;
use common::Data;

const LONG: Duration = Duration::from_secs(120);
/// Small shards so the tiny agent splits into many (512 parameters each).
const SHARD: u64 = 8 * 512;

type Values = Vec<(String, Vec<f32>)>;

/// Rows `start .. start + rows` of `d`.
fn slice_grads(
    ts: &TrainStep,
    net: &AgentNet,
    vm: &VarMap,
    d: &Data,
    start: usize,
    rows: usize,
) -> gm_train::StepGrads {
    let obs = narrow_obs(&d.obs, start, rows).unwrap();
    let b = TdBatch {
        obs: &obs,
        actions: &d.actions[start..start + rows],
        targets: &d.targets[start..start + rows],
        weights: Some(&d.weights[start..start + rows]),
    };
    ts.grads(net, vm, &b, 0).unwrap()
}

/// Contiguous split of `b` rows over `n` ranks: `(start, rows)` of `r`.
fn split(b: usize, n: usize, r: usize) -> (usize, usize) {
    let rows = |q: usize| b / n + usize::from(q < b % n);
    ((0..r).map(rows).sum(), rows(r))
}

/// The tiny agent on a fresh map, weights from `seed`; the biases (zero
/// after `init_seeded`) drawn from ±0.1 too, so that "relative to each
/// variable's max |w|" is relative to a weight, not to three Adam steps of
/// size lr (see `zero_steps_equal_the_single_process_step`).
fn agent(seed: u64) -> (VarMap, AgentNet) {
    let vm = VarMap::new();
    let net = AgentNet::new(
        &AgentConfig::tiny(),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    init_seeded(&vm, seed).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xb1a5);
    for (name, v) in values(&vm) {
        if name.ends_with("bias") {
            let b: Vec<f32> = v.iter().map(|_| rng.random_range(-0.1f32..0.1)).collect();
            set_values(&vm, &vec![(name, b)]);
        }
    }
    (vm, net)
}

fn step_cfg(clip: Option<f64>) -> StepConfig {
    StepConfig {
        dropout: false,
        max_grad_norm: clip,
        ..StepConfig::default()
    }
}

/// The plain AdamW's defaults (lr 1e-3, eps 1e-8).
fn adam() -> AdamWConfig {
    AdamWConfig::default()
}

fn values(vm: &VarMap) -> Values {
    let data = vm.data().lock().unwrap();
    let mut out: Values = data
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn set_values(vm: &VarMap, vals: &Values) {
    let data = vm.data().lock().unwrap();
    for (n, v) in vals {
        let var = &data[n];
        var.set(&Tensor::from_slice(v, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
}

/// Worst per-variable `max |a − b| / max |b|`, and the worst `max |a − b|`.
fn rel_diff(a: &Values, b: &Values) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let (mut rel, mut abs) = (0f64, 0f64);
    for ((na, x), (nb, y)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        let scale = y.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
        let d = x
            .iter()
            .zip(y)
            .fold(0f64, |m, (p, q)| m.max(f64::from((p - q).abs())));
        assert!(d.is_finite(), "{na}");
        abs = abs.max(d);
        rel = rel.max(if scale > 0.0 { d / scale } else { d });
    }
    (rel, abs)
}

fn tensor_values(t: &Option<Tensor>) -> Vec<f32> {
    t.as_ref()
        .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
        .unwrap_or_default()
}

/// Single process: `steps` steps of `TrainStep::step` with `AdamW` from
/// seed-3 weights; returns the weights after each step and the optimizer.
fn reference(d: &Data, clip: Option<f64>, steps: usize) -> (Vec<Values>, AdamW) {
    reference_accum(d, clip, steps, None)
}

/// [`reference`] with gradient accumulation over micro-batches of
/// `micro` rows.
fn reference_accum(
    d: &Data,
    clip: Option<f64>,
    steps: usize,
    micro: Option<usize>,
) -> (Vec<Values>, AdamW) {
    let (vm, net) = agent(3);
    let cfg = StepConfig {
        micro_batch: micro,
        ..step_cfg(clip)
    };
    let mut ts = TrainStep::new(cfg, AgentConfig::tiny()).unwrap();
    let mut opt = AdamW::new(adam(), Grads::empty(&vm).unwrap().len()).unwrap();
    let mut out = Vec::new();
    for s in 0..steps {
        let o = ts.step(&net, &vm, &mut opt, &d.batch(), s as u64).unwrap();
        assert!(o.stepped);
        out.push(values(&vm));
    }
    (out, opt)
}

/// What one rank of a ZeRO run ends with.
struct RankEnd {
    values: Values,
    outcomes: Vec<ZeroOutcome>,
    state_bytes: u64,
    grad_buffer_bytes: u64,
    /// Rank 0: the gathered optimizer state.
    state: Option<AdamW>,
}

/// One rank: its agent (rank 0 from seed 3, the others from another seed:
/// `ZeroOptimizer::new` must broadcast rank 0's weights), `steps` steps on
/// its slice of `d`.
fn zero_rank(
    comm: ThreadComm,
    d: &Data,
    cfg: &ZeroConfig,
    clip: Option<f64>,
    steps: usize,
) -> RankEnd {
    let (r, n) = (comm.rank(), comm.world());
    let (vm, net) = agent(if r == 0 { 3 } else { 100 + r as u64 });
    let mut zo = ZeroOptimizer::new(Box::new(comm), &vm, adam(), cfg.clone()).unwrap();
    let ts = TrainStep::new(step_cfg(clip), AgentConfig::tiny()).unwrap();
    let (start, rows) = split(d.len(), n, r);
    let mut outcomes = Vec::new();
    for _ in 0..steps {
        let g = slice_grads(&ts, &net, &vm, d, start, rows);
        let w = rows as f64 / d.len() as f64;
        outcomes.push(zo.step(&g.grads, w, g.loss_scale, clip).unwrap());
    }
    assert_eq!(zo.steps(), steps as u64);
    RankEnd {
        values: values(&vm),
        outcomes,
        state_bytes: zo.state_bytes(),
        grad_buffer_bytes: zo.grad_buffer_bytes(),
        state: zo.gather_state().unwrap(),
    }
}

fn stage_cfg(stage: ZeroStage) -> ZeroConfig {
    ZeroConfig {
        stage,
        max_shard_bytes: SHARD,
        ..ZeroConfig::default()
    }
}

/// Worst per-variable `max |a − b| / max |b|` over optimizer moments.
fn moment_diff(a: &[Option<Tensor>], b: &[Option<Tensor>]) -> f64 {
    let mut worst = 0f64;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.is_some(), y.is_some(), "variable {i}");
        let (x, y) = (tensor_values(x), tensor_values(y));
        let scale = y.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
        let d = x
            .iter()
            .zip(&y)
            .fold(0f64, |m, (p, q)| m.max(f64::from((p - q).abs())));
        worst = worst.max(if scale > 0.0 { d / scale } else { d });
    }
    worst
}

/// Three steps on N ranks against one process, on the same 16 or 15 rows:
/// - against the plain `TrainStep::step` + `AdamW`: weights within 1e-5 of
///   each variable's max |w| and moments (`m`, `v`, which scale with the
///   gradient, unlike Adam's update) within 1e-5 of each variable's
///   largest;
/// - against `TrainStep` with gradient accumulation over the ranks' row
///   split (the same decomposition of the mean): bit-identical when the
///   rank weights are powers of two and clipping is off, within 1e-6
///   otherwise.
///
/// Why the biases are not zero: the global gradient of some elements is a
/// cancellation (e.g. ±7.5e-6 from the two halves summing to 4e-8) whose
/// rounding differs with the summation order, and Adam's `m / (√v + ε)`
/// turns a near-zero gradient's rounding into an update difference of up
/// to `lr · δ/ε` (measured 1.7e-8 after one step with lr 1e-3). For a
/// zero-initialised bias, max |w| after three steps is ≈ 3·lr, so that is
/// a 1e-5 relative miss caused by no error of the sharding; against
/// weights of size ~0.1 it is 2e-7.
#[test]
fn zero_steps_equal_the_single_process_step() {
    let t0 = Instant::now();
    let psi = psi(&agent(3).0);
    println!("tiny agent: Ψ = {psi} parameters");
    for (b, n, clip) in [
        (16, 2, Some(10.0)),
        (16, 4, None),
        (15, 4, Some(0.05)),
        (15, 2, Some(0.05)),
    ] {
        let d = Data::new(1, b);
        let (plain, plain_opt) = reference(&d, clip, 3);
        let (accum, _) = reference_accum(&d, clip, 3, Some(b.div_ceil(n)));
        let exact = b % n == 0 && n.is_power_of_two() && clip.is_none_or(|c| c > 1.0);
        for stage in [ZeroStage::Stage1, ZeroStage::Stage2] {
            let cfg = stage_cfg(stage);
            let ends = ThreadGroup::run(n, LONG, |c| zero_rank(c, &d, &cfg, clip, 3)).unwrap();
            for (r, e) in ends.iter().enumerate() {
                // Bit-identical weights on every rank.
                assert_eq!(e.values, ends[0].values, "rank {r}");
                assert!(e.outcomes.iter().all(|o| o.stepped));
                assert_eq!(e.outcomes[0].bytes_sent, 4 * psi as u64);
                assert_eq!(e.state.is_some(), r == 0);
                let owned = e.state_bytes / 8;
                let kept = if stage == ZeroStage::Stage1 {
                    psi as u64
                } else {
                    owned
                };
                assert_eq!(e.grad_buffer_bytes, 4 * kept);
            }
            let (rel, abs) = rel_diff(&ends[0].values, plain.last().unwrap());
            let state = ends[0].state.as_ref().unwrap();
            let m_rel = moment_diff(&state.m, &plain_opt.m);
            let v_rel = moment_diff(&state.v, &plain_opt.v);
            let (acc_rel, acc_abs) = rel_diff(&ends[0].values, accum.last().unwrap());
            let norm = ends[0].outcomes[0].grad_norm;
            println!(
                "{stage:?} N={n} B={b} clip={clip:?} (norm {norm:.4}): vs plain step: \
                 max abs diff {abs:.3e}, rel {rel:.3e}, m rel {m_rel:.2e}, v rel {v_rel:.2e}; \
                 vs accumulation over the same split: max abs diff {acc_abs:.3e}"
            );
            assert!(rel <= 1e-5, "{rel}");
            assert!(m_rel <= 1e-5 && v_rel <= 1e-5, "{m_rel} {v_rel}");
            if exact {
                assert_eq!(acc_abs, 0.0);
            } else {
                assert!(acc_rel <= 1e-6, "{acc_rel}");
            }
            assert_eq!(state.step, 3);
            if clip == Some(0.05) {
                assert!(norm > 0.05, "clipping must be active: norm {norm}");
            }
        }
        // The update is not trivially small.
        let (moved, _) = rel_diff(plain.last().unwrap(), &values(&agent(3).0));
        assert!(moved > 1e-3, "{moved}");
    }
    println!("parity test: {:.1?}", t0.elapsed());
}

/// Ψ: the parameters of a map.
fn psi(vm: &VarMap) -> usize {
    Grads::empty(vm)
        .unwrap()
        .iter()
        .map(|(_, v, _)| v.elem_count())
        .sum()
}

/// The variables of a map: `(name, dims)`, sorted.
fn shapes(vm: &VarMap) -> Vec<(String, Vec<usize>)> {
    Grads::empty(vm)
        .unwrap()
        .iter()
        .map(|(n, v, _)| (n.to_string(), v.dims().to_vec()))
        .collect()
}

/// A map of zeros with these variables (cheaper than building the agent
/// again on every rank: only names and sizes matter here).
fn zeros_like(shapes: &[(String, Vec<usize>)]) -> VarMap {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    for (n, d) in shapes {
        vb.get_with_hints(d.as_slice(), n, Init::Const(0.0))
            .unwrap();
    }
    vm
}

/// Per rank: (state bytes, grad buffer bytes, largest shard's bytes) of a
/// fresh optimizer.
fn memory(shapes: &[(String, Vec<usize>)], n: usize, cfg: &ZeroConfig) -> Vec<(u64, u64, u64)> {
    ThreadGroup::run(n, LONG, |c| {
        let vm = zeros_like(shapes);
        let zo = ZeroOptimizer::new(Box::new(c), &vm, adam(), cfg.clone()).unwrap();
        let biggest = zo.plan().shards().iter().map(|s| s.bytes).max().unwrap();
        (zo.state_bytes(), zo.grad_buffer_bytes(), biggest)
    })
    .unwrap()
}

/// `state_bytes` per rank sums to 8Ψ and the largest rank holds at most
/// 8Ψ/N + one shard; the gradient kept is 4Ψ (stage 1) or the owned part
/// (stage 2); with the 4Ψ of parameters that is `zero_memory`'s f32 figure
/// within a shard. The tiny agent (512-parameter shards) and the full one
/// (1 MiB shards of state).
#[test]
fn optimizer_state_per_rank_falls_as_one_over_n() {
    let full = VarMap::new();
    AgentNet::new(
        &AgentConfig::default(),
        VarBuilder::from_varmap(&full, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let agents = [
        ("tiny", shapes(&agent(3).0), SHARD),
        ("full", shapes(&full), 1 << 20),
    ];
    for (name, shapes, shard) in agents {
        let psi: u64 = shapes
            .iter()
            .map(|(_, d)| d.iter().product::<usize>() as u64)
            .sum();
        println!("{name} agent: Ψ = {psi}, shards ≤ {shard} bytes of state");
        for stage in [ZeroStage::Stage1, ZeroStage::Stage2] {
            for n in [1usize, 2, 4] {
                let cfg = ZeroConfig {
                    stage,
                    max_shard_bytes: shard,
                    ..ZeroConfig::default()
                };
                let per_rank = memory(&shapes, n, &cfg);
                let state: Vec<u64> = per_rank.iter().map(|x| x.0).collect();
                let grad: Vec<u64> = per_rank.iter().map(|x| x.1).collect();
                let biggest = per_rank[0].2;
                let zm = zero_memory(stage, AdamPrecision::F32, psi, n).unwrap();
                println!(
                    "  {stage:?} N={n}: state bytes per rank {state:?} (8Ψ/N = {}), \
                     grad buffer {grad:?}; zero_memory total {} vs measured max {}",
                    8 * psi / n as u64,
                    zm.total_bytes(),
                    4 * psi + state.iter().max().unwrap() + grad.iter().max().unwrap(),
                );
                assert_eq!(state.iter().sum::<u64>(), 8 * psi);
                assert!(*state.iter().max().unwrap() <= 8 * psi / n as u64 + biggest);
                for (s, g) in state.iter().zip(&grad) {
                    match stage {
                        ZeroStage::Stage1 => assert_eq!(*g, 4 * psi),
                        _ => assert_eq!(*g, s / 2),
                    }
                }
                let measured = 4 * psi + state.iter().max().unwrap() + grad.iter().max().unwrap();
                let slack = if stage == ZeroStage::Stage1 {
                    biggest
                } else {
                    biggest * 3 / 2
                };
                assert!(measured <= zm.total_bytes() + slack);
            }
        }
    }
}

#[test]
fn gathered_state_resumes_on_another_world_size_and_in_one_process() {
    let d = Data::new(2, 16);
    let clip = Some(10.0);
    let cfg = stage_cfg(ZeroStage::Stage2);
    let (reference, ref_opt2) = reference(&d, clip, 2);
    // Uninterrupted at N = 2: three steps.
    let uninterrupted = ThreadGroup::run(2, LONG, |c| zero_rank(c, &d, &cfg, clip, 3).values)
        .unwrap()
        .remove(0);
    // Two steps at N = 2, then gather.
    let gathered = ThreadGroup::run(2, LONG, |c| {
        let (r, n) = (c.rank(), c.world());
        let (vm, net) = agent(3);
        let mut zo = ZeroOptimizer::new(Box::new(c), &vm, adam(), cfg.clone()).unwrap();
        let ts = TrainStep::new(step_cfg(clip), AgentConfig::tiny()).unwrap();
        let (start, rows) = split(d.len(), n, r);
        for _ in 0..2 {
            let g = slice_grads(&ts, &net, &vm, &d, start, rows);
            zo.step(&g.grads, rows as f64 / 16.0, 1.0, clip).unwrap();
        }
        (zo.gather_state().unwrap(), values(&vm))
    })
    .unwrap();
    assert!(gathered[1].0.is_none());
    let (state, weights2) = (gathered[0].0.clone().unwrap(), gathered[0].1.clone());
    assert_eq!(state.step, 2);
    // The gathered moments are the single-process AdamW's.
    let (rel, _) = rel_diff(&weights2, &reference[1]);
    assert!(rel <= 1e-5, "{rel}");
    for (i, (m, rm)) in state.m.iter().zip(&ref_opt2.m).enumerate() {
        assert_eq!(m.is_some(), rm.is_some(), "variable {i}");
        let (a, b) = (tensor_values(m), tensor_values(rm));
        let scale = b.iter().fold(0f32, |x, v| x.max(v.abs())).max(1e-12);
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |x, (p, q)| x.max((p - q).abs()));
        assert!(diff / scale <= 1e-4, "m of variable {i}: {diff} / {scale}");
    }

    // Resume at N = 4.
    let resumed = ThreadGroup::run(4, LONG, |c| {
        let (r, n) = (c.rank(), c.world());
        let (vm, net) = agent(50 + r as u64);
        set_values(&vm, &weights2);
        let mut zo = ZeroOptimizer::new(Box::new(c), &vm, adam(), cfg.clone()).unwrap();
        zo.load_state(&state).unwrap();
        assert_eq!(zo.steps(), 2);
        let ts = TrainStep::new(step_cfg(clip), AgentConfig::tiny()).unwrap();
        let (start, rows) = split(d.len(), n, r);
        let g = slice_grads(&ts, &net, &vm, &d, start, rows);
        zo.step(&g.grads, rows as f64 / 16.0, 1.0, clip).unwrap();
        values(&vm)
    })
    .unwrap();
    let (rel4, abs4) = rel_diff(&resumed[0], &uninterrupted);
    // Resume in one process with a plain AdamW.
    let (vm, net) = agent(7);
    set_values(&vm, &weights2);
    let mut opt = state.clone();
    let mut ts = TrainStep::new(step_cfg(clip), AgentConfig::tiny()).unwrap();
    ts.step(&net, &vm, &mut opt, &d.batch(), 0).unwrap();
    let (rel1, abs1) = rel_diff(&values(&vm), &uninterrupted);
    println!(
        "resume from N=2 state: at N=4 max abs diff {abs4:.3e} (rel {rel4:.3e}), \
         single process {abs1:.3e} (rel {rel1:.3e})"
    );
    assert!(rel4 <= 1e-6, "{rel4}");
    assert!(rel1 <= 1e-6, "{rel1}");
}

#[test]
fn rebalance_moves_state_and_the_next_step_is_unchanged() {
    let d = Data::new(3, 16);
    let cfg = stage_cfg(ZeroStage::Stage2);
    let run = |rebalance: bool| {
        ThreadGroup::run(4, LONG, |c| {
            let (r, n) = (c.rank(), c.world());
            let (vm, net) = agent(3);
            let mut zo = ZeroOptimizer::new(Box::new(c), &vm, adam(), cfg.clone()).unwrap();
            let ts = TrainStep::new(step_cfg(None), AgentConfig::tiny()).unwrap();
            let (start, rows) = split(d.len(), n, r);
            let mut before_after = None;
            for s in 0..3 {
                if s == 2 && rebalance {
                    let total = 8 * zo.params() as u64;
                    let before = zo.state_bytes();
                    // Unlimited budgets: the same plan, nothing moves.
                    assert!(!zo.rebalance(vec![u64::MAX; 4]).unwrap());
                    // Rank 0 takes about half, the others the rest.
                    let budgets = vec![total * 55 / 100, total / 5, total / 5, total / 5];
                    assert!(zo.rebalance(budgets.clone()).unwrap());
                    assert_eq!(zo.state_bytes(), zo.plan().rank_bytes()[r]);
                    assert!(zo.state_bytes() <= budgets[r]);
                    before_after = Some((before, zo.state_bytes()));
                }
                let g = slice_grads(&ts, &net, &vm, &d, start, rows);
                zo.step(&g.grads, rows as f64 / 16.0, 1.0, None).unwrap();
            }
            let state = zo.gather_state().unwrap();
            (values(&vm), state, before_after)
        })
        .unwrap()
    };
    let moved = run(true);
    let still = run(false);
    for (r, m) in moved.iter().enumerate() {
        if let Some((b, a)) = m.2 {
            println!("rank {r}: state bytes {b} → {a} after rebalance");
        }
    }
    // No clipping: the reduced gradient is element-wise the same sum, so the
    // weights and the gathered state are bit-identical.
    assert_eq!(moved[0].0, still[0].0);
    let (a, b) = (moved[0].1.as_ref().unwrap(), still[0].1.as_ref().unwrap());
    assert_eq!(a.step, b.step);
    for (x, y) in a.m.iter().zip(&b.m).chain(a.v.iter().zip(&b.v)) {
        assert_eq!(tensor_values(x), tensor_values(y));
    }
    assert!(moved[0].2.unwrap().1 > moved[1].2.unwrap().1);
}

/// A map with two variables `a` (50) and `b` (30), all zeros.
fn small_vm() -> VarMap {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    vb.get_with_hints(50, "a", Init::Const(0.0)).unwrap();
    vb.get_with_hints(30, "b", Init::Const(0.0)).unwrap();
    vm
}

/// Targets of rank `r` for [`small_vm`]'s 80 parameters.
fn targets(r: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(10 + r as u64);
    (0..80).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// The gradient of `0.5 ‖w − t‖²` on `vm` (`∇ = w − t`).
fn quadratic_grads(vm: &VarMap, t: &[f32]) -> Grads {
    let data = vm.data().lock().unwrap();
    let (a, b) = (data["a"].as_tensor().clone(), data["b"].as_tensor().clone());
    drop(data);
    let ta = Tensor::from_slice(&t[..50], 50, &Device::Cpu).unwrap();
    let tb = Tensor::from_slice(&t[50..], 30, &Device::Cpu).unwrap();
    let loss = a
        .sub(&ta)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .add(&b.sub(&tb).unwrap().sqr().unwrap().sum_all().unwrap())
        .unwrap()
        .affine(0.5, 0.0)
        .unwrap();
    Grads::from_store(vm, &loss.backward().unwrap()).unwrap()
}

#[test]
fn top_k_sends_8k_bytes_and_converges() {
    let n = 3;
    let mean: Vec<f32> = (0..80)
        .map(|i| (0..n).map(|r| targets(r)[i]).sum::<f32>() / n as f32)
        .collect();
    let opt = AdamWConfig {
        lr: 0.02,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    for (stage, top_k) in [
        (ZeroStage::Stage1, Some(TopKAmount::Count(8))),
        (ZeroStage::Stage2, Some(TopKAmount::Fraction(0.1))),
        (ZeroStage::Stage2, None),
    ] {
        let cfg = ZeroConfig {
            stage,
            max_shard_bytes: 8 * 16,
            top_k,
            ..ZeroConfig::default()
        };
        let ends = ThreadGroup::run(n, LONG, |c| {
            let r = c.rank();
            let vm = small_vm();
            let mut zo = ZeroOptimizer::new(Box::new(c), &vm, opt, cfg.clone()).unwrap();
            let t = targets(r);
            let mut sent = Vec::new();
            for _ in 0..600 {
                let g = quadratic_grads(&vm, &t);
                let o = zo.step(&g, 1.0 / n as f64, 1.0, None).unwrap();
                assert!(o.stepped);
                sent.push(o.bytes_sent);
            }
            (values(&vm), sent, zo.residual_bytes())
        })
        .unwrap();
        let w: Vec<f32> = ends[0].0.iter().flat_map(|(_, v)| v.clone()).collect();
        let err = w
            .iter()
            .zip(&mean)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let start = mean.iter().fold(0f32, |m, b| m.max(b.abs()));
        println!(
            "{stage:?} top_k {top_k:?}: bytes sent per step {}, max |w − w*| {err:.4} (from {start:.3})",
            ends[0].1[0]
        );
        for e in &ends {
            assert_eq!(e.0, ends[0].0);
            let want = match top_k {
                Some(a) => 8 * a.k(80) as u64,
                None => 4 * 80,
            };
            assert!(e.1.iter().all(|&b| b == want), "{:?}", &e.1[..3]);
            assert_eq!(e.2, if top_k.is_some() { 4 * 80 } else { 0 });
        }
        assert!(err < 0.05 * start, "{err} vs {start}");
    }
}

#[test]
fn bad_input_is_an_error_on_every_rank_and_the_group_stays_usable() {
    let out = ThreadGroup::run(2, LONG, |c| {
        let r = c.rank();
        let vm = small_vm();
        let mut zo = ZeroOptimizer::new(
            Box::new(c),
            &vm,
            AdamWConfig::default(),
            ZeroConfig::default(),
        )
        .unwrap();
        let t = targets(r);
        let good = quadratic_grads(&vm, &t);
        let mut errs = Vec::new();
        // Rank 1 passes gradients of another map.
        let other = {
            let vm2 = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm2, DType::F32, &Device::Cpu);
            let x = vb.get_with_hints(3, "x", Init::Const(1.0)).unwrap();
            Grads::from_store(&vm2, &x.sum_all().unwrap().backward().unwrap()).unwrap()
        };
        let g = if r == 1 { &other } else { &good };
        errs.push(zo.step(g, 0.5, 1.0, None).unwrap_err().to_string());
        // Same names, another shape.
        let reshaped = {
            let vm2 = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm2, DType::F32, &Device::Cpu);
            let a = vb.get_with_hints(5, "a", Init::Const(1.0)).unwrap();
            let b = vb.get_with_hints(30, "b", Init::Const(1.0)).unwrap();
            let l = a.sum_all().unwrap().add(&b.sum_all().unwrap()).unwrap();
            Grads::from_store(&vm2, &l.backward().unwrap()).unwrap()
        };
        let g = if r == 0 { &reshaped } else { &good };
        errs.push(zo.step(g, 0.5, 1.0, None).unwrap_err().to_string());
        // Bad weights and loss scales.
        let w = if r == 0 { f64::NAN } else { 0.5 };
        errs.push(zo.step(&good, w, 1.0, None).unwrap_err().to_string());
        errs.push(zo.step(&good, 0.0, 1.0, None).unwrap_err().to_string());
        errs.push(zo.step(&good, 0.5, 0.0, None).unwrap_err().to_string());
        assert_eq!(zo.steps(), 0);
        let untouched = values(&vm);
        // A non-finite gradient on one rank skips the step everywhere.
        let mut inf = good.clone();
        if r == 1 {
            inf.grads_mut()[0] = Some(Tensor::full(f32::INFINITY, 50, &Device::Cpu).unwrap());
        }
        let o = zo.step(&inf, 0.5, 1024.0, Some(1.0)).unwrap();
        assert!(!o.stepped && o.grad_norm.is_infinite());
        assert_eq!(zo.steps(), 0);
        assert_eq!(values(&vm), untouched);
        // And the group still works.
        let o = zo.step(&good, 0.5, 1.0, None).unwrap();
        assert!(o.stepped && o.grad_norm > 0.0);
        assert_eq!(zo.steps(), 1);
        errs
    })
    .unwrap();
    for (r, errs) in out.iter().enumerate() {
        println!("rank {r}: {errs:#?}");
    }
    assert!(out[1][0].contains("grads") && out[1][0].contains("1 variables"));
    assert!(out[0][0].contains("ranks [1]"));
    assert!(out[0][1].contains("shape [5]"));
    assert!(out[1][1].contains("ranks [0]"));
    assert!(out[0][2].contains("weight") && out[1][2].contains("ranks [0]"));
    for errs in &out {
        assert!(errs[3].contains("weight = 0"), "{}", errs[3]);
        assert!(errs[4].contains("loss_scale = 0"), "{}", errs[4]);
    }
}

#[test]
fn a_rank_that_leaves_fails_its_peers_without_a_hang() {
    let timeout = Duration::from_secs(3);
    for leave_before_new in [true, false] {
        let t0 = Instant::now();
        let out = ThreadGroup::run(3, timeout, |c| {
            let r = c.rank();
            let vm = small_vm();
            if r == 2 && leave_before_new {
                drop(c);
                return None;
            }
            let zo = ZeroOptimizer::new(
                Box::new(c),
                &vm,
                AdamWConfig::default(),
                ZeroConfig::default(),
            );
            let mut zo = match zo {
                Ok(zo) => zo,
                Err(e) => return Some(e),
            };
            if r == 2 {
                return None; // drops the optimizer and its communicator
            }
            let g = quadratic_grads(&vm, &targets(r));
            Some(zo.step(&g, 0.5, 1.0, None).unwrap_err())
        })
        .unwrap();
        let elapsed = t0.elapsed();
        for (r, e) in out.iter().enumerate().take(2) {
            let e = e.as_ref().unwrap();
            println!("leave before new = {leave_before_new}: rank {r}: {e} ({elapsed:.1?})");
            assert!(
                matches!(
                    e,
                    Error::Shard(
                        gm_shard::Error::PeerLeft { .. }
                            | gm_shard::Error::Timeout { .. }
                            | gm_shard::Error::Aborted { .. }
                    )
                ),
                "{e:?}"
            );
        }
        assert!(elapsed < timeout * 3, "{elapsed:?}");
    }
}
