//! The crate's error type: bad input names the line, the column and what
//! is wrong; nothing panics on user data.

use std::path::PathBuf;

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in gm-market.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
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
    /// A CSV file has a bad value. `line` is 1-based and counts the header.
    #[error("{path}:{line}: column {column:?}: {reason}")]
    Csv {
        /// The file (or the name given for a reader).
        path: String,
        /// 1-based line number.
        line: u64,
        /// Column name (or "header").
        column: String,
        /// What is wrong, with the offending text.
        reason: String,
    },
    /// Reading a file failed.
    #[error("I/O error on {path:?}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not enough data for what was asked (e.g. an episode longer than the
    /// series).
    #[error("not enough data: {0}")]
    NotEnoughData(String),
    /// An action or input outside its domain.
    #[error("invalid input: {0}")]
    Invalid(String),
}

impl Error {
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
