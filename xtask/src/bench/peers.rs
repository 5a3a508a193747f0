//! The Python peers of the `buffers` bench: `replay_peers.py` (from
//! `$GM_PEERS_DIR`, default `<root>/../shared/peers`) run in a venv at
//! `<root>/.venv-peers` that is created and filled on first use.
//!
//! Why the interpreter matters: cpprb 11.0.0 ships x86-64 wheels for CPython
//! 3.8–3.12 only. On 3.13+ pip builds its sdist, whose pre-generated C++ does
//! not compile against numpy 2 headers (`PyArray_Descr` has no `subarray`), and
//! numpy 1.x does not support 3.13+. So on a 3.13+ `python3` we look for an
//! older `python3.1x` for the venv; `$GM_PEERS_PYTHON` overrides the choice.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cmd_output, display_cmd, project_root, run_cmd};

/// The cases the buffers report compares against, in the script's order.
const CASES: &str = "membw,codec,numpy-ref,\
    cpprb-base,cpprb-nextof,cpprb-stack,cpprb-mmap,cpprb-per,cpprb-per-stack";
const PACKAGES: &[&str] = &["numpy", "cpprb", "lz4", "zstandard"];
/// Without cpprb the script still runs membw, codec and numpy-ref.
const PACKAGES_NO_CPPRB: &[&str] = &["numpy", "lz4", "zstandard"];
/// Interpreters tried, newest first, when `python3` is too new for cpprb's wheels.
const OLDER_PYTHONS: &[&str] = &["python3.12", "python3.11", "python3.10", "python3.9"];

/// Sets up the venv if needed and runs the peers, writing `json`.
/// Returns the command line that ran, for the report.
pub(crate) fn run(json: &Path, quick: bool) -> Result<String> {
    let script = peers_dir().join("replay_peers.py");
    if !script.is_file() {
        bail!(
            "{} not found (set GM_PEERS_DIR to the folder holding replay_peers.py)",
            script.display()
        );
    }
    let python = ensure_venv()?;
    let mut cmd = Command::new(&python);
    cmd.current_dir(project_root())
        .arg(&script)
        .args(["--cases", CASES])
        .arg("--json")
        .arg(json);
    if quick {
        cmd.arg("--quick");
    }
    let shown = display_cmd(&cmd);
    run_cmd(&mut cmd)?;
    Ok(shown)
}

fn peers_dir() -> PathBuf {
    match std::env::var_os("GM_PEERS_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => project_root().join("..").join("shared").join("peers"),
    }
}

/// Returns the venv's python, creating the venv and installing the packages
/// when they are not importable yet. Without cpprb it warns and goes on.
fn ensure_venv() -> Result<PathBuf> {
    let venv = project_root().join(".venv-peers");
    let python = venv.join("bin").join("python");
    if !python.exists() {
        let base = base_python()?;
        run_cmd(Command::new(&base).args(["-m", "venv"]).arg(&venv)).context(
            "could not create the peers venv (on Debian/Ubuntu: apt-get install python3-venv)",
        )?;
    }
    if importable(&python, PACKAGES) {
        return Ok(python);
    }
    let mut pip = pip_install(&python, PACKAGES);
    if let Err(err) = run_cmd(&mut pip) {
        eprintln!(
            "WARNING: {err:#}\n\
             WARNING: if cpprb is what failed: it has wheels for CPython 3.8-3.12 only and its \
             sdist does not build against numpy 2; recreate the venv with an older interpreter: \
             rm -rf {} && GM_PEERS_PYTHON=python3.12 cargo xtask bench buffers\n\
             WARNING: continuing without cpprb (membw, codec, numpy-ref only)",
            venv.display()
        );
        run_cmd(&mut pip_install(&python, PACKAGES_NO_CPPRB))
            .context("could not install numpy/lz4/zstandard into the peers venv either")?;
    }
    Ok(python)
}

fn pip_install(python: &Path, packages: &[&str]) -> Command {
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pip", "install", "--quiet"]).args(packages);
    cmd
}

fn importable(python: &Path, modules: &[&str]) -> bool {
    let code = format!("import {}", modules.join(", "));
    Command::new(python)
        .args(["-c", &code])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The interpreter that creates the venv: `$GM_PEERS_PYTHON`, else `python3`
/// unless it is 3.13+ and an older `python3.1x` is on PATH.
fn base_python() -> Result<String> {
    if let Some(p) = std::env::var_os("GM_PEERS_PYTHON").filter(|p| !p.is_empty()) {
        return Ok(p.to_string_lossy().into_owned());
    }
    let version = python_minor("python3")
        .context("python3 not found: install python3 (with python3-venv) or set GM_PEERS_PYTHON")?;
    if version < 13 {
        return Ok("python3".into());
    }
    match OLDER_PYTHONS.iter().find(|p| python_minor(p).is_some()) {
        Some(older) => {
            println!(
                "python3 is 3.{version}, which cpprb has no wheels for; using {older} for the venv"
            );
            Ok((*older).to_string())
        }
        None => {
            eprintln!(
                "WARNING: python3 is 3.{version} and no python3.9-3.12 is on PATH: cpprb will not \
                 install (no wheels, sdist needs numpy 1.x); set GM_PEERS_PYTHON to fix"
            );
            Ok("python3".into())
        }
    }
}

/// `3.x` -> `x`, or `None` if `python` does not run.
fn python_minor(python: &str) -> Option<u32> {
    let out =
        cmd_output(Command::new(python).args(["-c", "import sys; print(sys.version_info[1])"]))?;
    out.parse().ok()
}
