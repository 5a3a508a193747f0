//! `grandmodel train --ranks N` without MPI: the errors that say how to
//! build and launch a data-parallel run (exit code 8), the flag's help
//! and its place in `config show`. Runs in any build; the messages
//! differ with the `mpi` feature of this package. (The run itself under
//! `mpirun`: `train_mpi.rs`, feature `mpi`.)

use std::process::Command;

use anyhow::Result;

mod common;
use common::{config_line, env_remove_prefixed, stderr};

fn grandmodel(args: &[&str]) -> Command {
    let mut c = common::grandmodel(args);
    // Neither the config (`GM_*`, removed by `common::grandmodel`) nor an
    // MPI launcher's variables may leak in.
    env_remove_prefixed(&mut c, &["OMPI_", "PMI"]);
    c
}

#[test]
fn more_ranks_than_one_say_how_to_build_and_launch() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("o");
    let outs = out.to_str().unwrap();
    let o = grandmodel(&["train", "--ranks", "2", "--steps", "5", "--out", outs]).output()?;
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "one sentence: {e}");
    assert!(e.contains("run.ranks = 2"), "{e}");
    assert!(e.contains("mpirun -n 2") && e.contains("--ranks 2"), "{e}");
    if cfg!(feature = "mpi") {
        assert!(e.contains("not started by mpirun"), "{e}");
    } else {
        assert!(
            e.contains("cargo build --release -p gm-system --features mpi"),
            "{e}"
        );
    }
    // Nothing was started or written.
    assert!(!out.exists());

    // The rank count from the environment too.
    let o = grandmodel(&["train", "--steps", "5", "--out", outs])
        .env("GM_RUN_RANKS", "3")
        .output()?;
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(stderr(&o).contains("run.ranks = 3"), "{}", stderr(&o));
    Ok(())
}

#[test]
fn a_launcher_of_another_size_is_an_error_naming_both_numbers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let outs = dir.path().join("o");
    let outs = outs.to_str().unwrap();
    // One rank asked for, but the launcher says two processes: each would
    // train alone into the same directory.
    let o = grandmodel(&["train", "--steps", "5", "--out", outs])
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .env("OMPI_COMM_WORLD_RANK", "0")
        .output()?;
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("run.ranks = 1") && e.contains("mpirun started 2 process"),
        "{e}"
    );
    // Three asked for, two launched (the MPI build checks before MPI
    // starts; the plain build says how to build).
    let o = grandmodel(&["train", "--ranks", "3", "--steps", "5", "--out", outs])
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .env("OMPI_COMM_WORLD_RANK", "0")
        .output()?;
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    let e = stderr(&o);
    if cfg!(feature = "mpi") {
        assert!(
            e.contains("run.ranks = 3") && e.contains("mpirun started 2 process"),
            "{e}"
        );
    } else {
        assert!(e.contains("--features mpi"), "{e}");
    }
    // Out of range: a configuration error (exit 3).
    for bad in ["0", "1025", "two"] {
        let o = grandmodel(&["train", "--ranks", bad, "--out", outs]).output()?;
        assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
        assert!(stderr(&o).contains("run.ranks"), "{}", stderr(&o));
    }
    let o = grandmodel(&["train", "--set", "shard.stage=3", "--out", outs]).output()?;
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("shard.stage"), "{}", stderr(&o));
    Ok(())
}

#[test]
fn help_and_config_show_know_the_ranks() -> Result<()> {
    let o = grandmodel(&["train", "--help"]).output()?;
    assert_eq!(o.status.code(), Some(0));
    let help = String::from_utf8(o.stdout)?;
    assert!(help.contains("--ranks <N>"), "{help}");
    assert!(help.contains("MPI (data-parallel training"), "{help}");
    assert!(
        help.contains("cargo build --release -p gm-system --features mpi"),
        "{help}"
    );
    assert!(help.contains("mpirun -n N"), "{help}");
    let o = grandmodel(&["--help"]).output()?;
    let top = String::from_utf8(o.stdout)?;
    assert!(top.contains("8    data-parallel"), "{top}");

    let o = grandmodel(&["config", "show", "--ranks", "4", "--set", "shard.stage=1"])
        .env("GM_SHARD_TIMEOUT_SECS", "30")
        .output()?;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout)?;
    let line = |k: &str| config_line(&text, k);
    assert!(
        line("run.ranks").contains("= 4") && line("run.ranks").contains("# flag --ranks"),
        "{text}"
    );
    assert!(line("shard.stage").contains("= 1"), "{text}");
    assert!(
        line("shard.timeout_secs").contains("# env GM_SHARD_TIMEOUT_SECS"),
        "{text}"
    );
    assert!(
        line("shard.max_shard_bytes").contains("# default"),
        "{text}"
    );
    assert!(
        line("shard.rebalance_hot_fraction").contains("0.25"),
        "{text}"
    );
    Ok(())
}
