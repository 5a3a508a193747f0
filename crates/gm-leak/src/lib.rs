//! Memory accounting for the GrandModel workspace (tier 1): a counting global
//! allocator, and scoped measurements built on it that tests and benches use to
//! prove memory claims ("this loop does not allocate", "peak stays under 2 MiB",
//! "nothing is retained after drop").
//!
//! # Key types
//!
//! - [`TrackingAllocator`]: a [`GlobalAlloc`](std::alloc::GlobalAlloc) wrapper
//!   around an inner allocator ([`System`](std::alloc::System) by default) that
//!   counts every allocation, reallocation and free.
//! - [`stats`] / [`AllocStats`]: process-wide counters (current, peak, total
//!   allocated and freed bytes, allocation/reallocation/free counts);
//!   [`reset_peak`] restarts the peak from the current level.
//! - [`thread_stats`] / [`ThreadStats`]: the same counters for the calling
//!   thread only.
//! - [`measure`] / [`Measurement`]: what a closure did to the process-wide
//!   counters (peak delta, retained bytes, counts, duration).
//! - [`measure_thread`] / [`ThreadMeasurement`]: what a closure did on the
//!   calling thread only; nests.
//! - [`is_active`] / [`assert_active`]: whether the tracking allocator is really
//!   installed.
//! - [`enable_sampling`] / [`SamplingConfig`] / [`disable_sampling`]: optional
//!   Poisson sampling of allocation sites (off by default); [`top_sites`] /
//!   [`SiteReport`]: the call paths holding the most estimated live bytes,
//!   with resolved [`Frame`]s and a [`SiteId`] to follow them across
//!   snapshots; [`sampling_stats`]: the sampler's own counters.
//!
//! # Installing it
//!
//! Once per binary (a test file, a bench, a program):
//!
//! ```
//! use gm_leak::TrackingAllocator;
//!
//! #[global_allocator]
//! static ALLOC: TrackingAllocator = TrackingAllocator::system();
//!
//! fn main() {
//!     assert!(gm_leak::is_active());
//!     let (v, m) = gm_leak::measure_thread(|| vec![0u8; 4096]);
//!     assert_eq!((m.allocations, m.allocated_bytes, m.net_bytes), (1, 4096, 4096));
//!
//!     let mut sum = 0u64;
//!     let (_, m) = gm_leak::measure_thread(|| v.iter().for_each(|&b| sum += u64::from(b)));
//!     assert_eq!(m.allocations, 0, "summing does not allocate");
//! }
//! ```
//!
//! Without that line nothing is counted: [`measure`] and [`measure_thread`]
//! panic with a message naming the missing line rather than reporting zeros,
//! so a "does not allocate" test cannot pass by accident.
//!
//! # Which counters to assert on
//!
//! `cargo test` runs the tests of a binary on several threads of one process,
//! and the test harness itself allocates. Exact assertions ("0 allocations",
//! "exactly 4096 bytes") belong on the per-thread figures
//! ([`measure_thread`], [`thread_stats`]). The process-wide figures
//! ([`measure`], [`stats`]) include every thread; they are exact only in a
//! binary that runs one thing at a time (`harness = false`, as in this crate's
//! `tests/process.rs`), and otherwise suit benches and lower bounds.
//!
//! # How a reallocation counts
//!
//! A successful `realloc` is **one allocation** (it may hand out new memory,
//! so a hot loop that grows a `Vec` does not look allocation-free) and is also
//! counted in `reallocations`; it is **not** a free. Its bytes count as the size
//! delta: growth adds `new - old` to `allocated_bytes`, shrinking adds
//! `old - new` to `freed_bytes`. So at all times
//! `current_bytes == allocated_bytes - freed_bytes` and the number of live
//! blocks is `allocations - reallocations - frees`. A failed allocation
//! (null returned) counts nowhere.
//!
//! # Sampled allocation sites
//!
//! Counting says how much is live; sampling says *where it was allocated*.
//! It is off by default and costs the allocator one relaxed load of a static
//! flag per call while off.
//!
//! ```no_run
//! use gm_leak::{enable_sampling, top_sites, SamplingConfig, TrackingAllocator};
//!
//! #[global_allocator]
//! static ALLOC: TrackingAllocator = TrackingAllocator::system();
//!
//! fn main() {
//!     enable_sampling(SamplingConfig::default()).unwrap(); // 512 KiB mean
//!     let _cache: Vec<Vec<u8>> = (0..1000).map(|_| vec![1; 64 << 10]).collect();
//!     for site in top_sites(5) {
//!         println!("{site}"); // ~62 MiB (+- 9 %) live in ~1000 blocks, then frames
//!     }
//! }
//! ```
//!
//! **How it works** (jemalloc's `lg_prof_sample` scheme). Each thread runs a
//! Poisson process over the bytes it allocates: it keeps a countdown of bytes
//! to its next sample point, drawn from an exponential distribution with mean
//! [`SamplingConfig::mean_bytes_between_samples`] (a splitmix64 generator in
//! a `const` thread-local; [`SamplingConfig::seed`] makes it reproducible).
//! Every allocation subtracts its size; one that takes the countdown below
//! zero is sampled and a fresh countdown is drawn. The exponential is
//! memoryless, so a block of `s` bytes is sampled with probability
//! `p(s) = 1 - exp(-s / mean)` independently of every other block: large
//! blocks almost surely, a small one about `s / mean` of the time. A
//! sampled block's return addresses are captured right there, inside the
//! allocator, by the platform unwinder (`_Unwind_Backtrace`, through
//! `backtrace::trace_unsynchronized`) into a fixed array on the stack, and
//! the block is entered, under a short spinlock, into two static tables:
//! distinct stacks (sites, up to [`MAX_SITES`]) and live sampled blocks
//! keyed by address (up to [`MAX_LIVE_SAMPLES`]). A free first reads a
//! 64 Ki-entry counting filter (one relaxed load); only when the filter says
//! the address may be sampled does it take the lock and remove the record,
//! before the block is handed back. A `realloc` removes the old block's
//! record and samples the new block like a fresh allocation of its new size.
//! [`top_sites`] copies the sites under the lock into a buffer sized
//! beforehand, then (lock released) resolves symbols, drops the allocator's
//! own frames (unwinder, this crate, the `__rust_alloc` shims), merges
//! stacks that are then equal, and ranks by estimated live bytes.
//!
//! **The estimator.** A live sampled block of `s` bytes stands for
//! `s / p(s)` bytes and `1 / p(s)` blocks (a Horvitz-Thompson estimator):
//! `E[sampled * s / p(s)] = s` for every block, so per-site sums are
//! unbiased whatever the mix of sizes. Their variance is
//! `sum s^2 (1 - p) / p`: blocks well above the mean count exactly, and a
//! site holding `B` bytes in blocks well below the mean has a relative
//! standard deviation of about `sqrt(mean / B)` (at the 512 KiB default: 9 %
//! for 64 MiB, 3 % for 512 MiB). `SiteReport::sampled_*` are the exact
//! counts behind an estimate.
//!
//! **Cost** (`benches/overhead.rs`, this machine): sampling on adds about
//! 1 ns to a 64-byte alloc+free pair at the default mean (a thread-local
//! countdown and a filter load), and 17-30 ns to a 4 KiB pair: one sample
//! per 128 pairs, each costing 2-4 µs (the stack walk, roughly 100 ns a
//! frame, and the table update). So a thread allocating 1 GB/s at the
//! default mean spends about 0.6 % of its time sampling.
//! The tables are static zero-initialised arrays (about 4.4 MiB of address
//! space in `.bss`, committed only as their pages are first written, and
//! not heap: neither the counters nor massif see them).
//!
//! **Limits.** Only blocks allocated while sampling is on are ever sampled.
//! [`disable_sampling`] forgets every record (take the last [`top_sites`]
//! first). When a table is full further samples are dropped and counted in
//! [`SamplingStats::dropped_samples`] (estimates then run low); at the
//! default mean the live table covers about 24 GiB of live heap. Stacks are
//! cut at [`SamplingConfig::max_frames`] addresses; [`SiteId`]s are stable
//! within a process, not across runs (address randomisation). Frames need
//! unwind tables (Rust's default) and symbols or debug info to get names and
//! lines. Unix only ([`SamplingError::Unsupported`] elsewhere). The first
//! [`top_sites`] parses debug info, which takes time and leaves tens of MiB
//! of heap cached until [`release_symbol_cache`]; its own allocations are
//! never sampled.
//!
//! # Leak detection
//!
//! - [`LeakDetector`] / [`Snapshot`] / [`DetectorConfig`]: feed snapshots (step, heap
//!   bytes, live objects by label, live bytes by site); each
//!   [`observe`](LeakDetector::observe) returns a [`Verdict`] from a
//!   Mann–Kendall trend test over a sliding window, cycles of a sawtooth
//!   workload aligned at their releases; [`analyze`](LeakDetector::analyze)
//!   adds the Theil–Sen rate with its interval ([`Trend`], [`Rate`]), growing
//!   labels and the fastest-growing sites ([`LeakAnalysis`]). The math and the
//!   measured accuracy are in the `detector` module docs (see [`LeakDetector`]).
//! - [`steps_to_detection`] / [`leak_verdicts`] with [`workload::Workload`]:
//!   the accuracy figures of `examples/leak_accuracy.rs`.
//! - [`Registry`] / [`LiveGuard`]: live objects by label, through weak
//!   references ([`Registry::track`]) or guards ([`Registry::guard`]).
//! - [`LeakReport`]: allocator counters, verdict, labels and sites as JSON
//!   (serde) or aligned text.
//! - [`Error`] / [`Result`]: bad detector input (a config out of range, a
//!   step that does not increase).
//!
//! # Invariants
//!
//! - Tier 1: depends on gm-core only, never on another tier-1 crate
//!   (gm-buffers, gm-monitor, gm-gc, gm-shard, gm-market). External:
//!   `backtrace` (stack walk, symbols) and `libc` (a pthread key).
//! - No allocation inside the allocator: the counting path touches only static
//!   atomics and a `const`-initialised thread-local without destructor (plus,
//!   once per thread, a pthread key whose destructor hands the thread's
//!   counter slot back at exit); the sampling path only `const` thread-locals,
//!   static tables and the platform unwinder, writing into a stack array
//!   (`tests/sampling.rs` checks no Rust allocation happens, `tests/massif.rs`
//!   under memcheck that the unwinder makes no C one either).
//! - The allocator never panics (all counter arithmetic wraps) and is
//!   re-entrancy safe: it holds no state across the call into the inner
//!   allocator, and a thread-local guard stops sampling while a thread
//!   records a sample or runs [`top_sites`]. With sampling off it never
//!   locks; with it on, sampled allocations and frees of sampled blocks hold
//!   a spinlock for a bounded table update, never while allocating, walking
//!   the stack or waiting on anything else, and a thread that finds it
//!   holding the lock itself reports instead of waiting.
//! - Counters are global: every `TrackingAllocator` instance in the process
//!   adds to the same counters (only one can be the global allocator; others
//!   used directly add to the same figures).
//! - Counters use `Relaxed` atomics: each counter is exact, but a [`stats`]
//!   snapshot read while other threads allocate is not an atomic picture of
//!   all counters at one instant. Live bytes (and so the peak) are one shared
//!   counter; the other totals are per-thread slots that [`stats`] sums.

mod allocator;
mod counters;
mod detector;
mod measure;
mod registry;
mod report;
mod sampling;

pub use allocator::TrackingAllocator;
pub use counters::{
    assert_active, is_active, reset_peak, stats, thread_stats, AllocStats, ThreadStats,
};
pub use detector::{
    leak_verdicts, site_key, steps_to_detection, workload, DetectorConfig, Error, LeakAnalysis,
    LeakDetector, Rate, Result, SeriesTrend, Snapshot, Trend, Verdict,
};
pub use measure::{measure, measure_thread, Measurement, ThreadMeasurement};
pub use registry::{LiveGuard, Registry};
pub use report::{AllocatorSection, LabelRow, LeakReport, SiteRow};
pub use sampling::{
    disable_sampling, enable_sampling, release_symbol_cache, sampling_config, sampling_enabled,
    sampling_stats, top_sites, Frame, SamplingConfig, SamplingError, SamplingStats, SiteId,
    SiteReport, MAX_FRAMES, MAX_LIVE_SAMPLES, MAX_SITES,
};
