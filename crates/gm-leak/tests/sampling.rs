//! Sampled allocation sites ([`gm_leak::enable_sampling`],
//! [`gm_leak::top_sites`]) in a binary that installs the tracking allocator.
//!
//! `harness = false` (see Cargo.toml): sampling is process-wide state, and
//! with a fixed seed a single-threaded process samples the same allocations
//! in every run; libtest's worker threads would interleave their own
//! allocations with the checks. `main` runs each check in turn, under a
//! watchdog that fails the binary (instead of hanging) on a deadlock.

use std::hint::black_box;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use gm_leak::{
    disable_sampling, enable_sampling, measure_thread, sampling_enabled, sampling_stats, top_sites,
    SamplingConfig, SamplingError, SiteReport, TrackingAllocator,
};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator::system();

const CHECKS: &[(&str, fn())] = &[
    // First: nothing may have been sampled before any `enable_sampling`.
    (
        "disabled_sampling_records_nothing",
        disabled_sampling_records_nothing,
    ),
    (
        "capture_inside_the_allocator_does_not_allocate",
        capture_inside_the_allocator_does_not_allocate,
    ),
    (
        "big_site_is_top_with_an_unbiased_estimate",
        big_site_is_top_with_an_unbiased_estimate,
    ),
    (
        "large_blocks_are_sampled_with_weight_one",
        large_blocks_are_sampled_with_weight_one,
    ),
    (
        "realloc_moves_the_sample_to_the_new_block",
        realloc_moves_the_sample_to_the_new_block,
    ),
    (
        "four_threads_keep_the_tables_consistent",
        four_threads_keep_the_tables_consistent,
    ),
    (
        "top_sites_allocates_without_deadlock",
        top_sites_allocates_without_deadlock,
    ),
    ("fork_while_sampling_is_safe", fork_while_sampling_is_safe),
    (
        "enable_twice_and_bad_config_are_errors",
        enable_twice_and_bad_config_are_errors,
    ),
    (
        "the_detector_names_the_leaking_site",
        the_detector_names_the_leaking_site,
    ),
    (
        "disable_forgets_and_stops_sampling",
        disable_forgets_and_stops_sampling,
    ),
];

/// A check still running after this long is taken for a deadlock.
const WATCHDOG: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    // The watchdog allocates nothing while it watches: the checks count
    // samples process-wide.
    static CURRENT: AtomicUsize = AtomicUsize::new(usize::MAX);
    static DONE: AtomicBool = AtomicBool::new(false);
    // Detached on purpose: it ends with the process.
    std::thread::spawn(|| {
        let step = Duration::from_millis(100);
        let (mut last, mut waited) = (usize::MAX, Duration::ZERO);
        while !DONE.load(Ordering::Relaxed) {
            std::thread::sleep(step);
            let now = CURRENT.load(Ordering::Relaxed);
            if now != last {
                (last, waited) = (now, Duration::ZERO);
            } else {
                waited += step;
            }
            if waited >= WATCHDOG {
                let name = CHECKS.get(last).map_or("?", |c| c.0);
                eprintln!("test {name} ... DEADLOCK? still running after {WATCHDOG:?}");
                std::process::exit(101);
            }
        }
    });
    let (mut ran, mut failed) = (0, 0);
    for (i, &(name, check)) in CHECKS.iter().enumerate() {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        CURRENT.store(i, Ordering::Relaxed);
        ran += 1;
        let result = std::panic::catch_unwind(check);
        disable_sampling(); // a failed check must not leak its sampling state
        match result {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    DONE.store(true, Ordering::Relaxed);
    println!("\n{ran} checks, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn config(mean_bytes_between_samples: u64) -> SamplingConfig {
    SamplingConfig {
        mean_bytes_between_samples,
        seed: Some(0x5EED),
        ..SamplingConfig::default()
    }
}

fn site_with<'a>(sites: &'a [SiteReport], function: &str) -> Option<&'a SiteReport> {
    sites.iter().find(|s| s.has_function(function))
}

/// Standard deviation of the byte estimate for `n` blocks of `size` bytes
/// sampled at mean `mean`: each contributes `size / p` with probability
/// `p = 1 - exp(-size / mean)`, so the variance is `n size^2 (1 - p) / p`.
fn estimate_sd(n: u64, size: u64, mean: u64) -> f64 {
    let p = 1.0 - (-(size as f64) / mean as f64).exp();
    size as f64 * (n as f64 * (1.0 - p) / p).sqrt()
}

fn assert_within_sd(what: &str, estimate: u64, truth: u64, sd: f64, k: f64) {
    let err = estimate as f64 - truth as f64;
    assert!(
        err.abs() <= k * sd,
        "{what}: estimate {estimate} vs true {truth} ({:+.1} sd, allowed {k} sd = {:.0} B)",
        err / sd,
        k * sd
    );
}

// ---------------------------------------------------------------------------

fn disabled_sampling_records_nothing() {
    assert!(!sampling_enabled());
    let kept: Vec<Vec<u8>> = (0..256).map(|i| black_box(vec![i as u8; 4096])).collect();
    let s = sampling_stats();
    assert!(!s.enabled);
    assert_eq!((s.samples, s.live_samples, s.sites), (0, 0, 0), "{s:?}");
    assert!(top_sites(10).is_empty());
    drop(kept);
}

fn capture_inside_the_allocator_does_not_allocate() {
    // With one sample point per byte on average every block is sampled, so
    // the stack walk runs inside each of these allocator calls. Any
    // allocation it made would be counted on this thread's counters (and not
    // sampled, by the in-allocator guard): exactly one allocation each means
    // the walk and the table update allocated nothing.
    gm_leak::assert_active(); // its one-time probe allocates
    enable_sampling(config(1)).unwrap();
    let before = sampling_stats().samples;
    let (boxes, m) = measure_thread(|| {
        (0..50)
            .map(|i| black_box(Box::new([i as u8; 256])))
            .collect::<Vec<_>>()
    });
    let after = sampling_stats().samples;
    // 50 boxes and the Vec holding them (one block: the iterator's exact
    // size hint).
    assert_eq!(m.allocations, 51, "{m}");
    assert_eq!(after - before, 51, "every block sampled");
    drop(boxes);
    assert_eq!(sampling_stats().live_samples, 0, "all freed");
    disable_sampling();
}

#[inline(never)]
fn keep_big(out: &mut Vec<Vec<u8>>, blocks: usize, size: usize) {
    for i in 0..blocks {
        // Never a zero fill: `vec![0; n]` takes the `alloc_zeroed` path, a
        // different call path (so a different site) inside `alloc`.
        out.push(black_box(vec![i as u8 | 1; size]));
    }
}

#[inline(never)]
fn keep_small(out: &mut Vec<Vec<u8>>, blocks: usize, size: usize) {
    for i in 0..blocks {
        out.push(black_box(vec![i as u8 | 1; size]));
    }
}

#[inline(never)]
fn leaky_step(kept: &mut Vec<Vec<u8>>) {
    kept.push(black_box(vec![7u8; 16 << 10]));
}

#[inline(never)]
fn steady_step() -> usize {
    let scratch: Vec<Vec<u8>> = (0..8)
        .map(|i| black_box(vec![i as u8 | 1; 8 << 10]))
        .collect();
    scratch.len()
}

/// End to end: sampled sites go into detector snapshots each step, and the
/// detector's top growing site is the function that keeps 16 KiB per step,
/// not the one that allocates and frees.
fn the_detector_names_the_leaking_site() {
    use gm_leak::{DetectorConfig, LeakDetector, Snapshot};
    enable_sampling(SamplingConfig {
        mean_bytes_between_samples: 4096,
        seed: Some(11),
        ..SamplingConfig::default()
    })
    .unwrap();
    let cfg = DetectorConfig {
        window_samples: 64,
        min_samples: 32,
        ..DetectorConfig::default()
    };
    let mut det = LeakDetector::new(cfg).unwrap();
    let mut kept = Vec::new();
    let mut steady = 0;
    for step in 0..64u64 {
        leaky_step(&mut kept);
        steady += steady_step();
        let snap =
            Snapshot::new(step, gm_leak::stats().current_bytes).with_top_sites(&top_sites(20));
        det.observe(&snap).unwrap();
    }
    black_box(steady);
    let a = det.analyze();
    let top = a.top_growing_sites.first().expect("a growing site");
    assert!(
        top.key.contains("leaky_step"),
        "top growing site: {} (all: {:?})",
        top.key,
        a.top_growing_sites
            .iter()
            .map(|s| &s.key)
            .collect::<Vec<_>>()
    );
    assert!(!a
        .top_growing_sites
        .iter()
        .any(|s| s.key.contains("steady_step")));
    gm_leak::release_symbol_cache();
    drop(kept);
}

fn big_site_is_top_with_an_unbiased_estimate() {
    // 2 MiB in 512 blocks from one function, 200 KiB in 50 from another,
    // sampled at a mean of 4 KiB: each block is sampled with
    // p = 1 - 1/e = 0.632 and stands for 4096 / p bytes. The estimates'
    // standard deviations are 70.7 KiB and 22.1 KiB; allowing 5 of them
    // keeps a false failure below 1e-6 for any seed, and the seed is fixed.
    const MEAN: u64 = 4096;
    const SIZE: usize = 4096;
    let (n_big, n_small) = (512usize, 50usize);
    let mut big = Vec::with_capacity(n_big);
    let mut small = Vec::with_capacity(n_small);
    enable_sampling(config(MEAN)).unwrap();
    keep_big(&mut big, n_big, SIZE);
    keep_small(&mut small, n_small, SIZE);
    // The process's first symbol resolution: loads debug info.
    let (sites, m) = measure_thread(|| top_sites(5));
    println!("  first top_sites(5): {m}");
    for s in &sites {
        println!("  {s}");
    }
    let top = &sites[0];
    assert!(top.has_function("keep_big"), "top site: {top}");
    assert_within_sd(
        "keep_big",
        top.live_bytes_estimate,
        (n_big * SIZE) as u64,
        estimate_sd(n_big as u64, SIZE as u64, MEAN),
        5.0,
    );
    let p = 1.0 - (-1f64).exp();
    let count_sd = (n_big as f64 * (1.0 - p) / p).sqrt();
    assert!(
        (top.live_allocations_estimate as f64 - n_big as f64).abs() <= 5.0 * count_sd,
        "{top}"
    );
    assert_eq!(top.sampled_live_bytes, top.sampled_live_count * SIZE as u64);
    assert_eq!(top.total_sampled_allocations, top.sampled_live_count);
    // Frames: the allocating function resolved, with a source location, and
    // none of the allocator's own frames.
    let f = top
        .frames
        .iter()
        .find(|f| {
            f.function
                .as_deref()
                .is_some_and(|n| n.contains("keep_big"))
        })
        .unwrap();
    assert!(
        f.file
            .as_deref()
            .is_some_and(|p| p.ends_with("sampling.rs")),
        "{f}"
    );
    assert!(f.line.is_some(), "{f}");
    for f in &top.frames {
        let name = f.function.as_deref().unwrap_or("").trim_start_matches('<');
        assert!(
            !name.starts_with("gm_leak::")
                && !name.starts_with("backtrace::")
                && !name.contains("__rust_alloc"),
            "allocator frame kept: {f}"
        );
    }
    let small_site = site_with(&sites, "keep_small").expect("keep_small site");
    assert_within_sd(
        "keep_small",
        small_site.live_bytes_estimate,
        (n_small * SIZE) as u64,
        estimate_sd(n_small as u64, SIZE as u64, MEAN),
        5.0,
    );
    assert_ne!(small_site.site_id, top.site_id);

    // Freeing the big blocks takes them out of the live figures; the small
    // site is unchanged, and keeps its id across snapshots.
    let small_before = small_site.clone();
    let live_before = sampling_stats().live_samples;
    drop(big);
    let sites = top_sites(usize::MAX);
    assert!(
        site_with(&sites, "keep_big").is_none(),
        "freed blocks still live: {:?}",
        site_with(&sites, "keep_big")
    );
    assert_eq!(
        sampling_stats().live_samples,
        live_before - top.sampled_live_count
    );
    let small_after = site_with(&sites, "keep_small").unwrap();
    assert_eq!(small_after.site_id, small_before.site_id);
    assert_eq!(
        small_after.live_bytes_estimate,
        small_before.live_bytes_estimate
    );
    drop(small);
    assert!(site_with(&top_sites(usize::MAX), "keep_small").is_none());
    disable_sampling();

    // The symbol cache the first call built goes back to the heap.
    let (_, released) = measure_thread(gm_leak::release_symbol_cache);
    assert!(
        released.freed_bytes >= m.net_bytes as u64 / 2,
        "released {released} after the first top_sites kept {m}"
    );
}

#[inline(never)]
fn keep_large(out: &mut Vec<Vec<u8>>) {
    for _ in 0..20 {
        out.push(black_box(Vec::with_capacity(64 << 10)));
    }
}

fn large_blocks_are_sampled_with_weight_one() {
    // 64 KiB blocks at a 4 KiB mean: p = 1 - exp(-16), so every block is
    // sampled (for certain at this seed) and stands for its own size.
    let mut kept = Vec::with_capacity(20);
    enable_sampling(config(4096)).unwrap();
    keep_large(&mut kept);
    let sites = top_sites(usize::MAX);
    let s = site_with(&sites, "keep_large").expect("keep_large site");
    assert_eq!(s.sampled_live_count, 20, "{s}");
    assert_eq!(s.sampled_live_bytes, 20 << 16);
    let exact = 20u64 << 16;
    assert!(s.live_bytes_estimate.abs_diff(exact) <= 1, "{s}");
    assert_eq!(s.live_allocations_estimate, 20);
    drop(kept);
    disable_sampling();
}

#[inline(never)]
fn grow_by_pushing(n: usize) -> Vec<u64> {
    let mut v = Vec::new();
    for i in 0..n as u64 {
        v.push(black_box(i));
    }
    v
}

fn realloc_moves_the_sample_to_the_new_block() {
    // Every block sampled: the Vec's doublings free each old block (its
    // sample leaves) and sample the new one, so at the end exactly one block
    // (the final buffer) is live, with the final capacity.
    enable_sampling(config(1)).unwrap();
    let v = grow_by_pushing(10_000);
    let sites = top_sites(usize::MAX);
    let s = site_with(&sites, "grow_by_pushing").expect("site");
    assert_eq!(s.sampled_live_count, 1, "{s}");
    assert_eq!(s.sampled_live_bytes, (v.capacity() * 8) as u64);
    assert!(
        s.total_sampled_allocations > 10,
        "every doubling was sampled"
    );
    assert_eq!(sampling_stats().live_samples, 1);
    drop(v);
    assert_eq!(sampling_stats().live_samples, 0);
    disable_sampling();
}

#[inline(never)]
fn mt_keep(out: &mut Vec<Vec<u8>>, n: usize) {
    for i in 0..n {
        out.push(black_box(vec![i as u8 | 1; 4096]));
    }
}

#[inline(never)]
fn churn(seed: u64, rounds: usize) -> u64 {
    let mut x = seed;
    let mut live: Vec<Vec<u8>> = Vec::new();
    let mut grown: Vec<u32> = Vec::new();
    let mut sum = 0u64;
    for i in 0..rounds {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let size = 1 + (x >> 33) as usize % 8192;
        live.push(black_box(vec![1u8; size]));
        grown.push(i as u32); // reallocations
        if live.len() > 64 {
            // Free from the middle, so blocks die in another order than born.
            sum += live.swap_remove((x >> 20) as usize % live.len()).len() as u64;
        }
        if grown.len() > 5000 {
            grown = Vec::new();
        }
    }
    sum
}

fn four_threads_keep_the_tables_consistent() {
    // Four threads allocate, reallocate and free at a 1 KiB mean (so many
    // samples, table inserts and removals race), and each keeps 100 blocks
    // of 4 KiB from `mt_keep`. Afterwards: the kept blocks are the one live
    // site from these threads, its estimate matches, the sampler's own count
    // of live samples equals the sum over sites, nothing was dropped or
    // missed; and after freeing the kept blocks nothing of theirs is live.
    const MEAN: u64 = 1024;
    const KEEP: usize = 100;
    enable_sampling(config(MEAN)).unwrap();
    let kept: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                s.spawn(move || {
                    black_box(churn(t + 1, 20_000));
                    let mut out = Vec::with_capacity(KEEP);
                    mt_keep(&mut out, KEEP);
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let sites = top_sites(usize::MAX);
    let stats = sampling_stats();
    assert!(stats.samples > 1000, "{stats:?}");
    assert_eq!(
        (stats.dropped_samples, stats.missed_frees),
        (0, 0),
        "{stats:?}"
    );
    let sum: u64 = sites.iter().map(|s| s.sampled_live_count).sum();
    assert_eq!(sum, stats.live_samples, "sites vs live table");
    assert!(
        site_with(&sites, "churn").is_none(),
        "churn freed everything: {:?}",
        site_with(&sites, "churn")
    );
    let keep = site_with(&sites, "mt_keep").expect("mt_keep site");
    assert_within_sd(
        "mt_keep",
        keep.live_bytes_estimate,
        (4 * KEEP * 4096) as u64,
        estimate_sd(4 * KEEP as u64, 4096, MEAN),
        5.0,
    );
    // Dropping `kept` frees the kept blocks and the vectors holding them.
    drop(kept);
    let sites = top_sites(usize::MAX);
    let after = sampling_stats();
    assert!(site_with(&sites, "mt_keep").is_none());
    let sum: u64 = sites.iter().map(|s| s.sampled_live_count).sum();
    assert_eq!(sum, after.live_samples, "sites vs live table");
    assert!(after.live_samples <= stats.live_samples - keep.sampled_live_count);
    disable_sampling();
}

fn top_sites_allocates_without_deadlock() {
    enable_sampling(config(64)).unwrap();
    let mut kept = Vec::with_capacity(100);
    keep_big(&mut kept, 100, 1000);
    // Alone in the process: `top_sites` resolves symbols, which allocates
    // through this allocator (and frees), while sampling is on. Its own
    // allocations are not sampled.
    let before = sampling_stats().samples;
    let (sites, m) = measure_thread(|| top_sites(3));
    println!("  top_sites(3): {m}");
    assert!(m.allocations > 0, "resolution allocated: {m}");
    assert_eq!(sampling_stats().samples, before, "top_sites sampled itself");
    assert!(site_with(&sites, "keep_big").is_some());

    // And while another thread allocates (and samples, taking the table
    // lock) as fast as it can.
    let stop = AtomicBool::new(false);
    let rounds = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                black_box(churn(rounds.fetch_add(1, Ordering::Relaxed), 200));
            }
        });
        while rounds.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        // At least 20 snapshots, and until the other thread has done a few
        // rounds meanwhile, so the two overlap for certain.
        let start = rounds.load(Ordering::Relaxed);
        let mut calls = 0;
        while calls < 20 || rounds.load(Ordering::Relaxed) < start + 3 {
            let sites = top_sites(10);
            assert!(!sites.is_empty());
            calls += 1;
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(sampling_stats().missed_frees, 0);
    drop(kept);
    disable_sampling();
}

fn fork_while_sampling_is_safe() {
    // Another thread samples every allocation (so it holds the table lock
    // much of the time) while this one forks. Each child samples an
    // allocation of its own (taking the lock) and exits; without the fork
    // handlers a child that starts with the lock held spins forever.
    enable_sampling(config(1)).unwrap();
    let stop = AtomicBool::new(false);
    let rounds = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                black_box(churn(rounds.fetch_add(1, Ordering::Relaxed), 50));
            }
        });
        while rounds.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        for _ in 0..20 {
            // SAFETY: the child only allocates, frees and `_exit`s: no
            // locks other than the allocator's (glibc's and ours are
            // fork-safe), no return into the test.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                let v = black_box(vec![7u8; 100]);
                drop(v);
                // SAFETY: ends the child without running the parent's exit
                // handlers.
                unsafe { libc::_exit(0) };
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let mut status = 0;
            loop {
                // SAFETY: `pid` is our child; `status` a valid out-pointer.
                let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                if r == pid {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    // SAFETY: `pid` is our own, still running child.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    // SAFETY: as above.
                    unsafe { libc::waitpid(pid, &mut status, 0) };
                    stop.store(true, Ordering::Relaxed);
                    panic!("forked child hung (table lock inherited held)");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        }
        stop.store(true, Ordering::Relaxed);
    });
    disable_sampling();
}

fn enable_twice_and_bad_config_are_errors() {
    enable_sampling(config(4096)).unwrap();
    match enable_sampling(config(1)) {
        Err(SamplingError::AlreadyEnabled { current }) => {
            assert_eq!(current.mean_bytes_between_samples, 4096)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(gm_leak::sampling_config(), Some(config(4096)));
    disable_sampling();
    let bad = SamplingConfig {
        max_frames: 0,
        ..SamplingConfig::default()
    };
    assert!(matches!(
        enable_sampling(bad),
        Err(SamplingError::InvalidConfig {
            key: "max_frames",
            ..
        })
    ));
    assert!(!sampling_enabled());
}

fn disable_forgets_and_stops_sampling() {
    enable_sampling(config(1)).unwrap();
    let mut kept = Vec::with_capacity(10);
    keep_big(&mut kept, 10, 100);
    assert!(sampling_stats().live_samples >= 10);
    disable_sampling();
    assert!(!sampling_enabled());
    let s = sampling_stats();
    assert_eq!((s.samples, s.live_samples, s.sites), (0, 0, 0), "{s:?}");
    assert!(top_sites(10).is_empty());
    // Allocating and freeing (including blocks sampled before) records
    // nothing.
    keep_big(&mut kept, 10, 100);
    drop(kept);
    let s = sampling_stats();
    assert_eq!((s.samples, s.live_samples, s.sites), (0, 0, 0), "{s:?}");
}
