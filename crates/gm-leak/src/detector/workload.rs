//! Synthetic heap series with a known answer, for testing and benchmarking the
//! [`LeakDetector`](crate::LeakDetector): a base level, a sawtooth, seeded
//! Gaussian-ish noise, an optional planted leak and an optional one-time jump.
//!
//! The value at step `t` is
//!
//! ```text
//! base + sawtooth·(t mod period)/period + noise_sd·g(t) + leak·max(0, t − leak_from)
//!      + jump·[t ≥ jump_at]
//! ```
//!
//! rounded to whole bytes (and never below 0), where `g(t)` is the sum of 12
//! uniform draws from a [`SplitMix64`] generator minus 6: mean 0, variance 1,
//! bounded by ±6. The sawtooth rises by `sawtooth/period` per step and drops
//! back at every multiple of `period` (allocations that grow through a cycle
//! and are freed at its end).

/// SplitMix64 (Steele, Lea and Flood 2014): a tiny, fast, seedable 64-bit
/// generator; the same seed gives the same stream on every platform.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub const fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Approximately standard normal: the sum of 12 uniforms minus 6 (mean
    /// 0, variance 1, support ±6).
    pub fn next_gaussish(&mut self) -> f64 {
        (0..12).map(|_| self.next_unit()).sum::<f64>() - 6.0
    }
}

/// A synthetic heap workload; see the module docs for the formula.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Workload {
    /// Level the series starts from, in bytes.
    pub base_bytes: u64,
    /// Height the sawtooth climbs to within a cycle, in bytes (0: none).
    pub sawtooth_bytes: u64,
    /// Sawtooth period in steps (0: none).
    pub period_steps: u64,
    /// Standard deviation of the noise, in bytes.
    pub noise_sd_bytes: f64,
    /// Planted leak in bytes per step (0: none).
    pub leak_bytes_per_step: f64,
    /// First step the leak grows at.
    pub leak_from_step: u64,
    /// One-time jump in bytes (a cache warming up once), from `jump_at_step` on.
    pub jump_bytes: u64,
    /// Step of the jump (`None`: no jump).
    pub jump_at_step: Option<u64>,
    /// Noise seed.
    pub seed: u64,
}

impl Workload {
    /// The reference workload of the detector's tests and of
    /// `examples/leak_accuracy.rs`: 64 MiB base, an 8 MiB sawtooth with a
    /// 50-step period, 256 KiB noise (standard deviation), no leak.
    pub const fn reference(seed: u64) -> Self {
        Self {
            base_bytes: 64 << 20,
            sawtooth_bytes: 8 << 20,
            period_steps: 50,
            noise_sd_bytes: 256.0 * 1024.0,
            leak_bytes_per_step: 0.0,
            leak_from_step: 0,
            jump_bytes: 0,
            jump_at_step: None,
            seed,
        }
    }

    /// The same workload with a leak of `bytes_per_step` from step 0.
    pub const fn with_leak(mut self, bytes_per_step: f64) -> Self {
        self.leak_bytes_per_step = bytes_per_step;
        self
    }

    /// The heap level at steps `0, 1, 2, …` (endless; take what you need).
    pub fn series(&self) -> Series {
        Series {
            w: *self,
            rng: SplitMix64::new(self.seed),
            step: 0,
        }
    }
}

/// The iterator of [`Workload::series`].
#[derive(Debug, Clone)]
pub struct Series {
    w: Workload,
    rng: SplitMix64,
    step: u64,
}

impl Iterator for Series {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        let w = &self.w;
        let t = self.step;
        self.step += 1;
        let mut v = w.base_bytes as f64 + w.noise_sd_bytes * self.rng.next_gaussish();
        if w.period_steps > 0 {
            v += w.sawtooth_bytes as f64 * (t % w.period_steps) as f64 / w.period_steps as f64;
        }
        if t >= w.leak_from_step {
            v += w.leak_bytes_per_step * (t - w.leak_from_step) as f64;
        }
        if w.jump_at_step.is_some_and(|at| t >= at) {
            v += w.jump_bytes as f64;
        }
        Some(v.max(0.0).round() as u64)
    }
}
