//! Regime features: an 8-D vector of interpretable market-state statistics
//! per bar (volatility at two horizons, trend, autocorrelation, volume,
//! range, drawdown, persistence), computed incrementally, with a naive
//! reference ([`RegimeFeatures::from_history`]).
//!
//! # The vector
//!
//! [`RegimeFeatures::push`] takes the next closed bar and returns
//! `Ok(Some(vector))` for that bar, or `Ok(None)` while warming up. Values
//! are **raw**; the pipeline normalises them with [`crate::RunningNorm`].
//! Windows are counted in bars of whatever series is pushed (30-minute bars
//! in the GrandModel pipeline, where the defaults span 6 h and 24 h):
//! `S` = [`RegimeConfig::short_window_bars`] (12), `W` =
//! [`RegimeConfig::long_window_bars`] (48), `q` =
//! [`RegimeConfig::variance_ratio_lag_bars`] (4). With `r[k] = ln(close[k]
//! / close[k−1])` the log return of bar `k` and every window ending at the
//! current bar `t` (inclusive):
//!
//! | # | name | definition | raw range |
//! |---|---|---|---|
//! | 0 | `realized_vol_short` | `100 · sqrt(mean(r²))` over the last `S` returns (per-bar RMS log return, not annualised, not demeaned) | percent, ≥ 0 |
//! | 1 | `realized_vol_long` | the same over the last `W` returns | percent, ≥ 0 |
//! | 2 | `trend_efficiency` | Kaufman's efficiency ratio with a sign: `Σr / Σ abs(r)` over the last `W` returns; `abs(x)` is the trend strength (1 = a straight line, ≈ 0 = noise), the sign its direction | [−1, 1] |
//! | 3 | `return_autocorr` | lag-1 autocorrelation of the last `W` returns: `Σ_{k≥2} (r_k − m)(r_{k−1} − m) / Σ (r_k − m)²`, `m` their mean; > 0 momentum, < 0 mean reversion | [−1, 1] |
//! | 4 | `volume_zscore` | `(volume[t] − m) / sd` over the last `W` volumes (population `sd`, current bar included) | `abs(z) ≤ √(W−1)` ≈ 6.86 |
//! | 5 | `range_expansion` | `TR[t] / mean(TR)` over the last `W` bars, `TR[k] = max(high[k], close[k−1]) − min(low[k], close[k−1])` | [0, W] |
//! | 6 | `drawdown_pct` | `(close[t] / max(high over the last W bars) − 1) · 100` | (−100, 0] |
//! | 7 | `hurst_vr` | a Hurst exponent from the variance ratio: `H = 0.5 + ln(VR) / (2 ln q)`, `VR = var(q-bar sums) / (q · var(r))` over the last `W` returns (overlapping `q`-sums, both variances about the window mean, population form), clamped to [0, 1]; 0.5 = random walk, > 0.5 persistent, < 0.5 anti-persistent | [0, 1] |
//!
//! `H` comes from `Var(Σ_q r) = q^{2H} · Var(r)` for fractional Brownian
//! motion; it is the plain estimator (no small-sample bias correction), so
//! on `W = 48` i.i.d. returns it averages a little below 0.5 (0.46 measured
//! over 20 Gaussian series of 2000 bars; AR(1) returns with coefficient
//! ±0.6 average 0.76 and 0.10 on one 800-bar series each).
//!
//! Why these eight: the two volatilities separate the high-volatility
//! regime and its onset (short ≫ long); `trend_efficiency` separates the
//! trending regimes from each other and from ranging; autocorrelation and
//! `hurst_vr` separate momentum from mean reversion at lag 1 and over `q`
//! bars; `volume_zscore` and `range_expansion` flag participation and range
//! shocks; `drawdown_pct` says where price sits against its recent high.
//!
//! # Degenerate windows
//!
//! A spread counts as zero when it is at most `1e-12` times the largest
//! magnitude in its window (so a flat series does not turn rounding noise
//! into a statistic). Then: autocorrelation 0, z-score 0, `hurst_vr` 0.5,
//! and `trend_efficiency` 0 when `Σ abs(r) = 0`. A zero mean true range gives
//! `range_expansion` 1. Only valid bars are accepted (below), but extreme
//! valid input can still overflow (prices from 1e-300 to 1e300, volumes up
//! to `f64::MAX`): a return that is not finite counts as 0, and any other
//! non-finite result takes the neutral value above (0 for the volatilities
//! and the drawdown). So every output is finite.
//!
//! # Warm-up and cost
//!
//! `push` returns `Ok(None)` until `W + 1` bars (49) have been seen (`W`
//! returns). A bar that breaks the OHLCV invariants ([`Bar::is_valid`]) is
//! an `Err(Error::Invalid)` and changes nothing (the common contract of
//! [`crate::features`]). Each push costs `O(W)` — every statistic is
//! recomputed over ring buffers, which keeps it exact (no running-sum drift
//! after a huge value leaves the window) — and allocates nothing.
//! [`RegimeFeatures::from_history`] rebuilds the same windows from a slice
//! and applies the same formulas; the two agree exactly.

use std::collections::VecDeque;

use super::lvn::check_bar;
use crate::{Bar, Error, Result};

/// Entries of a regime vector.
pub const REGIME_DIM: usize = 8;

/// Names of the regime vector's entries, in order.
pub const REGIME_FEATURE_NAMES: [&str; REGIME_DIM] = [
    "realized_vol_short",
    "realized_vol_long",
    "trend_efficiency",
    "return_autocorr",
    "volume_zscore",
    "range_expansion",
    "drawdown_pct",
    "hurst_vr",
];

/// Largest accepted window, in bars.
pub const MAX_REGIME_WINDOW_BARS: usize = 100_000;

/// Spreads at most this fraction of the window's largest magnitude count
/// as zero.
const FLAT: f64 = 1e-12;

/// Settings of [`RegimeFeatures`]; see the module docs for the formulas.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegimeConfig {
    /// `S`: returns in `realized_vol_short` (default 12).
    pub short_window_bars: usize,
    /// `W`: the window of every other statistic (default 48).
    pub long_window_bars: usize,
    /// `q`: the horizon of the variance ratio behind `hurst_vr` (default 4).
    pub variance_ratio_lag_bars: usize,
}

impl Default for RegimeConfig {
    fn default() -> Self {
        Self {
            short_window_bars: 12,
            long_window_bars: 48,
            variance_ratio_lag_bars: 4,
        }
    }
}

impl RegimeConfig {
    /// Checks `1 ≤ S ≤ W ≤ 100 000`, `W ≥ 4` and `2 ≤ q ≤ W / 2`.
    pub fn validate(&self) -> Result<()> {
        let w = self.long_window_bars;
        if !(4..=MAX_REGIME_WINDOW_BARS).contains(&w) {
            return Err(Error::config(
                "long_window_bars",
                w,
                format!("4 ..= {MAX_REGIME_WINDOW_BARS} bars"),
            ));
        }
        let s = self.short_window_bars;
        if !(1..=w).contains(&s) {
            return Err(Error::config(
                "short_window_bars",
                s,
                format!("1 ..= long_window_bars ({w})"),
            ));
        }
        let q = self.variance_ratio_lag_bars;
        if !(2..=w / 2).contains(&q) {
            return Err(Error::config(
                "variance_ratio_lag_bars",
                q,
                format!("2 ..= long_window_bars / 2 ({})", w / 2),
            ));
        }
        Ok(())
    }

    /// Bars needed before the first vector: `W + 1`.
    pub fn warmup_bars(&self) -> usize {
        self.long_window_bars + 1
    }
}

/// Incremental regime statistics; see the module docs.
#[derive(Debug, Clone)]
pub struct RegimeFeatures {
    config: RegimeConfig,
    seen: u64,
    prev_close: f64,
    returns: VecDeque<f64>,
    volumes: VecDeque<f64>,
    true_ranges: VecDeque<f64>,
    highs: VecDeque<f64>,
}

impl RegimeFeatures {
    /// A computer with no bars seen. Errors if `config` is invalid.
    pub fn new(config: RegimeConfig) -> Result<Self> {
        config.validate()?;
        let w = config.long_window_bars;
        Ok(Self {
            config,
            seen: 0,
            prev_close: f64::NAN,
            returns: VecDeque::with_capacity(w + 1),
            volumes: VecDeque::with_capacity(w + 1),
            true_ranges: VecDeque::with_capacity(w + 1),
            highs: VecDeque::with_capacity(w + 1),
        })
    }

    /// The settings.
    pub fn config(&self) -> &RegimeConfig {
        &self.config
    }

    /// Bars pushed so far.
    pub fn bars_seen(&self) -> u64 {
        self.seen
    }

    /// Bars needed before [`push`](Self::push) returns a vector.
    pub fn warmup_bars(&self) -> usize {
        self.config.warmup_bars()
    }

    /// Whether the next push returns a vector.
    pub fn is_ready(&self) -> bool {
        self.seen + 1 >= self.warmup_bars() as u64
    }

    /// Forgets every bar (keeps the settings and the allocations).
    pub fn reset(&mut self) {
        self.seen = 0;
        self.prev_close = f64::NAN;
        self.returns.clear();
        self.volumes.clear();
        self.true_ranges.clear();
        self.highs.clear();
    }

    /// Takes the next closed bar; returns its vector once warmed up
    /// (`Ok(None)` before). An invalid bar (see [`Bar::is_valid`]) is an
    /// `Err` and changes nothing. `O(W)`, no allocation.
    pub fn push(&mut self, bar: &Bar) -> Result<Option<[f64; REGIME_DIM]>> {
        check_bar(bar)?;
        let w = self.config.long_window_bars;
        let first = self.seen == 0;
        self.seen += 1;
        if !first {
            let pc = self.prev_close;
            push_bounded(&mut self.returns, log_return(pc, bar.close), w);
            push_bounded(&mut self.true_ranges, true_range(bar, pc), w);
        }
        push_bounded(&mut self.volumes, bar.volume, w);
        push_bounded(&mut self.highs, bar.high, w);
        self.prev_close = bar.close;
        if self.seen < self.config.warmup_bars() as u64 {
            return Ok(None);
        }
        Ok(Some(compute(
            &self.config,
            self.returns.make_contiguous(),
            self.volumes.make_contiguous(),
            self.true_ranges.make_contiguous(),
            self.highs.make_contiguous(),
            bar.close,
        )))
    }

    /// The naive reference: the vector of the last bar of `bars`,
    /// recomputed from the slice (`Ok(None)` if it is shorter than
    /// `W + 1`). An invalid config or bar is an `Err`.
    pub fn from_history(config: &RegimeConfig, bars: &[Bar]) -> Result<Option<[f64; REGIME_DIM]>> {
        config.validate()?;
        for b in bars {
            check_bar(b)?;
        }
        if bars.len() < config.warmup_bars() {
            return Ok(None);
        }
        let w = config.long_window_bars;
        let t = bars.len() - 1;
        let window = t + 1 - w..=t;
        let returns: Vec<f64> = window
            .clone()
            .map(|k| log_return(bars[k - 1].close, bars[k].close))
            .collect();
        let trs: Vec<f64> = window
            .clone()
            .map(|k| true_range(&bars[k], bars[k - 1].close))
            .collect();
        let volumes: Vec<f64> = bars[window.clone()].iter().map(|b| b.volume).collect();
        let highs: Vec<f64> = bars[window].iter().map(|b| b.high).collect();
        Ok(Some(compute(
            config,
            &returns,
            &volumes,
            &trs,
            &highs,
            bars[t].close,
        )))
    }
}

/// Appends `x`, dropping from the front beyond `cap` items.
fn push_bounded(q: &mut VecDeque<f64>, x: f64, cap: usize) {
    q.push_back(x);
    while q.len() > cap {
        q.pop_front();
    }
}

/// `ln(close / prev)`, or 0 when that is not finite.
fn log_return(prev: f64, close: f64) -> f64 {
    let r = (close / prev).ln();
    if r.is_finite() {
        r
    } else {
        0.0
    }
}

/// `max(high, prev_close) − min(low, prev_close)` (NaN-ignoring).
fn true_range(bar: &Bar, prev_close: f64) -> f64 {
    bar.high.max(prev_close) - bar.low.min(prev_close)
}

/// `x` if finite, else `fallback`.
fn finite_or(x: f64, fallback: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        fallback
    }
}

/// Mean of `xs` (taken as `Σ x / n` term by term so that it cannot
/// overflow on finite input).
fn mean(xs: &[f64]) -> f64 {
    let n = xs.len() as f64;
    xs.iter().map(|x| x / n).sum()
}

/// Largest magnitude in `xs`.
fn max_abs(xs: &[f64]) -> f64 {
    xs.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// Whether a spread `sd` is zero against the scale of `xs`.
fn is_flat(sd: f64, xs: &[f64]) -> bool {
    sd.is_nan() || sd <= FLAT * max_abs(xs)
}

/// `100 · sqrt(mean(r²))`.
fn realized_vol(r: &[f64]) -> f64 {
    let n = r.len() as f64;
    finite_or(100.0 * r.iter().map(|x| x * x / n).sum::<f64>().sqrt(), 0.0)
}

/// `Σr / Σ|r|`.
fn efficiency(r: &[f64]) -> f64 {
    let path: f64 = r.iter().map(|x| x.abs()).sum();
    if path > 0.0 {
        finite_or(r.iter().sum::<f64>() / path, 0.0).clamp(-1.0, 1.0)
    } else {
        0.0
    }
}

/// Lag-1 autocorrelation (the standard ACF estimator).
fn autocorr(r: &[f64]) -> f64 {
    let n = r.len() as f64;
    let m = mean(r);
    let den: f64 = r.iter().map(|x| (x - m) * (x - m)).sum();
    if is_flat((den / n).sqrt(), r) {
        return 0.0;
    }
    let num: f64 = r.windows(2).map(|p| (p[1] - m) * (p[0] - m)).sum();
    finite_or(num / den, 0.0).clamp(-1.0, 1.0)
}

/// z-score of the last value against the whole window.
fn zscore_last(v: &[f64]) -> f64 {
    let n = v.len() as f64;
    let m = mean(v);
    let sd = v.iter().map(|x| (x - m) * (x - m) / n).sum::<f64>().sqrt();
    if is_flat(sd, v) {
        return 0.0;
    }
    let last = v[v.len() - 1];
    let bound = (n - 1.0).sqrt();
    finite_or((last - m) / sd, 0.0).clamp(-bound, bound)
}

/// The last true range over the window's mean.
fn range_expansion(tr: &[f64]) -> f64 {
    let m = mean(tr);
    if !(m > 0.0 && m.is_finite()) {
        return 1.0;
    }
    let n = tr.len() as f64;
    finite_or(tr[tr.len() - 1] / m, 1.0).clamp(0.0, n)
}

/// `(close / max(highs) − 1) · 100`.
fn drawdown_pct(close: f64, highs: &[f64]) -> f64 {
    let peak = highs.iter().fold(f64::NEG_INFINITY, |m, &h| m.max(h));
    if peak > 0.0 {
        finite_or((close / peak - 1.0) * 100.0, 0.0).clamp(-100.0, 0.0)
    } else {
        0.0
    }
}

/// `0.5 + ln(VR) / (2 ln q)` with the plain overlapping variance ratio.
fn hurst_vr(r: &[f64], q: usize) -> f64 {
    let n = r.len();
    let m = mean(r);
    let var1 = r.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n as f64;
    if is_flat(var1.sqrt(), r) {
        return 0.5;
    }
    let qm = q as f64 * m;
    let sums = n - q + 1;
    let mut varq = 0.0;
    for k in 0..sums {
        let s: f64 = r[k..k + q].iter().sum();
        varq += (s - qm) * (s - qm);
    }
    varq /= sums as f64;
    let vr = varq / (q as f64 * var1);
    if vr.is_nan() {
        0.5
    } else if vr <= 0.0 {
        0.0
    } else {
        finite_or(0.5 + vr.ln() / (2.0 * (q as f64).ln()), 0.5).clamp(0.0, 1.0)
    }
}

/// The vector from the windows (oldest first, each `W` long).
fn compute(
    cfg: &RegimeConfig,
    returns: &[f64],
    volumes: &[f64],
    true_ranges: &[f64],
    highs: &[f64],
    close: f64,
) -> [f64; REGIME_DIM] {
    let short = &returns[returns.len() - cfg.short_window_bars..];
    [
        realized_vol(short),
        realized_vol(returns),
        efficiency(returns),
        autocorr(returns),
        zscore_last(volumes),
        range_expansion(true_ranges),
        drawdown_pct(close, highs),
        hurst_vr(returns, cfg.variance_ratio_lag_bars),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_on_hand_values() {
        // A straight line up: efficiency 1, no spread in returns.
        let r = [0.01; 8];
        assert_eq!(efficiency(&r), 1.0);
        assert_eq!(autocorr(&r), 0.0, "flat returns: no autocorrelation");
        assert_eq!(hurst_vr(&r, 2), 0.5);
        assert!((realized_vol(&r) - 1.0).abs() < 1e-12);
        // Alternating returns: perfectly anti-persistent.
        let alt = [0.01, -0.01, 0.01, -0.01, 0.01, -0.01, 0.01, -0.01];
        assert_eq!(efficiency(&alt), 0.0);
        assert!((autocorr(&alt) + 7.0 / 8.0).abs() < 1e-12);
        assert_eq!(hurst_vr(&alt, 2), 0.0, "2-bar sums are all zero");
        // z-score: [1, 1, 1, 5]: mean 2, population sd sqrt(3).
        let z = zscore_last(&[1.0, 1.0, 1.0, 5.0]);
        assert!((z - 3.0 / 3f64.sqrt()).abs() < 1e-12, "{z}");
        assert_eq!(zscore_last(&[0.1; 48]), 0.0);
        assert_eq!(range_expansion(&[1.0, 1.0, 1.0, 5.0]), 2.5);
        assert_eq!(range_expansion(&[0.0; 4]), 1.0);
        assert!((drawdown_pct(90.0, &[80.0, 100.0, 95.0]) + 10.0).abs() < 1e-12);
    }

    #[test]
    fn validate_names_the_field() {
        let bad = RegimeConfig {
            variance_ratio_lag_bars: 30,
            ..RegimeConfig::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("variance_ratio_lag_bars"), "{e}");
        let bad = RegimeConfig {
            short_window_bars: 49,
            ..RegimeConfig::default()
        };
        assert!(RegimeFeatures::new(bad).is_err());
        assert_eq!(RegimeConfig::default().warmup_bars(), 49);
    }
}
