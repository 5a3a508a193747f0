//! [`MemoryBudget`]: a byte limit with the warning and critical fractions at
//! which the system reacts, and the [`Pressure`] of a usage against it.

use crate::ByteSize;

/// A memory limit and the fractions of it at which pressure is raised.
///
/// Defaults follow the seed system: warning at 75 %, critical at 90 %.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryBudget {
    /// The limit in bytes.
    pub limit_bytes: u64,
    /// Fraction of the limit at which [`Pressure::Warning`] starts, in (0, 1].
    pub warning_fraction: f64,
    /// Fraction of the limit at which [`Pressure::Critical`] starts, in
    /// [`warning_fraction`](Self::warning_fraction), 1].
    pub critical_fraction: f64,
}

/// How close a usage is to its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pressure {
    /// Below the warning fraction.
    Normal,
    /// At or above the warning fraction, below critical.
    Warning,
    /// At or above the critical fraction, below the limit.
    Critical,
    /// At or above the limit itself.
    Exceeded,
}

/// A budget whose numbers make no sense.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BudgetError {
    /// The limit is zero.
    #[error("memory budget limit_bytes must be > 0")]
    ZeroLimit,
    /// A fraction is outside its allowed range.
    #[error("memory budget {name} = {value} is outside {allowed}")]
    Fraction {
        /// `warning_fraction` or `critical_fraction`.
        name: &'static str,
        /// The rejected value.
        value: f64,
        /// The allowed range, in words.
        allowed: &'static str,
    },
}

impl MemoryBudget {
    /// A budget of `limit` with the default 75 % / 90 % fractions.
    pub fn new(limit: impl Into<ByteSize>) -> Self {
        Self {
            limit_bytes: limit.into().bytes(),
            warning_fraction: 0.75,
            critical_fraction: 0.90,
        }
    }

    /// Checks that the limit is positive and 0 < warning <= critical <= 1.
    pub fn validate(&self) -> Result<(), BudgetError> {
        if self.limit_bytes == 0 {
            return Err(BudgetError::ZeroLimit);
        }
        let w = self.warning_fraction;
        if !(w > 0.0 && w <= 1.0) {
            return Err(BudgetError::Fraction {
                name: "warning_fraction",
                value: w,
                allowed: "(0, 1]",
            });
        }
        let c = self.critical_fraction;
        if !(c >= w && c <= 1.0) {
            return Err(BudgetError::Fraction {
                name: "critical_fraction",
                value: c,
                allowed: "[warning_fraction, 1]",
            });
        }
        Ok(())
    }

    /// Bytes at which [`Pressure::Warning`] starts.
    pub fn warning_bytes(&self) -> u64 {
        (self.limit_bytes as f64 * self.warning_fraction) as u64
    }

    /// Bytes at which [`Pressure::Critical`] starts.
    pub fn critical_bytes(&self) -> u64 {
        (self.limit_bytes as f64 * self.critical_fraction) as u64
    }

    /// The pressure of `used_bytes` against this budget.
    pub fn pressure(&self, used_bytes: u64) -> Pressure {
        if used_bytes >= self.limit_bytes {
            Pressure::Exceeded
        } else if used_bytes >= self.critical_bytes() {
            Pressure::Critical
        } else if used_bytes >= self.warning_bytes() {
            Pressure::Warning
        } else {
            Pressure::Normal
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_levels_follow_fractions() {
        let b = MemoryBudget::new(1000u64);
        assert_eq!(b.pressure(0), Pressure::Normal);
        assert_eq!(b.pressure(749), Pressure::Normal);
        assert_eq!(b.pressure(750), Pressure::Warning);
        assert_eq!(b.pressure(900), Pressure::Critical);
        assert_eq!(b.pressure(1000), Pressure::Exceeded);
    }

    #[test]
    fn validate_names_the_bad_field() {
        assert_eq!(
            MemoryBudget::new(0u64).validate(),
            Err(BudgetError::ZeroLimit)
        );
        let mut b = MemoryBudget::new(10u64);
        b.critical_fraction = 0.5;
        let e = b.validate().unwrap_err();
        assert!(e.to_string().contains("critical_fraction"), "{e}");
        b.critical_fraction = 0.9;
        b.warning_fraction = f64::NAN;
        assert!(b
            .validate()
            .unwrap_err()
            .to_string()
            .contains("warning_fraction"));
    }
}
