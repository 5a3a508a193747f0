//! Tests of the structure (30-minute) and LVN (5-minute) feature computers:
//! incremental output equals the slow `from_history` reference bit for bit
//! on every bar, future bars never change past rows, warm-up is exact, the
//! formulas hold on series with known answers, and nothing non-finite leaks
//! out of extreme inputs.

use gm_market::features::lvn::{
    LvnConfig, LvnFeatures, VolumeProfile, VolumeProfileConfig, NO_LVN_VECTOR,
};
use gm_market::features::structure::{StructureConfig, StructureFeatures};
use gm_market::{Bar, Error};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A deterministic random walk: log-normal moves, wicks, log-normal volume,
/// and now and then a weekend gap in `ts`, a price gap at the open, a flat
/// bar or a zero-volume bar.
fn walk(seed: u64, n: usize, start: f64, step_secs: i64) -> Vec<Bar> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let gauss = move |rng: &mut ChaCha8Rng| -> f64 {
        let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    };
    let mut ts = 1_700_000_000 - 1_700_000_000 % step_secs;
    let mut close = start;
    let mut bars = Vec::with_capacity(n);
    for _ in 0..n {
        ts += step_secs;
        if rng.random::<f64>() < 0.02 {
            ts += 2 * 86_400;
        }
        let bar = if rng.random::<f64>() < 0.04 {
            Bar {
                ts,
                open: close,
                high: close,
                low: close,
                close,
                volume: 10.0,
            }
        } else {
            let open = if rng.random::<f64>() < 0.03 {
                close * (0.01 * gauss(&mut rng)).exp()
            } else {
                close
            };
            let c = open * (0.003 * gauss(&mut rng)).exp();
            let high = open.max(c) * (1.0 + 0.001 * gauss(&mut rng).abs());
            let low = open.min(c) * (1.0 - 0.001 * gauss(&mut rng).abs());
            let volume = if rng.random::<f64>() < 0.03 {
                0.0
            } else {
                1000.0 * (0.5 * gauss(&mut rng)).exp()
            };
            Bar {
                ts,
                open,
                high,
                low,
                close: c,
                volume,
            }
        };
        assert!(bar.is_valid(), "{bar:?}");
        close = bar.close;
        bars.push(bar);
    }
    bars
}

/// Small windows so that every part (kNN memory eviction included) is
/// exercised within a few hundred bars.
fn small_cfg() -> StructureConfig {
    StructureConfig {
        rsi_fast_bars: 3,
        rsi_slow_bars: 7,
        rsi_smooth_bars: 4,
        knn_neighbors: 5,
        knn_memory_samples: 30,
        signal_bars: 3,
        nw_bandwidth_bars: 3.0,
        nw_relative_weight: 2.0,
        nw_max_lag_bars: 6,
        profile: VolumeProfileConfig {
            window_bars: 20,
            rows: 12,
            max_node_fraction: 0.6,
        },
    }
}

fn bits<const N: usize>(row: Option<[f64; N]>) -> Option<[u64; N]> {
    row.map(|r| r.map(f64::to_bits))
}

fn stream(cfg: StructureConfig, bars: &[Bar]) -> Vec<Option<[f64; 8]>> {
    let mut f = StructureFeatures::new(cfg).expect("config");
    bars.iter().map(|b| f.push(b).expect("valid bar")).collect()
}

fn lvn_stream(cfg: LvnConfig, bars: &[Bar]) -> Vec<Option<[f64; 5]>> {
    let mut f = LvnFeatures::new(cfg).expect("config");
    bars.iter().map(|b| f.push(b).expect("valid bar")).collect()
}

/// None before `warmup`, Some from then on.
fn assert_warmup<T: std::fmt::Debug>(rows: &[Option<T>], warmup: usize) {
    for (t, r) in rows.iter().enumerate() {
        assert_eq!(
            r.is_some(),
            t + 1 >= warmup,
            "bar {t}: warm-up is {warmup} bars"
        );
    }
}

#[test]
fn structure_incremental_equals_from_history_on_every_bar() {
    let cfg = small_cfg();
    for seed in [1, 2] {
        let bars = walk(seed, 900, 100.0, 1800);
        let rows = stream(cfg, &bars);
        assert_warmup(&rows, cfg.warmup_bars());
        for t in 0..bars.len() {
            let reference = StructureFeatures::from_history(&cfg, &bars[..=t]).expect("history");
            assert_eq!(bits(rows[t]), bits(reference), "seed {seed}, bar {t}");
        }
        // The memory (30 samples) was overwritten many times over.
        assert!(bars.len() > cfg.warmup_bars() + 20 * cfg.knn_memory_samples);
    }
}

#[test]
fn structure_defaults_equal_from_history_around_every_boundary() {
    let cfg = StructureConfig::default();
    let w = cfg.warmup_bars();
    assert_eq!(w, 259);
    // The kNN memory (2000) fills at bar 39 + 2000 and is evicted after.
    let bars = walk(7, 2_200, 4_500.0, 1800);
    let rows = stream(cfg, &bars);
    assert_warmup(&rows, w);
    let mut checks: Vec<usize> = vec![0, 26, 27, 99, 238, 239, 240];
    checks.extend(w - 3..w + 3);
    checks.extend(2_036..2_044);
    checks.extend((0..bars.len()).step_by(211));
    checks.extend(bars.len() - 3..bars.len());
    for t in checks {
        let reference = StructureFeatures::from_history(&cfg, &bars[..=t]).expect("history");
        assert_eq!(bits(rows[t]), bits(reference), "bar {t}");
    }
    // The comparison is not vacuous: the vote moves and nodes are found.
    let ready: Vec<[f64; 8]> = rows.iter().flatten().copied().collect();
    let mut votes: Vec<i64> = ready.iter().map(|r| r[0] as i64).collect();
    votes.sort_unstable();
    votes.dedup();
    assert!(votes.len() > 20, "{votes:?}");
    assert!(ready.iter().filter(|r| r[5] > 0.0).count() > ready.len() / 4);
    // Sanity of the raw ranges on a real-looking walk.
    let k = cfg.knn_neighbors as f64;
    for r in rows.iter().flatten() {
        assert!(r[0].fract() == 0.0 && r[0].abs() <= k, "{r:?}");
        assert!(r[1].abs() <= k);
        assert!((0.0..=100.0).contains(&r[5]));
        assert!(
            r[5] == 0.0 || r[5] >= 50.0,
            "a real node is at most half the POC"
        );
        assert!((r[6].hypot(r[7]) - 1.0).abs() < 1e-12);
    }
}

#[test]
fn lvn_incremental_equals_from_history_on_every_bar() {
    let small = LvnConfig {
        profile: VolumeProfileConfig {
            window_bars: 25,
            rows: 10,
            max_node_fraction: 0.5,
        },
        distance_cap_points: 2.0,
    };
    let bars = walk(3, 700, 100.0, 300);
    let rows = lvn_stream(small, &bars);
    assert_warmup(&rows, small.warmup_bars());
    for t in 0..bars.len() {
        let reference = LvnFeatures::from_history(&small, &bars[..=t]).expect("history");
        assert_eq!(bits(rows[t]), bits(reference), "bar {t}");
    }
    assert!(
        rows.iter().flatten().any(|r| r[0] > 0.0),
        "some node was found"
    );

    let cfg = LvnConfig::default();
    let bars = walk(4, 1_500, 4_500.0, 300);
    let rows = lvn_stream(cfg, &bars);
    assert_warmup(&rows, 600);
    for t in (0..bars.len()).step_by(37).chain([598, 599, 600, 1_499]) {
        let reference = LvnFeatures::from_history(&cfg, &bars[..=t]).expect("history");
        assert_eq!(bits(rows[t]), bits(reference), "bar {t}");
    }
}

#[test]
fn future_bars_never_change_past_rows() {
    let cfg = small_cfg();
    let lvn_cfg = LvnConfig {
        profile: cfg.profile,
        distance_cap_points: 1.0,
    };
    let original = walk(11, 400, 100.0, 1800);
    let cut = 250;
    let mut changed = original.clone();
    // Replace everything after the cut by another walk, with a 1000× jump.
    for (b, o) in changed[cut + 1..]
        .iter_mut()
        .zip(walk(12, 400, 100_000.0, 1800))
    {
        *b = Bar { ts: b.ts, ..o };
    }
    let (a, b) = (stream(cfg, &original), stream(cfg, &changed));
    assert_eq!(bits(a[cut]), bits(b[cut]));
    for t in 0..=cut {
        assert_eq!(bits(a[t]), bits(b[t]), "structure bar {t}");
    }
    assert_ne!(a[cut + 1..], b[cut + 1..], "the change does matter later");
    let (a, b) = (
        lvn_stream(lvn_cfg, &original),
        lvn_stream(lvn_cfg, &changed),
    );
    for t in 0..=cut {
        assert_eq!(bits(a[t]), bits(b[t]), "lvn bar {t}");
    }
    assert_ne!(a[cut + 1..], b[cut + 1..]);
}

/// A bar trading in `[low, high]`, closing at `close`.
fn range_bar(ts: i64, low: f64, high: f64, close: f64, volume: f64) -> Bar {
    Bar {
        ts,
        open: close,
        high,
        low,
        close,
        volume,
    }
}

#[test]
fn lvn_vector_sits_in_a_price_gap() {
    // 5 bars in [100, 101], then 5 in [104, 105]; 10 rows of 0.5: rows 2..=7
    // ([101, 104]) are empty → one node at 102.5 with strength 100.
    let cfg = LvnConfig {
        profile: VolumeProfileConfig {
            window_bars: 10,
            rows: 10,
            max_node_fraction: 0.5,
        },
        distance_cap_points: 50.0,
    };
    let mut bars: Vec<Bar> = (0..5)
        .map(|i| range_bar(i * 300, 100.0, 101.0, 100.5, 1000.0))
        .collect();
    bars.extend((5..10).map(|i| range_bar(i * 300, 104.0, 105.0, 104.5, 1000.0)));
    let rows = lvn_stream(cfg, &bars);
    let v = rows[9].expect("window full");
    let d: f64 = 104.5 - 102.5;
    assert_eq!(v[0], 1.0);
    assert_eq!(v[1], d / 50.0);
    assert_eq!(v[2], d / 104.5);
    assert_eq!(v[3], 1.0);
    assert_eq!(v[4], 1.0 - d / 50.0);

    let mut profile = VolumeProfile::new(cfg.profile).expect("config");
    for b in &bars {
        profile.push(b).expect("valid");
    }
    let node = profile.nearest_lvn(104.5).expect("a node");
    assert_eq!((node.low, node.high, node.price), (101.0, 104.0, 102.5));

    // The same bars through the structure features: columns 4 and 5.
    let s_cfg = StructureConfig {
        profile: cfg.profile,
        ..small_cfg()
    };
    let mut padded: Vec<Bar> = (0..40)
        .map(|i| range_bar(-40 * 300 + i * 300, 102.0, 103.0, 102.5, 1.0))
        .collect();
    padded.extend(&bars);
    let row = stream(s_cfg, &padded)
        .last()
        .copied()
        .flatten()
        .expect("ready");
    assert_eq!((row[4], row[5]), (d, 100.0));
}

#[test]
fn no_lvn_gives_the_documented_neutral_values() {
    // One flat price: the profile has no shape, so no node.
    let cfg = LvnConfig {
        profile: VolumeProfileConfig {
            window_bars: 5,
            ..VolumeProfileConfig::default()
        },
        ..LvnConfig::default()
    };
    let flat: Vec<Bar> = (0..8)
        .map(|i| range_bar(i * 300, 50.0, 50.0, 50.0, 3.0))
        .collect();
    for r in lvn_stream(cfg, &flat).into_iter().flatten() {
        assert_eq!(r, NO_LVN_VECTOR);
    }
    // A single-peaked profile (all bars the same range) has no interior dip.
    let same: Vec<Bar> = (0..8)
        .map(|i| range_bar(i * 300, 50.0, 51.0, 50.5, 3.0))
        .collect();
    for r in lvn_stream(cfg, &same).into_iter().flatten() {
        assert_eq!(r, NO_LVN_VECTOR);
    }
}

#[test]
fn flat_market_gives_neutral_structure_rows() {
    let cfg = StructureConfig::default();
    let bars: Vec<Bar> = (0..400)
        .map(|i| {
            range_bar(
                i * 1800,
                20.0,
                20.0,
                20.0,
                if i % 3 == 0 { 0.0 } else { 5.0 },
            )
        })
        .collect();
    let rows = stream(cfg, &bars);
    assert_warmup(&rows, cfg.warmup_bars());
    for r in rows.into_iter().flatten() {
        // Labels are all 0 (no change), yhat is the price, no node.
        assert_eq!([r[0], r[1], r[3], r[4], r[5]], [0.0; 5], "{r:?}");
        assert!((r[2] - 20.0).abs() < 1e-12, "{r:?}");
    }
}

#[test]
fn mlmi_votes_with_the_trend() {
    let cfg = StructureConfig::default();
    let k = cfg.knn_neighbors as f64;
    for (dir, want) in [(1.0, k), (-1.0, -k)] {
        // Every close moves in `dir`, by alternating step sizes.
        let mut close: f64 = 1_000.0;
        let bars: Vec<Bar> = (0..320)
            .map(|i| {
                let prev = close;
                close += dir * if i % 2 == 0 { 1.0 } else { 2.0 };
                range_bar(i * 1800, prev.min(close), prev.max(close), close, 100.0)
            })
            .collect();
        let rows = stream(cfg, &bars);
        for r in rows.into_iter().flatten() {
            assert_eq!((r[0], r[1]), (want, want), "every label is {dir}");
        }
    }
}

#[test]
fn nwrqk_matches_the_kernel_formula_on_a_ramp() {
    let cfg = small_cfg();
    let (h, r, lag) = (
        cfg.nw_bandwidth_bars,
        cfg.nw_relative_weight,
        cfg.nw_max_lag_bars,
    );
    let close = |t: usize| 50.0 + 0.25 * t as f64 + if t.is_multiple_of(5) { 0.5 } else { 0.0 };
    let bars: Vec<Bar> = (0..200)
        .map(|t| {
            range_bar(
                t as i64 * 1800,
                close(t) - 0.1,
                close(t) + 0.1,
                close(t),
                10.0,
            )
        })
        .collect();
    // Written out independently of the crate: Σ w_i x_{t−i} / Σ w_i.
    let yhat = |t: usize| {
        let (mut num, mut den) = (0.0, 0.0);
        for i in 0..=lag {
            let w = (1.0 + (i * i) as f64 / (2.0 * r * h * h)).powf(-r);
            num += w * close(t - i);
            den += w;
        }
        num / den
    };
    let rows = stream(cfg, &bars);
    for (t, row) in rows.iter().enumerate() {
        if let Some(row) = row {
            assert!((row[2] - yhat(t)).abs() < 1e-12, "bar {t}");
            assert!((row[3] - (yhat(t) - yhat(t - 1))).abs() < 1e-12, "bar {t}");
        }
    }
}

#[test]
fn time_columns_are_the_utc_hour_of_the_open() {
    let cfg = small_cfg();
    let day = 19_700 * 86_400;
    let bars: Vec<Bar> = (0..120)
        .map(|i| range_bar(day + i * 1800, 10.0, 10.5, 10.0 + (i % 3) as f64 * 0.1, 1.0))
        .collect();
    let rows = stream(cfg, &bars);
    for (i, row) in rows.iter().enumerate() {
        if let Some(row) = row {
            let hour = (i % 48) as f64 / 2.0;
            let a = std::f64::consts::TAU * hour / 24.0;
            assert!((row[6] - a.sin()).abs() < 1e-12 && (row[7] - a.cos()).abs() < 1e-12);
        }
    }
}

#[test]
fn invalid_bars_are_rejected_and_change_nothing() {
    let cfg = small_cfg();
    let bars = walk(5, 200, 100.0, 1800);
    let clean = stream(cfg, &bars);
    let mut f = StructureFeatures::new(cfg).unwrap();
    let mut l = LvnFeatures::new(LvnConfig {
        profile: cfg.profile,
        ..LvnConfig::default()
    })
    .unwrap();
    let bad = [
        Bar {
            close: f64::NAN,
            ..bars[0]
        },
        Bar {
            volume: -1.0,
            ..bars[0]
        },
        Bar {
            low: bars[0].high * 2.0,
            ..bars[0]
        },
    ];
    for (t, b) in bars.iter().enumerate() {
        if t % 50 == 10 {
            for x in &bad {
                assert!(matches!(f.push(x), Err(Error::Invalid(_))));
                assert!(matches!(l.push(x), Err(Error::Invalid(_))));
            }
        }
        assert_eq!(bits(f.push(b).unwrap()), bits(clean[t]), "bar {t}");
        l.push(b).unwrap();
    }
    assert_eq!(f.bars_seen(), 200);
    let mut with_bad = bars[..50].to_vec();
    with_bad.push(bad[0]);
    assert!(StructureFeatures::from_history(&cfg, &with_bad).is_err());
}

#[test]
fn configs_are_validated() {
    let ok = StructureConfig::default();
    assert!(ok.validate().is_ok() && LvnConfig::default().validate().is_ok());
    let bad = [
        StructureConfig {
            knn_memory_samples: 100,
            ..ok
        },
        StructureConfig {
            rsi_fast_bars: 0,
            ..ok
        },
        StructureConfig {
            nw_bandwidth_bars: 0.0,
            ..ok
        },
        StructureConfig {
            nw_relative_weight: f64::NAN,
            ..ok
        },
        StructureConfig {
            profile: VolumeProfileConfig {
                rows: 2,
                ..ok.profile
            },
            ..ok
        },
        StructureConfig {
            profile: VolumeProfileConfig {
                max_node_fraction: 1.5,
                ..ok.profile
            },
            ..ok
        },
    ];
    for cfg in bad {
        let e = StructureFeatures::new(cfg).expect_err("must be rejected");
        assert!(matches!(e, Error::Config { .. }), "{e}");
    }
    let e = LvnFeatures::new(LvnConfig {
        distance_cap_points: 0.0,
        ..LvnConfig::default()
    })
    .expect_err("cap 0");
    assert!(e.to_string().contains("distance_cap_points"), "{e}");
}

#[test]
fn extreme_prices_and_volumes_stay_finite_with_the_defaults() {
    // Prices near the ends of f64, alternating, with huge and zero volumes.
    let bars: Vec<Bar> = (0..700)
        .map(|i| {
            let p = match i % 4 {
                0 => 1e300,
                1 => 1e-300,
                2 => f64::MAX / 4.0,
                _ => 1.0,
            };
            let v = if i % 3 == 0 { 0.0 } else { f64::MAX / 2.0 };
            range_bar(i as i64 * 1800, p, p, p, v)
        })
        .collect();
    for r in stream(StructureConfig::default(), &bars)
        .into_iter()
        .flatten()
    {
        assert!(r.iter().all(|x| x.is_finite()), "{r:?}");
    }
    for r in lvn_stream(LvnConfig::default(), &bars)
        .into_iter()
        .flatten()
    {
        assert!(r.iter().all(|x| x.is_finite()), "{r:?}");
    }
}

/// One step of an adversarial series.
#[derive(Debug, Clone)]
enum Step {
    /// Same price as before, open = high = low = close.
    Flat,
    /// Small move by this log-return.
    Walk(f64),
    /// Multiply the price by 10^e.
    Jump(i32),
}

fn adversarial() -> impl Strategy<Value = Vec<(Step, f64, u8)>> {
    let step = prop_oneof![
        2 => Just(Step::Flat),
        4 => (-0.05f64..0.05).prop_map(Step::Walk),
        1 => (-12i32..=12).prop_map(Step::Jump),
    ];
    // (step, wick as a fraction of price, volume kind)
    prop::collection::vec((step, 0.0f64..0.5, 0u8..4), 1..260)
}

fn build(steps: &[(Step, f64, u8)]) -> Vec<Bar> {
    let mut close: f64 = 100.0;
    steps
        .iter()
        .enumerate()
        .map(|(i, (step, wick, vk))| {
            let open = close;
            close = match step {
                Step::Flat => close,
                Step::Walk(r) => close * r.exp(),
                Step::Jump(e) => close * 10f64.powi(*e),
            }
            .clamp(1e-250, 1e250);
            let (lo, hi) = if matches!(step, Step::Flat) {
                (close, close)
            } else {
                (
                    open.min(close) * (1.0 - wick),
                    open.max(close) * (1.0 + wick),
                )
            };
            let volume = match vk {
                0 => 0.0,
                1 => 1.0,
                2 => 1e12,
                _ => 1e300,
            };
            Bar {
                ts: i as i64 * 1800 - 3 * 86_400,
                open,
                high: hi,
                low: lo,
                close,
                volume,
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn extreme_series_never_leak_non_finite_values(steps in adversarial()) {
        let bars = build(&steps);
        let cfg = small_cfg();
        let rows = stream(cfg, &bars);
        for r in rows.iter().flatten() {
            prop_assert!(r.iter().all(|x| x.is_finite()), "{:?}", r);
            prop_assert!((0.0..=100.0).contains(&r[5]));
        }
        let last = StructureFeatures::from_history(&cfg, &bars).unwrap();
        prop_assert_eq!(bits(*rows.last().unwrap()), bits(last));

        let lvn_cfg = LvnConfig { profile: cfg.profile, ..LvnConfig::default() };
        let vs = lvn_stream(lvn_cfg, &bars);
        for v in vs.iter().flatten() {
            prop_assert!(v.iter().all(|x| x.is_finite()), "{:?}", v);
            prop_assert!((0.0..=1.0).contains(&v[0]) && (0.0..=1.0).contains(&v[1]));
            prop_assert!((0.0..=1.0).contains(&v[4]) && (v[3] == 0.0 || v[3] == 1.0));
        }
        let last = LvnFeatures::from_history(&lvn_cfg, &bars).unwrap();
        prop_assert_eq!(bits(*vs.last().unwrap()), bits(last));
    }
}
