//! The crate's error type.

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in gm-models.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A candle operation failed (shapes, dtypes, devices).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An input has the wrong shape.
    #[error("{what}: expected shape {expected}, got {got:?}")]
    Shape {
        /// Which input.
        what: &'static str,
        /// The expected shape, in words (`[B, 48, 8]`).
        expected: String,
        /// The given dims.
        got: Vec<usize>,
    },
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
    /// A weights file lacks a tensor or has one of the wrong shape.
    #[error("weights {path:?}: {reason}")]
    Weights {
        /// The file.
        path: std::path::PathBuf,
        /// Which tensor and what is wrong.
        reason: String,
    },
    /// CUDA is not available (no `cuda` feature, no driver, no device).
    #[error("CUDA unavailable: {0}")]
    NoCuda(String),
}

impl Error {
    #[allow(dead_code)] // used by the model configs
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
