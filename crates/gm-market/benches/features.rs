//! Criterion suite for the feature computers
//! (`cargo bench -p gm-market --bench features`): the structure features
//! on 30-minute bars and the 5-D LVN vector on 5-minute bars, both with
//! their default configs and measured in steady state (warmed up, kNN
//! memory full). Throughput is in bars; a counting allocator runs
//! underneath and each case prints the allocations of one batch.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gm_market::features::lvn::{LvnConfig, LvnFeatures};
use gm_market::features::structure::{StructureConfig, StructureFeatures};
use gm_market::Bar;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The system allocator, counting allocations and bytes.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED_BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the counters have no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        ALLOCATED_BYTES.fetch_add(layout.size() as u64, Relaxed);
        // SAFETY: same contract as our caller's: `layout` has non-zero size.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (through us) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        ALLOCATED_BYTES.fetch_add(new_size as u64, Relaxed);
        // SAFETY: `ptr` came from `System` with `layout`; `new_size` is
        // non-zero as our caller guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bars pushed per measured iteration.
const BATCH: usize = 1_000;
/// Length of the pre-generated bar pool (cycled).
const POOL: usize = 100_000;

/// A random walk with wicks and log-normal volume.
fn pool(seed: u64, step_secs: i64, start: f64) -> Vec<Bar> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut gauss = move || -> f64 {
        let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    };
    let mut close = start;
    (0..POOL)
        .map(|i| {
            let open = close;
            close = open * (0.003 * gauss()).exp();
            Bar {
                ts: 1_700_000_000 + i as i64 * step_secs,
                open,
                high: open.max(close) * (1.0 + 0.001 * gauss().abs()),
                low: open.min(close) * (1.0 - 0.001 * gauss().abs()),
                close,
                volume: 1_000.0 * (0.5 * gauss()).exp(),
            }
        })
        .collect()
}

/// Cycles through the pool.
struct Feed {
    bars: Vec<Bar>,
    at: usize,
}

impl Feed {
    fn next(&mut self) -> &Bar {
        let b = &self.bars[self.at];
        self.at = (self.at + 1) % self.bars.len();
        b
    }
}

/// Runs `f` once and prints what it allocated.
fn note_allocations(id: &str, f: impl FnOnce()) {
    let (a0, b0) = (ALLOCATIONS.load(Relaxed), ALLOCATED_BYTES.load(Relaxed));
    f();
    let (a1, b1) = (ALLOCATIONS.load(Relaxed), ALLOCATED_BYTES.load(Relaxed));
    eprintln!(
        "{id}: one batch of {BATCH} bars = {} allocations, {} bytes allocated",
        a1 - a0,
        b1 - b0
    );
}

fn bench_structure(c: &mut Criterion) {
    let cfg = StructureConfig::default();
    let mut f = StructureFeatures::new(cfg).expect("default config");
    let mut feed = Feed {
        bars: pool(1, 1800, 4_500.0),
        at: 0,
    };
    // Warm up until the kNN memory is full (39 + 2000 bars and then some).
    for _ in 0..3_000 {
        f.push(feed.next()).expect("valid");
    }
    let batch = |f: &mut StructureFeatures, feed: &mut Feed| {
        for _ in 0..BATCH {
            black_box(f.push(feed.next()).expect("valid"));
        }
    };
    note_allocations("structure/m30/batch1000", || batch(&mut f, &mut feed));
    let mut g = c.benchmark_group("structure");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("m30/batch1000", |b| b.iter(|| batch(&mut f, &mut feed)));
    g.finish();
}

fn bench_lvn(c: &mut Criterion) {
    let cfg = LvnConfig::default();
    let mut f = LvnFeatures::new(cfg).expect("default config");
    let mut feed = Feed {
        bars: pool(2, 300, 4_500.0),
        at: 0,
    };
    for _ in 0..cfg.warmup_bars() {
        f.push(feed.next()).expect("valid");
    }
    let batch = |f: &mut LvnFeatures, feed: &mut Feed| {
        for _ in 0..BATCH {
            black_box(f.push(feed.next()).expect("valid"));
        }
    };
    note_allocations("lvn/m5/batch1000", || batch(&mut f, &mut feed));
    let mut g = c.benchmark_group("lvn");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("m5/batch1000", |b| b.iter(|| batch(&mut f, &mut feed)));
    g.finish();
}

criterion_group!(benches, bench_structure, bench_lvn);
criterion_main!(benches);
