//! Interval detection (regular series with weekend and holiday gaps,
//! irregular series) and timeframe aggregation (exactness against a naive
//! fold, incremental = batch, alignment, completeness flags).

use std::collections::BTreeMap;

use gm_market::{
    aggregate, aggregate_with_origin, detect_interval, detect_interval_ts, AggBar, Aggregator, Bar,
    BarInterval, Error, GeneratorConfig, SyntheticMarket,
};
use proptest::prelude::*;

fn generated(n: usize, cfg: GeneratorConfig) -> Vec<Bar> {
    SyntheticMarket::new(cfg).unwrap().generate(n).0
}

fn with_interval(secs: i64) -> GeneratorConfig {
    GeneratorConfig {
        bar_interval_secs: secs,
        ..GeneratorConfig::default()
    }
}

#[test]
fn detects_1m_5m_1h_1d_across_weekends_and_holidays() {
    for (secs, want) in [
        (60, BarInterval::M1),
        (300, BarInterval::M5),
        (3600, BarInterval::H1),
        (86_400, BarInterval::D1),
    ] {
        // From Friday 2024-01-05 16:00 UTC, so a weekend falls in the window.
        let cfg = GeneratorConfig {
            start_unix_secs: 1_704_470_400,
            ..with_interval(secs)
        };
        let mut bars = generated(3000, cfg);
        let longest = |bars: &[Bar]| {
            bars[..1000]
                .windows(2)
                .map(|w| w[1].ts - w[0].ts)
                .max()
                .unwrap()
        };
        assert!(
            longest(&bars) > 2 * 86_400,
            "a weekend in the first 1000 bars"
        );
        assert_eq!(detect_interval(&bars).unwrap(), want, "{secs} s");
        // Holidays: drop every Monday.
        bars.retain(|b| (b.ts.div_euclid(86_400) + 3) % 7 != 0);
        assert!(longest(&bars) > 3 * 86_400, "Friday to Tuesday");
        assert_eq!(detect_interval(&bars).unwrap(), want, "{secs} s, holidays");
    }

    // Hourly bars of an 8-hour session: a 17-hour gap every night.
    let cfg = GeneratorConfig {
        bar_interval_secs: 3600,
        session_start_secs: 13 * 3600,
        session_length_secs: 8 * 3600,
        ..GeneratorConfig::default()
    };
    assert_eq!(
        detect_interval(&generated(500, cfg)).unwrap(),
        BarInterval::H1
    );

    // Daily bars stamped at local midnight: DST moves a few by an hour.
    let mut ts: Vec<i64> = generated(400, with_interval(86_400))
        .iter()
        .map(|b| b.ts)
        .collect();
    for t in &mut ts[100..110] {
        *t -= 3600;
    }
    assert_eq!(detect_interval_ts(&ts).unwrap(), BarInterval::D1);

    // Any other interval.
    let ts: Vec<i64> = (0..50).map(|i| 1_000_000 + 90 * i).collect();
    assert_eq!(detect_interval_ts(&ts).unwrap(), BarInterval(90));
}

#[test]
fn irregular_or_short_series_are_errors() {
    // Pseudo-random spacings between 1 and 1000 s.
    let mut t = 1_700_000_000i64;
    let mut x = 12345u64;
    let ts: Vec<i64> = (0..500)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            t += 1 + (x >> 33) as i64 % 1000;
            t
        })
        .collect();
    let e = detect_interval_ts(&ts).unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    assert!(e.to_string().contains("no consistent bar interval"), "{e}");

    // Two interleaved spacings that are not multiples of each other.
    let ts: Vec<i64> = (0..100).map(|i| i / 2 * 150 + (i % 2) * 60).collect();
    let e = detect_interval_ts(&ts).unwrap_err();
    assert!(e.to_string().contains("multiples"), "{e}");

    assert!(matches!(
        detect_interval_ts(&[0, 60]),
        Err(Error::NotEnoughData(_))
    ));
    assert!(matches!(
        detect_interval_ts(&[0, 60, 60, 120]),
        Err(Error::Invalid(_))
    ));

    // Only the first 1000 bars are examined.
    let mut ts: Vec<i64> = (0..1000).map(|i| i * 300).collect();
    ts.extend((1..500).map(|i| 300_000 + i * i));
    let bars: Vec<Bar> = ts.iter().map(|&t| bar(t, 100.0, 1.0)).collect();
    assert_eq!(detect_interval(&bars).unwrap(), BarInterval::M5);
}

fn bar(ts: i64, price: f64, volume: f64) -> Bar {
    Bar {
        ts,
        open: price,
        high: price + 1.0,
        low: price - 1.0,
        close: price + 0.5,
        volume,
    }
}

/// The reference: group by bucket with a map, fold each group.
fn naive(bars: &[Bar], width: i64, origin: i64, k: u32) -> Vec<AggBar> {
    let mut groups: BTreeMap<i64, Vec<&Bar>> = BTreeMap::new();
    let mut last = None;
    for b in bars {
        if last.is_some_and(|t| b.ts <= t) {
            continue; // skipped, as documented
        }
        last = Some(b.ts);
        groups
            .entry((b.ts - origin).div_euclid(width))
            .or_default()
            .push(b);
    }
    groups
        .into_iter()
        .map(|(m, g)| AggBar {
            bar: Bar {
                ts: origin + m * width,
                open: g[0].open,
                high: g.iter().map(|b| b.high).fold(f64::MIN, f64::max),
                low: g.iter().map(|b| b.low).fold(f64::MAX, f64::min),
                close: g[g.len() - 1].close,
                volume: g.iter().map(|b| b.volume).sum(),
            },
            bars_in: g.len() as u32,
            complete: g.len() as u32 == k,
        })
        .collect()
}

fn incremental(bars: &[Bar], interval: BarInterval, k: u32, origin: i64) -> Vec<AggBar> {
    let mut agg = Aggregator::with_origin(interval, k, origin).unwrap();
    let mut out: Vec<AggBar> = bars.iter().filter_map(|b| agg.push(b)).collect();
    out.extend(agg.flush());
    assert!(agg.flush().is_none(), "flush empties");
    out
}

#[test]
fn k6_on_5_minute_bars_gives_30_minute_bars_on_the_half_hour() {
    let bars = generated(288 * 12, GeneratorConfig::default()); // 2.4 weeks
    let out = aggregate(&bars, BarInterval::M5, 6).unwrap();
    assert_eq!(out.len(), bars.len() / 6);
    for (a, chunk) in out.iter().zip(bars.chunks(6)) {
        assert_eq!(a.bar.ts % 1800, 0, "starts at :00 or :30");
        assert!(matches!(a.bar.ts % 3600, 0 | 1800));
        assert_eq!((a.bars_in, a.complete), (6, true));
        assert_eq!(a.bar.ts, chunk[0].ts);
        assert_eq!(a.bar.open, chunk[0].open);
        assert_eq!(a.bar.close, chunk[5].close);
        assert!(a.bar.is_valid());
    }
    // Friday's last 30 minutes and Monday's first are separate bars.
    let fri = out.iter().position(|a| a.bar.ts == 1_704_497_400).unwrap(); // Fri 23:30
    assert_eq!(out[fri + 1].bar.ts, 1_704_672_000, "Mon 00:00");
    assert_eq!(out, naive(&bars, 1800, 0, 6));
    assert_eq!(out, incremental(&bars, BarInterval::M5, 6, 0));
}

#[test]
fn gaps_make_incomplete_buckets_and_push_returns_the_previous_one() {
    let t = 1_704_187_800; // 09:30
    let mut agg = Aggregator::new(BarInterval::M5, 6).unwrap();
    assert_eq!(agg.structure_interval(), BarInterval::M30);
    assert!(agg.push(&bar(t, 100.0, 1.0)).is_none());
    assert!(agg.push(&bar(t + 300, 101.0, 2.0)).is_none());
    // 09:40 .. 09:55 missing; 10:05 opens the 10:00 bucket (10:00 missing too).
    let partial = agg.current().unwrap();
    assert_eq!((partial.bars_in, partial.complete), (2, false));
    let done = agg.push(&bar(t + 2100, 105.0, 4.0)).unwrap();
    assert_eq!(done.bar.ts, t);
    assert_eq!((done.bars_in, done.complete), (2, false));
    assert_eq!(
        done.bar,
        Bar {
            ts: t,
            open: 100.0,
            high: 102.0,
            low: 99.0,
            close: 101.5,
            volume: 3.0
        }
    );
    // Out-of-order bars are skipped and counted.
    assert!(agg.push(&bar(t + 2100, 1.0, 1.0)).is_none());
    assert!(agg.push(&bar(t, 1.0, 1.0)).is_none());
    assert_eq!(agg.skipped(), 2);
    let last = agg.flush().unwrap();
    assert_eq!(
        (last.bar.ts, last.bars_in, last.bar.open),
        (t + 1800, 1, 105.0)
    );
    assert!(agg.flush().is_none() && agg.current().is_none());

    // Buckets aligned to a 09:30 session open: hourly bars at 09:30, 10:30.
    let bars: Vec<Bar> = (0..24).map(|i| bar(t + 300 * i, 100.0, 1.0)).collect();
    let out = aggregate_with_origin(&bars, BarInterval::M5, 12, 34_200).unwrap();
    let starts: Vec<i64> = out.iter().map(|a| a.bar.ts).collect();
    assert_eq!(starts, [t, t + 3600]);
    assert!(out.iter().all(|a| a.complete));
}

/// Random valid bars on an `interval` grid with random gaps (and, if
/// `messy`, off-grid and out-of-order timestamps).
fn arb_bars(messy: bool) -> impl Strategy<Value = (Vec<Bar>, i64)> {
    let interval = prop::sample::select(vec![60i64, 300, 3600]);
    let steps = prop::collection::vec(
        (
            prop_oneof![
                8 => Just(1i64),
                2 => 2i64..12,
                1 => 100i64..700,
            ],
            50.0f64..150.0,
            50.0f64..150.0,
            0.0f64..5.0,
            0.0f64..5.0,
            0.0f64..1000.0,
            -200i64..200,
        ),
        0..300,
    );
    (interval, 0i64..10_000, steps).prop_map(move |(interval, start, steps)| {
        let mut ts = 1_700_000_000 / interval * interval + start * interval;
        let bars = steps
            .into_iter()
            .map(|(slots, o, c, up, down, v, jitter)| {
                ts += slots * interval;
                let t = if messy { ts + jitter } else { ts };
                Bar {
                    ts: t,
                    open: o,
                    high: o.max(c) + up,
                    low: o.min(c) - down,
                    close: c,
                    volume: v,
                }
            })
            .collect();
        (bars, interval)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn incremental_equals_batch_equals_naive_fold(
        (bars, interval) in arb_bars(false),
        k in 1u32..=12,
        origin_slots in 0i64..12,
    ) {
        let iv = BarInterval(interval);
        let origin = origin_slots * interval;
        let batch = aggregate_with_origin(&bars, iv, k, origin).unwrap();
        prop_assert_eq!(&batch, &incremental(&bars, iv, k, origin));
        let width = interval * i64::from(k);
        prop_assert_eq!(&batch, &naive(&bars, width, origin, k));
        let total: u32 = batch.iter().map(|a| a.bars_in).sum();
        prop_assert_eq!(total as usize, bars.len());
        for a in &batch {
            prop_assert_eq!((a.bar.ts - origin).rem_euclid(width), 0);
            prop_assert!(a.bars_in >= 1 && a.bars_in <= k);
            prop_assert_eq!(a.complete, a.bars_in == k);
            prop_assert!(a.bar.is_valid());
        }
        prop_assert!(batch.windows(2).all(|w| w[0].bar.ts < w[1].bar.ts));
        if origin == 0 {
            prop_assert_eq!(batch, aggregate(&bars, iv, k).unwrap());
        }
    }

    #[test]
    fn off_grid_and_out_of_order_input_is_handled_the_same_way(
        (bars, interval) in arb_bars(true),
        k in 1u32..=12,
    ) {
        let iv = BarInterval(interval);
        let batch = aggregate(&bars, iv, k).unwrap();
        prop_assert_eq!(&batch, &incremental(&bars, iv, k, 0));
        prop_assert_eq!(&batch, &naive(&bars, interval * i64::from(k), 0, k));
    }
}
