//! One training update of the agent with any combination of the memory
//! techniques — segment gradient checkpointing, mixed precision (with f16
//! loss scaling) and gradient accumulation — on a Double-DQN TD batch:
//! [`TrainStep`], configured by [`StepConfig`]. This is what a trainer (the
//! learner, the `grandmodel` CLI, `examples/train_memory.rs`) calls.
//!
//! # The loss
//!
//! For a batch of `B` rows with actions `a_i`, TD targets `y_i` (computed by
//! the caller, e.g. Double DQN's `R + γ^k · Q⁻(s', argmax_a Q(s', a))`) and
//! importance weights `w_i` (1 when absent):
//!
//! ```text
//! δ_i = Q(s_i, a_i) − y_i          L = (1/B) Σ w_i · huber_κ(δ_i)
//! ```
//!
//! `y` is a constant. The value of `L`, `|δ_i|` (new priorities) and the
//! mean `Q(s, a)` are computed on the host in f64 from `Q(s, a)` in f32;
//! the backward pass is the vector-Jacobian product
//! `Σ_i Q(s_i, a_i) · ∂L/∂Q(s_i, a_i)` with
//! `∂L/∂Q(s_i, a_i) = w_i · clamp(δ_i, −κ, κ) / B` (detached), which has
//! exactly `L`'s gradient — the same formulation as the learner's update.
//!
//! # How the techniques compose
//!
//! | technique | module used | what the step does |
//! |---|---|---|
//! | precision | [`crate::precision`] | f32: the caller's network on the master [`VarMap`]; bf16/f16: a working copy of the agent built from [`working_builder`](crate::working_builder) for this step (its weights are differentiable casts of the f32 masters, so gradients land on the masters in f32). The loss side (`Q(s, a)`, δ, upstream gradient) is always f32. |
//! | f16 loss scaling | [`MixedPrecision`]'s [`LossScaler`](crate::LossScaler) | the upstream gradient is multiplied by the scale `S`; [`TrainStep::apply`] skips the update on inf/NaN and otherwise unscales once, after accumulation |
//! | checkpointing | [`agent_checkpointed_grads`] | each micro-batch's forward/backward runs segment-checkpointed; otherwise [`agent_plain_grads`] |
//! | accumulation | [`GradAccumulator`] | the batch is split into micro-batches of `micro_batch` rows (the last one shorter when it does not divide `B`); each micro-batch's mean loss is back-propagated on its own (only its graph is alive) and weighted by its rows, giving the gradient of the mean over all `B` rows |
//!
//! The gradients are then clipped to `max_grad_norm` and applied by
//! [`AdamW`]. With every technique off this is plain backprop of `L`.
//!
//! # Out of memory
//!
//! When computing the gradients fails because the device ran out of
//! memory ([`Error::is_out_of_memory`]: on a GPU, candle's
//! `CUDA_ERROR_OUT_OF_MEMORY` or cuBLAS's `CUBLAS_STATUS_ALLOC_FAILED`),
//! [`TrainStep::step`] halves the rows per
//! micro-batch and computes the same batch again — nothing has been
//! updated yet, so no data is lost and the update is the one the full
//! batch gives (accumulation is exact; with dropout the masks are a new
//! draw). The smaller micro-batch stays in [`TrainStep::cfg`] for the
//! following steps, and [`TrainStep::oom_retries`] counts the retries; a
//! micro-batch of one row that still does not fit is returned as the
//! error. The CPU has no recoverable out-of-memory (Rust aborts on a
//! failed allocation), so the CPU twin of this path is
//! [`TrainStep::inject_oom_above_rows`]: micro-batches larger than a limit
//! fail with [`Error::OutOfMemory`] as a device without room for them
//! would (`tests/step.rs` checks the retry against the plain step). On a
//! GPU (feature `candle-cuda`, tensors on a CUDA device)
//! `examples/gpu_check.rs` fills the device until a step at 512 rows
//! really fails, and checks that the retried step's gradients equal the
//! unpressured step's; it has not yet run on a GPU (no device was lent to
//! the sessions so far).
//!
//! # Dropout
//!
//! With [`StepConfig::dropout`] on, micro-batch `k` runs with
//! [`SegmentDropout::On`] and the seed `micro_seed(seed, k)` (micro-batch 0:
//! the step's seed itself); the checkpointed and the plain path draw the
//! same masks for the same seed, so they compute the same function. A
//! [`CheckpointConfig`]'s own `dropout` field is replaced by the step's.
//! Masks depend on the micro-batch's shape, so accumulation with dropout on
//! is a different (equally valid) draw than one big batch.
//!
//! # Exactness
//!
//! Checkpointing and accumulation change only the order in which
//! floating-point contributions are summed: in f32 every combination's
//! gradients equal the plain step's within 1e-5 relative to each
//! variable's largest entry (measured on the tiny agent: 0 with
//! checkpointing alone, ≤ 2.3e-6 with accumulation; `tests/step.rs`).
//! bf16/f16 change the forward and backward arithmetic itself; their
//! gradients match f32 to the tolerance `tests/step.rs` states.
//!
//! # Cost
//!
//! Peak memory and step time of every combination on the full agent are
//! measured by `cargo xtask bench train` (`examples/train_memory.rs`,
//! report in `target/bench/train.md`).

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use gm_market::Action;

use crate::accum::GradAccumulator;
use crate::agent::{AgentConfig, AgentNet, ObsBatch};
use crate::checkpoint::{
    agent_checkpointed_grads, agent_plain_grads, CheckpointConfig, SegmentDropout,
};
use crate::grads::Grads;
use crate::optim::AdamW;
use crate::precision::{MixedPrecision, Precision};
use crate::zero::ZeroOptimizer;
use crate::{Error, Result};

/// Which techniques one training step uses, and the loss's constants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepConfig {
    /// Segment gradient checkpointing (`None`: plain backprop). Its
    /// `dropout` field is replaced by the step's (see the module docs).
    pub checkpoint: Option<CheckpointConfig>,
    /// The forward/backward dtype (master weights and optimizer state stay
    /// f32). Default f32.
    pub precision: Precision,
    /// Rows per micro-batch for gradient accumulation (`None`: the whole
    /// batch at once). A value at or above the batch size is one
    /// micro-batch.
    pub micro_batch: Option<usize>,
    /// Dropout on (training mode, default) or off (eval mode).
    pub dropout: bool,
    /// Huber threshold κ (default 1, the learner's default).
    pub huber_delta: f64,
    /// Clip the gradients to this global L2 norm before the update
    /// (default `Some(10.0)`, the learner's default; `None`: no clipping).
    pub max_grad_norm: Option<f64>,
}

impl Default for StepConfig {
    /// Plain f32 backprop of the whole batch, dropout on, κ = 1, clip 10.
    fn default() -> Self {
        Self {
            checkpoint: None,
            precision: Precision::F32,
            micro_batch: None,
            dropout: true,
            huber_delta: 1.0,
            max_grad_norm: Some(10.0),
        }
    }
}

impl StepConfig {
    /// Checks every value; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if let Some(c) = &self.checkpoint {
            c.validate()?;
        }
        if self.micro_batch == Some(0) {
            return Err(Error::config("micro_batch", 0, "at least 1 row"));
        }
        if !(self.huber_delta.is_finite() && self.huber_delta > 0.0) {
            return Err(Error::config(
                "huber_delta",
                self.huber_delta,
                "a finite value > 0",
            ));
        }
        if let Some(m) = self.max_grad_norm {
            if !(m.is_finite() && m > 0.0) {
                return Err(Error::config("max_grad_norm", m, "a finite value > 0"));
            }
        }
        Ok(())
    }

    /// The micro-batches of a batch of `batch` rows, as `(start, rows)`.
    pub fn micro_batches(&self, batch: usize) -> Vec<(usize, usize)> {
        let m = self.micro_batch.unwrap_or(batch).clamp(1, batch.max(1));
        (0..batch)
            .step_by(m)
            .map(|s| (s, m.min(batch - s)))
            .collect()
    }
}

/// One TD batch: observations, the actions taken, their targets and
/// (optionally) importance weights, `B` rows each. The targets are f32 by
/// default; a caller that computes them in f64 (the learner's Double-DQN
/// targets) passes them as f64 and the loss uses them unrounded.
#[derive(Debug, Clone, Copy)]
pub struct TdBatch<'a, T = f32> {
    /// The observations `s_i`.
    pub obs: &'a ObsBatch,
    /// `a_i`, indices in [`Action::ALL`].
    pub actions: &'a [u32],
    /// `y_i` (constants).
    pub targets: &'a [T],
    /// `w_i` (`None`: all 1).
    pub weights: Option<&'a [f32]>,
}

impl<T: Copy + Into<f64>> TdBatch<'_, T> {
    /// Rows.
    pub fn len(&self) -> usize {
        self.obs.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.obs.is_empty()
    }

    /// Every column has `B` rows, `B ≥ 1`, every action is valid and every
    /// target and weight finite.
    pub fn validate(&self) -> Result<()> {
        let b = self.obs.len();
        if b == 0 {
            return Err(Error::config("batch", 0, "at least 1 row"));
        }
        let check_len = |key: &'static str, n: usize| {
            if n == b {
                Ok(())
            } else {
                Err(Error::config(key, n, format!("{b} rows (the batch)")))
            }
        };
        check_len("actions", self.actions.len())?;
        check_len("targets", self.targets.len())?;
        if let Some(w) = self.weights {
            check_len("weights", w.len())?;
            if let Some(x) = w.iter().find(|x| !(x.is_finite() && **x >= 0.0)) {
                return Err(Error::config("weights", x, "finite values >= 0"));
            }
        }
        let n_actions = Action::ALL.len() as u32;
        if let Some(a) = self.actions.iter().find(|a| **a >= n_actions) {
            return Err(Error::config(
                "actions",
                a,
                format!("indices below {n_actions}"),
            ));
        }
        if let Some(y) = self
            .targets
            .iter()
            .map(|&y| y.into())
            .find(|y: &f64| !y.is_finite())
        {
            return Err(Error::config("targets", y, "finite values"));
        }
        Ok(())
    }
}

/// The gradients of one step before the update ([`TrainStep::grads`]).
#[derive(Debug, Clone)]
pub struct StepGrads {
    /// Gradient of `loss_scale × L` on the master variables (f32).
    pub grads: Grads,
    /// The loss scale `S` the gradients carry (1 without a loss scaler).
    pub loss_scale: f64,
    /// `L`, unscaled.
    pub loss: f64,
    /// `|δ_i|` per row, in batch order (new priorities).
    pub td_abs: Vec<f32>,
    /// Mean `Q(s, a)` over the batch.
    pub q_mean: f64,
    /// Micro-batches the batch was split into.
    pub micro_batches: usize,
}

/// What one [`TrainStep::step`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    /// `L`, the mean weighted Huber loss (unscaled).
    pub loss: f64,
    /// `|δ_i|` per row, in batch order.
    pub td_abs: Vec<f32>,
    /// Mean `Q(s, a)`.
    pub q_mean: f64,
    /// Global gradient norm before clipping (unscaled); not finite when
    /// the step was skipped.
    pub grad_norm: f64,
    /// Whether the optimizer stepped: `false` when a gradient was inf/NaN
    /// (with f16 the loss scaler then backs off; with f32/bf16 it is a
    /// diverged run and the caller decides).
    pub stepped: bool,
    /// Micro-batches the batch was split into.
    pub micro_batches: usize,
    /// The loss scale used (1 without a loss scaler).
    pub loss_scale: f64,
}

/// A configured training step of the agent (see the module docs). Holds
/// the mixed-precision state (the f16 loss scaler, public for checkpoints);
/// the network, its master [`VarMap`] and the [`AdamW`] stay the caller's.
#[derive(Debug, Clone)]
pub struct TrainStep {
    /// The techniques and loss constants.
    pub cfg: StepConfig,
    /// The agent's architecture (the low-precision working copy is built
    /// from it each step).
    pub agent: AgentConfig,
    /// Precision and, for f16, the loss scaler.
    pub precision: MixedPrecision,
    /// Gradient computations retried with a halved micro-batch after the
    /// device ran out of memory (see the module docs).
    pub oom_retries: u64,
    /// The CPU twin of a device's out-of-memory: micro-batches of more
    /// rows fail with [`Error::OutOfMemory`].
    inject_oom_above_rows: Option<usize>,
}

impl TrainStep {
    /// A step for agents of architecture `agent`.
    pub fn new(cfg: StepConfig, agent: AgentConfig) -> Result<Self> {
        cfg.validate()?;
        agent.validate()?;
        Ok(Self {
            precision: MixedPrecision::new(cfg.precision),
            cfg,
            agent,
            oom_retries: 0,
            inject_oom_above_rows: None,
        })
    }

    /// Makes micro-batches of more than `rows` rows fail with
    /// [`Error::OutOfMemory`] before they run, as on a device without room
    /// for them (`None`: off, the default). The CPU twin of the GPU
    /// out-of-memory path, for tests and drills.
    pub fn inject_oom_above_rows(&mut self, rows: Option<usize>) {
        self.inject_oom_above_rows = rows;
    }

    /// One whole update: [`grads`](Self::grads), then
    /// [`apply`](Self::apply). `net` is the f32 agent built on `master`
    /// from [`TrainStep::agent`]; `seed` draws the dropout masks (use a new
    /// one every step).
    pub fn step(
        &mut self,
        net: &AgentNet,
        master: &VarMap,
        opt: &mut AdamW,
        batch: &TdBatch<'_, impl Copy + Into<f64>>,
        seed: u64,
    ) -> Result<StepOutcome> {
        let g = self.grads_retrying(net, master, batch, seed)?;
        self.apply(g, opt)
    }

    /// [`grads`](Self::grads), retried with a halved micro-batch while the
    /// device runs out of memory (see the module docs); the smaller
    /// micro-batch is kept in [`TrainStep::cfg`]. What [`step`](Self::step)
    /// and the data-parallel learner use.
    pub fn grads_retrying(
        &mut self,
        net: &AgentNet,
        master: &VarMap,
        batch: &TdBatch<'_, impl Copy + Into<f64>>,
        seed: u64,
    ) -> Result<StepGrads> {
        loop {
            match self.grads(net, master, batch, seed) {
                Ok(g) => return Ok(g),
                Err(e) if e.is_out_of_memory() => {
                    let rows = self
                        .cfg
                        .micro_batch
                        .map_or(batch.len(), |m| m.min(batch.len()));
                    if rows <= 1 {
                        return Err(e);
                    }
                    let half = rows.div_ceil(2);
                    tracing::warn!(target: "gm_train", rows, retry_rows = half, error = %e, "out of memory in a training step: retrying the same batch with a halved micro-batch");
                    self.cfg.micro_batch = Some(half);
                    self.oom_retries += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The loss, TD errors and gradients of one step, with the configured
    /// techniques, before any update (see [`step`](Self::step) for the
    /// arguments). The gradients carry the loss scale.
    pub fn grads(
        &self,
        net: &AgentNet,
        master: &VarMap,
        batch: &TdBatch<'_, impl Copy + Into<f64>>,
        seed: u64,
    ) -> Result<StepGrads> {
        batch.validate()?;
        let b = batch.len();
        let device = batch.obs.lvn.device().clone();
        let working;
        let model = match self.cfg.precision {
            Precision::F32 => net,
            p => {
                working = AgentNet::new(&self.agent, p.working_builder(master, &device)?)?;
                &working
            }
        };
        let loss_scale = self.precision.scaler.as_ref().map_or(1.0, |s| s.scale);
        let kappa = self.cfg.huber_delta;
        let parts = self.cfg.micro_batches(b);
        let whole = parts.len() == 1;
        let mut acc = if whole {
            None
        } else {
            Some(GradAccumulator::new(master)?)
        };
        let mut single = None;
        let (mut loss_sum, mut q_sum) = (0f64, 0f64);
        let mut td_abs = Vec::with_capacity(b);
        for (k, &(start, rows)) in parts.iter().enumerate() {
            if let Some(limit) = self.inject_oom_above_rows.filter(|&l| rows > l) {
                return Err(Error::OutOfMemory {
                    device: format!("{device:?}").to_lowercase(),
                    rows,
                    detail: format!("injected: micro-batches above {limit} rows do not fit"),
                });
            }
            let obs = if whole {
                batch.obs.clone()
            } else {
                narrow_obs(batch.obs, start, rows)?
            };
            let rows_of = |v: &[f32]| v[start..start + rows].to_vec();
            let micro = MicroTd {
                actions: batch.actions[start..start + rows].to_vec(),
                targets: batch.targets[start..start + rows]
                    .iter()
                    .map(|&y| y.into())
                    .collect(),
                weights: batch.weights.map(rows_of),
                kappa,
                loss_scale,
                device: &device,
            };
            let dropout = if self.cfg.dropout {
                SegmentDropout::On {
                    seed: micro_seed(seed, k),
                }
            } else {
                SegmentDropout::Off
            };
            let mut stats = None;
            let loss_fn = |q: &Tensor| -> Result<Tensor> {
                let (surrogate, s) = micro.surrogate(q)?;
                stats = Some(s);
                Ok(surrogate)
            };
            let (_, grads) = match &self.cfg.checkpoint {
                Some(c) => {
                    let c = CheckpointConfig { dropout, ..*c };
                    agent_checkpointed_grads(model, master, &obs, loss_fn, &c)?
                }
                None => agent_plain_grads(model, master, &obs, loss_fn, dropout)?,
            };
            let s = stats.ok_or_else(|| {
                Error::config("loss", "never computed", "one loss per micro-batch")
            })?;
            loss_sum += s.loss_sum;
            q_sum += s.q_sum;
            td_abs.extend(s.td_abs);
            match &mut acc {
                Some(acc) => acc.add_grads(&grads, rows)?,
                None => single = Some(grads),
            }
        }
        let grads = match (acc, single) {
            (Some(mut acc), _) => acc.finish()?,
            (None, Some(g)) => g,
            (None, None) => return Err(Error::config("batch", 0, "at least 1 row")),
        };
        Ok(StepGrads {
            grads,
            loss_scale,
            loss: loss_sum / b as f64,
            td_abs,
            q_mean: q_sum / b as f64,
            micro_batches: parts.len(),
        })
    }

    /// Applies gradients from [`grads`](Self::grads): with a loss scaler,
    /// skips the update on inf/NaN (the scaler backs off) and otherwise
    /// unscales; clips to `max_grad_norm`; steps `opt` (which must have been
    /// made for the master map's variables, in [`Grads`] order).
    pub fn apply(&mut self, mut g: StepGrads, opt: &mut AdamW) -> Result<StepOutcome> {
        let finite = match &self.precision.scaler {
            Some(_) => {
                let ok = g.grads.all_finite()?;
                if ok {
                    g.grads.scale(1.0 / g.loss_scale)?;
                }
                ok
            }
            None => true,
        };
        let grad_norm = if finite {
            match self.cfg.max_grad_norm {
                Some(m) => g.grads.clip_global_norm(m)?,
                None => g.grads.global_norm()?,
            }
        } else {
            f64::INFINITY
        };
        let stepped = grad_norm.is_finite();
        if stepped {
            opt.step(&g.grads)?;
        }
        Ok(self.outcome(g, grad_norm, stepped))
    }

    /// [`apply`](Self::apply) for a data-parallel rank: the update goes
    /// through the sharded optimizer (collective: every rank calls it at
    /// the same step), `weight` is this rank's share of the global batch.
    /// Non-finite gradients on any rank skip the update on every rank and
    /// back the loss scaler off, as in `apply`.
    pub fn apply_zero(
        &mut self,
        g: StepGrads,
        zero: &mut ZeroOptimizer,
        weight: f64,
    ) -> Result<StepOutcome> {
        let z = zero.step(&g.grads, weight, g.loss_scale, self.cfg.max_grad_norm)?;
        Ok(self.outcome(g, z.grad_norm, z.stepped))
    }

    /// Ends a step: the loss scaler learns whether it was skipped.
    fn outcome(&mut self, g: StepGrads, grad_norm: f64, stepped: bool) -> StepOutcome {
        if let Some(s) = &mut self.precision.scaler {
            s.update(!stepped);
        }
        StepOutcome {
            loss: g.loss,
            td_abs: g.td_abs,
            q_mean: g.q_mean,
            grad_norm,
            stepped,
            micro_batches: g.micro_batches,
            loss_scale: g.loss_scale,
        }
    }
}

/// The dropout seed of micro-batch `k` of a step with seed `seed`: the seed
/// itself for `k = 0`, a SplitMix64-style mix otherwise.
pub fn micro_seed(seed: u64, k: usize) -> u64 {
    if k == 0 {
        return seed;
    }
    let mut z = seed ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Rows `start .. start + rows` of every part of `obs` (views, no copy).
pub fn narrow_obs(obs: &ObsBatch, start: usize, rows: usize) -> Result<ObsBatch> {
    Ok(ObsBatch {
        structure: obs.structure.narrow(0, start, rows)?,
        tactical: obs.tactical.narrow(0, start, rows)?,
        regime: obs.regime.narrow(0, start, rows)?,
        lvn: obs.lvn.narrow(0, start, rows)?,
    })
}

/// One micro-batch's TD columns.
struct MicroTd<'d> {
    actions: Vec<u32>,
    targets: Vec<f64>,
    weights: Option<Vec<f32>>,
    kappa: f64,
    loss_scale: f64,
    device: &'d Device,
}

/// Host-side sums of one micro-batch.
struct MicroStats {
    /// `Σ w_i · huber(δ_i)`.
    loss_sum: f64,
    /// `Σ Q(s_i, a_i)`.
    q_sum: f64,
    td_abs: Vec<f32>,
}

impl MicroTd<'_> {
    /// From the Q-values `[n, 3]` (any dtype): the scalar whose gradient is
    /// `loss_scale ×` the gradient of this micro-batch's mean weighted Huber
    /// loss (see the module docs), and the host-side sums.
    fn surrogate(&self, q: &Tensor) -> Result<(Tensor, MicroStats)> {
        let n = self.actions.len();
        let q = q.to_dtype(DType::F32)?;
        let idx = Tensor::from_slice(&self.actions, (n, 1), self.device)?;
        let q_sa = q.gather(&idx, 1)?.squeeze(1)?;
        let qv = q_sa.to_vec1::<f32>()?;
        let k = self.kappa;
        let mut s = MicroStats {
            loss_sum: 0.0,
            q_sum: 0.0,
            td_abs: Vec::with_capacity(n),
        };
        let mut upstream = Vec::with_capacity(n);
        for (i, &q) in qv.iter().enumerate() {
            let d = f64::from(q) - self.targets[i];
            let w = self.weights.as_ref().map_or(1.0, |w| f64::from(w[i]));
            let ad = d.abs();
            let h = if ad <= k {
                0.5 * d * d
            } else {
                k * (ad - 0.5 * k)
            };
            s.loss_sum += w * h;
            s.q_sum += f64::from(q);
            s.td_abs.push(ad as f32);
            upstream.push((self.loss_scale * w * d.clamp(-k, k) / n as f64) as f32);
        }
        let g = Tensor::from_vec(upstream, n, self.device)?;
        Ok((q_sa.mul(&g)?.sum_all()?, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_cover_the_batch_and_configs_validate() {
        let mut c = StepConfig::default();
        assert_eq!(c.micro_batches(8), [(0, 8)]);
        c.micro_batch = Some(3);
        assert_eq!(c.micro_batches(8), [(0, 3), (3, 3), (6, 2)]);
        c.micro_batch = Some(64);
        assert_eq!(c.micro_batches(8), [(0, 8)]);
        assert!(c.validate().is_ok());
        for bad in [
            StepConfig {
                micro_batch: Some(0),
                ..StepConfig::default()
            },
            StepConfig {
                huber_delta: 0.0,
                ..StepConfig::default()
            },
            StepConfig {
                max_grad_norm: Some(f64::NAN),
                ..StepConfig::default()
            },
            StepConfig {
                checkpoint: Some(CheckpointConfig {
                    segments: 0,
                    ..CheckpointConfig::default()
                }),
                ..StepConfig::default()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(Error::Config { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(micro_seed(7, 0), 7);
        assert_ne!(micro_seed(7, 1), micro_seed(7, 2));
    }
}
