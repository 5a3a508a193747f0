//! The component gauges: named byte counts that components register with a
//! running monitor, either as a closure or as a `gm_core::MemoryReport`
//! held weakly (it disappears when the component is dropped).

use crate::error::{Error, Result};
use crate::sample::{ComponentSample, Reading};
use gm_core::MemoryReport;
use parking_lot::Mutex;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

/// Identifies one registered component gauge, for
/// [`Monitor::unregister`](crate::Monitor::unregister).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ComponentId(u64);

/// A closure gauge.
pub(crate) type GaugeFn = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A `MemoryReport` held weakly.
pub(crate) type WeakReport = Weak<dyn MemoryReport + Send + Sync>;

/// What can be registered as a weakly held report: `&Arc<T>` for a concrete
/// `T: MemoryReport`, or `&Arc<dyn MemoryReport + Send + Sync>`.
pub trait AsWeakReport {
    /// A weak reference to the report.
    fn as_weak_report(&self) -> WeakReport;
}

impl<T: MemoryReport + Send + Sync + 'static> AsWeakReport for Arc<T> {
    fn as_weak_report(&self) -> WeakReport {
        let w: Weak<T> = Arc::downgrade(self);
        w
    }
}

impl AsWeakReport for Arc<dyn MemoryReport + Send + Sync> {
    fn as_weak_report(&self) -> WeakReport {
        Arc::downgrade(self)
    }
}

#[derive(Clone)]
pub(crate) enum GaugeKind {
    Fn(GaugeFn),
    Report(WeakReport),
}

type Labels = [(String, String); 1];
pub(crate) type ComponentFamily = Family<Labels, Gauge<u64, AtomicU64>>;

struct Entry {
    id: ComponentId,
    name: Arc<str>,
    kind: GaugeKind,
    labels: Labels,
    metric: Gauge<u64, AtomicU64>,
}

/// The registry of component gauges.
pub(crate) struct Components {
    entries: Mutex<Vec<Entry>>,
    next_id: AtomicU64,
    family: ComponentFamily,
}

impl Components {
    pub(crate) fn new(family: ComponentFamily) -> Self {
        Self {
            entries: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            family,
        }
    }

    /// Registers `kind` under `name` (unique among the live entries).
    pub(crate) fn register(&self, name: &str, kind: GaugeKind) -> Result<ComponentId> {
        if name.is_empty() {
            return Err(Error::config("component name", name, "a non-empty name"));
        }
        let mut entries = self.entries.lock();
        self.prune_dead(&mut entries);
        if entries.iter().any(|e| &*e.name == name) {
            return Err(Error::DuplicateComponent { name: name.into() });
        }
        let id = ComponentId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let labels = [("component".to_string(), name.to_string())];
        let metric = self.family.get_or_create_owned(&labels);
        entries.push(Entry {
            id,
            name: name.into(),
            kind,
            labels,
            metric,
        });
        Ok(id)
    }

    /// Removes the entry `id`; `false` if there was none (already
    /// unregistered, or a report whose component was dropped).
    pub(crate) fn unregister(&self, id: ComponentId) -> bool {
        let mut entries = self.entries.lock();
        let Some(i) = entries.iter().position(|e| e.id == id) else {
            return false;
        };
        let e = entries.remove(i);
        self.family.remove(&e.labels);
        true
    }

    /// The names registered now (dead reports included until the next
    /// sample notices them).
    pub(crate) fn names(&self) -> Vec<String> {
        self.entries
            .lock()
            .iter()
            .map(|e| e.name.to_string())
            .collect()
    }

    fn prune_dead(&self, entries: &mut Vec<Entry>) {
        entries.retain(|e| {
            let alive = match &e.kind {
                GaugeKind::Fn(_) => true,
                GaugeKind::Report(w) => w.strong_count() > 0,
            };
            if !alive {
                self.family.remove(&e.labels);
            }
            alive
        });
    }

    /// Reads every gauge (in registration order), updates its metric, and
    /// drops reports whose component is gone. Returns the readings and the
    /// number of gauges that panicked.
    pub(crate) fn sample(&self) -> (Vec<ComponentSample>, u64) {
        let mut entries = self.entries.lock();
        let mut out = Vec::with_capacity(entries.len());
        let (mut panics, mut dead) = (0u64, false);
        for e in entries.iter() {
            let value = match &e.kind {
                GaugeKind::Fn(f) => catch_unwind(AssertUnwindSafe(|| f())).ok(),
                GaugeKind::Report(w) => match w.upgrade() {
                    Some(r) => {
                        catch_unwind(AssertUnwindSafe(|| r.memory_usage().resident_bytes())).ok()
                    }
                    None => {
                        dead = true;
                        continue;
                    }
                },
            };
            let bytes = match value {
                Some(b) => {
                    e.metric.set(b);
                    Reading::Ok(b)
                }
                None => {
                    panics += 1;
                    tracing::warn!(component = &*e.name, "component gauge panicked");
                    Reading::Error("the gauge panicked".into())
                }
            };
            out.push(ComponentSample {
                name: e.name.clone(),
                bytes,
            });
        }
        if dead {
            self.prune_dead(&mut entries);
        }
        (out, panics)
    }
}
