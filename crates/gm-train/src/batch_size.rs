//! Memory-budgeted batch size: measure the peak of a training step at a
//! few batch sizes, fit a line, pick the largest batch the budget holds,
//! and keep checking during training ([`BatchSizer`]).
//!
//! # Model and rule
//!
//! The peak memory of one step is modelled as `peak(b) = a + c·b`
//! (parameters, gradients and optimizer state in `a`; activations,
//! proportional to the batch, in `c`), fitted by least squares over the
//! measured `(b, peak)` samples ([`LinearFit`]). With the usable budget
//! `U = threshold × budget_bytes` (threshold default 0.85), the batch is
//! the largest multiple of `multiple_of` (default 8) in
//! `[min_batch, max_batch]` (default `[8, 512]`) with `a + c·b ≤ U`; when
//! even `min_batch` does not fit, the answer is
//! [`Error::BudgetTooSmall`].
//!
//! # Calibration ([`BatchSizer::calibrate`])
//!
//! 1. Measure the caller's step at the probe batches (default 8, 16, 32),
//!    smallest first, skipping any the fit so far predicts above `U` (a
//!    probe must not itself blow the budget — on a GPU it would be an
//!    OOM). A measured peak above `U` at `min_batch` is `BudgetTooSmall`.
//! 2. Fit, choose, and verify: measure the chosen batch, refit with it,
//!    choose again — at most `verify_rounds` (default 3) extra
//!    measurements, never choosing at or above a batch measured over `U`.
//! 3. The result is the largest **measured** batch whose peak fit `U`.
//!
//! The measuring function is the caller's `FnMut(batch) -> Result<u64>`
//! (peak bytes of one training step at that batch): a counting allocator's
//! scoped peak on the CPU (gm-leak's `measure_thread`), the device's peak
//! on a GPU. The library needs no global allocator.
//!
//! # Re-checking during training ([`BatchSizer::observe`])
//!
//! Feed every step's observed peak. Samples are kept (the probes and the
//! last `history` observations, default 64). When an observed peak exceeds
//! both `recheck_fraction × U` (default 0.95 — before the limit is
//! reached) and what the sizer expects at that batch (the fit's
//! prediction, or the calibration's own measurement there if higher: a
//! batch calibrated into the last 5 % is left alone until its peak grows)
//! the sizer refits — slope `c` by least squares over the kept samples,
//! but never above the calibration's slope (drift seen at one batch must
//! not pass for a per-item cost, which would shrink too little), intercept
//! `a = max(a_ls, peak − c·b)` so the line never under-predicts the latest
//! observation (drift such as fragmentation or longer inputs shows up
//! here) — and shrinks to the largest batch with
//! `a + c·b ≤ recheck_fraction × U`, which is strictly smaller than the
//! current one. It never grows on its own; calibrate again to grow.
//!
//! # Out of scope
//!
//! The GPU half of the issue — catching a device out-of-memory error,
//! halving the batch and retrying the step (Accelerate's
//! `find_executable_batch_size`, Lightning's `BatchSizeFinder` in
//! `binsearch` mode) — needs a device that can run out of memory: this
//! crate is built and tested on CPU-only machines, where an allocation
//! failure aborts the process. The measured-fit approach here works the
//! same with device peaks.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Budget and search range of the batch-size choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchSizeConfig {
    /// The memory budget of one training step, in bytes.
    pub budget_bytes: u64,
    /// Fraction of the budget a predicted peak may use (default 0.85).
    pub threshold: f64,
    /// Smallest batch (default 8).
    pub min_batch: usize,
    /// Largest batch (default 512).
    pub max_batch: usize,
    /// Batches are multiples of this (default 8); `min_batch` and
    /// `max_batch` must be multiples of it.
    pub multiple_of: usize,
    /// Batches measured first (default 8, 16, 32): at least two distinct
    /// values in `[min_batch, max_batch]`.
    pub probe_batches: Vec<usize>,
    /// Extra measurements at the chosen batch (default 3).
    pub verify_rounds: usize,
    /// An observed peak above this fraction of the usable budget triggers
    /// a refit and a shrink (default 0.95).
    pub recheck_fraction: f64,
    /// Observations kept for refits (default 64).
    pub history: usize,
}

impl BatchSizeConfig {
    /// The defaults with a budget of `budget_bytes`.
    pub fn new(budget_bytes: u64) -> Self {
        Self {
            budget_bytes,
            threshold: 0.85,
            min_batch: 8,
            max_batch: 512,
            multiple_of: 8,
            probe_batches: vec![8, 16, 32],
            verify_rounds: 3,
            recheck_fraction: 0.95,
            history: 64,
        }
    }

    /// Checks every value; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.budget_bytes == 0 {
            return Err(Error::config("budget_bytes", 0, "at least 1 byte"));
        }
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(Error::config("threshold", self.threshold, "(0, 1]"));
        }
        if self.multiple_of == 0 {
            return Err(Error::config("multiple_of", 0, "at least 1"));
        }
        if self.min_batch == 0 || !self.min_batch.is_multiple_of(self.multiple_of) {
            return Err(Error::config(
                "min_batch",
                self.min_batch,
                format!("a positive multiple of {}", self.multiple_of),
            ));
        }
        if self.max_batch < self.min_batch || !self.max_batch.is_multiple_of(self.multiple_of) {
            return Err(Error::config(
                "max_batch",
                self.max_batch,
                format!(
                    "a multiple of {} at least min_batch = {}",
                    self.multiple_of, self.min_batch
                ),
            ));
        }
        let mut probes: Vec<usize> = self
            .probe_batches
            .iter()
            .copied()
            .filter(|b| (self.min_batch..=self.max_batch).contains(b))
            .collect();
        probes.sort_unstable();
        probes.dedup();
        if probes.len() < 2 || probes[0] != self.min_batch {
            return Err(Error::config(
                "probe_batches",
                format!("{:?}", self.probe_batches),
                format!(
                    "at least two distinct batches in [{}, {}], min_batch among them",
                    self.min_batch, self.max_batch
                ),
            ));
        }
        if !(self.recheck_fraction > 0.0 && self.recheck_fraction <= 1.0) {
            return Err(Error::config(
                "recheck_fraction",
                self.recheck_fraction,
                "(0, 1]",
            ));
        }
        if self.history == 0 {
            return Err(Error::config("history", 0, "at least 1 observation"));
        }
        Ok(())
    }

    /// `threshold × budget_bytes`, rounded down.
    pub fn usable_bytes(&self) -> u64 {
        (self.threshold * self.budget_bytes as f64).floor() as u64
    }

    /// The probe batches to measure, ascending, in range, deduplicated.
    fn probes(&self) -> Vec<usize> {
        let mut p: Vec<usize> = self
            .probe_batches
            .iter()
            .copied()
            .filter(|b| (self.min_batch..=self.max_batch).contains(b))
            .collect();
        p.sort_unstable();
        p.dedup();
        p
    }
}

/// `peak(b) = intercept_bytes + bytes_per_item · b`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinearFit {
    /// `a`: bytes independent of the batch.
    pub intercept_bytes: f64,
    /// `c`: bytes per batch item.
    pub bytes_per_item: f64,
}

impl LinearFit {
    /// Ordinary least squares over `(batch, peak)` samples; `None` with
    /// fewer than two distinct batches.
    pub fn least_squares(samples: &[(usize, u64)]) -> Option<Self> {
        let n = samples.len() as f64;
        if n < 2.0 {
            return None;
        }
        let mb = samples.iter().map(|s| s.0 as f64).sum::<f64>() / n;
        let mp = samples.iter().map(|s| s.1 as f64).sum::<f64>() / n;
        let sbb: f64 = samples.iter().map(|s| (s.0 as f64 - mb).powi(2)).sum();
        if sbb <= 0.0 {
            return None;
        }
        let sbp: f64 = samples
            .iter()
            .map(|s| (s.0 as f64 - mb) * (s.1 as f64 - mp))
            .sum();
        let c = sbp / sbb;
        Some(Self {
            intercept_bytes: mp - c * mb,
            bytes_per_item: c,
        })
    }

    /// Predicted peak at `batch`, in bytes (never below 0).
    pub fn predict(&self, batch: usize) -> f64 {
        (self.intercept_bytes + self.bytes_per_item * batch as f64).max(0.0)
    }
}

/// The largest batch of `cfg`'s grid (multiples of `multiple_of` in
/// `[min_batch, max_batch]`) at most `cap` whose predicted peak is at most
/// `limit` bytes; [`Error::BudgetTooSmall`] when not even `min_batch` fits.
pub fn choose_batch(
    cfg: &BatchSizeConfig,
    fit: &LinearFit,
    limit: f64,
    cap: usize,
) -> Result<usize> {
    let m = cfg.multiple_of;
    let hi = cap.min(cfg.max_batch) / m * m;
    let too_small = || Error::BudgetTooSmall {
        budget_bytes: cfg.budget_bytes,
        usable_bytes: limit.max(0.0) as u64,
        batch: cfg.min_batch,
        needed_bytes: fit.predict(cfg.min_batch).ceil() as u64,
    };
    if hi < cfg.min_batch || fit.predict(cfg.min_batch) > limit {
        return Err(too_small());
    }
    let best = if fit.bytes_per_item <= 0.0 {
        hi
    } else {
        let b = ((limit - fit.intercept_bytes) / fit.bytes_per_item).floor();
        let b = if b.is_finite() {
            b.max(0.0) as usize
        } else {
            0
        };
        (b.min(hi) / m * m).max(cfg.min_batch)
    };
    // Guard the floating-point edge: step down until the prediction fits.
    let mut b = best;
    while b > cfg.min_batch && fit.predict(b) > limit {
        b -= m;
    }
    Ok(b)
}

/// One calibration or observation: the batch and its measured peak.
pub type PeakSample = (usize, u64);

/// The batch size chosen for a memory budget, kept under it during
/// training (see the module docs). All state is public for checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchSizer {
    /// Settings.
    pub cfg: BatchSizeConfig,
    /// The current fit.
    pub fit: LinearFit,
    /// Calibration measurements.
    pub probes: Vec<PeakSample>,
    /// The last `cfg.history` observations.
    pub observed: Vec<PeakSample>,
    /// The current batch.
    pub batch: usize,
    /// Times [`observe`](Self::observe) shrank the batch.
    pub shrinks: u64,
}

impl BatchSizer {
    /// Calibrates against `measure` (peak bytes of one training step at a
    /// batch) and chooses the batch; see the module docs for the steps.
    pub fn calibrate(
        cfg: BatchSizeConfig,
        mut measure: impl FnMut(usize) -> Result<u64>,
    ) -> Result<Self> {
        cfg.validate()?;
        let usable = cfg.usable_bytes();
        let limit = usable as f64;
        let mut samples: Vec<PeakSample> = Vec::new();
        for b in cfg.probes() {
            if let Some(fit) = LinearFit::least_squares(&samples) {
                if fit.predict(b) > limit {
                    break;
                }
            }
            let peak = measure(b)?;
            samples.push((b, peak));
            if peak > usable {
                if b == cfg.min_batch {
                    return Err(Error::BudgetTooSmall {
                        budget_bytes: cfg.budget_bytes,
                        usable_bytes: usable,
                        batch: b,
                        needed_bytes: peak,
                    });
                }
                break;
            }
        }
        let mut fit = match LinearFit::least_squares(&samples) {
            Some(f) => f,
            // Only `min_batch` was measured (the next probe was predicted
            // over budget, which needs two samples — so this cannot
            // happen) or one probe: assume activations are all of it.
            None => LinearFit {
                intercept_bytes: 0.0,
                bytes_per_item: samples[0].1 as f64 / samples[0].0 as f64,
            },
        };
        for _ in 0..cfg.verify_rounds {
            let cap = smallest_over(&samples, usable).map_or(cfg.max_batch, |b| b - 1);
            let b = choose_batch(&cfg, &fit, limit, cap)?;
            if samples.iter().any(|s| s.0 == b) {
                break;
            }
            let peak = measure(b)?;
            samples.push((b, peak));
            if let Some(f) = LinearFit::least_squares(&samples) {
                fit = f;
            }
        }
        let batch = samples
            .iter()
            .filter(|s| s.1 <= usable)
            .map(|s| s.0)
            .max()
            .unwrap_or(cfg.min_batch);
        Ok(Self {
            cfg,
            fit,
            probes: samples,
            observed: Vec::new(),
            batch,
            shrinks: 0,
        })
    }

    /// The batch to use now.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The current fit's prediction at `batch`, in bytes.
    pub fn predict(&self, batch: usize) -> u64 {
        self.fit.predict(batch).ceil() as u64
    }

    /// What a step at `batch` is expected to peak at: the fit's
    /// prediction, or the calibration's own measurement at that batch when
    /// higher.
    fn expected(&self, batch: usize) -> f64 {
        self.probes
            .iter()
            .filter(|s| s.0 == batch)
            .map(|s| s.1 as f64)
            .fold(self.fit.predict(batch), f64::max)
    }

    /// Records a step's observed peak at `batch`. When it exceeds both
    /// `recheck_fraction × usable` and what the sizer expects at that
    /// batch, refits and shrinks (see the module docs) and returns the new
    /// batch; `Ok(None)` otherwise.
    /// [`Error::BudgetTooSmall`] when not even `min_batch` is predicted to
    /// fit any more.
    pub fn observe(&mut self, batch: usize, peak_bytes: u64) -> Result<Option<usize>> {
        if self.observed.len() >= self.cfg.history {
            self.observed.remove(0);
        }
        self.observed.push((batch, peak_bytes));
        let limit = self.cfg.recheck_fraction * self.cfg.usable_bytes() as f64;
        let peak = peak_bytes as f64;
        if peak <= limit || peak <= self.expected(batch) {
            return Ok(None);
        }
        let all: Vec<PeakSample> = self.probes.iter().chain(&self.observed).copied().collect();
        let calibrated = LinearFit::least_squares(&self.probes)
            .map_or(self.fit.bytes_per_item, |f| f.bytes_per_item);
        let slope = match LinearFit::least_squares(&all) {
            Some(f) if f.bytes_per_item > 0.0 => f.bytes_per_item.min(calibrated),
            _ => calibrated,
        }
        .max(0.0);
        let mean_b = all.iter().map(|s| s.0 as f64).sum::<f64>() / all.len() as f64;
        let mean_p = all.iter().map(|s| s.1 as f64).sum::<f64>() / all.len() as f64;
        let ls_intercept = mean_p - slope * mean_b;
        self.fit = LinearFit {
            intercept_bytes: ls_intercept.max(peak_bytes as f64 - slope * batch as f64),
            bytes_per_item: slope,
        };
        let cap = batch.min(self.batch).saturating_sub(1);
        let new = choose_batch(&self.cfg, &self.fit, limit, cap)?;
        self.batch = new;
        self.shrinks += 1;
        Ok(Some(new))
    }
}

/// The smallest sampled batch whose peak exceeded `usable`.
fn smallest_over(samples: &[PeakSample], usable: u64) -> Option<usize> {
    samples.iter().filter(|s| s.1 > usable).map(|s| s.0).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_and_choice_on_an_exact_line() {
        let fit = LinearFit::least_squares(&[(8, 1_800), (16, 2_600), (32, 4_200)]).unwrap();
        assert!((fit.intercept_bytes - 1_000.0).abs() < 1e-6);
        assert!((fit.bytes_per_item - 100.0).abs() < 1e-9);
        let cfg = BatchSizeConfig::new(10_000);
        // usable 8500 → b ≤ 75 → 72
        assert_eq!(choose_batch(&cfg, &fit, 8_500.0, 512).unwrap(), 72);
        assert_eq!(choose_batch(&cfg, &fit, 8_500.0, 40).unwrap(), 40);
        assert_eq!(choose_batch(&cfg, &fit, 1e12, 10_000).unwrap(), 512);
        assert!(matches!(
            choose_batch(&cfg, &fit, 1_000.0, 512),
            Err(Error::BudgetTooSmall { batch: 8, .. })
        ));
        assert!(LinearFit::least_squares(&[(8, 1), (8, 2)]).is_none());
        let mut bad = BatchSizeConfig::new(100);
        bad.probe_batches = vec![8];
        assert!(bad.validate().is_err());
        bad = BatchSizeConfig::new(100);
        bad.min_batch = 12;
        assert!(bad.validate().is_err());
        assert!(BatchSizeConfig::new(0).validate().is_err());
    }
}
