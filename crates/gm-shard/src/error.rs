//! The crate's one error type: every variant names what was wrong, the
//! value, and what was expected or allowed.

use crate::comm::Op;
use gm_core::ByteSize;
use std::time::Duration;

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in gm-shard: bad configuration, a plan that
/// does not fit, and failed collectives.
///
/// `Clone` because one failed collective hands the same error to every rank.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range.
    #[error("invalid gm-shard config: {key} = {value}: allowed {allowed}")]
    Config {
        /// The config key (`ranks`, `max_shard_bytes`, ...).
        key: &'static str,
        /// The rejected value, printed.
        value: String,
        /// What is allowed, in words.
        allowed: String,
    },
    /// Two tensors given to the planner share a name.
    #[error("tensor {name:?} is listed twice; tensor names must be unique")]
    DuplicateTensor {
        /// The repeated name.
        name: String,
    },
    /// A tensor's byte size does not split into whole elements, or one
    /// element is larger than a shard may be.
    #[error("tensor {name:?} ({elements} elements, {bytes} bytes) cannot be sharded: {reason}")]
    TensorSize {
        /// The tensor.
        name: String,
        /// Its element count.
        elements: u64,
        /// Its size in bytes.
        bytes: u64,
        /// What is wrong, in words.
        reason: String,
    },
    /// The tensors need more bytes than all ranks' budgets together hold.
    #[error(
        "the plan needs {} ({needed_bytes} bytes) but the rank budgets hold {} \
         ({available_bytes} bytes): short by {} ({short_bytes} bytes)",
        ByteSize(*needed_bytes), ByteSize(*available_bytes), ByteSize(*short_bytes)
    )]
    BudgetShort {
        /// Bytes of all shards.
        needed_bytes: u64,
        /// Sum of the rank budgets.
        available_bytes: u64,
        /// `needed_bytes - available_bytes`.
        short_bytes: u64,
    },
    /// The budgets hold the total, but the greedy assignment found no rank
    /// with room for one shard (budgets too fragmented for the shard size;
    /// a smaller `max_shard_bytes` may fit).
    #[error(
        "shard {shard} ({shard_bytes} bytes) fits no rank: the most free budget is \
         {largest_free_bytes} bytes on rank {rank}, short by {short_bytes} bytes \
         (a smaller max_shard_bytes may fit)"
    )]
    ShardDoesNotFit {
        /// Index of the shard in the plan.
        shard: usize,
        /// Its size.
        shard_bytes: u64,
        /// The rank with the most free budget at that point.
        rank: usize,
        /// That rank's free budget.
        largest_free_bytes: u64,
        /// `shard_bytes - largest_free_bytes`.
        short_bytes: u64,
    },
    /// A size computation does not fit in 64 bits.
    #[error("{what} overflows u64")]
    Overflow {
        /// Which quantity.
        what: &'static str,
    },
    /// A rank passed a buffer or count list of the wrong length. Every rank
    /// of the collective returns this same error.
    #[error("{op}: rank {rank} passed {what} {actual}, expected {expected}")]
    LengthMismatch {
        /// The collective.
        op: Op,
        /// The rank whose argument is wrong.
        rank: usize,
        /// Which argument (`buffer length`, `counts entries`, ...).
        what: &'static str,
        /// The length required.
        expected: usize,
        /// The length given.
        actual: usize,
    },
    /// Ranks disagree on an argument that must be the same on all of them
    /// (`counts`, `root`).
    #[error("{op}: rank {rank} passed {what} = {actual}, but rank 0 passed {expected}")]
    ArgumentMismatch {
        /// The collective.
        op: Op,
        /// The rank that differs from rank 0.
        rank: usize,
        /// Which argument.
        what: &'static str,
        /// Rank 0's value, printed.
        expected: String,
        /// This rank's value, printed.
        actual: String,
    },
    /// Ranks called different collectives at the same point in their
    /// sequence (a program-order bug).
    #[error("collective #{seq}: rank {rank} called {actual} but rank 0 called {expected}")]
    OpMismatch {
        /// The collective's sequence number (0 = first call).
        seq: u64,
        /// The rank that differs from rank 0.
        rank: usize,
        /// Rank 0's collective.
        expected: Op,
        /// This rank's collective.
        actual: Op,
    },
    /// A broadcast root outside `0..world`.
    #[error("{op}: root {root} is not a rank (world size {world})")]
    InvalidRoot {
        /// The collective.
        op: Op,
        /// The root given.
        root: usize,
        /// The number of ranks.
        world: usize,
    },
    /// Peers did not arrive within the timeout. The group is broken from
    /// now on: every later collective on this rank fails with
    /// [`Error::Aborted`] (in-process: on every rank; across processes the
    /// other ranks time out in turn, or the job ends when this one exits).
    #[error(
        "{op} (collective #{seq}) on rank {rank} timed out after {timeout:?} \
         waiting for ranks {missing:?}"
    )]
    Timeout {
        /// The collective.
        op: Op,
        /// The collective's sequence number.
        seq: u64,
        /// The rank that waited.
        rank: usize,
        /// The configured timeout.
        timeout: Duration,
        /// The ranks that had not arrived. Exact for the in-process backend
        /// and for MPI's header exchange (the usual place to wait for a late
        /// rank); every other rank where the backend cannot tell (an MPI
        /// data transfer that stalls after every rank arrived; NCCL).
        missing: Vec<usize>,
    },
    /// A peer left the group (its communicator was dropped, e.g. its thread
    /// panicked) before joining this collective. The group is broken.
    #[error("{op} (collective #{seq}) on rank {rank}: rank {peer} left the group")]
    PeerLeft {
        /// The collective.
        op: Op,
        /// The collective's sequence number.
        seq: u64,
        /// The rank that waited.
        rank: usize,
        /// The rank that left.
        peer: usize,
    },
    /// The group was broken by an earlier failure on some rank; no more
    /// collectives can run on it.
    #[error("{op} on rank {rank}: the group is broken: {cause}")]
    Aborted {
        /// The collective that was attempted.
        op: Op,
        /// The rank that attempted it.
        rank: usize,
        /// The failure that broke the group, in words.
        cause: String,
    },
    /// A backend cannot be used in this process: its library or driver is
    /// missing, MPI was already initialized, no such device, … Nothing was
    /// started; nothing is broken.
    #[error("the {backend} backend is unavailable: {reason}")]
    Unavailable {
        /// `"mpi"` or `"nccl"`.
        backend: &'static str,
        /// What is missing or wrong, in words.
        reason: String,
    },
    /// A call into the backend's library failed (an MPI or NCCL error
    /// code, or a CUDA error). The group is broken: later calls fail with
    /// [`Error::Aborted`].
    #[error("{op} (collective #{seq}) on rank {rank}: {backend} failed: {reason}")]
    Backend {
        /// `"mpi"` or `"nccl"`.
        backend: &'static str,
        /// The collective.
        op: Op,
        /// The collective's sequence number.
        seq: u64,
        /// The rank that saw the failure.
        rank: usize,
        /// The library's error, printed.
        reason: String,
    },
    /// A buffer is larger than one call of the backend can move (MPI counts
    /// and offsets are 32-bit). Every rank returns this same error and the
    /// group stays usable; split the buffer.
    #[error("{op}: {what} of {elements} elements exceeds the {backend} limit of {max} per call")]
    TooLarge {
        /// `"mpi"`.
        backend: &'static str,
        /// The collective.
        op: Op,
        /// Which buffer.
        what: &'static str,
        /// Its element count.
        elements: usize,
        /// The most elements allowed.
        max: usize,
    },
    /// A rank's thread could not be started.
    #[error("could not start the thread of rank {rank}: {reason}")]
    Spawn {
        /// The rank.
        rank: usize,
        /// The OS error, printed.
        reason: String,
    },
}

impl Error {
    pub(crate) fn config(
        key: &'static str,
        value: impl std::fmt::Debug,
        allowed: impl Into<String>,
    ) -> Self {
        Error::Config {
            key,
            value: format!("{value:?}"),
            allowed: allowed.into(),
        }
    }
}
