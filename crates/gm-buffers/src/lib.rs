//! Memory-lean experience replay for RL trainers whose long runs die of
//! memory, not speed.
//!
//! # Key types
//! - [`Schema`] / [`FieldSpec`]: named fields with a dtype and a shape.
//!   [`FieldSpec::plain`] fields are stored once per transition;
//!   [`FieldSpec::obs`] and [`FieldSpec::window`] observations are stored as
//!   row streams in which `next_obs` and overlapping sliding windows are kept
//!   once ([`FieldKind::Observation`]).
//! - [`ReplayBuffer`]: uniform FIFO ring; [`PrioritizedReplayBuffer`]:
//!   proportional prioritized replay (sum/min/max trees, α, annealed β,
//!   stratified sampling, normalised importance weights), FIFO or
//!   lowest-priority eviction ([`Eviction`]).
//! - [`Batch`]: a reusable sampled batch; `sample_into` allocates nothing in
//!   steady state.
//! - [`BufferConfig`]: capacity, chunk size, memory/file placement
//!   ([`StorageMode`], default: a memory-mapped file above 100 MB), and the
//!   byte budget whose 80 % mark starts LZ4 compression of cold chunks.
//! - [`BufferStats`]: de-duplication and compression achieved, memory held.
//! - [`SharedReplay`] / [`Writer`]: a thread-safe handle for many writers and
//!   samplers, and per-actor staging that hands chunks over under one lock.
//! - [`Prefetcher`]: a background thread keeping sampled batches ready in a
//!   bounded channel; dropping it stops and joins the thread.
//! - `save` / `load` on both buffers: a versioned, CRC-checked file written
//!   crash-safely (temp file, fsync, rename); corrupt input is
//!   [`Error::Corrupt`].
//! - [`BufferManager`]: named buffers built on demand and evicted by
//!   frequency × recency / size under a byte limit, with hit-rate stats.
//!
//! # Measured
//! On the trading transition of `shared/peers/replay_peers.py` (two sliding
//! windows + 13 scalars, 6549 logical bytes), the de-duplicated layout holds
//! 142 B per transition (cpprb's `stack_compress`: 224 B) and samples 2.1×
//! faster than cpprb's best layout; with a byte budget, compression brings it
//! to 93 B at a large sampling cost. BENCHMARKS.md has the figures and the
//! commands.
//!
//! # Storage
//! Every field is one contiguous column (struct of arrays) in a memory map:
//! anonymous memory, committed page by page as it is written, or an unlinked
//! file whose disk space is reserved with `posix_fallocate` before use (a
//! full disk is an [`Error::Storage`], never a crash). Columns are managed
//! in chunks (default 16 KiB) that are resident, LZ4-compressed (after a
//! byte shuffle) or released; sampling decompresses through a small per-batch
//! cache. No heap allocation happens per transition.
//!
//! # Invariants
//! - A call that returns `Err` has changed nothing; bad input (shapes,
//!   dtypes, NaN priorities, zero capacity, corrupt files) is an `Err`,
//!   never a panic.
//! - A sampled window is bit-identical to the one that was added (overlap is
//!   detected by comparing bytes, and transitions whose rows would be
//!   overwritten are evicted first).
//! - Tier 1: depends on gm-core only, never on gm-leak, gm-monitor, gm-gc,
//!   gm-market or gm-shard (gm-leak is a dev-dependency, for measurement).

mod batch;
mod buffer;
mod codec;
mod config;
mod error;
pub mod manager;
mod persist;
mod prefetch;
mod prioritized;
mod region;
mod schema;
mod shared;
mod stats;
mod storage;
#[allow(dead_code)] // the full tree API (set_many, argmax, ...) is tested but not all used yet
mod tree;

pub use batch::Batch;
pub use buffer::{Replay, ReplayBuffer};
pub use config::{BufferConfig, StorageMode};
pub use error::{Error, Result};
pub use manager::{BufferManager, BuildError, ManagerConfig, ManagerStats, Rejected};
pub use prefetch::{PrefetchBuilder, PrefetchedBatch, Prefetcher};
pub use prioritized::{Eviction, PerConfig, PrioritizedReplayBuffer};
pub use schema::{col, Column, ColumnSpec, DType, Element, FieldKind, FieldSpec, Schema};
pub use shared::{SharedReplay, Writer};
pub use stats::{BufferStats, StreamStats};
