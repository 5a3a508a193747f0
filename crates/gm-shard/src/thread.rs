//! The in-process backend: [`ThreadGroup`] makes one [`ThreadComm`] per
//! rank for ranks that are threads of one process. For unit tests and
//! single-machine runs; shared state behind a mutex and a condition
//! variable, every wait bounded by the group's timeout.

use crate::comm::{validate_timeout, Communicator, Op};
use crate::error::{Error, Result};
use crate::plan::MAX_RANKS;
use parking_lot::{Condvar, Mutex};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A group of `world` in-process ranks. Build it, take the communicators
/// with [`ThreadGroup::into_comms`] and move one to each thread, or let
/// [`ThreadGroup::run`] do both.
#[derive(Debug)]
pub struct ThreadGroup {
    comms: Vec<ThreadComm>,
}

impl ThreadGroup {
    /// A group of `world` ranks (1 ..= [`MAX_RANKS`]) whose collectives
    /// fail with [`Error::Timeout`] after waiting `timeout`
    /// (1 ms ..= 7 days) for peers.
    pub fn new(world: usize, timeout: Duration) -> Result<Self> {
        if world == 0 || world > MAX_RANKS {
            return Err(Error::config("world", world, format!("1 ..= {MAX_RANKS}")));
        }
        validate_timeout(timeout)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rounds: HashMap::new(),
                left: vec![false; world],
                broken: None,
            }),
            cv: Condvar::new(),
        });
        let comms = (0..world)
            .map(|rank| ThreadComm {
                shared: Arc::clone(&shared),
                rank,
                world,
                timeout,
                seq: Cell::new(0),
            })
            .collect();
        Ok(Self { comms })
    }

    /// The communicators, index = rank.
    pub fn into_comms(self) -> Vec<ThreadComm> {
        self.comms
    }

    /// Runs `f` on `world` scoped threads (named `gm-shard-rank{r}`), one
    /// communicator each, and returns their results by rank once all have
    /// finished. A panic in `f` is resumed here after every thread has
    /// ended (its peers see [`Error::PeerLeft`] rather than hang).
    pub fn run<R, F>(world: usize, timeout: Duration, f: F) -> Result<Vec<R>>
    where
        R: Send,
        F: Fn(ThreadComm) -> R + Sync,
    {
        let comms = Self::new(world, timeout)?.into_comms();
        let f = &f;
        std::thread::scope(|s| {
            let mut handles = Vec::with_capacity(world);
            let mut spawn_err = None;
            for comm in comms {
                let rank = comm.rank;
                let spawned = std::thread::Builder::new()
                    .name(format!("gm-shard-rank{rank}"))
                    .spawn_scoped(s, move || f(comm));
                match spawned {
                    Ok(h) => handles.push(h),
                    Err(e) => {
                        // The closure (and its communicator) was dropped,
                        // so the started ranks fail with PeerLeft.
                        spawn_err.get_or_insert(Error::Spawn {
                            rank,
                            reason: e.to_string(),
                        });
                    }
                }
            }
            let results: Vec<R> = handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect();
            match spawn_err {
                Some(e) => Err(e),
                None => Ok(results),
            }
        })
    }
}

/// One rank of a [`ThreadGroup`]. `Send`, not `Sync`: it belongs to one
/// thread. Dropping it tells the peers this rank has left.
#[derive(Debug)]
pub struct ThreadComm {
    shared: Arc<Shared>,
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Sequence number of this rank's next collective.
    seq: Cell<u64>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

#[derive(Debug)]
struct State {
    /// Collectives in flight by sequence number (at most two: the slowest
    /// rank's and the next).
    rounds: HashMap<u64, Round>,
    /// Ranks whose communicator was dropped.
    left: Vec<bool>,
    /// Why the group is broken, once it is.
    broken: Option<String>,
}

#[derive(Debug)]
struct Round {
    contrib: Vec<Option<Contribution>>,
    arrived: usize,
    outcome: Option<Result<Arc<Payload>>>,
    /// Ranks that have not yet taken the outcome.
    readers: usize,
}

#[derive(Debug)]
struct Contribution {
    op: Op,
    /// Length of the rank's buffer (`input`, `local`, `buf`, `values`).
    len: usize,
    counts: Vec<usize>,
    root: usize,
    data: Vec<f32>,
    stats: Vec<u64>,
}

impl Contribution {
    fn new(op: Op, len: usize) -> Self {
        Self {
            op,
            len,
            counts: Vec::new(),
            root: 0,
            data: Vec::new(),
            stats: Vec::new(),
        }
    }
}

#[derive(Debug)]
enum Payload {
    None,
    F32(Vec<f32>),
    Stats(Vec<Vec<u64>>),
}

impl Payload {
    fn f32(&self) -> &[f32] {
        match self {
            Payload::F32(v) => v,
            _ => &[],
        }
    }
}

/// Element-wise sum in rank order, so the result does not depend on which
/// rank computes it or when.
fn sum_in_rank_order(cs: &mut [Contribution]) -> Vec<f32> {
    let mut acc = std::mem::take(&mut cs[0].data);
    for c in &cs[1..] {
        for (a, x) in acc.iter_mut().zip(&c.data) {
            *a += x;
        }
    }
    acc
}

/// Checks the round's arguments across ranks and computes its result.
fn complete(seq: u64, world: usize, mut cs: Vec<Contribution>) -> Result<Payload> {
    let op = cs[0].op;
    for (rank, c) in cs.iter().enumerate() {
        if c.op != op {
            return Err(Error::OpMismatch {
                seq,
                rank,
                expected: op,
                actual: c.op,
            });
        }
    }
    let (len0, root0) = (cs[0].len, cs[0].root);
    let same_len = |what| {
        for (rank, c) in cs.iter().enumerate() {
            if c.len != len0 {
                return Err(Error::LengthMismatch {
                    op,
                    rank,
                    what,
                    expected: len0,
                    actual: c.len,
                });
            }
        }
        Ok(())
    };
    match op {
        Op::AllReduceSum => {
            same_len("buffer length")?;
            Ok(Payload::F32(sum_in_rank_order(&mut cs)))
        }
        Op::ReduceScatterSum | Op::AllGather => {
            for (rank, c) in cs.iter().enumerate() {
                if c.counts.len() != world {
                    return Err(Error::LengthMismatch {
                        op,
                        rank,
                        what: "counts entries",
                        expected: world,
                        actual: c.counts.len(),
                    });
                }
                if c.counts != cs[0].counts {
                    return Err(Error::ArgumentMismatch {
                        op,
                        rank,
                        what: "counts",
                        expected: format!("{:?}", cs[0].counts),
                        actual: format!("{:?}", c.counts),
                    });
                }
                let (what, expected) = if op == Op::AllGather {
                    ("local length (counts[rank])", c.counts[rank])
                } else {
                    (
                        "input length (sum of counts)",
                        c.counts.iter().fold(0usize, |a, &b| a.saturating_add(b)),
                    )
                };
                if c.len != expected {
                    return Err(Error::LengthMismatch {
                        op,
                        rank,
                        what,
                        expected,
                        actual: c.len,
                    });
                }
            }
            if op == Op::AllGather {
                Ok(Payload::F32(cs.into_iter().flat_map(|c| c.data).collect()))
            } else {
                Ok(Payload::F32(sum_in_rank_order(&mut cs)))
            }
        }
        Op::Broadcast => {
            for (rank, c) in cs.iter().enumerate() {
                if c.root >= world {
                    return Err(Error::InvalidRoot {
                        op,
                        root: c.root,
                        world,
                    });
                }
                if c.root != root0 {
                    return Err(Error::ArgumentMismatch {
                        op,
                        rank,
                        what: "root",
                        expected: root0.to_string(),
                        actual: c.root.to_string(),
                    });
                }
            }
            same_len("buffer length")?;
            Ok(Payload::F32(std::mem::take(&mut cs[root0].data)))
        }
        Op::Barrier => Ok(Payload::None),
        Op::GatherStats => {
            same_len("values length")?;
            Ok(Payload::Stats(cs.into_iter().map(|c| c.stats).collect()))
        }
    }
}

impl ThreadComm {
    /// Contributes to this rank's next collective and waits (at most the
    /// timeout) for its outcome.
    fn collective(&self, c: Contribution) -> Result<Arc<Payload>> {
        let op = c.op;
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        let deadline = Instant::now() + self.timeout;
        let shared = &*self.shared;
        let mut st = shared.state.lock();
        if let Some(cause) = &st.broken {
            return Err(Error::Aborted {
                op,
                rank: self.rank,
                cause: cause.clone(),
            });
        }
        let world = self.world;
        let round = st.rounds.entry(seq).or_insert_with(|| Round {
            contrib: (0..world).map(|_| None).collect(),
            arrived: 0,
            outcome: None,
            readers: world,
        });
        round.contrib[self.rank] = Some(c);
        round.arrived += 1;
        if round.arrived == world {
            let cs = round.contrib.drain(..).flatten().collect();
            round.outcome = Some(complete(seq, world, cs).map(Arc::new));
            shared.cv.notify_all();
        }
        loop {
            let st_ref = &mut *st;
            let round = st_ref.rounds.get_mut(&seq).expect("round lives until read");
            if let Some(outcome) = &round.outcome {
                let outcome = outcome.clone();
                round.readers -= 1;
                if round.readers == 0 {
                    st_ref.rounds.remove(&seq);
                }
                return outcome;
            }
            if let Some(cause) = &st_ref.broken {
                return Err(Error::Aborted {
                    op,
                    rank: self.rank,
                    cause: cause.clone(),
                });
            }
            let missing: Vec<usize> = (0..world).filter(|&r| round.contrib[r].is_none()).collect();
            let error = if let Some(&peer) = missing.iter().find(|&&r| st_ref.left[r]) {
                Some(Error::PeerLeft {
                    op,
                    seq,
                    rank: self.rank,
                    peer,
                })
            } else if Instant::now() >= deadline {
                Some(Error::Timeout {
                    op,
                    seq,
                    rank: self.rank,
                    timeout: self.timeout,
                    missing,
                })
            } else {
                None
            };
            if let Some(e) = error {
                st_ref.broken = Some(e.to_string());
                shared.cv.notify_all();
                return Err(e);
            }
            shared.cv.wait_until(&mut st, deadline);
        }
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        self.shared.state.lock().left[self.rank] = true;
        self.shared.cv.notify_all();
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let mut c = Contribution::new(Op::AllReduceSum, buf.len());
        c.data = buf.to_vec();
        let out = self.collective(c)?;
        buf.copy_from_slice(out.f32());
        Ok(())
    }

    fn reduce_scatter_sum(&self, input: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        let mut c = Contribution::new(Op::ReduceScatterSum, input.len());
        c.data = input.to_vec();
        c.counts = counts.to_vec();
        let out = self.collective(c)?;
        let start: usize = counts[..self.rank].iter().sum();
        Ok(out.f32()[start..start + counts[self.rank]].to_vec())
    }

    fn all_gather(&self, local: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        let mut c = Contribution::new(Op::AllGather, local.len());
        c.data = local.to_vec();
        c.counts = counts.to_vec();
        Ok(self.collective(c)?.f32().to_vec())
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let mut c = Contribution::new(Op::Broadcast, buf.len());
        c.root = root;
        if root == self.rank {
            c.data = buf.to_vec();
        }
        let out = self.collective(c)?;
        buf.copy_from_slice(out.f32());
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.collective(Contribution::new(Op::Barrier, 0))
            .map(|_| ())
    }

    fn gather_stats(&self, values: &[u64]) -> Result<Option<Vec<Vec<u64>>>> {
        let mut c = Contribution::new(Op::GatherStats, values.len());
        c.stats = values.to_vec();
        let out = self.collective(c)?;
        match (&*out, self.rank) {
            (Payload::Stats(all), 0) => Ok(Some(all.clone())),
            _ => Ok(None),
        }
    }
}
