//! Validation against a real tool: the tracker's process-wide peak heap
//! agrees with valgrind massif's peak within 5 %.
//!
//! `harness = false` (see Cargo.toml). The binary re-executes itself under
//! `valgrind --tool=massif` with `GM_LEAK_MASSIF_CHILD=1`, which makes it run
//! a small deterministic allocation program (about 8 MiB at its peak, reached
//! through `realloc` growth, many small blocks, a `calloc`-style zeroed block
//! and over-aligned blocks) and print the tracker's peak. The parent reads
//! massif's peak snapshot and compares.
//!
//! What is compared: massif's `mem_heap_B`, the bytes the program asked for
//! (`malloc(n)` counts `n`), which is what the tracker counts
//! (`Layout::size`). `mem_heap_extra_B` is massif's *model* of allocator
//! overhead (a fixed admin size per block plus rounding to the alignment), not
//! bytes the program requested and not what glibc really spends, so it is
//! printed but left out of the comparison.
//!
//! A second check runs a small program under memcheck twice, once with
//! sampling on at one sample per byte (so the stack walker runs inside every
//! allocation) and once with it off, and compares how many C-level `malloc`s
//! valgrind saw beyond the Rust allocations the tracker counted: the walker
//! (libgcc's `_Unwind_Backtrace`) must add none. (It could not recurse into
//! the Rust allocator anyway, as C code calls `malloc` directly; this checks
//! it does not allocate at all.)
//!
//! Without `valgrind` on `PATH` the checks print that they skipped and pass,
//! unless `GM_REQUIRE_VALGRIND=1`, when they fail.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use gm_leak::{enable_sampling, sampling_stats, stats, SamplingConfig, TrackingAllocator};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator::system();

const CHILD_ENV: &str = "GM_LEAK_MASSIF_CHILD";
const PEAK_LINE: &str = "gm-leak tracker peak_bytes=";
const COUNT_LINE: &str = "gm-leak tracker allocations=";
/// Most the two peaks may differ, relative to massif's.
const TOLERANCE: f64 = 0.05;
/// A massif run taking longer than this is killed and fails the check.
const TIMEOUT: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    if let Some(mode) = std::env::var_os(CHILD_ENV) {
        match mode.to_str() {
            Some("peak") => println!("{PEAK_LINE}{}", allocation_program()),
            Some("count-plain") => count_program(false),
            Some("count-sampled") => count_program(true),
            _ => return ExitCode::FAILURE,
        }
        return ExitCode::SUCCESS;
    }
    let checks: [(&str, Check); 2] = [
        (
            "tracker_peak_agrees_with_massif",
            tracker_peak_agrees_with_massif,
        ),
        (
            "stack_walker_makes_no_c_allocations",
            stack_walker_makes_no_c_allocations,
        ),
    ];
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for (name, check) in checks {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        match check() {
            Ok(Outcome::Passed) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Ok(Outcome::Skipped(why)) => {
                println!("test {name} ... skipped: {why}");
                skipped += 1;
            }
            Err(e) => {
                println!("test {name} ... FAILED: {e}");
                failed += 1;
            }
        }
    }
    println!("\n{passed} passed, {failed} failed, {skipped} skipped");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A deterministic, peak-shaped allocation pattern; returns the tracker's
/// process-wide peak (since process start, as massif's is).
fn allocation_program() -> u64 {
    // Growth by realloc: a Vec<u64> pushed to 256 Ki elements (2 MiB).
    let mut grown: Vec<u64> = Vec::new();
    for i in 0..(256u64 << 10) {
        grown.push(i);
    }
    black_box(&grown);
    // Many small blocks: 16 Ki boxes of 64 B (1 MiB) and 512 strings of
    // 1 KiB (0.5 MiB).
    let boxes: Vec<Box<[u8; 64]>> = (0..16 << 10).map(|i| Box::new([i as u8; 64])).collect();
    let strings: Vec<String> = (0..512).map(|i| "x".repeat(1000 + i % 48)).collect();
    // Over-aligned blocks (posix_memalign): 64 x 4 KiB at 4 KiB alignment.
    let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
    let aligned: Vec<*mut u8> = (0..64)
        // SAFETY: `layout` has a non-zero size; each block is freed below
        // with the same layout.
        .map(|_| unsafe { std::alloc::alloc(layout) })
        .collect();
    assert!(aligned.iter().all(|p| !p.is_null()));
    // The peak: a 4 MiB zeroed block on top of everything else.
    let zeroed = black_box(vec![0u8; 4 << 20]);
    drop(zeroed);
    // Down again: free half of the small blocks and the aligned ones, and
    // allocate less than what was freed.
    drop(black_box(boxes.into_iter().step_by(2).collect::<Vec<_>>()));
    for p in aligned {
        // SAFETY: allocated above with `layout`, freed once.
        unsafe { std::alloc::dealloc(p, layout) };
    }
    let after = black_box(vec![1u8; 2 << 20]);
    drop((grown, strings, after));
    stats().peak_bytes
}

/// A check: passed, skipped (with why), or failed (with why).
type Check = fn() -> Result<Outcome, String>;

enum Outcome {
    Passed,
    Skipped(String),
}

/// `Ok(None)` when valgrind is missing and not required.
fn valgrind_available() -> Result<Option<String>, String> {
    let require = std::env::var("GM_REQUIRE_VALGRIND").is_ok_and(|v| v == "1");
    match Command::new("valgrind").arg("--version").output() {
        Ok(out) if out.status.success() => Ok(Some(
            String::from_utf8_lossy(&out.stdout).trim_end().to_string(),
        )),
        other => {
            let why = match other {
                Ok(out) => format!("`valgrind --version` exited with {}", out.status),
                Err(e) => format!("valgrind not found on PATH ({e})"),
            };
            if require {
                Err(format!("{why}, and GM_REQUIRE_VALGRIND=1"))
            } else {
                Ok(None)
            }
        }
    }
}

/// Runs this binary as child `mode` under valgrind with `args`; returns its
/// stdout and valgrind's stderr.
fn run_child(mode: &str, args: &[String]) -> Result<(String, String), String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let child = Command::new("valgrind")
        .args(args)
        .arg(&exe)
        .env(CHILD_ENV, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning valgrind: {e}"))?;
    let output = wait_with_timeout(child, TIMEOUT)?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(format!(
            "valgrind run failed ({}):\n{stdout}\n{stderr}",
            output.status
        ));
    }
    Ok((stdout, stderr))
}

fn line_value(text: &str, prefix: &str) -> Result<u64, String> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .ok_or_else(|| format!("no `{prefix}` line in:\n{text}"))?
        .split_whitespace()
        .next()
        .unwrap_or("")
        .parse()
        .map_err(|e| format!("`{prefix}`: {e}"))
}

fn tracker_peak_agrees_with_massif() -> Result<Outcome, String> {
    let Some(version) = valgrind_available()? else {
        return Ok(Outcome::Skipped("valgrind not found on PATH".into()));
    };
    println!("using {version}");
    let out_file =
        TempFile(std::env::temp_dir().join(format!("gm-leak-massif-{}.out", std::process::id())));
    let args = [
        "--tool=massif".to_string(),
        "-q".into(),
        "--pages-as-heap=no".into(),
        "--stacks=no".into(),
        // Record the true peak, not one within 1 % of it.
        "--peak-inaccuracy=0.0".into(),
        "--depth=1".into(),
        format!("--massif-out-file={}", out_file.0.display()),
    ];
    let started = Instant::now();
    let (stdout, _) = run_child("peak", &args)?;
    let tracker = line_value(&stdout, PEAK_LINE)?;
    let massif = parse_massif(&out_file.0)?;
    let diff = (tracker as f64 - massif.peak_heap as f64) / massif.peak_heap as f64;
    println!(
        "massif peak mem_heap_B {} (+ mem_heap_extra_B {} at that snapshot, left out), \
         tracker peak {tracker} B: {:+.4} % ({:.1} s under valgrind)",
        massif.peak_heap,
        massif.peak_extra,
        diff * 100.0,
        started.elapsed().as_secs_f64()
    );
    if diff.abs() > TOLERANCE {
        return Err(format!(
            "tracker peak {tracker} B vs massif {} B differ by {:+.2} % (allowed {} %)",
            massif.peak_heap,
            diff * 100.0,
            TOLERANCE * 100.0
        ));
    }
    // The program's own peak is ~8 MiB: a much smaller figure would mean the
    // child did not run the program (or massif saw nothing).
    if massif.peak_heap < 7 << 20 {
        return Err(format!(
            "massif peak {} B is implausibly small",
            massif.peak_heap
        ));
    }
    Ok(Outcome::Passed)
}

/// 2000 boxes allocated and freed, with sampling at one sample per byte (so
/// every block is sampled) or off; prints the tracker's allocation count.
fn count_program(sampled: bool) {
    if sampled {
        enable_sampling(SamplingConfig {
            mean_bytes_between_samples: 1,
            seed: Some(1),
            ..SamplingConfig::default()
        })
        .unwrap();
    }
    let mut boxes = Vec::with_capacity(2000);
    for i in 0..2000u64 {
        boxes.push(black_box(Box::new([i; 8])));
    }
    drop(boxes);
    let samples = sampling_stats().samples;
    assert!(!sampled || samples >= 2001, "samples {samples}");
    println!("{COUNT_LINE}{} samples={samples}", stats().allocations);
}

fn stack_walker_makes_no_c_allocations() -> Result<Outcome, String> {
    if valgrind_available()?.is_none() {
        return Ok(Outcome::Skipped("valgrind not found on PATH".into()));
    }
    let args = ["--tool=memcheck".to_string(), "--leak-check=no".into()];
    // Allocations valgrind saw (Rust's and C's) minus those the tracker
    // counted (Rust's, up to the print), per mode.
    let mut extra = Vec::new();
    for mode in ["count-plain", "count-sampled"] {
        let (stdout, stderr) = run_child(mode, &args)?;
        let tracker = line_value(&stdout, COUNT_LINE)?;
        let total = stderr
            .lines()
            .find_map(|l| l.split("total heap usage: ").nth(1))
            .and_then(|rest| rest.split(' ').next())
            .map(|n| n.replace(',', ""))
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| format!("no `total heap usage` in valgrind's output:\n{stderr}"))?;
        println!("{mode}: valgrind saw {total} allocations, the tracker {tracker}");
        extra.push(total as i64 - tracker as i64);
    }
    if extra[0] != extra[1] {
        return Err(format!(
            "C-level allocations: {} without sampling, {} with every block sampled: \
             the stack walker allocates",
            extra[0], extra[1]
        ));
    }
    Ok(Outcome::Passed)
}

struct MassifPeak {
    peak_heap: u64,
    peak_extra: u64,
}

/// The heap at massif's peak snapshot (`heap_tree=peak`), or the largest
/// `mem_heap_B` of any snapshot if that is higher (it cannot be, with
/// `--peak-inaccuracy=0.0`, unless massif's peak is placed by heap + extra).
fn parse_massif(path: &Path) -> Result<MassifPeak, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let (mut heap, mut extra) = (None, None);
    let (mut peak, mut max_heap) = (None, 0u64);
    let field = |line: &str, key: &str| -> Option<u64> {
        line.strip_prefix(key)?
            .strip_prefix('=')?
            .trim()
            .parse()
            .ok()
    };
    for line in text.lines() {
        if line.starts_with("snapshot=") {
            (heap, extra) = (None, None);
        } else if let Some(v) = field(line, "mem_heap_B") {
            heap = Some(v);
            max_heap = max_heap.max(v);
        } else if let Some(v) = field(line, "mem_heap_extra_B") {
            extra = Some(v);
        } else if line.trim() == "heap_tree=peak" {
            peak = heap.zip(extra);
        }
    }
    let (peak_heap, peak_extra) =
        peak.ok_or_else(|| format!("no peak snapshot in {}", path.display()))?;
    Ok(MassifPeak {
        peak_heap: peak_heap.max(max_heap),
        peak_extra,
    })
}

fn wait_with_timeout(
    mut child: std::process::Child,
    timeout: Duration,
) -> Result<std::process::Output, String> {
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => {
                return child
                    .wait_with_output()
                    .map_err(|e| format!("collecting valgrind's output: {e}"))
            }
            Ok(None) if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("valgrind still running after {timeout:?}: killed"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("waiting for valgrind: {e}")),
        }
    }
}

/// Removes the massif output file when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
