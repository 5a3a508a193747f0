//! Tests of the tactical (5-minute FVG / momentum / volume) and regime
//! feature computers: incremental = naive reference bar by bar, no
//! look-ahead, hand-built fair-value gaps, finite outputs on extreme input,
//! and regime statistics that separate the regimes they are meant to.

use gm_market::features::regime::{RegimeConfig, RegimeFeatures, REGIME_DIM};
use gm_market::features::tactical::{
    GapSide, TacticalConfig, TacticalFeatures, TACTICAL_DIM, TACTICAL_FEATURE_NAMES,
};
use gm_market::Bar;
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// A deterministic synthetic series (independent of the crate's generator).

/// splitmix64: small, deterministic, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// Builds a bar around `open → close` with wicks of relative size `wick`.
fn make_bar(i: usize, open: f64, close: f64, wick_hi: f64, wick_lo: f64, volume: f64) -> Bar {
    Bar {
        ts: 1_700_000_000 + 300 * i as i64,
        open,
        high: open.max(close) * (1.0 + wick_hi),
        low: open.min(close) * (1.0 - wick_lo),
        close,
        volume,
    }
}

/// A random walk (per-bar log-return sd `sigma`, drift `drift`), whose
/// opens gap away from the previous close now and then (which creates
/// fair-value gaps), with log-normal volume and occasional zero volume.
fn walk(seed: u64, n: usize, drift: f64, sigma: f64) -> Vec<Bar> {
    let mut rng = Rng(seed);
    let mut prev = 100.0;
    (0..n)
        .map(|i| {
            let open = if rng.uniform() < 0.08 {
                let sign = if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
                prev * (1.0 + sign * sigma * (3.0 + 3.0 * rng.uniform()))
            } else {
                prev
            };
            let close = open * (drift + sigma * rng.normal()).exp();
            let volume = if rng.uniform() < 0.03 {
                0.0
            } else {
                1000.0 * (0.5 * rng.normal()).exp()
            };
            let wh = 0.5 * sigma * rng.normal().abs();
            let wl = 0.5 * sigma * rng.normal().abs();
            prev = close;
            make_bar(i, open, close, wh, wl, volume)
        })
        .collect()
}

/// Bars whose log returns follow an AR(1) with coefficient `phi`.
fn ar1(seed: u64, n: usize, phi: f64, sigma: f64) -> Vec<Bar> {
    let mut rng = Rng(seed);
    let (mut prev, mut r) = (100.0, 0.0);
    (0..n)
        .map(|i| {
            r = phi * r + sigma * rng.normal();
            let close = prev * f64::exp(r);
            let b = make_bar(i, prev, close, 0.2 * sigma, 0.2 * sigma, 1000.0);
            prev = close;
            b
        })
        .collect()
}

/// Bars whose log price is pulled back to ln 100 (an Ornstein–Uhlenbeck
/// process: mean-reverting, no trend).
fn mean_reverting(seed: u64, n: usize, pull: f64, sigma: f64) -> Vec<Bar> {
    let mut rng = Rng(seed);
    let mut x: f64 = 100f64.ln();
    let mut prev = 100.0;
    (0..n)
        .map(|i| {
            x += pull * (100f64.ln() - x) + sigma * rng.normal();
            let close = x.exp();
            let b = make_bar(i, prev, close, 0.2 * sigma, 0.2 * sigma, 1000.0);
            prev = close;
            b
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Helpers.

fn near(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

fn assert_rows_eq<const N: usize>(what: &str, t: usize, a: Option<[f64; N]>, b: Option<[f64; N]>) {
    match (a, b) {
        (None, None) => {}
        (Some(a), Some(b)) => {
            for k in 0..N {
                assert!(
                    near(a[k], b[k]),
                    "{what}: bar {t}, column {k}: incremental {} vs reference {}",
                    a[k],
                    b[k]
                );
            }
        }
        _ => panic!("{what}: bar {t}: readiness differs: {a:?} vs {b:?}"),
    }
}

fn tactical_rows(cfg: TacticalConfig, bars: &[Bar]) -> Vec<Option<[f64; TACTICAL_DIM]>> {
    let mut f = TacticalFeatures::new(cfg).unwrap();
    bars.iter().map(|b| f.push(b).unwrap()).collect()
}

fn regime_rows(cfg: RegimeConfig, bars: &[Bar]) -> Vec<Option<[f64; REGIME_DIM]>> {
    let mut f = RegimeFeatures::new(cfg).unwrap();
    bars.iter().map(|b| f.push(b).unwrap()).collect()
}

/// Mean of column `k` over the ready rows.
fn col_mean<const N: usize>(rows: &[Option<[f64; N]>], k: usize) -> f64 {
    let v: Vec<f64> = rows.iter().flatten().map(|r| r[k]).collect();
    assert!(!v.is_empty());
    v.iter().sum::<f64>() / v.len() as f64
}

/// Small warm-up (3 bars) so that hand-built tests see every row.
fn hand_cfg() -> TacticalConfig {
    TacticalConfig {
        momentum_lag_bars: 1,
        volume_window_bars: 2,
        ..TacticalConfig::default()
    }
}

fn hl(i: usize, high: f64, low: f64, close: f64) -> Bar {
    Bar {
        ts: 300 * i as i64,
        open: close,
        high,
        low,
        close,
        volume: 10.0,
    }
}

const FVG_BULL: usize = 0;
const FVG_BEAR: usize = 1;
const LEVEL: usize = 2;
const MITIGATED: usize = 3;
const MOMENTUM: usize = 4;
const VOLUME_RATIO: usize = 5;
const GAP_PCT: usize = 6;

// ---------------------------------------------------------------------------
// Incremental = reference, and no look-ahead.

fn tactical_configs() -> Vec<TacticalConfig> {
    vec![
        TacticalConfig::default(),
        // Small bounds: eviction and expiry happen all the time; partial
        // mitigation and a size filter.
        TacticalConfig {
            max_active_gaps: 3,
            max_gap_age_bars: 25,
            mitigation_fill_fraction: 0.5,
            min_gap_pct: 0.05,
            momentum_lag_bars: 7,
            volume_window_bars: 4,
        },
    ]
}

#[test]
fn tactical_incremental_equals_reference_bar_by_bar() {
    for (c, cfg) in tactical_configs().into_iter().enumerate() {
        let bars = walk(7 + c as u64, 700, 0.0, 0.004);
        let mut f = TacticalFeatures::new(cfg).unwrap();
        let (mut signals, mut bull, mut bear, mut max_active) = (0, 0, 0, 0);
        for t in 0..bars.len() {
            let inc = f.push(&bars[t]).unwrap();
            let reference = TacticalFeatures::from_history(&cfg, &bars[..=t]).unwrap();
            assert_rows_eq("tactical", t, inc, reference);
            assert_eq!(inc.is_some(), t + 1 >= cfg.warmup_bars());
            max_active = max_active.max(f.active_gaps().len());
            if let Some(r) = inc {
                signals += r[MITIGATED] as usize;
                bull += r[FVG_BULL] as usize;
                bear += r[FVG_BEAR] as usize;
            }
        }
        // The series exercises what it is meant to.
        assert!(signals > 10, "config {c}: {signals} mitigations");
        assert!(bull > 50 && bear > 50, "config {c}: {bull} / {bear}");
        assert!(max_active <= cfg.max_active_gaps);
        if c == 1 {
            assert_eq!(max_active, cfg.max_active_gaps, "eviction was exercised");
        }
    }
}

#[test]
fn regime_incremental_equals_reference_bar_by_bar() {
    let configs = [
        RegimeConfig::default(),
        RegimeConfig {
            short_window_bars: 5,
            long_window_bars: 20,
            variance_ratio_lag_bars: 3,
        },
    ];
    for (c, cfg) in configs.into_iter().enumerate() {
        let bars = walk(11 + c as u64, 400, 0.0002, 0.004);
        let mut f = RegimeFeatures::new(cfg).unwrap();
        for t in 0..bars.len() {
            let inc = f.push(&bars[t]).unwrap();
            let reference = RegimeFeatures::from_history(&cfg, &bars[..=t]).unwrap();
            assert_rows_eq("regime", t, inc, reference);
            assert_eq!(inc.is_some(), t + 1 >= cfg.warmup_bars());
        }
    }
}

#[test]
fn changing_a_future_bar_never_changes_past_rows() {
    let bars = walk(3, 500, 0.0, 0.004);
    let tac_cfg = TacticalConfig::default();
    let reg_cfg = RegimeConfig::default();
    let tac = tactical_rows(tac_cfg, &bars);
    let reg = regime_rows(reg_cfg, &bars);
    for k in [0, 2, 19, 20, 48, 49, 123, 499] {
        let mut changed = bars.clone();
        let b = &mut changed[k];
        // A wild but valid bar: a 40 % gap down on huge volume.
        let s = 0.6;
        *b = Bar {
            open: b.open * s,
            high: b.high * s * 1.1,
            low: b.low * s * 0.9,
            close: b.close * s,
            volume: b.volume * 50.0 + 1.0,
            ..*b
        };
        let tac2 = tactical_rows(tac_cfg, &changed);
        let reg2 = regime_rows(reg_cfg, &changed);
        assert_eq!(tac[..k], tac2[..k], "tactical rows before bar {k} changed");
        assert_eq!(reg[..k], reg2[..k], "regime rows before bar {k} changed");
        // And the change is visible from bar k on (once warmed up).
        if k >= 49 {
            assert_ne!(tac[k], tac2[k]);
            assert_ne!(reg[k], reg2[k]);
        }
    }
}

// ---------------------------------------------------------------------------
// Fair-value gaps on hand-built bars.

#[test]
fn bullish_gap_detected_filled_and_mitigated_once() {
    let mut f = TacticalFeatures::new(hand_cfg()).unwrap();
    assert_eq!(f.push(&hl(0, 101.0, 99.0, 100.0)).unwrap(), None);
    assert_eq!(f.push(&hl(1, 104.0, 100.0, 103.0)).unwrap(), None);
    // low[2] = 103 > high[0] = 101: bullish gap [101, 103] formed at bar 2.
    let r = f.push(&hl(2, 106.0, 103.0, 105.0)).unwrap().unwrap();
    let g = *f.active_gaps().next().unwrap();
    assert_eq!(g.side, GapSide::Bullish);
    assert_eq!(
        (g.formed_at, g.bottom, g.top, g.near_edge),
        (2, 101.0, 103.0, 103.0)
    );
    assert_eq!(r[FVG_BULL], 1.0);
    assert_eq!(r[FVG_BEAR], 0.0);
    assert_eq!(r[LEVEL], 103.0, "near edge = top of the gap");
    assert_eq!(r[MITIGATED], 0.0);
    assert!((r[GAP_PCT] - 2.0 / 105.0 * 100.0).abs() < 1e-12);
    // Price moves away: the gap stays active, unchanged.
    let r = f.push(&hl(3, 108.0, 104.0, 107.0)).unwrap().unwrap();
    assert_eq!((r[FVG_BULL], r[LEVEL], r[MITIGATED]), (1.0, 103.0, 0.0));
    // Price trades halfway into it: partially filled, still active.
    let r = f.push(&hl(4, 106.0, 102.0, 102.5)).unwrap().unwrap();
    assert_eq!((r[FVG_BULL], r[LEVEL], r[MITIGATED]), (1.0, 102.0, 0.0));
    assert!((r[GAP_PCT] - 1.0 / 102.5 * 100.0).abs() < 1e-12);
    // Through the bottom: mitigated on this bar, and the signal fires.
    let r = f.push(&hl(5, 104.0, 100.5, 101.5)).unwrap().unwrap();
    assert_eq!((r[FVG_BULL], r[MITIGATED]), (0.0, 1.0));
    assert_eq!(r[LEVEL], 101.5, "no gap: level = close");
    assert_eq!(r[GAP_PCT], 0.0);
    assert_eq!(f.active_gaps().len(), 0);
    // Trading through the old gap again fires nothing.
    for i in 6..10 {
        let r = f.push(&hl(i, 104.0, 100.5, 101.5)).unwrap().unwrap();
        assert_eq!((r[FVG_BULL], r[FVG_BEAR], r[MITIGATED]), (0.0, 0.0, 0.0));
    }
}

#[test]
fn bearish_gap_detected_filled_and_mitigated_once() {
    let mut f = TacticalFeatures::new(hand_cfg()).unwrap();
    f.push(&hl(0, 101.0, 99.0, 100.0)).unwrap();
    f.push(&hl(1, 100.0, 96.0, 97.0)).unwrap();
    // high[2] = 97 < low[0] = 99: bearish gap [97, 99] formed at bar 2.
    let r = f.push(&hl(2, 97.0, 94.0, 95.0)).unwrap().unwrap();
    let g = *f.active_gaps().next().unwrap();
    assert_eq!(g.side, GapSide::Bearish);
    assert_eq!(
        (g.formed_at, g.bottom, g.top, g.near_edge),
        (2, 97.0, 99.0, 97.0)
    );
    assert_eq!((r[FVG_BULL], r[FVG_BEAR], r[MITIGATED]), (0.0, 1.0, 0.0));
    assert_eq!(r[LEVEL], 97.0, "near edge = bottom of the gap");
    assert!((r[GAP_PCT] - 2.0 / 95.0 * 100.0).abs() < 1e-12);
    // Partially filled up to 98.5.
    let r = f.push(&hl(3, 98.5, 95.0, 98.0)).unwrap().unwrap();
    assert_eq!((r[FVG_BEAR], r[LEVEL], r[MITIGATED]), (1.0, 98.5, 0.0));
    assert!((r[GAP_PCT] - 0.5 / 98.0 * 100.0).abs() < 1e-12);
    // Exactly reaching the top mitigates (high >= top).
    let r = f.push(&hl(4, 99.0, 96.5, 98.0)).unwrap().unwrap();
    assert_eq!((r[FVG_BEAR], r[MITIGATED]), (0.0, 1.0));
    let r = f.push(&hl(5, 99.5, 96.5, 98.0)).unwrap().unwrap();
    assert_eq!(r[MITIGATED], 0.0, "the signal fires once");
}

#[test]
fn nearest_gap_wins_and_gaps_from_the_warmup_are_kept() {
    // Default config: the first row is bar 19, but the gaps formed at bars
    // 2 (bullish, far below) and 6 (bullish, nearer) are already known.
    let mut bars = vec![
        hl(0, 10.5, 9.5, 10.0),
        hl(1, 12.5, 10.0, 11.5),
        hl(2, 14.0, 12.0, 13.5), // gap [10.5, 12]
        hl(3, 14.0, 12.5, 13.5),
        hl(4, 15.0, 14.0, 14.5),
        hl(5, 16.0, 14.0, 15.5),
        hl(6, 18.0, 16.0, 17.5), // gap [15, 16]
    ];
    for i in 7..20 {
        bars.push(hl(i, 18.0, 16.0, 17.5));
    }
    let mut f = TacticalFeatures::new(TacticalConfig::default()).unwrap();
    let rows: Vec<_> = bars.iter().map(|b| f.push(b).unwrap()).collect();
    assert!(rows[..19].iter().all(Option::is_none));
    let r = rows[19].unwrap();
    let sides: Vec<_> = f.active_gaps().map(|g| (g.formed_at, g.side)).collect();
    assert_eq!(sides, vec![(2, GapSide::Bullish), (6, GapSide::Bullish)]);
    assert_eq!(r[FVG_BULL], 1.0);
    assert_eq!(r[LEVEL], 16.0, "the nearer gap's top");
    assert!((r[GAP_PCT] - 1.0 / 17.5 * 100.0).abs() < 1e-12);
}

#[test]
fn momentum_and_volume_ratio_by_hand() {
    let cfg = TacticalConfig {
        momentum_lag_bars: 2,
        volume_window_bars: 4,
        ..TacticalConfig::default()
    };
    let closes = [100.0, 100.0, 100.0, 104.0, 110.0, 99.0];
    let vols = [0.0, 0.0, 0.0, 0.0, 6.0, 2.0];
    let mut f = TacticalFeatures::new(cfg).unwrap();
    let rows: Vec<_> = closes
        .iter()
        .zip(vols)
        .enumerate()
        .map(|(i, (&c, v))| {
            f.push(&Bar {
                volume: v,
                ..hl(i, c + 0.5, c - 0.5, c)
            })
            .unwrap()
        })
        .collect();
    let r3 = rows[3].unwrap();
    assert!((r3[MOMENTUM] - 4.0).abs() < 1e-12);
    assert_eq!(r3[VOLUME_RATIO], 1.0, "all-zero volume window: neutral 1");
    let r4 = rows[4].unwrap();
    assert!((r4[MOMENTUM] - 10.0).abs() < 1e-12);
    assert_eq!(r4[VOLUME_RATIO], 4.0, "6 / mean(0, 0, 0, 6)");
    let r5 = rows[5].unwrap();
    assert!((r5[MOMENTUM] - (99.0 / 104.0 - 1.0) * 100.0).abs() < 1e-12);
    assert_eq!(r5[VOLUME_RATIO], 1.0, "2 / mean(0, 0, 6, 2)");
}

// ---------------------------------------------------------------------------
// Finite outputs, whatever the input.

/// One bar of an extreme series: the previous close times `exp(jump)`,
/// clamped into [1e-300, 1e300], with wicks and a volume from a set of
/// extremes.
fn extreme_bars(steps: &[(f64, f64, f64, u8)]) -> Vec<Bar> {
    let mut prev: f64 = 100.0;
    steps
        .iter()
        .enumerate()
        .map(|(i, &(jump, wick_hi, wick_lo, v))| {
            let close = (prev * jump.exp()).clamp(1e-300, 1e300);
            let volume = [0.0, 1e-300, 1.0, 1e300, f64::MAX][v as usize % 5];
            let b = Bar {
                ts: i as i64,
                open: prev,
                high: (prev.max(close) * (1.0 + wick_hi)).min(f64::MAX),
                low: prev.min(close) * (1.0 - wick_lo),
                close,
                volume,
            };
            prev = close;
            b
        })
        .collect()
}

fn check_tactical_row(cfg: &TacticalConfig, r: &[f64; TACTICAL_DIM]) {
    for (k, x) in r.iter().enumerate() {
        assert!(x.is_finite(), "{} = {x}", TACTICAL_FEATURE_NAMES[k]);
    }
    for k in [FVG_BULL, FVG_BEAR, MITIGATED] {
        assert!(r[k] == 0.0 || r[k] == 1.0);
    }
    assert!((0.0..=cfg.volume_window_bars as f64).contains(&r[VOLUME_RATIO]));
    assert!(r[GAP_PCT] >= 0.0);
}

fn check_regime_row(cfg: &RegimeConfig, r: &[f64; REGIME_DIM]) {
    assert!(r.iter().all(|x| x.is_finite()), "{r:?}");
    let w = cfg.long_window_bars as f64;
    assert!(r[0] >= 0.0 && r[1] >= 0.0);
    assert!((-1.0..=1.0).contains(&r[2]) && (-1.0..=1.0).contains(&r[3]));
    assert!(r[4].abs() <= (w - 1.0).sqrt());
    assert!((0.0..=w).contains(&r[5]));
    assert!((-100.0..=0.0).contains(&r[6]));
    assert!((0.0..=1.0).contains(&r[7]));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn outputs_are_finite_and_in_range_on_extreme_series(
        steps in prop::collection::vec(
            (
                prop_oneof![Just(0.0), -0.01..0.01f64, -300.0..300.0f64],
                prop_oneof![Just(0.0), 0.0..0.5f64],
                prop_oneof![Just(0.0), 0.0..0.99f64],
                any::<u8>(),
            ),
            60..160,
        )
    ) {
        let bars = extreme_bars(&steps);
        let tc = TacticalConfig { volume_window_bars: 5, max_active_gaps: 4, ..TacticalConfig::default() };
        let rc = RegimeConfig { short_window_bars: 4, long_window_bars: 16, variance_ratio_lag_bars: 2 };
        let mut tf = TacticalFeatures::new(tc).unwrap();
        let mut rf = RegimeFeatures::new(rc).unwrap();
        for b in &bars {
            prop_assert!(b.is_valid(), "{b:?}");
            if let Some(r) = tf.push(b).unwrap() {
                check_tactical_row(&tc, &r);
            }
            if let Some(r) = rf.push(b).unwrap() {
                check_regime_row(&rc, &r);
            }
        }
    }
}

#[test]
fn flat_prices_and_zero_volume_give_neutral_values() {
    let bars: Vec<Bar> = (0..100)
        .map(|i| Bar {
            volume: 0.0,
            ..hl(i, 100.0, 100.0, 100.0)
        })
        .collect();
    let t = tactical_rows(TacticalConfig::default(), &bars);
    let r = t[99].unwrap();
    assert_eq!(r, [0.0, 0.0, 100.0, 0.0, 0.0, 1.0, 0.0]);
    let g = regime_rows(RegimeConfig::default(), &bars);
    let r = g[99].unwrap();
    assert_eq!(r, [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.5]);
}

#[test]
fn invalid_bars_are_errors_and_change_nothing() {
    let bars = walk(5, 200, 0.0, 0.004);
    let b = bars[100];
    let poisoned = [
        Bar {
            close: f64::NAN,
            ..b
        },
        Bar {
            low: f64::INFINITY,
            ..b
        },
        Bar {
            high: f64::NEG_INFINITY,
            ..b
        },
        Bar {
            open: f64::NAN,
            ..b
        },
        Bar {
            volume: f64::NAN,
            ..b
        },
        Bar { volume: -5.0, ..b },
        Bar { low: 0.0, ..b },
        Bar {
            high: b.low * 0.5,
            ..b
        },
    ];
    let (tc, rc) = (TacticalConfig::default(), RegimeConfig::default());
    let (mut tf, mut rf) = (
        TacticalFeatures::new(tc).unwrap(),
        RegimeFeatures::new(rc).unwrap(),
    );
    let (clean_t, clean_r) = (tactical_rows(tc, &bars), regime_rows(rc, &bars));
    for (t, bar) in bars.iter().enumerate() {
        // Every 10th bar, the bad bars come first: each one is rejected.
        if t % 10 == 0 {
            for p in &poisoned {
                assert!(!p.is_valid());
                assert!(tf.push(p).is_err(), "{p:?}");
                assert!(rf.push(p).is_err(), "{p:?}");
            }
        }
        assert_eq!(tf.push(bar).unwrap(), clean_t[t], "tactical row {t}");
        assert_eq!(rf.push(bar).unwrap(), clean_r[t], "regime row {t}");
    }
    assert_eq!(tf.bars_seen(), 200);
    assert_eq!(rf.bars_seen(), 200);
    // The references reject a slice with a bad bar.
    let mut bad = bars.clone();
    bad[3] = poisoned[0];
    assert!(TacticalFeatures::from_history(&tc, &bad).is_err());
    assert!(RegimeFeatures::from_history(&rc, &bad).is_err());
}

// ---------------------------------------------------------------------------
// Regime statistics separate the regimes.

const RV_SHORT: usize = 0;
const RV_LONG: usize = 1;
const TREND: usize = 2;
const AUTOCORR: usize = 3;
const VOL_Z: usize = 4;
const RANGE_X: usize = 5;
const DRAWDOWN: usize = 6;
const HURST: usize = 7;

#[test]
fn trending_series_has_higher_trend_strength_than_mean_reverting() {
    let cfg = RegimeConfig::default();
    let up = regime_rows(cfg, &walk(21, 600, 0.002, 0.003));
    let down = regime_rows(cfg, &walk(22, 600, -0.002, 0.003));
    let ranging = regime_rows(cfg, &mean_reverting(23, 600, 0.3, 0.003));
    let (u, d) = (col_mean(&up, TREND), col_mean(&down, TREND));
    let strength: Vec<f64> = ranging.iter().flatten().map(|r| r[TREND].abs()).collect();
    let m = strength.iter().sum::<f64>() / strength.len() as f64;
    assert!(u > 0.3 && d < -0.3, "up {u}, down {d}");
    assert!(u > 3.0 * m && -d > 3.0 * m, "ranging strength {m}");
    // Price sits near its high in the up-trend, well below it in the down-trend.
    assert!(col_mean(&up, DRAWDOWN) > col_mean(&down, DRAWDOWN) + 5.0);
}

#[test]
fn high_volatility_series_has_higher_realized_vol() {
    let cfg = RegimeConfig::default();
    let calm = regime_rows(cfg, &walk(31, 400, 0.0, 0.002));
    let wild = regime_rows(cfg, &walk(31, 400, 0.0, 0.02));
    for k in [RV_SHORT, RV_LONG] {
        let (c, w) = (col_mean(&calm, k), col_mean(&wild, k));
        assert!(w > 5.0 * c, "column {k}: calm {c}, wild {w}");
    }
    // The onset of volatility: the short window reacts first.
    let mut bars = walk(32, 200, 0.0, 0.002);
    let s = bars[199].close / 100.0;
    bars.extend(walk(33, 12, 0.0, 0.02).into_iter().map(|b| Bar {
        open: b.open * s,
        high: b.high * s,
        low: b.low * s,
        close: b.close * s,
        ..b
    }));
    let r = regime_rows(cfg, &bars).last().copied().flatten().unwrap();
    assert!(r[RV_SHORT] > 1.5 * r[RV_LONG], "{r:?}");
}

#[test]
fn momentum_and_mean_reversion_show_in_autocorr_and_hurst() {
    let cfg = RegimeConfig::default();
    let momentum = regime_rows(cfg, &ar1(41, 800, 0.6, 0.003));
    let reverting = regime_rows(cfg, &ar1(41, 800, -0.6, 0.003));
    let random = regime_rows(cfg, &ar1(41, 800, 0.0, 0.003));
    let (am, ar, a0) = (
        col_mean(&momentum, AUTOCORR),
        col_mean(&reverting, AUTOCORR),
        col_mean(&random, AUTOCORR),
    );
    assert!(am > 0.3 && ar < -0.3 && a0.abs() < 0.15, "{am} {ar} {a0}");
    let (hm, hr, h0) = (
        col_mean(&momentum, HURST),
        col_mean(&reverting, HURST),
        col_mean(&random, HURST),
    );
    assert!(hm > 0.6 && hr < 0.3, "{hm} {hr}");
    assert!((0.35..0.55).contains(&h0), "random walk: {h0}");
}

#[test]
fn volume_spike_range_shock_and_drawdown() {
    let cfg = RegimeConfig::default();
    let mut bars = walk(51, 100, 0.0, 0.002);
    let last = *bars.last().unwrap();
    // A bar that falls 10 % below the window's high on 30× volume.
    let peak = bars[bars.len() + 1 - 48..]
        .iter()
        .map(|b| b.high)
        .fold(0.0, f64::max);
    let close = peak * 0.9;
    bars.push(Bar {
        ts: last.ts + 300,
        open: last.close,
        high: last.close.max(close),
        low: close,
        close,
        volume: 30_000.0,
    });
    let r = regime_rows(cfg, &bars).last().copied().flatten().unwrap();
    assert!(r[VOL_Z] > 5.0, "{r:?}");
    assert!(r[RANGE_X] > 5.0, "{r:?}");
    assert!((r[DRAWDOWN] + 10.0).abs() < 1e-9, "{r:?}");
}
