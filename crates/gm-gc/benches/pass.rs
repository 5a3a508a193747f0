//! Overhead of one reclaim pass over 10 no-op components: measuring (two
//! RSS reads and two gauge reads per component), catching panics, ordering
//! tiers, recording the report. With and without the trim.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gm_core::{Reclaim, ReclaimLevel, ReclaimTier};
use gm_gc::{Builder, Config, Handle, Trigger};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Counts allocations, to report what a pass allocates next to its time.
struct Counting {
    allocs: AtomicU64,
    bytes: AtomicU64,
}

// SAFETY: forwards every call to `System` unchanged; the counters are
// lock-free atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        self.allocs.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(l.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed through to System.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting {
    allocs: AtomicU64::new(0),
    bytes: AtomicU64::new(0),
};

struct Noop(&'static str, ReclaimTier);
impl Reclaim for Noop {
    fn name(&self) -> &str {
        self.0
    }
    fn tier(&self) -> ReclaimTier {
        self.1
    }
    fn reclaimable_bytes(&self) -> u64 {
        0
    }
    fn reclaim(&self, _: ReclaimLevel) -> u64 {
        0
    }
}

fn coordinator(trim: bool, gauge: bool) -> (Handle, Vec<Arc<Noop>>) {
    let mut b = Builder::new().config(Config {
        period: None,
        trim_after_pass: trim,
        ..Config::default()
    });
    if gauge {
        b = b.heap_gauge(|| ALLOC.bytes.load(Ordering::Relaxed));
    }
    let h = b.spawn().expect("spawn");
    let tiers = [
        ReclaimTier::State,
        ReclaimTier::Compressible,
        ReclaimTier::Cache,
    ];
    let comps: Vec<_> = (0..10)
        .map(|i| Arc::new(Noop("noop", tiers[i % 3])))
        .collect();
    for c in &comps {
        h.register(c);
    }
    (h, comps)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("pass");
    g.throughput(Throughput::Elements(10));
    for (id, trim, gauge) in [
        ("noop10/rss", false, false),
        ("noop10/rss+gauge", false, true),
        ("noop10/rss+gauge+trim", true, true),
    ] {
        let (h, _comps) = coordinator(trim, gauge);
        let before = (
            ALLOC.allocs.load(Ordering::Relaxed),
            ALLOC.bytes.load(Ordering::Relaxed),
        );
        black_box(h.run_pass(Trigger::Emergency, None).expect("pass"));
        let after = (
            ALLOC.allocs.load(Ordering::Relaxed),
            ALLOC.bytes.load(Ordering::Relaxed),
        );
        println!(
            "{id}: one pass allocates {} times, {} bytes (report + history copy)",
            after.0 - before.0,
            after.1 - before.1
        );
        g.bench_function(id, |b| b.iter(|| black_box(h.emergency())));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
