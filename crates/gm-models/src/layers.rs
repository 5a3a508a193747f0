//! Building blocks every embedder uses, chosen so gradients reach every
//! parameter (see shared/NOTES.md: candle's `softmax_last_dim` and the
//! `LayerNorm` module's fast path drop gradients):
//! [`ForwardCtx`] (train/eval and a seeded dropout RNG), [`LayerNorm`]
//! (through `layer_norm_slow`), [`softmax`], [`softplus`], [`Embedding`].

use std::borrow::Cow;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::quant::{self, tensor_bytes, QuantPolicy, QuantScheme, QuantWeight};
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

    /// An inference copy: the scale and shift copied into new storage,
    /// detached from the variables, so the copy neither follows later
    /// training of the source nor records an autograd graph.
    pub fn frozen(&self) -> Result<Self> {
        Ok(Self {
            weight: self.weight.detach().copy()?,
            bias: self.bias.detach().copy()?,
            eps: self.eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps)
    }
}

/// A fully connected layer `y = x Wᵀ + b`. Every model builds its dense
/// layers through this type so that inference quantization can swap the
/// implementation in one place: [`Linear::quantized`] returns an
/// inference-only copy whose weight is stored as int8 (see
/// [`crate::quant`] for the formats and the per-layer rule).
#[derive(Debug, Clone)]
pub struct Linear {
    kind: LinearKind,
    in_dim: usize,
    out_dim: usize,
}

/// A trainable f32 layer, or a quantized, inference-only one.
#[derive(Debug, Clone)]
enum LinearKind {
    Dense(candle_nn::Linear),
    Quantized {
        weight: QuantWeight,
        bias: Option<Tensor>,
        /// The source weight's dtype and device.
        dtype: DType,
        device: Device,
    },
}

impl Linear {
    /// `in_dim → out_dim` with bias, parameters `weight` `[out, in]` and
    /// `bias` `[out]` under `vb` (candle's default initialisation).
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            kind: LinearKind::Dense(candle_nn::linear(in_dim, out_dim, vb)?),
            in_dim,
            out_dim,
        })
    }

    /// The same without a bias.
    pub fn no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            kind: LinearKind::Dense(candle_nn::linear_no_bias(in_dim, out_dim, vb)?),
            in_dim,
            out_dim,
        })
    }

    /// Input features.
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// The weight `[out, in]`: the layer's own tensor when it is not
    /// quantized, a freshly dequantized copy otherwise.
    ///
    /// # Panics
    ///
    /// When dequantizing fails, which cannot happen on the CPU; use
    /// [`Linear::dequantized_weight`] for the fallible form.
    pub fn weight(&self) -> Cow<'_, Tensor> {
        match &self.kind {
            LinearKind::Dense(l) => Cow::Borrowed(l.weight()),
            LinearKind::Quantized { .. } => Cow::Owned(
                self.dequantized_weight()
                    .expect("dequantizing a quantized weight"),
            ),
        }
    }

    /// The weight `[out, in]` as a float tensor (dequantized, in the
    /// original weight's dtype and device, when the layer is quantized).
    pub fn dequantized_weight(&self) -> Result<Tensor> {
        match &self.kind {
            LinearKind::Dense(l) => Ok(l.weight().clone()),
            LinearKind::Quantized {
                weight,
                dtype,
                device,
                ..
            } => weight.dequantize(*dtype, device),
        }
    }

    /// The bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        match &self.kind {
            LinearKind::Dense(l) => l.bias(),
            LinearKind::Quantized { bias, .. } => bias.as_ref(),
        }
    }

    /// Whether this is a quantized, inference-only copy (no gradient flows
    /// through it; see [`crate::quant`]).
    pub fn is_quantized(&self) -> bool {
        matches!(self.kind, LinearKind::Quantized { .. })
    }

    /// How the weight is stored once quantized; `None` for a trainable
    /// layer.
    pub fn scheme(&self) -> Option<QuantScheme> {
        match &self.kind {
            LinearKind::Dense(_) => None,
            LinearKind::Quantized { weight, .. } => Some(weight.scheme()),
        }
    }

    /// Bytes of parameter storage: the weight as actually stored (f32:
    /// 4 B per element, Q8_0: 34 B per 32 weights, per-channel int8: 1 B
    /// per weight + 4 B per row) plus the bias (its dtype's size per
    /// element).
    pub fn parameter_bytes(&self) -> usize {
        let bias = self.bias().map_or(0, tensor_bytes);
        match &self.kind {
            LinearKind::Dense(l) => tensor_bytes(l.weight()) + bias,
            LinearKind::Quantized { weight, .. } => weight.storage_bytes() + bias,
        }
    }

    /// An inference-only copy with the weight quantized by
    /// [`QuantPolicy::Auto`]; the bias is copied (detached) in its dtype.
    /// Fails on a layer that is already quantized.
    pub fn quantized(&self) -> Result<Linear> {
        self.quantized_with(QuantPolicy::Auto)
    }

    /// As [`Linear::quantized`], the scheme chosen by `policy`.
    pub fn quantized_with(&self, policy: QuantPolicy) -> Result<Linear> {
        self.quantized_as(policy.scheme_for(self.in_dim, self.out_dim))
    }

    /// As [`Linear::quantized`] with a given scheme; an error when it does
    /// not apply ([`QuantScheme::Q8_0`] needs `in_dim % 32 == 0`).
    pub fn quantized_as(&self, scheme: QuantScheme) -> Result<Linear> {
        let LinearKind::Dense(l) = &self.kind else {
            return Err(Error::config(
                "linear layer",
                "already quantized",
                "a trainable (f32) layer to quantize",
            ));
        };
        Ok(Linear {
            kind: LinearKind::Quantized {
                weight: QuantWeight::new(l.weight(), scheme)?,
                bias: l.bias().map(quant::frozen).transpose()?,
                dtype: l.weight().dtype(),
                device: l.weight().device().clone(),
            },
            in_dim: self.in_dim,
            out_dim: self.out_dim,
        })
    }

    /// For a layer applied many times in a row (an LSTM's recurrent
    /// weight): a per-channel int8 layer dequantized once into a frozen
    /// f32 layer for the duration, anything else as it is.
    fn for_repeated_use(&self, dtype: DType, device: &Device) -> Result<Cow<'_, Linear>> {
        match &self.kind {
            LinearKind::Quantized {
                weight: weight @ QuantWeight::Int8(_),
                bias,
                ..
            } => Ok(Cow::Owned(Linear {
                kind: LinearKind::Quantized {
                    weight: QuantWeight::F32(weight.dequantize(dtype, device)?),
                    bias: bias.clone(),
                    dtype,
                    device: device.clone(),
                },
                in_dim: self.in_dim,
                out_dim: self.out_dim,
            })),
            _ => Ok(Cow::Borrowed(self)),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.kind {
            LinearKind::Dense(l) => l.forward(x),
            LinearKind::Quantized { weight, bias, .. } => {
                weight.forward(x, bias.as_ref()).map_err(|e| match e {
                    Error::Candle(e) => e,
                    other => candle_core::Error::Msg(other.to_string()),
                })
            }
        }
    }
}

/// One LSTM layer over `[B, T, in]` built from two [`Linear`]s (so it
/// back-propagates through candle's ops and quantizes like every other
/// dense layer): gates = `W_ih x_t + W_hh h_{t−1}` split into input,
/// forget, cell and output; `c_t = σ(f)·c_{t−1} + σ(i)·tanh(g)`,
/// `h_t = σ(o)·tanh(c_t)`; zero initial state.
#[derive(Debug, Clone)]
pub struct Lstm {
    ih: Linear,
    hh: Linear,
    hidden: usize,
}

impl Lstm {
    /// An LSTM from `in_dim` to `hidden` features.
    pub fn new(in_dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            ih: Linear::new(in_dim, 4 * hidden, vb.pp("ih"))?,
            hh: Linear::no_bias(hidden, 4 * hidden, vb.pp("hh"))?,
            hidden,
        })
    }

    /// Hidden size.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// An inference-only copy with both weights quantized by `policy`
    /// (see [`Linear::quantized_with`]).
    pub fn quantized_with(&self, policy: QuantPolicy) -> Result<Lstm> {
        Ok(Lstm {
            ih: self.ih.quantized_with(policy)?,
            hh: self.hh.quantized_with(policy)?,
            hidden: self.hidden,
        })
    }

    /// [`Lstm::quantized_with`] the default [`QuantPolicy::Auto`].
    pub fn quantized(&self) -> Result<Lstm> {
        self.quantized_with(QuantPolicy::Auto)
    }

    /// Whether the weights are quantized (inference only).
    pub fn is_quantized(&self) -> bool {
        self.ih.is_quantized()
    }

    /// Bytes of parameter storage of both weights and the bias.
    pub fn parameter_bytes(&self) -> usize {
        self.ih.parameter_bytes() + self.hh.parameter_bytes()
    }

    /// Runs over `x: [B, T, in]` (reversed in time when `reverse`); returns
    /// every hidden state `[B, T, hidden]` in the input's time order.
    ///
    /// A per-channel int8 recurrent weight is dequantized once per call
    /// (not once per step); the copy is freed when the call returns.
    pub fn seq(&self, x: &Tensor, reverse: bool) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let xw = self.ih.forward(x)?; // [B, T, 4H], all steps at once
        let hh = self.hh.for_repeated_use(x.dtype(), x.device())?;
        let mut h = Tensor::zeros((b, self.hidden), x.dtype(), x.device())?;
        let mut c = h.clone();
        let mut out = vec![None; t];
        let order: Box<dyn Iterator<Item = usize>> = if reverse {
            Box::new((0..t).rev())
        } else {
            Box::new(0..t)
        };
        for step in order {
            let gates = xw.narrow(1, step, 1)?.squeeze(1)?.add(&hh.forward(&h)?)?;
            let chunks = gates.chunk(4, 1)?;
            let (i, f, g, o) = (&chunks[0], &chunks[1], &chunks[2], &chunks[3]);
            let i = candle_nn::ops::sigmoid(i)?;
            let f = candle_nn::ops::sigmoid(f)?;
            let o = candle_nn::ops::sigmoid(o)?;
            c = f.mul(&c)?.add(&i.mul(&g.tanh()?)?)?;
            h = o.mul(&c.tanh()?)?;
            out[step] = Some(h.clone());
        }
        let states: Vec<Tensor> = out
            .into_iter()
            .map(|s| s.expect("every step ran"))
            .collect();
        Ok(Tensor::stack(&states, 1)?)
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

/// For tests: the variables of `varmap` that `loss.backward()` leaves
/// without a real gradient — none at all, or one whose largest entry is
/// below 1e-6 of the largest gradient entry of any variable. The relative
/// bar matters: a bias that a softmax cancels (a key-projection bias, a
/// pooling-score bias) still gets ~1e-8 of floating-point noise, which a
/// plain "non-zero" check would accept.
pub fn vars_without_gradient(varmap: &candle_nn::VarMap, loss: &Tensor) -> Result<Vec<String>> {
    let grads = loss.backward()?;
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::config("varmap", "poisoned", "an unpoisoned lock"))?;
    let mut largest = Vec::with_capacity(data.len());
    for (name, var) in data.iter() {
        let m = match grads.get(var.as_tensor()) {
            Some(g) => g
                .abs()?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?,
            None => 0.0,
        };
        largest.push((name.clone(), m));
    }
    let top = largest.iter().map(|(_, m)| *m).fold(0f32, f32::max);
    let mut missing: Vec<String> = largest
        .into_iter()
        .filter(|(_, m)| !(m.is_finite() && *m > top * 1e-6 && *m > 0.0))
        .map(|(n, _)| n)
        .collect();
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
    fn lstm_runs_both_directions_and_every_parameter_learns() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let lstm = Lstm::new(3, 5, vb.pp("lstm")).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 7, 3), &dev).unwrap();
        let f = lstm.seq(&x, false).unwrap();
        let r = lstm.seq(&x, true).unwrap();
        assert_eq!(f.dims(), &[2, 7, 5]);
        assert_eq!(r.dims(), &[2, 7, 5]);
        // The first forward state sees only x_0 (equal up to matmul rounding).
        let x0 = x.narrow(1, 0, 1).unwrap();
        let alone = lstm
            .seq(&x0, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let first = f
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            alone.iter().zip(&first).all(|(a, b)| (a - b).abs() < 1e-6),
            "{alone:?} vs {first:?}"
        );
        let loss = f
            .sum_all()
            .unwrap()
            .add(&r.sqr().unwrap().sum_all().unwrap())
            .unwrap();
        assert_eq!(
            vars_without_gradient(&vm, &loss).unwrap(),
            Vec::<String>::new()
        );
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
