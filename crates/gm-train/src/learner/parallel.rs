//! The learner's data-parallel (ZeRO) mode: [`DataParallel`], what a rank
//! passes to [`Learner::new_data_parallel`](super::Learner::new_data_parallel)
//! and [`Learner::resume_data_parallel`](super::Learner::resume_data_parallel),
//! and the small collectives that keep the ranks in lock-step (the
//! learner's module docs, "Data parallel", describe the protocol).
//!
//! Integers travel through the `f32` collectives in 24-bit pieces, which
//! `f32` holds exactly.

use gm_shard::codec::{f32s_to_u64, u64_to_f32s, U64_PIECES};
use gm_shard::{Communicator, Op};

use super::mix;
use crate::zero::ZeroConfig;
use crate::{Error, Result};

/// What a rank needs to train data-parallel: its end of the group's
/// collectives and the ZeRO configuration (the same on every rank).
pub struct DataParallel {
    /// This rank's communicator (its rank and the world size come from it).
    /// Its timeout bounds every wait of the learner's collectives, a
    /// checkpoint write by rank 0 included.
    pub comm: Box<dyn Communicator + Send>,
    /// The ZeRO stage, shard size, and optional top-k compression and rank
    /// budgets of the [`ZeroOptimizer`](crate::ZeroOptimizer).
    pub zero: ZeroConfig,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel")
            .field("rank", &self.comm.rank())
            .field("world", &self.comm.world())
            .field("zero", &self.zero)
            .finish()
    }
}

/// The seed of rank `rank`'s environments, exploration, replay sampling
/// and dropout: the run's seed itself on rank 0 (so a world of one is the
/// single-process run), a mix of it and the rank elsewhere.
pub(super) fn rank_seed(seed: u64, rank: usize) -> u64 {
    if rank == 0 {
        seed
    } else {
        mix(seed ^ 0x5241_4E4B, rank as u64)
    }
}

/// The seed of a rank that resumes without its own saved state: new
/// episodes and streams, different for every resume point.
pub(super) fn fresh_seed(rank_seed: u64, step: u64) -> u64 {
    mix(rank_seed ^ 0x4E45_5752, step)
}

/// Rows of a global batch of `batch` that rank `rank` of `world` samples
/// from its own replay: `batch / world`, one more on the first
/// `batch % world` ranks.
pub(super) fn rows(batch: usize, world: usize, rank: usize) -> usize {
    batch / world + usize::from(rank < batch % world)
}

/// What the ranks agreed on for one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Agreement {
    /// Every rank's replay holds `learning_starts_transitions`: update.
    pub update: bool,
    /// Some rank asked to stop: this is the group's last step.
    pub stop: bool,
    /// The global batch: the smallest any rank proposed.
    pub batch: usize,
}

/// The per-step agreement (one `all_gather` of 8 floats per rank): every
/// rank sends its step counter, whether its replay is ready, whether it
/// asked to stop, and the batch it proposes. Ranks at different steps are
/// a program-order bug: an [`gm_shard::Error::ArgumentMismatch`] on every
/// rank.
pub(super) fn agree(
    comm: &dyn Communicator,
    step: u64,
    ready: bool,
    stop: bool,
    batch: usize,
) -> Result<Agreement> {
    const P: usize = U64_PIECES;
    const K: usize = 2 * P + 2;
    let mut local = [0f32; K];
    local[..P].copy_from_slice(&u64_to_f32s(step));
    local[P] = f32::from(u8::from(ready));
    local[P + 1] = f32::from(u8::from(stop));
    local[P + 2..].copy_from_slice(&u64_to_f32s(batch as u64));
    let all = comm.all_gather(&local, &vec![K; comm.world()])?;
    let mut a = Agreement {
        update: true,
        stop: false,
        batch: usize::MAX,
    };
    let step0 = f32s_to_u64(&all);
    for (rank, r) in all.chunks(K).enumerate() {
        let s = f32s_to_u64(r);
        if s != step0 {
            return Err(gm_shard::Error::ArgumentMismatch {
                op: Op::AllGather,
                rank,
                what: "learner step",
                expected: step0.to_string(),
                actual: s.to_string(),
            }
            .into());
        }
        a.update &= r[P] != 0.0;
        a.stop |= r[P + 1] != 0.0;
        a.batch = a.batch.min(f32s_to_u64(&r[P + 2..]) as usize);
    }
    Ok(a)
}

/// The collective check before a data-parallel learner is built: every
/// rank reports whether its own preparation succeeded (`ok`), the CRC of
/// its configuration and the step it starts at. Returns `Ok(())` when all
/// succeeded and agree; otherwise every rank returns an error (a rank that
/// failed returns its own: `mine`).
pub(super) fn check_group(
    comm: &dyn Communicator,
    mine: Result<()>,
    config_crc32: u32,
    step: u64,
) -> Result<()> {
    const P: usize = U64_PIECES;
    const K: usize = 1 + 2 * P;
    let (crc, start) = (1..1 + P, 1 + P..K);
    let mut local = [0f32; K];
    local[0] = f32::from(u8::from(mine.is_ok()));
    local[crc.clone()].copy_from_slice(&u64_to_f32s(u64::from(config_crc32)));
    local[start.clone()].copy_from_slice(&u64_to_f32s(step));
    let all = comm.all_gather(&local, &vec![K; comm.world()])?;
    mine?;
    let r0 = &all[..K];
    for (rank, r) in all.chunks(K).enumerate() {
        if r[0] == 0.0 {
            return Err(Error::Stopped(format!(
                "data-parallel rank {rank} could not build its learner (its error is on that rank)"
            )));
        }
        if r[crc.clone()] != r0[crc.clone()] {
            return Err(Error::config(
                "data-parallel config",
                format!("CRC-32 {:08x} on rank {rank}", f32s_to_u64(&r[crc.clone()])),
                format!(
                    "the same config on every rank (rank 0: {:08x})",
                    f32s_to_u64(&r0[crc.clone()])
                ),
            ));
        }
        if r[start.clone()] != r0[start.clone()] {
            return Err(Error::config(
                "data-parallel start step",
                format!("{} on rank {rank}", f32s_to_u64(&r[start.clone()])),
                format!(
                    "the same checkpoint on every rank (rank 0 at step {})",
                    f32s_to_u64(&r0[start.clone()])
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gm_shard::ThreadGroup;
    use std::time::Duration;

    #[test]
    fn rows_cover_the_batch_and_integers_round_trip() {
        for (b, n) in [(8, 1), (8, 2), (8, 3), (7, 7), (100, 6)] {
            let r: Vec<usize> = (0..n).map(|r| rows(b, n, r)).collect();
            assert_eq!(r.iter().sum::<usize>(), b);
            assert!(r.iter().max().unwrap() - r.iter().min().unwrap() <= 1);
        }
        assert_eq!(rank_seed(7, 0), 7);
        assert_ne!(rank_seed(7, 1), rank_seed(7, 2));
        assert_ne!(fresh_seed(7, 10), fresh_seed(7, 11));
    }

    #[test]
    fn ranks_agree_on_ready_stop_and_the_smallest_batch() {
        let out = ThreadGroup::run(3, Duration::from_secs(10), |c| {
            let r = c.rank();
            let a = agree(&c, 4, r != 1, r == 2, 64 - r)?;
            let b = agree(&c, 5, true, false, 16_777_217)?;
            let bad = agree(&c, 6 + u64::from(r == 1), true, false, 8);
            Ok::<_, Error>((a, b, bad.is_err()))
        })
        .unwrap();
        for o in out {
            let (a, b, bad) = o.unwrap();
            assert_eq!(
                a,
                Agreement {
                    update: false,
                    stop: true,
                    batch: 62
                }
            );
            assert_eq!(
                b,
                Agreement {
                    update: true,
                    stop: false,
                    batch: 16_777_217
                }
            );
            assert!(bad, "ranks at different steps are an error");
        }
    }

    #[test]
    fn the_group_check_fails_on_every_rank_when_one_rank_fails_or_differs() {
        let out = ThreadGroup::run(2, Duration::from_secs(10), |c| {
            let r = c.rank();
            let failed = check_group(
                &c,
                if r == 1 {
                    Err(Error::Stopped("x".into()))
                } else {
                    Ok(())
                },
                1,
                0,
            );
            let crc = check_group(&c, Ok(()), 1 + r as u32, 0);
            let step = check_group(&c, Ok(()), 1, r as u64);
            let fine = check_group(&c, Ok(()), 0xDEAD_BEEF, 1 << 30);
            (failed.is_err(), crc.is_err(), step.is_err(), fine.is_ok())
        })
        .unwrap();
        assert!(
            out.iter().all(|&o| o == (true, true, true, true)),
            "{out:?}"
        );
    }
}
