//! `cargo xtask ci`: the checks CI runs, in order, stopping at the first failure.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::{cargo, run_cmd};

/// A step: its name, the cargo arguments, extra environment variables.
type Step = (
    &'static str,
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
);

const STEPS: &[Step] = &[
    ("fmt", &["fmt", "--all", "--", "--check"], &[]),
    (
        "clippy",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    ),
    (
        "clippy (cuda feature)",
        &[
            "clippy",
            "-p",
            "gm-monitor",
            "-p",
            "gm-models",
            "--all-targets",
            "--features",
            "cuda",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    ),
    ("test", &["test", "--workspace"], &[]),
    (
        "doc",
        &["doc", "--workspace", "--no-deps"],
        &[("RUSTDOCFLAGS", "-D warnings")],
    ),
];

pub(crate) fn run() -> Result<()> {
    let start = Instant::now();
    let mut done: Vec<(&str, Duration)> = Vec::new();
    for &(name, args, envs) in STEPS {
        println!("\n==> ci step `{name}`");
        let mut cmd = cargo();
        cmd.args(args).envs(envs.iter().copied());
        let t = Instant::now();
        if let Err(err) = run_cmd(&mut cmd) {
            print_summary(&done);
            return Err(err.context(format!("ci FAILED at step `{name}`")));
        }
        done.push((name, t.elapsed()));
    }
    print_summary(&done);
    println!("ci passed in {:.1?}", start.elapsed());
    Ok(())
}

fn print_summary(done: &[(&str, Duration)]) {
    for (name, took) in done {
        println!("  ok  {name:<8} {took:.1?}");
    }
}
