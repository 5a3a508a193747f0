//! What counting (and sampling) adds to an alloc+free pair, with a plain
//! timing loop; prints one JSON object. `cargo xtask bench memory` runs it:
//!
//! ```text
//! cargo run --release -p gm-leak --example overhead
//! {"alloc_free_system_ns":..,"alloc_free_tracking_ns":..,"alloc_free_overhead_ns":..,"alloc_free_sampled_overhead_ns":..,...}
//! ```
//!
//! Each figure is the median over `RUNS` runs of `PAIRS` pairs of a 64-byte
//! block, allocated and freed through the `GlobalAlloc` trait (with
//! `black_box`), for `System` alone, a `TrackingAllocator` around it, and the
//! same with sampling on at the default mean (512 KiB). The three are
//! interleaved run by run so that drift (frequency, other load) hits all
//! alike. The criterion bench `benches/overhead.rs` measures the same pairs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::time::Instant;

use gm_leak::{disable_sampling, enable_sampling, SamplingConfig, TrackingAllocator};

const PAIRS: u64 = 10_000_000;
const RUNS: usize = 7;
const BLOCK_BYTES: usize = 64;

/// Nanoseconds per alloc+free pair over `PAIRS` pairs.
fn time_pairs<A: GlobalAlloc>(a: &A, layout: Layout) -> f64 {
    let t0 = Instant::now();
    for _ in 0..PAIRS {
        // SAFETY: `layout` has a non-zero size; the block is freed at once,
        // by the allocator that made it, with the same layout (a null from a
        // failed allocation is never freed).
        unsafe {
            let p = a.alloc(black_box(layout));
            if !p.is_null() {
                a.dealloc(black_box(p), layout);
            }
        }
    }
    t0.elapsed().as_nanos() as f64 / PAIRS as f64
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let layout = Layout::from_size_align(BLOCK_BYTES, 8).expect("valid layout");
    let tracking = TrackingAllocator::new(System);
    let config = SamplingConfig::default();
    // Warm up (page faults, frequency ramp, the unwinder's first use).
    enable_sampling(config).expect("enable sampling");
    time_pairs(&tracking, layout);
    disable_sampling();
    time_pairs(&System, layout);

    let (mut system, mut plain, mut sampled) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        system.push(time_pairs(&System, layout));
        plain.push(time_pairs(&tracking, layout));
        enable_sampling(config).expect("enable sampling");
        sampled.push(time_pairs(&tracking, layout));
        disable_sampling();
    }
    let (system, plain, sampled) = (median(system), median(plain), median(sampled));
    println!(
        "{{\"alloc_free_system_ns\":{system:.2},\"alloc_free_tracking_ns\":{plain:.2},\
         \"alloc_free_overhead_ns\":{:.2},\"alloc_free_sampled_ns\":{sampled:.2},\
         \"alloc_free_sampled_overhead_ns\":{:.2},\"block_bytes\":{BLOCK_BYTES},\
         \"pairs_per_run\":{PAIRS},\"runs\":{RUNS},\"sampling_mean_bytes\":{}}}",
        plain - system,
        sampled - system,
        config.mean_bytes_between_samples,
    );
}
