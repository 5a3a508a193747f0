//! `grandmodel train`'s data-parallel mode without MPI: two ranks as
//! threads of this process (gm-shard's `ThreadGroup`) run
//! `train::run_parallel` in lock-step. Rank 0 alone writes the outputs,
//! with every rank's figures; the optimizer state is split between the
//! ranks; the weights are bit-identical on both; a stop request on one
//! rank stops both at the same step with a checkpoint; that checkpoint
//! resumes in a single process and again on two ranks.
//!
//! (The same run over real MPI processes is `tests/tests/train_mpi.rs` in
//! the workspace's e2e package.)

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use gm_shard::ThreadGroup;
use gm_system::config::{self, Layers};
use gm_system::train::{self, NoProgress, RankFailure, TrainOptions, TrainSummary};
use gm_system::Resolved;
use serde_json::Value;

#[global_allocator]
static ALLOC: gm_leak::TrackingAllocator = gm_leak::TrackingAllocator::system();

/// A tiny run (as the e2e tests'), `steps` steps into `out` on `ranks`.
fn resolved(out: &Path, steps: u64, ranks: usize, extra: &[(&str, &str)]) -> Resolved {
    let mut sets = vec![
        ("run.synthetic_bars", "4000".to_string()),
        ("run.eval_episodes", "3".into()),
        ("run.log_every_steps", "10".into()),
        ("run.learning_starts_transitions", "160".into()),
        ("training.target_effective_batch", "16".into()),
        ("training.batch_auto_scale", "false".into()),
        ("training.mixed_precision", "false".into()),
        ("training.gradient_checkpointing", "false".into()),
        ("memory.monitor_interval_secs", "0.2".into()),
        ("memory.leak_check_interval_secs", "0.05".into()),
        ("memory.profile_allocation_sites", "false".into()),
        ("run.steps", steps.to_string()),
        ("run.ranks", ranks.to_string()),
        ("run.out", out.display().to_string()),
    ];
    sets.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    config::resolve(&Layers {
        flags: sets
            .into_iter()
            .map(|(k, v)| ("--set".to_string(), k.to_string(), v))
            .collect(),
        ..Layers::default()
    })
    .expect("a valid config")
}

/// Runs `world` ranks as threads; `stop_rank` (if any) has asked to stop
/// before the first step.
fn run_ranks(
    r: &Resolved,
    opts: &TrainOptions,
    world: usize,
    stop_rank: Option<usize>,
) -> Vec<Result<TrainSummary, RankFailure>> {
    let comms = ThreadGroup::new(world, Duration::from_secs(60))
        .unwrap()
        .into_comms();
    let stops: Vec<AtomicBool> = (0..world)
        .map(|i| AtomicBool::new(stop_rank == Some(i)))
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .zip(&stops)
            .map(|(comm, stop)| {
                s.spawn(move || train::run_parallel(r, opts, Box::new(comm), stop, &mut NoProgress))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn ok(results: Vec<Result<TrainSummary, RankFailure>>) -> Vec<TrainSummary> {
    results
        .into_iter()
        .enumerate()
        .map(|(rank, r)| r.unwrap_or_else(|f| panic!("rank {rank}: {}", f.error)))
        .collect()
}

fn report(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

#[test]
fn two_ranks_train_in_lock_step_and_rank_0_reports_both() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dp");
    let r = resolved(&out, 120, 2, &[("run.checkpoint_every_steps", "60")]);
    let s = ok(run_ranks(&r, &TrainOptions::default(), 2, None));
    let (s0, s1) = (&s[0], &s[1]);
    for s in [s0, s1] {
        assert!(!s.interrupted);
        assert_eq!(s.steps, 120);
        assert!(s.updates > 0, "{s:?}");
        assert_eq!(s.batch, 16);
    }
    // ZeRO keeps the ranks' weights bit-identical.
    assert_eq!(s0.weights_crc32, s1.weights_crc32);
    // Rank 1 reports nothing; rank 0 every rank's figures.
    assert!(s1.parallel.is_none() && s1.evaluation.is_empty());
    assert_eq!(s0.evaluation.len(), 4);
    let p = s0.parallel.as_ref().expect("rank 0's parallel summary");
    assert_eq!((p.ranks, p.stage), (2, 2));
    assert_eq!(p.per_rank.len(), 2);
    // The optimizer state is split: together the whole 8Ψ, each about half.
    let state: Vec<u64> = p.per_rank.iter().map(|r| r.optimizer_state_bytes).collect();
    assert_eq!(state.iter().sum::<u64>(), 8 * p.params);
    assert_eq!(p.zero_formula_one_rank.optimizer_bytes, 8 * p.params);
    for &b in &state {
        assert!(
            (b as f64) < 0.65 * (8 * p.params) as f64 && b > 0,
            "{state:?}"
        );
    }
    assert_eq!(state, p.plan_state_bytes);
    for r in &p.per_rank {
        assert!(r.step_secs > 0.0 && r.comm_secs > 0.0, "{r:?}");
        assert!(r.comm_fraction > 0.0 && r.comm_fraction < 1.0, "{r:?}");
        assert!(r.peak_rss_bytes >= r.rss_bytes && r.rss_bytes > 0, "{r:?}");
    }
    // Same process, same RSS: nobody runs hot.
    assert!(p.rebalances.is_empty());

    // Rank 0's files.
    for f in [
        "report.md",
        "report.json",
        "metrics.jsonl",
        "monitor.jsonl",
        "memory.svg",
        "config.toml",
        "run_state.json",
        "checkpoint/manifest.json",
        "checkpoint/rank-1/manifest.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("## Data parallel: 2 ranks, ZeRO stage 2"),
        "{md}"
    );
    assert!(md.contains("| rank | peak RSS |"), "{md}");
    assert!(md.contains("\n| 0 | ") && md.contains("\n| 1 | "), "{md}");
    let json = report(&out);
    assert_eq!(json["summary"]["parallel"]["per_rank"][1]["rank"], 1);
    assert_eq!(json["config"]["ranks"], 2);
    let lines: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 12);
    for l in &lines {
        let ranks = l["ranks"].as_array().expect("per-rank figures");
        assert_eq!(ranks.len(), 2);
        assert!(
            ranks[1]["optimizer_state_bytes"].as_u64().unwrap() > 0,
            "{l}"
        );
    }
    // The saved config leaves the rank count to the next launch.
    let toml = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        !toml.contains("ranks") && toml.contains("[shard]"),
        "{toml}"
    );
}

#[test]
fn a_stop_on_one_rank_stops_both_and_the_checkpoint_resumes_on_one_or_two_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("stop");
    let r = resolved(&out, 1000, 2, &[]);
    let s = ok(run_ranks(&r, &TrainOptions::default(), 2, Some(1)));
    for s in &s {
        assert!(s.interrupted);
        // Rank 1 asked before the first step: the group's first step was
        // its last.
        assert_eq!(s.steps, 1);
    }
    assert!(out.join("checkpoint/manifest.json").is_file());
    assert!(out.join("checkpoint/rank-1/manifest.json").is_file());
    assert!(!out.join("report.json").exists());

    // One process continues the two ranks' checkpoint…
    let opts = TrainOptions {
        resume: Some(out.clone()),
    };
    let r1 = resolved(&out, 30, 1, &[]);
    let s = train::run(&r1, &opts, &AtomicBool::new(false), &mut NoProgress).unwrap();
    assert!(!s.interrupted);
    assert_eq!((s.steps, s.steps_this_run), (30, 29));
    assert!(s.parallel.is_none());
    assert!(report(&out)["summary"].get("parallel").is_none());

    // …and two ranks continue the single process's.
    let r2 = resolved(&out, 40, 2, &[]);
    let s = ok(run_ranks(&r2, &opts, 2, None));
    assert_eq!((s[0].steps, s[0].steps_this_run), (40, 10));
    assert_eq!(s[0].weights_crc32, s[1].weights_crc32);
    let p = report(&out)["summary"]["parallel"].clone();
    assert_eq!(p["ranks"], 2);
    // metrics.jsonl was appended to: 3 single-process records, then 1.
    let n = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(n, 4);
}
