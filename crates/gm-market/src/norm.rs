//! [`RunningNorm`]: online z-score normalisation (Welford) that is stable
//! over millions of updates and never emits NaN or infinity.

/// Running mean and variance of one feature, and the z-score of a value
/// against the statistics of everything seen *before* it (so normalising
/// never looks ahead).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunningNorm {
    n: u64,
    mean: f64,
    m2: f64,
    clip: f64,
}

impl RunningNorm {
    /// A normaliser whose outputs are clipped to `[-clip, clip]` (e.g. 5).
    pub fn new(clip: f64) -> Self {
        Self {
            n: 0,
            mean: 0.0,
            m2: 0.0,
            clip: clip.abs(),
        }
    }

    /// Values seen so far.
    pub fn count(&self) -> u64 {
        self.n
    }

    /// Running mean (0 before any value).
    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// Running sample standard deviation (0 with fewer than two values).
    pub fn std(&self) -> f64 {
        if self.n < 2 {
            0.0
        } else {
            (self.m2 / (self.n - 1) as f64).max(0.0).sqrt()
        }
    }

    /// The z-score of `x` against the values seen before it (0 while fewer
    /// than two values were seen or the spread is zero), clipped; then `x`
    /// joins the statistics. Non-finite `x` gives 0 and is not recorded.
    pub fn normalize(&mut self, x: f64) -> f64 {
        if !x.is_finite() {
            return 0.0;
        }
        let sd = self.std();
        let z = if sd > 0.0 && sd.is_finite() {
            ((x - self.mean) / sd).clamp(-self.clip, self.clip)
        } else {
            0.0
        };
        self.update(x);
        if z.is_finite() {
            z
        } else {
            0.0
        }
    }

    /// Records `x` without normalising it.
    pub fn update(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        self.n += 1;
        let d = x - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (x - self.mean);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_two_pass_statistics_and_never_leaks_nan() {
        let xs: Vec<f64> = (0..10_000)
            .map(|i| 1e9 + (i as f64 * 0.37).sin() * 3.0)
            .collect();
        let mut n = RunningNorm::new(5.0);
        for &x in &xs {
            n.update(x);
        }
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (xs.len() - 1) as f64;
        assert!((n.mean() - mean).abs() < 1e-6);
        assert!(
            (n.std() - var.sqrt()).abs() < 1e-6,
            "{} vs {}",
            n.std(),
            var.sqrt()
        );
        let mut m = RunningNorm::new(5.0);
        assert_eq!(m.normalize(3.0), 0.0, "nothing seen yet");
        assert_eq!(m.normalize(f64::NAN), 0.0);
        assert_eq!(m.normalize(f64::INFINITY), 0.0);
        assert_eq!(m.count(), 1, "non-finite values are not recorded");
        m.update(5.0);
        assert_eq!(m.normalize(1e300), 5.0, "clipped");
    }
}
