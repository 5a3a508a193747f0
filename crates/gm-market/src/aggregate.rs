//! Timeframes: bar-interval detection ([`detect_interval`]) and exact
//! aggregation of tactical bars into structure bars ([`Aggregator`],
//! [`aggregate`]).
//!
//! The detection rule is documented on [`detect_interval`], the aggregation
//! rule on [`Aggregator`].

use crate::{Bar, BarInterval, Error, Result};

/// Bars examined by [`detect_interval`].
pub const DETECT_WINDOW: usize = 1000;
/// Fewest bars [`detect_interval`] accepts.
pub const MIN_BARS_FOR_INTERVAL: usize = 3;

/// Detects the bar interval of a series from its first [`DETECT_WINDOW`]
/// bars.
///
/// # Rule
///
/// Over the first [`DETECT_WINDOW`] bars, take the differences of
/// consecutive timestamps (all must be positive). A difference is
/// *frequent* if at least 10 % of the differences equal it; the interval is
/// the **smallest frequent difference** `c`, accepted only if at least 90 %
/// of all differences are whole multiples of `c`. Weekend, overnight and
/// holiday gaps are multiples of the interval, so they neither win nor
/// spoil the vote (daily bars with weekends: 80 % are one day, the rest three
/// days); a few off-grid stamps (a DST shift) are tolerated; irregular data
/// has no frequent difference, or too many off-grid ones, and is an
/// [`Error::Invalid`]. Fewer than [`MIN_BARS_FOR_INTERVAL`] bars is
/// [`Error::NotEnoughData`].
pub fn detect_interval(bars: &[Bar]) -> Result<BarInterval> {
    let ts: Vec<i64> = bars.iter().take(DETECT_WINDOW).map(|b| b.ts).collect();
    detect_interval_ts(&ts)
}

/// [`detect_interval`] on bare timestamps (all of them are examined).
pub fn detect_interval_ts(ts: &[i64]) -> Result<BarInterval> {
    if ts.len() < MIN_BARS_FOR_INTERVAL {
        return Err(Error::NotEnoughData(format!(
            "interval detection needs at least {MIN_BARS_FOR_INTERVAL} bars, got {}",
            ts.len()
        )));
    }
    let mut diffs = Vec::with_capacity(ts.len() - 1);
    for (i, w) in ts.windows(2).enumerate() {
        let d = w[1] - w[0];
        if d <= 0 {
            return Err(Error::Invalid(format!(
                "timestamps not increasing at bar {} ({} after {})",
                i + 1,
                w[1],
                w[0]
            )));
        }
        diffs.push(d);
    }
    let m = diffs.len();
    diffs.sort_unstable();
    // Distinct differences with their counts, ascending.
    let mut counts: Vec<(i64, usize)> = Vec::new();
    for &d in &diffs {
        match counts.last_mut() {
            Some((v, n)) if *v == d => *n += 1,
            _ => counts.push((d, 1)),
        }
    }
    let frequent = |n: usize| n * 10 >= m;
    let describe = || {
        let mut top = counts.clone();
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        top.iter()
            .take(3)
            .map(|(d, n)| format!("{d} s × {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(&(c, _)) = counts.iter().find(|(_, n)| frequent(*n)) else {
        return Err(Error::Invalid(format!(
            "no consistent bar interval in the first {} bars: no spacing occurs in 10 % of \
             them (most common: {})",
            ts.len(),
            describe()
        )));
    };
    let on_grid = diffs.iter().filter(|&&d| d % c == 0).count();
    if on_grid * 10 < m * 9 {
        return Err(Error::Invalid(format!(
            "no consistent bar interval in the first {} bars: only {on_grid} of {m} spacings \
             are multiples of the smallest frequent one, {c} s (most common: {})",
            ts.len(),
            describe()
        )));
    }
    Ok(BarInterval(c))
}

/// One structure bar: the aggregate of the tactical bars of one bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AggBar {
    /// The aggregate; `bar.ts` is the bucket start.
    pub bar: Bar,
    /// How many tactical bars it folds.
    pub bars_in: u32,
    /// Whether all `k` tactical bars were there (`bars_in == k`).
    pub complete: bool,
}

/// Incremental aggregation of tactical bars into time-aligned buckets of
/// `k` bars.
///
/// # Aggregation rule
///
/// A structure bar covers a time-aligned bucket of `k × interval` seconds:
/// bucket `m` is `[origin + m·W, origin + (m+1)·W)` with `W = k × interval`
/// and `origin` 0 (the Unix epoch) unless set, so 30-minute bars start at
/// :00 and :30 and 4-hour bars at 00:00, 04:00, ... UTC. Its `ts` is the
/// bucket start, `open` the first bar's open, `high` the maximum high,
/// `low` the minimum low, `close` the last bar's close and `volume` the sum,
/// folded in input order, so the result is exact (no rounding beyond the
/// volume sum).
///
/// A bucket is emitted when a bar of a later bucket arrives (so
/// [`Aggregator::push`] returns the bucket *before* the one the bar opens)
/// or on [`Aggregator::flush`]; a bucket is never split or merged across a
/// gap, so Friday's last bar and Monday's first never share a bar. A bucket
/// that received fewer than `k` bars (a gap, the start or end of the data)
/// is still emitted, with `complete = false`. Note that the newest bucket is
/// therefore seen one tactical bar after its last bar closed; a consumer that
/// must not wait can read the partial bucket with [`Aggregator::current`].
///
/// Input must be in strictly increasing time order (the CSV loader and the
/// generator guarantee it); a bar not after the previous accepted bar is
/// skipped and counted ([`Aggregator::skipped`]), identically in the batch
/// function.
///
/// # Example
///
/// ```
/// use gm_market::{Aggregator, Bar, BarInterval};
/// let mut agg = Aggregator::new(BarInterval::M5, 6)?;
/// let bar = |ts, p| Bar { ts, open: p, high: p + 1.0, low: p - 1.0, close: p, volume: 1.0 };
/// for i in 0..6 {
///     assert!(agg.push(&bar(1_704_187_800 + 300 * i, 100.0)).is_none());
/// }
/// let done = agg.push(&bar(1_704_189_600, 101.0)).unwrap(); // 10:00 opens a new bucket
/// assert_eq!((done.bar.ts, done.bars_in, done.complete), (1_704_187_800, 6, true));
/// # Ok::<(), gm_market::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Aggregator {
    interval: BarInterval,
    k: u32,
    width: i64,
    origin: i64,
    /// Open bucket: index, running aggregate, bars folded.
    open: Option<(i64, Bar, u32)>,
    last_ts: Option<i64>,
    skipped: u64,
}

impl Aggregator {
    /// Buckets of `k` bars of `tactical` aligned to the Unix epoch.
    pub fn new(tactical: BarInterval, k: u32) -> Result<Self> {
        Self::with_origin(tactical, k, 0)
    }

    /// Buckets aligned to `origin_secs` (e.g. a session open) instead of the
    /// epoch: bucket starts are `origin_secs + m × k × interval`.
    pub fn with_origin(tactical: BarInterval, k: u32, origin_secs: i64) -> Result<Self> {
        let width = bucket_width(tactical, k)?;
        Ok(Self {
            interval: tactical,
            k,
            width,
            origin: origin_secs,
            open: None,
            last_ts: None,
            skipped: 0,
        })
    }

    /// The tactical interval.
    pub fn interval(&self) -> BarInterval {
        self.interval
    }

    /// Tactical bars per structure bar.
    pub fn k(&self) -> u32 {
        self.k
    }

    /// The structure interval, `k × interval`.
    pub fn structure_interval(&self) -> BarInterval {
        BarInterval(self.width)
    }

    /// Bars skipped because they were not after the previous bar.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Start of the bucket holding `ts`.
    pub fn bucket_start(&self, ts: i64) -> i64 {
        self.origin + (ts - self.origin).div_euclid(self.width) * self.width
    }

    /// Adds one tactical bar; returns the previous bucket if this bar opens
    /// a new one.
    pub fn push(&mut self, bar: &Bar) -> Option<AggBar> {
        if self.last_ts.is_some_and(|t| bar.ts <= t) {
            self.skipped += 1;
            return None;
        }
        self.last_ts = Some(bar.ts);
        let idx = (bar.ts - self.origin).div_euclid(self.width);
        if let Some((open_idx, acc, n)) = &mut self.open {
            if *open_idx == idx {
                acc.high = acc.high.max(bar.high);
                acc.low = acc.low.min(bar.low);
                acc.close = bar.close;
                acc.volume += bar.volume;
                *n += 1;
                return None;
            }
        }
        let done = self.flush();
        let start = Bar {
            ts: self.origin + idx * self.width,
            ..*bar
        };
        self.open = Some((idx, start, 1));
        done
    }

    /// Emits the open bucket, if any (complete only if it has all `k` bars).
    pub fn flush(&mut self) -> Option<AggBar> {
        let out = self.current();
        self.open = None;
        out
    }

    /// The open bucket as it stands, without closing it.
    pub fn current(&self) -> Option<AggBar> {
        self.open.map(|(_, bar, n)| AggBar {
            bar,
            bars_in: n,
            complete: n == self.k,
        })
    }
}

fn bucket_width(tactical: BarInterval, k: u32) -> Result<i64> {
    if tactical.seconds() <= 0 {
        return Err(Error::config(
            "tactical_interval",
            tactical.seconds(),
            "a positive number of seconds",
        ));
    }
    if k == 0 {
        return Err(Error::config(
            "k",
            k,
            "at least 1 tactical bar per structure bar",
        ));
    }
    tactical
        .seconds()
        .checked_mul(i64::from(k))
        .ok_or_else(|| Error::config("k", k, "k × interval must fit in i64 seconds"))
}

/// Aggregates a whole series (the last, possibly partial, bucket included);
/// equal to pushing every bar into an [`Aggregator`] and flushing.
pub fn aggregate(bars: &[Bar], interval: BarInterval, k: u32) -> Result<Vec<AggBar>> {
    aggregate_with_origin(bars, interval, k, 0)
}

/// [`aggregate`] with buckets aligned to `origin_secs`.
pub fn aggregate_with_origin(
    bars: &[Bar],
    interval: BarInterval,
    k: u32,
    origin_secs: i64,
) -> Result<Vec<AggBar>> {
    let width = bucket_width(interval, k)?;
    let bucket = |ts: i64| (ts - origin_secs).div_euclid(width);
    let mut out = Vec::with_capacity(bars.len() / k as usize + 1);
    let mut i = 0;
    let mut last = i64::MIN;
    while i < bars.len() {
        if bars[i].ts <= last && i > 0 {
            i += 1;
            continue;
        }
        // One bucket: bars[i..j] minus the out-of-order ones.
        let b = bucket(bars[i].ts);
        let mut agg = Bar {
            ts: origin_secs + b * width,
            ..bars[i]
        };
        last = bars[i].ts;
        let mut n = 1u32;
        let mut j = i + 1;
        while j < bars.len() {
            let x = &bars[j];
            if x.ts <= last {
                j += 1;
                continue;
            }
            if bucket(x.ts) != b {
                break;
            }
            agg.high = agg.high.max(x.high);
            agg.low = agg.low.min(x.low);
            agg.close = x.close;
            agg.volume += x.volume;
            last = x.ts;
            n += 1;
            j += 1;
        }
        out.push(AggBar {
            bar: agg,
            bars_in: n,
            complete: n == k,
        });
        i = j;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_parameters_are_config_errors() {
        assert!(Aggregator::new(BarInterval::M5, 0).is_err());
        assert!(Aggregator::new(BarInterval(0), 6).is_err());
        assert!(aggregate(&[], BarInterval(i64::MAX), 2).is_err());
        assert!(aggregate(&[], BarInterval::M5, 6).unwrap().is_empty());
    }

    #[test]
    fn too_few_bars_and_non_increasing() {
        assert!(matches!(
            detect_interval_ts(&[0, 300]),
            Err(Error::NotEnoughData(_))
        ));
        assert!(matches!(
            detect_interval_ts(&[0, 300, 300]),
            Err(Error::Invalid(_))
        ));
        assert_eq!(detect_interval_ts(&[0, 300, 600]).unwrap(), BarInterval::M5);
    }
}
