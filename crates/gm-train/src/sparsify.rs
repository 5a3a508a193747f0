//! Top-k gradient sparsification with error feedback (residual
//! accumulation), as in Deep Gradient Compression (Lin et al., 2018): what
//! a data-parallel worker would send instead of its dense gradient.
//!
//! # The transform
//!
//! For every variable, with `g` its gradient and `r` its residual (zero at
//! first), [`TopK::apply`] computes
//!
//! - `a = g + r` (error feedback: what was held back before is added back),
//! - `S` = the indices of the `k` largest `|a|` (exactly `k`; ties broken
//!   arbitrarily),
//! - the gradient becomes `a` on `S` and 0 elsewhere (what is sent and
//!   applied),
//! - the new residual is `a` off `S` and 0 on `S` (what is held back),
//!
//! so `kept + residual' = g + r` element by element: nothing is lost, only
//! delayed. Without error feedback ([`TopKConfig::error_feedback`] `=
//! false`) the rest is simply dropped — and training on 1 % of the
//! gradient then stalls (see `tests/sparsify.rs`).
//!
//! `k` is [`TopKAmount::Fraction`] (default 1 %: `k = clamp(ceil(f·n), 1,
//! n)`) or [`TopKAmount::Count`] (`k = min(count, n)`), where `n` is the
//! element count of the scope: each tensor ([`TopKScope::PerTensor`], the
//! default and DGC's choice — every layer sends something, a small bias is
//! not starved by a large weight matrix) or all variables together
//! ([`TopKScope::Global`] — the `k` largest over the whole model, exactly
//! `k` in all).
//!
//! [`SparsifyReport`] counts the traffic: dense `4·n` bytes (f32) against
//! sparse `8·kept` (an f32 value and a u32 index per kept entry).
//!
//! Selection runs on the host (`select_nth_unstable`, O(n) per step); a
//! GPU version would estimate the threshold from a sample as DGC does.
//! DGC's other refinements (momentum correction, local gradient clipping,
//! warm-up of the sparsity) are not included: apply clipping before
//! `apply` if wanted. The residuals are public (in [`Grads`] order, like
//! [`AdamW`](crate::AdamW)'s moments) so checkpoints can save them.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::grads::Grads;
use crate::{Error, Result};

/// How many entries to keep.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum TopKAmount {
    /// A fraction in (0, 1] of the scope's elements, rounded up, at least 1.
    Fraction(f64),
    /// A fixed count per scope (all of it when the scope is smaller).
    Count(usize),
}

impl TopKAmount {
    /// `k` for a scope of `n` elements.
    pub fn k(self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        match self {
            TopKAmount::Fraction(f) => ((f * n as f64).ceil() as usize).clamp(1, n),
            TopKAmount::Count(c) => c.min(n),
        }
    }
}

/// Where the `k` largest are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum TopKScope {
    /// `k` of each variable's gradient (default).
    #[default]
    PerTensor,
    /// `k` over all variables together.
    Global,
}

/// Top-k settings: default 1 % per tensor with error feedback.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TopKConfig {
    /// How many to keep (default `Fraction(0.01)`).
    pub amount: TopKAmount,
    /// Per tensor (default) or global.
    pub scope: TopKScope,
    /// Keep what is not sent as a residual for the next step (default
    /// true); false drops it.
    pub error_feedback: bool,
}

impl Default for TopKConfig {
    fn default() -> Self {
        Self {
            amount: TopKAmount::Fraction(0.01),
            scope: TopKScope::PerTensor,
            error_feedback: true,
        }
    }
}

impl TopKConfig {
    /// A fraction in (0, 1], a count of at least 1.
    pub fn validate(&self) -> Result<()> {
        match self.amount {
            TopKAmount::Fraction(f) if !(f > 0.0 && f <= 1.0) => {
                Err(Error::config("top-k fraction", f, "a fraction in (0, 1]"))
            }
            TopKAmount::Count(0) => Err(Error::config("top-k count", 0, "at least 1 entry")),
            _ => Ok(()),
        }
    }
}

/// What one [`TopK::apply`] kept and what sending it would cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SparsifyReport {
    /// Entries kept (sent).
    pub kept: usize,
    /// Entries considered (every gradient or residual present).
    pub total: usize,
    /// Bytes to send the dense f32 gradient: `4 · total`.
    pub bytes_dense: u64,
    /// Bytes to send the kept entries as (f32 value, u32 index) pairs:
    /// `8 · kept`.
    pub bytes_sparse: u64,
}

impl SparsifyReport {
    /// `bytes_sparse / bytes_dense` (0 when nothing was considered).
    pub fn ratio(&self) -> f64 {
        if self.bytes_dense == 0 {
            0.0
        } else {
            self.bytes_sparse as f64 / self.bytes_dense as f64
        }
    }
}

/// The top-k gradient transform with its per-variable residuals (see the
/// module docs).
#[derive(Debug, Clone)]
pub struct TopK {
    /// Settings.
    pub cfg: TopKConfig,
    /// What was held back, per variable in [`Grads`] order (f32, the
    /// gradient's shape; `None` until a variable first has one).
    pub residuals: Vec<Option<Tensor>>,
}

/// One variable's accumulated values during `apply`.
struct Slot {
    index: usize,
    values: Vec<f32>,
    keep: Vec<bool>,
    shape: candle_core::Shape,
    device: candle_core::Device,
}

impl TopK {
    /// A transform for `n_vars` variables, no residual yet.
    pub fn new(cfg: TopKConfig, n_vars: usize) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            residuals: vec![None; n_vars],
        })
    }

    /// Sparsifies `grads` in place (adds the residuals, keeps the top `k`,
    /// stores the rest as the new residuals — or drops it without error
    /// feedback) and reports the traffic. A variable with neither a
    /// gradient nor a residual is skipped.
    pub fn apply(&mut self, grads: &mut Grads) -> Result<SparsifyReport> {
        if grads.len() != self.residuals.len() {
            return Err(Error::config(
                "grads",
                grads.len(),
                format!("gradients for {} variables", self.residuals.len()),
            ));
        }
        let mut slots = Vec::new();
        for (index, (g, r)) in grads.grads_mut().iter().zip(&self.residuals).enumerate() {
            let base = match (g, r) {
                (None, None) => continue,
                (Some(g), Some(r)) => g.to_dtype(DType::F32)?.add(r)?,
                (Some(g), None) => g.to_dtype(DType::F32)?,
                (None, Some(r)) => r.clone(),
            };
            let values = base.flatten_all()?.to_vec1::<f32>()?;
            slots.push(Slot {
                index,
                keep: vec![false; values.len()],
                values,
                shape: base.shape().clone(),
                device: base.device().clone(),
            });
        }
        let total: usize = slots.iter().map(|s| s.values.len()).sum();
        let mut kept = 0;
        match self.cfg.scope {
            TopKScope::PerTensor => {
                for s in &mut slots {
                    let k = self.cfg.amount.k(s.values.len());
                    for i in top_k_indices(&s.values, k) {
                        s.keep[i] = true;
                    }
                    kept += k;
                }
            }
            TopKScope::Global => {
                let all: Vec<f32> = slots
                    .iter()
                    .flat_map(|s| s.values.iter().copied())
                    .collect();
                let k = self.cfg.amount.k(all.len());
                let mut starts = Vec::with_capacity(slots.len());
                let mut off = 0;
                for s in &slots {
                    starts.push(off);
                    off += s.values.len();
                }
                for flat in top_k_indices(&all, k) {
                    let si = starts.partition_point(|&st| st <= flat) - 1;
                    slots[si].keep[flat - starts[si]] = true;
                }
                kept = k;
            }
        }
        let slots_out = grads.grads_mut();
        for s in slots {
            let mut sent = s.values.clone();
            let mut rest = s.values;
            for (i, &k) in s.keep.iter().enumerate() {
                if k {
                    rest[i] = 0.0;
                } else {
                    sent[i] = 0.0;
                }
            }
            slots_out[s.index] = Some(Tensor::from_vec(sent, &s.shape, &s.device)?);
            self.residuals[s.index] = if self.cfg.error_feedback {
                Some(Tensor::from_vec(rest, &s.shape, &s.device)?)
            } else {
                None
            };
        }
        Ok(SparsifyReport {
            kept,
            total,
            bytes_dense: 4 * total as u64,
            bytes_sparse: 8 * kept as u64,
        })
    }

    /// The L2 norm of everything held back.
    pub fn residual_norm(&self) -> Result<f64> {
        let mut sum = 0f64;
        for r in self.residuals.iter().flatten() {
            sum += r
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        Ok(sum.sqrt())
    }

    /// Bytes the residuals hold (f32).
    pub fn residual_bytes(&self) -> usize {
        self.residuals
            .iter()
            .flatten()
            .map(|t| t.elem_count() * 4)
            .sum()
    }

    /// Drops every residual.
    pub fn clear(&mut self) {
        self.residuals.iter_mut().for_each(|r| *r = None);
    }
}

/// The indices of the `k` largest `|v|` (exactly `k`, in no order).
fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    let n = values.len();
    if k >= n {
        return (0..n).collect();
    }
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.select_nth_unstable_by(k - 1, |&a, &b| values[b].abs().total_cmp(&values[a].abs()));
    idx.truncate(k);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_picks_the_largest_magnitudes_and_amounts_round_up() {
        let v = [0.1f32, -5.0, 3.0, 0.0, -0.2, 4.0];
        let mut got = top_k_indices(&v, 3);
        got.sort();
        assert_eq!(got, [1, 2, 5]);
        assert_eq!(top_k_indices(&v, 0), Vec::<usize>::new());
        assert_eq!(top_k_indices(&v, 9).len(), 6);
        assert_eq!(TopKAmount::Fraction(0.01).k(1000), 10);
        assert_eq!(TopKAmount::Fraction(0.01).k(1001), 11);
        assert_eq!(TopKAmount::Fraction(0.01).k(8), 1);
        assert_eq!(TopKAmount::Count(5).k(3), 3);
        assert_eq!(TopKAmount::Count(5).k(0), 0);
        assert!(TopK::new(
            TopKConfig {
                amount: TopKAmount::Fraction(0.0),
                ..TopKConfig::default()
            },
            1
        )
        .is_err());
        assert!(TopKConfig {
            amount: TopKAmount::Count(0),
            ..TopKConfig::default()
        }
        .validate()
        .is_err());
    }
}
