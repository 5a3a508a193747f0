//! `cargo xtask cuda-check`: what CUDA this machine has, whether the kernel
//! sources compile (NVRTC), and, where there is a device, the CUDA parity
//! tests and the sparse-attention bench. A thin orchestration of cargo
//! commands (gm-models' `tests/cuda.rs` and `examples/cuda_attention_bench.rs`
//! do the work).
//!
//! - `cargo xtask cuda-check`: probe (the bench example with `--info`), the
//!   `kernels_compile_to_ptx` test with `--features cuda` (required to pass
//!   when NVRTC is present), then on a device the parity tests
//!   (`GM_REQUIRE_CUDA=1`), gm-shard's NCCL collectives test and the bench, whose JSON line goes to
//!   `target/cuda-check/bench.json`, and gm-train's `gpu_check` (the learner
//!   and the training step on candle's CUDA backend against the CPU, and the
//!   out-of-memory retry on a really full device; feature `candle-cuda`,
//!   needs `nvcc`), whose JSON goes to `target/cuda-check/gpu_check.json`.
//!   Without a device it says so and exits 0 (non-zero with
//!   `GM_REQUIRE_CUDA=1`).
//! - `cargo xtask cuda-check --bundle [DIR]`: builds the CUDA test binary and
//!   the bench (release, `--features cuda`), and `gpu_check` (release,
//!   `--features candle-cuda`, in its own target directory
//!   `target/candle-cuda`: candle links cudarc dynamically, our `cuda`
//!   feature loads it at run time, and cudarc takes one or the other per
//!   build) into `DIR` (default `target/cuda-bundle`) with a `run.sh`, for a
//!   GPU machine that has no Rust toolchain: carry `DIR`, run
//!   `bash DIR/run.sh`, read `$OUT`. The candle build needs a CUDA 13.0
//!   toolkit: `GM_CUDA_DIR` (a directory made by
//!   `../shared/cuda/setup-cuda-root.sh`, with its `env.sh`), else
//!   `target/cuda13`, made with that script when it is missing (~1 GB of
//!   PyPI wheels; the cold candle build then took 9–18 min on 2 cores).
//!
//! NVRTC is looked up as cudarc does (`LD_LIBRARY_PATH`); when that does not
//! name it, the venv `.ci/run` installs (`target/nvrtc-venv`, or the
//! directory in `GM_NVRTC_LIB_DIR`) is added for the cargo commands.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{cargo, display_cmd, project_root, run_cmd};

pub(crate) const USAGE: &str =
    "  cuda-check               CUDA driver/NVRTC/device report, kernel compile check (NVRTC),
                           and on a GPU the CUDA parity tests and bench -> target/cuda-check/
  cuda-check --bundle [DIR]
                           build the CUDA tests + bench and gm-train's gpu_check
                           (candle's CUDA backend) for a GPU machine without Rust
                           into DIR (default target/cuda-bundle) with a run.sh
";

pub(crate) fn run(args: &[String]) -> Result<()> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        [] => check(),
        ["--bundle"] => bundle(&project_root().join("target/cuda-bundle")),
        ["--bundle", dir] => bundle(&project_root().join(dir)),
        _ => {
            print!("usage: cargo xtask\n{USAGE}");
            bail!("unexpected arguments {args:?}")
        }
    }
}

fn require_cuda() -> bool {
    std::env::var("GM_REQUIRE_CUDA").is_ok_and(|v| v == "1")
}

/// `cargo <args>` for gm-models with the `cuda` feature, with NVRTC's
/// directory on `LD_LIBRARY_PATH` when we know one that is not there.
fn cuda_cargo(args: &[&str]) -> Command {
    let mut cmd = cargo();
    cmd.args(args);
    if let Some(dir) = nvrtc_lib_dir() {
        let current = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
        let dir = dir.display().to_string();
        if !current.split(':').any(|p| p == dir) {
            let joined = if current.is_empty() {
                dir
            } else {
                format!("{dir}:{current}")
            };
            cmd.env("LD_LIBRARY_PATH", joined);
        }
    }
    cmd
}

/// `GM_NVRTC_LIB_DIR`, or the lib directory of the NVRTC wheel in
/// `target/nvrtc-venv` (where `.ci/run` installs it), if it exists.
fn nvrtc_lib_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("GM_NVRTC_LIB_DIR") {
        return Some(PathBuf::from(dir));
    }
    let lib = project_root().join("target/nvrtc-venv/lib");
    std::fs::read_dir(&lib)
        .ok()?
        .flatten()
        .map(|python| python.path().join("site-packages/nvidia/cuda_nvrtc/lib"))
        .find(|dir| dir.is_dir())
}

/// Runs `cmd` with stdout captured (stderr inherited) after echoing it;
/// fails on a non-zero exit; returns stdout.
fn run_capture(cmd: &mut Command) -> Result<String> {
    let shown = display_cmd(cmd);
    println!("$ {shown}");
    let start = Instant::now();
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        print!("{stdout}");
        bail!(
            "`{shown}` failed ({}) after {:.1?}",
            out.status,
            start.elapsed()
        );
    }
    Ok(stdout)
}

/// The last line of `stdout`, as JSON.
fn last_json(stdout: &str) -> Result<Value> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("no output")?;
    serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))
}

fn check() -> Result<()> {
    let start = Instant::now();
    println!("==> cuda-check: what is present");
    let info = last_json(&run_capture(&mut cuda_cargo(&[
        "run",
        "-q",
        "-p",
        "gm-models",
        "--features",
        "cuda",
        "--example",
        "cuda_attention_bench",
        "--",
        "--info",
    ]))?)?;
    let nvrtc = info["nvrtc"].as_bool().unwrap_or(false);
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    println!(
        "  CUDA driver (libcuda): {}",
        yes_no(info["driver"].as_bool().unwrap_or(false))
    );
    println!(
        "  NVRTC (libnvrtc):      {}{}",
        yes_no(nvrtc),
        info["nvrtc_version"]
            .as_str()
            .map(|v| format!(" {v}"))
            .unwrap_or_default()
    );
    let device = info["device"]["name"].as_str().map(|name| {
        format!(
            "cuda:0 = {name} (compute capability {})",
            info["device"]["compute_capability"].as_str().unwrap_or("?")
        )
    });
    let why_not = info["device"]["unavailable"]
        .as_str()
        .unwrap_or("unknown reason")
        .to_string();
    println!(
        "  device:                {}",
        device.as_deref().unwrap_or(&format!("none ({why_not})"))
    );

    println!("\n==> cuda-check: the kernel sources compile (NVRTC)");
    let mut compile = cuda_cargo(&[
        "test",
        "-p",
        "gm-models",
        "--features",
        "cuda",
        "--test",
        "cuda",
        "--",
        "kernels_compile_to_ptx",
        "--nocapture",
    ]);
    if nvrtc {
        compile.env("GM_REQUIRE_NVRTC", "1");
    }
    run_cmd(&mut compile)?;
    if !nvrtc {
        println!(
            "NVRTC not found: the kernel sources were NOT compiled (pip install \
             nvidia-cuda-nvrtc-cu12 and put its nvidia/cuda_nvrtc/lib on LD_LIBRARY_PATH, \
             or run .ci/run once to create target/nvrtc-venv)"
        );
    }

    let Some(device) = device else {
        println!("\nno CUDA device ({why_not}): the CUDA parity tests and the bench were skipped");
        if require_cuda() {
            bail!("GM_REQUIRE_CUDA=1 but there is no CUDA device");
        }
        println!("cuda-check done in {:.1?}", start.elapsed());
        return Ok(());
    };

    println!("\n==> cuda-check: parity tests on {device}");
    let mut tests = cuda_cargo(&[
        "test",
        "--release",
        "-p",
        "gm-models",
        "--features",
        "cuda",
        "--test",
        "cuda",
        "--",
        "--nocapture",
        "--test-threads",
        "1",
    ]);
    tests
        .env("GM_REQUIRE_CUDA", "1")
        .env("GM_REQUIRE_NVRTC", "1");
    run_cmd(&mut tests)?;

    println!("\n==> cuda-check: NCCL collectives (gm-shard) on {device}");
    let mut nccl = cuda_cargo(&[
        "test",
        "--release",
        "-p",
        "gm-shard",
        "--features",
        "cuda",
        "--test",
        "nccl",
        "--",
        "--nocapture",
    ]);
    nccl.env("GM_REQUIRE_CUDA", "1");
    run_cmd(&mut nccl)?;

    println!("\n==> cuda-check: sparse attention bench on {device}");
    let stdout = run_capture(&mut cuda_cargo(&[
        "run",
        "--release",
        "-q",
        "-p",
        "gm-models",
        "--features",
        "cuda",
        "--example",
        "cuda_attention_bench",
    ]))?;
    print!("{stdout}");
    let bench = last_json(&stdout)?;
    let dir = project_root().join("target/cuda-check");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("bench.json");
    std::fs::write(&path, format!("{bench:#}\n"))?;
    println!("wrote {}", path.display());

    println!("\n==> cuda-check: gm-train on {device} (candle's CUDA backend) against the CPU");
    let stdout = run_capture(
        cargo()
            .args([
                "run",
                "--release",
                "-q",
                "-p",
                "gm-train",
                "--features",
                "candle-cuda",
                "--example",
                "gpu_check",
            ])
            .arg("--target-dir")
            .arg(project_root().join(CANDLE_TARGET))
            .args(["--", "--device", "cuda:0"]),
    )?;
    let report = last_json(&stdout)?;
    let path = dir.join("gpu_check.json");
    std::fs::write(&path, format!("{report:#}\n"))?;
    println!("wrote {}", path.display());
    println!("cuda-check done in {:.1?}", start.elapsed());
    Ok(())
}

/// The script that runs a bundle on the GPU machine.
const RUN_SH: &str = r#"#!/usr/bin/env bash
# Made by `cargo xtask cuda-check --bundle`: runs gm-train's gpu_check (learner and
# training step on candle's CUDA backend vs the CPU, the out-of-memory retry on a
# full device), the gm-models CUDA parity tests (GM_REQUIRE_CUDA=1), gm-shard's NCCL
# collectives test and the sparse-attention bench on a GPU machine that has no Rust
# toolchain. Results under $OUT (default: ./out next to this script): info.json,
# gpu_check.json/.log/.ldd, tests.log, nccl.log, bench.log, bench.json.
# Exit status non-zero if any fails.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out"

# cudarc (built for CUDA 12.8) loads libnvrtc.so or libnvrtc.so.12, never
# libnvrtc.so.13: link libnvrtc.so to whichever exists, and keep its directory
# (libnvrtc-builtins) on the path too.
links=$(mktemp -d)
nvrtc=""
dirs=(${GM_NVRTC_DIR:-})
while IFS= read -r d; do dirs+=("$d"); done < <(python3 -c '
import glob, site
for p in site.getsitepackages() + [site.getusersitepackages()]:
    for d in sorted(glob.glob(p + "/nvidia/*/lib")): print(d)
' 2>/dev/null)
dirs+=(/usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu)
for d in "${dirs[@]}"; do
    for f in "$d/libnvrtc.so" "$d/libnvrtc.so.12" "$d/libnvrtc.so.13"; do
        if [[ -e $f ]]; then nvrtc=$f; break 2; fi
    done
done
if [[ -n $nvrtc ]]; then
    ln -sf "$nvrtc" "$links/libnvrtc.so"
    export LD_LIBRARY_PATH="$links:$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "NVRTC: $nvrtc"
else
    echo "NVRTC: not found (set GM_NVRTC_DIR to the directory of libnvrtc.so.*)" >&2
fi

"$here/cuda_attention_bench" --info | tee "$out/info.json"
# gm-train on candle's CUDA backend (issue 6): links libcudart.so.13,
# libcublas(Lt).so.13 and libcurand.so.10, from the CUDA-13 pip libraries
# (nvidia/cu13/lib) or the system's.
for d in "${dirs[@]}"; do
    for f in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10; do
        if [[ -e $d/$f ]]; then
            export LD_LIBRARY_PATH="$d:$LD_LIBRARY_PATH"
            break
        fi
    done
done
gpu_check=$links/gpu_check
gunzip -c "$here/gpu_check.gz" > "$gpu_check" && chmod +x "$gpu_check"
ldd "$gpu_check" > "$out/gpu_check.ldd" 2>&1
grep "not found" "$out/gpu_check.ldd" >&2
"$gpu_check" --device cuda:0 --out "$out/gpu_check.json" > "$out/gpu_check.log" 2>&1
rc_train=$?
grep -E "==>|PASS|FAIL|error" "$out/gpu_check.log" | cut -c1-400 | tail -n 20
GM_REQUIRE_CUDA=1 GM_REQUIRE_NVRTC=1 "$here/cuda-tests" --nocapture --test-threads 1 \
    > "$out/tests.log" 2>&1
rc_tests=$?
grep -E "^test |test result|max \|err\||panicked" "$out/tests.log" | tail -n 40
# NCCL (libnccl.so.2) from the pip packages PyTorch brings (nvidia/nccl/lib).
for d in "${dirs[@]}"; do
    if [[ -e $d/libnccl.so.2 || -e $d/libnccl.so ]]; then
        export LD_LIBRARY_PATH="$d:$LD_LIBRARY_PATH"
        echo "NCCL: $d"
        break
    fi
done
GM_REQUIRE_CUDA=1 "$here/nccl-tests" --nocapture > "$out/nccl.log" 2>&1
rc_nccl=$?
grep -E "^test |test result|panicked|skipped" "$out/nccl.log" | tail -n 20
"$here/cuda_attention_bench" > "$out/bench.log" 2>&1
rc_bench=$?
tail -n 4 "$out/bench.log"
tail -n 1 "$out/bench.log" > "$out/bench.json"
echo "gpu_check: exit $rc_train, tests: exit $rc_tests, nccl: exit $rc_nccl, bench: exit $rc_bench"
exit $((rc_train != 0 || rc_tests != 0 || rc_nccl != 0 || rc_bench != 0))
"#;

/// Builds test target `test` of package `pkg` (release, `--features
/// cuda`) without running it; returns its executable.
fn test_executable(pkg: &str, test: &str) -> Result<PathBuf> {
    let stdout = run_capture(&mut cuda_cargo(&[
        "test",
        "--release",
        "-p",
        pkg,
        "--features",
        "cuda",
        "--test",
        test,
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]))?;
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == test)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo did not report the `{test}` test executable"))
}

/// The target directory of the `candle-cuda` build (relative to the
/// project root): never shared with a `cuda` build (see the module docs).
const CANDLE_TARGET: &str = "target/candle-cuda";

/// A CUDA 13.0 toolkit directory with an `env.sh`: `GM_CUDA_DIR`, else
/// `target/cuda13`, made by `../shared/cuda/setup-cuda-root.sh` if missing.
fn cuda_toolkit_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("GM_CUDA_DIR") {
        let dir = PathBuf::from(dir);
        if !dir.join("env.sh").is_file() {
            bail!("GM_CUDA_DIR={} has no env.sh", dir.display());
        }
        return Ok(dir);
    }
    let dir = project_root().join("target/cuda13");
    if dir.join("env.sh").is_file() {
        return Ok(dir);
    }
    let script = project_root().join("../shared/cuda/setup-cuda-root.sh");
    if !script.is_file() {
        bail!(
            "no CUDA toolkit for candle's CUDA build: set GM_CUDA_DIR to a directory made by \
             setup-cuda-root.sh (it has env.sh), or provide {}",
            script.display()
        );
    }
    println!(
        "==> making a CUDA 13.0 toolkit from PyPI wheels in {}",
        dir.display()
    );
    run_cmd(Command::new("bash").arg(&script).arg(&dir))?;
    Ok(dir)
}

/// Builds gm-train's `gpu_check` example with candle's CUDA backend
/// (release, in [`CANDLE_TARGET`]); returns the executable.
fn build_gpu_check() -> Result<PathBuf> {
    let toolkit = cuda_toolkit_dir()?;
    println!("==> building gpu_check with candle's CUDA backend (a cold build took 9-18 min here)");
    let mut cmd = Command::new("bash");
    cmd.current_dir(project_root()).args([
        "-c",
        r#". "$1/env.sh" && exec cargo build --release -q -p gm-train --features candle-cuda \
             --target-dir "$2" --example gpu_check"#,
        "build-gpu-check",
    ]);
    cmd.arg(&toolkit).arg(CANDLE_TARGET);
    run_cmd(&mut cmd)?;
    Ok(project_root()
        .join(CANDLE_TARGET)
        .join("release/examples/gpu_check"))
}

/// Builds the CUDA test binary, the bench (release, `--features cuda`) and
/// `gpu_check` (`--features candle-cuda`) into `dir` with `run.sh`.
fn bundle(dir: &Path) -> Result<()> {
    println!("==> cuda-check --bundle: building the CUDA tests and the bench (release)");
    let tests = test_executable("gm-models", "cuda")?;
    run_cmd(&mut cuda_cargo(&[
        "build",
        "--release",
        "-q",
        "-p",
        "gm-models",
        "--features",
        "cuda",
        "--example",
        "cuda_attention_bench",
    ]))?;
    let bench = project_root().join("target/release/examples/cuda_attention_bench");
    let nccl = test_executable("gm-shard", "nccl")?;
    let gpu_check = build_gpu_check()?;

    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut total = 0;
    for (src, name) in [
        (&tests, "cuda-tests"),
        (&nccl, "nccl-tests"),
        (&bench, "cuda_attention_bench"),
        (&gpu_check, "gpu_check"),
    ] {
        let dst = dir.join(name);
        std::fs::copy(src, &dst)
            .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        // Best effort: the release profile keeps line tables.
        let _ = Command::new("strip").arg(&dst).status();
        // candle's CUDA kernels make gpu_check ~60 MB stripped, mostly PTX
        // text: gzip brings it to ~14 MB, under the GPU machine's carry
        // limit with the rest; run.sh unpacks it.
        let dst = if name == "gpu_check" {
            run_cmd(Command::new("gzip").args(["-9", "-f"]).arg(&dst))?;
            dir.join("gpu_check.gz")
        } else {
            dst
        };
        let size = std::fs::metadata(&dst)?.len();
        total += size;
        println!(
            "  {} ({:.1} MiB)",
            dst.display(),
            size as f64 / (1 << 20) as f64
        );
    }
    let script = dir.join("run.sh");
    std::fs::write(&script, RUN_SH)?;
    println!("  {}", script.display());
    let rel = dir.strip_prefix(project_root()).unwrap_or(dir);
    println!(
        "bundle: {:.1} MiB. On the GPU machine: carry [\"{}\"], run `bash {}/run.sh` \
         (results under $OUT)",
        total as f64 / (1 << 20) as f64,
        rel.display(),
        rel.display()
    );
    Ok(())
}
