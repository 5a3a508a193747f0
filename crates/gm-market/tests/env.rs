//! The trading environment: reward arithmetic, episodes and determinism, the
//! vectorised form, the baselines, and real-data input through CSV.

use std::sync::{Arc, OnceLock};

use gm_market::{
    evaluate, write_csv, Action, BuyAndHold, EnvConfig, Error, GeneratorConfig, MarketData,
    PipelineConfig, RandomPolicy, RegimeOracle, TimestampFormat, TradingEnv, VecEnv, OBS_DIM,
};

fn data() -> Arc<MarketData> {
    static DATA: OnceLock<Arc<MarketData>> = OnceLock::new();
    DATA.get_or_init(|| {
        let g = GeneratorConfig {
            seed: 11,
            ..GeneratorConfig::default()
        };
        Arc::new(MarketData::synthetic(g, 6000, PipelineConfig::default()).unwrap())
    })
    .clone()
}

fn env(episode_bars: usize, cost_bps: f64) -> TradingEnv {
    TradingEnv::new(
        data(),
        EnvConfig {
            episode_bars,
            cost_bps,
        },
    )
    .unwrap()
}

#[test]
fn rewards_are_position_times_return_minus_cost_per_unit_of_change() {
    let mut e = env(10, 2.5);
    let start = data().first_ready() + 17;
    e.reset_at(start).unwrap();
    let closes: Vec<f64> = data().bars()[start..start + 6]
        .iter()
        .map(|b| b.close)
        .collect();
    let ret = |i: usize| closes[i + 1] / closes[i] - 1.0;
    let c = 2.5e-4;
    let script = [
        (Action::Long, ret(0) - c),         // flat -> long: one unit
        (Action::Long, ret(1)),             // hold: no cost
        (Action::Short, -ret(2) - 2.0 * c), // long -> short: two units
        (Action::Flat, -c),                 // short -> flat: one unit, no exposure
        (Action::Flat, 0.0),
    ];
    let mut pnl = 0.0;
    for (i, (a, want)) in script.into_iter().enumerate() {
        let s = e.step(a).unwrap();
        assert!(
            (s.reward - want).abs() < 1e-15,
            "step {i}: {} vs {want}",
            s.reward
        );
        pnl += want;
        assert!((s.info.pnl - pnl).abs() < 1e-12);
        assert_eq!(s.info.position, a.position());
        assert_eq!(s.info.bar, start + i + 1);
        assert_eq!(s.info.price, closes[i + 1]);
        assert_eq!(s.info.regime, data().regime(start + i + 1));
        assert!(!s.done);
    }
}

#[test]
fn episodes_end_after_episode_bars_and_are_deterministic_per_seed() {
    let mut a = env(50, 1.0);
    let mut b = env(50, 1.0);
    let oa = a.reset(5).unwrap().to_vec();
    let ob = b.reset(5).unwrap().to_vec();
    assert_eq!(oa, ob);
    assert_eq!(oa.len(), OBS_DIM);
    assert!(oa.iter().all(|x| x.is_finite()));
    for i in 0..50 {
        let act = Action::ALL[i % 3];
        let (sa, sb) = (a.step(act).unwrap(), b.step(act).unwrap());
        assert_eq!(sa, sb);
        assert_eq!(a.observation(), b.observation());
        assert_eq!(sa.done, i == 49);
    }
    assert!(
        matches!(a.step(Action::Flat), Err(Error::Invalid(_))),
        "no step after the end"
    );
    let start5 = a.reset(5).unwrap().to_vec();
    assert_eq!(start5, oa, "the same seed starts at the same bar");
    let other = a.reset(6).unwrap().to_vec();
    assert_ne!(other, oa, "another seed starts elsewhere");
}

#[test]
fn bad_use_is_an_error_not_a_panic() {
    let mut e = env(10, 1.0);
    assert!(e.step(Action::Long).is_err(), "step before reset");
    assert!(e.reset_at(0).is_err(), "before the first observation");
    assert!(
        e.reset_at(data().len() - 5).is_err(),
        "episode past the end"
    );
    assert!(TradingEnv::new(
        data(),
        EnvConfig {
            episode_bars: 100_000,
            cost_bps: 1.0
        }
    )
    .is_err());
    let bad = EnvConfig {
        episode_bars: 10,
        cost_bps: f64::NAN,
    }
    .validate()
    .unwrap_err();
    assert!(bad.to_string().contains("cost_bps"), "{bad}");
    assert!(Action::from_index(3).is_err());
    assert_eq!(Action::from_index(2).unwrap(), Action::Long);
    assert!(VecEnv::new(data(), EnvConfig::default(), 0, 1).is_err());
    let mut v = VecEnv::new(
        data(),
        EnvConfig {
            episode_bars: 5,
            cost_bps: 1.0,
        },
        2,
        1,
    )
    .unwrap();
    assert!(
        v.step(&[Action::Long]).is_err(),
        "one action per environment"
    );
}

#[test]
fn vec_env_steps_like_independent_envs_and_resets_finished_ones() {
    let cfg = EnvConfig {
        episode_bars: 7,
        cost_bps: 1.0,
    };
    let n = 3;
    let mut v = VecEnv::new(data(), cfg, n, 100).unwrap();
    let mut singles: Vec<TradingEnv> = (0..n)
        .map(|_| TradingEnv::new(data(), cfg).unwrap())
        .collect();
    let mut seeds: Vec<u64> = (0..n as u64).map(|i| 100 + i).collect();
    for (e, &s) in singles.iter_mut().zip(&seeds) {
        e.reset(s).unwrap();
    }
    for step in 0..20 {
        let actions: Vec<Action> = (0..n).map(|i| Action::ALL[(i + step) % 3]).collect();
        let got = v.step(&actions).unwrap().to_vec();
        for i in 0..n {
            let s = singles[i].step(actions[i]).unwrap();
            assert_eq!(got[i], s, "env {i} step {step}");
            if s.done {
                seeds[i] += n as u64;
                singles[i].reset(seeds[i]).unwrap();
            }
            assert_eq!(
                &v.observations()[i * OBS_DIM..(i + 1) * OBS_DIM],
                singles[i].observation()
            );
        }
    }
}

#[test]
fn the_regime_oracle_beats_buy_and_hold_and_random() {
    let mut e = env(288, 1.0);
    let oracle = evaluate(&mut e, &mut RegimeOracle, 40, 1).unwrap();
    let hold = evaluate(&mut e, &mut BuyAndHold, 40, 1).unwrap();
    let random = evaluate(&mut e, &mut RandomPolicy::new(3), 40, 1).unwrap();
    assert_eq!(oracle.episode_returns.len(), 40);
    assert!(
        oracle.mean() > 0.0,
        "knowing the planted drift pays: {}",
        oracle.mean()
    );
    assert!(
        oracle.mean() > hold.mean() && oracle.mean() > random.mean(),
        "{} {} {}",
        oracle.mean(),
        hold.mean(),
        random.mean()
    );
    // Random trading pays about 2/3 of a unit of change per step in costs.
    assert!(random.mean() < 0.0, "{}", random.mean());
}

#[test]
fn real_bars_from_csv_give_the_same_observations_as_the_same_bars_in_memory() {
    let d = data();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bars.csv");
    let mut f = std::fs::File::create(&path).unwrap();
    write_csv(&mut f, d.bars(), TimestampFormat::Iso8601).unwrap();
    drop(f);
    let from_csv = MarketData::from_csv(&path, PipelineConfig::default()).unwrap();
    assert_eq!(
        from_csv.interval(),
        d.interval(),
        "the interval is detected from the file"
    );
    assert_eq!(from_csv.first_ready(), d.first_ready());
    assert_eq!(
        from_csv.regime(d.first_ready()),
        None,
        "real data has no regime labels"
    );
    let (mut a, mut b) = (vec![0f32; OBS_DIM], vec![0f32; OBS_DIM]);
    for t in [d.first_ready(), d.first_ready() + 1000, d.len() - 1] {
        d.observation(t, &mut a).unwrap();
        from_csv.observation(t, &mut b).unwrap();
        assert_eq!(a, b, "bar {t}");
    }
    // With no labels the oracle has nothing to go on and stays flat.
    let mut e = TradingEnv::new(
        Arc::new(from_csv),
        EnvConfig {
            episode_bars: 20,
            cost_bps: 1.0,
        },
    )
    .unwrap();
    let r = evaluate(&mut e, &mut RegimeOracle, 3, 0).unwrap();
    assert!(r.episode_returns.iter().all(|&x| x == 0.0));
}

#[test]
fn the_pipeline_runs_on_whatever_interval_the_data_has() {
    use gm_market::BarInterval;
    for (secs, want) in [
        (60, BarInterval::M1),
        (3600, BarInterval::H1),
        (86_400, BarInterval::D1),
    ] {
        let g = GeneratorConfig {
            seed: 3,
            bar_interval_secs: secs,
            ..GeneratorConfig::default()
        };
        let (bars, _) = gm_market::SyntheticMarket::new(g).unwrap().generate(2600);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bars.csv");
        let mut f = std::fs::File::create(&path).unwrap();
        write_csv(&mut f, &bars, TimestampFormat::UnixSeconds).unwrap();
        drop(f);
        let d = MarketData::from_csv(&path, PipelineConfig::default()).unwrap();
        assert_eq!(d.interval(), want);
        let mut o = vec![0f32; OBS_DIM];
        for t in [d.first_ready(), d.len() - 1] {
            d.observation(t, &mut o).unwrap();
            assert!(o.iter().all(|x| x.is_finite()), "{want} bar {t}");
        }
    }
}
