//! [`Registry`]: live objects counted by label, through weak references or
//! guards, so that a growing label points at what is being kept alive.
//!
//! Two ways in, for two kinds of object:
//!
//! - [`Registry::track`]`(label, &Arc<T>)` keeps a `Weak<dyn Any + Send + Sync>`:
//!   nothing changes in the tracked type, and the object counts as live while
//!   any strong reference exists. A dead entry is pruned by the next
//!   [`snapshot`](Registry::snapshot) (and by `track` itself once a label's
//!   list has doubled since the last prune), so until then the weak reference
//!   keeps the object's `Arc` allocation (not the object, which is dropped)
//!   alive: the registry holds at most about twice the live entries, plus
//!   whatever died since the last snapshot.
//! - [`Registry::guard`]`(label)` returns a [`LiveGuard`] to store inside an
//!   object (or hold for a scope): it counts as one live object until
//!   dropped. Exact and O(1), no pruning, works for objects that are not in an
//!   `Arc`.
//!
//! Counts feed the [`LeakDetector`](crate::LeakDetector) through
//! [`Snapshot::with_objects`](crate::Snapshot::with_objects), which tests each
//! label for growth with the same trend test as the heap.
//!
//! Thread-safe: one mutex around the label table, held for a push or a prune;
//! guards touch only their label's atomic counter.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// Live objects by label; see the module docs.
#[derive(Debug, Default)]
pub struct Registry {
    labels: Mutex<BTreeMap<String, Label>>,
}

#[derive(Debug, Default)]
struct Label {
    tracked: Vec<Weak<dyn Any + Send + Sync>>,
    /// `tracked.len()` after the last prune: `track` prunes when the list has
    /// doubled since.
    pruned_len: usize,
    guards: Arc<AtomicU64>,
}

impl Label {
    fn prune(&mut self) {
        self.tracked.retain(|w| w.strong_count() > 0);
        self.pruned_len = self.tracked.len();
    }

    fn live(&self) -> u64 {
        self.tracked.len() as u64 + self.guards.load(Ordering::Relaxed)
    }
}

/// Counts as one live object of its label until dropped; see
/// [`Registry::guard`].
#[derive(Debug)]
pub struct LiveGuard {
    count: Arc<AtomicU64>,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The table; a panic while it was held cannot leave it inconsistent (each
    /// critical section is a single push, retain or read), so a poisoned lock
    /// is used as is.
    fn table(&self) -> MutexGuard<'_, BTreeMap<String, Label>> {
        self.labels.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with_label<R>(&self, label: &str, f: impl FnOnce(&mut Label) -> R) -> R {
        let mut table = self.table();
        match table.get_mut(label) {
            Some(l) => f(l),
            None => f(table.entry(label.to_owned()).or_default()),
        }
    }

    /// Counts `obj` under `label` while any strong reference to it exists.
    /// Tracking the same `Arc` twice counts it twice.
    pub fn track<T: Any + Send + Sync>(&self, label: &str, obj: &Arc<T>) {
        let weak: Weak<dyn Any + Send + Sync> = Arc::downgrade(obj) as Weak<dyn Any + Send + Sync>;
        self.with_label(label, |l| {
            if l.tracked.len() >= 2 * l.pruned_len.max(16) {
                l.prune();
            }
            l.tracked.push(weak);
        });
    }

    /// A guard that counts as one live object of `label` until dropped.
    pub fn guard(&self, label: &str) -> LiveGuard {
        let count = self.with_label(label, |l| Arc::clone(&l.guards));
        count.fetch_add(1, Ordering::Relaxed);
        LiveGuard { count }
    }

    /// Live objects of every label seen so far (0 for a label whose objects
    /// are all gone), after pruning dead entries.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        let mut table = self.table();
        table
            .iter_mut()
            .map(|(k, l)| {
                l.prune();
                (k.clone(), l.live())
            })
            .collect()
    }

    /// Live objects of `label` (0 if never seen), after pruning it.
    pub fn live(&self, label: &str) -> u64 {
        let mut table = self.table();
        table.get_mut(label).map_or(0, |l| {
            l.prune();
            l.live()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_entries_are_pruned_in_track_too() {
        let r = Registry::new();
        for _ in 0..1000 {
            let a = Arc::new([0u8; 64]);
            r.track("tmp", &a);
        }
        let len = r.table()["tmp"].tracked.len();
        assert!(len <= 32, "dead entries pruned as the list grows: {len}");
        assert_eq!(r.live("tmp"), 0);
    }

    #[test]
    fn guards_count_until_dropped() {
        let r = Registry::new();
        let g1 = r.guard("g");
        let g2 = r.guard("g");
        assert_eq!(r.live("g"), 2);
        drop(g1);
        assert_eq!(r.snapshot()["g"], 1);
        drop(g2);
        assert_eq!(r.snapshot()["g"], 0);
    }
}
