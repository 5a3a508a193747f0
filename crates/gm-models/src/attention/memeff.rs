//! The memory-efficient attention op (Rabe & Staats 2021; the FlashAttention
//! forward and FlashAttention-2 backward loop orders) as a candle
//! [`CustomOp3`] on CPU `f32` data.
//!
//! Forward, per (batch·head, block of `block` query rows): for each block of
//! `block` keys, one row of scores at a time `s = q·Kᵀ/√d`, then the online
//! softmax update `m' = max(m, max s)`, `ℓ = ℓ·e^(m−m') + Σ e^(s−m')`,
//! `acc = acc·e^(m−m') + e^(s−m')·V`; at the end `O = acc/ℓ` and
//! `lse = m + ln ℓ`. The op keeps the logsumexp (`B·H·Nq` floats) for the
//! backward pass; the output `O` is the graph node itself.
//!
//! Backward, per batch·head: `Dᵢ = dOᵢ·Oᵢ` for every query row, then for each
//! key block (outer) and each query row (inner) it recomputes the scores
//! from `Q`, `K` and the saved `lse`, `P = e^(S − lse)`, and accumulates
//! `dV += Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP − D)`, `dQ += dS K/√d`,
//! `dK += dSᵀ Q/√d` straight into the gradient buffers.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::cpu::{
    axpy, cpu_slice, dot, exp, par_items, row_times_block, storage_slice, sum, transpose, Dims,
};

/// The op: its block size, the call's shape, and (after the forward pass)
/// the per-row logsumexp, `[B·H·Nq]`.
#[derive(Debug)]
pub(super) struct MemEffOp {
    block: usize,
    dims: Dims,
    lse: OnceLock<Vec<f32>>,
}

impl MemEffOp {
    /// `block ≥ 1` (the caller validates).
    pub fn new(block: usize, dims: Dims) -> Self {
        Self {
            block,
            dims,
            lse: OnceLock::new(),
        }
    }
}

impl CustomOp3 for MemEffOp {
    fn name(&self) -> &'static str {
        "gm-memory-efficient-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = self.dims;
        let q = cpu_slice(s1, l1, "q", dims.q_len())?;
        let k = cpu_slice(s2, l2, "k", dims.k_len())?;
        let v = cpu_slice(s3, l3, "v", dims.k_len())?;
        let mut o = vec![0f32; dims.q_len()];
        let mut lse = vec![0f32; dims.bh() * dims.nq];
        forward(q, k, v, &mut o, &mut lse, dims, self.block);
        self.lse
            .set(lse)
            .map_err(|_| candle_core::Error::Msg("memory-efficient attention ran twice".into()))?;
        Ok((CpuStorage::F32(o), Shape::from(dims.out_shape())))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = self.dims;
        let lse = self.lse.get().ok_or_else(|| {
            candle_core::Error::Msg("memory-efficient attention: backward before forward".into())
        })?;
        // `grad_res` is often a broadcast view: make it (and, defensively,
        // the rest) contiguous; already-contiguous tensors are not copied.
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let (o, dout) = (res.contiguous()?, grad_res.contiguous()?);
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = o.storage_and_layout();
        let (gs, gl) = dout.storage_and_layout();
        let (dq, dk, dv) = backward(
            storage_slice(&qs, ql, "q", dims.q_len())?,
            storage_slice(&ks, kl, "k", dims.k_len())?,
            storage_slice(&vs, vl, "v", dims.k_len())?,
            storage_slice(&os, ol, "output", dims.q_len())?,
            storage_slice(&gs, gl, "output gradient", dims.q_len())?,
            lse,
            dims,
            self.block,
        );
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Per-thread forward scratch: a transposed key block (`d × block`), one
/// score row, and the running max and sum of each row of a query block.
struct FwdScratch {
    kt: Vec<f32>,
    row: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

/// Fills `o` (`[B·H·Nq·D]`) and `lse` (`[B·H·Nq]`).
fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
    lse: &mut [f32],
    dims: Dims,
    block: usize,
) {
    let Dims { nq, nk, d, .. } = dims;
    if nq == 0 || dims.bh() == 0 {
        return;
    }
    let mut items = Vec::new();
    for (h, (o_h, lse_h)) in o.chunks_mut(nq * d).zip(lse.chunks_mut(nq)).enumerate() {
        for (i, (o_b, lse_b)) in o_h
            .chunks_mut(block * d)
            .zip(lse_h.chunks_mut(block))
            .enumerate()
        {
            items.push((h, i * block, o_b, lse_b));
        }
    }
    let scale = dims.scale();
    par_items(
        items,
        dims.bh() * nq * nk * d,
        || FwdScratch {
            kt: vec![0.0; d * block],
            row: vec![0.0; block],
            m: vec![0.0; block],
            l: vec![0.0; block],
        },
        |s, (h, r0, o_b, lse_b)| {
            let rows = lse_b.len();
            let q_b = &q[(h * nq + r0) * d..(h * nq + r0 + rows) * d];
            let k_h = &k[h * nk * d..(h + 1) * nk * d];
            let v_h = &v[h * nk * d..(h + 1) * nk * d];
            forward_block(q_b, k_h, v_h, d, block, scale, o_b, lse_b, s);
        },
    );
}

/// One query block against every key block of its head, with the online
/// softmax; `o` (`rows × d`) and `lse` (`rows`) are this block's outputs.
#[allow(clippy::too_many_arguments)]
fn forward_block(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: usize,
    block: usize,
    scale: f32,
    o: &mut [f32],
    lse: &mut [f32],
    scratch: &mut FwdScratch,
) {
    let rows = lse.len();
    let nk = k.len() / d;
    let FwdScratch { kt, row, m, l } = scratch;
    let (m, l) = (&mut m[..rows], &mut l[..rows]);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    o.fill(0.0);
    for j0 in (0..nk).step_by(block) {
        let nc = block.min(nk - j0);
        let kt = &mut kt[..d * nc];
        transpose(&k[j0 * d..(j0 + nc) * d], nc, d, kt);
        let v_b = &v[j0 * d..(j0 + nc) * d];
        let s = &mut row[..nc];
        for r in 0..rows {
            row_times_block(&q[r * d..(r + 1) * d], kt, nc, scale, s);
            let block_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let m_new = m[r].max(block_max);
            // e^(−∞) = 0 on the first block: the empty accumulator stays 0.
            let correction = exp(m[r] - m_new);
            s.iter_mut().for_each(|x| *x = exp(*x - m_new));
            l[r] = l[r] * correction + sum(s);
            m[r] = m_new;
            let o_r = &mut o[r * d..(r + 1) * d];
            if correction != 1.0 {
                o_r.iter_mut().for_each(|x| *x *= correction);
            }
            for (p, v_c) in s.iter().zip(v_b.chunks_exact(d)) {
                axpy(o_r, *p, v_c);
            }
        }
    }
    for (r, o_r) in o.chunks_exact_mut(d).enumerate() {
        let inv = 1.0 / l[r];
        o_r.iter_mut().for_each(|x| *x *= inv);
        lse[r] = m[r] + l[r].ln();
    }
}

/// Per-thread backward scratch: `Dᵢ` for every query row of a head,
/// transposed key and value blocks (`d × block`), one row each of `P` and
/// `dP`.
struct BwdScratch {
    delta: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
    p: Vec<f32>,
    dp: Vec<f32>,
}

/// `(dQ, dK, dV)` by recomputation, one batch·head per work item.
#[allow(clippy::too_many_arguments)]
fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    dout: &[f32],
    lse: &[f32],
    dims: Dims,
    block: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { nq, nk, d, .. } = dims;
    let mut dq = vec![0f32; dims.q_len()];
    let mut dk = vec![0f32; dims.k_len()];
    let mut dv = vec![0f32; dims.k_len()];
    if nq == 0 || dims.bh() == 0 {
        return (dq, dk, dv);
    }
    let items: Vec<_> = dq
        .chunks_mut(nq * d)
        .zip(dk.chunks_mut(nk * d))
        .zip(dv.chunks_mut(nk * d))
        .enumerate()
        .map(|(h, ((dq, dk), dv))| (h, dq, dk, dv))
        .collect();
    let scale = dims.scale();
    par_items(
        items,
        dims.bh() * nq * nk * d,
        || BwdScratch {
            delta: vec![0.0; nq],
            kt: vec![0.0; d * block],
            vt: vec![0.0; d * block],
            p: vec![0.0; block],
            dp: vec![0.0; block],
        },
        |s, (h, dq_h, dk_h, dv_h)| {
            let qs = h * nq * d..(h + 1) * nq * d;
            let ks = h * nk * d..(h + 1) * nk * d;
            backward_head(
                Head {
                    q: &q[qs.clone()],
                    k: &k[ks.clone()],
                    v: &v[ks],
                    o: &o[qs.clone()],
                    dout: &dout[qs],
                    lse: &lse[h * nq..(h + 1) * nq],
                },
                d,
                block,
                scale,
                (dq_h, dk_h, dv_h),
                s,
            );
        },
    );
    (dq, dk, dv)
}

/// One batch·head's inputs to the backward pass.
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    o: &'a [f32],
    dout: &'a [f32],
    lse: &'a [f32],
}

fn backward_head(
    x: Head<'_>,
    d: usize,
    block: usize,
    scale: f32,
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
    scratch: &mut BwdScratch,
) {
    let nq = x.lse.len();
    let nk = x.k.len() / d;
    let BwdScratch {
        delta,
        kt,
        vt,
        p,
        dp,
    } = scratch;
    for ((dlt, do_r), o_r) in delta
        .iter_mut()
        .zip(x.dout.chunks_exact(d))
        .zip(x.o.chunks_exact(d))
    {
        *dlt = dot(do_r, o_r);
    }
    for j0 in (0..nk).step_by(block) {
        let nc = block.min(nk - j0);
        let keys = j0 * d..(j0 + nc) * d;
        let (kt, vt) = (&mut kt[..d * nc], &mut vt[..d * nc]);
        transpose(&x.k[keys.clone()], nc, d, kt);
        transpose(&x.v[keys.clone()], nc, d, vt);
        let k_b = &x.k[keys.clone()];
        let dk_b = &mut dk[keys.clone()];
        let dv_b = &mut dv[keys];
        let (p, dp) = (&mut p[..nc], &mut dp[..nc]);
        for (r, (&delta_r, &lse_r)) in delta[..nq].iter().zip(x.lse).enumerate() {
            let rs = r * d..(r + 1) * d;
            let (q_r, do_r) = (&x.q[rs.clone()], &x.dout[rs.clone()]);
            row_times_block(q_r, kt, nc, scale, p);
            p.iter_mut().for_each(|s| *s = exp(*s - lse_r));
            row_times_block(do_r, vt, nc, 1.0, dp);
            let dq_r = &mut dq[rs];
            for (c, (p_c, dp_c)) in p.iter().zip(dp.iter()).enumerate() {
                let cs = c * d..(c + 1) * d;
                axpy(&mut dv_b[cs.clone()], *p_c, do_r);
                let ds = p_c * (dp_c - delta_r) * scale;
                axpy(dq_r, ds, &k_b[cs.clone()]);
                axpy(&mut dk_b[cs], ds, q_r);
            }
        }
    }
}
