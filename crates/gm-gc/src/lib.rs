//! Reclamation coordinator: components register what memory they can give
//! back ([`gm_core::Reclaim`]); a coordinator asks them on schedule, under
//! pressure and in an emergency, cheapest tier first, measures what each
//! really freed, and returns freed heap to the OS.
//!
//! Rust has no garbage collector: what the seed system called "GC" is
//! giving memory back on schedule and under pressure. That is this crate.
//!
//! # Key types
//! - [`Builder`] → [`Handle`]: the coordinator and its thread. The thread
//!   runs a [`Trigger::Periodic`] pass every [`Config::period`] (default
//!   60 s) and a pressure pass for each [`Handle::on_pressure`] signal
//!   (queued signals merge into one pass of the strongest).
//!   [`Handle::emergency`] runs every tier at `Emergency` synchronously and
//!   returns the report. Dropping the handle stops and joins the thread at
//!   once, whatever the period (the thread waits on a channel with a
//!   deadline, never sleeps).
//! - [`PressureSink`]: a cloneable sender of pressure for the thread that
//!   watches memory (gm-system wires gm-monitor's alerts to it).
//! - [`Trigger`]: which tiers a pass visits and at which
//!   [`ReclaimLevel`](gm_core::ReclaimLevel) — the table is on [`Trigger`]:
//!   periodic = caches at `Cheap`; `Warning` = caches and compressible data
//!   at `Moderate`; `Critical` = those at `Emergency` and working state at
//!   `Moderate`; `Exceeded` and emergency = every tier at `Emergency`.
//! - [`Target`]: optionally stop a pass once the heap or RSS is below a
//!   line (e.g. [`Target::below_warning`] of a [`gm_core::MemoryBudget`]).
//! - [`PassReport`] / [`ComponentReport`]: per component, the bytes it
//!   *claimed* next to the bytes *measured* (heap gauge and resident
//!   anonymous memory before and after its own `reclaim`), plus RSS before
//!   the pass, after the components and after the trim. Serde-serializable;
//!   the last [`Config::history_len`] are kept ([`Handle::history`]).
//! - [`trim`] / [`rss`]: `malloc_trim(0)` on glibc (a reported no-op
//!   elsewhere) and the process's resident memory from `/proc/self/statm`.
//!
//! # Measured, not claimed
//! A component's return value is its belief. The coordinator reads a heap
//! gauge (given with [`Builder::heap_gauge`]; gm-system passes gm-leak's
//! counting allocator, which this crate may not depend on) and RSS around
//! each component's call and reports both next to the claim. RSS lags
//! frees: freed small and medium blocks stay resident in the allocator's
//! arenas until `malloc_trim` releases them, so per-component RSS figures
//! show only what was unmapped at once (large blocks) and the trim figures
//! of the pass show the rest (the [`measure`] module explains).
//!
//! # Invariants
//! - The registry holds `Weak` references only: registering never keeps a
//!   component alive, and a dropped component vanishes from the registry
//!   and from every later pass. A pass holds a strong reference to one
//!   component at a time, only for its call.
//! - Tiers are visited Cache → Compressible → State; within a tier,
//!   registration order. Passes never overlap (synchronous passes wait for a
//!   running one), so their measurements do not mix.
//! - A component whose `reclaim` (or `name`, `tier`, `reclaimable_bytes`,
//!   or the heap gauge) panics is caught, logged (`tracing`, target
//!   `gm_gc`) and reported as [`Outcome::Panicked`]; the pass goes on and
//!   the thread survives. (The default panic hook still prints the panic.)
//! - No timing is promised beyond "the drop of a handle does not wait for
//!   the period".
//! - Tier 1: depends on gm-core only — never on gm-leak, gm-monitor,
//!   gm-buffers, gm-shard or gm-market, not even in dev-dependencies (the
//!   tests bring their own components and gauges).

mod config;
mod coordinator;
mod error;
pub mod measure;
mod registry;
mod report;
#[cfg(test)]
mod tests;

pub use config::Config;
pub use coordinator::{Builder, Handle, PressureSink};
pub use error::{Error, Result};
pub use measure::{rss, trim, Rss, TrimOutcome};
pub use report::{
    ComponentId, ComponentInfo, ComponentReport, Metric, Outcome, PassReport, Stats, Target,
    Trigger, TIER_ORDER,
};
