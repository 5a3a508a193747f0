//! `cargo xtask bench train [ARGS]`: runs gm-train's `train_memory` example
//! in release mode (ARGS are passed on to it: `--batch`, `--micro`,
//! `--segments`, `--reps`, `--budget-mib`, `--replay`, …), writes its
//! last-line JSON to `target/bench/train.json` (flat keys) and
//! `target/bench/train.md`: the measured memory table of one GrandModel
//! training step beside the seed report's claims and issue 6's targets,
//! the batch a budget holds, and the replay bytes.

use std::path::Path;

use super::{fresh_outputs, run_example_json, write_reports};
use anyhow::Result;
use serde_json::Value;

use super::report::RunInfo;

const CRATE: &str = "gm-train";
const EXAMPLE: &str = "train_memory";

/// The configurations of the example, in table order, with what they use.
pub(crate) const CONFIGS: &[(&str, &str)] = &[
    ("baseline", "f32, plain backprop, whole batch"),
    ("checkpointing", "segment checkpointing (f32)"),
    ("bf16", "bf16 working copy over f32 masters"),
    ("accumulation", "gradient accumulation (f32)"),
    ("ckpt_accum", "checkpointing + accumulation (f32)"),
    ("all", "checkpointing + bf16 + accumulation"),
];

/// Issue 6's targets.
const ALL_PEAK_MAX: f64 = 0.40;
const ALL_TIME_MAX: f64 = 1.5;
const CKPT_ACTIVATION_MAX: f64 = 0.60;
const CKPT_TIME_MAX: f64 = 1.35;
/// The seed report's figure for all techniques together (peak / baseline).
const SEED_ALL_PEAK: f64 = 0.51;

pub(crate) fn run(args: &[String], dir: &Path) -> Result<()> {
    let (json_path, md_path) = fresh_outputs(dir, "train")?;
    let mut info = RunInfo::collect();
    info.commands.push(if args.is_empty() {
        "cargo xtask bench train".into()
    } else {
        format!("cargo xtask bench train {}", args.join(" "))
    });
    let obj = run_example_json(CRATE, EXAMPLE, None, args, &mut info)?;
    let value = Value::Object(obj);
    let md = render(&value, &info);
    write_reports(&json_path, &md_path, &value, &md)?;
    Ok(())
}

/// Bytes in MiB with one decimal (`-` when absent).
pub(crate) fn mib(v: Option<f64>) -> String {
    v.map_or("-".into(), |b| {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    })
}

/// A number with `d` decimals (`-` when absent).
pub(crate) fn num(v: Option<f64>, d: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.d$}"))
}

/// A ratio as a percentage (`-` when absent).
pub(crate) fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{:.1} %", 100.0 * x))
}

/// `met` / `**missed**` for `value ≤ max` (`not measured` when absent).
fn verdict(value: Option<f64>, max: f64) -> &'static str {
    match value {
        None => "not measured",
        Some(v) if v <= max => "met",
        Some(_) => "**missed**",
    }
}

/// The markdown report.
fn render(v: &Value, info: &RunInfo) -> String {
    let get = |k: &str| v.get(k).and_then(Value::as_f64);
    let mut md = String::from("# gm-train: memory of one GrandModel training step\n\n");
    md.push_str(&format!(
        "Measured {} on {} ({} cores), {}. One Double-DQN update of the full agent \
         (`AgentConfig::default()`, {} parameter bytes) through `gm_train::TrainStep`: \
         forward, backward, gradient clipping and AdamW, dropout on, batch {}, \
         accumulation in {} micro-batches of {}, checkpointing with {} segments per \
         embedder; median of {} steps after a warm-up, the configurations taking turns.\n\n",
        info.date,
        info.cpu,
        info.cores,
        info.rustc,
        num(get("param_bytes"), 0),
        num(get("batch"), 0),
        num(get("micro_batches"), 0),
        num(get("micro_batch"), 0),
        num(get("segments"), 0),
        num(get("reps"), 0),
    ));
    md.push_str(
        "*Peak* is the process's live heap at the step's high-water mark (gm-leak's \
         counting allocator): *resident* (master weights, AdamW moments, the batch) plus \
         the *step peak* — everything the step allocates on top: activations and the \
         autograd graph, the low-precision working copy, gradients, the accumulator, \
         the optimizer's new moments.\n\n\
         *Step ms* is wall time; *CPU ms* the process's user + system CPU time \
         over all its threads (`/proc/self/stat`) in the same step — less \
         disturbed by other processes on the cores, but it also counts worker \
         threads spinning while they wait.\n\n\
         | configuration | techniques | resident | step peak | peak | peak / baseline | step peak / baseline | step ms | time / baseline | CPU ms | CPU / baseline |\n\
         |---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for (name, what) in CONFIGS {
        let k = |s: &str| get(&format!("{name}_{s}"));
        md.push_str(&format!(
            "| {name} | {what} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            mib(k("resident_bytes")),
            mib(k("activation_peak_bytes")),
            mib(k("peak_bytes")),
            pct(k("peak_ratio")),
            pct(k("activation_ratio")),
            num(k("step_ms"), 0),
            num(k("time_ratio"), 2),
            num(k("step_cpu_ms"), 0),
            num(k("cpu_time_ratio"), 2),
        ));
    }

    md.push_str("\n## Against the seed's claims and issue 6's targets\n\n");
    md.push_str(&claims_table(v));
    md.push_str(&format!(
        "\n**bf16 is slower than f32 on this CPU** (bf16 step {}× baseline): candle's CPU \
         bf16 kernels convert on the fly, so on a CPU mixed precision buys memory, not \
         speed; the `all` time target is a GPU-class expectation. The f32 row \
         `ckpt_accum` shows what the memory techniques cost in time without it. Step \
         times on this machine are noisy (2 cores shared with other builds while it \
         ran); the ratios come from configurations run in turn on the same load.\n",
        num(get("bf16_time_ratio"), 2)
    ));

    md.push_str("\n## Largest batch a budget holds (`BatchSizer`)\n\n");
    match get("budget_bytes") {
        None => md.push_str("not measured (`--skip-budget`)\n"),
        Some(budget) => {
            md.push_str(&format!(
                "Budget {} (85 % usable), batches multiples of 8 in [8, 512]; peaks \
                 measured at the probe batches and a linear fit `a + c·b`. `all` is \
                 checkpointing + bf16 + 4 micro-batches of `b / 4`.\n\n\
                 | configuration | batch | fit: a | fit: c per row |\n|---|--:|--:|--:|\n",
                mib(Some(budget))
            ));
            for name in ["baseline", "all"] {
                md.push_str(&format!(
                    "| {name} | {} | {} | {} |\n",
                    num(get(&format!("budget_batch_{name}")), 0),
                    mib(get(&format!("budget_intercept_bytes_{name}"))),
                    mib(get(&format!("budget_bytes_per_row_{name}"))),
                ));
            }
        }
    }

    md.push_str("\n## Replay bytes\n\n");
    match get("replay_transitions") {
        None => md.push_str("not measured (`--skip-replay`)\n"),
        Some(n) => {
            md.push_str(&format!(
                "{n:.0} transitions from a real run of gm-market's environments through the \
                 learner (its schema and n-step add order, ε = 1, no updates). *Naïve*: \
                 every transition's observation and next observation stored whole \
                 (plus action, reward, done, discount); *de-duplicated*: the prioritized \
                 buffer's own resident-byte accounting (storage and priority trees); \
                 *+ LZ4*: after compressing every cold chunk (the learner does not turn \
                 compression on by default).\n\n\
                 | layout | bytes | of naïve |\n|---|--:|--:|\n\
                 | naïve | {} | 100 % |\n| de-duplicated (learner's) | {} | {} |\n| de-duplicated + LZ4 | {} | {} |\n",
                mib(get("replay_bytes_raw")),
                mib(get("replay_bytes_optimized")),
                pct(get("replay_optimized_ratio")),
                mib(get("replay_bytes_compressed")),
                pct(get("replay_compressed_ratio")),
            ));
            let dedup: Vec<String> = ["structure", "tactical", "regime", "lvn"]
                .iter()
                .filter_map(|s| Some(format!("{s} {:.1}×", get(&format!("replay_dedup_{s}"))?)))
                .collect();
            if !dedup.is_empty() {
                md.push_str(&format!(
                    "\nRows received per row stored, per stream: {}.\n",
                    dedup.join(", ")
                ));
            }
        }
    }

    md.push_str("\n## Commands\n\n```sh\n");
    for c in &info.commands {
        md.push_str(c);
        md.push('\n');
    }
    md.push_str("```\n");
    for n in &info.notes {
        md.push_str(&format!("\n- {n}"));
    }
    md.push('\n');
    md
}

/// The table of the seed report's claims and issue 6's targets with the
/// measured figure and a verdict (header, rule and rows).
pub(crate) fn claims_table(v: &Value) -> String {
    let get = |k: &str| v.get(k).and_then(Value::as_f64);
    let all_peak = get("all_peak_ratio");
    let all_time = get("all_time_ratio");
    let ckpt_act = get("checkpointing_activation_ratio");
    let ckpt_time = get("checkpointing_time_ratio");
    let mut md =
        String::from("| claim / target | required | measured | verdict |\n|---|---|--:|---|\n");
    md.push_str(&format!(
        "| seed: \"40–60% reduction in training pipelines\" | peak reduction 40–60 % | {} | {} |\n",
        pct(all_peak.map(|r| 1.0 - r)),
        match all_peak {
            None => "not measured",
            Some(r) if (0.40..=0.60).contains(&(1.0 - r)) => "within the claim",
            Some(r) if 1.0 - r > 0.60 => "better than the claim",
            Some(_) => "**below the claim**",
        }
    ));
    md.push_str(&format!(
        "| seed's table: all techniques at 51 % of baseline peak | {} | {} | {} |\n",
        pct(Some(SEED_ALL_PEAK)),
        pct(all_peak),
        verdict(all_peak, SEED_ALL_PEAK),
    ));
    md.push_str(&format!(
        "| all: peak ≤ 40 % of baseline | ≤ {} | {} | {} |\n",
        pct(Some(ALL_PEAK_MAX)),
        pct(all_peak),
        verdict(all_peak, ALL_PEAK_MAX)
    ));
    md.push_str(&format!(
        "| all: step time ≤ 1.5× baseline | ≤ {ALL_TIME_MAX:.2}× | {}× | {} |\n",
        num(all_time, 2),
        verdict(all_time, ALL_TIME_MAX)
    ));
    md.push_str(&format!(
        "| checkpointing: step peak ≥ 40 % lower | ≤ {} of baseline | {} | {} |\n",
        pct(Some(CKPT_ACTIVATION_MAX)),
        pct(ckpt_act),
        verdict(ckpt_act, CKPT_ACTIVATION_MAX)
    ));
    md.push_str(&format!(
        "| checkpointing: step time ≤ 1.35× baseline | ≤ {CKPT_TIME_MAX:.2}× | {}× | {} |\n",
        num(ckpt_time, 2),
        verdict(ckpt_time, CKPT_TIME_MAX)
    ));
    md.push_str(&format!(
        "| (context) all: CPU time ≤ 1.5× baseline's | ≤ {ALL_TIME_MAX:.2}× | {}× | {} |\n",
        num(get("all_cpu_time_ratio"), 2),
        verdict(get("all_cpu_time_ratio"), ALL_TIME_MAX)
    ));
    md.push_str(&format!(
        "| (context) checkpointing: CPU time ≤ 1.35× baseline's | ≤ {CKPT_TIME_MAX:.2}× | {}× | {} |\n",
        num(get("checkpointing_cpu_time_ratio"), 2),
        verdict(get("checkpointing_cpu_time_ratio"), CKPT_TIME_MAX)
    ));
    md.push_str(&format!(
        "| (f32 without bf16) checkpointing + accumulation: peak ≤ 40 %, time ≤ 1.5× | | {} at {}× | {} / {} |\n",
        pct(get("ckpt_accum_peak_ratio")),
        num(get("ckpt_accum_time_ratio"), 2),
        verdict(get("ckpt_accum_peak_ratio"), ALL_PEAK_MAX),
        verdict(get("ckpt_accum_time_ratio"), ALL_TIME_MAX),
    ));
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> RunInfo {
        RunInfo {
            date: "today".into(),
            cpu: "cpu".into(),
            cores: 2,
            rustc: "rustc".into(),
            commands: vec!["cargo xtask bench train".into()],
            notes: vec![],
        }
    }

    #[test]
    fn verdicts_follow_the_targets_and_missing_keys_say_so() {
        let v = serde_json::json!({
            "batch": 256, "micro_batch": 64, "micro_batches": 4, "segments": 4, "reps": 3,
            "baseline_peak_bytes": 1048576000u64, "baseline_peak_ratio": 1.0,
            "all_peak_ratio": 0.25, "all_time_ratio": 1.8,
            "checkpointing_activation_ratio": 0.5, "checkpointing_time_ratio": 1.2,
            "bf16_time_ratio": 1.4,
        });
        let md = render(&v, &info());
        assert!(
            md.contains(
                "| baseline | f32, plain backprop, whole batch | - | - | 1000.0 MiB | 100.0 % |"
            ),
            "{md}"
        );
        assert!(md.contains("| all: peak ≤ 40 % of baseline | ≤ 40.0 % | 25.0 % | met |"));
        assert!(md.contains("| all: step time ≤ 1.5× baseline | ≤ 1.50× | 1.80× | **missed** |"));
        assert!(md.contains(
            "| checkpointing: step peak ≥ 40 % lower | ≤ 60.0 % of baseline | 50.0 % | met |"
        ));
        assert!(md.contains("better than the claim"));
        assert!(md.contains("not measured (`--skip-budget`)"));
        assert!(md.contains("not measured (`--skip-replay`)"));
        assert!(md.contains("bf16 is slower than f32"));
        assert!(super::super::parse_last_json("x\n{\"a\": 1}\n").is_some());
    }
}
