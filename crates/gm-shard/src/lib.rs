//! Sharded data parallelism for GrandModel: how a model's parameters and
//! optimizer state are split across ranks, and the collectives the ranks
//! use to train together.
//!
//! # Key types
//! - [`plan()`] with [`PlanConfig`] → [`ShardPlan`]: named tensors
//!   ([`TensorSpec`]) cut into [`Shard`]s of at most
//!   [`PlanConfig::max_shard_bytes`] (default 100 MB; larger tensors are
//!   split into contiguous element ranges, [`Piece`]s) and assigned to
//!   ranks balanced by bytes (largest first onto the least-loaded rank
//!   whose budget still holds it). A plan that cannot fit the budgets is an
//!   [`Error::BudgetShort`] or [`Error::ShardDoesNotFit`] saying by how
//!   many bytes.
//! - [`zero_memory`]: the ZeRO stage 0/1/2 per-rank model-state bytes for
//!   mixed-precision and f32 Adam (4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N, …), to report
//!   next to measurements.
//! - [`Communicator`]: the collectives trait (all-reduce, reduce-scatter,
//!   all-gather, broadcast, barrier, gather of statistics to rank 0), every
//!   call bounded by a timeout.
//! - [`ThreadGroup`] / [`ThreadComm`]: the in-process backend, ranks as
//!   threads of one process.
//!
//! # Invariants
//! - Plans are deterministic: the same tensors (in any order) and config
//!   give an equal plan with an equal [`ShardPlan::fingerprint`], so every
//!   rank computes the same plan; plans round-trip through serde.
//! - The backends here sum in rank order, so every rank gets bit-identical
//!   reduction results.
//! - No collective waits forever: a peer that is missing past the timeout
//!   gives [`Error::Timeout`], one that has left gives [`Error::PeerLeft`],
//!   and either breaks the group (later calls: [`Error::Aborted`]).
//!   Argument errors ([`Error::LengthMismatch`] and friends) are returned
//!   identically on every rank and leave the group usable.
//! - No threads of its own: [`ThreadGroup::run`] uses scoped threads that
//!   are joined before it returns.
//! - Tier 1: depends on gm-core only — never on gm-buffers, gm-leak,
//!   gm-monitor, gm-gc or gm-market. The sharded trainer lives in gm-train.

mod comm;
mod error;
mod plan;
#[cfg(test)]
mod tests;
mod thread;
mod zero;

pub use comm::{Communicator, Op};
pub use error::{Error, Result};
pub use plan::{plan, Piece, PlanConfig, Shard, ShardPlan, TensorSpec, MAX_RANKS};
pub use thread::{ThreadComm, ThreadGroup};
pub use zero::{zero_memory, AdamPrecision, ZeroMemory, ZeroStage};
