//! Fixtures shared by gm-train's integration tests: the same small
//! synchronous learner run and bit-level views of its tensors (`resume.rs`,
//! `learner_step.rs`, `learner_dp.rs`), a random TD batch and a gradient
//! comparison (`step.rs`, `zero.rs`, `zero_mpi.rs`, and
//! `examples/gpu_check.rs`, which includes this file).
#![allow(dead_code)] // each test crate uses a subset

use std::sync::{Arc, OnceLock};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use gm_buffers::{BufferConfig, StorageMode};
use gm_market::{EnvConfig, GeneratorConfig, MarketData, PipelineConfig, OBS_DIM};
use gm_train::{Grads, LearnerConfig, ObsBatch, TdBatch};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// 2 000 bars of the default synthetic market (generator seed 11), built
/// once per test binary.
pub fn data() -> Arc<MarketData> {
    static DATA: OnceLock<Arc<MarketData>> = OnceLock::new();
    DATA.get_or_init(|| {
        Arc::new(
            MarketData::synthetic(
                GeneratorConfig {
                    seed: 11,
                    ..GeneratorConfig::default()
                },
                2_000,
                PipelineConfig::default(),
            )
            .expect("synthetic market"),
        )
    })
    .clone()
}

/// The small run: tiny agent without dropout, seed 5, 2 environments,
/// 24-bar episodes, batch 8, updates once 16 transitions are stored.
pub fn config() -> LearnerConfig {
    let mut c = LearnerConfig::small();
    c.seed = 5;
    c.num_envs = 2;
    c.env = EnvConfig {
        episode_bars: 24,
        ..EnvConfig::default()
    };
    c.batch_size = 8;
    c.learning_starts_transitions = 16;
    c.replay_segment_steps = 8;
    c.replay = BufferConfig {
        capacity: 1_000,
        storage: StorageMode::Memory,
        ..BufferConfig::default()
    };
    c.epsilon.decay_transitions = 200;
    c.target_update = gm_train::TargetUpdate::Hard { every_updates: 7 };
    c.log_every_steps = 10;
    c
}

/// Every variable of `vm` as `(name, values)`, sorted by name.
pub fn var_values(vm: &VarMap) -> Vec<(String, Vec<f32>)> {
    let data = vm.data().lock().unwrap();
    let mut out: Vec<(String, Vec<f32>)> = data
        .iter()
        .map(|(n, v)| (n.clone(), tensor_values(v.as_tensor())))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every variable of `vm` as `(name, bits)`, sorted by name.
pub fn var_bits(vm: &VarMap) -> Vec<(String, Vec<u32>)> {
    var_values(vm)
        .into_iter()
        .map(|(n, v)| (n, v.into_iter().map(f32::to_bits).collect()))
        .collect()
}

/// A tensor's values, flattened.
pub fn tensor_values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// A tensor's values as bits, flattened.
pub fn tensor_bits(t: &Tensor) -> Vec<u32> {
    tensor_values(t).into_iter().map(f32::to_bits).collect()
}

/// A random TD batch of `b` rows (observations in [−1, 1), actions,
/// targets with some |δ| above κ = 1 and some below, importance weights),
/// the same for the same seed: the fixture of the step and ZeRO tests.
pub struct Data {
    pub obs: ObsBatch,
    pub actions: Vec<u32>,
    pub targets: Vec<f32>,
    pub weights: Vec<f32>,
}

impl Data {
    pub fn new(seed: u64, b: usize) -> Self {
        Self::on(seed, b, &Device::Cpu)
    }

    /// The same batch as [`Data::new`], its observations on `device`.
    pub fn on(seed: u64, b: usize, device: &Device) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let obs: Vec<f32> = (0..b * OBS_DIM)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        Self {
            obs: ObsBatch::from_flat(&obs, b, device).expect("observation batch"),
            actions: (0..b).map(|_| rng.random_range(0..3u32)).collect(),
            targets: (0..b).map(|i| if i % 3 == 0 { 3.0 } else { 0.2 }).collect(),
            weights: (0..b).map(|_| rng.random_range(0.2f32..1.0)).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.actions.len()
    }

    pub fn batch(&self) -> TdBatch<'_> {
        TdBatch {
            obs: &self.obs,
            actions: &self.actions,
            targets: &self.targets,
            weights: Some(&self.weights),
        }
    }
}

/// A tensor's values as f64, flattened (any device, any float dtype).
pub fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(candle_core::DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .expect("tensor values")
        .into_iter()
        .map(f64::from)
        .collect()
}

/// Worst per-variable `max |a − b| / max |b|` (the error relative to the
/// variable's largest reference gradient entry); panics when the two give
/// gradients to different variables or a difference is not finite.
pub fn grads_rel_err(a: &Grads, b: &Grads) -> f64 {
    let mut worst = 0f64;
    for ((name, _, x), (_, _, y)) in a.iter().zip(b.iter()) {
        match (x, y) {
            (None, None) => {}
            (Some(x), Some(y)) => {
                let (x, y) = (flat(x), flat(y));
                let scale = y.iter().fold(0f64, |m, v| m.max(v.abs()));
                let diff = x
                    .iter()
                    .zip(&y)
                    .fold(0f64, |m, (p, q)| m.max((p - q).abs()));
                assert!(diff.is_finite(), "{name}");
                if scale > 0.0 {
                    worst = worst.max(diff / scale);
                } else {
                    assert_eq!(diff, 0.0, "{name}");
                }
            }
            _ => panic!("{name}: a gradient in one run only"),
        }
    }
    worst
}
