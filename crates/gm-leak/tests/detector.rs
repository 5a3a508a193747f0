//! The leak detector's promises, on synthetic series with a known answer
//! ([`gm_leak::workload::Workload`]: base + sawtooth + seeded Gaussian-ish
//! noise + planted leak / one-time jump; the formula is in its docs):
//! (a) a 1 KiB/step leak inside a noisy sawtooth is found within 300 steps,
//! (b) 10 000 steady steps give no leak verdict, (c) results are
//! deterministic, (d) a slow leak is found within one window and a one-time
//! jump is not reported once the window has passed it. Steps, not time:
//! nothing here depends on how fast the machine is.

use gm_leak::workload::{SplitMix64, Workload};
use gm_leak::{
    leak_verdicts, steps_to_detection, DetectorConfig, Error, LeakDetector, Registry, Snapshot,
    Verdict,
};
use std::sync::Arc;

const KIB: f64 = 1024.0;
const MIB: u64 = 1 << 20;

/// Median and worst of `steps` (`None` = not detected, counted as worst).
fn summary(steps: &[Option<u64>]) -> (u64, u64) {
    let mut v: Vec<u64> = steps.iter().map(|s| s.unwrap_or(u64::MAX)).collect();
    v.sort_unstable();
    (v[v.len() / 2], v[v.len() - 1])
}

fn sawtooth(period: u64, noise_sd: f64, seed: u64) -> Workload {
    Workload {
        period_steps: period,
        noise_sd_bytes: noise_sd,
        ..Workload::reference(seed)
    }
}

#[test]
fn workload_is_what_its_docs_say() {
    // Noise: mean 0, standard deviation 1 (sum of 12 uniforms minus 6).
    let mut rng = SplitMix64::new(7);
    let xs: Vec<f64> = (0..20_000).map(|_| rng.next_gaussish()).collect();
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64).sqrt();
    assert!(
        mean.abs() < 0.03 && (sd - 1.0).abs() < 0.03,
        "mean {mean}, sd {sd}"
    );
    // Without noise: exact sawtooth plus leak.
    let w = Workload {
        noise_sd_bytes: 0.0,
        ..Workload::reference(1).with_leak(1024.0)
    };
    let s: Vec<u64> = w.series().take(101).collect();
    assert_eq!(s[0], 64 * MIB);
    assert_eq!(s[25], 64 * MIB + 4 * MIB + 25 * 1024);
    assert_eq!(s[50], 64 * MIB + 50 * 1024, "drops back at the period");
    assert_eq!(s[100], 64 * MIB + 100 * 1024);
}

/// (a) The planted 1 KiB/step leak of the reference workload (64 MiB base,
/// 8 MiB sawtooth) with periods 20 to 100 and noise standard deviations 32 to
/// 128 KiB, five seeds each: every run is detected by step 300.
#[test]
fn finds_1kib_per_step_leak_in_noisy_sawtooth_within_300_steps() {
    let config = DetectorConfig::default();
    let mut all = Vec::new();
    for noise_kib in [32.0, 64.0, 128.0] {
        for period in [20, 35, 50, 75, 100] {
            let runs: Vec<Option<u64>> = (1..=5)
                .map(|seed| {
                    let w = sawtooth(period, noise_kib * KIB, seed).with_leak(1024.0);
                    steps_to_detection(&config, w.series().take(301)).unwrap()
                })
                .collect();
            let (median, worst) = summary(&runs);
            println!("noise sd {noise_kib:>3} KiB, period {period:>3}: median {median}, worst {worst} steps");
            all.push((noise_kib, period, runs));
        }
    }
    for (noise_kib, period, runs) in &all {
        for (seed, r) in (1..).zip(runs) {
            assert!(
                r.is_some_and(|s| s <= 300),
                "noise {noise_kib} KiB, period {period}, seed {seed}: detected at {r:?}"
            );
        }
    }
}

/// (a, heavier noise) At 256 KiB noise standard deviation the same leak
/// needs more steps: 300 samples hold too little evidence for a test strict
/// enough to pass (b). Bound: 450 steps.
#[test]
fn finds_1kib_per_step_leak_under_256kib_noise_within_450_steps() {
    let config = DetectorConfig::default();
    for period in [20, 50, 100] {
        let runs: Vec<Option<u64>> = (1..=5)
            .map(|seed| {
                let w = sawtooth(period, 256.0 * KIB, seed).with_leak(1024.0);
                steps_to_detection(&config, w.series().take(451)).unwrap()
            })
            .collect();
        let (median, worst) = summary(&runs);
        println!("noise sd 256 KiB, period {period:>3}: median {median}, worst {worst} steps");
        assert!(worst <= 450, "period {period}: {runs:?}");
    }
}

/// Leak verdicts in 10 000 steps of each series, printed per series.
fn count_false_positives(name: &str, series: impl Fn(u64) -> Vec<u64>) -> u64 {
    let config = DetectorConfig::default();
    let mut total = 0;
    for seed in 1..=3 {
        let s = series(seed);
        assert_eq!(s.len(), 10_000);
        let leaks = leak_verdicts(&config, s).unwrap();
        println!("{name}, seed {seed}: {leaks} leak verdicts in 10000 steps");
        total += leaks;
    }
    total
}

/// (b) 10 000 steps of 256 KiB noise around 64 MiB, three seeds: not a
/// single leak verdict.
#[test]
fn no_leak_verdict_in_10k_steps_of_plain_noise() {
    let fp = count_false_positives("plain noise", |seed| {
        Workload {
            sawtooth_bytes: 0,
            period_steps: 0,
            ..Workload::reference(seed)
        }
        .series()
        .take(10_000)
        .collect()
    });
    assert_eq!(fp, 0);
}

/// (b) The reference 8 MiB sawtooth with 256 KiB noise and `period`, 10 000
/// steps, three seeds: no leak verdict.
fn no_leak_in_sawtooth(period: u64) {
    let fp = count_false_positives(&format!("sawtooth period {period}"), |seed| {
        sawtooth(period, 256.0 * KIB, seed)
            .series()
            .take(10_000)
            .collect()
    });
    assert_eq!(fp, 0);
}

#[test]
fn no_leak_verdict_in_10k_steps_of_sawtooth_period_20() {
    no_leak_in_sawtooth(20);
}

#[test]
fn no_leak_verdict_in_10k_steps_of_sawtooth_period_50() {
    no_leak_in_sawtooth(50);
}

#[test]
fn no_leak_verdict_in_10k_steps_of_sawtooth_period_100() {
    no_leak_in_sawtooth(100);
}

/// (b) Irregular cycles, where a comparison at a fixed lag would drift
/// through the cycle: lengths drawn from 45..=55 steps, and a non-integer
/// period of 50.5 steps. 10 000 steps, three seeds each: no leak verdict.
#[test]
fn no_leak_verdict_in_10k_steps_of_irregular_cycles() {
    let fp = count_false_positives("random cycle lengths", |seed| jittered(seed, 10_000))
        + count_false_positives("period 50.5", |seed| alternating(seed, 10_000));
    assert_eq!(fp, 0);
}

/// A sawtooth whose cycles last 45 to 55 steps (uniformly, seeded), rising by
/// 8 MiB / 50 per step, with 256 KiB noise.
fn jittered(seed: u64, n: usize) -> Vec<u64> {
    let mut rng = SplitMix64::new(seed ^ 0x5EED);
    let (mut phase, mut len) = (0u64, 50u64);
    (0..n)
        .map(|_| {
            let v = 64.0 * MIB as f64
                + (8 * MIB) as f64 * phase as f64 / 50.0
                + 256.0 * KIB * rng.next_gaussish();
            phase += 1;
            if phase == len {
                phase = 0;
                len = 45 + rng.next_u64() % 11;
            }
            v.round() as u64
        })
        .collect()
}

/// An 8 MiB sawtooth with period 50.5 sampled every step (cycles of 50 and 51
/// steps alternately, the ramp continuous in time), with 256 KiB noise.
fn alternating(seed: u64, n: usize) -> Vec<u64> {
    let mut rng = SplitMix64::new(seed ^ 0xA17);
    (0..n)
        .map(|t| {
            let phase = (t as f64 % 50.5) / 50.5;
            (64.0 * MIB as f64 + (8 * MIB) as f64 * phase + 256.0 * KIB * rng.next_gaussish())
                .round() as u64
        })
        .collect()
}

/// (c) The same series twice gives the same verdict at every step and the
/// same analysis, bit for bit (compared as JSON text and with `==`).
#[test]
fn same_series_same_reports() {
    let run = || {
        let mut d = LeakDetector::new(DetectorConfig::default()).unwrap();
        let heap = sawtooth(50, 128.0 * KIB, 9).with_leak(512.0).series();
        let mut verdicts = Vec::new();
        for (step, h) in (0..600u64).zip(heap) {
            let snap = Snapshot::new(step, h)
                .with_objects([("batch", step / 3), ("const", 7)])
                .with_sites([("a.rs:1", 1000 + 10 * step), ("b.rs:2", 5000 + step % 7)]);
            verdicts.push(d.observe(&snap).unwrap());
        }
        (verdicts, d.analyze())
    };
    let (v1, a1) = run();
    let (v2, a2) = run();
    assert_eq!(v1, v2);
    assert_eq!(a1, a2);
    assert_eq!(
        serde_json::to_string(&a1).unwrap(),
        serde_json::to_string(&a2).unwrap()
    );
    assert!(v1.contains(&Verdict::Leak), "the 512 B/step leak is found");
    let rate = a1.heap.rate.expect("analyze computes the rate");
    assert!(rate.low <= 512.0 && 512.0 <= rate.high, "{rate:?}");
}

/// (d) A 64 B/step leak under the reference 8 MiB / 50-step sawtooth with
/// 64 KiB noise is found "eventually", defined as: within one default window
/// (1024 steps) of the leak starting, for every seed.
#[test]
fn slow_64_bytes_per_step_leak_found_within_one_window() {
    let config = DetectorConfig::default();
    let runs: Vec<Option<u64>> = (1..=5)
        .map(|seed| {
            let w = sawtooth(50, 64.0 * KIB, seed).with_leak(64.0);
            steps_to_detection(&config, w.series().take(1025)).unwrap()
        })
        .collect();
    let (median, worst) = summary(&runs);
    println!("64 B/step: median {median}, worst {worst} steps");
    assert!(worst <= 1024, "{runs:?}");
}

/// (d) A one-time jump of 16 MiB at step 500 (a cache warming up), on the
/// reference sawtooth and on plain noise (64 KiB noise). A jump is growth
/// while it is inside the window; "not reported once the level is flat"
/// means: no leak verdict once the window holds only the new level, i.e.
/// from `window_samples` steps after the jump on.
#[test]
fn one_time_jump_not_reported_once_level_is_flat() {
    let config = DetectorConfig::default();
    for (name, period) in [("sawtooth", 50), ("plain noise", 0)] {
        for seed in 1..=3 {
            let w = Workload {
                jump_bytes: 16 * MIB,
                jump_at_step: Some(500),
                ..sawtooth(period, 64.0 * KIB, seed)
            };
            let mut d = LeakDetector::new(config.clone()).unwrap();
            let (mut during, mut after) = (0, 0);
            for (step, h) in (0..4000u64).zip(w.series()) {
                if d.observe_heap(step, h).unwrap() == Verdict::Leak {
                    if step < 500 + config.window_samples as u64 {
                        during += 1;
                    } else {
                        after += 1;
                    }
                }
            }
            println!(
                "{name}, seed {seed}: {during} leak verdicts while the jump was in the window, {after} after"
            );
            assert_eq!(after, 0, "{name}, seed {seed}");
        }
    }
}

#[test]
fn flat_series_is_no_leak_and_short_is_insufficient() {
    let mut d = LeakDetector::new(DetectorConfig::default()).unwrap();
    for step in 0..127 {
        assert_eq!(d.observe_heap(step, 4096).unwrap(), Verdict::Insufficient);
    }
    assert_eq!(d.observe_heap(127, 4096).unwrap(), Verdict::NoLeak);
    let t = d.heap_trend();
    assert_eq!((t.s, t.z, t.samples), (0, 0.0, 128));
    assert_eq!(t.rate.unwrap().per_step, 0.0);
}

#[test]
fn noise_free_leak_rate_is_exact() {
    let mut d = LeakDetector::new(DetectorConfig::default()).unwrap();
    for step in 0..200u64 {
        d.observe_heap(step * 10, 1_000_000 + 300 * step).unwrap();
    }
    let t = d.heap_trend();
    assert_eq!(t.verdict, Verdict::Leak);
    let r = t.rate.unwrap();
    assert_eq!(
        (r.per_step, r.low, r.high),
        (30.0, 30.0, 30.0),
        "30 bytes per unit of step"
    );
}

#[test]
fn min_rate_keeps_small_growth_out() {
    let config = DetectorConfig {
        min_rate_bytes_per_step: 100.0,
        ..DetectorConfig::default()
    };
    let leak = |rate| {
        let w = sawtooth(50, 16.0 * KIB, 3).with_leak(rate);
        steps_to_detection(&config, w.series().take(1000)).unwrap()
    };
    assert_eq!(leak(50.0), None, "50 B/step is below the floor");
    assert!(leak(400.0).is_some());
}

#[test]
fn config_validation_names_the_field() {
    let cases: [(&str, DetectorConfig); 6] = [
        (
            "window_samples",
            DetectorConfig {
                window_samples: 8,
                ..DetectorConfig::default()
            },
        ),
        (
            "min_samples",
            DetectorConfig {
                min_samples: 2000,
                ..DetectorConfig::default()
            },
        ),
        (
            "alpha",
            DetectorConfig {
                alpha: 0.0,
                ..DetectorConfig::default()
            },
        ),
        (
            "confidence",
            DetectorConfig {
                confidence: 1.0,
                ..DetectorConfig::default()
            },
        ),
        (
            "min_rate_bytes_per_step",
            DetectorConfig {
                min_rate_bytes_per_step: f64::NAN,
                ..DetectorConfig::default()
            },
        ),
        (
            "release_sigmas",
            DetectorConfig {
                release_sigmas: 0.5,
                ..DetectorConfig::default()
            },
        ),
    ];
    for (key, c) in cases {
        match LeakDetector::new(c) {
            Err(Error::DetectorConfig { key: k, .. }) => assert_eq!(k, key),
            other => panic!("{key}: {other:?}"),
        }
    }
    DetectorConfig::default().validate().unwrap();
    let z = DetectorConfig::default().z_threshold();
    assert!((z - 4.753).abs() < 1e-3, "{z}");
}

#[test]
fn steps_must_increase() {
    let mut d = LeakDetector::new(DetectorConfig::default()).unwrap();
    d.observe_heap(5, 100).unwrap();
    let e = d.observe(&Snapshot::new(5, 200)).unwrap_err();
    assert_eq!(
        e,
        Error::StepNotIncreasing {
            previous: 5,
            step: 5
        }
    );
    assert!(e.to_string().contains("must increase"), "{e}");
    assert_eq!(d.samples(), 1, "rejected snapshot not added");
}

/// Registry counts fed to the detector: a label whose objects are kept (a
/// batch pushed into a Vec every step) grows; one whose objects are dropped
/// every step, and one with a constant live count, do not.
#[test]
fn registry_labels_that_keep_growing_are_reported() {
    let registry = Registry::new();
    let mut d = LeakDetector::new(DetectorConfig::default()).unwrap();
    let mut kept = Vec::new();
    let fixed: Vec<Arc<u64>> = (0..10).map(Arc::new).collect();
    for f in &fixed {
        registry.track("fixed", f);
    }
    for step in 0..300u64 {
        let batch = Arc::new(vec![0u8; 64]);
        registry.track("batch", &batch);
        kept.push(batch);
        let scratch = Arc::new(step);
        registry.track("scratch", &scratch);
        drop(scratch);
        let snap = Snapshot::new(step, 0).with_objects(registry.snapshot());
        d.observe(&snap).unwrap();
    }
    let a = d.analyze();
    assert_eq!(a.growing_labels, ["batch"]);
    let batch = a.labels.iter().find(|l| l.key == "batch").unwrap();
    assert_eq!(batch.latest, 300);
    assert_eq!(batch.trend.rate.unwrap().per_step, 1.0);
    let scratch = a.labels.iter().find(|l| l.key == "scratch").unwrap();
    assert_eq!(
        (scratch.latest, scratch.trend.verdict),
        (0, Verdict::NoLeak)
    );
    let fixed_t = a.labels.iter().find(|l| l.key == "fixed").unwrap();
    assert_eq!(
        (fixed_t.latest, fixed_t.trend.verdict),
        (10, Verdict::NoLeak)
    );
}

/// Per-site live bytes: the growing sites come out fastest first, steady
/// and noisy ones do not.
#[test]
fn top_growing_sites_by_slope() {
    let mut d = LeakDetector::new(DetectorConfig {
        top_sites: 2,
        ..DetectorConfig::default()
    })
    .unwrap();
    let mut rng = SplitMix64::new(4);
    for step in 0..400u64 {
        let noise = |rng: &mut SplitMix64| (4096.0 * rng.next_gaussish()) as i64;
        let snap = Snapshot::new(step, 0).with_sites([
            (
                "fast.rs:10",
                (1_000_000 + 2048 * step as i64 + noise(&mut rng)) as u64,
            ),
            (
                "slow.rs:20",
                (1_000_000 + 256 * step as i64 + noise(&mut rng)) as u64,
            ),
            ("steady.rs:30", (1_000_000 + noise(&mut rng)) as u64),
            ("tiny.rs:40", 100 + step / 100),
        ]);
        d.observe(&snap).unwrap();
    }
    let a = d.analyze();
    assert_eq!(a.sites_seen, 4);
    let keys: Vec<&str> = a.top_growing_sites.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys, ["fast.rs:10", "slow.rs:20"], "top 2, fastest first");
    let fast = a.top_growing_sites[0].trend.rate.unwrap();
    assert!((fast.per_step - 2048.0).abs() < 50.0, "{fast:?}");
}

/// Sites missing from a snapshot are gaps, and age out with the window.
#[test]
fn site_series_age_out_of_the_window() {
    let mut d = LeakDetector::new(DetectorConfig {
        window_samples: 100,
        min_samples: 10,
        ..DetectorConfig::default()
    })
    .unwrap();
    for step in 0..50u64 {
        d.observe(&Snapshot::new(step, 0).with_sites([("gone.rs:1", 1000 * step)]))
            .unwrap();
    }
    assert_eq!(d.analyze().top_growing_sites.len(), 1);
    for step in 50..150u64 {
        d.observe(&Snapshot::new(step, 0)).unwrap();
    }
    let a = d.analyze();
    assert_eq!((a.sites_seen, a.top_growing_sites.len()), (0, 0));
}
