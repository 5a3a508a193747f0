//! Parity, gradient, pattern, error and memory tests for the three
//! attention kernels against the dense reference.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gm_models::attention::{self, AttentionKind, SparsePattern};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// This test binary counts its allocations (for the linear-memory tests).
#[global_allocator]
static ALLOC: gm_leak::TrackingAllocator = gm_leak::TrackingAllocator::system();

/// Parity tolerance (absolute, f32).
const TOL: f32 = 1e-5;

/// Uniform values in `[-amp, amp)`, seeded.
fn uniform(shape: &[usize], amp: f32, seed: u64) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * amp)
        .collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// `q, k, v, g` for `[b, h, nq|nk, d]`; `g` is the upstream gradient.
struct Case {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
}

impl Case {
    fn new(b: usize, h: usize, nq: usize, nk: usize, d: usize, seed: u64) -> Result<Self> {
        Ok(Self {
            // Amplitude 2 makes the softmax rows far from uniform.
            q: uniform(&[b, h, nq, d], 2.0, seed)?,
            k: uniform(&[b, h, nk, d], 2.0, seed + 1)?,
            v: uniform(&[b, h, nk, d], 1.0, seed + 2)?,
            g: uniform(&[b, h, nq, d], 1.0, seed + 3)?,
        })
    }
}

/// Output and `(dQ, dK, dV)` of `f` for the loss `Σ out ∘ g`.
struct Run {
    out: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
}

fn run(
    c: &Case,
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> gm_models::Result<Tensor>,
) -> Result<Run> {
    let (q, k, v) = (
        Var::from_tensor(&c.q)?,
        Var::from_tensor(&c.k)?,
        Var::from_tensor(&c.v)?,
    );
    let out = f(q.as_tensor(), k.as_tensor(), v.as_tensor())?;
    let grads = out.mul(&c.g.detach())?.sum_all()?.backward()?;
    let grad = |x: &Var| {
        grads
            .get(x.as_tensor())
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no gradient"))
    };
    Ok(Run {
        dq: grad(&q)?,
        dk: grad(&k)?,
        dv: grad(&v)?,
        out,
    })
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims());
    Ok(a.sub(b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn assert_close(what: &str, got: &Run, want: &Run, tol: f32) -> Result<()> {
    for (name, a, b) in [
        ("out", &got.out, &want.out),
        ("dq", &got.dq, &want.dq),
        ("dk", &got.dk, &want.dk),
        ("dv", &got.dv, &want.dv),
    ] {
        let diff = max_abs_diff(a, b)?;
        assert!(diff <= tol, "{what}: {name} differs by {diff} > {tol}");
    }
    Ok(())
}

/// (b, h, nq, nk, d): square, N not a multiple of the blocks, Nq ≠ Nk both
/// ways, B > 1, H > 1, a single token.
const SHAPES: [(usize, usize, usize, usize, usize); 7] = [
    (1, 1, 8, 8, 4),
    (2, 3, 37, 37, 16),
    (1, 2, 20, 45, 8),
    (2, 2, 50, 13, 8),
    (1, 1, 1, 1, 1),
    (3, 1, 5, 70, 3),
    (1, 4, 64, 64, 32),
];

#[test]
fn memory_efficient_matches_dense_forward_and_gradients() -> Result<()> {
    for (s, &(b, h, nq, nk, d)) in SHAPES.iter().enumerate() {
        let c = Case::new(b, h, nq, nk, d, 10 * s as u64)?;
        let want = run(&c, attention::dense)?;
        for block in [1, 7, 16, 64, 1000, usize::MAX] {
            let got = run(&c, |q, k, v| attention::memory_efficient(q, k, v, block))?;
            assert_close(
                &format!("memeff block {block} shape {:?}", (b, h, nq, nk, d)),
                &got,
                &want,
                TOL,
            )?;
        }
    }
    Ok(())
}

#[test]
fn full_sparse_pattern_matches_dense_forward_and_gradients() -> Result<()> {
    for (s, &(b, h, nq, nk, d)) in SHAPES.iter().enumerate() {
        let c = Case::new(b, h, nq, nk, d, 100 + 10 * s as u64)?;
        let want = run(&c, attention::dense)?;
        let n = nq.max(nk);
        // Each of these covers every pair.
        for p in [
            SparsePattern::full(),
            SparsePattern::local(n),
            SparsePattern::local(0).with_stride(1),
            SparsePattern::local(0).with_global_tokens(n),
        ] {
            let got = run(&c, |q, k, v| attention::sparse(q, k, v, &p))?;
            assert_close(
                &format!("sparse {p:?} shape {:?}", (b, h, nq, nk, d)),
                &got,
                &want,
                TOL,
            )?;
        }
    }
    Ok(())
}

/// The pattern rule, restated independently of the library.
fn sees(p: &SparsePattern, i: usize, j: usize) -> bool {
    let causal_ok = !p.causal || j <= i;
    let local = if i >= j {
        i - j <= p.window
    } else {
        j - i <= p.window
    };
    let strided = matches!(p.stride, Some(s) if (j + 1).is_multiple_of(s));
    causal_ok && (i < p.global_tokens || j < p.global_tokens || local || strided)
}

/// Dense attention with `−∞` added to the forbidden scores.
fn masked_dense(
    p: SparsePattern,
) -> impl Fn(&Tensor, &Tensor, &Tensor) -> gm_models::Result<Tensor> {
    move |q, k, v| {
        let (nq, nk, d) = (q.dims()[2], k.dims()[2], q.dims()[3]);
        let mask: Vec<f32> = (0..nq * nk)
            .map(|x| {
                if sees(&p, x / nk, x % nk) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (nq, nk), q.device())?;
        let scores = q
            .contiguous()?
            .matmul(&k.t()?.contiguous()?)?
            .affine(1.0 / (d as f64).sqrt(), 0.0)?
            .broadcast_add(&mask)?;
        let p = gm_models::layers::softmax(&scores, candle_core::D::Minus1)?;
        Ok(p.matmul(&v.contiguous()?)?)
    }
}

fn restricted_patterns() -> Vec<SparsePattern> {
    vec![
        SparsePattern::local(0),
        SparsePattern::local(2),
        SparsePattern::local(3).causal(),
        SparsePattern::local(1).with_stride(5),
        SparsePattern::local(2).with_global_tokens(2),
        SparsePattern::local(1)
            .with_stride(4)
            .with_global_tokens(3)
            .causal(),
    ]
}

#[test]
fn restricted_sparse_patterns_match_masked_dense() -> Result<()> {
    // Every query sees at least one key in these shapes (nq ≤ nk).
    for (s, &(b, h, nq, nk, d)) in [
        (1, 1, 12, 12, 4),
        (2, 3, 37, 37, 8),
        (1, 2, 20, 45, 8),
        (2, 1, 70, 70, 16),
    ]
    .iter()
    .enumerate()
    {
        let c = Case::new(b, h, nq, nk, d, 200 + 10 * s as u64)?;
        for p in restricted_patterns() {
            for i in 0..nq {
                let mut lib = Vec::new();
                p.for_each_key(i, nk, |j| lib.push(j));
                let spec: Vec<usize> = (0..nk).filter(|&j| sees(&p, i, j)).collect();
                assert_eq!(lib, spec, "{p:?} query {i}");
                for j in 0..nk {
                    assert_eq!(p.allows(i, j), sees(&p, i, j), "{p:?} ({i}, {j})");
                }
            }
            let want = run(&c, masked_dense(p))?;
            let got = run(&c, |q, k, v| attention::sparse(q, k, v, &p))?;
            assert_close(
                &format!("sparse {p:?} shape {:?}", (b, h, nq, nk, d)),
                &got,
                &want,
                TOL,
            )?;
        }
    }
    Ok(())
}

#[test]
fn restricted_sparse_gradients_vanish_for_unseen_keys() -> Result<()> {
    let (b, h, n, d) = (1, 2, 40, 8);
    let c = Case::new(b, h, n, n, d, 300)?;
    for p in restricted_patterns() {
        for i in [0, 5, 17, 39] {
            // Upstream gradient only on query row i.
            let mut g = vec![0f32; b * h * n * d];
            for hh in 0..h {
                for x in 0..d {
                    g[(hh * n + i) * d + x] = 1.0 + x as f32;
                }
            }
            let row_case = Case {
                g: Tensor::from_vec(g, (b, h, n, d), &Device::Cpu)?,
                q: c.q.clone(),
                k: c.k.clone(),
                v: c.v.clone(),
            };
            let r = run(&row_case, |q, k, v| attention::sparse(q, k, v, &p))?;
            let dk = r.dk.flatten_all()?.to_vec1::<f32>()?;
            let dv = r.dv.flatten_all()?.to_vec1::<f32>()?;
            for hh in 0..h {
                for j in 0..n {
                    let row = (hh * n + j) * d..(hh * n + j + 1) * d;
                    let dv_zero = dv[row.clone()].iter().all(|x| *x == 0.0);
                    let dk_zero = dk[row].iter().all(|x| *x == 0.0);
                    if sees(&p, i, j) {
                        assert!(!dv_zero, "{p:?}: query {i} sees key {j}, dV row is zero");
                    } else {
                        assert!(dv_zero && dk_zero, "{p:?}: query {i} cannot see key {j}");
                    }
                }
            }
            // Only query row i gets a gradient.
            let dq = r.dq.flatten_all()?.to_vec1::<f32>()?;
            for (x, val) in dq.iter().enumerate() {
                if (x / d) % n != i {
                    assert_eq!(*val, 0.0);
                }
            }
        }
    }
    Ok(())
}

#[test]
fn a_query_that_sees_no_key_gets_zeros() -> Result<()> {
    // Nq > Nk with a window of 1: queries 6.. see nothing.
    let c = Case::new(1, 1, 9, 5, 4, 400)?;
    let p = SparsePattern::local(1);
    let r = run(&c, |q, k, v| attention::sparse(q, k, v, &p))?;
    let out = r.out.flatten_all()?.to_vec1::<f32>()?;
    assert!(out[6 * 4..].iter().all(|x| *x == 0.0));
    assert!(out[..5 * 4].iter().all(|x| *x != 0.0));
    let dq = r.dq.flatten_all()?.to_vec1::<f32>()?;
    assert!(dq[6 * 4..].iter().all(|x| *x == 0.0));
    assert!(dq.iter().all(|x| x.is_finite()));
    Ok(())
}

#[test]
fn attend_dispatches_every_kind() -> Result<()> {
    let c = Case::new(2, 2, 19, 19, 8, 500)?;
    assert_eq!(AttentionKind::default(), AttentionKind::Dense);
    let want = attention::attend(&c.q, &c.k, &c.v, AttentionKind::Dense)?;
    for kind in [
        AttentionKind::MemoryEfficient {
            block: attention::DEFAULT_BLOCK,
        },
        AttentionKind::MemoryEfficient { block: 4 },
        AttentionKind::Sparse(SparsePattern::full()),
    ] {
        let got = attention::attend(&c.q, &c.k, &c.v, kind)?;
        assert!(max_abs_diff(&got, &want)? <= TOL, "{kind:?}");
    }
    let p = SparsePattern::local(2).causal();
    let got = attention::attend(&c.q, &c.k, &c.v, AttentionKind::Sparse(p))?;
    let want = masked_dense(p)(&c.q, &c.k, &c.v)?;
    assert!(max_abs_diff(&got, &want)? <= TOL);
    Ok(())
}

#[test]
fn strided_views_and_other_dtypes_work() -> Result<()> {
    // [B, N, H, D] → transpose(1, 2): non-contiguous inputs.
    let (b, h, n, d) = (2, 3, 21, 8);
    let q = uniform(&[b, n, h, d], 2.0, 600)?.transpose(1, 2)?;
    let k = uniform(&[b, n, h, d], 2.0, 601)?.transpose(1, 2)?;
    let v = uniform(&[b, n, h, d], 1.0, 602)?.transpose(1, 2)?;
    assert!(!q.is_contiguous());
    let want = attention::dense(&q, &k, &v)?;
    let got = attention::memory_efficient(&q, &k, &v, 5)?;
    assert!(max_abs_diff(&got, &want)? <= TOL);
    let got = attention::sparse(&q, &k, &v, &SparsePattern::full())?;
    assert!(max_abs_diff(&got, &want)? <= TOL);

    // bf16 in, bf16 out, gradients reach the bf16 leaves.
    for kind in [
        AttentionKind::MemoryEfficient { block: 8 },
        AttentionKind::Sparse(SparsePattern::full()),
    ] {
        let qb = Var::from_tensor(&q.to_dtype(DType::BF16)?)?;
        let kb = Var::from_tensor(&k.to_dtype(DType::BF16)?)?;
        let vb = Var::from_tensor(&v.to_dtype(DType::BF16)?)?;
        let out = attention::attend(qb.as_tensor(), kb.as_tensor(), vb.as_tensor(), kind)?;
        assert_eq!(out.dtype(), DType::BF16);
        let diff = max_abs_diff(&out.to_dtype(DType::F32)?, &want)?;
        assert!(diff < 2e-2, "{kind:?} bf16 differs by {diff}");
        let grads = out.to_dtype(DType::F32)?.sum_all()?.backward()?;
        for x in [&qb, &kb, &vb] {
            let g = grads.get(x.as_tensor()).expect("gradient");
            assert_eq!(g.dtype(), DType::BF16);
            assert!(
                g.to_dtype(DType::F32)?
                    .abs()?
                    .sum_all()?
                    .to_scalar::<f32>()?
                    > 0.0
            );
        }
    }
    // f64 too (computed in f32).
    let got = attention::memory_efficient(
        &q.to_dtype(DType::F64)?,
        &k.to_dtype(DType::F64)?,
        &v.to_dtype(DType::F64)?,
        4,
    )?;
    assert_eq!(got.dtype(), DType::F64);
    assert!(max_abs_diff(&got.to_dtype(DType::F32)?, &want)? <= TOL);
    Ok(())
}

#[test]
fn bad_shapes_configs_and_dtypes_are_errors() -> Result<()> {
    let t = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu);
    let (q, kv) = (t(&[1, 2, 5, 4])?, t(&[1, 2, 6, 4])?);
    let kinds = [
        AttentionKind::MemoryEfficient { block: 4 },
        AttentionKind::Sparse(SparsePattern::local(1)),
    ];
    let bad: Vec<(Tensor, Tensor, Tensor, &str)> = vec![
        (t(&[2, 5, 4])?, kv.clone(), kv.clone(), "attention q"), // rank 3
        (
            q.clone(),
            t(&[2, 2, 6, 4])?,
            t(&[2, 2, 6, 4])?,
            "attention k",
        ), // B
        (
            q.clone(),
            t(&[1, 3, 6, 4])?,
            t(&[1, 3, 6, 4])?,
            "attention k",
        ), // H
        (
            q.clone(),
            t(&[1, 2, 6, 5])?,
            t(&[1, 2, 6, 5])?,
            "attention k",
        ), // D
        (
            q.clone(),
            t(&[1, 2, 0, 4])?,
            t(&[1, 2, 0, 4])?,
            "attention k",
        ), // Nk = 0
        (q.clone(), kv.clone(), t(&[1, 2, 7, 4])?, "attention v"), // v ≠ k
        (
            t(&[1, 2, 5, 0])?,
            t(&[1, 2, 6, 0])?,
            t(&[1, 2, 6, 0])?,
            "attention q",
        ), // D = 0
    ];
    for kind in kinds {
        for (q, k, v, what) in &bad {
            let e = attention::attend(q, k, v, kind).unwrap_err();
            assert!(
                matches!(&e, gm_models::Error::Shape { what: w, .. } if w == what),
                "{kind:?} {:?}/{:?}/{:?}: {e}",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        // Mixed and integer dtypes.
        let e = attention::attend(&q, &kv.to_dtype(DType::BF16)?, &kv, kind).unwrap_err();
        assert!(matches!(e, gm_models::Error::Config { .. }), "{e}");
        let i = |x: &Tensor| x.to_dtype(DType::U32);
        let e = attention::attend(&i(&q)?, &i(&kv)?, &i(&kv)?, kind).unwrap_err();
        assert!(matches!(e, gm_models::Error::Config { .. }), "{e}");
    }
    let e = attention::memory_efficient(&q, &kv, &kv, 0).unwrap_err();
    assert!(e.to_string().contains("attention.block"), "{e}");
    let p = SparsePattern::local(1).with_stride(0);
    assert!(p.validate().is_err());
    let e = attention::sparse(&q, &kv, &kv, &p).unwrap_err();
    assert!(e.to_string().contains("sparse.stride"), "{e}");
    // Nq = 0 is a valid, empty call.
    let empty = attention::memory_efficient(&t(&[1, 2, 0, 4])?, &kv, &kv, 4)?;
    assert_eq!(empty.dims(), &[1, 2, 0, 4]);
    Ok(())
}

/// Forward + backward of `kind` at sequence length `n` on this thread:
/// (peak bytes above the start, bytes the forward output keeps alive).
fn fwd_bwd_peak(kind: AttentionKind, n: usize) -> Result<(u64, i64)> {
    let c = Case::new(1, 1, n, n, 16, 700)?;
    let (q, k, v) = (
        Var::from_tensor(&c.q)?,
        Var::from_tensor(&c.k)?,
        Var::from_tensor(&c.v)?,
    );
    let (out, fwd) = gm_leak::measure_thread(|| {
        attention::attend(q.as_tensor(), k.as_tensor(), v.as_tensor(), kind)
    });
    let out = out?;
    let (r, m) = gm_leak::measure_thread(|| -> Result<()> {
        let grads = out.mul(&c.g)?.sum_all()?.backward()?;
        assert!(grads.get(q.as_tensor()).is_some());
        Ok(())
    });
    r?;
    drop(out);
    Ok((fwd.peak_net_bytes.max(m.peak_net_bytes), fwd.net_bytes))
}

#[test]
fn custom_kernels_use_memory_linear_in_n() -> Result<()> {
    for kind in [
        AttentionKind::MemoryEfficient { block: 32 },
        AttentionKind::Sparse(SparsePattern::local(8).with_global_tokens(1)),
    ] {
        let (small, _) = fwd_bwd_peak(kind, 256)?;
        let (large, kept) = fwd_bwd_peak(kind, 1024)?;
        let score_matrix = 1024u64 * 1024 * 4;
        // 4× the tokens: linear → ~4× the peak, quadratic → ~16×.
        assert!(large < 6 * small, "{kind:?}: {small} → {large} bytes");
        assert!(large < score_matrix / 4, "{kind:?}: {large} bytes");
        // The graph keeps the output and the logsumexp, nothing per block.
        let out_and_lse = (1024 * 16 + 1024) * 4;
        assert!(
            kept <= 2 * out_and_lse,
            "{kind:?}: forward keeps {kept} bytes"
        );
    }
    // The dense reference does hold N × N tensors.
    let (dense, _) = fwd_bwd_peak(AttentionKind::Dense, 1024)?;
    assert!(dense > 1024 * 1024 * 4, "{dense}");
    Ok(())
}
