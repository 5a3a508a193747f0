//! Learner checkpoints (issue 6): a synchronous run saved after `N` steps
//! and resumed in a new [`Learner`] for `M` more ends bit-for-bit where an
//! uninterrupted `N + M` run ends (weights of both networks, AdamW moments
//! and step, counters, RNG and actor state, the replay buffer and its
//! priorities); a truncated, bit-flipped or incomplete checkpoint is an
//! [`Error::Checkpoint`]; a config or data that does not match is refused
//! with a message that says so; threaded mode updates, stops and joins, and
//! its resume restores the counters and weights.
//!
//! The run is deliberately small (tiny agent, 2 environments, 24-bar
//! episodes, batch 8), and the save point is chosen in the middle of an
//! episode round and of an n-step segment, so the resume has to rebuild the
//! environments and the n-step tracks, not just reload tensors.

mod common;
use common::{config, data, tensor_bits, var_bits};

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use gm_market::{GeneratorConfig, MarketData, PipelineConfig};
use gm_train::{ActorMode, Error, Learner, LearnerCounters};

/// Steps before the save (episode round 1, 6 steps in; 22 env steps past
/// the last 8-step segment boundary of round 1).
const N: u64 = 30;
/// Steps after it (crosses the end of round 1 at step 48).
const M: u64 = 20;

fn moment_bits(m: &[Option<Tensor>]) -> Vec<Option<Vec<u32>>> {
    m.iter().map(|t| t.as_ref().map(tensor_bits)).collect()
}

/// Everything a learner's future depends on that the API shows.
#[derive(Debug)]
struct State {
    counters: LearnerCounters,
    online: Vec<(String, Vec<u32>)>,
    target: Vec<(String, Vec<u32>)>,
    opt_step: u64,
    m: Vec<Option<Vec<u32>>>,
    v: Vec<Option<Vec<u32>>>,
    buffer_len: usize,
    priorities: Vec<u64>,
    beta: u64,
}

fn state(l: &Learner) -> State {
    let replay = l.replay().read();
    let cap = l.config().replay.capacity;
    State {
        counters: l.counters(),
        online: var_bits(l.online_varmap()),
        target: var_bits(l.target_varmap()),
        opt_step: l.optimizer().step,
        m: moment_bits(&l.optimizer().m),
        v: moment_bits(&l.optimizer().v),
        buffer_len: replay.len(),
        priorities: (0..cap).map(|i| replay.priority(i).to_bits()).collect(),
        beta: replay.beta().to_bits(),
    }
}

/// The first difference between two states, by field (and variable),
/// without dumping megabytes of bits.
fn difference(a: &State, b: &State) -> Option<String> {
    if a.counters != b.counters {
        return Some(format!("counters {:?} vs {:?}", a.counters, b.counters));
    }
    for (what, x, y) in [
        ("online", &a.online, &b.online),
        ("target", &a.target, &b.target),
    ] {
        if x.len() != y.len() {
            return Some(format!("{what}: {} vs {} variables", x.len(), y.len()));
        }
        for ((n, p), (m, q)) in x.iter().zip(y) {
            if n != m || p != q {
                return Some(format!("{what} variable {n} / {m}"));
            }
        }
    }
    if a.opt_step != b.opt_step {
        return Some(format!("AdamW step {} vs {}", a.opt_step, b.opt_step));
    }
    for (what, x, y) in [("m", &a.m, &b.m), ("v", &a.v, &b.v)] {
        if let Some(i) = (0..x.len().max(y.len())).find(|&i| x.get(i) != y.get(i)) {
            return Some(format!("AdamW {what} of variable #{i}"));
        }
    }
    if a.buffer_len != b.buffer_len {
        return Some(format!(
            "buffer length {} vs {}",
            a.buffer_len, b.buffer_len
        ));
    }
    if let Some(i) = (0..a.priorities.len()).find(|&i| a.priorities.get(i) != b.priorities.get(i)) {
        return Some(format!("priority of slot {i}"));
    }
    if a.beta != b.beta {
        return Some("beta".into());
    }
    None
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn a_resumed_synchronous_run_is_bit_identical_to_an_uninterrupted_one() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut straight = Learner::new(config(), data())?;
    straight.train(N + M)?;

    let mut first = Learner::new(config(), data())?;
    first.train(N)?;
    let at_save = state(&first);
    let ck = tmp.path().join("ck");
    let bytes = first.save_checkpoint(&ck)?;
    assert!(bytes > 0);
    drop(first);

    let mut resumed = Learner::resume(config(), data(), &ck)?;
    assert_eq!(
        difference(&state(&resumed), &at_save),
        None,
        "resume restores the saved state"
    );
    resumed.train(M)?;
    let end = state(&resumed);

    // The continuation did real work: updates happened after the resume,
    // moved the weights and the moments, and crossed a target copy.
    assert_eq!(end.counters.step, N + M);
    assert!(at_save.counters.updates > 0, "updates before the save");
    assert_eq!(end.counters.updates, at_save.counters.updates + M);
    assert!(end.counters.episodes > at_save.counters.episodes);
    assert!(end.online != at_save.online, "online weights moved");
    assert!(end.target != at_save.target, "target network was updated");
    assert!(end.m != at_save.m, "AdamW moments moved");

    assert_eq!(
        difference(&end, &state(&straight)),
        None,
        "resumed run == uninterrupted run"
    );

    // The same holds for what a checkpoint of each writes, byte for byte
    // (manifest: counters, AdamW step, RNG and actor state; every file).
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    resumed.save_checkpoint(&a)?;
    straight.save_checkpoint(&b)?;
    for f in [
        "manifest.json",
        "online.safetensors",
        "target.safetensors",
        "optimizer.safetensors",
        "replay.gmr",
    ] {
        assert!(read(&a.join(f)) == read(&b.join(f)), "{f} differs");
    }

    // And they keep agreeing: one more step each, same report.
    assert_eq!(resumed.step()?, straight.step()?);
    Ok(())
}

/// An out-of-memory retry that shrank the micro-batch (injected: batches of
/// 8 rows "fit" only 2 at a time) is part of the saved state: the resumed
/// run steps with the shrunk micro-batch and stays bit-identical.
#[test]
fn a_micro_batch_shrunk_by_out_of_memory_survives_a_resume() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let oom = |l: &mut Learner| l.train_step_mut().inject_oom_above_rows(Some(2));
    let mut straight = Learner::new(config(), data())?;
    oom(&mut straight);
    straight.train(N + M)?;
    assert_eq!(straight.train_step().cfg.micro_batch, Some(2));
    assert!(straight.train_step().oom_retries >= 2);

    let mut first = Learner::new(config(), data())?;
    oom(&mut first);
    first.train(N)?;
    let ck = tmp.path().join("ck");
    first.save_checkpoint(&ck)?;
    drop(first);
    // No injection after the resume: the saved micro-batch alone must
    // reproduce the uninterrupted run's summation order.
    let mut resumed = Learner::resume(config(), data(), &ck)?;
    assert_eq!(resumed.train_step().cfg.micro_batch, Some(2));
    resumed.train(M)?;
    assert_eq!(
        difference(&state(&resumed), &state(&straight)),
        None,
        "resumed run == uninterrupted run"
    );
    Ok(())
}

#[test]
fn saving_over_a_checkpoint_replaces_it_and_leaves_no_temporary_files() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let ck = tmp.path().join("ck");
    let mut l = Learner::new(config(), data())?;
    l.train(20)?;
    l.save_checkpoint(&ck)?;
    l.train(3)?;
    l.save_checkpoint(&ck)?;
    let names: Vec<String> = std::fs::read_dir(tmp.path())?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    assert_eq!(names, ["ck"], "only the checkpoint is left");
    let r = Learner::resume(config(), data(), &ck)?;
    assert_eq!(r.counters(), l.counters(), "the newer checkpoint won");
    Ok(())
}

/// A fresh copy of checkpoint `src` at `dst`.
fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn expect_checkpoint_error(r: gm_train::Result<Learner>, what: &str) -> String {
    match r {
        Err(Error::Checkpoint { reason, .. }) => reason,
        Err(e) => panic!("{what}: expected Error::Checkpoint, got {e}"),
        Ok(_) => panic!("{what}: a damaged checkpoint was accepted"),
    }
}

#[test]
fn damaged_checkpoints_are_refused_with_a_checkpoint_error() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let good = tmp.path().join("good");
    let mut l = Learner::new(config(), data())?;
    l.train(N)?;
    l.save_checkpoint(&good)?;
    drop(l);
    // The intact copy loads (so the failures below are the damage's doing).
    Learner::resume(config(), data(), &good)?;

    let files = [
        "online.safetensors",
        "target.safetensors",
        "optimizer.safetensors",
        "replay.gmr",
        "manifest.json",
    ];
    for (i, f) in files.iter().enumerate() {
        // Truncated by one byte.
        let d = tmp.path().join(format!("trunc{i}"));
        copy_dir(&good, &d);
        let bytes = read(&d.join(f));
        std::fs::write(d.join(f), &bytes[..bytes.len() - 1])?;
        expect_checkpoint_error(
            Learner::resume(config(), data(), &d),
            &format!("{f} truncated"),
        );

        // One bit flipped in the middle.
        let d = tmp.path().join(format!("flip{i}"));
        copy_dir(&good, &d);
        let mut bytes = read(&d.join(f));
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x04;
        std::fs::write(d.join(f), &bytes)?;
        expect_checkpoint_error(
            Learner::resume(config(), data(), &d),
            &format!("{f} bit flip"),
        );

        // Missing.
        let d = tmp.path().join(format!("missing{i}"));
        copy_dir(&good, &d);
        std::fs::remove_file(d.join(f))?;
        expect_checkpoint_error(
            Learner::resume(config(), data(), &d),
            &format!("{f} missing"),
        );
    }
    expect_checkpoint_error(
        Learner::resume(config(), data(), tmp.path().join("nowhere")),
        "no directory",
    );
    Ok(())
}

#[test]
fn a_checkpoint_is_refused_for_another_config_or_data() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let ck = tmp.path().join("ck");
    let mut l = Learner::new(config(), data())?;
    l.train(N)?;
    l.save_checkpoint(&ck)?;
    drop(l);

    let mut seed = config();
    seed.seed += 1;
    let mut n_step = config();
    n_step.n_step = 2;
    let mut gamma = config();
    gamma.gamma = 0.5;
    let mut scale = config();
    scale.reward_scale = 1.0;
    let mut envs = config();
    envs.num_envs = 3;
    let mut agent = config();
    agent.agent.heads.hidden_dim += 1;
    let mut threaded = config();
    threaded.actors = ActorMode::Threaded { threads: 1 };
    for (what, cfg) in [
        ("seed", seed),
        ("n_step", n_step),
        ("gamma", gamma),
        ("reward_scale", scale),
        ("num_envs", envs),
        ("agent", agent),
        ("mode", threaded),
    ] {
        let reason = expect_checkpoint_error(Learner::resume(cfg, data(), &ck), what);
        assert!(
            reason.contains("different config or data"),
            "{what}: unclear reason {reason:?}"
        );
    }

    let other = Arc::new(MarketData::synthetic(
        GeneratorConfig {
            seed: 12,
            ..GeneratorConfig::default()
        },
        2_000,
        PipelineConfig::default(),
    )?);
    let reason = expect_checkpoint_error(Learner::resume(config(), other, &ck), "data");
    assert!(reason.contains("different config or data"), "{reason:?}");

    // An invalid config is a config error before the checkpoint is read.
    let mut bad = config();
    bad.gamma = 1.5;
    assert!(matches!(
        Learner::resume(bad, data(), &ck),
        Err(Error::Config { key: "gamma", .. })
    ));
    Ok(())
}

#[test]
fn threaded_mode_updates_stops_and_resumes_its_counters_and_weights() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let ck = tmp.path().join("ck");
    let mut cfg = config();
    cfg.actors = ActorMode::Threaded { threads: 2 };
    cfg.actor_sync_every_updates = 2;

    let mut l = Learner::new(cfg.clone(), data())?;
    let initial = var_bits(l.online_varmap());
    let last = l.train(6)?.expect("six steps");
    let c = l.counters();
    assert_eq!(c.step, 6);
    assert_eq!(c.updates, 6, "every threaded step is one update");
    assert!(last.update.is_some());
    assert!(
        c.transitions >= cfg.learning_starts_transitions as u64,
        "the actors filled the buffer before the first update"
    );
    assert!(l.replay().len() >= cfg.learning_starts_transitions);
    assert!(
        var_bits(l.online_varmap()) != initial,
        "the updates moved the weights"
    );
    l.save_checkpoint(&ck)?;
    let saved = (var_bits(l.online_varmap()), var_bits(l.target_varmap()));
    let opt_step = l.optimizer().step;
    // Dropping stops the actors and the prefetcher and joins them: this
    // returns (a hang here is the failure).
    drop(l);

    let mut r = Learner::resume(cfg, data(), &ck)?;
    let rc = r.counters();
    assert_eq!(rc.step, c.step);
    assert_eq!(rc.updates, c.updates);
    assert_eq!(rc.episodes, c.episodes);
    assert!(rc.transitions >= c.transitions);
    assert!(
        (var_bits(r.online_varmap()), var_bits(r.target_varmap())) == saved,
        "resume restores both networks"
    );
    assert_eq!(r.optimizer().step, opt_step);
    r.train(3)?;
    assert_eq!(r.counters().updates, c.updates + 3);
    assert_eq!(r.optimizer().step, opt_step + 3);
    drop(r);
    Ok(())
}
