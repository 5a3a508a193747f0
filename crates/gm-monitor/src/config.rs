//! [`Config`]: the monitor's settings with their documented defaults, and
//! [`Measure`]: which source the budget applies to.

use crate::error::{Error, Result};
use gm_core::MemoryBudget;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// The source whose value is compared with the budget, fitted by the trend
/// and reported in alerts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Measure {
    /// Resident set size of the process (the default).
    #[default]
    Rss,
    /// The heap gauge ([`Builder::heap_gauge`](crate::Builder::heap_gauge)).
    Heap,
    /// GPU memory in use on the monitored device.
    Gpu,
    /// The component gauge registered under this name.
    Component(String),
}

impl fmt::Display for Measure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Measure::Rss => f.write_str("rss"),
            Measure::Heap => f.write_str("heap"),
            Measure::Gpu => f.write_str("gpu"),
            Measure::Component(n) => write!(f, "component:{n}"),
        }
    }
}

/// The monitor's settings. `Default` gives the documented defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Time between two samples of the sampler thread. Default **5 s**;
    /// anything above zero (milliseconds are fine: one sample costs a few
    /// microseconds).
    pub interval: Duration,
    /// Samples kept in the history ring. Default **720** (1 h at 5 s).
    /// At least 1.
    pub history_samples: usize,
    /// Newest samples the trend is fitted over. Default **60** (5 min at
    /// 5 s). In `[2, history_samples]`.
    pub trend_window_samples: usize,
    /// The budget that alerts are raised against. Default **none**: the
    /// monitor samples and exports but raises no alerts.
    pub budget: Option<MemoryBudget>,
    /// Which source the budget applies to. Default [`Measure::Rss`].
    pub budget_measure: Measure,
    /// Hysteresis margin as a fraction of the budget's limit: a level
    /// re-arms only once the measure falls below its line minus this.
    /// Default **0.05** (5 % of the limit). In `[0, 1)`.
    pub hysteresis_fraction: f64,
    /// CUDA device whose memory is sampled (with the `cuda` feature).
    /// Default **`Some(0)`**; `None` disables the GPU source. The first
    /// sample retains the device's primary CUDA context, which costs device
    /// memory if nothing else in the process has created it yet.
    pub gpu_device: Option<usize>,
    /// Append one JSON line per sample to this file (created if missing,
    /// flushed after every line). Default **none**.
    pub jsonl_path: Option<PathBuf>,
    /// Serve the Prometheus text format at `http://127.0.0.1:PORT/metrics`
    /// (loopback only; `0` picks a free port, see
    /// [`MonitorHandle::prometheus_addr`](crate::MonitorHandle::prometheus_addr)).
    /// Needs [`Builder::spawn`](crate::Builder::spawn). Default **none**.
    pub prometheus_port: Option<u16>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            history_samples: 720,
            trend_window_samples: 60,
            budget: None,
            budget_measure: Measure::Rss,
            hysteresis_fraction: 0.05,
            gpu_device: Some(0),
            jsonl_path: None,
            prometheus_port: None,
        }
    }
}

impl Config {
    /// Checks every value; the error names the key, the value and what is
    /// allowed.
    pub fn validate(&self) -> Result<()> {
        if self.interval.is_zero() {
            return Err(Error::config(
                "interval",
                self.interval,
                "> 0 (e.g. 5 s; milliseconds are fine)",
            ));
        }
        if self.history_samples == 0 {
            return Err(Error::config("history_samples", 0, ">= 1"));
        }
        if self.trend_window_samples < 2 || self.trend_window_samples > self.history_samples {
            return Err(Error::config(
                "trend_window_samples",
                self.trend_window_samples,
                format!("[2, history_samples = {}]", self.history_samples),
            ));
        }
        if !(0.0..1.0).contains(&self.hysteresis_fraction) {
            return Err(Error::config(
                "hysteresis_fraction",
                self.hysteresis_fraction,
                "[0, 1) (a fraction of the budget's limit)",
            ));
        }
        if let Some(b) = &self.budget {
            b.validate()?;
        }
        if let Measure::Component(name) = &self.budget_measure {
            if name.is_empty() {
                return Err(Error::config(
                    "budget_measure",
                    &self.budget_measure,
                    "a non-empty component name",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.interval, Duration::from_secs(5));
        assert_eq!(c.history_samples, 720);
        assert_eq!(c.trend_window_samples, 60);
        assert_eq!(c.hysteresis_fraction, 0.05);
        assert_eq!(c.budget_measure, Measure::Rss);
        assert_eq!(c.budget, None);
    }

    #[test]
    fn errors_name_key_value_and_allowed() {
        let check = |c: Config, key: &str| {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
            assert!(e.contains("allowed") || e.contains("outside"), "{e}");
        };
        check(
            Config {
                interval: Duration::ZERO,
                ..Config::default()
            },
            "interval = 0ns",
        );
        check(
            Config {
                history_samples: 0,
                ..Config::default()
            },
            "history_samples = 0",
        );
        check(
            Config {
                trend_window_samples: 1,
                ..Config::default()
            },
            "trend_window_samples = 1",
        );
        check(
            Config {
                history_samples: 10,
                ..Config::default()
            },
            "history_samples = 10",
        );
        check(
            Config {
                hysteresis_fraction: -0.1,
                ..Config::default()
            },
            "hysteresis_fraction = -0.1",
        );
        let mut b = MemoryBudget::new(100u64);
        b.warning_fraction = 2.0;
        check(
            Config {
                budget: Some(b),
                ..Config::default()
            },
            "warning_fraction",
        );
        check(
            Config {
                budget_measure: Measure::Component(String::new()),
                ..Config::default()
            },
            "budget_measure",
        );
    }

    #[test]
    fn measure_names() {
        assert_eq!(Measure::Rss.to_string(), "rss");
        assert_eq!(
            Measure::Component("replay".into()).to_string(),
            "component:replay"
        );
    }
}
