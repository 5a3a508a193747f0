//! Int8 weight quantization for inference: the storage formats a
//! [`Linear`](crate::Linear) can hold after
//! [`Linear::quantized`](crate::Linear::quantized), the rule that picks one
//! per layer ([`QuantPolicy`]), and parameter-byte accounting.
//!
//! # Formats ([`QuantScheme`])
//!
//! | scheme | storage of a `[out, in]` weight | forward |
//! |---|---|---|
//! | [`Q8_0`](QuantScheme::Q8_0) | candle's GGML Q8_0: blocks of 32 weights along `in`, each an f16 scale + 32 `i8` = **34 B per 32 weights** (1.0625 B/weight); needs `in % 32 == 0` | [`QMatMul`]: the activations are quantized to Q8_0 too and the dot products run in int8 |
//! | [`PerChannelInt8`](QuantScheme::PerChannelInt8) | one `i8` per weight and one f32 scale per output row (`scale = max|w_row| / 127`, `q = round(w / scale)`): **`in + 4` B per row** | the weight is dequantized to the activation dtype for the call (a transient `out · in` copy, freed at once), then an ordinary matmul: activations stay f32 |
//! | [`F32`](QuantScheme::F32) | the weight as it was (a detached copy) | ordinary matmul |
//!
//! Biases, layer norms and every non-matmul parameter (positional and
//! embedding tables) stay in the model's float dtype.
//!
//! # The per-layer rule ([`QuantPolicy::Auto`])
//!
//! 1. `in_dim ≤ 1`: **F32** (an `i8` plus a 4-byte row scale is not
//!    smaller than one f32 per row).
//! 2. Otherwise **per-channel int8**, whether or not Q8_0 applies.
//!
//! Chosen by measuring both formats on every layer shape of the five
//! models where both apply (`in % 32 == 0`; `examples/model_memory.rs`
//! prints the comparison, `cargo xtask bench models` tabulates it):
//!
//! - **bytes**: per-channel is smaller for every `in ≥ 128` (`1 + 4/in`
//!   vs 1.0625 B/weight: 17 408 vs 17 920 B for 128→128), equal at
//!   `in = 64`, 5 % larger only at `in = 32` (three small regime layers);
//! - **error**: per-channel's layer-output error is ~30 % lower on every
//!   shape (RMS 3.8–4.0e-3 of the output's RMS vs 5.2–5.7e-3), because
//!   Q8_0 also rounds the *activations* to 8 bits per block of 32 while
//!   per-channel keeps them f32; per model, Q8_0-where-possible gives
//!   1.3–1.7× the output error of the default (e.g. structure 0.88 % vs
//!   0.51 % of the output range);
//! - **resident memory**: on CPUs with AVX-512 VNNI / AVX-VNNI (these
//!   machines), candle repacks a Q8_0 weight with `in % 256 == 0` for its
//!   int8 kernels on the first call and keeps the packed copy beside the
//!   original: such a layer holds **twice** its Q8_0 bytes from then on
//!   (ff2 512→128: +69 632 B kept; tactical fusion 768→256: +208 896 B).
//!   Per-channel keeps nothing (its dequantized weight is transient);
//! - **speed**: Q8_0 is faster only on that repacked path; on the common
//!   `in = 128` shapes at 1 536–1 920 rows its generic kernel is 2–5×
//!   slower than f32 gemm on the dequantized weight (per-channel costs
//!   about what f32 does).
//!
//! So Q8_0 stays available ([`QuantPolicy::PreferQ8_0`],
//! [`Linear::quantized_as`](crate::Linear::quantized_as)) but the default
//! never picks it. On the default models the rule gives 0.26× (structure,
//! tactical), 0.27× (heads), 0.31× (regime) and 0.45× (LVN) of the f32
//! parameter bytes.
//!
//! # Inference only
//!
//! A quantized layer has no trainable parameter: [`QMatMul`] has no
//! backward, and the per-channel and F32 forms hold constants. Its output
//! is **detached** from the autograd graph, so no gradient flows through a
//! quantized layer whatever the scheme, and the graph never keeps a
//! transient dequantized weight alive. A quantized model therefore cannot
//! be trained (no variable gets a gradient through it);
//! [`is_quantized`](crate::Linear::is_quantized) lets a trainer refuse one,
//! and quantizing an already quantized layer or model is an error.
//!
//! A quantized model is a snapshot of its source: dense weights, biases,
//! tables and layer norms ([`LayerNorm::frozen`](crate::LayerNorm::frozen))
//! are copied into new, detached storage, so training the source afterwards
//! does not move the copy, and the copy's forward records no autograd graph
//! whether it was quantized from a training model (parameters in a
//! `VarMap`) or from plain tensors (`examples/model_memory.rs` measures
//! both).

use std::fmt;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::{Error, Result};

/// Weights per Q8_0 block (the inner dimension must be a multiple of it).
pub const Q8_0_BLOCK: usize = 32;
/// Bytes of one Q8_0 block: an f16 scale and 32 `i8`.
pub const Q8_0_BLOCK_BYTES: usize = 34;

/// How a [`Linear`](crate::Linear)'s weight is stored once quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantScheme {
    /// Kept in f32 (a frozen copy): layers too small to gain from int8.
    F32,
    /// candle's GGML Q8_0 (blocks of 32 along the input dimension).
    Q8_0,
    /// `i8` weights with one f32 scale per output row.
    PerChannelInt8,
}

impl QuantScheme {
    /// Whether a `[out, in]` weight can be stored this way.
    pub fn applies(self, in_dim: usize) -> bool {
        match self {
            QuantScheme::F32 => true,
            QuantScheme::Q8_0 => in_dim > 0 && in_dim.is_multiple_of(Q8_0_BLOCK),
            QuantScheme::PerChannelInt8 => in_dim > 0,
        }
    }

    /// Bytes a `[out, in]` weight takes in this scheme (bias excluded), or
    /// `None` where it does not apply.
    pub fn weight_bytes(self, in_dim: usize, out_dim: usize) -> Option<usize> {
        if !self.applies(in_dim) {
            return None;
        }
        Some(match self {
            QuantScheme::F32 => 4 * in_dim * out_dim,
            QuantScheme::Q8_0 => out_dim * (in_dim / Q8_0_BLOCK) * Q8_0_BLOCK_BYTES,
            QuantScheme::PerChannelInt8 => out_dim * (in_dim + 4),
        })
    }

    /// A short name (`f32`, `q8_0`, `int8_per_channel`).
    pub fn name(self) -> &'static str {
        match self {
            QuantScheme::F32 => "f32",
            QuantScheme::Q8_0 => "q8_0",
            QuantScheme::PerChannelInt8 => "int8_per_channel",
        }
    }
}

impl fmt::Display for QuantScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which [`QuantScheme`] each layer of a model gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum QuantPolicy {
    /// The documented rule (see the module docs): per-channel int8 for
    /// every layer with `in_dim ≥ 2`, f32 below.
    #[default]
    Auto,
    /// Q8_0 where `in_dim % 32 == 0`, per-channel int8 elsewhere (f32 for
    /// `in_dim ≤ 1`): the alternative the rule was measured against.
    PreferQ8_0,
    /// Per-channel int8 for every layer with `in_dim ≥ 2` (today the same
    /// as [`QuantPolicy::Auto`]; kept so the comparison stays explicit if
    /// the rule changes).
    PerChannel,
}

impl QuantPolicy {
    /// The scheme a `[out, in]` layer gets under this policy.
    pub fn scheme_for(self, in_dim: usize, _out_dim: usize) -> QuantScheme {
        if in_dim <= 1 {
            return QuantScheme::F32;
        }
        match self {
            QuantPolicy::PreferQ8_0 if QuantScheme::Q8_0.applies(in_dim) => QuantScheme::Q8_0,
            QuantPolicy::Auto | QuantPolicy::PreferQ8_0 | QuantPolicy::PerChannel => {
                QuantScheme::PerChannelInt8
            }
        }
    }
}

/// A `[out, in]` weight as `i8` with one f32 scale per output row:
/// `w[r, c] ≈ q[r, c] · scale[r]`, `scale[r] = max_c |w[r, c]| / 127`,
/// `q = round(w / scale)` in `[-127, 127]` (an all-zero row has scale 0).
/// Host memory; cheap to clone (shared).
#[derive(Clone)]
pub struct Int8Rows {
    q: Arc<[i8]>,
    scales: Arc<[f32]>,
    out_dim: usize,
    in_dim: usize,
}

impl fmt::Debug for Int8Rows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Int8Rows[{}, {}; {} B]",
            self.out_dim,
            self.in_dim,
            self.storage_bytes()
        )
    }
}

impl Int8Rows {
    /// Quantizes a rank-2 float weight `[out, in]` (any float dtype, any
    /// device; read back to the host).
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let (out_dim, in_dim) = w.dims2()?;
        let values = w
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut q = Vec::with_capacity(values.len());
        let mut scales = Vec::with_capacity(out_dim);
        for row in values.chunks_exact(in_dim.max(1)).take(out_dim) {
            if let Some(bad) = row.iter().find(|v| !v.is_finite()) {
                return Err(Error::config(
                    "quantized weight",
                    bad,
                    "finite values (the layer holds NaN or infinity)",
                ));
            }
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = max / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            scales.push(scale);
            q.extend(
                row.iter()
                    .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8),
            );
        }
        Ok(Self {
            q: q.into(),
            scales: scales.into(),
            out_dim,
            in_dim,
        })
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out_dim, self.in_dim)
    }

    /// The `i8` values, row-major `[out, in]`.
    pub fn values(&self) -> &[i8] {
        &self.q
    }

    /// One scale per output row.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Bytes held: one per weight plus four per row.
    pub fn storage_bytes(&self) -> usize {
        self.q.len() + 4 * self.scales.len()
    }

    /// The weight `[out, in]` back in `dtype` on `device`.
    pub fn dequantize(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let mut w = Vec::with_capacity(self.q.len());
        for (row, &s) in self
            .q
            .chunks_exact(self.in_dim.max(1))
            .zip(self.scales.iter())
        {
            w.extend(row.iter().map(|&v| f32::from(v) * s));
        }
        let t = Tensor::from_vec(w, (self.out_dim, self.in_dim), device)?;
        Ok(if dtype == DType::F32 {
            t
        } else {
            t.to_dtype(dtype)?
        })
    }
}

/// The weight of a quantized [`Linear`](crate::Linear), in one of the
/// [`QuantScheme`]s. Every form is inference-only (see the module docs).
#[derive(Debug, Clone)]
pub(crate) enum QuantWeight {
    /// A detached f32 (model dtype) copy.
    F32(Tensor),
    /// GGML Q8_0 through candle's quantized matmul.
    Q8_0(Arc<QTensor>),
    /// Per-channel int8.
    Int8(Int8Rows),
}

impl QuantWeight {
    /// Quantizes `w: [out, in]` as `scheme`; an error names the layer shape
    /// when the scheme does not apply.
    pub(crate) fn new(w: &Tensor, scheme: QuantScheme) -> Result<Self> {
        let (out_dim, in_dim) = w.dims2()?;
        if !scheme.applies(in_dim) {
            return Err(Error::config(
                "quantization scheme",
                format!("{scheme} for a {in_dim}→{out_dim} layer"),
                format!("an input dimension that is a multiple of {Q8_0_BLOCK} for q8_0"),
            ));
        }
        Ok(match scheme {
            QuantScheme::F32 => QuantWeight::F32(w.copy()?.detach()),
            QuantScheme::Q8_0 => {
                let q = QTensor::quantize(&w.to_dtype(DType::F32)?, GgmlDType::Q8_0)?;
                QuantWeight::Q8_0(Arc::new(q))
            }
            QuantScheme::PerChannelInt8 => QuantWeight::Int8(Int8Rows::quantize(w)?),
        })
    }

    pub(crate) fn scheme(&self) -> QuantScheme {
        match self {
            QuantWeight::F32(_) => QuantScheme::F32,
            QuantWeight::Q8_0(_) => QuantScheme::Q8_0,
            QuantWeight::Int8(_) => QuantScheme::PerChannelInt8,
        }
    }

    /// Bytes the weight actually holds (a Q8_0 tensor's storage size, the
    /// int8 values and scales, or the f32 tensor's elements × dtype size).
    pub(crate) fn storage_bytes(&self) -> usize {
        match self {
            QuantWeight::F32(w) => tensor_bytes(w),
            QuantWeight::Q8_0(q) => q.storage_size_in_bytes(),
            QuantWeight::Int8(r) => r.storage_bytes(),
        }
    }

    /// The weight `[out, in]` as a float tensor in `dtype` on `device`.
    pub(crate) fn dequantize(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(match self {
            QuantWeight::F32(w) => w.to_dtype(dtype)?.to_device(device)?,
            QuantWeight::Q8_0(q) => q.dequantize(device)?.to_dtype(dtype)?,
            QuantWeight::Int8(r) => r.dequantize(dtype, device)?,
        })
    }

    /// `x Wᵀ (+ bias)` for `x: [..., in]`, detached from the graph.
    pub(crate) fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let y = match self {
            QuantWeight::Q8_0(q) => {
                let y = QMatMul::QTensor(q.clone()).forward(&x.contiguous()?)?;
                match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
            QuantWeight::F32(w) => {
                candle_nn::Linear::new(w.to_dtype(x.dtype())?, bias.cloned()).forward(x)?
            }
            QuantWeight::Int8(r) => {
                let w = r.dequantize(x.dtype(), x.device())?;
                candle_nn::Linear::new(w, bias.cloned()).forward(x)?
            }
        };
        Ok(y.detach())
    }
}

/// Bytes of a tensor's elements (`elem_count × dtype size`).
pub fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// Bytes of a layer norm's parameters (`weight` and `bias`, `dim` each):
/// layer norms are never quantized, so this is what they hold.
pub fn layer_norm_bytes(dim: usize, dtype: DType) -> usize {
    2 * dim * dtype.size_in_bytes()
}

/// A detached deep copy of a non-matmul parameter (a positional or
/// embedding table) for a quantized model, so it no longer follows the
/// source model's variable.
pub(crate) fn frozen(t: &Tensor) -> Result<Tensor> {
    Ok(t.copy()?.detach())
}

/// Fails with [`Error::Config`] when a model is already quantized.
pub(crate) fn check_not_quantized(what: &'static str, quantized: bool) -> Result<()> {
    if quantized {
        Err(Error::config(
            what,
            "an already quantized model",
            "a trainable (f32) model to quantize",
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_channel_round_trip_is_within_half_a_step_per_row() {
        let w = Tensor::new(
            &[
                [0.5f32, -1.0, 0.25, 0.0],
                [0.0, 0.0, 0.0, 0.0],
                [3.0, 1.5, -0.75, 2.9],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let r = Int8Rows::quantize(&w).unwrap();
        assert_eq!(r.dims(), (3, 4));
        assert_eq!(r.storage_bytes(), 12 + 12);
        assert_eq!(r.scales()[1], 0.0);
        assert_eq!(&r.values()[..4], &[64, -127, 32, 0]);
        let back = r.dequantize(DType::F32, &Device::Cpu).unwrap();
        let (w, back) = (w.to_vec2::<f32>().unwrap(), back.to_vec2::<f32>().unwrap());
        for (row, (a, b)) in w.iter().zip(&back).enumerate() {
            let step = r.scales()[row];
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= step / 2.0 + 1e-7, "row {row}: {x} vs {y}");
            }
        }
        let nan = Tensor::new(&[[f32::NAN, 1.0]], &Device::Cpu).unwrap();
        assert!(Int8Rows::quantize(&nan).is_err());
    }

    #[test]
    fn the_rule_and_the_byte_counts() {
        use QuantScheme::*;
        assert_eq!(QuantPolicy::Auto.scheme_for(1, 64), F32);
        assert_eq!(QuantPolicy::Auto.scheme_for(5, 16), PerChannelInt8);
        assert_eq!(QuantPolicy::Auto.scheme_for(128, 512), PerChannelInt8);
        assert_eq!(QuantPolicy::PreferQ8_0.scheme_for(128, 512), Q8_0);
        assert_eq!(QuantPolicy::PreferQ8_0.scheme_for(136, 128), PerChannelInt8);
        assert_eq!(Q8_0.weight_bytes(128, 4), Some(4 * 4 * 34));
        assert_eq!(Q8_0.weight_bytes(136, 4), None);
        assert_eq!(PerChannelInt8.weight_bytes(136, 4), Some(4 * 140));
        assert_eq!(F32.weight_bytes(3, 2), Some(24));
    }
}
