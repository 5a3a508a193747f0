//! The system's configuration: [`MemoryOptimizationConfig`],
//! [`TrainingMemoryConfig`], [`RunConfig`] and [`ShardConfig`] in one
//! [`SystemConfig`], resolved from defaults, a TOML file, `GM_*`
//! environment variables and command-line flags, in that order (a later
//! layer wins), and validated.
//!
//! # Keys
//!
//! Every key has the same name in the TOML file (`[section]` + key), the
//! environment (`GM_` + section + `_` + key, upper case) and the generic
//! `--set key=value` flag. The table is [`KEYS`]; `grandmodel config show`
//! prints every key with its resolved value and where it came from.
//!
//! | key | default | allowed |
//! |---|---|---|
//! | `memory.limit_bytes` | 8 GiB | > 0; an integer or a size such as `"8 GiB"`, `"512MB"` |
//! | `memory.warning_fraction` | 0.75 | (0, 1] |
//! | `memory.critical_fraction` | 0.90 | [warning_fraction, 1] |
//! | `memory.reclaim_interval_secs` | 60 | 0.001 ..= 86400 |
//! | `memory.buffer_limit_bytes` | 1024 MiB | > 0 |
//! | `memory.buffer_compression` | true | bool |
//! | `memory.monitor_interval_secs` | 5 | 0.001 ..= 3600 |
//! | `memory.profile_allocation_sites` | true | bool |
//! | `memory.leak_check_interval_secs` | 1 | 0.001 ..= 3600 |
//! | `training.batch_auto_scale` | true | bool |
//! | `training.min_batch` | 8 | a positive multiple of 8 |
//! | `training.max_batch` | 512 | a multiple of 8, ≥ min_batch |
//! | `training.batch_memory_threshold` | 0.85 | (0, 1] |
//! | `training.target_effective_batch` | 128 | ≥ 1 |
//! | `training.mixed_precision` | true | bool (bf16 working copy in the plan and the learner's update; slower than f32 on CPU, see [`TrainingMemoryConfig::mixed_precision`]) |
//! | `training.gradient_checkpointing` | true | bool |
//! | `training.checkpoint_segments` | 4 | 1 ..= 64 |
//! | `run.steps` | 1500 | 1 ..= 10^9 |
//! | `run.batch_size` | 64 | 1 ..= 4096 (the learner's batch; capped by the plan's effective batch and split into the plan's micro-batches when larger) |
//! | `run.seed` | 0 | any u64 |
//! | `run.model` | `"small"` | `"small"` or `"full"` |
//! | `run.synthetic_bars` | 20000 | 2000 ..= 10^7 |
//! | `run.eval_episodes` | 200 | 1 ..= 100000 |
//! | `run.learning_starts_transitions` | 2000 | ≥ 1 (transitions stored before the first update) |
//! | `run.log_every_steps` | 50 | ≥ 1 |
//! | `run.checkpoint_every_steps` | 0 | 0 (only at the end and on Ctrl-C) or ≥ 1 |
//! | `run.data` | none | a CSV file of bars (empty = the synthetic market) |
//! | `run.out` | none | the output directory (empty = `runs/<timestamp>`) |
//! | `run.metrics_addr` | none | `127.0.0.1:PORT` (empty = no endpoint) |
//! | `run.ranks` | 1 | 1 ..= 1024 data-parallel ranks (flag `--ranks`; > 1 needs the `mpi` build and `mpirun -n N`; not saved in a run's `config.toml`) |
//! | `shard.stage` | 2 | 1 (optimizer state sharded) or 2 (also the reduced gradient) |
//! | `shard.timeout_secs` | 120 | 1 ..= 86400 (every collective's bound; must cover rank 0's step planning and checkpoint writes) |
//! | `shard.max_shard_bytes` | 100 MB | ≥ 8 (largest shard, in bytes of optimizer state: 8 per parameter) |
//! | `shard.rebalance_hot_fraction` | 0.25 | 0 ..= 10 (a rank whose RSS is this fraction above the ranks' median at a checkpoint sheds optimizer shards; 0: any rank above the median) |
//!
//! The file is strict: a key the table does not have, or a value of the
//! wrong type, is an error naming the key. Environment variables are
//! strict within the configuration's prefixes (`GM_MEMORY_`,
//! `GM_TRAINING_`, `GM_RUN_`, `GM_SHARD_`): a misspelt one is an error, not
//! ignored.
//! `GM_CONFIG` names a config file when `--config` is not given.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gm_core::ByteSize;

use crate::error::{Error, Result};

/// The memory side of the system, with the seed system's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryOptimizationConfig {
    /// The process's memory limit (RSS). Default 8 GiB.
    pub limit_bytes: u64,
    /// Fraction of the limit at which warnings start. Default 0.75.
    pub warning_fraction: f64,
    /// Fraction of the limit at which the critical reactions start.
    /// Default 0.90.
    pub critical_fraction: f64,
    /// Time between periodic reclaim passes. Default 60 s.
    pub reclaim_interval: Duration,
    /// Most bytes the replay buffer may hold; its LZ4 compression of cold
    /// data starts at 80 % of it. The run also caps it at a quarter of
    /// `limit_bytes`. Default 1024 MiB.
    pub buffer_limit_bytes: u64,
    /// Compress cold replay data (at 80 % of the buffer limit, and on
    /// warnings). Default true.
    pub buffer_compression: bool,
    /// Time between two monitor samples. Default 5 s.
    pub monitor_interval: Duration,
    /// Sample allocation sites (gm-leak) so the leak report names where
    /// memory grows. Default true.
    pub profile_allocation_sites: bool,
    /// Time between two leak-detector snapshots of the heap. Default 1 s.
    pub leak_check_interval: Duration,
}

impl Default for MemoryOptimizationConfig {
    fn default() -> Self {
        Self {
            limit_bytes: 8 << 30,
            warning_fraction: 0.75,
            critical_fraction: 0.90,
            reclaim_interval: Duration::from_secs(60),
            buffer_limit_bytes: 1024 << 20,
            buffer_compression: true,
            monitor_interval: Duration::from_secs(5),
            profile_allocation_sites: true,
            leak_check_interval: Duration::from_secs(1),
        }
    }
}

impl MemoryOptimizationConfig {
    /// The budget the monitor raises alerts against.
    pub fn budget(&self) -> gm_core::MemoryBudget {
        gm_core::MemoryBudget {
            limit_bytes: self.limit_bytes,
            warning_fraction: self.warning_fraction,
            critical_fraction: self.critical_fraction,
        }
    }
}

/// The training side: batch size, accumulation, precision, checkpointing.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingMemoryConfig {
    /// Choose the batch from measured peaks (gm-train's `BatchSizer`).
    /// Default true.
    pub batch_auto_scale: bool,
    /// Smallest batch. Default 8.
    pub min_batch: usize,
    /// Largest batch. Default 512.
    pub max_batch: usize,
    /// Fraction of the memory available to a step that its peak may use.
    /// Default 0.85.
    pub batch_memory_threshold: f64,
    /// Items per optimizer update that gradient accumulation aims for.
    /// Default 128. The learner's batch is `run.batch_size` capped by the
    /// plan's effective batch; it is split into the plan's micro-batches
    /// (accumulated) when it is larger than one.
    pub target_effective_batch: usize,
    /// bf16 working copy over f32 master weights, in the plan and in the
    /// learner's update. Default true. On the CPU bf16 kernels are slower
    /// than f32 (shared/NOTES.md): it buys memory, not speed. Measured on
    /// the default run (`grandmodel train`, small model, batch 64, release
    /// build, 2 cores, otherwise idle): updating steps at 5.0 steps/s with
    /// bf16 and checkpointing, 8.5 with checkpointing alone; the whole
    /// default run (1500 steps, 1250 of them updating) 4.1 minutes
    /// with bf16, 2.5 without — within the 10 minutes the default run is
    /// kept to, so the default stays on. Turn it off for speed when memory
    /// does not bind.
    pub mixed_precision: bool,
    /// Gradient checkpointing (`checkpoint_segments` per embedder) in the
    /// plan and in the learner's update. Default true (on the small model
    /// about 15 % slower updates than plain backprop, measured with a
    /// build running alongside; in f32 the losses were identical).
    pub gradient_checkpointing: bool,
    /// Checkpoint segments per embedder. Default 4.
    pub checkpoint_segments: usize,
}

impl Default for TrainingMemoryConfig {
    fn default() -> Self {
        Self {
            batch_auto_scale: true,
            min_batch: 8,
            max_batch: 512,
            batch_memory_threshold: 0.85,
            target_effective_batch: 128,
            mixed_precision: true,
            gradient_checkpointing: true,
            checkpoint_segments: 4,
        }
    }
}

/// Which agent to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelSize {
    /// gm-train's `AgentConfig::tiny` without dropout (fast on 2 cores).
    Small,
    /// The full GrandModel agent (`AgentConfig::default`).
    Full,
}

impl fmt::Display for ModelSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelSize::Small => "small",
            ModelSize::Full => "full",
        })
    }
}

/// What `grandmodel train` does.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// Learner steps (total, counting the steps of a resumed run).
    /// Default 1500 (the default run then takes minutes on 2 cores).
    pub steps: u64,
    /// The learner's batch (gm-train's default, 64), capped by the memory
    /// plan's effective batch. The learner's update runs the plan
    /// (`training.*`: micro-batches, checkpointing, precision); a critical
    /// memory alert halves the live batch.
    pub batch_size: usize,
    /// Seed of the weights, environments, exploration and sampling.
    /// Default 0.
    pub seed: u64,
    /// The agent. Default small.
    pub model: ModelSize,
    /// Bars of the synthetic training market (and of the held-out one).
    /// Default 20 000.
    pub synthetic_bars: usize,
    /// Held-out evaluation episodes. Default 200.
    pub eval_episodes: usize,
    /// Transitions stored before the first update (gm-train's default,
    /// 2000).
    pub learning_starts_transitions: usize,
    /// Steps between progress lines and metrics records. Default 50.
    pub log_every_steps: u64,
    /// Steps between checkpoints (0: only at the end and on Ctrl-C).
    /// Default 0.
    pub checkpoint_every_steps: u64,
    /// A CSV file of bars instead of the synthetic market.
    pub data: Option<PathBuf>,
    /// The output directory (default `runs/<timestamp>`).
    pub out: Option<PathBuf>,
    /// Serve Prometheus metrics at this loopback address.
    pub metrics_addr: Option<SocketAddr>,
    /// Data-parallel ranks (processes of one `mpirun` job). Default 1:
    /// one process, no MPI. More than one needs the `mpi` build and
    /// `mpirun -n <ranks>`; the `[shard]` section configures them. A
    /// launch setting: a run's saved `config.toml` leaves it out, so a
    /// run can be resumed with another number of ranks.
    pub ranks: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            steps: 1500,
            batch_size: 64,
            seed: 0,
            model: ModelSize::Small,
            synthetic_bars: 20_000,
            eval_episodes: 200,
            learning_starts_transitions: 2000,
            log_every_steps: 50,
            checkpoint_every_steps: 0,
            data: None,
            out: None,
            metrics_addr: None,
            ranks: 1,
        }
    }
}

/// Data-parallel (ZeRO) training across ranks (`run.ranks > 1`): gm-train's
/// `ZeroConfig` and the group's collectives.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardConfig {
    /// What is partitioned across the ranks: stage 1 the AdamW moments,
    /// stage 2 also the reduced gradient. Default stage 2.
    pub stage: gm_shard::ZeroStage,
    /// Bound of every collective: a rank missing for this long breaks the
    /// group (every rank stops with an error). It must cover what rank 0
    /// does while the others wait: planning the step at the start and
    /// writing each checkpoint. Default 120 s.
    pub timeout: Duration,
    /// Largest shard of optimizer state (8 bytes per parameter: AdamW's
    /// `m` and `v` in f32); larger tensors are cut into element ranges.
    /// Default 100 MB (10^8 bytes).
    pub max_shard_bytes: u64,
    /// At each periodic checkpoint, a rank whose RSS exceeds the ranks'
    /// median by more than this fraction is hot: the shard plan is redone
    /// with a smaller optimizer-state budget for it, and shards move off
    /// it. Default 0.25.
    pub rebalance_hot_fraction: f64,
}

impl Default for ShardConfig {
    fn default() -> Self {
        Self {
            stage: gm_shard::ZeroStage::Stage2,
            timeout: Duration::from_secs(120),
            max_shard_bytes: 100_000_000,
            rebalance_hot_fraction: 0.25,
        }
    }
}

/// Everything the system and the program are configured with.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SystemConfig {
    /// `[memory]`.
    pub memory: MemoryOptimizationConfig,
    /// `[training]`.
    pub training: TrainingMemoryConfig,
    /// `[run]`.
    pub run: RunConfig,
    /// `[shard]`.
    pub shard: ShardConfig,
}

/// Where a resolved value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The documented default.
    Default,
    /// The config file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A command-line flag.
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File(p) => write!(f, "file {}", p.display()),
            Origin::Env(v) => write!(f, "env {v}"),
            Origin::Flag(n) => write!(f, "flag {n}"),
        }
    }
}

/// A raw value before it is parsed for a key.
#[derive(Debug, Clone, Copy)]
pub enum Raw<'a> {
    /// A value from the TOML file.
    Toml(&'a toml::Value),
    /// Text from an environment variable or a flag.
    Text(&'a str),
}

impl fmt::Display for Raw<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Raw::Toml(toml::Value::String(s)) => write!(f, "{s:?}"),
            Raw::Toml(toml::Value::Integer(i)) => write!(f, "{i}"),
            Raw::Toml(toml::Value::Float(x)) => write!(f, "{x}"),
            Raw::Toml(toml::Value::Boolean(b)) => write!(f, "{b}"),
            Raw::Toml(toml::Value::Datetime(d)) => write!(f, "{d}"),
            Raw::Toml(toml::Value::Array(_)) => f.write_str("(an array)"),
            Raw::Toml(toml::Value::Table(_)) => f.write_str("(a table)"),
            Raw::Text(s) => write!(f, "{s:?}"),
        }
    }
}

type Setter = fn(&mut SystemConfig, Raw<'_>) -> std::result::Result<(), String>;
type Getter = fn(&SystemConfig) -> String;

/// One configuration key.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// `section.name`.
    pub name: &'static str,
    /// What is allowed, in words (used in errors).
    pub allowed: &'static str,
    get: Getter,
    set: Setter,
}

impl Key {
    /// The environment variable that sets this key.
    pub fn env_var(&self) -> String {
        format!("GM_{}", self.name.replace('.', "_").to_ascii_uppercase())
    }

    /// The key's value in `cfg`, formatted.
    pub fn value(&self, cfg: &SystemConfig) -> String {
        (self.get)(cfg)
    }
}

// ------------------------------------------------------------ raw parsing

fn text_or_string<'a>(raw: Raw<'a>) -> Option<&'a str> {
    match raw {
        Raw::Text(s) => Some(s.trim()),
        Raw::Toml(toml::Value::String(s)) => Some(s.trim()),
        _ => None,
    }
}

fn parse_u64(raw: Raw<'_>) -> std::result::Result<u64, String> {
    match raw {
        Raw::Toml(toml::Value::Integer(i)) if *i >= 0 => Ok(*i as u64),
        Raw::Toml(toml::Value::Integer(_)) => Err("a non-negative integer".into()),
        Raw::Text(s) => s
            .trim()
            .parse()
            .map_err(|_| "a non-negative integer".into()),
        _ => Err("a non-negative integer".into()),
    }
}

fn parse_f64(raw: Raw<'_>) -> std::result::Result<f64, String> {
    let v = match raw {
        Raw::Toml(toml::Value::Float(f)) => *f,
        Raw::Toml(toml::Value::Integer(i)) => *i as f64,
        Raw::Text(s) => s.trim().parse().map_err(|_| "a number".to_string())?,
        _ => return Err("a number".into()),
    };
    if v.is_finite() {
        Ok(v)
    } else {
        Err("a finite number".into())
    }
}

fn parse_bool(raw: Raw<'_>) -> std::result::Result<bool, String> {
    match raw {
        Raw::Toml(toml::Value::Boolean(b)) => Ok(*b),
        Raw::Text(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err("true or false".into()),
        },
        _ => Err("true or false".into()),
    }
}

fn parse_bytes(raw: Raw<'_>) -> std::result::Result<u64, String> {
    const ALLOWED: &str = "a byte count: an integer or a size such as \"8 GiB\", \"512MB\"";
    match raw {
        Raw::Toml(toml::Value::Integer(i)) if *i > 0 => Ok(*i as u64),
        _ => {
            let s = text_or_string(raw).ok_or_else(|| ALLOWED.to_string())?;
            s.parse::<ByteSize>()
                .map(|b| b.bytes())
                .map_err(|_| ALLOWED.to_string())
        }
    }
}

fn parse_secs(raw: Raw<'_>, lo: f64, hi: f64) -> std::result::Result<Duration, String> {
    let allowed = || format!("seconds in {lo} ..= {hi}");
    let v = parse_f64(raw).map_err(|_| allowed())?;
    if !(lo..=hi).contains(&v) {
        return Err(allowed());
    }
    Ok(Duration::from_secs_f64(v))
}

fn parse_opt_path(raw: Raw<'_>) -> std::result::Result<Option<PathBuf>, String> {
    let s = text_or_string(raw).ok_or_else(|| "a path (a string)".to_string())?;
    Ok((!s.is_empty()).then(|| PathBuf::from(s)))
}

fn secs(d: Duration) -> String {
    format!("{}", d.as_secs_f64())
}

fn size(b: u64) -> String {
    format!("{b} ({})", ByteSize(b))
}

fn opt_path(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map_or_else(|| "(none)".into(), |p| p.display().to_string())
}

/// Every key of the configuration, in display order.
pub const KEYS: &[Key] = &[
    Key {
        name: "memory.limit_bytes",
        allowed: "a byte count > 0: an integer or a size such as \"8 GiB\", \"512MB\"",
        get: |c| size(c.memory.limit_bytes),
        set: |c, r| {
            c.memory.limit_bytes = parse_bytes(r)?;
            Ok(())
        },
    },
    Key {
        name: "memory.warning_fraction",
        allowed: "a fraction in (0, 1]",
        get: |c| c.memory.warning_fraction.to_string(),
        set: |c, r| {
            c.memory.warning_fraction = parse_f64(r)?;
            Ok(())
        },
    },
    Key {
        name: "memory.critical_fraction",
        allowed: "a fraction in [warning_fraction, 1]",
        get: |c| c.memory.critical_fraction.to_string(),
        set: |c, r| {
            c.memory.critical_fraction = parse_f64(r)?;
            Ok(())
        },
    },
    Key {
        name: "memory.reclaim_interval_secs",
        allowed: "seconds in 0.001 ..= 86400",
        get: |c| secs(c.memory.reclaim_interval),
        set: |c, r| {
            c.memory.reclaim_interval = parse_secs(r, 0.001, 86_400.0)?;
            Ok(())
        },
    },
    Key {
        name: "memory.buffer_limit_bytes",
        allowed: "a byte count > 0: an integer or a size such as \"1 GiB\"",
        get: |c| size(c.memory.buffer_limit_bytes),
        set: |c, r| {
            c.memory.buffer_limit_bytes = parse_bytes(r)?;
            Ok(())
        },
    },
    Key {
        name: "memory.buffer_compression",
        allowed: "true or false",
        get: |c| c.memory.buffer_compression.to_string(),
        set: |c, r| {
            c.memory.buffer_compression = parse_bool(r)?;
            Ok(())
        },
    },
    Key {
        name: "memory.monitor_interval_secs",
        allowed: "seconds in 0.001 ..= 3600",
        get: |c| secs(c.memory.monitor_interval),
        set: |c, r| {
            c.memory.monitor_interval = parse_secs(r, 0.001, 3600.0)?;
            Ok(())
        },
    },
    Key {
        name: "memory.profile_allocation_sites",
        allowed: "true or false",
        get: |c| c.memory.profile_allocation_sites.to_string(),
        set: |c, r| {
            c.memory.profile_allocation_sites = parse_bool(r)?;
            Ok(())
        },
    },
    Key {
        name: "memory.leak_check_interval_secs",
        allowed: "seconds in 0.001 ..= 3600",
        get: |c| secs(c.memory.leak_check_interval),
        set: |c, r| {
            c.memory.leak_check_interval = parse_secs(r, 0.001, 3600.0)?;
            Ok(())
        },
    },
    Key {
        name: "training.batch_auto_scale",
        allowed: "true or false",
        get: |c| c.training.batch_auto_scale.to_string(),
        set: |c, r| {
            c.training.batch_auto_scale = parse_bool(r)?;
            Ok(())
        },
    },
    Key {
        name: "training.min_batch",
        allowed: "a positive multiple of 8",
        get: |c| c.training.min_batch.to_string(),
        set: |c, r| {
            c.training.min_batch = parse_u64(r)? as usize;
            Ok(())
        },
    },
    Key {
        name: "training.max_batch",
        allowed: "a multiple of 8 at least min_batch",
        get: |c| c.training.max_batch.to_string(),
        set: |c, r| {
            c.training.max_batch = parse_u64(r)? as usize;
            Ok(())
        },
    },
    Key {
        name: "training.batch_memory_threshold",
        allowed: "a fraction in (0, 1]",
        get: |c| c.training.batch_memory_threshold.to_string(),
        set: |c, r| {
            c.training.batch_memory_threshold = parse_f64(r)?;
            Ok(())
        },
    },
    Key {
        name: "training.target_effective_batch",
        allowed: "an integer >= 1",
        get: |c| c.training.target_effective_batch.to_string(),
        set: |c, r| {
            c.training.target_effective_batch = parse_u64(r)? as usize;
            Ok(())
        },
    },
    Key {
        name: "training.mixed_precision",
        allowed: "true or false",
        get: |c| c.training.mixed_precision.to_string(),
        set: |c, r| {
            c.training.mixed_precision = parse_bool(r)?;
            Ok(())
        },
    },
    Key {
        name: "training.gradient_checkpointing",
        allowed: "true or false",
        get: |c| c.training.gradient_checkpointing.to_string(),
        set: |c, r| {
            c.training.gradient_checkpointing = parse_bool(r)?;
            Ok(())
        },
    },
    Key {
        name: "training.checkpoint_segments",
        allowed: "an integer in 1 ..= 64",
        get: |c| c.training.checkpoint_segments.to_string(),
        set: |c, r| {
            c.training.checkpoint_segments = parse_u64(r)? as usize;
            Ok(())
        },
    },
    Key {
        name: "run.steps",
        allowed: "an integer in 1 ..= 1000000000",
        get: |c| c.run.steps.to_string(),
        set: |c, r| {
            c.run.steps = parse_u64(r)?;
            Ok(())
        },
    },
    Key {
        name: "run.batch_size",
        allowed: "an integer in 1 ..= 4096",
        get: |c| c.run.batch_size.to_string(),
        set: |c, r| {
            c.run.batch_size = parse_u64(r)? as usize;
            Ok(())
        },
    },
    Key {
        name: "run.seed",
        allowed: "a non-negative integer",
        get: |c| c.run.seed.to_string(),
        set: |c, r| {
            c.run.seed = parse_u64(r)?;
            Ok(())
        },
    },
    Key {
        name: "run.model",
        allowed: "\"small\" or \"full\"",
        get: |c| c.run.model.to_string(),
        set: |c, r| {
            c.run.model = match text_or_string(r) {
                Some("small") => ModelSize::Small,
                Some("full") => ModelSize::Full,
                _ => return Err("\"small\" or \"full\"".into()),
            };
            Ok(())
        },
    },
    Key {
        name: "run.synthetic_bars",
        allowed: "an integer in 2000 ..= 10000000",
        get: |c| c.run.synthetic_bars.to_string(),
        set: |c, r| {
            c.run.synthetic_bars = parse_u64(r)? as usize;
            Ok(())
        },
    },
    Key {
        name: "run.eval_episodes",
        allowed: "an integer in 1 ..= 100000",
        get: |c| c.run.eval_episodes.to_string(),
        set: |c, r| {
            c.run.eval_episodes = parse_u64(r)? as usize;
            Ok(())
        },
    },
    Key {
        name: "run.learning_starts_transitions",
        allowed: "an integer >= 1",
        get: |c| c.run.learning_starts_transitions.to_string(),
        set: |c, r| {
            c.run.learning_starts_transitions = parse_u64(r)? as usize;
            Ok(())
        },
    },
    Key {
        name: "run.log_every_steps",
        allowed: "an integer >= 1",
        get: |c| c.run.log_every_steps.to_string(),
        set: |c, r| {
            c.run.log_every_steps = parse_u64(r)?;
            Ok(())
        },
    },
    Key {
        name: "run.checkpoint_every_steps",
        allowed: "0 (only at the end and on Ctrl-C) or an integer >= 1",
        get: |c| c.run.checkpoint_every_steps.to_string(),
        set: |c, r| {
            c.run.checkpoint_every_steps = parse_u64(r)?;
            Ok(())
        },
    },
    Key {
        name: "run.data",
        allowed: "a path to a CSV file of bars (empty: the synthetic market)",
        get: |c| opt_path(&c.run.data),
        set: |c, r| {
            c.run.data = parse_opt_path(r)?;
            Ok(())
        },
    },
    Key {
        name: "run.out",
        allowed: "a directory path (empty: runs/<timestamp>)",
        get: |c| opt_path(&c.run.out),
        set: |c, r| {
            c.run.out = parse_opt_path(r)?;
            Ok(())
        },
    },
    Key {
        name: "run.metrics_addr",
        allowed: "a loopback address 127.0.0.1:PORT (PORT 0 picks a free one; empty: none)",
        get: |c| {
            c.run
                .metrics_addr
                .map_or_else(|| "(none)".into(), |a| a.to_string())
        },
        set: |c, r| {
            const ALLOWED: &str = "a loopback address 127.0.0.1:PORT (empty: none)";
            let s = text_or_string(r).ok_or_else(|| ALLOWED.to_string())?;
            if s.is_empty() {
                c.run.metrics_addr = None;
                return Ok(());
            }
            let a: SocketAddr = s.parse().map_err(|_| ALLOWED.to_string())?;
            if !a.ip().is_loopback() || !a.is_ipv4() {
                return Err(ALLOWED.into());
            }
            c.run.metrics_addr = Some(a);
            Ok(())
        },
    },
    Key {
        name: "run.ranks",
        allowed: "an integer in 1 ..= 1024 (more than 1: the mpi build under mpirun -n N)",
        get: |c| c.run.ranks.to_string(),
        set: |c, r| {
            c.run.ranks = parse_u64(r)? as usize;
            Ok(())
        },
    },
    Key {
        name: "shard.stage",
        allowed: "1 (optimizer state sharded) or 2 (optimizer state and gradients sharded)",
        get: |c| c.shard.stage.number().to_string(),
        set: |c, r| {
            c.shard.stage = match u8::try_from(parse_u64(r)?)
                .ok()
                .and_then(gm_shard::ZeroStage::from_number)
            {
                Some(s @ (gm_shard::ZeroStage::Stage1 | gm_shard::ZeroStage::Stage2)) => s,
                _ => return Err("1 or 2".into()),
            };
            Ok(())
        },
    },
    Key {
        name: "shard.timeout_secs",
        allowed: "seconds in 1 ..= 86400",
        get: |c| secs(c.shard.timeout),
        set: |c, r| {
            c.shard.timeout = parse_secs(r, 1.0, 86_400.0)?;
            Ok(())
        },
    },
    Key {
        name: "shard.max_shard_bytes",
        allowed: "a byte count >= 8 (one parameter's optimizer state): an integer or a size such as \"100MB\"",
        get: |c| size(c.shard.max_shard_bytes),
        set: |c, r| {
            c.shard.max_shard_bytes = parse_bytes(r)?;
            Ok(())
        },
    },
    Key {
        name: "shard.rebalance_hot_fraction",
        allowed: "a fraction in 0 ..= 10 (0: any rank above the median RSS is hot)",
        get: |c| c.shard.rebalance_hot_fraction.to_string(),
        set: |c, r| {
            c.shard.rebalance_hot_fraction = parse_f64(r)?;
            Ok(())
        },
    },
];

/// The key called `name`.
pub fn key(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

fn known_keys() -> String {
    KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

/// A resolved configuration and the origin of every value.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The configuration.
    pub config: SystemConfig,
    /// Key name → where its value came from.
    pub origins: BTreeMap<&'static str, Origin>,
    /// The config file read, if any.
    pub file: Option<PathBuf>,
}

impl Resolved {
    /// Where `key`'s value came from.
    pub fn origin(&self, key: &str) -> &Origin {
        self.origins.get(key).unwrap_or(&Origin::Default)
    }

    /// `key = value   # origin` for every key, as `config show` prints it.
    pub fn show(&self) -> String {
        let width = KEYS.iter().map(|k| k.name.len()).max().unwrap_or(0);
        let vwidth = KEYS
            .iter()
            .map(|k| k.value(&self.config).len())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        if let Some(f) = &self.file {
            out.push_str(&format!("# config file: {}\n", f.display()));
        }
        for k in KEYS {
            out.push_str(&format!(
                "{:width$} = {:vwidth$}  # {}\n",
                k.name,
                k.value(&self.config),
                self.origin(k.name)
            ));
        }
        out
    }

    /// The configuration as a TOML document that resolves to the same
    /// values (what a run saves next to its checkpoint).
    pub fn to_toml(&self) -> String {
        let mut out =
            String::from("# written by grandmodel: the resolved configuration of this run\n");
        let mut section = "";
        for k in KEYS {
            if k.name == "run.ranks" {
                // A launch setting, not part of the run: a resumed run
                // may use another number of ranks.
                continue;
            }
            let (sec, name) = k.name.split_once('.').unwrap_or(("", k.name));
            if sec != section {
                out.push_str(&format!("\n[{sec}]\n"));
                section = sec;
            }
            let c = &self.config;
            let v = match k.name {
                "memory.limit_bytes" => c.memory.limit_bytes.to_string(),
                "memory.buffer_limit_bytes" => c.memory.buffer_limit_bytes.to_string(),
                "shard.max_shard_bytes" => c.shard.max_shard_bytes.to_string(),
                "run.model" => format!("{:?}", c.run.model.to_string()),
                "run.data" => format!(
                    "{:?}",
                    c.run
                        .data
                        .as_ref()
                        .map_or(String::new(), |p| p.display().to_string())
                ),
                "run.out" => format!(
                    "{:?}",
                    c.run
                        .out
                        .as_ref()
                        .map_or(String::new(), |p| p.display().to_string())
                ),
                "run.metrics_addr" => format!(
                    "{:?}",
                    c.run.metrics_addr.map_or(String::new(), |a| a.to_string())
                ),
                _ => {
                    let v = k.value(c);
                    if k.name.ends_with("_secs")
                        || k.name.ends_with("fraction")
                        || k.name.ends_with("threshold")
                    {
                        // Keep floats floats in TOML.
                        if v.contains('.') {
                            v
                        } else {
                            format!("{v}.0")
                        }
                    } else {
                        v
                    }
                }
            };
            out.push_str(&format!("{name} = {v}\n"));
        }
        out
    }
}

/// The layers a configuration is resolved from.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    /// The config file (`--config`); `None` also consults `GM_CONFIG`.
    pub file: Option<PathBuf>,
    /// A file used when neither `--config` nor `GM_CONFIG` names one (a
    /// resumed run's saved config).
    pub fallback_file: Option<PathBuf>,
    /// Environment variables (name, value); pass `std::env::vars()`.
    pub env: Vec<(String, String)>,
    /// Flags: (flag as typed, key, value), in command-line order.
    pub flags: Vec<(String, String, String)>,
}

/// Applies `raw` to `key` in `cfg`, with an error naming key, value, origin
/// and what is allowed.
fn apply(
    cfg: &mut SystemConfig,
    origins: &mut BTreeMap<&'static str, Origin>,
    name: &str,
    raw: Raw<'_>,
    origin: Origin,
) -> Result<()> {
    let k = key(name).ok_or_else(|| Error::UnknownKey {
        key: name.to_string(),
        origin: origin.to_string(),
        known: known_keys(),
    })?;
    (k.set)(cfg, raw).map_err(|_| Error::Config {
        key: k.name.to_string(),
        value: raw.to_string(),
        origin: origin.to_string(),
        allowed: k.allowed.to_string(),
    })?;
    origins.insert(k.name, origin);
    Ok(())
}

/// Reads and parses a config file.
fn read_file(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigFile {
        path: path.to_owned(),
        source,
    })?;
    text.parse::<toml::Table>()
        .map_err(|e| Error::ConfigSyntax {
            path: path.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })
}

/// Resolves defaults ← file ← environment ← flags and validates the
/// result.
pub fn resolve(layers: &Layers) -> Result<Resolved> {
    let mut cfg = SystemConfig::default();
    let mut origins = BTreeMap::new();
    let env_file = layers
        .env
        .iter()
        .find(|(k, _)| k == "GM_CONFIG")
        .map(|(_, v)| PathBuf::from(v))
        .filter(|p| !p.as_os_str().is_empty());
    let file = layers
        .file
        .clone()
        .or(env_file)
        .or_else(|| layers.fallback_file.clone());
    if let Some(path) = &file {
        let table = read_file(path)?;
        for (section, value) in &table {
            let origin = Origin::File(path.clone());
            let toml::Value::Table(t) = value else {
                return Err(Error::UnknownKey {
                    key: section.clone(),
                    origin: origin.to_string(),
                    known: format!(
                        "the sections [memory], [training], [run], [shard] with the keys {}",
                        known_keys()
                    ),
                });
            };
            for (k, v) in t {
                let name = format!("{section}.{k}");
                apply(&mut cfg, &mut origins, &name, Raw::Toml(v), origin.clone())?;
            }
        }
    }
    let mut env: Vec<&(String, String)> = layers.env.iter().collect();
    env.sort();
    for (var, value) in env {
        if !["GM_MEMORY_", "GM_TRAINING_", "GM_RUN_", "GM_SHARD_"]
            .iter()
            .any(|p| var.starts_with(p))
        {
            continue;
        }
        let Some(k) = KEYS.iter().find(|k| k.env_var() == *var) else {
            return Err(Error::UnknownKey {
                key: var.clone(),
                origin: "the environment".into(),
                known: KEYS
                    .iter()
                    .map(|k| k.env_var())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        apply(
            &mut cfg,
            &mut origins,
            k.name,
            Raw::Text(value),
            Origin::Env(var.clone()),
        )?;
    }
    for (flag, name, value) in &layers.flags {
        apply(
            &mut cfg,
            &mut origins,
            name,
            Raw::Text(value),
            Origin::Flag(flag.clone()),
        )?;
    }
    let resolved = Resolved {
        config: cfg,
        origins,
        file,
    };
    validate(&resolved)?;
    Ok(resolved)
}

/// Checks every value and the relations between values; the error names
/// the key, its value, where it came from and what is allowed.
pub fn validate(r: &Resolved) -> Result<()> {
    let c = &r.config;
    let bad = |name: &'static str, allowed: String| -> Error {
        let k = key(name).expect("validate names only keys of the table");
        Error::Config {
            key: name.to_string(),
            value: k.value(c),
            origin: r.origin(name).to_string(),
            allowed,
        }
    };
    let m = &c.memory;
    if m.limit_bytes == 0 {
        return Err(bad("memory.limit_bytes", "more than 0 bytes".into()));
    }
    if !(m.warning_fraction > 0.0 && m.warning_fraction <= 1.0) {
        return Err(bad(
            "memory.warning_fraction",
            "a fraction in (0, 1]".into(),
        ));
    }
    if !(m.critical_fraction >= m.warning_fraction && m.critical_fraction <= 1.0) {
        return Err(bad(
            "memory.critical_fraction",
            format!(
                "a fraction in [warning_fraction = {}, 1]",
                m.warning_fraction
            ),
        ));
    }
    if m.buffer_limit_bytes == 0 {
        return Err(bad("memory.buffer_limit_bytes", "more than 0 bytes".into()));
    }
    let t = &c.training;
    if t.min_batch == 0 || !t.min_batch.is_multiple_of(8) {
        return Err(bad("training.min_batch", "a positive multiple of 8".into()));
    }
    if t.max_batch < t.min_batch || !t.max_batch.is_multiple_of(8) {
        return Err(bad(
            "training.max_batch",
            format!("a multiple of 8 at least min_batch = {}", t.min_batch),
        ));
    }
    if !(t.batch_memory_threshold > 0.0 && t.batch_memory_threshold <= 1.0) {
        return Err(bad(
            "training.batch_memory_threshold",
            "a fraction in (0, 1]".into(),
        ));
    }
    if t.target_effective_batch == 0 {
        return Err(bad("training.target_effective_batch", "at least 1".into()));
    }
    if !(1..=64).contains(&t.checkpoint_segments) {
        return Err(bad("training.checkpoint_segments", "1 ..= 64".into()));
    }
    let run = &c.run;
    if !(1..=1_000_000_000).contains(&run.steps) {
        return Err(bad("run.steps", "1 ..= 1000000000".into()));
    }
    if !(1..=4096).contains(&run.batch_size) {
        return Err(bad("run.batch_size", "1 ..= 4096".into()));
    }
    if !(2000..=10_000_000).contains(&run.synthetic_bars) {
        return Err(bad("run.synthetic_bars", "2000 ..= 10000000".into()));
    }
    if !(1..=100_000).contains(&run.eval_episodes) {
        return Err(bad("run.eval_episodes", "1 ..= 100000".into()));
    }
    if run.learning_starts_transitions == 0 {
        return Err(bad("run.learning_starts_transitions", "at least 1".into()));
    }
    if run.log_every_steps == 0 {
        return Err(bad("run.log_every_steps", "at least 1".into()));
    }
    if !(1..=MAX_RANKS).contains(&run.ranks) {
        return Err(bad("run.ranks", format!("1 ..= {MAX_RANKS}")));
    }
    let s = &c.shard;
    if s.max_shard_bytes < 8 {
        return Err(bad(
            "shard.max_shard_bytes",
            "at least 8 bytes (one parameter's AdamW m and v in f32)".into(),
        ));
    }
    if !(0.0..=10.0).contains(&s.rebalance_hot_fraction) {
        return Err(bad(
            "shard.rebalance_hot_fraction",
            "a fraction in 0 ..= 10".into(),
        ));
    }
    Ok(())
}

/// Most data-parallel ranks (`run.ranks`).
pub const MAX_RANKS: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults_are_the_seed_systems() {
        let r = resolve(&Layers::default()).unwrap();
        let c = &r.config;
        assert_eq!(c.memory.limit_bytes, 8 << 30);
        assert_eq!(c.memory.warning_fraction, 0.75);
        assert_eq!(c.memory.critical_fraction, 0.90);
        assert_eq!(c.memory.reclaim_interval, Duration::from_secs(60));
        assert_eq!(c.memory.buffer_limit_bytes, 1024 << 20);
        assert!(c.memory.buffer_compression);
        assert_eq!(c.memory.monitor_interval, Duration::from_secs(5));
        assert!(c.memory.profile_allocation_sites);
        assert!(c.training.batch_auto_scale);
        assert_eq!((c.training.min_batch, c.training.max_batch), (8, 512));
        assert_eq!(c.training.batch_memory_threshold, 0.85);
        assert_eq!(c.training.target_effective_batch, 128);
        assert!(c.training.mixed_precision && c.training.gradient_checkpointing);
        assert_eq!(c.training.checkpoint_segments, 4);
        assert!(r.origins.is_empty());
        assert!(r.show().contains("memory.limit_bytes"));
    }

    #[test]
    fn layers_override_in_order_and_record_origins() {
        let f = file(
            "[memory]\nlimit_bytes = \"2 GiB\"\nwarning_fraction = 0.5\n[run]\nsteps = 10\nseed = 3\n",
        );
        let layers = Layers {
            file: Some(f.path().to_owned()),
            env: vec![
                ("GM_MEMORY_WARNING_FRACTION".into(), "0.6".into()),
                ("GM_RUN_STEPS".into(), "20".into()),
                ("GM_REQUIRE_CUDA".into(), "1".into()),
                ("PATH".into(), "/bin".into()),
            ],
            flags: vec![("--steps".into(), "run.steps".into(), "30".into())],
            ..Layers::default()
        };
        let r = resolve(&layers).unwrap();
        assert_eq!(r.config.memory.limit_bytes, 2 << 30);
        assert_eq!(r.config.memory.warning_fraction, 0.6);
        assert_eq!(r.config.run.steps, 30);
        assert_eq!(r.config.run.seed, 3);
        assert_eq!(
            *r.origin("memory.limit_bytes"),
            Origin::File(f.path().to_owned())
        );
        assert_eq!(
            *r.origin("memory.warning_fraction"),
            Origin::Env("GM_MEMORY_WARNING_FRACTION".into())
        );
        assert_eq!(*r.origin("run.steps"), Origin::Flag("--steps".into()));
        assert_eq!(*r.origin("run.model"), Origin::Default);
        let shown = r.show();
        assert!(shown.contains("flag --steps"), "{shown}");
        assert!(shown.contains("env GM_MEMORY_WARNING_FRACTION"), "{shown}");
    }

    #[test]
    fn the_saved_toml_resolves_to_the_same_config() {
        let layers = Layers {
            flags: vec![
                (
                    "--budget".into(),
                    "memory.limit_bytes".into(),
                    "300MB".into(),
                ),
                (
                    "--set".into(),
                    "run.metrics_addr".into(),
                    "127.0.0.1:0".into(),
                ),
                ("--set".into(), "run.data".into(), "bars.csv".into()),
            ],
            ..Layers::default()
        };
        let r = resolve(&layers).unwrap();
        let f = file(&r.to_toml());
        let again = resolve(&Layers {
            file: Some(f.path().to_owned()),
            ..Layers::default()
        })
        .unwrap();
        assert_eq!(again.config, r.config);
    }

    #[test]
    fn errors_name_key_value_origin_and_allowed() {
        let err = |layers: Layers| resolve(&layers).unwrap_err().to_string();
        let f = file("[memory]\nwarning_fraction = 1.5\n");
        let e = err(Layers {
            file: Some(f.path().to_owned()),
            ..Layers::default()
        });
        assert!(e.contains("memory.warning_fraction = 1.5"), "{e}");
        assert!(e.contains("(0, 1]") && e.contains("file"), "{e}");

        let f = file("[memory]\nlimit_byte = 5\n");
        let e = err(Layers {
            file: Some(f.path().to_owned()),
            ..Layers::default()
        });
        assert!(
            e.contains("unknown config key \"memory.limit_byte\""),
            "{e}"
        );

        let f = file("[memory\nlimit_bytes = 5\n");
        let e = err(Layers {
            file: Some(f.path().to_owned()),
            ..Layers::default()
        });
        assert!(e.contains("not valid TOML"), "{e}");

        let e = err(Layers {
            env: vec![("GM_TRAINING_MIN_BATCH".into(), "12".into())],
            ..Layers::default()
        });
        assert!(e.contains("training.min_batch = 12"), "{e}");
        assert!(e.contains("env GM_TRAINING_MIN_BATCH"), "{e}");
        assert!(e.contains("multiple of 8"), "{e}");

        let e = err(Layers {
            env: vec![("GM_RUN_STEPZ".into(), "12".into())],
            ..Layers::default()
        });
        assert!(
            e.contains("GM_RUN_STEPZ") && e.contains("GM_RUN_STEPS"),
            "{e}"
        );

        let e = err(Layers {
            flags: vec![(
                "--budget".into(),
                "memory.limit_bytes".into(),
                "lots".into(),
            )],
            ..Layers::default()
        });
        assert!(e.contains("memory.limit_bytes = \"lots\""), "{e}");
        assert!(e.contains("flag --budget") && e.contains("GiB"), "{e}");

        let e = err(Layers {
            flags: vec![(
                "--metrics-addr".into(),
                "run.metrics_addr".into(),
                "0.0.0.0:9000".into(),
            )],
            ..Layers::default()
        });
        assert!(e.contains("loopback"), "{e}");

        let e = err(Layers {
            file: Some("/nonexistent/gm.toml".into()),
            ..Layers::default()
        });
        assert!(e.contains("cannot read config file"), "{e}");
    }

    #[test]
    fn ranks_and_the_shard_section_resolve_with_origins() {
        let r = resolve(&Layers::default()).unwrap();
        assert_eq!(r.config.run.ranks, 1);
        assert_eq!(r.config.shard, ShardConfig::default());
        assert_eq!(r.config.shard.stage, gm_shard::ZeroStage::Stage2);
        assert_eq!(r.config.shard.timeout, Duration::from_secs(120));
        assert_eq!(r.config.shard.max_shard_bytes, 100_000_000);
        assert_eq!(r.config.shard.rebalance_hot_fraction, 0.25);

        let f = file("[shard]\nstage = 1\nmax_shard_bytes = \"1MB\"\n[run]\nranks = 3\n");
        let r = resolve(&Layers {
            file: Some(f.path().to_owned()),
            env: vec![
                ("GM_RUN_RANKS".into(), "4".into()),
                ("GM_SHARD_TIMEOUT_SECS".into(), "30".into()),
            ],
            flags: vec![
                ("--ranks".into(), "run.ranks".into(), "2".into()),
                (
                    "--set".into(),
                    "shard.rebalance_hot_fraction".into(),
                    "0".into(),
                ),
            ],
            ..Layers::default()
        })
        .unwrap();
        let c = &r.config;
        assert_eq!(c.run.ranks, 2);
        assert_eq!(*r.origin("run.ranks"), Origin::Flag("--ranks".into()));
        assert_eq!(c.shard.stage, gm_shard::ZeroStage::Stage1);
        assert_eq!(c.shard.max_shard_bytes, 1_000_000);
        assert_eq!(c.shard.timeout, Duration::from_secs(30));
        assert_eq!(
            *r.origin("shard.timeout_secs"),
            Origin::Env("GM_SHARD_TIMEOUT_SECS".into())
        );
        assert_eq!(c.shard.rebalance_hot_fraction, 0.0);
        let shown = r.show();
        assert!(
            shown.contains("run.ranks") && shown.contains("flag --ranks"),
            "{shown}"
        );
        assert!(shown.contains("shard.stage"), "{shown}");

        // The saved TOML keeps the shard section and leaves the rank count
        // to each launch.
        let toml = r.to_toml();
        assert!(
            toml.contains("[shard]") && toml.contains("stage = 1"),
            "{toml}"
        );
        assert!(!toml.contains("ranks"), "{toml}");
        let f = file(&toml);
        let again = resolve(&Layers {
            file: Some(f.path().to_owned()),
            ..Layers::default()
        })
        .unwrap();
        assert_eq!(again.config.shard, c.shard);
        assert_eq!(again.config.run.ranks, 1);
    }

    #[test]
    fn bad_ranks_and_shard_values_are_errors_naming_the_key() {
        let err = |name: &str, value: &str| {
            resolve(&Layers {
                flags: vec![("--set".into(), name.into(), value.into())],
                ..Layers::default()
            })
            .unwrap_err()
        };
        for (k, v, allowed) in [
            ("run.ranks", "0", "1 ..= 1024"),
            ("run.ranks", "1025", "1 ..= 1024"),
            ("run.ranks", "two", "1 ..= 1024"),
            ("shard.stage", "3", "1 (optimizer state sharded) or 2"),
            ("shard.stage", "0", "1 (optimizer state sharded) or 2"),
            ("shard.timeout_secs", "0", "1 ..= 86400"),
            ("shard.max_shard_bytes", "4", "at least 8 bytes"),
            ("shard.rebalance_hot_fraction", "-0.1", "0 ..= 10"),
            ("shard.rebalance_hot_fraction", "11", "0 ..= 10"),
        ] {
            let e = err(k, v);
            assert_eq!(e.exit_code(), crate::exit::CONFIG, "{e}");
            let text = e.to_string();
            assert!(text.contains(&format!("{k} = ")), "{text}");
            assert!(text.contains(allowed), "{k}={v}: {text}");
        }
        let e = resolve(&Layers {
            env: vec![("GM_SHARD_STAGES".into(), "1".into())],
            ..Layers::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("GM_SHARD_STAGES") && e.contains("GM_SHARD_STAGE"),
            "{e}"
        );
        let f = file("[shards]\nstage = 1\n");
        let e = resolve(&Layers {
            file: Some(f.path().to_owned()),
            ..Layers::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("shards.stage"), "{e}");
    }
}
