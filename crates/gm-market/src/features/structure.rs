//! The structure family: the 8 features of one row of the 30-minute matrix
//! (48 × 8 for the embedders: one row per closed 30-minute bar, the last 48
//! rows form the window), computed incrementally by [`StructureFeatures`].
//!
//! | index | name | definition (below) | raw range |
//! |---|---|---|---|
//! | 0 | `mlmi_value` | kNN vote of the `k` nearest labelled RSI pairs | integer in `[−k, k]` (default `[−200, 200]`) |
//! | 1 | `mlmi_signal` | `WMA(mlmi_value, 20)` | `[−k, k]` |
//! | 2 | `nwrqk_value` | Nadaraya–Watson estimate `ŷ_t` of the close | price points, within `[min, max]` of the last 27 closes |
//! | 3 | `nwrqk_slope` | `ŷ_t − ŷ_{t−1}` | price points per bar, `|·| ≤ max − min` of the last 28 closes |
//! | 4 | `lvn_distance_points` | `close − node price` of the nearest LVN (0 if none) | price points, `|·| ≤` the profile's `high − low` |
//! | 5 | `lvn_nearest_strength` | its strength (0 if none) | `[0, 100]`; a real node has `≥ 100 · (1 − 0.5) = 50` |
//! | 6 | `time_hour_sin` | `sin(2π · hour / 24)` | `[−1, 1]` |
//! | 7 | `time_hour_cos` | `cos(2π · hour / 24)` | `[−1, 1]` |
//!
//! Values are **raw**: the pipeline normalises them later (e.g. with
//! [`RunningNorm`](crate::RunningNorm)). Every output is finite for every
//! valid bar sequence (prices finite and > 0, volumes finite and ≥ 0): the
//! recursions are written so that nothing overflows even at `f64::MAX`.
//!
//! # Timing and "no look-ahead"
//!
//! [`StructureFeatures::push`] takes a **closed** bar `t` and returns the
//! row for `t`, computed from bars `0..=t` only. It returns `None` until
//! every feature is defined ([`StructureConfig::warmup_bars`], 259 bars by
//! default) and `Some` for every bar after that; nothing is padded. Bars
//! are treated as consecutive whatever the gaps in `ts` (a weekend does not
//! reset anything); only the time features read `ts`.
//! [`StructureFeatures::from_history`] is the slow reference: it recomputes
//! the row of the last bar of a slice from the slice alone, and the tests
//! check that both agree bit for bit on every bar.
//!
//! # MLMI — Machine Learning Momentum Index
//!
//! After Zeiierman's TradingView indicator: a k-nearest-neighbour vote in
//! the plane of two smoothed RSIs.
//!
//! - **RSI(n)** (Wilder, as Pine's `ta.rsi`): with `Δ_t = close_t − close_{t−1}`,
//!   `U = RMA(max(Δ, 0), n)`, `D = RMA(max(−Δ, 0), n)`, where the RMA is
//!   seeded with the mean of its first `n` inputs and then follows
//!   `RMA_t = RMA_{t−1} + (x_t − RMA_{t−1}) / n`;
//!   `RSI = 100 · U / (U + D)`, and 50 when `U = D = 0` (flat prices;
//!   Pine would say 100). First defined at bar index `n`.
//! - **Feature pair** `f_t = (WMA(RSI(20), 20), WMA(RSI(5), 20))`
//!   ([`StructureConfig::rsi_slow_bars`], [`rsi_fast_bars`](StructureConfig::rsi_fast_bars),
//!   [`rsi_smooth_bars`](StructureConfig::rsi_smooth_bars)), where
//!   `WMA(x, m) = Σ_{i=0}^{m−1} (m − i) · x_{t−i} / Σ_{i=0}^{m−1} (m − i)`.
//!   Both coordinates lie in `[0, 100]`.
//! - **Label** of bar `s`: `y_s = sign(close_{s+1} − close_s)` ∈ {−1, 0, +1}.
//!   It is known only once bar `s + 1` has closed, so the sample
//!   `(f_s, y_s)` enters the memory when bar `s + 1` is pushed, never
//!   earlier. The memory keeps the last `M = 2000` samples
//!   ([`StructureConfig::knn_memory_samples`]).
//! - **Prediction** at bar `t` (memory = samples `s < t`): the `k = 200`
//!   ([`StructureConfig::knn_neighbors`]) samples nearest to `f_t` in
//!   **Euclidean** distance, ties broken in favour of the more recent
//!   sample; `mlmi_value = Σ y_s` over them. Defined once the memory holds
//!   at least `k` samples.
//! - `mlmi_signal = WMA(mlmi_value, 20)` ([`StructureConfig::signal_bars`]),
//!   the original's `prediction_ma`.
//!
//! Differences from the original, on purpose: the original stores a sample
//! only when `WMA(close, 5)` crosses `WMA(close, 20)` and labels it with the
//! price move since the previous stored sample; here every bar is a sample
//! labelled with the next bar's move, which is what the embedders want
//! (one well-defined label per bar). The original includes every sample
//! tied with the `k`-th distance; here exactly `k` are used, so the range
//! is exactly `[−k, k]`. A flat close gives the label 0 instead of +1.
//!
//! # NW-RQK — Nadaraya–Watson with a rational-quadratic kernel
//!
//! After jdehorty's "Nadaraya-Watson: Rational Quadratic Kernel
//! (Non-Repainting)": only past closes enter the estimate.
//!
//! `ŷ_t = Σ_{i=0}^{L} w_i · close_{t−i} / Σ_{i=0}^{L} w_i` with
//! `w_i = (1 + i² / (2 · r · h²))^(−r)`, defaults `h = 8`
//! ([`StructureConfig::nw_bandwidth_bars`]), `r = 8`
//! ([`StructureConfig::nw_relative_weight`]) and `L = 26`
//! ([`StructureConfig::nw_max_lag_bars`]): the original's loop
//! `for i = 0 to size + x_0` with `size = 1` and "start regression at bar"
//! `x_0 = 25` runs over `i = 0..=26`, i.e. 27 closes. The normalised
//! weights `w_i / Σ w` are precomputed once. `nwrqk_value = ŷ_t` (first
//! defined at bar index `L`), `nwrqk_slope = ŷ_t − ŷ_{t−1}` (from `L + 1`).
//!
//! # LVN — low-volume nodes
//!
//! A rolling [`VolumeProfile`] over the last 100 thirty-minute bars, 50 rows,
//! nodes at most half as heavy as the point of control (see
//! [`lvn`](super::lvn) for the profile, the node rule and the strength).
//! For the nearest node to the bar's close: `lvn_distance_points =
//! close − node price` (signed: positive above the node) and
//! `lvn_nearest_strength = 100 · (1 − node volume / POC volume)`. With no
//! node both are 0 (a real node always has strength ≥ 50, so strength 0
//! means "none"). Defined once the window is full (bar index 99).
//!
//! # Time of day
//!
//! `hour = (ts mod 86 400) / 3600` in fractional UTC hours of the bar's
//! **open** time `ts` (so a 30-minute bar opening 13:30 has hour 13.5);
//! `time_hour_sin = sin(2π · hour / 24)`, `time_hour_cos = cos(2π · hour / 24)`.
//!
//! # Cost
//!
//! Per bar: `O(M)` for the kNN (distances, then a linear-time selection of
//! the `k` nearest), `O(L)` for the kernel, `O(m)` for each WMA and
//! `O(W · rows spanned)` for the profile; no allocation once warm.

use std::cmp::Ordering;
use std::collections::VecDeque;

use super::lvn::{check_bar, LvnNode, Profile, VolumeProfile, VolumeProfileConfig};
use crate::{Bar, Error, Result};

/// Names of the 8 columns of a [`StructureFeatures`] row, in order.
pub const STRUCTURE_FEATURE_NAMES: [&str; 8] = [
    "mlmi_value",
    "mlmi_signal",
    "nwrqk_value",
    "nwrqk_slope",
    "lvn_distance_points",
    "lvn_nearest_strength",
    "time_hour_sin",
    "time_hour_cos",
];

/// Parameters of the structure features (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StructureConfig {
    /// Fast RSI period in bars (default 5).
    pub rsi_fast_bars: usize,
    /// Slow RSI period in bars (default 20).
    pub rsi_slow_bars: usize,
    /// WMA length applied to both RSIs (default 20, the original's
    /// "momentum window").
    pub rsi_smooth_bars: usize,
    /// Neighbours in the vote, `k` (default 200).
    pub knn_neighbors: usize,
    /// Labelled samples kept, `M` (default 2000; `≥ k`).
    pub knn_memory_samples: usize,
    /// WMA length of `mlmi_signal` (default 20).
    pub signal_bars: usize,
    /// Kernel bandwidth `h` in bars (default 8).
    pub nw_bandwidth_bars: f64,
    /// Kernel relative weighting `r` (default 8).
    pub nw_relative_weight: f64,
    /// Largest lag `L` in the kernel sum (default 26: 27 closes).
    pub nw_max_lag_bars: usize,
    /// The LVN profile (default 100 bars, 50 rows, fraction 0.5).
    pub profile: VolumeProfileConfig,
}

impl Default for StructureConfig {
    fn default() -> Self {
        Self {
            rsi_fast_bars: 5,
            rsi_slow_bars: 20,
            rsi_smooth_bars: 20,
            knn_neighbors: 200,
            knn_memory_samples: 2000,
            signal_bars: 20,
            nw_bandwidth_bars: 8.0,
            nw_relative_weight: 8.0,
            nw_max_lag_bars: 26,
            profile: VolumeProfileConfig::default(),
        }
    }
}

/// Largest period accepted for any bar count in [`StructureConfig`].
const MAX_BARS: usize = 1_000_000;

impl StructureConfig {
    /// Checks every field: periods and counts in `1 ..= 1 000 000`
    /// (`nw_max_lag_bars` may be 0), `knn_memory_samples ≥ knn_neighbors`,
    /// `h` and `r` finite and > 0, and the profile.
    pub fn validate(&self) -> Result<()> {
        let counts = [
            ("rsi_fast_bars", self.rsi_fast_bars),
            ("rsi_slow_bars", self.rsi_slow_bars),
            ("rsi_smooth_bars", self.rsi_smooth_bars),
            ("knn_neighbors", self.knn_neighbors),
            ("knn_memory_samples", self.knn_memory_samples),
            ("signal_bars", self.signal_bars),
        ];
        for (key, v) in counts {
            if !(1..=MAX_BARS).contains(&v) {
                return Err(Error::config(key, v, "1 ..= 1000000"));
            }
        }
        if self.nw_max_lag_bars > MAX_BARS {
            return Err(Error::config(
                "nw_max_lag_bars",
                self.nw_max_lag_bars,
                "0 ..= 1000000",
            ));
        }
        if self.knn_memory_samples < self.knn_neighbors {
            return Err(Error::config(
                "knn_memory_samples",
                self.knn_memory_samples,
                format!("at least knn_neighbors ({})", self.knn_neighbors),
            ));
        }
        for (key, v) in [
            ("nw_bandwidth_bars", self.nw_bandwidth_bars),
            ("nw_relative_weight", self.nw_relative_weight),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(Error::config(key, v, "finite and > 0"));
            }
        }
        self.profile.validate()
    }

    /// Bars pushed before the first `Some` row (259 with the defaults): the
    /// row of bar index `warmup_bars() − 1` is the first one defined.
    pub fn warmup_bars(&self) -> usize {
        // 0-based index of the first bar at which each part is defined.
        let pair = self.rsi_fast_bars.max(self.rsi_slow_bars) + self.rsi_smooth_bars - 1;
        let value = pair + self.knn_neighbors;
        let signal = value + self.signal_bars - 1;
        let slope = self.nw_max_lag_bars + 1;
        let profile = self.profile.window_bars - 1;
        signal.max(slope).max(profile) + 1
    }

    /// Normalised kernel weights `w_i / Σ w`, `i = 0..=L`.
    fn nw_weights(&self) -> Vec<f64> {
        let (h, r) = (self.nw_bandwidth_bars, self.nw_relative_weight);
        let w: Vec<f64> = (0..=self.nw_max_lag_bars)
            .map(|i| {
                let i = i as f64;
                (1.0 + i * i / (2.0 * r * h * h)).powf(-r)
            })
            .collect();
        // w_0 = 1, so the sum is ≥ 1 and finite.
        let sum: f64 = w.iter().sum();
        w.into_iter().map(|x| x / sum).collect()
    }
}

/// Wilder RSI state (Pine `ta.rsi`), overflow-free (see the module docs).
#[derive(Debug, Clone)]
struct Rsi {
    n: usize,
    seen: usize,
    up: f64,
    down: f64,
}

impl Rsi {
    fn new(n: usize) -> Self {
        Self {
            n,
            seen: 0,
            up: 0.0,
            down: 0.0,
        }
    }

    /// Feeds one close-to-close change; the RSI once `n` changes were seen.
    fn update(&mut self, change: f64) -> Option<f64> {
        let n = self.n as f64;
        let (g, l) = (change.max(0.0), (-change).max(0.0));
        if self.seen < self.n {
            // Seed: the mean of the first n inputs, as a sum of x / n.
            self.up += g / n;
            self.down += l / n;
            self.seen += 1;
            if self.seen < self.n {
                return None;
            }
        } else {
            self.up += (g - self.up) / n;
            self.down += (l - self.down) / n;
        }
        Some(rsi_of(self.up, self.down))
    }
}

/// `100 · U / (U + D)`, 50 when both are 0; computed on `U, D` scaled by
/// their maximum so that the sum cannot overflow.
fn rsi_of(up: f64, down: f64) -> f64 {
    let m = up.max(down);
    if m > 0.0 {
        let (u, d) = (up / m, down / m);
        100.0 * u / (u + d)
    } else {
        50.0
    }
}

/// Linear-weighted mean of `xs` given oldest first (weights 1, 2, …, m).
fn wma(xs: impl Iterator<Item = f64>) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (i, x) in xs.enumerate() {
        let w = (i + 1) as f64;
        num += w * x;
        den += w;
    }
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

/// `ŷ_t` from the normalised weights and the closes, newest last.
fn nw_estimate(weights: &[f64], closes_oldest_first: impl DoubleEndedIterator<Item = f64>) -> f64 {
    weights
        .iter()
        .zip(closes_oldest_first.rev())
        .map(|(w, c)| w * c)
        .sum()
}

/// Label of a bar from the next bar's close change.
fn label_of(change: f64) -> i8 {
    if change > 0.0 {
        1
    } else if change < 0.0 {
        -1
    } else {
        0
    }
}

/// One labelled kNN sample: the feature pair of bar `seq` and its label.
#[derive(Debug, Clone, Copy)]
struct Sample {
    pair: [f64; 2],
    label: i8,
    seq: u64,
}

/// A candidate neighbour: squared distance, bar index, label.
type Candidate = (f64, u64, i8);

fn dist2(a: [f64; 2], b: [f64; 2]) -> f64 {
    let (x, y) = (a[0] - b[0], a[1] - b[1]);
    x * x + y * y
}

/// Nearer first; equal distances: more recent (larger bar index) first.
/// A strict total order, so the k nearest are a well-defined set.
fn nearer(a: &Candidate, b: &Candidate) -> Ordering {
    a.0.total_cmp(&b.0).then(b.1.cmp(&a.1))
}

fn vote(candidates: &[Candidate]) -> f64 {
    candidates.iter().map(|c| i64::from(c.2)).sum::<i64>() as f64
}

fn time_of_day(ts: i64) -> [f64; 2] {
    let hour = ts.rem_euclid(86_400) as f64 / 3600.0;
    let angle = std::f64::consts::TAU * hour / 24.0;
    [angle.sin(), angle.cos()]
}

fn lvn_pair(node: Option<LvnNode>, close: f64) -> [f64; 2] {
    match node {
        Some(n) => [close - n.price, n.strength],
        None => [0.0, 0.0],
    }
}

/// Pushes `x` onto a ring of at most `cap` values (oldest first).
fn push_ring(ring: &mut VecDeque<f64>, cap: usize, x: f64) {
    if ring.len() == cap {
        ring.pop_front();
    }
    ring.push_back(x);
}

/// Incremental 30-minute structure features: one `[f64; 8]` row per closed
/// bar (see the [module docs](self) for every definition).
#[derive(Debug, Clone)]
pub struct StructureFeatures {
    cfg: StructureConfig,
    weights: Vec<f64>,
    /// Index of the next bar.
    t: u64,
    prev_close: Option<f64>,
    rsi_fast: Rsi,
    rsi_slow: Rsi,
    fast_ring: VecDeque<f64>,
    slow_ring: VecDeque<f64>,
    /// The previous bar's feature pair, waiting for its label.
    pending: Option<[f64; 2]>,
    memory: VecDeque<Sample>,
    scratch: Vec<Candidate>,
    values: VecDeque<f64>,
    closes: VecDeque<f64>,
    prev_yhat: Option<f64>,
    profile: VolumeProfile,
}

impl StructureFeatures {
    /// A fresh computer; fails if `cfg` does not validate.
    pub fn new(cfg: StructureConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            weights: cfg.nw_weights(),
            t: 0,
            prev_close: None,
            rsi_fast: Rsi::new(cfg.rsi_fast_bars),
            rsi_slow: Rsi::new(cfg.rsi_slow_bars),
            fast_ring: VecDeque::with_capacity(cfg.rsi_smooth_bars),
            slow_ring: VecDeque::with_capacity(cfg.rsi_smooth_bars),
            pending: None,
            memory: VecDeque::with_capacity(cfg.knn_memory_samples),
            scratch: Vec::with_capacity(cfg.knn_memory_samples),
            values: VecDeque::with_capacity(cfg.signal_bars),
            closes: VecDeque::with_capacity(cfg.nw_max_lag_bars + 1),
            prev_yhat: None,
            profile: VolumeProfile::new(cfg.profile)?,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &StructureConfig {
        &self.cfg
    }

    /// Bars accepted so far.
    pub fn bars_seen(&self) -> u64 {
        self.t
    }

    /// Adds a closed bar and returns its row, or `Ok(None)` while some
    /// feature is still warming up. An invalid bar (see [`Bar::is_valid`])
    /// is an `Err` and changes nothing.
    pub fn push(&mut self, bar: &Bar) -> Result<Option<[f64; 8]>> {
        check_bar(bar)?;
        let t = self.t;
        let close = bar.close;

        // MLMI: label the previous bar, then update the RSIs.
        if let Some(prev) = self.prev_close {
            let change = close - prev;
            if let Some(pair) = self.pending.take() {
                if self.memory.len() == self.cfg.knn_memory_samples {
                    self.memory.pop_front();
                }
                self.memory.push_back(Sample {
                    pair,
                    label: label_of(change),
                    seq: t - 1,
                });
            }
            let m = self.cfg.rsi_smooth_bars;
            if let Some(r) = self.rsi_fast.update(change) {
                push_ring(&mut self.fast_ring, m, r);
            }
            if let Some(r) = self.rsi_slow.update(change) {
                push_ring(&mut self.slow_ring, m, r);
            }
        }
        let m = self.cfg.rsi_smooth_bars;
        let pair = (self.fast_ring.len() == m && self.slow_ring.len() == m).then(|| {
            [
                wma(self.slow_ring.iter().copied()),
                wma(self.fast_ring.iter().copied()),
            ]
        });
        let k = self.cfg.knn_neighbors;
        let value = match pair {
            Some(q) if self.memory.len() >= k => {
                self.scratch.clear();
                self.scratch.extend(
                    self.memory
                        .iter()
                        .map(|s| (dist2(q, s.pair), s.seq, s.label)),
                );
                if self.scratch.len() > k {
                    self.scratch.select_nth_unstable_by(k - 1, nearer);
                }
                Some(vote(&self.scratch[..k]))
            }
            _ => None,
        };
        let signal = value.and_then(|v| {
            push_ring(&mut self.values, self.cfg.signal_bars, v);
            (self.values.len() == self.cfg.signal_bars).then(|| wma(self.values.iter().copied()))
        });

        // NW-RQK.
        push_ring(&mut self.closes, self.cfg.nw_max_lag_bars + 1, close);
        let yhat = (self.closes.len() == self.cfg.nw_max_lag_bars + 1)
            .then(|| nw_estimate(&self.weights, self.closes.iter().copied()));
        let slope = match (yhat, self.prev_yhat) {
            (Some(y), Some(p)) => Some(y - p),
            _ => None,
        };
        self.prev_yhat = yhat;

        // LVN.
        self.profile.push_valid(bar);
        let lvn = self
            .profile
            .is_ready()
            .then(|| lvn_pair(self.profile.nearest_lvn(close), close));

        self.prev_close = Some(close);
        self.pending = pair;
        self.t += 1;

        Ok(assemble(value, signal, yhat, slope, lvn, bar.ts))
    }

    /// Reference implementation for tests: the row of the LAST bar of
    /// `history`, recomputed from the whole slice, slowly and without any
    /// incremental state (every window is re-sliced, every kNN memory
    /// rebuilt from the labelled prefix and fully sorted). `Ok(None)` while
    /// warming up, `Err` for an invalid bar or config.
    pub fn from_history(cfg: &StructureConfig, history: &[Bar]) -> Result<Option<[f64; 8]>> {
        cfg.validate()?;
        for b in history {
            check_bar(b)?;
        }
        let Some(last) = history.last() else {
            return Ok(None);
        };
        let n = history.len();
        let t = n - 1;
        let closes: Vec<f64> = history.iter().map(|b| b.close).collect();

        // RSI series aligned with the bars (None where undefined).
        let rsi_series = |len: usize| -> Vec<Option<f64>> {
            let mut rsi = Rsi::new(len);
            let mut out = vec![None];
            out.extend((1..n).map(|i| rsi.update(closes[i] - closes[i - 1])));
            out
        };
        let (fast, slow) = (rsi_series(cfg.rsi_fast_bars), rsi_series(cfg.rsi_slow_bars));
        let m = cfg.rsi_smooth_bars;
        let pairs: Vec<Option<[f64; 2]>> = (0..n)
            .map(|i| {
                let window = (i + 1).checked_sub(m)?..=i;
                let s: Vec<f64> = slow[window.clone()]
                    .iter()
                    .copied()
                    .collect::<Option<_>>()?;
                let f: Vec<f64> = fast[window].iter().copied().collect::<Option<_>>()?;
                Some([wma(s.into_iter()), wma(f.into_iter())])
            })
            .collect();

        // mlmi_value at bar i: vote over the last M samples labelled by bar i.
        let value_at = |i: usize| -> Option<f64> {
            let q = pairs[i]?;
            let labelled: Vec<Sample> = (0..i)
                .filter_map(|s| {
                    pairs[s].map(|pair| Sample {
                        pair,
                        label: label_of(closes[s + 1] - closes[s]),
                        seq: s as u64,
                    })
                })
                .collect();
            let memory = &labelled[labelled.len().saturating_sub(cfg.knn_memory_samples)..];
            if memory.len() < cfg.knn_neighbors {
                return None;
            }
            let mut all: Vec<Candidate> = memory
                .iter()
                .map(|s| (dist2(q, s.pair), s.seq, s.label))
                .collect();
            all.sort_by(nearer);
            Some(vote(&all[..cfg.knn_neighbors]))
        };
        let value = value_at(t);
        let signal = (t + 1)
            .checked_sub(cfg.signal_bars)
            .and_then(|first| (first..=t).map(value_at).collect::<Option<Vec<f64>>>())
            .map(|vs| wma(vs.into_iter()));

        let weights = cfg.nw_weights();
        let lag = cfg.nw_max_lag_bars;
        let yhat_at = |i: usize| -> Option<f64> {
            let first = i.checked_sub(lag)?;
            Some(nw_estimate(&weights, closes[first..=i].iter().copied()))
        };
        let yhat = yhat_at(t);
        let slope = match (yhat, t.checked_sub(1).and_then(yhat_at)) {
            (Some(y), Some(p)) => Some(y - p),
            _ => None,
        };

        let w = cfg.profile.window_bars;
        let lvn = (n >= w).then(|| {
            let profile = Profile::build(&history[n - w..], cfg.profile.rows);
            let node = profile.nearest_node(last.close, cfg.profile.max_node_fraction);
            lvn_pair(node, last.close)
        });

        Ok(assemble(value, signal, yhat, slope, lvn, last.ts))
    }
}

fn assemble(
    value: Option<f64>,
    signal: Option<f64>,
    yhat: Option<f64>,
    slope: Option<f64>,
    lvn: Option<[f64; 2]>,
    ts: i64,
) -> Option<[f64; 8]> {
    let (value, signal, yhat, slope, lvn) = (value?, signal?, yhat?, slope?, lvn?);
    let [sin, cos] = time_of_day(ts);
    Some([value, signal, yhat, slope, lvn[0], lvn[1], sin, cos])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsi_matches_wilder_by_hand() {
        let mut r = Rsi::new(2);
        assert_eq!(r.update(1.0), None);
        // Seed: U = (1 + 0) / 2, D = (0 + 1) / 2 → 50.
        assert_eq!(r.update(-1.0), Some(50.0));
        // U = 0.5 + (2 − 0.5)/2 = 1.25, D = 0.5 + (0 − 0.5)/2 = 0.25.
        let v = r.update(2.0).unwrap();
        assert!((v - 100.0 * 1.25 / 1.5).abs() < 1e-12);
        assert_eq!(rsi_of(0.0, 0.0), 50.0);
        assert_eq!(rsi_of(f64::MAX, f64::MAX), 50.0);
        assert_eq!(rsi_of(1.0, 0.0), 100.0);
    }

    #[test]
    fn wma_weights_the_newest_most() {
        // (1·1 + 2·2 + 3·4) / 6
        assert_eq!(wma([1.0, 2.0, 4.0].into_iter()), 17.0 / 6.0);
    }

    #[test]
    fn kernel_weights_follow_the_formula_and_sum_to_one() {
        let cfg = StructureConfig::default();
        let w = cfg.nw_weights();
        assert_eq!(w.len(), 27);
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let raw = |i: f64| (1.0 + i * i / (2.0 * 8.0 * 64.0)).powf(-8.0);
        assert!((w[5] / w[0] - raw(5.0)).abs() < 1e-12);
        assert!(w.windows(2).all(|p| p[0] > p[1]), "decreasing in the lag");
        // A constant series is reproduced; the newest close weighs the most.
        assert!((nw_estimate(&w, std::iter::repeat_n(7.0, 27)) - 7.0).abs() < 1e-12);
    }

    #[test]
    fn neighbour_order_is_total() {
        let a = (1.0, 5, 1);
        let b = (1.0, 9, -1);
        assert_eq!(nearer(&b, &a), Ordering::Less, "more recent wins a tie");
        assert_eq!(nearer(&(0.5, 1, 0), &a), Ordering::Less);
    }

    #[test]
    fn time_of_day_uses_utc_hours_of_the_open() {
        let [s, c] = time_of_day(6 * 3600);
        assert!((s - 1.0).abs() < 1e-12 && c.abs() < 1e-12);
        let [s, c] = time_of_day(-18 * 3600); // 06:00 the day before 1970
        assert!((s - 1.0).abs() < 1e-12 && c.abs() < 1e-12);
        let [s, c] = time_of_day(86_400 * 3 + 12 * 3600 + 1800);
        let a = std::f64::consts::TAU * 12.5 / 24.0;
        assert_eq!([s, c], [a.sin(), a.cos()]);
    }

    #[test]
    fn warmup_of_the_defaults() {
        assert_eq!(StructureConfig::default().warmup_bars(), 259);
    }
}
