//! Times the CUDA sparse-attention kernels against the CPU sparse op
//! (forward, and forward + backward) at `B = 1, H = 4, D = 32` and
//! `N = 512, 2048, 4096`, with a Longformer-like pattern (a ±64 window,
//! every 64th key, 4 global tokens), and prints one JSON object on the last
//! line.
//!
//! ```text
//! cargo run --release -p gm-models --features cuda --example cuda_attention_bench [-- --iters N]
//! cargo run -p gm-models --features cuda --example cuda_attention_bench -- --info
//! ```
//!
//! Per size: the CPU op (candle autograd for the backward), the device API
//! end to end (host slices in and out: copies included), and the kernels
//! alone (inputs resident on the device); the median of the repetitions,
//! in milliseconds, plus the largest output difference GPU vs CPU.
//!
//! Without a device (or the `cuda` feature, the driver, NVRTC) it prints
//! `{"cuda": "unavailable", "reason": ...}` and exits 0. `--info` prints
//! what is present (feature, driver, NVRTC, devices) as JSON and exits 0.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use gm_models::attention::{self, SparsePattern};
use gm_models::cuda::{self, AttentionDims, SparseAttentionCuda};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

const SIZES: [usize; 3] = [512, 2048, 4096];
const B: usize = 1;
const H: usize = 4;
const D: usize = 32;

fn main() -> Result<()> {
    let mut iters = 20;
    let mut info = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--info" => info = true,
            "--iters" => {
                iters = args
                    .next()
                    .context("--iters needs a value")?
                    .parse()
                    .context("--iters: not a number")?;
            }
            // `cargo bench`-style harness flags are ignored.
            "--bench" => {}
            other => bail!("unknown argument `{other}` (expected --info or --iters N)"),
        }
    }
    if info {
        println!("{}", info_json());
        return Ok(());
    }
    let dev = match SparseAttentionCuda::new(0) {
        Ok(dev) => dev,
        Err(e) => {
            println!(
                "{}",
                json!({"cuda": "unavailable", "reason": e.to_string()})
            );
            return Ok(());
        }
    };
    let (major, minor) = dev.compute_capability();
    println!("device cuda:0 = {} (sm_{major}{minor})", dev.name());
    let pattern = SparsePattern::local(64)
        .with_stride(64)
        .with_global_tokens(4);
    println!("pattern {pattern:?}, B = {B}, H = {H}, D = {D}, {iters} iterations");
    let mut results = Vec::new();
    for n in SIZES {
        let r = bench_size(&dev, n, &pattern, iters)?;
        println!("N = {n}: {r}");
        results.push(r);
    }
    println!(
        "{}",
        json!({
            "cuda": "ok",
            "device": dev.name(),
            "compute_capability": format!("{major}.{minor}"),
            "nvrtc": cuda::nvrtc_version().map(|(a, b)| format!("{a}.{b}")),
            "b": B, "h": H, "d": D,
            "pattern": {
                "window": pattern.window,
                "stride": pattern.stride,
                "global_tokens": pattern.global_tokens,
                "causal": pattern.causal,
            },
            "iters": iters,
            "unit": "ms (median)",
            "results": results,
        })
    );
    Ok(())
}

/// What is present, as JSON.
fn info_json() -> Value {
    let device = match SparseAttentionCuda::new(0) {
        Ok(dev) => {
            let (major, minor) = dev.compute_capability();
            json!({
                "ordinal": dev.ordinal(),
                "name": dev.name(),
                "compute_capability": format!("{major}.{minor}"),
            })
        }
        Err(e) => json!({"unavailable": e.to_string()}),
    };
    json!({
        "feature": cuda::FEATURE_ENABLED,
        "driver": cuda::driver_present(),
        "nvrtc": cuda::nvrtc_present(),
        "nvrtc_version": cuda::nvrtc_version().map(|(a, b)| format!("{a}.{b}")),
        "device_count": cuda::device_count().ok(),
        "device": device,
    })
}

/// The median of `reps` timed runs of `f`, in milliseconds.
fn median_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut times: Vec<Duration> = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(ms(times[times.len() / 2]))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn uniform(n: usize, amp: f32, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * amp)
        .collect()
}

fn bench_size(
    dev: &SparseAttentionCuda,
    n: usize,
    pattern: &SparsePattern,
    iters: usize,
) -> Result<Value> {
    let dims = AttentionDims::new(B, H, n, D);
    let mut rng = ChaCha8Rng::seed_from_u64(n as u64);
    let q = uniform(dims.q_len(), 2.0, &mut rng);
    let k = uniform(dims.k_len(), 2.0, &mut rng);
    let v = uniform(dims.k_len(), 1.0, &mut rng);
    let g = uniform(dims.q_len(), 1.0, &mut rng);
    let t = |x: &[f32]| Tensor::from_vec(x.to_vec(), (B, H, n, D), &Device::Cpu);
    let (qt, kt, vt, gt) = (t(&q)?, t(&k)?, t(&v)?, t(&g)?);

    // The CPU op: fewer repetitions (it is the slow side).
    let cpu_reps = (iters / 4).clamp(3, 10);
    let cpu_out: Vec<f32> = attention::sparse(&qt, &kt, &vt, pattern)?
        .flatten_all()?
        .to_vec1()?;
    let cpu_fwd = median_ms(cpu_reps, || {
        attention::sparse(&qt, &kt, &vt, pattern)?;
        Ok(())
    })?;
    let cpu_fwd_bwd = median_ms(cpu_reps, || {
        let (qv, kv, vv) = (
            Var::from_tensor(&qt)?,
            Var::from_tensor(&kt)?,
            Var::from_tensor(&vt)?,
        );
        let out = attention::sparse(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), pattern)?;
        (out * &gt)?.sum_all()?.backward()?;
        Ok(())
    })?;

    // The device API end to end (copies included), after a warm-up.
    let (gpu_out, _) = dev.forward(&q, &k, &v, dims, pattern)?;
    dev.backward(&q, &k, &v, &g, dims, pattern)?;
    let gpu_fwd = median_ms(iters, || {
        dev.forward(&q, &k, &v, dims, pattern)?;
        Ok(())
    })?;
    let gpu_fwd_bwd = median_ms(iters, || {
        dev.backward(&q, &k, &v, &g, dims, pattern)?;
        Ok(())
    })?;
    // The kernels alone.
    let kernels = dev.time_kernels(dims, pattern, iters)?;

    let max_err = gpu_out
        .iter()
        .zip(&cpu_out)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let keys: usize = (0..n).map(|i| pattern.key_count(i, n)).sum();
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            (a / b * 10.0).round() / 10.0
        } else {
            0.0
        }
    };
    Ok(json!({
        "n": n,
        "pairs_per_head": keys,
        "cpu_fwd_ms": cpu_fwd,
        "cpu_fwd_bwd_ms": cpu_fwd_bwd,
        "gpu_fwd_ms": gpu_fwd,
        "gpu_fwd_bwd_ms": gpu_fwd_bwd,
        "gpu_kernel_fwd_ms": ms(kernels.forward),
        "gpu_kernel_fwd_bwd_ms": ms(kernels.forward_backward),
        "speedup_fwd": ratio(cpu_fwd, gpu_fwd),
        "speedup_fwd_bwd": ratio(cpu_fwd_bwd, gpu_fwd_bwd),
        "max_abs_err_out": max_err,
    }))
}
