//! The benchmark transition of `../shared/peers/replay_peers.py`, rebuilt in
//! Rust: 4096 pre-generated transitions whose observations are a 48x8 and a
//! 60x7 sliding window over random-walk feature series plus 13 scalars
//! (817 floats), action i64, reward f32, done bool.

#![allow(dead_code)] // shared by the criterion bench and the xtask example

use gm_buffers::{col, BufferConfig, Column, DType, FieldSpec, Schema};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const CAP: usize = 100_000;
pub const B: usize = 256;
pub const POOL: usize = 4096;
pub const W1: usize = 48;
pub const F1: usize = 8;
pub const W2: usize = 60;
pub const F2: usize = 7;
pub const EXTRA: usize = 13;
pub const OBS_DIM: usize = W1 * F1 + W2 * F2 + EXTRA; // 817
pub const LOGICAL_BYTES: usize = OBS_DIM * 4 * 2 + 8 + 4 + 1; // 6549

/// Pre-generated transitions, stored the way each layout's `add` takes them.
#[derive(Clone)]
pub struct Pool {
    /// Row-major [POOL + 1, 48, 8] windows.
    pub win48: Vec<f32>,
    /// Row-major [POOL + 1, 60, 7] windows.
    pub win60: Vec<f32>,
    /// [POOL + 1, 13].
    pub extra: Vec<f32>,
    /// [POOL + 1, 817]: the flat observation (time-major windows + extra).
    pub obs: Vec<f32>,
    pub act: Vec<i64>,
    pub rew: Vec<f32>,
    pub done: Vec<bool>,
    /// 64 x 256 priorities for update benchmarks.
    pub prio: Vec<f64>,
}

fn normal(rng: &mut ChaCha8Rng) -> f32 {
    // Box-Muller
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({POOL} transitions of {LOGICAL_BYTES} B)")
    }
}

impl Pool {
    pub fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let t = POOL + W2; // rows in each series: enough for POOL + 1 windows
        let walk = |rng: &mut ChaCha8Rng, f: usize| {
            let mut s = vec![0f32; t * f];
            let mut acc = vec![0f32; f];
            for r in 0..t {
                for k in 0..f {
                    acc[k] += normal(rng) * 0.01;
                    s[r * f + k] = acc[k] + 100.0;
                }
            }
            s
        };
        let s1 = walk(&mut rng, F1);
        let s2 = walk(&mut rng, F2);
        let off = W2 - W1; // both windows end at the same time step
        let n = POOL + 1;
        let mut win48 = Vec::with_capacity(n * W1 * F1);
        let mut win60 = Vec::with_capacity(n * W2 * F2);
        for i in 0..n {
            win48.extend_from_slice(&s1[(i + off) * F1..(i + off + W1) * F1]);
            win60.extend_from_slice(&s2[i * F2..(i + W2) * F2]);
        }
        let extra: Vec<f32> = (0..n * EXTRA).map(|_| normal(&mut rng)).collect();
        let mut obs = Vec::with_capacity(n * OBS_DIM);
        for i in 0..n {
            obs.extend_from_slice(&win48[i * W1 * F1..(i + 1) * W1 * F1]);
            obs.extend_from_slice(&win60[i * W2 * F2..(i + 1) * W2 * F2]);
            obs.extend_from_slice(&extra[i * EXTRA..(i + 1) * EXTRA]);
        }
        let act = (0..POOL).map(|_| rng.random_range(0..5i64)).collect();
        let rew = (0..POOL).map(|_| normal(&mut rng)).collect();
        let mut done = vec![false; POOL];
        done[POOL - 1] = true;
        let prio = (0..64 * B).map(|_| rng.random::<f64>() + 0.01).collect();
        Self {
            win48,
            win60,
            extra,
            obs,
            act,
            rew,
            done,
            prio,
        }
    }

    /// Columns of transitions `s..s+n` for the raw layout (obs, next_obs, act, rew, done).
    pub fn raw_cols(&self, s: usize, n: usize) -> [Column<'_>; 5] {
        let d = OBS_DIM;
        [
            col(&self.obs[s * d..(s + n) * d]),
            col(&self.obs[(s + 1) * d..(s + 1 + n) * d]),
            col(&self.act[s..s + n]),
            col(&self.rew[s..s + n]),
            col(&self.done[s..s + n]),
        ]
    }

    /// Columns of transitions `s..s+n` for the de-duplicated layout.
    pub fn dedup_cols(&self, s: usize, n: usize) -> [Column<'_>; 9] {
        let (a, b, e) = (W1 * F1, W2 * F2, EXTRA);
        [
            col(&self.win48[s * a..(s + n) * a]),
            col(&self.win48[(s + 1) * a..(s + 1 + n) * a]),
            col(&self.win60[s * b..(s + n) * b]),
            col(&self.win60[(s + 1) * b..(s + 1 + n) * b]),
            col(&self.extra[s * e..(s + n) * e]),
            col(&self.extra[(s + 1) * e..(s + 1 + n) * e]),
            col(&self.act[s..s + n]),
            col(&self.rew[s..s + n]),
            col(&self.done[s..s + n]),
        ]
    }
}

/// obs and next_obs stored whole, like cpprb's base layout.
pub fn raw_schema() -> Schema {
    Schema::new(vec![
        FieldSpec::plain("obs", DType::F32, &[OBS_DIM]),
        FieldSpec::plain("next_obs", DType::F32, &[OBS_DIM]),
        FieldSpec::plain("act", DType::I64, &[]),
        FieldSpec::plain("rew", DType::F32, &[]),
        FieldSpec::plain("done", DType::Bool, &[]),
    ])
    .expect("valid schema")
}

/// The two windows and the scalars as de-duplicated observation streams.
pub fn dedup_schema() -> Schema {
    Schema::new(vec![
        FieldSpec::window("win48", DType::F32, &[W1, F1]),
        FieldSpec::window("win60", DType::F32, &[W2, F2]),
        FieldSpec::obs("extra", DType::F32, &[EXTRA]),
        FieldSpec::plain("act", DType::I64, &[]),
        FieldSpec::plain("rew", DType::F32, &[]),
        FieldSpec::plain("done", DType::Bool, &[]),
    ])
    .expect("valid schema")
}

pub fn config(cap: usize) -> BufferConfig {
    BufferConfig {
        storage: gm_buffers::StorageMode::Memory,
        ..BufferConfig::with_capacity(cap)
    }
}

/// Cursor over the pool: transitions are replayed cyclically and every wrap
/// is an episode end, as in replay_peers.py.
#[derive(Debug, Default)]
pub struct Cursor(pub usize);

impl Cursor {
    /// Start of the next `n` transitions, and whether they end the episode.
    pub fn take(&mut self, n: usize) -> (usize, bool) {
        let s = self.0;
        self.0 += n;
        let end = self.0 >= POOL;
        if end {
            self.0 = 0;
        }
        (s, end)
    }
}
