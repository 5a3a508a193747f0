//! The registry of components: weak references only, so registering never
//! keeps a component alive, and a dropped component disappears from it.

use crate::report::{ComponentId, ComponentInfo};
use gm_core::{Reclaim, ReclaimTier};
use std::sync::Weak;

/// Registered components, in registration order.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    next_id: u64,
    entries: Vec<Entry>,
}

struct Entry {
    id: ComponentId,
    weak: Weak<dyn Reclaim>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("id", &self.id)
            .field("alive", &(self.weak.strong_count() > 0))
            .finish()
    }
}

impl Registry {
    pub(crate) fn register(&mut self, weak: Weak<dyn Reclaim>) -> ComponentId {
        self.prune();
        self.next_id += 1;
        let id = ComponentId(self.next_id);
        self.entries.push(Entry { id, weak });
        id
    }

    pub(crate) fn unregister(&mut self, id: ComponentId) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.id != id);
        self.prune();
        self.entries.len() != before
    }

    /// Forgets components whose last strong reference is gone.
    pub(crate) fn prune(&mut self) {
        self.entries.retain(|e| e.weak.strong_count() > 0);
    }

    /// The live entries (pruning the dead), for a pass to visit.
    pub(crate) fn snapshot(&mut self) -> Vec<(ComponentId, Weak<dyn Reclaim>)> {
        self.prune();
        self.entries
            .iter()
            .map(|e| (e.id, e.weak.clone()))
            .collect()
    }

    /// The live components' names and tiers. Calls into the components:
    /// used outside the registry lock (on a snapshot).
    pub(crate) fn describe(snapshot: &[(ComponentId, Weak<dyn Reclaim>)]) -> Vec<ComponentInfo> {
        snapshot
            .iter()
            .filter_map(|(id, w)| {
                let c = w.upgrade()?;
                Some(ComponentInfo {
                    id: *id,
                    name: c.name().to_owned(),
                    tier: c.tier(),
                })
            })
            .collect()
    }
}

/// Tiers of a snapshot's entries, for a pass to order them. Kept apart so a
/// pass can call `tier()` under `catch_unwind`.
pub(crate) type Planned = (ComponentId, Weak<dyn Reclaim>, ReclaimTier);
