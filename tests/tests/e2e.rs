//! End-to-end tests of the `grandmodel` program (the same CLI as
//! `crates/gm-system`'s binary, built in this package): a short training
//! run and its report files; the documented errors and exit codes; the
//! Prometheus endpoint scraped over loopback; Ctrl-C then `--resume` gives
//! the same final weights as an uninterrupted run; a tight budget is never
//! exceeded.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

mod common;
use common::{
    component, config_line, grandmodel, interrupted_step, metrics, report, stderr, train_args,
    Lines, TINY,
};

fn train(out: &Path, steps: u64, extra: &[&str]) -> Result<Output> {
    let steps = steps.to_string();
    let out = out.to_str().context("utf-8 path")?;
    Ok(grandmodel(&train_args(out, &steps, extra)).output()?)
}

/// The last line of stderr: the one-sentence error.
fn error_line(o: &Output) -> String {
    stderr(o).lines().last().unwrap_or("").to_string()
}

#[test]
fn a_short_run_writes_every_report_with_sane_numbers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("run");
    let o = train(&out, 120, &[])?;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for f in [
        "report.md",
        "report.json",
        "metrics.jsonl",
        "monitor.jsonl",
        "memory.svg",
        "config.toml",
        "run_state.json",
        "checkpoint/manifest.json",
        "checkpoint/replay.gmr",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let r = report(&out)?;
    let s = &r["summary"];
    assert_eq!(s["steps"], 120);
    assert_eq!(s["batch"], 16);
    assert!(s["updates"].as_u64().unwrap() > 0, "{s}");
    let loss = s["final_loss"].as_f64().context("a loss")?;
    assert!(loss.is_finite() && loss >= 0.0, "{loss}");
    let peak = s["peak_rss_bytes"].as_u64().unwrap();
    assert!(peak > 10 << 20 && peak < s["limit_bytes"].as_u64().unwrap());
    let eval = s["evaluation"].as_array().unwrap();
    let names: Vec<&str> = eval.iter().map(|e| e["policy"].as_str().unwrap()).collect();
    assert_eq!(names[..3], ["agent (greedy)", "buy and hold", "random"]);
    for e in eval {
        assert!(e["mean_return"].as_f64().unwrap().is_finite());
        assert_eq!(e["episodes"], 3);
    }
    // The memory section: components measured, a leak verdict, the plan.
    let mem = &r["memory"];
    let comps: Vec<&str> = mem["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for c in ["replay", "params", "optimizer_state", "activations"] {
        assert!(comps.contains(&c), "{comps:?}");
    }
    let params = component(&r, "params").unwrap();
    assert!(params > 10_000, "{params}");
    assert!(mem["leak"]["snapshots"].as_u64().unwrap() > 0);
    assert!(mem["heap"]["peak_bytes"].as_u64().unwrap() > 0);
    let plan = &r["pipeline_plan"];
    assert!(plan["peak_before_bytes"].as_u64().unwrap() > 0);
    assert_eq!(plan["plain_batch"], 16);
    // metrics.jsonl: one record per 10 steps, memory figures in each.
    let lines = metrics(&out)?;
    assert_eq!(lines.len(), 12);
    assert_eq!(lines.last().unwrap()["step"], 120);
    assert!(lines.iter().all(|l| l["rss_bytes"].as_u64().unwrap() > 0));
    let svg = std::fs::read_to_string(out.join("memory.svg"))?;
    assert!(svg.starts_with("<svg") && svg.contains("RSS (kernel)"));
    let md = std::fs::read_to_string(out.join("report.md"))?;
    assert!(md.contains("| agent (greedy) |") && md.contains("### Recommendations"));

    // The saved replay buffer inspects; a truncated copy is a clear error.
    let replay = out.join("checkpoint/replay.gmr");
    let o = grandmodel(&["buffer", "inspect", replay.to_str().unwrap(), "--json"]).output()?;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let info: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(info["kind"], "prioritized");
    assert_eq!(info["version"], 1);
    assert!(info["len"].as_u64().unwrap() > 0);
    let bytes = std::fs::read(&replay)?;
    let cut = dir.path().join("cut.gmr");
    std::fs::write(&cut, &bytes[..bytes.len() / 2])?;
    let o = grandmodel(&["buffer", "inspect", cut.to_str().unwrap()]).output()?;
    assert_eq!(o.status.code(), Some(6));
    assert!(
        error_line(&o).starts_with("grandmodel: cannot read buffer file"),
        "{}",
        stderr(&o)
    );
    Ok(())
}

#[test]
fn bad_config_missing_data_and_malformed_csv_give_documented_codes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("o");
    let outs = out.to_str().unwrap();
    // Unknown key in the file: exit 3, naming the key.
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[memory]\nlimit_bytes = \"2 GiB\"\nwarnig_fraction = 0.5\n",
    )?;
    let o = grandmodel(&["train", "--config", cfg.to_str().unwrap(), "--out", outs]).output()?;
    assert_eq!(o.status.code(), Some(3));
    let e = error_line(&o);
    assert!(
        e.contains("unknown config key \"memory.warnig_fraction\""),
        "{e}"
    );
    assert_eq!(
        stderr(&o).lines().count(),
        1,
        "one sentence: {}",
        stderr(&o)
    );
    // A value out of range: exit 3, naming key, value and what is allowed.
    std::fs::write(&cfg, "[training]\nmin_batch = 12\n")?;
    let o = grandmodel(&["train", "--config", cfg.to_str().unwrap(), "--out", outs]).output()?;
    assert_eq!(o.status.code(), Some(3));
    let e = error_line(&o);
    assert!(
        e.contains("training.min_batch = 12") && e.contains("multiple of 8"),
        "{e}"
    );
    // Not TOML at all.
    std::fs::write(&cfg, "[training\n")?;
    let o = grandmodel(&["config", "show", "--config", cfg.to_str().unwrap()]).output()?;
    assert_eq!(o.status.code(), Some(3));
    assert!(error_line(&o).contains("not valid TOML"));
    // A bad environment variable.
    let o = grandmodel(&["config", "show"])
        .env("GM_MEMORY_LIMIT_BYTES", "a lot")
        .output()?;
    assert_eq!(o.status.code(), Some(3));
    assert!(error_line(&o).contains("env GM_MEMORY_LIMIT_BYTES"));
    // A missing data file: exit 4.
    let missing = dir.path().join("nope.csv");
    let o = grandmodel(&["train", "--data", missing.to_str().unwrap(), "--out", outs]).output()?;
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(error_line(&o).contains("cannot open data file"));
    // A malformed CSV: exit 5, with the line.
    let csv = dir.path().join("bars.csv");
    let mut f = std::fs::File::create(&csv)?;
    writeln!(f, "timestamp,open,high,low,close,volume")?;
    writeln!(f, "2024-01-02 09:30:00,100,101,99,100.5,1000")?;
    writeln!(f, "2024-01-02 09:35:00,100.5,abc,99,100,1200")?;
    drop(f);
    let o = grandmodel(&["train", "--data", csv.to_str().unwrap(), "--out", outs]).output()?;
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let e = error_line(&o);
    assert!(
        e.contains("cannot use data file") && e.contains(":3:"),
        "{e}"
    );
    // A bad flag: exit 2. A resume from nowhere: exit 6.
    let o = grandmodel(&["train", "--stepz", "3"]).output()?;
    assert_eq!(o.status.code(), Some(2));
    let o = grandmodel(&["train", "--resume", dir.path().to_str().unwrap()]).output()?;
    assert_eq!(o.status.code(), Some(6));
    assert!(error_line(&o).contains("cannot resume"));
    // No backtrace anywhere.
    assert!(!stderr(&o).contains("backtrace"));
    Ok(())
}

#[test]
fn prometheus_is_scraped_and_interrupt_then_resume_equals_an_uninterrupted_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let a = dir.path().join("interrupted");
    let mut args = vec![
        "train".to_string(),
        "--steps".into(),
        "100000".into(),
        "--out".into(),
        a.display().to_string(),
        "--metrics-addr".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(TINY.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = grandmodel(&argv)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let err = Lines::stderr(&mut child);
    let line = err.containing("metrics at http://", Duration::from_secs(300))?;
    let url = line.split_whitespace().last().context("url")?.to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    // The monitor samples every 0.2 s: a scrape shows process memory and
    // the budget.
    let mut body = String::new();
    for _ in 0..50 {
        body = ureq::get(&url).call()?.body_mut().read_to_string()?;
        if body.contains("gm_process_rss_bytes") && body.contains("gm_memory_budget_bytes") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(body.contains("gm_process_rss_bytes"), "{body}");
    assert!(body.contains("gm_memory_budget_bytes 8589934592"), "{body}");
    // Interrupt once training runs (the first progress line is on stdout).
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    loop {
        let l = lines.next().context("stdout ended")??;
        if l.starts_with("step ") {
            break;
        }
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    assert!(status.success());
    let msg = err.containing("interrupted at step", Duration::from_secs(300))?;
    let code = child.wait()?.code();
    assert_eq!(code, Some(130), "{msg}");
    let k = interrupted_step(&msg)?;
    assert!(a.join("checkpoint/manifest.json").is_file());
    let total = (k + 20).max(115);
    // Resume to `total` steps (the saved config is reused).
    let o = grandmodel(&[
        "train",
        "--resume",
        a.to_str().unwrap(),
        "--steps",
        &total.to_string(),
    ])
    .output()?;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // The same run without an interruption.
    let b = dir.path().join("straight");
    let o = train(&b, total, &[])?;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (ra, rb) = (report(&a)?, report(&b)?);
    for k in [
        "steps",
        "updates",
        "transitions",
        "episodes",
        "weights_crc32",
    ] {
        assert_eq!(ra["summary"][k], rb["summary"][k], "{k}");
    }
    assert_eq!(ra["summary"]["evaluation"], rb["summary"]["evaluation"]);
    let wa = std::fs::read(a.join("checkpoint/online.safetensors"))?;
    let wb = std::fs::read(b.join("checkpoint/online.safetensors"))?;
    assert!(wa == wb, "final weights differ");
    Ok(())
}

#[test]
fn a_tight_budget_is_never_exceeded() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out: PathBuf = dir.path().join("tight");
    // About 1.5x what the tiny run needs: its replay share (a quarter) holds
    // 20 000 transitions, and the warning line sits near the working set.
    let budget = "640MiB";
    let o = train(&out, 120, &["--budget", budget])?;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let r = report(&out)?;
    let limit = r["summary"]["limit_bytes"].as_u64().unwrap();
    assert_eq!(limit, 640 << 20);
    // The kernel's high-water mark of the whole process.
    let peak = r["summary"]["peak_rss_bytes"].as_u64().unwrap();
    assert!(peak <= limit, "peak RSS {peak} above the limit {limit}");
    // Every sample of the run stayed under it too.
    for v in metrics(&out)? {
        assert!(v["rss_bytes"].as_u64().unwrap() <= limit, "{v}");
    }
    // The replay was sized to its share of the limit.
    assert!(r["summary"]["replay_capacity"].as_u64().unwrap() < 100_000);
    Ok(())
}

#[test]
fn config_show_names_origins_and_report_measures_every_component() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("gm.toml");
    std::fs::write(&cfg, "[memory]\nwarning_fraction = 0.7\n")?;
    let o = grandmodel(&[
        "config",
        "show",
        "--config",
        cfg.to_str().unwrap(),
        "--steps",
        "9",
    ])
    .env("GM_TRAINING_MAX_BATCH", "256")
    .output()?;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout)?;
    let line = |k: &str| config_line(&text, k);
    assert!(line("memory.warning_fraction").contains("# file"), "{text}");
    assert!(
        line("training.max_batch").contains("= 256")
            && line("training.max_batch").contains("# env GM_TRAINING_MAX_BATCH"),
        "{text}"
    );
    assert!(line("run.steps").contains("# flag --steps"), "{text}");
    assert!(line("memory.limit_bytes").contains("# default"), "{text}");

    let out = dir.path().join("report");
    let o = grandmodel(&[
        "report",
        "--out",
        out.to_str().unwrap(),
        "--batch",
        "8",
        "--reps",
        "1",
        "--transitions",
        "500",
        "--set",
        "training.target_effective_batch=16",
    ])
    .output()?;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let r = report(&out)?;
    let rows = r["rows"].as_array().context("rows")?;
    let names: Vec<&str> = rows
        .iter()
        .map(|x| x["component"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "tactical embedder",
            "structure embedder",
            "replay buffer",
            "training pipeline",
            "total"
        ]
    );
    for x in rows {
        assert!(x["baseline_bytes"].as_u64().unwrap() > 0, "{x}");
        assert!(x["optimized_bytes"].as_u64().unwrap() > 0, "{x}");
        assert!(x["baseline_ms"].as_f64().unwrap() >= 0.0);
    }
    // The replay stores windows once per bar: far below full copies.
    let replay = &rows[2];
    assert!(
        replay["optimized_bytes"].as_u64().unwrap() * 4
            < replay["baseline_bytes"].as_u64().unwrap()
    );
    assert!(std::fs::read_to_string(out.join("report.svg"))?.starts_with("<svg"));
    assert!(std::fs::read_to_string(out.join("report.md"))?.contains("| replay buffer |"));
    Ok(())
}
