//! Peak heap of one forward + backward pass of each attention kernel,
//! measured with gm-leak's counting allocator, at sequence lengths
//! `N = 48, 512, 2048, 4096` (or the lengths given as arguments).
//!
//! Shape: `B = 1`, `H = 4`, `D = 32`, self-attention (`Nq = Nk = N`), f32,
//! CPU. Memory-efficient uses `block = 64`; sparse a `±32` window, 2 global
//! tokens and every 128th key. `q`, `k`, `v` (leaf `Var`s) and the upstream
//! gradient are allocated before the measurement; the measured closure runs
//! the forward pass, `(out * g).sum_all().backward()`, and drops everything,
//! so the peak is what the pass itself needs on top of its inputs (outputs,
//! saved tensors, gradients, temporaries; process-wide, so the kernels'
//! worker threads count too).
//!
//! Prints a table on stderr and, as the last stdout line, one flat JSON
//! object: `attn_{dense,memeff,sparse}_peak_n{N}_bytes`,
//! `attn_{kind}_fwd_bwd_n{N}_ms`, `attn_{kind}_fwd_peak_n{N}_bytes`, and the
//! configuration (`attn_batch`, `attn_heads`, `attn_head_dim`,
//! `attn_memeff_block`, `attn_sparse_window`, `attn_sparse_global_tokens`,
//! `attn_sparse_stride`). Run it optimised:
//! `cargo run --release -p gm-models --example attention_memory`.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor, Var};
use gm_models::attention::{self, AttentionKind, SparsePattern};
use serde_json::{Map, Value};

#[global_allocator]
static A: gm_leak::TrackingAllocator = gm_leak::TrackingAllocator::system();

const B: usize = 1;
const H: usize = 4;
const D: usize = 32;
const BLOCK: usize = 64;
const WINDOW: usize = 32;
const GLOBAL: usize = 2;
const STRIDE: usize = 128;

fn kinds() -> [(&'static str, AttentionKind); 3] {
    [
        ("dense", AttentionKind::Dense),
        ("memeff", AttentionKind::MemoryEfficient { block: BLOCK }),
        (
            "sparse",
            AttentionKind::Sparse(
                SparsePattern::local(WINDOW)
                    .with_global_tokens(GLOBAL)
                    .with_stride(STRIDE),
            ),
        ),
    ]
}

/// Measurements per (kind, N); the peak is the largest, the time the
/// shortest. Once in a debug build (the peaks do not change; the kernels
/// are ~60× slower unoptimised).
const REPEAT: usize = if cfg!(debug_assertions) { 1 } else { 3 };

/// (forward peak, forward+backward peak, forward+backward milliseconds),
/// over [`REPEAT`] runs.
fn measure(kind: AttentionKind, n: usize) -> Result<(u64, u64, f64)> {
    let mut best = (0, 0, f64::INFINITY);
    for _ in 0..REPEAT {
        let (fwd, both, ms) = measure_once(kind, n)?;
        best = (best.0.max(fwd), best.1.max(both), best.2.min(ms));
    }
    Ok(best)
}

/// One measured forward, then one measured forward + backward.
fn measure_once(kind: AttentionKind, n: usize) -> Result<(u64, u64, f64)> {
    let dev = Device::Cpu;
    let rand = || Tensor::randn(0f32, 1.0, (B, H, n, D), &dev);
    let (q, k, v) = (
        Var::from_tensor(&rand()?)?,
        Var::from_tensor(&rand()?)?,
        Var::from_tensor(&rand()?)?,
    );
    let g = rand()?;
    let (r, fwd) = gm_leak::measure(|| -> Result<()> {
        attention::attend(q.as_tensor(), k.as_tensor(), v.as_tensor(), kind)?;
        Ok(())
    });
    r?;
    let (r, both) = gm_leak::measure(|| -> Result<()> {
        let out = attention::attend(q.as_tensor(), k.as_tensor(), v.as_tensor(), kind)?;
        let grads = out.mul(&g)?.sum_all()?.backward()?;
        grads.get(q.as_tensor()).context("q received no gradient")?;
        Ok(())
    });
    r?;
    Ok((
        fwd.peak_delta_bytes,
        both.peak_delta_bytes,
        both.duration.as_secs_f64() * 1e3,
    ))
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().context("arguments are sequence lengths"))
        .collect::<Result<_>>()?;
    let ns = if args.is_empty() {
        vec![48, 512, 2048, 4096]
    } else {
        args
    };
    if cfg!(debug_assertions) {
        eprintln!("note: a debug build; the custom kernels are slow unoptimised (use --release)");
    }
    // Warm-up: first-call costs (thread pools, lazy statics) are not the
    // kernels' memory.
    for (_, kind) in kinds() {
        measure_once(kind, 64)?;
    }
    let mut json = Map::new();
    for (key, value) in [
        ("attn_batch", B),
        ("attn_heads", H),
        ("attn_head_dim", D),
        ("attn_memeff_block", BLOCK),
        ("attn_sparse_window", WINDOW),
        ("attn_sparse_global_tokens", GLOBAL),
        ("attn_sparse_stride", STRIDE),
    ] {
        json.insert(key.into(), Value::from(value));
    }
    eprintln!(
        "{:>6} {:>7} {:>16} {:>16} {:>12}",
        "N", "kind", "fwd peak B", "fwd+bwd peak B", "fwd+bwd ms"
    );
    for &n in &ns {
        for (name, kind) in kinds() {
            let (fwd, both, ms) = measure(kind, n)?;
            eprintln!("{n:>6} {name:>7} {fwd:>16} {both:>16} {ms:>12.1}");
            json.insert(format!("attn_{name}_peak_n{n}_bytes"), Value::from(both));
            json.insert(format!("attn_{name}_fwd_peak_n{n}_bytes"), Value::from(fwd));
            json.insert(format!("attn_{name}_fwd_bwd_n{n}_ms"), Value::from(ms));
        }
    }
    println!("{}", Value::Object(json));
    Ok(())
}
