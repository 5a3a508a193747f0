//! Leak detection by trend testing: [`LeakDetector`] takes [`Snapshot`]s (a
//! step, the heap level, live objects by label, optionally live bytes by
//! allocation site) and says whether memory grows steadily over a sliding
//! window, at what rate, and which labels and sites grow.
//!
//! # The test
//!
//! Over the last `n ≤ window_samples` snapshots `x_1 … x_n` (heap bytes, in
//! step order) the detector runs a one-sided **Mann–Kendall** test and
//! estimates the rate with the **Theil–Sen** slope:
//!
//! - `S = Σ_{i<j} sgn(x_j − x_i)`: concordant minus discordant pairs. Growth
//!   makes later samples larger than earlier ones, so `S` large and positive.
//! - Under "no trend" (independent, identically distributed samples)
//!   `E[S] = 0` and, with `t_g` samples tied at each distinct value `g`,
//!   `Var(S) = [n(n−1)(2n+5) − Σ_g t_g(t_g−1)(2t_g+5)] / 18`.
//! - `z = (S − sgn S)/√Var(S)` (continuity-corrected; 0 when `S = 0` or the
//!   variance is 0, e.g. a flat series). The p-value is `P(Z > z)` for a
//!   standard normal `Z`; the verdict is [`Verdict::Leak`] when
//!   `z ≥ Φ⁻¹(1 − alpha)` **and** the Theil–Sen rate exceeds
//!   `min_rate_bytes_per_step`.
//! - The rate is the Theil–Sen slope, the median of the pairwise slopes
//!   `(x_j − x_i)/(t_j − t_i)`, in bytes per step. Its confidence interval is
//!   rank-based (Gilbert 1987): with `N'` slopes, `C = z_{(1+confidence)/2}·√Var(S)`,
//!   the limits are the `(N' − C)/2`-th and `((N' + C)/2 + 1)`-th smallest
//!   slopes.
//!
//! `S` is computed exactly, in `O(n log n)` by a merge sort that counts, for
//! each later sample, the earlier ones below and above it (the same number
//! as the `O(n²)` double loop, which small groups use). The slopes need all
//! `N'` pairs in memory (`O(n²)` for a window without cycles: 4 MiB at the
//! default 1024), so they are computed only when `z` crosses the threshold,
//! and for [`LeakDetector::analyze`].
//!
//! # Sawtooth workloads
//!
//! A training loop allocates through an episode or an epoch and frees at its
//! end: the heap is a sawtooth, several MiB high, on top of which a 1 KiB/step
//! leak is invisible to a plain trend test (the sawtooth rises slowly and
//! drops at once, so nearby pairs are mostly increasing and a window that
//! ends mid-cycle looks like growth). Testing the lower envelope (per-cycle
//! minima) is robust but keeps one number per cycle: with a 100-step period,
//! 300 steps give 3 minima, too few for any test. Instead the detector
//! **aligns cycles** and compares like with like:
//!
//! 1. **Releases.** A step-to-step change `d_i = x_i − x_{i−1}` below
//!    `median(d) − release_sigmas·σ̂` (and below 0) is a release, where
//!    `σ̂ = 1.4826·MAD(d)` is a robust standard deviation of the step changes
//!    (the drops themselves are rare, so they do not inflate it). A release
//!    starts a cycle.
//! 2. **Phases.** A sample's phase is the number of snapshots since the
//!    release that started its cycle. The partial cycle before the first
//!    release: while the window still starts at the series' first snapshot,
//!    its phases count from there (exact when the series starts with a
//!    cycle, otherwise too small, which can only bias `S` downwards); once
//!    the window slides, where that cycle began is unknown and it is left out
//!    (guessing from other cycles' lengths could err upwards).
//! 3. **Seasonal test.** Samples of equal phase form a season; `S` and
//!    `Var(S)` are summed over seasons (the seasonal Mann–Kendall test of
//!    Hirsch, Slack and Smith 1982) and the slope is the median over
//!    same-season pairs (the seasonal Sen slope). A leak adds the same amount
//!    to every phase, so each same-phase pair sees `rate × Δt`; the sawtooth
//!    itself cancels.
//!
//! Without releases (a steady or smoothly varying workload) the window is one
//! season: the plain test. Aligning by releases rather than by an estimated
//! period keeps cycles of varying length (episodes) and non-integer periods
//! aligned, where a fixed-lag comparison drifts through the cycle and reports
//! the drift as a trend.
//!
//! # Dependence between samples
//!
//! `Var(S)` above assumes independent samples. Cycles that differ as a whole
//! (a longer episode, a larger batch) make all phases of a cycle move
//! together, and serial correlation does the same within a stretch of a
//! series without cycles; both inflate the true `Var(S)`. So the detector
//! also computes the variance with **units** as the independent parts (the
//! cycles, at most 64 groups of them, or 16 blocks of consecutive samples
//! when there are no releases): on the series detrended by a robust slope
//! (the median same-season slope over pairs half a window apart), with
//! `D_uv` the score of unit pair `u < v` (`Σ sgn` over their same-season
//! pairs) and `B_u = Σ_{v>u} D_uv − Σ_{v<u} D_vu`, the variance of `S` over
//! all orders of the units is `(Σ_{u<v} D_uv² + Σ_u B_u²)/3` (Daniels'
//! permutation variance; for single samples it is exactly the formula above),
//! plus the independent variance of the pairs inside a unit. With at least 8
//! units the test uses the larger of the two variances.
//!
//! # Defaults and what they buy
//!
//! Measured by `tests/detector.rs` and `examples/leak_accuracy.rs` on
//! [`workload::Workload`] series (64 MiB base, 8 MiB sawtooth, noise given as
//! a standard deviation):
//!
//! - `alpha = 1e-6` (`z ≥ 4.75`): no leak verdict in 10 000 steps of steady
//!   workloads (256 KiB noise; plain, sawtooth periods 20, 50 and 100, cycle
//!   lengths drawn from 45–55, a period of 50.5), three seeds each in the
//!   tests, and in 120 runs of 10 000 steps (24 seeds × plain and periods 20,
//!   50, 75, 100) measured with the example's workloads. A sliding window
//!   tests nearly the same data every step, so the bar must sit far in the
//!   tail: at `alpha = 3e-5` (`z ≥ 4.01`) one of those 120 runs (seed 6,
//!   period 100) gave 49 false verdicts, at `1e-5` five; at `1e-4`
//!   (`z ≥ 3.72`) 2–5 % of runs had a false alarm.
//! - The stricter bar costs little detection speed, because the 128-sample
//!   minimum and the dependence guard dominate: a 1 KiB/step leak is found
//!   by step 300 at noise up to 128 KiB for periods 20–100 (worst 252 at
//!   `1e-6`, 241 at `3e-5`); at 256 KiB it takes up to about 343 steps
//!   (median ~260): 300 samples hold too little evidence for a bar this
//!   strict.
//! - `window_samples = 1024`: spans ten cycles of a 100-step sawtooth, and
//!   finds a 64 B/step leak under 64 KiB of noise within one window (worst
//!   669 steps). The smallest rate a full window can find is about
//!   `z·σ·√12 / n^{3/2}` for noise `σ`: 110 B/step at 256 KiB.
//! - `min_samples = 128`: no verdict before the first cycles are seen (a
//!   cycle's first rise, before any release, looks like growth).
//!
//! # Limits
//!
//! - A one-time rise (a cache warming up) is growth while it is inside the
//!   window, and is never reported once `window_samples` snapshots have been
//!   taken at the new level. While inside, the unit variance mostly absorbs
//!   it (it is one shift between units, not a trend across them): a 16 MiB
//!   jump under 64 KiB noise gave no leak verdict at all in the tests.
//! - A cycle whose rise lasts longer than the window, or whose drop is within
//!   `release_sigmas` robust standard deviations of the step noise (a
//!   sawtooth of 2–5 noise standard deviations), is not seen as a cycle, and
//!   its slow rise and fast drop bias `S` upwards.
//! - Cycles that differ from each other as a whole are only accounted for once
//!   the window holds 8 of them; before that, level shifts between cycles as
//!   large as the noise can be taken for a trend.
//! - Snapshots are assumed to come at a steady cadence: phases count
//!   snapshots, rates are per unit of `step`.

mod stats;
pub mod workload;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};

use stats::Scratch;

/// Errors of gm-leak's detector, registry and reports.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A [`DetectorConfig`] field is out of range.
    #[error("invalid detector config: {key} = {value} ({allowed})")]
    DetectorConfig {
        /// The field.
        key: &'static str,
        /// Its value, formatted.
        value: String,
        /// What is allowed.
        allowed: &'static str,
    },
    /// A snapshot's step is not after the previous one.
    #[error("snapshot step {step} is not after the previous step {previous}: steps must increase")]
    StepNotIncreasing {
        /// The previous snapshot's step.
        previous: u64,
        /// The rejected snapshot's step.
        step: u64,
    },
}

/// `Result` with gm-leak's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Detector settings. Field names carry their units; see the module docs for
/// how the defaults were chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DetectorConfig {
    /// Snapshots in the sliding window (default 1024; 16 ..= 2048: the rate
    /// of a window without cycles holds all `n(n−1)/2` slopes, 16 MiB at 2048).
    pub window_samples: usize,
    /// Snapshots needed before any verdict other than
    /// [`Verdict::Insufficient`] (default 128; 3 ..= `window_samples`).
    pub min_samples: usize,
    /// One-sided false-alarm probability of one test (default 1e-6, i.e.
    /// `z ≥ 4.75`; 0 < alpha < 0.5).
    pub alpha: f64,
    /// Coverage of the reported rate interval (default 0.95; 0 < c < 1).
    pub confidence: f64,
    /// Rates at or below this are not a leak, however significant (default
    /// 0: any significant growth; finite, ≥ 0).
    pub min_rate_bytes_per_step: f64,
    /// A step change this many robust standard deviations below the median
    /// change is a release that starts a new cycle (default 5; ≥ 1).
    pub release_sigmas: f64,
    /// Growing sites listed by [`LeakDetector::analyze`] (default 10).
    pub top_sites: usize,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            window_samples: 1024,
            min_samples: 128,
            alpha: 1e-6,
            confidence: 0.95,
            min_rate_bytes_per_step: 0.0,
            release_sigmas: 5.0,
            top_sites: 10,
        }
    }
}

impl DetectorConfig {
    /// Checks every field; the error names the field, its value and the
    /// allowed range.
    pub fn validate(&self) -> Result<()> {
        fn bad(key: &'static str, value: impl fmt::Display, allowed: &'static str) -> Result<()> {
            Err(Error::DetectorConfig {
                key,
                value: value.to_string(),
                allowed,
            })
        }
        if !(16..=2048).contains(&self.window_samples) {
            return bad("window_samples", self.window_samples, "16 ..= 2048");
        }
        if !(3..=self.window_samples).contains(&self.min_samples) {
            return bad("min_samples", self.min_samples, "3 ..= window_samples");
        }
        if !(self.alpha > 0.0 && self.alpha < 0.5) {
            return bad("alpha", self.alpha, "0 < alpha < 0.5");
        }
        if !(self.confidence > 0.0 && self.confidence < 1.0) {
            return bad("confidence", self.confidence, "0 < confidence < 1");
        }
        if !(self.min_rate_bytes_per_step.is_finite() && self.min_rate_bytes_per_step >= 0.0) {
            return bad(
                "min_rate_bytes_per_step",
                self.min_rate_bytes_per_step,
                "finite and >= 0",
            );
        }
        if !(self.release_sigmas.is_finite() && self.release_sigmas >= 1.0) {
            return bad("release_sigmas", self.release_sigmas, "finite and >= 1");
        }
        Ok(())
    }

    /// The `z` a test must reach: `Φ⁻¹(1 − alpha)`.
    pub fn z_threshold(&self) -> f64 {
        stats::normal_quantile(1.0 - self.alpha)
    }
}

/// One observation: the heap level at a step, and optionally live objects
/// by label and live bytes by allocation site.
///
/// A label or site missing from a snapshot is *not observed* there (a gap),
/// not zero: a sampler that lists only its top sites leaves the others out.
/// Report a zero explicitly when something is known to be gone (the
/// [`Registry`](crate::Registry) keeps every label it has seen, with 0 once
/// all its objects are dropped).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Step (or time in a unit of your choice); must increase from snapshot
    /// to snapshot. Rates are per unit of it.
    pub step: u64,
    /// Live heap bytes, e.g. [`stats()`](crate::stats)`.current_bytes`.
    pub heap_bytes: u64,
    /// Live objects by label, e.g. [`Registry::snapshot`](crate::Registry::snapshot).
    pub live_objects: BTreeMap<String, u64>,
    /// Estimated live bytes by allocation site (a stable key per site).
    pub site_bytes: BTreeMap<String, u64>,
}

impl Snapshot {
    /// A snapshot of the heap level alone.
    pub fn new(step: u64, heap_bytes: u64) -> Self {
        Self {
            step,
            heap_bytes,
            ..Self::default()
        }
    }

    /// Adds live object counts by label (counts of a repeated label add up).
    pub fn with_objects<K: Into<String>>(
        mut self,
        counts: impl IntoIterator<Item = (K, u64)>,
    ) -> Self {
        for (k, v) in counts {
            *self.live_objects.entry(k.into()).or_insert(0) += v;
        }
        self
    }

    /// Adds the estimated live bytes of sampled allocation sites, as
    /// [`top_sites`](crate::top_sites) reports them, keyed by
    /// [`site_key`] (site id and allocating function), so the detector's
    /// `top_growing_sites` names where a leak allocates.
    pub fn with_top_sites(self, sites: &[crate::SiteReport]) -> Self {
        self.with_sites(sites.iter().map(|s| (site_key(s), s.live_bytes_estimate)))
    }

    /// Adds live bytes by site key (bytes of a repeated key add up).
    pub fn with_sites<K: Into<String>>(
        mut self,
        sites: impl IntoIterator<Item = (K, u64)>,
    ) -> Self {
        for (k, v) in sites {
            *self.site_bytes.entry(k.into()).or_insert(0) += v;
        }
        self
    }
}

/// The key [`Snapshot::with_top_sites`] files a site under: its id and the
/// first frame that is not the standard library's machinery (a name that
/// mentions `alloc::`, `core::` or `std::`, such as
/// `<u8 as alloc::vec::spec_from_elem::SpecFromElem>::from_elem`), so the
/// key reads as the allocating function of the program.
pub fn site_key(site: &crate::SiteReport) -> String {
    let skip = ["alloc::", "core::", "std::"];
    let func = site
        .frames
        .iter()
        .filter_map(|f| f.function.as_deref())
        .find(|name| !skip.iter().any(|p| name.contains(p)))
        .or_else(|| site.frames.iter().find_map(|f| f.function.as_deref()))
        .unwrap_or("?");
    format!("{} {func}", site.site_id)
}

/// What the trend test says about a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Fewer than `min_samples` snapshots in the window.
    Insufficient,
    /// No significant growth.
    NoLeak,
    /// Significant, sustained growth above `min_rate_bytes_per_step`.
    Leak,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Insufficient => "insufficient data",
            Self::NoLeak => "no leak",
            Self::Leak => "LEAK",
        })
    }
}

/// A Theil–Sen rate with its confidence interval, in units per step (bytes
/// for the heap and sites, objects for labels).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    /// Median pairwise slope.
    pub per_step: f64,
    /// Lower limit of the interval.
    pub low: f64,
    /// Upper limit of the interval.
    pub high: f64,
    /// Coverage of `[low, high]`.
    pub confidence: f64,
}

/// The trend test of one series over the window; see the module docs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trend {
    /// The verdict.
    pub verdict: Verdict,
    /// Snapshots in the window.
    pub samples: usize,
    /// Step of the oldest snapshot in the window.
    pub first_step: u64,
    /// Step of the newest snapshot in the window.
    pub last_step: u64,
    /// Pairs compared (same-phase pairs when cycles were found).
    pub pairs: u64,
    /// The Mann–Kendall statistic `S`.
    pub s: i64,
    /// The variance of `S` the test used.
    pub var_s: f64,
    /// `var_s` over the independent-sample variance: above 1 when whole
    /// cycles or stretches move together.
    pub variance_inflation: f64,
    /// The continuity-corrected `z`.
    pub z: f64,
    /// The `z` a leak must reach (`Φ⁻¹(1 − alpha)`).
    pub z_threshold: f64,
    /// One-sided p-value `P(Z > z)`.
    pub p_value: f64,
    /// Theil–Sen rate; `None` when not computed (the cheap per-step check
    /// skips it unless `z` crosses the threshold) or without pairs.
    pub rate: Option<Rate>,
    /// Releases (cycle starts) found in the window.
    pub releases: usize,
    /// Shortest complete cycle, in snapshots.
    pub shortest_cycle: Option<usize>,
}

/// A labelled series (a label of live objects, or a site) and its trend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesTrend {
    /// The label or site key.
    pub key: String,
    /// Its value in the newest snapshot that had it.
    pub latest: u64,
    /// Its trend over the window.
    pub trend: Trend,
}

/// Everything [`LeakDetector::analyze`] finds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeakAnalysis {
    /// The heap trend (bytes).
    pub heap: Trend,
    /// Every label in the window, by label, with its trend (objects).
    pub labels: Vec<SeriesTrend>,
    /// The labels whose verdict is [`Verdict::Leak`].
    pub growing_labels: Vec<String>,
    /// Sites whose verdict is [`Verdict::Leak`], fastest first (ties by key),
    /// at most `top_sites`.
    pub top_growing_sites: Vec<SeriesTrend>,
    /// Sites in the window.
    pub sites_seen: usize,
}

/// One entry of a label or site series: (snapshot sequence number, step, value).
type Entry = (u64, u64, u64);

/// A label or site series in the window.
#[derive(Debug, Default)]
struct Buf {
    entries: VecDeque<Entry>,
    /// Whether entries have aged out (the window no longer starts the series).
    evicted: bool,
}

/// The leak detector: feed it [`Snapshot`]s with [`observe`](Self::observe),
/// read the full picture with [`analyze`](Self::analyze).
///
/// Deterministic: the same snapshots give the same verdicts and analyses,
/// bit for bit. Memory: the window (24 bytes per label or site entry, 16 per
/// heap entry) plus reused scratch buffers; `observe` allocates nothing once
/// warm unless it computes a rate.
#[derive(Debug)]
pub struct LeakDetector {
    config: DetectorConfig,
    z_threshold: f64,
    z_conf: f64,
    seq: u64,
    last_step: Option<u64>,
    heap: VecDeque<(u64, u64)>,
    labels: BTreeMap<String, Buf>,
    sites: BTreeMap<String, Buf>,
    steps: Vec<u64>,
    values: Vec<u64>,
    scratch: Scratch,
}

impl LeakDetector {
    /// A detector with `config`, once it [validates](DetectorConfig::validate).
    pub fn new(config: DetectorConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            z_threshold: config.z_threshold(),
            z_conf: stats::normal_quantile(0.5 + config.confidence / 2.0),
            heap: VecDeque::with_capacity(config.window_samples),
            config,
            seq: 0,
            last_step: None,
            labels: BTreeMap::new(),
            sites: BTreeMap::new(),
            steps: Vec::new(),
            values: Vec::new(),
            scratch: Scratch::default(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// Snapshots in the window now.
    pub fn samples(&self) -> usize {
        self.heap.len()
    }

    /// Adds a snapshot and returns the heap verdict over the window.
    ///
    /// # Errors
    ///
    /// [`Error::StepNotIncreasing`] when `snapshot.step` is not after the
    /// previous step; the detector is unchanged.
    pub fn observe(&mut self, snapshot: &Snapshot) -> Result<Verdict> {
        self.push(snapshot.step, snapshot.heap_bytes)?;
        let seq = self.seq;
        for (store, map) in [
            (&mut self.labels, &snapshot.live_objects),
            (&mut self.sites, &snapshot.site_bytes),
        ] {
            for (k, &v) in map {
                let entry = (seq, snapshot.step, v);
                match store.get_mut(k.as_str()) {
                    Some(b) => b.entries.push_back(entry),
                    None => {
                        let b = Buf {
                            entries: VecDeque::from([entry]),
                            evicted: false,
                        };
                        store.insert(k.clone(), b);
                    }
                }
            }
        }
        self.evict();
        Ok(self.heap_verdict())
    }

    /// [`observe`](Self::observe) for a snapshot of the heap level alone.
    ///
    /// # Errors
    ///
    /// As for `observe`.
    pub fn observe_heap(&mut self, step: u64, heap_bytes: u64) -> Result<Verdict> {
        self.push(step, heap_bytes)?;
        self.evict();
        Ok(self.heap_verdict())
    }

    /// Forgets every snapshot; the settings stay.
    pub fn reset(&mut self) {
        self.seq = 0;
        self.last_step = None;
        self.heap.clear();
        self.labels.clear();
        self.sites.clear();
    }

    fn push(&mut self, step: u64, heap_bytes: u64) -> Result<()> {
        if let Some(previous) = self.last_step {
            if step <= previous {
                return Err(Error::StepNotIncreasing { previous, step });
            }
        }
        self.last_step = Some(step);
        self.seq += 1;
        if self.heap.len() == self.config.window_samples {
            self.heap.pop_front();
        }
        self.heap.push_back((step, heap_bytes));
        Ok(())
    }

    /// Drops label and site entries older than the window, and series left
    /// empty.
    fn evict(&mut self) {
        let oldest = self
            .seq
            .saturating_sub(self.config.window_samples as u64 - 1);
        for store in [&mut self.labels, &mut self.sites] {
            store.retain(|_, b| {
                while b.entries.front().is_some_and(|e| e.0 < oldest) {
                    b.entries.pop_front();
                    b.evicted = true;
                }
                !b.entries.is_empty()
            });
        }
    }

    fn heap_verdict(&mut self) -> Verdict {
        self.steps.clear();
        self.values.clear();
        for &(t, v) in &self.heap {
            self.steps.push(t);
            self.values.push(v);
        }
        self.trend_of_buffers(false, self.heap_from_start()).verdict
    }

    /// The heap trend over the window, rate included.
    pub fn heap_trend(&mut self) -> Trend {
        self.steps.clear();
        self.values.clear();
        for &(t, v) in &self.heap {
            self.steps.push(t);
            self.values.push(v);
        }
        self.trend_of_buffers(true, self.heap_from_start())
    }

    /// Whether the heap window still holds the first snapshot.
    fn heap_from_start(&self) -> bool {
        self.seq <= self.config.window_samples as u64
    }

    /// The heap trend, every label's trend and the fastest-growing sites.
    pub fn analyze(&mut self) -> LeakAnalysis {
        let heap = self.heap_trend();
        let labels = self.series_trends(true);
        let growing_labels = labels
            .iter()
            .filter(|s| s.trend.verdict == Verdict::Leak)
            .map(|s| s.key.clone())
            .collect();
        let mut sites = self.series_trends(false);
        let sites_seen = sites.len();
        sites.retain(|s| s.trend.verdict == Verdict::Leak);
        let rate = |s: &SeriesTrend| s.trend.rate.map_or(0.0, |r| r.per_step);
        sites.sort_by(|a, b| rate(b).total_cmp(&rate(a)).then_with(|| a.key.cmp(&b.key)));
        sites.truncate(self.config.top_sites);
        LeakAnalysis {
            heap,
            labels,
            growing_labels,
            top_growing_sites: sites,
            sites_seen,
        }
    }

    fn series_trends(&mut self, labels: bool) -> Vec<SeriesTrend> {
        let store = if labels { &self.labels } else { &self.sites };
        let mut out = Vec::with_capacity(store.len());
        // Take the map out so the buffers can be borrowed mutably meanwhile.
        let store = std::mem::take(if labels {
            &mut self.labels
        } else {
            &mut self.sites
        });
        for (key, b) in &store {
            self.steps.clear();
            self.values.clear();
            for &(_, t, v) in &b.entries {
                self.steps.push(t);
                self.values.push(v);
            }
            out.push(SeriesTrend {
                key: key.clone(),
                latest: b.entries.back().map_or(0, |e| e.2),
                trend: self.trend_of_buffers(true, !b.evicted),
            });
        }
        *(if labels {
            &mut self.labels
        } else {
            &mut self.sites
        }) = store;
        out
    }

    /// The trend of `self.steps` / `self.values`.
    fn trend_of_buffers(&mut self, always_rate: bool, from_start: bool) -> Trend {
        let cfg = &self.config;
        let (steps, values) = (&self.steps, &self.values);
        let n = values.len();
        // The per-step check needs the unit variance only when it could
        // matter: when `z` of independent samples already reaches the bar.
        let units_from_z = if always_rate {
            f64::NEG_INFINITY
        } else if n < cfg.min_samples {
            f64::INFINITY
        } else {
            self.z_threshold
        };
        let mk = stats::mann_kendall(
            steps,
            values,
            cfg.release_sigmas,
            from_start,
            units_from_z,
            &mut self.scratch,
        );
        let significant = n >= cfg.min_samples && mk.z >= self.z_threshold;
        let rate = if always_rate || significant {
            stats::theil_sen(steps, values, mk.var_s, self.z_conf, &mut self.scratch).map(|r| {
                Rate {
                    per_step: r.slope,
                    low: r.low,
                    high: r.high,
                    confidence: cfg.confidence,
                }
            })
        } else {
            None
        };
        let verdict = if n < cfg.min_samples {
            Verdict::Insufficient
        } else if significant && rate.is_some_and(|r| r.per_step > cfg.min_rate_bytes_per_step) {
            Verdict::Leak
        } else {
            Verdict::NoLeak
        };
        Trend {
            verdict,
            samples: n,
            first_step: steps.first().copied().unwrap_or(0),
            last_step: steps.last().copied().unwrap_or(0),
            pairs: mk.pairs,
            s: mk.s,
            var_s: mk.var_s,
            variance_inflation: if mk.var_independent > 0.0 {
                mk.var_s / mk.var_independent
            } else {
                1.0
            },
            z: mk.z,
            z_threshold: self.z_threshold,
            p_value: stats::normal_sf(mk.z),
            rate,
            releases: mk.alignment.releases,
            shortest_cycle: mk.alignment.shortest_cycle,
        }
    }
}

/// Feeds `heap_series` (the heap level at steps 0, 1, 2, …) to a fresh
/// detector with `config` and returns the first step whose verdict is
/// [`Verdict::Leak`], or `None` if none is.
///
/// # Errors
///
/// When `config` does not [validate](DetectorConfig::validate).
pub fn steps_to_detection(
    config: &DetectorConfig,
    heap_series: impl IntoIterator<Item = u64>,
) -> Result<Option<u64>> {
    let mut d = LeakDetector::new(config.clone())?;
    for (step, bytes) in (0u64..).zip(heap_series) {
        if d.observe_heap(step, bytes)? == Verdict::Leak {
            return Ok(Some(step));
        }
    }
    Ok(None)
}

/// Feeds `heap_series` (steps 0, 1, 2, …) to a fresh detector with `config`
/// and counts the steps whose verdict is [`Verdict::Leak`]: on a series
/// without a leak, the false positives.
///
/// # Errors
///
/// When `config` does not [validate](DetectorConfig::validate).
pub fn leak_verdicts(
    config: &DetectorConfig,
    heap_series: impl IntoIterator<Item = u64>,
) -> Result<u64> {
    let mut d = LeakDetector::new(config.clone())?;
    let mut leaks = 0;
    for (step, bytes) in (0u64..).zip(heap_series) {
        if d.observe_heap(step, bytes)? == Verdict::Leak {
            leaks += 1;
        }
    }
    Ok(leaks)
}
