//! `cargo xtask bench [NAME | list | regen]`: the bench registry, the run of
//! every area in turn followed by the regeneration of BENCHMARKS.md's tables,
//! and the `buffers` bench that runs gm-buffers and the Python peers in one go
//! and writes a markdown report.
//!
//! Each area writes `target/bench/NAME.json` (the figures), `NAME.md` (its
//! full report) and `NAME.run.json` (date, CPU, cores, rustc, command).
//! `cargo xtask bench` with no name runs them all; an area that fails does
//! not stop the others, its block in BENCHMARKS.md is left as it was, and the
//! command exits with an error naming it. `cargo xtask bench regen` (or
//! `--regen-only`) rewrites the generated blocks from the JSON already there.

mod memory;
mod models;
mod peers;
mod regen;
mod report;
mod shard;
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
    (
        "shard",
        "ZeRO data parallelism under mpirun: optimizer state per rank, time in collectives, parity -> target/bench/shard.md",
        "[--ranks 1,2,4] [--agent full|small] [--batch N] [--steps N] [--stage 1|2]",
    ),
];

pub(crate) fn run(args: &[String]) -> Result<()> {
    let Some((name, rest)) = args.split_first() else {
        return run_all();
    };
    match name.as_str() {
        "list" | "-h" | "--help" => {
            list();
            Ok(())
        }
        "regen" | "--regen-only" => {
            if let Some(a) = rest.first() {
                bail!("unknown argument `{a}` for `bench regen` (it takes none)");
            }
            regen_doc(&[])
        }
        area if BENCHES.iter().any(|b| b.0 == area) => run_area(area, rest),
        other => {
            list();
            let names: Vec<&str> = BENCHES.iter().map(|b| b.0).collect();
            bail!("unknown bench `{other}` (available: {})", names.join(", "))
        }
    }
}

fn list() {
    println!(
        "cargo xtask bench                 run every bench below in turn, then regenerate BENCHMARKS.md"
    );
    println!(
        "cargo xtask bench regen           rewrite BENCHMARKS.md's generated tables from target/bench/*.json \
         (alias: --regen-only)"
    );
    println!("cargo xtask bench list            this list\n");
    println!("available benches (cargo xtask bench <name> [args]):");
    for (name, desc, usage) in BENCHES {
        println!("  {name:<10} {usage}\n             {desc}");
    }
}

/// One area: runs it and records how it ran in `target/bench/NAME.run.json`
/// (whenever it left a `NAME.json`, even a partial one).
fn run_area(area: &str, args: &[String]) -> Result<()> {
    let dir = bench_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    regen::remove_run_info(&dir, area)?;
    let mut info = report::RunInfo::collect();
    info.commands.push(
        std::iter::once(format!("cargo xtask bench {area}"))
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" "),
    );
    let result = match area {
        "buffers" => buffers(args),
        "memory" => memory::run(args, &dir),
        "models" => models::run(args, &dir),
        "train" => train::run(args, &dir),
        "shard" => shard::run(args, &dir),
        other => bail!("no runner for bench `{other}`"),
    };
    if dir.join(format!("{area}.json")).exists() {
        regen::write_run_info(&dir, area, &info)?;
    }
    result
}

/// `cargo xtask bench`: every area in turn with its default arguments, then
/// the regeneration of BENCHMARKS.md from what they wrote.
fn run_all() -> Result<()> {
    let start = Instant::now();
    let mut failed: Vec<&str> = Vec::new();
    for &area in regen::AREAS {
        println!("\n======== cargo xtask bench {area}");
        if let Err(err) = run_area(area, &[]) {
            eprintln!("\nERROR: bench `{area}` failed: {err:#}\nERROR: continuing with the others");
            failed.push(area);
        }
    }
    println!(
        "\n======== regenerating BENCHMARKS.md (all benches took {:.0?})",
        start.elapsed()
    );
    let regen_result = regen_doc(&failed);
    if !failed.is_empty() {
        let regen_note = match &regen_result {
            Ok(()) => String::new(),
            Err(err) => format!("; also: {err:#}"),
        };
        bail!(
            "bench area(s) failed: {} (their blocks in BENCHMARKS.md were left as they were; \
             rerun them with `cargo xtask bench NAME`){regen_note}",
            failed.join(", ")
        );
    }
    regen_result
}

/// Rewrites BENCHMARKS.md's blocks (all areas but `skip`) from `target/bench`.
fn regen_doc(skip: &[&str]) -> Result<()> {
    let doc = project_root().join("BENCHMARKS.md");
    let outcome = regen::regen(&doc, &bench_dir(), skip)?;
    println!(
        "{}: regenerated {}",
        doc.display(),
        if outcome.updated.is_empty() {
            "no block".to_string()
        } else {
            outcome.updated.join(", ")
        }
    );
    if !outcome.missing.is_empty() {
        println!(
            "left as they were (no JSON in {}): {}",
            bench_dir().display(),
            outcome.missing.join(", ")
        );
    }
    if !outcome.failed.is_empty() {
        bail!(
            "BENCHMARKS.md blocks not regenerated: {}",
            outcome.failed.join("; ")
        );
    }
    Ok(())
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

/// The last line of `text` that parses as a JSON object: how every bench
/// example hands its figures to xtask.
pub(crate) fn parse_last_json(text: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    text.lines().rev().find_map(
        |l| match serde_json::from_str::<serde_json::Value>(l.trim()) {
            Ok(serde_json::Value::Object(m)) => Some(m),
            _ => None,
        },
    )
}

/// `DIR/NAME.json` and `DIR/NAME.md`, with any left from an earlier run
/// removed (a failed run must not leave stale figures behind).
pub(crate) fn fresh_outputs(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json_path = dir.join(format!("{name}.json"));
    let md_path = dir.join(format!("{name}.md"));
    for stale in [&json_path, &md_path] {
        if stale.exists() {
            std::fs::remove_file(stale).with_context(|| format!("removing {}", stale.display()))?;
        }
    }
    Ok((json_path, md_path))
}

/// Runs `cargo run --release -q -p KRATE [--features F] --example EXAMPLE
/// [-- ARGS]` with its stderr (progress, tables) shown live, records the
/// command and its wall time in `info`, and returns the last JSON object
/// it printed on stdout: how the single-example benches hand over their
/// figures.
pub(crate) fn run_example_json(
    krate: &str,
    example: &str,
    features: Option<&str>,
    args: &[String],
    info: &mut report::RunInfo,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut cmd = cargo();
    cmd.args(["run", "--release", "-q", "-p", krate]);
    if let Some(f) = features {
        cmd.args(["--features", f]);
    }
    cmd.args(["--example", example]);
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    info.commands.push(display_cmd(&cmd));
    println!("\n==> {krate}: {example}\n$ {}", display_cmd(&cmd));
    let start = Instant::now();
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {krate} {example}"))?;
    if !out.status.success() {
        bail!(
            "{example} failed ({}; its stderr is above); no report written",
            out.status
        );
    }
    let Some(obj) = parse_last_json(&String::from_utf8_lossy(&out.stdout)) else {
        bail!("{example} printed no JSON object on stdout; no report written");
    };
    info.notes
        .push(format!("example wall time {:.0?}", start.elapsed()));
    Ok(obj)
}

/// Writes a bench's flat JSON and its markdown report, and prints the
/// report with where both went.
pub(crate) fn write_reports(
    json_path: &Path,
    md_path: &Path,
    value: &serde_json::Value,
    md: &str,
) -> Result<()> {
    std::fs::write(json_path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(md_path, md).with_context(|| format!("writing {}", md_path.display()))?;
    println!(
        "\n{md}\nwritten {} and {}",
        json_path.display(),
        md_path.display()
    );
    Ok(())
}
