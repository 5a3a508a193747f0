//! `grandmodel train`: train the GrandModel agent with gm-train's learner
//! inside the memory limit, under a running [`MemoryOptimizationSystem`],
//! and write the run's report.
//!
//! # A run
//! 1. Data: the synthetic market (training market seed `100 + run.seed`,
//!    held-out market seed 4242, `run.synthetic_bars` bars each), or a CSV
//!    file of bars (`run.data`), split in time: the first 80 % trains, the
//!    last 20 % is held out.
//! 2. The system starts (monitor samples → `monitor.jsonl`, Prometheus at
//!    `run.metrics_addr`), the training step is planned from measured
//!    peaks ([`pipeline`](crate::pipeline)), and the learner is built (or
//!    resumed): replay capacity from `min(memory.buffer_limit_bytes,
//!    limit / 4)` over the schema's bytes per transition, LZ4 compression
//!    of cold chunks from 80 % of it. The plan is what the learner's
//!    update runs ([`StepPlan`], gm-train's `LearnerConfig::step`): the
//!    batch is `run.batch_size`, capped by the plan's effective batch
//!    (micro-batch × accumulation steps); it is split into micro-batches
//!    of the plan's micro-batch when it is larger (gradient accumulation);
//!    the plan's checkpoint segments (`training.gradient_checkpointing`)
//!    and precision (`training.mixed_precision`: a bf16 working copy) are
//!    used as planned. A resumed run keeps the step it started with
//!    (`run_state.json`).
//! 3. Steps, each measured (its allocator peak is the `activations`
//!    gauge); every `run.log_every_steps` a record in `metrics.jsonl`, a
//!    monitor sample (alerts and reactions at once) and a progress event.
//!    When a critical alert has halved the system's recommended batch
//!    below the learner's, the learner's live batch is set to it before
//!    the next step ([`follow_batch_shrink`]; the report lists every
//!    change). A stop request (Ctrl-C) writes a checkpoint and returns.
//! 4. The end: a checkpoint (`--resume` continues from it), the held-out
//!    evaluation (agent vs buy-and-hold, random, and on synthetic data the
//!    regime oracle), and `report.json`, `report.md`, `memory.svg`.
//!
//! # Data parallel ([`run_parallel`], `run.ranks > 1`)
//! Every rank of the group (a process of an `mpirun` job, or a
//! [`gm_shard::ThreadGroup`] thread in tests) runs the same sequence, in
//! lock-step:
//! 1. Rank 0's clock names a new output directory (broadcast). Every rank
//!    loads the same data and starts its own memory system (its budget is
//!    `memory.limit_bytes` per process); only rank 0's writes
//!    `monitor.jsonl` and serves Prometheus. Every rank's success is
//!    checked before going on ([`parallel::group_ok`]): a rank that fails
//!    makes every rank stop with its exit code.
//! 2. Rank 0 alone measures the step plan and reads or writes
//!    `run_state.json`, and broadcasts the run state (batch, replay
//!    capacity, micro-batch, checkpoint segments, precision): timings
//!    must not make ranks disagree. The batch is the global batch; each
//!    rank samples its share from its own replay buffer.
//! 3. gm-train's data-parallel learner (`Learner::new_data_parallel`, or
//!    `resume_data_parallel` from a checkpoint written by any number of
//!    ranks): ZeRO stage `shard.stage`, shards of at most
//!    `shard.max_shard_bytes`, every collective bounded by
//!    `shard.timeout_secs`.
//! 4. Every `run.log_every_steps` steps (a step count, never a timer),
//!    every rank's RSS, peak RSS, heap, optimizer-state bytes, replay
//!    bytes, time in collectives and time in steps is gathered to rank 0
//!    ([`RankStats`]), which adds them to its `metrics.jsonl` record as
//!    `"ranks"`. At each periodic checkpoint (`run.checkpoint_every_steps`)
//!    the ranks all-gather their RSS; a rank more than
//!    `shard.rebalance_hot_fraction` above the median gets a smaller
//!    optimizer-state budget and shards move off it
//!    ([`parallel::rebalance_budgets`]); the next `metrics.jsonl` record
//!    carries it as `"rebalance"` and the report lists it.
//! 5. A stop request on any rank (SIGINT, SIGTERM, SIGUSR1) makes the
//!    learner's next step the group's last: every rank stops at the same
//!    step and writes its part of the collective checkpoint.
//! 6. After the final checkpoint the per-rank figures are gathered once
//!    more; rank 0 alone evaluates and writes `report.json` (`summary.parallel`),
//!    `report.md` (a per-rank table next to `gm_shard::zero_memory`'s
//!    formula) and `memory.svg`. The other ranks write nothing but their
//!    part of the checkpoint.
//!
//! # Files in the output directory
//! | file | holds |
//! |---|---|
//! | `config.toml` | the resolved configuration (a resumed run reads it); without `run.ranks`, a launch setting |
//! | `run_state.json` | the batch the learner started with, the replay capacity and the update's step (kept on resume; the live batch is in the checkpoint) |
//! | `checkpoint/` | gm-train's crash-safe learner checkpoint (data parallel: the full one, by rank 0, and `checkpoint/rank-<r>/` with rank `r`'s replay and actors) |
//! | `metrics.jsonl` | one JSON object per logged step (appended on resume; data parallel: with `"ranks"`, and `"rebalance"` after shards moved) |
//! | `monitor.jsonl` | gm-monitor's samples (rank 0's) |
//! | `report.json`, `report.md` | the run's report |
//! | `memory.svg` | memory over time (rank 0's) |

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use gm_buffers::{BufferConfig, StorageMode};
use gm_core::ByteSize;
use gm_market::{
    evaluate, BuyAndHold, GeneratorConfig, MarketData, PipelineConfig, PolicyReturns, RandomPolicy,
    RegimeOracle, TradingEnv, OBS_DIM,
};
use gm_shard::{AdamPrecision, Communicator, ZeroMemory};
use gm_train::{
    AgentNet, CheckpointConfig, DataParallel, Learner, LearnerConfig, ObsBatch, Precision,
    StepConfig, StepReport, ZeroConfig,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::chart::{memory_chart, MemoryPoint};
use crate::config::{ModelSize, Resolved, SystemConfig};
use crate::error::{Error, Result};
use crate::parallel::{self, RankStats, Rebalance};
use crate::pipeline::{AgentModel, PipelinePlan};
use crate::proc::ProcMemory;
use crate::system::{MemoryOptimizationSystem, SystemOptions};

/// Seed of the held-out synthetic market.
pub const HELD_OUT_MARKET_SEED: u64 = 4242;
/// First episode seed of the held-out evaluation.
pub const EVAL_EPISODE_SEED: u64 = 1_000_000;
/// Seed of the random baseline.
pub const RANDOM_POLICY_SEED: u64 = 7;
/// Observations in the planning sample.
const SAMPLE_ROWS: usize = 64;

/// One progress event.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Steps done (total, a resumed run's earlier steps included).
    pub step: u64,
    /// Steps asked for.
    pub total: u64,
    /// Mean loss over the window (`None` before the first update).
    pub loss: Option<f64>,
    /// Mean return of the episodes that ended in the latest window in
    /// which any ended (`None` before the first episode ends).
    pub episode_return: Option<f64>,
    /// Resident memory now.
    pub rss_bytes: u64,
    /// The limit.
    pub limit_bytes: u64,
    /// Steps per second over the window.
    pub steps_per_sec: f64,
    /// Estimated time left.
    pub eta: Duration,
}

/// Where progress goes (a progress bar, log lines, nothing).
pub trait ProgressSink {
    /// The run starts at `done` of `total` steps.
    fn start(&mut self, done: u64, total: u64);
    /// A progress event.
    fn update(&mut self, p: &Progress);
    /// A one-line message (setup, checkpoint, evaluation).
    fn message(&mut self, msg: &str);
    /// The training loop ended.
    fn finish(&mut self);
}

/// A sink that drops everything.
#[derive(Debug, Default)]
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn start(&mut self, _: u64, _: u64) {}
    fn update(&mut self, _: &Progress) {}
    fn message(&mut self, _: &str) {}
    fn finish(&mut self) {}
}

/// Options of a run that are not configuration values.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue the run whose output directory this is.
    pub resume: Option<PathBuf>,
}

/// A policy's held-out returns.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyScore {
    /// The policy.
    pub policy: String,
    /// Mean episode return (fraction of notional).
    pub mean_return: f64,
    /// Standard error of the mean.
    pub stderr: f64,
    /// Episodes.
    pub episodes: usize,
}

impl PolicyScore {
    fn of(policy: &str, r: &PolicyReturns) -> Self {
        let n = r.episode_returns.len();
        Self {
            policy: policy.into(),
            mean_return: r.mean(),
            stderr: r.std() / (n.max(1) as f64).sqrt(),
            episodes: n,
        }
    }
}

/// What a finished (or interrupted) run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// The output directory.
    pub out_dir: PathBuf,
    /// Stopped by a stop request before `run.steps`.
    pub interrupted: bool,
    /// Steps done in all.
    pub steps: u64,
    /// Steps done by this invocation.
    pub steps_this_run: u64,
    /// Gradient updates.
    pub updates: u64,
    /// Environment transitions.
    pub transitions: u64,
    /// Episodes finished.
    pub episodes: u64,
    /// Seconds of the training loop in this invocation.
    pub train_secs: f64,
    /// Seconds of the whole invocation.
    pub total_secs: f64,
    /// Mean loss of the last window.
    pub final_loss: Option<f64>,
    /// The batch the learner started with.
    pub batch: usize,
    /// The learner's batch at the end (smaller than `batch` after a
    /// critical alert shrank it).
    pub final_batch: usize,
    /// Every change of the live batch in this invocation.
    pub batch_changes: Vec<BatchChange>,
    /// What the learner's update ran.
    pub step: StepPlan,
    /// Replay capacity, transitions.
    pub replay_capacity: usize,
    /// Peak RSS (kernel VmHWM).
    pub peak_rss_bytes: Option<u64>,
    /// The limit.
    pub limit_bytes: u64,
    /// Held-out scores (agent first); empty when interrupted.
    pub evaluation: Vec<PolicyScore>,
    /// CRC-32 of the online network's weights (names sorted, f32 LE).
    pub weights_crc32: u32,
    /// Data-parallel runs: the ranks, the ZeRO formula and every rank's
    /// measured figures (on rank 0; absent in a single process).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel: Option<ParallelSummary>,
}

/// What the ranks of a data-parallel run held and did.
#[derive(Debug, Clone, Serialize)]
pub struct ParallelSummary {
    /// Ranks.
    pub ranks: usize,
    /// ZeRO stage (1 or 2).
    pub stage: u8,
    /// Ψ, the online network's parameters.
    pub params: u64,
    /// Largest shard the plan allowed, bytes of optimizer state: the
    /// configured `shard.max_shard_bytes`, or less for a model too small to
    /// split over the ranks at that size (`gm_train::zero::shard_bytes`).
    pub max_shard_bytes: u64,
    /// Shards in the plan.
    pub shards: usize,
    /// Optimizer-state bytes per rank under the final plan.
    pub plan_state_bytes: Vec<u64>,
    /// Per-rank model-state bytes by the ZeRO formula for f32 AdamW
    /// (`gm_shard::zero_memory(stage, F32, Ψ, ranks)`).
    pub zero_formula: ZeroMemory,
    /// The same for one rank (what a single process holds).
    pub zero_formula_one_rank: ZeroMemory,
    /// Every rank's figures after the final checkpoint.
    pub per_rank: Vec<RankStats>,
    /// Every rebalance at a checkpoint of this invocation.
    pub rebalances: Vec<Rebalance>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunState {
    batch: usize,
    replay_capacity: usize,
    /// Absent in run states written before the step was configurable
    /// (their runs trained plain f32 on whole batches).
    #[serde(default)]
    step: Option<StepPlan>,
}

/// The techniques the learner's update runs (gm-train's `StepConfig`),
/// from the [`PipelinePlan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepPlan {
    /// Rows per micro-batch for gradient accumulation (`None`: the whole
    /// batch at once).
    pub micro_batch: Option<usize>,
    /// Checkpoint segments per embedder (1: plain backprop).
    pub checkpoint_segments: usize,
    /// The forward/backward dtype (`F32` or `Bf16`; masters stay f32).
    pub precision: Precision,
}

impl Default for StepPlan {
    /// Plain f32 backprop of the whole batch.
    fn default() -> Self {
        Self {
            micro_batch: None,
            checkpoint_segments: 1,
            precision: Precision::F32,
        }
    }
}

impl StepPlan {
    /// The learner's batch and step for `plan`: the batch is
    /// `batch_size` capped by the plan's effective batch; micro-batches
    /// of the plan's micro-batch when the batch is larger.
    pub fn from_plan(plan: &PipelinePlan, batch_size: usize) -> (usize, Self) {
        let batch = batch_size.min(plan.effective_batch).max(1);
        let step = Self {
            micro_batch: (plan.micro_batch < batch).then_some(plan.micro_batch.max(1)),
            checkpoint_segments: plan.checkpoint_segments.max(1),
            precision: plan.working_precision(),
        };
        (batch, step)
    }

    /// The learner's step configuration (dropout on; the Huber threshold
    /// and clip are the learner's).
    pub fn step_config(&self) -> StepConfig {
        StepConfig {
            checkpoint: (self.checkpoint_segments > 1).then_some(CheckpointConfig {
                segments: self.checkpoint_segments,
                ..CheckpointConfig::default()
            }),
            precision: self.precision,
            micro_batch: self.micro_batch,
            ..StepConfig::default()
        }
    }

    /// `"batch 64 (micro-batches of 16, 4 accumulated), 4 checkpoint
    /// segments, bf16"`.
    pub fn describe(&self, batch: usize) -> String {
        let micro = match self.micro_batch {
            Some(m) if m < batch => {
                format!(" (micro-batches of {m}, {} accumulated)", batch.div_ceil(m))
            }
            _ => " (one micro-batch, no accumulation)".into(),
        };
        let ckpt = if self.checkpoint_segments > 1 {
            format!("{} checkpoint segments", self.checkpoint_segments)
        } else {
            "no checkpointing".into()
        };
        let prec = match self.precision {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16 working copy",
            Precision::F16 => "f16 working copy with loss scaling",
        };
        format!("batch {batch}{micro}, {ckpt}, {prec}")
    }
}

/// A change of the learner's live batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BatchChange {
    /// The step after which the change took effect.
    pub step: u64,
    /// The batch before.
    pub from: usize,
    /// The batch after.
    pub to: usize,
}

/// Applies a batch shrink: when the system's recommended batch (halved by
/// critical alerts) is below the learner's live batch, sets the learner's
/// batch to it (from the next update on) and returns the change.
pub fn follow_batch_shrink(
    system: &MemoryOptimizationSystem,
    learner: &mut Learner,
) -> Result<Option<BatchChange>> {
    let (recommended, _) = system.batch();
    let from = learner.batch_size();
    if recommended == 0 {
        return Ok(None);
    }
    // Data parallel: at least one row per rank.
    let recommended = recommended.max(learner.world());
    if recommended >= from {
        return Ok(None);
    }
    learner.set_batch_size(recommended)?;
    Ok(Some(BatchChange {
        step: learner.counters().step,
        from,
        to: recommended,
    }))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// Seconds since the Unix epoch.
fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `secs` after the epoch, UTC, as `YYYYmmdd-HHMMSS`.
fn stamp(secs: u64) -> String {
    let secs = secs as i64;
    chrono::DateTime::from_timestamp(secs, 0).map_or_else(
        || secs.to_string(),
        |t| t.format("%Y%m%d-%H%M%S").to_string(),
    )
}

/// The current UTC time as `YYYYmmdd-HHMMSS` (output directory names).
pub fn now_stamp() -> String {
    stamp(now_secs())
}

/// The output directory of a run (see [`run`]).
pub fn out_dir(cfg: &SystemConfig, opts: &TrainOptions) -> PathBuf {
    out_dir_at(cfg, opts, now_secs())
}

/// The output directory of a run started at `secs` after the epoch (a
/// data-parallel run uses rank 0's clock).
fn out_dir_at(cfg: &SystemConfig, opts: &TrainOptions, secs: u64) -> PathBuf {
    match (&cfg.run.out, &opts.resume) {
        (Some(o), _) => o.clone(),
        (None, Some(r)) => r.clone(),
        (None, None) => PathBuf::from("runs").join(stamp(secs)),
    }
}

fn market_error(path: &Path, e: gm_market::Error) -> Error {
    match e {
        gm_market::Error::Io { source, .. } => Error::DataMissing {
            path: path.to_owned(),
            reason: source.to_string(),
        },
        other => Error::DataInvalid {
            path: path.to_owned(),
            reason: other.to_string(),
        },
    }
}

/// Training and held-out data, and whether regimes are known.
fn load_data(cfg: &SystemConfig) -> Result<(Arc<MarketData>, Arc<MarketData>, bool)> {
    match &cfg.run.data {
        None => {
            let market = |seed| {
                MarketData::synthetic(
                    GeneratorConfig {
                        seed,
                        ..GeneratorConfig::default()
                    },
                    cfg.run.synthetic_bars,
                    PipelineConfig::default(),
                )
            };
            Ok((
                Arc::new(market(100 + cfg.run.seed)?),
                Arc::new(market(HELD_OUT_MARKET_SEED)?),
                true,
            ))
        }
        Some(path) => {
            if !path.is_file() {
                return Err(Error::DataMissing {
                    path: path.clone(),
                    reason: if path.exists() {
                        "not a regular file".into()
                    } else {
                        "no such file".into()
                    },
                });
            }
            let loaded = gm_market::load_csv(path).map_err(|e| market_error(path, e))?;
            let n = loaded.bars.len();
            let split = n * 4 / 5;
            let pcfg = PipelineConfig {
                tactical_interval: loaded.interval,
                ..PipelineConfig::default()
            };
            let mut bars = loaded.bars;
            let held = bars.split_off(split);
            let train = MarketData::from_bars(bars, None, pcfg.clone()).map_err(|e| {
                Error::DataInvalid {
                    path: path.clone(),
                    reason: format!("the training part (first 80 %, {split} bars): {e}"),
                }
            })?;
            let test = MarketData::from_bars(held, None, pcfg).map_err(|e| Error::DataInvalid {
                path: path.clone(),
                reason: format!("the held-out part (last 20 %, {} bars): {e}", n - split),
            })?;
            Ok((Arc::new(train), Arc::new(test), false))
        }
    }
}

fn learner_config(cfg: &SystemConfig) -> LearnerConfig {
    let mut l = match cfg.run.model {
        ModelSize::Small => LearnerConfig::small(),
        ModelSize::Full => LearnerConfig::default(),
    };
    l.seed = cfg.run.seed;
    l.learning_starts_transitions = cfg.run.learning_starts_transitions;
    l.log_every_steps = u64::MAX;
    l
}

/// Observations from the start of `data` for planning.
fn sample_input(data: &MarketData) -> Result<ObsBatch> {
    let start = data.first_ready();
    let rows = SAMPLE_ROWS.min(data.len() - start);
    let mut flat = vec![0f32; rows * OBS_DIM];
    for (i, chunk) in flat.chunks_exact_mut(OBS_DIM).enumerate() {
        data.observation(start + i, chunk)?;
    }
    Ok(ObsBatch::from_flat(&flat, rows, &Device::Cpu)?)
}

fn varmap_bytes(vm: &VarMap) -> u64 {
    vm.all_vars()
        .iter()
        .map(|v| (v.elem_count() * v.dtype().size_in_bytes()) as u64)
        .sum()
}

/// CRC-32 of a varmap's f32 weights, names sorted.
pub fn weights_crc32(vm: &VarMap) -> Result<u32> {
    let data = vm.data().lock().map_err(|_| Error::Io {
        path: PathBuf::from("(varmap)"),
        source: std::io::Error::other("poisoned lock"),
    })?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut h = crc32fast::Hasher::new();
    for n in names {
        h.update(n.as_bytes());
        let v = data[n]
            .as_tensor()
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        for x in v {
            h.update(&x.to_le_bytes());
        }
    }
    Ok(h.finalize())
}

#[derive(Default)]
struct Window {
    loss: f64,
    updates: u64,
    returns: Vec<f64>,
    steps: u64,
    since: Option<Instant>,
}

/// Runs `grandmodel train`; see the module docs. `stop` is polled before
/// every step (Ctrl-C sets it).
pub fn run(
    resolved: &Resolved,
    opts: &TrainOptions,
    stop: &AtomicBool,
    progress: &mut dyn ProgressSink,
) -> Result<TrainSummary> {
    run_inner(resolved, opts, None, stop, progress).map_err(|f| *f.error)
}

/// A data-parallel rank's failure, and whether the other ranks know of it.
#[derive(Debug)]
pub struct RankFailure {
    /// What failed (on this rank, or [`Error::PeerFailed`]).
    pub error: Box<Error>,
    /// Every rank failed at the same point (a checked phase, the learner's
    /// construction): the ranks can end together (finalize MPI and exit
    /// with the code). Otherwise the others may be waiting in a collective
    /// and the job should be aborted.
    pub peers_know: bool,
}

/// Runs one rank of `grandmodel train` with data-parallel (ZeRO) training
/// on `comm`'s group (the module docs, "Data parallel"): every rank of
/// the group calls it with the same configuration and options. Rank 0
/// returns the full summary (and has written the outputs); the others a
/// summary of their training without evaluation.
pub fn run_parallel(
    resolved: &Resolved,
    opts: &TrainOptions,
    comm: Box<dyn Communicator + Send>,
    stop: &AtomicBool,
    progress: &mut dyn ProgressSink,
) -> Result<TrainSummary, RankFailure> {
    run_inner(resolved, opts, Some(comm), stop, progress)
}

fn shared(error: Error) -> RankFailure {
    RankFailure {
        error: Box::new(error),
        peers_know: true,
    }
}

fn local(error: impl Into<Error>) -> RankFailure {
    RankFailure {
        error: Box::new(error.into()),
        peers_know: false,
    }
}

/// gm-train's checkpoint errors as gm-system's (exit code 6).
fn resume_error(e: gm_train::Error) -> Error {
    match e {
        gm_train::Error::Checkpoint { path, reason } => Error::Checkpoint { path, reason },
        other => other.into(),
    }
}

/// The ZeRO settings of `cfg.shard`.
fn zero_config(cfg: &SystemConfig) -> ZeroConfig {
    ZeroConfig {
        stage: cfg.shard.stage,
        max_shard_bytes: cfg.shard.max_shard_bytes,
        ..ZeroConfig::default()
    }
}

/// Rank 0's run state to every rank, or rank 0's failure to plan (its
/// own error on rank 0, [`Error::PeerFailed`] elsewhere).
fn share_run_state(comm: &dyn Communicator, mine: Result<RunState>) -> Result<RunState> {
    let enc = |s: &RunState| {
        let step = s.step.unwrap_or_default();
        [
            0,
            s.batch as u64,
            s.replay_capacity as u64,
            step.micro_batch.map_or(0, |m| m as u64),
            step.checkpoint_segments as u64,
            match step.precision {
                Precision::F32 => 0,
                Precision::Bf16 => 1,
                Precision::F16 => 2,
            },
        ]
    };
    let mut v = match &mine {
        Ok(s) => enc(s),
        Err(e) => [e.exit_code().max(1) as u64, 0, 0, 0, 0, 0],
    };
    let sent = parallel::broadcast_u64s(comm, &mut v, 0);
    if comm.rank() == 0 {
        let s = mine?;
        sent?;
        return Ok(s);
    }
    sent?;
    if v[0] != 0 {
        return Err(Error::PeerFailed {
            rank: 0,
            code: v[0] as i32,
            during: "while planning the training step",
        });
    }
    Ok(RunState {
        batch: v[1] as usize,
        replay_capacity: v[2] as usize,
        step: Some(StepPlan {
            micro_batch: (v[3] > 0).then_some(v[3] as usize),
            checkpoint_segments: v[4] as usize,
            precision: match v[5] {
                1 => Precision::Bf16,
                2 => Precision::F16,
                _ => Precision::F32,
            },
        }),
    })
}

/// This rank's statistics record.
fn rank_stats(
    learner: &Learner,
    comm_since: Duration,
    step_time: Duration,
    replay_bytes: u64,
) -> RankStats {
    let proc = ProcMemory::read();
    let comm = learner
        .zero()
        .map_or(Duration::ZERO, |z| z.comm_time().saturating_sub(comm_since));
    RankStats::new(
        learner.rank(),
        proc.rss_bytes.unwrap_or(0),
        proc.peak_rss_bytes.unwrap_or(0),
        gm_leak::stats().current_bytes,
        learner.optimizer_state_bytes(),
        replay_bytes,
        comm,
        step_time,
    )
}

/// Every rank's statistics on rank 0 (collective).
fn gather_stats(learner: &Learner, mine: &RankStats) -> Result<Option<Vec<RankStats>>> {
    let all = learner.gather_rank_stats(&mine.to_values())?;
    Ok(all.map(|all| {
        all.iter()
            .enumerate()
            .filter_map(|(r, v)| RankStats::from_values(r, v))
            .collect()
    }))
}

/// At a checkpoint: all-gathers every rank's RSS and, when a rank runs
/// hot ([`parallel::rebalance_budgets`]), re-plans the optimizer shards
/// with a smaller budget for it (collective; every rank decides the same
/// from the same figures).
fn rebalance_at_checkpoint(
    learner: &mut Learner,
    hot_fraction: f64,
    step: u64,
) -> Result<Option<Rebalance>> {
    let Some(z) = learner.zero() else {
        return Ok(None);
    };
    let rss = ProcMemory::read().rss_bytes.unwrap_or(0);
    let rss: Vec<u64> = parallel::all_gather_u64s(z.comm(), &[rss])?
        .into_iter()
        .map(|v| v[0])
        .collect();
    let before = z.plan().rank_bytes().to_vec();
    let Some(d) = parallel::rebalance_budgets(&rss, &before, hot_fraction) else {
        return Ok(None);
    };
    let moved = learner.rebalance(d.budgets_bytes.clone())?;
    let after = learner
        .zero()
        .map_or_else(Vec::new, |z| z.plan().rank_bytes().to_vec());
    Ok(Some(Rebalance {
        step,
        rss_bytes: rss,
        median_rss_bytes: d.median_rss_bytes,
        hot: d.hot,
        budgets_bytes: d
            .budgets_bytes
            .iter()
            .map(|&b| (b != u64::MAX).then_some(b))
            .collect(),
        state_bytes_before: before,
        state_bytes_after: after,
        moved,
    }))
}

fn run_inner(
    resolved: &Resolved,
    opts: &TrainOptions,
    dp: Option<Box<dyn Communicator + Send>>,
    stop: &AtomicBool,
    progress: &mut dyn ProgressSink,
) -> Result<TrainSummary, RankFailure> {
    let t_all = Instant::now();
    let cfg = &resolved.config;
    let (rank, world) = dp.as_ref().map_or((0, 1), |c| (c.rank(), c.world()));
    let lead = rank == 0;
    let parallel_mode = dp.is_some();
    let out = match &dp {
        None => out_dir(cfg, opts),
        Some(c) => {
            // Rank 0's clock names a new output directory.
            let mut secs = [now_secs()];
            parallel::broadcast_u64s(c.as_ref(), &mut secs, 0).map_err(shared)?;
            out_dir_at(cfg, opts, secs[0])
        }
    };
    let ckpt = out.join("checkpoint");

    // Data and the memory system, on every rank (checked together).
    let setup = (|| -> Result<_> {
        if let Some(r) = &opts.resume {
            if !r.join("checkpoint").join("manifest.json").is_file() {
                return Err(Error::Checkpoint {
                    path: r.clone(),
                    reason: "no checkpoint/manifest.json in this directory (pass the output directory of an earlier `grandmodel train`)".into(),
                });
            }
        }
        if lead {
            fs::create_dir_all(&out).map_err(io_err(&out))?;
            fs::write(out.join("config.toml"), resolved.to_toml()).map_err(io_err(&out))?;
        }

        progress.message("loading market data");
        let (train_data, test_data, synthetic) = load_data(cfg)?;
        progress.message(&format!(
            "data: {} training bars, {} held-out bars ({})",
            train_data.len(),
            test_data.len(),
            cfg.run.data.as_ref().map_or_else(
                || "synthetic market".to_string(),
                |p| p.display().to_string()
            )
        ));

        // Rank 0 alone writes monitor.jsonl and serves Prometheus.
        let system = MemoryOptimizationSystem::start_with(
            cfg.memory.clone(),
            cfg.training.clone(),
            SystemOptions {
                monitor_jsonl: lead.then(|| out.join("monitor.jsonl")),
                prometheus_port: cfg.run.metrics_addr.filter(|_| lead).map(|a| a.port()),
            },
        )?;
        if let Some(a) = system.prometheus_addr() {
            progress.message(&format!("metrics at http://{a}/metrics"));
        }
        let limit = cfg.memory.limit_bytes;
        let rss0 = ProcMemory::read().rss_bytes.unwrap_or(0);
        if rss0 >= cfg.memory.budget().warning_bytes() {
            return Err(Error::MemoryTooSmall {
                limit: ByteSize(limit).to_string(),
                reason: format!(
                    "the process holds {} with the data loaded, above the warning line {} before training starts",
                    ByteSize(rss0),
                    ByteSize(cfg.memory.budget().warning_bytes())
                ),
            });
        }
        Ok((train_data, test_data, synthetic, system))
    })();
    let (train_data, test_data, synthetic, system) = parallel::group_ok(
        dp.as_deref().map(|c| c as &dyn Communicator),
        setup,
        "while loading the data or starting its memory system",
    )
    .map_err(shared)?;
    let limit = cfg.memory.limit_bytes;

    // The step plan and run state: measured on rank 0 only (timings must
    // not make ranks disagree) and broadcast.
    let mut lcfg = learner_config(cfg);
    // Replay sized to its share of the limit.
    let replay_budget = cfg.memory.buffer_limit_bytes.min(limit / 4);
    let state_path = out.join("run_state.json");
    let mut plan = None;
    let planned = if lead {
        (|| -> Result<RunState> {
            // Plan the step on a scratch copy of the network.
            let p = {
                let vm = VarMap::new();
                AgentNet::new(
                    &lcfg.agent,
                    VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
                )?;
                gm_models::init::init_seeded(&vm, cfg.run.seed).map_err(gm_train::Error::from)?;
                let sample = sample_input(&train_data)?;
                progress.message("measuring the training step (batch, checkpointing, precision)");
                system.optimize_training_pipeline(
                    AgentModel {
                        config: &lcfg.agent,
                        varmap: &vm,
                    },
                    &sample,
                )?
            };
            let schema = gm_train::learner::replay::replay_schema()?;
            let per_transition = schema.transition_bytes().max(1) as u64;
            let mut state = if opts.resume.is_some() && state_path.is_file() {
                let text = fs::read_to_string(&state_path).map_err(io_err(&state_path))?;
                let mut s =
                    serde_json::from_str::<RunState>(&text).map_err(|e| Error::Checkpoint {
                        path: state_path.clone(),
                        reason: format!("run_state.json: {e}"),
                    })?;
                s.step.get_or_insert_with(StepPlan::default);
                s
            } else {
                let (batch, step) = StepPlan::from_plan(&p, cfg.run.batch_size);
                RunState {
                    batch,
                    replay_capacity: ((replay_budget / per_transition) as usize).min(100_000),
                    step: Some(step),
                }
            };
            state.step.get_or_insert_with(StepPlan::default);
            let min_capacity = 2 * lcfg.learning_starts_transitions;
            if state.replay_capacity < min_capacity {
                return Err(Error::MemoryTooSmall {
                    limit: ByteSize(limit).to_string(),
                    reason: format!(
                        "the replay share {} holds {} transitions of {} each; the learner needs at least {min_capacity}",
                        ByteSize(replay_budget),
                        state.replay_capacity,
                        ByteSize(per_transition)
                    ),
                });
            }
            plan = Some(p);
            Ok(state)
        })()
    } else {
        // Replaced by rank 0's.
        Ok(RunState {
            batch: 0,
            replay_capacity: 0,
            step: None,
        })
    };
    let state = match &dp {
        None => planned.map_err(shared)?,
        Some(c) => share_run_state(c.as_ref(), planned).map_err(shared)?,
    };
    let step_plan = state.step.unwrap_or_default();
    lcfg.batch_size = state.batch;
    lcfg.step = step_plan.step_config();
    lcfg.replay = BufferConfig {
        capacity: state.replay_capacity,
        storage: StorageMode::Memory,
        byte_budget: cfg.memory.buffer_compression.then_some(replay_budget),
        compress_at: 0.8,
        ..BufferConfig::default()
    };
    if lead {
        fs::write(
            &state_path,
            serde_json::to_string_pretty(&state).unwrap_or_default(),
        )
        .map_err(io_err(&state_path))
        .map_err(local)?;
    }

    let learner = match (&opts.resume, dp) {
        (Some(r), None) => {
            progress.message(&format!("resuming from {}", r.join("checkpoint").display()));
            Learner::resume(lcfg.clone(), train_data.clone(), r.join("checkpoint"))
                .map_err(resume_error)
        }
        (None, None) => Learner::new(lcfg.clone(), train_data.clone()).map_err(Error::from),
        (Some(r), Some(comm)) => {
            progress.message(&format!(
                "resuming from {} on {world} ranks",
                r.join("checkpoint").display()
            ));
            let dp = DataParallel {
                comm,
                zero: zero_config(cfg),
            };
            Learner::resume_data_parallel(
                lcfg.clone(),
                train_data.clone(),
                r.join("checkpoint"),
                dp,
            )
            .map_err(resume_error)
        }
        (None, Some(comm)) => {
            let dp = DataParallel {
                comm,
                zero: zero_config(cfg),
            };
            Learner::new_data_parallel(lcfg.clone(), train_data.clone(), dp).map_err(Error::from)
        }
    };
    // Built together or failed together (gm-train checks the group).
    let mut learner = learner.map_err(shared)?;
    let body = (|| -> Result<TrainSummary> {
        // The live batch (a resumed run continues with its checkpoint's).
        system.set_batch(learner.batch_size());
        progress.message(&format!(
            "update step: {}",
            step_plan.describe(learner.batch_size())
        ));
        if let Some(z) = learner.zero() {
            progress.message(&format!(
                "data parallel: {world} ranks, ZeRO stage {}, {} parameters; rank 0 holds {} of optimizer state (shard plan per rank: {})",
                cfg.shard.stage.number(),
                z.params(),
                b(learner.optimizer_state_bytes()),
                z.plan()
                    .rank_bytes()
                    .iter()
                    .map(|&x| b(x))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let mut batch_changes = Vec::new();
        system.register_replay("replay", learner.replay())?;
        let params = system.gauge("params")?;
        let optim = system.gauge("optimizer_state")?;
        let activations = system.gauge("activations")?;
        params.set(varmap_bytes(learner.online_varmap()) + varmap_bytes(learner.target_varmap()));

        // Rank 0 alone writes metrics.jsonl.
        let metrics_path = out.join("metrics.jsonl");
        let mut metrics = if lead {
            Some(
                fs::OpenOptions::new()
                    .create(true)
                    .append(opts.resume.is_some())
                    .write(true)
                    .truncate(opts.resume.is_none())
                    .open(&metrics_path)
                    .map_err(io_err(&metrics_path))?,
            )
        } else {
            None
        };

        let total = cfg.run.steps;
        let start_step = learner.counters().step;
        progress.start(start_step, total);
        let t_train = Instant::now();
        let mut w = Window::default();
        let mut last_loss = None;
        // Episodes end only every `episode_bars` steps: the progress line keeps
        // showing the last window's mean return in between (metrics.jsonl keeps
        // the per-window value, null when no episode ended).
        let mut last_return = None;
        let mut interrupted = false;
        // Data parallel: time in collectives and in steps, shard moves.
        let comm_since = learner.zero().map_or(Duration::ZERO, |z| z.comm_time());
        let mut step_time = Duration::ZERO;
        let mut rebalances: Vec<Rebalance> = Vec::new();
        let mut pending_rebalance = None;
        let mut stop_said = false;
        while learner.counters().step < total {
            if stop.load(Ordering::Relaxed) {
                if !parallel_mode {
                    interrupted = true;
                    break;
                }
                // The group agrees in the next step to make it the last.
                learner.request_stop();
                if !stop_said {
                    progress.message("stop requested: the ranks stop together after the next step and write a checkpoint");
                    stop_said = true;
                }
            }
            // This thread's peak: the sync learner steps and updates here, and
            // the system's background threads do not disturb the figure.
            if let Some(c) = follow_batch_shrink(&system, &mut learner)? {
                progress.message(&format!(
                    "critical memory alert: batch {} -> {} from step {}",
                    c.from,
                    c.to,
                    c.step + 1
                ));
                batch_changes.push(c);
            }
            let batch_before = learner.batch_size();
            let t_step = Instant::now();
            let (r, m) = gm_leak::measure_thread(|| learner.step());
            step_time += t_step.elapsed();
            let r: StepReport = r?;
            if learner.batch_size() != batch_before {
                // Data parallel: the group runs the smallest batch any rank
                // asks for (another rank's critical alert).
                let c = BatchChange {
                    step: r.counters.step - 1,
                    from: batch_before,
                    to: learner.batch_size(),
                };
                progress.message(&format!(
                    "another rank's critical memory alert: batch {} -> {} from step {}",
                    c.from,
                    c.to,
                    c.step + 1
                ));
                batch_changes.push(c);
            }
            activations.set(m.peak_net_bytes);
            w.since.get_or_insert_with(Instant::now);
            w.steps += 1;
            if let Some(u) = r.update {
                w.loss += u.loss;
                w.updates += 1;
            }
            w.returns.extend_from_slice(&r.episode_returns);
            let step = r.counters.step;
            if r.stop {
                // Every rank sees the same agreed stop at the same step.
                interrupted = true;
                break;
            }
            if step.is_multiple_of(cfg.run.log_every_steps) || step == total {
                optim.set(learner.optimizer_state_bytes());
                system.sample_now();
                let secs = w
                    .since
                    .map_or(1e-9, |s| s.elapsed().as_secs_f64())
                    .max(1e-9);
                let sps = w.steps as f64 / secs;
                let loss = (w.updates > 0).then(|| w.loss / w.updates as f64);
                if loss.is_some() {
                    last_loss = loss;
                }
                let ret = (!w.returns.is_empty())
                    .then(|| w.returns.iter().sum::<f64>() / w.returns.len() as f64);
                if ret.is_some() {
                    last_return = ret;
                }
                let proc = ProcMemory::read();
                let rss = proc.rss_bytes.unwrap_or(0);
                let stats = learner.replay().stats();
                // Data parallel: every rank's figures to rank 0 (collective,
                // at a step count, so the ranks stay in lock-step).
                let ranks = if parallel_mode {
                    let mine = rank_stats(
                        &learner,
                        comm_since,
                        step_time,
                        stats.memory.resident_bytes(),
                    );
                    gather_stats(&learner, &mine)?
                } else {
                    None
                };
                let mut rec = json!({
                    "step": step,
                    "updates": r.counters.updates,
                    "transitions": r.counters.transitions,
                    "episodes": r.counters.episodes,
                    "epsilon": r.epsilon,
                    "loss": loss,
                    "episode_return": ret,
                    "episodes_in_window": w.returns.len(),
                    "steps_per_sec": sps,
                    "elapsed_secs": t_train.elapsed().as_secs_f64(),
                    "unix_ms": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
                    "rss_bytes": rss,
                    "peak_rss_bytes": proc.peak_rss_bytes,
                    "heap_bytes": gm_leak::stats().current_bytes,
                    "replay_bytes": stats.memory.resident_bytes(),
                    "replay_len": stats.len,
                    "replay_compressed_chunks": stats.compressed_chunks,
                    "activations_bytes": m.peak_net_bytes,
                    "recommended_batch": system.batch().0,
                    "batch": learner.batch_size(),
                    "limit_bytes": limit,
                });
                if let Some(ranks) = &ranks {
                    rec["ranks"] = json!(ranks);
                }
                if let Some(rb) = pending_rebalance.take() {
                    rec["rebalance"] = json!(rb);
                }
                if let Some(f) = metrics.as_mut() {
                    writeln!(f, "{rec}").map_err(io_err(&metrics_path))?;
                }
                let eta = Duration::from_secs_f64((total - step) as f64 / sps.max(1e-9));
                progress.update(&Progress {
                    step,
                    total,
                    loss,
                    episode_return: ret.or(last_return),
                    rss_bytes: rss,
                    limit_bytes: limit,
                    steps_per_sec: sps,
                    eta,
                });
                if let Some(p) = system.monitor().latest().and_then(|s| s.measured_bytes) {
                    if p >= limit {
                        let freed = system.emergency_memory_cleanup();
                        let after = ProcMemory::read().rss_bytes.unwrap_or(0);
                        if after >= limit {
                            return Err(Error::MemoryExceeded {
                                limit: ByteSize(limit).to_string(),
                                reason: format!(
                                    "RSS {} at step {step}; the emergency cleanup freed {} and left {}",
                                    ByteSize(p),
                                    ByteSize(freed.rss_anon_freed_bytes.unwrap_or(0).max(0) as u64),
                                    ByteSize(after)
                                ),
                            });
                        }
                    }
                }
                w = Window {
                    since: Some(Instant::now()),
                    ..Window::default()
                };
            }
            if cfg.run.checkpoint_every_steps > 0
                && step.is_multiple_of(cfg.run.checkpoint_every_steps)
                && step < total
            {
                learner.save_checkpoint(&ckpt)?;
                if let Some(rb) =
                    rebalance_at_checkpoint(&mut learner, cfg.shard.rebalance_hot_fraction, step)?
                {
                    progress.message(&format!(
                        "rank(s) {:?} ran hot at step {step} (RSS {} vs median {}): optimizer state per rank {} -> {}{}",
                        rb.hot,
                        rb.hot
                            .iter()
                            .map(|&h| b(rb.rss_bytes[h]))
                            .collect::<Vec<_>>()
                            .join(", "),
                        b(rb.median_rss_bytes),
                        fmt_bytes_list(&rb.state_bytes_before),
                        fmt_bytes_list(&rb.state_bytes_after),
                        if rb.moved { "" } else { " (no shard could move)" }
                    ));
                    pending_rebalance = Some(rb.clone());
                    rebalances.push(rb);
                }
            }
        }
        progress.finish();
        let train_secs = t_train.elapsed().as_secs_f64();
        if let Some(f) = metrics.as_mut() {
            f.flush().map_err(io_err(&metrics_path))?;
        }
        let c = learner.counters();
        progress.message(&format!("writing checkpoint at step {}", c.step));
        learner.save_checkpoint(&ckpt)?;
        // Data parallel: the final per-rank figures (collective).
        let parallel = match learner.zero() {
            None => None,
            Some(z) => {
                let mine = rank_stats(
                    &learner,
                    comm_since,
                    step_time,
                    learner.replay().stats().memory.resident_bytes(),
                );
                let per_rank = gather_stats(&learner, &mine)?;
                let params = z.params() as u64;
                let formula =
                    gm_shard::zero_memory(cfg.shard.stage, AdamPrecision::F32, params, world)?;
                let one_rank =
                    gm_shard::zero_memory(cfg.shard.stage, AdamPrecision::F32, params, 1)?;
                per_rank.map(|per_rank| ParallelSummary {
                    ranks: world,
                    stage: cfg.shard.stage.number(),
                    params,
                    max_shard_bytes: z.plan().max_shard_bytes(),
                    shards: z.plan().shards().len(),
                    plan_state_bytes: z.plan().rank_bytes().to_vec(),
                    zero_formula: formula,
                    zero_formula_one_rank: one_rank,
                    per_rank,
                    rebalances: rebalances.clone(),
                })
            }
        };
        let weights_crc32 = weights_crc32(learner.online_varmap())?;
        let peak = ProcMemory::read().peak_rss_bytes;
        let mut summary = TrainSummary {
            out_dir: out.clone(),
            interrupted,
            steps: c.step,
            steps_this_run: c.step - start_step,
            updates: c.updates,
            transitions: c.transitions,
            episodes: c.episodes,
            train_secs,
            total_secs: 0.0,
            final_loss: last_loss,
            batch: state.batch,
            final_batch: learner.batch_size(),
            batch_changes,
            step: step_plan,
            replay_capacity: state.replay_capacity,
            peak_rss_bytes: peak,
            limit_bytes: limit,
            evaluation: Vec::new(),
            weights_crc32,
            parallel,
        };
        // Rank 0 alone evaluates and writes the reports.
        let Some(plan) = plan.as_ref().filter(|_| !interrupted) else {
            summary.total_secs = t_all.elapsed().as_secs_f64();
            return Ok(summary);
        };

        progress.message(&format!(
            "evaluating on {} held-out episodes",
            cfg.run.eval_episodes
        ));
        let eps = cfg.run.eval_episodes;
        let agent = learner.evaluate(test_data.clone(), eps, EVAL_EPISODE_SEED)?;
        let mut env = TradingEnv::new(test_data.clone(), lcfg.env)?;
        let bh = evaluate(&mut env, &mut BuyAndHold, eps, EVAL_EPISODE_SEED)?;
        let rnd = evaluate(
            &mut env,
            &mut RandomPolicy::new(RANDOM_POLICY_SEED),
            eps,
            EVAL_EPISODE_SEED,
        )?;
        summary.evaluation = vec![
            PolicyScore::of("agent (greedy)", &agent),
            PolicyScore::of("buy and hold", &bh),
            PolicyScore::of("random", &rnd),
        ];
        if synthetic {
            let oracle = evaluate(&mut env, &mut RegimeOracle, eps, EVAL_EPISODE_SEED)?;
            summary.evaluation.push(PolicyScore::of(
                "regime oracle (knows the planted regime)",
                &oracle,
            ));
        }
        optim.set(learner.optimizer_state_bytes());
        system.sample_now();
        let sys_report = system.report();
        summary.peak_rss_bytes = ProcMemory::read().peak_rss_bytes;
        summary.total_secs = t_all.elapsed().as_secs_f64();
        write_reports(&out, cfg, &summary, plan, &sys_report)?;
        Ok(summary)
    })();
    body.map_err(local)
}

/// The memory points of `metrics.jsonl` (all runs appended to it).
fn read_points(path: &Path) -> Vec<MemoryPoint> {
    let Ok(text) = fs::read_to_string(path) else {
        return Vec::new();
    };
    let mut pts = Vec::new();
    let mut offset = 0.0;
    let mut last = 0.0;
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let secs = v["elapsed_secs"].as_f64().unwrap_or(0.0);
        if secs < last {
            // A resumed run restarts its clock: continue the time axis.
            offset += last;
        }
        last = secs;
        pts.push(MemoryPoint {
            secs: offset + secs,
            rss_bytes: v["rss_bytes"].as_u64().unwrap_or(0),
            heap_bytes: v["heap_bytes"].as_u64().unwrap_or(0),
            replay_bytes: v["replay_bytes"].as_u64().unwrap_or(0),
        });
    }
    pts
}

fn b(x: u64) -> String {
    ByteSize(x).to_string()
}

fn fmt_bytes_list(v: &[u64]) -> String {
    format!(
        "[{}]",
        v.iter().map(|&x| b(x)).collect::<Vec<_>>().join(", ")
    )
}

/// The summary table printed at the end of a run (Markdown).
pub fn summary_table(s: &TrainSummary) -> String {
    let mut t = String::from("| | |\n|---|---|\n");
    let row = |t: &mut String, k: &str, v: String| t.push_str(&format!("| {k} | {v} |\n"));
    row(
        &mut t,
        "steps",
        format!("{} ({} this run)", s.steps, s.steps_this_run),
    );
    row(
        &mut t,
        "updates / transitions / episodes",
        format!("{} / {} / {}", s.updates, s.transitions, s.episodes),
    );
    row(
        &mut t,
        "batch / replay capacity",
        format!("{} / {}", s.batch, s.replay_capacity),
    );
    row(&mut t, "update step (what ran)", s.step.describe(s.batch));
    if !s.batch_changes.is_empty() || s.final_batch != s.batch {
        let changes: Vec<String> = s
            .batch_changes
            .iter()
            .map(|c| format!("{} -> {} after step {}", c.from, c.to, c.step))
            .collect();
        row(
            &mut t,
            "batch shrinks (critical alerts)",
            format!("{}; final batch {}", changes.join(", "), s.final_batch),
        );
    }
    row(
        &mut t,
        "final loss",
        s.final_loss
            .map_or_else(|| "-".into(), |l| format!("{l:.5}")),
    );
    row(
        &mut t,
        "training time",
        format!(
            "{:.1} s ({:.1} steps/s)",
            s.train_secs,
            s.steps_this_run as f64 / s.train_secs.max(1e-9)
        ),
    );
    row(&mut t, "total time", format!("{:.1} s", s.total_secs));
    row(
        &mut t,
        "peak RSS / limit",
        format!(
            "{} / {}{}",
            s.peak_rss_bytes.map_or_else(|| "-".into(), b),
            b(s.limit_bytes),
            s.peak_rss_bytes.map_or_else(String::new, |p| format!(
                " ({:.1}%)",
                100.0 * p as f64 / s.limit_bytes as f64
            ))
        ),
    );
    if !s.evaluation.is_empty() {
        t.push_str("\n| held-out policy | mean episode return | ± stderr | episodes |\n|---|---:|---:|---:|\n");
        for e in &s.evaluation {
            t.push_str(&format!(
                "| {} | {:+.5} | {:.5} | {} |\n",
                e.policy, e.mean_return, e.stderr, e.episodes
            ));
        }
    }
    t
}

/// The report's data-parallel section: the ZeRO formula, the per-rank
/// table and the rebalances (Markdown).
pub fn parallel_section(p: &ParallelSummary, cfg: &SystemConfig) -> String {
    let f = &p.zero_formula;
    let one = &p.zero_formula_one_rank;
    let grads = if p.stage == 1 { "4Ψ" } else { "4Ψ/N" };
    let mut md = format!(
        "\n## Data parallel: {} ranks, ZeRO stage {}\n\n\
         Ψ = {} parameters, f32 AdamW, {} shard(s) of at most {} of optimizer state. \
         Model state per rank by the ZeRO formula (`gm_shard::zero_memory`): \
         parameters 4Ψ = {}, gradients {grads} = {}, optimizer state 8Ψ/N = {} \
         (one rank: 8Ψ = {}), total {} (one rank: {}).\n\n\
         | rank | peak RSS | RSS | heap | optimizer state (measured) | 8Ψ/N | replay | collectives / step time |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n",
        p.ranks,
        p.stage,
        p.params,
        p.shards,
        b(p.max_shard_bytes),
        b(f.param_bytes),
        b(f.grad_bytes),
        b(f.optimizer_bytes),
        b(one.optimizer_bytes),
        b(f.total_bytes()),
        b(one.total_bytes()),
    );
    for r in &p.per_rank {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} s / {:.2} s ({:.1} %) |\n",
            r.rank,
            b(r.peak_rss_bytes),
            b(r.rss_bytes),
            b(r.heap_bytes),
            b(r.optimizer_state_bytes),
            b(f.optimizer_bytes),
            b(r.replay_bytes),
            r.comm_secs,
            r.step_secs,
            100.0 * r.comm_fraction
        ));
    }
    md.push_str(
        "\nOptimizer state is the rank's AdamW moments (`m`, `v`) of the shards it owns; \
         time in collectives is the ZeRO optimizer's (gradient reduce, norm, parameter gather), \
         out of the time in learner steps (which includes waiting for the other ranks).\n",
    );
    if p.rebalances.is_empty() {
        md.push_str(&format!(
            "\nNo rank ran hot at a checkpoint (RSS more than {:.0} % above the ranks' median, \
             `shard.rebalance_hot_fraction`): the shard plan never changed.\n",
            100.0 * cfg.shard.rebalance_hot_fraction
        ));
    } else {
        md.push_str("\n| step | hot rank(s) | RSS per rank | median | new budgets | optimizer state per rank before → after | shards moved |\n|---:|---|---|---:|---|---|---|\n");
        for rb in &p.rebalances {
            md.push_str(&format!(
                "| {} | {:?} | {} | {} | {} | {} → {} | {} |\n",
                rb.step,
                rb.hot,
                fmt_bytes_list(&rb.rss_bytes),
                b(rb.median_rss_bytes),
                rb.budgets_bytes
                    .iter()
                    .map(|x| x.map_or_else(|| "∞".to_string(), b))
                    .collect::<Vec<_>>()
                    .join(", "),
                fmt_bytes_list(&rb.state_bytes_before),
                fmt_bytes_list(&rb.state_bytes_after),
                if rb.moved { "yes" } else { "no" }
            ));
        }
    }
    md
}

fn write_reports(
    out: &Path,
    cfg: &SystemConfig,
    s: &TrainSummary,
    plan: &PipelinePlan,
    sys: &crate::report::SystemReport,
) -> Result<()> {
    let metrics_path = out.join("metrics.jsonl");
    let points = read_points(&metrics_path);
    let budget = cfg.memory.budget();
    memory_chart(
        &out.join("memory.svg"),
        "grandmodel train: memory over time",
        &points,
        &[
            ("limit", budget.limit_bytes),
            ("critical", budget.critical_bytes()),
            ("warning", budget.warning_bytes()),
        ],
    )?;
    let json = json!({
        "format": "grandmodel-train-report",
        "version": 1,
        "summary": s,
        "config": {
            "model": cfg.run.model.to_string(),
            "seed": cfg.run.seed,
            "steps": cfg.run.steps,
            "data": cfg.run.data.as_ref().map(|p| p.display().to_string()),
            "limit_bytes": cfg.memory.limit_bytes,
            "buffer_limit_bytes": cfg.memory.buffer_limit_bytes,
        },
        "pipeline_plan": plan,
        "memory": sys.to_json(),
        "files": ["report.md", "report.json", "metrics.jsonl", "monitor.jsonl", "memory.svg", "checkpoint/", "config.toml", "run_state.json"],
    });
    let mut json = json;
    if let Some(p) = &s.parallel {
        json["config"]["ranks"] = json!(p.ranks);
        json["config"]["shard"] = json!({
            "stage": cfg.shard.stage.number(),
            "timeout_secs": cfg.shard.timeout.as_secs_f64(),
            "max_shard_bytes": cfg.shard.max_shard_bytes,
            "rebalance_hot_fraction": cfg.shard.rebalance_hot_fraction,
        });
        if let Some(files) = json["files"].as_array_mut() {
            files.push(json!("checkpoint/rank-<r>/"));
        }
    }
    let p = out.join("report.json");
    fs::write(&p, serde_json::to_string_pretty(&json).unwrap_or_default()).map_err(io_err(&p))?;

    let mut md = String::from("# grandmodel train report\n\n");
    md.push_str(&format!(
        "Model `{}`, seed {}, {} steps on {}.\n\n",
        cfg.run.model,
        cfg.run.seed,
        s.steps,
        cfg.run.data.as_ref().map_or_else(
            || "the synthetic market".to_string(),
            |p| format!("`{}`", p.display())
        )
    ));
    md.push_str(&summary_table(s));
    if let Some(p) = &s.parallel {
        md.push_str(&parallel_section(p, cfg));
    }
    md.push_str("\n## Training step plan (measured)\n\n");
    md.push_str("| | |\n|---|---|\n");
    md.push_str(&format!(
        "| step budget (limit − RSS at planning) | {} (usable {}) |\n",
        b(plan.step_budget_bytes),
        b(plan.usable_bytes)
    ));
    md.push_str(&format!(
        "| before: plain f32 backprop at batch {} | peak {} |\n",
        cfg.training.target_effective_batch,
        b(plan.peak_before_bytes)
    ));
    md.push_str(&format!(
        "| after: micro-batch {} × {} accumulation steps, {} checkpoint segments, {} | peak {} |\n",
        plan.micro_batch,
        plan.accumulation_steps,
        plan.checkpoint_segments,
        plan.precision,
        b(plan.peak_after_bytes)
    ));
    md.push_str(&format!(
        "| largest plain f32 batch that fits (≤ target) | {} |\n",
        plan.plain_batch
    ));
    for n in &plan.notes {
        md.push_str(&format!("\nNote: {n}\n"));
    }
    md.push_str("\n| batch | segments | precision | peak | ms |\n|---:|---:|---|---:|---:|\n");
    for m in &plan.measurements {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} |\n",
            m.batch,
            m.segments,
            m.precision,
            b(m.peak_bytes),
            m.millis
        ));
    }
    md.push('\n');
    md.push_str(&sys.to_markdown());
    md.push_str("\n![memory over time](memory.svg)\n");
    let p = out.join("report.md");
    fs::write(&p, md).map_err(io_err(&p))?;
    Ok(())
}
