//! `cargo xtask bench [NAME]`: the bench registry, and the `buffers` bench that
//! runs gm-buffers and the Python peers in one go and writes a markdown report.

mod memory;
mod models;
mod peers;
mod report;
mod train;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{cargo, cmd_output, display_cmd, project_root, run_cmd};

/// name, one-line description, usage of its arguments.
const BENCHES: &[(&str, &str, &str)] = &[
    (
        "buffers",
        "gm-buffers replay buffers vs cpprb / numpy in the same run -> target/bench/buffers.md",
        "[--quick] [--no-peers]",
    ),
    (
        "memory",
        "allocator overhead, monitor sample cost, leak-detector accuracy -> target/bench/memory.json",
        "",
    ),
    (
        "models",
        "gm-models memory table (params, fwd/bwd peaks, int8 quantization, attention by N) -> target/bench/models.md",
        "",
    ),
    (
        "train",
        "one GrandModel training step: peak and time with each memory technique, budget batch, replay bytes -> target/bench/train.md",
        "[--batch N] [--micro N] [--segments N] [--reps N] [--budget-mib N] [--replay N] [--skip-budget] [--skip-replay]",
    ),
];

pub(crate) fn run(args: &[String]) -> Result<()> {
    let Some((name, rest)) = args.split_first() else {
        list();
        return Ok(());
    };
    match name.as_str() {
        "buffers" => buffers(rest),
        "memory" => memory::run(rest, &bench_dir()),
        "models" => models::run(rest, &bench_dir()),
        "train" => train::run(rest, &bench_dir()),
        "-h" | "--help" => {
            list();
            Ok(())
        }
        other => {
            list();
            let names: Vec<&str> = BENCHES.iter().map(|b| b.0).collect();
            bail!("unknown bench `{other}` (available: {})", names.join(", "))
        }
    }
}

fn list() {
    println!("available benches (cargo xtask bench <name> [args]):");
    for (name, desc, usage) in BENCHES {
        println!("  {name:<10} {usage}\n             {desc}");
    }
}

/// Where bench outputs go: `<root>/target/bench`.
fn bench_dir() -> PathBuf {
    project_root().join("target").join("bench")
}

/// `cargo xtask bench buffers [--quick] [--no-peers]`.
fn buffers(args: &[String]) -> Result<()> {
    let mut quick = false;
    let mut with_peers = true;
    for arg in args {
        match arg.as_str() {
            "--quick" => quick = true,
            "--no-peers" => with_peers = false,
            other => bail!(
                "unknown argument `{other}` for `bench buffers` (expected --quick, --no-peers)"
            ),
        }
    }
    let start = Instant::now();
    let dir = bench_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ours_path = dir.join("buffers.json");
    let peers_path = dir.join("peers.json");
    let md_path = dir.join("buffers.md");
    // Stale results must never be reported as this run's.
    for stale in [&ours_path, &peers_path, &md_path] {
        if stale.exists() {
            std::fs::remove_file(stale).with_context(|| format!("removing {}", stale.display()))?;
        }
    }

    let mut info = report::RunInfo::collect();
    info.commands.push(format!(
        "cargo xtask bench buffers{}{}",
        if quick { " --quick" } else { "" },
        if with_peers { "" } else { " --no-peers" }
    ));

    // (a) our numbers
    println!("\n==> gm-buffers: bench_buffers example (release)");
    let mut ours_cmd = cargo();
    ours_cmd.args([
        "run",
        "--release",
        "-p",
        "gm-buffers",
        "--example",
        "bench_buffers",
        "--",
    ]);
    ours_cmd.arg("--json").arg(&ours_path);
    if quick {
        ours_cmd.arg("--quick");
    }
    info.commands.push(display_cmd(&ours_cmd));
    run_cmd(&mut ours_cmd).context("the gm-buffers bench failed; no report written")?;
    let ours = read_json(&ours_path)?;

    // (b) the peers, in the same run
    let peers = if with_peers {
        println!("\n==> Python peers (cpprb, numpy) in the same run");
        match peers::run(&peers_path, quick).and_then(|cmd| Ok((cmd, read_json(&peers_path)?))) {
            Ok((cmd, json)) => {
                info.commands.push(cmd);
                Some(json)
            }
            Err(err) => {
                let msg = format!("peers not run: {err:#}");
                eprintln!("WARNING: {msg}\nWARNING: continuing with gm-buffers numbers only");
                info.notes.push(msg);
                None
            }
        }
    } else {
        info.notes.push("peers skipped (--no-peers)".into());
        None
    };

    // (c) the report
    info.notes
        .push(format!("total bench time {:.0?}", start.elapsed()));
    let md = report::render(&ours, peers.as_ref(), &info);
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    println!("\n{md}");
    println!("report written to {}", md_path.display());
    Ok(())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {} (did the bench write it?)", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

impl report::RunInfo {
    /// Facts about this machine and toolchain, best effort.
    fn collect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let rustc = cmd_output(std::process::Command::new("rustc").arg("-V"))
            .unwrap_or_else(|| "unknown".into());
        let date =
            cmd_output(std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M:%S UTC"]))
                .unwrap_or_else(|| "unknown".into());
        Self {
            cpu,
            cores,
            rustc,
            date,
            commands: Vec::new(),
            notes: Vec::new(),
        }
    }
}
