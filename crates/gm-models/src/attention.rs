//! Multi-head attention kernels on `[B, H, N, D]` tensors: the dense
//! reference ([`dense`]). [`attend`] dispatches on an [`AttentionKind`] so
//! models can switch kernels by configuration.

use candle_core::{Tensor, D};

use crate::layers::softmax;
use crate::{Error, Result};

/// Which attention kernel computes `softmax(Q Kᵀ / √d) V`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AttentionKind {
    /// Materialises the `N × N` score matrix (the reference).
    #[default]
    Dense,
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

/// Attention with the kernel `kind`.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, kind: AttentionKind) -> Result<Tensor> {
    match kind {
        AttentionKind::Dense => dense(q, k, v),
    }
}
