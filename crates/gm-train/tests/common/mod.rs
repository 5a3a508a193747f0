//! Fixtures shared by the learner's integration tests (`resume.rs`,
//! `learner_step.rs`): the same small synchronous run and bit-level views
//! of its tensors.
#![allow(dead_code)] // each test crate uses a subset

use std::sync::{Arc, OnceLock};

use candle_core::Tensor;
use candle_nn::VarMap;
use gm_buffers::{BufferConfig, StorageMode};
use gm_market::{EnvConfig, GeneratorConfig, MarketData, PipelineConfig};
use gm_train::LearnerConfig;

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
