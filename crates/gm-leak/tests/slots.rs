//! The process-wide totals live in per-thread slots (see `counters.rs`):
//! they stay exact when more threads are alive than there are slots (the
//! rest count through a shared slot) and when threads come and go.
//!
//! `harness = false` (see Cargo.toml): exact process-wide figures need a
//! process where nothing else allocates meanwhile.

use std::hint::black_box;
use std::process::ExitCode;
use std::sync::Barrier;

use gm_leak::{stats, thread_stats, AllocStats, TrackingAllocator};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator::system();

const CHECKS: &[(&str, fn())] = &[
    (
        "more_threads_alive_than_slots_stay_exact",
        more_threads_alive_than_slots_stay_exact,
    ),
    (
        "short_lived_threads_stay_exact",
        short_lived_threads_stay_exact,
    ),
];

fn main() -> ExitCode {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let (mut ran, mut failed) = (0, 0);
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

/// Work that allocates and frees `rounds` blocks of varied sizes, growing
/// and shrinking a Vec on the way (reallocations); returns this thread's
/// counters.
fn work(seed: usize, rounds: usize) -> gm_leak::ThreadStats {
    let mut kept = Vec::new();
    for i in 0..rounds {
        kept.push(black_box(vec![seed as u8; 1 + (i * 37 + seed) % 300]));
        if kept.len() == 16 {
            kept.clear();
            kept.shrink_to_fit();
        }
    }
    drop(kept);
    thread_stats()
}

/// The whole-process identities: every byte and block accounted for.
fn assert_balanced(s0: AllocStats, s1: AllocStats, what: &str) {
    assert_eq!(
        s1.current_bytes, s0.current_bytes,
        "{what}: live bytes did not come back"
    );
    assert_eq!(
        s1.current_bytes,
        s1.allocated_bytes - s1.freed_bytes,
        "{what}: slot sums disagree with the live-bytes counter (lost or doubled updates)"
    );
    assert_eq!(s1.live_blocks(), s0.live_blocks(), "{what}: live blocks");
}

fn more_threads_alive_than_slots_stay_exact() {
    // 300 threads (more than the 256 slots) alive at once, all counting at
    // the same time: some count through the shared slot.
    const THREADS: usize = 300;
    // Warm up what thread spawning initialises once.
    std::thread::scope(|s| s.spawn(|| work(0, 10)).join().unwrap());
    let barrier = Barrier::new(THREADS);
    let s0 = stats();
    let per_thread: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|t| {
                let barrier = &barrier;
                std::thread::Builder::new()
                    .stack_size(64 << 10)
                    .spawn_scoped(s, move || {
                        barrier.wait();
                        work(t, 2000)
                    })
                    .unwrap()
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let allocs: u64 = per_thread.iter().map(|t| t.allocations).sum();
    let s1 = stats();
    assert!(allocs >= (THREADS * 2000) as u64);
    assert!(s1.allocations - s0.allocations >= allocs, "{s1:?}");
    drop(per_thread);
    assert_balanced(s0, stats(), "300 threads at once");
}

fn short_lived_threads_stay_exact() {
    // 1000 threads one after another: each hands its slot to the next, whose
    // sums continue from it.
    let s0 = stats();
    let mut allocs = 0;
    for t in 0..1000 {
        allocs += std::thread::spawn(move || work(t, 50).allocations)
            .join()
            .unwrap();
    }
    let s1 = stats();
    assert!(s1.allocations - s0.allocations >= allocs);
    assert_balanced(s0, s1, "1000 threads in turn");
}
