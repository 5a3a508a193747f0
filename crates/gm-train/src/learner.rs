//! The Double-DQN learner: [`Learner`] trains the GrandModel agent
//! ([`AgentNet`]) on gm-market's trading environments with prioritized,
//! de-duplicated n-step replay, configured by [`LearnerConfig`].
//!
//! # One update
//! A batch of `B` n-step transitions `(s, a, R, done, γ^k, s')` is sampled
//! with priorities (importance weights `w`). With the online network `Q`
//! and the target network `Q⁻`:
//!
//! ```text
//! a*  = argmax_a Q(s', a)                       (online, eval mode)
//! y   = R + γ^k · Q⁻(s', a*) · (1 − done)        (Double DQN)
//! δ   = Q(s, a) − y                             (online, train mode)
//! L   = (1/B) Σ w_i · huber_κ(δ_i)
//! ```
//!
//! The gradient of `L` is back-propagated through `Q(s, a)` only (`y` is a
//! constant), clipped to a global norm, and applied by [`AdamW`]; the
//! sampled transitions get priority `|δ|`. The loss, backward pass, clip
//! and AdamW step are one [`TrainStep`] configured by
//! [`LearnerConfig::step`], so segment gradient checkpointing, a bf16/f16
//! working copy (f16 with dynamic loss scaling) and gradient accumulation
//! over micro-batches apply to real training; the default is plain f32
//! backprop of the whole batch (numerically the update this learner made
//! before the step was configurable: `y` enters the step in f64). The batch can
//! be changed between updates with [`Learner::set_batch_size`] (a trainer
//! shrinks it under memory pressure).
//!
//! With f16, an update whose gradients overflow is skipped (the loss
//! scaler backs off; [`UpdateStats::stepped`] is false) and counts as an
//! update; with f32 or bf16 a non-finite gradient norm stops the run with
//! [`Error::Stopped`]. The target network is copied from
//! the online one every `every_updates` updates ([`TargetUpdate::Hard`]) or
//! moved towards it by `τ` after every update ([`TargetUpdate::Polyak`]).
//!
//! # Data
//! Rewards are fractional returns of one unit of notional, about `1e-4` per
//! bar; they enter the buffer multiplied by
//! [`reward_scale`](LearnerConfig::reward_scale) (default 100: percent), so
//! Q-values are of order 0.01–1 and the Huber threshold κ = 1 means
//! something. Reported episode returns are unscaled (gm-market's `pnl`).
//! The replay schema and the n-step builder (episode ends cut the return
//! and bootstrap from the final observation with `γ^k`) are in
//! [`replay`]; the actors (ε-greedy with a linear schedule, vectorised
//! environments) and the parameter snapshots they act with in [`actors`].
//!
//! # Modes ([`ActorMode`])
//! - **Synchronous**: each [`Learner::step`] first steps the vectorised
//!   environment `vec_env_steps_per_update` times with the online network,
//!   then (once `learning_starts_transitions` are stored) samples a batch
//!   straight from the buffer with the learner's own RNG and updates. Fully
//!   deterministic for a seed, and resumable bit for bit.
//! - **Threaded**: actor threads (each with its own `VecEnv` and a copy of
//!   the weights refreshed every `actor_sync_every_updates` updates) feed
//!   the buffer through [`gm_buffers::Writer`]s; the learner takes batches
//!   from a [`gm_buffers::Prefetcher`] thread. Each `step` is one update.
//!   Resuming restores weights, optimizer, buffer and counters; the
//!   actors start new episodes, so the continuation is not bit-exact.
//!
//! # Progress events (`tracing`, target `gm_train`)
//! - `info`, message `"learner progress"`, every `log_every_steps` steps:
//!   `step`, `updates`, `transitions`, `episodes`, `epsilon`, `beta`,
//!   `buffer_len`, `loss` (mean weighted Huber loss over the window),
//!   `td_error` (mean `|δ|`), `q_mean` (mean `Q(s, a)`), `grad_norm` (mean
//!   norm before clipping), `updates_per_s`; and, when episodes ended in
//!   the window, `episode_return` (their mean unscaled return) and
//!   `episodes_in_window`.
//! - `debug`, `"episode finished"`: `env`, `episode_return`, `episodes`.
//! - `debug`, `"target network updated"`: `updates`.
//! - `info`, `"checkpoint saved"` / `"checkpoint resumed"`: `path`, `step`,
//!   and `bytes` when saving.
//! - `error`, `"actor stopped"`: `actor`, `error`.
//!
//! # Checkpoints
//! [`Learner::save_checkpoint`] writes a directory:
//!
//! | file | holds |
//! |---|---|
//! | `online.safetensors` | the online network ([`gm_models::weights::save`]) |
//! | `target.safetensors` | the target network |
//! | `optimizer.safetensors` | AdamW moments: `m/<variable>` and `v/<variable>` (variables that never had a gradient have none) |
//! | `replay.gmr` | the prioritized buffer with its priorities and β position (gm-buffers `save`) |
//! | `manifest.json` | format (`gm-train-learner`) and version (1), step counters (the transition counter is the ε position), AdamW's step, RNG states (ChaCha8 seed, stream, word position), in synchronous mode the actions of the current episode round (from which the environments and n-step tracks are rebuilt exactly), the live batch size, the f16 loss scaler's state, fingerprints of the config (the step's techniques included) and data, and the size and CRC-32 of every other file; its own body is covered by a CRC-32 too |
//!
//! Everything is written into a fresh sibling directory
//! (`.<name>.tmp-<pid>-<nanos>`), every file and then the directory are
//! fsynced, and it is renamed into place (the parent fsynced). A checkpoint
//! already at the path is renamed aside first and removed only once the new
//! one is in place, so a crash leaves the old checkpoint or the new one
//! (between the two renames, the old one as `.<name>.old-*`), never a mix.
//! [`Learner::resume`] checks the manifest's checksum, format and version
//! and every file's size and CRC before it reads anything: a missing,
//! truncated or corrupted checkpoint is an [`Error::Checkpoint`].

pub mod actors;
mod persist;
pub mod policy;
pub mod replay;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use gm_buffers::{
    Batch, BufferConfig, PerConfig, PrefetchBuilder, Prefetcher, PrioritizedReplayBuffer,
    SharedReplay, StorageMode, Writer,
};
use gm_market::{EnvConfig, MarketData, PolicyReturns};
use gm_models::ForwardCtx;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use self::actors::{
    ActorCore, ActorPool, ActorPoolBuilder, ActorSpec, EpisodeEnd, ParamSnapshot, Shared,
};
use self::persist::{ActorState, Body, Fingerprint, RngState, StepFingerprint};
use self::policy::GreedyPolicy;
use self::replay::{names, replay_schema, NStep};
use crate::agent::{AgentConfig, AgentNet, ObsBatch};
use crate::grads::Grads;
use crate::optim::{AdamW, AdamWConfig};
use crate::step::{StepConfig, TdBatch, TrainStep};
use crate::{Error, Result};

/// How the target network follows the online one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TargetUpdate {
    /// Copy the online weights every `every_updates` gradient updates.
    Hard {
        /// Updates between copies (≥ 1).
        every_updates: u64,
    },
    /// After every update, `target ← τ · online + (1 − τ) · target`.
    Polyak {
        /// τ in (0, 1].
        tau: f64,
    },
}

/// Who steps the environments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorMode {
    /// The learner steps them itself, before each update (deterministic,
    /// exactly resumable).
    Synchronous,
    /// `threads` background actor threads, each with its own vectorised
    /// environment of `num_envs` environments.
    Threaded {
        /// Actor threads (≥ 1).
        threads: usize,
    },
}

/// ε of ε-greedy exploration: linear from `start` to `end` over
/// `decay_transitions` environment transitions, then `end`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpsilonSchedule {
    /// ε at transition 0.
    pub start: f64,
    /// ε after the decay.
    pub end: f64,
    /// Transitions over which ε decays (0 = `end` at once).
    pub decay_transitions: u64,
}

impl EpsilonSchedule {
    /// ε after `transitions` transitions.
    pub fn at(&self, transitions: u64) -> f64 {
        if self.decay_transitions == 0 {
            return self.end;
        }
        let f = (transitions as f64 / self.decay_transitions as f64).min(1.0);
        self.start + (self.end - self.start) * f
    }
}

/// Everything the learner needs; `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct LearnerConfig {
    /// The agent's architecture. Default: [`AgentConfig::default`] (the full
    /// agent); [`LearnerConfig::small`] uses a faster one.
    pub agent: AgentConfig,
    /// AdamW. Default: lr 1e-4, betas 0.9 / 0.999, eps 1e-8, weight decay 0.
    pub optimizer: AdamWConfig,
    /// The environments (default gm-market's: 288-bar episodes, 1 bp cost).
    pub env: EnvConfig,
    /// Synchronous or threaded actors. Default [`ActorMode::Synchronous`].
    pub actors: ActorMode,
    /// Environments per vectorised environment (per actor thread).
    /// Default 8.
    pub num_envs: usize,
    /// Seed of everything random (weights, environments, exploration,
    /// sampling, dropout). Default 0.
    pub seed: u64,
    /// Discount per bar, in (0, 1]. Default 0.97 ([`small`](Self::small):
    /// 0.9).
    pub gamma: f64,
    /// Steps of the n-step return (≥ 1). Default 3.
    pub n_step: usize,
    /// Rewards are multiplied by this before they are stored (default 100:
    /// percent of notional per bar).
    pub reward_scale: f64,
    /// Whether an episode's end is terminal (`done`, no bootstrap). Default
    /// false: gm-market's episodes end at a time limit while the market goes
    /// on, so the return is cut and bootstraps from the last observation.
    pub terminal_at_episode_end: bool,
    /// Transitions per update batch at the start of a run (the live batch
    /// can be changed with [`Learner::set_batch_size`]). Default 64.
    pub batch_size: usize,
    /// The update's techniques: segment gradient checkpointing, precision
    /// (f16 with a loss scaler) and micro-batches for gradient
    /// accumulation, and whether dropout is on. Default
    /// [`StepConfig::default`]: plain f32 backprop of the whole batch,
    /// dropout on. Its `huber_delta` and `max_grad_norm` are replaced by
    /// [`huber_delta`](Self::huber_delta) and
    /// [`max_grad_norm`](Self::max_grad_norm) (one source for each).
    pub step: StepConfig,
    /// Replay storage; `capacity` in transitions (default 100 000, memory
    /// storage). `rows_per_stream = None` is sized for the n-step
    /// add order ([`replay::rows_per_stream`]).
    pub replay: BufferConfig,
    /// Priorities: α 0.6, β 0.4 → 1 over 100 000 sample calls, ε 1e-6, FIFO.
    pub per: PerConfig,
    /// Complete n-step transitions an environment collects before they go
    /// into the buffer as one residue-ordered segment ([`replay`] module
    /// docs). Default 96.
    pub replay_segment_steps: usize,
    /// Transitions stored before the first update. Default 2 000
    /// ([`small`](Self::small): 1 000).
    pub learning_starts_transitions: usize,
    /// Vectorised environment steps per update (`num_envs` transitions
    /// each) in synchronous mode, and the pace of threaded actors.
    /// Default 1.
    pub vec_env_steps_per_update: usize,
    /// Target network updates. Default `Hard { every_updates: 250 }`
    /// ([`small`](Self::small): every 100).
    pub target_update: TargetUpdate,
    /// Exploration. Default 1.0 → 0.05 over 50 000 transitions
    /// ([`small`](Self::small): over 8 000).
    pub epsilon: EpsilonSchedule,
    /// Global gradient-norm clip. Default 10.
    pub max_grad_norm: f64,
    /// Huber threshold κ, in scaled reward units. Default 1.
    pub huber_delta: f64,
    /// Threaded mode: updates between parameter snapshots for the actors.
    /// Default 20.
    pub actor_sync_every_updates: u64,
    /// Threaded mode: batches the prefetcher keeps ready. Default 4.
    pub prefetch_depth: usize,
    /// Steps between progress events. Default 100.
    pub log_every_steps: u64,
}

impl Default for LearnerConfig {
    fn default() -> Self {
        Self {
            agent: AgentConfig::default(),
            optimizer: AdamWConfig {
                lr: 1e-4,
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            env: EnvConfig::default(),
            actors: ActorMode::Synchronous,
            num_envs: 8,
            seed: 0,
            gamma: 0.97,
            n_step: 3,
            reward_scale: 100.0,
            terminal_at_episode_end: false,
            batch_size: 64,
            step: StepConfig::default(),
            replay: BufferConfig {
                capacity: 100_000,
                storage: StorageMode::Memory,
                ..BufferConfig::default()
            },
            per: PerConfig::default(),
            replay_segment_steps: 96,
            learning_starts_transitions: 2_000,
            vec_env_steps_per_update: 1,
            target_update: TargetUpdate::Hard { every_updates: 250 },
            epsilon: EpsilonSchedule {
                start: 1.0,
                end: 0.05,
                decay_transitions: 50_000,
            },
            max_grad_norm: 10.0,
            huber_delta: 1.0,
            actor_sync_every_updates: 20,
            prefetch_depth: 4,
            log_every_steps: 100,
        }
    }
}

impl LearnerConfig {
    /// A preset for short runs on a few cores (the learning test and
    /// `examples/learn_synthetic.rs`, about a thousand updates): the
    /// defaults with these changes, each measured on the synthetic market
    /// (the example's doc comment has the figures):
    /// - [`AgentConfig::tiny`] without dropout;
    /// - AdamW lr 5e-4 (a small network, few updates);
    /// - γ = 0.9 instead of 0.97: the observation does not contain the
    ///   position, so an action changes mainly the next bar's reward (and
    ///   the cost of the switch); a 10-bar horizon keeps the bootstrapped
    ///   part of the target, which the actions barely change, from
    ///   drowning the one-bar advantage the greedy choice depends on. With
    ///   0.97 and the old schedule below, 1 500 steps learned nothing
    ///   (held-out return 0.0002, below buy-and-hold);
    /// - ε from 1.0 to 0.05 over 8 000 transitions (1 000 steps of 8
    ///   environments) instead of 50 000, so most of a short run's data
    ///   comes from the policy being learned;
    /// - learning starts after 1 000 transitions instead of 2 000;
    /// - a hard target update every 100 updates instead of 250, so the
    ///   target follows within a run of about a thousand updates.
    pub fn small() -> Self {
        let mut agent = AgentConfig::tiny();
        agent.structure.dropout = 0.0;
        agent.tactical.dropout = 0.0;
        agent.regime.dropout = 0.0;
        agent.lvn.dropout = 0.0;
        Self {
            agent,
            optimizer: AdamWConfig {
                lr: 5e-4,
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            gamma: 0.9,
            learning_starts_transitions: 1_000,
            target_update: TargetUpdate::Hard { every_updates: 100 },
            epsilon: EpsilonSchedule {
                start: 1.0,
                end: 0.05,
                decay_transitions: 8_000,
            },
            ..Self::default()
        }
    }

    /// Checks every value; the error names the key, the value and what is
    /// allowed.
    pub fn validate(&self) -> Result<()> {
        self.agent.validate()?;
        self.optimizer.validate()?;
        self.env.validate()?;
        self.per.validate()?;
        self.replay.validate()?;
        if let ActorMode::Threaded { threads: 0 } = self.actors {
            return Err(Error::config("actors.threads", 0, "at least 1"));
        }
        let at_least_one = [
            ("num_envs", self.num_envs),
            ("n_step", self.n_step),
            ("batch_size", self.batch_size),
            ("replay_segment_steps", self.replay_segment_steps),
            ("vec_env_steps_per_update", self.vec_env_steps_per_update),
            ("prefetch_depth", self.prefetch_depth),
        ];
        for (k, v) in at_least_one {
            if v == 0 {
                return Err(Error::config(k, v, "at least 1"));
            }
        }
        if !(self.gamma > 0.0 && self.gamma <= 1.0) {
            return Err(Error::config("gamma", self.gamma, "a value in (0, 1]"));
        }
        if !(self.reward_scale.is_finite() && self.reward_scale > 0.0) {
            return Err(Error::config(
                "reward_scale",
                self.reward_scale,
                "a finite value > 0",
            ));
        }
        if self.learning_starts_transitions < self.batch_size {
            return Err(Error::config(
                "learning_starts_transitions",
                self.learning_starts_transitions,
                format!("at least batch_size ({})", self.batch_size),
            ));
        }
        if self.learning_starts_transitions > self.replay.capacity {
            return Err(Error::config(
                "learning_starts_transitions",
                self.learning_starts_transitions,
                format!("at most replay.capacity ({})", self.replay.capacity),
            ));
        }
        match self.target_update {
            TargetUpdate::Hard { every_updates: 0 } => {
                return Err(Error::config(
                    "target_update.every_updates",
                    0,
                    "at least 1",
                ))
            }
            TargetUpdate::Polyak { tau } if !(tau > 0.0 && tau <= 1.0) => {
                return Err(Error::config("target_update.tau", tau, "a value in (0, 1]"))
            }
            _ => {}
        }
        let e = &self.epsilon;
        for (k, v) in [("epsilon.start", e.start), ("epsilon.end", e.end)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::config(k, v, "a probability in [0, 1]"));
            }
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm > 0.0) {
            return Err(Error::config(
                "max_grad_norm",
                self.max_grad_norm,
                "a finite value > 0",
            ));
        }
        if !(self.huber_delta.is_finite() && self.huber_delta > 0.0) {
            return Err(Error::config(
                "huber_delta",
                self.huber_delta,
                "a finite value > 0",
            ));
        }
        self.step_config().validate().map_err(|e| match e {
            Error::Config {
                key,
                value,
                allowed,
            } => Error::Config {
                key: match key {
                    "micro_batch" => "step.micro_batch",
                    "segments" => "step.checkpoint.segments",
                    k => k,
                },
                value,
                allowed,
            },
            other => other,
        })?;
        if self.actor_sync_every_updates == 0 {
            return Err(Error::config("actor_sync_every_updates", 0, "at least 1"));
        }
        if self.log_every_steps == 0 {
            return Err(Error::config("log_every_steps", 0, "at least 1"));
        }
        Ok(())
    }

    /// The step configuration the learner runs: [`step`](Self::step) with
    /// the learner's Huber threshold and gradient clip.
    pub fn step_config(&self) -> StepConfig {
        StepConfig {
            huber_delta: self.huber_delta,
            max_grad_norm: Some(self.max_grad_norm),
            ..self.step
        }
    }

    /// Checks a batch size for this config: at least 1, at most
    /// `learning_starts_transitions` (the fewest transitions an update
    /// samples from).
    fn check_batch_size(&self, key: &'static str, b: usize) -> Result<()> {
        if b == 0 || b > self.learning_starts_transitions {
            return Err(Error::config(
                key,
                b,
                format!(
                    "1 ..= learning_starts_transitions ({})",
                    self.learning_starts_transitions
                ),
            ));
        }
        Ok(())
    }

    fn nstep(&self) -> NStep {
        NStep {
            n: self.n_step,
            gamma: self.gamma,
            segment_steps: self.replay_segment_steps,
            terminal_at_end: self.terminal_at_episode_end,
        }
    }

    /// Transitions per update.
    fn per_update(&self) -> u64 {
        (self.vec_env_steps_per_update * self.num_envs) as u64
    }

    fn buffer_config(&self) -> BufferConfig {
        let mut b = self.replay.clone();
        if b.rows_per_stream.is_none() {
            b.rows_per_stream = Some(replay::rows_per_stream(
                b.capacity,
                self.n_step,
                self.replay_segment_steps,
            ));
        }
        b
    }

    fn fingerprint(&self, data: &MarketData) -> Fingerprint {
        let mut h = crc32fast::Hasher::new();
        for b in data.bars() {
            h.update(&b.close.to_le_bytes());
        }
        Fingerprint {
            seed: self.seed,
            threaded: matches!(self.actors, ActorMode::Threaded { .. }),
            num_envs: self.num_envs,
            n_step: self.n_step,
            gamma: self.gamma,
            reward_scale: self.reward_scale,
            episode_bars: self.env.episode_bars,
            cost_bps: self.env.cost_bps,
            segment_steps: self.replay_segment_steps,
            agent_crc32: crc32fast::hash(format!("{:?}", self.agent).as_bytes()),
            data_bars: data.len(),
            data_crc32: h.finalize(),
            step: StepFingerprint::of(&self.step),
        }
    }
}

/// Counters of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LearnerCounters {
    /// Calls to [`Learner::step`].
    pub step: u64,
    /// Gradient updates.
    pub updates: u64,
    /// Environment transitions generated (the ε schedule's clock).
    pub transitions: u64,
    /// Episodes finished.
    pub episodes: u64,
}

/// Statistics of one update.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UpdateStats {
    /// Mean importance-weighted Huber loss.
    pub loss: f64,
    /// Mean `|δ|`.
    pub td_error: f64,
    /// Mean `Q(s, a)` of the batch.
    pub q_mean: f64,
    /// Gradient norm before clipping (not finite when the update was
    /// skipped).
    pub grad_norm: f64,
    /// Transitions in the batch.
    pub batch: usize,
    /// Micro-batches the batch was split into (1 without accumulation).
    pub micro_batches: usize,
    /// Whether the optimizer stepped (false only for an f16 update whose
    /// gradients overflowed: the loss scaler backed off).
    pub stepped: bool,
    /// The loss scale the update used (1 without a loss scaler).
    pub loss_scale: f64,
}

/// What one [`Learner::step`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Counters after the step.
    pub counters: LearnerCounters,
    /// The update's statistics (`None` while the buffer is warming up).
    pub update: Option<UpdateStats>,
    /// ε used by this step's actions (synchronous) or now (threaded).
    pub epsilon: f64,
    /// Transitions in the buffer.
    pub buffer_len: usize,
    /// Unscaled returns of the episodes that ended during the step.
    pub episode_returns: Vec<f64>,
}

/// The networks, the optimizer and the configured training step.
struct Nets {
    online_vm: VarMap,
    online: AgentNet,
    target_vm: VarMap,
    target: AgentNet,
    opt: AdamW,
    step: TrainStep,
}

impl std::fmt::Debug for Nets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nets")
            .field("online", &self.online)
            .field("target", &self.target)
            .field("opt_step", &self.opt.step)
            .finish_non_exhaustive()
    }
}

impl Nets {
    fn new(cfg: &LearnerConfig, device: &Device) -> Result<Self> {
        let online_vm = VarMap::new();
        let online = AgentNet::new(
            &cfg.agent,
            VarBuilder::from_varmap(&online_vm, DType::F32, device),
        )?;
        gm_models::init::init_seeded(&online_vm, cfg.seed)?;
        let target_vm = VarMap::new();
        let target = AgentNet::new(
            &cfg.agent,
            VarBuilder::from_varmap(&target_vm, DType::F32, device),
        )?;
        copy_vars(&online_vm, &target_vm, None)?;
        let n = Grads::empty(&online_vm)?.len();
        let opt = AdamW::new(cfg.optimizer, n)?;
        let step = TrainStep::new(cfg.step_config(), cfg.agent.clone())?;
        Ok(Self {
            online_vm,
            online,
            target_vm,
            target,
            opt,
            step,
        })
    }

    /// One Double-DQN update on `batch` through the configured
    /// [`TrainStep`]; returns the statistics and the new priorities `|δ|`
    /// (`None` when an f16 update was skipped and a TD error is not
    /// finite: the sampled transitions keep their priorities).
    fn update(
        &mut self,
        cfg: &LearnerConfig,
        batch: &Batch,
        update_index: u64,
        device: &Device,
    ) -> Result<(UpdateStats, Option<Vec<f32>>)> {
        let b = batch.len();
        let obs = ObsBatch::from_parts(
            batch.get::<f32>(names::STRUCTURE)?,
            batch.get::<f32>(names::TACTICAL)?,
            batch.get::<f32>(names::REGIME)?,
            batch.get::<f32>(names::LVN)?,
            b,
            device,
        )?;
        let next = ObsBatch::from_parts(
            batch.get::<f32>(names::NEXT_STRUCTURE)?,
            batch.get::<f32>(names::NEXT_TACTICAL)?,
            batch.get::<f32>(names::NEXT_REGIME)?,
            batch.get::<f32>(names::NEXT_LVN)?,
            b,
            device,
        )?;
        let actions = batch.get::<i64>(names::ACTION)?;
        let rewards = batch.get::<f32>(names::REWARD)?;
        let dones = batch.get::<bool>(names::DONE)?;
        let discounts = batch.get::<f32>(names::DISCOUNT)?;
        let weights = batch.weights();

        // Targets: a* from the online network, its value from the target.
        let a_star = self
            .online
            .q_values(&next, &mut ForwardCtx::eval())?
            .detach()
            .argmax(1)?
            .to_vec1::<u32>()?;
        let q_next = self
            .target
            .q_values(&next, &mut ForwardCtx::eval())?
            .detach()
            .to_vec2::<f32>()?;
        let y: Vec<f64> = (0..b)
            .map(|i| {
                let boot = if dones[i] {
                    0.0
                } else {
                    f64::from(discounts[i]) * f64::from(q_next[i][a_star[i] as usize])
                };
                f64::from(rewards[i]) + boot
            })
            .collect();
        let idx = actions
            .iter()
            .map(|&a| u32::try_from(a).map_err(|_| Error::config("action", a, "an index >= 0")))
            .collect::<Result<Vec<u32>>>()?;

        // Loss, backward (with the configured techniques), clip and AdamW.
        let td = TdBatch {
            obs: &obs,
            actions: &idx,
            targets: &y,
            weights: Some(weights),
        };
        let seed = mix(cfg.seed ^ 0xD0_0D, update_index);
        let out = self
            .step
            .step(&self.online, &self.online_vm, &mut self.opt, &td, seed)?;
        if !out.stepped && self.step.precision.scaler.is_none() {
            return Err(Error::Stopped(format!(
                "non-finite gradient norm {} at update {update_index}",
                out.grad_norm
            )));
        }
        if !out.stepped {
            tracing::debug!(target: "gm_train", updates = update_index + 1, loss_scale = out.loss_scale, "update skipped: f16 gradients overflowed");
        }

        match cfg.target_update {
            TargetUpdate::Hard { every_updates } => {
                if (update_index + 1).is_multiple_of(every_updates) {
                    copy_vars(&self.online_vm, &self.target_vm, None)?;
                    tracing::debug!(target: "gm_train", updates = update_index + 1, "target network updated");
                }
            }
            TargetUpdate::Polyak { tau } => copy_vars(&self.online_vm, &self.target_vm, Some(tau))?,
        }
        let td_error = out.td_abs.iter().map(|&d| f64::from(d)).sum::<f64>() / b as f64;
        let priorities = out
            .td_abs
            .iter()
            .all(|d| d.is_finite())
            .then_some(out.td_abs);
        Ok((
            UpdateStats {
                loss: out.loss,
                td_error,
                q_mean: out.q_mean,
                grad_norm: out.grad_norm,
                batch: b,
                micro_batches: out.micro_batches,
                stepped: out.stepped,
                loss_scale: out.loss_scale,
            },
            priorities,
        ))
    }
}

/// A 64-bit mix of a seed and an index (SplitMix64 finaliser).
fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `dst ← src` (`tau = None`) or `dst ← τ·src + (1 − τ)·dst`, by name.
fn copy_vars(src: &VarMap, dst: &VarMap, tau: Option<f64>) -> Result<()> {
    let poisoned = || Error::config("varmap", "poisoned", "an unpoisoned lock");
    let s = src.data().lock().map_err(|_| poisoned())?;
    let d = dst.data().lock().map_err(|_| poisoned())?;
    for (name, dv) in d.iter() {
        let sv = s
            .get(name)
            .ok_or_else(|| Error::config("varmap", name, "the same variables in both networks"))?;
        match tau {
            None => dv.set(sv.as_tensor())?,
            Some(t) => {
                let mixed = sv
                    .as_tensor()
                    .affine(t, 0.0)?
                    .add(&dv.as_tensor().affine(1.0 - t, 0.0)?)?;
                dv.set(&mixed)?;
            }
        }
    }
    Ok(())
}

/// Synchronous mode: the learner's own actor.
#[derive(Debug)]
struct SyncActor {
    core: ActorCore,
    writer: Writer<PrioritizedReplayBuffer>,
    batch: Batch,
}

/// Threaded mode: actor threads and the prefetcher (dropped in this order,
/// each joining its threads).
#[derive(Debug)]
struct Threaded {
    pool: ActorPool,
    prefetch: Prefetcher,
    snapshot: Arc<ParamSnapshot>,
    shared: Arc<Shared>,
    episodes: Receiver<EpisodeEnd>,
}

#[derive(Debug)]
enum Mode {
    Sync(Box<SyncActor>),
    Threaded(Box<Threaded>),
}

/// Sums for the progress event.
#[derive(Debug, Default)]
struct Window {
    updates: u64,
    loss: f64,
    td: f64,
    q: f64,
    grad: f64,
    returns: Vec<f64>,
    since: Option<Instant>,
}

/// The Double-DQN learner; see the module docs.
#[derive(Debug)]
pub struct Learner {
    cfg: LearnerConfig,
    device: Device,
    data: Arc<MarketData>,
    nets: Nets,
    replay: SharedReplay<PrioritizedReplayBuffer>,
    rng: ChaCha8Rng,
    counters: LearnerCounters,
    /// The live batch size ([`Learner::set_batch_size`]).
    batch_size: usize,
    window: Window,
    mode: Mode,
}

impl Learner {
    /// A new learner on `data` (validated config, seeded weights, an empty
    /// buffer; threaded mode starts its actor and prefetch threads).
    pub fn new(cfg: LearnerConfig, data: Arc<MarketData>) -> Result<Self> {
        cfg.validate()?;
        let device = Device::Cpu;
        let nets = Nets::new(&cfg, &device)?;
        let buffer =
            PrioritizedReplayBuffer::new(replay_schema()?, cfg.buffer_config(), cfg.per.clone())?;
        let replay = SharedReplay::new(buffer);
        let rng = ChaCha8Rng::seed_from_u64(mix(cfg.seed, 1));
        let counters = LearnerCounters::default();
        let batch_size = cfg.batch_size;
        let mode = Self::start_mode(&cfg, &data, &replay, &nets, counters, batch_size, None)?;
        Ok(Self {
            cfg,
            device,
            data,
            nets,
            replay,
            rng,
            counters,
            batch_size,
            window: Window::default(),
            mode,
        })
    }

    fn start_mode(
        cfg: &LearnerConfig,
        data: &Arc<MarketData>,
        replay: &SharedReplay<PrioritizedReplayBuffer>,
        nets: &Nets,
        counters: LearnerCounters,
        batch_size: usize,
        sync_state: Option<(&ActorState, &Path)>,
    ) -> Result<Mode> {
        let chunk = cfg.replay_segment_steps + cfg.n_step;
        match cfg.actors {
            ActorMode::Synchronous => {
                let core = match sync_state {
                    None => ActorCore::new(
                        data.clone(),
                        cfg.env,
                        cfg.num_envs,
                        mix(cfg.seed, 2),
                        ChaCha8Rng::seed_from_u64(mix(cfg.seed, 3)),
                        cfg.nstep(),
                        cfg.reward_scale,
                    )?,
                    Some((st, path)) => ActorCore::restore(
                        data.clone(),
                        cfg.env,
                        cfg.num_envs,
                        st.env_seed,
                        st.rng.restore(path)?,
                        cfg.nstep(),
                        cfg.reward_scale,
                        st.vec_steps,
                        &st.round_actions,
                    )?,
                };
                Ok(Mode::Sync(Box::new(SyncActor {
                    core,
                    writer: replay.writer(chunk),
                    batch: replay.new_batch(),
                })))
            }
            ActorMode::Threaded { threads } => {
                let snapshot = Arc::new(ParamSnapshot::default());
                snapshot.publish(&nets.online_vm)?;
                let shared = Arc::new(Shared::default());
                shared.updates.store(counters.updates, Ordering::Release);
                shared
                    .transitions
                    .store(counters.transitions, Ordering::Release);
                let (tx, rx) = sync_channel(4096);
                let slack =
                    ((cfg.replay_segment_steps + cfg.n_step + 1) * cfg.num_envs * threads) as u64;
                // New episodes after a resume: the seeds depend on the
                // transition counter, so a resumed run does not replay the
                // episodes it already saw.
                let base = mix(cfg.seed, 4 + counters.transitions);
                let specs = (0..threads as u64)
                    .map(|t| ActorSpec {
                        data: data.clone(),
                        env: cfg.env,
                        agent: cfg.agent.clone(),
                        num_envs: cfg.num_envs,
                        env_seed: mix(base, 2 * t),
                        rng_seed: mix(base, 2 * t + 1),
                        nstep: cfg.nstep(),
                        reward_scale: cfg.reward_scale,
                        epsilon: cfg.epsilon,
                        allowance: cfg.learning_starts_transitions as u64
                            + slack
                            + counters
                                .transitions
                                .saturating_sub(counters.updates * cfg.per_update()),
                        per_update: cfg.per_update(),
                        writer_chunk: chunk,
                    })
                    .collect();
                let pool = ActorPoolBuilder {
                    specs,
                    replay: replay.clone(),
                    snapshot: snapshot.clone(),
                    shared: shared.clone(),
                    episodes: tx,
                }
                .spawn()?;
                let prefetch = Self::prefetcher(cfg, replay, batch_size, counters.updates)?;
                Ok(Mode::Threaded(Box::new(Threaded {
                    pool,
                    prefetch,
                    snapshot,
                    shared,
                    episodes: rx,
                })))
            }
        }
    }

    /// The threaded mode's prefetcher of batches of `batch_size`, its
    /// sampling seeded by the update count.
    fn prefetcher(
        cfg: &LearnerConfig,
        replay: &SharedReplay<PrioritizedReplayBuffer>,
        batch_size: usize,
        updates: u64,
    ) -> Result<Prefetcher> {
        Ok(PrefetchBuilder::new(batch_size)
            .depth(cfg.prefetch_depth)
            .seed(mix(cfg.seed, 5 + updates))
            .min_len(cfg.learning_starts_transitions)
            .spawn(replay.clone())?)
    }

    /// The configuration.
    pub fn config(&self) -> &LearnerConfig {
        &self.cfg
    }

    /// The batch size the next update samples.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Sets the batch size from the next update on (a trainer shrinks it
    /// under memory pressure). `batch` must be in
    /// `1 ..= learning_starts_transitions`, else an [`Error::Config`] and
    /// nothing changes. The live batch is checkpointed, so a resumed run
    /// continues with it (bit-exactly in synchronous mode). In threaded
    /// mode the prefetcher is restarted with the new size (the batches it
    /// had ready are dropped).
    pub fn set_batch_size(&mut self, batch: usize) -> Result<()> {
        self.cfg.check_batch_size("batch_size", batch)?;
        if batch == self.batch_size {
            return Ok(());
        }
        if let Mode::Threaded(t) = &mut self.mode {
            // Replacing the field drops (stops and joins) the old one.
            t.prefetch = Self::prefetcher(&self.cfg, &self.replay, batch, self.counters.updates)?;
        }
        self.batch_size = batch;
        Ok(())
    }

    /// The configured training step (its techniques and, for f16, the loss
    /// scaler's state).
    pub fn train_step(&self) -> &TrainStep {
        &self.nets.step
    }

    /// The counters.
    pub fn counters(&self) -> LearnerCounters {
        let mut c = self.counters;
        if let Mode::Threaded(t) = &self.mode {
            c.transitions = t.shared.transitions.load(Ordering::Acquire);
        }
        c
    }

    /// ε at the current position of the schedule.
    pub fn epsilon(&self) -> f64 {
        self.cfg.epsilon.at(self.counters().transitions)
    }

    /// The online network.
    pub fn online(&self) -> &AgentNet {
        &self.nets.online
    }

    /// The online network's variables.
    pub fn online_varmap(&self) -> &VarMap {
        &self.nets.online_vm
    }

    /// The target network's variables.
    pub fn target_varmap(&self) -> &VarMap {
        &self.nets.target_vm
    }

    /// The optimizer (its state is public).
    pub fn optimizer(&self) -> &AdamW {
        &self.nets.opt
    }

    /// The replay buffer's concurrent handle.
    pub fn replay(&self) -> &SharedReplay<PrioritizedReplayBuffer> {
        &self.replay
    }

    /// The training data.
    pub fn data(&self) -> &Arc<MarketData> {
        &self.data
    }

    /// One learner step: synchronous mode collects
    /// `vec_env_steps_per_update` vectorised steps and then updates (once
    /// the buffer holds `learning_starts_transitions`); threaded mode waits
    /// for a prefetched batch and updates.
    pub fn step(&mut self) -> Result<StepReport> {
        let mut ended = Vec::new();
        let (update, epsilon) = match &mut self.mode {
            Mode::Sync(s) => {
                let n = s.core.num_envs() as u64;
                let mut eps = self.cfg.epsilon.at(self.counters.transitions);
                for _ in 0..self.cfg.vec_env_steps_per_update {
                    eps = self.cfg.epsilon.at(self.counters.transitions);
                    let e = s
                        .core
                        .step(&self.nets.online, &self.device, eps, &mut s.writer)?;
                    self.counters.transitions += n;
                    ended.extend(e);
                }
                let update = if self.replay.len() >= self.cfg.learning_starts_transitions {
                    self.replay
                        .sample_into(&mut s.batch, self.batch_size, &mut self.rng)?;
                    let (stats, prio) = self.nets.update(
                        &self.cfg,
                        &s.batch,
                        self.counters.updates,
                        &self.device,
                    )?;
                    if let Some(prio) = prio {
                        self.replay.update_priorities(s.batch.indices(), &prio)?;
                    }
                    self.counters.updates += 1;
                    Some(stats)
                } else {
                    None
                };
                (update, eps)
            }
            Mode::Threaded(t) => {
                let batch = loop {
                    if let Some(e) = t.pool.error() {
                        return Err(Error::Stopped(e));
                    }
                    match t.prefetch.next_timeout(Duration::from_millis(50)) {
                        Some(b) => break b?,
                        None => actors::drain(&t.episodes, &mut ended),
                    }
                };
                let (stats, prio) =
                    self.nets
                        .update(&self.cfg, &batch, self.counters.updates, &self.device)?;
                if let Some(prio) = prio {
                    update_priorities_lenient(&self.replay, batch.indices(), &prio)?;
                }
                drop(batch);
                self.counters.updates += 1;
                t.shared
                    .updates
                    .store(self.counters.updates, Ordering::Release);
                if self
                    .counters
                    .updates
                    .is_multiple_of(self.cfg.actor_sync_every_updates)
                {
                    t.snapshot.publish(&self.nets.online_vm)?;
                }
                actors::drain(&t.episodes, &mut ended);
                self.counters.transitions = t.shared.transitions.load(Ordering::Acquire);
                (Some(stats), self.cfg.epsilon.at(self.counters.transitions))
            }
        };
        self.counters.step += 1;
        self.counters.episodes += ended.len() as u64;
        for e in &ended {
            tracing::debug!(target: "gm_train", env = e.env, episode_return = e.pnl, episodes = self.counters.episodes, "episode finished");
        }
        let report = StepReport {
            counters: self.counters,
            update,
            epsilon,
            buffer_len: self.replay.len(),
            episode_returns: ended.iter().map(|e| e.pnl).collect(),
        };
        self.log(&report);
        Ok(report)
    }

    /// Runs `steps` steps; returns the last report (`None` for 0 steps).
    pub fn train(&mut self, steps: u64) -> Result<Option<StepReport>> {
        let mut last = None;
        for _ in 0..steps {
            last = Some(self.step()?);
        }
        Ok(last)
    }

    fn log(&mut self, r: &StepReport) {
        let w = &mut self.window;
        let since = *w.since.get_or_insert_with(Instant::now);
        if let Some(u) = r.update {
            w.updates += 1;
            w.loss += u.loss;
            w.td += u.td_error;
            w.q += u.q_mean;
            w.grad += u.grad_norm;
        }
        w.returns.extend_from_slice(&r.episode_returns);
        if !r.counters.step.is_multiple_of(self.cfg.log_every_steps) {
            return;
        }
        let n = w.updates.max(1) as f64;
        let secs = since.elapsed().as_secs_f64().max(1e-9);
        let beta = self.replay.read().beta();
        let c = r.counters;
        let (loss, td_error, q_mean, grad_norm) = (w.loss / n, w.td / n, w.q / n, w.grad / n);
        let updates_per_s = w.updates as f64 / secs;
        if w.returns.is_empty() {
            tracing::info!(
                target: "gm_train",
                step = c.step, updates = c.updates, transitions = c.transitions,
                episodes = c.episodes, epsilon = r.epsilon, beta, buffer_len = r.buffer_len,
                loss, td_error, q_mean, grad_norm, updates_per_s,
                "learner progress"
            );
        } else {
            let episode_return = w.returns.iter().sum::<f64>() / w.returns.len() as f64;
            tracing::info!(
                target: "gm_train",
                step = c.step, updates = c.updates, transitions = c.transitions,
                episodes = c.episodes, epsilon = r.epsilon, beta, buffer_len = r.buffer_len,
                loss, td_error, q_mean, grad_norm, updates_per_s,
                episode_return, episodes_in_window = w.returns.len(),
                "learner progress"
            );
        }
        *w = Window {
            since: Some(Instant::now()),
            ..Window::default()
        };
    }

    /// The online network's greedy policy on `data` (precomputed per bar).
    pub fn greedy_policy(&self, data: Arc<MarketData>) -> Result<GreedyPolicy> {
        GreedyPolicy::new(&self.nets.online, data, 256)
    }

    /// Mean and spread of the greedy policy's returns on `episodes`
    /// episodes of `data` (episode `i` reset with `seed + i`), through
    /// [`gm_market::evaluate`].
    pub fn evaluate(
        &self,
        data: Arc<MarketData>,
        episodes: usize,
        seed: u64,
    ) -> Result<PolicyReturns> {
        let mut policy = self.greedy_policy(data.clone())?;
        let mut env = gm_market::TradingEnv::new(data, self.cfg.env)?;
        Ok(gm_market::evaluate(&mut env, &mut policy, episodes, seed)?)
    }

    /// Writes a checkpoint directory at `dir` (replacing one that is
    /// there) crash-safely; returns the bytes written. Layout and protocol:
    /// the module docs. In threaded mode the buffer is saved under its read
    /// lock while the actors keep running.
    pub fn save_checkpoint(&self, dir: impl AsRef<Path>) -> Result<u64> {
        let dir = dir.as_ref();
        let counters = self.counters();
        let actor = match &self.mode {
            Mode::Sync(s) => Some(ActorState {
                env_seed: s.core.env_seed(),
                vec_steps: s.core.steps(),
                rng: RngState::of(s.core.rng()),
                round_actions: s.core.round_actions().to_vec(),
            }),
            Mode::Threaded(_) => None,
        };
        let body = Body {
            format: persist::FORMAT.into(),
            version: persist::VERSION,
            step: counters.step,
            updates: counters.updates,
            transitions: counters.transitions,
            episodes: counters.episodes,
            optimizer_step: self.nets.opt.step,
            learner_rng: RngState::of(&self.rng),
            batch_size: Some(self.batch_size),
            loss_scaler: self.nets.step.precision.scaler.clone(),
            actor,
            fingerprint: self.cfg.fingerprint(&self.data),
            files: Vec::new(),
        };
        let bytes = persist::write_checkpoint(dir, body, |tmp| {
            gm_models::weights::save(&self.nets.online_vm, tmp.join(persist::ONLINE))?;
            gm_models::weights::save(&self.nets.target_vm, tmp.join(persist::TARGET))?;
            persist::save_optimizer(
                &self.nets.opt,
                &self.nets.online_vm,
                &tmp.join(persist::OPTIMIZER),
            )?;
            self.replay.read().save(tmp.join(persist::REPLAY))?;
            Ok(())
        })?;
        tracing::info!(target: "gm_train", path = %dir.display(), step = counters.step, bytes, "checkpoint saved");
        Ok(bytes)
    }

    /// Resumes the run saved in `dir` with `cfg` on `data` (both must be the
    /// ones the checkpoint was written with: the seed, mode, environment,
    /// n-step, reward scale, agent and data are checked). In synchronous
    /// mode the continuation is bit-identical to a run that was never
    /// interrupted. A missing, truncated or corrupted checkpoint is an
    /// [`Error::Checkpoint`].
    pub fn resume(
        cfg: LearnerConfig,
        data: Arc<MarketData>,
        dir: impl AsRef<Path>,
    ) -> Result<Self> {
        cfg.validate()?;
        let dir = dir.as_ref();
        let body = persist::read_checkpoint(dir)?;
        let want = cfg.fingerprint(&data);
        if body.fingerprint != want {
            return Err(persist::corrupt(
                dir,
                format!(
                    "written with a different config or data: checkpoint {:?}, now {want:?}",
                    body.fingerprint
                ),
            ));
        }
        let device = Device::Cpu;
        let mut nets = Nets::new(&cfg, &device)?;
        gm_models::weights::load(&nets.online_vm, dir.join(persist::ONLINE))?;
        gm_models::weights::load(&nets.target_vm, dir.join(persist::TARGET))?;
        persist::load_optimizer(
            &mut nets.opt,
            &nets.online_vm,
            &dir.join(persist::OPTIMIZER),
        )?;
        nets.opt.step = body.optimizer_step;
        match (&mut nets.step.precision.scaler, body.loss_scaler) {
            (Some(s), Some(saved)) => *s = saved,
            (None, None) => {}
            (mine, saved) => {
                return Err(persist::corrupt(
                    dir,
                    format!(
                        "loss scaler state {}, the config's precision {:?} {}",
                        if saved.is_some() { "present" } else { "absent" },
                        cfg.step.precision,
                        if mine.is_some() {
                            "needs one"
                        } else {
                            "has none"
                        },
                    ),
                ))
            }
        }
        let batch_size = body.batch_size.unwrap_or(cfg.batch_size);
        cfg.check_batch_size("batch_size (checkpoint)", batch_size)?;
        let buffer = PrioritizedReplayBuffer::load(dir.join(persist::REPLAY))
            .map_err(|e| persist::corrupt(&dir.join(persist::REPLAY), e.to_string()))?;
        let replay = SharedReplay::new(buffer);
        let rng = body.learner_rng.restore(dir)?;
        let counters = LearnerCounters {
            step: body.step,
            updates: body.updates,
            transitions: body.transitions,
            episodes: body.episodes,
        };
        let sync_state = match (&cfg.actors, &body.actor) {
            (ActorMode::Synchronous, Some(a)) => Some((a, dir)),
            (ActorMode::Synchronous, None) => {
                return Err(persist::corrupt(
                    dir,
                    "a synchronous checkpoint without actor state",
                ))
            }
            _ => None,
        };
        let mode = Self::start_mode(
            &cfg, &data, &replay, &nets, counters, batch_size, sync_state,
        )?;
        tracing::info!(target: "gm_train", path = %dir.display(), step = counters.step, "checkpoint resumed");
        Ok(Self {
            cfg,
            device,
            data,
            nets,
            replay,
            rng,
            counters,
            batch_size,
            window: Window::default(),
            mode,
        })
    }
}

/// Updates priorities, skipping slots that no longer hold a transition
/// (threaded mode: a prefetched batch can outlive an early eviction).
fn update_priorities_lenient(
    replay: &SharedReplay<PrioritizedReplayBuffer>,
    indices: &[usize],
    prio: &[f32],
) -> Result<()> {
    let mut buf = replay.write();
    match buf.update_priorities(indices, prio) {
        Ok(()) => Ok(()),
        Err(gm_buffers::Error::IndexOutOfRange { .. }) => {
            let (i, p): (Vec<usize>, Vec<f32>) = indices
                .iter()
                .zip(prio)
                .filter(|(&i, _)| buf.priority(i) > 0.0)
                .map(|(&i, &p)| (i, p))
                .unzip();
            Ok(buf.update_priorities(&i, &p)?)
        }
        Err(e) => Err(e.into()),
    }
}
