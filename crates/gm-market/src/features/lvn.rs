//! Rolling volume profile and low-volume nodes (LVNs): the [`VolumeProfile`]
//! shared by the 30-minute structure matrix and the 5-D [`LvnFeatures`]
//! vector of the tactical (5-minute) bars.
//!
//! # Volume profile
//!
//! The profile covers the last `W` bars ([`VolumeProfileConfig::window_bars`],
//! default 100), the current (just closed) bar included. Its price range is
//! `[lo, hi]` with `lo = min low` and `hi = max high` over those bars, cut
//! into `R` equal rows ([`VolumeProfileConfig::rows`], default 50) of width
//! `w = (hi − lo) / R` price points. Row `j` covers `[lo + j·w, lo + (j+1)·w)`
//! (the last row is closed at `hi`). Rows are relative to the window's range,
//! like TradingView's *Volume Profile* "number of rows" layout, so the
//! profile is scale-free (the same defaults work at price 100 and at 20 000).
//!
//! Each bar's volume is spread **uniformly over its `[low, high]`**: row `j`
//! receives `v · overlap([low, high], row j) / (high − low)`; a bar with
//! `high == low` puts all of its volume in the row holding that price.
//! Volumes enter as `v = volume / max_volume_in_window` (relative volume,
//! so every row holds at most `W` and nothing overflows whatever the raw
//! volume scale). The profile is rebuilt from the `W` bars on every push:
//! `O(W · rows spanned per bar + R)` per bar, no accumulated round-off.
//!
//! # Low-volume nodes
//!
//! Let `V_j` be row volumes and `V_max = max_j V_j` (the point of control).
//! A **low-volume node** is a maximal run of equal-volume rows `[a, b]`
//! that
//! - is interior: `a ≥ 1` and `b ≤ R − 2` (the thin tails at the range's
//!   edges are not nodes),
//! - is a local minimum: `V_{a−1} > V_a` and `V_{b+1} > V_a` (plateaus count
//!   once; a price gap gives a run of empty rows, i.e. one node), and
//! - is thin: `V_a ≤ f · V_max` with `f` =
//!   [`VolumeProfileConfig::max_node_fraction`] (default 0.5).
//!
//! Its price is the centre of the run, `lo + (a + b + 1) · w / 2`, and its
//! **strength** is `100 · (1 − V_a / V_max)` ∈ `[100 · (1 − f), 100]`
//! (100 = no volume at all traded there). The **nearest** node to a price
//! `p` minimises `|p − node price|`; ties go to the stronger node, then to
//! the lower price.
//!
//! There are no nodes (and every consumer uses its documented "no LVN"
//! values) when the window is not full yet, when all its bars are flat at
//! one price (`hi == lo`), when all volumes are zero, or when no run
//! qualifies.
//!
//! # LVN vector (5-D, per tactical bar)
//!
//! [`LvnFeatures::push`] returns, for the nearest node to the bar's close
//! `p` (node price `n`, strength `s` ∈ `[0, 100]`, distance `d = p − n` in
//! price points, cap `C` = [`LvnConfig::distance_cap_points`], default 50):
//!
//! | index | name | formula | raw range |
//! |---|---|---|---|
//! | 0 | `lvn_strength` | `s / 100` | `[1 − f, 1]` (0 if none) |
//! | 1 | `lvn_distance_norm` | `dn = min(|d| / C, 1)` | `[0, 1]` (1 if none) |
//! | 2 | `lvn_relative_position` | `clamp((p − n) / p, −1, 1)` | `[−1, 1)`, in practice `|·| ≤ (hi − lo) / p` (0 if none); the clamp binds only for a node above `2p` |
//! | 3 | `lvn_above` | `1` if `p > n` else `0` | `{0, 1}` (0 if none) |
//! | 4 | `lvn_combined` | `(s / 100) · (1 − dn)` | `[0, 1]` (0 if none) |
//!
//! With no node the vector is `[0, 1, 0, 0, 0]`: no strength, "as far as the
//! cap", no side. The strength is taken as `s / 100` in the combined score
//! too, as GrandModel's original vectoriser did, so all five components are
//! of order one. The default window for the tactical vector is 600 bars:
//! on 5-minute bars that is the same 50 hours as the structure matrix's 100
//! thirty-minute bars.

use std::collections::VecDeque;

use crate::{Bar, Error, Result};

/// Names of the 5 components of [`LvnFeatures::push`]'s vector, in order.
pub const LVN_FEATURE_NAMES: [&str; 5] = [
    "lvn_strength",
    "lvn_distance_norm",
    "lvn_relative_position",
    "lvn_above",
    "lvn_combined",
];

/// The LVN vector used when no low-volume node exists:
/// `[strength 0, distance_norm 1, relative 0, above 0, combined 0]`.
pub const NO_LVN_VECTOR: [f64; 5] = [0.0, 1.0, 0.0, 0.0, 0.0];

/// Shape of a rolling [`VolumeProfile`] (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VolumeProfileConfig {
    /// Bars in the rolling window, the current one included (default 100).
    pub window_bars: usize,
    /// Price rows spanning the window's `[min low, max high]` (default 50).
    pub rows: usize,
    /// A node's row volume must be at most this fraction of the point of
    /// control's (default 0.5); in `(0, 1]`.
    pub max_node_fraction: f64,
}

impl Default for VolumeProfileConfig {
    fn default() -> Self {
        Self {
            window_bars: 100,
            rows: 50,
            max_node_fraction: 0.5,
        }
    }
}

impl VolumeProfileConfig {
    /// Checks the ranges: `window_bars ≥ 1`, `3 ≤ rows ≤ 100 000` (a node
    /// needs a row on each side), `max_node_fraction` in `(0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if self.window_bars == 0 {
            return Err(Error::config(
                "profile.window_bars",
                self.window_bars,
                "at least 1",
            ));
        }
        if !(3..=100_000).contains(&self.rows) {
            return Err(Error::config("profile.rows", self.rows, "3 ..= 100000"));
        }
        if !(self.max_node_fraction > 0.0 && self.max_node_fraction <= 1.0) {
            return Err(Error::config(
                "profile.max_node_fraction",
                self.max_node_fraction,
                "in (0, 1]",
            ));
        }
        Ok(())
    }
}

/// One low-volume node of a [`Profile`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LvnNode {
    /// Centre of the node's rows, in price points.
    pub price: f64,
    /// Lower edge of the node's first row.
    pub low: f64,
    /// Upper edge of the node's last row.
    pub high: f64,
    /// The node's row volume divided by the point of control's, in `[0, 1]`.
    pub volume_ratio: f64,
    /// `100 · (1 − volume_ratio)`, in `[0, 100]`.
    pub strength: f64,
}

/// A volume profile built from a set of bars (see the [module docs](self)).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    low: f64,
    high: f64,
    row_width: f64,
    volumes: Vec<f64>,
    max_volume: f64,
}

impl Profile {
    /// Builds the profile of `bars` with `rows` rows (`rows ≥ 1`).
    pub fn build<'a, I>(bars: I, rows: usize) -> Self
    where
        I: IntoIterator<Item = &'a Bar>,
        I::IntoIter: Clone,
    {
        let mut p = Profile::default();
        p.rebuild(bars.into_iter(), rows);
        p
    }

    /// Rebuilds in place, reusing the row buffer (no allocation once warm).
    fn rebuild<'a, I>(&mut self, bars: I, rows: usize)
    where
        I: Iterator<Item = &'a Bar> + Clone,
    {
        let rows = rows.max(1);
        self.volumes.clear();
        self.volumes.resize(rows, 0.0);
        self.max_volume = 0.0;
        let (mut lo, mut hi, mut vmax) = (f64::INFINITY, f64::NEG_INFINITY, 0.0_f64);
        for b in bars.clone() {
            lo = lo.min(b.low);
            hi = hi.max(b.high);
            vmax = vmax.max(b.volume);
        }
        self.low = lo;
        self.high = hi;
        let w = (hi - lo) / rows as f64;
        if !(hi > lo && w > 0.0 && w.is_finite() && vmax > 0.0 && vmax.is_finite()) {
            // Empty window, one flat price, or no volume: no profile shape.
            self.row_width = 0.0;
            return;
        }
        self.row_width = w;
        let last = rows - 1;
        let row_of = |p: f64| -> usize { (((p - lo) / w).floor() as usize).min(last) };
        for b in bars {
            let v = b.volume / vmax;
            if v <= 0.0 {
                continue;
            }
            let (jl, jh) = (row_of(b.low), row_of(b.high));
            let span = b.high - b.low;
            if jl == jh || span <= 0.0 {
                self.volumes[jl] += v;
                continue;
            }
            for j in jl..=jh {
                let e0 = lo + j as f64 * w;
                let e1 = if j == last {
                    hi
                } else {
                    lo + (j + 1) as f64 * w
                };
                let overlap = b.high.min(e1) - b.low.max(e0);
                if overlap > 0.0 {
                    self.volumes[j] += v * (overlap / span);
                }
            }
        }
        self.max_volume = self.volumes.iter().copied().fold(0.0, f64::max);
    }

    /// Lowest price covered (`+inf` for a profile of no bars).
    pub fn low(&self) -> f64 {
        self.low
    }

    /// Highest price covered (`-inf` for a profile of no bars).
    pub fn high(&self) -> f64 {
        self.high
    }

    /// Row width in price points; 0 when the profile has no shape (flat
    /// prices, no volume, no bars).
    pub fn row_width(&self) -> f64 {
        self.row_width
    }

    /// Relative volume per row, lowest price first (each bar contributes
    /// its volume divided by the window's largest bar volume).
    pub fn volumes(&self) -> &[f64] {
        &self.volumes
    }

    /// Calls `f` for every low-volume node, lowest price first.
    fn for_each_node(&self, max_node_fraction: f64, mut f: impl FnMut(LvnNode)) {
        let vol = &self.volumes;
        let rows = vol.len();
        if self.row_width <= 0.0 || self.max_volume <= 0.0 || rows < 3 {
            return;
        }
        let limit = max_node_fraction * self.max_volume;
        let mut a = 0;
        while a < rows {
            let v = vol[a];
            let mut b = a;
            while b + 1 < rows && vol[b + 1] == v {
                b += 1;
            }
            if a > 0 && b + 1 < rows && vol[a - 1] > v && vol[b + 1] > v && v <= limit {
                let ratio = (v / self.max_volume).clamp(0.0, 1.0);
                let w = self.row_width;
                f(LvnNode {
                    price: self.low + (a + b + 1) as f64 * 0.5 * w,
                    low: self.low + a as f64 * w,
                    high: self.low + (b + 1) as f64 * w,
                    volume_ratio: ratio,
                    strength: 100.0 * (1.0 - ratio),
                });
            }
            a = b + 1;
        }
    }

    /// All low-volume nodes, lowest price first.
    pub fn low_volume_nodes(&self, max_node_fraction: f64) -> Vec<LvnNode> {
        let mut out = Vec::new();
        self.for_each_node(max_node_fraction, |n| out.push(n));
        out
    }

    /// The node nearest to `price` (ties: stronger, then lower), if any.
    pub fn nearest_node(&self, price: f64, max_node_fraction: f64) -> Option<LvnNode> {
        let mut best: Option<(f64, LvnNode)> = None;
        self.for_each_node(max_node_fraction, |n| {
            let d = (price - n.price).abs();
            let better = match &best {
                None => true,
                // Nodes arrive lowest price first, so a tie in distance and
                // strength keeps the earlier (lower) one.
                Some((bd, b)) => d < *bd || (d == *bd && n.strength > b.strength),
            };
            if better {
                best = Some((d, n));
            }
        });
        best.map(|(_, n)| n)
    }
}

/// A rolling volume profile over the last `window_bars` bars.
#[derive(Debug, Clone)]
pub struct VolumeProfile {
    cfg: VolumeProfileConfig,
    window: VecDeque<Bar>,
    profile: Profile,
}

impl VolumeProfile {
    /// An empty profile; fails if `cfg` does not validate.
    pub fn new(cfg: VolumeProfileConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            window: VecDeque::with_capacity(cfg.window_bars),
            profile: Profile::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VolumeProfileConfig {
        &self.cfg
    }

    /// Adds a closed bar (evicting the oldest once the window is full) and
    /// rebuilds the profile when the window is full. An invalid bar (see
    /// [`Bar::is_valid`]) is rejected and changes nothing.
    pub fn push(&mut self, bar: &Bar) -> Result<()> {
        check_bar(bar)?;
        self.push_valid(bar);
        Ok(())
    }

    pub(crate) fn push_valid(&mut self, bar: &Bar) {
        if self.window.len() == self.cfg.window_bars {
            self.window.pop_front();
        }
        self.window.push_back(*bar);
        if self.is_ready() {
            self.profile.rebuild(self.window.iter(), self.cfg.rows);
        }
    }

    /// Bars currently in the window.
    pub fn len(&self) -> usize {
        self.window.len()
    }

    /// Whether no bar was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.window.is_empty()
    }

    /// Whether the window is full (before that there is no profile).
    pub fn is_ready(&self) -> bool {
        self.window.len() == self.cfg.window_bars
    }

    /// The current profile; `None` until the window is full.
    pub fn profile(&self) -> Option<&Profile> {
        self.is_ready().then_some(&self.profile)
    }

    /// The low-volume node nearest to `price`; `None` while the window is
    /// not full or when no node exists.
    pub fn nearest_lvn(&self, price: f64) -> Option<LvnNode> {
        self.profile()?
            .nearest_node(price, self.cfg.max_node_fraction)
    }
}

/// Configuration of the 5-D [`LvnFeatures`] vector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LvnConfig {
    /// The rolling profile (default: 600 bars, 50 rows, fraction 0.5).
    pub profile: VolumeProfileConfig,
    /// Distance, in price points, at which `lvn_distance_norm` saturates
    /// at 1 (default 50, GrandModel's value for index futures points).
    pub distance_cap_points: f64,
}

impl Default for LvnConfig {
    fn default() -> Self {
        Self {
            profile: VolumeProfileConfig {
                window_bars: 600,
                ..VolumeProfileConfig::default()
            },
            distance_cap_points: 50.0,
        }
    }
}

impl LvnConfig {
    /// Checks the profile and that `distance_cap_points` is finite and > 0.
    pub fn validate(&self) -> Result<()> {
        self.profile.validate()?;
        if !(self.distance_cap_points > 0.0 && self.distance_cap_points.is_finite()) {
            return Err(Error::config(
                "distance_cap_points",
                self.distance_cap_points,
                "finite and > 0",
            ));
        }
        Ok(())
    }

    /// Bars pushed before the first `Some` (the profile window).
    pub fn warmup_bars(&self) -> usize {
        self.profile.window_bars
    }
}

/// The 5-D LVN vector of the nearest node to `price` (see the
/// [module docs](self)); [`NO_LVN_VECTOR`] for `None`. `price` must be > 0.
pub fn lvn_vector(node: Option<&LvnNode>, price: f64, distance_cap_points: f64) -> [f64; 5] {
    let Some(n) = node else {
        return NO_LVN_VECTOR;
    };
    let s = (n.strength / 100.0).clamp(0.0, 1.0);
    let d = price - n.price;
    let dn = (d.abs() / distance_cap_points).min(1.0);
    // Clamped: only binds when the node is above twice the price.
    let rel = if price > 0.0 {
        (d / price).clamp(-1.0, 1.0)
    } else {
        0.0
    };
    let above = if price > n.price { 1.0 } else { 0.0 };
    [s, dn, rel, above, s * (1.0 - dn)]
}

/// Incremental 5-D LVN vector per bar (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct LvnFeatures {
    cfg: LvnConfig,
    profile: VolumeProfile,
}

impl LvnFeatures {
    /// A fresh computer; fails if `cfg` does not validate.
    pub fn new(cfg: LvnConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            profile: VolumeProfile::new(cfg.profile)?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LvnConfig {
        &self.cfg
    }

    /// Adds a closed bar and returns its LVN vector, or `Ok(None)` while the
    /// profile window is not full. An invalid bar is an `Err` and changes
    /// nothing.
    pub fn push(&mut self, bar: &Bar) -> Result<Option<[f64; 5]>> {
        self.profile.push(bar)?;
        if !self.profile.is_ready() {
            return Ok(None);
        }
        let node = self.profile.nearest_lvn(bar.close);
        Ok(Some(lvn_vector(
            node.as_ref(),
            bar.close,
            self.cfg.distance_cap_points,
        )))
    }

    /// Reference implementation for tests: the vector of the LAST bar of
    /// `history`, recomputed from the slice alone (`Ok(None)` if it is
    /// shorter than the window). Any invalid bar is an `Err`.
    pub fn from_history(cfg: &LvnConfig, history: &[Bar]) -> Result<Option<[f64; 5]>> {
        cfg.validate()?;
        for b in history {
            check_bar(b)?;
        }
        let w = cfg.profile.window_bars;
        let Some(last) = history.last() else {
            return Ok(None);
        };
        if history.len() < w {
            return Ok(None);
        }
        let profile = Profile::build(&history[history.len() - w..], cfg.profile.rows);
        let node = profile.nearest_node(last.close, cfg.profile.max_node_fraction);
        Ok(Some(lvn_vector(
            node.as_ref(),
            last.close,
            cfg.distance_cap_points,
        )))
    }
}

/// `Err(Invalid)` for a bar that breaks the OHLCV invariants.
pub(crate) fn check_bar(bar: &Bar) -> Result<()> {
    if bar.is_valid() {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "bar at ts {} breaks the OHLCV invariants (finite prices > 0, low <= open/close <= high, volume >= 0): {bar:?}",
            bar.ts
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bar(low: f64, high: f64, volume: f64) -> Bar {
        Bar {
            ts: 0,
            open: low,
            high,
            low,
            close: high,
            volume,
        }
    }

    #[test]
    fn volume_spreads_uniformly_over_the_bar_range() {
        // Range [0.5, 4.5] → 4 rows of width 1: [0.5,1.5) [1.5,2.5) [2.5,3.5) [3.5,4.5].
        let bars = [bar(0.5, 4.5, 4.0), bar(1.0, 1.0, 2.0)];
        let p = Profile::build(&bars, 4);
        assert_eq!(p.row_width(), 1.0);
        // Bar 1: volume 4/4 = 1 spread as 0.25 per row; bar 2: 2/4 = 0.5 in row 0.
        assert_eq!(p.volumes(), &[0.75, 0.25, 0.25, 0.25]);
    }

    #[test]
    fn gap_is_one_node_at_its_centre_and_edges_are_not_nodes() {
        // Trading in [1, 2] and [4, 5], nothing in between; 8 rows of 0.5.
        let bars = [bar(1.0, 2.0, 1.0), bar(4.0, 5.0, 1.0)];
        let p = Profile::build(&bars, 8);
        let nodes = p.low_volume_nodes(0.5);
        assert_eq!(nodes.len(), 1, "{nodes:?}");
        let n = nodes[0];
        assert_eq!((n.low, n.high, n.price), (2.0, 4.0, 3.0));
        assert_eq!(n.strength, 100.0);
        assert_eq!(p.nearest_node(4.9, 0.5), Some(n));
    }

    #[test]
    fn thin_but_not_thin_enough_is_not_a_node() {
        // Rows of width 1 over [1, 4]: a wide bar gives 1/3 to each row, two
        // bars of a sixth of its volume add 1/6 to the outer rows → [1/2, 1/3, 1/2].
        let bars = [bar(1.0, 4.0, 3.0), bar(1.2, 1.8, 0.5), bar(3.2, 3.8, 0.5)];
        let p = Profile::build(&bars, 3);
        let want = [0.5, 1.0 / 3.0, 0.5];
        for (got, want) in p.volumes().iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{:?}", p.volumes());
        }
        assert!(
            p.low_volume_nodes(0.5).is_empty(),
            "2/3 of the POC is not thin at f = 0.5"
        );
        let n = p.low_volume_nodes(0.8);
        assert_eq!(n.len(), 1);
        assert!((n[0].strength - 100.0 / 3.0).abs() < 1e-9);
        assert!((n[0].price - 2.5).abs() < 1e-12);
    }

    #[test]
    fn degenerate_profiles_have_no_nodes() {
        let flat = [bar(5.0, 5.0, 1.0), bar(5.0, 5.0, 3.0)];
        assert!(Profile::build(&flat, 10).low_volume_nodes(1.0).is_empty());
        let silent = [bar(1.0, 2.0, 0.0), bar(4.0, 5.0, 0.0)];
        assert!(Profile::build(&silent, 10).low_volume_nodes(1.0).is_empty());
        assert!(Profile::build(&[], 10).low_volume_nodes(1.0).is_empty());
    }

    #[test]
    fn vector_components() {
        let n = LvnNode {
            price: 100.0,
            low: 99.0,
            high: 101.0,
            volume_ratio: 0.2,
            strength: 80.0,
        };
        let v = lvn_vector(Some(&n), 110.0, 50.0);
        assert_eq!(v[0], 0.8);
        assert_eq!(v[1], 0.2);
        assert!((v[2] - 10.0 / 110.0).abs() < 1e-15);
        assert_eq!(v[3], 1.0);
        assert!((v[4] - 0.8 * 0.8).abs() < 1e-15);
        let far_below = lvn_vector(Some(&n), 20.0, 50.0);
        assert_eq!((far_below[1], far_below[3], far_below[4]), (1.0, 0.0, 0.0));
        assert_eq!(lvn_vector(None, 110.0, 50.0), NO_LVN_VECTOR);
    }
}
