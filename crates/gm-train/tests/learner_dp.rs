//! The learner's data-parallel (ZeRO) mode (issue 8), with ranks as threads
//! of this process (gm-shard's [`ThreadGroup`]): one rank trains like a
//! single process; two ranks (ZeRO-1 and ZeRO-2) keep bit-identical
//! weights and each hold about half of the optimizer state; a checkpoint
//! of two ranks resumes bit-exactly on two, and runs on one (also as a
//! plain single process) and on three; the ranks agree on stopping and on
//! a batch one of them changed; a rank that leaves makes the others' step
//! fail instead of hang; bad setups are refused on every rank.
//!
//! Same small run as `tests/resume.rs` (tiny agent without dropout, 2
//! environments per rank, 24-bar episodes, global batch 8, updates from
//! step 8 on).

mod common;
use common::{config, data, var_bits, var_values};

use std::path::Path;
use std::time::Duration;

use gm_shard::{Communicator, ThreadComm, ThreadGroup, ZeroStage};
use gm_train::{
    ActorMode, DataParallel, Error, Learner, LearnerConfig, LearnerCounters, Precision, ZeroConfig,
};

/// A data-parallel learner is still `Send` (a trainer may own it on a
/// thread of its own).
const _: fn() = || {
    fn send<T: Send>() {}
    send::<Learner>();
};

/// Generous: the ranks share two cores with whatever else runs.
const TIMEOUT: Duration = Duration::from_secs(120);

/// Largest shard, in bytes of optimizer state: the tiny agent's 108 kB of
/// state (13 474 parameters) in shards of at most 4 kB, so two ranks hold
/// half each within a shard (with the default, 100 MB, one rank held it
/// all).
const SHARD_BYTES: u64 = 4_096;

fn dp(comm: ThreadComm, stage: ZeroStage) -> DataParallel {
    DataParallel {
        comm: Box::new(comm),
        zero: ZeroConfig {
            stage,
            max_shard_bytes: SHARD_BYTES,
            ..ZeroConfig::default()
        },
    }
}

/// Runs `f` on `world` ranks and returns the ranks' results.
fn group<R: Send>(
    world: usize,
    f: impl Fn(ThreadComm) -> anyhow::Result<R> + Sync,
) -> anyhow::Result<Vec<R>> {
    ThreadGroup::run(world, TIMEOUT, f)?.into_iter().collect()
}

/// What the tests compare between ranks and runs.
#[derive(Debug, Clone, PartialEq)]
struct State {
    counters: LearnerCounters,
    opt_step: u64,
    online: Vec<(String, Vec<u32>)>,
    target: Vec<(String, Vec<u32>)>,
}

fn state(l: &Learner) -> State {
    State {
        counters: l.counters(),
        opt_step: l.optimizer().step,
        online: var_bits(l.online_varmap()),
        target: var_bits(l.target_varmap()),
    }
}

/// The largest `|a − b| / max(1, |a|)` over all variables.
fn max_rel_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for ((n, x), (m, y)) in a.iter().zip(b) {
        assert_eq!(n, m);
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((p - q).abs() / p.abs().max(1.0));
        }
    }
    worst
}

#[test]
fn one_rank_trains_like_a_single_process() -> anyhow::Result<()> {
    const STEPS: u64 = 20;
    let mut plain = Learner::new(config(), data())?;
    let last = plain.train(STEPS)?.expect("steps ran");
    let out = group(1, |c| {
        let mut l = Learner::new_data_parallel(config(), data(), dp(c, ZeroStage::Stage2))?;
        assert_eq!((l.rank(), l.world()), (0, 1));
        let r = l.train(STEPS)?.expect("steps ran");
        Ok((
            r,
            l.counters(),
            l.optimizer().step,
            var_values(l.online_varmap()),
            var_values(l.target_varmap()),
        ))
    })?;
    let (r, counters, opt_step, online, target) = &out[0];
    assert_eq!(*counters, plain.counters());
    assert!(counters.updates > 0);
    assert_eq!(*opt_step, plain.optimizer().step);
    assert_eq!(r.buffer_len, last.buffer_len);
    let (a, b) = (r.update.expect("updated"), last.update.expect("updated"));
    assert_eq!(a.batch, b.batch);
    assert!(
        (a.loss - b.loss).abs() <= 1e-5 * b.loss.abs().max(1.0),
        "{a:?} vs {b:?}"
    );
    let d = max_rel_diff(online, &var_values(plain.online_varmap()));
    assert!(d <= 1e-5, "online weights differ by {d}");
    let d = max_rel_diff(target, &var_values(plain.target_varmap()));
    assert!(d <= 1e-5, "target weights differ by {d}");
    Ok(())
}

#[test]
fn two_ranks_keep_identical_weights_and_split_the_optimizer_state() -> anyhow::Result<()> {
    const STEPS: u64 = 30;
    for stage in [ZeroStage::Stage1, ZeroStage::Stage2] {
        let one = group(1, |c| {
            let mut l = Learner::new_data_parallel(config(), data(), dp(c, stage))?;
            l.train(12)?;
            Ok(l.optimizer_state_bytes())
        })?[0];
        let out = group(2, |c| {
            let mut l = Learner::new_data_parallel(config(), data(), dp(c, stage))?;
            let mut losses = Vec::new();
            for _ in 0..STEPS {
                if let Some(u) = l.step()?.update {
                    assert_eq!(u.batch, 4, "each rank samples half of the batch of 8");
                    losses.push(u.loss);
                }
            }
            let gathered = l.gather_rank_stats(&[l.rank() as u64, l.optimizer_state_bytes()])?;
            Ok((state(&l), losses, l.optimizer_state_bytes(), gathered))
        })?;
        let (s0, losses, bytes0, gathered) = &out[0];
        let (s1, _, bytes1, none) = &out[1];
        assert!(s0.counters.updates > 0, "{stage:?}: trained");
        assert_eq!(s0.opt_step, s0.counters.updates);
        assert!(losses.iter().all(|l| l.is_finite()));
        assert_eq!(
            s0.online, s1.online,
            "{stage:?}: online weights bit-identical"
        );
        assert_eq!(
            s0.target, s1.target,
            "{stage:?}: target weights bit-identical"
        );
        assert_eq!(s0.counters.step, s1.counters.step);
        assert_eq!(s0.counters.updates, s1.counters.updates);
        assert_eq!(
            bytes0 + bytes1,
            one,
            "{stage:?}: the shards add up to the whole"
        );
        for b in [bytes0, bytes1] {
            assert!(
                b.abs_diff(one / 2) <= SHARD_BYTES,
                "{stage:?}: {b} of {one} bytes on one rank: not within a shard of half"
            );
        }
        assert_eq!(
            gathered.as_deref(),
            Some(&[vec![0, *bytes0], vec![1, *bytes1]][..]),
            "rank 0 gathers every rank's record"
        );
        assert_eq!(*none, None);
    }
    Ok(())
}

#[test]
fn f16_ranks_share_the_loss_scaler_and_the_weights() -> anyhow::Result<()> {
    let out = group(2, |c| {
        let mut cfg = config();
        cfg.step.precision = Precision::F16;
        let mut l = Learner::new_data_parallel(cfg, data(), dp(c, ZeroStage::Stage2))?;
        l.train(14)?;
        Ok((state(&l), l.train_step().precision.scaler.clone()))
    })?;
    let ((s0, scaler0), (s1, scaler1)) = (&out[0], &out[1]);
    assert!(s0.counters.updates > 0);
    assert!(scaler0.is_some());
    assert_eq!(
        scaler0, scaler1,
        "every rank's loss scaler saw the same overflows"
    );
    assert_eq!(s0, s1, "f16: identical weights and counters");
    Ok(())
}

fn rank_manifest(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("manifest.json")).expect("manifest");
    serde_json::from_str(&text).expect("json")
}

#[test]
fn a_checkpoint_of_two_ranks_resumes_exactly_on_two_and_runs_on_one_or_three() -> anyhow::Result<()>
{
    const N: u64 = 12;
    const M: u64 = 12;
    let tmp = tempfile::tempdir()?;
    let ck = tmp.path().join("ck");
    let reference = group(2, |c| {
        let mut l = Learner::new_data_parallel(config(), data(), dp(c, ZeroStage::Stage2))?;
        l.train(N)?;
        assert!(l.save_checkpoint(&ck)? > 0);
        let saved = state(&l);
        l.train(M)?;
        Ok((saved, state(&l)))
    })?;
    let saved = reference[0].0.clone();
    assert!(saved.counters.updates > 0, "updates before the save");
    assert_eq!(saved.counters.step, N);

    // Layout: the main directory is a whole checkpoint of rank 0, rank 1
    // has its own replay and manifest.
    let main = rank_manifest(&ck);
    assert_eq!(main["body"]["world"], 2);
    assert_eq!(main["body"]["rank"], 0);
    let r1 = ck.join("rank-1");
    assert!(r1.join("replay.gmr").is_file());
    assert!(!r1.join("optimizer.safetensors").exists());
    assert_eq!(rank_manifest(&r1)["body"]["rank"], 1);

    // Two ranks: bit-identical to the uninterrupted run.
    let resumed = group(2, |c| {
        let mut l = Learner::resume_data_parallel(config(), data(), &ck, dp(c, ZeroStage::Stage2))?;
        let at = state(&l);
        l.train(M)?;
        Ok((at, state(&l)))
    })?;
    for (rank, ((at, end), (was, want))) in resumed.iter().zip(&reference).enumerate() {
        assert_eq!(at, was, "rank {rank}: resume restores the saved state");
        assert_eq!(end, want, "rank {rank}: resumed run == uninterrupted run");
    }
    assert_ne!(
        reference[0].1.online, saved.online,
        "the continuation trained"
    );

    // One rank, and a single process: the continuation runs from the
    // saved counters and optimizer step, and the two agree.
    let one = group(1, |c| {
        let mut l = Learner::resume_data_parallel(config(), data(), &ck, dp(c, ZeroStage::Stage1))?;
        assert_eq!(l.counters(), saved.counters);
        l.train(M)?;
        Ok((state(&l), var_values(l.online_varmap())))
    })?;
    let (end1, online1) = &one[0];
    assert_eq!(end1.counters.step, N + M);
    assert_eq!(end1.counters.updates, saved.counters.updates + M);
    assert_eq!(end1.opt_step, saved.opt_step + M);
    let mut single = Learner::resume(config(), data(), &ck)?;
    assert_eq!(single.counters(), saved.counters);
    assert_eq!(single.optimizer().step, saved.opt_step);
    assert_eq!(var_bits(single.online_varmap()), saved.online);
    single.train(M)?;
    assert_eq!(single.counters(), end1.counters);
    let d = max_rel_diff(online1, &var_values(single.online_varmap()));
    assert!(d <= 1e-5, "one rank vs a single process: {d}");

    // Three ranks: rank 2 has no saved state, starts a new buffer, and the
    // group updates again once it holds enough.
    let three = group(3, |c| {
        let mut l = Learner::resume_data_parallel(config(), data(), &ck, dp(c, ZeroStage::Stage2))?;
        assert_eq!(l.counters().step, saved.counters.step);
        assert_eq!(l.optimizer().step, saved.opt_step);
        l.train(M)?;
        Ok(state(&l))
    })?;
    for s in &three {
        assert_eq!(s.online, three[0].online, "three ranks: identical weights");
        assert_eq!(s.counters.step, N + M);
        assert!(s.counters.updates > saved.counters.updates, "updated again");
        assert_eq!(
            s.opt_step - saved.opt_step,
            s.counters.updates - saved.counters.updates
        );
    }
    Ok(())
}

#[test]
fn ranks_agree_on_stopping_and_on_a_batch_one_rank_changed() -> anyhow::Result<()> {
    /// The call before which rank 1 asks to stop / rank 0 shrinks the batch.
    const STOP_AT: u64 = 15;
    const SHRINK_AT: u64 = 11;
    let out = group(2, |c| {
        let rank = c.rank();
        let mut l = Learner::new_data_parallel(config(), data(), dp(c, ZeroStage::Stage1))?;
        assert!(matches!(l.set_batch_size(1), Err(Error::Config { .. })));
        let mut seen = Vec::new();
        for k in 0..40 {
            if rank == 1 && k == STOP_AT {
                l.request_stop();
            }
            if rank == 0 && k == SHRINK_AT {
                l.set_batch_size(6)?;
            }
            let r = l.step()?;
            seen.push((k, l.batch_size(), r.update.map(|u| u.batch)));
            if r.stop {
                return Ok((k, r.counters, seen));
            }
        }
        anyhow::bail!("rank {rank} never stopped")
    })?;
    // `train` ends at an agreed stop.
    let stopped = group(2, |c| {
        let rank = c.rank();
        let mut l = Learner::new_data_parallel(config(), data(), dp(c, ZeroStage::Stage2))?;
        l.train(3)?;
        if rank == 0 {
            l.request_stop();
        }
        let last = l.train(10)?.expect("steps ran");
        Ok((last.stop, last.counters.step))
    })?;
    assert_eq!(stopped, [(true, 4), (true, 4)]);

    let (k0, c0, seen0) = &out[0];
    let (k1, c1, seen1) = &out[1];
    assert_eq!((*k0, *k1), (STOP_AT, STOP_AT), "both stop at the same step");
    assert_eq!(c0.step, c1.step);
    assert_eq!(c0.updates, c1.updates);
    for seen in [seen0, seen1] {
        for &(k, batch, rows) in seen {
            let want = if k < SHRINK_AT { (8, 4) } else { (6, 3) };
            assert_eq!(batch, want.0, "step {k}: global batch");
            if let Some(rows) = rows {
                assert_eq!(rows, want.1, "step {k}: rows per rank");
            }
        }
        assert!(seen.iter().any(|s| s.0 >= SHRINK_AT && s.2.is_some()));
    }
    Ok(())
}

#[test]
fn a_rank_that_leaves_makes_the_others_fail_instead_of_hang() -> anyhow::Result<()> {
    let out = ThreadGroup::run(3, Duration::from_secs(20), |c| {
        let rank = c.rank();
        let mut l =
            Learner::new_data_parallel(config(), data(), dp(c, ZeroStage::Stage2)).expect("built");
        if rank == 1 {
            return None; // drops the learner and its communicator
        }
        (0..40).find_map(|_| l.step().err())
    })?;
    assert!(out[1].is_none());
    for e in [&out[0], &out[2]] {
        assert!(
            matches!(
                e,
                Some(Error::Shard(
                    gm_shard::Error::PeerLeft { .. }
                        | gm_shard::Error::Timeout { .. }
                        | gm_shard::Error::Aborted { .. }
                ))
            ),
            "{e:?}"
        );
    }
    Ok(())
}

/// A rank that cannot compute its gradients (here: out of memory even at
/// one row, injected) still joins the step's collectives: every rank
/// fails at that same step, at once — not after the 120 s timeout — and
/// the group stays usable (the next step on the healthy ranks is a
/// collective error too, not a hang).
#[test]
fn a_rank_whose_update_fails_fails_the_group_at_that_step_not_at_the_timeout() -> anyhow::Result<()>
{
    let start = std::time::Instant::now();
    let out = ThreadGroup::run(2, TIMEOUT, |c| {
        let rank = c.rank();
        let mut l =
            Learner::new_data_parallel(config(), data(), dp(c, ZeroStage::Stage2)).expect("built");
        if rank == 1 {
            l.train_step_mut().inject_oom_above_rows(Some(0));
        }
        let err = (0..40).find_map(|_| l.step().err());
        (err, l.counters())
    })?;
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "the healthy rank waited {:?}",
        start.elapsed()
    );
    let (e1, c1) = &out[1];
    assert!(
        e1.as_ref().is_some_and(|e| e.is_out_of_memory()),
        "rank 1 reports its own error: {e1:?}"
    );
    let (e0, c0) = &out[0];
    let e0 = e0.as_ref().expect("rank 0 fails too");
    assert!(
        e0.to_string().contains("ranks [1]"),
        "rank 0's error names rank 1: {e0}"
    );
    assert_eq!(c0.step, c1.step, "both failed at the same step");
    assert_eq!(c0.updates, 0, "nothing was updated");
    Ok(())
}

#[test]
fn bad_setups_are_refused_on_every_rank() -> anyhow::Result<()> {
    let threaded = LearnerConfig {
        actors: ActorMode::Threaded { threads: 1 },
        ..config()
    };
    let tiny_batch = LearnerConfig {
        batch_size: 1,
        ..config()
    };
    let gpu = LearnerConfig {
        device: gm_core::Device::Cuda { ordinal: 0 },
        ..config()
    };
    for (what, cfgs) in [
        ("threaded actors", [threaded.clone(), threaded]),
        ("a CUDA device", [gpu.clone(), gpu]),
        ("batch below the ranks", [tiny_batch.clone(), tiny_batch]),
        (
            "different configs",
            [
                config(),
                LearnerConfig {
                    seed: 6,
                    ..config()
                },
            ],
        ),
    ] {
        let out = ThreadGroup::run(2, TIMEOUT, |c| {
            let cfg = cfgs[c.rank()].clone();
            Learner::new_data_parallel(cfg, data(), dp(c, ZeroStage::Stage1)).err()
        })?;
        for e in out {
            assert!(matches!(e, Some(Error::Config { .. })), "{what}: {e:?}");
        }
    }
    // A checkpoint that is not there: every rank fails, none hangs.
    let out = ThreadGroup::run(2, TIMEOUT, |c| {
        Learner::resume_data_parallel(
            config(),
            data(),
            "/nonexistent/ck",
            dp(c, ZeroStage::Stage1),
        )
        .err()
    })?;
    assert!(out.iter().all(Option::is_some), "{out:?}");
    Ok(())
}
