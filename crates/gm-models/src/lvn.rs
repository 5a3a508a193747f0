//! The LVN (low-volume node) embedder: 5 volume-profile features → an 8-D
//! mean embedding and an 8-D uncertainty (softplus), through a shared trunk
//! and two linear heads.
//!
//! # Architecture (defaults, `B` = batch)
//!
//! | step | layer | shape |
//! |---|---|---|
//! | input | LVN features | `[B, 5]` |
//! | trunk | `Linear` 5→16 → `LayerNorm` → ReLU → dropout | `[B, 16]` |
//! | μ head | `Linear` 16→8 | `[B, 8]` |
//! | σ head | `Linear` 16→8 → softplus | `[B, 8]` |
//!
//! Parameters (defaults): trunk 96 + norm 32, μ and σ heads 136 each;
//! **400** in all ([`LvnConfig::parameter_count`]).
//!
//! Variable names under the builder's prefix: `trunk`, `trunk_ln`, `mu`,
//! `sigma`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::heads::{check_dims, check_dropout};
use crate::layers::{
    check_shape, input_like, softplus, Embedder, Embedding, ForwardCtx, LayerNorm, Linear,
};
use crate::quant::{check_not_quantized, layer_norm_bytes, QuantPolicy};
use crate::Result;

/// Dimensions and dropout of an [`LvnEmbedder`].
#[derive(Debug, Clone, PartialEq)]
pub struct LvnConfig {
    /// Input features (default 5).
    pub input_dim: usize,
    /// Trunk width (default 16).
    pub hidden_dim: usize,
    /// Width of μ and σ (default 8).
    pub out_dim: usize,
    /// Dropout probability after the trunk (default 0.1).
    pub dropout: f32,
}

impl Default for LvnConfig {
    fn default() -> Self {
        Self {
            input_dim: 5,
            hidden_dim: 16,
            out_dim: 8,
            dropout: 0.1,
        }
    }
}

impl LvnConfig {
    /// Every dimension at least 1, dropout in `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        check_dims(&[
            ("input_dim", self.input_dim),
            ("hidden_dim", self.hidden_dim),
            ("out_dim", self.out_dim),
        ])?;
        check_dropout(self.dropout)
    }

    /// Trainable parameters of the embedder built from this config.
    pub fn parameter_count(&self) -> usize {
        let (i, h, o) = (self.input_dim, self.hidden_dim, self.out_dim);
        (i * h + h) + 2 * h + 2 * (h * o + o)
    }
}

/// The LVN embedder (see the module docs for the layers).
#[derive(Debug, Clone)]
pub struct LvnEmbedder {
    cfg: LvnConfig,
    trunk: Linear,
    trunk_ln: LayerNorm,
    mu: Linear,
    sigma: Linear,
    dtype: DType,
    device: Device,
}

impl LvnEmbedder {
    /// Builds the embedder under `vb` (its dtype and device are the
    /// model's; inputs are converted to them).
    pub fn new(cfg: LvnConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            trunk: Linear::new(cfg.input_dim, cfg.hidden_dim, vb.pp("trunk"))?,
            trunk_ln: LayerNorm::new(cfg.hidden_dim, vb.pp("trunk_ln"))?,
            mu: Linear::new(cfg.hidden_dim, cfg.out_dim, vb.pp("mu"))?,
            sigma: Linear::new(cfg.hidden_dim, cfg.out_dim, vb.pp("sigma"))?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LvnConfig {
        &self.cfg
    }
}

/// Int8 inference quantization (see [`crate::quant`]).
impl LvnEmbedder {
    /// An inference-only copy with the trunk and both heads quantized by
    /// [`QuantPolicy::Auto`] (per-channel int8: every input here is far
    /// below Q8_0's block of 32). The layer norm (shared with this model)
    /// and the biases (copied) stay in the model's dtype.
    ///
    /// The copy has no trainable weight and no gradient flows through its
    /// dense layers: it cannot be trained ([`LvnEmbedder::is_quantized`]).
    /// Fails on a model that is already quantized.
    pub fn quantized(&self) -> Result<Self> {
        self.quantized_with(QuantPolicy::Auto)
    }

    /// As [`LvnEmbedder::quantized`], each layer's scheme chosen by
    /// `policy`.
    pub fn quantized_with(&self, policy: QuantPolicy) -> Result<Self> {
        check_not_quantized("lvn embedder", self.is_quantized())?;
        Ok(Self {
            cfg: self.cfg.clone(),
            trunk: self.trunk.quantized_with(policy)?,
            trunk_ln: self.trunk_ln.frozen()?,
            mu: self.mu.quantized_with(policy)?,
            sigma: self.sigma.quantized_with(policy)?,
            dtype: self.dtype,
            device: self.device.clone(),
        })
    }

    /// Whether this is a quantized, inference-only copy.
    pub fn is_quantized(&self) -> bool {
        self.trunk.is_quantized()
    }

    /// Bytes of parameter storage as actually held (dense weights in their
    /// stored form, biases, the layer norm).
    pub fn parameter_bytes(&self) -> usize {
        self.trunk.parameter_bytes()
            + layer_norm_bytes(self.cfg.hidden_dim, self.dtype)
            + self.mu.parameter_bytes()
            + self.sigma.parameter_bytes()
    }
}

impl Embedder for LvnEmbedder {
    /// `x: [B, input_dim]` → μ, σ `[B, out_dim]`.
    fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Embedding> {
        check_shape("lvn input", x, &[None, Some(self.cfg.input_dim)])?;
        let x = input_like(x, self.dtype, &self.device)?;
        let h = self.trunk_ln.forward(&self.trunk.forward(&x)?)?.relu()?;
        let h = ctx.dropout(&h, self.cfg.dropout)?;
        Ok(Embedding {
            mu: self.mu.forward(&h)?,
            sigma: softplus(&self.sigma.forward(&h)?)?,
        })
    }
}

use crate::segments::{no_such_segment, Segmented};

/// The LVN embedder as 2 segments: 0 the trunk with its norm, ReLU and
/// dropout (`[B, input_dim]` → `[B, hidden_dim]`); 1 both heads → μ ‖ σ
/// `[B, 2 · out_dim]` (see [`crate::segments`]).
impl Segmented for LvnEmbedder {
    fn segment_count(&self) -> usize {
        2
    }

    fn forward_segment(&self, i: usize, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        match i {
            0 => {
                check_shape("lvn input", x, &[None, Some(self.cfg.input_dim)])?;
                let x = input_like(x, self.dtype, &self.device)?;
                let h = self.trunk_ln.forward(&self.trunk.forward(&x)?)?.relu()?;
                ctx.dropout(&h, self.cfg.dropout)
            }
            1 => Ok(Tensor::cat(&self.forward_last_parts(x, ctx)?, 1)?),
            _ => Err(no_such_segment("lvn embedder", i, 2)),
        }
    }

    /// `[μ, σ]`.
    fn forward_last_parts(&self, x: &Tensor, _ctx: &mut ForwardCtx) -> Result<Vec<Tensor>> {
        check_shape("lvn hidden state", x, &[None, Some(self.cfg.hidden_dim)])?;
        Ok(vec![
            self.mu.forward(x)?,
            softplus(&self.sigma.forward(x)?)?,
        ])
    }
}
