//! The process-wide and per-thread counters that
//! [`TrackingAllocator`](crate::TrackingAllocator) updates, and their snapshots.
//!
//! Everything reachable from `on_alloc` / `on_dealloc` / `on_realloc` runs
//! inside the global allocator: it must not allocate, lock or panic, so all
//! arithmetic there wraps and the thread-local is `const`-initialised with no
//! destructor.
//!
//! # Where the process-wide figures live
//!
//! A lock-prefixed read-modify-write costs a few nanoseconds even when no
//! other core touches the line, and one per counter per call added ~28 ns to
//! an alloc+free pair. So only `CURRENT` (live bytes) is a shared
//! read-modify-write: each `fetch_add` returns a level the process really
//! had, which is what makes the peak exact. The five monotonic totals
//! (allocations, reallocations, frees, allocated and freed bytes) live in
//! per-thread [`Slot`]s of a static array: a slot is owned by at most one
//! thread at a time, which updates it with a plain relaxed load and store (no
//! lock prefix), and [`stats`] sums the slots. A thread claims a slot at its
//! first counted call and gives it back from a pthread key destructor when it
//! exits; the next owner continues that slot's sums, so nothing is lost.
//! Threads without a slot (more than [`SLOTS`] alive at once, or counting
//! during their own teardown) add to a shared slot with read-modify-writes.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::*};

use gm_core::ByteSize;

// Live bytes and their high-water mark. `Relaxed` is enough: each is an
// independent statistic, and no other memory is published through them.
// `CURRENT` cannot underflow: a block's free happens-after its allocation, so
// by coherence the `fetch_sub` follows the `fetch_add` in `CURRENT`'s
// modification order.
static CURRENT: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

/// How many threads can count without read-modify-writes at once.
const SLOTS: usize = 256;

/// One share of the monotonic process-wide totals. Two cache lines, so that
/// neighbouring owners (and the adjacent-line prefetcher) do not contend.
#[repr(align(128))]
struct Slot {
    /// Set while a thread owns the slot (the shared slot is never owned).
    owned: AtomicBool,
    allocations: AtomicU64,
    reallocations: AtomicU64,
    frees: AtomicU64,
    allocated_bytes: AtomicU64,
    freed_bytes: AtomicU64,
}

impl Slot {
    const fn new() -> Self {
        Self {
            owned: AtomicBool::new(false),
            allocations: AtomicU64::new(0),
            reallocations: AtomicU64::new(0),
            frees: AtomicU64::new(0),
            allocated_bytes: AtomicU64::new(0),
            freed_bytes: AtomicU64::new(0),
        }
    }
}

/// Adds `n` to a counter that only the calling thread writes: a plain load
/// and store, no lock prefix. Readers see some value of its (single-writer)
/// modification order, so the sums they build never go backwards.
#[inline]
fn add_owned(c: &AtomicU64, n: u64) {
    c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
}

/// Adds `n` to a counter that any thread may write.
#[inline]
fn add_shared(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

static SLOT_TABLE: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
/// For threads without a slot of their own; updated with read-modify-writes.
static SHARED: Slot = Slot::new();
/// One past the highest slot index ever claimed: `stats` sums no further.
static SLOTS_IN_USE: AtomicUsize = AtomicUsize::new(0);

/// [`ThreadCounters::slot`] before the thread's first counted call.
const UNCLAIMED: usize = usize::MAX;
/// [`ThreadCounters::slot`] of a thread that counts into [`SHARED`]: no slot
/// was free, the thread is exiting, or it is claiming one right now (so that
/// allocations made while claiming do not claim again).
const NO_SLOT: usize = usize::MAX - 1;

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
    /// Index into [`SLOT_TABLE`], or [`UNCLAIMED`] / [`NO_SLOT`].
    slot: Cell<usize>,
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
            slot: Cell::new(UNCLAIMED),
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

    /// Adds to the process-wide totals through this thread's slot (claimed
    /// on first use), or through [`SHARED`] when it has none.
    #[inline]
    fn add_global(&self, f: impl FnOnce(&Slot, fn(&AtomicU64, u64))) {
        let mut i = self.slot.get();
        if i == UNCLAIMED {
            i = claim_slot(self);
        }
        match SLOT_TABLE.get(i) {
            Some(slot) => f(slot, add_owned),
            None => f(&SHARED, add_shared),
        }
    }
}

thread_local! {
    // `const` initialiser and a type without `Drop`: no lazy initialisation,
    // no destructor registration, so no access can allocate, and `try_with`
    // keeps working while the thread is being torn down.
    static THREAD: ThreadCounters = const { ThreadCounters::new() };
}

/// Claims a free slot for `t`'s thread, or settles for [`NO_SLOT`]. Runs once
/// per thread, inside the allocator: no allocation of its own, no lock.
#[cold]
#[inline(never)]
fn claim_slot(t: &ThreadCounters) -> usize {
    // First, so that anything below that allocated would count into
    // `SHARED` rather than claim again.
    t.slot.set(NO_SLOT);
    let Some(i) = SLOT_TABLE.iter().position(|s| {
        !s.owned.load(Relaxed)
            && s.owned
                .compare_exchange(false, true, Acquire, Relaxed)
                .is_ok()
    }) else {
        return NO_SLOT;
    };
    SLOTS_IN_USE.fetch_max(i + 1, Relaxed);
    if !exit_hook::arm(i) {
        // No way to hand it back at thread exit: do not keep it.
        release_slot(i);
        return NO_SLOT;
    }
    t.slot.set(i);
    i
}

/// Hands slot `i` back; the calling thread counts into [`SHARED`] from now
/// on.
fn release_slot(i: usize) {
    let _ = THREAD.try_with(|t| t.slot.set(NO_SLOT));
    if let Some(slot) = SLOT_TABLE.get(i) {
        // Release: the next owner's `Acquire` claim sees our final sums and
        // continues from them.
        slot.owned.store(false, Release);
    }
}

/// Gives a thread's slot back when the thread exits, through a pthread key
/// destructor.
///
/// Not a `thread_local!` with `Drop`: registering its destructor
/// (`__cxa_thread_atexit_impl` on glibc) takes the dynamic loader's lock,
/// and a thread's first allocation can happen inside a `dl_iterate_phdr`
/// callback, which holds the loader's other lock: the reverse of the order
/// `dlopen` takes them in. `pthread_setspecific` takes no lock, and for the
/// first 32 keys of a process does not allocate (beyond that it `calloc`s,
/// which is C's allocator, not ours). Key destructors run after the
/// thread's Rust thread-local destructors, so their frees still count in the
/// slot.
#[cfg(unix)]
mod exit_hook {
    use std::ffi::c_void;
    use std::sync::atomic::{AtomicUsize, Ordering::*};

    /// `0`: not created yet; `usize::MAX`: creation failed; else key + 1.
    static KEY: AtomicUsize = AtomicUsize::new(0);

    fn key() -> Option<libc::pthread_key_t> {
        match KEY.load(Acquire) {
            0 => create(),
            usize::MAX => None,
            k => Some((k - 1) as libc::pthread_key_t),
        }
    }

    #[cold]
    fn create() -> Option<libc::pthread_key_t> {
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: `key` is a valid out-pointer; `on_thread_exit` has the
        // signature pthread expects and may run on any exiting thread.
        if unsafe { libc::pthread_key_create(&mut key, Some(on_thread_exit)) } != 0 {
            let _ = KEY.compare_exchange(0, usize::MAX, AcqRel, Acquire);
            return None;
        }
        match KEY.compare_exchange(0, key as usize + 1, AcqRel, Acquire) {
            Ok(_) => Some(key),
            Err(winner) => {
                // Another thread created one first: use that, drop ours
                // (no thread has set a value for it).
                // SAFETY: `key` was created above and never used.
                unsafe { libc::pthread_key_delete(key) };
                (winner != usize::MAX).then(|| (winner - 1) as libc::pthread_key_t)
            }
        }
    }

    unsafe extern "C" fn on_thread_exit(value: *mut c_void) {
        super::release_slot((value as usize).wrapping_sub(1));
    }

    /// Arranges for slot `i` to be released when the calling thread exits.
    pub(super) fn arm(i: usize) -> bool {
        let Some(key) = key() else {
            return false;
        };
        // SAFETY: `key` is a live key of this process; the value is a plain
        // integer (never dereferenced), non-null because of the `+ 1`.
        unsafe { libc::pthread_setspecific(key, (i + 1) as *const c_void) == 0 }
    }
}

/// Without pthreads a slot is kept until the process exits; once all are
/// taken, further threads count through [`SHARED`].
#[cfg(not(unix))]
mod exit_hook {
    pub(super) fn arm(_i: usize) -> bool {
        true
    }
}

#[inline]
fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get().wrapping_add(n));
}

/// Counts a new block of `size` bytes. Called inside the allocator.
#[inline]
pub(crate) fn on_alloc(size: u64) {
    grow(size);
    let counted = THREAD.try_with(|t| {
        bump(&t.allocations, 1);
        bump(&t.allocated_bytes, size);
        t.raise_peak();
        t.add_global(|s, add| {
            add(&s.allocations, 1);
            add(&s.allocated_bytes, size);
        });
    });
    if counted.is_err() {
        add_shared(&SHARED.allocations, 1);
        add_shared(&SHARED.allocated_bytes, size);
    }
}

/// Counts the free of a block of `size` bytes. Called inside the allocator.
#[inline]
pub(crate) fn on_dealloc(size: u64) {
    CURRENT.fetch_sub(size, Relaxed);
    let counted = THREAD.try_with(|t| {
        bump(&t.frees, 1);
        bump(&t.freed_bytes, size);
        t.add_global(|s, add| {
            add(&s.frees, 1);
            add(&s.freed_bytes, size);
        });
    });
    if counted.is_err() {
        add_shared(&SHARED.frees, 1);
        add_shared(&SHARED.freed_bytes, size);
    }
}

/// Counts a successful resize from `old` to `new` bytes: one allocation, one
/// reallocation, the size delta as allocated or freed bytes. Called inside
/// the allocator.
#[inline]
pub(crate) fn on_realloc(old: u64, new: u64) {
    let (grown, shrunk) = if new >= old {
        (new - old, 0)
    } else {
        (0, old - new)
    };
    if grown > 0 {
        grow(grown);
    } else {
        CURRENT.fetch_sub(shrunk, Relaxed);
    }
    let counted = THREAD.try_with(|t| {
        bump(&t.allocations, 1);
        bump(&t.reallocations, 1);
        bump(&t.allocated_bytes, grown);
        bump(&t.freed_bytes, shrunk);
        t.raise_peak();
        t.add_global(|s, add| {
            add(&s.allocations, 1);
            add(&s.reallocations, 1);
            add(&s.allocated_bytes, grown);
            add(&s.freed_bytes, shrunk);
        });
    });
    if counted.is_err() {
        add_shared(&SHARED.allocations, 1);
        add_shared(&SHARED.reallocations, 1);
        add_shared(&SHARED.allocated_bytes, grown);
        add_shared(&SHARED.freed_bytes, shrunk);
    }
}

#[inline]
fn grow(n: u64) {
    let now = CURRENT.fetch_add(n, Relaxed).wrapping_add(n);
    // Read first: most allocations do not set a new peak, and a plain load
    // keeps the cache line shared instead of writing it on every call.
    if now > PEAK.load(Relaxed) {
        PEAK.fetch_max(now, Relaxed);
    }
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

/// The process-wide counters now. Cheap (relaxed loads: two, plus one
/// cache line per thread slot ever used); does not allocate.
pub fn stats() -> AllocStats {
    let used = SLOTS_IN_USE.load(Relaxed).min(SLOTS);
    let mut s = AllocStats {
        current_bytes: CURRENT.load(Relaxed),
        peak_bytes: PEAK.load(Relaxed),
        ..AllocStats::default()
    };
    for slot in SLOT_TABLE[..used].iter().chain([&SHARED]) {
        s.allocated_bytes = s
            .allocated_bytes
            .wrapping_add(slot.allocated_bytes.load(Relaxed));
        s.freed_bytes = s.freed_bytes.wrapping_add(slot.freed_bytes.load(Relaxed));
        s.allocations = s.allocations.wrapping_add(slot.allocations.load(Relaxed));
        s.reallocations = s
            .reallocations
            .wrapping_add(slot.reallocations.load(Relaxed));
        s.frees = s.frees.wrapping_add(slot.frees.load(Relaxed));
    }
    s
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
    let global_before = stats().allocations;
    // `black_box` makes the box escape, so the allocation cannot be elided.
    drop(std::hint::black_box(Box::new(0u64)));
    match (thread_before, THREAD.try_with(|t| t.allocations.get()).ok()) {
        (Some(before), Some(after)) => after != before,
        // No thread-locals (thread teardown): fall back on the global count.
        _ => stats().allocations != global_before,
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
    fn exited_threads_hand_their_slots_back() {
        // 600 threads one after another, each counting one allocation by
        // calling a tracking allocator directly (this binary does not
        // install it globally, so nothing else claims slots). Each claims a
        // slot and hands it back on exit, so the same few are reused; kept
        // slots would use up all 256 (then `SLOTS_IN_USE == SLOTS`).
        use std::alloc::{GlobalAlloc, Layout, System};
        let a = crate::TrackingAllocator::new(System);
        let layout = Layout::from_size_align(24, 8).unwrap();
        for _ in 0..600 {
            std::thread::spawn(move || {
                // SAFETY: non-zero size; freed at once with the same layout.
                unsafe { a.dealloc(a.alloc(layout), layout) };
                let t = thread_stats();
                assert_eq!((t.allocations, t.frees), (1, 1));
                THREAD.with(|t| assert!(t.slot.get() < SLOTS, "got a slot"));
            })
            .join()
            .unwrap();
        }
        let used = SLOTS_IN_USE.load(Relaxed);
        assert!(used <= 16, "{used} slots used by 600 sequential threads");
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
