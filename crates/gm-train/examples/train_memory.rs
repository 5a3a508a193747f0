//! The memory table of one GrandModel training step (issue 6, "the seed's
//! table, for real"): the full agent ([`AgentConfig::default`]), one
//! Double-DQN update (forward, backward, clipping, AdamW) through
//! [`TrainStep`] at batch 256 with each technique off and on, the largest
//! batch a memory budget holds, and the replay bytes of the learner's
//! de-duplicated buffer vs the naïve layout. Prints a table on stderr and
//! one flat JSON object on the last stdout line (read by
//! `cargo xtask bench train`).
//!
//! ```text
//! cargo run --release -p gm-train --example train_memory -- \
//!     [--batch 256] [--micro 64] [--segments 4] [--reps 3] \
//!     [--budget-mib 512] [--replay 20000] [--skip-budget] [--skip-replay] \
//!     [--configs baseline,all]
//! ```
//!
//! # What is measured
//!
//! Configurations ([`StepConfig`]; dropout on, κ = 1, clip 10, AdamW lr
//! 1e-4 as in the learner): `baseline` (f32, plain backprop), `checkpointing`
//! (`--segments` checkpoint segments per embedder), `bf16` (bf16 working
//! copy over f32 masters), `accumulation` (micro-batches of `--micro` rows),
//! `ckpt_accum` (checkpointing + accumulation, f32) and `all`
//! (checkpointing + bf16 + accumulation).
//!
//! For each, `reps` steps after one warm-up step, the configurations taking
//! turns so that load from other processes spreads over all of them:
//!
//! - `{name}_activation_peak_bytes`: the largest, over the repetitions, of
//!   gm-leak's process-wide high-water mark during the step minus the live
//!   bytes at its start — everything the step allocates: activations and
//!   the autograd graph, the low-precision working copy, the gradients,
//!   the accumulator, the optimizer's new moments;
//! - `{name}_resident_bytes`: live bytes at the step's start (master
//!   weights, AdamW moments, the batch — the same for every
//!   configuration);
//! - `{name}_peak_bytes`: resident + activation peak, the process's live
//!   heap at the step's high-water mark;
//! - `{name}_step_ms`: the median wall time of a step;
//! - `{name}_step_cpu_ms`: the median user + system CPU time the process
//!   (all its threads) spent in a step (`/proc/self/stat`): less disturbed
//!   than wall time when other processes share the cores, but it counts
//!   worker threads' spin-waiting too.
//!
//! Budget (`--budget-mib`): [`BatchSizer::calibrate`] with gm-train's
//! defaults (85 % threshold, batches in [8, 512], multiples of 8) measuring
//! the peak (as above) of one `baseline` step and of one `all` step with 4
//! micro-batches of `batch / 4` rows.
//!
//! Replay (`--replay N`): a real [`Learner`] (synchronous, ε = 1 so no
//! network runs, no update) steps gm-market's environments on synthetic
//! data until its prioritized buffer (the learner's schema and n-step add
//! order) holds at least `N` transitions. `replay_bytes_raw`: those
//! transitions stored naïvely (`logical_bytes_per_transition` of the
//! schema: observation and next observation of `OBS_DIM` f32 each, plus
//! action, reward, done, discount); `replay_bytes_optimized`: the buffer's
//! own resident-byte accounting (storage and priority trees);
//! `replay_bytes_compressed`: the same after compressing every cold chunk
//! with LZ4 (the learner does not enable compression by default).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use gm_market::{GeneratorConfig, MarketData, PipelineConfig, OBS_DIM};
use gm_train::checkpoint::CheckpointConfig;
use gm_train::step::narrow_obs;
use gm_train::{
    AdamW, AdamWConfig, AgentConfig, AgentNet, BatchSizeConfig, BatchSizer, EpsilonSchedule, Grads,
    Learner, LearnerConfig, ObsBatch, Precision, StepConfig, StepOutcome, TdBatch, TrainStep,
};
use serde_json::{json, Map, Value};

#[global_allocator]
static A: gm_leak::TrackingAllocator = gm_leak::TrackingAllocator::system();

struct Args {
    batch: usize,
    micro: usize,
    segments: usize,
    reps: usize,
    budget_mib: u64,
    replay: usize,
    skip_budget: bool,
    skip_replay: bool,
    /// Configurations to run (empty: all); `baseline` always runs.
    only: Vec<String>,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        batch: 256,
        micro: 64,
        segments: 4,
        reps: 3,
        budget_mib: 512,
        replay: 20_000,
        skip_budget: false,
        skip_replay: false,
        only: Vec::new(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let mut val = || -> anyhow::Result<usize> {
            it.next()
                .with_context(|| format!("{k} needs a value"))?
                .parse()
                .with_context(|| format!("{k}: not a number"))
        };
        match k.as_str() {
            "--batch" => a.batch = val()?,
            "--micro" => a.micro = val()?,
            "--segments" => a.segments = val()?,
            "--reps" => a.reps = val()?.max(1),
            "--budget-mib" => a.budget_mib = val()? as u64,
            "--replay" => a.replay = val()?,
            "--skip-budget" => a.skip_budget = true,
            "--skip-replay" => a.skip_replay = true,
            "--configs" => {
                let v = it.next().with_context(|| format!("{k} needs a value"))?;
                a.only = v.split(',').map(str::to_owned).collect();
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if a.batch == 0 || a.micro == 0 || a.segments == 0 {
        bail!("--batch, --micro and --segments must be at least 1");
    }
    Ok(a)
}

/// `rows` real observations from `data` (every 7th ready bar, wrapping),
/// with actions, TD targets of the learner's scale and PER-like weights.
struct Rows {
    obs: ObsBatch,
    actions: Vec<u32>,
    targets: Vec<f32>,
    weights: Vec<f32>,
}

impl Rows {
    fn new(data: &MarketData, rows: usize) -> anyhow::Result<Self> {
        let first = data.first_ready();
        let span = data.len() - first;
        let mut flat = vec![0f32; rows * OBS_DIM];
        for (i, out) in flat.chunks_mut(OBS_DIM).enumerate() {
            data.observation(first + (i * 7) % span, out)?;
        }
        Ok(Self {
            obs: ObsBatch::from_flat(&flat, rows, &Device::Cpu)?,
            actions: (0..rows).map(|i| (i % 3) as u32).collect(),
            targets: (0..rows)
                .map(|i| ((i * 37) % 200) as f32 / 100.0 - 1.0)
                .collect(),
            weights: (0..rows)
                .map(|i| 0.5 + ((i * 13) % 50) as f32 / 100.0)
                .collect(),
        })
    }
}

/// The agent: master map, f32 network, AdamW as the learner configures it.
struct Model {
    vm: VarMap,
    net: AgentNet,
    opt: AdamW,
}

impl Model {
    fn new() -> anyhow::Result<Self> {
        let vm = VarMap::new();
        let net = AgentNet::new(
            &AgentConfig::default(),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )?;
        gm_models::init::init_seeded(&vm, 1)?;
        let n = Grads::empty(&vm)?.len();
        let opt = AdamW::new(
            AdamWConfig {
                lr: 1e-4,
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            n,
        )?;
        Ok(Self { vm, net, opt })
    }

    /// One step on the first `batch` rows; (live bytes at the start,
    /// gm-leak's measurement of the step, what the step did).
    fn measure(
        &mut self,
        step: &mut TrainStep,
        rows: &Rows,
        batch: usize,
        seed: u64,
    ) -> gm_train::Result<(u64, gm_leak::Measurement, StepOutcome)> {
        let obs = narrow_obs(&rows.obs, 0, batch)?;
        let td = TdBatch {
            obs: &obs,
            actions: &rows.actions[..batch],
            targets: &rows.targets[..batch],
            weights: Some(&rows.weights[..batch]),
        };
        let resident = gm_leak::stats().current_bytes;
        let (out, m) =
            gm_leak::measure(|| step.step(&self.net, &self.vm, &mut self.opt, &td, seed));
        Ok((resident, m, out?))
    }
}

fn config(a: &Args, ckpt: bool, precision: Precision, micro: Option<usize>) -> StepConfig {
    StepConfig {
        checkpoint: ckpt.then_some(CheckpointConfig {
            segments: a.segments,
            ..CheckpointConfig::default()
        }),
        precision,
        micro_batch: micro,
        ..StepConfig::default()
    }
}

fn median_ms(mut t: Vec<Duration>) -> f64 {
    t.sort();
    t[t.len() / 2].as_secs_f64() * 1e3
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

#[derive(Default)]
struct Figures {
    resident: u64,
    activation_peak: u64,
    times: Vec<Duration>,
    cpu_ms: Vec<f64>,
}

/// User + system CPU time of the whole process (all threads) so far, in
/// clock ticks: fields 14 and 15 of `/proc/self/stat`. `None` where there
/// is no procfs.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces: count after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second (`getconf CLK_TCK`); `None` if unavailable.
fn clock_ticks_per_s() -> Option<f64> {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()?;
    let v: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    (v > 0.0).then_some(v)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn main() -> anyhow::Result<()> {
    let a = parse()?;
    let data = Arc::new(MarketData::synthetic(
        GeneratorConfig::default(),
        20_000,
        PipelineConfig::default(),
    )?);
    let mut out = Map::new();
    let b = a.batch;
    out.insert("batch".into(), json!(b));
    out.insert("micro_batch".into(), json!(a.micro));
    out.insert("micro_batches".into(), json!(b.div_ceil(a.micro)));
    out.insert("segments".into(), json!(a.segments));
    out.insert("reps".into(), json!(a.reps));

    // ---- one step at batch B, each technique off and on -------------------
    let tick_hz = clock_ticks_per_s();
    let mut configs: Vec<(&str, StepConfig)> = vec![
        ("baseline", config(&a, false, Precision::F32, None)),
        ("checkpointing", config(&a, true, Precision::F32, None)),
        ("bf16", config(&a, false, Precision::Bf16, None)),
        (
            "accumulation",
            config(&a, false, Precision::F32, Some(a.micro)),
        ),
        (
            "ckpt_accum",
            config(&a, true, Precision::F32, Some(a.micro)),
        ),
        ("all", config(&a, true, Precision::Bf16, Some(a.micro))),
    ];
    if !a.only.is_empty() {
        configs.retain(|(n, _)| *n == "baseline" || a.only.iter().any(|o| o == n));
    }
    {
        let rows = Rows::new(&data, b)?;
        let mut model = Model::new()?;
        out.insert(
            "param_bytes".into(),
            json!(Grads::empty(&model.vm)?
                .iter()
                .map(|(_, v, _)| v.elem_count() * 4)
                .sum::<usize>()),
        );
        let mut steps: Vec<TrainStep> = configs
            .iter()
            .map(|(_, c)| TrainStep::new(*c, AgentConfig::default()))
            .collect::<gm_train::Result<_>>()?;
        let mut figs: Vec<Figures> = configs.iter().map(|_| Figures::default()).collect();
        // Repetition 0 warms up (allocator, thread pool, AdamW's moments).
        for rep in 0..=a.reps {
            for (i, (name, _)) in configs.iter().enumerate() {
                let seed = (rep * configs.len() + i) as u64;
                let cpu0 = cpu_ticks();
                let (resident, m, o) = model.measure(&mut steps[i], &rows, b, seed)?;
                let cpu_ms = match (cpu0, cpu_ticks(), tick_hz) {
                    (Some(a), Some(z), Some(hz)) => Some(z.saturating_sub(a) as f64 * 1e3 / hz),
                    _ => None,
                };
                if !o.stepped {
                    bail!(
                        "{name}: the step was skipped (gradient norm {})",
                        o.grad_norm
                    );
                }
                eprintln!(
                    "{}{name:<14} rep {rep}: resident {:.1} MiB, step peak +{:.1} MiB, {:.0} ms (CPU {:.0} ms)",
                    if rep == 0 { "(warm-up) " } else { "" },
                    mib(resident),
                    mib(m.peak_delta_bytes),
                    m.duration.as_secs_f64() * 1e3,
                    cpu_ms.unwrap_or(f64::NAN)
                );
                if rep > 0 {
                    let f = &mut figs[i];
                    f.resident = f.resident.max(resident);
                    f.activation_peak = f.activation_peak.max(m.peak_delta_bytes);
                    f.times.push(m.duration);
                    f.cpu_ms.extend(cpu_ms);
                }
            }
        }
        out.insert(
            "optimizer_state_bytes".into(),
            json!(model.opt.state_bytes()),
        );
        let base_peak = (figs[0].resident + figs[0].activation_peak) as f64;
        let base_act = figs[0].activation_peak as f64;
        let base_ms = median_ms(figs[0].times.clone());
        let base_cpu = median(figs[0].cpu_ms.clone());
        eprintln!("\n| configuration | resident | step peak (activations etc.) | peak | peak / baseline | step ms | time / baseline |");
        eprintln!("|---|--:|--:|--:|--:|--:|--:|");
        for ((name, _), f) in configs.iter().zip(figs) {
            let peak = f.resident + f.activation_peak;
            let ms = median_ms(f.times);
            out.insert(format!("{name}_resident_bytes"), json!(f.resident));
            out.insert(
                format!("{name}_activation_peak_bytes"),
                json!(f.activation_peak),
            );
            out.insert(format!("{name}_peak_bytes"), json!(peak));
            out.insert(format!("{name}_step_ms"), json!(ms));
            out.insert(format!("{name}_peak_ratio"), json!(peak as f64 / base_peak));
            out.insert(
                format!("{name}_activation_ratio"),
                json!(f.activation_peak as f64 / base_act),
            );
            out.insert(format!("{name}_time_ratio"), json!(ms / base_ms));
            if let (Some(cpu), Some(base)) = (median(f.cpu_ms), base_cpu) {
                out.insert(format!("{name}_step_cpu_ms"), json!(cpu));
                out.insert(format!("{name}_cpu_time_ratio"), json!(cpu / base));
            }
            eprintln!(
                "| {name} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.3} | {ms:.0} | {:.2} |",
                mib(f.resident),
                mib(f.activation_peak),
                mib(peak),
                peak as f64 / base_peak,
                ms / base_ms
            );
        }
    }

    // ---- the largest batch a budget holds ----------------------------------
    if !a.skip_budget {
        let budget = a.budget_mib << 20;
        out.insert("budget_bytes".into(), json!(budget));
        let max = BatchSizeConfig::new(budget).max_batch;
        let rows = Rows::new(&data, max)?;
        let mut model = Model::new()?;
        // Warm AdamW's moments so every measured step replaces them.
        let mut warm = TrainStep::new(
            config(&a, false, Precision::F32, None),
            AgentConfig::default(),
        )?;
        model.measure(&mut warm, &rows, 8, 0)?;
        for (name, all) in [("baseline", false), ("all", true)] {
            let mut seed = 100;
            let sizer = BatchSizer::calibrate(BatchSizeConfig::new(budget), |batch| {
                let c = if all {
                    config(&a, true, Precision::Bf16, Some(batch.div_ceil(4)))
                } else {
                    config(&a, false, Precision::F32, None)
                };
                let mut step = TrainStep::new(c, AgentConfig::default())?;
                seed += 1;
                let (resident, m, _) = model.measure(&mut step, &rows, batch, seed)?;
                let peak = resident + m.peak_delta_bytes;
                eprintln!("budget {name}: batch {batch}: peak {:.1} MiB", mib(peak));
                Ok(peak)
            })?;
            eprintln!(
                "budget {} MiB, {name}: batch {} (fit {:.1} MiB + {:.2} MiB/row)",
                a.budget_mib,
                sizer.batch(),
                mib(sizer.fit.intercept_bytes.max(0.0) as u64),
                sizer.fit.bytes_per_item / (1u64 << 20) as f64
            );
            out.insert(format!("budget_batch_{name}"), json!(sizer.batch()));
            out.insert(
                format!("budget_bytes_per_row_{name}"),
                json!(sizer.fit.bytes_per_item),
            );
            out.insert(
                format!("budget_intercept_bytes_{name}"),
                json!(sizer.fit.intercept_bytes),
            );
            let probes: Vec<Value> = sizer.probes.iter().map(|p| json!([p.0, p.1])).collect();
            out.insert(format!("budget_probes_{name}"), Value::Array(probes));
        }
    }

    // ---- replay bytes -------------------------------------------------------
    if !a.skip_replay && a.replay > 0 {
        let mut cfg = LearnerConfig {
            epsilon: EpsilonSchedule {
                start: 1.0,
                end: 1.0,
                decay_transitions: 0,
            },
            ..LearnerConfig::default()
        };
        // A vectorised step adds at most num_envs × segment transitions at
        // once: with this slack the buffer never reaches learning_starts,
        // so no update runs.
        let slack = cfg.num_envs * (cfg.replay_segment_steps + cfg.n_step) + 1;
        cfg.replay.capacity = a.replay + slack;
        cfg.learning_starts_transitions = cfg.replay.capacity;
        let mut learner = Learner::new(cfg, data.clone())?;
        let mut env_steps = 0u64;
        while learner.replay().len() < a.replay {
            let r = learner.step()?;
            if r.update.is_some() {
                bail!("an update ran while filling the buffer");
            }
            env_steps += 1;
        }
        let stats = learner.replay().stats();
        let raw = stats.len as u64 * stats.logical_bytes_per_transition as u64;
        let obs_raw = stats.len as u64 * 2 * OBS_DIM as u64 * 4;
        let optimized = learner.replay().read().bytes_used();
        learner.replay().write().compress_cold(0);
        let compressed = learner.replay().read().bytes_used();
        let after = learner.replay().stats();
        eprintln!(
            "\nreplay: {} transitions after {env_steps} vectorised steps: naïve {:.1} MiB (observations {:.1} MiB), de-duplicated {:.1} MiB ({:.1}x), + LZ4 on cold chunks {:.1} MiB (ratio {:.2})",
            stats.len,
            mib(raw),
            mib(obs_raw),
            mib(optimized),
            raw as f64 / optimized as f64,
            mib(compressed),
            after.compression_ratio()
        );
        out.insert("replay_transitions".into(), json!(stats.len));
        out.insert("replay_vec_env_steps".into(), json!(env_steps));
        out.insert("replay_bytes_raw".into(), json!(raw));
        out.insert("replay_obs_bytes_raw".into(), json!(obs_raw));
        out.insert("replay_bytes_optimized".into(), json!(optimized));
        out.insert("replay_bytes_compressed".into(), json!(compressed));
        out.insert(
            "replay_optimized_ratio".into(),
            json!(optimized as f64 / raw as f64),
        );
        out.insert(
            "replay_compressed_ratio".into(),
            json!(compressed as f64 / raw as f64),
        );
        for s in &stats.streams {
            out.insert(format!("replay_dedup_{}", s.name), json!(s.dedup_ratio()));
        }
    }

    println!("{}", serde_json::to_string(&Value::Object(out))?);
    Ok(())
}
