//! Multi-head attention kernels on `[B, H, N, D]` tensors, all
//! differentiable: the dense reference ([`dense`]), memory-efficient
//! attention ([`memory_efficient`]) and sparse attention ([`sparse`]).
//! [`attend`] dispatches on an [`AttentionKind`] so models can switch
//! kernels by configuration.
//!
//! # The math
//!
//! For each batch·head, with `q: [Nq, D]`, `k, v: [Nk, D]`:
//!
//! ```text
//! S = Q Kᵀ / √D        P = softmax_rows(S)        O = P V
//! lseᵢ = log Σⱼ exp(Sᵢⱼ)                          (so Pᵢⱼ = exp(Sᵢⱼ − lseᵢ))
//! ```
//!
//! and, for an upstream gradient `dO`,
//!
//! ```text
//! dV = Pᵀ dO      dP = dO Vᵀ      Dᵢ = rowsum(dO ∘ O)ᵢ      dS = P ∘ (dP − D)
//! dQ = dS K / √D  dK = dSᵀ Q / √D
//! ```
//!
//! # The three kinds and their memory
//!
//! | kind | forward keeps for backward | extra peak during fwd + bwd | work |
//! |---|---|---|---|
//! | [`Dense`](AttentionKind::Dense) | `S`, `P` and the softmax intermediates: several `B·H·Nq·Nk` tensors | several more `B·H·Nq·Nk` | `O(Nq·Nk·D)` |
//! | [`MemoryEfficient`](AttentionKind::MemoryEfficient) | `O` (the output itself) and `lse`: `B·H·Nq` floats | `dQ, dK, dV` (input-sized) plus `O(block·D + Nq)` floats per thread | `O(Nq·Nk·D)` (backward recomputes `S`) |
//! | [`Sparse`](AttentionKind::Sparse) | `O` and `lse` | `dQ, dK, dV` plus `O(Nk)` floats per thread (one query's visited keys) | `O(Σᵢ \|keys(i)\|·D)`: `O(N·(2w + 1 + g + N/s))` |
//!
//! No memory term of the two custom kernels grows with `Nq·Nk`: their peak
//! is linear in the sequence length (measured by
//! `examples/attention_memory.rs`; at `B = 1, H = 4, D = 32` the forward +
//! backward peak is about twelve `[B, H, N, D]` tensors, most of them
//! candle's own gradient bookkeeping, while dense grows as `N²`).
//!
//! The custom kernels split their work over candle's CPU worker pool (by
//! batch·head and query block forward, by batch·head backward, since every
//! query writes into `dK` and `dV`); each output element is computed by one
//! thread in a fixed order, so results do not depend on the thread count.
//! Their `exp` is a vectorisable polynomial (≤ 3e-7 relative error); they
//! match [`dense`] to ~1e-6 in `f32`.
//!
//! **Memory-efficient** (Rabe & Staats 2021, "Self-attention does not need
//! O(n²) memory"; the FlashAttention loop orders): the forward pass walks
//! query blocks of `block` rows against key blocks of `block` keys with an
//! online softmax (running max `m` and sum `ℓ`, rescaling the accumulator
//! by `e^(m_old − m_new)`), and saves only `lse = m + ln ℓ` per row. The
//! backward pass recomputes each key block's scores from `Q`, `K` and
//! `lse` and applies the equations above block by block, accumulating
//! straight into `dQ`, `dK`, `dV`. It is a candle `CustomOp3`: the autograd
//! graph holds `q`, `k`, `v`, the output and the op (with its `lse`), never
//! a per-block tensor.
//!
//! **Sparse**: query `i` attends only to the keys its [`SparsePattern`]
//! allows (local window, every `s`-th key, global tokens, optionally
//! causal); [`SparsePattern::for_each_key`] is the spec of which keys, in
//! which order. Forward and backward are a `CustomOp3` that visits only
//! those (query, key) pairs, saving `lse` like the memory-efficient op.
//! Restricted patterns equal dense attention with `−∞` added to the scores
//! of forbidden pairs, and forbidden pairs get no gradient.
//!
//! # Dtypes and devices
//!
//! The custom kernels compute in `f32` on the CPU. `f16`, `bf16` and `f64`
//! inputs are converted to `f32` and the output back (differentiably, so
//! gradients reach the original tensors); `q`, `k` and `v` must share one
//! float dtype. On a non-CPU device the custom ops return
//! [`Error::Config`] (use [`AttentionKind::Dense`] there; see
//! [`crate::device`]). The custom ops support first-order
//! gradients only (their backward is not itself differentiable).

mod cpu;
mod memeff;
mod sparse;

use candle_core::{DType, Tensor, D};

use crate::layers::softmax;
use crate::{Error, Result};
use cpu::Dims;
pub use sparse::SparsePattern;

/// The block size (query rows and keys per tile) the memory-efficient
/// kernel is benchmarked with.
pub const DEFAULT_BLOCK: usize = 64;

/// Which attention kernel computes `softmax(Q Kᵀ / √d) V`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AttentionKind {
    /// Materialises the `N × N` score matrix (the reference).
    #[default]
    Dense,
    /// Blocked with an online softmax, backward by recomputation; memory
    /// linear in `N`. `block ≥ 1` query rows and keys per tile
    /// ([`DEFAULT_BLOCK`] is a good start).
    MemoryEfficient {
        /// Query rows and keys per tile.
        block: usize,
    },
    /// Only the (query, key) pairs the pattern allows; memory linear in `N`,
    /// work linear in the allowed pairs.
    Sparse(SparsePattern),
}

/// Dense softmax attention. `q: [B, H, Nq, D]`, `k, v: [B, H, Nk, D]` →
/// `[B, H, Nq, D]`.
pub fn dense(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    if k.dim(D::Minus1)? != d || v.dims() != k.dims() {
        return Err(Error::Shape {
            what: "attention k/v",
            expected: format!("k and v [B, H, Nk, {d}] with equal shapes"),
            got: k.dims().to_vec(),
        });
    }
    let scale = 1.0 / (d as f64).sqrt();
    let scores = q
        .contiguous()?
        .matmul(&k.t()?.contiguous()?)?
        .affine(scale, 0.0)?;
    let p = softmax(&scores, D::Minus1)?;
    Ok(p.matmul(&v.contiguous()?)?)
}

/// Memory-efficient attention with tiles of `block` query rows and `block`
/// keys (see the module docs). Same shapes and result as [`dense`] up to
/// rounding; `block == 0`, shapes other than `q: [B, H, Nq, D]`, `k, v: [B,
/// H, Nk, D]` with `Nk, D ≥ 1`, and mixed or non-float dtypes are errors.
pub fn memory_efficient(q: &Tensor, k: &Tensor, v: &Tensor, block: usize) -> Result<Tensor> {
    if block == 0 {
        return Err(Error::config(
            "attention.block",
            block,
            "at least 1 (query rows and keys per tile)",
        ));
    }
    let dims = check_qkv(q, k, v)?;
    // A tile never needs to be longer than the sequences (the scratch is
    // sized by it).
    let block = block.min(dims.nq.max(dims.nk));
    run_f32(q, k, v, memeff::MemEffOp::new(block, dims))
}

/// Sparse attention over the pairs `pattern` allows (see
/// [`SparsePattern`]). Same shapes as [`dense`]; equals dense attention
/// with the forbidden scores set to `−∞` (a query that sees no key gets a
/// zero row). An invalid pattern, bad shapes and mixed or non-float dtypes
/// are errors.
pub fn sparse(q: &Tensor, k: &Tensor, v: &Tensor, pattern: &SparsePattern) -> Result<Tensor> {
    pattern.validate()?;
    let dims = check_qkv(q, k, v)?;
    run_f32(q, k, v, sparse::SparseOp::new(*pattern, dims))
}

/// Attention with the kernel `kind`.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, kind: AttentionKind) -> Result<Tensor> {
    match kind {
        AttentionKind::Dense => dense(q, k, v),
        AttentionKind::MemoryEfficient { block } => memory_efficient(q, k, v, block),
        AttentionKind::Sparse(pattern) => sparse(q, k, v, &pattern),
    }
}

/// Checks `q: [B, H, Nq, D]`, `k, v: [B, H, Nk, D]`, `Nk ≥ 1`, `D ≥ 1`.
fn check_qkv(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Dims> {
    let &[b, h, nq, d] = q.dims() else {
        return Err(Error::Shape {
            what: "attention q",
            expected: "[B, H, Nq, D]".into(),
            got: q.dims().to_vec(),
        });
    };
    if d == 0 {
        return Err(Error::Shape {
            what: "attention q",
            expected: "[B, H, Nq, D] with D ≥ 1".into(),
            got: q.dims().to_vec(),
        });
    }
    let k_ok = matches!(k.dims(), &[kb, kh, nk, kd] if kb == b && kh == h && kd == d && nk >= 1);
    if !k_ok {
        return Err(Error::Shape {
            what: "attention k",
            expected: format!("[{b}, {h}, Nk ≥ 1, {d}]"),
            got: k.dims().to_vec(),
        });
    }
    if v.dims() != k.dims() {
        return Err(Error::Shape {
            what: "attention v",
            expected: format!("{:?} (the shape of k)", k.dims()),
            got: v.dims().to_vec(),
        });
    }
    Ok(Dims {
        b,
        h,
        nq,
        nk: k.dims()[2],
        d,
    })
}

/// Runs a custom attention op on `f32` copies of `q, k, v` (contiguous;
/// no copy when they already are) and converts the output back to their
/// dtype.
fn run_f32<C>(q: &Tensor, k: &Tensor, v: &Tensor, op: C) -> Result<Tensor>
where
    C: candle_core::CustomOp3 + Send + Sync + 'static,
{
    let dtype = q.dtype();
    let float = matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64);
    if !float || k.dtype() != dtype || v.dtype() != dtype {
        return Err(Error::config(
            "attention dtype",
            format!("q {:?}, k {:?}, v {:?}", dtype, k.dtype(), v.dtype()),
            "one float dtype (f32, f16, bf16 or f64) for q, k and v",
        ));
    }
    if !q.device().is_cpu() {
        return Err(Error::config(
            "attention kind",
            format!("{} on {:?}", op.name(), q.device().location()),
            "dense attention on a non-CPU device (the memory-efficient and sparse ops are CPU kernels)",
        ));
    }
    let f32c = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
    let out = f32c(q)?.apply_op3(&f32c(k)?, &f32c(v)?, op)?;
    Ok(out.to_dtype(dtype)?)
}
