//! CUDA tests, compiled with and without the `cuda` feature: the kernel
//! sources compile to PTX (NVRTC only, no GPU), a missing driver or device
//! is a typed error, and the device forward and backward match the CPU
//! sparse op (candle autograd for the CPU gradients).
//!
//! Without NVRTC the compile test prints "skipped: no NVRTC" and passes
//! unless `GM_REQUIRE_NVRTC=1`; without a device the parity tests print
//! "skipped: no CUDA device" and pass unless `GM_REQUIRE_CUDA=1`.

use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use gm_models::attention::{self, SparsePattern};
use gm_models::cuda::{self, AttentionDims, SparseAttentionCuda, SPARSE_ATTENTION_ENTRIES};
use gm_models::Error;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Parity tolerance for f32: `|gpu − cpu| ≤ ABS + REL·|cpu|`.
const ABS: f32 = 1e-5;
const REL: f32 = 1e-4;

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// Device 0, or `None` after printing why (failing under `GM_REQUIRE_CUDA=1`).
fn device() -> Option<SparseAttentionCuda> {
    match SparseAttentionCuda::new(0) {
        Ok(dev) => {
            println!(
                "cuda:0 = {} (sm_{}{})",
                dev.name(),
                dev.compute_capability().0,
                dev.compute_capability().1
            );
            Some(dev)
        }
        Err(Error::NoCuda(why)) => {
            assert!(
                !env_flag("GM_REQUIRE_CUDA"),
                "GM_REQUIRE_CUDA=1 but there is no CUDA device: {why}"
            );
            println!("skipped: no CUDA device ({why})");
            None
        }
        Err(other) => panic!("SparseAttentionCuda::new(0): unexpected error {other}"),
    }
}

#[test]
fn kernels_compile_to_ptx() {
    if !cuda::FEATURE_ENABLED {
        assert!(
            !env_flag("GM_REQUIRE_NVRTC"),
            "GM_REQUIRE_NVRTC=1 but gm-models was built without the `cuda` feature"
        );
        assert!(matches!(
            cuda::compile_kernels_to_ptx(),
            Err(Error::NoCuda(_))
        ));
        println!("skipped: built without the `cuda` feature");
        return;
    }
    if !cuda::nvrtc_present() {
        assert!(
            !env_flag("GM_REQUIRE_NVRTC"),
            "GM_REQUIRE_NVRTC=1 but NVRTC (libnvrtc) cannot be loaded: put the lib directory \
             of nvidia-cuda-nvrtc-cu12 on LD_LIBRARY_PATH"
        );
        println!("skipped: no NVRTC");
        return;
    }
    println!("NVRTC {:?}", cuda::nvrtc_version());
    // The default architecture, and Hopper's (the GPU machine's H200).
    let builds = [
        ("default", cuda::compile_kernels_to_ptx()),
        ("compute_90", cuda::compile_kernels_to_ptx_for("compute_90")),
    ];
    for (arch, res) in builds {
        let ptx = res.unwrap_or_else(|e| panic!("kernels do not compile ({arch}): {e}"));
        assert_eq!(ptx.len(), cuda::KERNEL_SOURCES.len());
        let (file, text) = &ptx[0];
        assert_eq!(*file, "sparse_attention.cu");
        for name in SPARSE_ATTENTION_ENTRIES.iter().flatten() {
            assert!(
                text.contains(&format!(".entry {name}(")),
                "{arch}: no entry {name} in the PTX of {file}"
            );
        }
        if arch == "compute_90" {
            assert!(text.contains(".target sm_90"), "{arch}: wrong target");
        }
        println!("{arch}: {file} → {} bytes of PTX", text.len());
    }
}

#[test]
fn no_driver_or_no_device_is_a_typed_error() {
    // No machine has these: a typed error, never a panic.
    for ordinal in [1000, usize::MAX] {
        match SparseAttentionCuda::new(ordinal) {
            Err(Error::NoCuda(why)) => println!("new({ordinal}): {why}"),
            other => panic!("new({ordinal}): expected NoCuda, got {other:?}"),
        }
    }
    if !cuda::driver_present() {
        match SparseAttentionCuda::new(0) {
            Err(Error::NoCuda(why)) => println!("new(0): {why}"),
            other => panic!("new(0) without a driver: expected NoCuda, got {other:?}"),
        }
        assert!(matches!(cuda::device_count(), Err(Error::NoCuda(_))));
    }
}

/// One parity case.
#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    dims: AttentionDims,
    pattern: SparsePattern,
}

fn cases() -> Vec<Case> {
    let d = |b, h, nq, nk, d| AttentionDims { b, h, nq, nk, d };
    let p = SparsePattern::local;
    vec![
        Case {
            name: "window only",
            dims: d(2, 3, 40, 40, 16),
            pattern: p(3),
        },
        Case {
            name: "stride",
            dims: d(1, 2, 96, 96, 32),
            pattern: p(2).with_stride(7),
        },
        Case {
            name: "global tokens",
            dims: d(2, 2, 70, 70, 8),
            pattern: p(1).with_global_tokens(3),
        },
        Case {
            name: "causal, stride and global, D=24",
            dims: d(1, 3, 65, 65, 24),
            pattern: p(4).with_stride(3).with_global_tokens(2).causal(),
        },
        Case {
            name: "Nq < Nk",
            dims: d(1, 2, 20, 53, 40),
            pattern: p(5).with_stride(6).with_global_tokens(1),
        },
        Case {
            name: "Nq > Nk, rows without keys",
            dims: d(2, 1, 45, 9, 12),
            pattern: p(0),
        },
        Case {
            name: "Nq > Nk, causal",
            dims: d(1, 2, 33, 17, 64),
            pattern: p(2).with_global_tokens(2).causal(),
        },
        Case {
            name: "full (dense), D=100",
            dims: d(1, 2, 70, 70, 100),
            pattern: SparsePattern::full(),
        },
        Case {
            name: "D=1",
            dims: d(1, 1, 33, 33, 1),
            pattern: p(2).with_stride(4),
        },
        Case {
            name: "D=256, stride 1",
            dims: d(1, 1, 40, 40, 256),
            pattern: p(1).with_stride(1).causal(),
        },
        Case {
            name: "long, Longformer-like",
            dims: d(1, 2, 300, 300, 32),
            pattern: p(16).with_stride(32).with_global_tokens(4),
        },
    ]
}

/// Seeded values in `[-amp, amp)`.
fn uniform(n: usize, amp: f32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * amp)
        .collect()
}

/// Inputs `q, k, v` and the upstream gradient `g` of a case.
struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    g: Vec<f32>,
}

impl Inputs {
    fn new(dims: AttentionDims, seed: u64) -> Self {
        // Amplitude 2 makes the softmax rows far from uniform.
        Self {
            q: uniform(dims.q_len(), 2.0, seed),
            k: uniform(dims.k_len(), 2.0, seed + 1),
            v: uniform(dims.k_len(), 1.0, seed + 2),
            g: uniform(dims.q_len(), 1.0, seed + 3),
        }
    }
}

/// The CPU results: output, logsumexp, and the gradients of `Σ out ∘ g`.
struct Reference {
    out: Vec<f32>,
    lse: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

fn cpu_reference(c: &Case, x: &Inputs) -> Result<Reference> {
    let AttentionDims { b, h, nq, nk, d } = c.dims;
    let t = |data: &[f32], n| Tensor::from_vec(data.to_vec(), (b, h, n, d), &Device::Cpu);
    let (q, k, v) = (
        Var::from_tensor(&t(&x.q, nq)?)?,
        Var::from_tensor(&t(&x.k, nk)?)?,
        Var::from_tensor(&t(&x.v, nk)?)?,
    );
    let out = attention::sparse(q.as_tensor(), k.as_tensor(), v.as_tensor(), &c.pattern)?;
    let grads = (&out * t(&x.g, nq)?)?.sum_all()?.backward()?;
    let grad = |var: &Var| -> Result<Vec<f32>> {
        let g = grads.get(var).expect("every input has a gradient");
        Ok(g.flatten_all()?.to_vec1()?)
    };
    Ok(Reference {
        out: out.flatten_all()?.to_vec1()?,
        lse: reference_lse(c, x),
        dq: grad(&q)?,
        dk: grad(&k)?,
        dv: grad(&v)?,
    })
}

/// The logsumexp of each row's allowed scaled scores, in f64 (−∞ for a row
/// without keys).
fn reference_lse(c: &Case, x: &Inputs) -> Vec<f32> {
    let AttentionDims { b, h, nq, nk, d } = c.dims;
    let scale = 1.0 / (d as f64).sqrt();
    let mut lse = Vec::with_capacity(b * h * nq);
    for bh in 0..b * h {
        for i in 0..nq {
            let qi = &x.q[(bh * nq + i) * d..][..d];
            let mut scores = Vec::new();
            c.pattern.for_each_key(i, nk, |j| {
                let kj = &x.k[(bh * nk + j) * d..][..d];
                let s: f64 = qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum();
                scores.push(s * scale);
            });
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let value = if scores.is_empty() {
                f64::NEG_INFINITY
            } else {
                m + scores.iter().map(|s| (s - m).exp()).sum::<f64>().ln()
            };
            lse.push(value as f32);
        }
    }
    lse
}

/// Asserts `got ≈ want` elementwise (infinities must match exactly).
fn assert_close(case: &str, what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{case}: {what} length");
    let mut worst = (0.0f32, 0usize);
    for (idx, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_infinite() {
            g == w
        } else {
            (g - w).abs() <= ABS + REL * w.abs()
        };
        assert!(ok, "{case}: {what}[{idx}] = {g}, CPU {w}");
        if w.is_finite() {
            let err = (g - w).abs();
            if err > worst.0 {
                worst = (err, idx);
            }
        }
    }
    println!("  {what:<4} max |err| {:.2e} at {}", worst.0, worst.1);
}

#[test]
fn forward_matches_cpu() -> Result<()> {
    let Some(dev) = device() else { return Ok(()) };
    for (n, c) in cases().iter().enumerate() {
        println!("{} {:?} {:?}", c.name, c.dims, c.pattern);
        let x = Inputs::new(c.dims, 100 + 10 * n as u64);
        let want = cpu_reference(c, &x)?;
        let (out, lse) = dev.forward(&x.q, &x.k, &x.v, c.dims, &c.pattern)?;
        assert_close(c.name, "out", &out, &want.out);
        assert_close(c.name, "lse", &lse, &want.lse);
    }
    Ok(())
}

#[test]
fn backward_matches_cpu() -> Result<()> {
    let Some(dev) = device() else { return Ok(()) };
    for (n, c) in cases().iter().enumerate() {
        println!("{} {:?} {:?}", c.name, c.dims, c.pattern);
        let x = Inputs::new(c.dims, 200 + 10 * n as u64);
        let want = cpu_reference(c, &x)?;
        let (dq, dk, dv) = dev.backward(&x.q, &x.k, &x.v, &x.g, c.dims, &c.pattern)?;
        assert_close(c.name, "dq", &dq, &want.dq);
        assert_close(c.name, "dk", &dk, &want.dk);
        assert_close(c.name, "dv", &dv, &want.dv);
    }
    Ok(())
}

#[test]
fn results_are_deterministic() -> Result<()> {
    let Some(dev) = device() else { return Ok(()) };
    // The backward pass has no atomics: two runs agree bit for bit.
    let c = cases()[10];
    let x = Inputs::new(c.dims, 7);
    let a = dev.backward(&x.q, &x.k, &x.v, &x.g, c.dims, &c.pattern)?;
    let b = dev.backward(&x.q, &x.k, &x.v, &x.g, c.dims, &c.pattern)?;
    assert!(a == b, "two backward runs differ");
    let f1 = dev.forward(&x.q, &x.k, &x.v, c.dims, &c.pattern)?;
    let f2 = dev.forward(&x.q, &x.k, &x.v, c.dims, &c.pattern)?;
    assert!(f1 == f2, "two forward runs differ");
    Ok(())
}

#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let Some(dev) = device() else { return Ok(()) };
    let dims = AttentionDims::new(1, 2, 8, 16);
    let x = Inputs::new(dims, 1);
    let p = SparsePattern::local(2);
    let short = &x.q[1..];
    assert!(matches!(
        dev.forward(short, &x.k, &x.v, dims, &p),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        dev.backward(&x.q, &x.k, &x.v, short, dims, &p),
        Err(Error::Shape { .. })
    ));
    let wide = AttentionDims::new(1, 1, 2, 300);
    let y = Inputs::new(wide, 2);
    assert!(matches!(
        dev.forward(&y.q, &y.k, &y.v, wide, &p),
        Err(Error::Config { .. })
    ));
    let bad = SparsePattern::local(1).with_stride(0);
    assert!(dev.forward(&x.q, &x.k, &x.v, dims, &bad).is_err());
    // No queries: empty results, no launch.
    let empty = AttentionDims { nq: 0, ..dims };
    let (out, lse) = dev.forward(&[], &x.k, &x.v, empty, &p)?;
    assert!(out.is_empty() && lse.is_empty());
    let (dq, dk, dv) = dev.backward(&[], &x.k, &x.v, &[], empty, &p)?;
    assert!(dq.is_empty() && dk.iter().chain(&dv).all(|&g| g == 0.0));
    Ok(())
}
