//! The learner's update goes through gm-train's [`TrainStep`]
//! ([`LearnerConfig::step`]): a short synchronous run with checkpointing
//! and micro-batches ends with the plain run's weights (within float
//! summation-order tolerance); a bf16 run trains; an f16 run's loss scaler
//! is checkpointed so its resume is bit-exact; [`Learner::set_batch_size`]
//! changes the sampled batch from the next update on, is checkpointed (the
//! resumed run is bit-identical to an uninterrupted one) and rejects an
//! invalid size; a checkpoint written with other techniques is refused.
//!
//! Same small run as `tests/resume.rs`: tiny agent without dropout, 2
//! environments, 24-bar episodes, batch 8, updates from step 8 on.

mod common;
use common::{config as base_config, data, tensor_values, var_bits, var_values};

use candle_core::Tensor;
use gm_train::{
    CheckpointConfig, Error, Learner, LearnerConfig, Precision, StepConfig, StepReport,
};

fn config(step: StepConfig) -> LearnerConfig {
    let mut c = base_config();
    c.step = step;
    c
}

fn moments(m: &[Option<Tensor>]) -> Vec<Option<Vec<u32>>> {
    m.iter()
        .map(|t| {
            t.as_ref()
                .map(|t| tensor_values(t).into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

/// What a synchronous run's future depends on (as in `tests/resume.rs`).
#[derive(Debug, PartialEq)]
struct State {
    counters: gm_train::LearnerCounters,
    batch_size: usize,
    online: Vec<(String, Vec<u32>)>,
    target: Vec<(String, Vec<u32>)>,
    m: Vec<Option<Vec<u32>>>,
    v: Vec<Option<Vec<u32>>>,
    priorities: Vec<u64>,
    scaler: Option<gm_train::LossScaler>,
}

fn state(l: &Learner) -> State {
    let replay = l.replay().read();
    State {
        counters: l.counters(),
        batch_size: l.batch_size(),
        online: var_bits(l.online_varmap()),
        target: var_bits(l.target_varmap()),
        m: moments(&l.optimizer().m),
        v: moments(&l.optimizer().v),
        priorities: (0..l.config().replay.capacity)
            .map(|i| replay.priority(i).to_bits())
            .collect(),
        scaler: l.train_step().precision.scaler.clone(),
    }
}

/// Largest `|a − b|` over every variable, relative to the variable's
/// largest entry.
fn max_rel_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((na, x), (nb, y))| {
            assert_eq!(na, nb);
            let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
            x.iter()
                .zip(y)
                .fold(0f64, |m, (p, q)| m.max(f64::from((p - q).abs() / scale)))
        })
        .fold(0.0, f64::max)
}

fn run(cfg: LearnerConfig, steps: u64) -> anyhow::Result<(Learner, Vec<StepReport>)> {
    let mut l = Learner::new(cfg, data())?;
    let reports = (0..steps)
        .map(|_| l.step())
        .collect::<Result<Vec<_>, _>>()?;
    Ok((l, reports))
}

#[test]
fn checkpointing_with_micro_batches_trains_like_the_plain_update() -> anyhow::Result<()> {
    const STEPS: u64 = 30;
    let (plain, plain_reports) = run(config(StepConfig::default()), STEPS)?;
    let init = var_values(Learner::new(config(StepConfig::default()), data())?.online_varmap());
    let fancy_step = StepConfig {
        checkpoint: Some(CheckpointConfig {
            segments: 2,
            ..CheckpointConfig::default()
        }),
        micro_batch: Some(3),
        ..StepConfig::default()
    };
    let (fancy, fancy_reports) = run(config(fancy_step), STEPS)?;

    let updates: Vec<_> = fancy_reports.iter().filter_map(|r| r.update).collect();
    assert_eq!(updates.len() as u64, fancy.counters().updates);
    assert!(updates.len() >= 20, "{} updates", updates.len());
    for u in &updates {
        // Batch 8 in micro-batches of 3: 3 + 3 + 2.
        assert_eq!((u.batch, u.micro_batches), (8, 3));
        assert!(u.stepped && u.loss.is_finite());
    }
    let plain_updates: Vec<_> = plain_reports.iter().filter_map(|r| r.update).collect();
    assert!(plain_updates.iter().all(|u| u.micro_batches == 1));

    let (p, f) = (
        var_values(plain.online_varmap()),
        var_values(fancy.online_varmap()),
    );
    let moved = max_rel_diff(&p, &init);
    let diff = max_rel_diff(&p, &f);
    assert!(moved > 1e-3, "the plain run moved the weights: {moved}");
    assert!(
        diff < 1e-4,
        "checkpointing + micro-batches vs plain after {} updates: {diff} (moved {moved})",
        updates.len()
    );
    for (a, b) in plain_updates.iter().zip(&updates) {
        assert!((a.loss - b.loss).abs() <= 1e-4 * a.loss.abs().max(1e-3));
    }
    Ok(())
}

#[test]
fn a_bf16_run_trains() -> anyhow::Result<()> {
    let step = StepConfig {
        precision: Precision::Bf16,
        ..StepConfig::default()
    };
    let init = var_values(Learner::new(config(step), data())?.online_varmap());
    let (l, reports) = run(config(step), 24)?;
    let updates: Vec<_> = reports.iter().filter_map(|r| r.update).collect();
    assert!(updates.len() >= 10, "{} updates", updates.len());
    for u in &updates {
        assert!(u.stepped, "bf16 needs no loss scaler and never skips");
        assert!(u.loss.is_finite() && u.grad_norm.is_finite(), "{u:?}");
        assert_eq!(u.loss_scale, 1.0);
    }
    assert!(l.train_step().precision.scaler.is_none());
    let moved = max_rel_diff(&var_values(l.online_varmap()), &init);
    assert!(moved > 1e-3, "bf16 updates moved the weights: {moved}");
    Ok(())
}

#[test]
fn an_f16_run_checkpoints_its_loss_scaler_and_resumes_bit_exactly() -> anyhow::Result<()> {
    let step = StepConfig {
        precision: Precision::F16,
        ..StepConfig::default()
    };
    let tmp = tempfile::tempdir()?;
    let mut straight = Learner::new(config(step), data())?;
    straight.train(30)?;

    let mut first = Learner::new(config(step), data())?;
    first.train(20)?;
    let saved = state(&first);
    let scaler = saved.scaler.clone().expect("f16 has a loss scaler");
    assert!(
        scaler.growth_tracker > 0 || scaler.skipped_steps > 0,
        "the scaler saw updates: {scaler:?}"
    );
    first.save_checkpoint(tmp.path().join("ck"))?;
    drop(first);
    let mut resumed = Learner::resume(config(step), data(), tmp.path().join("ck"))?;
    assert_eq!(state(&resumed), saved, "resume restores the scaler too");
    resumed.train(10)?;
    assert_eq!(state(&resumed), state(&straight));

    // Another precision cannot resume this checkpoint.
    let other = StepConfig {
        precision: Precision::Bf16,
        ..StepConfig::default()
    };
    let err = Learner::resume(config(other), data(), tmp.path().join("ck")).unwrap_err();
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
    Ok(())
}

#[test]
fn set_batch_size_changes_the_sampled_batch_and_resumes_bit_exactly() -> anyhow::Result<()> {
    const SHRINK_AT: u64 = 14;
    const SAVE_AT: u64 = 24;
    const END: u64 = 36;
    let cfg = || config(StepConfig::default());
    let tmp = tempfile::tempdir()?;

    let mut straight = Learner::new(cfg(), data())?;
    let before = straight.train(SHRINK_AT)?.and_then(|r| r.update);
    assert_eq!(before.map(|u| u.batch), Some(8), "an update at batch 8");
    straight.set_batch_size(4)?;
    assert_eq!(straight.batch_size(), 4);
    let after = straight.step()?.update.expect("an update");
    assert_eq!(after.batch, 4, "the next update samples the new batch");
    straight.train(END - SHRINK_AT - 1)?;

    let mut first = Learner::new(cfg(), data())?;
    first.train(SHRINK_AT)?;
    first.set_batch_size(4)?;
    first.train(SAVE_AT - SHRINK_AT)?;
    let saved = state(&first);
    first.save_checkpoint(tmp.path().join("ck"))?;
    drop(first);
    // The config still says 8: the checkpoint's live batch wins.
    let mut resumed = Learner::resume(cfg(), data(), tmp.path().join("ck"))?;
    assert_eq!(resumed.batch_size(), 4);
    assert_eq!(state(&resumed), saved);
    let u = resumed.step()?.update.expect("an update");
    assert_eq!(u.batch, 4);
    resumed.train(END - SAVE_AT - 1)?;
    assert_eq!(state(&resumed), state(&straight));
    Ok(())
}

#[test]
fn an_invalid_batch_size_is_a_config_error_and_changes_nothing() -> anyhow::Result<()> {
    let mut l = Learner::new(config(StepConfig::default()), data())?;
    for bad in [0, 17] {
        let err = l.set_batch_size(bad).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Config {
                    key: "batch_size",
                    ..
                }
            ),
            "{bad}: {err}"
        );
        assert_eq!(l.batch_size(), 8);
    }
    l.set_batch_size(16)?;
    assert_eq!(l.batch_size(), 16);
    let bad_step = StepConfig {
        micro_batch: Some(0),
        ..StepConfig::default()
    };
    let err = Learner::new(config(bad_step), data()).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Config {
                key: "step.micro_batch",
                ..
            }
        ),
        "{err}"
    );
    Ok(())
}

#[test]
fn threaded_mode_applies_a_new_batch_size_from_the_next_update() -> anyhow::Result<()> {
    let mut cfg = config(StepConfig::default());
    cfg.actors = gm_train::ActorMode::Threaded { threads: 1 };
    let mut l = Learner::new(cfg, data())?;
    let u = l.step()?.update.expect("every threaded step updates");
    assert_eq!(u.batch, 8);
    l.set_batch_size(5)?;
    for _ in 0..3 {
        let u = l.step()?.update.expect("an update");
        assert_eq!(u.batch, 5, "the restarted prefetcher samples the new size");
    }
    Ok(())
}

/// `LearnerConfig::device` reaches the networks: without candle's CUDA
/// backend (or without a device) a CUDA learner is the model crate's typed
/// `NoCuda` error, never a panic, for a new and for a resumed run.
#[test]
fn a_cuda_learner_without_a_cuda_backend_is_a_typed_error() -> anyhow::Result<()> {
    if gm_models::device::CANDLE_CUDA {
        return Ok(()); // the GPU check (examples/gpu_check.rs) covers that build
    }
    let cuda = gm_core::Device::Cuda { ordinal: 0 };
    let mut cfg = base_config();
    cfg.device = cuda;
    let no_cuda = |e: Error| matches!(e, Error::Model(gm_models::Error::NoCuda(_)));
    let err = Learner::new(cfg.clone(), data()).unwrap_err();
    assert!(err.to_string().contains("candle-cuda"), "{err}");
    assert!(no_cuda(err));
    // A CPU checkpoint asked to resume on CUDA: the same error.
    let (l, _) = run(base_config(), 10)?;
    let dir = tempfile::tempdir()?;
    l.save_checkpoint(dir.path())?;
    assert!(no_cuda(
        Learner::resume(cfg, data(), dir.path()).unwrap_err()
    ));
    Ok(())
}
