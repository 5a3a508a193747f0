//! [`Trend`]: the growth slope of the budget's measure by ordinary least
//! squares over the last N samples, and the time until it reaches the limit.
//!
//! Why least squares and not Theil–Sen: Theil–Sen (the median of all
//! pairwise slopes) shrugs off outliers, but costs O(N²) per sample — 1 770
//! slopes for a 60-sample window, 259 000 for the full 720-sample history —
//! which would blow the monitor's 20 µs per-sample budget. Least squares is
//! one O(N) pass over the window (two, centred, for precision), and memory
//! growth is what it is meant to catch: a steady climb, which it fits
//! exactly. A single spike moves it by spike / N, and a spike that
//! matters crosses a threshold and raises an alert anyway.

use std::time::Duration;

/// The trend of a series of `(seconds, bytes)` points.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Trend {
    /// Growth in bytes per second (least-squares slope; negative when
    /// shrinking; `0.0` with fewer than two points).
    pub slope_bytes_per_sec: f64,
    /// Points the fit used.
    pub samples: usize,
    /// Time between the first and last point used.
    pub span: Duration,
    /// Time until the last value, growing at the slope, reaches the budget's
    /// limit: `None` when there is no budget or the value is not growing
    /// (slope <= 0, or fewer than two points); zero when it is already at or
    /// over the limit and still growing.
    pub time_to_limit: Option<Duration>,
}

impl Trend {
    /// Fits `points` (`(seconds, bytes)`, any order) by least squares and,
    /// given a `limit_bytes`, estimates the time until the **newest** point's
    /// value (the one with the largest time) reaches it.
    ///
    /// ```
    /// use gm_monitor::Trend;
    /// // 1 MiB per second for 10 s, limit 100 MiB.
    /// let pts: Vec<(f64, u64)> = (0..10).map(|i| (i as f64, (i as u64) << 20)).collect();
    /// let t = Trend::fit(&pts, Some(100 << 20));
    /// assert!((t.slope_bytes_per_sec - (1u64 << 20) as f64).abs() < 1e-3);
    /// assert_eq!(t.time_to_limit.unwrap().as_secs(), 91);
    /// ```
    pub fn fit(points: &[(f64, u64)], limit_bytes: Option<u64>) -> Trend {
        Self::fit_iter(points.iter().copied(), limit_bytes)
    }

    /// [`fit`](Self::fit) over an iterator that can be walked twice (the
    /// fit centres the data first, for precision with byte counts near
    /// 2^40).
    pub fn fit_iter<I>(points: I, limit_bytes: Option<u64>) -> Trend
    where
        I: Iterator<Item = (f64, u64)> + Clone,
    {
        let (mut n, mut st, mut sy) = (0usize, 0.0f64, 0.0f64);
        let (mut t_min, mut t_max) = (f64::INFINITY, f64::NEG_INFINITY);
        let mut last = None;
        for (t, y) in points.clone() {
            n += 1;
            st += t;
            sy += y as f64;
            t_min = t_min.min(t);
            if t >= t_max {
                t_max = t;
                last = Some(y);
            }
        }
        if n < 2 {
            return Trend {
                samples: n,
                ..Trend::default()
            };
        }
        let (mt, my) = (st / n as f64, sy / n as f64);
        let (mut sxx, mut sxy) = (0.0f64, 0.0f64);
        for (t, y) in points {
            let dt = t - mt;
            sxx += dt * dt;
            sxy += dt * (y as f64 - my);
        }
        let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
        let span = Duration::from_secs_f64((t_max - t_min).max(0.0));
        let time_to_limit = match (limit_bytes, last) {
            (Some(limit), Some(last)) if slope > 0.0 => {
                let left = limit.saturating_sub(last) as f64;
                Some(Duration::try_from_secs_f64(left / slope).unwrap_or(Duration::MAX))
            }
            _ => None,
        };
        Trend {
            slope_bytes_per_sec: slope,
            samples: n,
            span,
            time_to_limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_growth_gives_slope_and_eta() {
        // 5 s interval, +10 MB per sample = 2 MB/s, from 100 MB; limit 1 GB.
        let pts: Vec<(f64, u64)> = (0..60)
            .map(|i| (i as f64 * 5.0, 100_000_000 + i as u64 * 10_000_000))
            .collect();
        let t = Trend::fit(&pts, Some(1_000_000_000));
        assert!((t.slope_bytes_per_sec - 2_000_000.0).abs() < 1e-6, "{t:?}");
        assert_eq!(t.samples, 60);
        assert_eq!(t.span, Duration::from_secs(295));
        // Last value 690 MB; 310 MB left at 2 MB/s = 155 s.
        let eta = t.time_to_limit.unwrap().as_secs_f64();
        assert!((eta - 155.0).abs() < 1e-6, "{eta}");
    }

    #[test]
    fn precision_holds_near_a_terabyte() {
        let base = 1u64 << 40;
        let pts: Vec<(f64, u64)> = (0..720)
            .map(|i| (1e6 + i as f64 * 5.0, base + i as u64 * 4096))
            .collect();
        let t = Trend::fit(&pts, None);
        assert!((t.slope_bytes_per_sec - 4096.0 / 5.0).abs() < 1e-6, "{t:?}");
        assert_eq!(t.time_to_limit, None);
    }

    #[test]
    fn flat_and_shrinking_have_no_eta() {
        let flat: Vec<(f64, u64)> = (0..30).map(|i| (i as f64, 500)).collect();
        let t = Trend::fit(&flat, Some(1000));
        assert_eq!(t.slope_bytes_per_sec, 0.0);
        assert_eq!(t.time_to_limit, None);

        let down: Vec<(f64, u64)> = (0..30).map(|i| (i as f64, 900 - i * 10)).collect();
        let t = Trend::fit(&down, Some(1000));
        assert!((t.slope_bytes_per_sec + 10.0).abs() < 1e-9);
        assert_eq!(t.time_to_limit, None);
    }

    #[test]
    fn too_few_points_or_one_instant_is_flat() {
        assert_eq!(Trend::fit(&[], Some(10)), Trend::default());
        let one = Trend::fit(&[(1.0, 5)], Some(10));
        assert_eq!((one.samples, one.time_to_limit), (1, None));
        let same_t = Trend::fit(&[(1.0, 5), (1.0, 9)], Some(10));
        assert_eq!(same_t.slope_bytes_per_sec, 0.0);
        assert_eq!(same_t.time_to_limit, None);
    }

    #[test]
    fn order_does_not_matter_and_the_newest_point_is_current() {
        let mut pts: Vec<(f64, u64)> = (0..10).map(|i| (i as f64, 100 + i * 10)).collect();
        let fwd = Trend::fit(&pts, Some(1000));
        pts.reverse();
        let rev = Trend::fit(&pts, Some(1000));
        assert_eq!(fwd, rev);
        // newest value 190, 810 left at 10/s.
        assert_eq!(fwd.time_to_limit, Some(Duration::from_secs(81)));
    }

    #[test]
    fn over_the_limit_and_growing_is_zero() {
        let pts = [(0.0, 1000), (1.0, 1100)];
        let t = Trend::fit(&pts, Some(1000));
        assert_eq!(t.time_to_limit, Some(Duration::ZERO));
    }
}
