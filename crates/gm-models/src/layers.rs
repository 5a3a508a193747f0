//! Building blocks every embedder uses, chosen so gradients reach every
//! parameter (see shared/NOTES.md: candle's `softmax_last_dim` and the
//! `LayerNorm` module's fast path drop gradients):
//! [`ForwardCtx`] (train/eval and a seeded dropout RNG), [`LayerNorm`]
//! (through `layer_norm_slow`), [`softmax`], [`softplus`], [`Embedding`].

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// Train/eval mode and the dropout random stream of one forward pass.
///
/// Dropout masks come from this context's own seeded RNG, so a pass can be
/// reproduced exactly (Monte-Carlo dropout, and gradient checkpointing's
/// recomputation, which must see the same masks).
#[derive(Debug, Clone)]
pub struct ForwardCtx {
    train: bool,
    rng: ChaCha8Rng,
}

impl ForwardCtx {
    /// Dropout off (inference, determinism tests).
    pub fn eval() -> Self {
        Self {
            train: false,
            rng: ChaCha8Rng::seed_from_u64(0),
        }
    }

    /// Dropout on, masks drawn from `seed`.
    pub fn train(seed: u64) -> Self {
        Self {
            train: true,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Whether dropout is active.
    pub fn is_train(&self) -> bool {
        self.train
    }

    /// Inverted dropout: zeroes each element with probability `p` and scales
    /// the rest by 1/(1−p); the identity when not training or `p == 0`.
    pub fn dropout(&mut self, x: &Tensor, p: f32) -> Result<Tensor> {
        if !self.train || p <= 0.0 {
            return Ok(x.clone());
        }
        if p >= 1.0 {
            return Err(Error::config("dropout", p, "a probability in [0, 1)"));
        }
        let n = x.elem_count();
        let keep = 1.0 / (1.0 - p);
        let mask: Vec<f32> = (0..n)
            .map(|_| {
                if self.rng.random::<f32>() < p {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok(x.mul(&mask)?)
    }
}

/// Layer normalisation over the last dimension with learned scale and
/// shift, computed with `candle_nn::ops::layer_norm_slow` (which
/// back-propagates to the input and both parameters).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    /// A layer norm over `dim` features, parameters `weight` (ones) and
    /// `bias` (zeros) under `vb`.
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            eps: 1e-5,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps)
    }
}

/// Softmax over `dim` that back-propagates (unlike `softmax_last_dim`).
pub fn softmax<Dm: candle_core::shape::Dim>(x: &Tensor, dim: Dm) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax(x, dim)?)
}

/// `log(1 + exp(x))`, computed as `max(x, 0) + log(1 + exp(−|x|))` so it
/// neither overflows nor loses precision.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let pos = x.relu()?;
    let neg_abs = x.abs()?.neg()?;
    Ok(pos.add(&neg_abs.exp()?.affine(1.0, 1.0)?.log()?)?)
}

/// An embedding with its uncertainty: `mu` and `sigma` (softplus, > 0),
/// both `[batch, dim]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// The mean embedding.
    pub mu: Tensor,
    /// The uncertainty embedding (softplus of a head's output).
    pub sigma: Tensor,
}

/// The mean and variance of `mu` over Monte-Carlo dropout passes.
#[derive(Debug, Clone)]
pub struct McEmbedding {
    /// Mean of `mu` over the passes, `[batch, dim]`.
    pub mean: Tensor,
    /// Variance of `mu` over the passes (population), `[batch, dim]`.
    pub variance: Tensor,
    /// Passes run.
    pub passes: usize,
}

/// An embedder: a network from an input window or vector to an
/// [`Embedding`].
pub trait Embedder {
    /// One forward pass.
    fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Embedding>;

    /// `passes` stochastic passes with dropout on (masks from `seed`):
    /// mean and variance of `mu`.
    fn mc_dropout(&self, x: &Tensor, passes: usize, seed: u64) -> Result<McEmbedding> {
        if passes == 0 {
            return Err(Error::config("passes", 0, "at least 1"));
        }
        let mut ctx = ForwardCtx::train(seed);
        let mut mus = Vec::with_capacity(passes);
        for _ in 0..passes {
            mus.push(self.forward(x, &mut ctx)?.mu);
        }
        let stacked = Tensor::stack(&mus, 0)?;
        let mean = stacked.mean(0)?;
        let variance = stacked.broadcast_sub(&mean)?.sqr()?.mean(0)?;
        Ok(McEmbedding {
            mean,
            variance,
            passes,
        })
    }
}

/// Checks that `x` has `dims.len()` dimensions, and each `Some(d)` matches.
pub fn check_shape(what: &'static str, x: &Tensor, dims: &[Option<usize>]) -> Result<()> {
    let got = x.dims();
    let ok =
        got.len() == dims.len() && got.iter().zip(dims).all(|(g, d)| d.is_none_or(|d| *g == d));
    if ok {
        Ok(())
    } else {
        let expected = format!(
            "[{}]",
            dims.iter()
                .map(|d| d.map_or("B".to_string(), |d| d.to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Err(Error::Shape {
            what,
            expected,
            got: got.to_vec(),
        })
    }
}

/// The device and dtype a model was built with, for its inputs.
pub fn input_like(x: &Tensor, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(x.to_device(device)?.to_dtype(dtype)?)
}

/// Mean over dimension `d` keeping the rest (a helper for pooling).
pub fn mean_over(x: &Tensor, d: usize) -> Result<Tensor> {
    Ok(x.mean(d)?)
}

/// Softmax attention pooling over time: scores `[B, T, 1]` → weights over
/// `T` → weighted sum of `x: [B, T, H]` → `[B, H]`.
pub fn attention_pool(x: &Tensor, scores: &Tensor) -> Result<Tensor> {
    let w = softmax(scores, 1)?; // [B, T, 1]
    Ok(x.broadcast_mul(&w)?.sum(1)?)
}

/// For tests: checks that every variable of `varmap` received a gradient
/// with a non-zero entry from `loss.backward()`; returns the names of those
/// that did not.
pub fn vars_without_gradient(varmap: &candle_nn::VarMap, loss: &Tensor) -> Result<Vec<String>> {
    let grads = loss.backward()?;
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::config("varmap", "poisoned", "an unpoisoned lock"))?;
    let mut missing = Vec::new();
    for (name, var) in data.iter() {
        let ok = match grads.get(var.as_tensor()) {
            Some(g) => {
                g.abs()?
                    .to_dtype(DType::F32)?
                    .sum_all()?
                    .to_scalar::<f32>()?
                    > 0.0
            }
            None => false,
        };
        if !ok {
            missing.push(name.clone());
        }
    }
    missing.sort();
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::D;
    use candle_nn::{VarBuilder, VarMap};

    #[test]
    fn layer_norm_and_softmax_pass_gradients_and_softplus_is_stable() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let ln = LayerNorm::new(4, vb.pp("ln")).unwrap();
        let w = vb
            .get_with_hints(
                (4, 4),
                "w",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )
            .unwrap();
        let x = Tensor::arange(0f32, 8.0, &dev)
            .unwrap()
            .reshape((2, 4))
            .unwrap();
        let y = softmax(&ln.forward(&x.matmul(&w).unwrap()).unwrap(), D::Minus1).unwrap();
        let target = Tensor::new(&[[1f32, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], &dev).unwrap();
        let loss = y.sub(&target).unwrap().sqr().unwrap().sum_all().unwrap();
        assert_eq!(
            vars_without_gradient(&vm, &loss).unwrap(),
            Vec::<String>::new()
        );
        let s = softplus(&Tensor::new(&[-1000f32, 0.0, 1000.0], &dev).unwrap())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(s[0], 0.0);
        assert!((s[1] - std::f32::consts::LN_2).abs() < 1e-6);
        assert_eq!(s[2], 1000.0);
    }

    #[test]
    fn dropout_is_seeded_and_off_in_eval() {
        let dev = Device::Cpu;
        let x = Tensor::ones((4, 64), DType::F32, &dev).unwrap();
        let a = ForwardCtx::train(3)
            .dropout(&x, 0.5)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let b = ForwardCtx::train(3)
            .dropout(&x, 0.5)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(a, b);
        let zeros = a.iter().flatten().filter(|v| **v == 0.0).count();
        assert!(zeros > 64 && zeros < 192, "{zeros}");
        assert!(a.iter().flatten().all(|v| *v == 0.0 || *v == 2.0));
        let e = ForwardCtx::eval()
            .dropout(&x, 0.5)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(e.iter().flatten().all(|v| *v == 1.0));
        assert!(ForwardCtx::train(1).dropout(&x, 1.0).is_err());
    }

    #[test]
    fn shapes_are_checked_with_a_clear_message() {
        let x = Tensor::zeros((3, 48, 7), DType::F32, &Device::Cpu).unwrap();
        check_shape("structure input", &x, &[None, Some(48), Some(7)]).unwrap();
        let e = check_shape("structure input", &x, &[None, Some(48), Some(8)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "structure input: expected shape [B, 48, 8], got [3, 48, 7]"
        );
    }
}
