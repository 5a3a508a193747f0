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

/// The names of device out-of-memory errors in candle's error text: the
/// driver's (`DriverError(CUDA_ERROR_OUT_OF_MEMORY)` from an allocation)
/// and cuBLAS's (a workspace it could not allocate).
const OOM_CODES: [&str; 2] = ["CUDA_ERROR_OUT_OF_MEMORY", "CUBLAS_STATUS_ALLOC_FAILED"];

impl Error {
    /// Whether this error is a device running out of memory: an
    /// [`Error::OutOfMemory`], or a candle/model error whose text carries
    /// the CUDA driver's `CUDA_ERROR_OUT_OF_MEMORY` or cuBLAS's
    /// `CUBLAS_STATUS_ALLOC_FAILED` (candle wraps cudarc's errors as boxed
    /// text, so the code is recognised by name).
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            Error::OutOfMemory { .. } => true,
            Error::Candle(_) | Error::Model(_) => {
                let text = self.to_string();
                OOM_CODES.iter().any(|code| text.contains(code))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// candle's CUDA backend boxes cudarc's errors; their text is the
    /// driver's or cuBLAS's code (`DriverError(CUDA_ERROR_OUT_OF_MEMORY)`,
    /// cudarc's `Display` of a driver error).
    fn cuda(text: &str) -> Error {
        Error::Candle(candle_core::Error::Cuda(Box::new(std::io::Error::other(
            text.to_string(),
        ))))
    }

    #[test]
    fn device_out_of_memory_is_recognised_and_other_errors_are_not() {
        assert!(cuda("DriverError(CUDA_ERROR_OUT_OF_MEMORY)").is_out_of_memory());
        assert!(cuda("cublas error: CUBLAS_STATUS_ALLOC_FAILED").is_out_of_memory());
        // candle adds context and a backtrace around the boxed error.
        let wrapped = Error::Candle(
            candle_core::Error::Cuda(Box::new(std::io::Error::other(
                "DriverError(CUDA_ERROR_OUT_OF_MEMORY)",
            )))
            .context("matmul"),
        );
        assert!(wrapped.is_out_of_memory(), "{wrapped}");
        let model = Error::Model(gm_models::Error::Candle(candle_core::Error::Cuda(
            Box::new(std::io::Error::other(
                "DriverError(CUDA_ERROR_OUT_OF_MEMORY) when loading affine",
            )),
        )));
        assert!(model.is_out_of_memory());
        assert!(!cuda("DriverError(CUDA_ERROR_ILLEGAL_ADDRESS)").is_out_of_memory());
        assert!(!Error::config("batch_size", 0, "at least 1").is_out_of_memory());
    }
}
