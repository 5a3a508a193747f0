//! Sparse attention: the [`SparsePattern`] (local window, strided keys,
//! global tokens, optional causality), its key enumeration
//! ([`SparsePattern::for_each_key`], the spec a CUDA kernel mirrors), and
//! the CPU custom op whose forward and backward visit only the allowed
//! (query, key) pairs.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::cpu::{axpy, cpu_slice, dot, exp, par_items, storage_slice, sum, Dims};
use crate::{Error, Result};

/// Which keys each query attends to (Sparse Transformer / Longformer
/// patterns). Positions are indices: query `i` of `0..Nq` and key `j` of
/// `0..Nk` (so with `Nq ≠ Nk` the two sequences are aligned at their
/// starts).
///
/// Query `i` sees key `j` exactly when ([`allows`](Self::allows))
///
/// ```text
/// (!causal || j ≤ i)
///   && (  i < global_tokens                      // global query: sees every key
///      || j < global_tokens                      // global key: seen by every query
///      || |i − j| ≤ window                       // local window (causal: i − window ≤ j ≤ i)
///      || stride = Some(s) && j % s == s − 1 )   // every s-th key: s−1, 2s−1, …
/// ```
///
/// The default is a bidirectional window of ±16 with no strided or global
/// tokens. `window ≥ max(Nq, Nk)` (e.g. [`SparsePattern::full`]) allows
/// every pair, which is dense attention. A query that sees no key (possible
/// only when `Nq > Nk`, or with a window of 0 and `i ≥ Nk`) gets a zero
/// output row and no gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SparsePattern {
    /// Half-width of the local window: query `i` sees keys `i − window ..=
    /// i + window` (only `i − window ..= i` when `causal`).
    pub window: usize,
    /// `Some(s)`: keys `s − 1, 2s − 1, …` (every `s`-th key, 1-based) are
    /// seen by every query (subject to `causal`). `s ≥ 1`.
    pub stride: Option<usize>,
    /// The first `global_tokens` positions are global: those queries see
    /// every key and those keys are seen by every query (subject to
    /// `causal`).
    pub global_tokens: usize,
    /// Queries see no key after their own position (`j ≤ i`).
    pub causal: bool,
}

impl Default for SparsePattern {
    fn default() -> Self {
        Self::local(16)
    }
}

impl SparsePattern {
    /// A bidirectional window of `±window`, nothing else.
    pub fn local(window: usize) -> Self {
        Self {
            window,
            stride: None,
            global_tokens: 0,
            causal: false,
        }
    }

    /// Every key for every query (dense attention through the sparse
    /// kernel; for tests).
    pub fn full() -> Self {
        Self::local(usize::MAX)
    }

    /// The same pattern with every `stride`-th key also attended.
    pub fn with_stride(self, stride: usize) -> Self {
        Self {
            stride: Some(stride),
            ..self
        }
    }

    /// The same pattern with the first `count` positions global.
    pub fn with_global_tokens(self, count: usize) -> Self {
        Self {
            global_tokens: count,
            ..self
        }
    }

    /// The same pattern, causal.
    pub fn causal(self) -> Self {
        Self {
            causal: true,
            ..self
        }
    }

    /// Checks the configuration: a stride, if any, is at least 1.
    pub fn validate(&self) -> Result<()> {
        if self.stride == Some(0) {
            return Err(Error::config("sparse.stride", 0, "None or at least 1"));
        }
        Ok(())
    }

    /// Whether query `i` sees key `j` (the definition; see the type docs).
    /// Out-of-range indices are the caller's business: this looks at
    /// positions only.
    pub fn allows(&self, i: usize, j: usize) -> bool {
        if self.causal && j > i {
            return false;
        }
        i < self.global_tokens
            || j < self.global_tokens
            || i.abs_diff(j) <= self.window
            || self.stride.is_some_and(|s| s > 0 && j % s == s - 1)
    }

    /// Visits, in increasing order and each once, exactly the keys `j <
    /// nk` that query `i` sees (`{j < nk : allows(i, j)}`), in
    /// `O(global_tokens + 2·window + 1 + nk/stride)` steps (`O(nk)` for a
    /// global query).
    ///
    /// **This is the spec of the sparse kernels**: the CPU op visits keys in
    /// this order, and a device kernel must enumerate the same keys in the
    /// same order (which also fixes the floating-point summation order).
    /// With `hi_all = nk`, or `min(i + 1, nk)` when causal:
    ///
    /// 1. a global query (`i < global_tokens`) visits `0 .. hi_all`; done;
    /// 2. `lo = min(i − window, nk)` (saturating at 0),
    ///    `hi = min(i + window + 1, hi_all)` (saturating);
    /// 3. the sparse keys of `[0, lo)`: the global keys `0 .. min(global_tokens, lo)`,
    ///    then the strided keys `j ≡ s − 1 (mod s)` with `global_tokens ≤ j < lo`;
    /// 4. the window `lo .. hi`;
    /// 5. the sparse keys of `[hi, hi_all)`: global keys
    ///    `hi .. min(global_tokens, hi_all)`, then strided keys with
    ///    `max(global_tokens, hi) ≤ j < hi_all`.
    pub fn for_each_key(&self, i: usize, nk: usize, mut visit: impl FnMut(usize)) {
        let g = self.global_tokens;
        let hi_all = if self.causal {
            i.saturating_add(1).min(nk)
        } else {
            nk
        };
        if i < g {
            (0..hi_all).for_each(visit);
            return;
        }
        let lo = i.saturating_sub(self.window).min(nk);
        // lo ≤ hi ≤ hi_all always: i − window ≤ i + 1 and ≤ i + window + 1.
        let hi = i.saturating_add(self.window).saturating_add(1).min(hi_all);
        self.sparse_keys(0, lo, &mut visit);
        (lo..hi).for_each(&mut visit);
        self.sparse_keys(hi, hi_all, &mut visit);
    }

    /// The global keys, then the strided keys, in `[from, to)`.
    fn sparse_keys(&self, from: usize, to: usize, visit: &mut impl FnMut(usize)) {
        let g = self.global_tokens;
        (from..g.min(to)).for_each(&mut *visit);
        if let Some(s) = self.stride.filter(|s| *s > 0) {
            let start = from.max(g);
            // The first j ≥ start with j % s == s − 1.
            let first = start + (s - 1 - start % s);
            let mut j = first;
            while j < to {
                visit(j);
                j = match j.checked_add(s) {
                    Some(next) => next,
                    None => break,
                };
            }
        }
    }

    /// How many keys `j < nk` query `i` sees.
    pub fn key_count(&self, i: usize, nk: usize) -> usize {
        let mut n = 0;
        self.for_each_key(i, nk, |_| n += 1);
        n
    }
}

/// The op: the pattern, the call's shape, and (after the forward pass) the
/// per-row logsumexp `[B·H·Nq]` (−∞ for a query that sees no key).
#[derive(Debug)]
pub(super) struct SparseOp {
    pattern: SparsePattern,
    dims: Dims,
    lse: OnceLock<Vec<f32>>,
}

impl SparseOp {
    /// A validated pattern (the caller checks).
    pub fn new(pattern: SparsePattern, dims: Dims) -> Self {
        Self {
            pattern,
            dims,
            lse: OnceLock::new(),
        }
    }

    /// Visited (query, key) pairs times `d`: the work estimate.
    fn work(&self) -> usize {
        let Dims { nq, nk, d, .. } = self.dims;
        let p = &self.pattern;
        let per_query = p
            .global_tokens
            .saturating_add(p.window.saturating_mul(2).saturating_add(1))
            .saturating_add(p.stride.map_or(0, |s| nk / s.max(1)))
            .min(nk);
        self.dims.bh() * nq * per_query * d
    }
}

/// Query rows per forward work item.
const ROWS_PER_ITEM: usize = 64;

impl CustomOp3 for SparseOp {
    fn name(&self) -> &'static str {
        "gm-sparse-attention"
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
        let Dims { nq, nk, d, .. } = dims;
        let q = cpu_slice(s1, l1, "q", dims.q_len())?;
        let k = cpu_slice(s2, l2, "k", dims.k_len())?;
        let v = cpu_slice(s3, l3, "v", dims.k_len())?;
        let mut o = vec![0f32; dims.q_len()];
        let mut lse = vec![0f32; dims.bh() * nq];
        if nq > 0 {
            let items: Vec<_> = o
                .chunks_mut(ROWS_PER_ITEM * d)
                .zip(lse.chunks_mut(ROWS_PER_ITEM))
                .enumerate()
                .collect();
            let scale = dims.scale();
            let pattern = self.pattern;
            par_items(
                items,
                self.work(),
                || (Vec::<usize>::new(), Vec::<f32>::new()),
                |(keys, scores), (item, (o_b, lse_b))| {
                    // An item may straddle two heads: locate each row.
                    for (t, (o_r, lse_r)) in o_b.chunks_exact_mut(d).zip(lse_b).enumerate() {
                        let row = item * ROWS_PER_ITEM + t;
                        let (h, i) = (row / nq, row % nq);
                        let q_r = &q[row * d..(row + 1) * d];
                        let k_h = &k[h * nk * d..(h + 1) * nk * d];
                        let v_h = &v[h * nk * d..(h + 1) * nk * d];
                        keys.clear();
                        scores.clear();
                        pattern.for_each_key(i, nk, |j| {
                            keys.push(j);
                            scores.push(dot(q_r, &k_h[j * d..(j + 1) * d]) * scale);
                        });
                        forward_row(keys, scores, v_h, d, o_r, lse_r);
                    }
                },
            );
        }
        self.lse
            .set(lse)
            .map_err(|_| candle_core::Error::Msg("sparse attention ran twice".into()))?;
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
        let Dims { nq, nk, d, .. } = dims;
        let lse = self.lse.get().ok_or_else(|| {
            candle_core::Error::Msg("sparse attention: backward before forward".into())
        })?;
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let (o, dout) = (res.contiguous()?, grad_res.contiguous()?);
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = o.storage_and_layout();
        let (gs, gl) = dout.storage_and_layout();
        let qd = storage_slice(&qs, ql, "q", dims.q_len())?;
        let kd = storage_slice(&ks, kl, "k", dims.k_len())?;
        let vd = storage_slice(&vs, vl, "v", dims.k_len())?;
        let od = storage_slice(&os, ol, "output", dims.q_len())?;
        let gd = storage_slice(&gs, gl, "output gradient", dims.q_len())?;
        let mut dq = vec![0f32; dims.q_len()];
        let mut dk = vec![0f32; dims.k_len()];
        let mut dv = vec![0f32; dims.k_len()];
        if nq > 0 {
            // dK and dV rows receive contributions from many queries: one
            // batch·head per work item, so each is written by one thread.
            let items: Vec<_> = dq
                .chunks_mut(nq * d)
                .zip(dk.chunks_mut(nk * d))
                .zip(dv.chunks_mut(nk * d))
                .enumerate()
                .collect();
            let scale = dims.scale();
            let pattern = self.pattern;
            par_items(
                items,
                self.work(),
                || (Vec::<usize>::new(), Vec::<f32>::new()),
                |(keys, p), (h, ((dq_h, dk_h), dv_h))| {
                    let qs = h * nq * d..(h + 1) * nq * d;
                    let ks = h * nk * d..(h + 1) * nk * d;
                    let (q_h, k_h, v_h) = (&qd[qs.clone()], &kd[ks.clone()], &vd[ks]);
                    let (o_h, do_h) = (&od[qs.clone()], &gd[qs]);
                    for i in 0..nq {
                        let lse_i = lse[h * nq + i];
                        if lse_i == f32::NEG_INFINITY {
                            continue; // a query that sees no key
                        }
                        let rs = i * d..(i + 1) * d;
                        let (q_i, do_i) = (&q_h[rs.clone()], &do_h[rs.clone()]);
                        // Recompute P for this query's keys (exp batched,
                        // so it vectorises), then dV, dP, dS, dQ, dK.
                        keys.clear();
                        p.clear();
                        pattern.for_each_key(i, nk, |j| {
                            keys.push(j);
                            p.push(dot(q_i, &k_h[j * d..(j + 1) * d]) * scale);
                        });
                        p.iter_mut().for_each(|s| *s = exp(*s - lse_i));
                        let delta = dot(do_i, &o_h[rs.clone()]);
                        let dq_i = &mut dq_h[rs];
                        for (&j, &p_j) in keys.iter().zip(p.iter()) {
                            let cs = j * d..(j + 1) * d;
                            let k_j = &k_h[cs.clone()];
                            let dp = dot(do_i, &v_h[cs.clone()]);
                            let ds = p_j * (dp - delta) * scale;
                            axpy(&mut dv_h[cs.clone()], p_j, do_i);
                            axpy(dq_i, ds, k_j);
                            axpy(&mut dk_h[cs], ds, q_i);
                        }
                    }
                },
            );
        }
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Softmax over one query's visited `scores`, then `o = Σ p_j v_j`; with no
/// keys, `o = 0` and `lse = −∞`.
fn forward_row(
    keys: &[usize],
    scores: &mut [f32],
    v: &[f32],
    d: usize,
    o: &mut [f32],
    lse: &mut f32,
) {
    o.fill(0.0);
    if keys.is_empty() {
        *lse = f32::NEG_INFINITY;
        return;
    }
    let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    scores.iter_mut().for_each(|s| *s = exp(*s - m));
    let sum = sum(scores);
    let inv = 1.0 / sum;
    for (j, p) in keys.iter().zip(scores.iter()) {
        axpy(o, p * inv, &v[j * d..(j + 1) * d]);
    }
    *lse = m + sum.ln();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns() -> Vec<SparsePattern> {
        let mut out = Vec::new();
        for window in [0, 1, 3, 7, usize::MAX] {
            for stride in [None, Some(1), Some(2), Some(5)] {
                for global_tokens in [0, 1, 4] {
                    for causal in [false, true] {
                        out.push(SparsePattern {
                            window,
                            stride,
                            global_tokens,
                            causal,
                        });
                    }
                }
            }
        }
        out
    }

    #[test]
    fn enumeration_is_the_predicate_in_increasing_order() {
        for p in patterns() {
            for (nq, nk) in [(1, 1), (9, 9), (12, 20), (20, 6), (17, 17)] {
                for i in 0..nq {
                    let mut got = Vec::new();
                    p.for_each_key(i, nk, |j| got.push(j));
                    let want: Vec<usize> = (0..nk).filter(|&j| p.allows(i, j)).collect();
                    assert_eq!(got, want, "{p:?} i={i} nk={nk}");
                    assert_eq!(p.key_count(i, nk), want.len());
                }
            }
        }
    }

    #[test]
    fn documented_example() {
        // ±1 window, every 4th key (3, 7, …), one global token, n = 10.
        let p = SparsePattern::local(1).with_stride(4).with_global_tokens(1);
        let keys = |i| {
            let mut v = Vec::new();
            p.for_each_key(i, 10, |j| v.push(j));
            v
        };
        assert_eq!(keys(0), (0..10).collect::<Vec<_>>());
        assert_eq!(keys(5), vec![0, 3, 4, 5, 6, 7]);
        assert_eq!(keys(9), vec![0, 3, 7, 8, 9]);
        let c = p.causal();
        let mut v = Vec::new();
        c.for_each_key(5, 10, |j| v.push(j));
        assert_eq!(v, vec![0, 3, 4, 5]);
    }
}
