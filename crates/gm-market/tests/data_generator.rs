//! Behaviour of the synthetic market: determinism, OHLC invariants, the
//! session calendar, regime statistics against the configuration, and the
//! structures downstream features look for (fair-value gaps, low-volume
//! nodes, intraday volume seasonality).

use gm_market::{Bar, Error, GeneratorConfig, Regime, RegimeParams, SyntheticMarket};

/// Bars for the statistical tests: fewer in unoptimised builds.
const N: usize = if cfg!(debug_assertions) {
    200_000
} else {
    1_000_000
};

fn market(config: GeneratorConfig) -> SyntheticMarket {
    SyntheticMarket::new(config).expect("valid config")
}

fn default_bars(n: usize) -> (Vec<Bar>, Vec<Regime>) {
    market(GeneratorConfig::default()).generate(n)
}

/// Monday = 0 .. Sunday = 6.
fn weekday(ts: i64) -> i64 {
    (ts.div_euclid(86_400) + 3).rem_euclid(7)
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

fn std(xs: &[f64]) -> f64 {
    let m = mean(xs);
    (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64).sqrt()
}

#[test]
fn same_seed_same_bars_and_regimes_other_seed_differs() {
    let cfg = |seed| GeneratorConfig {
        seed,
        ..GeneratorConfig::default()
    };
    let a = market(cfg(7)).generate(20_000);
    let b = market(cfg(7)).generate(20_000);
    assert_eq!(a, b);

    // The iterator and generate_into in pieces give the same stream.
    let it: Vec<(Bar, Regime)> = market(cfg(7)).take(20_000).collect();
    assert!(it.iter().map(|p| p.0).eq(a.0.iter().copied()));
    assert!(it.iter().map(|p| p.1).eq(a.1.iter().copied()));
    let mut m = market(cfg(7));
    let (mut bars, mut regimes) = (Vec::new(), Vec::new());
    m.generate_into(&mut bars, &mut regimes, 7_000);
    m.generate_into(&mut bars, &mut regimes, 13_000);
    assert_eq!((bars, regimes), a);
    assert_eq!(m.bars_emitted(), 20_000);

    let c = market(cfg(8)).generate(20_000);
    let same_close =
        a.0.iter()
            .zip(&c.0)
            .filter(|(x, y)| x.close == y.close)
            .count();
    assert!(same_close < 100, "{same_close} equal closes across seeds");
    assert_ne!(a.1, c.1, "regime paths differ across seeds");
    assert!(
        a.0.iter().zip(&c.0).all(|(x, y)| x.ts == y.ts),
        "same calendar"
    );
}

#[test]
fn ohlc_invariants_and_weekday_calendar() {
    let (bars, _) = default_bars(N);
    let mut weekends = 0;
    let mut session_gaps = 0;
    for (t, b) in bars.iter().enumerate() {
        assert!(b.is_valid(), "bar {t}: {b:?}");
        assert!(b.volume > 0.0, "bar {t}: {b:?}");
        assert_eq!(b.ts % 300, 0, "bar {t} on the 5-minute grid");
        assert!(weekday(b.ts) < 5, "bar {t} on a weekend: {}", b.ts);
        if t == 0 {
            assert_eq!(b.ts, 1_704_067_200, "starts at 2024-01-01T00:00Z");
            assert_eq!(b.open, 100.0);
            continue;
        }
        let prev = &bars[t - 1];
        let d = b.ts - prev.ts;
        if d == 2 * 86_400 + 300 {
            assert_eq!(weekday(prev.ts), 4, "weekend gaps start on Friday");
            assert_eq!(weekday(b.ts), 0, "and end on Monday");
            weekends += 1;
        } else {
            assert_eq!(d, 300, "bar {t}: no gaps inside the week");
        }
        if b.ts % 86_400 == 0 {
            // A session open: an opening gap.
            session_gaps += usize::from(b.open != prev.close);
        } else {
            assert_eq!(
                b.open, prev.close,
                "bar {t}: open = previous close in a session"
            );
        }
    }
    let weeks = N / (5 * 288);
    assert!(
        weekends == weeks || weekends + 1 == weeks,
        "{weekends} weekends in {weeks} weeks"
    );
    assert_eq!(session_gaps, N / 288, "every session opens with a gap");
}

#[test]
fn prices_stay_positive_and_sane_over_many_bars() {
    let n = if cfg!(debug_assertions) {
        500_000
    } else {
        10_000_000
    };
    let mut m = market(GeneratorConfig::default());
    let (mut lo, mut hi) = (f64::MAX, 0.0f64);
    for _ in 0..n {
        let (b, _) = m.next_bar();
        assert!(b.is_valid(), "{b:?}");
        lo = lo.min(b.low);
        hi = hi.max(b.high);
    }
    assert!(
        lo > 1.0 && hi < 10_000.0,
        "price left [1, 10000]: {lo} .. {hi}"
    );
}

/// Lengths of the maximal runs of equal regimes, per regime, without the
/// first and last run (cut by the sample).
fn run_lengths(regimes: &[Regime]) -> [Vec<f64>; 4] {
    let mut runs: [Vec<f64>; 4] = Default::default();
    let mut start = 0;
    for t in 1..=regimes.len() {
        if t == regimes.len() || regimes[t] != regimes[start] {
            if start > 0 && t < regimes.len() {
                runs[regimes[start].index()].push((t - start) as f64);
            }
            start = t;
        }
    }
    runs
}

#[test]
fn regimes_follow_the_configured_chain_drift_and_volatility() {
    let cfg = GeneratorConfig::default();
    let (bars, regimes) = market(cfg.clone()).generate(N);

    // Run lengths: geometric with the configured means.
    let runs = run_lengths(&regimes);
    for r in Regime::ALL {
        let want = cfg.regimes[r.index()].mean_duration_bars;
        let got = mean(&runs[r.index()]);
        assert!(
            (got / want - 1.0).abs() < 0.1,
            "{r:?}: mean run {got:.1} bars, configured {want}"
        );
    }

    // Occupancy: with uniform switch weights, proportional to the durations.
    let total: f64 = cfg.regimes.iter().map(|p| p.mean_duration_bars).sum();
    for r in Regime::ALL {
        let share = regimes.iter().filter(|&&x| x == r).count() as f64 / N as f64;
        let want = cfg.regimes[r.index()].mean_duration_bars / total;
        assert!(
            (share / want - 1.0).abs() < 0.2,
            "{r:?}: {share:.3} of the bars, stationary share {want:.3}"
        );
    }

    // Drift sign and size, volatility order, from bar log-returns.
    let mut rets: [Vec<f64>; 4] = Default::default();
    for (b, r) in bars.iter().zip(&regimes) {
        rets[r.index()].push((b.close / b.open).ln());
    }
    let [up, down, range, hv] = &rets;
    let mu = cfg.regimes[0].drift_per_bar;
    assert!(
        (mean(up) / mu - 1.0).abs() < 0.25,
        "TrendingUp drift {:e}",
        mean(up)
    );
    assert!(
        (mean(down) / -mu - 1.0).abs() < 0.25,
        "TrendingDown drift {:e}",
        mean(down)
    );
    assert!(
        mean(range).abs() < mu / 4.0,
        "Ranging drift {:e}",
        mean(range)
    );
    assert!(
        mean(hv).abs() < mu / 2.0,
        "HighVolatility drift {:e}",
        mean(hv)
    );
    let (s_trend, s_range, s_hv) = (std(up), std(range), std(hv));
    assert!(
        s_hv > 2.0 * s_trend && s_trend > 1.3 * s_range,
        "vol: high {s_hv:e}, trending {s_trend:e}, ranging {s_range:e}"
    );
    assert!(
        (s_trend / cfg.regimes[0].vol_per_bar - 1.0).abs() < 0.15,
        "trending vol {s_trend:e}"
    );
}

#[test]
fn switch_weights_and_durations_are_honoured() {
    // Short runs; TrendingUp always hands over to Ranging, the others as
    // configured.
    let mut cfg = GeneratorConfig::default();
    for p in &mut cfg.regimes {
        p.mean_duration_bars = 20.0;
    }
    cfg.regime_switch_weights[0] = [0.0, 0.0, 1.0, 0.0];
    cfg.regime_switch_weights[2] = [3.0, 0.0, 0.0, 1.0];
    let (_, regimes) = market(cfg).generate(N / 4);
    let runs = run_lengths(&regimes);
    for r in Regime::ALL {
        let got = mean(&runs[r.index()]);
        assert!((got / 20.0 - 1.0).abs() < 0.15, "{r:?}: mean run {got:.1}");
    }
    let mut from_up = [0usize; 4];
    let mut from_range = [0usize; 4];
    for w in regimes.windows(2) {
        if w[0] != w[1] {
            match w[0] {
                Regime::TrendingUp => from_up[w[1].index()] += 1,
                Regime::Ranging => from_range[w[1].index()] += 1,
                _ => {}
            }
        }
    }
    assert_eq!(
        from_up[1] + from_up[3],
        0,
        "TrendingUp → Ranging only: {from_up:?}"
    );
    assert_eq!(from_range[1], 0, "{from_range:?}");
    let ratio = from_range[0] as f64 / from_range[3] as f64;
    assert!((2.0..4.5).contains(&ratio), "3:1 weights, got {ratio:.2}");
}

#[test]
fn fair_value_gaps_occur_in_both_directions() {
    let (bars, _) = default_bars(N);
    let (mut bull, mut bear) = (0usize, 0usize);
    for w in bars.windows(3) {
        bull += usize::from(w[2].low > w[0].high);
        bear += usize::from(w[2].high < w[0].low);
    }
    let (pb, ps) = (bull as f64 / N as f64, bear as f64 / N as f64);
    assert!((0.02..0.25).contains(&pb), "bullish FVG rate {pb:.4}");
    assert!((0.02..0.25).contains(&ps), "bearish FVG rate {ps:.4}");
    assert!(
        (0.8..1.25).contains(&(pb / ps)),
        "balanced: bullish {pb:.4}, bearish {ps:.4}"
    );
    // Gaps wider than a normal bar's volatility exist too (jumps, opens).
    let wide = bars
        .windows(3)
        .filter(|w| w[2].low > w[0].high * 1.003 || w[2].high < w[0].low / 1.003)
        .count();
    assert!(wide * 2000 > N, "{wide} FVGs wider than 0.3 %");
}

/// Per session: a volume profile (each bar's volume spread evenly over
/// `bins` price bins between its low and high); whether some interior bin
/// holds less than `frac` of the smaller of the largest bins on either side.
fn has_low_volume_node(bars: &[Bar], bins: usize, frac: f64) -> bool {
    let lo = bars.iter().map(|b| b.low).fold(f64::MAX, f64::min);
    let hi = bars.iter().map(|b| b.high).fold(0.0, f64::max);
    let width = (hi - lo) / bins as f64;
    let mut profile = vec![0.0; bins];
    for b in bars {
        let a = (((b.low - lo) / width) as usize).min(bins - 1);
        let z = (((b.high - lo) / width) as usize).min(bins - 1);
        for p in &mut profile[a..=z] {
            *p += b.volume / (z - a + 1) as f64;
        }
    }
    (1..bins - 1).any(|k| {
        let left = profile[..k].iter().copied().fold(0.0, f64::max);
        let right = profile[k + 1..].iter().copied().fold(0.0, f64::max);
        profile[k] < frac * left.min(right)
    })
}

#[test]
fn low_volume_nodes_occur() {
    let (bars, _) = default_bars(N);
    let days: Vec<&[Bar]> = bars.chunks_exact(288).collect();
    let with = days
        .iter()
        .filter(|d| has_low_volume_node(d, 40, 0.2))
        .count();
    let share = with as f64 / days.len() as f64;
    assert!(
        (0.25..0.95).contains(&share),
        "{share:.3} of sessions have a low-volume node"
    );

    // Volume per unit of range is lower on fast bars than on quiet ones
    // (elasticity < 1): fast moves leave thin price levels behind.
    let mut by_range: Vec<(f64, f64)> = bars
        .iter()
        .map(|b| {
            let r = (b.high / b.low).ln();
            (r, b.volume / r)
        })
        .collect();
    by_range.sort_by(|a, b| a.0.total_cmp(&b.0));
    let q = by_range.len() / 5;
    let density = |s: &[(f64, f64)]| mean(&s.iter().map(|x| x.1).collect::<Vec<_>>());
    let quiet = density(&by_range[q..2 * q]);
    let fast = density(&by_range[4 * q..]);
    assert!(
        fast < 0.9 * quiet,
        "volume per range: fast {fast:.3e}, quiet {quiet:.3e}"
    );
}

#[test]
fn volume_is_u_shaped_in_the_session_and_follows_volatility() {
    let (bars, regimes) = default_bars(N);
    let mut by_hour = [(0.0, 0usize); 24];
    for b in &bars {
        let h = (b.ts.rem_euclid(86_400) / 3600) as usize;
        by_hour[h].0 += b.volume;
        by_hour[h].1 += 1;
    }
    let hour = |h: usize| by_hour[h].0 / by_hour[h].1 as f64;
    let edges = (hour(0) + hour(23)) / 2.0;
    let middle = (hour(11) + hour(12)) / 2.0;
    assert!(edges > 2.0 * middle, "edges {edges:.0}, middle {middle:.0}");

    let mut by_regime = [(0.0, 0usize); 4];
    for (b, r) in bars.iter().zip(&regimes) {
        by_regime[r.index()].0 += b.volume;
        by_regime[r.index()].1 += 1;
    }
    let vol = |r: Regime| by_regime[r.index()].0 / by_regime[r.index()].1 as f64;
    assert!(
        vol(Regime::HighVolatility) > 1.8 * vol(Regime::Ranging)
            && vol(Regime::TrendingUp) > 1.2 * vol(Regime::Ranging),
        "volume by regime: {by_regime:?}"
    );
}

#[test]
fn session_calendars() {
    // 24/7: no gaps at all.
    let cfg = GeneratorConfig {
        trade_weekends: true,
        ..GeneratorConfig::default()
    };
    let (bars, _) = market(cfg).generate(5000);
    assert!(bars.windows(2).all(|w| w[1].ts - w[0].ts == 300));

    // 09:30–16:00 UTC weekdays: 78 bars a session, gaps every night.
    let cfg = GeneratorConfig {
        session_start_secs: 34_200,
        session_length_secs: 23_400,
        ..GeneratorConfig::default()
    };
    let (bars, _) = market(cfg).generate(78 * 20);
    for b in &bars {
        let sec = b.ts.rem_euclid(86_400);
        assert!((34_200..57_600).contains(&sec), "{}", b.ts);
        assert!(weekday(b.ts) < 5);
        assert!(b.is_valid());
    }
    let nights = bars.windows(2).filter(|w| w[1].ts - w[0].ts > 300).count();
    assert_eq!(nights, 19);
    assert_eq!(bars[78].ts - bars[77].ts, 86_400 - 23_400 + 300);
}

#[test]
fn bad_config_is_a_config_error() {
    let mut cfg = GeneratorConfig::default();
    cfg.regimes[Regime::Ranging.index()] = RegimeParams {
        mean_duration_bars: 0.5,
        ..cfg.regimes[Regime::Ranging.index()]
    };
    match SyntheticMarket::new(cfg) {
        Err(Error::Config { key, value, .. }) => {
            assert_eq!(key, "regimes[Ranging].mean_duration_bars");
            assert_eq!(value, "0.5");
        }
        other => panic!("{other:?}"),
    }
    let cfg = GeneratorConfig {
        bar_interval_secs: 0,
        ..GeneratorConfig::default()
    };
    assert!(matches!(
        SyntheticMarket::new(cfg),
        Err(Error::Config {
            key: "bar_interval_secs",
            ..
        })
    ));
}
