//! gm-train on a GPU, checked against the CPU: the check the GPU bundle
//! (`cargo xtask cuda-check --bundle`) runs on a machine with a device, and
//! that runs here on the CPU with the out-of-memory twin.
//!
//! ```text
//! cargo run --release -p gm-train --features candle-cuda --example gpu_check -- --device cuda:0
//! cargo run --release -p gm-train --example gpu_check -- --device cpu      # the CPU twin
//!     [--batch 512] [--parity-batch 32] [--headroom-mib 2048] [--learner-steps 150] [--quick]
//! ```
//!
//! Prints one JSON object on the last line (and `--out FILE` writes it);
//! exits 1 if a check fails, 2 on a usage or setup error (no CUDA backend,
//! no device).
//!
//! # Checks
//! 1. **parity** — the full agent's gradients on the device against the
//!    CPU's (the reference), same seeded weights and batch, for the plain
//!    f32 step and for checkpointing (4 segments) × micro-batches: worst
//!    per-variable `max |g − g_cpu| / max |g_cpu|` ≤ 1e-4 (cuBLAS sums in
//!    another order than the CPU's gemm).
//! 2. **oom** — a typed out-of-memory error shrinks the batch and retries
//!    the same step without losing its data. On CUDA the device is filled
//!    (one `u8` tensor) until `--headroom-mib` is left, so the step at
//!    `--batch` rows really fails with `CUDA_ERROR_OUT_OF_MEMORY` (the
//!    headroom is halved until it does, down to 64 MiB); on the CPU,
//!    [`TrainStep::inject_oom_above_rows`] refuses micro-batches above an
//!    eighth of the batch. Passes when the first attempt's error is
//!    [`gm_train::Error::is_out_of_memory`], [`TrainStep::grads_retrying`]
//!    then succeeds with a smaller micro-batch (`oom_retries ≥ 1`), every
//!    row has its TD error, and the gradients equal those of the same
//!    batch without memory pressure (≤ 1e-5 relative per variable: only
//!    the summation order of the micro-batches differs). The update is then
//!    applied.
//! 3. **learner** — the small Double-DQN learner with
//!    `LearnerConfig::device` set runs `--learner-steps` synchronous steps
//!    (finite losses), saves a checkpoint, and that checkpoint resumes on
//!    the CPU for one more step (checkpoints are device-neutral).
//! 4. **timing** (reported, not checked) — the full agent's plain f32 step
//!    at batch 256 on the device and on the CPU, median of 3.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gm_market::{GeneratorConfig, MarketData, PipelineConfig};
use gm_models::device::{candle_device, memory_info};
use gm_models::init::init_seeded;
use gm_train::checkpoint::CheckpointConfig;
use gm_train::{
    AdamW, AdamWConfig, AgentConfig, AgentNet, Grads, Learner, LearnerConfig, StepConfig,
    StepGrads, TrainStep,
};
use serde_json::{json, Value};

// The TD batch fixture and the gradient comparison of the tests.
#[path = "../tests/common/mod.rs"]
mod common;
use common::{grads_rel_err, Data};

const PARITY_TOL: f64 = 1e-4;
const RETRY_TOL: f64 = 1e-5;
const WEIGHT_SEED: u64 = 7;

struct Args {
    device: gm_core::Device,
    batch: usize,
    parity_batch: usize,
    headroom_mib: usize,
    learner_steps: u64,
    timing: bool,
    out: Option<std::path::PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        device: gm_core::Device::Cuda { ordinal: 0 },
        batch: 512,
        parity_batch: 32,
        headroom_mib: 2048,
        learner_steps: 150,
        timing: true,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => a.device = parse_device(&value()?)?,
            "--batch" => a.batch = value()?.parse()?,
            "--parity-batch" => a.parity_batch = value()?.parse()?,
            "--headroom-mib" => a.headroom_mib = value()?.parse()?,
            "--learner-steps" => a.learner_steps = value()?.parse()?,
            "--out" => a.out = Some(value()?.into()),
            "--quick" => {
                a.batch = 64;
                a.parity_batch = 8;
                a.learner_steps = 60;
                a.timing = false;
            }
            "--help" | "-h" => {
                println!("{}", USAGE);
                std::process::exit(0);
            }
            other => bail!("unknown flag {other:?}\n{USAGE}"),
        }
    }
    if a.batch < 2 || a.parity_batch == 0 {
        bail!("--batch must be at least 2 and --parity-batch at least 1");
    }
    Ok(a)
}

const USAGE: &str = "gpu_check [--device cpu|cuda:N] [--batch N] [--parity-batch N] \
                     [--headroom-mib N] [--learner-steps N] [--quick] [--out FILE]";

fn parse_device(s: &str) -> anyhow::Result<gm_core::Device> {
    match s {
        "cpu" => Ok(gm_core::Device::Cpu),
        _ => match s.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(ordinal)) => Ok(gm_core::Device::Cuda { ordinal }),
            _ => bail!("--device {s:?}: expected cpu or cuda:N"),
        },
    }
}

fn main() {
    // gm-train's warnings (the retry's "out of memory ... retrying") on stderr.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let device = match candle_device(args.device) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            println!(
                "{}",
                json!({ "device": args.device.to_string(), "error": e.to_string() })
            );
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let mut report = json!({
        "device": args.device.to_string(),
        "candle_cuda": gm_models::device::CANDLE_CUDA,
        "memory": memory_json(&device),
    });
    let mut ok = true;
    let mut run = |name: &str, f: &dyn Fn() -> anyhow::Result<(bool, Value)>| {
        eprintln!("==> {name}");
        let t = Instant::now();
        let (pass, mut v) = match f() {
            Ok(r) => r,
            Err(e) => (false, json!({ "error": format!("{e:#}") })),
        };
        v["pass"] = json!(pass);
        v["seconds"] = json!(t.elapsed().as_secs_f64());
        eprintln!("    {name}: {} {v}", if pass { "PASS" } else { "FAIL" });
        ok &= pass;
        report[name] = v;
    };
    run("parity", &|| parity(&device, args.parity_batch));
    run("oom", &|| oom_drill(&device, args.batch, args.headroom_mib));
    run("learner", &|| learner(args.device, args.learner_steps));
    if args.timing {
        run("timing", &|| timing(&device));
    }
    report["pass"] = json!(ok);
    report["seconds"] = json!(started.elapsed().as_secs_f64());
    let line = report.to_string();
    if let Some(path) = &args.out {
        if let Err(e) = std::fs::write(path, format!("{line}\n")) {
            eprintln!("error: writing {}: {e}", path.display());
            std::process::exit(2);
        }
    }
    println!("{line}");
    std::process::exit(if ok { 0 } else { 1 });
}

fn memory_json(device: &Device) -> Value {
    match memory_info(device) {
        Ok(Some(m)) => json!({ "free_bytes": m.free, "total_bytes": m.total }),
        Ok(None) => Value::Null,
        Err(e) => json!({ "error": e.to_string() }),
    }
}

/// The full agent on `device` from the fixed seed: its variables and net.
fn agent(device: &Device) -> anyhow::Result<(VarMap, AgentNet)> {
    let vm = VarMap::new();
    let net = AgentNet::new(
        &AgentConfig::default(),
        VarBuilder::from_varmap(&vm, DType::F32, device),
    )?;
    init_seeded(&vm, WEIGHT_SEED)?;
    Ok((vm, net))
}

fn step_cfg(ckpt: bool, micro: Option<usize>) -> StepConfig {
    StepConfig {
        checkpoint: ckpt.then(|| CheckpointConfig {
            segments: 4,
            ..CheckpointConfig::default()
        }),
        micro_batch: micro,
        // Off: a micro-batched step draws each micro-batch's dropout masks
        // from its own seed, so with dropout on the retried step is a
        // different (equally valid) sample, not comparable element-wise.
        dropout: false,
        ..StepConfig::default()
    }
}

fn grads_on(device: &Device, cfg: StepConfig, b: usize) -> anyhow::Result<(StepGrads, VarMap)> {
    let (vm, net) = agent(device)?;
    let data = Data::on(11, b, device);
    let step = TrainStep::new(cfg, AgentConfig::default())?;
    let g = step.grads(&net, &vm, &data.batch(), 5)?;
    Ok((g, vm))
}

fn parity(device: &Device, b: usize) -> anyhow::Result<(bool, Value)> {
    if device.is_cpu() {
        return Ok((
            true,
            json!({ "skipped": "the device is the CPU (the reference)" }),
        ));
    }
    let mut out = json!({ "batch": b, "tolerance": PARITY_TOL });
    let mut pass = true;
    let micro = (b / 4).max(1);
    for (name, cfg) in [
        ("plain", step_cfg(false, None)),
        ("checkpointing_micro", step_cfg(true, Some(micro))),
    ] {
        let (g_dev, _) = grads_on(device, cfg, b)?;
        let (g_cpu, _) = grads_on(&Device::Cpu, cfg, b)?;
        let err = grads_rel_err(&g_dev.grads, &g_cpu.grads);
        let loss_rel = (g_dev.loss - g_cpu.loss).abs() / g_cpu.loss.abs().max(1e-12);
        pass &= err <= PARITY_TOL && loss_rel <= PARITY_TOL;
        out[name] = json!({ "grad_rel_err": err, "loss_rel_err": loss_rel,
                            "loss_device": g_dev.loss, "loss_cpu": g_cpu.loss });
    }
    Ok((pass, out))
}

/// Fills the CUDA device until `headroom` bytes are left (after the
/// caller's tensors); `None` on the CPU or when less is free already.
fn fill_device(device: &Device, headroom: usize) -> anyhow::Result<Option<Tensor>> {
    device.synchronize()?;
    let Some(m) = memory_info(device)? else {
        return Ok(None);
    };
    if m.free <= headroom {
        return Ok(None);
    }
    Ok(Some(Tensor::zeros(m.free - headroom, DType::U8, device)?))
}

fn oom_drill(device: &Device, b: usize, headroom_mib: usize) -> anyhow::Result<(bool, Value)> {
    let data = Data::on(13, b, device);
    let plain = step_cfg(false, None);
    // The reference: the same batch without memory pressure (this also
    // loads every kernel and the cuBLAS handle before the device is full).
    let (ref_vm, ref_net) = agent(device)?;
    let reference = TrainStep::new(plain, AgentConfig::default())?.grads(
        &ref_net,
        &ref_vm,
        &data.batch(),
        5,
    )?;
    let ref_td = reference.td_abs.clone();

    let (vm, net) = agent(device)?;
    let mut opt = AdamW::new(AdamWConfig::default(), Grads::empty(&vm)?.len())?;
    let mut step = TrainStep::new(plain, AgentConfig::default())?;
    let mut out = json!({ "batch": b, "tolerance": RETRY_TOL });
    // Provoke the first error: fill the device (CUDA) or refuse large
    // micro-batches (the CPU twin).
    let mut headroom = headroom_mib << 20;
    let (first_error, _filler) = loop {
        let filler = if device.is_cpu() {
            step.inject_oom_above_rows(Some((b / 8).max(1)));
            None
        } else {
            fill_device(device, headroom)?
        };
        match step.grads(&net, &vm, &data.batch(), 5) {
            Err(e) => break (e, filler),
            Ok(_) if !device.is_cpu() && headroom > 64 << 20 => {
                eprintln!(
                    "    batch {b} fit in {} MiB of headroom: halving it",
                    headroom >> 20
                );
                drop(filler);
                headroom /= 2;
            }
            Ok(_) => bail!("the batch of {b} rows fit: no out-of-memory error to recover from"),
        }
    };
    out["headroom_mib"] = json!(headroom >> 20);
    out["memory_with_filler"] = memory_json(device);
    out["first_error"] = json!(first_error.to_string());
    out["first_error_is_oom"] = json!(first_error.is_out_of_memory());
    if !first_error.is_out_of_memory() {
        return Ok((false, out));
    }
    let t = Instant::now();
    let retried = step.grads_retrying(&net, &vm, &data.batch(), 5);
    out["retry_seconds"] = json!(t.elapsed().as_secs_f64());
    out["oom_retries"] = json!(step.oom_retries);
    out["micro_batch_after"] = json!(step.cfg.micro_batch);
    let g = match retried {
        Ok(g) => g,
        Err(e) => {
            out["retry_error"] = json!(e.to_string());
            return Ok((false, out));
        }
    };
    let err = grads_rel_err(&g.grads, &reference.grads);
    let td_err = g
        .td_abs
        .iter()
        .zip(&ref_td)
        .fold(0f32, |m, (a, r)| m.max((a - r).abs()));
    out["micro_batches"] = json!(g.micro_batches);
    out["grad_rel_err_vs_unpressured"] = json!(err);
    out["td_abs_max_diff"] = json!(td_err);
    out["rows_with_td_error"] = json!(g.td_abs.len());
    let outcome = step.apply(g, &mut opt)?;
    out["stepped"] = json!(outcome.stepped);
    let pass = step.oom_retries >= 1
        && step.cfg.micro_batch.is_some_and(|m| m < b)
        && outcome.td_abs.len() == b
        && err <= RETRY_TOL
        && td_err <= 1e-4
        && outcome.stepped
        && opt.step == 1;
    Ok((pass, out))
}

fn learner(device: gm_core::Device, steps: u64) -> anyhow::Result<(bool, Value)> {
    let data = Arc::new(MarketData::synthetic(
        GeneratorConfig {
            seed: 3,
            ..GeneratorConfig::default()
        },
        4_000,
        PipelineConfig::default(),
    )?);
    let mut cfg = LearnerConfig::small();
    cfg.device = device;
    cfg.learning_starts_transitions = 128;
    cfg.replay_segment_steps = 8;
    cfg.log_every_steps = u64::MAX;
    let mut l = Learner::new(cfg.clone(), data.clone())?;
    let t = Instant::now();
    let mut losses = Vec::new();
    for _ in 0..steps {
        if let Some(u) = l.step()?.update {
            losses.push(u.loss);
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let dir = tempfile::tempdir()?;
    l.save_checkpoint(dir.path())?;
    let mut cpu_cfg = cfg.clone();
    cpu_cfg.device = gm_core::Device::Cpu;
    let mut resumed = Learner::resume(cpu_cfg, data, dir.path())?;
    let next = resumed.step()?;
    let finite = losses.iter().all(|l| l.is_finite());
    let out = json!({
        "steps": steps,
        "updates": losses.len(),
        "steps_per_second": steps as f64 / secs,
        "first_loss": losses.first(),
        "last_loss": losses.last(),
        "losses_finite": finite,
        "resumed_on_cpu_at_step": next.counters.step,
    });
    Ok((finite && !losses.is_empty(), out))
}

fn timing(device: &Device) -> anyhow::Result<(bool, Value)> {
    let b = 256;
    let time_on = |dev: &Device| -> anyhow::Result<f64> {
        let (vm, net) = agent(dev)?;
        let data = Data::on(17, b, dev);
        let mut opt = AdamW::new(AdamWConfig::default(), Grads::empty(&vm)?.len())?;
        let mut step = TrainStep::new(step_cfg(false, None), AgentConfig::default())?;
        step.step(&net, &vm, &mut opt, &data.batch(), 1)?; // warm-up
        let mut ms = Vec::new();
        for i in 0..3 {
            dev.synchronize()?;
            let t = Instant::now();
            step.step(&net, &vm, &mut opt, &data.batch(), 2 + i)?;
            dev.synchronize()?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        Ok(ms[1])
    };
    let dev_ms = time_on(device)?;
    let cpu_ms = if device.is_cpu() {
        dev_ms
    } else {
        time_on(&Device::Cpu)?
    };
    Ok((
        true,
        json!({ "batch": b, "device_step_ms": dev_ms, "cpu_step_ms": cpu_ms,
                "cpu_over_device": cpu_ms / dev_ms,
                "cpu_threads": std::thread::available_parallelism().map(|n| n.get()).ok() }),
    ))
}
