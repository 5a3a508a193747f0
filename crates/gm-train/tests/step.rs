//! The composable training step (issue 6): every combination of
//! checkpointing, precision and accumulation gives the plain step's
//! gradients (f32: to 1e-5 relative; bf16/f16: to the tolerance below), the
//! plain step's gradient is the Huber loss's (checked against candle's own
//! backward of a tensor Huber loss), the update equals AdamW on those
//! gradients, an f16 overflow skips the update, and bad batches are errors.
//!
//! Gradient metric (f32): per variable, `max |g − g_ref| / max |g_ref|`
//! (the error relative to the variable's largest gradient entry), asserted
//! ≤ 1e-5; both runs must give gradients to exactly the same variables.
//! Low precision: over all variables at once, the cosine to the f32
//! gradient and `‖g − g_f32‖₂ / ‖g_f32‖₂`.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gm_models::init::init_seeded;
use gm_train::checkpoint::{agent_plain_grads, CheckpointConfig, SegmentDropout};
use gm_train::{
    AdamW, AdamWConfig, AgentConfig, AgentNet, Grads, LossScaler, LossScalerConfig, Precision,
    StepConfig, TdBatch, TrainStep,
};

mod common;
use common::{flat, grads_rel_err as rel_err, Data};

const B: usize = 8;
const F32_TOL: f64 = 1e-5;

/// The tiny agent's master map (seeded) and its f32 network.
fn agent() -> (VarMap, AgentNet) {
    let vm = VarMap::new();
    let net = AgentNet::new(
        &AgentConfig::tiny(),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    init_seeded(&vm, 3).unwrap();
    (vm, net)
}

fn cfg(
    ckpt: Option<usize>,
    precision: Precision,
    micro: Option<usize>,
    dropout: bool,
) -> StepConfig {
    StepConfig {
        checkpoint: ckpt.map(|segments| CheckpointConfig {
            segments,
            ..CheckpointConfig::default()
        }),
        precision,
        micro_batch: micro,
        dropout,
        ..StepConfig::default()
    }
}

/// (cosine, relative L2 error) of `a` against `b` over all variables.
fn global_cmp(a: &Grads, b: &Grads) -> (f64, f64) {
    let (mut ab, mut aa, mut bb, mut dd) = (0f64, 0f64, 0f64, 0f64);
    for ((name, _, x), (_, _, y)) in a.iter().zip(b.iter()) {
        match (x, y) {
            (None, None) => {}
            (Some(x), Some(y)) => {
                for (p, q) in flat(x).iter().zip(&flat(y)) {
                    ab += p * q;
                    aa += p * p;
                    bb += q * q;
                    dd += (p - q) * (p - q);
                }
            }
            _ => panic!("{name}: a gradient in one run only"),
        }
    }
    (ab / (aa.sqrt() * bb.sqrt()), (dd / bb).sqrt())
}

/// Unscaled gradients of one step.
fn grads(
    step: &TrainStep,
    net: &AgentNet,
    vm: &VarMap,
    d: &Data,
    seed: u64,
) -> gm_train::StepGrads {
    let mut g = step.grads(net, vm, &d.batch(), seed).unwrap();
    if g.loss_scale != 1.0 {
        g.grads.scale(1.0 / g.loss_scale).unwrap();
    }
    g
}

#[test]
fn the_plain_step_differentiates_the_weighted_huber_loss() {
    let (vm, net) = agent();
    let d = Data::new(1, B);
    let step = TrainStep::new(cfg(None, Precision::F32, None, false), AgentConfig::tiny()).unwrap();
    let ours = grads(&step, &net, &vm, &d, 0);
    // The same loss as a tensor expression, differentiated by candle.
    let idx = Tensor::from_slice(&d.actions, (B, 1), &Device::Cpu).unwrap();
    let y = Tensor::from_slice(&d.targets, B, &Device::Cpu).unwrap();
    let w = Tensor::from_slice(&d.weights, B, &Device::Cpu).unwrap();
    let huber = |q: &Tensor| -> gm_train::Result<Tensor> {
        let delta = q.gather(&idx, 1)?.squeeze(1)?.sub(&y)?;
        let a = delta.abs()?;
        let quad = delta.sqr()?.affine(0.5, 0.0)?;
        let lin = a.affine(1.0, -0.5)?;
        let h = a.le(1.0)?.where_cond(&quad, &lin)?;
        Ok(h.mul(&w)?.mean_all()?)
    };
    let (loss, reference) =
        agent_plain_grads(&net, &vm, &d.obs, huber, SegmentDropout::Off).unwrap();
    let err = rel_err(&ours.grads, &reference);
    println!(
        "TrainStep vs candle's Huber backward: rel err {err:.2e}, loss {} vs {loss}",
        ours.loss
    );
    assert!(err <= F32_TOL, "{err}");
    assert!((ours.loss - f64::from(loss)).abs() <= 1e-6 * f64::from(loss).abs().max(1.0));
    let with_grad = reference.iter().filter(|(_, _, g)| g.is_some()).count();
    assert!(
        with_grad > reference.len() / 2,
        "{with_grad} of {}",
        reference.len()
    );

    // |δ| and the mean Q(s, a) agree with an eval-mode forward.
    let q = net
        .q_values(&d.obs, &mut gm_models::ForwardCtx::eval())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut q_mean = 0f64;
    for i in 0..B {
        let qa = q[i][d.actions[i] as usize];
        q_mean += f64::from(qa) / B as f64;
        assert!((ours.td_abs[i] - (qa - d.targets[i]).abs()).abs() < 1e-5);
    }
    assert!((ours.q_mean - q_mean).abs() < 1e-6);
    assert!(d.targets.iter().zip(&ours.td_abs).any(|(_, t)| *t > 1.0));
    assert!(
        ours.td_abs.iter().any(|t| *t < 1.0),
        "both Huber branches used"
    );
}

#[test]
fn every_f32_combination_gives_the_plain_steps_gradients() {
    let (vm, net) = agent();
    let d = Data::new(2, B);
    let tiny = AgentConfig::tiny;
    for dropout in [false, true] {
        for micro in [None, Some(3), Some(4)] {
            // With dropout the masks follow the micro-batches, so the
            // reference is the plain step with the same split (without
            // dropout: the plain step of the whole batch).
            let ref_micro = if dropout { micro } else { None };
            let reference =
                TrainStep::new(cfg(None, Precision::F32, ref_micro, dropout), tiny()).unwrap();
            let want = grads(&reference, &net, &vm, &d, 11);
            for ckpt in [None, Some(1), Some(2), Some(4)] {
                let step =
                    TrainStep::new(cfg(ckpt, Precision::F32, micro, dropout), tiny()).unwrap();
                let got = grads(&step, &net, &vm, &d, 11);
                let err = rel_err(&got.grads, &want.grads);
                println!("f32 dropout {dropout} micro {micro:?} ckpt {ckpt:?}: rel err {err:.2e}");
                assert!(
                    err <= F32_TOL,
                    "dropout {dropout} micro {micro:?} ckpt {ckpt:?}: {err}"
                );
                assert!((got.loss - want.loss).abs() <= 1e-6 * want.loss.max(1.0));
                assert!((got.q_mean - want.q_mean).abs() <= 1e-6);
                for (a, b) in got.td_abs.iter().zip(&want.td_abs) {
                    assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
                }
                let parts = micro.map_or(1, |m| B.div_ceil(m));
                assert_eq!(got.micro_batches, parts);
            }
        }
    }
    // Dropout really is on: another seed gives other gradients.
    let step = TrainStep::new(cfg(None, Precision::F32, None, true), tiny()).unwrap();
    let a = grads(&step, &net, &vm, &d, 1);
    let b = grads(&step, &net, &vm, &d, 2);
    assert!(rel_err(&a.grads, &b.grads) > 1e-3);
}

/// Low precision vs f32 (dropout off). Tolerance: cosine ≥ 0.999 and
/// relative L2 error ≤ 0.03 against the f32 plain step, for every
/// combination. Measured on this agent and batch (`cargo test --test step
/// -- --nocapture`): bf16 cosine 0.99997, rel L2 8.1e-3 (5.4e-3 with
/// accumulation); f16 (loss scale 2^16) cosine 1.00000, rel L2 8.4e-4 —
/// the same for every checkpointing setting. bf16's 8-bit mantissa sets
/// its floor; the bound leaves about 4× margin.
#[test]
fn bf16_and_f16_combinations_match_f32_within_tolerance() {
    let (vm, net) = agent();
    let d = Data::new(3, B);
    let tiny = AgentConfig::tiny;
    let reference = TrainStep::new(cfg(None, Precision::F32, None, false), tiny()).unwrap();
    let want = grads(&reference, &net, &vm, &d, 0);
    for p in [Precision::Bf16, Precision::F16] {
        for micro in [None, Some(3)] {
            for ckpt in [None, Some(2), Some(4)] {
                let step = TrainStep::new(cfg(ckpt, p, micro, false), tiny()).unwrap();
                assert_eq!(step.precision.scaler.is_some(), p == Precision::F16);
                let got = grads(&step, &net, &vm, &d, 0);
                for (_, _, g) in got.grads.iter() {
                    assert!(
                        g.is_none_or(|g| g.dtype() == DType::F32),
                        "f32 master gradients"
                    );
                }
                let (cos, rel) = global_cmp(&got.grads, &want.grads);
                println!("{p:?} micro {micro:?} ckpt {ckpt:?}: cosine {cos:.5}, rel L2 {rel:.2e}, loss {:.5} vs {:.5}", got.loss, want.loss);
                assert!(
                    cos >= 0.999 && rel <= 0.03,
                    "{p:?} micro {micro:?} ckpt {ckpt:?}: {cos} {rel}"
                );
                assert!((got.loss - want.loss).abs() <= 0.02 * want.loss.max(0.1));
            }
        }
    }
}

fn weights_of(vm: &VarMap) -> Vec<(String, Vec<f64>)> {
    let data = vm.data().lock().unwrap();
    let mut v: Vec<_> = data
        .iter()
        .map(|(n, var)| (n.clone(), flat(var.as_tensor())))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn the_update_is_adamw_on_the_clipped_gradients_whatever_the_techniques() {
    let d = Data::new(4, B);
    let opt_cfg = AdamWConfig {
        lr: 1e-3,
        ..AdamWConfig::default()
    };
    // Clip low enough to bind, so clipping is exercised.
    let run = |c: StepConfig| {
        let (vm, net) = agent();
        let before = weights_of(&vm);
        let mut opt = AdamW::new(opt_cfg, Grads::empty(&vm).unwrap().len()).unwrap();
        let mut step = TrainStep::new(c, AgentConfig::tiny()).unwrap();
        let g = step.grads(&net, &vm, &d.batch(), 5).unwrap();
        let norm = g.grads.global_norm().unwrap();
        let out = step.apply(g, &mut opt).unwrap();
        assert!(out.stepped);
        assert_eq!(opt.step, 1);
        assert!((out.grad_norm - norm).abs() <= 1e-9 * norm);
        (before, weights_of(&vm), out)
    };
    let clip = StepConfig {
        max_grad_norm: Some(1e-3),
        ..cfg(None, Precision::F32, None, false)
    };
    let (before, plain, out) = run(clip);
    assert!(out.grad_norm > 1e-3, "the clip binds: {}", out.grad_norm);
    let moved = before
        .iter()
        .zip(&plain)
        .any(|(a, b)| a.1.iter().zip(&b.1).any(|(x, y)| x != y));
    assert!(moved, "the update changed the weights");
    let all = StepConfig {
        checkpoint: Some(CheckpointConfig::default()),
        micro_batch: Some(3),
        ..clip
    };
    let (_, combined, out2) = run(all);
    assert!((out2.grad_norm - out.grad_norm).abs() <= 1e-5 * out.grad_norm);
    let mut worst = 0f64;
    for (a, b) in plain.iter().zip(&combined) {
        for (x, y) in a.1.iter().zip(&b.1) {
            worst = worst.max((x - y).abs());
        }
    }
    println!("weights after one update, plain vs ckpt + accumulation: max |diff| {worst:.2e}");
    // AdamW's first step moves each weight by about lr · sign(g): equal
    // gradients (to 1e-5 relative) give equal weights to well below lr.
    assert!(worst <= 1e-5, "{worst}");
}

#[test]
fn an_f16_overflow_skips_the_update_and_backs_off() {
    let (vm, net) = agent();
    let d = Data::new(5, B);
    let before = weights_of(&vm);
    let mut opt = AdamW::new(AdamWConfig::default(), Grads::empty(&vm).unwrap().len()).unwrap();
    let mut step = TrainStep::new(
        cfg(Some(2), Precision::F16, Some(4), false),
        AgentConfig::tiny(),
    )
    .unwrap();
    step.precision.scaler = Some(
        LossScaler::new(LossScalerConfig {
            init_scale: 1e30,
            ..LossScalerConfig::default()
        })
        .unwrap(),
    );
    let out = step.step(&net, &vm, &mut opt, &d.batch(), 0).unwrap();
    assert!(!out.stepped);
    assert!(!out.grad_norm.is_finite());
    assert_eq!(opt.step, 0);
    let s = step.precision.scaler.as_ref().unwrap();
    assert_eq!((s.scale, s.skipped_steps), (5e29, 1));
    assert_eq!(weights_of(&vm), before, "no update");
    // At the default scale the same step goes through.
    step.precision.scaler = Some(LossScaler::default());
    let out = step.step(&net, &vm, &mut opt, &d.batch(), 0).unwrap();
    assert!(out.stepped && out.grad_norm.is_finite());
    assert_eq!((opt.step, out.loss_scale), (1, 65536.0));
}

#[test]
fn bad_batches_and_configs_are_errors() {
    let (vm, net) = agent();
    let d = Data::new(6, B);
    let step = TrainStep::new(StepConfig::default(), AgentConfig::tiny()).unwrap();
    let short = &d.targets[..B - 1];
    let bad_action: Vec<u32> = (0..B as u32).map(|i| i % 4).collect();
    let nan: Vec<f32> = (0..B)
        .map(|i| if i == 2 { f32::NAN } else { 0.0 })
        .collect();
    let cases = [
        (
            "targets",
            TdBatch {
                targets: short,
                ..d.batch()
            },
        ),
        (
            "actions",
            TdBatch {
                actions: &bad_action,
                ..d.batch()
            },
        ),
        (
            "targets",
            TdBatch {
                targets: &nan,
                ..d.batch()
            },
        ),
        (
            "weights",
            TdBatch {
                weights: Some(short),
                ..d.batch()
            },
        ),
    ];
    for (key, b) in cases {
        let err = step.grads(&net, &vm, &b, 0).unwrap_err();
        assert!(
            matches!(err, gm_train::Error::Config { key: k, .. } if k == key),
            "{err}"
        );
    }
    assert!(TrainStep::new(
        StepConfig {
            micro_batch: Some(0),
            ..StepConfig::default()
        },
        AgentConfig::tiny()
    )
    .is_err());
}

/// The CPU twin of a GPU out-of-memory: micro-batches above 3 rows "do not
/// fit". The step halves its micro-batch (8 → 4 → 2), reruns the same
/// batch, and makes the update the plain step makes, keeping the smaller
/// micro-batch; one row that does not fit is a typed error.
#[test]
fn an_out_of_memory_step_halves_the_micro_batch_and_retries_the_same_batch() {
    let d = Data::new(6, B);
    let opt_cfg = AdamWConfig::default();
    let plain = cfg(None, Precision::F32, None, false);
    let run = |inject: Option<usize>| {
        let (vm, net) = agent();
        let mut opt = AdamW::new(opt_cfg, Grads::empty(&vm).unwrap().len()).unwrap();
        let mut step = TrainStep::new(plain, AgentConfig::tiny()).unwrap();
        step.inject_oom_above_rows(inject);
        let out = step.step(&net, &vm, &mut opt, &d.batch(), 9).unwrap();
        (weights_of(&vm), out, step)
    };
    let (reference, ref_out, _) = run(None);
    let (retried, out, step) = run(Some(3));
    assert_eq!(step.oom_retries, 2, "8 rows -> 4 -> 2");
    assert_eq!(
        step.cfg.micro_batch,
        Some(2),
        "the smaller micro-batch is kept"
    );
    assert_eq!(out.micro_batches, 4);
    assert!(out.stepped);
    assert_eq!(out.td_abs.len(), B, "every row of the batch was used");
    assert!((out.loss - ref_out.loss).abs() <= 1e-6 * ref_out.loss.abs().max(1e-12));
    let mut worst = 0f64;
    for (a, b) in reference.iter().zip(&retried) {
        for (x, y) in a.1.iter().zip(&b.1) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(
        worst <= 1e-5,
        "retried update differs from the plain one by {worst}"
    );

    // Nothing fits: the typed error comes back and the weights are untouched.
    let (vm, net) = agent();
    let before = weights_of(&vm);
    let mut opt = AdamW::new(opt_cfg, Grads::empty(&vm).unwrap().len()).unwrap();
    let mut step = TrainStep::new(plain, AgentConfig::tiny()).unwrap();
    step.inject_oom_above_rows(Some(0));
    let err = step.step(&net, &vm, &mut opt, &d.batch(), 9).unwrap_err();
    assert!(err.is_out_of_memory(), "{err}");
    assert!(
        matches!(err, gm_train::Error::OutOfMemory { rows: 1, .. }),
        "{err}"
    );
    assert_eq!(opt.step, 0);
    assert_eq!(weights_of(&vm), before);
}
