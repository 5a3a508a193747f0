//! The memory table of the GrandModel models and their int8 quantization,
//! measured with gm-leak's counting allocator.
//!
//! Per model — the four embedders (structure, tactical, regime, LVN) and
//! the agent heads, default configs, f32, CPU, seeded weights:
//!
//! - `{m}_param_bytes`: parameter storage ([`parameter_bytes`], equal to
//!   the `VarMap`'s bytes, 4 B per parameter);
//! - `{m}_fwd_peak_b{B}_bytes`: peak heap of one forward pass (dropout off)
//!   above what was live before it (inputs and model allocated outside),
//!   at batch `B` ∈ {32, 256}. The f32 model's parameters are variables,
//!   so candle keeps every intermediate for a possible backward until the
//!   outputs are dropped: this is a training-capable forward;
//! - `{m}_fwd_bwd_peak_b{B}_bytes`: the same for forward + `backward()` of a
//!   scalar loss (`Σ w₁ ⊙ out₁ + Σ w₂ ⊙ out₂` with fixed random weights),
//!   gradients dropped inside the measurement;
//! - `{m}_fwd_nograd_peak_b{B}_bytes`: the same forward with the same f32
//!   weights held as plain tensors (no variables, so no autograd graph):
//!   the fair f32 baseline for the quantized forward;
//! - `{m}_fwd_b32_ms`, `{m}_fwd_nograd_b32_ms`: the forwards' wall time at
//!   B = 32 (best of 3);
//! - `quant_{m}_param_bytes`, `quant_{m}_param_bytes_ratio`: the quantized
//!   copy's parameter storage ([`QuantPolicy::Auto`]) and its ratio to f32;
//!   `quant_{m}_alloc_bytes`: what `quantized()` left allocated (the
//!   allocator's view of the same: the int8 weights, scales, copied biases
//!   and tables; the layer norms are shared with the f32 model);
//! - `quant_{m}_fwd_peak_b{B}_bytes`, `quant_{m}_fwd_b32_ms`: the quantized
//!   forward of a copy quantized from the plain-tensor (no-grad) model, as
//!   an inference deployment loading weights from a file would (no autograd
//!   graph: a quantized layer's output is detached);
//!   `quant_{m}_fwd_peak_from_varmap_b{B}_bytes`: the same for the copy
//!   quantized from the training (`VarMap`) model, whose layer norms are
//!   still the source's variables, so candle records the graph from each
//!   layer norm up to the next quantized layer;
//! - `quant_{m}_max_abs_err`, `quant_{m}_max_rel_err` (max |q − f| / max
//!   |f|), `quant_{m}_max_err_of_range` (max |q − f| / (max f − min f)):
//!   the largest error over both outputs at B = 32;
//! - `quant_q8pref_{m}_param_bytes`, `quant_q8pref_{m}_max_err_of_range`:
//!   the same model under [`QuantPolicy::PreferQ8_0`] (Q8_0 wherever
//!   `in_dim % 32 == 0`), the alternative the default rule was chosen over.
//!
//! Then the per-layer comparison behind the rule, for each layer shape of
//! the models where both int8 formats apply (`in % 32 == 0`), at the row
//! count `m` it sees at batch 32: `qlayer_{in}x{out}_m{m}_{scheme}_…` with
//! `bytes`, `max_err` (max |error| / max |f32 output|), `rms_err` (RMS error
//! / RMS output), `us` (best of 10), `retained_bytes` (heap the first call
//! left behind: Q8_0 repacks its weight for the int8 kernels on CPUs with
//! AVX-512 VNNI when `in % 256 == 0`); `qlayer_…_f32_us` for reference.
//!
//! Prints tables on stderr and, as the last stdout line, one flat JSON
//! object with all of the above. Run it optimised:
//! `cargo run --release -p gm-models --example model_memory` (about a
//! minute on 2 cores; the tactical embedder's B = 256 backward takes most
//! of it).
//!
//! [`parameter_bytes`]: gm_models::StructureEmbedder::parameter_bytes

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gm_models::quant::tensor_bytes;
use gm_models::{
    AgentHeads, Embedder, ForwardCtx, HeadsConfig, Linear, LvnConfig, LvnEmbedder, QuantPolicy,
    QuantScheme, RegimeConfig, RegimeEmbedder, StructureConfig, StructureEmbedder, TacticalConfig,
    TacticalEmbedder,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

#[global_allocator]
static A: gm_leak::TrackingAllocator = gm_leak::TrackingAllocator::system();

const BATCHES: [usize; 2] = [32, 256];

/// Uniform values in [-1, 1) from `seed`.
fn uniform(shape: &[usize], seed: u64) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Seeded weights, as in `tests/quant.rs`: dense weights uniform in
/// ±1/√fan_in, biases ±0.1, layer-norm scales 1 ± 0.1, tables ±1
/// (`pos` ±0.035).
fn init(vm: &VarMap, seed: u64) -> Result<()> {
    let data = vm.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let (center, half) = match (dims.len(), name.ends_with("weight")) {
            (1, true) => (1.0, 0.1),
            (1, false) => (0.0, 0.1),
            (_, true) => (
                0.0,
                1.0 / (dims[1..].iter().product::<usize>() as f32).sqrt(),
            ),
            _ if name.ends_with("pos") => (0.0, 0.035),
            _ => (0.0, 1.0),
        };
        let v: Vec<f32> = (0..n)
            .map(|_| center + rng.random_range(-half..=half))
            .collect();
        var.set(&Tensor::from_vec(v, dims.as_slice(), &Device::Cpu)?)?;
    }
    Ok(())
}

/// One model: how to build, feed, run and quantize it.
#[allow(clippy::large_enum_variant)] // a few long-lived values
enum Subject {
    Structure(StructureEmbedder),
    Tactical(TacticalEmbedder),
    Regime(RegimeEmbedder),
    Lvn(LvnEmbedder),
    Heads(AgentHeads),
}

impl Subject {
    const NAMES: [&'static str; 5] = ["structure", "tactical", "regime", "lvn", "heads"];

    fn build(name: &str, vb: VarBuilder) -> Result<Self> {
        Ok(match name {
            "structure" => {
                Subject::Structure(StructureEmbedder::new(StructureConfig::default(), vb)?)
            }
            "tactical" => Subject::Tactical(TacticalEmbedder::new(TacticalConfig::default(), vb)?),
            "regime" => Subject::Regime(RegimeEmbedder::new(RegimeConfig::default(), vb)?),
            "lvn" => Subject::Lvn(LvnEmbedder::new(LvnConfig::default(), vb)?),
            "heads" => Subject::Heads(AgentHeads::new(HeadsConfig::default(), vb)?),
            other => anyhow::bail!("unknown model {other}"),
        })
    }

    /// The inputs at batch `b` (the seed's shapes).
    fn inputs(&self, b: usize, seed: u64) -> Result<Vec<Tensor>> {
        let one = |shape: &[usize]| -> Result<Vec<Tensor>> { Ok(vec![uniform(shape, seed)?]) };
        match self {
            Subject::Structure(_) => one(&[b, 48, 8]),
            Subject::Tactical(_) => one(&[b, 60, 7]),
            Subject::Regime(_) => one(&[b, 21, 8]),
            Subject::Lvn(_) => one(&[b, 5]),
            Subject::Heads(h) => {
                let c = h.config();
                [c.structure_dim, c.tactical_dim, c.regime_dim, c.lvn_dim]
                    .iter()
                    .enumerate()
                    .map(|(i, d)| uniform(&[b, *d], seed + i as u64))
                    .collect()
            }
        }
    }

    /// The two outputs (μ and σ, or Q and the value), dropout off.
    fn run(&self, x: &[Tensor]) -> Result<[Tensor; 2]> {
        let emb = |e: gm_models::Embedding| [e.mu, e.sigma];
        let mut ctx = ForwardCtx::eval();
        Ok(match self {
            Subject::Structure(m) => emb(m.forward(&x[0], &mut ctx)?),
            Subject::Tactical(m) => emb(m.forward(&x[0], &mut ctx)?),
            Subject::Regime(m) => emb(m.forward(&x[0], &mut ctx)?),
            Subject::Lvn(m) => emb(m.forward(&x[0], &mut ctx)?),
            Subject::Heads(m) => {
                let (q, v) = m.forward(&x[0], &x[1], &x[2], &x[3])?;
                [q, v]
            }
        })
    }

    fn quantized_with(&self, policy: QuantPolicy) -> Result<Self> {
        Ok(match self {
            Subject::Structure(m) => Subject::Structure(m.quantized_with(policy)?),
            Subject::Tactical(m) => Subject::Tactical(m.quantized_with(policy)?),
            Subject::Regime(m) => Subject::Regime(m.quantized_with(policy)?),
            Subject::Lvn(m) => Subject::Lvn(m.quantized_with(policy)?),
            Subject::Heads(m) => Subject::Heads(m.quantized_with(policy)?),
        })
    }

    fn parameter_bytes(&self) -> usize {
        match self {
            Subject::Structure(m) => m.parameter_bytes(),
            Subject::Tactical(m) => m.parameter_bytes(),
            Subject::Regime(m) => m.parameter_bytes(),
            Subject::Lvn(m) => m.parameter_bytes(),
            Subject::Heads(m) => m.parameter_bytes(),
        }
    }
}

/// max |q − f|, max |f| and the range of f over both outputs' elements
/// (per output), combined as the largest of each ratio.
fn errors(f: &[Tensor; 2], q: &[Tensor; 2]) -> Result<(f32, f32, f32)> {
    let mut worst = (0f32, 0f32, 0f32);
    for (a, b) in f.iter().zip(q) {
        let a: Vec<f32> = a.flatten_all()?.to_vec1()?;
        let b: Vec<f32> = b.flatten_all()?.to_vec1()?;
        let abs = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let max = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let lo = a.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        worst = (
            worst.0.max(abs),
            worst.1.max(abs / max),
            worst.2.max(abs / (hi - lo)),
        );
    }
    Ok(worst)
}

fn put(json: &mut Map<String, Value>, key: String, v: impl Into<Value>) {
    json.insert(key, v.into());
}

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0))
}

/// The memory table of one model.
fn model(name: &str, json: &mut Map<String, Value>) -> Result<()> {
    let vm = VarMap::new();
    let f32_model = Subject::build(name, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    init(&vm, 11)?;
    let bytes = f32_model.parameter_bytes();
    let var_bytes: usize = vm
        .all_vars()
        .iter()
        .map(|v| tensor_bytes(v.as_tensor()))
        .sum();
    anyhow::ensure!(
        bytes == var_bytes,
        "{name}: parameter_bytes {bytes} != VarMap bytes {var_bytes}"
    );
    put(json, format!("{name}_param_bytes"), bytes);
    eprintln!("\n{name}: parameters {bytes} B ({})", mib(bytes as u64));

    let (quant, qm) = gm_leak::measure(|| f32_model.quantized_with(QuantPolicy::Auto));
    let quant = quant?;
    let q_bytes = quant.parameter_bytes();
    put(json, format!("quant_{name}_param_bytes"), q_bytes);
    put(
        json,
        format!("quant_{name}_param_bytes_ratio"),
        q_bytes as f64 / bytes as f64,
    );
    put(json, format!("quant_{name}_alloc_bytes"), qm.retained_bytes);
    eprintln!(
        "  quantized: {q_bytes} B (ratio {:.4}); quantized() left {} B allocated",
        q_bytes as f64 / bytes as f64,
        qm.retained_bytes
    );

    // The same f32 weights as plain tensors (not variables): a forward
    // that builds no autograd graph, the fair baseline for the quantized one.
    let detached: HashMap<String, Tensor> = vm
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let inference = Subject::build(
        name,
        VarBuilder::from_tensors(detached, DType::F32, &Device::Cpu),
    )?;

    // How an inference deployment quantizes: from weights loaded as plain
    // tensors. Quantized from the training `VarMap` model instead, the copy
    // shares its layer norms' *variables*, so candle records the graph
    // from each layer norm to the next (detached) dense layer.
    let deployed = inference.quantized_with(QuantPolicy::Auto)?;

    // Warm-up (thread pools, per-thread buffers) outside the measurements.
    let warm = f32_model.inputs(2, 0)?;
    f32_model.run(&warm)?;
    inference.run(&warm)?;
    quant.run(&warm)?;
    deployed.run(&warm)?;

    for b in BATCHES {
        let x = f32_model.inputs(b, 100 + b as u64)?;
        let shapes = f32_model.run(&x)?.map(|t| t.dims().to_vec());
        let w1 = uniform(&shapes[0], 7)?;
        let w2 = uniform(&shapes[1], 8)?;

        let (r, fwd) = gm_leak::measure(|| f32_model.run(&x).map(drop));
        r?;
        let (r, both) = gm_leak::measure(|| -> Result<()> {
            let [o1, o2] = f32_model.run(&x)?;
            let loss = o1.mul(&w1)?.sum_all()?.add(&o2.mul(&w2)?.sum_all()?)?;
            let grads = loss.backward()?;
            drop(grads);
            Ok(())
        });
        r?;
        let (r, ifwd) = gm_leak::measure(|| inference.run(&x).map(drop));
        r?;
        let (r, qfwd) = gm_leak::measure(|| deployed.run(&x).map(drop));
        r?;
        let (r, qvfwd) = gm_leak::measure(|| quant.run(&x).map(drop));
        r?;
        put(
            json,
            format!("quant_{name}_fwd_peak_from_varmap_b{b}_bytes"),
            qvfwd.peak_delta_bytes,
        );
        put(
            json,
            format!("{name}_fwd_nograd_peak_b{b}_bytes"),
            ifwd.peak_delta_bytes,
        );
        put(
            json,
            format!("{name}_fwd_peak_b{b}_bytes"),
            fwd.peak_delta_bytes,
        );
        put(
            json,
            format!("{name}_fwd_bwd_peak_b{b}_bytes"),
            both.peak_delta_bytes,
        );
        put(
            json,
            format!("quant_{name}_fwd_peak_b{b}_bytes"),
            qfwd.peak_delta_bytes,
        );
        eprintln!(
            "  B={b:3}: fwd peak {:>11}, fwd+bwd peak {:>11} ({:.0?}), \
             no-grad fwd peak {:>11}, quantized fwd peak {:>11} \
             (quantized from the VarMap model {:>11})",
            mib(fwd.peak_delta_bytes),
            mib(both.peak_delta_bytes),
            both.duration,
            mib(ifwd.peak_delta_bytes),
            mib(qfwd.peak_delta_bytes),
            mib(qvfwd.peak_delta_bytes)
        );
        if b == 32 {
            let ms = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
                let mut best = f64::INFINITY;
                for _ in 0..3 {
                    let t = Instant::now();
                    f()?;
                    best = best.min(t.elapsed().as_secs_f64() * 1e3);
                }
                Ok(best)
            };
            let t_f32 = ms(&|| f32_model.run(&x).map(drop))?;
            let t_i = ms(&|| inference.run(&x).map(drop))?;
            let t_q = ms(&|| deployed.run(&x).map(drop))?;
            put(json, format!("{name}_fwd_b32_ms"), t_f32);
            put(json, format!("{name}_fwd_nograd_b32_ms"), t_i);
            put(json, format!("quant_{name}_fwd_b32_ms"), t_q);
            let (abs, rel, of_range) = errors(&f32_model.run(&x)?, &quant.run(&x)?)?;
            put(json, format!("quant_{name}_max_abs_err"), abs);
            put(json, format!("quant_{name}_max_rel_err"), rel);
            put(json, format!("quant_{name}_max_err_of_range"), of_range);
            let q8 = f32_model.quantized_with(QuantPolicy::PreferQ8_0)?;
            let (_, _, q8_range) = errors(&f32_model.run(&x)?, &q8.run(&x)?)?;
            put(
                json,
                format!("quant_q8pref_{name}_param_bytes"),
                q8.parameter_bytes(),
            );
            put(
                json,
                format!("quant_q8pref_{name}_max_err_of_range"),
                q8_range,
            );
            eprintln!(
                "  B=32 forward {t_f32:.2} ms, no-grad {t_i:.2} ms, quantized {t_q:.2} ms; quantization error: \
                 max abs {abs:.3e}, max rel {rel:.3e}, {of_range:.3e} of range \
                 (prefer-q8_0: {} B, {q8_range:.3e} of range)",
                q8.parameter_bytes()
            );
        }
    }
    Ok(())
}

/// Layer shapes `(rows m at batch 32, in, out, where)` where both Q8_0 and
/// per-channel int8 apply.
const LAYERS: &[(usize, usize, usize, &str)] = &[
    (1536, 128, 128, "structure q/k/v/out"),
    (1536, 128, 512, "structure ff1"),
    (1536, 512, 128, "structure ff2"),
    (1536, 128, 1, "structure pool"),
    (32, 128, 64, "structure head fc1, heads streams"),
    (32, 64, 64, "structure head fc2"),
    (1920, 128, 512, "tactical lstm 1 ih"),
    (1920, 256, 512, "tactical lstm 2-3 ih"),
    (32, 128, 512, "tactical lstm hh (one step)"),
    (1920, 256, 256, "tactical scale q/o"),
    (1920, 512, 256, "tactical scale gate"),
    (1920, 768, 256, "tactical fusion"),
    (32, 256, 128, "tactical head hidden"),
    (32, 32, 128, "regime lstm hh (one step)"),
    (640, 32, 128, "regime lstm 2 ih"),
    (32, 64, 32, "regime fusion fc2"),
];

/// Q8_0 vs per-channel int8 on each layer shape.
fn layers(json: &mut Map<String, Value>) -> Result<()> {
    eprintln!(
        "\nper-layer: scheme bytes, max err (of max |out|), rms err (of rms out), µs (best of 10), heap left by the first call"
    );
    for (i, &(m, k, n, what)) in LAYERS.iter().enumerate() {
        let vm = VarMap::new();
        let lin = Linear::new(k, n, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
        init(&vm, 200 + i as u64)?;
        // Layer-normed activations: N(0, 1)-like.
        let x = uniform(&[m, k], 300 + i as u64)?.affine(3f64.sqrt(), 0.0)?;
        let y = lin.forward(&x)?;
        let y_max = y.abs()?.max_all()?.to_scalar::<f32>()?;
        let y_rms = y.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?;
        let time = |l: &Linear| -> Result<f64> {
            let mut best = f64::INFINITY;
            for _ in 0..10 {
                let t = Instant::now();
                l.forward(&x)?;
                best = best.min(t.elapsed().as_secs_f64() * 1e6);
            }
            Ok(best)
        };
        let key = format!("qlayer_{k}x{n}_m{m}");
        let t_f32 = time(&lin)?;
        put(json, format!("{key}_f32_us"), t_f32);
        let mut line = format!("  {what:34} {k:4}→{n:<4} m={m:<5} f32 {t_f32:7.0} µs");
        for scheme in [QuantScheme::Q8_0, QuantScheme::PerChannelInt8] {
            let q = lin.quantized_as(scheme)?;
            let (r, first) = gm_leak::measure(|| q.forward(&x).map(drop));
            r?;
            let d = q.forward(&x)?.sub(&y)?;
            let max_err = d.abs()?.max_all()?.to_scalar::<f32>()? / y_max;
            let rms_err = d.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()? / y_rms;
            let us = time(&q)?;
            let s = scheme.name();
            put(json, format!("{key}_{s}_bytes"), q.parameter_bytes());
            put(json, format!("{key}_{s}_max_err"), max_err);
            put(json, format!("{key}_{s}_rms_err"), rms_err);
            put(json, format!("{key}_{s}_us"), us);
            put(
                json,
                format!("{key}_{s}_retained_bytes"),
                first.retained_bytes,
            );
            line += &format!(
                " | {s} {:6} B {max_err:.2e} {rms_err:.2e} {us:7.0} µs +{} B",
                q.parameter_bytes(),
                first.retained_bytes
            );
        }
        eprintln!("{line}");
    }
    Ok(())
}

fn main() -> Result<()> {
    gm_leak::assert_active();
    let mut json = Map::new();
    for name in Subject::NAMES {
        model(name, &mut json)?;
    }
    layers(&mut json)?;
    println!("{}", Value::Object(json));
    Ok(())
}
