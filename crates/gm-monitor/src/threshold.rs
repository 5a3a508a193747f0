//! Budget thresholds with hysteresis: [`ThresholdTracker`] (a pure state
//! machine fed one value at a time) and the [`Alert`] it raises.
//!
//! # Design
//!
//! The tracker holds a state, one of [`Pressure`]'s levels, that starts at
//! `Normal`. Each value `v` is compared with the budget's lines — warning
//! `W = limit × warning_fraction`, critical `C = limit × critical_fraction`,
//! and the limit `L` itself — and with a margin `m = limit ×
//! hysteresis_fraction` (default 5 % of the limit):
//!
//! - **Up** at once: if `budget.pressure(v)` is above the state, the state
//!   jumps to it and one alert of that level is raised (`Normal → Critical`
//!   in one sample raises one `Critical`, not a `Warning` too).
//! - **Down** only past the margin: the state falls to the highest level
//!   whose line minus `m` is still `<= v`, and if that is below the state,
//!   one [`AlertLevel::Recovered`] is raised whose
//!   [`pressure`](Alert::pressure) says which level it fell to (`Warning`
//!   after a critical episode, `Normal` at the end of it).
//! - Otherwise nothing.
//!
//! So every alert is one change of state, a value hovering at a line
//! (within `m` below it) raises exactly one alert, and a level re-arms
//! only after the value has fallen below its line minus `m`. With the
//! defaults (75 % / 90 %, `m` = 5 %): warning at 75 %, recovered below 70 %;
//! critical at 90 %, back to warning below 85 %; exceeded at 100 %, back
//! to critical below 95 %. A margin of 0 gives plain thresholds (and a
//! storm for a value that hovers).

use crate::config::Measure;
use crate::trend::Trend;
use gm_core::{MemoryBudget, Pressure};
use std::time::{Duration, SystemTime};

/// What an [`Alert`] announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlertLevel {
    /// The measure reached the warning line.
    Warning,
    /// The measure reached the critical line.
    Critical,
    /// The measure reached the budget's limit itself.
    Exceeded,
    /// The measure fell below a level's line minus the hysteresis margin;
    /// [`Alert::pressure`] is the level it is at now.
    Recovered,
}

impl AlertLevel {
    /// Lower-case name (`"warning"`, ...), as in logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            AlertLevel::Warning => "warning",
            AlertLevel::Critical => "critical",
            AlertLevel::Exceeded => "exceeded",
            AlertLevel::Recovered => "recovered",
        }
    }

    /// The level announcing a rise to `p` (`None` for `Normal`).
    fn rising_to(p: Pressure) -> Option<Self> {
        match p {
            Pressure::Normal => None,
            Pressure::Warning => Some(AlertLevel::Warning),
            Pressure::Critical => Some(AlertLevel::Critical),
            Pressure::Exceeded => Some(AlertLevel::Exceeded),
        }
    }
}

/// A change of the alert state, as handed to
/// [`Builder::on_alert`](crate::Builder::on_alert) callbacks.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// What happened.
    pub level: AlertLevel,
    /// The state now (for `Recovered`: the level it fell to).
    pub pressure: Pressure,
    /// The state before this sample.
    pub previous: Pressure,
    /// Which measure the budget applies to.
    pub source: Measure,
    /// The measure's value in this sample.
    pub value_bytes: u64,
    /// The budget it was compared with.
    pub budget: MemoryBudget,
    /// The measure's trend, this sample included.
    pub trend: Trend,
    /// Wall-clock time of the sample.
    pub at: SystemTime,
    /// Monotonic time of the sample since the monitor was built.
    pub elapsed: Duration,
    /// [`Sample::seq`](crate::Sample::seq) of the sample.
    pub sample_seq: u64,
}

/// One change of state reported by [`ThresholdTracker::observe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The alert it raises.
    pub level: AlertLevel,
    /// State before.
    pub from: Pressure,
    /// State after.
    pub to: Pressure,
}

/// The threshold and hysteresis state machine (see the module docs), with
/// no threads and no clock: feed it values, it says when the state changes.
///
/// ```
/// use gm_core::{MemoryBudget, Pressure};
/// use gm_monitor::{AlertLevel, ThresholdTracker};
/// let mut t = ThresholdTracker::new(MemoryBudget::new(1000u64), 0.05).unwrap();
/// assert_eq!(t.observe(760).unwrap().level, AlertLevel::Warning);
/// assert_eq!(t.observe(740), None); // above 750 - 50: still warning
/// let r = t.observe(690).unwrap(); // below 700: re-armed
/// assert_eq!((r.level, r.to), (AlertLevel::Recovered, Pressure::Normal));
/// ```
#[derive(Debug, Clone)]
pub struct ThresholdTracker {
    budget: MemoryBudget,
    margin_bytes: u64,
    state: Pressure,
}

impl ThresholdTracker {
    /// A tracker for `budget` with a margin of `hysteresis_fraction` of the
    /// limit, in `[0, 1)`. Errors on an invalid budget or fraction.
    pub fn new(budget: MemoryBudget, hysteresis_fraction: f64) -> crate::Result<Self> {
        budget.validate()?;
        if !(0.0..1.0).contains(&hysteresis_fraction) {
            return Err(crate::Error::config(
                "hysteresis_fraction",
                hysteresis_fraction,
                "[0, 1) (a fraction of the budget's limit)",
            ));
        }
        Ok(Self {
            budget,
            margin_bytes: (budget.limit_bytes as f64 * hysteresis_fraction) as u64,
            state: Pressure::Normal,
        })
    }

    /// The budget.
    pub fn budget(&self) -> MemoryBudget {
        self.budget
    }

    /// The hysteresis margin in bytes.
    pub fn margin_bytes(&self) -> u64 {
        self.margin_bytes
    }

    /// The current state.
    pub fn state(&self) -> Pressure {
        self.state
    }

    /// The line at which `p` starts (`0` for `Normal`).
    fn line(&self, p: Pressure) -> u64 {
        match p {
            Pressure::Normal => 0,
            Pressure::Warning => self.budget.warning_bytes(),
            Pressure::Critical => self.budget.critical_bytes(),
            Pressure::Exceeded => self.budget.limit_bytes,
        }
    }

    /// The highest level whose line minus the margin is `<= value`.
    fn sticky_level(&self, value: u64) -> Pressure {
        [Pressure::Exceeded, Pressure::Critical, Pressure::Warning]
            .into_iter()
            .find(|&p| value >= self.line(p).saturating_sub(self.margin_bytes))
            .unwrap_or(Pressure::Normal)
    }

    /// Feeds one value; returns the change of state it causes, if any.
    pub fn observe(&mut self, value: u64) -> Option<Transition> {
        let from = self.state;
        let raw = self.budget.pressure(value);
        if raw > from {
            self.state = raw;
            return AlertLevel::rising_to(raw).map(|level| Transition {
                level,
                from,
                to: raw,
            });
        }
        let sticky = self.sticky_level(value);
        if sticky < from {
            self.state = sticky;
            return Some(Transition {
                level: AlertLevel::Recovered,
                from,
                to: sticky,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> ThresholdTracker {
        // 1 000 000 bytes: warning 750 000, critical 900 000, margin 50 000.
        ThresholdTracker::new(MemoryBudget::new(1_000_000u64), 0.05).unwrap()
    }

    fn levels(t: &mut ThresholdTracker, values: impl IntoIterator<Item = u64>) -> Vec<Transition> {
        values.into_iter().filter_map(|v| t.observe(v)).collect()
    }

    #[test]
    fn crossing_the_warning_line_once_gives_one_warning() {
        let mut t = tracker();
        let series = (0..200u64).map(|i| 600_000 + i * 1_000); // 60 % -> 80 %
        let got = levels(&mut t, series);
        assert_eq!(
            got,
            vec![Transition {
                level: AlertLevel::Warning,
                from: Pressure::Normal,
                to: Pressure::Warning
            }]
        );
        assert_eq!(t.state(), Pressure::Warning);
    }

    #[test]
    fn hovering_at_the_line_gives_exactly_one_alert() {
        let mut t = tracker();
        // ±1 % around 75 %, alternating and with a slow wobble: 1000 samples.
        let series = (0..1000u64).map(|i| {
            let wobble = (i * 37 % 21) * 1_000; // 0..=20 000
            740_000 + wobble // 74 % ..= 76 %
        });
        let got = levels(&mut t, series);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].level, AlertLevel::Warning);
    }

    #[test]
    fn hovering_without_margin_storms() {
        // The reason for the margin: the same series with none.
        let mut t = ThresholdTracker::new(MemoryBudget::new(1_000_000u64), 0.0).unwrap();
        let got = levels(&mut t, (0..1000u64).map(|i| 740_000 + (i % 2) * 20_000));
        assert_eq!(got.len(), 999); // every sample but the first
    }

    #[test]
    fn going_critical_then_exceeded_then_recovering_step_by_step() {
        let mut t = tracker();
        let got = levels(
            &mut t,
            [
                500_000,   // normal
                800_000,   // -> warning
                910_000,   // -> critical
                870_000,   // above 850 000: stays critical
                1_000_000, // -> exceeded
                960_000,   // above 950 000: stays exceeded
                940_000,   // -> critical (recovered)
                840_000,   // -> warning (recovered)
                720_000,   // above 700 000: stays warning
                690_000,   // -> normal (recovered)
                760_000,   // re-armed: warning again
            ],
        );
        let seen: Vec<_> = got.iter().map(|x| (x.level, x.to)).collect();
        use AlertLevel as A;
        use Pressure as P;
        assert_eq!(
            seen,
            vec![
                (A::Warning, P::Warning),
                (A::Critical, P::Critical),
                (A::Exceeded, P::Exceeded),
                (A::Recovered, P::Critical),
                (A::Recovered, P::Warning),
                (A::Recovered, P::Normal),
                (A::Warning, P::Warning),
            ]
        );
    }

    #[test]
    fn a_jump_raises_one_alert_of_the_new_level() {
        let mut t = tracker();
        let got = levels(&mut t, [100_000, 950_000, 100_000]);
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].level, got[0].from),
            (AlertLevel::Critical, Pressure::Normal)
        );
        assert_eq!(
            (got[1].level, got[1].from, got[1].to),
            (AlertLevel::Recovered, Pressure::Critical, Pressure::Normal)
        );
    }

    #[test]
    fn hovering_at_the_critical_line_after_a_warning_gives_one_more() {
        let mut t = tracker();
        let series =
            std::iter::once(800_000).chain((0..1000u64).map(|i| 890_000 + (i % 3) * 10_000));
        let got = levels(&mut t, series);
        let lv: Vec<_> = got.iter().map(|x| x.level).collect();
        assert_eq!(lv, vec![AlertLevel::Warning, AlertLevel::Critical]);
    }

    #[test]
    fn bad_fraction_is_an_error_naming_the_key() {
        let e = ThresholdTracker::new(MemoryBudget::new(10u64), 1.5).unwrap_err();
        assert!(e.to_string().contains("hysteresis_fraction"), "{e}");
        assert!(ThresholdTracker::new(MemoryBudget::new(10u64), f64::NAN).is_err());
        assert!(ThresholdTracker::new(MemoryBudget::new(0u64), 0.05).is_err());
    }
}
