//! Criterion suite for gm-buffers on the replay_peers.py transition
//! (`cargo bench -p gm-buffers --bench replay`): adds, uniform and
//! prioritized sampling, raw vs de-duplicated vs compressed layouts. The
//! counting allocator runs underneath, and each case prints the
//! allocations of one iteration next to criterion's time.
//!
//! The peer comparison (ratios to cpprb in the same run) is
//! `cargo xtask bench buffers`.

#[path = "support/pool.rs"]
mod pool;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gm_buffers::{PerConfig, PrioritizedReplayBuffer, ReplayBuffer};
use gm_leak::{measure_thread, TrackingAllocator};
use pool::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::hint::black_box;

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator::system();

fn filled(pool: &Pool, dedup: bool, budget: Option<u64>) -> (ReplayBuffer, Cursor) {
    let (schema, mut cfg) = if dedup {
        (dedup_schema(), config(CAP))
    } else {
        (raw_schema(), config(CAP))
    };
    if budget.is_some() {
        cfg.byte_budget = budget;
        cfg.chunk_bytes = 4096;
    }
    let mut buf = ReplayBuffer::new(schema, cfg).expect("buffer");
    let mut cur = Cursor::default();
    for _ in 0..CAP / B {
        add(pool, &mut buf, &mut cur, dedup, B);
    }
    (buf, cur)
}

fn add(pool: &Pool, buf: &mut ReplayBuffer, cur: &mut Cursor, dedup: bool, n: usize) {
    let (s, end) = cur.take(n);
    let r = if dedup {
        buf.add_batch(&pool.dedup_cols(s, n))
    } else {
        buf.add_batch(&pool.raw_cols(s, n))
    };
    r.expect("add");
    if end {
        buf.mark_episode_end();
    }
}

/// Runs one warm-up iteration, then prints what the next one allocates.
fn note_allocations(id: &str, mut f: impl FnMut()) {
    f();
    let (_, m) = measure_thread(f);
    eprintln!(
        "{id}: one iteration = {} allocations, {} bytes allocated",
        m.allocations, m.allocated_bytes
    );
}

fn bench_add(c: &mut Criterion) {
    let pool = Pool::new(0);
    let mut g = c.benchmark_group("add");
    for (name, dedup) in [("dedup", true), ("raw", false)] {
        let (mut buf, mut cur) = filled(&pool, dedup, None);
        g.throughput(Throughput::Elements(B as u64));
        note_allocations(&format!("add/{name}/batch256"), || {
            add(&pool, &mut buf, &mut cur, dedup, B)
        });
        g.bench_function(format!("{name}/batch256"), |b| {
            b.iter(|| add(&pool, &mut buf, &mut cur, dedup, B))
        });
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("{name}/single"), |b| {
            b.iter(|| {
                if cur.0 + 1 >= POOL {
                    cur.0 = 0;
                    buf.mark_episode_end();
                }
                add(&pool, &mut buf, &mut cur, dedup, 1)
            })
        });
    }
    g.finish();
}

fn bench_sample(c: &mut Criterion) {
    let pool = Pool::new(0);
    let mut g = c.benchmark_group("sample");
    g.throughput(Throughput::Elements(B as u64));
    for (name, dedup, budget) in [
        ("dedup", true, None),
        ("raw", false, None),
        ("dedup-lz4", true, Some(10_000_000)),
    ] {
        let (buf, _) = filled(&pool, dedup, budget);
        let mut batch = buf.new_batch();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        note_allocations(&format!("sample/uniform/{name}/batch256"), || {
            buf.sample_into(&mut batch, B, &mut rng).expect("sample")
        });
        g.bench_function(format!("uniform/{name}/batch256"), |b| {
            b.iter(|| {
                buf.sample_into(black_box(&mut batch), B, &mut rng)
                    .expect("sample")
            })
        });
    }
    // Prioritized: sample + update, de-duplicated layout.
    let per = PerConfig {
        eps: 1e-4,
        ..PerConfig::default()
    };
    let mut buf = PrioritizedReplayBuffer::new(dedup_schema(), config(CAP), per).expect("buffer");
    let mut cur = Cursor::default();
    for _ in 0..CAP / B {
        let (s, end) = cur.take(B);
        buf.add_batch(&pool.dedup_cols(s, B)).expect("add");
        if end {
            buf.mark_episode_end();
        }
    }
    let mut batch = buf.new_batch();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut k = 0usize;
    let mut step =
        |buf: &mut PrioritizedReplayBuffer, batch: &mut gm_buffers::Batch, rng: &mut ChaCha8Rng| {
            buf.sample_into(batch, B, rng).expect("sample");
            let p = &pool.prio[(k & 63) * B..((k & 63) + 1) * B];
            buf.update_priorities(batch.indices(), p).expect("update");
            k += 1;
        };
    note_allocations("sample/prioritized/dedup/batch256+update", || {
        step(&mut buf, &mut batch, &mut rng)
    });
    g.bench_function("prioritized/dedup/batch256+update", |b| {
        b.iter(|| step(&mut buf, &mut batch, &mut rng))
    });
    g.finish();
}

criterion_group!(benches, bench_add, bench_sample);
criterion_main!(benches);
