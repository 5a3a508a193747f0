//! Gradient checkpointing on the full agent: peak memory and time of one
//! forward + backward, plain backprop vs checkpointed, printed as one JSON
//! object (read by `cargo xtask bench train`).
//!
//! ```text
//! cargo run --release -p gm-train --example checkpoint_memory -- [--batch 256] [--segments 4] [--reps 3]
//! ```
//!
//! Keys (`B` = batch, `N` = segments): `agent_plain_peak_bB_bytes`,
//! `agent_ckptN_peak_bB_bytes` (the largest process-wide peak over the
//! repetitions, counted by gm-leak's allocator from the start of the step:
//! activations, autograd graph, gradients in flight and the returned
//! [`Grads`]), `agent_plain_step_ms_bB`, `agent_ckptN_step_ms_bB` (median
//! wall time of a forward + backward), their ratios, the bytes of the
//! returned gradients, and the largest absolute difference between the two
//! runs' gradients. Dropout is on (a new seed each repetition, the same for
//! both runs), the loss a squared TD error on one action's Q per row.

use std::time::Duration;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gm_train::checkpoint::{
    agent_checkpointed_grads, agent_plain_grads, CheckpointConfig, SegmentDropout,
};
use gm_train::{AgentConfig, AgentNet, Grads, ObsBatch};
use serde_json::{json, Map, Value};

#[global_allocator]
static A: gm_leak::TrackingAllocator = gm_leak::TrackingAllocator::system();

/// Deterministic values in [−1, 1).
fn data(dims: &[usize], salt: u64) -> candle_core::Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n as u64)
        .map(|i| {
            let mut z = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ salt.wrapping_mul(0xD6E8_FEB8_6659_FD93);
            z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z ^= z >> 29;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
}

fn arg(args: &[String], name: &str, default: usize) -> anyhow::Result<usize> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name}: not a number")),
    }
}

fn max_abs_diff(a: &Grads, b: &Grads) -> anyhow::Result<f64> {
    let mut m = 0f64;
    for ((_, _, x), (_, _, y)) in a.iter().zip(b.iter()) {
        match (x, y) {
            (Some(x), Some(y)) => {
                let d = x.sub(y)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                m = m.max(f64::from(d));
            }
            (None, None) => {}
            _ => bail!("the two runs give gradients to different variables"),
        }
    }
    Ok(m)
}

fn median_ms(mut times: Vec<Duration>) -> f64 {
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let batch = arg(&args, "--batch", 256)?;
    let segments = arg(&args, "--segments", 4)?;
    let reps = arg(&args, "--reps", 3)?.max(1);

    let vm = VarMap::new();
    let net = AgentNet::new(
        &AgentConfig::default(),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )?;
    gm_models::init::init_seeded(&vm, 1)?;
    let obs = ObsBatch {
        structure: data(&[batch, 48, 8], 1)?,
        tactical: data(&[batch, 60, 7], 2)?,
        regime: data(&[batch, 21, 8], 3)?,
        lvn: data(&[batch, 5], 4)?,
    };
    // One action per row and a TD target: loss = mean (Q(s, a) − y)².
    let onehot: Vec<f32> = (0..batch)
        .flat_map(|i| (0..3).map(move |a| f32::from(u8::from(i % 3 == a))))
        .collect();
    let onehot = Tensor::from_vec(onehot, (batch, 3), &Device::Cpu)?;
    let target = data(&[batch], 5)?;
    let loss = |q: &Tensor| -> gm_train::Result<Tensor> {
        Ok(q.mul(&onehot)?.sum(1)?.sub(&target)?.sqr()?.mean_all()?)
    };

    let (mut plain_peak, mut ckpt_peak) = (0u64, 0u64);
    let (mut plain_t, mut ckpt_t) = (Vec::new(), Vec::new());
    let (mut diff, mut grads_bytes) = (0f64, 0usize);
    // Repetition 0 warms up (allocator, thread pool) and is not timed.
    for rep in 0..=reps {
        let dropout = SegmentDropout::On { seed: rep as u64 };
        let cfg = CheckpointConfig { segments, dropout };
        let (plain, mp) = gm_leak::measure(|| agent_plain_grads(&net, &vm, &obs, loss, dropout));
        let plain = plain?;
        let (ckpt, mc) = gm_leak::measure(|| agent_checkpointed_grads(&net, &vm, &obs, loss, &cfg));
        let ckpt = ckpt?;
        diff = diff.max(max_abs_diff(&plain.1, &ckpt.1)?);
        grads_bytes = ckpt.1.elem_count() * 4;
        if rep > 0 {
            plain_peak = plain_peak.max(mp.peak_delta_bytes);
            ckpt_peak = ckpt_peak.max(mc.peak_delta_bytes);
            plain_t.push(mp.duration);
            ckpt_t.push(mc.duration);
        }
    }
    let (plain_ms, ckpt_ms) = (median_ms(plain_t), median_ms(ckpt_t));
    let b = batch;
    let n = segments;
    let mut out = Map::new();
    out.insert("batch".into(), json!(b));
    out.insert("segments".into(), json!(n));
    out.insert("reps".into(), json!(reps));
    out.insert(format!("agent_plain_peak_b{b}_bytes"), json!(plain_peak));
    out.insert(format!("agent_ckpt{n}_peak_b{b}_bytes"), json!(ckpt_peak));
    out.insert(format!("agent_plain_step_ms_b{b}"), json!(plain_ms));
    out.insert(format!("agent_ckpt{n}_step_ms_b{b}"), json!(ckpt_ms));
    out.insert(
        format!("agent_ckpt{n}_peak_ratio_b{b}"),
        json!(ckpt_peak as f64 / plain_peak as f64),
    );
    out.insert(
        format!("agent_ckpt{n}_time_ratio_b{b}"),
        json!(ckpt_ms / plain_ms),
    );
    out.insert("agent_grads_bytes".into(), json!(grads_bytes));
    out.insert(format!("agent_ckpt{n}_max_abs_grad_diff_b{b}"), json!(diff));
    println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
    Ok(())
}
