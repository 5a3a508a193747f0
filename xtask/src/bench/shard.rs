//! `cargo xtask bench shard [ARGS]`: ZeRO data parallelism over MPI. Runs
//! gm-train's `shard_bench` example in release mode with the `mpi` feature
//! (ARGS go to it: `--ranks 1,2,4`, `--agent full|small`, `--batch`,
//! `--steps`, `--stage 1|2`); it relaunches itself under `mpirun -n N` for
//! each rank count. Writes its JSON to `target/bench/shard.json` (`ranks`,
//! `optimizer_state_bytes_per_rank`, `comm_fraction`,
//! `parity_max_abs_diff`, … as arrays aligned with `ranks`) and
//! `target/bench/shard.md`. Needs Open MPI (`mpirun`, libopenmpi-dev) and
//! libclang to build the `mpi` crate.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use super::report::RunInfo;
use super::train::{mib, num, pct};
use super::{fresh_outputs, run_example_json, write_reports};

const CRATE: &str = "gm-train";
const EXAMPLE: &str = "shard_bench";
/// The seed report's claim for the time spent communicating.
const SEED_COMM_FRACTION: f64 = 0.02;

pub(crate) fn run(args: &[String], dir: &Path) -> Result<()> {
    let (json_path, md_path) = fresh_outputs(dir, "shard")?;
    let mut info = RunInfo::collect();
    let obj = run_example_json(CRATE, EXAMPLE, Some("mpi"), args, &mut info)
        .context("it needs Open MPI (apt-get install libopenmpi-dev openmpi-bin libclang-dev)")?;
    let value = Value::Object(obj);
    let mut md = format!(
        "# gm-shard / gm-train: ZeRO data parallelism over MPI\n\n\
         Measured {} on {} ({} cores), {}.\n\n",
        info.date, info.cpu, info.cores, info.rustc
    );
    md.push_str(&render(&value));
    md.push_str(&format!(
        "\nCommand: `{}`\n",
        info.commands.join("` then `")
    ));
    write_reports(&json_path, &md_path, &value, &md)
}

/// The table and its explanation (also BENCHMARKS.md's `shard` block).
pub(crate) fn render(v: &Value) -> String {
    let arr = |k: &str| -> Vec<Option<f64>> {
        v.get(k)
            .and_then(Value::as_array)
            .map(|a| a.iter().map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    let ranks = arr("ranks");
    let state = arr("optimizer_state_bytes_per_rank");
    let formula = arr("optimizer_state_bytes_formula");
    let grad = arr("grad_buffer_bytes_per_rank");
    let step = arr("step_ms");
    let comm = arr("comm_fraction");
    let wait = arr("wait_fraction");
    let sent = arr("bytes_sent_per_step");
    let parity = arr("parity_max_abs_diff");
    let at = |c: &[Option<f64>], i: usize| c.get(i).copied().flatten();
    let mut md = format!(
        "The {} agent ({} parameters, f32 AdamW), ZeRO stage {}, one global batch of {} \
         rows split over the ranks, {} timed steps after a warm-up, each rank a process \
         under `mpirun` on this machine (ranks beyond the cores are oversubscribed). \
         *Optimizer state* is what each rank holds of AdamW's moments (the largest rank; \
         the ZeRO formula is `8Ψ/N` bytes for f32 moments); *in collectives* is the time \
         inside the step's reduce and all-gather once every rank has arrived, *waiting* a \
         barrier between the backward pass and the ZeRO step (ranks finishing their \
         backward pass at different times: load imbalance, here ranks sharing cores), both as a fraction of \
         the slowest rank's step time. *Parity* is the largest |Δw| between rank 0's \
         parameters and one process stepping the whole batch.\n\n\
         | ranks | optimizer state / rank | ZeRO formula | gradient buffer / rank | step ms | in collectives | waiting | sent / rank / step | parity max abs diff |\n\
         |--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
        v.get("agent").and_then(Value::as_str).unwrap_or("?"),
        num(v.get("params").and_then(Value::as_f64), 0),
        v.get("stage").and_then(Value::as_str).unwrap_or("?"),
        num(v.get("batch").and_then(Value::as_f64), 0),
        num(v.get("steps").and_then(Value::as_f64), 0),
    );
    for i in 0..ranks.len() {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            num(at(&ranks, i), 0),
            mib(at(&state, i)),
            mib(at(&formula, i)),
            mib(at(&grad, i)),
            num(at(&step, i), 0),
            pct(at(&comm, i)),
            pct(at(&wait, i)),
            mib(at(&sent, i)),
            at(&parity, i).map_or("-".into(), |d| format!("{d:.1e}")),
        ));
    }
    let worst = comm.iter().flatten().copied().fold(f64::NAN, f64::max);
    md.push_str(&format!(
        "\nThe seed claimed < {:.0} % of step time in communication; measured here up to \
         {} (MPI over shared memory on one machine, ranks sharing its cores).\n",
        100.0 * SEED_COMM_FRACTION,
        pct((!worst.is_nan()).then_some(worst)),
    ));
    md
}
