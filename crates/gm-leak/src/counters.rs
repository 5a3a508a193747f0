//! The process-wide and per-thread counters that
//! [`TrackingAllocator`](crate::TrackingAllocator) updates, and their snapshots.
//!
//! Everything reachable from `on_alloc` / `on_dealloc` / `on_realloc` runs
//! inside the global allocator: it must not allocate, lock or panic, so all
//! arithmetic there wraps and the thread-local is `const`-initialised with no
//! destructor.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};

use gm_core::ByteSize;

// Process-wide counters. `Relaxed` is enough: each is an independent
// statistic, and no other memory is published through them. `CURRENT` cannot
// underflow: a block's free happens-after its allocation, so by coherence the
// `fetch_sub` follows the `fetch_add` in `CURRENT`'s modification order.
static CURRENT: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
static ALLOCATED: AtomicU64 = AtomicU64::new(0);
static FREED: AtomicU64 = AtomicU64::new(0);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static REALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static FREES: AtomicU64 = AtomicU64::new(0);

/// The calling thread's counters. All cumulative and monotonic except
/// `peak_net`, the highest `allocated - freed` seen since the innermost
/// [`measure_thread`](crate::measure_thread) started (scoped by that function).
struct ThreadCounters {
    allocations: Cell<u64>,
    reallocations: Cell<u64>,
    frees: Cell<u64>,
    allocated_bytes: Cell<u64>,
    freed_bytes: Cell<u64>,
    peak_net: Cell<i64>,
}

impl ThreadCounters {
    const fn new() -> Self {
        Self {
            allocations: Cell::new(0),
            reallocations: Cell::new(0),
            frees: Cell::new(0),
            allocated_bytes: Cell::new(0),
            freed_bytes: Cell::new(0),
            peak_net: Cell::new(0),
        }
    }

    /// Bytes this thread allocated minus bytes it freed; negative when it
    /// frees blocks other threads allocated.
    fn net(&self) -> i64 {
        self.allocated_bytes
            .get()
            .wrapping_sub(self.freed_bytes.get()) as i64
    }

    fn raise_peak(&self) {
        let net = self.net();
        if net > self.peak_net.get() {
            self.peak_net.set(net);
        }
    }

    fn stats(&self) -> ThreadStats {
        ThreadStats {
            allocations: self.allocations.get(),
            reallocations: self.reallocations.get(),
            frees: self.frees.get(),
            allocated_bytes: self.allocated_bytes.get(),
            freed_bytes: self.freed_bytes.get(),
        }
    }
}

thread_local! {
    // `const` initialiser and a type without `Drop`: no lazy initialisation,
    // no destructor registration, so no access can allocate, and `try_with`
    // keeps working while the thread is being torn down.
    static THREAD: ThreadCounters = const { ThreadCounters::new() };
}

#[inline]
fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get().wrapping_add(n));
}

/// Counts a new block of `size` bytes. Called inside the allocator.
#[inline]
pub(crate) fn on_alloc(size: u64) {
    ALLOCATIONS.fetch_add(1, Relaxed);
    grow(size);
    let _ = THREAD.try_with(|t| {
        bump(&t.allocations, 1);
        bump(&t.allocated_bytes, size);
        t.raise_peak();
    });
}

/// Counts the free of a block of `size` bytes. Called inside the allocator.
#[inline]
pub(crate) fn on_dealloc(size: u64) {
    FREES.fetch_add(1, Relaxed);
    shrink(size);
    let _ = THREAD.try_with(|t| {
        bump(&t.frees, 1);
        bump(&t.freed_bytes, size);
    });
}

/// Counts a successful resize from `old` to `new` bytes: one allocation, one
/// reallocation, the size delta as allocated or freed bytes. Called inside
/// the allocator.
#[inline]
pub(crate) fn on_realloc(old: u64, new: u64) {
    ALLOCATIONS.fetch_add(1, Relaxed);
    REALLOCATIONS.fetch_add(1, Relaxed);
    if new >= old {
        grow(new - old);
    } else {
        shrink(old - new);
    }
    let _ = THREAD.try_with(|t| {
        bump(&t.allocations, 1);
        bump(&t.reallocations, 1);
        if new >= old {
            bump(&t.allocated_bytes, new - old);
            t.raise_peak();
        } else {
            bump(&t.freed_bytes, old - new);
        }
    });
}

#[inline]
fn grow(n: u64) {
    ALLOCATED.fetch_add(n, Relaxed);
    let now = CURRENT.fetch_add(n, Relaxed).wrapping_add(n);
    // Read first: most allocations do not set a new peak, and a plain load
    // keeps the cache line shared instead of writing it on every call.
    if now > PEAK.load(Relaxed) {
        PEAK.fetch_max(now, Relaxed);
    }
}

#[inline]
fn shrink(n: u64) {
    FREED.fetch_add(n, Relaxed);
    CURRENT.fetch_sub(n, Relaxed);
}

/// A snapshot of the process-wide counters, shared by all threads and all
/// [`TrackingAllocator`](crate::TrackingAllocator) instances, since process
/// start.
///
/// `current_bytes == allocated_bytes - freed_bytes`, exactly when nothing
/// allocates during the snapshot. Byte figures are requested sizes
/// (`Layout::size`), not what the inner allocator rounds them up to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Bytes in live blocks now.
    pub current_bytes: u64,
    /// Highest `current_bytes` since start or the last [`reset_peak`].
    pub peak_bytes: u64,
    /// Bytes handed out in all: new blocks plus realloc growth.
    pub allocated_bytes: u64,
    /// Bytes given back in all: freed blocks plus realloc shrinkage.
    pub freed_bytes: u64,
    /// Allocator calls that handed out memory: `alloc`, `alloc_zeroed` and
    /// `realloc` (see the crate docs).
    pub allocations: u64,
    /// How many of `allocations` were `realloc`s.
    pub reallocations: u64,
    /// Blocks freed (`dealloc` calls).
    pub frees: u64,
}

impl AllocStats {
    /// Blocks alive now: `allocations - reallocations - frees`.
    pub fn live_blocks(&self) -> u64 {
        self.allocations
            .wrapping_sub(self.reallocations)
            .wrapping_sub(self.frees)
    }
}

impl fmt::Display for AllocStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "current {}, peak {}, allocated {} in {} allocations ({} reallocations), {} frees",
            ByteSize(self.current_bytes),
            ByteSize(self.peak_bytes),
            ByteSize(self.allocated_bytes),
            self.allocations,
            self.reallocations,
            self.frees,
        )
    }
}

/// A snapshot of the calling thread's counters since the thread started.
///
/// A thread that frees blocks another thread allocated has
/// `freed_bytes > allocated_bytes`: [`net_bytes`](Self::net_bytes) can be
/// negative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadStats {
    /// Allocator calls on this thread that handed out memory (`alloc`,
    /// `alloc_zeroed`, `realloc`).
    pub allocations: u64,
    /// How many of `allocations` were `realloc`s.
    pub reallocations: u64,
    /// Blocks freed on this thread.
    pub frees: u64,
    /// Bytes handed out on this thread (new blocks plus realloc growth).
    pub allocated_bytes: u64,
    /// Bytes given back on this thread (freed blocks plus realloc shrinkage).
    pub freed_bytes: u64,
}

impl ThreadStats {
    /// `allocated_bytes - freed_bytes`.
    pub fn net_bytes(&self) -> i64 {
        self.allocated_bytes.wrapping_sub(self.freed_bytes) as i64
    }
}

/// The process-wide counters now. Cheap (seven relaxed loads); does not
/// allocate.
pub fn stats() -> AllocStats {
    AllocStats {
        current_bytes: CURRENT.load(Relaxed),
        peak_bytes: PEAK.load(Relaxed),
        allocated_bytes: ALLOCATED.load(Relaxed),
        freed_bytes: FREED.load(Relaxed),
        allocations: ALLOCATIONS.load(Relaxed),
        reallocations: REALLOCATIONS.load(Relaxed),
        frees: FREES.load(Relaxed),
    }
}

/// The calling thread's counters now (all zero if called so late in thread
/// teardown that its thread-locals are gone). Does not allocate.
pub fn thread_stats() -> ThreadStats {
    THREAD.try_with(ThreadCounters::stats).unwrap_or_default()
}

/// Restarts the process-wide peak from the current level: afterwards
/// `stats().peak_bytes == stats().current_bytes` (when nothing else
/// allocates meanwhile).
///
/// Other threads allocating during the reset may be missed by at most the
/// bytes they added between the two loads here.
pub fn reset_peak() {
    reset_peak_to_current();
}

/// [`reset_peak`], returning the level it reset to.
pub(crate) fn reset_peak_to_current() -> u64 {
    let now = CURRENT.load(Relaxed);
    PEAK.store(now, Relaxed);
    // Pick up growth that raced with the store above.
    PEAK.fetch_max(CURRENT.load(Relaxed), Relaxed);
    now
}

pub(crate) fn peak() -> u64 {
    PEAK.load(Relaxed)
}

/// Raises the process-wide peak to at least `bytes`.
pub(crate) fn raise_peak_to(bytes: u64) {
    PEAK.fetch_max(bytes, Relaxed);
}

/// The calling thread's net bytes and scoped peak, `None` once its
/// thread-locals are gone.
pub(crate) fn thread_net_and_peak() -> Option<(i64, i64)> {
    THREAD.try_with(|t| (t.net(), t.peak_net.get())).ok()
}

/// Sets the calling thread's scoped peak to `peak`.
pub(crate) fn set_thread_peak(peak: i64) {
    let _ = THREAD.try_with(|t| t.peak_net.set(peak));
}

const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;
static ACTIVE: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether a [`TrackingAllocator`](crate::TrackingAllocator) is the global
/// allocator of this process.
///
/// The first call makes one tiny allocation through the global allocator and
/// checks that the calling thread's counters saw it; the answer is cached, as
/// the global allocator cannot change while the process runs.
pub fn is_active() -> bool {
    match ACTIVE.load(Relaxed) {
        YES => true,
        NO => false,
        _ => {
            let active = probe();
            ACTIVE.store(if active { YES } else { NO }, Relaxed);
            active
        }
    }
}

fn probe() -> bool {
    let thread_before = THREAD.try_with(|t| t.allocations.get()).ok();
    let global_before = ALLOCATIONS.load(Relaxed);
    // `black_box` makes the box escape, so the allocation cannot be elided.
    drop(std::hint::black_box(Box::new(0u64)));
    match (thread_before, THREAD.try_with(|t| t.allocations.get()).ok()) {
        (Some(before), Some(after)) => after != before,
        // No thread-locals (thread teardown): fall back on the global count.
        _ => ALLOCATIONS.load(Relaxed) != global_before,
    }
}

/// Panics unless [`is_active`], with a message that shows the missing line.
///
/// # Panics
///
/// When no `TrackingAllocator` is the global allocator.
#[track_caller]
pub fn assert_active() {
    assert!(
        is_active(),
        "gm-leak: the tracking allocator is not installed, so nothing is counted; add \
         `#[global_allocator] static ALLOC: gm_leak::TrackingAllocator = \
         gm_leak::TrackingAllocator::system();` to this binary (test file, bench or main)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    // This unit-test binary does not install the allocator globally.

    #[test]
    fn not_active_without_global_allocator() {
        assert!(!is_active());
        assert!(!is_active(), "cached answer");
    }

    #[test]
    #[should_panic(expected = "#[global_allocator]")]
    fn assert_active_names_the_missing_line() {
        assert_active();
    }

    #[test]
    fn live_blocks_discounts_reallocations() {
        let s = AllocStats {
            allocations: 10,
            reallocations: 3,
            frees: 4,
            ..AllocStats::default()
        };
        assert_eq!(s.live_blocks(), 3);
    }

    #[test]
    fn thread_net_can_be_negative() {
        let s = ThreadStats {
            allocated_bytes: 10,
            freed_bytes: 25,
            ..ThreadStats::default()
        };
        assert_eq!(s.net_bytes(), -15);
    }

    #[test]
    fn display_uses_binary_units() {
        let s = AllocStats {
            current_bytes: 2048,
            peak_bytes: 3 << 20,
            allocated_bytes: 100,
            allocations: 4,
            reallocations: 1,
            frees: 2,
            ..AllocStats::default()
        };
        assert_eq!(
            s.to_string(),
            "current 2.00 KiB, peak 3.00 MiB, allocated 100 B in 4 allocations (1 reallocations), 2 frees"
        );
    }
}
