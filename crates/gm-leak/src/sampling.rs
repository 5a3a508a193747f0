//! Sampled allocation sites: which call paths hold the live heap, estimated
//! from a Poisson sample of the allocated bytes (jemalloc's `lg_prof_sample`
//! scheme). Off by default; see the crate docs, "Sampled allocation sites".
//!
//! Inside the allocator (`on_alloc`, `on_free`, `take`, `restore`) nothing
//! allocates: the per-thread sampler is a `const`-initialised thread-local
//! without destructor, stacks are captured into a fixed array on the stack,
//! and the tables are static arrays (zero-initialised `.bss`: untouched pages
//! never become resident) behind a spinlock that is held only for bounded,
//! allocation-free table updates. Symbols are resolved in [`top_sites`],
//! outside the allocator and outside the lock.

use std::cell::{Cell, UnsafeCell};
use std::collections::HashMap;
use std::ffi::c_void;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Mutex, PoisonError};

use gm_core::ByteSize;

use crate::counters;

/// Most frames [`SamplingConfig::max_frames`] may ask for.
pub const MAX_FRAMES: usize = 64;
/// Extra return addresses captured beyond `max_frames`, for the allocator's
/// own frames (the unwinder, this module, `TrackingAllocator`, the
/// `__rust_alloc` shim), which [`top_sites`] drops.
const ALLOCATOR_FRAMES: usize = 16;
const RAW_FRAMES: usize = MAX_FRAMES + ALLOCATOR_FRAMES;

/// Slots of the table of live sampled blocks (a power of two).
const LIVE_SLOTS: usize = 1 << 16;
/// Most sampled blocks alive at once; samples beyond it are dropped (and
/// counted in [`SamplingStats::dropped_samples`]).
pub const MAX_LIVE_SAMPLES: usize = LIVE_SLOTS / 4 * 3;
/// Slots of the table of distinct stacks (a power of two).
const SITE_SLOTS: usize = 4096;
/// Most distinct sampled stacks until [`disable_sampling`]; samples from new
/// stacks beyond it are dropped (and counted).
pub const MAX_SITES: usize = SITE_SLOTS / 4 * 3;

/// Fixed-point scale of the per-block allocation-count weight `1 / p`.
const COUNT_SCALE: f64 = (1u64 << 20) as f64;

// ---------------------------------------------------------------------------
// Configuration and errors

/// How [`enable_sampling`] samples. Fields carry their units; [`Default`]
/// gives the documented defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplingConfig {
    /// Mean bytes allocated between two samples, per thread: the inverse rate
    /// of the Poisson process over allocated bytes (jemalloc's
    /// `2^lg_prof_sample`). Default 512 KiB. An allocation of `s` bytes is
    /// sampled with probability `1 - exp(-s / mean)`. Allowed:
    /// `1..=`[`SamplingConfig::MAX_MEAN_BYTES`].
    pub mean_bytes_between_samples: u64,
    /// Return addresses kept per site, from the allocating function outward,
    /// after the allocator's own frames are dropped (inlined functions add
    /// entries to [`SiteReport::frames`] without counting here). Deeper
    /// stacks are cut, so paths that differ only beyond this depth are one
    /// site. Default 32; allowed `1..=`[`MAX_FRAMES`].
    pub max_frames: usize,
    /// Seed of the per-thread generators that place the sample points.
    /// `None` (default): a fresh random seed per [`enable_sampling`].
    /// `Some(s)`: thread number `k` (counted in the order threads first
    /// allocate after enabling) draws a fixed sequence, so a single-threaded
    /// program samples the same allocations in every run.
    pub seed: Option<u64>,
}

impl SamplingConfig {
    /// Largest [`mean_bytes_between_samples`](Self::mean_bytes_between_samples): 1 TiB.
    pub const MAX_MEAN_BYTES: u64 = 1 << 40;
    /// Default [`mean_bytes_between_samples`](Self::mean_bytes_between_samples): 512 KiB.
    pub const DEFAULT_MEAN_BYTES: u64 = 512 << 10;
    /// Default [`max_frames`](Self::max_frames).
    pub const DEFAULT_MAX_FRAMES: usize = 32;

    /// Checks every field against its allowed range.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(1..=Self::MAX_MEAN_BYTES).contains(&self.mean_bytes_between_samples) {
            return Err(SamplingError::InvalidConfig {
                key: "mean_bytes_between_samples",
                value: self.mean_bytes_between_samples,
                allowed: "1..=1099511627776 (1 TiB)",
            });
        }
        if !(1..=MAX_FRAMES).contains(&self.max_frames) {
            return Err(SamplingError::InvalidConfig {
                key: "max_frames",
                value: self.max_frames as u64,
                allowed: "1..=64",
            });
        }
        Ok(())
    }
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            mean_bytes_between_samples: Self::DEFAULT_MEAN_BYTES,
            max_frames: Self::DEFAULT_MAX_FRAMES,
            seed: None,
        }
    }
}

/// Why [`enable_sampling`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SamplingError {
    /// Sampling is already on, with `current`; call [`disable_sampling`]
    /// first to change the configuration.
    AlreadyEnabled {
        /// The configuration in force.
        current: SamplingConfig,
    },
    /// A [`SamplingConfig`] field is out of range.
    InvalidConfig {
        /// The field.
        key: &'static str,
        /// The value given.
        value: u64,
        /// What is allowed.
        allowed: &'static str,
    },
    /// This target has no allocation-free stack walker wired up (sampling
    /// needs a unix target with the libunwind-style unwinder).
    Unsupported,
}

impl fmt::Display for SamplingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlreadyEnabled { current } => write!(
                f,
                "allocation sampling is already enabled (mean {} between samples); \
                 disable it first to change the configuration",
                ByteSize(current.mean_bytes_between_samples)
            ),
            Self::InvalidConfig {
                key,
                value,
                allowed,
            } => write!(
                f,
                "invalid sampling config: {key} = {value}, allowed {allowed}"
            ),
            Self::Unsupported => write!(
                f,
                "allocation sampling is not supported on this target (needs unix)"
            ),
        }
    }
}

impl std::error::Error for SamplingError {}

// ---------------------------------------------------------------------------
// Global state

/// The one flag the allocator's fast path reads (relaxed). Set while sampling
/// is on; while it is clear the tables are empty, so frees need no lookup.
static ENABLED: AtomicBool = AtomicBool::new(false);
/// Bumped by every [`enable_sampling`]; a thread whose sampler carries an
/// older value reseeds and redraws its countdown.
static EPOCH: AtomicU64 = AtomicU64::new(0);
/// `mean_bytes_between_samples` in force.
static MEAN_BYTES: AtomicU64 = AtomicU64::new(SamplingConfig::DEFAULT_MEAN_BYTES);
/// Return addresses to capture: `max_frames + ALLOCATOR_FRAMES`.
static CAPTURE_FRAMES: AtomicUsize = AtomicUsize::new(0);
/// Base seed of this epoch's per-thread generators.
static SEED: AtomicU64 = AtomicU64::new(0);
/// Threads that have started sampling in this epoch (their stream numbers).
static STREAMS: AtomicU64 = AtomicU64::new(0);
/// Frees of sampled blocks that could not be recorded because the freeing
/// thread itself held the table lock (impossible by construction; counted
/// rather than deadlocking).
static MISSED_FREES: AtomicU64 = AtomicU64::new(0);
/// The configuration in force (`None` while off); also serialises enable and
/// disable. Never touched inside the allocator.
static CONTROL: Mutex<Option<SamplingConfig>> = Mutex::new(None);

/// Whether the allocator must call into this module. One relaxed load: all
/// that sampling costs the allocator while it is off.
#[inline(always)]
pub(crate) fn active() -> bool {
    ENABLED.load(Relaxed)
}

// ---------------------------------------------------------------------------
// Per-thread sampler

/// A thread's place in its Poisson process over allocated bytes.
struct Sampler {
    /// Bytes still to allocate before the next sample point (`floor` of an
    /// exponential draw, so `countdown < size` exactly when the continuous
    /// draw falls inside the block).
    countdown: Cell<i64>,
    /// splitmix64 state.
    rng: Cell<u64>,
    /// [`EPOCH`] the countdown was drawn in (0: never).
    epoch: Cell<u64>,
    /// In-allocator guard: set while this thread records a sample or runs
    /// [`top_sites`]; no sampling while set, so nothing recurses.
    busy: Cell<bool>,
}

thread_local! {
    // `const` initialiser, no `Drop`: accessing it never allocates or
    // registers a destructor, and it stays usable during thread teardown.
    static SAMPLER: Sampler = const {
        Sampler {
            countdown: Cell::new(0),
            rng: Cell::new(0),
            epoch: Cell::new(0),
            busy: Cell::new(false),
        }
    };
}

/// splitmix64: a full-period 64-bit generator, three multiplies per draw.
#[inline]
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `floor` of an exponential variate with mean `mean` bytes (inverse
/// transform of a uniform in `(0, 1]`). No allocation: `ln` is libm's.
fn draw_countdown(state: &mut u64, mean: u64) -> i64 {
    let u = ((splitmix64(state) >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64);
    let bytes = -u.ln() * mean as f64; // at most ~36.7 * 2^40 < 2^63
    bytes as i64
}

impl Sampler {
    /// Advances the process over `size` bytes; `Some(epoch)` when a sample
    /// point falls inside this block.
    #[inline]
    fn decide(&self, size: usize) -> Option<u64> {
        if self.busy.get() {
            return None;
        }
        let epoch = EPOCH.load(Acquire);
        if self.epoch.get() != epoch {
            self.start(epoch);
        }
        let left = self
            .countdown
            .get()
            .wrapping_sub(size.min(i64::MAX as usize) as i64);
        if left >= 0 {
            self.countdown.set(left);
            return None;
        }
        // Memoryless: the next point is a fresh draw from the block's end.
        let mut rng = self.rng.get();
        self.countdown
            .set(draw_countdown(&mut rng, MEAN_BYTES.load(Relaxed)));
        self.rng.set(rng);
        Some(epoch)
    }

    #[cold]
    fn start(&self, epoch: u64) {
        let stream = STREAMS.fetch_add(1, Relaxed);
        let mut rng = SEED.load(Relaxed) ^ stream.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        splitmix64(&mut rng);
        self.countdown
            .set(draw_countdown(&mut rng, MEAN_BYTES.load(Relaxed)));
        self.rng.set(rng);
        self.epoch.set(epoch);
    }
}

/// Sets this thread's in-allocator guard until dropped (restoring the
/// previous value, so it nests).
struct Busy(bool);

impl Busy {
    fn enter() -> Self {
        Self(SAMPLER.try_with(|s| s.busy.replace(true)).unwrap_or(true))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = SAMPLER.try_with(|s| s.busy.set(self.0));
    }
}

// ---------------------------------------------------------------------------
// Tables

/// `1 - exp(-size / mean)`: the chance that a block of `size` bytes holds a
/// sample point.
fn sample_probability(size: u64, mean: u64) -> f64 {
    -(-(size as f64) / mean as f64).exp_m1()
}

/// What one live sampled block of `size` bytes stands for: `size / p` bytes
/// and `1 / p` blocks (the latter scaled by [`COUNT_SCALE`]), the inverse
/// probability weights that make the per-site sums unbiased.
fn weights(size: u64, mean: u64) -> (u128, u128) {
    let p = sample_probability(size, mean);
    if p <= 0.0 {
        return (0, 0);
    }
    (
        (size as f64 / p).round() as u128,
        (COUNT_SCALE / p).round() as u128,
    )
}

/// Spreads pointer bits (blocks are 16-byte aligned, and neighbours differ
/// in middle bits) over the whole word.
#[inline]
fn mix(x: u64) -> u64 {
    let x = (x ^ (x >> 31)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 29)
}

fn hash_frames(frames: &[usize]) -> u64 {
    let mut h = frames.len() as u64;
    for &ip in frames {
        h = mix(h.rotate_left(5) ^ ip as u64);
    }
    h
}

/// One live sampled block. `ptr == 0`: empty slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LiveEntry {
    ptr: usize,
    size: u64,
    site: u32,
}

impl LiveEntry {
    const EMPTY: Self = Self {
        ptr: 0,
        size: 0,
        site: 0,
    };
}

/// Open addressing with linear probing, keyed by block address. Deletion
/// shifts later entries of the probe run back, so there are no tombstones
/// and lookups of unsampled pointers stay short. Used only under the lock.
struct LiveTable<const N: usize> {
    entries: [LiveEntry; N],
    len: usize,
}

impl<const N: usize> LiveTable<N> {
    const MAX_LEN: usize = N / 4 * 3;

    const fn new() -> Self {
        Self {
            entries: [LiveEntry::EMPTY; N],
            len: 0,
        }
    }

    fn home(ptr: usize) -> usize {
        mix(ptr as u64) as usize & (N - 1)
    }

    /// Inserts `e`; `Ok(Some(old))` when an entry for the same address was
    /// replaced, `Err(())` when full.
    fn insert(&mut self, e: LiveEntry) -> Result<Option<LiveEntry>, ()> {
        let mut i = Self::home(e.ptr);
        loop {
            let slot = &mut self.entries[i];
            if slot.ptr == e.ptr {
                return Ok(Some(std::mem::replace(slot, e)));
            }
            if slot.ptr == 0 {
                if self.len >= Self::MAX_LEN {
                    return Err(());
                }
                *slot = e;
                self.len += 1;
                return Ok(None);
            }
            i = (i + 1) & (N - 1);
        }
    }

    fn remove(&mut self, ptr: usize) -> Option<LiveEntry> {
        let mut i = Self::home(ptr);
        loop {
            match self.entries[i].ptr {
                0 => return None,
                p if p == ptr => break,
                _ => i = (i + 1) & (N - 1),
            }
        }
        let found = self.entries[i];
        self.len -= 1;
        // Backward-shift deletion: move up every later entry of the run
        // whose home is not cyclically in (i, j].
        let mut j = i;
        loop {
            j = (j + 1) & (N - 1);
            let e = self.entries[j];
            if e.ptr == 0 {
                break;
            }
            let k = Self::home(e.ptr);
            let stays = if i <= j {
                i < k && k <= j
            } else {
                i < k || k <= j
            };
            if !stays {
                self.entries[i] = e;
                i = j;
            }
        }
        self.entries[i] = LiveEntry::EMPTY;
        Some(found)
    }
}

/// One distinct captured stack and what its live sampled blocks add up to.
#[derive(Clone, Copy)]
struct SiteEntry {
    used: bool,
    len: u16,
    hash: u64,
    frames: [usize; RAW_FRAMES],
    live_bytes: u64,
    live_count: u64,
    est_bytes: u128,
    est_count: u128,
    total_count: u64,
    total_bytes: u64,
}

impl SiteEntry {
    const EMPTY: Self = Self {
        used: false,
        len: 0,
        hash: 0,
        frames: [0; RAW_FRAMES],
        live_bytes: 0,
        live_count: 0,
        est_bytes: 0,
        est_count: 0,
        total_count: 0,
        total_bytes: 0,
    };

    fn stack(&self) -> &[usize] {
        &self.frames[..usize::from(self.len)]
    }
}

/// Insert-only open addressing by stack hash, emptied by
/// [`disable_sampling`]. `order` lists the used slots.
struct SiteTable<const N: usize> {
    entries: [SiteEntry; N],
    order: [u16; N],
    len: usize,
}

impl<const N: usize> SiteTable<N> {
    const MAX_LEN: usize = N / 4 * 3;

    const fn new() -> Self {
        Self {
            entries: [SiteEntry::EMPTY; N],
            order: [0; N],
            len: 0,
        }
    }

    fn find_or_insert(&mut self, hash: u64, stack: &[usize]) -> Option<u32> {
        let mut i = mix(hash) as usize & (N - 1);
        loop {
            let e = &mut self.entries[i];
            if !e.used {
                if self.len >= Self::MAX_LEN {
                    return None;
                }
                e.used = true;
                e.hash = hash;
                e.len = stack.len() as u16;
                e.frames[..stack.len()].copy_from_slice(stack);
                self.order[self.len] = i as u16;
                self.len += 1;
                return Some(i as u32);
            }
            if e.hash == hash && e.stack() == stack {
                return Some(i as u32);
            }
            i = (i + 1) & (N - 1);
        }
    }
}

struct Tables {
    live: LiveTable<LIVE_SLOTS>,
    sites: SiteTable<SITE_SLOTS>,
    /// Bumped whenever the tables are emptied, so a block taken out by a
    /// failing `realloc` is not put back into a newer generation.
    generation: u64,
    samples: u64,
    dropped: u64,
}

impl Tables {
    fn add(&mut self, e: LiveEntry, sign: Sign) {
        let mean = MEAN_BYTES.load(Relaxed);
        let (wb, wc) = weights(e.size, mean);
        // Wrapping arithmetic: this runs inside the allocator, which must not
        // panic; every subtraction undoes an earlier addition of the same
        // value, so the sums are exact.
        let site = &mut self.sites.entries[e.site as usize];
        match sign {
            Sign::Plus => {
                site.live_bytes = site.live_bytes.wrapping_add(e.size);
                site.live_count = site.live_count.wrapping_add(1);
                site.est_bytes = site.est_bytes.wrapping_add(wb);
                site.est_count = site.est_count.wrapping_add(wc);
                FILTER[filter_index(e.ptr)].fetch_add(1, Relaxed);
            }
            Sign::Minus => {
                site.live_bytes = site.live_bytes.wrapping_sub(e.size);
                site.live_count = site.live_count.wrapping_sub(1);
                site.est_bytes = site.est_bytes.wrapping_sub(wb);
                site.est_count = site.est_count.wrapping_sub(wc);
                FILTER[filter_index(e.ptr)].fetch_sub(1, Relaxed);
            }
        }
    }

    /// Records the live block `e`, replacing any stale entry for its address.
    fn insert(&mut self, e: LiveEntry) -> bool {
        match self.live.insert(e) {
            Err(()) => false,
            Ok(old) => {
                if let Some(old) = old {
                    self.add(old, Sign::Minus);
                }
                self.add(e, Sign::Plus);
                true
            }
        }
    }

    fn remove(&mut self, ptr: usize) -> Option<LiveEntry> {
        let e = self.live.remove(ptr)?;
        self.add(e, Sign::Minus);
        Some(e)
    }

    /// Empties both tables, writing only the slots in use.
    fn clear(&mut self) {
        if self.live.len > 0 {
            for e in self.live.entries.iter_mut().filter(|e| e.ptr != 0) {
                FILTER[filter_index(e.ptr)].store(0, Relaxed);
                *e = LiveEntry::EMPTY;
            }
            self.live.len = 0;
        }
        for &i in &self.sites.order[..self.sites.len] {
            self.sites.entries[usize::from(i)] = SiteEntry::EMPTY;
        }
        self.sites.len = 0;
        self.generation += 1;
        self.samples = 0;
        self.dropped = 0;
        SITES_HINT.store(0, Relaxed);
    }
}

#[derive(Clone, Copy)]
enum Sign {
    Plus,
    Minus,
}

/// The tables behind a spinlock whose word holds the owner's token, so that
/// a thread can tell that it already holds it (and not wait on itself).
struct Locked {
    owner: AtomicUsize,
    tables: UnsafeCell<Tables>,
}

// SAFETY: `tables` is reached only through `TablesGuard`, which exists only
// while its thread owns `owner` (acquired with `Acquire`, released with
// `Release`), so accesses from different threads never overlap and each
// sees the previous holder's writes.
unsafe impl Sync for Locked {}

/// All zeros, so it lives in `.bss`: no binary size, and pages are committed
/// only when first written (about 4.4 MiB if every slot is used).
static TABLES: Locked = Locked {
    owner: AtomicUsize::new(0),
    tables: UnsafeCell::new(Tables {
        live: LiveTable::new(),
        sites: SiteTable::new(),
        generation: 0,
        samples: 0,
        dropped: 0,
    }),
};

/// How many sites there are, readable without the lock: [`top_sites`]
/// sizes its copy buffer from it before locking.
static SITES_HINT: AtomicUsize = AtomicUsize::new(0);

/// Counting filter in front of the live table: slot `filter_index(p)`
/// counts live sampled blocks whose address hashes there. A free whose slot
/// reads 0 was not sampled and takes no lock. Changed only under the lock;
/// read without it: a block's own increment happens-before its free, so
/// that free never reads 0 while the block is recorded.
static FILTER: [AtomicU16; 1 << 16] = [const { AtomicU16::new(0) }; 1 << 16];

#[inline]
fn filter_index(ptr: usize) -> usize {
    (mix(ptr as u64) >> 48) as usize
}

struct TablesGuard;

impl TablesGuard {
    fn tables(&mut self) -> &mut Tables {
        // SAFETY: a `TablesGuard` exists only while this thread holds the
        // lock (see `lock_tables`), and `&mut self` keeps this reference
        // unique for its lifetime.
        unsafe { &mut *TABLES.tables.get() }
    }
}

impl Drop for TablesGuard {
    fn drop(&mut self) {
        TABLES.owner.store(0, Release);
    }
}

/// A non-zero token unique to the calling thread among running threads:
/// `pthread_self()`, which needs no thread-local (so it also works while the
/// thread is being torn down).
#[cfg(unix)]
fn thread_token() -> usize {
    // SAFETY: `pthread_self` has no preconditions and cannot fail.
    let id = unsafe { libc::pthread_self() } as usize;
    id.max(1)
}

/// The address of the thread's sampler, or 1 once thread-locals are gone.
#[cfg(not(unix))]
fn thread_token() -> usize {
    SAMPLER
        .try_with(|s| s as *const Sampler as usize)
        .unwrap_or(1)
}

/// Takes the table lock, spinning (then yielding) while another thread has
/// it. `None` if the calling thread already holds it: re-entry reports
/// instead of deadlocking. Never allocates.
fn lock_tables() -> Option<TablesGuard> {
    let me = thread_token();
    let mut spins = 0u32;
    loop {
        match TABLES.owner.compare_exchange_weak(0, me, Acquire, Relaxed) {
            Ok(_) => return Some(TablesGuard),
            Err(owner) if owner == me => return None,
            Err(_) => {}
        }
        spins += 1;
        if spins < 64 {
            std::hint::spin_loop();
        } else {
            // The holder does bounded work, but may have been preempted.
            std::thread::yield_now();
        }
    }
}

/// Makes `fork` safe while sampling: the table lock is taken before the
/// fork and released after it in both processes, so a child never starts
/// with the lock held by a thread that does not exist there (it would spin
/// forever at its first sampled allocation). Registered once, by the first
/// [`enable_sampling`]; `posix_spawn` (what `std::process::Command` uses)
/// runs no fork handlers.
#[cfg(unix)]
fn register_fork_handlers() {
    static REGISTERED: AtomicBool = AtomicBool::new(false);
    if REGISTERED.swap(true, Relaxed) {
        return;
    }
    extern "C" fn before_fork() {
        // Held across the fork; `after_fork` releases it. `None` (this
        // thread holds it) cannot happen: nothing forks under the lock.
        if let Some(guard) = lock_tables() {
            std::mem::forget(guard);
        }
    }
    extern "C" fn after_fork() {
        TABLES.owner.store(0, Release);
    }
    // SAFETY: the handlers are plain functions that neither allocate nor
    // unwind, valid for the rest of the process.
    unsafe { libc::pthread_atfork(Some(before_fork), Some(after_fork), Some(after_fork)) };
}

// ---------------------------------------------------------------------------
// Inside the allocator

/// Counts a new block toward this thread's next sample point; records it if
/// one falls inside. Called by the allocator when [`active`].
#[inline]
pub(crate) fn on_alloc(ptr: *mut u8, size: usize) {
    if let Ok(Some(epoch)) = SAMPLER.try_with(|s| s.decide(size)) {
        record(ptr as usize, size as u64, epoch);
    }
}

/// Captures the stack and records the block. Allocation-free: the stack goes
/// into an array on this frame, the tables are static.
#[cold]
#[inline(never)]
fn record(ptr: usize, size: u64, epoch: u64) {
    let _busy = Busy::enter();
    let mut frames = [0usize; RAW_FRAMES];
    let n = capture(&mut frames[..CAPTURE_FRAMES.load(Relaxed).min(RAW_FRAMES)]);
    let stack = &frames[..n];
    let hash = hash_frames(stack);
    let Some(mut guard) = lock_tables() else {
        return;
    };
    // Disabled (tables emptied) or re-enabled (other mean) since the
    // decision: this sample belongs to no current table.
    if !ENABLED.load(Relaxed) || EPOCH.load(Relaxed) != epoch {
        return;
    }
    let t = guard.tables();
    t.samples += 1;
    let Some(site) = t.sites.find_or_insert(hash, stack) else {
        t.dropped += 1;
        return;
    };
    SITES_HINT.store(t.sites.len, Relaxed);
    let s = &mut t.sites.entries[site as usize];
    s.total_count += 1;
    s.total_bytes = s.total_bytes.wrapping_add(size);
    if !t.insert(LiveEntry { ptr, size, site }) {
        t.dropped += 1;
    }
}

/// Writes up to `buf.len()` return addresses of the calling stack,
/// innermost first, into `buf`; returns how many. Does not allocate.
#[cfg(unix)]
#[inline(never)]
fn capture(buf: &mut [usize]) -> usize {
    let mut n = 0;
    // SAFETY: `trace_unsynchronized` is unsafe only because some backends
    // (Windows' dbghelp) are not thread-safe; on unix it is `_Unwind_Backtrace`
    // from the platform unwinder, which is. The callback cannot panic (`get_mut`,
    // no indexing), as the function requires, and stores plain integers.
    unsafe {
        backtrace::trace_unsynchronized(|frame| match buf.get_mut(n) {
            Some(slot) => {
                *slot = frame.ip() as usize;
                n += 1;
                n < buf.len()
            }
            None => false,
        });
    }
    n
}

#[cfg(not(unix))]
fn capture(_buf: &mut [usize]) -> usize {
    0
}

/// Forgets the block at `ptr` if it was sampled. Called by the allocator,
/// when [`active`], **before** the block is handed back (once it is, another
/// thread may get the same address and record it).
#[inline]
pub(crate) fn on_free(ptr: *mut u8) {
    let _ = take(ptr);
}

/// Block taken out of the tables by a `realloc`, to put back if it fails.
#[derive(Debug)]
pub(crate) struct Taken {
    entry: LiveEntry,
    generation: u64,
}

/// [`on_free`], returning what was removed.
#[inline]
pub(crate) fn take(ptr: *mut u8) -> Option<Taken> {
    if FILTER[filter_index(ptr as usize)].load(Relaxed) == 0 {
        return None;
    }
    take_slow(ptr as usize)
}

#[cold]
#[inline(never)]
fn take_slow(ptr: usize) -> Option<Taken> {
    let Some(mut guard) = lock_tables() else {
        MISSED_FREES.fetch_add(1, Relaxed);
        return None;
    };
    let t = guard.tables();
    let entry = t.remove(ptr)?;
    Some(Taken {
        entry,
        generation: t.generation,
    })
}

/// Puts back a block whose `realloc` failed (so it is still live at `ptr`).
#[cold]
pub(crate) fn restore(ptr: *mut u8, taken: Taken) {
    let Some(mut guard) = lock_tables() else {
        return;
    };
    let t = guard.tables();
    if t.generation == taken.generation && ENABLED.load(Relaxed) {
        let _ = t.insert(LiveEntry {
            ptr: ptr as usize,
            ..taken.entry
        });
    }
}

// ---------------------------------------------------------------------------
// Control

/// Starts sampling allocations made through any
/// [`TrackingAllocator`](crate::TrackingAllocator), with `config`.
///
/// Only allocations made after this call are sampled. Threads pick up the
/// new configuration at their next allocation.
///
/// # Errors
///
/// [`SamplingError::InvalidConfig`] for a field out of range,
/// [`SamplingError::AlreadyEnabled`] when sampling is on (disable first),
/// [`SamplingError::Unsupported`] on targets without the unwinder.
pub fn enable_sampling(config: SamplingConfig) -> Result<(), SamplingError> {
    config.validate()?;
    if !cfg!(unix) {
        return Err(SamplingError::Unsupported);
    }
    let mut control = CONTROL.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(current) = *control {
        return Err(SamplingError::AlreadyEnabled { current });
    }
    #[cfg(unix)]
    register_fork_handlers();
    let seed = config.seed.unwrap_or_else(|| {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    });
    {
        // Under the table lock, so that a sample decided in an earlier epoch
        // sees the new epoch when it gets the lock, and is dropped.
        let _guard = lock_tables();
        MEAN_BYTES.store(config.mean_bytes_between_samples, Relaxed);
        CAPTURE_FRAMES.store(config.max_frames + ALLOCATOR_FRAMES, Relaxed);
        SEED.store(seed, Relaxed);
        STREAMS.store(0, Relaxed);
        MISSED_FREES.store(0, Relaxed);
        // Release: a thread that sees the new epoch sees the settings above.
        EPOCH.fetch_add(1, Release);
    }
    *control = Some(config);
    ENABLED.store(true, Release);
    Ok(())
}

/// Stops sampling and **forgets every record** (take the last
/// [`top_sites`] before calling this). Afterwards the allocator's fast path
/// is back to one relaxed load. Does nothing when sampling is off.
pub fn disable_sampling() {
    let mut control = CONTROL.lock().unwrap_or_else(PoisonError::into_inner);
    if control.take().is_none() {
        return;
    }
    // From here no new sample is decided in this epoch... and one decided
    // before sees the flag clear under the lock and is dropped; frees skip
    // the lookup, which is right once the tables are empty.
    ENABLED.store(false, Relaxed);
    if let Some(mut guard) = lock_tables() {
        guard.tables().clear();
    }
}

/// Whether allocations are being sampled.
pub fn sampling_enabled() -> bool {
    ENABLED.load(Relaxed)
}

/// The configuration in force, `None` while sampling is off.
pub fn sampling_config() -> Option<SamplingConfig> {
    *CONTROL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The sampler's own bookkeeping; see [`sampling_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SamplingStats {
    /// Whether sampling is on.
    pub enabled: bool,
    /// Sample points that fell in a block since [`enable_sampling`].
    pub samples: u64,
    /// Sampled blocks alive now (at most [`MAX_LIVE_SAMPLES`]).
    pub live_samples: u64,
    /// Distinct captured stacks (at most [`MAX_SITES`]; [`top_sites`] may
    /// merge several into one site).
    pub sites: u64,
    /// Samples not recorded because a table was full: estimates are low by
    /// what they stood for. Zero in a healthy configuration.
    pub dropped_samples: u64,
    /// Frees of sampled blocks that could not be recorded (would have needed
    /// the table lock while the freeing thread itself held it). Zero unless
    /// there is a bug: nothing runs under the lock that could free.
    pub missed_frees: u64,
}

/// Counters of the sampler itself. Takes the table lock briefly; does not
/// allocate.
pub fn sampling_stats() -> SamplingStats {
    let mut s = SamplingStats {
        enabled: sampling_enabled(),
        missed_frees: MISSED_FREES.load(Relaxed),
        ..SamplingStats::default()
    };
    if let Some(mut guard) = lock_tables() {
        let t = guard.tables();
        s.samples = t.samples;
        s.live_samples = t.live.len as u64;
        s.sites = t.sites.len as u64;
        s.dropped_samples = t.dropped;
    }
    s
}

// ---------------------------------------------------------------------------
// Reports (outside the allocator)

/// Identifies a site across [`top_sites`] snapshots of one process: a hash
/// of the site's return addresses (after the allocator's own frames are
/// dropped). Addresses move between runs (ASLR), so ids do too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteId(pub u64);

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One resolved stack frame. An address inside inlined code yields several
/// frames with the same `ip`, innermost first.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Frame {
    /// The return address (or, for the innermost frame, the call site).
    pub ip: usize,
    /// Demangled function name without the hash suffix, when symbols exist.
    pub function: Option<String>,
    /// Source file, when debug info has it.
    pub file: Option<String>,
    /// Source line, when debug info has it.
    pub line: Option<u32>,
}

impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.function {
            Some(name) => write!(f, "{name}")?,
            None => write!(f, "{:#x}", self.ip)?,
        }
        if let Some(file) = &self.file {
            write!(f, " ({file}")?;
            if let Some(line) = self.line {
                write!(f, ":{line}")?;
            }
            write!(f, ")")?;
        }
        Ok(())
    }
}

/// A call path holding sampled live blocks, as [`top_sites`] reports it.
///
/// The `*_estimate` fields are unbiased estimates for **all** live blocks
/// allocated from this path (sampled or not); the `sampled_*` fields are
/// exact counts of the samples behind them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteReport {
    /// Follows the site across snapshots.
    pub site_id: SiteId,
    /// The allocating function first, then its callers (at most
    /// `max_frames` addresses; inlined functions add entries).
    pub frames: Vec<Frame>,
    /// Estimated live bytes: the sum of `s / (1 - exp(-s / mean))` over the
    /// live sampled blocks of sizes `s`.
    pub live_bytes_estimate: u64,
    /// Estimated live blocks: the sum of `1 / (1 - exp(-s / mean))`.
    pub live_allocations_estimate: u64,
    /// Bytes of the live sampled blocks.
    pub sampled_live_bytes: u64,
    /// Live sampled blocks.
    pub sampled_live_count: u64,
    /// Blocks sampled here since sampling was enabled, freed or not.
    pub total_sampled_allocations: u64,
    /// Bytes of those.
    pub total_sampled_bytes: u64,
}

impl SiteReport {
    /// Whether some frame's function name contains `needle`.
    pub fn has_function(&self, needle: &str) -> bool {
        self.frames
            .iter()
            .any(|f| f.function.as_deref().is_some_and(|n| n.contains(needle)))
    }
}

impl fmt::Display for SiteReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "~{} live in ~{} blocks ({} sampled, {}) [site {}]",
            ByteSize(self.live_bytes_estimate),
            self.live_allocations_estimate,
            self.sampled_live_count,
            ByteSize(self.sampled_live_bytes),
            self.site_id,
        )?;
        for frame in &self.frames {
            write!(f, "\n    {frame}")?;
        }
        Ok(())
    }
}

/// A site's counters copied out under the lock (plain data, no heap).
#[derive(Clone, Copy)]
struct RawSite {
    len: usize,
    frames: [usize; RAW_FRAMES],
    live_bytes: u64,
    live_count: u64,
    est_bytes: u128,
    est_count: u128,
    total_count: u64,
    total_bytes: u64,
}

/// Copies the sites holding live samples. The buffer is sized before the
/// lock is taken, so nothing allocates while it is held.
fn snapshot() -> Vec<RawSite> {
    let mut out: Vec<RawSite> = Vec::new();
    loop {
        out.reserve(SITES_HINT.load(Relaxed) + 8);
        let Some(mut guard) = lock_tables() else {
            return Vec::new(); // this thread holds the lock: cannot happen
        };
        let allocations_before = counters::thread_stats().allocations;
        let t = guard.tables();
        if t.sites.len > out.capacity() {
            continue; // grew meanwhile: the guard is dropped, resize, retry
        }
        for &i in &t.sites.order[..t.sites.len] {
            let e = &t.sites.entries[usize::from(i)];
            if e.live_count > 0 {
                // Within capacity: `push` does not allocate.
                out.push(RawSite {
                    len: usize::from(e.len),
                    frames: e.frames,
                    live_bytes: e.live_bytes,
                    live_count: e.live_count,
                    est_bytes: e.est_bytes,
                    est_count: e.est_count,
                    total_count: e.total_count,
                    total_bytes: e.total_bytes,
                });
            }
        }
        debug_assert_eq!(
            counters::thread_stats().allocations,
            allocations_before,
            "allocated while holding the sampling table lock"
        );
        drop(guard);
        return out;
    }
}

/// Whether a resolved frame belongs to the allocator rather than to the code
/// that allocated: the unwinder (the `backtrace` crate, `_Unwind_*`), this
/// crate's allocator and sampler (the counters are never on the stack when
/// a sample is taken), and the global-allocator shims rustc
/// generates. Matched on the path's start, so that `std::sys::backtrace::*`
/// or a user's `my_app::gm_leak::*` do not count.
fn is_allocator_frame(function: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "backtrace::",
        "_Unwind_",
        "gm_leak::sampling::",
        "gm_leak::allocator::",
        "__rust_alloc",
        "__rust_realloc",
        "__rust_dealloc",
        "__rustc::__rust_alloc",
        "__rustc::__rust_realloc",
        "__rustc::__rust_dealloc",
        "__rdl_",
        "__rg_",
    ];
    // `<gm_leak::allocator::TrackingAllocator as ...>::alloc`
    let path = function.trim_start_matches('<');
    PREFIXES.iter().any(|p| path.starts_with(p))
}

/// Frames of `stack` after the allocator's own, at most `max_frames`
/// addresses deep; resolution is cached in `cache`.
fn user_frames(
    stack: &[usize],
    max_frames: usize,
    cache: &mut HashMap<usize, Vec<Frame>>,
) -> Vec<Frame> {
    let mut flat: Vec<(usize, &Frame)> = Vec::new();
    for ip in stack {
        cache.entry(*ip).or_insert_with(|| resolve(*ip));
    }
    for (depth, ip) in stack.iter().enumerate() {
        for frame in &cache[ip] {
            flat.push((depth, frame));
        }
    }
    // The allocator's frames are innermost, within the first
    // ALLOCATOR_FRAMES addresses: cut after the last of them there.
    let cut = flat
        .iter()
        .rposition(|(depth, f)| {
            *depth <= ALLOCATOR_FRAMES && f.function.as_deref().is_some_and(is_allocator_frame)
        })
        .map_or(0, |i| i + 1);
    let Some(&(first_depth, _)) = flat.get(cut) else {
        return Vec::new();
    };
    flat[cut..]
        .iter()
        .take_while(|(depth, _)| *depth < first_depth + max_frames)
        .map(|(_, f)| (*f).clone())
        .collect()
}

fn resolve(ip: usize) -> Vec<Frame> {
    let mut frames = Vec::new();
    backtrace::resolve(ip as *mut c_void, |symbol| {
        frames.push(Frame {
            ip,
            function: symbol.name().map(|n| format!("{n:#}")),
            file: symbol.filename().map(|p| p.display().to_string()),
            line: symbol.lineno(),
        });
    });
    if frames.is_empty() {
        frames.push(Frame {
            ip,
            function: None,
            file: None,
            line: None,
        });
    }
    frames
}

/// Frees the symbol cache that [`top_sites`] builds when it resolves frames
/// (parsed debug info: tens of MiB of heap after the first call in a debug
/// build, counted by the tracker like any other heap). The next
/// [`top_sites`] builds it again, paying the first call's time again.
pub fn release_symbol_cache() {
    backtrace::clear_symbol_cache();
}

/// The `n` call paths holding the most estimated live bytes, largest
/// first, with resolved frames (the allocator's own frames dropped).
///
/// Empty while sampling is off. Call it outside the allocator (any normal
/// code): it allocates, and resolves symbols. The first call parses debug
/// info (50-300 ms here for a 14 MB test binary) into a cache that stays on
/// the heap (about 35 MiB there) until [`release_symbol_cache`]. Its own
/// allocations are not sampled, and it holds the table lock only to copy
/// counters into a buffer sized beforehand, so it neither recurses into
/// itself nor blocks an allocating thread for long. Stacks that differ only in the allocator's
/// frames (`alloc` vs `alloc_zeroed` vs `realloc` of one call path) are
/// merged into one site.
pub fn top_sites(n: usize) -> Vec<SiteReport> {
    let _quiet = Busy::enter();
    let Some(config) = sampling_config() else {
        return Vec::new();
    };
    let raw = snapshot();
    let mut cache = HashMap::new();
    // Per merged site: the report so far and its fixed-point sums.
    let mut merged: HashMap<SiteId, (SiteReport, u128, u128)> = HashMap::new();
    for r in &raw {
        let frames = user_frames(&r.frames[..r.len], config.max_frames, &mut cache);
        let ips: Vec<usize> = frames.iter().map(|f| f.ip).collect();
        let id = SiteId(hash_frames(&ips));
        let (site, est_bytes, est_count) = merged.entry(id).or_insert_with(|| {
            let site = SiteReport {
                site_id: id,
                frames,
                live_bytes_estimate: 0,
                live_allocations_estimate: 0,
                sampled_live_bytes: 0,
                sampled_live_count: 0,
                total_sampled_allocations: 0,
                total_sampled_bytes: 0,
            };
            (site, 0, 0)
        });
        *est_bytes += r.est_bytes;
        *est_count += r.est_count;
        site.sampled_live_bytes += r.live_bytes;
        site.sampled_live_count += r.live_count;
        site.total_sampled_allocations += r.total_count;
        site.total_sampled_bytes += r.total_bytes;
    }
    let mut sites: Vec<SiteReport> = merged
        .into_values()
        .map(|(mut site, est_bytes, est_count)| {
            site.live_bytes_estimate = u64::try_from(est_bytes).unwrap_or(u64::MAX);
            site.live_allocations_estimate = (est_count as f64 / COUNT_SCALE).round() as u64;
            site
        })
        .collect();
    sites.sort_by(|a, b| {
        b.live_bytes_estimate
            .cmp(&a.live_bytes_estimate)
            .then(a.site_id.cmp(&b.site_id))
    });
    sites.truncate(n);
    sites
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_field() {
        assert_eq!(SamplingConfig::default().validate(), Ok(()));
        let bad = SamplingConfig {
            mean_bytes_between_samples: 0,
            ..SamplingConfig::default()
        };
        let err = bad.validate().unwrap_err();
        assert!(
            err.to_string().contains("mean_bytes_between_samples = 0"),
            "{err}"
        );
        let bad = SamplingConfig {
            max_frames: MAX_FRAMES + 1,
            ..SamplingConfig::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(SamplingError::InvalidConfig {
                key: "max_frames",
                value: 65,
                ..
            })
        ));
    }

    #[test]
    fn countdowns_are_exponential_with_the_configured_mean() {
        // Mean and P(X >= mean) of 200k draws: the exponential's mean is
        // `mean` (sd of the sample mean: mean / sqrt(n) = 0.22 %), and its
        // survival at the mean is exp(-1) = 0.3679 (sd 0.11 %).
        const N: usize = 200_000;
        let mean = 4096u64;
        let mut state = 7u64;
        let draws: Vec<i64> = (0..N).map(|_| draw_countdown(&mut state, mean)).collect();
        assert!(draws.iter().all(|&d| d >= 0));
        let avg = draws.iter().map(|&d| d as f64 + 0.5).sum::<f64>() / N as f64;
        assert!((avg / mean as f64 - 1.0).abs() < 0.012, "mean {avg}");
        let above = draws.iter().filter(|&&d| d >= mean as i64).count() as f64 / N as f64;
        assert!((above - (-1f64).exp()).abs() < 0.006, "survival {above}");
    }

    #[test]
    fn weights_undo_the_sampling_probability() {
        let mean = 1000;
        // Far above the mean: sampled almost surely, weight = size.
        assert_eq!(weights(100_000, mean).0, 100_000);
        assert_eq!(weights(100_000, mean).1, COUNT_SCALE as u128);
        // Far below: p ~ s / mean, so a sample stands for ~mean + s/2 bytes.
        let (b, c) = weights(10, mean);
        assert!((b as f64 - 1005.0).abs() < 1.0, "{b}");
        assert!((c as f64 / COUNT_SCALE - 100.5).abs() < 0.01);
        assert!((sample_probability(1000, 1000) - (1.0 - (-1f64).exp())).abs() < 1e-12);
    }

    /// Runs the per-thread decision over a stream of block sizes with a
    /// local state (the logic of `Sampler::decide`), returning the
    /// Horvitz-Thompson estimate of the stream's bytes.
    fn simulate(sizes: &[u64], mean: u64, seed: u64) -> (f64, usize) {
        let mut rng = seed;
        let mut countdown = draw_countdown(&mut rng, mean);
        let (mut estimate, mut sampled) = (0.0, 0);
        for &s in sizes {
            countdown -= s as i64;
            if countdown < 0 {
                countdown = draw_countdown(&mut rng, mean);
                estimate += weights(s, mean).0 as f64;
                sampled += 1;
            }
        }
        (estimate, sampled)
    }

    #[test]
    fn per_block_decisions_give_unbiased_byte_estimates() {
        // Mixed sizes around the mean; the estimator's variance is
        // sum s^2 (1 - p) / p, and the check allows 5 standard deviations.
        let mean = 4096;
        let mut rng = 99u64;
        let sizes: Vec<u64> = (0..20_000)
            .map(|_| 16 + splitmix64(&mut rng) % 20_000)
            .collect();
        let truth: f64 = sizes.iter().map(|&s| s as f64).sum();
        let var: f64 = sizes
            .iter()
            .map(|&s| {
                let p = sample_probability(s, mean);
                (s as f64).powi(2) * (1.0 - p) / p
            })
            .sum();
        for seed in [1, 2, 3] {
            let (est, sampled) = simulate(&sizes, mean, seed);
            assert!(sampled > 1000);
            assert!(
                (est - truth).abs() < 5.0 * var.sqrt(),
                "seed {seed}: estimate {est}, truth {truth}, sd {}",
                var.sqrt()
            );
        }
    }

    #[test]
    fn sampling_probability_matches_block_size() {
        // Blocks of exactly `mean` bytes are sampled with p = 1 - 1/e.
        let mean = 512;
        let sizes = vec![mean; 100_000];
        let (_, sampled) = simulate(&sizes, mean, 5);
        let p = sampled as f64 / sizes.len() as f64;
        assert!((p - 0.632_12).abs() < 0.01, "{p}");
    }

    #[test]
    fn live_table_matches_a_model_under_collisions() {
        // 16 slots, addresses chosen so that many share a home slot:
        // exercises probing, replacement and backward-shift deletion.
        let mut table = LiveTable::<16>::new();
        let mut model: HashMap<usize, LiveEntry> = HashMap::new();
        let mut rng = 3u64;
        for round in 0..20_000u64 {
            let ptr = 16 * (1 + (splitmix64(&mut rng) % 24) as usize);
            if splitmix64(&mut rng).is_multiple_of(2) {
                let e = LiveEntry {
                    ptr,
                    size: round,
                    site: (round % 7) as u32,
                };
                match table.insert(e) {
                    Ok(old) => assert_eq!(old, model.insert(ptr, e)),
                    Err(()) => {
                        assert_eq!(model.len(), LiveTable::<16>::MAX_LEN);
                        assert!(!model.contains_key(&ptr));
                    }
                }
            } else {
                assert_eq!(table.remove(ptr), model.remove(&ptr));
            }
            assert_eq!(table.len, model.len());
            for (p, e) in &model {
                // Every model entry is reachable from its home slot.
                let mut i = LiveTable::<16>::home(*p);
                while table.entries[i].ptr != *p {
                    assert_ne!(table.entries[i].ptr, 0, "lost {p:#x}");
                    i = (i + 1) & 15;
                }
                assert_eq!(table.entries[i], *e);
            }
        }
    }

    #[test]
    fn site_table_deduplicates_stacks_and_stops_when_full() {
        let mut sites = SiteTable::<8>::new();
        let a = [1usize, 2, 3];
        let b = [1usize, 2, 4];
        let ia = sites.find_or_insert(hash_frames(&a), &a).unwrap();
        let ib = sites.find_or_insert(hash_frames(&b), &b).unwrap();
        assert_ne!(ia, ib);
        assert_eq!(sites.find_or_insert(hash_frames(&a), &a), Some(ia));
        // Same hash, other stack: a separate site.
        assert_ne!(sites.find_or_insert(hash_frames(&a), &b), Some(ia));
        assert_eq!(sites.len, 3);
        for k in 10..20usize {
            let s = [k];
            let r = sites.find_or_insert(hash_frames(&s), &s);
            assert_eq!(r.is_some(), k < 10 + SiteTable::<8>::MAX_LEN - 3);
        }
        assert_eq!(sites.len, SiteTable::<8>::MAX_LEN);
    }

    #[test]
    fn allocator_frames_are_recognised() {
        for name in [
            "backtrace::backtrace::libunwind::trace",
            "gm_leak::sampling::record",
            "<gm_leak::allocator::TrackingAllocator as core::alloc::global::GlobalAlloc>::alloc",
            "__rustc::__rust_alloc_zeroed",
            "__rust_realloc",
            "_Unwind_Backtrace",
        ] {
            assert!(is_allocator_frame(name), "{name}");
        }
        for name in [
            "alloc::raw_vec::RawVecInner<A>::with_capacity_in",
            "my_crate::load",
            "gm_leak::measure::measure",
            "std::sys::backtrace::__rust_begin_short_backtrace",
            "__rustc::rust_begin_unwind",
            "__rust_try",
            "<my_crate::Wrapper as gm_leak::Trait>::f",
        ] {
            assert!(!is_allocator_frame(name), "{name}");
        }
    }

    #[test]
    fn user_frames_cut_the_allocator_prefix_and_keep_max_frames() {
        let frame = |ip: usize, name: &str| Frame {
            ip,
            function: Some(name.to_string()),
            file: None,
            line: None,
        };
        let mut cache = HashMap::new();
        cache.insert(1, vec![frame(1, "backtrace::trace")]);
        cache.insert(2, vec![frame(2, "gm_leak::sampling::record")]);
        // An address with inlined frames: the allocator shim inlined into
        // user code keeps the user part.
        cache.insert(
            3,
            vec![frame(3, "__rustc::__rust_alloc"), frame(3, "app::make")],
        );
        cache.insert(4, vec![frame(4, "app::caller")]);
        cache.insert(5, vec![frame(5, "app::main")]);
        let got = user_frames(&[1, 2, 3, 4, 5], 2, &mut cache);
        let names: Vec<_> = got.iter().map(|f| f.function.clone().unwrap()).collect();
        assert_eq!(names, ["app::make", "app::caller"]);
        let got = user_frames(&[4, 5], 8, &mut cache);
        assert_eq!(got.len(), 2, "no allocator frame: nothing cut");
    }

    #[test]
    fn disabled_by_default() {
        // This unit-test binary never enables sampling.
        assert!(!sampling_enabled());
        assert_eq!(sampling_config(), None);
        assert!(top_sites(10).is_empty());
        assert_eq!(sampling_stats().samples, 0);
    }
}
