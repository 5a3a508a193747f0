//! What a pass is asked to do ([`Trigger`], its tier → level plan, an
//! optional [`Target`]) and what it did ([`PassReport`], one
//! [`ComponentReport`] per component visited). Reports serialize with serde
//! (JSON for gm-system's report).

use crate::measure::{Rss, TrimOutcome};
use gm_core::{MemoryBudget, Pressure, ReclaimLevel, ReclaimTier};
use serde::{Deserialize, Serialize};

/// The tiers, cheapest first: the order in which every pass visits them.
pub const TIER_ORDER: [ReclaimTier; 3] = [
    ReclaimTier::Cache,
    ReclaimTier::Compressible,
    ReclaimTier::State,
];

/// Why a pass runs. Ordered from the mildest to the strongest.
///
/// Each trigger asks each tier at one level, or leaves it alone
/// ([`level_for`](Trigger::level_for)):
///
/// | trigger | Cache | Compressible | State |
/// |---|---|---|---|
/// | `Periodic` | Cheap | — | — |
/// | `Warning` | Moderate | Moderate | — |
/// | `Critical` | Emergency | Emergency | Moderate |
/// | `Exceeded` | Emergency | Emergency | Emergency |
/// | `Emergency` | Emergency | Emergency | Emergency |
///
/// Why: the table is monotone (a stronger trigger asks every tier at least
/// as hard as a milder one), and a tier is asked harder than the tier above
/// it only when that costs nothing lasting. A periodic pass is housekeeping:
/// only caches, only what is free to give (plus the trim, which is what
/// returns memory on schedule). A warning "reclaims the cheap tiers": caches
/// shrink and cold data is compressed (`SharedReplay` compresses half its
/// cold chunks at `Moderate`), working state is left alone. Critical
/// "reclaims all": caches and compressible data give everything, working
/// state trades speed for memory but is not rebuilt; only `Exceeded` or an
/// explicit emergency asks working state for everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The periodic timer ([`Config::period`](crate::Config::period)).
    Periodic,
    /// [`Pressure::Warning`].
    Warning,
    /// [`Pressure::Critical`].
    Critical,
    /// [`Pressure::Exceeded`].
    Exceeded,
    /// An explicit [`Handle::emergency`](crate::Handle::emergency).
    Emergency,
}

impl Trigger {
    /// The trigger for a pressure level; `None` for [`Pressure::Normal`]
    /// (nothing to do).
    pub fn for_pressure(p: Pressure) -> Option<Trigger> {
        match p {
            Pressure::Normal => None,
            Pressure::Warning => Some(Trigger::Warning),
            Pressure::Critical => Some(Trigger::Critical),
            Pressure::Exceeded => Some(Trigger::Exceeded),
        }
    }

    /// The level at which this trigger asks `tier`, or `None` when it
    /// leaves the tier alone (the table on [`Trigger`]).
    pub fn level_for(self, tier: ReclaimTier) -> Option<ReclaimLevel> {
        use ReclaimLevel::{Cheap, Emergency, Moderate};
        use ReclaimTier::{Cache, Compressible, State};
        match (self, tier) {
            (Trigger::Periodic, Cache) => Some(Cheap),
            (Trigger::Periodic, _) => None,
            (Trigger::Warning, Cache | Compressible) => Some(Moderate),
            (Trigger::Warning, State) => None,
            (Trigger::Critical, Cache | Compressible) => Some(Emergency),
            (Trigger::Critical, State) => Some(Moderate),
            (Trigger::Exceeded | Trigger::Emergency, _) => Some(Emergency),
        }
    }

    /// The whole plan: (tier, level) in visiting order, skipped tiers left
    /// out.
    pub fn plan(self) -> Vec<(ReclaimTier, ReclaimLevel)> {
        TIER_ORDER
            .iter()
            .filter_map(|&t| self.level_for(t).map(|l| (t, l)))
            .collect()
    }
}

/// What a [`Target`] is measured on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// The heap gauge given to [`Builder::heap_gauge`](crate::Builder::heap_gauge).
    Heap,
    /// Resident anonymous memory ([`Rss::anon_bytes`]).
    RssAnon,
    /// All resident memory ([`Rss::resident_bytes`]).
    Rss,
}

impl Metric {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Metric::Heap => "heap",
            Metric::RssAnon => "rss_anon",
            Metric::Rss => "rss",
        }
    }
}

/// Stop a pass as soon as `metric` is below `below_bytes`.
///
/// Checked before each component (so a pass whose target is already met
/// visits nothing) and once at the end. For the RSS metrics the coordinator
/// trims first (when [`Config::trim_after_pass`](crate::Config::trim_after_pass)
/// is on), since freed heap does not leave RSS until trimmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// What is measured.
    pub metric: Metric,
    /// The pass stops once the measurement is below this.
    pub below_bytes: u64,
}

impl Target {
    /// Reclaim until `metric` is below the budget's warning line.
    pub fn below_warning(budget: &MemoryBudget, metric: Metric) -> Self {
        Self {
            metric,
            below_bytes: budget.warning_bytes(),
        }
    }
}

/// A registered component's id (unique for the coordinator's lifetime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ComponentId(pub u64);

/// A live registered component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentInfo {
    /// Its id.
    pub id: ComponentId,
    /// [`Reclaim::name`](gm_core::Reclaim::name).
    pub name: String,
    /// [`Reclaim::tier`](gm_core::Reclaim::tier).
    #[serde(with = "TierDef")]
    pub tier: ReclaimTier,
}

/// How one component's reclaim ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum Outcome {
    /// It returned.
    Ok,
    /// It panicked (caught); the pass went on with the next component.
    Panicked {
        /// The panic message.
        message: String,
    },
}

/// One component's part of a pass: what it claimed next to what was
/// measured.
///
/// The measured figures are `before - after` around this component's
/// `reclaim` call alone (positive = freed, negative = grew). They are
/// process-wide readings, so other threads' allocations in the same window
/// show up as noise; RSS moves only for memory the allocator handed back to
/// the OS at once (large blocks), the rest shows in the pass's trim figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentReport {
    /// Its id.
    pub id: ComponentId,
    /// Its name.
    pub name: String,
    /// Its tier.
    #[serde(with = "TierDef")]
    pub tier: ReclaimTier,
    /// The level it was asked at.
    #[serde(with = "LevelDef")]
    pub level: ReclaimLevel,
    /// Its own estimate before the call ([`Reclaim::reclaimable_bytes`](gm_core::Reclaim::reclaimable_bytes));
    /// `None` if that panicked.
    pub reclaimable_bytes: Option<u64>,
    /// What `reclaim` returned: the component's claim (0 if it panicked).
    pub claimed_bytes: u64,
    /// Heap gauge before minus after; `None` without a gauge.
    pub heap_freed_bytes: Option<i64>,
    /// Resident anonymous memory before minus after; `None` without RSS.
    pub rss_anon_freed_bytes: Option<i64>,
    /// Wall time of the `reclaim` call, microseconds (informational).
    pub duration_us: u64,
    /// Whether it returned or panicked.
    pub outcome: Outcome,
}

/// Everything one pass did, with the claimed and the measured bytes side by
/// side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PassReport {
    /// Pass number, from 1, in the order passes ran.
    pub seq: u64,
    /// Why it ran.
    pub trigger: Trigger,
    /// The target it stopped at, if one was given.
    pub target: Option<Target>,
    /// `Some(true)` if the target was met (the pass stopped there or ended
    /// below it), `Some(false)` if not, `None` without a target.
    pub target_reached: Option<bool>,
    /// Pressure signals merged into this pass (queued signals run as one
    /// pass of the strongest); 0 for synchronous passes.
    pub signals_merged: u32,
    /// Wall-clock start, milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// Wall time of the whole pass including the trim, microseconds.
    pub duration_us: u64,
    /// The components visited, in visiting order (tier, then registration).
    pub components: Vec<ComponentReport>,
    /// Components in the plan left unvisited because the target was met
    /// or the coordinator was stopping.
    pub skipped_components: usize,
    /// The pass stopped early because the coordinator is shutting down.
    pub interrupted: bool,
    /// Heap gauge at the start; `None` without a gauge.
    pub heap_before_bytes: Option<u64>,
    /// Heap gauge after the last component.
    pub heap_after_bytes: Option<u64>,
    /// RSS at the start; `None` where it cannot be read.
    pub rss_before: Option<Rss>,
    /// RSS after the last component, before the final trim.
    pub rss_after_reclaim: Option<Rss>,
    /// RSS after the final trim; `None` when no trim ran.
    pub rss_after_trim: Option<Rss>,
    /// What trimming did (`Released` if any trim in the pass released).
    pub trim: TrimOutcome,
    /// How many times `malloc_trim` ran (1 after the pass, plus one per
    /// check of an RSS target).
    pub trim_calls: u32,
}

impl PassReport {
    /// Sum of the components' claims.
    pub fn claimed_bytes(&self) -> u64 {
        self.components.iter().map(|c| c.claimed_bytes).sum()
    }

    /// Heap gauge drop over the pass (positive = freed).
    pub fn heap_freed_bytes(&self) -> Option<i64> {
        Some(self.heap_before_bytes? as i64 - self.heap_after_bytes? as i64)
    }

    /// Resident anonymous memory drop over the whole pass, trim included
    /// when it ran (positive = freed).
    pub fn rss_anon_freed_bytes(&self) -> Option<i64> {
        let before = self.rss_before?;
        let after = self.rss_after_trim.or(self.rss_after_reclaim)?;
        Some(before.anon_bytes as i64 - after.anon_bytes as i64)
    }

    /// The part of [`rss_anon_freed_bytes`](Self::rss_anon_freed_bytes)
    /// that the final trim released.
    pub fn trim_freed_bytes(&self) -> Option<i64> {
        Some(self.rss_after_reclaim?.anon_bytes as i64 - self.rss_after_trim?.anon_bytes as i64)
    }

    /// The components whose reclaim panicked.
    pub fn failures(&self) -> impl Iterator<Item = &ComponentReport> {
        self.components
            .iter()
            .filter(|c| !matches!(c.outcome, Outcome::Ok))
    }
}

/// Counters over the coordinator's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Passes run (all triggers).
    pub passes: u64,
    /// Pressure signals accepted by [`Handle::on_pressure`](crate::Handle::on_pressure)
    /// and its sinks (`Normal` is not counted: it is not a signal).
    pub signals_received: u64,
    /// Signals folded into a pass together with others.
    pub signals_merged: u64,
    /// Signals dropped by [`Config::min_pressure_interval`](crate::Config::min_pressure_interval).
    pub signals_dropped: u64,
    /// Component reclaims that panicked.
    pub component_panics: u64,
}

// gm-core's enums carry no serde (it has no dependencies); mirror them.
#[derive(Serialize, Deserialize)]
#[serde(remote = "ReclaimTier", rename_all = "snake_case")]
enum TierDef {
    Cache,
    Compressible,
    State,
}

#[derive(Serialize, Deserialize)]
#[serde(remote = "ReclaimLevel", rename_all = "snake_case")]
enum LevelDef {
    Cheap,
    Moderate,
    Emergency,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_is_monotone_and_matches_the_table() {
        use ReclaimLevel::*;
        use ReclaimTier::*;
        assert_eq!(Trigger::Periodic.plan(), vec![(Cache, Cheap)]);
        assert_eq!(
            Trigger::Warning.plan(),
            vec![(Cache, Moderate), (Compressible, Moderate)]
        );
        assert_eq!(
            Trigger::Critical.plan(),
            vec![
                (Cache, Emergency),
                (Compressible, Emergency),
                (State, Moderate)
            ]
        );
        for t in [Trigger::Exceeded, Trigger::Emergency] {
            assert_eq!(
                t.plan(),
                vec![
                    (Cache, Emergency),
                    (Compressible, Emergency),
                    (State, Emergency)
                ]
            );
        }
        let all = [
            Trigger::Periodic,
            Trigger::Warning,
            Trigger::Critical,
            Trigger::Exceeded,
            Trigger::Emergency,
        ];
        for w in all.windows(2) {
            for tier in TIER_ORDER {
                assert!(
                    w[0].level_for(tier) <= w[1].level_for(tier),
                    "{w:?} {tier:?}"
                );
            }
        }
        assert_eq!(Trigger::for_pressure(Pressure::Normal), None);
        assert_eq!(
            Trigger::for_pressure(Pressure::Critical),
            Some(Trigger::Critical)
        );
    }

    #[test]
    fn target_below_warning_uses_the_budget_line() {
        let b = MemoryBudget::new(1000u64);
        let t = Target::below_warning(&b, Metric::Heap);
        assert_eq!(t.below_bytes, 750);
    }
}
