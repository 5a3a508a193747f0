//! Leak-detector accuracy, for `cargo xtask bench memory`: prints one JSON
//! object on stdout. Steps, not time: the figures do not depend on the
//! machine.
//!
//! - `leak_detect_steps_1kib`: steps until the first leak verdict for a
//!   planted 1 KiB/step leak, worst over the grid the detector's tests assert
//!   (64 MiB base, 8 MiB sawtooth with periods 20, 35, 50, 75 and 100 steps,
//!   noise standard deviations 32, 64 and 128 KiB, seeds 1..=5); `null` if
//!   any run is not detected within 10 000 steps (exit status 1).
//! - `leak_detect_steps_1kib_noise256k` / `_median`: the same leak in the
//!   noisier reference workload (`Workload::reference`: 256 KiB noise,
//!   period 50), worst and median over seeds 1..=8.
//! - `leak_false_positives_10k`: leak verdicts over 10 000 steps without a
//!   leak, summed over seeds 1..=8 of the reference workload (256 KiB noise)
//!   and of plain noise and sawtooth periods 20 and 100 at that noise.
//!
//! Run: `cargo run --release -p gm-leak --example leak_accuracy`.

use gm_leak::workload::Workload;
use gm_leak::{leak_verdicts, steps_to_detection, DetectorConfig};

const KIB: f64 = 1024.0;

fn detect(config: &DetectorConfig, w: Workload) -> Option<u64> {
    steps_to_detection(config, w.with_leak(1024.0).series().take(10_000))
        .expect("default config is valid")
}

fn worst_and_median(mut v: Vec<Option<u64>>) -> (Option<u64>, Option<u64>) {
    if v.iter().any(Option::is_none) {
        return (None, None);
    }
    v.sort_unstable();
    (v[v.len() - 1], v[v.len() / 2])
}

fn main() {
    let config = DetectorConfig::default();
    let mut grid = Vec::new();
    for noise_kib in [32.0, 64.0, 128.0] {
        for period in [20, 35, 50, 75, 100] {
            for seed in 1..=5 {
                let w = Workload {
                    period_steps: period,
                    noise_sd_bytes: noise_kib * KIB,
                    ..Workload::reference(seed)
                };
                grid.push(detect(&config, w));
            }
        }
    }
    let (grid_worst, grid_median) = worst_and_median(grid.clone());
    eprintln!("grid (noise 32-128 KiB, periods 20-100, 5 seeds): worst {grid_worst:?}, median {grid_median:?}");
    let heavy: Vec<Option<u64>> = (1..=8)
        .map(|seed| detect(&config, Workload::reference(seed)))
        .collect();
    let (heavy_worst, heavy_median) = worst_and_median(heavy.clone());
    eprintln!("reference workload (256 KiB noise): {heavy:?}");
    let mut false_positives = 0;
    for seed in 1..=8u64 {
        for w in [
            Workload::reference(seed),
            Workload {
                sawtooth_bytes: 0,
                period_steps: 0,
                ..Workload::reference(seed)
            },
            Workload {
                period_steps: 20,
                ..Workload::reference(seed)
            },
            Workload {
                period_steps: 100,
                ..Workload::reference(seed)
            },
        ] {
            false_positives +=
                leak_verdicts(&config, w.series().take(10_000)).expect("default config is valid");
        }
    }
    eprintln!("{false_positives} leak verdicts over 32 steady runs of 10 000 steps");
    let json = serde_json::json!({
        "leak_detect_steps_1kib": grid_worst,
        "leak_detect_steps_1kib_median": grid_median,
        "leak_detect_steps_1kib_noise256k": heavy_worst,
        "leak_detect_steps_1kib_noise256k_median": heavy_median,
        "leak_false_positives_10k": false_positives,
        "leak_steady_runs_10k": 32,
    });
    println!("{json}");
    if grid_worst.is_none() || heavy_worst.is_none() {
        std::process::exit(1);
    }
}
