//! Mixed-precision training: forward and backward in bf16 or f16 over f32
//! master weights, with PyTorch-`GradScaler`-style dynamic loss scaling for
//! f16.
//!
//! # How the low-precision working copy is built
//!
//! The master parameters are the f32 [`Var`](candle_core::Var)s of a
//! [`VarMap`]; the optimizer updates only them. Each step builds a working
//! copy of the model from [`working_builder`]: a
//! `VarBuilder::from_tensors(map, dtype, device)` over a map from every
//! master variable's name to its **f32 tensor itself**. candle's
//! `HashMap<String, Tensor>` backend answers every `get` with
//! `tensor.to_device(dev)?.to_dtype(dtype)`, so each weight the model asks
//! for is a fresh bf16/f16 node whose parent is the master variable. Running
//! `AgentNet::new(&cfg, working_builder(&varmap, DType::BF16, &dev)?)` thus
//! gives a bf16 model (its constants, such as the structure embedder's
//! position table, and its inputs follow the builder's dtype); `to_dtype` is
//! differentiable (its backward converts the gradient back to the parent's
//! dtype), so `loss.backward()` leaves **f32** gradients on the master
//! variables, which [`Grads::from_store`] collects as usual. With
//! [`Precision::F32`] `to_dtype` is the identity and the model uses the
//! master variables directly.
//!
//! Two candle traps this avoids (tested in `tests/precision.rs`):
//! `VarBuilder::from_varmap(&map, DType::BF16, ..)` on a map that already
//! holds f32 variables silently returns the **f32** variables (`VarMap::get`
//! ignores the dtype for existing names), and a working copy made with
//! `detach()` or `Var::from_tensor` would cut the graph so the masters get
//! no gradient. A name the map lacks is an error here (the model must have
//! been built once on the master map first, e.g. with
//! `VarBuilder::from_varmap(&map, DType::F32, ..)`), never a new variable.
//!
//! The copy costs half (bf16/f16) of the parameter bytes per step on top of
//! the f32 masters; what shrinks is every activation saved for the
//! backward pass. On the CPU, bf16/f16 kernels are *slower* than f32
//! (shared/NOTES.md): mixed precision buys memory, not speed, here.
//!
//! # Loss scaling (f16 only)
//!
//! f16 has 5 exponent bits: gradients below ~6e-8 flush to zero. The loss
//! is multiplied by a scale `S` before `backward` (so every gradient is
//! `S×` larger while in f16), and the f32 master gradients are multiplied
//! by `1/S` before the optimizer step. [`LossScaler`] adapts `S` as
//! PyTorch's `torch.amp.GradScaler` does, with its constants as defaults:
//!
//! | event | action |
//! |---|---|
//! | start | `S = 2^16` (`init_scale`) |
//! | a gradient is inf/NaN ([`Grads::all_finite`]) | skip the optimizer step, `S ← S × 0.5` (`backoff_factor`), reset the clean-step count |
//! | `2000` (`growth_interval`) consecutive clean steps | `S ← S × 2` (`growth_factor`), reset the count |
//!
//! bf16 has f32's exponent range and needs no scaler ([`Precision::needs_loss_scaling`]).
//! The scaler's state is plain public fields (serde-serialisable) so a
//! checkpoint restores it exactly.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::grads::Grads;
use crate::optim::AdamW;
use crate::{Error, Result};

/// The dtype of the forward and backward pass (master weights and
/// optimizer state stay f32 in every case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Precision {
    /// Everything in f32 (the default).
    #[default]
    F32,
    /// bfloat16 working copy: f32's range, 8 bits of mantissa; no loss
    /// scaling.
    Bf16,
    /// IEEE half working copy: 11 bits of mantissa, max 65504; needs a
    /// [`LossScaler`].
    F16,
}

impl Precision {
    /// The candle dtype of the working copy.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    /// Whether training in this precision needs dynamic loss scaling (f16).
    pub fn needs_loss_scaling(self) -> bool {
        self == Precision::F16
    }

    /// A [`working_builder`] in this precision.
    pub fn working_builder(self, master: &VarMap, device: &Device) -> Result<VarBuilder<'static>> {
        working_builder(master, self.dtype(), device)
    }
}

/// A `VarBuilder` whose every tensor is `master_var.to_dtype(dtype)` — the
/// differentiable low-precision working copy of the f32 master variables
/// in `master` (see the module docs). Build the step's model from it; the
/// backward pass then leaves f32 gradients on the master variables.
///
/// Errors when a master variable is not f32 (the masters must keep full
/// precision). Asking the builder for a name the map lacks is candle's
/// "cannot find tensor" error, and a shape other than the master's is a
/// shape error: it never creates variables.
pub fn working_builder(
    master: &VarMap,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let data = master
        .data()
        .lock()
        .map_err(|_| Error::config("varmap", "poisoned", "an unpoisoned lock"))?;
    let mut map = HashMap::with_capacity(data.len());
    for (name, var) in data.iter() {
        if var.dtype() != DType::F32 {
            return Err(Error::config(
                "master weights",
                format!("{name}: {:?}", var.dtype()),
                "f32 variables (the master copy keeps full precision)",
            ));
        }
        map.insert(name.clone(), var.as_tensor().clone());
    }
    Ok(VarBuilder::from_tensors(map, dtype, device))
}

/// [`LossScaler`] constants; the defaults are PyTorch `GradScaler`'s.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScalerConfig {
    /// Starting scale (default 2^16 = 65536).
    pub init_scale: f64,
    /// Factor applied after `growth_interval` clean steps (default 2).
    pub growth_factor: f64,
    /// Factor applied on an overflow (default 0.5).
    pub backoff_factor: f64,
    /// Consecutive clean steps before growing (default 2000).
    pub growth_interval: u64,
}

impl Default for LossScalerConfig {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

impl LossScalerConfig {
    /// `init_scale` finite and > 0, `growth_factor` finite and > 1,
    /// `backoff_factor` in (0, 1), `growth_interval` ≥ 1.
    pub fn validate(&self) -> Result<()> {
        if !(self.init_scale.is_finite() && self.init_scale > 0.0) {
            return Err(Error::config(
                "init_scale",
                self.init_scale,
                "a finite value > 0",
            ));
        }
        if !(self.growth_factor.is_finite() && self.growth_factor > 1.0) {
            return Err(Error::config(
                "growth_factor",
                self.growth_factor,
                "a finite value > 1",
            ));
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return Err(Error::config(
                "backoff_factor",
                self.backoff_factor,
                "a value in (0, 1)",
            ));
        }
        if self.growth_interval == 0 {
            return Err(Error::config("growth_interval", 0, "at least 1 step"));
        }
        Ok(())
    }
}

/// Dynamic loss scaling for f16 training (see the module docs for the
/// rule). Use per step:
///
/// 1. `scaler.scale_loss(&loss)?.backward()?` and collect [`Grads`];
/// 2. `scaler.step(&mut grads, &mut opt)?` — or by hand:
///    `let ok = scaler.unscale_and_check(&mut grads)?; if ok { opt.step(&grads)? }
///    scaler.update(!ok);`
///
/// With gradient accumulation, scale every micro-batch's loss and unscale
/// once, on the accumulated gradients.
///
/// Every field is public and serde-serialisable: a checkpoint saves and
/// restores the scaler exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// Constants.
    pub cfg: LossScalerConfig,
    /// The current scale `S`.
    pub scale: f64,
    /// Consecutive clean steps since the scale last changed.
    pub growth_tracker: u64,
    /// Optimizer steps skipped because of inf/NaN gradients.
    pub skipped_steps: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        let cfg = LossScalerConfig::default();
        Self {
            cfg,
            scale: cfg.init_scale,
            growth_tracker: 0,
            skipped_steps: 0,
        }
    }
}

impl LossScaler {
    /// A scaler starting at `cfg.init_scale`.
    pub fn new(cfg: LossScalerConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            scale: cfg.init_scale,
            growth_tracker: 0,
            skipped_steps: 0,
        })
    }

    /// The current scale `S`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// `S × loss`, computed in f32 (a low-precision loss is converted
    /// first, so scaling itself cannot overflow f16). Call `backward` on
    /// the result.
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor> {
        Ok(loss.to_dtype(DType::F32)?.affine(self.scale, 0.0)?)
    }

    /// Checks the (scaled) gradients for inf/NaN; when all are finite,
    /// multiplies them by `1/S` and returns `true` (take the optimizer
    /// step). On an overflow the gradients are left as they are and the
    /// result is `false` (skip the step). Does not change the scale: call
    /// [`LossScaler::update`] with the outcome.
    pub fn unscale_and_check(&self, grads: &mut Grads) -> Result<bool> {
        if !grads.all_finite()? {
            return Ok(false);
        }
        grads.scale(1.0 / self.scale)?;
        Ok(true)
    }

    /// Adapts the scale after a step: halve it (`backoff_factor`) and count
    /// a skipped step when `found_inf`, otherwise count a clean step and
    /// double it (`growth_factor`) after `growth_interval` of them in a row.
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale *= self.cfg.backoff_factor;
            self.growth_tracker = 0;
            self.skipped_steps += 1;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker >= self.cfg.growth_interval {
                self.scale *= self.cfg.growth_factor;
                self.growth_tracker = 0;
            }
        }
    }

    /// One whole scaled step: [`unscale_and_check`](Self::unscale_and_check),
    /// `opt.step` when the gradients are finite, [`update`](Self::update).
    /// Returns whether the optimizer stepped.
    pub fn step(&mut self, grads: &mut Grads, opt: &mut AdamW) -> Result<bool> {
        let ok = self.unscale_and_check(grads)?;
        if ok {
            opt.step(grads)?;
        }
        self.update(!ok);
        Ok(ok)
    }
}

/// A precision and, for f16, its [`LossScaler`]: one code path for all
/// three precisions (the scaler is `None` for f32 and bf16, and then
/// [`scale_loss`](Self::scale_loss) and [`step`](Self::step) do no
/// scaling).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixedPrecision {
    /// The working copy's precision.
    pub precision: Precision,
    /// The loss scaler (f16 only).
    pub scaler: Option<LossScaler>,
}

impl MixedPrecision {
    /// `precision` with a default [`LossScaler`] when it needs one.
    pub fn new(precision: Precision) -> Self {
        Self {
            precision,
            scaler: precision.needs_loss_scaling().then(LossScaler::default),
        }
    }

    /// The step's [`working_builder`].
    pub fn working_builder(&self, master: &VarMap, device: &Device) -> Result<VarBuilder<'static>> {
        self.precision.working_builder(master, device)
    }

    /// The loss to call `backward` on: f32, scaled when there is a scaler.
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor> {
        match &self.scaler {
            Some(s) => s.scale_loss(loss),
            None => Ok(loss.to_dtype(DType::F32)?),
        }
    }

    /// Unscales and checks (with a scaler) and takes the optimizer step;
    /// returns whether it stepped (always `true` without a scaler).
    pub fn step(&mut self, grads: &mut Grads, opt: &mut AdamW) -> Result<bool> {
        match &mut self.scaler {
            Some(s) => s.step(grads, opt),
            None => {
                opt.step(grads)?;
                Ok(true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaler_rule_and_config_checks() {
        let mut s = LossScaler::new(LossScalerConfig {
            growth_interval: 3,
            ..LossScalerConfig::default()
        })
        .unwrap();
        assert_eq!(s.scale(), 65536.0);
        s.update(false);
        s.update(false);
        assert_eq!((s.scale, s.growth_tracker), (65536.0, 2));
        s.update(true);
        assert_eq!(
            (s.scale, s.growth_tracker, s.skipped_steps),
            (32768.0, 0, 1)
        );
        for _ in 0..3 {
            s.update(false);
        }
        assert_eq!((s.scale, s.growth_tracker), (65536.0, 0));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<LossScaler>(&json).unwrap(), s);

        for bad in [
            LossScalerConfig {
                init_scale: 0.0,
                ..Default::default()
            },
            LossScalerConfig {
                growth_factor: 1.0,
                ..Default::default()
            },
            LossScalerConfig {
                backoff_factor: 1.0,
                ..Default::default()
            },
            LossScalerConfig {
                growth_interval: 0,
                ..Default::default()
            },
        ] {
            assert!(matches!(LossScaler::new(bad), Err(Error::Config { .. })));
        }
        assert!(MixedPrecision::new(Precision::F16).scaler.is_some());
        assert!(MixedPrecision::new(Precision::Bf16).scaler.is_none());
        assert_eq!(Precision::default().dtype(), DType::F32);
    }
}
