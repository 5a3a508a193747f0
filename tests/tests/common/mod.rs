//! Helpers the end-to-end tests share (`mod common;` in each): running the
//! `grandmodel` program with a clean environment and the tiny run's
//! settings, reading its outputs and reports, and waiting for a line on a
//! running child's stdout or stderr. (`common/mod.rs`, not `common.rs`, so
//! that Cargo does not build it as a test of its own.)

#![allow(dead_code)] // each test file uses a subset

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Output};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The `grandmodel` program built in this package.
pub const BIN: &str = env!("CARGO_BIN_EXE_grandmodel-e2e");

/// A tiny run: few bars, a small batch, early updates, no step planning
/// beyond two measurements, quick monitor samples.
pub const TINY: &[&str] = &[
    "--set",
    "run.synthetic_bars=4000",
    "--set",
    "run.eval_episodes=3",
    "--set",
    "run.log_every_steps=10",
    "--set",
    "run.learning_starts_transitions=160",
    "--set",
    "training.target_effective_batch=16",
    "--set",
    "training.batch_auto_scale=false",
    "--set",
    "training.mixed_precision=false",
    "--set",
    "training.gradient_checkpointing=false",
    "--set",
    "memory.monitor_interval_secs=0.2",
    "--set",
    "memory.leak_check_interval_secs=0.05",
];

/// Removes from `c`'s environment every variable of this process whose
/// name starts with one of `prefixes`.
pub fn env_remove_prefixed(c: &mut Command, prefixes: &[&str]) {
    for (k, _) in std::env::vars() {
        if prefixes.iter().any(|p| k.starts_with(p)) {
            c.env_remove(k);
        }
    }
}

/// The config must come from the test, not from the environment: removes
/// every `GM_*` variable from `c`'s environment.
pub fn clean_env(c: &mut Command) {
    env_remove_prefixed(c, &["GM_"]);
}

/// `grandmodel ARGS` as one plain process, with a [`clean_env`].
pub fn grandmodel(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args);
    clean_env(&mut c);
    c
}

/// `train --steps STEPS --out OUT` with the [`TINY`] settings and `extra`.
pub fn train_args<'a>(out: &'a str, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["train", "--steps", steps, "--out", out];
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    args
}

/// The process's stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The process's stdout and stderr, labelled, for an assertion message.
pub fn text(o: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The JSON document in the file at `path`.
pub fn json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)?;
    Ok(serde_json::from_str(&text)?)
}

/// The run's `report.json` in `out`.
pub fn report(out: &Path) -> Result<Value> {
    json(&out.join("report.json"))
}

/// The run's `metrics.jsonl` in `out`, one value a line.
pub fn metrics(out: &Path) -> Result<Vec<Value>> {
    std::fs::read_to_string(out.join("metrics.jsonl"))?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

/// The bytes of a component in the report's memory section.
pub fn component(r: &Value, name: &str) -> Option<u64> {
    r["memory"]["components"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)?["bytes"]
        .as_u64()
}

/// The line of `config show`'s output that starts with `key` (empty when
/// there is none).
pub fn config_line(text: &str, key: &str) -> String {
    text.lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_default()
        .to_string()
}

/// The step K of the `interrupted at step K` message in `text`.
pub fn interrupted_step(text: &str) -> Result<u64> {
    Ok(text
        .split("interrupted at step ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .context("the interrupt message")?
        .parse()?)
}

/// One output stream of a running child, read line by line into a channel
/// by a thread (which ends with the stream), to wait for a line on it.
pub struct Lines {
    rx: mpsc::Receiver<String>,
    /// "stdout" or "stderr", for the error messages.
    stream: &'static str,
}

impl Lines {
    /// `child`'s stdout, which must be piped.
    pub fn stdout(child: &mut Child) -> Lines {
        Lines::read(child.stdout.take().expect("piped"), "stdout")
    }

    /// `child`'s stderr, which must be piped.
    pub fn stderr(child: &mut Child) -> Lines {
        Lines::read(child.stderr.take().expect("piped"), "stderr")
    }

    fn read(pipe: impl Read + Send + 'static, stream: &'static str) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines { rx, stream }
    }

    /// The next line that contains `what`, waiting at most `timeout`; an
    /// error listing the lines seen when none comes.
    pub fn containing(&self, what: &str, timeout: Duration) -> Result<String> {
        self.first(timeout, |l| l.contains(what), || format!("with {what:?}"))
    }

    /// The next line that starts with `prefix`, waiting at most `timeout`;
    /// an error listing the lines seen when none comes.
    pub fn starting_with(&self, prefix: &str, timeout: Duration) -> Result<String> {
        self.first(
            timeout,
            |l| l.starts_with(prefix),
            || format!("starting with {prefix:?}"),
        )
    }

    fn first(
        &self,
        timeout: Duration,
        wanted: impl Fn(&str) -> bool,
        describe: impl Fn() -> String,
    ) -> Result<String> {
        let end = Instant::now() + timeout;
        let mut seen = Vec::new();
        while Instant::now() < end {
            match self.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) if wanted(&l) => return Ok(l),
                Ok(l) => seen.push(l),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => break,
            }
        }
        bail!("no line {} on {}; saw: {seen:?}", describe(), self.stream)
    }
}
