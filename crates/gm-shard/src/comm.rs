//! The collectives trait every backend implements, and [`Op`], the name of
//! a collective in errors.

use crate::error::{Error, Result};
use std::fmt;
use std::time::Duration;

/// Shortest allowed collective timeout.
const MIN_TIMEOUT: Duration = Duration::from_millis(1);
/// Longest allowed collective timeout.
const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 86_400);

/// Checks a backend's collective timeout: 1 ms ..= 7 days.
pub(crate) fn validate_timeout(timeout: Duration) -> Result<()> {
    if (MIN_TIMEOUT..=MAX_TIMEOUT).contains(&timeout) {
        Ok(())
    } else {
        Err(Error::config("timeout", timeout, "1 ms ..= 7 days"))
    }
}

/// A collective operation, as named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Communicator::all_reduce_sum`].
    AllReduceSum,
    /// [`Communicator::reduce_scatter_sum`].
    ReduceScatterSum,
    /// [`Communicator::all_gather`].
    AllGather,
    /// [`Communicator::broadcast`].
    Broadcast,
    /// [`Communicator::barrier`].
    Barrier,
    /// [`Communicator::gather_stats`].
    GatherStats,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::AllReduceSum => "all_reduce_sum",
            Op::ReduceScatterSum => "reduce_scatter_sum",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
            Op::GatherStats => "gather_stats",
        })
    }
}

/// One rank's end of a group of `world()` ranks running collectives.
///
/// Every rank must call the same collectives in the same order with
/// compatible arguments (the same `counts`, `root` and buffer lengths where
/// the method says so). A call returns when the collective has completed on
/// this rank, or with an error:
/// - [`Error::LengthMismatch`](crate::Error::LengthMismatch),
///   [`Error::ArgumentMismatch`](crate::Error::ArgumentMismatch),
///   [`Error::OpMismatch`](crate::Error::OpMismatch),
///   [`Error::InvalidRoot`](crate::Error::InvalidRoot),
///   [`Error::TooLarge`](crate::Error::TooLarge): bad arguments on some
///   rank; every rank gets the same error and the group stays usable;
/// - [`Error::Timeout`](crate::Error::Timeout),
///   [`Error::PeerLeft`](crate::Error::PeerLeft),
///   [`Error::Backend`](crate::Error::Backend): a peer did not arrive in
///   time, is gone, or the transport failed; the group is broken and later
///   calls fail with [`Error::Aborted`](crate::Error::Aborted). No call
///   waits longer than the backend's timeout (MPI's and NCCL's own
///   initialization and NCCL's first connection to a peer excepted: see
///   those backends).
///
/// Sums are computed in rank order (rank 0 + rank 1 + …) by the in-process
/// and MPI backends, so every rank gets bit-identical results, equal to a
/// sequential sum; the NCCL backend's equal them within float rounding.
pub trait Communicator {
    /// This rank, in `0..world()`.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn world(&self) -> usize;

    /// Replaces `buf` on every rank with the element-wise sum over ranks.
    /// All ranks pass buffers of the same length.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;

    /// Sums `input` element-wise over ranks and returns this rank's part:
    /// the `counts[rank]` elements after the first `counts[..rank]`.
    /// `counts` has one entry per rank and is the same on all ranks;
    /// `input.len()` is its sum.
    fn reduce_scatter_sum(&self, input: &[f32], counts: &[usize]) -> Result<Vec<f32>>;

    /// Concatenates every rank's `local` in rank order. `counts` has one
    /// entry per rank, is the same on all ranks, and
    /// `local.len() == counts[rank]`.
    fn all_gather(&self, local: &[f32], counts: &[usize]) -> Result<Vec<f32>>;

    /// Copies `root`'s `buf` into every rank's `buf` (same length on all
    /// ranks, same `root`).
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// Gathers every rank's `values` (same length on all ranks, e.g. a
    /// memory-statistics record) to rank 0: `Some(per_rank)` there, indexed
    /// by rank, `None` on the other ranks.
    fn gather_stats(&self, values: &[u64]) -> Result<Option<Vec<Vec<u64>>>>;
}
