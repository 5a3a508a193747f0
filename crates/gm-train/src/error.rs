//! The crate's error type.

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in gm-train.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A candle operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A model error (shapes, weights).
    #[error(transparent)]
    Model(#[from] gm_models::Error),
    /// A replay-buffer error.
    #[error(transparent)]
    Buffer(#[from] gm_buffers::Error),
    /// A collective or shard-plan error (data-parallel training).
    #[error(transparent)]
    Shard(#[from] gm_shard::Error),
    /// A market/environment error.
    #[error(transparent)]
    Market(#[from] gm_market::Error),
    /// A configuration value is out of range.
    #[error("invalid config: {key} = {value}: {allowed}")]
    Config {
        /// The key.
        key: &'static str,
        /// The rejected value.
        value: String,
        /// What is allowed.
        allowed: String,
    },
    /// The memory budget cannot hold even the smallest batch.
    #[error("memory budget of {budget_bytes} bytes (usable {usable_bytes}) cannot hold a training step at batch {batch}: predicted {needed_bytes} bytes")]
    BudgetTooSmall {
        /// The budget.
        budget_bytes: u64,
        /// The part of it the threshold allows.
        usable_bytes: u64,
        /// The smallest batch tried.
        batch: usize,
        /// Its predicted peak.
        needed_bytes: u64,
    },
    /// Reading or writing a checkpoint failed.
    #[error("checkpoint {path:?}: {reason}")]
    Checkpoint {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A device ran out of memory in a training step (on a GPU: candle's
    /// `CUDA_ERROR_OUT_OF_MEMORY`). [`TrainStep::step`](crate::TrainStep::step)
    /// catches it, halves the micro-batch and retries the same batch; it
    /// reaches the caller only when a micro-batch of one row does not fit.
    #[error(
        "out of memory on {device} in a training step at {rows} rows per micro-batch: {detail}"
    )]
    OutOfMemory {
        /// The device (`cpu`, `cuda:0`, ...).
        device: String,
        /// Rows per micro-batch when it failed.
        rows: usize,
        /// The underlying error, printed.
        detail: String,
    },
    /// A background thread stopped.
    #[error("background thread stopped: {0}")]
    Stopped(String),
}

impl Error {
    /// Whether this error is a device running out of memory: an
    /// [`Error::OutOfMemory`], or a candle/model error whose text carries
    /// the CUDA driver's `CUDA_ERROR_OUT_OF_MEMORY` (candle wraps cudarc's
    /// errors as boxed text, so the code is recognised by name).
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            Error::OutOfMemory { .. } => true,
            Error::Candle(_) | Error::Model(_) => {
                self.to_string().contains("CUDA_ERROR_OUT_OF_MEMORY")
            }
            _ => false,
        }
    }

    pub(crate) fn config(
        key: &'static str,
        value: impl std::fmt::Display,
        allowed: impl Into<String>,
    ) -> Self {
        Error::Config {
            key,
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }
}
