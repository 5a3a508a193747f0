//! The crate's one error type: every variant says what was wrong and what is
//! allowed.

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in gm-gc. A component's reclaim that panics
/// is not an `Error`: it is reported in the pass report and the pass goes on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range.
    #[error("invalid gm-gc config: {key} = {value}: allowed {allowed}")]
    Config {
        /// The config key (`period`, `history_len`, ...).
        key: &'static str,
        /// The rejected value, printed.
        value: String,
        /// What is allowed, in words.
        allowed: &'static str,
    },
    /// A target asks for a measurement this coordinator cannot take (a heap
    /// target without a heap gauge, an RSS target where RSS cannot be read).
    #[error("reclaim target on {metric} cannot be measured: {reason}")]
    Unmeasurable {
        /// The target's metric, in words.
        metric: &'static str,
        /// Why, and how to fix it.
        reason: &'static str,
    },
    /// The coordinator thread could not be started.
    #[error("could not start the gm-gc coordinator thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The coordinator thread has stopped (its handle was dropped), so a
    /// pressure signal could not be delivered. Hands the signal back.
    #[error("the gm-gc coordinator has stopped; {0:?} was not delivered")]
    Stopped(crate::Trigger),
}

impl Error {
    pub(crate) fn config(
        key: &'static str,
        value: impl std::fmt::Debug,
        allowed: &'static str,
    ) -> Self {
        Error::Config {
            key,
            value: format!("{value:?}"),
            allowed,
        }
    }
}
