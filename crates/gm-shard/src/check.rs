//! What the process-spanning backends (MPI, NCCL) share: the per-call
//! [`Header`] every rank sends before a collective, the [`check`] that turns
//! all ranks' headers into the same verdict on every rank (the argument
//! errors of the in-process backend, in the same order), the rank-order sum,
//! the polling [`Backoff`], and [`InFlight`] memory.
//!
//! Compiled without features so that its unit tests compare it with the
//! in-process backend on every machine.

// Without the `mpi` and `cuda` features nothing outside the tests uses it.
#![cfg_attr(not(any(feature = "mpi", feature = "cuda")), allow(dead_code))]

use crate::comm::Op;
use crate::error::Error;
use std::mem::ManuallyDrop;
use std::time::{Duration, Instant};

/// Number of `u64` words of an encoded [`Header`].
pub(crate) const HEADER_WORDS: usize = 7;

/// One rank's description of the collective it is entering: enough for
/// every rank to check that all ranks agree, without the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// The collective.
    pub op: Op,
    /// This rank's sequence number of the call.
    pub seq: u64,
    /// Length of the rank's buffer (`buf`, `input`, `local`, `values`).
    pub len: usize,
    /// Number of entries in `counts` (0 where the call has none).
    pub counts_len: usize,
    /// [`counts_hash`] of `counts`.
    pub counts_hash: u64,
    /// The buffer length this rank's own `counts` require (all-gather:
    /// `counts[rank]`; reduce-scatter: their saturating sum; else 0).
    pub expected_len: usize,
    /// Broadcast root (0 for the other collectives).
    pub root: usize,
}

impl Header {
    /// The header of a call without `counts` and `root`.
    pub fn plain(op: Op, seq: u64, len: usize) -> Self {
        Self {
            op,
            seq,
            len,
            counts_len: 0,
            counts_hash: counts_hash(&[]),
            expected_len: 0,
            root: 0,
        }
    }

    /// The header of a reduce-scatter or all-gather on `rank`.
    pub fn with_counts(op: Op, seq: u64, len: usize, counts: &[usize], rank: usize) -> Self {
        let expected_len = match op {
            Op::AllGather => counts.get(rank).copied().unwrap_or(0),
            _ => counts.iter().fold(0usize, |a, &b| a.saturating_add(b)),
        };
        Self {
            counts_len: counts.len(),
            counts_hash: counts_hash(counts),
            expected_len,
            ..Self::plain(op, seq, len)
        }
    }

    /// The header of a broadcast from `root`.
    pub fn broadcast(seq: u64, len: usize, root: usize) -> Self {
        Self {
            root,
            ..Self::plain(Op::Broadcast, seq, len)
        }
    }

    /// The header as words, to send.
    pub fn encode(&self) -> [u64; HEADER_WORDS] {
        [
            op_code(self.op),
            self.seq,
            self.len as u64,
            self.counts_len as u64,
            self.counts_hash,
            self.expected_len as u64,
            self.root as u64,
        ]
    }

    /// Decodes words sent by [`Header::encode`]; `None` if they are not a
    /// header (a wrong op code).
    pub fn decode(w: &[u64]) -> Option<Self> {
        let size = |x: u64| usize::try_from(x).unwrap_or(usize::MAX);
        match *w {
            [op, seq, len, counts_len, counts_hash, expected_len, root] => Some(Self {
                op: op_from_code(op)?,
                seq,
                len: size(len),
                counts_len: size(counts_len),
                counts_hash,
                expected_len: size(expected_len),
                root: size(root),
            }),
            _ => None,
        }
    }
}

fn op_code(op: Op) -> u64 {
    match op {
        Op::AllReduceSum => 1,
        Op::ReduceScatterSum => 2,
        Op::AllGather => 3,
        Op::Broadcast => 4,
        Op::Barrier => 5,
        Op::GatherStats => 6,
    }
}

fn op_from_code(code: u64) -> Option<Op> {
    Some(match code {
        1 => Op::AllReduceSum,
        2 => Op::ReduceScatterSum,
        3 => Op::AllGather,
        4 => Op::Broadcast,
        5 => Op::Barrier,
        6 => Op::GatherStats,
        _ => return None,
    })
}

/// A 64-bit hash of a `counts` list (its length included), the same in
/// every process: splitmix64's finaliser over each word. Two different
/// lists collide with probability about 2⁻⁶⁴, which is what "every rank
/// passed the same counts" is checked to.
pub(crate) fn counts_hash(counts: &[usize]) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let mut h = mix(0x9e37_79b9_7f4a_7c15 ^ counts.len() as u64);
    for &c in counts {
        h = mix(h.wrapping_add(0x9e37_79b9_7f4a_7c15) ^ c as u64);
    }
    h
}

/// Why the headers do not allow the collective to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mismatch {
    /// The error every rank returns.
    Fail(Error),
    /// `rank`'s `counts` differ from rank 0's (both have `world` entries):
    /// the backend fetches both lists and reports
    /// [`counts_mismatch`]`(op, rank, ..)`.
    Counts {
        /// The collective.
        op: Op,
        /// The first rank whose counts differ from rank 0's.
        rank: usize,
    },
}

/// The verdict on a collective from every rank's header (index = rank),
/// the same on every rank: the checks, and their order, of the in-process
/// backend (`thread.rs`), so both give the same error for the same bad call.
pub(crate) fn check(world: usize, headers: &[Header]) -> Result<(), Mismatch> {
    let fail = |e| Err(Mismatch::Fail(e));
    let h0 = headers[0];
    let op = h0.op;
    for (rank, h) in headers.iter().enumerate() {
        if h.op != op {
            return fail(Error::OpMismatch {
                seq: h0.seq,
                rank,
                expected: op,
                actual: h.op,
            });
        }
    }
    let same_len = |what| {
        for (rank, h) in headers.iter().enumerate() {
            if h.len != h0.len {
                return fail(Error::LengthMismatch {
                    op,
                    rank,
                    what,
                    expected: h0.len,
                    actual: h.len,
                });
            }
        }
        Ok(())
    };
    match op {
        Op::AllReduceSum => same_len("buffer length"),
        Op::ReduceScatterSum | Op::AllGather => {
            let what = if op == Op::AllGather {
                "local length (counts[rank])"
            } else {
                "input length (sum of counts)"
            };
            for (rank, h) in headers.iter().enumerate() {
                if h.counts_len != world {
                    return fail(Error::LengthMismatch {
                        op,
                        rank,
                        what: "counts entries",
                        expected: world,
                        actual: h.counts_len,
                    });
                }
                if h.counts_hash != h0.counts_hash {
                    return Err(Mismatch::Counts { op, rank });
                }
                if h.len != h.expected_len {
                    return fail(Error::LengthMismatch {
                        op,
                        rank,
                        what,
                        expected: h.expected_len,
                        actual: h.len,
                    });
                }
            }
            Ok(())
        }
        Op::Broadcast => {
            for (rank, h) in headers.iter().enumerate() {
                if h.root >= world {
                    return fail(Error::InvalidRoot {
                        op,
                        root: h.root,
                        world,
                    });
                }
                if h.root != h0.root {
                    return fail(Error::ArgumentMismatch {
                        op,
                        rank,
                        what: "root",
                        expected: h0.root.to_string(),
                        actual: h.root.to_string(),
                    });
                }
            }
            same_len("buffer length")
        }
        Op::Barrier => Ok(()),
        Op::GatherStats => same_len("values length"),
    }
}

/// The error for [`Mismatch::Counts`], worded as the in-process backend
/// words it.
pub(crate) fn counts_mismatch(op: Op, rank: usize, rank0: &[usize], this: &[usize]) -> Error {
    Error::ArgumentMismatch {
        op,
        rank,
        what: "counts",
        expected: format!("{rank0:?}"),
        actual: format!("{this:?}"),
    }
}

/// Sums `world` equal parts of `parts` (part q = `parts[q*m..(q+1)*m]`)
/// element-wise in rank order, `((p0 + p1) + p2) + …`: the order of the
/// in-process backend, so every backend gives the same bits.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))] // MPI only
pub(crate) fn sum_parts_in_rank_order(parts: &[f32], world: usize) -> Vec<f32> {
    if world == 0 {
        return Vec::new();
    }
    let m = parts.len() / world;
    let mut acc = parts[..m].to_vec();
    for q in 1..world {
        for (a, x) in acc.iter_mut().zip(&parts[q * m..(q + 1) * m]) {
            *a += x;
        }
    }
    acc
}

/// Splits `n` elements into `world` contiguous parts whose sizes differ by
/// at most one (the first `n % world` parts are one longer): the sizes.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))] // MPI only
pub(crate) fn even_counts(n: usize, world: usize) -> Vec<usize> {
    let (base, extra) = (n / world, n % world);
    (0..world).map(|q| base + usize::from(q < extra)).collect()
}

/// Offsets of the parts of the given sizes (exclusive prefix sums).
pub(crate) fn offsets(counts: &[usize]) -> Vec<usize> {
    counts
        .iter()
        .scan(0usize, |at, &c| {
            let o = *at;
            *at += c;
            Some(o)
        })
        .collect()
}

/// Pacing of a completion-polling loop: spins (yielding the CPU) while a
/// collective is young, since MPI and NCCL progress only while polled and a
/// sleeping poller slows a transfer down; sleeps between polls once it has
/// waited [`Backoff::SPIN`], which is then mostly waiting for a late peer.
#[derive(Debug)]
pub(crate) struct Backoff {
    start: Instant,
    deadline: Instant,
}

impl Backoff {
    /// How long to poll without sleeping.
    pub const SPIN: Duration = Duration::from_millis(50);
    /// The pause between polls after that.
    pub const PAUSE: Duration = Duration::from_micros(200);

    /// Polling until `deadline`.
    pub fn until(deadline: Instant) -> Self {
        Self {
            start: Instant::now(),
            deadline,
        }
    }

    /// Waits before the next poll; `false` once the deadline has passed.
    pub fn wait(&self) -> bool {
        let now = Instant::now();
        if now >= self.deadline {
            return false;
        }
        if now.duration_since(self.start) < Self::SPIN {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Self::PAUSE.min(self.deadline - now));
        }
        true
    }
}

/// Memory a library (MPI, NCCL on the device) may read or write until the
/// operations that use it complete.
///
/// Never freed unless [`InFlight::completed`] says so: a value dropped
/// without it (a timeout, a library error, a panic) is leaked, because the
/// library may still write into it after we gave up, and a pending
/// collective cannot be cancelled. The leak is bounded: it happens at most
/// once per communicator, which is broken from then on.
#[derive(Debug)]
pub(crate) struct InFlight<T>(ManuallyDrop<T>);

impl<T> InFlight<T> {
    pub fn new(value: T) -> Self {
        Self(ManuallyDrop::new(value))
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.0
    }

    /// The memory back, once every operation using it has completed.
    pub fn completed(self) -> T {
        ManuallyDrop::into_inner(self.0)
    }
}

#[cfg(test)]
mod tests {
    //! The header check against the in-process backend: for the same calls
    //! on every rank, `check` (plus the counts fetch the backends do) must
    //! give exactly the error `ThreadComm` gives, or none when it gives none.

    use super::*;
    use crate::{Communicator, Result, ThreadComm, ThreadGroup};
    use proptest::prelude::*;

    /// One rank's call: the collective and its arguments.
    #[derive(Debug, Clone)]
    enum Call {
        AllReduce(usize),
        ReduceScatter(usize, Vec<usize>),
        AllGather(usize, Vec<usize>),
        Broadcast(usize, usize),
        Barrier,
        Stats(usize),
    }

    impl Call {
        fn header(&self, seq: u64, rank: usize) -> Header {
            match self {
                Call::AllReduce(n) => Header::plain(Op::AllReduceSum, seq, *n),
                Call::ReduceScatter(n, c) => {
                    Header::with_counts(Op::ReduceScatterSum, seq, *n, c, rank)
                }
                Call::AllGather(n, c) => Header::with_counts(Op::AllGather, seq, *n, c, rank),
                Call::Broadcast(n, root) => Header::broadcast(seq, *n, *root),
                Call::Barrier => Header::plain(Op::Barrier, seq, 0),
                Call::Stats(n) => Header::plain(Op::GatherStats, seq, *n),
            }
        }

        fn counts(&self) -> &[usize] {
            match self {
                Call::ReduceScatter(_, c) | Call::AllGather(_, c) => c,
                _ => &[],
            }
        }

        fn run(&self, c: &ThreadComm) -> Result<()> {
            match self {
                Call::AllReduce(n) => c.all_reduce_sum(&mut vec![1.0; *n]),
                Call::ReduceScatter(n, k) => c.reduce_scatter_sum(&vec![1.0; *n], k).map(drop),
                Call::AllGather(n, k) => c.all_gather(&vec![1.0; *n], k).map(drop),
                Call::Broadcast(n, root) => c.broadcast(&mut vec![1.0; *n], *root),
                Call::Barrier => c.barrier(),
                Call::Stats(n) => c.gather_stats(&vec![1; *n]).map(drop),
            }
        }
    }

    /// What an MPI/NCCL rank returns: the check, and for differing counts
    /// the error built from the fetched lists.
    fn verdict(world: usize, calls: &[Call]) -> Result<()> {
        let headers: Vec<Header> = calls
            .iter()
            .enumerate()
            .map(|(r, c)| Header::decode(&c.header(7, r).encode()).unwrap())
            .collect();
        match check(world, &headers) {
            Ok(()) => Ok(()),
            Err(Mismatch::Fail(e)) => Err(e),
            Err(Mismatch::Counts { op, rank }) => Err(counts_mismatch(
                op,
                rank,
                calls[0].counts(),
                calls[rank].counts(),
            )),
        }
    }

    /// What the in-process backend returns (the same on every rank).
    fn threads(calls: &[Call]) -> Result<()> {
        let out = ThreadGroup::run(calls.len(), Duration::from_secs(60), |c: ThreadComm| {
            calls[c.rank()].run(&c)
        })
        .unwrap();
        for o in &out[1..] {
            assert_eq!(o, &out[0]);
        }
        out[0].clone()
    }

    fn agree(calls: Vec<Call>) {
        let world = calls.len();
        let want = threads(&calls);
        // OpMismatch carries the thread backend's sequence number (0 here).
        let got = verdict(world, &calls).map_err(|e| match e {
            Error::OpMismatch {
                rank,
                expected,
                actual,
                ..
            } => Error::OpMismatch {
                seq: 0,
                rank,
                expected,
                actual,
            },
            e => e,
        });
        assert_eq!(got, want, "{calls:?}");
    }

    #[test]
    fn the_check_gives_the_in_process_errors() {
        use Call::*;
        agree(vec![AllReduce(3), AllReduce(4)]);
        agree(vec![AllReduce(3), AllReduce(3), AllReduce(3)]);
        agree(vec![ReduceScatter(6, vec![2, 2, 2]); 3]);
        agree(vec![
            ReduceScatter(6, vec![2, 2, 2]),
            ReduceScatter(6, vec![2, 2, 2]),
            ReduceScatter(5, vec![2, 2, 2]),
        ]);
        agree(vec![ReduceScatter(2, vec![2]); 2]);
        agree(vec![AllGather(1, vec![1, 1]), AllGather(0, vec![2, 0])]);
        agree(vec![AllGather(2, vec![1, 1]); 2]);
        agree(vec![AllGather(1, vec![1, 0]), AllGather(0, vec![1])]);
        agree(vec![Broadcast(2, 2); 2]);
        agree(vec![Broadcast(2, 0), Broadcast(2, 1)]);
        agree(vec![Broadcast(2, 1), Broadcast(3, 1)]);
        agree(vec![Stats(1), Stats(2)]);
        agree(vec![Barrier, AllReduce(0)]);
        agree(vec![Barrier; 4]);
    }

    fn call(world: usize) -> impl Strategy<Value = Call> {
        let counts = prop::collection::vec(0usize..3, world.saturating_sub(1)..=world + 1);
        prop_oneof![
            (0usize..4).prop_map(Call::AllReduce),
            (0usize..5, counts.clone()).prop_map(|(n, c)| Call::ReduceScatter(n, c)),
            (0usize..3, counts).prop_map(|(n, c)| Call::AllGather(n, c)),
            (0usize..3, 0usize..=world).prop_map(|(n, r)| Call::Broadcast(n, r)),
            Just(Call::Barrier),
            (0usize..3).prop_map(Call::Stats),
        ]
    }

    /// Mostly the same op on every rank, with arguments that often differ.
    fn calls() -> impl Strategy<Value = Vec<Call>> {
        (1usize..=4).prop_flat_map(|world| {
            (
                call(world),
                prop::collection::vec(call(world), world),
                any::<bool>(),
            )
                .prop_map(move |(first, mut rest, same_op)| {
                    if same_op {
                        let base = std::mem::discriminant(&first);
                        for c in &mut rest {
                            if std::mem::discriminant(c) != base {
                                *c = first.clone();
                            }
                        }
                    }
                    rest
                })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn the_check_agrees_with_the_in_process_backend(calls in calls()) {
            agree(calls);
        }
    }

    #[test]
    fn headers_round_trip_and_counts_hashes_differ() {
        let h = Header::with_counts(Op::ReduceScatterSum, 9, 5, &[2, 0, 3], 1);
        assert_eq!(Header::decode(&h.encode()), Some(h));
        assert_eq!(h.expected_len, 5);
        assert_eq!(Header::decode(&[0; HEADER_WORDS]), None);
        assert_eq!(Header::decode(&[1; HEADER_WORDS - 1]), None);
        let lists: [&[usize]; 6] = [&[], &[0], &[0, 0], &[1, 0], &[0, 1], &[2, 0, 3]];
        for (i, a) in lists.iter().enumerate() {
            for b in &lists[i + 1..] {
                assert_ne!(counts_hash(a), counts_hash(b), "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn parts_split_and_sum_in_rank_order() {
        assert_eq!(even_counts(10, 4), vec![3, 3, 2, 2]);
        assert_eq!(even_counts(2, 4), vec![1, 1, 0, 0]);
        assert_eq!(offsets(&[3, 0, 2]), vec![0, 3, 3]);
        // 1e8 + 1 - 1e8 in rank order is 0 in f32; another order gives 1.
        let parts = [1e8_f32, 1.0, 1.0, -1e8];
        assert_eq!(sum_parts_in_rank_order(&parts, 4), vec![0.0]);
        assert_eq!(
            sum_parts_in_rank_order(&[1.0, 2.0, 10.0, 20.0], 2),
            vec![11.0, 22.0]
        );
    }
}
