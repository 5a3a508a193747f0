//! [`AdamW`] over [`Grads`], with its state exposed for checkpoints.

use candle_core::{DType, Tensor};

use crate::grads::Grads;
use crate::{Error, Result};

/// AdamW hyper-parameters (decoupled weight decay, Loshchilov & Hutter).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate (default 1e-3).
    pub lr: f64,
    /// First-moment decay (default 0.9).
    pub beta1: f64,
    /// Second-moment decay (default 0.999).
    pub beta2: f64,
    /// Denominator epsilon (default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay (default 0.01).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    /// Checks ranges; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::config("lr", self.lr, "a finite value > 0"));
        }
        for (k, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::config(k, v, "[0, 1)"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::config("eps", self.eps, "a finite value > 0"));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::config(
                "weight_decay",
                self.weight_decay,
                "a finite value >= 0",
            ));
        }
        Ok(())
    }
}

/// AdamW with f32 moment estimates per variable (in [`Grads`] order). The
/// state (`step`, `m`, `v`) is public so checkpoints can save and restore
/// it exactly.
#[derive(Debug, Clone)]
pub struct AdamW {
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// Steps taken.
    pub step: u64,
    /// First moments (None until a variable first gets a gradient).
    pub m: Vec<Option<Tensor>>,
    /// Second moments.
    pub v: Vec<Option<Tensor>>,
}

impl AdamW {
    /// An optimizer for `n_vars` variables.
    pub fn new(cfg: AdamWConfig, n_vars: usize) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            step: 0,
            m: vec![None; n_vars],
            v: vec![None; n_vars],
        })
    }

    /// Applies one update with `grads`; variables without a gradient are
    /// left alone (no decay either).
    pub fn step(&mut self, grads: &Grads) -> Result<()> {
        if grads.len() != self.m.len() {
            return Err(Error::config(
                "grads",
                grads.len(),
                format!("gradients for {} variables", self.m.len()),
            ));
        }
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, (_, var, g)) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let g = g.to_dtype(DType::F32)?;
            let m = match &self.m[i] {
                Some(m) => m
                    .affine(c.beta1, 0.0)?
                    .add(&g.affine(1.0 - c.beta1, 0.0)?)?,
                None => g.affine(1.0 - c.beta1, 0.0)?,
            };
            let v = match &self.v[i] {
                Some(v) => v
                    .affine(c.beta2, 0.0)?
                    .add(&g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?,
                None => g.sqr()?.affine(1.0 - c.beta2, 0.0)?,
            };
            let m_hat = m.affine(1.0 / bc1, 0.0)?;
            let v_hat = v.affine(1.0 / bc2, 0.0)?;
            let update = m_hat.div(&v_hat.sqrt()?.affine(1.0, c.eps)?)?;
            let w = var.as_tensor().to_dtype(DType::F32)?;
            let new = w
                .affine(1.0 - c.lr * c.weight_decay, 0.0)?
                .sub(&update.affine(c.lr, 0.0)?)?;
            var.set(&new.to_dtype(var.dtype())?)?;
            self.m[i] = Some(m);
            self.v[i] = Some(v);
        }
        Ok(())
    }

    /// Bytes of optimizer state held (the moments, f32).
    pub fn state_bytes(&self) -> usize {
        self.m
            .iter()
            .chain(&self.v)
            .flatten()
            .map(|t| t.elem_count() * 4)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::{Init, VarBuilder, VarMap};

    #[test]
    fn minimises_a_quadratic_and_matches_the_formula_on_step_one() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let x = vb.get_with_hints(1, "x", Init::Const(3.0)).unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(cfg, 1).unwrap();
        // step 1: the update is lr * sign(g) (m_hat/sqrt(v_hat) = g/|g|)
        let loss = x.sqr().unwrap().sum_all().unwrap();
        let g = Grads::from_store(&vm, &loss.backward().unwrap()).unwrap();
        opt.step(&g).unwrap();
        let v = x.to_vec1::<f32>().unwrap()[0];
        assert!((v - 2.9).abs() < 1e-5, "{v}");
        for _ in 0..300 {
            let loss = x.sqr().unwrap().sum_all().unwrap();
            let g = Grads::from_store(&vm, &loss.backward().unwrap()).unwrap();
            opt.step(&g).unwrap();
        }
        assert!(x.to_vec1::<f32>().unwrap()[0].abs() < 0.05);
        assert_eq!(opt.step, 301);
        assert_eq!(opt.state_bytes(), 8);
        assert!(AdamW::new(AdamWConfig { lr: 0.0, ..cfg }, 1).is_err());
    }
}
