//! `grandmodel train --ranks 2` as two real MPI processes under
//! `mpirun -n 2` (the program built with the `mpi` feature): a short
//! data-parallel run writes rank 0's report with a per-rank table whose
//! optimizer-state bytes are about half a single process's; the output
//! resumes as one plain process (`--ranks 1`, no mpirun) and that one
//! again on two ranks, where a rank that runs hot at a checkpoint sheds
//! optimizer shards; SIGUSR1 to mpirun (forwarded to the ranks) stops
//! both ranks at the same step with a checkpoint and exit code 130.
//!
//! Run with `cargo test -p grandmodel-e2e --features mpi --test train_mpi`.
//! Needs Open MPI's `mpirun` on `PATH`: without it the test fails, unless
//! `GM_SKIP_MPI=1`, when it says it skipped.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use gm_system::parallel::{mpirun_check, MpirunCheck};
use serde_json::Value;

mod common;
use common::{
    clean_env, component, grandmodel, interrupted_step, json, metrics, report, text, train_args,
    Lines, BIN,
};

/// `mpirun -n RANKS grandmodel ARGS` (gm-shard's launch command).
fn mpirun(ranks: usize, args: &[&str]) -> Command {
    let mut c = gm_system::parallel::mpirun_command(ranks, Path::new(BIN));
    c.args(args);
    clean_env(&mut c);
    c
}

/// A job still running after this fails the test (and is killed) instead
/// of hanging CI.
const JOB_DEADLINE: Duration = Duration::from_secs(300);

/// `Command::output` with [`JOB_DEADLINE`] (gm-shard's `run_job`).
trait OutputWithin {
    fn output_within(&mut self) -> Result<Output>;
}

impl OutputWithin for Command {
    fn output_within(&mut self) -> Result<Output> {
        self.stdout(Stdio::piped()).stderr(Stdio::piped());
        let j = gm_system::parallel::run_job(self, JOB_DEADLINE)?;
        let status = j.status.with_context(|| {
            format!(
                "{self:?} ran past {JOB_DEADLINE:?} and was killed\nstdout:\n{}\nstderr:\n{}",
                j.stdout, j.stderr
            )
        })?;
        Ok(Output {
            status,
            stdout: j.stdout.into_bytes(),
            stderr: j.stderr.into_bytes(),
        })
    }
}

/// Waits for `child` at most [`JOB_DEADLINE`] from now, killing it past
/// that; its stderr (piped) is collected.
fn wait_within(child: &mut std::process::Child) -> Result<(std::process::ExitStatus, String)> {
    let mut err = child.stderr.take().context("piped stderr")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let end = Instant::now() + JOB_DEADLINE;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the job ran past {JOB_DEADLINE:?} and was killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok((status, reader.join().unwrap_or_default()))
}

#[test]
fn two_ranks_train_report_per_rank_resume_on_one_and_stop_together() -> Result<()> {
    let check = mpirun_check("the data-parallel end-to-end test").map_err(anyhow::Error::msg)?;
    if let MpirunCheck::Skip(why) = check {
        eprintln!("{why}");
        return Ok(());
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;

    // 1. Two ranks, 120 steps, a checkpoint half-way.
    let dp = dir.path().join("dp");
    let dps = dp.to_str().context("utf-8 path")?;
    let o = mpirun(
        2,
        &train_args(
            dps,
            "120",
            &["--ranks", "2", "--set", "run.checkpoint_every_steps=60"],
        ),
    )
    .output_within()?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("| held-out policy |"), "{}", text(&o));
    // Rank 1 is quiet: no line of it on stderr.
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("rank 1"),
        "{}",
        text(&o)
    );
    let r = report(&dp)?;
    let s = &r["summary"];
    assert_eq!(s["steps"], 120);
    assert!(s["updates"].as_u64().unwrap() > 0, "{s}");
    let p = &s["parallel"];
    assert_eq!(p["ranks"], 2);
    assert_eq!(p["stage"], 2);
    let per_rank = p["per_rank"].as_array().context("per_rank")?;
    assert_eq!(per_rank.len(), 2);
    let state: Vec<u64> = per_rank
        .iter()
        .map(|x| x["optimizer_state_bytes"].as_u64().unwrap())
        .collect();
    let comm: Vec<f64> = per_rank
        .iter()
        .map(|x| x["comm_fraction"].as_f64().unwrap())
        .collect();
    for x in per_rank {
        assert!(x["peak_rss_bytes"].as_u64().unwrap() > 10 << 20, "{x}");
        assert!(x["step_secs"].as_f64().unwrap() > 0.0, "{x}");
    }
    assert!(comm.iter().all(|&c| c > 0.0 && c < 1.0), "{comm:?}");
    let md = std::fs::read_to_string(dp.join("report.md"))?;
    assert!(
        md.contains("## Data parallel: 2 ranks, ZeRO stage 2"),
        "{md}"
    );
    assert!(md.contains("| rank | peak RSS |"), "{md}");
    assert!(md.contains("\n| 0 | ") && md.contains("\n| 1 | "), "{md}");
    assert!(md.contains("8Ψ/N"), "{md}");
    // Rank 0 wrote every rank's figures at every logged step.
    let lines = metrics(&dp)?;
    assert_eq!(lines.len(), 12);
    assert!(lines
        .iter()
        .all(|l| l["ranks"].as_array().is_some_and(|a| a.len() == 2)));
    assert!(dp.join("monitor.jsonl").is_file() && dp.join("memory.svg").is_file());
    assert!(dp.join("checkpoint/rank-1/manifest.json").is_file());
    let t_dp = t0.elapsed();

    // 2. One plain process continues it (no mpirun).
    let o = grandmodel(&["train", "--resume", dps, "--ranks", "1", "--steps", "140"])
        .output_within()?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r1 = report(&dp)?;
    assert_eq!(r1["summary"]["steps"], 140);
    assert_eq!(r1["summary"]["steps_this_run"], 20);
    assert!(r1["summary"].get("parallel").is_none(), "{}", r1["summary"]);
    // Each rank held about half of the 8Ψ bytes of AdamW moments (ZeRO
    // keeps moments for every owned element); the single process holds
    // moments only for the variables that got a gradient, and each rank
    // held clearly less than it.
    let eight_psi = p["zero_formula_one_rank"]["optimizer_bytes"]
        .as_u64()
        .context("formula")?;
    assert_eq!(eight_psi, 8 * p["params"].as_u64().unwrap());
    assert_eq!(state.iter().sum::<u64>(), eight_psi, "{state:?}");
    let whole = component(&r1, "optimizer_state").context("optimizer_state")?;
    assert!(
        whole <= eight_psi && whole > eight_psi / 2,
        "{whole} of {eight_psi}"
    );
    for &b in &state {
        let f = b as f64 / eight_psi as f64;
        assert!((0.35..=0.65).contains(&f), "{state:?} of {eight_psi}");
        let f = b as f64 / whole as f64;
        assert!(
            (0.35..=0.75).contains(&f),
            "{state:?} of {whole} (one process)"
        );
    }
    assert_eq!(metrics(&dp)?.len(), 14);

    // 3. Two ranks continue the single process's checkpoint; at fraction
    // 0 the rank above the median RSS is hot at every checkpoint.
    let o = mpirun(
        2,
        &[
            "train",
            "--ranks",
            "2",
            "--resume",
            dps,
            "--steps",
            "160",
            "--set",
            "run.checkpoint_every_steps=5",
            "--set",
            "shard.rebalance_hot_fraction=0",
        ],
    )
    .output_within()?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r2 = report(&dp)?;
    assert_eq!(r2["summary"]["steps"], 160);
    let rebalances = r2["summary"]["parallel"]["rebalances"]
        .as_array()
        .context("rebalances")?;
    assert!(!rebalances.is_empty(), "{}", r2["summary"]["parallel"]);
    let first = &rebalances[0];
    assert_eq!(first["hot"].as_array().map(Vec::len), Some(1), "{first}");
    let sum = |k: &str| -> u64 {
        first[k]
            .as_array()
            .map_or(0, |a| a.iter().filter_map(Value::as_u64).sum())
    };
    let (before, after) = (sum("state_bytes_before"), sum("state_bytes_after"));
    assert!(before > 0, "{first}");
    assert_eq!(before, after, "shards move, none is lost: {first}");
    assert!(std::fs::read_to_string(dp.join("report.md"))?.contains("| step | hot rank(s) |"));
    assert!(
        metrics(&dp)?.iter().any(|l| l.get("rebalance").is_some()),
        "a metrics record says when shards moved"
    );

    // 4. SIGUSR1 to mpirun reaches both ranks: they stop at the same step,
    // write the checkpoint together and exit 130; two ranks resume it.
    let stop = dir.path().join("stop");
    let stops = stop.to_str().context("utf-8 path")?;
    let mut child = mpirun(2, &train_args(stops, "100000", &["--ranks", "2"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Held to the end: its thread drains the job's stdout until the job ends.
    let out = Lines::stdout(&mut child);
    out.starting_with("step ", Duration::from_secs(120))?;
    let status = Command::new("kill")
        .args(["-USR1", &child.id().to_string()])
        .status()?;
    assert!(status.success());
    let (status, err) = wait_within(&mut child)?;
    assert_eq!(status.code(), Some(130), "{err}");
    let k = interrupted_step(&err)?;
    assert!(stop.join("checkpoint/manifest.json").is_file());
    let rank1 = json(&stop.join("checkpoint/rank-1/manifest.json"))?;
    assert_eq!(rank1["body"]["step"].as_u64(), Some(k), "{rank1}");
    let total = (k + 10).to_string();
    let o = mpirun(
        2,
        &[
            "train", "--ranks", "2", "--resume", stops, "--steps", &total,
        ],
    )
    .output_within()?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(report(&stop)?["summary"]["steps"].as_u64(), Some(k + 10));
    eprintln!(
        "data-parallel e2e: first run {:.1} s, all {:.1} s; optimizer state per rank {state:?} of {whole} (one process); time in collectives / step time {comm:?}",
        t_dp.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
