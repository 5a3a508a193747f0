//! The crate's one error type, and the exit code the `grandmodel` program
//! gives each kind of failure.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | a failure inside a run (training, I/O while writing the outputs) |
//! | 2 | bad command line (unknown flag, missing value) |
//! | 3 | bad configuration: unreadable or invalid TOML, an unknown key, a value out of range, a bad `GM_*` variable |
//! | 4 | a data file that does not exist or cannot be opened |
//! | 5 | a data file that cannot be used: malformed CSV, too few bars |
//! | 6 | a checkpoint or saved buffer that is missing, corrupt or does not match the run |
//! | 7 | the memory limit is too small for the run, or was exceeded |
//! | 8 | data-parallel training cannot start or its group failed: `--ranks N` > 1 in a build without the `mpi` feature, not launched by `mpirun`, `mpirun -n` ≠ `--ranks`, MPI unavailable, or a rank that left or did not answer within `shard.timeout_secs` |
//! | 130 | interrupted (Ctrl-C): a checkpoint was written; continue with `--resume` |
//!
//! In data-parallel mode every rank exits with the code of the failure
//! (a rank stopped by another rank's failure exits with that rank's code),
//! and `mpirun` passes it on.

use std::path::PathBuf;

/// `Result` with gm-system's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Exit codes of the `grandmodel` program (see the module docs).
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// A failure inside a run.
    pub const FAILURE: i32 = 1;
    /// Bad command line.
    pub const USAGE: i32 = 2;
    /// Bad configuration.
    pub const CONFIG: i32 = 3;
    /// A data file that does not exist or cannot be opened.
    pub const DATA_MISSING: i32 = 4;
    /// A data file that cannot be used.
    pub const DATA_INVALID: i32 = 5;
    /// A checkpoint or saved buffer that is missing, corrupt or mismatched.
    pub const CHECKPOINT: i32 = 6;
    /// The memory limit is too small, or was exceeded.
    pub const MEMORY: i32 = 7;
    /// Data-parallel training cannot start, or its group failed.
    pub const PARALLEL: i32 = 8;
    /// Interrupted by Ctrl-C after writing a checkpoint.
    pub const INTERRUPTED: i32 = 130;
}

/// Everything that can go wrong in gm-system. Each message is one sentence
/// that names the file, key or value concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range or cannot be parsed.
    #[error("invalid config: {key} = {value} (from {origin}): allowed: {allowed}")]
    Config {
        /// The key, e.g. `memory.limit_bytes`.
        key: String,
        /// The rejected value, as given.
        value: String,
        /// Where it came from (default, file, env, flag).
        origin: String,
        /// What is allowed, in words.
        allowed: String,
    },
    /// A key that the configuration does not have.
    #[error("unknown config key {key:?} (from {origin}); known keys: {known}")]
    UnknownKey {
        /// The key as given.
        key: String,
        /// Where it came from.
        origin: String,
        /// The known keys, comma-separated.
        known: String,
    },
    /// The config file cannot be read.
    #[error("cannot read config file {path:?}: {source}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("config file {path:?} is not valid TOML: {message}")]
    ConfigSyntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (line and column included).
        message: String,
    },
    /// The data file does not exist or cannot be opened.
    #[error("cannot open data file {path:?}: {reason}")]
    DataMissing {
        /// The file.
        path: PathBuf,
        /// The OS error, in words.
        reason: String,
    },
    /// The data file is malformed or too short.
    #[error("cannot use data file {path:?}: {reason}")]
    DataInvalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (line and column for CSV errors).
        reason: String,
    },
    /// A checkpoint directory is missing, corrupt or from another run.
    #[error("cannot resume from {path:?}: {reason}")]
    Checkpoint {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A saved replay-buffer file is missing, corrupt or not a buffer.
    #[error("cannot read buffer file {path:?}: {reason}")]
    BufferFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The memory limit cannot hold the run.
    #[error("memory limit {limit} is too small: {reason}")]
    MemoryTooSmall {
        /// The limit, formatted.
        limit: String,
        /// What does not fit, with the measured figures.
        reason: String,
    },
    /// The memory limit was exceeded and the emergency cleanup could not
    /// bring the process back under it.
    #[error("memory limit {limit} exceeded: {reason}")]
    MemoryExceeded {
        /// The limit, formatted.
        limit: String,
        /// The measured figures.
        reason: String,
    },
    /// The tracking allocator is not installed, so peaks cannot be measured.
    #[error("memory measurement needs gm_leak::TrackingAllocator as the #[global_allocator] of this program")]
    NoAllocator,
    /// Reading or writing a file failed.
    #[error("I/O error on {path:?}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Training failed.
    #[error("training failed: {0}")]
    Train(#[from] gm_train::Error),
    /// The market data pipeline failed.
    #[error("market data: {0}")]
    Market(#[from] gm_market::Error),
    /// The monitor could not start.
    #[error("memory monitor: {0}")]
    Monitor(#[from] gm_monitor::Error),
    /// The reclaimer could not start.
    #[error("memory reclaimer: {0}")]
    Gc(#[from] gm_gc::Error),
    /// The leak detector rejected its configuration or a snapshot.
    #[error("leak detector: {0}")]
    Leak(#[from] gm_leak::Error),
    /// A replay-buffer operation failed.
    #[error("replay buffer: {0}")]
    Buffer(#[from] gm_buffers::Error),
    /// A tensor operation failed.
    #[error("tensor operation: {0}")]
    Candle(#[from] candle_core::Error),
    /// Drawing the chart failed.
    #[error("chart {path:?}: {reason}")]
    Chart {
        /// The SVG file.
        path: PathBuf,
        /// The backend's message.
        reason: String,
    },
    /// `run.ranks > 1` in a program built without the `mpi` feature.
    #[error("run.ranks = {ranks} needs the MPI build of grandmodel: build it with `cargo build --release -p gm-system --features mpi` (Open MPI and libclang-dev installed) and launch `mpirun -n {ranks} target/release/grandmodel train --ranks {ranks}`")]
    MpiNotBuilt {
        /// The ranks asked for.
        ranks: usize,
    },
    /// `run.ranks > 1` but the process was not started by `mpirun`.
    #[error("run.ranks = {ranks} but this process was not started by mpirun: launch `mpirun -n {ranks} grandmodel train --ranks {ranks}` (as root add --allow-run-as-root, with more ranks than cores --oversubscribe)")]
    NotLaunchedByMpirun {
        /// The ranks asked for.
        ranks: usize,
    },
    /// `mpirun` started another number of processes than `run.ranks`.
    #[error("run.ranks = {ranks} but mpirun started {world} process(es): pass the same number to `mpirun -n` and `--ranks` (mpirun -n {world} grandmodel train --ranks {world})")]
    WorldMismatch {
        /// The ranks asked for.
        ranks: usize,
        /// The processes of the `mpirun` job.
        world: usize,
    },
    /// The data-parallel group could not be set up or a collective failed
    /// (MPI unavailable, a rank left or did not answer in time).
    #[error("data-parallel group: {0}")]
    Shard(#[from] gm_shard::Error),
    /// Another rank of the data-parallel group failed; its error is on its
    /// own stderr line. Exits with that rank's code.
    #[error("rank {rank} failed {during} (exit code {code}); its error is reported by that rank")]
    PeerFailed {
        /// The first rank that failed.
        rank: usize,
        /// Its exit code.
        code: i32,
        /// When, in words ("while loading the data", …).
        during: &'static str,
    },
    /// A thread could not be started.
    #[error("cannot start thread {name}: {source}")]
    Spawn {
        /// The thread's name.
        name: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The exit code of the `grandmodel` program for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config { .. }
            | Error::UnknownKey { .. }
            | Error::ConfigFile { .. }
            | Error::ConfigSyntax { .. } => exit::CONFIG,
            Error::DataMissing { .. } => exit::DATA_MISSING,
            Error::DataInvalid { .. } => exit::DATA_INVALID,
            Error::Checkpoint { .. } | Error::BufferFile { .. } => exit::CHECKPOINT,
            Error::MemoryTooSmall { .. } | Error::MemoryExceeded { .. } => exit::MEMORY,
            Error::Train(gm_train::Error::BudgetTooSmall { .. }) => exit::MEMORY,
            Error::Train(gm_train::Error::Checkpoint { .. }) => exit::CHECKPOINT,
            Error::Train(gm_train::Error::Config { .. }) => exit::CONFIG,
            Error::MpiNotBuilt { .. }
            | Error::NotLaunchedByMpirun { .. }
            | Error::WorldMismatch { .. }
            | Error::Shard(_)
            | Error::Train(gm_train::Error::Shard(_)) => exit::PARALLEL,
            Error::PeerFailed { code, .. } => *code,
            _ => exit::FAILURE,
        }
    }
}
