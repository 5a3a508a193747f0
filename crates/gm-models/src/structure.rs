//! The structure embedder: a small pre-norm transformer over a window of
//! bars (48 × 8 market features by default) pooled by softmax attention
//! into a 64-D mean embedding and a 64-D uncertainty (softplus).
//!
//! # Architecture (defaults, `B` = batch)
//!
//! | step | layer | shape |
//! |---|---|---|
//! | input | bars | `[B, 48, 8]` |
//! | embed | `Linear` 8→128, + sinusoidal positions (fixed, not trained), dropout | `[B, 48, 128]` |
//! | 3 × block | `x + Dropout(MHA(LN(x)))`, then `x + Dropout(FFN(LN(x)))` | `[B, 48, 128]` |
//! | ↳ MHA | `Linear` q, k (no bias), v 128→128 → `[B, 4, 48, 32]` → [`attend`] (config's kind) → merge → `Linear` out 128→128 | |
//! | ↳ FFN | `Linear` 128→512 → GELU (erf) → `Linear` 512→128 | |
//! | final norm | `LayerNorm` 128 (pre-norm stacks end with one) | `[B, 48, 128]` |
//! | pool | scores `Linear` 128→1 (no bias) → softmax over time → weighted sum ([`attention_pool`]) | `[B, 128]` |
//! | μ head | `Linear` 128→64 → `LayerNorm` → GELU → `Linear` 64→64 | `[B, 64]` |
//! | σ head | same layout, own weights, then softplus | `[B, 64]` |
//!
//! Two biases are left out on purpose because softmax is shift-invariant and
//! they would receive exactly zero gradient: the key projection's (it adds
//! `q·b_k`, the same for every key of a query) and the pooling score's (the
//! same for every time step).
//!
//! Parameters (defaults): embed 1 152; each block 198 144 (2 norms 512,
//! q/v/out 3 × 16 512, k 16 384, FFN 131 712); final norm 256; pool score
//! 128; μ and σ heads 12 544 each; **621 056** in all
//! ([`StructureConfig::parameter_count`]).
//!
//! Variable names under the builder's prefix: `embed`,
//! `blocks.{i}.{ln1,q,k,v,out,ln2,ff1,ff2}`, `final_ln`, `pool`,
//! `{mu,sigma}.{fc1,ln,fc2}`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::attention::{attend, AttentionKind};
use crate::heads::{check_dims, check_dropout};
use crate::layers::{
    attention_pool, check_shape, input_like, softplus, Embedder, Embedding, ForwardCtx, LayerNorm,
    Linear,
};
use crate::quant::{check_not_quantized, layer_norm_bytes, QuantPolicy};
use crate::{Error, Result};

/// Dimensions, dropout and attention kernel of a [`StructureEmbedder`].
#[derive(Debug, Clone, PartialEq)]
pub struct StructureConfig {
    /// Bars per window (default 48).
    pub window_len: usize,
    /// Features per bar (default 8).
    pub input_dim: usize,
    /// Transformer width (default 128).
    pub model_dim: usize,
    /// Attention heads; must divide `model_dim` (default 4, so 32 per head).
    pub heads: usize,
    /// Transformer blocks (default 3).
    pub blocks: usize,
    /// Hidden width of each block's feed-forward network (default 512).
    pub ffn_dim: usize,
    /// Hidden width of the μ and σ heads (default 64).
    pub head_hidden_dim: usize,
    /// Width of μ and σ (default 64).
    pub out_dim: usize,
    /// Dropout probability after the embedding and on every residual
    /// branch (default 0.1).
    pub dropout: f32,
    /// The attention kernel (default [`AttentionKind::Dense`]).
    pub attention: AttentionKind,
}

impl Default for StructureConfig {
    fn default() -> Self {
        Self {
            window_len: 48,
            input_dim: 8,
            model_dim: 128,
            heads: 4,
            blocks: 3,
            ffn_dim: 512,
            head_hidden_dim: 64,
            out_dim: 64,
            dropout: 0.1,
            attention: AttentionKind::Dense,
        }
    }
}

impl StructureConfig {
    /// Every dimension at least 1, `heads` divides `model_dim`, dropout in
    /// `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        check_dims(&[
            ("window_len", self.window_len),
            ("input_dim", self.input_dim),
            ("model_dim", self.model_dim),
            ("heads", self.heads),
            ("blocks", self.blocks),
            ("ffn_dim", self.ffn_dim),
            ("head_hidden_dim", self.head_hidden_dim),
            ("out_dim", self.out_dim),
        ])?;
        if !self.model_dim.is_multiple_of(self.heads) {
            return Err(Error::config(
                "heads",
                self.heads,
                format!("a divisor of model_dim = {}", self.model_dim),
            ));
        }
        check_dropout(self.dropout)
    }

    /// Trainable parameters of the embedder built from this config.
    pub fn parameter_count(&self) -> usize {
        let lin = |i: usize, o: usize| i * o + o;
        let (d, f) = (self.model_dim, self.ffn_dim);
        let block = 2 * (2 * d) + 3 * lin(d, d) + d * d + lin(d, f) + lin(f, d);
        let head = lin(d, self.head_hidden_dim)
            + 2 * self.head_hidden_dim
            + lin(self.head_hidden_dim, self.out_dim);
        lin(self.input_dim, d) + self.blocks * block + 2 * d + d + 2 * head
    }
}

/// The fixed sinusoidal position table `[len, dim]`:
/// `pe[t, 2i] = sin(t / 10000^(2i/dim))`, `pe[t, 2i+1] = cos(…)`.
pub fn sinusoidal_positions(
    len: usize,
    dim: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut pe = Vec::with_capacity(len * dim);
    for t in 0..len {
        for j in 0..dim {
            let freq = 10000f64.powf(-((j / 2 * 2) as f64) / dim as f64);
            let angle = t as f64 * freq;
            pe.push(if j % 2 == 0 { angle.sin() } else { angle.cos() } as f32);
        }
    }
    Ok(Tensor::from_vec(pe, (len, dim), device)?.to_dtype(dtype)?)
}

/// Linear → LayerNorm → GELU → Linear (the μ and σ heads).
#[derive(Debug, Clone)]
struct NormMlp {
    fc1: Linear,
    ln: LayerNorm,
    fc2: Linear,
}

impl NormMlp {
    fn new(i: usize, h: usize, o: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(i, h, vb.pp("fc1"))?,
            ln: LayerNorm::new(h, vb.pp("ln"))?,
            fc2: Linear::new(h, o, vb.pp("fc2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.ln.forward(&self.fc1.forward(x)?)?.gelu_erf()?;
        Ok(self.fc2.forward(&h)?)
    }
}

/// Quantization and parameter bytes of a μ/σ head.
impl NormMlp {
    fn quantized_with(&self, policy: QuantPolicy) -> Result<Self> {
        Ok(Self {
            fc1: self.fc1.quantized_with(policy)?,
            ln: self.ln.frozen()?,
            fc2: self.fc2.quantized_with(policy)?,
        })
    }

    fn parameter_bytes(&self, dtype: DType) -> usize {
        self.fc1.parameter_bytes()
            + layer_norm_bytes(self.fc1.out_dim(), dtype)
            + self.fc2.parameter_bytes()
    }
}

/// One pre-norm transformer block.
#[derive(Debug, Clone)]
struct Block {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    ff1: Linear,
    ff2: Linear,
}

impl Block {
    fn new(cfg: &StructureConfig, vb: VarBuilder) -> Result<Self> {
        let (d, f) = (cfg.model_dim, cfg.ffn_dim);
        Ok(Self {
            ln1: LayerNorm::new(d, vb.pp("ln1"))?,
            q: Linear::new(d, d, vb.pp("q"))?,
            k: Linear::no_bias(d, d, vb.pp("k"))?,
            v: Linear::new(d, d, vb.pp("v"))?,
            out: Linear::new(d, d, vb.pp("out"))?,
            ln2: LayerNorm::new(d, vb.pp("ln2"))?,
            ff1: Linear::new(d, f, vb.pp("ff1"))?,
            ff2: Linear::new(f, d, vb.pp("ff2"))?,
        })
    }

    fn forward(&self, x: &Tensor, cfg: &StructureConfig, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let (h, hd) = (cfg.heads, d / cfg.heads);
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, n, h, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let a = self.ln1.forward(x)?;
        let q = split(self.q.forward(&a)?)?;
        let k = split(self.k.forward(&a)?)?;
        let v = split(self.v.forward(&a)?)?;
        let att = attend(&q, &k, &v, cfg.attention)?; // [B, H, N, hd]
        let att = att.transpose(1, 2)?.contiguous()?.reshape((b, n, d))?;
        let x = x.add(&ctx.dropout(&self.out.forward(&att)?, cfg.dropout)?)?;
        let ff = self.ff1.forward(&self.ln2.forward(&x)?)?.gelu_erf()?;
        let ff = self.ff2.forward(&ff)?;
        Ok(x.add(&ctx.dropout(&ff, cfg.dropout)?)?)
    }
}

/// Quantization and parameter bytes of a transformer block.
impl Block {
    fn quantized_with(&self, policy: QuantPolicy) -> Result<Self> {
        Ok(Self {
            ln1: self.ln1.frozen()?,
            q: self.q.quantized_with(policy)?,
            k: self.k.quantized_with(policy)?,
            v: self.v.quantized_with(policy)?,
            out: self.out.quantized_with(policy)?,
            ln2: self.ln2.frozen()?,
            ff1: self.ff1.quantized_with(policy)?,
            ff2: self.ff2.quantized_with(policy)?,
        })
    }

    fn parameter_bytes(&self, dtype: DType) -> usize {
        let d = self.q.in_dim();
        2 * layer_norm_bytes(d, dtype)
            + [&self.q, &self.k, &self.v, &self.out, &self.ff1, &self.ff2]
                .iter()
                .map(|l| l.parameter_bytes())
                .sum::<usize>()
    }
}

/// The structure transformer (see the module docs for the layers).
#[derive(Debug, Clone)]
pub struct StructureEmbedder {
    cfg: StructureConfig,
    embed: Linear,
    positions: Tensor,
    blocks: Vec<Block>,
    final_ln: LayerNorm,
    pool: Linear,
    mu: NormMlp,
    sigma: NormMlp,
    dtype: DType,
    device: Device,
}

impl StructureEmbedder {
    /// Builds the embedder under `vb` (its dtype and device are the
    /// model's; inputs are converted to them).
    pub fn new(cfg: StructureConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.model_dim;
        let blocks = (0..cfg.blocks)
            .map(|i| Block::new(&cfg, vb.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed: Linear::new(cfg.input_dim, d, vb.pp("embed"))?,
            positions: sinusoidal_positions(cfg.window_len, d, vb.dtype(), vb.device())?,
            blocks,
            final_ln: LayerNorm::new(d, vb.pp("final_ln"))?,
            pool: Linear::no_bias(d, 1, vb.pp("pool"))?,
            mu: NormMlp::new(d, cfg.head_hidden_dim, cfg.out_dim, vb.pp("mu"))?,
            sigma: NormMlp::new(d, cfg.head_hidden_dim, cfg.out_dim, vb.pp("sigma"))?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &StructureConfig {
        &self.cfg
    }
}

/// Int8 inference quantization (see [`crate::quant`]).
impl StructureEmbedder {
    /// An inference-only copy with every dense layer quantized by
    /// [`QuantPolicy::Auto`]: the embedding, the q/k/v/out and FFN layers
    /// of every block, the pooling score and both heads. Layer norms and
    /// biases stay in the model's dtype (the layer norms are shared with
    /// this model, the biases copied); the position table is a constant.
    ///
    /// The copy has no trainable weight and no gradient flows through its
    /// dense layers: it cannot be trained ([`StructureEmbedder::is_quantized`]).
    /// Fails on a model that is already quantized.
    pub fn quantized(&self) -> Result<Self> {
        self.quantized_with(QuantPolicy::Auto)
    }

    /// As [`StructureEmbedder::quantized`], each layer's scheme chosen by
    /// `policy`.
    pub fn quantized_with(&self, policy: QuantPolicy) -> Result<Self> {
        check_not_quantized("structure embedder", self.is_quantized())?;
        Ok(Self {
            cfg: self.cfg.clone(),
            embed: self.embed.quantized_with(policy)?,
            positions: self.positions.clone(),
            blocks: self
                .blocks
                .iter()
                .map(|b| b.quantized_with(policy))
                .collect::<Result<Vec<_>>>()?,
            final_ln: self.final_ln.frozen()?,
            pool: self.pool.quantized_with(policy)?,
            mu: self.mu.quantized_with(policy)?,
            sigma: self.sigma.quantized_with(policy)?,
            dtype: self.dtype,
            device: self.device.clone(),
        })
    }

    /// Whether this is a quantized, inference-only copy.
    pub fn is_quantized(&self) -> bool {
        self.embed.is_quantized()
    }

    /// Bytes of parameter storage as actually held: every dense layer's
    /// weight (f32, or its int8 form once quantized) and bias, and every
    /// layer norm. The fixed position table is a constant, not a parameter,
    /// and is not counted (`window_len · model_dim` elements).
    pub fn parameter_bytes(&self) -> usize {
        let d = self.cfg.model_dim;
        self.embed.parameter_bytes()
            + self
                .blocks
                .iter()
                .map(|b| b.parameter_bytes(self.dtype))
                .sum::<usize>()
            + layer_norm_bytes(d, self.dtype)
            + self.pool.parameter_bytes()
            + self.mu.parameter_bytes(self.dtype)
            + self.sigma.parameter_bytes(self.dtype)
    }
}

impl Embedder for StructureEmbedder {
    /// `x: [B, window_len, input_dim]` → μ, σ `[B, out_dim]`.
    fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Embedding> {
        let c = &self.cfg;
        check_shape(
            "structure input",
            x,
            &[None, Some(c.window_len), Some(c.input_dim)],
        )?;
        let x = input_like(x, self.dtype, &self.device)?;
        let h = self.embed.forward(&x)?.broadcast_add(&self.positions)?;
        let mut h = ctx.dropout(&h, c.dropout)?;
        for block in &self.blocks {
            h = block.forward(&h, c, ctx)?;
        }
        let h = self.final_ln.forward(&h)?;
        let pooled = attention_pool(&h, &self.pool.forward(&h)?)?; // [B, d]
        Ok(Embedding {
            mu: self.mu.forward(&pooled)?,
            sigma: softplus(&self.sigma.forward(&pooled)?)?,
        })
    }
}

use crate::segments::{no_such_segment, Segmented};

/// The structure embedder as `blocks + 2` segments: 0 the input projection,
/// positions and dropout (`[B, window_len, input_dim]` →
/// `[B, window_len, model_dim]`); `1..=blocks` one transformer block each
/// (same shape); the last the final norm, pooling and both heads → μ ‖ σ
/// `[B, 2 · out_dim]` (see [`crate::segments`]).
impl Segmented for StructureEmbedder {
    fn segment_count(&self) -> usize {
        self.blocks.len() + 2
    }

    fn forward_segment(&self, i: usize, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let c = &self.cfg;
        let last = self.blocks.len() + 1;
        match i {
            0 => {
                check_shape(
                    "structure input",
                    x,
                    &[None, Some(c.window_len), Some(c.input_dim)],
                )?;
                let x = input_like(x, self.dtype, &self.device)?;
                let h = self.embed.forward(&x)?.broadcast_add(&self.positions)?;
                ctx.dropout(&h, c.dropout)
            }
            i if i < last => {
                self.check_hidden(x)?;
                self.blocks[i - 1].forward(x, c, ctx)
            }
            i if i == last => Ok(Tensor::cat(&self.forward_last_parts(x, ctx)?, 1)?),
            _ => Err(no_such_segment("structure embedder", i, last + 1)),
        }
    }

    /// `[μ, σ]`.
    fn forward_last_parts(&self, x: &Tensor, _ctx: &mut ForwardCtx) -> Result<Vec<Tensor>> {
        self.check_hidden(x)?;
        let h = self.final_ln.forward(x)?;
        let pooled = attention_pool(&h, &self.pool.forward(&h)?)?; // [B, d]
        Ok(vec![
            self.mu.forward(&pooled)?,
            softplus(&self.sigma.forward(&pooled)?)?,
        ])
    }
}

impl StructureEmbedder {
    /// A segment input after segment 0: `[B, window_len, model_dim]`.
    fn check_hidden(&self, x: &Tensor) -> Result<()> {
        let c = &self.cfg;
        check_shape(
            "structure hidden state",
            x,
            &[None, Some(c.window_len), Some(c.model_dim)],
        )
    }
}
