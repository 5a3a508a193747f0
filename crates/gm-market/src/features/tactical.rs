//! Tactical features: one row of the 5-minute matrix (60 × 7) per bar —
//! fair-value gaps, 5-bar momentum and relative volume — computed
//! incrementally, with a naive reference ([`TacticalFeatures::from_history`]).
//!
//! # The row
//!
//! [`TacticalFeatures::push`] takes the next closed bar (5-minute bars for
//! the GrandModel embedders, but nothing here depends on the spacing) and
//! returns `Ok(Some(row))` for that bar, or `Ok(None)` while warming up.
//! The pipeline keeps the last [`TACTICAL_WINDOW_ROWS`] (60) rows as the
//! window and normalises each column with [`crate::RunningNorm`]; the
//! values here are **raw**. Columns, in order ([`TACTICAL_FEATURE_NAMES`]):
//!
//! | # | name | definition | raw range |
//! |---|---|---|---|
//! | 0 | `fvg_bullish_active` | 1 if at least one bullish gap is active after this bar, else 0 | {0, 1} |
//! | 1 | `fvg_bearish_active` | 1 if at least one bearish gap is active after this bar, else 0 | {0, 1} |
//! | 2 | `fvg_nearest_level` | the near edge (see below) of the active gap nearest to `close[t]`; `close[t]` itself when no gap is active | a price, > 0 |
//! | 3 | `fvg_mitigation_signal` | 1 if at least one active gap (either side) was mitigated **by this bar**, else 0 | {0, 1} |
//! | 4 | `price_momentum_5` | `(close[t] / close[t−L] − 1) · 100`, `L` = [`TacticalConfig::momentum_lag_bars`] (5) | percent, > −100 |
//! | 5 | `volume_ratio` | `volume[t] / mean(volume[t−N+1 ..= t])`, `N` = [`TacticalConfig::volume_window_bars`] (20); 1 when that mean is 0 | [0, N] |
//! | 6 | `fvg_gap_size_pct` | the unfilled size of the same nearest active gap `/ close[t] · 100`; 0 when no gap is active | percent, ≥ 0 |
//!
//! `fvg_nearest_level − close[t]` is therefore 0 exactly when no gap pulls
//! on price, negative when the nearest gap is bullish (below price) and
//! positive when it is bearish (above price).
//!
//! # Fair-value gaps
//!
//! **Detection** at bar `t` (`t ≥ 2`, using bars `t−2` and `t`; the middle
//! bar is not inspected):
//! - bullish when `low[t] > high[t−2]`: the gap is `[bottom, top] =
//!   [high[t−2], low[t]]`;
//! - bearish when `high[t] < low[t−2]`: the gap is `[bottom, top] =
//!   [high[t], low[t−2]]`.
//!
//! A bar forms at most one gap (both conditions together would need
//! `low[t] > high[t−2] ≥ low[t−2] > high[t] ≥ low[t]`). A gap is kept only
//! if `(top − bottom) / close[t] · 100 ≥` [`TacticalConfig::min_gap_pct`]
//! (default 0: every gap) and both edges are finite.
//!
//! **Partial fill.** A bullish gap lies below price; its *near edge* starts
//! at `top` and follows price down: after each later bar it is
//! `max(bottom, min(top, min low[j+1 ..= t]))`. A bearish gap lies above
//! price; its near edge starts at `bottom` and is
//! `min(top, max(bottom, max high[j+1 ..= t]))`. The *unfilled size* is
//! the distance from the near edge to the far edge (`near − bottom` for
//! bullish, `top − near` for bearish). Because a bar's close lies inside
//! its range, the close never sits strictly inside the unfilled part of an
//! active gap: bullish near edges are `≤ close[t]`, bearish ones `≥ close[t]`.
//!
//! **Mitigation** (`f` = [`TacticalConfig::mitigation_fill_fraction`],
//! default 1 = *fully* filled): a gap formed at bar `j` is mitigated by the
//! first bar `m > j` that fills at least the fraction `f` of it:
//! - bullish: `low[m] ≤ bottom + (1 − f) · (top − bottom)`;
//! - bearish: `high[m] ≥ top − (1 − f) · (top − bottom)`.
//!
//! With `f = 1` that is "price traded through the whole gap" (`low ≤
//! bottom`, resp. `high ≥ top`); `f = 0.5` is the midpoint ("consequent
//! encroachment"); a small `f` approximates "touched". A mitigated gap
//! leaves the active set, and `fvg_mitigation_signal` is 1 on bar `m` only.
//! The bar that forms a gap can never mitigate it.
//!
//! **Bounds.** Gaps are kept in formation order. On each bar, in this
//! order: (1) gaps older than [`TacticalConfig::max_gap_age_bars`] (288 =
//! one day of 5-minute bars; age = `t − j`) **expire** silently; (2) the
//! remaining gaps are checked for mitigation against the bar and have their
//! near edges updated; (3) a new gap, if any, is appended, and if more than
//! [`TacticalConfig::max_active_gaps`] (50) are then active the oldest is
//! **evicted** silently (it never fires a mitigation signal later). So at
//! most `max_active_gaps` gaps are held and a push costs
//! `O(max_active_gaps + N)`, with no allocation.
//!
//! **Nearest gap**: the active gap minimising `|close[t] − near edge|`;
//! ties go to the most recently formed gap.
//!
//! # Warm-up and bad input
//!
//! `push` returns `Ok(None)` until [`TacticalFeatures::warmup_bars`] bars
//! (`max(L + 1, N, 3)` = 20 by default) have been seen; gaps are tracked
//! from the first bar on, so the first row already knows about gaps formed
//! during the warm-up. A bar that breaks the OHLCV invariants
//! ([`Bar::is_valid`]) is an `Err(Error::Invalid)` and changes nothing (the
//! common contract of [`crate::features`]). Every output is finite, also on
//! extreme valid input: a value that overflows (e.g. a close ratio of
//! 1e300 / 1e-300) takes its neutral value (momentum 0, volume ratio 1, gap
//! size 0).
//!
//! # Incremental = reference
//!
//! [`TacticalFeatures::from_history`] recomputes the row of the last bar of
//! a slice from scratch: it replays the gap rules over the whole prefix
//! with plain index lists, recomputing each gap's near edge and mitigation
//! from the raw lows and highs, and sums the volume window from the slice.
//! The push path and the reference agree exactly (the sums are taken in
//! the same order), which `tests/features_tactical.rs` checks bar by bar,
//! together with the property that changing a later bar never changes an
//! earlier row.

use std::collections::VecDeque;

use super::lvn::check_bar;
use crate::{Bar, Error, Result};

/// Columns of a tactical row.
pub const TACTICAL_DIM: usize = 7;

/// Rows in the tactical window the embedders consume (the last 60 rows).
pub const TACTICAL_WINDOW_ROWS: usize = 60;

/// Column names of a tactical row, in order.
pub const TACTICAL_FEATURE_NAMES: [&str; TACTICAL_DIM] = [
    "fvg_bullish_active",
    "fvg_bearish_active",
    "fvg_nearest_level",
    "fvg_mitigation_signal",
    "price_momentum_5",
    "volume_ratio",
    "fvg_gap_size_pct",
];

/// Largest accepted window, age or capacity, in bars.
pub const MAX_TACTICAL_BARS: usize = 100_000;

/// Settings of [`TacticalFeatures`]; see the module docs for the formulas.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TacticalConfig {
    /// `L` in `price_momentum_5`: bars between the two closes (default 5).
    pub momentum_lag_bars: usize,
    /// `N` in `volume_ratio`: bars in the mean, current bar included
    /// (default 20).
    pub volume_window_bars: usize,
    /// Most gaps held at once, both sides together; the oldest is evicted
    /// beyond this (default 50).
    pub max_active_gaps: usize,
    /// A gap formed at bar `j` expires once `t − j` exceeds this (default
    /// 288: one day of 5-minute bars).
    pub max_gap_age_bars: usize,
    /// Fraction of a gap that must be filled to mitigate it, in `(0, 1]`
    /// (default 1: fully filled).
    pub mitigation_fill_fraction: f64,
    /// Smallest gap kept, as a percentage of the forming bar's close,
    /// `≥ 0` (default 0: every gap).
    pub min_gap_pct: f64,
}

impl Default for TacticalConfig {
    fn default() -> Self {
        Self {
            momentum_lag_bars: 5,
            volume_window_bars: 20,
            max_active_gaps: 50,
            max_gap_age_bars: 288,
            mitigation_fill_fraction: 1.0,
            min_gap_pct: 0.0,
        }
    }
}

impl TacticalConfig {
    /// Checks every field; the error names the field, the value and the
    /// allowed range.
    pub fn validate(&self) -> Result<()> {
        let bars = |key: &'static str, v: usize| {
            if (1..=MAX_TACTICAL_BARS).contains(&v) {
                Ok(())
            } else {
                Err(Error::config(
                    key,
                    v,
                    format!("1 ..= {MAX_TACTICAL_BARS} bars"),
                ))
            }
        };
        bars("momentum_lag_bars", self.momentum_lag_bars)?;
        bars("volume_window_bars", self.volume_window_bars)?;
        bars("max_active_gaps", self.max_active_gaps)?;
        bars("max_gap_age_bars", self.max_gap_age_bars)?;
        let f = self.mitigation_fill_fraction;
        if !(f > 0.0 && f <= 1.0) {
            return Err(Error::config(
                "mitigation_fill_fraction",
                f,
                "a fraction in (0, 1]",
            ));
        }
        let m = self.min_gap_pct;
        if !(m.is_finite() && m >= 0.0) {
            return Err(Error::config("min_gap_pct", m, "a finite percentage >= 0"));
        }
        Ok(())
    }

    /// Bars needed before the first row: `max(L + 1, N, 3)`.
    pub fn warmup_bars(&self) -> usize {
        (self.momentum_lag_bars + 1)
            .max(self.volume_window_bars)
            .max(3)
    }
}

/// Which way a fair-value gap points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GapSide {
    /// `low[t] > high[t−2]`: an up-move imbalance, below price.
    Bullish,
    /// `high[t] < low[t−2]`: a down-move imbalance, above price.
    Bearish,
}

/// One fair-value gap (see the module docs for the rules).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FairValueGap {
    /// Bullish or bearish.
    pub side: GapSide,
    /// Index (0-based count of bars pushed) of the bar that completed the
    /// pattern.
    pub formed_at: u64,
    /// `ts` of that bar.
    pub ts: i64,
    /// Lower edge of the original gap.
    pub bottom: f64,
    /// Upper edge of the original gap.
    pub top: f64,
    /// The unfilled near edge: starts at `top` (bullish) or `bottom`
    /// (bearish) and moves toward the far edge as price fills the gap.
    pub near_edge: f64,
    /// Price whose reach mitigates the gap (`low ≤` it for bullish,
    /// `high ≥` it for bearish).
    pub mitigation_level: f64,
}

impl FairValueGap {
    /// The gap completed at bar `t` by `bar` over `(high, low)` of bar
    /// `t−2`, if any, with the filters of `config` applied.
    fn detect(
        config: &TacticalConfig,
        formed_at: u64,
        two_back: (f64, f64),
        bar: &Bar,
    ) -> Option<Self> {
        let (high2, low2) = two_back;
        let (side, bottom, top) = if bar.low > high2 {
            (GapSide::Bullish, high2, bar.low)
        } else if bar.high < low2 {
            (GapSide::Bearish, bar.high, low2)
        } else {
            return None;
        };
        if !(bottom.is_finite() && top.is_finite()) {
            return None;
        }
        let size = top - bottom;
        // A NaN percentage fails the comparison: no gap.
        let big_enough = size / bar.close * 100.0 >= config.min_gap_pct;
        if !big_enough {
            return None;
        }
        let keep = (1.0 - config.mitigation_fill_fraction) * size;
        let (near_edge, mitigation_level) = match side {
            GapSide::Bullish => (top, bottom + keep),
            GapSide::Bearish => (bottom, top - keep),
        };
        Some(Self {
            side,
            formed_at,
            ts: bar.ts,
            bottom,
            top,
            near_edge,
            mitigation_level,
        })
    }

    /// Size of the original gap, `top − bottom`.
    pub fn size(&self) -> f64 {
        self.top - self.bottom
    }

    /// Size of the part not yet filled.
    pub fn unfilled_size(&self) -> f64 {
        match self.side {
            GapSide::Bullish => self.near_edge - self.bottom,
            GapSide::Bearish => self.top - self.near_edge,
        }
    }

    /// Whether `bar` mitigates this gap.
    fn mitigated_by(&self, bar: &Bar) -> bool {
        match self.side {
            GapSide::Bullish => bar.low <= self.mitigation_level,
            GapSide::Bearish => bar.high >= self.mitigation_level,
        }
    }

    /// Moves the near edge by a bar that did not mitigate the gap.
    fn fill(&mut self, bar: &Bar) {
        match self.side {
            GapSide::Bullish => {
                if bar.low < self.near_edge {
                    self.near_edge = bar.low.max(self.bottom);
                }
            }
            GapSide::Bearish => {
                if bar.high > self.near_edge {
                    self.near_edge = bar.high.min(self.top);
                }
            }
        }
    }
}

/// Incremental tactical feature computer; see the module docs.
#[derive(Debug, Clone)]
pub struct TacticalFeatures {
    config: TacticalConfig,
    seen: u64,
    /// `(high, low)` of the last two bars, oldest first.
    last_two: VecDeque<(f64, f64)>,
    /// The last `L + 1` closes.
    closes: VecDeque<f64>,
    /// The last `N` volumes.
    volumes: VecDeque<f64>,
    /// Active gaps in formation order.
    gaps: VecDeque<FairValueGap>,
}

impl TacticalFeatures {
    /// A computer with no bars seen. Errors if `config` is invalid.
    pub fn new(config: TacticalConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            seen: 0,
            last_two: VecDeque::with_capacity(3),
            closes: VecDeque::with_capacity(config.momentum_lag_bars + 2),
            volumes: VecDeque::with_capacity(config.volume_window_bars + 1),
            gaps: VecDeque::with_capacity(config.max_active_gaps + 1),
        })
    }

    /// The settings.
    pub fn config(&self) -> &TacticalConfig {
        &self.config
    }

    /// Bars pushed so far.
    pub fn bars_seen(&self) -> u64 {
        self.seen
    }

    /// Bars needed before [`push`](Self::push) returns a row.
    pub fn warmup_bars(&self) -> usize {
        self.config.warmup_bars()
    }

    /// Whether the next push returns a row.
    pub fn is_ready(&self) -> bool {
        self.seen + 1 >= self.warmup_bars() as u64
    }

    /// The active gaps after the last bar, oldest first.
    pub fn active_gaps(&self) -> impl ExactSizeIterator<Item = &FairValueGap> + '_ {
        self.gaps.iter()
    }

    /// Forgets every bar (keeps the settings and the allocations).
    pub fn reset(&mut self) {
        self.seen = 0;
        self.last_two.clear();
        self.closes.clear();
        self.volumes.clear();
        self.gaps.clear();
    }

    /// Takes the next closed bar; returns its row once warmed up
    /// (`Ok(None)` before). An invalid bar (see [`Bar::is_valid`]) is an
    /// `Err` and changes nothing. Costs `O(max_active_gaps + N)` and
    /// allocates nothing.
    pub fn push(&mut self, bar: &Bar) -> Result<Option<[f64; TACTICAL_DIM]>> {
        check_bar(bar)?;
        let t = self.seen;
        self.seen += 1;
        let cfg = self.config;

        // (1) expiry: the deque is in formation order.
        let max_age = cfg.max_gap_age_bars as u64;
        while self.gaps.front().is_some_and(|g| t - g.formed_at > max_age) {
            self.gaps.pop_front();
        }
        // (2) mitigation and partial fill.
        let mut mitigated = false;
        self.gaps.retain_mut(|g| {
            if g.mitigated_by(bar) {
                mitigated = true;
                false
            } else {
                g.fill(bar);
                true
            }
        });
        // (3) a new gap, then the capacity bound.
        if self.last_two.len() == 2 {
            if let Some(g) = FairValueGap::detect(&cfg, t, self.last_two[0], bar) {
                self.gaps.push_back(g);
                if self.gaps.len() > cfg.max_active_gaps {
                    self.gaps.pop_front();
                }
            }
        }

        push_bounded(&mut self.last_two, (bar.high, bar.low), 2);
        push_bounded(&mut self.closes, bar.close, cfg.momentum_lag_bars + 1);
        push_bounded(&mut self.volumes, bar.volume, cfg.volume_window_bars);

        if self.seen < cfg.warmup_bars() as u64 {
            return Ok(None);
        }
        let gaps = self
            .gaps
            .iter()
            .map(|g| (g.side, g.near_edge, g.unfilled_size()));
        let (v_old, v_new) = self.volumes.as_slices();
        Ok(Some(row(
            bar.close,
            self.closes[0],
            bar.volume,
            v_old.iter().chain(v_new),
            cfg.volume_window_bars,
            gaps,
            mitigated,
        )))
    }

    /// The naive reference: the row of the last bar of `bars`, recomputed
    /// from the whole slice (`Ok(None)` if it is shorter than the warm-up).
    /// `O(len · max_active_gaps + max_active_gaps · max_gap_age_bars)`;
    /// meant for tests. An invalid config or bar is an `Err`.
    pub fn from_history(
        config: &TacticalConfig,
        bars: &[Bar],
    ) -> Result<Option<[f64; TACTICAL_DIM]>> {
        config.validate()?;
        for b in bars {
            check_bar(b)?;
        }
        if bars.len() < config.warmup_bars() {
            return Ok(None);
        }
        let t = bars.len() - 1;
        let f = config.mitigation_fill_fraction;
        // Replay the gap rules with plain indices: (formed_at, side, bottom, top).
        let mut active: Vec<(usize, GapSide, f64, f64)> = Vec::new();
        let mut mitigated_now = false;
        for s in 2..=t {
            active.retain(|&(j, ..)| s - j <= config.max_gap_age_bars);
            active.retain(|&(_, side, bottom, top)| {
                let keep = (1.0 - f) * (top - bottom);
                let hit = match side {
                    GapSide::Bullish => bars[s].low <= bottom + keep,
                    GapSide::Bearish => bars[s].high >= top - keep,
                };
                if hit && s == t {
                    mitigated_now = true;
                }
                !hit
            });
            let (a, b) = (&bars[s - 2], &bars[s]);
            let gap = if b.low > a.high {
                Some((GapSide::Bullish, a.high, b.low))
            } else if b.high < a.low {
                Some((GapSide::Bearish, b.high, a.low))
            } else {
                None
            };
            if let Some((side, bottom, top)) = gap {
                let big_enough = (top - bottom) / b.close * 100.0 >= config.min_gap_pct;
                if bottom.is_finite() && top.is_finite() && big_enough {
                    active.push((s, side, bottom, top));
                    if active.len() > config.max_active_gaps {
                        active.remove(0);
                    }
                }
            }
        }
        // Near edges from the raw extremes since formation.
        let gaps = active.iter().map(|&(j, side, bottom, top)| {
            let later = &bars[j + 1..=t];
            match side {
                GapSide::Bullish => {
                    let lo = later.iter().map(|b| b.low).fold(top, f64::min);
                    let near = lo.max(bottom);
                    (side, near, near - bottom)
                }
                GapSide::Bearish => {
                    let hi = later.iter().map(|b| b.high).fold(bottom, f64::max);
                    let near = hi.min(top);
                    (side, near, top - near)
                }
            }
        });
        let n = config.volume_window_bars;
        let last = &bars[t];
        Ok(Some(row(
            last.close,
            bars[t - config.momentum_lag_bars].close,
            last.volume,
            bars[t + 1 - n..=t].iter().map(|b| &b.volume),
            n,
            gaps,
            mitigated_now,
        )))
    }
}

/// Appends `x`, dropping from the front beyond `cap` items.
fn push_bounded<T>(q: &mut VecDeque<T>, x: T, cap: usize) {
    q.push_back(x);
    while q.len() > cap {
        q.pop_front();
    }
}

/// `x` if finite, else `fallback`.
fn finite_or(x: f64, fallback: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        fallback
    }
}

/// Assembles a row; shared by the push path and the reference so that the
/// two differ only in how they obtain the inputs. `gaps` yields
/// `(side, near edge, unfilled size)` in formation order; `volumes` the
/// window oldest first.
fn row<'a>(
    close: f64,
    close_lag: f64,
    volume: f64,
    volumes: impl Iterator<Item = &'a f64>,
    n: usize,
    gaps: impl Iterator<Item = (GapSide, f64, f64)>,
    mitigated: bool,
) -> [f64; TACTICAL_DIM] {
    let (mut bull, mut bear) = (false, false);
    let mut nearest: Option<(f64, f64, f64)> = None; // (distance, level, size)
    for (side, near, size) in gaps {
        match side {
            GapSide::Bullish => bull = true,
            GapSide::Bearish => bear = true,
        }
        let d = (close - near).abs();
        // `<=`: ties go to the newer gap; a NaN distance never wins.
        if nearest.is_none_or(|(best, ..)| d <= best) && !d.is_nan() {
            nearest = Some((d, near, size));
        }
    }
    let fallback_level = finite_or(close, 0.0);
    let (level, size_pct) = match nearest {
        Some((_, level, size)) => (
            finite_or(level, fallback_level),
            finite_or(size / close * 100.0, 0.0).max(0.0),
        ),
        None => (fallback_level, 0.0),
    };
    let momentum = if close_lag > 0.0 {
        finite_or((close / close_lag - 1.0) * 100.0, 0.0)
    } else {
        0.0
    };
    let nf = n as f64;
    let mean = volumes.map(|v| v / nf).sum::<f64>();
    let volume_ratio = if mean > 0.0 && mean.is_finite() {
        finite_or(volume / mean, 1.0).clamp(0.0, nf)
    } else {
        1.0
    };
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    [
        flag(bull),
        flag(bear),
        level,
        flag(mitigated),
        momentum,
        volume_ratio,
        size_pct,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bar(i: i64, high: f64, low: f64) -> Bar {
        let mid = 0.5 * (high + low);
        Bar {
            ts: i * 300,
            open: mid,
            high,
            low,
            close: mid,
            volume: 1.0,
        }
    }

    #[test]
    fn validate_names_the_field() {
        let bad = TacticalConfig {
            mitigation_fill_fraction: 0.0,
            ..TacticalConfig::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("mitigation_fill_fraction"), "{e}");
        let bad = TacticalConfig {
            volume_window_bars: 0,
            ..TacticalConfig::default()
        };
        assert!(TacticalFeatures::new(bad).is_err());
        let bad = TacticalConfig {
            min_gap_pct: f64::NAN,
            ..TacticalConfig::default()
        };
        assert!(bad.validate().is_err());
        assert!(TacticalConfig::default().validate().is_ok());
        assert_eq!(TacticalConfig::default().warmup_bars(), 20);
    }

    #[test]
    fn half_fill_fraction_mitigates_at_the_midpoint() {
        let cfg = TacticalConfig {
            mitigation_fill_fraction: 0.5,
            volume_window_bars: 1,
            momentum_lag_bars: 1,
            ..TacticalConfig::default()
        };
        let mut f = TacticalFeatures::new(cfg).unwrap();
        f.push(&bar(0, 100.0, 99.0)).unwrap();
        f.push(&bar(1, 103.0, 100.0)).unwrap();
        f.push(&bar(2, 106.0, 104.0)).unwrap(); // bullish gap [100, 104]
        let g = *f.active_gaps().next().unwrap();
        assert_eq!(g.mitigation_level, 102.0);
        let r = f.push(&bar(3, 105.0, 102.5)).unwrap().unwrap(); // 37.5 % filled
        assert_eq!(r[3], 0.0);
        assert_eq!(f.active_gaps().next().unwrap().near_edge, 102.5);
        let r = f.push(&bar(4, 105.0, 102.0)).unwrap().unwrap(); // 50 %: mitigated
        assert_eq!(r[3], 1.0);
        assert_eq!(f.active_gaps().len(), 0);
    }

    #[test]
    fn capacity_evicts_the_oldest_and_age_expires() {
        let cfg = TacticalConfig {
            max_active_gaps: 2,
            max_gap_age_bars: 4,
            volume_window_bars: 1,
            momentum_lag_bars: 1,
            ..TacticalConfig::default()
        };
        let mut f = TacticalFeatures::new(cfg).unwrap();
        // A staircase: every bar from index 2 on forms a bullish gap.
        for i in 0..5 {
            let lo = 100.0 + 10.0 * i as f64;
            f.push(&bar(i, lo + 4.0, lo)).unwrap();
        }
        let formed: Vec<u64> = f.active_gaps().map(|g| g.formed_at).collect();
        assert_eq!(formed, vec![3, 4], "gap of bar 2 evicted");
        // Then sideways bars: no new gaps, no mitigation (gap 4, [124, 140],
        // is filled down to 133).
        for i in 5..9 {
            f.push(&bar(i, 145.0, 133.0)).unwrap();
        }
        assert_eq!(f.active_gaps().last().unwrap().near_edge, 133.0);
        let formed: Vec<u64> = f.active_gaps().map(|g| g.formed_at).collect();
        assert_eq!(formed, vec![4], "gap of bar 3 expired at bar 8 (age 5 > 4)");
        f.push(&bar(9, 145.0, 133.0)).unwrap();
        assert_eq!(f.active_gaps().len(), 0);
        f.reset();
        assert_eq!(f.bars_seen(), 0);
    }
}
