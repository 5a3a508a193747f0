//! Per-thread counting ([`gm_leak::measure_thread`], [`gm_leak::thread_stats`])
//! and direct use of the allocator, under libtest's parallel test threads:
//! the exact assertions here hold however the other tests interleave.

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use gm_leak::{measure_thread, thread_stats, TrackingAllocator};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator::system();

#[test]
fn allocator_is_active() {
    assert!(gm_leak::is_active());
}

#[test]
fn n_boxes_are_exactly_n_allocations() {
    const N: usize = 100;
    let mut boxes = Vec::with_capacity(N);
    let (_, m) = measure_thread(|| {
        for i in 0..N as u64 {
            boxes.push(black_box(Box::new(i)));
        }
    });
    assert_eq!(m.allocations, N as u64, "{m}");
    assert_eq!(m.reallocations, 0);
    assert_eq!(m.frees, 0);
    assert_eq!(m.allocated_bytes, 8 * N as u64);
    assert_eq!(m.net_bytes, 8 * N as i64);
    assert_eq!(m.peak_net_bytes, 8 * N as u64);

    let (_, m) = measure_thread(|| boxes.clear());
    assert_eq!((m.allocations, m.frees), (0, N as u64), "{m}");
    assert_eq!(m.freed_bytes, 8 * N as u64);
    assert_eq!(m.net_bytes, -8 * N as i64);
    assert_eq!(m.peak_net_bytes, 0);
}

#[test]
fn peak_is_the_high_water_mark_of_live_bytes() {
    let (_, m) = measure_thread(|| {
        let a = black_box(vec![0u8; 5000]);
        let b = black_box(vec![0u8; 3000]);
        drop(a);
        let c = black_box(vec![0u8; 1000]);
        drop((b, c));
    });
    assert_eq!(m.peak_net_bytes, 8000, "{m}");
    assert_eq!(m.net_bytes, 0);
    assert_eq!((m.allocations, m.frees), (3, 3));
}

#[test]
fn other_threads_allocations_are_not_counted() {
    let stop = AtomicBool::new(false);
    let rounds = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                black_box(vec![1u8; 256]);
                black_box(Box::new(rounds.fetch_add(1, Ordering::Relaxed)));
            }
        });
        // Let the other thread get going before measuring.
        while rounds.load(Ordering::Relaxed) < 100 {
            std::hint::spin_loop();
        }
        let global_before = gm_leak::stats().allocations;
        let (sum, m) = measure_thread(|| {
            // Allocation-free work until the other thread has allocated at
            // least 2000 more times, so the two overlap for certain.
            let until = rounds.load(Ordering::Relaxed) + 1000;
            let mut sum = 0u64;
            let mut i = 0u64;
            while rounds.load(Ordering::Relaxed) < until {
                sum = sum.wrapping_add(black_box(i).wrapping_mul(i));
                i += 1;
            }
            sum
        });
        let global_after = gm_leak::stats().allocations;
        stop.store(true, Ordering::Relaxed);
        black_box(sum);
        assert!(
            global_after - global_before >= 2000,
            "the other thread did allocate"
        );
        assert_eq!(m.allocations, 0, "{m}");
        assert_eq!(m.frees, 0, "{m}");
        assert_eq!(
            (m.allocated_bytes, m.freed_bytes, m.peak_net_bytes),
            (0, 0, 0)
        );
    });
}

#[test]
fn nested_measurements_are_relative_and_keep_the_outer_peak() {
    let ((_, inner), outer) = measure_thread(|| {
        drop(black_box(vec![0u8; 10_000])); // outer peak before the inner call
        let keep = black_box(vec![0u8; 1000]);
        let r = measure_thread(|| {
            drop(black_box(vec![0u8; 500]));
            black_box(Box::new(7u32))
        });
        drop(keep);
        r
    });
    assert_eq!(inner.allocations, 2);
    assert_eq!(inner.frees, 1);
    assert_eq!(inner.peak_net_bytes, 500, "{inner}");
    assert_eq!(inner.net_bytes, 4, "the returned box");
    assert_eq!(outer.allocations, 4);
    assert_eq!(outer.frees, 3);
    assert_eq!(
        outer.peak_net_bytes, 10_000,
        "lost the peak from before the inner call: {outer}"
    );
    assert_eq!(
        outer.net_bytes, 4,
        "the box, returned through both closures"
    );

    // The inner peak counts for the outer one when it is higher.
    let (_, outer) = measure_thread(|| {
        let keep = black_box(vec![0u8; 1000]);
        let _ = measure_thread(|| drop(black_box(vec![0u8; 4000])));
        drop(keep);
    });
    assert_eq!(outer.peak_net_bytes, 5000, "{outer}");
}

#[test]
fn a_panicking_inner_measurement_keeps_the_outer_peak() {
    let (_, outer) = measure_thread(|| {
        drop(black_box(vec![0u8; 6000]));
        let r = std::panic::catch_unwind(|| measure_thread(|| panic!("inside measure_thread")));
        assert!(r.is_err());
    });
    assert!(outer.peak_net_bytes >= 6000, "{outer}");
}

#[test]
fn realloc_growth_is_one_allocation_of_the_delta() {
    let mut v: Vec<u64> = black_box(Vec::with_capacity(8));
    let (_, m) = measure_thread(|| {
        v.reserve_exact(64);
        black_box(&mut v);
    });
    assert_eq!(v.capacity(), 64);
    assert_eq!((m.allocations, m.reallocations, m.frees), (1, 1, 0), "{m}");
    assert_eq!((m.allocated_bytes, m.freed_bytes), (56 * 8, 0));
    assert_eq!(m.peak_net_bytes, 56 * 8);
    let (_, m) = measure_thread(|| drop(v));
    assert_eq!((m.frees, m.freed_bytes), (1, 64 * 8));
}

#[test]
fn pushing_past_capacity_is_not_allocation_free() {
    let mut v: Vec<u32> = Vec::with_capacity(4);
    let (_, m) = measure_thread(|| {
        for i in 0..4 {
            v.push(i);
        }
    });
    assert_eq!(m.allocations, 0, "within capacity");
    let (_, m) = measure_thread(|| v.push(4));
    assert_eq!(
        m.allocations, 1,
        "growth is a realloc, counted as an allocation"
    );
    assert_eq!(m.reallocations, 1);
}

#[test]
fn zero_sized_values_never_reach_the_allocator() {
    let (_, m) = measure_thread(|| {
        black_box(Vec::<u8>::new());
        black_box(Vec::<()>::with_capacity(1000));
        black_box(Box::new(()));
        black_box(String::new());
    });
    assert_eq!(m.allocations, 0, "{m}");
    assert_eq!(m.frees, 0);
}

#[test]
fn page_aligned_layout_through_the_allocator_directly() {
    let layout = Layout::from_size_align(8192, 4096).unwrap();
    let before = thread_stats();
    // SAFETY: `layout` has a non-zero size. Each block is written only within
    // its size and freed once, by the allocator that made it, with the layout
    // it currently has.
    unsafe {
        let p = ALLOC.alloc(layout);
        assert!(!p.is_null());
        assert_eq!(p as usize % 4096, 0);
        p.write_bytes(0xAB, layout.size());
        assert_eq!(*p.add(8191), 0xAB);

        let z = ALLOC.alloc_zeroed(layout);
        assert!(!z.is_null());
        assert_eq!(z as usize % 4096, 0);
        assert!((0..layout.size()).all(|i| *z.add(i) == 0));

        // Grow with the large alignment kept, contents preserved.
        let p = ALLOC.realloc(p, layout, 3 * 4096);
        assert!(!p.is_null());
        assert_eq!(p as usize % 4096, 0);
        assert_eq!(*p, 0xAB);
        assert_eq!(*p.add(8191), 0xAB);

        ALLOC.dealloc(p, Layout::from_size_align(3 * 4096, 4096).unwrap());
        ALLOC.dealloc(z, layout);
    }
    let after = thread_stats();
    assert_eq!(after.allocations - before.allocations, 3);
    assert_eq!(after.reallocations - before.reallocations, 1);
    assert_eq!(after.frees - before.frees, 2);
    assert_eq!(
        after.allocated_bytes - before.allocated_bytes,
        2 * 8192 + 4096
    );
    assert_eq!(after.freed_bytes - before.freed_bytes, 2 * 8192 + 4096);
}

#[test]
fn thread_stats_are_per_thread() {
    let before = thread_stats();
    let other = std::thread::spawn(|| {
        let s0 = thread_stats();
        let v: Vec<Box<u64>> = (0..50).map(|i| black_box(Box::new(i))).collect();
        drop(v);
        let s1 = thread_stats();
        (s1.allocations - s0.allocations, s1.frees - s0.frees)
    })
    .join()
    .unwrap();
    assert_eq!(other, (51, 51), "50 boxes and the Vec holding them");
    // This thread only allocated for spawning and joining, far fewer than 50.
    let after = thread_stats();
    assert!(after.allocations - before.allocations < 50);
}

#[test]
fn frees_of_other_threads_blocks_make_net_negative() {
    let v = std::thread::spawn(|| black_box(vec![0u8; 2048]))
        .join()
        .unwrap();
    let (_, m) = measure_thread(|| drop(v));
    assert_eq!((m.allocations, m.frees, m.freed_bytes), (0, 1, 2048));
    assert_eq!(m.net_bytes, -2048);
    assert_eq!(m.peak_net_bytes, 0);
}
