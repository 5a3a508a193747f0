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
//! | `manifest.json` | format (`gm-train-learner`) and version (1), step counters (the transition counter is the ε position), AdamW's step, RNG states (ChaCha8 seed, stream, word position), in synchronous mode the actions of the current episode round (from which the environments and n-step tracks are rebuilt exactly), the live batch size, the f16 loss scaler's state, the rows per micro-batch when an out-of-memory retry shrank them, fingerprints of the config (the step's techniques included) and data, in data-parallel mode `world` and `rank`, and the size and CRC-32 of every other file; its own body is covered by a CRC-32 too |
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
//!
//! # Data parallel
//! [`Learner::new_data_parallel`] and [`Learner::resume_data_parallel`]
//! make the learner one rank of a group of `N` ([`DataParallel`]: a
//! gm-shard [`Communicator`](gm_shard::Communicator) and a [`ZeroConfig`](crate::ZeroConfig));
//! synchronous actors only. Every rank holds the whole online and target
//! networks and its own environments, actor, replay buffer and sampling
//! RNG, seeded with its rank mixed in (rank 0 with the config's seed, so
//! a group of one is the single-process run). The live batch `B` is
//! global (at least `N`): rank `r` samples `b_r = ⌊B/N⌋` rows (one more
//! for `r < B mod N`) from its own buffer, computes the gradient of its
//! local mean loss ([`TrainStep::grads_retrying`], with the step's
//! techniques) and hands it to [`ZeroOptimizer::step`] with weight
//! `b_r / B`, so the ranks apply the gradient of the mean loss over all
//! `B` rows: reduced, skipped on every rank when not finite (the f16 loss
//! scaler then backs off on every rank alike), clipped to the global
//! norm, AdamW on each rank's shards of the optimizer state (ZeRO-1 or
//! ZeRO-2), parameters all-gathered. The target network follows as in a
//! single process; new priorities are the rank's own `|δ|`. In
//! [`UpdateStats`], `loss`, `td_error`, `q_mean` and `batch` are this
//! rank's rows, `grad_norm` and `stepped` the group's.
//!
//! **Collectives.** Construction: one `all_gather` of 5 floats (every
//! rank built its part, with the same config and start step, or all
//! fail), then [`ZeroOptimizer::new`]'s (a plan fingerprint, a broadcast
//! of rank 0's weights). Every step: one `all_gather` of 6 floats after
//! the environment steps (the agreement below), then, when updating, the
//! ZeRO step's (gradient all-reduce or reduce-scatter, a small
//! all-reduce, the parameter all-gather). [`Learner::save_checkpoint`],
//! [`Learner::gather_rank_stats`] and [`Learner::rebalance`] are
//! collective too. Every rank must make the same calls in the same order.
//!
//! **Lock-step agreement.** Each step every rank sends its step counter,
//! whether its buffer holds `learning_starts_transitions`, whether a stop
//! was requested ([`Learner::request_stop`]) and the batch it proposes.
//! The group updates only when every rank is ready, every rank reports
//! [`StepReport::stop`] at the same step when any asked, and the batch is
//! the smallest proposed: [`Learner::set_batch_size`] on one rank (a
//! memory-pressure reaction) applies to all at the same update (growing
//! back takes every rank proposing it). Ranks at different step counts
//! are an error. A rank that leaves or stalls past the communicator's
//! timeout makes the others' next collective fail with [`Error::Shard`]
//! ([`gm_shard::Error::PeerLeft`] / [`gm_shard::Error::Timeout`], later
//! [`gm_shard::Error::Aborted`]) instead of hanging; the group is then
//! broken: restart from the last checkpoint. Only rank 0 emits the
//! `"learner progress"` event (with its own figures); other ranks'
//! records reach rank 0 through [`Learner::gather_rank_stats`].
//!
//! **Checkpoints.** [`ZeroOptimizer::gather_state`] collects the full
//! optimizer state on rank 0, which writes the directory above — the same
//! files and format a single process writes, with `world` and `rank: 0`
//! in the manifest. Once it is renamed into place (a broadcast tells the
//! others), each rank `r > 0` writes its replay, RNG and actor state into
//! `dir/rank-<r>/` with the same crash-safe protocol; a final all-reduce
//! makes every rank return an error when any write failed.
//!
//! | path | written by | holds |
//! |---|---|---|
//! | `dir/` | rank 0 | the table above: weights, target, the full optimizer state, rank 0's replay, RNG and actor |
//! | `dir/rank-<r>/` | rank `r > 0` | `replay.gmr` and a `manifest.json` of the same format (its counters, RNG and actor state, `rank`, `world`) |
//!
//! Replacing a checkpoint removes the old rank directories with it; a
//! crash after rank 0's rename leaves a complete main directory with some
//! rank directories missing, never a mix of two checkpoints.
//!
//! **Resume** with any number of ranks: every rank loads the weights and
//! the target from `dir` and reads only its own shards of the optimizer
//! state from the file, range by range
//! ([`ZeroOptimizer::load_state_from`]; the ranks together read each
//! moment byte once, so no rank holds the unsharded `8Ψ` even while
//! resuming); rank 0 restores `dir`'s replay and
//! actor, rank `r > 0` `dir/rank-<r>` when it holds rank `r`'s state of
//! the same step (whatever world size wrote it). A rank without it (a
//! larger group, a missing or damaged directory) starts with an empty
//! buffer and new episodes, seeded with its rank and the resumed step, and
//! logs a warning; the group updates again once its buffer holds
//! `learning_starts_transitions`. [`Learner::resume`] resumes a
//! data-parallel checkpoint as a single process (rank 0's experience).
//!
//! **Exactness.** Bit-exact: the ranks' weights after every update (the
//! collectives sum in rank order, so the reduced gradient, its norm and
//! the gathered parameters are the same bits everywhere), and a group
//! resumed with the same number of ranks and all rank directories present
//! continues exactly as the uninterrupted run (`tests/learner_dp.rs`). Not
//! bit-exact: a group of one against the single-process learner (the same
//! samples; the ZeRO step sums and scales in another order: within
//! 1e-5); `N` ranks against one process with batch `B` (each rank has its
//! own environments and buffer, and its own ε position: the schedule runs
//! on each rank's transition count); a resume with another world size or a
//! missing rank directory (those ranks start new episodes), or with a
//! different stage or shard size (the same state, another summation
//! order).

pub mod actors;
mod parallel;
mod persist;
pub mod policy;
pub mod replay;

pub use self::parallel::DataParallel;

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
use crate::zero::ZeroOptimizer;
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
    /// Where the networks, the update and synchronous acting run. Default
    /// the CPU; [`gm_core::Device::Cuda`] needs gm-train's feature
    /// `candle-cuda` (otherwise [`Learner::new`] fails with the model
    /// crate's `NoCuda` error). Threaded actors always act on CPU copies of
    /// the weights; data-parallel mode (MPI ranks) is CPU-only. Not part of
    /// a checkpoint: a run saved on one device resumes on another.
    pub device: gm_core::Device,
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
            device: gm_core::Device::Cpu,
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

    /// CRC-32 of everything data-parallel ranks must agree on: the
    /// checkpoint fingerprint and every value that changes an update or
    /// the pace of the lock-step (paths and storage may differ by rank).
    fn group_crc32(&self, data: &MarketData) -> u32 {
        let text = format!(
            "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{}|{}|{}|{}|{}|{}|{}",
            self.fingerprint(data),
            self.optimizer,
            self.step,
            self.target_update,
            self.epsilon,
            self.per,
            self.batch_size,
            self.learning_starts_transitions,
            self.vec_env_steps_per_update,
            self.max_grad_norm,
            self.huber_delta,
            self.replay.capacity,
            self.terminal_at_episode_end,
        );
        crc32fast::hash(text.as_bytes())
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
    /// Whether a stop was requested ([`Learner::request_stop`]) before
    /// this step: the step ran in full, and it is the last one the group
    /// agreed on. In data-parallel mode it is true on every rank at the
    /// same step when any rank asked; the caller saves and ends there.
    pub stop: bool,
}

/// The networks, the optimizer and the configured training step.
struct Nets {
    online_vm: VarMap,
    online: AgentNet,
    target_vm: VarMap,
    target: AgentNet,
    /// The optimizer; in data-parallel mode only its `step` is kept (the
    /// moments are sharded in `zero`).
    opt: AdamW,
    step: TrainStep,
    /// Data-parallel mode: the sharded optimizer and its communicator.
    zero: Option<ZeroOptimizer>,
}

impl std::fmt::Debug for Nets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nets")
            .field("online", &self.online)
            .field("target", &self.target)
            .field("opt_step", &self.opt.step)
            .field("zero", &self.zero)
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
            zero: None,
        })
    }

    /// The networks, optimizer state and loss scaler of the checkpoint in
    /// `dir` (whose manifest is `body`). With `moments` false AdamW's
    /// moments stay unread (the data-parallel resume reads each rank's
    /// share in [`shard`](Self::shard)); its step count is set either way.
    fn load(
        cfg: &LearnerConfig,
        dir: &Path,
        body: &Body,
        device: &Device,
        moments: bool,
    ) -> Result<Self> {
        let mut nets = Nets::new(cfg, device)?;
        gm_models::weights::load(&nets.online_vm, dir.join(persist::ONLINE))?;
        gm_models::weights::load(&nets.target_vm, dir.join(persist::TARGET))?;
        if moments {
            persist::load_optimizer(
                &mut nets.opt,
                &nets.online_vm,
                &dir.join(persist::OPTIMIZER),
            )?;
        }
        nets.opt.step = body.optimizer_step;
        match (&mut nets.step.precision.scaler, &body.loss_scaler) {
            (Some(s), Some(saved)) => *s = saved.clone(),
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
        Ok(nets)
    }

    /// Switches to data-parallel mode: the sharded optimizer takes over
    /// (collective: rank 0's weights are broadcast). Resuming from the
    /// checkpoint `resume_from`, each rank reads only its share of the
    /// optimizer state from the checkpoint's file (never the whole `8Ψ`)
    /// at `self.opt`'s step, and the target network is kept; a new run's
    /// target restarts from the broadcast weights.
    ///
    /// Returns the sharded optimizer (to be put into `self.zero` once the
    /// group has agreed that every rank is built, see
    /// [`Learner::finish_group`]) and the result of this rank's local part
    /// (loading the state, copying the target): only the outer error is
    /// the same on every rank.
    fn shard(
        &mut self,
        cfg: &LearnerConfig,
        dp: DataParallel,
        resume_from: Option<&Path>,
    ) -> Result<(ZeroOptimizer, Result<()>)> {
        let n = self.opt.m.len();
        let step = self.opt.step;
        // Any full state goes: the shards hold it from now on.
        self.opt = AdamW::new(cfg.optimizer, n)?;
        let mut zero = ZeroOptimizer::new(dp.comm, &self.online_vm, cfg.optimizer, dp.zero)?;
        let local = match resume_from {
            Some(dir) => persist::OptimizerFile::open(&dir.join(persist::OPTIMIZER))
                .and_then(|mut file| zero.load_state_from(step, &mut file)),
            None => copy_vars(&self.online_vm, &self.target_vm, None),
        };
        self.opt.step = zero.steps();
        Ok((zero, local))
    }

    /// The TD batch of a sampled replay batch: observations, actions and
    /// Double-DQN targets (`a*` from the online network, its value from the
    /// target network).
    fn td_batch(&self, batch: &Batch, device: &Device) -> Result<(ObsBatch, Vec<u32>, Vec<f64>)> {
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

        Ok((obs, idx, y))
    }

    /// A data-parallel rank that cannot take part in an update with
    /// gradients joins its collectives with none (see
    /// [`ZeroOptimizer::step_failed`]); returns the error to report.
    fn fail_update(&mut self, e: Error) -> Error {
        match &mut self.zero {
            Some(z) => z.step_failed(e),
            None => e,
        }
    }

    /// One Double-DQN update on `batch` through the configured
    /// [`TrainStep`]; returns the statistics and the new priorities `|δ|`
    /// (`None` when an f16 update was skipped and a TD error is not
    /// finite: the sampled transitions keep their priorities). `seed` is
    /// the rank's seed (the config's in a single process; it draws the
    /// dropout masks). In data-parallel mode the gradient of this rank's
    /// mean loss enters the sharded step with `weight` (its rows over the
    /// global batch), which reduces, clips and applies it on all ranks.
    fn update(
        &mut self,
        cfg: &LearnerConfig,
        batch: &Batch,
        update_index: u64,
        device: &Device,
        seed: u64,
        weight: f64,
    ) -> Result<(UpdateStats, Option<Vec<f32>>)> {
        let b = batch.len();
        let td = self.td_batch(batch, device);
        let weights = batch.weights();
        let seed = mix(seed ^ 0xD0_0D, update_index);
        let out = match &mut self.zero {
            None => {
                let (obs, idx, y) = td?;
                let td = TdBatch {
                    obs: &obs,
                    actions: &idx,
                    targets: &y,
                    weights: Some(weights),
                };
                self.step
                    .step(&self.online, &self.online_vm, &mut self.opt, &td, seed)?
            }
            Some(zero) => {
                // Local: an out-of-memory retry on one rank needs no peer.
                // A rank that cannot compute its gradients still joins the
                // step's collectives, so the group fails together.
                let g = td.and_then(|(obs, idx, y)| {
                    let td = TdBatch {
                        obs: &obs,
                        actions: &idx,
                        targets: &y,
                        weights: Some(weights),
                    };
                    self.step
                        .grads_retrying(&self.online, &self.online_vm, &td, seed)
                });
                let g = match g {
                    Ok(g) => g,
                    Err(e) => return Err(zero.step_failed(e)),
                };
                let out = self.step.apply_zero(g, zero, weight)?;
                self.opt.step = zero.steps();
                out
            }
        };
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
    /// The seed of this rank's environments, exploration, sampling and
    /// dropout (`cfg.seed` in a single process and on rank 0).
    rank_seed: u64,
    /// [`Learner::request_stop`] was called and not yet agreed on.
    stop_requested: bool,
}

impl Learner {
    /// A new learner on `data` (validated config, seeded weights, an empty
    /// buffer; threaded mode starts its actor and prefetch threads).
    pub fn new(cfg: LearnerConfig, data: Arc<MarketData>) -> Result<Self> {
        cfg.validate()?;
        let device = gm_models::device::candle_device(cfg.device)?;
        let nets = Nets::new(&cfg, &device)?;
        let seed = cfg.seed;
        Self::fresh(
            cfg,
            data,
            device,
            nets,
            seed,
            seed,
            LearnerCounters::default(),
        )
    }

    /// A learner whose networks are `nets`, with an empty buffer and new
    /// actors and streams from `seed`, at `counters`; `rank_seed` draws
    /// its dropout masks.
    fn fresh(
        cfg: LearnerConfig,
        data: Arc<MarketData>,
        device: Device,
        nets: Nets,
        rank_seed: u64,
        seed: u64,
        counters: LearnerCounters,
    ) -> Result<Self> {
        let buffer =
            PrioritizedReplayBuffer::new(replay_schema()?, cfg.buffer_config(), cfg.per.clone())?;
        let replay = SharedReplay::new(buffer);
        let rng = ChaCha8Rng::seed_from_u64(mix(seed, 1));
        let batch_size = cfg.batch_size;
        Self::assemble(
            cfg, data, device, nets, replay, rng, counters, batch_size, seed, None, rank_seed,
        )
    }

    /// A learner from its parts, with its actors started
    /// ([`start_mode`](Self::start_mode) with `seed` and `sync_state`):
    /// what a new and a restored learner share.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        cfg: LearnerConfig,
        data: Arc<MarketData>,
        device: Device,
        nets: Nets,
        replay: SharedReplay<PrioritizedReplayBuffer>,
        rng: ChaCha8Rng,
        counters: LearnerCounters,
        batch_size: usize,
        seed: u64,
        sync_state: Option<(&ActorState, &Path)>,
        rank_seed: u64,
    ) -> Result<Self> {
        let mode = Self::start_mode(
            &cfg, &data, &replay, &nets, counters, batch_size, seed, sync_state,
        )?;
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
            rank_seed,
            stop_requested: false,
        })
    }

    /// Synchronous mode: the actor restored from `sync_state`, or a new
    /// one from `seed`. Threaded mode: actor threads seeded from the
    /// config's seed and the transition counter.
    #[allow(clippy::too_many_arguments)]
    fn start_mode(
        cfg: &LearnerConfig,
        data: &Arc<MarketData>,
        replay: &SharedReplay<PrioritizedReplayBuffer>,
        nets: &Nets,
        counters: LearnerCounters,
        batch_size: usize,
        seed: u64,
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
                        mix(seed, 2),
                        ChaCha8Rng::seed_from_u64(mix(seed, 3)),
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
    ///
    /// In data-parallel mode this is the global batch and it must be at
    /// least the number of ranks; it is a proposal: the next step's
    /// agreement makes the smallest batch any rank proposes every rank's
    /// batch (so a shrink on one rank applies to all at the same update,
    /// and growing takes every rank asking for it).
    pub fn set_batch_size(&mut self, batch: usize) -> Result<()> {
        self.cfg.check_batch_size("batch_size", batch)?;
        let world = self.world();
        if batch < world {
            return Err(Error::config(
                "batch_size",
                batch,
                format!("at least the number of data-parallel ranks ({world})"),
            ));
        }
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

    /// The configured training step, mutable: e.g. to rehearse the
    /// out-of-memory path with [`TrainStep::inject_oom_above_rows`]. A
    /// micro-batch an out-of-memory retry shrank is saved in checkpoints
    /// and restored on resume.
    pub fn train_step_mut(&mut self) -> &mut TrainStep {
        &mut self.nets.step
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

    /// The optimizer (its state is public). In data-parallel mode its
    /// moments are sharded across the ranks ([`zero`](Self::zero);
    /// [`ZeroOptimizer::gather_state`] collects them): this `AdamW` then
    /// holds no moments, only the step count, which follows the sharded
    /// optimizer's.
    pub fn optimizer(&self) -> &AdamW {
        &self.nets.opt
    }

    /// Bytes of optimizer state this process holds: the whole [`AdamW`]'s
    /// in a single process, this rank's shards in data-parallel mode.
    pub fn optimizer_state_bytes(&self) -> u64 {
        match &self.nets.zero {
            Some(z) => z.state_bytes(),
            None => self.nets.opt.state_bytes() as u64,
        }
    }

    /// This rank in data-parallel mode (0 in a single process).
    pub fn rank(&self) -> usize {
        self.nets.zero.as_ref().map_or(0, |z| z.rank())
    }

    /// The number of data-parallel ranks (1 in a single process).
    pub fn world(&self) -> usize {
        self.nets.zero.as_ref().map_or(1, |z| z.world())
    }

    /// The sharded optimizer in data-parallel mode (its plan, state and
    /// gradient-buffer bytes, time in collectives, communicator).
    pub fn zero(&self) -> Option<&ZeroOptimizer> {
        self.nets.zero.as_ref()
    }

    /// Gathers every rank's `values` (the same length on every rank, e.g.
    /// a memory-statistics record) to rank 0: `Some(per_rank)` there,
    /// indexed by rank, `None` elsewhere. Collective in data-parallel mode
    /// (every rank calls it at the same point of its step sequence); in a
    /// single process `Some(vec![values])`.
    pub fn gather_rank_stats(&self, values: &[u64]) -> Result<Option<Vec<Vec<u64>>>> {
        match &self.nets.zero {
            Some(z) => Ok(z.comm().gather_stats(values)?),
            None => Ok(Some(vec![values.to_vec()])),
        }
    }

    /// Re-plans which rank owns which optimizer shards for new per-rank
    /// byte budgets (a rank that runs hot gets less), moving the state:
    /// [`ZeroOptimizer::rebalance`]. Collective in data-parallel mode (call
    /// it on every rank with the same budgets, e.g. right after a
    /// checkpoint); returns whether the plan changed. In a single process
    /// there is nothing to move: `Ok(false)`.
    pub fn rebalance(&mut self, rank_budgets_bytes: Vec<u64>) -> Result<bool> {
        match &mut self.nets.zero {
            Some(z) => z.rebalance(rank_budgets_bytes),
            None => Ok(false),
        }
    }

    /// Asks to stop: the next [`step`](Self::step) runs in full and
    /// reports [`StepReport::stop`]. In data-parallel mode one rank's
    /// request is enough: every rank's next step reports it, so all stop
    /// (and can checkpoint) at the same step.
    pub fn request_stop(&mut self) {
        self.stop_requested = true;
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
    ///
    /// In data-parallel mode the step is collective (every rank calls it
    /// the same number of times): after the environment steps the ranks
    /// agree on whether to update, whether to stop and the batch (module
    /// docs), and the update is a sharded one. A rank that has left or
    /// does not arrive within the communicator's timeout makes the others'
    /// step fail with [`Error::Shard`].
    pub fn step(&mut self) -> Result<StepReport> {
        let mut ended = Vec::new();
        let mut stop = std::mem::take(&mut self.stop_requested);
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
                let ready = self.replay.len() >= self.cfg.learning_starts_transitions;
                let (ready, rows, weight) = match &self.nets.zero {
                    None => (ready, self.batch_size, 1.0),
                    Some(z) => {
                        let a = parallel::agree(
                            z.comm(),
                            self.counters.step,
                            ready,
                            stop,
                            self.batch_size,
                        )?;
                        stop = a.stop;
                        self.batch_size = a.batch;
                        let rows = parallel::rows(a.batch, z.world(), z.rank());
                        (a.update, rows, rows as f64 / a.batch as f64)
                    }
                };
                let update = if ready {
                    if let Err(e) = self.replay.sample_into(&mut s.batch, rows, &mut self.rng) {
                        return Err(self.nets.fail_update(e.into()));
                    }
                    let (stats, prio) = self.nets.update(
                        &self.cfg,
                        &s.batch,
                        self.counters.updates,
                        &self.device,
                        self.rank_seed,
                        weight,
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
                let (stats, prio) = self.nets.update(
                    &self.cfg,
                    &batch,
                    self.counters.updates,
                    &self.device,
                    self.rank_seed,
                    1.0,
                )?;
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
            stop,
        };
        self.log(&report);
        Ok(report)
    }

    /// Runs `steps` steps, or fewer when a step reports
    /// [`StepReport::stop`] (every rank of a data-parallel group ends at
    /// the same step); returns the last report (`None` for 0 steps).
    pub fn train(&mut self, steps: u64) -> Result<Option<StepReport>> {
        let mut last = None;
        for _ in 0..steps {
            let r = self.step()?;
            let stop = r.stop;
            last = Some(r);
            if stop {
                break;
            }
        }
        Ok(last)
    }

    fn log(&mut self, r: &StepReport) {
        let speaks = self.rank() == 0;
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
        if !speaks {
            // Data-parallel: rank 0 speaks for the group; the others'
            // windows are only reset.
            *w = Window {
                since: Some(Instant::now()),
                ..Window::default()
            };
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
    ///
    /// In data-parallel mode this is collective (every rank calls it with
    /// the same `dir`, on a file system they share): rank 0 writes the
    /// directory with the full optimizer state, then every other rank
    /// writes its own replay, RNG and actor state into `dir/rank-<r>/`;
    /// each rank returns the bytes it wrote, or the same failure as the
    /// others when any rank could not write. The communicator's timeout
    /// must cover rank 0's write.
    pub fn save_checkpoint(&self, dir: impl AsRef<Path>) -> Result<u64> {
        let dir = dir.as_ref();
        let Some(zero) = &self.nets.zero else {
            return self.write_dir(dir, &self.nets.opt, None);
        };
        let (rank, world, comm) = (zero.rank(), zero.world(), zero.comm());
        let full = zero.gather_state()?;
        let mut result = match (rank, &full) {
            (0, Some(full)) => self.write_dir(dir, full, Some((0, world))),
            (0, None) => Err(persist::corrupt(
                dir,
                "rank 0 received no optimizer state to write",
            )),
            _ => Ok(0),
        };
        drop(full);
        let mut written = [f32::from(u8::from(result.is_ok()))];
        comm.broadcast(&mut written, 0)?;
        if written[0] == 0.0 {
            return result.and(Err(persist::corrupt(
                dir,
                "rank 0 could not write the checkpoint",
            )));
        }
        if rank > 0 {
            result = self.write_dir(
                &persist::rank_dir(dir, rank),
                &self.nets.opt,
                Some((rank, world)),
            );
        }
        let mut failed = [f32::from(u8::from(result.is_err()))];
        comm.all_reduce_sum(&mut failed)?;
        if failed[0] > 0.0 {
            return result.and(Err(persist::corrupt(
                dir,
                format!("{} rank(s) could not write their state", failed[0]),
            )));
        }
        result
    }

    /// Writes this learner's checkpoint directory with `opt`'s state: the
    /// whole checkpoint (`dp`: `None` for a single process, `(0, world)`
    /// for a data-parallel rank 0), or a data-parallel rank's own state
    /// (`(rank > 0, world)`: replay, RNG and actor only).
    fn write_dir(&self, dir: &Path, opt: &AdamW, dp: Option<(usize, usize)>) -> Result<u64> {
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
            optimizer_step: opt.step,
            learner_rng: RngState::of(&self.rng),
            batch_size: Some(self.batch_size),
            loss_scaler: self.nets.step.precision.scaler.clone(),
            micro_batch: self
                .nets
                .step
                .cfg
                .micro_batch
                .filter(|_| self.nets.step.cfg.micro_batch != self.cfg.step.micro_batch),
            actor,
            fingerprint: self.cfg.fingerprint(&self.data),
            world: dp.map(|d| d.1),
            rank: dp.map(|d| d.0),
            files: Vec::new(),
        };
        let whole = dp.is_none_or(|d| d.0 == 0);
        let files = if whole {
            persist::MAIN_FILES
        } else {
            persist::RANK_FILES
        };
        let bytes = persist::write_checkpoint(dir, body, files, |tmp| {
            if whole {
                gm_models::weights::save(&self.nets.online_vm, tmp.join(persist::ONLINE))?;
                gm_models::weights::save(&self.nets.target_vm, tmp.join(persist::TARGET))?;
                persist::save_optimizer(opt, &self.nets.online_vm, &tmp.join(persist::OPTIMIZER))?;
            }
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
    ///
    /// A data-parallel checkpoint resumes here too, as a single process:
    /// the directory holds everything one needs (the weights, the full
    /// optimizer state, and rank 0's replay and actor).
    pub fn resume(
        cfg: LearnerConfig,
        data: Arc<MarketData>,
        dir: impl AsRef<Path>,
    ) -> Result<Self> {
        cfg.validate()?;
        let dir = dir.as_ref();
        let body = Self::read_main(&cfg, &data, dir, persist::MAIN_FILES)?;
        let device = gm_models::device::candle_device(cfg.device)?;
        let nets = Nets::load(&cfg, dir, &body, &device, true)?;
        let seed = cfg.seed;
        Self::restore(cfg, data, device, nets, &body, dir, seed)
    }

    /// Reads and checks the manifest of the checkpoint in `dir` against
    /// `cfg` and `data`.
    /// `files` are the data files this process will read (and so
    /// verifies): all of them, or, for data-parallel ranks > 0, the shared
    /// ones ([`persist::SHARED_FILES`]: not rank 0's replay).
    fn read_main(
        cfg: &LearnerConfig,
        data: &MarketData,
        dir: &Path,
        files: &[&str],
    ) -> Result<Body> {
        let body = persist::read_checkpoint(dir, files)?;
        let want = cfg.fingerprint(data);
        if body.fingerprint != want {
            return Err(persist::corrupt(
                dir,
                format!(
                    "written with a different config or data: checkpoint {:?}, now {want:?}",
                    body.fingerprint
                ),
            ));
        }
        Ok(body)
    }

    /// The learner with `nets` and the replay, RNG, counters and actor of
    /// the checkpoint directory `dir` (manifest `body`); `rank_seed` draws
    /// its dropout masks.
    fn restore(
        cfg: LearnerConfig,
        data: Arc<MarketData>,
        device: Device,
        mut nets: Nets,
        body: &Body,
        dir: &Path,
        rank_seed: u64,
    ) -> Result<Self> {
        if let Some(m) = body.micro_batch {
            if m == 0 {
                return Err(persist::corrupt(dir, "micro_batch 0 in the manifest"));
            }
            // An out-of-memory retry on this rank had shrunk it: continue
            // with it (each rank's own manifest says its own).
            nets.step.cfg.micro_batch = Some(m);
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
        let seed = cfg.seed;
        let l = Self::assemble(
            cfg, data, device, nets, replay, rng, counters, batch_size, seed, sync_state, rank_seed,
        )?;
        tracing::info!(target: "gm_train", path = %dir.display(), step = counters.step, "checkpoint resumed");
        Ok(l)
    }

    /// A data-parallel learner: this rank of `dp.comm`'s group, training
    /// together with the others (module docs, "Data parallel"). Collective:
    /// every rank calls it with the same `cfg` (checked) and `data`. Every
    /// rank builds the same initial networks (and rank 0's are broadcast);
    /// its environments, exploration, replay sampling and dropout are
    /// seeded with its rank mixed in (rank 0: as a single process), so
    /// ranks collect different experience. Synchronous actors only, and
    /// the batch must be at least the number of ranks: otherwise an
    /// [`Error::Config`] on every rank.
    pub fn new_data_parallel(
        cfg: LearnerConfig,
        data: Arc<MarketData>,
        dp: DataParallel,
    ) -> Result<Self> {
        let (rank, world) = (dp.comm.rank(), dp.comm.world());
        // `check_data_parallel` (the same verdict on every rank) rejects
        // any other device.
        let device = Device::Cpu;
        let prepared = Self::check_data_parallel(&cfg, world, cfg.batch_size)
            .and_then(|()| Nets::new(&cfg, &device));
        let crc = cfg.group_crc32(&data);
        let mut nets = Self::join_group(&*dp.comm, prepared, crc, 0)?;
        let (zero, local) = nets.shard(&cfg, dp, None)?;
        let seed = parallel::rank_seed(cfg.seed, rank);
        let built = local.and_then(|()| {
            Self::fresh(
                cfg,
                data,
                device,
                nets,
                seed,
                seed,
                LearnerCounters::default(),
            )
        });
        Self::finish_group(zero, built, crc, 0)
    }

    /// Resumes a checkpoint in `dir` as rank `dp.comm.rank()` of a
    /// data-parallel group of any size (collective; every rank passes the
    /// same `cfg`, `data` and `dir`, which the ranks share). Every rank
    /// loads the weights, the target network and the full optimizer state
    /// of `dir` (a single process's checkpoint works too) and keeps its
    /// shards of the latter. Rank 0 restores the replay, RNG and actor of
    /// `dir`, rank `r > 0` those of `dir/rank-<r>` when that holds rank
    /// `r`'s state from the same step of the same run (whatever the world
    /// size was); otherwise (more ranks than wrote the checkpoint, or a
    /// missing or damaged directory) it starts with an empty buffer and
    /// new episodes, seeded with its rank and the resumed step, and logs
    /// a warning. The group then updates again once every rank's buffer
    /// holds `learning_starts_transitions`.
    pub fn resume_data_parallel(
        cfg: LearnerConfig,
        data: Arc<MarketData>,
        dir: impl AsRef<Path>,
        dp: DataParallel,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let (rank, world) = (dp.comm.rank(), dp.comm.world());
        // `check_data_parallel` (the same verdict on every rank) rejects
        // any other device.
        let device = Device::Cpu;
        let prepared = cfg.validate().and_then(|()| {
            // Ranks > 0 never read rank 0's replay: they do not verify it.
            let files = if rank == 0 {
                persist::MAIN_FILES
            } else {
                persist::SHARED_FILES
            };
            let body = Self::read_main(&cfg, &data, dir, files)?;
            let batch = body.batch_size.unwrap_or(cfg.batch_size);
            Self::check_data_parallel(&cfg, world, batch)?;
            let nets = Nets::load(&cfg, dir, &body, &device, false)?;
            Ok((body, nets))
        });
        let step = prepared.as_ref().map_or(0, |(b, _)| b.step);
        let crc = cfg.group_crc32(&data);
        let (body, mut nets) = Self::join_group(&*dp.comm, prepared, crc, step)?;
        let (zero, local) = nets.shard(&cfg, dp, Some(dir))?;
        let built =
            local.and_then(|()| Self::restore_rank(cfg, data, device, nets, &body, dir, rank));
        Self::finish_group(zero, built, crc, step)
    }

    /// The rank-local part of [`resume_data_parallel`](Self::resume_data_parallel):
    /// rank 0 restores `dir` (manifest `body`), rank `r > 0` its
    /// `rank-<r>` directory or, failing that, starts fresh.
    fn restore_rank(
        cfg: LearnerConfig,
        data: Arc<MarketData>,
        device: Device,
        nets: Nets,
        body: &Body,
        dir: &Path,
        rank: usize,
    ) -> Result<Self> {
        let rank_seed = parallel::rank_seed(cfg.seed, rank);
        if rank == 0 {
            return Self::restore(cfg, data, device, nets, body, dir, rank_seed);
        }
        let own = persist::rank_dir(dir, rank);
        let mine = persist::read_checkpoint(&own, persist::RANK_FILES).and_then(|b| {
            let same = b.step == body.step
                && b.updates == body.updates
                && b.rank == Some(rank)
                && b.fingerprint == body.fingerprint;
            if same {
                Ok(b)
            } else {
                Err(persist::corrupt(
                    &own,
                    format!(
                        "holds rank {:?} at step {}, not rank {rank} at step {}",
                        b.rank, b.step, body.step
                    ),
                ))
            }
        });
        match mine {
            Ok(b) => {
                let mut l = Self::restore(cfg, data, device, nets, &b, &own, rank_seed)?;
                // The group's batch is rank 0's (the same in every manifest
                // of one checkpoint).
                l.batch_size = body.batch_size.unwrap_or(l.cfg.batch_size);
                Ok(l)
            }
            Err(e) => {
                tracing::warn!(target: "gm_train", rank, path = %own.display(), error = %e, "no saved state for this rank: it starts with an empty replay buffer and new episodes");
                let counters = LearnerCounters {
                    step: body.step,
                    updates: body.updates,
                    transitions: body.transitions,
                    episodes: body.episodes,
                };
                let seed = parallel::fresh_seed(rank_seed, body.step);
                let mut l = Self::fresh(cfg, data, device, nets, rank_seed, seed, counters)?;
                l.batch_size = body.batch_size.unwrap_or(l.cfg.batch_size);
                Ok(l)
            }
        }
    }

    /// What a data-parallel learner needs of its config: valid,
    /// synchronous actors, a batch of at least one row per rank.
    fn check_data_parallel(cfg: &LearnerConfig, world: usize, batch: usize) -> Result<()> {
        cfg.validate()?;
        if let ActorMode::Threaded { threads } = cfg.actors {
            return Err(Error::config(
                "actors",
                format!("Threaded {{ threads: {threads} }}"),
                "Synchronous in data-parallel mode",
            ));
        }
        if batch < world {
            return Err(Error::config(
                "batch_size",
                batch,
                format!("at least the number of data-parallel ranks ({world})"),
            ));
        }
        if cfg.device != gm_core::Device::Cpu {
            return Err(Error::config(
                "device",
                cfg.device,
                "cpu in data-parallel mode (MPI ranks run on the CPU)",
            ));
        }
        Ok(())
    }

    /// The last collective of building a data-parallel learner: every rank
    /// reports whether its rank-local construction (`built`: replay,
    /// actors, restored state) succeeded, so a failure on one rank fails
    /// every rank here, at once, instead of leaving the others waiting in
    /// the first step's collective until the timeout. `zero` (taken out of
    /// the nets while they were built) carries the communicator and goes
    /// back into the learner.
    fn finish_group(
        zero: ZeroOptimizer,
        built: Result<Self>,
        config_crc32: u32,
        step: u64,
    ) -> Result<Self> {
        let mut learner = Self::join_group(zero.comm(), built, config_crc32, step)?;
        learner.nets.zero = Some(zero);
        Ok(learner)
    }

    /// The collective check before the ranks build their sharded
    /// optimizer: `prepared` is this rank's result; every rank fails when
    /// one did or when their configs or start steps differ.
    fn join_group<T>(
        comm: &dyn gm_shard::Communicator,
        prepared: Result<T>,
        config_crc32: u32,
        step: u64,
    ) -> Result<T> {
        let (mine, value) = match prepared {
            Ok(v) => (Ok(()), Some(v)),
            Err(e) => (Err(e), None),
        };
        parallel::check_group(comm, mine, config_crc32, step)?;
        value.ok_or_else(|| Error::Stopped("data-parallel group check".into()))
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
