//! `cargo xtask`: workspace automation that needs more than a cargo alias.
//!
//! - `cargo xtask ci`: fmt check, clippy with `-D warnings`, tests, and docs with
//!   `-D warnings`, stopping at the first failing step.
//! - `cargo xtask bench [NAME|list|regen] [ARGS]`: run every bench and
//!   regenerate BENCHMARKS.md's tables, or run one (its report under
//!   `target/bench/`), list them, or only regenerate.
//! - `cargo xtask cuda-check [--bundle [DIR]]`: CUDA driver/NVRTC/device report, the
//!   kernel compile check, and on a GPU the CUDA parity tests and bench (see
//!   `xtask/src/cuda_check.rs`).
//!
//! Only `anyhow` and `serde_json` are used; every external tool is run through
//! [`std::process::Command`] with its exact command line echoed first.

mod bench;
mod ci;
mod cuda_check;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  ci                       cargo fmt --check, clippy -D warnings, test, doc -D warnings
  bench                    run every bench and regenerate BENCHMARKS.md's tables
  bench <name> [args]      run one bench and write target/bench/<name>.md
  bench list               list the available benches
  bench regen              rewrite BENCHMARKS.md's tables from target/bench/*.json
";

fn main() {
    if let Err(err) = run() {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((cmd, rest)) => (cmd.as_str(), rest),
        None => {
            print!("{USAGE}{}", cuda_check::USAGE);
            bail!("no command given");
        }
    };
    match cmd {
        "ci" => {
            if let Some(extra) = rest.first() {
                bail!("`ci` takes no arguments, got `{extra}`");
            }
            ci::run()
        }
        "bench" => bench::run(rest),
        "cuda-check" => cuda_check::run(rest),
        "-h" | "--help" | "help" => {
            print!("{USAGE}{}", cuda_check::USAGE);
            Ok(())
        }
        other => {
            print!("{USAGE}{}", cuda_check::USAGE);
            bail!("unknown command `{other}`")
        }
    }
}

/// The workspace root: the parent of this package's directory.
fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// A `cargo` command running in the workspace root, using the cargo that
/// started us (`$CARGO`) so nested builds use the same toolchain.
fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(project_root());
    cmd
}

/// The command line as a shell user would type it: environment overrides,
/// program and arguments. Paths under the workspace root are shown relative
/// to it.
fn display_cmd(cmd: &Command) -> String {
    let root = project_root();
    let shorten = |s: &std::ffi::OsStr| -> String {
        let s = s.to_string_lossy();
        match Path::new(s.as_ref()).strip_prefix(&root) {
            Ok(rel) if !rel.as_os_str().is_empty() => rel.display().to_string(),
            _ => s.into_owned(),
        }
    };
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| {
            Some(format!(
                "{}={}",
                k.to_string_lossy(),
                quote(&v?.to_string_lossy())
            ))
        })
        .collect();
    let program = cmd.get_program().to_string_lossy();
    // `$CARGO` is an absolute path into the toolchain; show it as `cargo`.
    let program = match Path::new(program.as_ref()).file_name() {
        Some(name) if name == "cargo" => "cargo".to_string(),
        _ => shorten(cmd.get_program()),
    };
    parts.push(program);
    parts.extend(cmd.get_args().map(|a| quote(&shorten(a))));
    parts.join(" ")
}

/// Single-quotes a shell word that is empty or holds whitespace.
fn quote(s: &str) -> String {
    if s.is_empty() || s.contains(char::is_whitespace) {
        format!("'{s}'")
    } else {
        s.to_string()
    }
}

/// Runs `cmd` with inherited stdio after echoing it; fails on a non-zero exit.
fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = display_cmd(cmd);
    println!("$ {shown}");
    let start = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status}) after {:.1?}", start.elapsed());
    }
    Ok(())
}

/// Runs `cmd` and returns its trimmed stdout, or `None` if it cannot start or
/// fails. For best-effort facts such as `rustc -V`.
fn cmd_output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
