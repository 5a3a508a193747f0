//! [`FeaturePipeline`]: tactical bars in, the four GrandModel inputs out —
//! the 48 × 8 structure window, the 60 × 7 tactical window, the 8-D regime
//! vector and the 5-D LVN vector — normalised online, with no look-ahead;
//! and [`MarketData`], a whole series run through the pipeline once so
//! environments can index observations instead of recomputing them.
//!
//! # Per tactical bar
//! 1. The tactical features ([`features::tactical`](crate::features::tactical))
//!    and the LVN vector ([`features::lvn`](crate::features::lvn)) take the bar.
//! 2. The [`Aggregator`] folds it into its structure bucket (k tactical bars,
//!    6 × 5 min = 30 min by default). When the bar opens a new bucket, the
//!    finished bucket goes to the structure features
//!    ([`features::structure`](crate::features::structure)) and the regime
//!    statistics ([`features::regime`](crate::features::regime)), and a new
//!    structure row is appended. Buckets cut short by a gap are used as they
//!    are (a short bar is still a real bar).
//! 3. Each row is transformed and normalised (below) and appended to its
//!    window: the tactical window slides by one row every bar, the structure
//!    window by one row per finished bucket — exactly the sliding windows
//!    gm-buffers stores once per row.
//!
//! # Column transforms (with `normalize = true`)
//! Each column is either passed through (already bounded), scaled, or turned
//! into a z-score against the running mean and deviation of the values
//! *before* it ([`RunningNorm`], clipped to ±`clip_sigmas`). Price levels are
//! first made relative to the close, so a z-score does not just track the
//! price level.
//!
//! | matrix | column | model input |
//! |---|---|---|
//! | structure | `mlmi_value`, `mlmi_signal` | raw / k (in [−1, 1]) |
//! | structure | `nwrqk_value` | z of (ŷ − close) / close · 100 |
//! | structure | `nwrqk_slope` | z of slope / close · 100 |
//! | structure | `lvn_distance_points` | z |
//! | structure | `lvn_nearest_strength` | raw / 100 (in [0, 1]) |
//! | structure | `time_hour_sin`, `time_hour_cos` | raw |
//! | tactical | `fvg_bullish_active`, `fvg_bearish_active`, `fvg_mitigation_signal` | raw (0/1) |
//! | tactical | `fvg_nearest_level` | z of (level − close) / close · 100 |
//! | tactical | `price_momentum_5`, `volume_ratio`, `fvg_gap_size_pct` | z |
//! | regime | all eight | z |
//! | LVN | all five | raw (bounded by construction) |
//!
//! With `normalize = false` every value is the raw feature as `f32`.
//!
//! # Observation layout
//! [`OBS_DIM`] = 977 floats: the structure window (48 rows × 8, oldest row
//! first), the tactical window (60 × 7, oldest first), the regime window
//! (21 rows × 8: the 20 previous regime vectors and the current one, one row
//! per structure bar, as the regime embedder takes them), the LVN vector —
//! the same order as the `FieldSpec::window`/`obs` columns a gm-buffers
//! schema would declare (three sliding windows and one frame).

use std::collections::VecDeque;
use std::path::Path;

use crate::aggregate::Aggregator;
use crate::features::lvn::{LvnConfig, LvnFeatures};
use crate::features::regime::{RegimeConfig, RegimeFeatures};
use crate::features::structure::{StructureConfig, StructureFeatures};
use crate::features::tactical::{TacticalConfig, TacticalFeatures};
use crate::{
    detect_interval, load_csv, Bar, BarInterval, Error, GeneratorConfig, Regime, Result,
    RunningNorm, SyntheticMarket,
};

/// Rows of the structure window.
pub const STRUCTURE_ROWS: usize = 48;
/// Columns of a structure row.
pub const STRUCTURE_DIM: usize = 8;
/// Rows of the tactical window.
pub const TACTICAL_ROWS: usize = 60;
/// Columns of a tactical row.
pub const TACTICAL_DIM: usize = 7;
/// Length of the regime vector.
pub const REGIME_DIM: usize = 8;
/// Rows of the regime window: 20 of history and the current vector.
pub const REGIME_ROWS: usize = 21;
/// Length of the LVN vector.
pub const LVN_DIM: usize = 5;
/// Floats in one flat observation (48·8 + 60·7 + 8 + 5).
pub const OBS_DIM: usize = STRUCTURE_ROWS * STRUCTURE_DIM
    + TACTICAL_ROWS * TACTICAL_DIM
    + REGIME_ROWS * REGIME_DIM
    + LVN_DIM;

/// Settings of a [`FeaturePipeline`].
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig {
    /// Spacing of the tactical bars (default 5 minutes; set from the data by
    /// [`MarketData::from_csv`]).
    pub tactical_interval: BarInterval,
    /// Tactical bars per structure bar (default 6: 5 min → 30 min).
    pub structure_bars: usize,
    /// Structure features.
    pub structure: StructureConfig,
    /// Tactical features.
    pub tactical: TacticalConfig,
    /// Regime statistics (computed on structure bars).
    pub regime: RegimeConfig,
    /// LVN vector (computed on tactical bars).
    pub lvn: LvnConfig,
    /// When set, the LVN distance cap (`lvn.distance_cap_points`) becomes
    /// this fraction of the first bar's close (default 0.005: 0.5 % of the
    /// price, so the vector is meaningful for any price scale; `None` keeps
    /// the configured points).
    pub lvn_cap_fraction_of_price: Option<f64>,
    /// Apply the column transforms and running z-scores (default true).
    pub normalize: bool,
    /// z-scores are clipped to ± this (default 5).
    pub clip_sigmas: f64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            tactical_interval: BarInterval::M5,
            structure_bars: 6,
            structure: StructureConfig::default(),
            tactical: TacticalConfig::default(),
            regime: RegimeConfig::default(),
            lvn: LvnConfig::default(),
            lvn_cap_fraction_of_price: Some(0.005),
            normalize: true,
            clip_sigmas: 5.0,
        }
    }
}

impl PipelineConfig {
    /// Checks every part; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.tactical_interval.seconds() <= 0 {
            return Err(Error::config(
                "tactical_interval",
                self.tactical_interval.seconds(),
                "> 0 seconds",
            ));
        }
        if self.structure_bars == 0 {
            return Err(Error::config("structure_bars", 0, "at least 1"));
        }
        if let Some(f) = self.lvn_cap_fraction_of_price {
            if !(f > 0.0 && f.is_finite()) {
                return Err(Error::config(
                    "lvn_cap_fraction_of_price",
                    f,
                    "None or a finite fraction > 0",
                ));
            }
        }
        if !(self.clip_sigmas > 0.0 && self.clip_sigmas.is_finite()) {
            return Err(Error::config(
                "clip_sigmas",
                self.clip_sigmas,
                "a finite value > 0",
            ));
        }
        self.structure.validate()?;
        self.tactical.validate()?;
        self.regime.validate()?;
        self.lvn.validate()
    }
}

/// What one tactical bar added.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRows {
    /// The tactical row of this bar (`None` while warming up).
    pub tactical: Option<[f32; TACTICAL_DIM]>,
    /// A structure row, when this bar closed a structure bucket.
    pub structure: Option<[f32; STRUCTURE_DIM]>,
    /// A regime vector, when this bar closed a structure bucket and the
    /// regime statistics are warm (a new row of the regime window).
    pub regime_row: Option<[f32; REGIME_DIM]>,
    /// The latest regime vector (`None` while warming up).
    pub regime: Option<[f32; REGIME_DIM]>,
    /// The LVN vector of this bar (`None` while warming up).
    pub lvn: Option<[f32; LVN_DIM]>,
    /// Whether every window is full and every vector defined.
    pub ready: bool,
}

#[derive(Debug, Clone)]
struct Norms {
    structure: [RunningNorm; STRUCTURE_DIM],
    tactical: [RunningNorm; TACTICAL_DIM],
    regime: [RunningNorm; REGIME_DIM],
}

/// Tactical bars in, GrandModel observations out; see the module docs.
#[derive(Debug, Clone)]
pub struct FeaturePipeline {
    cfg: PipelineConfig,
    agg: Aggregator,
    structure: StructureFeatures,
    tactical: TacticalFeatures,
    regime: RegimeFeatures,
    lvn: Option<LvnFeatures>,
    norms: Norms,
    structure_rows: VecDeque<[f32; STRUCTURE_DIM]>,
    tactical_rows: VecDeque<[f32; TACTICAL_DIM]>,
    regime_rows: VecDeque<[f32; REGIME_DIM]>,
    last_regime: Option<[f32; REGIME_DIM]>,
    last_lvn: Option<[f32; LVN_DIM]>,
    bars: u64,
}

impl FeaturePipeline {
    /// A pipeline with `cfg` (validated).
    pub fn new(cfg: PipelineConfig) -> Result<Self> {
        cfg.validate()?;
        let clip = cfg.clip_sigmas;
        Ok(Self {
            agg: Aggregator::new(
                cfg.tactical_interval,
                u32::try_from(cfg.structure_bars).map_err(|_| {
                    Error::config("structure_bars", cfg.structure_bars, "at most 4294967295")
                })?,
            )?,
            structure: StructureFeatures::new(cfg.structure)?,
            tactical: TacticalFeatures::new(cfg.tactical)?,
            regime: RegimeFeatures::new(cfg.regime)?,
            // Built on the first bar: the distance cap may depend on its price.
            lvn: None,
            norms: Norms {
                structure: [RunningNorm::new(clip); STRUCTURE_DIM],
                tactical: [RunningNorm::new(clip); TACTICAL_DIM],
                regime: [RunningNorm::new(clip); REGIME_DIM],
            },
            structure_rows: VecDeque::with_capacity(STRUCTURE_ROWS),
            tactical_rows: VecDeque::with_capacity(TACTICAL_ROWS),
            regime_rows: VecDeque::with_capacity(REGIME_ROWS),
            last_regime: None,
            last_lvn: None,
            bars: 0,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PipelineConfig {
        &self.cfg
    }

    /// Tactical bars pushed so far.
    pub fn bars_seen(&self) -> u64 {
        self.bars
    }

    /// Whether the three windows are full and the LVN vector defined.
    pub fn is_ready(&self) -> bool {
        self.structure_rows.len() == STRUCTURE_ROWS
            && self.tactical_rows.len() == TACTICAL_ROWS
            && self.regime_rows.len() == REGIME_ROWS
            && self.last_lvn.is_some()
    }

    /// Takes the next closed tactical bar. An invalid bar is an error and
    /// changes nothing.
    pub fn push(&mut self, bar: &Bar) -> Result<StepRows> {
        if !bar.is_valid() {
            return Err(Error::Invalid(format!(
                "bar at ts {} violates the OHLCV invariants: {bar:?}",
                bar.ts
            )));
        }
        if self.lvn.is_none() {
            let mut lvn = self.cfg.lvn;
            if let Some(f) = self.cfg.lvn_cap_fraction_of_price {
                lvn.distance_cap_points = bar.close * f;
            }
            self.lvn = Some(LvnFeatures::new(lvn)?);
        }
        let lvn = self.lvn.as_mut().expect("built above");
        // All four computers validate the same invariants as `is_valid`, so
        // after the check above none of them can fail on this bar.
        let tactical_raw = self.tactical.push(bar)?;
        let lvn_raw = lvn.push(bar)?;
        let mut structure_row = None;
        let mut regime_row = None;
        if let Some(done) = self.agg.push(bar) {
            let b = done.bar;
            if let Some(raw) = self.structure.push(&b)? {
                let row = self.transform_structure(&raw, b.close);
                push_window(&mut self.structure_rows, row, STRUCTURE_ROWS);
                structure_row = Some(row);
            }
            if let Some(raw) = self.regime.push(&b)? {
                let row = self.transform_regime(&raw);
                push_window(&mut self.regime_rows, row, REGIME_ROWS);
                self.last_regime = Some(row);
                regime_row = Some(row);
            }
        }
        let tactical_row = tactical_raw.map(|raw| {
            let row = self.transform_tactical(&raw, bar.close);
            push_window(&mut self.tactical_rows, row, TACTICAL_ROWS);
            row
        });
        if let Some(v) = lvn_raw {
            self.last_lvn = Some(v.map(|x| x as f32));
        }
        self.bars += 1;
        Ok(StepRows {
            tactical: tactical_row,
            structure: structure_row,
            regime_row,
            regime: self.last_regime,
            lvn: lvn_raw.map(|v| v.map(|x| x as f32)),
            ready: self.is_ready(),
        })
    }

    fn transform_structure(
        &mut self,
        raw: &[f64; STRUCTURE_DIM],
        close: f64,
    ) -> [f32; STRUCTURE_DIM] {
        if !self.cfg.normalize {
            return raw.map(|x| x as f32);
        }
        let k = self.cfg.structure.knn_neighbors as f64;
        let n = &mut self.norms.structure;
        [
            raw[0] / k,
            raw[1] / k,
            n[2].normalize((raw[2] - close) / close * 100.0),
            n[3].normalize(raw[3] / close * 100.0),
            n[4].normalize(raw[4]),
            raw[5] / 100.0,
            raw[6],
            raw[7],
        ]
        .map(|x| x as f32)
    }

    fn transform_tactical(&mut self, raw: &[f64; TACTICAL_DIM], close: f64) -> [f32; TACTICAL_DIM] {
        if !self.cfg.normalize {
            return raw.map(|x| x as f32);
        }
        let n = &mut self.norms.tactical;
        [
            raw[0],
            raw[1],
            n[2].normalize((raw[2] - close) / close * 100.0),
            raw[3],
            n[4].normalize(raw[4]),
            n[5].normalize(raw[5]),
            n[6].normalize(raw[6]),
        ]
        .map(|x| x as f32)
    }

    fn transform_regime(&mut self, raw: &[f64; REGIME_DIM]) -> [f32; REGIME_DIM] {
        if !self.cfg.normalize {
            return raw.map(|x| x as f32);
        }
        let mut out = [0f32; REGIME_DIM];
        for (i, (o, n)) in out.iter_mut().zip(&mut self.norms.regime).enumerate() {
            *o = n.normalize(raw[i]) as f32;
        }
        out
    }

    /// Writes the current observation ([`OBS_DIM`] floats, layout in the
    /// module docs) into `out`. `Err` when not ready or `out` has the wrong
    /// length.
    pub fn write_observation(&self, out: &mut [f32]) -> Result<()> {
        if out.len() != OBS_DIM {
            return Err(Error::Invalid(format!(
                "observation buffer of {} floats, expected {OBS_DIM}",
                out.len()
            )));
        }
        let Some(lvn) = self.last_lvn.filter(|_| self.is_ready()) else {
            return Err(Error::NotEnoughData(
                "the pipeline is still warming up".into(),
            ));
        };
        write_obs(
            self.structure_rows.iter().copied(),
            self.tactical_rows.iter().copied(),
            self.regime_rows.iter().copied(),
            &lvn,
            out,
        );
        Ok(())
    }
}

fn push_window<const N: usize>(w: &mut VecDeque<[f32; N]>, row: [f32; N], cap: usize) {
    if w.len() == cap {
        w.pop_front();
    }
    w.push_back(row);
}

fn write_obs(
    structure: impl Iterator<Item = [f32; STRUCTURE_DIM]>,
    tactical: impl Iterator<Item = [f32; TACTICAL_DIM]>,
    regime: impl Iterator<Item = [f32; REGIME_DIM]>,
    lvn: &[f32; LVN_DIM],
    out: &mut [f32],
) {
    let mut o = 0;
    for row in structure {
        out[o..o + STRUCTURE_DIM].copy_from_slice(&row);
        o += STRUCTURE_DIM;
    }
    for row in tactical {
        out[o..o + TACTICAL_DIM].copy_from_slice(&row);
        o += TACTICAL_DIM;
    }
    for row in regime {
        out[o..o + REGIME_DIM].copy_from_slice(&row);
        o += REGIME_DIM;
    }
    out[o..o + LVN_DIM].copy_from_slice(lvn);
}

/// A bar series run through the [`FeaturePipeline`] once, with every
/// tactical bar's rows kept, so an observation at any bar is a copy of two
/// window slices (no recomputation, and the same values however an
/// environment walks the series). Row `t` depends on bars `0..=t` only.
#[derive(Debug, Clone)]
pub struct MarketData {
    bars: Vec<Bar>,
    regimes: Option<Vec<Regime>>,
    interval: BarInterval,
    tactical: Vec<[f32; TACTICAL_DIM]>,
    structure: Vec<[f32; STRUCTURE_DIM]>,
    /// Per bar: structure rows available after it.
    structure_count: Vec<u32>,
    regime: Vec<[f32; REGIME_DIM]>,
    /// Per bar: regime rows available after it.
    regime_count: Vec<u32>,
    lvn_vec: Vec<[f32; LVN_DIM]>,
    first_ready: usize,
}

impl MarketData {
    /// Runs `bars` (and, when known, the regime of each bar) through a
    /// pipeline built from `cfg`. Needs at least one bar where the pipeline
    /// is ready.
    pub fn from_bars(
        bars: Vec<Bar>,
        regimes: Option<Vec<Regime>>,
        cfg: PipelineConfig,
    ) -> Result<Self> {
        if let Some(r) = &regimes {
            if r.len() != bars.len() {
                return Err(Error::Invalid(format!(
                    "{} regimes for {} bars",
                    r.len(),
                    bars.len()
                )));
            }
        }
        let interval = cfg.tactical_interval;
        let mut p = FeaturePipeline::new(cfg)?;
        let n = bars.len();
        let mut tactical = Vec::with_capacity(n);
        let mut structure = Vec::with_capacity(n / p.cfg.structure_bars + 1);
        let mut structure_count = Vec::with_capacity(n);
        let mut regime = Vec::with_capacity(n / p.cfg.structure_bars + 1);
        let mut regime_count = Vec::with_capacity(n);
        let mut lvn_vec = Vec::with_capacity(n);
        let mut first_ready = None;
        for (t, bar) in bars.iter().enumerate() {
            let s = p
                .push(bar)
                .map_err(|e| Error::Invalid(format!("bar {t}: {e}")))?;
            tactical.push(s.tactical.unwrap_or([0.0; TACTICAL_DIM]));
            if let Some(row) = s.structure {
                structure.push(row);
            }
            structure_count.push(structure.len() as u32);
            if let Some(row) = s.regime_row {
                regime.push(row);
            }
            regime_count.push(regime.len() as u32);
            lvn_vec.push(s.lvn.unwrap_or([0.0; LVN_DIM]));
            if s.ready && first_ready.is_none() {
                first_ready = Some(t);
            }
        }
        let first_ready = first_ready.ok_or_else(|| {
            Error::NotEnoughData(format!(
                "{n} bars never fill the windows (the pipeline needs about {} tactical bars)",
                p.cfg.structure_bars * (p.cfg.structure.warmup_bars() + STRUCTURE_ROWS) + 1
            ))
        })?;
        Ok(Self {
            bars,
            regimes,
            interval,
            tactical,
            structure,
            structure_count,
            regime,
            regime_count,
            lvn_vec,
            first_ready,
        })
    }

    /// `n_bars` bars of the synthetic market (the embedded default data).
    pub fn synthetic(
        generator: GeneratorConfig,
        n_bars: usize,
        cfg: PipelineConfig,
    ) -> Result<Self> {
        let cfg = PipelineConfig {
            tactical_interval: BarInterval(generator.bar_interval_secs),
            ..cfg
        };
        let (bars, regimes) = SyntheticMarket::new(generator)?.generate(n_bars);
        Self::from_bars(bars, Some(regimes), cfg)
    }

    /// Bars from a CSV file (see [`load_csv`]); the tactical interval is the
    /// file's own, detected. Regimes are unknown.
    pub fn from_csv(path: impl AsRef<Path>, cfg: PipelineConfig) -> Result<Self> {
        let loaded = load_csv(path)?;
        let cfg = PipelineConfig {
            tactical_interval: loaded.interval,
            ..cfg
        };
        Self::from_bars(loaded.bars, None, cfg)
    }

    /// Tactical bars.
    pub fn len(&self) -> usize {
        self.bars.len()
    }

    /// True when there are no bars (never, for a constructed value).
    pub fn is_empty(&self) -> bool {
        self.bars.is_empty()
    }

    /// The first bar at which an observation exists.
    pub fn first_ready(&self) -> usize {
        self.first_ready
    }

    /// The bar spacing.
    pub fn interval(&self) -> BarInterval {
        self.interval
    }

    /// The bars.
    pub fn bars(&self) -> &[Bar] {
        &self.bars
    }

    /// The planted regime of bar `t`, when known.
    pub fn regime(&self, t: usize) -> Option<Regime> {
        self.regimes.as_ref().and_then(|r| r.get(t).copied())
    }

    /// Writes the observation at bar `t` (after bar `t` closed) into `out`
    /// ([`OBS_DIM`] floats).
    pub fn observation(&self, t: usize, out: &mut [f32]) -> Result<()> {
        if out.len() != OBS_DIM {
            return Err(Error::Invalid(format!(
                "observation buffer of {} floats, expected {OBS_DIM}",
                out.len()
            )));
        }
        if t < self.first_ready || t >= self.bars.len() {
            return Err(Error::Invalid(format!(
                "no observation at bar {t}: valid bars are {}..{}",
                self.first_ready,
                self.bars.len()
            )));
        }
        let c = self.structure_count[t] as usize;
        let r = self.regime_count[t] as usize;
        write_obs(
            self.structure[c - STRUCTURE_ROWS..c].iter().copied(),
            self.tactical[t + 1 - TACTICAL_ROWS..=t].iter().copied(),
            self.regime[r - REGIME_ROWS..r].iter().copied(),
            &self.lvn_vec[t],
            out,
        );
        Ok(())
    }

    /// The interval detected for `bars` (a convenience for callers that
    /// build `from_bars` themselves).
    pub fn detect_interval(bars: &[Bar]) -> Result<BarInterval> {
        detect_interval(bars)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_cfg() -> PipelineConfig {
        PipelineConfig::default()
    }

    fn synthetic(n: usize, seed: u64) -> MarketData {
        MarketData::synthetic(
            GeneratorConfig {
                seed,
                ..GeneratorConfig::default()
            },
            n,
            small_cfg(),
        )
        .unwrap()
    }

    #[test]
    fn streaming_pipeline_and_market_data_give_the_same_observations() {
        let data = synthetic(4000, 3);
        let mut p = FeaturePipeline::new(small_cfg()).unwrap();
        let mut a = vec![0f32; OBS_DIM];
        let mut b = vec![0f32; OBS_DIM];
        let mut checked = 0;
        for (t, bar) in data.bars().iter().enumerate() {
            let s = p.push(bar).unwrap();
            assert_eq!(s.ready, t >= data.first_ready());
            if s.ready {
                p.write_observation(&mut a).unwrap();
                data.observation(t, &mut b).unwrap();
                assert_eq!(a, b, "bar {t}");
                assert!(a.iter().all(|x| x.is_finite()));
                checked += 1;
            }
        }
        assert!(checked > 1000, "{checked}");
    }

    #[test]
    fn observations_never_look_ahead() {
        let full = synthetic(3000, 5);
        let t = full.first_ready() + 400;
        let cut = MarketData::from_bars(full.bars()[..=t].to_vec(), None, small_cfg()).unwrap();
        let (mut a, mut b) = (vec![0f32; OBS_DIM], vec![0f32; OBS_DIM]);
        full.observation(t, &mut a).unwrap();
        cut.observation(t, &mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn too_little_data_and_bad_input_are_errors() {
        let e = MarketData::synthetic(GeneratorConfig::default(), 300, small_cfg()).unwrap_err();
        assert!(matches!(e, Error::NotEnoughData(_)), "{e}");
        let data = synthetic(3000, 1);
        let mut out = vec![0f32; OBS_DIM];
        assert!(data.observation(data.first_ready() - 1, &mut out).is_err());
        assert!(data.observation(data.len(), &mut out).is_err());
        assert!(data
            .observation(data.first_ready(), &mut out[..10])
            .is_err());
        let mut p = FeaturePipeline::new(small_cfg()).unwrap();
        let bad = Bar {
            ts: 0,
            open: 1.0,
            high: 0.5,
            low: 0.4,
            close: 1.0,
            volume: 1.0,
        };
        assert!(p.push(&bad).is_err());
        assert_eq!(p.bars_seen(), 0);
        let e = PipelineConfig {
            structure_bars: 0,
            ..small_cfg()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("structure_bars"));
    }

    #[test]
    fn windows_slide_one_row_per_bar_and_per_bucket() {
        let data = synthetic(3000, 9);
        let t = data.first_ready() + 100;
        let (mut a, mut b) = (vec![0f32; OBS_DIM], vec![0f32; OBS_DIM]);
        data.observation(t, &mut a).unwrap();
        data.observation(t + 1, &mut b).unwrap();
        let s = STRUCTURE_ROWS * STRUCTURE_DIM;
        // tactical: the next window is the previous one shifted by one row
        assert_eq!(
            &b[s..s + (TACTICAL_ROWS - 1) * TACTICAL_DIM],
            &a[s + TACTICAL_DIM..s + TACTICAL_ROWS * TACTICAL_DIM]
        );
        // structure: either unchanged or shifted by exactly one row
        let same = a[..s] == b[..s];
        let shifted = b[..s - STRUCTURE_DIM] == a[STRUCTURE_DIM..s];
        assert!(same || shifted);
        // regime window: the same, on the same bars as the structure window
        let r0 = s + TACTICAL_ROWS * TACTICAL_DIM;
        let r1 = r0 + REGIME_ROWS * REGIME_DIM;
        let r_same = a[r0..r1] == b[r0..r1];
        let r_shifted = b[r0..r1 - REGIME_DIM] == a[r0 + REGIME_DIM..r1];
        assert!(r_same || r_shifted);
        assert_eq!(
            same, r_same,
            "both windows move when a structure bar closes"
        );
    }
}
