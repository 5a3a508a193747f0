//! `grandmodel report`: baseline vs optimized, measured on this machine,
//! per component — the tactical and structure embedders, the replay
//! buffer, the training pipeline, and the total — with memory, latency and
//! throughput, written as Markdown, JSON and an SVG bar chart.
//!
//! # What is compared
//! | component | baseline | optimized |
//! |---|---|---|
//! | tactical / structure embedder | one training step (forward + backward to f32 master weights), plain backprop in f32 | the same step with gradient checkpointing (`training.checkpoint_segments`) and a bf16 working copy, as configured |
//! | replay buffer | every transition's observation and next observation stored in full (`Vec<f32>` per transition, plus action and reward) | gm-buffers with the learner's schema: sliding windows stored once per bar, then LZ4 compression of cold chunks |
//! | training pipeline | one agent update, plain f32 backprop at the target effective batch | the planned step ([`crate::pipeline`]): micro-batch × accumulation steps with the techniques |
//! | total | replay + training pipeline (baseline) | replay + training pipeline (optimized) |
//!
//! Memory: step peaks are the counting allocator's peak of the measuring
//! thread above its level at the step's start (`gm_leak::measure_thread`);
//! replay bytes are the baseline's retained allocation and the buffer's
//! resident bytes. Latency is the
//! median wall time over the repetitions; throughput is samples per second
//! (steps) or sampled transitions per second (replay, batches of 64).

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gm_buffers::{col, BufferConfig, Column, ReplayBuffer, StorageMode};
use gm_core::ByteSize;
use gm_market::{GeneratorConfig, MarketData, PipelineConfig, OBS_DIM};
use gm_models::Segmented;
use gm_train::{
    checkpointed_grads, plain_grads, AgentConfig, AgentNet, CheckpointConfig, ObsBatch, Precision,
    SegmentDropout, OBS_PARTS,
};
use plotters::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::config::{ModelSize, TrainingMemoryConfig};
use crate::error::{Error, Result};
use crate::pipeline::{self, AgentModel};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The agent's size (the embedders come from it).
    pub model: ModelSize,
    /// Batch of the embedder steps.
    pub batch: usize,
    /// Measured repetitions per setting (after one warm-up).
    pub reps: usize,
    /// Transitions in the replay comparison.
    pub transitions: usize,
    /// The techniques and the target batch.
    pub training: TrainingMemoryConfig,
    /// The memory limit the pipeline plan works under.
    pub limit_bytes: u64,
}

/// One component's baseline and optimized figures.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// The component.
    pub component: String,
    /// What the baseline is.
    pub baseline: String,
    /// What the optimized variant is.
    pub optimized: String,
    /// Baseline bytes.
    pub baseline_bytes: u64,
    /// Optimized bytes.
    pub optimized_bytes: u64,
    /// Baseline latency, ms (per step or per sampled batch).
    pub baseline_ms: f64,
    /// Optimized latency, ms.
    pub optimized_ms: f64,
    /// Baseline throughput.
    pub baseline_throughput: f64,
    /// Optimized throughput.
    pub optimized_throughput: f64,
    /// Unit of the throughput.
    pub throughput_unit: String,
}

impl BenchRow {
    /// Baseline bytes over optimized bytes.
    pub fn memory_ratio(&self) -> f64 {
        self.baseline_bytes as f64 / self.optimized_bytes.max(1) as f64
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Runs `f` once to warm up, then `reps` times; returns the largest peak
/// and the median time.
fn measured(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<(u64, Duration)> {
    f()?;
    let mut peak = 0;
    let mut times = Vec::new();
    for _ in 0..reps.max(1) {
        let (r, m) = gm_leak::measure_thread(&mut f);
        r?;
        peak = peak.max(m.peak_net_bytes);
        times.push(m.duration);
    }
    Ok((peak, median(times)))
}

fn tile(x: &Tensor, batch: usize) -> Result<Tensor> {
    let n = x.dim(0)?;
    let idx: Vec<u32> = (0..batch).map(|i| (i % n) as u32).collect();
    Ok(x.index_select(&Tensor::from_vec(idx, batch, x.device())?, 0)?)
}

fn obs_rows(data: &MarketData, rows: usize) -> Result<Vec<f32>> {
    let start = data.first_ready();
    let rows = rows.min(data.len() - start);
    let mut flat = vec![0f32; rows * OBS_DIM];
    for (i, c) in flat.chunks_exact_mut(OBS_DIM).enumerate() {
        data.observation(start + i, c)?;
    }
    Ok(flat)
}

fn embedder_step<M: Segmented + ?Sized>(
    m: &M,
    vm: &VarMap,
    x: &Tensor,
    segments: usize,
) -> Result<()> {
    let loss =
        |o: &Tensor| -> gm_train::Result<Tensor> { Ok(o.sqr()?.mean_all()?.to_dtype(DType::F32)?) };
    if segments > 1 {
        let cfg = CheckpointConfig {
            segments,
            dropout: SegmentDropout::Off,
        };
        checkpointed_grads(m, vm, x, loss, &cfg)?;
    } else {
        plain_grads(m, vm, x, loss, SegmentDropout::Off)?;
    }
    Ok(())
}

/// Measures every component; `progress` gets one line per component.
pub fn run(opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<Vec<BenchRow>> {
    if !gm_leak::is_active() {
        return Err(Error::NoAllocator);
    }
    let agent_cfg = match opts.model {
        ModelSize::Small => AgentConfig::tiny(),
        ModelSize::Full => AgentConfig::default(),
    };
    let device = Device::Cpu;
    progress("generating the synthetic market");
    let data = MarketData::synthetic(
        GeneratorConfig::default(),
        (opts.transitions + 2000).max(4000),
        PipelineConfig::default(),
    )?;
    let flat = obs_rows(&data, 64)?;
    let sample = ObsBatch::from_flat(&flat, flat.len() / OBS_DIM, &device)?;
    let vm = VarMap::new();
    let net = AgentNet::new(
        &agent_cfg,
        VarBuilder::from_varmap(&vm, DType::F32, &device),
    )?;
    gm_models::init::init_seeded(&vm, 1).map_err(gm_train::Error::from)?;
    let t = &opts.training;
    let segments = if t.gradient_checkpointing {
        t.checkpoint_segments
    } else {
        1
    };
    let precision = if t.mixed_precision {
        Precision::Bf16
    } else {
        Precision::F32
    };
    let opt_label = format!(
        "{} checkpoint segments, {}",
        segments,
        if t.mixed_precision { "bf16" } else { "f32" }
    );
    let low = precision.working_builder(&vm, &device)?;
    let net_low = AgentNet::new(&agent_cfg, low)?;
    let b = opts.batch;
    let mut rows = Vec::new();
    for (name, base_x, which) in [
        ("tactical embedder", &sample.tactical, 0),
        ("structure embedder", &sample.structure, 1),
    ] {
        progress(&format!("measuring the {name} at batch {b}"));
        let x = tile(base_x, b)?;
        let x_low = x.to_dtype(precision.dtype())?;
        let (bp, bt) = measured(opts.reps, || match which {
            0 => embedder_step(&net.tactical, &vm, &x, 1),
            _ => embedder_step(&net.structure, &vm, &x, 1),
        })?;
        let (op, ot) = measured(opts.reps, || match which {
            0 => embedder_step(&net_low.tactical, &vm, &x_low, segments),
            _ => embedder_step(&net_low.structure, &vm, &x_low, segments),
        })?;
        rows.push(BenchRow {
            component: name.into(),
            baseline: format!("training step at batch {b}, plain f32"),
            optimized: format!("training step at batch {b}, {opt_label}"),
            baseline_bytes: bp,
            optimized_bytes: op,
            baseline_ms: bt.as_secs_f64() * 1e3,
            optimized_ms: ot.as_secs_f64() * 1e3,
            baseline_throughput: b as f64 / bt.as_secs_f64().max(1e-12),
            optimized_throughput: b as f64 / ot.as_secs_f64().max(1e-12),
            throughput_unit: "samples/s".into(),
        });
    }
    progress(&format!(
        "measuring the replay buffer with {} transitions",
        opts.transitions
    ));
    rows.push(replay_row(&data, opts.transitions, opts.reps)?);
    progress("planning and measuring the training pipeline");
    let plan = pipeline::optimize(
        opts.limit_bytes,
        t,
        AgentModel {
            config: &agent_cfg,
            varmap: &vm,
        },
        &sample,
    )?;
    let ms_of = |batch: usize, seg: usize, prec: &str| {
        plan.measurements
            .iter()
            .find(|m| m.batch == batch && m.segments == seg && m.precision == prec)
            .map_or(0.0, |m| m.millis)
    };
    let base_ms = ms_of(t.target_effective_batch, 1, "f32");
    let opt_ms = ms_of(plan.micro_batch, plan.checkpoint_segments, plan.precision)
        * plan.accumulation_steps as f64;
    rows.push(BenchRow {
        component: "training pipeline".into(),
        baseline: format!(
            "agent update at batch {}, plain f32",
            t.target_effective_batch
        ),
        optimized: format!(
            "micro-batch {} x {} accumulation steps, {} checkpoint segments, {}",
            plan.micro_batch, plan.accumulation_steps, plan.checkpoint_segments, plan.precision
        ),
        baseline_bytes: plan.peak_before_bytes,
        optimized_bytes: plan.peak_after_bytes,
        baseline_ms: base_ms,
        optimized_ms: opt_ms,
        baseline_throughput: t.target_effective_batch as f64 / (base_ms / 1e3).max(1e-12),
        optimized_throughput: plan.effective_batch as f64 / (opt_ms / 1e3).max(1e-12),
        throughput_unit: "samples/s".into(),
    });
    let (replay, pipe) = (&rows[2], &rows[3]);
    rows.push(BenchRow {
        component: "total".into(),
        baseline: "replay + training pipeline".into(),
        optimized: "replay + training pipeline".into(),
        baseline_bytes: replay.baseline_bytes + pipe.baseline_bytes,
        optimized_bytes: replay.optimized_bytes + pipe.optimized_bytes,
        baseline_ms: replay.baseline_ms + pipe.baseline_ms,
        optimized_ms: replay.optimized_ms + pipe.optimized_ms,
        baseline_throughput: pipe.baseline_throughput,
        optimized_throughput: pipe.optimized_throughput,
        throughput_unit: "samples/s (pipeline)".into(),
    });
    Ok(rows)
}

/// Naive storage vs gm-buffers, with the learner's schema.
fn replay_row(data: &MarketData, n: usize, reps: usize) -> Result<BenchRow> {
    let schema = gm_train::learner::replay::replay_schema()?;
    let start = data.first_ready();
    let n = n.min(data.len() - start - 1);
    let obs = |t: usize| -> Result<Vec<f32>> {
        let mut o = vec![0f32; OBS_DIM];
        data.observation(t, &mut o)?;
        Ok(o)
    };
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let actions: Vec<i64> = (0..n).map(|_| rng.random_range(0..3)).collect();
    let rewards: Vec<f32> = (0..n).map(|i| ((i % 17) as f32 - 8.0) * 1e-3).collect();

    // Baseline: every transition's obs and next obs in full.
    struct Naive {
        obs: Vec<f32>,
        next: Vec<f32>,
        action: i64,
        reward: f32,
    }
    let (naive, m) = gm_leak::measure_thread(|| -> Result<Vec<Naive>> {
        let mut v = Vec::with_capacity(n);
        for (i, (&action, &reward)) in actions.iter().zip(&rewards).enumerate() {
            v.push(Naive {
                obs: obs(start + i)?,
                next: obs(start + i + 1)?,
                action,
                reward,
            });
        }
        Ok(v)
    });
    let naive = naive?;
    let base_bytes = m.net_bytes.max(0) as u64;
    let bsize = 64;
    let mut out = vec![0f32; bsize * 2 * OBS_DIM];
    let (_, base_t) = measured(reps, || {
        for (j, chunk) in out.chunks_exact_mut(2 * OBS_DIM).enumerate() {
            let k = (j * 7919 + 13) % naive.len();
            let t = &naive[k];
            chunk[..OBS_DIM].copy_from_slice(&t.obs);
            chunk[OBS_DIM..].copy_from_slice(&t.next);
            std::hint::black_box((t.action, t.reward));
        }
        Ok(())
    })?;
    drop(naive);

    // Optimized: gm-buffers, windows de-duplicated, cold chunks compressed.
    let mut buf = ReplayBuffer::new(
        schema.clone(),
        BufferConfig {
            capacity: n,
            storage: StorageMode::Memory,
            ..BufferConfig::default()
        },
    )?;
    let split = |o: &[f32]| -> [Vec<f32>; 4] {
        let mut at = 0;
        OBS_PARTS.map(|len| {
            let p = o[at..at + len].to_vec();
            at += len;
            p
        })
    };
    let mut prev = split(&obs(start)?);
    for i in 0..n {
        let next = split(&obs(start + i + 1)?);
        let a = [actions[i]];
        let r = [rewards[i]];
        let d = [false];
        let g = [0.97f32];
        let cols: Vec<Column<'_>> = schema
            .columns()
            .iter()
            .map(|c| {
                let part = |name: &str| match name {
                    "structure" => 0,
                    "tactical" => 1,
                    "regime" => 2,
                    _ => 3,
                };
                let base = c.name.trim_start_matches("next_");
                match base {
                    "action" => col(&a),
                    "reward" => col(&r),
                    "done" => col(&d),
                    "discount" => col(&g),
                    other if c.is_next => col(&next[part(other)]),
                    other => col(&prev[part(other)]),
                }
            })
            .collect();
        buf.add(&cols)?;
        prev = next;
    }
    buf.compress_cold(0);
    let opt_bytes = gm_core::MemoryReport::memory_usage(&buf).resident_bytes();
    let mut batch = buf.new_batch();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (_, opt_t) = measured(reps, || Ok(buf.sample_into(&mut batch, bsize, &mut rng)?))?;
    let cr = buf.stats().compression_ratio();
    Ok(BenchRow {
        component: "replay buffer".into(),
        baseline: format!("{n} transitions, obs and next obs in full"),
        optimized: format!(
            "{n} transitions, gm-buffers (windows once per bar, cold chunks LZ4 {cr:.2}x)"
        ),
        baseline_bytes: base_bytes,
        optimized_bytes: opt_bytes,
        baseline_ms: base_t.as_secs_f64() * 1e3,
        optimized_ms: opt_t.as_secs_f64() * 1e3,
        baseline_throughput: bsize as f64 / base_t.as_secs_f64().max(1e-12),
        optimized_throughput: bsize as f64 / opt_t.as_secs_f64().max(1e-12),
        throughput_unit: "sampled transitions/s".into(),
    })
}

/// The rows as a Markdown table.
pub fn markdown(rows: &[BenchRow], header: &str) -> String {
    let mut s = format!("# grandmodel report: baseline vs optimized\n\n{header}\n\n");
    s.push_str("| component | baseline memory | optimized memory | memory ratio | baseline latency | optimized latency | baseline throughput | optimized throughput |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.2}x | {:.2} ms | {:.2} ms | {:.0} | {:.0} {} |\n",
            r.component,
            ByteSize(r.baseline_bytes),
            ByteSize(r.optimized_bytes),
            r.memory_ratio(),
            r.baseline_ms,
            r.optimized_ms,
            r.baseline_throughput,
            r.optimized_throughput,
            r.throughput_unit
        ));
    }
    s.push_str("\n| component | baseline | optimized |\n|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} |\n",
            r.component, r.baseline, r.optimized
        ));
    }
    s.push_str("\n![memory per component](report.svg)\n");
    s
}

/// A grouped bar chart of memory per component.
pub fn chart(rows: &[BenchRow], path: &Path) -> Result<()> {
    let err = |e: String| Error::Chart {
        path: path.to_owned(),
        reason: e,
    };
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let y_max = rows
        .iter()
        .map(|r| mib(r.baseline_bytes.max(r.optimized_bytes)))
        .fold(1.0f64, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let n = rows.len() as f64;
    let mut c = ChartBuilder::on(&root)
        .caption(
            "memory per component: baseline vs optimized",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n, 0f64..y_max)
        .map_err(|e| err(e.to_string()))?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("MiB")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let base = RGBColor(127, 127, 127);
    let opt = RGBColor(31, 119, 180);
    for (i, r) in rows.iter().enumerate() {
        let x = i as f64;
        c.draw_series([
            Rectangle::new(
                [(x + 0.1, 0.0), (x + 0.45, mib(r.baseline_bytes))],
                base.filled(),
            ),
            Rectangle::new(
                [(x + 0.5, 0.0), (x + 0.85, mib(r.optimized_bytes))],
                opt.filled(),
            ),
        ])
        .map_err(|e| err(e.to_string()))?;
        c.draw_series([Text::new(
            r.component.clone(),
            (x + 0.1, -y_max * 0.03),
            ("sans-serif", 14),
        )])
        .map_err(|e| err(e.to_string()))?;
        c.draw_series([Text::new(
            format!("{:.1}x", r.memory_ratio()),
            (x + 0.5, mib(r.optimized_bytes) + y_max * 0.02),
            ("sans-serif", 13),
        )])
        .map_err(|e| err(e.to_string()))?;
    }
    c.draw_series([Rectangle::new([(0.0, 0.0), (0.0, 0.0)], base.filled())])
        .map_err(|e| err(e.to_string()))?
        .label("baseline")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], base.filled()));
    c.draw_series([Rectangle::new([(0.0, 0.0), (0.0, 0.0)], opt.filled())])
        .map_err(|e| err(e.to_string()))?
        .label("optimized")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], opt.filled()));
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// Measures and writes `report.md`, `report.json` and `report.svg` into
/// `dir`; returns the rows.
pub fn write_report(
    opts: &BenchOptions,
    dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<BenchRow>> {
    let t0 = Instant::now();
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_owned(),
        source,
    })?;
    let rows = run(opts, progress)?;
    let header = format!(
        "Measured on this machine in {:.1} s: model `{}`, embedder batch {}, {} repetitions after a warm-up, {} replay transitions, memory limit {}. Memory: counting-allocator peaks of one step (embedders, pipeline); retained bytes (naive replay) and resident bytes (gm-buffers).",
        t0.elapsed().as_secs_f64(),
        opts.model,
        opts.batch,
        opts.reps,
        opts.transitions,
        ByteSize(opts.limit_bytes)
    );
    let write = |name: &str, text: String| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|source| Error::Io { path: p, source })
    };
    write("report.md", markdown(&rows, &header))?;
    write(
        "report.json",
        serde_json::to_string_pretty(&serde_json::json!({
            "format": "grandmodel-benchmark-report",
            "version": 1,
            "model": opts.model.to_string(),
            "batch": opts.batch,
            "reps": opts.reps,
            "transitions": opts.transitions,
            "limit_bytes": opts.limit_bytes,
            "rows": rows,
        }))
        .unwrap_or_default(),
    )?;
    chart(&rows, &dir.join("report.svg"))?;
    Ok(rows)
}
