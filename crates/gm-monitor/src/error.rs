//! The crate's one error type, [`Error`], and its [`Result`] alias.

use std::path::PathBuf;

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when building or driving a monitor.
///
/// A source that fails while sampling is *not* an `Error`: it becomes a
/// [`Reading::Error`](crate::Reading::Error) in the sample and the monitor
/// carries on. Errors are for what the caller can fix: bad configuration,
/// a file that cannot be opened, a port that cannot be bound.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range.
    #[error("invalid monitor config: {key} = {value}: allowed {allowed}")]
    Config {
        /// The config key (`interval`, `history_samples`, ...).
        key: &'static str,
        /// The rejected value, printed.
        value: String,
        /// What is allowed, in words.
        allowed: String,
    },
    /// The memory budget itself is malformed.
    #[error("invalid monitor config: budget: {0}")]
    Budget(#[from] gm_core::BudgetError),
    /// A component name is already registered.
    #[error("a component named {name:?} is already registered (names must be unique; unregister it first)")]
    DuplicateComponent {
        /// The name given.
        name: String,
    },
    /// A file (the JSON Lines export) could not be opened or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done (`"opening the JSON Lines export"`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The Prometheus endpoint could not be bound.
    #[error("could not bind the Prometheus endpoint on {addr}: {reason}")]
    Bind {
        /// The address asked for (always loopback).
        addr: std::net::SocketAddr,
        /// The reason given by the OS / HTTP server.
        reason: String,
    },
    /// A thread could not be started.
    #[error("could not start the {thread} thread: {source}")]
    Spawn {
        /// Which thread (`"sampler"`, `"prometheus"`).
        thread: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// A [`Error::Config`] for `key`.
    pub(crate) fn config(
        key: &'static str,
        value: impl std::fmt::Debug,
        allowed: impl Into<String>,
    ) -> Self {
        Error::Config {
            key,
            value: format!("{value:?}"),
            allowed: allowed.into(),
        }
    }
}
