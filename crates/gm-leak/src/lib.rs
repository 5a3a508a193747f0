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
//! # Invariants
//!
//! - Tier 1: depends on gm-core only, never on another tier-1 crate
//!   (gm-buffers, gm-monitor, gm-gc, gm-shard, gm-market).
//! - No allocation inside the allocator: the counting path touches only static
//!   atomics and a `const`-initialised thread-local without destructor.
//! - The allocator never locks, never panics (all counter arithmetic wraps) and
//!   is re-entrancy safe (it holds no state across the call into the inner
//!   allocator).
//! - Counters are global: every `TrackingAllocator` instance in the process
//!   adds to the same counters (only one can be the global allocator; others
//!   used directly add to the same figures).
//! - Counters use `Relaxed` atomics: each counter is exact, but a [`stats`]
//!   snapshot read while other threads allocate is not an atomic picture of
//!   all counters at one instant.

mod allocator;
mod counters;
mod measure;

pub use allocator::TrackingAllocator;
pub use counters::{
    assert_active, is_active, reset_peak, stats, thread_stats, AllocStats, ThreadStats,
};
pub use measure::{measure, measure_thread, Measurement, ThreadMeasurement};
