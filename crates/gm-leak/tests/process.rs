//! Exact checks of the process-wide counters ([`gm_leak::stats`],
//! [`gm_leak::measure`]).
//!
//! `harness = false` (see Cargo.toml): libtest would run these on worker
//! threads while its own threads allocate, and process-wide figures would then
//! only be lower bounds. Here `main` runs each check in turn on the one
//! thread of the process, so every byte is accounted for exactly.

use std::hint::black_box;
use std::process::ExitCode;

use gm_leak::{measure, reset_peak, stats, AllocStats, TrackingAllocator};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator::system();

const CHECKS: &[(&str, fn())] = &[
    ("allocator_is_active", allocator_is_active),
    (
        "vec_of_known_size_moves_stats_exactly",
        vec_of_known_size_moves_stats_exactly,
    ),
    (
        "zeroed_allocation_counts_like_alloc",
        zeroed_allocation_counts_like_alloc,
    ),
    (
        "peak_tracks_a_temporary_allocation",
        peak_tracks_a_temporary_allocation,
    ),
    (
        "reset_peak_restarts_from_current",
        reset_peak_restarts_from_current,
    ),
    (
        "realloc_counts_the_size_delta",
        realloc_counts_the_size_delta,
    ),
    (
        "measure_reports_peak_and_nothing_retained",
        measure_reports_peak_and_nothing_retained,
    ),
    (
        "measure_reports_retained_return_value",
        measure_reports_retained_return_value,
    ),
    (
        "nested_measure_keeps_the_outer_peak",
        nested_measure_keeps_the_outer_peak,
    ),
    (
        "measure_restores_the_global_peak",
        measure_restores_the_global_peak,
    ),
    (
        "concurrent_threads_balance_out",
        concurrent_threads_balance_out,
    ),
];

fn main() -> ExitCode {
    // `cargo test -- NAME` filters like libtest; other flags are ignored.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut failed = 0;
    let mut ran = 0;
    for &(name, check) in CHECKS {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        match std::panic::catch_unwind(check) {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    println!("\n{ran} checks, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `after - before` for every counter (peak excluded).
fn delta(before: AllocStats, after: AllocStats) -> (i64, u64, u64, u64, u64, u64) {
    (
        after.current_bytes as i64 - before.current_bytes as i64,
        after.allocated_bytes - before.allocated_bytes,
        after.freed_bytes - before.freed_bytes,
        after.allocations - before.allocations,
        after.reallocations - before.reallocations,
        after.frees - before.frees,
    )
}

fn allocator_is_active() {
    assert!(gm_leak::is_active());
    gm_leak::assert_active();
}

fn vec_of_known_size_moves_stats_exactly() {
    let s0 = stats();
    let v: Vec<u8> = black_box(Vec::with_capacity(1000));
    let s1 = stats();
    // (current, allocated, freed, allocations, reallocations, frees)
    assert_eq!(delta(s0, s1), (1000, 1000, 0, 1, 0, 0));
    assert_eq!(s1.live_blocks(), s0.live_blocks() + 1);
    assert!(s1.peak_bytes >= s1.current_bytes);
    drop(v);
    let s2 = stats();
    assert_eq!(delta(s1, s2), (-1000, 0, 1000, 0, 0, 1));
    assert_eq!(s2.current_bytes, s0.current_bytes);
    assert_eq!(s2.current_bytes, s2.allocated_bytes - s2.freed_bytes);
}

fn zeroed_allocation_counts_like_alloc() {
    let s0 = stats();
    let v = black_box(vec![0u64; 512]);
    assert!(v.iter().all(|&x| x == 0));
    let s1 = stats();
    assert_eq!(delta(s0, s1), (4096, 4096, 0, 1, 0, 0));
    drop(v);
    assert_eq!(stats().current_bytes, s0.current_bytes);
}

fn peak_tracks_a_temporary_allocation() {
    const BIG: u64 = 8 << 20;
    reset_peak();
    let s0 = stats();
    assert_eq!(s0.peak_bytes, s0.current_bytes);
    drop(black_box(Vec::<u8>::with_capacity(BIG as usize)));
    let s1 = stats();
    assert_eq!(s1.current_bytes, s0.current_bytes);
    assert_eq!(s1.peak_bytes, s0.current_bytes + BIG);
    // A smaller temporary does not lower or raise it.
    drop(black_box(Vec::<u8>::with_capacity(1024)));
    assert_eq!(stats().peak_bytes, s0.current_bytes + BIG);
}

fn reset_peak_restarts_from_current() {
    drop(black_box(Vec::<u8>::with_capacity(1 << 20)));
    let keep: Vec<u8> = black_box(Vec::with_capacity(4096));
    assert!(stats().peak_bytes >= stats().current_bytes + (1 << 20) - 4096);
    reset_peak();
    let s = stats();
    assert_eq!(s.peak_bytes, s.current_bytes);
    drop(black_box(Vec::<u8>::with_capacity(100)));
    assert_eq!(stats().peak_bytes, s.current_bytes + 100);
    drop(keep);
}

fn realloc_counts_the_size_delta() {
    let mut v: Vec<u8> = black_box(Vec::with_capacity(100));
    reset_peak();
    let s0 = stats();
    v.reserve_exact(1000); // len 0: capacity becomes exactly 1000
    assert_eq!(v.capacity(), 1000);
    black_box(&mut v);
    let s1 = stats();
    // Growth: one allocation, one reallocation, +900 bytes, no free.
    assert_eq!(delta(s0, s1), (900, 900, 0, 1, 1, 0));
    assert_eq!(s1.peak_bytes, s0.current_bytes + 900);
    assert_eq!(s1.live_blocks(), s0.live_blocks());
    v.shrink_to(10);
    assert_eq!(v.capacity(), 10);
    black_box(&mut v);
    let s2 = stats();
    // Shrinkage: one allocation, one reallocation, 990 bytes given back.
    assert_eq!(delta(s1, s2), (-990, 0, 990, 1, 1, 0));
    drop(v);
    let s3 = stats();
    assert_eq!(delta(s2, s3), (-10, 0, 10, 0, 0, 1));
    assert_eq!(s3.current_bytes, s0.current_bytes - 100);
}

fn measure_reports_peak_and_nothing_retained() {
    const TEMP: usize = 3 << 20;
    let (sum, m) = measure(|| {
        let v = black_box(vec![1u8; TEMP]);
        v.iter().map(|&x| u64::from(x)).sum::<u64>()
    });
    assert_eq!(sum, TEMP as u64);
    assert!(m.peak_delta_bytes >= TEMP as u64, "{m}");
    assert_eq!(m.peak_delta_bytes, TEMP as u64, "single-threaded: exact");
    assert_eq!(m.retained_bytes, 0, "{m}");
    assert_eq!((m.allocations, m.frees), (1, 1));
    assert_eq!(
        (m.allocated_bytes, m.freed_bytes),
        (TEMP as u64, TEMP as u64)
    );
}

fn measure_reports_retained_return_value() {
    let (v, m) = measure(|| black_box(Vec::<u32>::with_capacity(1024)));
    assert_eq!(m.retained_bytes, 4096, "{m}");
    assert_eq!(m.peak_delta_bytes, 4096);
    assert_eq!((m.allocations, m.frees), (1, 0));
    let (_, m) = measure(move || drop(v));
    assert_eq!(m.retained_bytes, -4096, "{m}");
    assert_eq!(m.peak_delta_bytes, 0);
    assert_eq!(m.frees, 1);
}

fn nested_measure_keeps_the_outer_peak() {
    let ((_, inner), outer) = measure(|| {
        drop(black_box(Vec::<u8>::with_capacity(2 << 20)));
        measure(|| drop(black_box(Vec::<u8>::with_capacity(100))))
    });
    assert_eq!(inner.peak_delta_bytes, 100);
    assert_eq!(
        outer.peak_delta_bytes,
        2 << 20,
        "inner reset lost the outer peak: {outer}"
    );
    assert_eq!(outer.allocations, 2);
    assert_eq!(outer.retained_bytes, 0);
}

fn measure_restores_the_global_peak() {
    drop(black_box(Vec::<u8>::with_capacity(16 << 20)));
    let before = stats().peak_bytes;
    let _ = measure(|| drop(black_box(Vec::<u8>::with_capacity(10))));
    assert_eq!(stats().peak_bytes, before);
    // Also when the closure panics.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {})); // an expected panic: keep the log clean
    let r = std::panic::catch_unwind(|| measure(|| panic!("inside measure")));
    std::panic::set_hook(hook);
    assert!(r.is_err());
    assert!(stats().peak_bytes >= before);
}

fn concurrent_threads_balance_out() {
    const THREADS: usize = 4;
    const ROUNDS: usize = 10_000;
    let work = |seed: usize| {
        let mut kept = Vec::with_capacity(64);
        for i in 0..ROUNDS {
            let n = 1 + (i * 31 + seed * 7) % 700;
            kept.push(black_box(vec![seed as u8; n]));
            if kept.len() == 64 {
                kept.clear();
            }
        }
        gm_leak::thread_stats()
    };
    // Warm up whatever thread spawning initialises once. Join explicitly: a
    // scoped thread that is not joined is only waited for until its closure
    // returns, and its teardown frees (its thread handle) could land after
    // `s0`.
    std::thread::scope(|s| s.spawn(|| work(99)).join().unwrap());
    let s0 = stats();
    let per_thread: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS).map(|t| s.spawn(move || work(t))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let s1 = stats();
    let thread_allocs: u64 = per_thread.iter().map(|t| t.allocations).sum();
    assert!(thread_allocs >= (THREADS * (ROUNDS + 1)) as u64);
    assert!(s1.allocations - s0.allocations >= thread_allocs);
    for t in &per_thread {
        // Every block each thread allocated in `work` it also freed.
        assert!(t.allocations >= (ROUNDS + 1) as u64);
    }
    drop(per_thread);
    let s2 = stats();
    assert_eq!(
        s2.current_bytes,
        s0.current_bytes,
        "threads left {} bytes allocated",
        s2.current_bytes as i64 - s0.current_bytes as i64
    );
    assert_eq!(s2.current_bytes, s2.allocated_bytes - s2.freed_bytes);
}
