//! [`Bar`] (one OHLCV bar), [`Regime`] (the planted market state of a
//! synthetic bar) and [`BarInterval`] (a series' bar spacing).

use serde::{Deserialize, Serialize};

/// One OHLCV bar. `ts` is the bar's open time in Unix seconds (UTC).
///
/// Invariants (checked by the CSV loader, kept by the generator and the
/// aggregator): all prices finite and > 0, `low <= min(open, close)`,
/// `high >= max(open, close)`, `volume` finite and >= 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bar {
    /// Open time, Unix seconds.
    pub ts: i64,
    /// First trade price.
    pub open: f64,
    /// Highest price.
    pub high: f64,
    /// Lowest price.
    pub low: f64,
    /// Last trade price.
    pub close: f64,
    /// Traded volume.
    pub volume: f64,
}

impl Bar {
    /// Whether the OHLCV invariants hold.
    pub fn is_valid(&self) -> bool {
        let finite = [self.open, self.high, self.low, self.close, self.volume]
            .iter()
            .all(|v| v.is_finite());
        finite
            && self.low > 0.0
            && self.low <= self.open.min(self.close)
            && self.high >= self.open.max(self.close)
            && self.volume >= 0.0
    }
}

/// The market regime a synthetic bar was generated in (the ground truth
/// the learner and the tests can check themselves against).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Regime {
    /// Positive drift, moderate volatility.
    TrendingUp,
    /// Negative drift, moderate volatility.
    TrendingDown,
    /// No drift, low volatility, mean reversion.
    Ranging,
    /// No drift, high volatility.
    HighVolatility,
}

impl Regime {
    /// All regimes, in index order.
    pub const ALL: [Regime; 4] = [
        Regime::TrendingUp,
        Regime::TrendingDown,
        Regime::Ranging,
        Regime::HighVolatility,
    ];

    /// Index in [`Regime::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The spacing of a bar series, in seconds (300 for 5-minute bars).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BarInterval(pub i64);

impl BarInterval {
    /// 1-minute bars.
    pub const M1: Self = Self(60);
    /// 5-minute bars (the tactical default).
    pub const M5: Self = Self(300);
    /// 30-minute bars (the structure default: 6 × 5 minutes).
    pub const M30: Self = Self(1800);
    /// 1-hour bars.
    pub const H1: Self = Self(3600);
    /// Daily bars.
    pub const D1: Self = Self(86_400);

    /// Seconds per bar.
    pub fn seconds(self) -> i64 {
        self.0
    }
}

impl std::fmt::Display for BarInterval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0;
        if s % 86_400 == 0 {
            write!(f, "{}d", s / 86_400)
        } else if s % 3600 == 0 {
            write!(f, "{}h", s / 3600)
        } else if s % 60 == 0 {
            write!(f, "{}m", s / 60)
        } else {
            write!(f, "{s}s")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_and_display() {
        let b = Bar {
            ts: 0,
            open: 10.0,
            high: 11.0,
            low: 9.5,
            close: 10.5,
            volume: 3.0,
        };
        assert!(b.is_valid());
        assert!(!Bar { high: 10.2, ..b }.is_valid(), "high below close");
        assert!(!Bar { volume: -1.0, ..b }.is_valid());
        assert!(!Bar { low: f64::NAN, ..b }.is_valid());
        assert_eq!(BarInterval::M5.to_string(), "5m");
        assert_eq!(BarInterval::H1.to_string(), "1h");
        assert_eq!(BarInterval::D1.to_string(), "1d");
        assert_eq!(BarInterval(90).to_string(), "90s");
    }
}
