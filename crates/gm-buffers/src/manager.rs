//! A byte-limited, thread-safe cache of named buffers built on demand.
//!
//! [`BufferManager`] is the "buffer manager" of the replay/feature system:
//! named buffers (per-symbol feature matrices, per-episode replay shards, ...)
//! are built by a user closure the first time they are asked for, kept in
//! memory as [`Arc<V>`] while the sum of their sizes stays under
//! [`ManagerConfig::limit_bytes`], and evicted by a score that combines how
//! often, how recently and how cheaply (in bytes) each one is used.
//!
//! # Sizes
//!
//! An entry's size is `value.memory_usage().resident_bytes()`
//! ([`MemoryReport`]), **measured once, when the value is inserted**. A value
//! that grows or shrinks afterwards keeps its old size in the accounting until
//! [`BufferManager::refresh_size`] re-measures it.
//!
//! # Eviction score
//!
//! The manager keeps a logical clock that advances by one tick on every
//! *access to an entry*: a hit ([`get`](BufferManager::get) or
//! [`get_or_try_insert_with`](BufferManager::get_or_try_insert_with) finding
//! the key) or an insert. Misses and [`contains`](BufferManager::contains) do
//! not tick. For an entry `e`, at tick `now`:
//!
//! ```text
//! age(e)     = now - last_use(e)                     accesses to the manager since e was last used
//! freq(e)    = count(e) * 2^(-age(e) / H)            decayed access count, H = FREQUENCY_HALF_LIFE_TICKS
//! recency(e) = 1 / (1 + age(e))
//! keep(e)    = freq(e) * recency(e) / size_bytes(e)  (a size of 0 counts as 1)
//! ```
//!
//! `count(e)` is updated on every access as `count <- count * 2^(-age/H) + 1`,
//! so it is an exponentially decayed access count with a half-life of
//! [`FREQUENCY_HALF_LIFE_TICKS`] ticks: popularity fades by half every `H`
//! accesses to the manager, and an entry hit on every tick saturates near
//! `H / ln 2` (about 1477). Old popularity therefore cannot protect an entry
//! for long: both the decay and the recency factor shrink while it is idle.
//!
//! When an insert would take the total over the limit, the entry with the
//! **lowest** keep-score is evicted, then the next lowest, until the new value
//! fits. Ties (equal scores) go to the least recently used entry.
//!
//! Example (scores shown per MiB, i.e. multiplied by 2^20), at `now = 1000`:
//!
//! | entry | size | count | last use | age | keep |
//! |---|---|---|---|---|---|
//! | `A` feature matrix | 4 MiB | 8.0 | 990 | 10 | 8 * 2^(-10/1024) / (11 * 4) = 0.1806 |
//! | `B` replay shard | 256 KiB | 1.0 | 900 | 100 | 1 * 2^(-100/1024) / (101 * 0.25) = 0.0370 |
//!
//! `B` goes first although it is 16 times smaller: it was used once, long ago.
//! Had `B` been used as often and as recently as `A` (count 8, last use 990),
//! it would score 16 times higher than `A` (0.25 MiB against 4 MiB), and `A`
//! would go first.
//!
//! # Complexity
//!
//! Lookups and inserts that fit are O(1) (one hash-map operation under the
//! lock). Each eviction scans all entries for the lowest score: O(n) per
//! evicted entry, which is what the expected few hundred entries call for.
//!
//! # Concurrency
//!
//! All methods take `&self`; the index sits behind one [`parking_lot::Mutex`].
//! The lock is **never held while a user's build closure runs** or while a
//! value's [`MemoryReport::memory_usage`] is called for an insert.
//!
//! [`get_or_try_insert_with`](BufferManager::get_or_try_insert_with) puts a
//! per-key *in-flight marker* in the index before it releases the lock to
//! build. A second caller for the same key that finds the marker waits (on a
//! condition variable, not holding the lock) until the build ends, then takes
//! the built value without running its own closure. If the build failed,
//! panicked, or its value was rejected or already evicted, the waiter finds no
//! value and builds with its own closure. Builds of *different* keys run in
//! parallel. A closure that asks for its own key on the same thread does not
//! wait for itself (that would deadlock): it builds directly. Closures whose
//! keys depend on each other across threads in a cycle (`A` needs `B` while
//! another thread's `B` needs `A`) would deadlock and must be avoided.
//!
//! # Evicted values
//!
//! Eviction drops the manager's `Arc`. A caller still holding the `Arc<V>`
//! keeps the value alive and usable; its memory is released when the last
//! holder drops it. The limit therefore bounds what the *manager* holds, not
//! everything alive in the process.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::thread::{self, ThreadId};

use gm_core::{MemoryReport, MemoryUsage};
use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};

/// Half-life, in ticks of the manager's logical clock, of an entry's access
/// count. After this many accesses to the manager (to any entry) without a
/// use, an entry's count has halved.
pub const FREQUENCY_HALF_LIFE_TICKS: u64 = 1024;

/// The component name a [`BufferManager`] reports unless given another with
/// [`BufferManager::with_component`].
pub const DEFAULT_COMPONENT: &str = "buffer-manager";

/// Configuration of a [`BufferManager`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManagerConfig {
    /// Most bytes (sum of entry sizes) the manager holds. Must be > 0.
    /// Default: 256 MiB.
    pub limit_bytes: u64,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            limit_bytes: 256 << 20,
        }
    }
}

impl ManagerConfig {
    /// Checks the configuration: `limit_bytes` must be > 0, else
    /// [`Error::Config`].
    pub fn validate(&self) -> Result<()> {
        if self.limit_bytes == 0 {
            return Err(Error::config(
                "limit_bytes",
                self.limit_bytes,
                "must be > 0",
            ));
        }
        Ok(())
    }
}

/// Counters of a [`BufferManager`], read with [`BufferManager::stats`].
///
/// A *lookup* is one call of [`get`](BufferManager::get) or
/// [`get_or_try_insert_with`](BufferManager::get_or_try_insert_with) (or
/// [`get_or_insert_with`](BufferManager::get_or_insert_with)); each counts
/// exactly one hit or one miss, decided when it first looks at the index. A
/// caller that finds another thread's build in flight counts a miss, even if
/// it then receives that build's value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ManagerStats {
    /// Lookups that found the key resident.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
    /// Values stored (new keys and replacements, from any method).
    pub inserts: u64,
    /// Entries evicted to make room (not counting `remove`, `clear` or replacement).
    pub evictions: u64,
    /// Sum of the sizes of the evicted entries.
    pub evicted_bytes: u64,
    /// Bytes held now (sum of entry sizes).
    pub bytes: u64,
    /// Entries held now.
    pub entries: u64,
}

impl ManagerStats {
    /// `hits / (hits + misses)`, or 0.0 before the first lookup.
    pub fn hit_rate(&self) -> f64 {
        let lookups = self.hits + self.misses;
        if lookups == 0 {
            0.0
        } else {
            self.hits as f64 / lookups as f64
        }
    }
}

/// An insert the manager refused; hands the value back.
///
/// The only reason today is [`Error::TooLargeForCache`]: the value alone is
/// larger than the limit. The manager is left unchanged.
pub struct Rejected<V> {
    /// The value that was not stored.
    pub value: V,
    /// Why (carries the value's size and the limit).
    pub error: Error,
}

impl<V> fmt::Debug for Rejected<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rejected")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<V> fmt::Display for Rejected<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl<V> std::error::Error for Rejected<V> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

impl<V> From<Rejected<V>> for Error {
    fn from(r: Rejected<V>) -> Self {
        r.error
    }
}

/// Why [`BufferManager::get_or_try_insert_with`] returned no value.
pub enum BuildError<E, V> {
    /// The build closure failed with the user's error; nothing was inserted.
    Build(E),
    /// The value was built but is larger than the whole limit; it is handed
    /// back inside, and nothing was inserted or evicted.
    Rejected(Rejected<V>),
}

impl<E, V> BuildError<E, V> {
    /// The user's error, if the closure failed.
    pub fn build_error(self) -> Option<E> {
        match self {
            BuildError::Build(e) => Some(e),
            BuildError::Rejected(_) => None,
        }
    }
}

impl<E: fmt::Debug, V> fmt::Debug for BuildError<E, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Build(e) => f.debug_tuple("Build").field(e).finish(),
            BuildError::Rejected(r) => f.debug_tuple("Rejected").field(r).finish(),
        }
    }
}

impl<E: fmt::Display, V> fmt::Display for BuildError<E, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Build(e) => write!(f, "building the buffer failed: {e}"),
            BuildError::Rejected(r) => fmt::Display::fmt(r, f),
        }
    }
}

impl<E: std::error::Error + 'static, V> std::error::Error for BuildError<E, V> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BuildError::Build(e) => Some(e),
            BuildError::Rejected(r) => std::error::Error::source(r),
        }
    }
}

/// One resident value and its eviction bookkeeping.
struct Entry<V> {
    value: Arc<V>,
    /// Memory measured at insert (or the last `refresh_size`).
    usage: MemoryUsage,
    /// Access count, decayed to `last_use`.
    count: f64,
    /// Tick of the last access.
    last_use: u64,
}

impl<V> Entry<V> {
    fn size(&self) -> u64 {
        self.usage.resident_bytes()
    }
}

/// `count` decayed over `age` ticks.
fn decay(count: f64, age: u64) -> f64 {
    count * (-(age as f64) / FREQUENCY_HALF_LIFE_TICKS as f64).exp2()
}

/// The keep-score of the module docs: decayed frequency x recency / size.
fn keep_score(count: f64, last_use: u64, size_bytes: u64, now: u64) -> f64 {
    let age = now.saturating_sub(last_use);
    decay(count, age) / ((1.0 + age as f64) * size_bytes.max(1) as f64)
}

fn sub_usage(total: &mut MemoryUsage, u: MemoryUsage) {
    total.heap_bytes -= u.heap_bytes;
    total.anon_bytes -= u.anon_bytes;
    total.file_bytes -= u.file_bytes;
    total.reserved_bytes -= u.reserved_bytes;
}

/// The state behind the lock.
struct Index<K, V> {
    entries: HashMap<K, Entry<V>>,
    /// Keys being built by `get_or_try_insert_with`, and by which thread.
    building: HashMap<K, ThreadId>,
    /// Logical clock: ticks once per access to an entry.
    clock: u64,
    /// Sum of the entries' measured usage; `resident_bytes()` is the total size.
    usage: MemoryUsage,
    /// Counters; `bytes` and `entries` are filled in by `stats()`.
    stats: ManagerStats,
}

impl<K: Eq + Hash, V> Index<K, V> {
    fn bytes(&self) -> u64 {
        self.usage.resident_bytes()
    }

    /// A hit: ticks the clock, bumps the entry's count, returns the value.
    fn touch<Q>(&mut self, key: &Q) -> Option<Arc<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let e = self.entries.get_mut(key)?;
        self.clock += 1;
        e.count = decay(e.count, self.clock - e.last_use) + 1.0;
        e.last_use = self.clock;
        Some(Arc::clone(&e.value))
    }

    fn remove_entry<Q>(&mut self, key: &Q) -> Option<Entry<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let e = self.entries.remove(key)?;
        sub_usage(&mut self.usage, e.usage);
        Some(e)
    }

    /// Evicts lowest-score entries (never `protect`) until `incoming` more
    /// bytes fit under `limit`. Requires `incoming <= limit` (plus the
    /// protected entry's size) so that it always terminates fitting.
    fn evict_to_fit<Q>(&mut self, incoming: u64, limit: u64, now: u64, protect: Option<&Q>)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        while self.bytes().saturating_add(incoming) > limit {
            let victim = self
                .entries
                .iter()
                .filter(|(k, _)| protect != Some((*k).borrow()))
                .map(|(k, e)| {
                    (
                        keep_score(e.count, e.last_use, e.size(), now),
                        e.last_use,
                        k,
                    )
                })
                .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
                .map(|(_, last_use, _)| last_use);
            let Some(last_use) = victim else { break };
            // `last_use` is unique per entry (each tick touches one entry), so
            // it names the victim without cloning the key.
            self.entries.retain(|_, e| {
                if e.last_use != last_use {
                    return true;
                }
                sub_usage(&mut self.usage, e.usage);
                self.stats.evictions += 1;
                self.stats.evicted_bytes += e.usage.resident_bytes();
                false
            });
        }
    }

    /// Stores `value` under `key`, replacing any old value and evicting until
    /// it fits. Requires `usage.resident_bytes() <= limit`.
    fn store(&mut self, key: K, value: Arc<V>, usage: MemoryUsage, limit: u64) -> Arc<V> {
        let now = self.clock + 1;
        let count = match self.remove_entry(&key) {
            Some(old) => decay(old.count, now - old.last_use) + 1.0,
            None => 1.0,
        };
        self.evict_to_fit::<K>(usage.resident_bytes(), limit, now, None);
        self.clock = now;
        self.entries.insert(
            key,
            Entry {
                value: Arc::clone(&value),
                usage,
                count,
                last_use: now,
            },
        );
        self.usage += usage;
        self.stats.inserts += 1;
        value
    }
}

/// A byte-limited cache of named buffers `K -> Arc<V>`, built on demand and
/// evicted by frequency x recency / size. See the [module docs](self) for the
/// score, the complexity and the concurrency rules.
///
/// Invariant: after every call, [`bytes`](Self::bytes) `<=`
/// [`limit_bytes`](Self::limit_bytes).
pub struct BufferManager<K, V> {
    limit_bytes: u64,
    component: String,
    index: Mutex<Index<K, V>>,
    /// Signalled whenever an in-flight build ends.
    built: Condvar,
}

impl<K, V> fmt::Debug for BufferManager<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ix = self.index.lock();
        f.debug_struct("BufferManager")
            .field("component", &self.component)
            .field("limit_bytes", &self.limit_bytes)
            .field("bytes", &ix.usage.resident_bytes())
            .field("entries", &ix.entries.len())
            .field("in_flight", &ix.building.len())
            .finish_non_exhaustive()
    }
}

/// Removes a key's in-flight marker and wakes waiters, also when the build
/// closure panics.
struct InFlight<'a, K: Eq + Hash, V> {
    manager: &'a BufferManager<K, V>,
    key: Option<K>,
}

impl<K: Eq + Hash, V> InFlight<'_, K, V> {
    /// Removes the marker under an already held lock; the caller notifies.
    fn finish(&mut self, ix: &mut Index<K, V>) {
        if let Some(k) = self.key.take() {
            ix.building.remove(&k);
        }
    }
}

impl<K: Eq + Hash, V> Drop for InFlight<'_, K, V> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.manager.index.lock().building.remove(&k);
            self.manager.built.notify_all();
        }
    }
}

impl<K, V> BufferManager<K, V>
where
    K: Eq + Hash + Clone,
    V: MemoryReport + Send + Sync,
{
    /// An empty manager; fails with [`Error::Config`] if `config` is invalid.
    pub fn new(config: ManagerConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            limit_bytes: config.limit_bytes,
            component: DEFAULT_COMPONENT.to_owned(),
            index: Mutex::new(Index {
                entries: HashMap::new(),
                building: HashMap::new(),
                clock: 0,
                usage: MemoryUsage::default(),
                stats: ManagerStats::default(),
            }),
            built: Condvar::new(),
        })
    }

    /// Sets the name reported by [`MemoryReport::component`]
    /// (default [`DEFAULT_COMPONENT`]).
    pub fn with_component(mut self, name: impl Into<String>) -> Self {
        self.component = name.into();
        self
    }

    /// The value under `key`, counting a hit (and an access for eviction) or
    /// a miss. Does not wait for an in-flight build of `key`: that is a miss.
    pub fn get<Q>(&self, key: &Q) -> Option<Arc<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut ix = self.index.lock();
        let found = ix.touch(key);
        if found.is_some() {
            ix.stats.hits += 1;
        } else {
            ix.stats.misses += 1;
        }
        found
    }

    /// The value under `key`, building it with `build` on a miss.
    ///
    /// Counts one hit or one miss. On a miss, marks `key` in flight, runs
    /// `build` without holding the lock, measures the value and stores it
    /// (evicting lower-scored entries as needed). Concurrent callers for the
    /// same key wait for that build and share its value (see the module docs).
    /// If the key was inserted by someone else while `build` ran, that value
    /// is kept and returned, and the freshly built one is dropped.
    ///
    /// Errors: [`BuildError::Build`] with the closure's error (nothing
    /// inserted); [`BuildError::Rejected`] with the value handed back if it
    /// alone is larger than the limit ([`Error::TooLargeForCache`]; nothing
    /// inserted or evicted).
    pub fn get_or_try_insert_with<E>(
        &self,
        key: &K,
        build: impl FnOnce() -> Result<V, E>,
    ) -> Result<Arc<V>, BuildError<E, V>> {
        let me = thread::current().id();
        let mut guard = InFlight {
            manager: self,
            key: None,
        };
        {
            let mut ix = self.index.lock();
            let mut counted = false;
            loop {
                if let Some(v) = ix.touch(key) {
                    if !counted {
                        ix.stats.hits += 1;
                    }
                    return Ok(v);
                }
                if !counted {
                    ix.stats.misses += 1;
                    counted = true;
                }
                match ix.building.get(key).copied() {
                    // Another thread is building it: wait, then look again.
                    Some(owner) if owner != me => self.built.wait(&mut ix),
                    // Our own thread (a re-entrant build): build directly.
                    Some(_) => break,
                    None => {
                        ix.building.insert(key.clone(), me);
                        guard.key = Some(key.clone());
                        break;
                    }
                }
            }
        }

        let value = match build() {
            Ok(v) => v,
            // `guard` drops here: marker removed, waiters woken.
            Err(e) => return Err(BuildError::Build(e)),
        };
        let usage = value.memory_usage();
        let bytes = usage.resident_bytes();
        if bytes > self.limit_bytes {
            let error = Error::TooLargeForCache {
                bytes,
                limit: self.limit_bytes,
            };
            return Err(BuildError::Rejected(Rejected { value, error }));
        }
        let stored = {
            let mut ix = self.index.lock();
            guard.finish(&mut ix);
            match ix.touch(key) {
                Some(existing) => existing,
                None => ix.store(key.clone(), Arc::new(value), usage, self.limit_bytes),
            }
        };
        self.built.notify_all();
        Ok(stored)
    }

    /// [`get_or_try_insert_with`](Self::get_or_try_insert_with) for a build
    /// that cannot fail; the only error is a value too large for the limit,
    /// handed back.
    pub fn get_or_insert_with(
        &self,
        key: &K,
        build: impl FnOnce() -> V,
    ) -> Result<Arc<V>, Rejected<V>> {
        match self.get_or_try_insert_with(key, || Ok::<V, std::convert::Infallible>(build())) {
            Ok(v) => Ok(v),
            Err(BuildError::Rejected(r)) => Err(r),
            Err(BuildError::Build(never)) => match never {},
        }
    }

    /// Stores `value` under `key` (replacing any value there), evicting
    /// lower-scored entries until it fits, and returns the stored `Arc`.
    /// Counts an insert and an access, not a hit or miss.
    ///
    /// If the value alone is larger than the limit it is handed back in
    /// [`Rejected`] ([`Error::TooLargeForCache`]) and the manager, including
    /// any old value under `key`, is unchanged.
    pub fn insert(&self, key: K, value: V) -> Result<Arc<V>, Rejected<V>> {
        let usage = value.memory_usage();
        let bytes = usage.resident_bytes();
        if bytes > self.limit_bytes {
            let error = Error::TooLargeForCache {
                bytes,
                limit: self.limit_bytes,
            };
            return Err(Rejected { value, error });
        }
        let value = Arc::new(value);
        Ok(self.index.lock().store(key, value, usage, self.limit_bytes))
    }

    /// Removes and returns the value under `key` (not counted as an eviction).
    pub fn remove<Q>(&self, key: &Q) -> Option<Arc<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.index.lock().remove_entry(key).map(|e| e.value)
    }

    /// Removes every entry (not counted as evictions). In-flight builds
    /// continue and store their values when done.
    pub fn clear(&self) {
        let mut ix = self.index.lock();
        ix.entries.clear();
        ix.usage = MemoryUsage::default();
    }

    /// Whether `key` is resident. Counts nothing and is not an access.
    pub fn contains<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.index.lock().entries.contains_key(key)
    }

    /// Number of resident entries.
    pub fn len(&self) -> usize {
        self.index.lock().entries.len()
    }

    /// Whether no entry is resident.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held: the sum of the entries' sizes as last measured.
    pub fn bytes(&self) -> u64 {
        self.index.lock().bytes()
    }

    /// The byte limit from the config.
    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ManagerStats {
        let ix = self.index.lock();
        ManagerStats {
            bytes: ix.bytes(),
            entries: ix.entries.len() as u64,
            ..ix.stats
        }
    }

    /// Re-measures the value under `key` (whose memory changed since it was
    /// inserted) and updates the accounting. Not an access.
    ///
    /// Returns `Ok(None)` if `key` is not resident, else `Ok(Some(new_size))`.
    /// If the value grew, other entries are evicted by score until the total
    /// fits again (the refreshed entry itself is kept). If the value alone
    /// now exceeds the limit, it is evicted (counted as an eviction) and
    /// [`Error::TooLargeForCache`] is returned.
    pub fn refresh_size<Q>(&self, key: &Q) -> Result<Option<u64>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        // Measure outside the lock: `memory_usage` is user code.
        let Some(value) = self
            .index
            .lock()
            .entries
            .get(key)
            .map(|e| Arc::clone(&e.value))
        else {
            return Ok(None);
        };
        let usage = value.memory_usage();
        let bytes = usage.resident_bytes();
        let mut ix = self.index.lock();
        let Some(e) = ix.entries.get_mut(key) else {
            return Ok(None);
        };
        if !Arc::ptr_eq(&e.value, &value) {
            // Replaced while we measured; the new value was measured at its insert.
            return Ok(Some(e.size()));
        }
        let old = std::mem::replace(&mut e.usage, usage);
        sub_usage(&mut ix.usage, old);
        ix.usage += usage;
        if bytes > self.limit_bytes {
            if let Some(e) = ix.remove_entry(key) {
                ix.stats.evictions += 1;
                ix.stats.evicted_bytes += e.size();
            }
            return Err(Error::TooLargeForCache {
                bytes,
                limit: self.limit_bytes,
            });
        }
        let now = ix.clock;
        ix.evict_to_fit(0, self.limit_bytes, now, Some(key));
        Ok(Some(bytes))
    }
}

impl<K, V> MemoryReport for BufferManager<K, V> {
    fn component(&self) -> &str {
        &self.component
    }

    /// The field-wise sum of the entries' usage as measured at insert (or the
    /// last [`refresh_size`](BufferManager::refresh_size)), so that
    /// `resident_bytes()` equals [`bytes`](BufferManager::bytes). The index's
    /// own bookkeeping (a few dozen bytes per entry) is not included.
    fn memory_usage(&self) -> MemoryUsage {
        self.index.lock().usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    /// A test buffer: an id to check identity, and a size that can change.
    #[derive(Debug)]
    struct Blob {
        id: u64,
        bytes: AtomicU64,
    }

    impl Blob {
        fn new(id: u64, bytes: u64) -> Self {
            Self {
                id,
                bytes: AtomicU64::new(bytes),
            }
        }
    }

    impl MemoryReport for Blob {
        fn component(&self) -> &str {
            "test/blob"
        }
        fn memory_usage(&self) -> MemoryUsage {
            let b = self.bytes.load(Ordering::Relaxed);
            MemoryUsage {
                heap_bytes: b,
                anon_bytes: 0,
                file_bytes: 0,
                reserved_bytes: b,
            }
        }
    }

    fn manager(limit_bytes: u64) -> BufferManager<&'static str, Blob> {
        BufferManager::new(ManagerConfig { limit_bytes }).unwrap()
    }

    fn put(m: &BufferManager<&'static str, Blob>, key: &'static str, id: u64, bytes: u64) {
        m.insert(key, Blob::new(id, bytes)).unwrap();
    }

    fn touch(m: &BufferManager<&'static str, Blob>, key: &'static str, times: usize) {
        for _ in 0..times {
            assert!(m.get(key).is_some(), "{key} should be resident");
        }
    }

    /// Runs `f` on a thread and fails the test if it does not finish: a
    /// deadlock detector, not a timing assertion.
    fn must_finish<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("call panicked or deadlocked (no result within 60 s)")
    }

    #[test]
    fn config_rejects_zero_limit() {
        let err = ManagerConfig { limit_bytes: 0 }.validate().unwrap_err();
        assert!(
            matches!(
                err,
                Error::Config {
                    key: "limit_bytes",
                    ..
                }
            ),
            "{err}"
        );
        assert!(BufferManager::<u32, Blob>::new(ManagerConfig { limit_bytes: 0 }).is_err());
        ManagerConfig::default().validate().unwrap();
        ManagerConfig { limit_bytes: 1 }.validate().unwrap();
    }

    #[test]
    fn score_matches_doc_example() {
        const MIB: f64 = (1u64 << 20) as f64;
        let a = keep_score(8.0, 990, 4 << 20, 1000) * MIB;
        let b = keep_score(1.0, 900, 256 << 10, 1000) * MIB;
        assert!((a - 0.1806).abs() < 1e-4, "A = {a}");
        assert!((b - 0.0370).abs() < 1e-4, "B = {b}");
        // B used 8 times as recently as A: 16 times A's score.
        let b_hot = keep_score(8.0, 990, 256 << 10, 1000) * MIB;
        assert!((b_hot / a - 16.0).abs() < 1e-9);
        // The count halves every half-life.
        assert!((decay(8.0, FREQUENCY_HALF_LIFE_TICKS) - 4.0).abs() < 1e-12);
        assert_eq!(keep_score(1.0, 0, 0, 0), 1.0, "size 0 counts as 1");
    }

    #[test]
    fn limit_respected_after_every_insert() {
        let limit = 1000;
        let m = BufferManager::<u64, Blob>::new(ManagerConfig { limit_bytes: limit }).unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut evicting_inserts = 0;
        for i in 0..3000 {
            let key = next() % 40;
            let size = next() % 400;
            if next() % 3 == 0 {
                if let Some(v) = m.get(&key) {
                    assert_eq!(v.id % 40, key);
                }
            } else {
                let before = m.stats().evictions;
                let v = m.insert(key, Blob::new(key + 40 * i, size)).unwrap();
                assert_eq!(v.id, key + 40 * i);
                assert!(m.contains(&key), "the inserted key must be resident");
                evicting_inserts += u64::from(m.stats().evictions > before);
            }
            let s = m.stats();
            assert!(m.bytes() <= limit, "{} > {limit} after op {i}", m.bytes());
            assert_eq!(s.bytes, m.bytes());
            assert_eq!(s.entries, m.len() as u64);
            assert_eq!(m.memory_usage().resident_bytes(), m.bytes());
        }
        assert!(
            evicting_inserts > 100,
            "the sequence must exercise eviction"
        );
    }

    #[test]
    fn frequently_used_entry_survives_over_rarely_used_one() {
        let m = manager(200);
        put(&m, "hot", 1, 100);
        put(&m, "cold", 2, 100);
        touch(&m, "hot", 10);
        // `cold` is now the more recently used one: plain LRU would keep it.
        touch(&m, "cold", 1);
        put(&m, "new", 3, 100);
        assert!(m.contains("hot"));
        assert!(!m.contains("cold"));
        assert!(m.contains("new"));
        assert_eq!(m.stats().evictions, 1);
        assert_eq!(m.stats().evicted_bytes, 100);
    }

    #[test]
    fn large_rarely_used_entry_evicted_before_small_hot_ones() {
        let m = manager(1000);
        put(&m, "big", 1, 600);
        for k in ["s1", "s2", "s3"] {
            put(&m, k, 2, 100);
        }
        for _ in 0..3 {
            for k in ["s1", "s2", "s3"] {
                touch(&m, k, 1);
            }
        }
        // `big` is the most recently used: plain LRU would evict `s1`,
        // which alone would make room.
        touch(&m, "big", 1);
        put(&m, "new", 3, 200);
        assert!(!m.contains("big"));
        for k in ["s1", "s2", "s3", "new"] {
            assert!(m.contains(k), "{k} evicted");
        }
        assert_eq!(m.stats().evicted_bytes, 600);
        assert_eq!(m.bytes(), 500);
    }

    #[test]
    fn stale_popularity_loses_to_recent_use() {
        let m = manager(300);
        put(&m, "old", 1, 100);
        touch(&m, "old", 50);
        // Time passes: 2000 accesses to another entry.
        put(&m, "ticker", 2, 100);
        touch(&m, "ticker", 2000);
        // A recent entry, used far less often than `old` ever was: plain LFU
        // would evict it.
        put(&m, "fresh", 3, 100);
        touch(&m, "fresh", 4);
        put(&m, "new", 4, 100);
        assert!(!m.contains("old"));
        for k in ["ticker", "fresh", "new"] {
            assert!(m.contains(k), "{k} evicted");
        }
    }

    #[test]
    fn old_popularity_decays() {
        // Recency alone would not do it here: `old`'s raw count of 1000 over
        // its idle time of ~3000 ticks (0.33) beats `fresh`'s 1 / 11 (0.09).
        // The count's half-life makes `old` go.
        let m = manager(300);
        put(&m, "old", 1, 100);
        touch(&m, "old", 999);
        put(&m, "ticker", 2, 100);
        touch(&m, "ticker", 3000);
        put(&m, "fresh", 3, 100);
        touch(&m, "ticker", 9);
        put(&m, "new", 4, 100);
        assert!(!m.contains("old"));
        for k in ["ticker", "fresh", "new"] {
            assert!(m.contains(k), "{k} evicted");
        }
    }

    #[test]
    fn equal_use_the_least_recently_used_goes() {
        let m = manager(200);
        put(&m, "a", 1, 100);
        put(&m, "b", 2, 100);
        put(&m, "c", 3, 100);
        assert!(!m.contains("a"));
        assert!(m.contains("b") && m.contains("c"));
    }

    #[test]
    fn hit_rate_stats_exact_for_scripted_sequence() {
        let m = manager(250);
        assert_eq!(m.stats().hit_rate(), 0.0);
        assert!(m.get("a").is_none()); // miss 1
        let built = AtomicUsize::new(0);
        let build = |id| {
            built.fetch_add(1, Ordering::Relaxed);
            Ok::<_, ()>(Blob::new(id, 100))
        };
        assert_eq!(m.get_or_try_insert_with(&"a", || build(1)).unwrap().id, 1); // miss 2, insert 1
        assert_eq!(m.get("a").unwrap().id, 1); // hit 1
        assert_eq!(m.get_or_try_insert_with(&"a", || build(9)).unwrap().id, 1); // hit 2
        assert_eq!(built.load(Ordering::Relaxed), 1, "a hit must not build");
        put(&m, "b", 2, 100); // insert 2
        assert_eq!(m.get("b").unwrap().id, 2); // hit 3
        assert!(m.get("c").is_none()); // miss 3
        assert!(m.contains("b")); // no count
        assert_eq!(m.remove("a").unwrap().id, 1);
        assert!(m.get("a").is_none()); // miss 4
        put(&m, "a", 3, 100); // insert 3
        put(&m, "c", 4, 100); // insert 4, evicts one 100-byte entry
        let s = m.stats();
        assert_eq!(
            s,
            ManagerStats {
                hits: 3,
                misses: 4,
                inserts: 4,
                evictions: 1,
                evicted_bytes: 100,
                bytes: 200,
                entries: 2
            }
        );
        assert_eq!(s.hit_rate(), 3.0 / 7.0);
    }

    #[test]
    fn too_large_leaves_cache_unchanged() {
        let m = manager(300);
        put(&m, "a", 1, 100);
        put(&m, "b", 2, 150);
        let before = m.stats();

        let r = m.insert("huge", Blob::new(7, 301)).unwrap_err();
        assert_eq!(r.value.id, 7, "the value is handed back");
        assert!(
            matches!(
                r.error,
                Error::TooLargeForCache {
                    bytes: 301,
                    limit: 300
                }
            ),
            "{}",
            r.error
        );

        // Replacing an existing key with a too-large value keeps the old one.
        let r = m.insert("a", Blob::new(8, 1000)).unwrap_err();
        assert_eq!(r.value.id, 8);

        let err = m
            .get_or_try_insert_with(&"huge", || Ok::<_, ()>(Blob::new(9, 400)))
            .unwrap_err();
        match err {
            BuildError::Rejected(r) => {
                assert_eq!(r.value.id, 9);
                assert!(matches!(
                    r.error,
                    Error::TooLargeForCache {
                        bytes: 400,
                        limit: 300
                    }
                ));
            }
            BuildError::Build(()) => panic!("expected Rejected"),
        }

        let after = m.stats();
        assert_eq!(
            after,
            ManagerStats {
                misses: before.misses + 1,
                ..before
            }
        );
        assert_eq!(m.get("a").unwrap().id, 1);
        assert_eq!(m.get("b").unwrap().id, 2);
        assert!(!m.contains("huge"));
        assert_eq!(m.bytes(), 250);
        assert_eq!(m.stats().evictions, 0);
        // And a later build of the same key is not blocked by a stale marker.
        let v = m
            .get_or_try_insert_with(&"huge", || Ok::<_, ()>(Blob::new(10, 50)))
            .unwrap();
        assert_eq!(v.id, 10);
    }

    #[test]
    fn exactly_limit_sized_value_fits_by_evicting_everything() {
        let m = manager(300);
        put(&m, "a", 1, 100);
        put(&m, "b", 2, 100);
        put(&m, "all", 3, 300);
        assert_eq!(m.len(), 1);
        assert_eq!(m.bytes(), 300);
        assert_eq!(m.stats().evicted_bytes, 200);
    }

    #[test]
    fn build_error_propagates_and_inserts_nothing() {
        let m = manager(300);
        let err = m
            .get_or_try_insert_with(&"a", || Err::<Blob, _>("no data for symbol"))
            .unwrap_err();
        assert_eq!(err.build_error(), Some("no data for symbol"));
        assert!(!m.contains("a"));
        assert!(m.is_empty());
        let s = m.stats();
        assert_eq!((s.inserts, s.bytes, s.entries, s.misses), (0, 0, 0, 1));
        // The in-flight marker is gone: the next call builds.
        assert_eq!(
            m.get_or_try_insert_with(&"a", || Ok::<_, &str>(Blob::new(1, 10)))
                .unwrap()
                .id,
            1
        );
    }

    #[test]
    fn evicted_value_stays_alive_for_holders() {
        let m = manager(100);
        let held = m.insert("a", Blob::new(1, 100)).unwrap();
        put(&m, "b", 2, 100);
        assert!(!m.contains("a"));
        assert_eq!(held.id, 1);
        assert_eq!(Arc::strong_count(&held), 1, "the manager dropped its Arc");
    }

    #[test]
    fn replacement_updates_bytes_without_eviction() {
        let m = manager(300);
        put(&m, "a", 1, 100);
        put(&m, "b", 2, 100);
        put(&m, "a", 3, 200);
        assert_eq!(m.get("a").unwrap().id, 3);
        assert_eq!(m.bytes(), 300);
        assert_eq!(m.stats().evictions, 0);
        m.clear();
        assert_eq!((m.len(), m.bytes()), (0, 0));
        assert_eq!(m.memory_usage(), MemoryUsage::default());
    }

    #[test]
    fn refresh_size_remeasures() {
        let m = manager(300);
        let a = m.insert("a", Blob::new(1, 100)).unwrap();
        put(&m, "b", 2, 100);
        touch(&m, "b", 5);
        assert_eq!(m.refresh_size("missing").unwrap(), None);

        a.bytes.store(150, Ordering::Relaxed);
        assert_eq!(m.bytes(), 200, "size is measured at insert only");
        assert_eq!(m.refresh_size("a").unwrap(), Some(150));
        assert_eq!(m.bytes(), 250);

        // Growing past the limit evicts others, never the refreshed entry.
        a.bytes.store(250, Ordering::Relaxed);
        assert_eq!(m.refresh_size("a").unwrap(), Some(250));
        assert!(m.contains("a") && !m.contains("b"));
        assert_eq!(m.bytes(), 250);

        // Alone over the limit: evicted, and the error says so.
        a.bytes.store(400, Ordering::Relaxed);
        let err = m.refresh_size("a").unwrap_err();
        assert!(
            matches!(
                err,
                Error::TooLargeForCache {
                    bytes: 400,
                    limit: 300
                }
            ),
            "{err}"
        );
        assert!(m.is_empty());
        assert_eq!(m.bytes(), 0);
        assert_eq!(m.stats().evicted_bytes, 100 + 400);
    }

    #[test]
    fn memory_report_sums_entries() {
        let m = manager(1000).with_component("features/per-symbol");
        assert_eq!(m.component(), "features/per-symbol");
        assert_eq!(manager(1).component(), DEFAULT_COMPONENT);
        put(&m, "a", 1, 100);
        put(&m, "b", 2, 250);
        let u = m.memory_usage();
        assert_eq!(
            u,
            MemoryUsage {
                heap_bytes: 350,
                anon_bytes: 0,
                file_bytes: 0,
                reserved_bytes: 350
            }
        );
        m.remove("a");
        assert_eq!(m.memory_usage().heap_bytes, 250);
        assert!(format!("{m:?}").contains("bytes: 250"));
    }

    #[test]
    fn second_caller_waits_for_in_flight_build() {
        let m = Arc::new(manager(1000));
        let (started_tx, started_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let builder = {
            let m = Arc::clone(&m);
            thread::spawn(move || {
                m.get_or_try_insert_with(&"k", || {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    Ok::<_, ()>(Blob::new(1, 10))
                })
                .unwrap()
                .id
            })
        };
        started_rx.recv().unwrap();
        let second_built = Arc::new(AtomicUsize::new(0));
        let waiter = {
            let (m, second_built) = (Arc::clone(&m), Arc::clone(&second_built));
            thread::spawn(move || {
                m.get_or_try_insert_with(&"k", || {
                    second_built.fetch_add(1, Ordering::Relaxed);
                    Ok::<_, ()>(Blob::new(2, 10))
                })
                .unwrap()
                .id
            })
        };
        // The waiter has counted its miss (under the lock) and is now waiting.
        while m.stats().misses < 2 {
            thread::yield_now();
        }
        assert_eq!(
            m.get("k").map(|v| v.id),
            None,
            "get does not wait for a build"
        );
        release_tx.send(()).unwrap();
        assert_eq!(builder.join().unwrap(), 1);
        assert_eq!(
            waiter.join().unwrap(),
            1,
            "the waiter shares the first build"
        );
        assert_eq!(second_built.load(Ordering::Relaxed), 0);
        assert_eq!(m.stats().inserts, 1);
    }

    #[test]
    fn waiter_builds_itself_when_in_flight_build_fails() {
        let m = Arc::new(manager(1000));
        let (started_tx, started_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let builder = {
            let m = Arc::clone(&m);
            thread::spawn(move || {
                m.get_or_try_insert_with(&"k", || {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    Err::<Blob, _>("upstream down")
                })
                .unwrap_err()
                .build_error()
            })
        };
        started_rx.recv().unwrap();
        let waiter = {
            let m = Arc::clone(&m);
            thread::spawn(move || {
                m.get_or_try_insert_with(&"k", || Ok::<_, &str>(Blob::new(2, 10)))
                    .unwrap()
                    .id
            })
        };
        while m.stats().misses < 2 {
            thread::yield_now();
        }
        release_tx.send(()).unwrap();
        assert_eq!(builder.join().unwrap(), Some("upstream down"));
        assert_eq!(must_finish(move || waiter.join().unwrap()), 2);
        assert_eq!(m.stats().inserts, 1);
    }

    #[test]
    fn panicking_build_does_not_block_later_callers() {
        let m = Arc::new(manager(1000));
        let m2 = Arc::clone(&m);
        let panicked = thread::spawn(move || {
            let _ = m2
                .get_or_try_insert_with(&"k", || -> Result<Blob, ()> { panic!("build panicked") });
        })
        .join();
        assert!(panicked.is_err());
        let id = must_finish(move || {
            m.get_or_try_insert_with(&"k", || Ok::<_, ()>(Blob::new(3, 10)))
                .unwrap()
                .id
        });
        assert_eq!(id, 3);
    }

    #[test]
    fn reentrant_build_of_same_key_does_not_deadlock() {
        let m = Arc::new(manager(1000));
        let id = must_finish(move || {
            let outer = m
                .get_or_try_insert_with(&"k", || {
                    let inner = m
                        .get_or_try_insert_with(&"k", || Ok::<_, ()>(Blob::new(1, 10)))
                        .unwrap();
                    assert_eq!(inner.id, 1);
                    Ok::<_, ()>(Blob::new(2, 10))
                })
                .unwrap();
            assert_eq!(m.len(), 1);
            outer.id
        });
        assert_eq!(
            id, 1,
            "the value already present when the outer build ends wins"
        );
    }

    #[test]
    fn concurrent_get_or_try_insert_with_on_overlapping_keys() {
        const THREADS: u64 = 8;
        const KEYS: u64 = 32;
        const ROUNDS: u64 = 400;
        let size = |k: u64| 10 + (k % 5) * 10;
        let limit: u64 = (0..KEYS).map(size).sum::<u64>() / 2;
        let m = Arc::new(
            BufferManager::<u64, Blob>::new(ManagerConfig { limit_bytes: limit }).unwrap(),
        );
        let builds = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (m, builds) = (Arc::clone(&m), Arc::clone(&builds));
                thread::spawn(move || {
                    for r in 0..ROUNDS {
                        // Overlapping, thread-dependent orders with a hot subset.
                        let key = if r % 3 == 0 {
                            r % 4
                        } else {
                            (r * (2 * t + 1) + t) % KEYS
                        };
                        let v = m
                            .get_or_try_insert_with(&key, || {
                                builds.fetch_add(1, Ordering::Relaxed);
                                if key % 7 == 6 && r % 11 == 0 {
                                    return Err(key);
                                }
                                thread::yield_now();
                                Ok(Blob::new(key, size(key)))
                            })
                            .map_err(|e| e.build_error().expect("nothing is too large"));
                        match v {
                            Ok(v) => {
                                assert_eq!(v.id, key, "wrong value for key");
                                assert_eq!(v.memory_usage().heap_bytes, size(key));
                            }
                            Err(k) => assert_eq!(k, key),
                        }
                        assert!(m.bytes() <= limit);
                    }
                })
            })
            .collect();
        let m2 = Arc::clone(&m);
        must_finish(move || {
            for w in workers {
                w.join().expect("worker panicked");
            }
        });
        let s = m2.stats();
        assert_eq!(s.hits + s.misses, THREADS * ROUNDS);
        assert!(s.bytes <= limit);
        assert!(s.evictions > 0, "the test must exercise eviction");
        assert!(s.hits > 0);
        assert!(builds.load(Ordering::Relaxed) as u64 <= s.misses);
        assert_eq!(s.entries, m2.len() as u64);
        for k in 0..KEYS {
            if let Some(v) = m2.get(&k) {
                assert_eq!(v.id, k);
            }
        }
    }
}
