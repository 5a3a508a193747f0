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
        "gpu_check on the CPU (the GPU check's out-of-memory twin)",
        &[
            "run",
            "-q",
            "-p",
            "gm-train",
            "--example",
            "gpu_check",
            "--",
            "--device",
            "cpu",
            "--quick",
        ],
        &[],
    ),
    (
        "clippy (gm-shard mpi + cuda)",
        &[
            "clippy",
            "-p",
            "gm-shard",
            "--all-targets",
            "--features",
            "mpi,cuda",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    ),
    (
        "clippy (gm-train mpi)",
        &[
            "clippy",
            "-p",
            "gm-train",
            "--all-targets",
            "--features",
            "mpi",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    ),
    (
        "test (MPI collectives, 2 and 4 ranks)",
        &[
            "test",
            "-p",
            "gm-shard",
            "--features",
            "mpi",
            "--test",
            "mpi",
        ],
        &[],
    ),
    (
        "clippy (gm-system + e2e mpi)",
        &[
            "clippy",
            "-p",
            "gm-system",
            "-p",
            "grandmodel-e2e",
            "--all-targets",
            "--features",
            "gm-system/mpi,grandmodel-e2e/mpi",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    ),
    (
        "test (train --ranks 2 under mpirun)",
        &[
            "test",
            "-p",
            "grandmodel-e2e",
            "--features",
            "mpi",
            "--test",
            "train_mpi",
        ],
        &[],
    ),
    (
        "test (ZeRO over MPI, 2 and 4 ranks)",
        &[
            "test",
            "-p",
            "gm-train",
            "--features",
            "mpi",
            "--test",
            "zero_mpi",
        ],
        &[],
    ),
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
        println!("  ok  {name:<38} {took:.1?}");
    }
}
