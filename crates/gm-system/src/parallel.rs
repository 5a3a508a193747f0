//! Data-parallel training across processes (`grandmodel train --ranks N`):
//! joining the `mpirun` job ([`Group`]), the small collectives the run adds
//! to the learner's (rank 0's decisions broadcast, per-rank statistics,
//! everyone's success checked before the next phase), and the rule that
//! moves optimizer shards off a rank that runs hot ([`rebalance_budgets`]).
//!
//! The only file that names the MPI backend (`#[cfg(feature = "mpi")]`):
//! without the feature, [`Group::connect`] is an [`Error::MpiNotBuilt`] and
//! everything else, the rest of the run included, works against gm-shard's
//! [`Communicator`] trait, so the data-parallel run is tested in-process on
//! [`gm_shard::ThreadGroup`] ranks in any build.
//!
//! Integers cross the `f32` collectives in 24-bit pieces
//! ([`gm_shard::codec`]), which `f32` holds exactly.

use std::time::Duration;

use gm_shard::codec::{decode_u64s, encode_u64s, U64_PIECES};
use gm_shard::Communicator;
use serde::Serialize;

use crate::error::{Error, Result};

/// How tests, benches and docs launch an `mpirun` job (gm-shard's: the
/// flags a container needs included), and run it with a kill deadline;
/// whether an MPI test can run here (or skips, `GM_SKIP_MPI=1`).
pub use gm_shard::{mpirun_check, mpirun_command, run_job, MpirunCheck};

/// The job's size and this process's rank from the MPI launcher's
/// environment (gm-shard owns the list of variables).
pub use gm_shard::{launcher_rank, launcher_world_size};

/// This process's end of the data-parallel group: one rank of an `mpirun`
/// job (gm-shard's `MpiComm`). Dropping it finalizes MPI (a collective
/// wait for every rank), unless the group is broken.
pub struct Group {
    #[cfg(feature = "mpi")]
    comm: std::sync::Arc<parking_lot::Mutex<gm_shard::MpiComm>>,
    #[cfg(feature = "mpi")]
    rank: usize,
    #[cfg(feature = "mpi")]
    world: usize,
    #[cfg(not(feature = "mpi"))]
    never: std::convert::Infallible,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("rank", &self.rank())
            .field("world", &self.world())
            .finish()
    }
}

#[cfg(feature = "mpi")]
impl Group {
    /// Joins the `mpirun` job as one of `ranks` ranks, with `timeout` on
    /// every collective. Errors: [`Error::NotLaunchedByMpirun`],
    /// [`Error::WorldMismatch`] (the job's size is not `ranks`; every rank
    /// gets it), [`Error::Shard`] (MPI unavailable).
    pub fn connect(ranks: usize, timeout: Duration) -> Result<Group> {
        if !gm_shard::launched_by_mpirun() {
            return Err(Error::NotLaunchedByMpirun { ranks });
        }
        if let Some(world) = launcher_world_size().filter(|&w| w != ranks) {
            // Before MPI starts: nothing to finalize.
            return Err(Error::WorldMismatch { ranks, world });
        }
        let comm = gm_shard::MpiComm::init(timeout)?;
        let (rank, world) = (comm.rank(), comm.world());
        if world != ranks {
            // Every rank sees the same size and drops (finalizes) together.
            return Err(Error::WorldMismatch { ranks, world });
        }
        Ok(Group {
            comm: std::sync::Arc::new(parking_lot::Mutex::new(comm)),
            rank,
            world,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// A communicator for the learner (it shares the group's MPI
    /// communicator: the group keeps MPI alive until it is dropped, after
    /// the learner).
    pub fn communicator(&self) -> Box<dyn Communicator + Send> {
        Box::new(SharedMpi {
            comm: self.comm.clone(),
            rank: self.rank,
            world: self.world,
        })
    }

    /// Whether a collective failed and broke the group (dropping it then
    /// does not finalize MPI: the process just ends, and mpirun ends the
    /// job).
    pub fn is_broken(&self) -> bool {
        self.comm.lock().is_broken()
    }

    /// Ends the whole job at once (`MPI_Abort`) with `code`: for a failure
    /// the other ranks do not know about (they would wait in their next
    /// collective until the timeout).
    pub fn abort(&self, code: i32) -> ! {
        self.comm.lock().abort(code)
    }

    /// Leaves the group: finalizes MPI, which waits for every rank to
    /// leave too (unless the group is broken: then it returns at once and
    /// the process should end). Call it after the learner is gone.
    pub fn finish(self) {
        drop(self.comm);
    }
}

#[cfg(not(feature = "mpi"))]
impl Group {
    /// Without the `mpi` feature there is no group to join:
    /// [`Error::MpiNotBuilt`] saying how to build and launch one.
    pub fn connect(ranks: usize, _timeout: Duration) -> Result<Group> {
        Err(Error::MpiNotBuilt { ranks })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        match self.never {}
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        match self.never {}
    }

    /// A communicator for the learner.
    pub fn communicator(&self) -> Box<dyn Communicator + Send> {
        match self.never {}
    }

    /// Whether a collective failed and broke the group.
    pub fn is_broken(&self) -> bool {
        match self.never {}
    }

    /// Ends the whole job at once.
    pub fn abort(&self, _code: i32) -> ! {
        match self.never {}
    }

    /// Leaves the group.
    pub fn finish(self) {
        match self.never {}
    }
}

/// The group's MPI communicator behind a lock, so the [`Group`] keeps a
/// handle (to abort, and to finalize last) while the learner owns this one.
/// Only the thread running the learner calls collectives.
#[cfg(feature = "mpi")]
struct SharedMpi {
    comm: std::sync::Arc<parking_lot::Mutex<gm_shard::MpiComm>>,
    rank: usize,
    world: usize,
}

#[cfg(feature = "mpi")]
impl Communicator for SharedMpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> gm_shard::Result<()> {
        self.comm.lock().all_reduce_sum(buf)
    }
    fn reduce_scatter_sum(&self, input: &[f32], counts: &[usize]) -> gm_shard::Result<Vec<f32>> {
        self.comm.lock().reduce_scatter_sum(input, counts)
    }
    fn all_gather(&self, local: &[f32], counts: &[usize]) -> gm_shard::Result<Vec<f32>> {
        self.comm.lock().all_gather(local, counts)
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> gm_shard::Result<()> {
        self.comm.lock().broadcast(buf, root)
    }
    fn barrier(&self) -> gm_shard::Result<()> {
        self.comm.lock().barrier()
    }
    fn gather_stats(&self, values: &[u64]) -> gm_shard::Result<Option<Vec<Vec<u64>>>> {
        self.comm.lock().gather_stats(values)
    }
}

// ------------------------------------------------------------ small collectives

/// Copies `root`'s `values` into every rank's (collective; the same length
/// everywhere).
pub fn broadcast_u64s(comm: &dyn Communicator, values: &mut [u64], root: usize) -> Result<()> {
    let mut buf = encode_u64s(values);
    comm.broadcast(&mut buf, root)?;
    values.copy_from_slice(&decode_u64s(&buf));
    Ok(())
}

/// Every rank's `values` (the same length everywhere), indexed by rank, on
/// every rank (collective).
pub fn all_gather_u64s(comm: &dyn Communicator, values: &[u64]) -> Result<Vec<Vec<u64>>> {
    let counts = vec![values.len() * U64_PIECES; comm.world()];
    let all = comm.all_gather(&encode_u64s(values), &counts)?;
    Ok(all
        .chunks(values.len().max(1) * U64_PIECES)
        .map(decode_u64s)
        .collect())
}

/// Checks that a phase succeeded on every rank before the next one
/// (collective: one `all_gather` of every rank's exit code, 0 for
/// success). A rank that failed gets its own error back; the others an
/// [`Error::PeerFailed`] naming the first rank that failed and its code.
/// Without a group (`None`) it is `result` itself.
pub fn group_ok<T>(
    comm: Option<&dyn Communicator>,
    result: Result<T>,
    during: &'static str,
) -> Result<T> {
    let Some(comm) = comm else {
        return result;
    };
    let code = result.as_ref().err().map_or(0, |e| e.exit_code().max(1));
    let all = match all_gather_u64s(comm, &[code as u64]) {
        Ok(all) => all,
        // Our own failure first; else the group's.
        Err(e) => return result.and(Err(e)),
    };
    let value = result?;
    match all.iter().position(|c| c[0] != 0) {
        None => Ok(value),
        Some(rank) => Err(Error::PeerFailed {
            rank,
            code: all[rank][0] as i32,
            during,
        }),
    }
}

// ------------------------------------------------------------ statistics

/// One rank's figures at a metrics interval, gathered to rank 0 (the
/// `"ranks"` array of `metrics.jsonl` and the report's per-rank table).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RankStats {
    /// The rank.
    pub rank: usize,
    /// Resident memory now (`VmRSS`).
    pub rss_bytes: u64,
    /// Peak resident memory (`VmHWM`).
    pub peak_rss_bytes: u64,
    /// Live heap bytes (gm-leak's counting allocator).
    pub heap_bytes: u64,
    /// Optimizer state this rank holds (its ZeRO shards of AdamW's `m`, `v`).
    pub optimizer_state_bytes: u64,
    /// The rank's replay buffer, resident bytes.
    pub replay_bytes: u64,
    /// Time inside the ZeRO optimizer's collectives in this invocation.
    pub comm_secs: f64,
    /// Time inside learner steps in this invocation (collectives included).
    pub step_secs: f64,
    /// `comm_secs / step_secs` (0 before the first step).
    pub comm_fraction: f64,
}

/// Values per rank in a statistics record.
pub const STATS_LEN: usize = 7;

impl RankStats {
    /// A record from this rank's figures.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rank: usize,
        rss_bytes: u64,
        peak_rss_bytes: u64,
        heap_bytes: u64,
        optimizer_state_bytes: u64,
        replay_bytes: u64,
        comm: Duration,
        step: Duration,
    ) -> Self {
        let (comm_secs, step_secs) = (comm.as_secs_f64(), step.as_secs_f64());
        Self {
            rank,
            rss_bytes,
            peak_rss_bytes,
            heap_bytes,
            optimizer_state_bytes,
            replay_bytes,
            comm_secs,
            step_secs,
            comm_fraction: if step_secs > 0.0 {
                comm_secs / step_secs
            } else {
                0.0
            },
        }
    }

    /// The record as it travels: `[rss, peak_rss, heap, optimizer state,
    /// replay, comm ns, step ns]`.
    pub fn to_values(&self) -> [u64; STATS_LEN] {
        [
            self.rss_bytes,
            self.peak_rss_bytes,
            self.heap_bytes,
            self.optimizer_state_bytes,
            self.replay_bytes,
            (self.comm_secs * 1e9) as u64,
            (self.step_secs * 1e9) as u64,
        ]
    }

    /// The record of `rank` from [`to_values`](Self::to_values)' layout
    /// (`None` for a record of another length).
    pub fn from_values(rank: usize, v: &[u64]) -> Option<Self> {
        let v: &[u64; STATS_LEN] = v.try_into().ok()?;
        Some(Self::new(
            rank,
            v[0],
            v[1],
            v[2],
            v[3],
            v[4],
            Duration::from_nanos(v[5]),
            Duration::from_nanos(v[6]),
        ))
    }
}

/// What the rebalancing rule decided at a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebalanceDecision {
    /// The ranks' median RSS (the mean of the two middle ones for an even
    /// number of ranks).
    pub median_rss_bytes: u64,
    /// The hot ranks, ascending.
    pub hot: Vec<usize>,
    /// The new optimizer-state budget of every rank (`u64::MAX`: no limit).
    pub budgets_bytes: Vec<u64>,
}

/// The rebalancing rule, a pure function of figures every rank has (the
/// all-gathered RSS of each rank, `rss_bytes`, and the current plan's
/// optimizer-state bytes per rank, `state_bytes`), so every rank decides
/// the same.
///
/// A rank is hot when its RSS exceeds the median by more than
/// `hot_fraction` of the median. A hot rank with excess `e` over the
/// median sheds `e · (N − 1) / N` bytes of optimizer state (what evens it
/// with the others if the state's bytes were all that differed), at most
/// all it holds: its budget is what it holds minus that. The other ranks
/// have no limit, so the plan always fits (the lowest rank is never hot).
/// `None` when no rank is hot or there is one rank.
pub fn rebalance_budgets(
    rss_bytes: &[u64],
    state_bytes: &[u64],
    hot_fraction: f64,
) -> Option<RebalanceDecision> {
    let n = rss_bytes.len();
    if n < 2 || state_bytes.len() != n {
        return None;
    }
    let mut sorted = rss_bytes.to_vec();
    sorted.sort_unstable();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        ((u128::from(sorted[n / 2 - 1]) + u128::from(sorted[n / 2])) / 2) as u64
    };
    let line = median as f64 * (1.0 + hot_fraction);
    let hot: Vec<usize> = (0..n)
        .filter(|&r| rss_bytes[r] > median && rss_bytes[r] as f64 > line)
        .collect();
    if hot.is_empty() {
        return None;
    }
    let mut budgets_bytes = vec![u64::MAX; n];
    for &r in &hot {
        let excess = u128::from(rss_bytes[r] - median);
        let shed = (excess * (n as u128 - 1) / n as u128).min(u128::from(state_bytes[r])) as u64;
        budgets_bytes[r] = state_bytes[r] - shed;
    }
    Some(RebalanceDecision {
        median_rss_bytes: median,
        hot,
        budgets_bytes,
    })
}

/// A rebalance at a checkpoint, for `metrics.jsonl` and the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rebalance {
    /// The checkpoint's step.
    pub step: u64,
    /// Every rank's RSS.
    pub rss_bytes: Vec<u64>,
    /// Their median.
    pub median_rss_bytes: u64,
    /// The hot ranks.
    pub hot: Vec<usize>,
    /// The new optimizer-state budgets (`None`: no limit).
    pub budgets_bytes: Vec<Option<u64>>,
    /// Optimizer-state bytes per rank under the plan before.
    pub state_bytes_before: Vec<u64>,
    /// And after.
    pub state_bytes_after: Vec<u64>,
    /// Whether any shard changed owner.
    pub moved: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use gm_shard::ThreadGroup;

    #[test]
    fn integers_cross_the_f32_collectives_exactly() {
        let out = ThreadGroup::run(3, Duration::from_secs(10), |c| {
            let mut v = [c.rank() as u64 * 1_000_000_007, u64::MAX];
            broadcast_u64s(&c, &mut v, 1)?;
            let all = all_gather_u64s(&c, &[c.rank() as u64 + (1 << 40)])?;
            Ok::<_, Error>((v, all))
        })
        .unwrap();
        for o in out {
            let (v, all) = o.unwrap();
            assert_eq!(v, [1_000_000_007, u64::MAX]);
            assert_eq!(all, [[1 << 40], [(1 << 40) + 1], [(1 << 40) + 2]]);
        }
    }

    #[test]
    fn a_phase_that_fails_on_one_rank_fails_on_every_rank_with_its_code() {
        let out = ThreadGroup::run(3, Duration::from_secs(10), |c| {
            let r = c.rank();
            let mine: Result<usize> = if r == 1 {
                Err(Error::DataMissing {
                    path: "x.csv".into(),
                    reason: "no such file".into(),
                })
            } else {
                Ok(r)
            };
            let failed = group_ok(Some(&c), mine, "while loading");
            let fine = group_ok(Some(&c), Ok(r), "later");
            (
                failed.map_err(|e| (e.exit_code(), e.to_string())),
                fine.ok(),
            )
        })
        .unwrap();
        for (r, (failed, fine)) in out.into_iter().enumerate() {
            let (code, text) = failed.unwrap_err();
            assert_eq!(code, crate::exit::DATA_MISSING);
            if r == 1 {
                assert!(text.contains("cannot open data file"), "{text}");
            } else {
                assert!(text.contains("rank 1 failed while loading"), "{text}");
            }
            assert_eq!(fine, Some(r));
        }
        assert_eq!(group_ok(None, Ok(5), "x").unwrap(), 5);
    }

    #[test]
    fn launch_errors_say_how_to_build_and_launch_with_exit_code_8() {
        use crate::exit;
        let e = Error::MpiNotBuilt { ranks: 4 };
        assert_eq!(e.exit_code(), exit::PARALLEL);
        let t = e.to_string();
        assert!(
            t.contains("cargo build --release -p gm-system --features mpi")
                && t.contains("mpirun -n 4 target/release/grandmodel train --ranks 4"),
            "{t}"
        );
        let e = Error::NotLaunchedByMpirun { ranks: 2 };
        assert_eq!(e.exit_code(), exit::PARALLEL);
        assert!(e.to_string().contains("not started by mpirun"), "{e}");
        let e = Error::WorldMismatch { ranks: 3, world: 2 };
        assert_eq!(e.exit_code(), exit::PARALLEL);
        let t = e.to_string();
        assert!(
            t.contains("run.ranks = 3") && t.contains("mpirun started 2 process"),
            "{t}"
        );
        let e = Error::PeerFailed {
            rank: 1,
            code: exit::MEMORY,
            during: "while planning",
        };
        assert_eq!(e.exit_code(), exit::MEMORY);
        let e = Error::from(gm_shard::Error::Aborted {
            op: gm_shard::Op::Barrier,
            rank: 0,
            cause: "rank 1 left".into(),
        });
        assert_eq!(e.exit_code(), exit::PARALLEL);
        #[cfg(not(feature = "mpi"))]
        assert!(matches!(
            Group::connect(2, Duration::from_secs(1)),
            Err(Error::MpiNotBuilt { ranks: 2 })
        ));
    }

    #[test]
    fn stats_round_trip_and_the_comm_fraction() {
        let s = RankStats::new(
            1,
            100 << 20,
            120 << 20,
            50 << 20,
            4096,
            1 << 20,
            Duration::from_millis(250),
            Duration::from_secs(1),
        );
        assert_eq!(s.comm_fraction, 0.25);
        assert_eq!(RankStats::from_values(1, &s.to_values()), Some(s));
        assert_eq!(RankStats::from_values(1, &[1, 2]), None);
    }

    #[test]
    fn the_rebalance_rule_sheds_state_from_hot_ranks_only() {
        const M: u64 = 1 << 20;
        // Nobody hot: nothing to do; one rank: nothing to do.
        assert_eq!(
            rebalance_budgets(&[100 * M, 110 * M], &[8 * M, 8 * M], 0.25),
            None
        );
        assert_eq!(rebalance_budgets(&[100 * M], &[8 * M], 0.0), None);
        // Three ranks, rank 2 is 50 % above the median: it sheds 2/3 of
        // its 50 MiB excess, capped at the 16 MiB it holds.
        let d = rebalance_budgets(&[100 * M, 90 * M, 150 * M], &[16 * M; 3], 0.25).unwrap();
        assert_eq!(d.median_rss_bytes, 100 * M);
        assert_eq!(d.hot, [2]);
        assert_eq!(d.budgets_bytes, [u64::MAX, u64::MAX, 0]);
        // A small excess sheds a part.
        let d = rebalance_budgets(&[100 * M, 106 * M], &[16 * M, 16 * M], 0.0).unwrap();
        assert_eq!(d.median_rss_bytes, 103 * M);
        assert_eq!(d.hot, [1]);
        assert_eq!(d.budgets_bytes, [u64::MAX, 16 * M - 3 * M / 2]);
        // Equal ranks are never hot, even at fraction 0.
        assert_eq!(rebalance_budgets(&[M, M, M, M], &[M; 4], 0.0), None);
        // The budgets always fit the plan: the coldest rank is unlimited.
        let d = rebalance_budgets(&[9 * M, 1, 10 * M, 8 * M], &[M; 4], 0.0).unwrap();
        assert_eq!(d.hot, [0, 2]);
        assert_eq!(d.budgets_bytes[1], u64::MAX);
    }
}
