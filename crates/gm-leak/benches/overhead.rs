//! What counting (and sampling) adds to an alloc+free pair: one pair per
//! iteration through the `GlobalAlloc` trait, for `System` alone, a
//! `TrackingAllocator` around it, and the same with sampling on at the
//! default mean (512 KiB). Target: at most 15 ns added per pair with
//! sampling off.
//!
//! ```text
//! cargo bench -p gm-leak --bench overhead
//! ```
//!
//! Ids: `alloc_free/{system,tracking,tracking_sampled}/{64B,4096B}`; one
//! element = one pair.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gm_leak::{disable_sampling, enable_sampling, SamplingConfig, TrackingAllocator};

fn pair<A: GlobalAlloc>(a: &A, layout: Layout) {
    // SAFETY: `layout` has a non-zero size; the block is freed at once, by
    // the allocator that made it, with the same layout (a null from a failed
    // allocation is never freed).
    unsafe {
        let p = a.alloc(black_box(layout));
        if !p.is_null() {
            a.dealloc(black_box(p), layout);
        }
    }
}

fn alloc_free(c: &mut Criterion) {
    let tracking = TrackingAllocator::new(System);
    let mut group = c.benchmark_group("alloc_free");
    group.throughput(Throughput::Elements(1));
    for size in [64usize, 4096] {
        let layout = Layout::from_size_align(size, 8).expect("valid layout");
        let id = format!("{size}B");
        group.bench_function(format!("system/{id}"), |b| b.iter(|| pair(&System, layout)));
        group.bench_function(format!("tracking/{id}"), |b| {
            b.iter(|| pair(&tracking, layout))
        });
        enable_sampling(SamplingConfig::default()).expect("enable sampling");
        group.bench_function(format!("tracking_sampled/{id}"), |b| {
            b.iter(|| pair(&tracking, layout))
        });
        disable_sampling();
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = alloc_free
}
criterion_main!(benches);
