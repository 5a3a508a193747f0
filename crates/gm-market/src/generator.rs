//! [`SyntheticMarket`]: the regime-switching synthetic market that is the
//! embedded default data source (5-minute OHLCV bars with the true regime
//! of every bar), configured by [`GeneratorConfig`].
//!
//! The model, its equations and its defaults are documented on
//! [`SyntheticMarket`].

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Bar, Error, Regime, Result};

const DAY_SECS: i64 = 86_400;
/// `sqrt(8 / pi)`: the expected range of a unit-variance Brownian path over
/// unit time.
const BROWNIAN_RANGE: f64 = 1.595_769_121_605_731;
/// Largest start time accepted (year 10000), so every bar has an ISO date.
const MAX_START_SECS: i64 = 253_402_300_799 - 100 * 366 * DAY_SECS;

/// The dynamics of one regime.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegimeParams {
    /// Mean length of a run of this regime, in bars (>= 1).
    pub mean_duration_bars: f64,
    /// Drift of log-price per bar.
    pub drift_per_bar: f64,
    /// Volatility (standard deviation) of log-price per bar.
    pub vol_per_bar: f64,
    /// Fraction of the distance to the local anchor closed per bar (0 = no
    /// mean reversion).
    pub reversion_per_bar: f64,
}

/// Configuration of [`SyntheticMarket`]. `Default` gives the documented
/// defaults (see [`SyntheticMarket`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorConfig {
    /// Seed of the ChaCha8 generator: the same seed gives the same bars.
    /// Default 42.
    pub seed: u64,
    /// The first bar is the first session slot at or after this time (Unix
    /// seconds). Default 1 704 067 200 = 2024-01-01T00:00:00Z.
    pub start_unix_secs: i64,
    /// Price of the first open, and the level the long-run pull returns to.
    /// Default 100.
    pub start_price: f64,
    /// Bar spacing in seconds. Default 300.
    pub bar_interval_secs: i64,
    /// Session open, seconds after 00:00 UTC. Default 0.
    pub session_start_secs: i64,
    /// Session length in seconds, a multiple of the bar interval; the session
    /// must end by midnight. Default 86 400 (round the clock).
    pub session_length_secs: i64,
    /// Whether Saturdays and Sundays have sessions. Default `false` (24/5:
    /// timestamps jump over weekends).
    pub trade_weekends: bool,
    /// Sub-steps of the intrabar path (1..=64). Default 4.
    pub substeps_per_bar: u32,
    /// Regime of the first bar. Default [`Regime::Ranging`].
    pub initial_regime: Regime,
    /// Per-regime dynamics, indexed by [`Regime::index`].
    pub regimes: [RegimeParams; 4],
    /// `regime_switch_weights[i][j]`: relative weight of moving from regime
    /// `i` to regime `j` when `i` ends (diagonal ignored; every row needs a
    /// positive off-diagonal entry). Default all 1 (uniform).
    pub regime_switch_weights: [[f64; 4]; 4],
    /// Long-run pull of log-price toward `ln(start_price)`, per bar
    /// (`kappa_lr`). Default 1e-5.
    pub long_run_reversion_per_bar: f64,
    /// Standard deviation of the log opening gap at a session open after
    /// zero closed time (`sigma_gap`); scaled by `sqrt(1 + closed_days)`.
    /// Default 2e-3.
    pub session_gap_vol: f64,
    /// Probability that a bar contains a jump. Default 1e-3.
    pub jump_probability_per_bar: f64,
    /// Standard deviation of a jump in log-price. Default 5e-3.
    pub jump_vol: f64,
    /// Mean volume of a normal bar (`V0`). Default 1000.
    pub base_volume_per_bar: f64,
    /// Depth of the intraday U-shape (`A`, 0..2): session edges get
    /// `1 + A` times the mean, the middle `1 - A/2`. Default 1.
    pub volume_u_shape: f64,
    /// Elasticity of volume to the bar's range (`gamma`). Default 0.8.
    pub volume_vol_elasticity: f64,
    /// Log-normal volume noise (`eta`). Default 0.3.
    pub volume_noise: f64,
    /// The per-bar volatility whose typical range earns `V0` (`sigma_ref`).
    /// Default 1e-3.
    pub volume_reference_vol_per_bar: f64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            start_unix_secs: 1_704_067_200,
            start_price: 100.0,
            bar_interval_secs: 300,
            session_start_secs: 0,
            session_length_secs: DAY_SECS,
            trade_weekends: false,
            substeps_per_bar: 4,
            initial_regime: Regime::Ranging,
            regimes: [
                RegimeParams {
                    mean_duration_bars: 96.0,
                    drift_per_bar: 2e-4,
                    vol_per_bar: 1.0e-3,
                    reversion_per_bar: 0.0,
                },
                RegimeParams {
                    mean_duration_bars: 96.0,
                    drift_per_bar: -2e-4,
                    vol_per_bar: 1.0e-3,
                    reversion_per_bar: 0.0,
                },
                RegimeParams {
                    mean_duration_bars: 144.0,
                    drift_per_bar: 0.0,
                    vol_per_bar: 0.6e-3,
                    reversion_per_bar: 0.02,
                },
                RegimeParams {
                    mean_duration_bars: 36.0,
                    drift_per_bar: 0.0,
                    vol_per_bar: 2.5e-3,
                    reversion_per_bar: 0.0,
                },
            ],
            regime_switch_weights: [[1.0; 4]; 4],
            long_run_reversion_per_bar: 1e-5,
            session_gap_vol: 2e-3,
            jump_probability_per_bar: 1e-3,
            jump_vol: 5e-3,
            base_volume_per_bar: 1000.0,
            volume_u_shape: 1.0,
            volume_vol_elasticity: 0.8,
            volume_noise: 0.3,
            volume_reference_vol_per_bar: 1e-3,
        }
    }
}

/// Config keys of the per-regime fields, for error messages.
const REGIME_KEYS: [[&str; 4]; 4] = [
    [
        "regimes[TrendingUp].mean_duration_bars",
        "regimes[TrendingUp].drift_per_bar",
        "regimes[TrendingUp].vol_per_bar",
        "regimes[TrendingUp].reversion_per_bar",
    ],
    [
        "regimes[TrendingDown].mean_duration_bars",
        "regimes[TrendingDown].drift_per_bar",
        "regimes[TrendingDown].vol_per_bar",
        "regimes[TrendingDown].reversion_per_bar",
    ],
    [
        "regimes[Ranging].mean_duration_bars",
        "regimes[Ranging].drift_per_bar",
        "regimes[Ranging].vol_per_bar",
        "regimes[Ranging].reversion_per_bar",
    ],
    [
        "regimes[HighVolatility].mean_duration_bars",
        "regimes[HighVolatility].drift_per_bar",
        "regimes[HighVolatility].vol_per_bar",
        "regimes[HighVolatility].reversion_per_bar",
    ],
];
const SWITCH_KEYS: [&str; 4] = [
    "regime_switch_weights[TrendingUp]",
    "regime_switch_weights[TrendingDown]",
    "regime_switch_weights[Ranging]",
    "regime_switch_weights[HighVolatility]",
];

/// `Err(Config)` unless `lo <= v <= hi` and `v` is finite.
fn check_range(key: &'static str, v: f64, lo: f64, hi: f64) -> Result<()> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(())
    } else {
        Err(Error::config(
            key,
            v,
            format!("a finite number in [{lo}, {hi}]"),
        ))
    }
}

impl GeneratorConfig {
    /// Checks every field; the error names the key, the value and what is
    /// allowed.
    pub fn validate(&self) -> Result<()> {
        if !(0..=MAX_START_SECS).contains(&self.start_unix_secs) {
            return Err(Error::config(
                "start_unix_secs",
                self.start_unix_secs,
                format!("0 ..= {MAX_START_SECS}"),
            ));
        }
        check_range("start_price", self.start_price, 1e-6, 1e12)?;
        if !(1..=DAY_SECS).contains(&self.bar_interval_secs) {
            return Err(Error::config(
                "bar_interval_secs",
                self.bar_interval_secs,
                "1 ..= 86400 seconds",
            ));
        }
        if !(0..DAY_SECS).contains(&self.session_start_secs) {
            return Err(Error::config(
                "session_start_secs",
                self.session_start_secs,
                "0 ..= 86399 seconds after 00:00 UTC",
            ));
        }
        let max_len = DAY_SECS - self.session_start_secs;
        if self.session_length_secs < self.bar_interval_secs
            || self.session_length_secs > max_len
            || self.session_length_secs % self.bar_interval_secs != 0
        {
            return Err(Error::config(
                "session_length_secs",
                self.session_length_secs,
                format!(
                    "a multiple of bar_interval_secs ({}) in {} ..= {max_len} \
                     (the session must end by midnight UTC)",
                    self.bar_interval_secs, self.bar_interval_secs
                ),
            ));
        }
        if !(1..=64).contains(&self.substeps_per_bar) {
            return Err(Error::config(
                "substeps_per_bar",
                self.substeps_per_bar,
                "1 ..= 64",
            ));
        }
        for (i, p) in self.regimes.iter().enumerate() {
            let keys = REGIME_KEYS[i];
            check_range(keys[0], p.mean_duration_bars, 1.0, 1e12)?;
            check_range(keys[1], p.drift_per_bar, -0.1, 0.1)?;
            check_range(keys[2], p.vol_per_bar, 0.0, 0.5)?;
            check_range(keys[3], p.reversion_per_bar, 0.0, 1.0)?;
        }
        for (i, row) in self.regime_switch_weights.iter().enumerate() {
            let ok = row.iter().all(|w| w.is_finite() && *w >= 0.0);
            let off: f64 = (0..4).filter(|&j| j != i).map(|j| row[j]).sum();
            if !ok || off <= 0.0 {
                return Err(Error::config(
                    SWITCH_KEYS[i],
                    format!("{row:?}"),
                    "finite weights >= 0 with a positive entry off the diagonal",
                ));
            }
        }
        check_range(
            "long_run_reversion_per_bar",
            self.long_run_reversion_per_bar,
            0.0,
            1.0,
        )?;
        check_range("session_gap_vol", self.session_gap_vol, 0.0, 0.5)?;
        check_range(
            "jump_probability_per_bar",
            self.jump_probability_per_bar,
            0.0,
            1.0,
        )?;
        check_range("jump_vol", self.jump_vol, 0.0, 0.5)?;
        check_range("base_volume_per_bar", self.base_volume_per_bar, 0.0, 1e15)?;
        check_range("volume_u_shape", self.volume_u_shape, 0.0, 2.0)?;
        if self.volume_u_shape >= 2.0 {
            return Err(Error::config(
                "volume_u_shape",
                self.volume_u_shape,
                "a finite number in [0, 2) (the middle of the session gets 1 - A/2)",
            ));
        }
        check_range(
            "volume_vol_elasticity",
            self.volume_vol_elasticity,
            0.0,
            4.0,
        )?;
        check_range("volume_noise", self.volume_noise, 0.0, 2.0)?;
        check_range(
            "volume_reference_vol_per_bar",
            self.volume_reference_vol_per_bar,
            1e-12,
            0.5,
        )?;
        Ok(())
    }

    /// The per-bar regime transition matrix `P[i][j]` (rows sum to 1),
    /// indexed by [`Regime::index`]: `P[i][i] = 1 - 1/D_i` and the rest of the
    /// row split by the switch weights.
    pub fn transition_matrix(&self) -> [[f64; 4]; 4] {
        let mut p = [[0.0; 4]; 4];
        for (i, row) in p.iter_mut().enumerate() {
            let leave = 1.0 / self.regimes[i].mean_duration_bars;
            let w = &self.regime_switch_weights[i];
            let off: f64 = (0..4).filter(|&j| j != i).map(|j| w[j]).sum();
            for (j, cell) in row.iter_mut().enumerate() {
                *cell = if i == j {
                    1.0 - leave
                } else {
                    leave * w[j] / off
                };
            }
        }
        p
    }

    /// Bars in one session.
    pub fn bars_per_session(&self) -> i64 {
        self.session_length_secs / self.bar_interval_secs
    }
}

/// Per-regime constants, precomputed per sub-step.
#[derive(Debug, Clone, Copy)]
struct Step {
    /// Probability of staying in the regime for another bar.
    stay: f64,
    /// Cumulative probabilities of the next regime, given a switch.
    next_cum: [f64; 4],
    drift: f64,
    vol: f64,
    var: f64,
    reversion: f64,
}

/// The bar clock: session slots on trading days.
#[derive(Debug, Clone)]
struct Clock {
    ts: i64,
    slot: i64,
    bars_per_session: i64,
    interval: i64,
    session_start: i64,
    trade_weekends: bool,
    /// Closed seconds before the current bar (session opens only).
    closed_before: i64,
}

impl Clock {
    fn new(c: &GeneratorConfig) -> Self {
        let mut clock = Self {
            ts: 0,
            slot: 0,
            bars_per_session: c.bars_per_session(),
            interval: c.bar_interval_secs,
            session_start: c.session_start_secs,
            trade_weekends: c.trade_weekends,
            closed_before: 0,
        };
        let day = c.start_unix_secs.div_euclid(DAY_SECS);
        let rel = c.start_unix_secs.rem_euclid(DAY_SECS) - c.session_start_secs;
        let slot = if rel <= 0 {
            0
        } else {
            (rel + c.bar_interval_secs - 1) / c.bar_interval_secs
        };
        if clock.is_trading_day(day) && slot < clock.bars_per_session {
            clock.slot = slot;
            clock.ts = day * DAY_SECS + c.session_start_secs + slot * c.bar_interval_secs;
        } else {
            clock.ts = clock.next_session(day);
        }
        clock
    }

    /// Monday = 0 .. Sunday = 6 (1970-01-01 was a Thursday).
    fn is_trading_day(&self, day: i64) -> bool {
        self.trade_weekends || (day + 3).rem_euclid(7) < 5
    }

    /// Start of the first session on a trading day after `day`.
    fn next_session(&self, mut day: i64) -> i64 {
        day += 1;
        while !self.is_trading_day(day) {
            day += 1;
        }
        day * DAY_SECS + self.session_start
    }

    fn advance(&mut self) {
        self.slot += 1;
        if self.slot < self.bars_per_session {
            self.ts += self.interval;
            self.closed_before = 0;
        } else {
            let end = self.ts + self.interval;
            self.ts = self.next_session(self.ts.div_euclid(DAY_SECS));
            self.slot = 0;
            self.closed_before = self.ts - end;
        }
    }
}

/// The regime-switching synthetic market: an endless, deterministic stream
/// of `(Bar, Regime)`.
///
/// # Model
///
/// Everything lives in log-price `x = ln(price)`, so prices stay positive
/// whatever the parameters, and the whole run is a deterministic function of
/// [`GeneratorConfig::seed`] (one [`ChaCha8Rng`]): the same seed gives
/// bit-identical bars on the same platform (`exp`/`ln`/`powf` come from the
/// platform's libm, so last bits may differ between platforms).
///
/// **Regimes.** A Markov chain over the four [`Regime`]s, advanced once per
/// bar. Regime `i` persists with probability `1 - 1/D_i`
/// (`D_i` = [`RegimeParams::mean_duration_bars`], so a run's length is
/// geometric with mean exactly `D_i` bars); when it leaves it moves to
/// `j != i` with probability `w_ij / sum_{k != i} w_ik`
/// ([`GeneratorConfig::regime_switch_weights`]). The full matrix is
/// [`GeneratorConfig::transition_matrix`]. The regime also runs on across
/// session breaks.
///
/// **Prices.** Each bar is walked in `S` sub-steps
/// ([`GeneratorConfig::substeps_per_bar`]) of an Euler scheme
///
/// ```text
/// x <- x + mu_r/S + (kappa_r/S)(a - x) + (kappa_lr/S)(x0 - x) + (sigma_r/sqrt S) z,   z ~ N(0,1)
/// ```
///
/// with the regime's drift `mu_r`, volatility `sigma_r` and mean reversion
/// `kappa_r` toward the *local anchor* `a` (the log open of the first bar of
/// the current regime run), plus a weak long-run pull `kappa_lr` toward the
/// start price `x0` that keeps the level sane over 10^7 bars (stationary
/// standard deviation of `x` around 0.5 with the defaults; half-life about
/// 69 000 bars, invisible inside an episode).
///
/// **OHLC.** `open` is the previous `close` except at a session open, where
/// an opening gap `g ~ N(0, sigma_gap^2 (1 + closed_days))` is added
/// (`closed_days` = closed time before the session / 86 400 s, so a weekend
/// gap is about `sqrt 3` times an overnight one). Within a bar, each
/// sub-step's extremes are drawn exactly from the Brownian bridge between
/// its end points,
/// `max = (x_a + x_b + sqrt((x_b - x_a)^2 - 2 v ln U)) / 2` with `v` the
/// sub-step variance and `U ~ U(0,1]` (and the mirror image for the min),
/// so ranges have the size of a continuous path, not of `S` points.
/// `high`/`low` are the extremes over all sub-steps, `close` the last
/// point; `low <= min(open, close) <= max(open, close) <= high` holds by
/// construction and is enforced once more after `exp`. With probability
/// `p_jump` per bar one sub-step ends with a jump `J ~ N(0, sigma_jump^2)`
/// (a news bar); jumps and opening gaps are what leave three-bar
/// fair-value gaps and empty price levels (low-volume nodes) behind.
///
/// **Volume.**
///
/// ```text
/// volume = V0 * s(phi) * max(rho, 0.05)^gamma * exp(eta z - eta^2 / 2)
/// s(phi) = 1 + A (3 (2 phi - 1)^2 - 1) / 2            (U-shape, mean 1 over a session)
/// rho    = ln(high / low) / (sqrt(8 / pi) * sigma_ref)  (range relative to a normal bar)
/// ```
///
/// where `phi` is the bar's position in its session (mid-bar, 0..1):
/// `1 + A` times the mean at the session edges, `1 - A/2` in the middle.
/// Volume grows with the bar's own range (so with the regime's volatility and
/// with jumps), sub-linearly for `gamma < 1`, so a fast move deposits less
/// volume per price level than a quiet bar.
///
/// **Sessions.** A trading day is a UTC calendar day; its session covers
/// `[session_start_secs, session_start_secs + session_length_secs)` after
/// midnight. With `trade_weekends = false` (the default) Saturdays and
/// Sundays have no bars, so timestamps jump over weekends (24/5, like FX or
/// index futures); with the default 24-hour session there is no gap inside
/// the week, with a shorter one (e.g. 09:30 + 6.5 h) there is one every night.
///
/// # Defaults
///
/// | parameter | default |
/// |---|---|
/// | bar interval | 300 s (5-minute bars) |
/// | start | 2024-01-01T00:00:00Z (a Monday), price 100 |
/// | session | 24 h from 00:00 UTC, weekdays only |
/// | sub-steps | 4 per bar |
/// | TrendingUp | `D` = 96 bars, `mu` = +2e-4, `sigma` = 1.0e-3, `kappa` = 0 |
/// | TrendingDown | `D` = 96 bars, `mu` = -2e-4, `sigma` = 1.0e-3, `kappa` = 0 |
/// | Ranging | `D` = 144 bars, `mu` = 0, `sigma` = 0.6e-3, `kappa` = 0.02 |
/// | HighVolatility | `D` = 36 bars, `mu` = 0, `sigma` = 2.5e-3, `kappa` = 0 |
/// | switch weights | uniform over the other three regimes |
/// | long-run pull `kappa_lr` | 1e-5 per bar |
/// | opening gap `sigma_gap` | 2e-3 (log) |
/// | jumps | `p_jump` = 1e-3 per bar, `sigma_jump` = 5e-3 |
/// | volume | `V0` = 1000, `A` = 1, `gamma` = 0.8, `eta` = 0.3, `sigma_ref` = 1e-3 |
///
/// Drifts and volatilities are per bar of log-price (1e-3 per 5-minute bar
/// is about 1.7 % a day over 288 bars).
///
/// # Example
///
/// ```
/// use gm_market::{GeneratorConfig, SyntheticMarket};
/// let mut market = SyntheticMarket::new(GeneratorConfig::default())?;
/// let (bars, regimes) = market.generate(1000);
/// assert!(bars.iter().all(|b| b.is_valid()));
/// assert_eq!(regimes.len(), 1000);
/// # Ok::<(), gm_market::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct SyntheticMarket {
    config: GeneratorConfig,
    rng: ChaCha8Rng,
    steps: [Step; 4],
    /// Volume U-shape per session slot.
    season: Vec<f64>,
    clock: Clock,
    regime: Regime,
    /// Log close of the previous bar (log open of the first bar).
    x: f64,
    /// ln(start_price).
    x0: f64,
    /// Local anchor of the current regime run.
    anchor: f64,
    substeps: u32,
    long_run: f64,
    spare_normal: Option<f64>,
    /// `exp(x)` as emitted (the next open when there is no gap).
    last_close: f64,
    bars_emitted: u64,
}

impl SyntheticMarket {
    /// A market at the start of its first session; `Err(Config)` if the
    /// config does not validate.
    pub fn new(config: GeneratorConfig) -> Result<Self> {
        config.validate()?;
        let s = f64::from(config.substeps_per_bar);
        let matrix = config.transition_matrix();
        let steps = std::array::from_fn(|i| {
            let p = config.regimes[i];
            let stay = matrix[i][i];
            let mut next_cum = [0.0; 4];
            let mut acc = 0.0;
            for (j, cum) in next_cum.iter_mut().enumerate() {
                if j != i {
                    acc += matrix[i][j] / (1.0 - stay);
                }
                *cum = acc;
            }
            Step {
                stay,
                next_cum,
                drift: p.drift_per_bar / s,
                vol: p.vol_per_bar / s.sqrt(),
                var: p.vol_per_bar * p.vol_per_bar / s,
                reversion: p.reversion_per_bar / s,
            }
        });
        let n = config.bars_per_session();
        let a = config.volume_u_shape;
        let season = (0..n)
            .map(|k| {
                let phi = (k as f64 + 0.5) / n as f64;
                let u = 2.0 * phi - 1.0;
                1.0 + a * (3.0 * u * u - 1.0) / 2.0
            })
            .collect();
        let x0 = config.start_price.ln();
        Ok(Self {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            steps,
            season,
            clock: Clock::new(&config),
            regime: config.initial_regime,
            x: x0,
            x0,
            anchor: x0,
            substeps: config.substeps_per_bar,
            long_run: config.long_run_reversion_per_bar / s,
            spare_normal: None,
            last_close: config.start_price,
            bars_emitted: 0,
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &GeneratorConfig {
        &self.config
    }

    /// The regime of the last bar (the initial regime before the first).
    pub fn regime(&self) -> Regime {
        self.regime
    }

    /// Open time of the next bar.
    pub fn next_ts(&self) -> i64 {
        self.clock.ts
    }

    /// Bars generated so far.
    pub fn bars_emitted(&self) -> u64 {
        self.bars_emitted
    }

    /// A standard normal (Marsaglia's polar method; the second value of each
    /// pair is kept for the next call).
    #[inline]
    fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        loop {
            let u = 2.0 * self.rng.random::<f64>() - 1.0;
            let v = 2.0 * self.rng.random::<f64>() - 1.0;
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                let f = (-2.0 * s.ln() / s).sqrt();
                self.spare_normal = Some(v * f);
                return u * f;
            }
        }
    }

    /// `ln U` with `U` uniform on (0, 1].
    #[inline]
    fn ln_uniform(&mut self) -> f64 {
        (1.0 - self.rng.random::<f64>()).ln()
    }

    /// The next bar and the regime it was generated in.
    pub fn next_bar(&mut self) -> (Bar, Regime) {
        // Regime: the first bar keeps the initial regime.
        if self.bars_emitted > 0 {
            let step = &self.steps[self.regime.index()];
            let u: f64 = self.rng.random();
            if u >= step.stay {
                let v = (u - step.stay) / (1.0 - step.stay);
                let cur = self.regime.index();
                let next = (0..4)
                    .find(|&j| j != cur && v < step.next_cum[j])
                    .unwrap_or_else(|| (0..4).rev().find(|&j| j != cur).unwrap_or(cur));
                self.regime = Regime::ALL[next];
                self.anchor = f64::NAN; // set below, after the opening gap
            }
        }

        // Open: previous close, or a gap at a session open.
        let mut x = self.x;
        let mut open = self.last_close;
        if self.clock.slot == 0 && self.bars_emitted > 0 && self.config.session_gap_vol > 0.0 {
            let closed_days = self.clock.closed_before as f64 / DAY_SECS as f64;
            x += self.normal() * self.config.session_gap_vol * (1.0 + closed_days).sqrt();
            open = x.exp();
        }
        if self.anchor.is_nan() {
            self.anchor = x;
        }

        // Intrabar path with Brownian-bridge extremes.
        let step = self.steps[self.regime.index()];
        let jump_at = if self.rng.random::<f64>() < self.config.jump_probability_per_bar {
            self.rng.random_range(0..self.substeps)
        } else {
            u32::MAX
        };
        let (mut hi, mut lo) = (x, x);
        for k in 0..self.substeps {
            let drift =
                step.drift + step.reversion * (self.anchor - x) + self.long_run * (self.x0 - x);
            let mut nx = x + drift + step.vol * self.normal();
            let d = nx - x;
            let d2 = d * d;
            let m = x + nx;
            let up = (d2 - 2.0 * step.var * self.ln_uniform()).sqrt();
            let down = (d2 - 2.0 * step.var * self.ln_uniform()).sqrt();
            hi = hi.max(0.5 * (m + up));
            lo = lo.min(0.5 * (m - down));
            if k == jump_at {
                nx += self.normal() * self.config.jump_vol;
                hi = hi.max(nx);
                lo = lo.min(nx);
            }
            x = nx;
        }
        self.x = x;

        // Volume from the session position and the bar's range.
        let c = &self.config;
        let rho = (hi - lo) / (BROWNIAN_RANGE * c.volume_reference_vol_per_bar);
        let noise = if c.volume_noise > 0.0 {
            let eta = c.volume_noise;
            (eta * self.normal() - 0.5 * eta * eta).exp()
        } else {
            1.0
        };
        let c = &self.config;
        let volume = c.base_volume_per_bar
            * self.season[self.clock.slot as usize]
            * rho.max(0.05).powf(c.volume_vol_elasticity)
            * noise;

        let close = x.exp();
        self.last_close = close;
        let bar = Bar {
            ts: self.clock.ts,
            open,
            high: hi.exp().max(open).max(close),
            low: lo.exp().min(open).min(close),
            close,
            volume,
        };
        self.clock.advance();
        self.bars_emitted += 1;
        (bar, self.regime)
    }

    /// Appends `n` bars and their regimes.
    pub fn generate_into(&mut self, bars: &mut Vec<Bar>, regimes: &mut Vec<Regime>, n: usize) {
        bars.reserve(n);
        regimes.reserve(n);
        for _ in 0..n {
            let (b, r) = self.next_bar();
            bars.push(b);
            regimes.push(r);
        }
    }

    /// The next `n` bars and their regimes.
    pub fn generate(&mut self, n: usize) -> (Vec<Bar>, Vec<Regime>) {
        let mut bars = Vec::new();
        let mut regimes = Vec::new();
        self.generate_into(&mut bars, &mut regimes, n);
        (bars, regimes)
    }
}

impl Iterator for SyntheticMarket {
    type Item = (Bar, Regime);

    fn next(&mut self) -> Option<Self::Item> {
        Some(self.next_bar())
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (usize::MAX, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_rows_sum_to_one() {
        let c = GeneratorConfig::default();
        c.validate().unwrap();
        for row in c.transition_matrix() {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        assert_eq!(c.bars_per_session(), 288);
    }

    #[test]
    fn validate_names_key_value_and_range() {
        let mut c = GeneratorConfig::default();
        c.regimes[3].vol_per_bar = -1.0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("regimes[HighVolatility].vol_per_bar"), "{e}");
        assert!(e.contains("-1"), "{e}");

        let c = GeneratorConfig {
            session_length_secs: 1000,
            ..GeneratorConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("session_length_secs = 1000"), "{e}");

        let mut c = GeneratorConfig::default();
        c.regime_switch_weights[2] = [0.0, 0.0, 5.0, 0.0];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("regime_switch_weights[Ranging]"), "{e}");

        let c = GeneratorConfig {
            volume_u_shape: 2.0,
            ..GeneratorConfig::default()
        };
        assert!(SyntheticMarket::new(c).is_err());
    }

    #[test]
    fn clock_skips_weekends_and_starts_in_session() {
        // Friday 2024-01-05 23:50 UTC: two bars, then Monday 00:00.
        let c = GeneratorConfig {
            start_unix_secs: 1_704_498_600,
            ..GeneratorConfig::default()
        };
        let mut m = SyntheticMarket::new(c).unwrap();
        let ts: Vec<i64> = (0..3).map(|_| m.next_bar().0.ts).collect();
        assert_eq!(ts, [1_704_498_600, 1_704_498_900, 1_704_672_000]);

        // NYSE-like session 09:30 + 6.5 h; start at 16:00 → next day 09:30.
        let c = GeneratorConfig {
            start_unix_secs: 1_704_067_200 + 16 * 3600,
            session_start_secs: 34_200,
            session_length_secs: 23_400,
            ..GeneratorConfig::default()
        };
        let mut m = SyntheticMarket::new(c).unwrap();
        let (bars, _) = m.generate(79);
        assert_eq!(bars[0].ts, 1_704_067_200 + 86_400 + 34_200);
        assert_eq!(bars[77].ts, bars[0].ts + 77 * 300);
        assert_eq!(bars[78].ts, bars[0].ts + 86_400, "next session");
    }
}
