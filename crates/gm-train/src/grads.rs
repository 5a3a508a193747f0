//! [`Grads`]: the gradients of a model's variables by name — what the
//! memory techniques (checkpointing, accumulation, loss scaling,
//! sparsification) produce and transform, and what the optimizer consumes.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;

use crate::{Error, Result};

/// Gradients of the variables of a [`VarMap`], in sorted-name order (so two
/// `Grads` of the same map line up). A variable without a gradient holds
/// `None` (zero).
#[derive(Debug, Clone)]
pub struct Grads {
    names: Vec<String>,
    vars: Vec<Var>,
    grads: Vec<Option<Tensor>>,
}

impl Grads {
    /// No gradient yet for any variable of `varmap`.
    pub fn empty(varmap: &VarMap) -> Result<Self> {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| Error::config("varmap", "poisoned", "an unpoisoned lock"))?;
        let mut pairs: Vec<(String, Var)> =
            data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let n = pairs.len();
        let (names, vars) = pairs.into_iter().unzip();
        Ok(Self {
            names,
            vars,
            grads: vec![None; n],
        })
    }

    /// The gradients `store` holds for the variables of `varmap`.
    pub fn from_store(varmap: &VarMap, store: &GradStore) -> Result<Self> {
        let mut g = Self::empty(varmap)?;
        g.add_store(store, 1.0)?;
        Ok(g)
    }

    /// Adds `scale ×` the gradients in `store` (variables it lacks add 0).
    pub fn add_store(&mut self, store: &GradStore, scale: f64) -> Result<()> {
        for (i, var) in self.vars.iter().enumerate() {
            if let Some(g) = store.get(var.as_tensor()) {
                let g = g.to_dtype(DType::F32)?;
                let g = if scale == 1.0 {
                    g
                } else {
                    g.affine(scale, 0.0)?
                };
                self.grads[i] = Some(match self.grads[i].take() {
                    Some(acc) => acc.add(&g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// Adds `other` (gradients of the same variables).
    pub fn add(&mut self, other: &Grads) -> Result<()> {
        if self.names != other.names {
            return Err(Error::config(
                "grads",
                "different variables",
                "gradients of the same VarMap",
            ));
        }
        for (a, b) in self.grads.iter_mut().zip(&other.grads) {
            if let Some(b) = b {
                *a = Some(match a.take() {
                    Some(x) => x.add(b)?,
                    None => b.clone(),
                });
            }
        }
        Ok(())
    }

    /// Multiplies every gradient by `f`.
    pub fn scale(&mut self, f: f64) -> Result<()> {
        for g in self.grads.iter_mut().flatten() {
            *g = g.affine(f, 0.0)?;
        }
        Ok(())
    }

    /// The L2 norm over all gradients.
    pub fn global_norm(&self) -> Result<f64> {
        let mut sum = 0f64;
        for g in self.grads.iter().flatten() {
            sum += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        Ok(sum.sqrt())
    }

    /// Scales all gradients so their global norm is at most `max_norm`;
    /// returns the norm before clipping.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.global_norm()?;
        if norm.is_finite() && norm > max_norm && norm > 0.0 {
            self.scale(max_norm / norm)?;
        }
        Ok(norm)
    }

    /// Whether every gradient value is finite (no inf/NaN: the mixed
    /// precision overflow check).
    pub fn all_finite(&self) -> Result<bool> {
        for g in self.grads.iter().flatten() {
            let s = g.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !s.is_finite() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// (name, variable, gradient) in sorted-name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var, Option<&Tensor>)> {
        self.names
            .iter()
            .zip(&self.vars)
            .zip(&self.grads)
            .map(|((n, v), g)| (n.as_str(), v, g.as_ref()))
    }

    /// Mutable access to the gradient slots, in the same order as [`iter`](Self::iter).
    pub fn grads_mut(&mut self) -> &mut [Option<Tensor>] {
        &mut self.grads
    }

    /// Variables covered.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// True when the map had no variables.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// Elements over all gradients present.
    pub fn elem_count(&self) -> usize {
        self.grads.iter().flatten().map(|g| g.elem_count()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::{Init, VarBuilder};

    #[test]
    fn collects_adds_scales_and_clips() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let a = vb.get_with_hints(2, "a", Init::Const(1.0)).unwrap();
        let b = vb.get_with_hints(2, "b", Init::Const(2.0)).unwrap();
        let loss = a
            .sum_all()
            .unwrap()
            .add(&b.sqr().unwrap().sum_all().unwrap())
            .unwrap();
        let store = loss.backward().unwrap();
        let mut g = Grads::from_store(&vm, &store).unwrap();
        let names: Vec<&str> = g.iter().map(|(n, _, _)| n).collect();
        assert_eq!(names, ["a", "b"]);
        // d/da = 1, d/db = 2b = 4
        assert!((g.global_norm().unwrap() - (2.0f64 + 32.0).sqrt()).abs() < 1e-9);
        let g2 = g.clone();
        g.add(&g2).unwrap();
        g.scale(0.5).unwrap();
        assert!((g.global_norm().unwrap() - (34.0f64).sqrt()).abs() < 1e-6);
        let before = g.clip_global_norm(1.0).unwrap();
        assert!((before - 34f64.sqrt()).abs() < 1e-6);
        assert!((g.global_norm().unwrap() - 1.0).abs() < 1e-6);
        assert!(g.all_finite().unwrap());
        assert_eq!(g.elem_count(), 4);
    }
}
