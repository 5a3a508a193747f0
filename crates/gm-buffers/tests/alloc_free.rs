//! Zero allocations in steady state, counted by gm-leak's tracking
//! allocator on the test's own thread: sampling into a reused batch (uniform,
//! prioritized, from compressed chunks) and adding transitions allocate
//! nothing once warm.

use gm_buffers::{
    col, BufferConfig, DType, FieldSpec, PerConfig, PrioritizedReplayBuffer, ReplayBuffer, Schema,
    StorageMode,
};
use gm_leak::{measure_thread, TrackingAllocator};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator::system();

const W: usize = 12;
const F: usize = 3;

fn schema() -> Schema {
    Schema::new(vec![
        FieldSpec::window("bars", DType::F32, &[W, F]),
        FieldSpec::obs("state", DType::F32, &[5]),
        FieldSpec::plain("action", DType::I64, &[]),
        FieldSpec::plain("reward", DType::F32, &[]),
        FieldSpec::plain("done", DType::Bool, &[]),
    ])
    .unwrap()
}

fn config(cap: usize) -> BufferConfig {
    BufferConfig {
        storage: StorageMode::Memory,
        chunk_bytes: 4096,
        ..BufferConfig::with_capacity(cap)
    }
}

/// A smooth series so chunks compress; step `t` gives the window ending at `t`.
struct Feed {
    series: Vec<f32>,
    t: usize,
}

impl Feed {
    fn new() -> Self {
        let series = (0..(W + 20_000) * F)
            .map(|i| 100.0 + (i as f32 * 0.001).sin())
            .collect();
        Self { series, t: W }
    }
    fn window(&self, end: usize) -> &[f32] {
        &self.series[(end - W) * F..end * F]
    }
    fn add<B>(&mut self, mut add: impl FnMut(&[gm_buffers::Column<'_>]) -> B) -> B {
        if self.t + 1 >= self.series.len() / F {
            self.t = W;
        }
        let t = self.t;
        self.t += 1;
        let state = [t as f32; 5];
        let next_state = [(t + 1) as f32; 5];
        let action = [t as i64 % 3];
        let cols = [
            col(self.window(t)),
            col(self.window(t + 1)),
            col(&state),
            col(&next_state),
            col(&action),
            col(&[0.5f32]),
            col(&[false]),
        ];
        add(&cols)
    }
}

#[test]
fn uniform_sampling_into_a_reused_batch_allocates_nothing() {
    let mut buf = ReplayBuffer::new(schema(), config(5000)).unwrap();
    let mut feed = Feed::new();
    for _ in 0..8000 {
        feed.add(|c| buf.add(c).unwrap());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut batch = buf.new_batch();
    buf.sample_into(&mut batch, 256, &mut rng).unwrap();
    let (_, m) = measure_thread(|| {
        for _ in 0..200 {
            buf.sample_into(&mut batch, 256, &mut rng).unwrap();
        }
    });
    assert_eq!(m.allocations, 0, "{m}");
    // and a smaller batch reuses the same memory
    let (_, m) = measure_thread(|| buf.sample_into(&mut batch, 17, &mut rng).unwrap());
    assert_eq!(m.allocations, 0, "{m}");
}

#[test]
fn prioritized_sample_and_update_allocate_nothing() {
    let mut buf =
        PrioritizedReplayBuffer::new(schema(), config(5000), PerConfig::default()).unwrap();
    let mut feed = Feed::new();
    for _ in 0..6000 {
        feed.add(|c| buf.add(c).unwrap());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut batch = buf.new_batch();
    let prios: Vec<f32> = (0..256).map(|i| 0.1 + i as f32 * 0.01).collect();
    // warm-up: the batch and the update's scratch grow once
    buf.sample_into(&mut batch, 256, &mut rng).unwrap();
    buf.update_priorities(batch.indices(), &prios).unwrap();
    let (_, m) = measure_thread(|| {
        for _ in 0..200 {
            buf.sample_into(&mut batch, 256, &mut rng).unwrap();
            buf.update_priorities(batch.indices(), &prios).unwrap();
        }
    });
    assert_eq!(m.allocations, 0, "{m}");
}

#[test]
fn sampling_from_compressed_chunks_allocates_nothing_once_the_cache_is_warm() {
    let mut buf = ReplayBuffer::new(schema(), config(5000)).unwrap();
    let mut feed = Feed::new();
    for _ in 0..5000 {
        feed.add(|c| buf.add(c).unwrap());
    }
    assert!(buf.compress_cold(0) > 0, "smooth rows must compress");
    assert!(buf.stats().compressed_chunks > 0);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut batch = buf.new_batch();
    for _ in 0..50 {
        buf.sample_into(&mut batch, 256, &mut rng).unwrap(); // fills the decompression cache
    }
    let (_, m) = measure_thread(|| {
        for _ in 0..100 {
            buf.sample_into(&mut batch, 256, &mut rng).unwrap();
        }
    });
    assert_eq!(m.allocations, 0, "{m}");
    let (hits, misses) = batch.cache_stats();
    assert!(hits + misses > 0, "the batch read compressed chunks");
}

#[test]
fn adding_transitions_allocates_nothing_per_transition() {
    let mut buf = ReplayBuffer::new(schema(), config(3000)).unwrap();
    let mut feed = Feed::new();
    for _ in 0..4000 {
        feed.add(|c| buf.add(c).unwrap());
    }
    let (_, m) = measure_thread(|| {
        for _ in 0..3000 {
            feed.add(|c| buf.add(c).unwrap());
        }
    });
    assert_eq!(m.allocations, 0, "{m}");
    // add_batch: 64 transitions at a time from one window array
    let n = 64;
    let series: Vec<f32> = (0..(n + W + 1) * F).map(|i| i as f32).collect();
    let obs: Vec<f32> = (0..n)
        .flat_map(|t| series[t * F..(t + W) * F].iter().copied())
        .collect();
    let next: Vec<f32> = (1..=n)
        .flat_map(|t| series[t * F..(t + W) * F].iter().copied())
        .collect();
    let st: Vec<f32> = vec![1.0; n * 5];
    let act = vec![1i64; n];
    let rew = vec![0.0f32; n];
    let done = vec![false; n];
    let cols = [
        col(&obs),
        col(&next),
        col(&st),
        col(&st),
        col(&act),
        col(&rew),
        col(&done),
    ];
    buf.add_batch(&cols).unwrap();
    let (_, m) = measure_thread(|| {
        for _ in 0..100 {
            buf.mark_episode_end();
            buf.add_batch(&cols).unwrap();
        }
    });
    assert_eq!(m.allocations, 0, "{m}");
}
