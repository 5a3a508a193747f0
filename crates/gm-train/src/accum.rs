//! Adaptive gradient accumulation: reach a target effective batch with
//! micro-batches of the size memory allows (e.g. the one
//! [`BatchSizer`](crate::BatchSizer) chose).
//!
//! # Formulas and defaults
//!
//! - Steps per update: `steps = clamp(ceil(target_batch / micro_batch), 1,
//!   max_steps)`, defaults `target_batch = 128`, `max_steps = 32`
//!   ([`AccumConfig`], [`AccumPlan`]). The effective batch is
//!   `micro_batch × steps`: above the target when the micro-batch does not
//!   divide it, or when one micro-batch alone already exceeds it; below it
//!   when the 32-step cap binds (micro-batches under 4 at the default
//!   target).
//! - Weighting: micro-batch `i` holds `n_i` items and its loss is the
//!   **mean** over them, `L_i = (1/n_i) Σ_{j∈i} ℓ_j`. The update must use
//!   the gradient of the mean over the whole effective batch
//!   `N = Σ n_i`:
//!
//!   `∇ (1/N) Σ_j ℓ_j = Σ_i (n_i / N) ∇L_i`,
//!
//!   so [`GradAccumulator::add`] accumulates `n_i ∇L_i` and
//!   [`GradAccumulator::finish`] divides by `N` (micro-batches of unequal
//!   size, such as a short last one, are weighted correctly). For a loss
//!   that is already a *sum* over its items, pass `items = 1` per
//!   micro-batch and divide yourself.
//!
//! Only the accumulated gradients are held between micro-batches (one f32
//! copy of the parameters); each micro-batch's graph and activations are
//! freed after its `backward`. Exact parity with one big batch needs a
//! model whose items do not interact (no batch norm; dropout masks drawn
//! per micro-batch differ from the big batch's) — the agent qualifies.
//!
//! With f16 loss scaling, scale every micro-batch's loss and unscale the
//! finished gradients once ([`LossScaler`](crate::LossScaler)).

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::grads::Grads;
use crate::{Error, Result};

/// Target effective batch (default 128) and the cap on micro-steps per
/// update (default 32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccumConfig {
    /// Items per optimizer update to aim for (default 128).
    pub target_batch: usize,
    /// Most micro-batches per update (default 32).
    pub max_steps: usize,
}

impl Default for AccumConfig {
    fn default() -> Self {
        Self {
            target_batch: 128,
            max_steps: 32,
        }
    }
}

impl AccumConfig {
    /// Both values at least 1.
    pub fn validate(&self) -> Result<()> {
        if self.target_batch == 0 {
            return Err(Error::config("target_batch", 0, "at least 1 item"));
        }
        if self.max_steps == 0 {
            return Err(Error::config("max_steps", 0, "at least 1 micro-batch"));
        }
        Ok(())
    }

    /// The plan for micro-batches of `micro_batch` items.
    pub fn plan(&self, micro_batch: usize) -> Result<AccumPlan> {
        self.validate()?;
        if micro_batch == 0 {
            return Err(Error::config("micro_batch", 0, "at least 1 item"));
        }
        Ok(AccumPlan {
            micro_batch,
            steps: accumulation_steps(self.target_batch, micro_batch, self.max_steps),
        })
    }
}

/// `clamp(ceil(target / micro), 1, max_steps)` (`micro` of 0 counts as 1).
pub fn accumulation_steps(target: usize, micro: usize, max_steps: usize) -> usize {
    target.div_ceil(micro.max(1)).clamp(1, max_steps.max(1))
}

/// How one optimizer update is split: `steps` micro-batches of
/// `micro_batch` items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccumPlan {
    /// Items per micro-batch.
    pub micro_batch: usize,
    /// Micro-batches per update.
    pub steps: usize,
}

impl AccumPlan {
    /// `micro_batch × steps`.
    pub fn effective_batch(&self) -> usize {
        self.micro_batch * self.steps
    }
}

/// Sums item-weighted micro-batch gradients and hands back the gradient of
/// the mean loss over all items (see the module docs).
#[derive(Debug, Clone)]
pub struct GradAccumulator {
    sum: Grads,
    items: usize,
    micro_steps: usize,
}

impl GradAccumulator {
    /// Nothing accumulated yet, for the variables of `varmap`.
    pub fn new(varmap: &VarMap) -> Result<Self> {
        Ok(Self {
            sum: Grads::empty(varmap)?,
            items: 0,
            micro_steps: 0,
        })
    }

    /// Adds the gradients in `store`, the backward pass of a micro-batch's
    /// **mean** loss over `items` items (weight `items`).
    pub fn add(&mut self, store: &GradStore, items: usize) -> Result<()> {
        check_items(items)?;
        self.sum.add_store(store, items as f64)?;
        self.items += items;
        self.micro_steps += 1;
        Ok(())
    }

    /// As [`add`](Self::add) for gradients already collected in [`Grads`].
    pub fn add_grads(&mut self, grads: &Grads, items: usize) -> Result<()> {
        check_items(items)?;
        let mut g = grads.clone();
        if items != 1 {
            g.scale(items as f64)?;
        }
        self.sum.add(&g)?;
        self.items += items;
        self.micro_steps += 1;
        Ok(())
    }

    /// Items accumulated so far.
    pub fn items(&self) -> usize {
        self.items
    }

    /// Micro-batches accumulated so far.
    pub fn micro_steps(&self) -> usize {
        self.micro_steps
    }

    /// Whether `plan.steps` micro-batches have been added.
    pub fn is_ready(&self, plan: &AccumPlan) -> bool {
        self.micro_steps >= plan.steps
    }

    /// The gradient of the mean loss over every item added
    /// (`Σ n_i ∇L_i / N`); the accumulator starts over. An error when
    /// nothing was added.
    pub fn finish(&mut self) -> Result<Grads> {
        if self.items == 0 {
            return Err(Error::config(
                "accumulated items",
                0,
                "at least one micro-batch added before finish",
            ));
        }
        let mut empty = self.sum.clone();
        for g in empty.grads_mut() {
            *g = None;
        }
        let mut out = std::mem::replace(&mut self.sum, empty);
        out.scale(1.0 / self.items as f64)?;
        self.items = 0;
        self.micro_steps = 0;
        Ok(out)
    }
}

fn check_items(items: usize) -> Result<()> {
    if items == 0 {
        return Err(Error::config("micro-batch items", 0, "at least 1 item"));
    }
    Ok(())
}

/// Runs `loss_of` on every micro-batch, back-propagates each returned
/// mean loss right away (so only one micro-batch's graph is alive at a
/// time), and returns the gradient of the mean loss over all items of all
/// micro-batches, with that mean loss (`Σ n_i L_i / N`, of the losses as
/// returned — scaled, if the closure scaled them).
///
/// `loss_of` returns the scalar mean loss of one micro-batch and its item
/// count.
pub fn accumulate<I, F>(varmap: &VarMap, micro_batches: I, mut loss_of: F) -> Result<(Grads, f64)>
where
    I: IntoIterator,
    F: FnMut(I::Item) -> Result<(Tensor, usize)>,
{
    let mut acc = GradAccumulator::new(varmap)?;
    let mut loss_sum = 0f64;
    for mb in micro_batches {
        let (loss, items) = loss_of(mb)?;
        let store = loss.backward()?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        acc.add(&store, items)?;
        loss_sum += value * items as f64;
    }
    let n = acc.items();
    let grads = acc.finish()?;
    Ok((grads, loss_sum / n as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_follow_the_clamped_ceiling() {
        assert_eq!(accumulation_steps(128, 32, 32), 4);
        assert_eq!(accumulation_steps(128, 48, 32), 3);
        assert_eq!(accumulation_steps(128, 512, 32), 1);
        assert_eq!(accumulation_steps(128, 1, 32), 32);
        assert_eq!(accumulation_steps(128, 3, 32), 32);
        let plan = AccumConfig::default().plan(24).unwrap();
        assert_eq!((plan.steps, plan.effective_batch()), (6, 144));
        assert!(AccumConfig::default().plan(0).is_err());
        assert!(AccumConfig {
            target_batch: 0,
            ..AccumConfig::default()
        }
        .validate()
        .is_err());
    }
}
