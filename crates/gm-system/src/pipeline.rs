//! `optimize_training_pipeline`: choose the batch, accumulation steps,
//! checkpoint segments and precision of the agent's training step from
//! measured peaks (gm-train's `BatchSizer`, checkpointing and precision
//! modules; peaks from gm-leak's counting allocator).
//!
//! # What is measured
//! One training step is a forward pass of the agent on a batch, a
//! squared-TD-style loss on one action's Q-value per row and the backward
//! pass to the f32 master weights. Its peak is the allocator peak of the
//! calling thread above its level at the step's start
//! (`gm_leak::measure_thread`): the batch itself, activations, the autograd
//! graph and the gradients. Per thread, so the system's own background
//! threads (sampler, leak watch, reclaimer) cannot disturb the figure.
//!
//! - **before**: plain backprop in f32 at the target effective batch (what
//!   a run without the techniques would do);
//! - **after**: the configured techniques (checkpointing with `segments`,
//!   a bf16 working copy) at the chosen micro-batch, with `accumulation`
//!   micro-steps per update making up the effective batch.
//!
//! The memory a step may use is the limit minus the process's resident
//! memory when the plan is made, times `batch_memory_threshold` (the
//! `BatchSizer`'s threshold).

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gm_core::ByteSize;
use gm_train::{
    accumulation_steps, agent_checkpointed_grads, agent_plain_grads, AgentConfig, AgentNet,
    BatchSizeConfig, BatchSizer, CheckpointConfig, ObsBatch, Precision, SegmentDropout,
};
use serde::Serialize;

use crate::config::TrainingMemoryConfig;
use crate::error::{Error, Result};
use crate::proc::ProcMemory;

/// The model a plan is made for: the agent's architecture and its f32
/// master variables.
#[derive(Clone, Copy)]
pub struct AgentModel<'a> {
    /// The architecture.
    pub config: &'a AgentConfig,
    /// The master variables (built once with this architecture).
    pub varmap: &'a VarMap,
}

/// One measured step.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepPeak {
    /// Batch.
    pub batch: usize,
    /// Checkpoint segments (1 = plain backprop).
    pub segments: usize,
    /// `f32` or `bf16`.
    pub precision: &'static str,
    /// Peak bytes above the level at the step's start (this thread's).
    pub peak_bytes: u64,
    /// Wall time, milliseconds.
    pub millis: f64,
}

/// The plan and the measurements behind it.
#[derive(Debug, Clone, Serialize)]
pub struct PipelinePlan {
    /// Items per micro-batch.
    pub micro_batch: usize,
    /// Micro-batches per optimizer update.
    pub accumulation_steps: usize,
    /// `micro_batch × accumulation_steps`.
    pub effective_batch: usize,
    /// Checkpoint segments per embedder (1 = off).
    pub checkpoint_segments: usize,
    /// `f32` or `bf16`.
    pub precision: &'static str,
    /// Bytes a step may use (the limit minus resident memory at planning).
    pub step_budget_bytes: u64,
    /// The `BatchSizer`'s usable part of it.
    pub usable_bytes: u64,
    /// Peak of plain f32 backprop at the target effective batch.
    pub peak_before_bytes: u64,
    /// Peak of the planned step (micro-batch, techniques on).
    pub peak_after_bytes: u64,
    /// The largest batch (≤ the target) whose plain f32 step fits the
    /// usable budget: what a learner without these techniques can use.
    pub plain_batch: usize,
    /// Every measurement made, in order.
    pub measurements: Vec<StepPeak>,
    /// Why a technique was not used, when one was configured but failed.
    pub notes: Vec<String>,
}

impl PipelinePlan {
    /// The planned precision as gm-train's [`Precision`].
    pub fn working_precision(&self) -> Precision {
        match self.precision {
            "bf16" => Precision::Bf16,
            "f16" => Precision::F16,
            _ => Precision::F32,
        }
    }
}

impl std::fmt::Debug for AgentModel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentModel")
            .field("config", self.config)
            .finish_non_exhaustive()
    }
}

struct Stepper<'a> {
    model: AgentModel<'a>,
    sample: &'a ObsBatch,
    measurements: Vec<StepPeak>,
    /// Peaks already measured, by (batch, segments, precision): a setting
    /// is measured once.
    seen: Vec<((usize, usize, &'static str), u64)>,
}

/// Rows `0..batch` of `x`, cycling through its rows.
fn tile(x: &Tensor, batch: usize) -> Result<Tensor> {
    let n = x.dim(0)?;
    let idx: Vec<u32> = (0..batch).map(|i| (i % n) as u32).collect();
    let idx = Tensor::from_vec(idx, batch, x.device())?;
    Ok(x.index_select(&idx, 0)?)
}

impl Stepper<'_> {
    fn step(&mut self, batch: usize, segments: usize, precision: Precision) -> Result<u64> {
        let key = (batch, segments, precision_name(precision));
        if let Some((_, p)) = self.seen.iter().find(|(k, _)| *k == key) {
            return Ok(*p);
        }
        let dtype = precision.dtype();
        let device = Device::Cpu;
        let run = || -> Result<()> {
            let obs = ObsBatch {
                structure: tile(&self.sample.structure, batch)?.to_dtype(dtype)?,
                tactical: tile(&self.sample.tactical, batch)?.to_dtype(dtype)?,
                regime: tile(&self.sample.regime, batch)?.to_dtype(dtype)?,
                lvn: tile(&self.sample.lvn, batch)?.to_dtype(dtype)?,
            };
            let vb = match precision {
                Precision::F32 => VarBuilder::from_varmap(self.model.varmap, DType::F32, &device),
                p => p.working_builder(self.model.varmap, &device)?,
            };
            let net = AgentNet::new(self.model.config, vb)?;
            let onehot: Vec<f32> = (0..batch)
                .flat_map(|i| (0..3).map(move |a| f32::from(u8::from(i % 3 == a))))
                .collect();
            let onehot = Tensor::from_vec(onehot, (batch, 3), &device)?.to_dtype(dtype)?;
            let target = Tensor::zeros(batch, dtype, &device)?;
            let loss = |q: &Tensor| -> gm_train::Result<Tensor> {
                Ok(q.mul(&onehot)?
                    .sum(1)?
                    .sub(&target)?
                    .sqr()?
                    .mean_all()?
                    .to_dtype(DType::F32)?)
            };
            if segments > 1 {
                let cfg = CheckpointConfig {
                    segments,
                    dropout: SegmentDropout::Off,
                };
                agent_checkpointed_grads(&net, self.model.varmap, &obs, loss, &cfg)?;
            } else {
                agent_plain_grads(&net, self.model.varmap, &obs, loss, SegmentDropout::Off)?;
            }
            Ok(())
        };
        let (r, m) = gm_leak::measure_thread(run);
        r?;
        self.measurements.push(StepPeak {
            batch,
            segments,
            precision: precision_name(precision),
            peak_bytes: m.peak_net_bytes,
            millis: m.duration.as_secs_f64() * 1e3,
        });
        self.seen.push((key, m.peak_net_bytes));
        Ok(m.peak_net_bytes)
    }
}

fn precision_name(p: Precision) -> &'static str {
    match p {
        Precision::F32 => "f32",
        Precision::Bf16 => "bf16",
        Precision::F16 => "f16",
    }
}

fn sizer(
    t: &TrainingMemoryConfig,
    budget: u64,
    max: usize,
    mut f: impl FnMut(usize) -> Result<u64>,
) -> Result<BatchSizer> {
    let mut cfg = BatchSizeConfig::new(budget);
    cfg.threshold = t.batch_memory_threshold;
    cfg.min_batch = t.min_batch;
    cfg.max_batch = max;
    cfg.probe_batches = vec![t.min_batch, 2 * t.min_batch, 4 * t.min_batch];
    if cfg.max_batch < 2 * t.min_batch {
        // A range of one batch: probing needs two; measure it and stop.
        cfg.max_batch = 2 * t.min_batch;
    }
    let mut err = None;
    let r = BatchSizer::calibrate(cfg, |b| match f(b) {
        Ok(p) => Ok(p),
        Err(e) => {
            let msg = e.to_string();
            err = Some(e);
            Err(gm_train::Error::Stopped(msg))
        }
    });
    match (r, err) {
        (Ok(s), _) => Ok(s),
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(e.into()),
    }
}

/// See the module docs. `limit_bytes` is the process's memory limit.
pub fn optimize(
    limit_bytes: u64,
    t: &TrainingMemoryConfig,
    model: AgentModel<'_>,
    sample_input: &ObsBatch,
) -> Result<PipelinePlan> {
    if !gm_leak::is_active() {
        return Err(Error::NoAllocator);
    }
    if sample_input.is_empty() {
        return Err(Error::Config {
            key: "sample_input".into(),
            value: "0 rows".into(),
            origin: "optimize_training_pipeline".into(),
            allowed: "at least one observation".into(),
        });
    }
    let rss = ProcMemory::read().rss_bytes.unwrap_or(0);
    let step_budget = limit_bytes.saturating_sub(rss);
    if step_budget == 0 {
        return Err(Error::MemoryTooSmall {
            limit: ByteSize(limit_bytes).to_string(),
            reason: format!(
                "the process already holds {} before training starts",
                ByteSize(rss)
            ),
        });
    }
    let usable = (t.batch_memory_threshold * step_budget as f64).floor() as u64;
    let mut st = Stepper {
        model,
        sample: sample_input,
        measurements: Vec::new(),
        seen: Vec::new(),
    };
    let mut notes = Vec::new();
    let target = t.target_effective_batch;
    let top = (target.clamp(t.min_batch, t.max_batch) / 8 * 8).max(t.min_batch);
    // Warm-up (thread pool, allocator arenas): not a measurement.
    st.step(t.min_batch, 1, Precision::F32)?;
    st.measurements.clear();
    st.seen.clear();
    let before = st.step(target, 1, Precision::F32)?;

    // The techniques, each checked once on the smallest batch.
    let mut segments = if t.gradient_checkpointing {
        t.checkpoint_segments.max(1)
    } else {
        1
    };
    let mut precision = if t.mixed_precision {
        Precision::Bf16
    } else {
        Precision::F32
    };
    if segments > 1 || precision != Precision::F32 {
        if let Err(e) = st.step(t.min_batch, segments, precision) {
            // Which technique failed: try each alone.
            if precision != Precision::F32 && st.step(t.min_batch, segments, Precision::F32).is_ok()
            {
                notes.push(format!(
                    "bf16 working copy not used: a step failed with: {e}"
                ));
                precision = Precision::F32;
            } else if segments > 1 && st.step(t.min_batch, 1, precision).is_ok() {
                notes.push(format!(
                    "gradient checkpointing not used: a step failed with: {e}"
                ));
                segments = 1;
            } else {
                notes.push(format!(
                    "neither checkpointing nor bf16 used: a step failed with: {e}"
                ));
                precision = Precision::F32;
                segments = 1;
            }
        }
    }
    let micro = if t.batch_auto_scale {
        sizer(t, step_budget, top, |b| st.step(b, segments, precision))?.batch()
    } else {
        top
    };
    let after = st.step(micro, segments, precision)?;
    let plain_batch = if before <= usable {
        target
    } else if t.batch_auto_scale {
        sizer(t, step_budget, top, |b| st.step(b, 1, Precision::F32))?.batch()
    } else {
        top
    };
    let steps = accumulation_steps(target, micro, 32);
    Ok(PipelinePlan {
        micro_batch: micro,
        accumulation_steps: steps,
        effective_batch: micro * steps,
        checkpoint_segments: segments,
        precision: precision_name(precision),
        step_budget_bytes: step_budget,
        usable_bytes: usable,
        peak_before_bytes: before,
        peak_after_bytes: after,
        plain_batch,
        measurements: st.measurements,
        notes,
    })
}
