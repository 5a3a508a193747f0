//! [`Config`]: the coordinator's settings, with documented defaults and
//! [`Config::validate`].

use crate::error::{Error, Result};
use std::time::Duration;

/// Settings of a coordinator (see [`Builder`](crate::Builder)).
///
/// | field | default | allowed |
/// |---|---|---|
/// | `period` | `Some(60 s)` | `None` (no periodic passes) or 1 ms ..= 1 day |
/// | `trim_after_pass` | `true` | any |
/// | `history_len` | `64` | 1 ..= 100 000 |
/// | `min_pressure_interval` | `1 s` | 0 ..= 1 hour |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Time between periodic passes (measured from the end of the previous
    /// periodic pass); `None` disables them. Default 60 s.
    pub period: Option<Duration>,
    /// Return freed heap to the OS (`malloc_trim(0)` on glibc, a reported
    /// no-op elsewhere) after every pass, and before each check of an
    /// RSS-measured [`Target`](crate::Target). Default `true`.
    pub trim_after_pass: bool,
    /// Pass reports kept in the history ring (oldest dropped first).
    /// Default 64.
    pub history_len: usize,
    /// A pressure signal arriving less than this long after a pass of the
    /// same or a stronger trigger is dropped (counted in
    /// [`Stats::signals_dropped`](crate::Stats::signals_dropped)); a stronger
    /// signal always runs. Damps alert storms from a monitor that repeats its
    /// alert on every sample. Default 1 s; zero runs every signal.
    pub min_pressure_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            period: Some(Duration::from_secs(60)),
            trim_after_pass: true,
            history_len: 64,
            min_pressure_interval: Duration::from_secs(1),
        }
    }
}

impl Config {
    /// Checks every field against the table above; the error names the
    /// key, the value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        if let Some(p) = self.period {
            if p < Duration::from_millis(1) || p > Duration::from_secs(86_400) {
                return Err(Error::config(
                    "period",
                    p,
                    "None (no periodic passes) or 1 ms ..= 1 day",
                ));
            }
        }
        if self.history_len == 0 || self.history_len > 100_000 {
            return Err(Error::config(
                "history_len",
                self.history_len,
                "1 ..= 100000 pass reports",
            ));
        }
        if self.min_pressure_interval > Duration::from_secs(3600) {
            return Err(Error::config(
                "min_pressure_interval",
                self.min_pressure_interval,
                "0 ..= 1 hour",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_documented() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.period, Some(Duration::from_secs(60)));
        assert!(c.trim_after_pass);
        assert_eq!(c.history_len, 64);
    }

    #[test]
    fn validate_names_key_value_and_allowed() {
        let c = Config {
            period: Some(Duration::ZERO),
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("period") && e.contains("0ns") && e.contains("1 ms"),
            "{e}"
        );

        let c = Config {
            history_len: 0,
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("history_len = 0") && e.contains("1 ..="), "{e}");

        let c = Config {
            min_pressure_interval: Duration::from_secs(7200),
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("min_pressure_interval"), "{e}");

        let c = Config {
            period: None,
            ..Config::default()
        };
        c.validate().unwrap();
    }
}
