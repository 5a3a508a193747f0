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
//!   call bounded by a timeout. Three backends:
//!   - [`ThreadGroup`] / [`ThreadComm`]: ranks as threads of one process;
//!   - `MpiComm` (feature `mpi`): one rank per process of an `mpirun` job,
//!     over `MPI_COMM_WORLD`;
//!   - `NcclComm` (feature `cuda`): one rank per CUDA device through
//!     cudarc's NCCL, several devices in one process or, with `mpi` too,
//!     one per MPI process (`NcclComm::from_mpi`).
//! - [`codec`]: `u64`s as exact `f32` pieces for the small control
//!   messages the collectives carry (counters, CRCs, fingerprints).
//! - [`mpirun_command`], [`launched_by_mpirun`], [`run_job`]: the one way
//!   tests, benches and docs launch jobs (`mpirun -n N
//!   [--allow-run-as-root] --oversubscribe PROGRAM`), and a runner that
//!   kills a job at a deadline instead of hanging (no MPI needed to build);
//!   [`mpirun_check`]: whether an MPI test runs, skips (`GM_SKIP_MPI=1`)
//!   or fails because `mpirun` is missing.
//!
//! # Invariants
//! - Plans are deterministic: the same tensors (in any order) and config
//!   give an equal plan with an equal [`ShardPlan::fingerprint`], so every
//!   rank computes the same plan; plans round-trip through serde.
//! - Sums: the in-process and MPI backends sum in rank order
//!   (`((r0 + r1) + r2) + …`, each element summed once by one rank and
//!   copied), so every rank gets bit-identical results, equal to the
//!   sequential reference and to each other. MPI's own reductions are never
//!   used (their order is implementation-defined): MPI sums are an
//!   all-to-all, a local rank-order sum and an all-gather. NCCL sums in its
//!   own order: equal to the others within float rounding, not bit for
//!   bit.
//! - Argument errors ([`Error::LengthMismatch`] and friends) are returned
//!   identically on every rank of every backend (the process-spanning
//!   backends exchange a small header first and run the in-process
//!   backend's checks on it) and leave the group usable.
//! - No collective waits forever: a peer that is missing past the timeout
//!   gives [`Error::Timeout`], one that has left gives [`Error::PeerLeft`]
//!   (in-process) or a failed job (MPI: `mpirun` ends the job when a rank
//!   dies), a library failure gives [`Error::Backend`]; each breaks the
//!   group (later calls: [`Error::Aborted`]). What a timeout leaves behind
//!   on MPI and NCCL: the call's buffers are leaked on purpose (the library
//!   may still write them: collectives cannot be cancelled), an NCCL
//!   communicator is aborted, and a broken `MpiComm` does not finalize MPI
//!   when dropped (finalizing waits for the missing rank); the process
//!   should exit, and `mpirun` then ends the job. Not bounded by the
//!   timeout: MPI's and NCCL's initialization.
//! - A backend that cannot run here (MPI already initialized in the
//!   process, no CUDA driver, no NCCL library, no such device) is an
//!   [`Error::Unavailable`], never a panic: cudarc is only called after
//!   checking that its libraries load. Nothing here panics on bad input or
//!   a failed peer.
//! - No threads of its own: [`ThreadGroup::run`] uses scoped threads that
//!   are joined before it returns.
//! - Tier 1: depends on gm-core only — never on gm-buffers, gm-leak,
//!   gm-monitor, gm-gc or gm-market. The sharded trainer lives in gm-train.

mod check;
pub mod codec;
mod comm;
mod error;
mod launch;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "cuda")]
mod nccl;
mod plan;
#[cfg(test)]
mod tests;
mod thread;
mod zero;

pub use comm::{Communicator, Op};
pub use error::{Error, Result};
pub use launch::{
    launched_by_mpirun, launcher_rank, launcher_world_size, mpirun_check, mpirun_check_exit_code,
    mpirun_command, run_job, JobOutput, MpirunCheck,
};
#[cfg(feature = "mpi")]
pub use mpi::MpiComm;
#[cfg(feature = "cuda")]
pub use nccl::NcclComm;
pub use plan::{plan, Piece, PlanConfig, Shard, ShardPlan, TensorSpec, MAX_RANKS};
pub use thread::{ThreadComm, ThreadGroup};
pub use zero::{zero_memory, AdamPrecision, ZeroMemory, ZeroStage};
