//! The regime embedder: the current 8-D regime vector and its recent
//! history (20 steps) → a 16-D mean embedding and a 16-D uncertainty
//! (softplus), through attention over the regime dimensions, a transition
//! detector and a 2-layer LSTM over the history.
//!
//! # Inputs
//!
//! [`RegimeEmbedder::forward2`] takes `current: [B, 8]` and
//! `history: [B, 20, 8]` (oldest row first, the row just before `current`
//! last). [`Embedder::forward`] (and so [`Embedder::mc_dropout`]) takes
//! the two packed as `[B, 21, 8]`: the 20 history rows, then the current
//! row last (`x[:, 20, :]`).
//!
//! # Architecture (defaults, `B` = batch)
//!
//! | step | layer | shape |
//! |---|---|---|
//! | dimension tokens | token `i` = `x_i · value_i + embed_i` (two learned `[8, 16]` tables: a value direction and an identity per dimension) | `[B, 8, 16]` |
//! | dimension attention | score `i` = `Linear` 16→1 (no bias) of `tanh(token_i)`, softmax over the 8 dimensions, weighted sum of the tokens ([`attention_pool`]) = `a` | `[B, 16]` |
//! | transition features | `d = x_t − x_{t−1}` (8), `‖d‖`, `‖x_t − mean(history)‖`, mean step `‖h_k − h_{k−1}‖` of the history | `[B, 11]` |
//! | transition detector | `Linear` 11→16 → ReLU → `Linear` 16→1 → sigmoid = `s` ∈ (0, 1) | `[B, 1]` |
//! | LSTM | 2 × [`Lstm`] (8→32, 32→32, dropout between) over the history, last state = `h` | `[B, 32]` |
//! | fusion input | `(1 + s) · a` ‖ `h` | `[B, 48]` |
//! | fusion | `Linear` 48→64 → `LayerNorm` → GELU → dropout → `Linear` 64→32 → GELU | `[B, 32]` |
//! | μ head | `Linear` 32→16 | `[B, 16]` |
//! | σ head | `Linear` 32→16 → softplus | `[B, 16]` |
//!
//! The fusion input is 48 = 16 (the attended current vector) + 32 (the
//! LSTM's last state). The transition score enters as a gate rather than a
//! 49th feature: at a detected transition the current vector weighs up to
//! twice as much against the history summary. It is also reported by
//! [`RegimeEmbedder::forward_detailed`], with the dimension weights.
//! Norms are `sqrt(Σ² + 1e-6)` so their gradient stays finite when two
//! rows are equal.
//!
//! Parameters (defaults): dimension attention 272 (tables 2 × 128, score
//! 16); transition detector 209; LSTM 13 568 (5 248 + 8 320); fusion 5 344;
//! μ and σ heads 528 each; **20 449** in all
//! ([`RegimeConfig::parameter_count`]).
//!
//! Variable names under the builder's prefix: `dims.{value,embed,score}`,
//! `transition.{fc1,fc2}`, `lstm.{0,1}.{ih,hh}`, `fusion.{fc1,ln,fc2}`,
//! `mu`, `sigma`.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::heads::{check_dims, check_dropout};
use crate::layers::{
    attention_pool, check_shape, input_like, softmax, softplus, Embedder, Embedding, ForwardCtx,
    LayerNorm, Linear, Lstm,
};
use crate::quant::{self, check_not_quantized, layer_norm_bytes, tensor_bytes, QuantPolicy};
use crate::{Error, Result};

/// Transition-detector input features: the difference vector plus three
/// norms.
const fn transition_features(regime_dim: usize) -> usize {
    regime_dim + 3
}

/// Added under the square roots of the norms.
const NORM_EPS: f64 = 1e-6;

/// Dimensions and dropout of a [`RegimeEmbedder`].
#[derive(Debug, Clone, PartialEq)]
pub struct RegimeConfig {
    /// Width of the regime vector (default 8).
    pub regime_dim: usize,
    /// History steps before the current vector (default 20; at least 2).
    pub history_len: usize,
    /// Width of a dimension token and of the attended vector (default 16).
    pub token_dim: usize,
    /// LSTM hidden size (default 32).
    pub lstm_hidden: usize,
    /// Stacked LSTM layers (default 2).
    pub lstm_layers: usize,
    /// Hidden width of the transition detector (default 16).
    pub transition_hidden: usize,
    /// Hidden width of the fusion MLP (default 64).
    pub fusion_hidden: usize,
    /// Output width of the fusion MLP (default 32).
    pub fusion_out: usize,
    /// Width of μ and σ (default 16).
    pub out_dim: usize,
    /// Dropout probability between LSTM layers and in the fusion MLP
    /// (default 0.1).
    pub dropout: f32,
}

impl Default for RegimeConfig {
    fn default() -> Self {
        Self {
            regime_dim: 8,
            history_len: 20,
            token_dim: 16,
            lstm_hidden: 32,
            lstm_layers: 2,
            transition_hidden: 16,
            fusion_hidden: 64,
            fusion_out: 32,
            out_dim: 16,
            dropout: 0.1,
        }
    }
}

impl RegimeConfig {
    /// Every dimension at least 1, `history_len` at least 2, dropout in
    /// `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        check_dims(&[
            ("regime_dim", self.regime_dim),
            ("history_len", self.history_len),
            ("token_dim", self.token_dim),
            ("lstm_hidden", self.lstm_hidden),
            ("lstm_layers", self.lstm_layers),
            ("transition_hidden", self.transition_hidden),
            ("fusion_hidden", self.fusion_hidden),
            ("fusion_out", self.fusion_out),
            ("out_dim", self.out_dim),
        ])?;
        if self.history_len < 2 {
            return Err(Error::config(
                "history_len",
                self.history_len,
                "at least 2 (the detector compares steps)",
            ));
        }
        check_dropout(self.dropout)
    }

    /// Rows of the packed input of [`Embedder::forward`]
    /// (`history_len + 1`).
    pub fn packed_len(&self) -> usize {
        self.history_len + 1
    }

    /// Trainable parameters of the embedder built from this config.
    pub fn parameter_count(&self) -> usize {
        let lin = |i: usize, o: usize| i * o + o;
        let (r, t, hid) = (self.regime_dim, self.token_dim, self.lstm_hidden);
        let dims = 2 * r * t + t;
        let transition =
            lin(transition_features(r), self.transition_hidden) + lin(self.transition_hidden, 1);
        let lstm: usize = (0..self.lstm_layers)
            .map(|l| {
                let i = if l == 0 { r } else { hid };
                lin(i, 4 * hid) + hid * 4 * hid
            })
            .sum();
        let fusion = lin(t + hid, self.fusion_hidden)
            + 2 * self.fusion_hidden
            + lin(self.fusion_hidden, self.fusion_out);
        dims + transition + lstm + fusion + 2 * lin(self.fusion_out, self.out_dim)
    }
}

/// A forward pass with its interpretable intermediates.
#[derive(Debug, Clone)]
pub struct RegimeOutput {
    /// μ and σ, `[B, out_dim]`.
    pub embedding: Embedding,
    /// The transition score `s` ∈ (0, 1), `[B, 1]`.
    pub transition: Tensor,
    /// The attention weights over the regime dimensions, `[B, regime_dim]`
    /// (rows sum to 1).
    pub dim_weights: Tensor,
}

/// The regime embedder (see the module docs for the layers).
#[derive(Debug, Clone)]
pub struct RegimeEmbedder {
    cfg: RegimeConfig,
    dim_value: Tensor,
    dim_embed: Tensor,
    dim_score: Linear,
    transition: [Linear; 2],
    lstm: Vec<Lstm>,
    fusion_fc1: Linear,
    fusion_ln: LayerNorm,
    fusion_fc2: Linear,
    mu: Linear,
    sigma: Linear,
    dtype: DType,
    device: Device,
}

/// `sqrt(Σ_last x² + eps)`, keeping the last dimension as 1.
fn norm_keepdim(x: &Tensor) -> Result<Tensor> {
    Ok(x.sqr()?
        .sum_keepdim(D::Minus1)?
        .affine(1.0, NORM_EPS)?
        .sqrt()?)
}

impl RegimeEmbedder {
    /// Builds the embedder under `vb` (its dtype and device are the
    /// model's; inputs are converted to them).
    pub fn new(cfg: RegimeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (r, t, hid) = (cfg.regime_dim, cfg.token_dim, cfg.lstm_hidden);
        let dims = vb.pp("dims");
        let randn = Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        let lstm = (0..cfg.lstm_layers)
            .map(|l| Lstm::new(if l == 0 { r } else { hid }, hid, vb.pp("lstm").pp(l)))
            .collect::<Result<Vec<_>>>()?;
        let tr = vb.pp("transition");
        let fu = vb.pp("fusion");
        Ok(Self {
            dim_value: dims.get_with_hints((r, t), "value", randn)?,
            dim_embed: dims.get_with_hints((r, t), "embed", randn)?,
            dim_score: Linear::no_bias(t, 1, dims.pp("score"))?,
            transition: [
                Linear::new(transition_features(r), cfg.transition_hidden, tr.pp("fc1"))?,
                Linear::new(cfg.transition_hidden, 1, tr.pp("fc2"))?,
            ],
            lstm,
            fusion_fc1: Linear::new(t + hid, cfg.fusion_hidden, fu.pp("fc1"))?,
            fusion_ln: LayerNorm::new(cfg.fusion_hidden, fu.pp("ln"))?,
            fusion_fc2: Linear::new(cfg.fusion_hidden, cfg.fusion_out, fu.pp("fc2"))?,
            mu: Linear::new(cfg.fusion_out, cfg.out_dim, vb.pp("mu"))?,
            sigma: Linear::new(cfg.fusion_out, cfg.out_dim, vb.pp("sigma"))?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RegimeConfig {
        &self.cfg
    }

    /// `current: [B, regime_dim]`, `history: [B, history_len, regime_dim]`
    /// (oldest first) → μ, σ `[B, out_dim]`.
    pub fn forward2(
        &self,
        current: &Tensor,
        history: &Tensor,
        ctx: &mut ForwardCtx,
    ) -> Result<Embedding> {
        Ok(self.forward_detailed(current, history, ctx)?.embedding)
    }

    /// As [`RegimeEmbedder::forward2`], also returning the transition score
    /// and the attention weights over the regime dimensions.
    pub fn forward_detailed(
        &self,
        current: &Tensor,
        history: &Tensor,
        ctx: &mut ForwardCtx,
    ) -> Result<RegimeOutput> {
        let c = &self.cfg;
        check_shape("regime current", current, &[None, Some(c.regime_dim)])?;
        check_shape(
            "regime history",
            history,
            &[
                Some(current.dim(0)?),
                Some(c.history_len),
                Some(c.regime_dim),
            ],
        )?;
        let x = input_like(current, self.dtype, &self.device)?;
        let hist = input_like(history, self.dtype, &self.device)?;
        let (f, scores, transition) = self.trunk(&x, hist, ctx)?;
        let dim_weights = softmax(&scores, 1)?.squeeze(2)?;
        let [mu, sigma] = self.head(&f, ctx)?;
        Ok(RegimeOutput {
            embedding: Embedding { mu, sigma },
            transition,
            dim_weights,
        })
    }
}

/// Int8 inference quantization (see [`crate::quant`]).
impl RegimeEmbedder {
    /// An inference-only copy with every dense layer quantized by
    /// [`QuantPolicy::Auto`]: the dimension score, the transition detector,
    /// both LSTMs (input and recurrent weights), the fusion MLP and both
    /// heads. The two dimension tables are not matmul weights and stay in
    /// the model's dtype (copied), like the biases (copied) and the layer
    /// norm (shared with this model).
    ///
    /// The copy has no trainable weight and no gradient flows through its
    /// dense layers: it cannot be trained ([`RegimeEmbedder::is_quantized`]).
    /// Fails on a model that is already quantized.
    pub fn quantized(&self) -> Result<Self> {
        self.quantized_with(QuantPolicy::Auto)
    }

    /// As [`RegimeEmbedder::quantized`], each layer's scheme chosen by
    /// `policy`.
    pub fn quantized_with(&self, policy: QuantPolicy) -> Result<Self> {
        check_not_quantized("regime embedder", self.is_quantized())?;
        let q = |l: &Linear| l.quantized_with(policy);
        Ok(Self {
            cfg: self.cfg.clone(),
            dim_value: quant::frozen(&self.dim_value)?,
            dim_embed: quant::frozen(&self.dim_embed)?,
            dim_score: q(&self.dim_score)?,
            transition: [q(&self.transition[0])?, q(&self.transition[1])?],
            lstm: self
                .lstm
                .iter()
                .map(|l| l.quantized_with(policy))
                .collect::<Result<Vec<_>>>()?,
            fusion_fc1: q(&self.fusion_fc1)?,
            fusion_ln: self.fusion_ln.frozen()?,
            fusion_fc2: q(&self.fusion_fc2)?,
            mu: q(&self.mu)?,
            sigma: q(&self.sigma)?,
            dtype: self.dtype,
            device: self.device.clone(),
        })
    }

    /// Whether this is a quantized, inference-only copy.
    pub fn is_quantized(&self) -> bool {
        self.dim_score.is_quantized()
    }

    /// Bytes of parameter storage as actually held (dense weights in their
    /// stored form, biases, the dimension tables, the layer norm).
    pub fn parameter_bytes(&self) -> usize {
        let dense: usize = std::iter::once(&self.dim_score)
            .chain(&self.transition)
            .chain([&self.fusion_fc1, &self.fusion_fc2, &self.mu, &self.sigma])
            .map(Linear::parameter_bytes)
            .sum();
        dense
            + self.lstm.iter().map(Lstm::parameter_bytes).sum::<usize>()
            + tensor_bytes(&self.dim_value)
            + tensor_bytes(&self.dim_embed)
            + layer_norm_bytes(self.cfg.fusion_hidden, self.dtype)
    }
}

impl Embedder for RegimeEmbedder {
    /// `x: [B, history_len + 1, regime_dim]`: the history rows, then the
    /// current row last.
    fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Embedding> {
        let c = &self.cfg;
        check_shape(
            "regime packed input",
            x,
            &[None, Some(c.packed_len()), Some(c.regime_dim)],
        )?;
        let history = x.narrow(1, 0, c.history_len)?;
        let current = x.narrow(1, c.history_len, 1)?.squeeze(1)?;
        self.forward2(&current, &history, ctx)
    }
}

use crate::segments::{no_such_segment, Segmented};

/// The two halves of [`RegimeEmbedder::forward_detailed`] as segments
/// (the same operations in the same order; `segments::tests` checks that
/// they compose to `forward` bit for bit).
impl RegimeEmbedder {
    /// Segment 0: the packed input `[B, history_len + 1, regime_dim]` → the
    /// fusion input `(1 + s) · a ‖ h` `[B, token_dim + lstm_hidden]`.
    fn fusion_input(&self, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let c = &self.cfg;
        check_shape(
            "regime packed input",
            x,
            &[None, Some(c.packed_len()), Some(c.regime_dim)],
        )?;
        let n = c.history_len;
        let hist = input_like(&x.narrow(1, 0, n)?, self.dtype, &self.device)?;
        let x = input_like(&x.narrow(1, n, 1)?.squeeze(1)?, self.dtype, &self.device)?;
        Ok(self.trunk(&x, hist, ctx)?.0)
    }

    /// The dimension attention, the transition detector and the LSTM over
    /// the history, fused into `(1 + s) · a ‖ h` `[B, token_dim +
    /// lstm_hidden]`; also returns the dimension scores `[B, r, 1]` and the
    /// transition score `s` `[B, 1]`. Shared by `forward_detailed` and
    /// segment 0, so the two cannot drift apart.
    fn trunk(
        &self,
        x: &Tensor,
        hist: Tensor,
        ctx: &mut ForwardCtx,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.cfg;
        let n = c.history_len;

        let tokens = x
            .unsqueeze(2)?
            .broadcast_mul(&self.dim_value)?
            .broadcast_add(&self.dim_embed)?; // [B, r, t]
        let scores = self.dim_score.forward(&tokens.tanh()?)?; // [B, r, 1]
        let attended = attention_pool(&tokens, &scores)?; // [B, t]

        let prev = hist.narrow(1, n - 1, 1)?.squeeze(1)?;
        let d = x.sub(&prev)?;
        let from_mean = x.sub(&hist.mean(1)?)?;
        let steps = hist.narrow(1, 1, n - 1)?.sub(&hist.narrow(1, 0, n - 1)?)?;
        let typical = norm_keepdim(&steps)?.mean(1)?; // [B, 1]
        let feats = Tensor::cat(
            &[
                d.clone(),
                norm_keepdim(&d)?,
                norm_keepdim(&from_mean)?,
                typical,
            ],
            1,
        )?;
        let s = self.transition[1].forward(&self.transition[0].forward(&feats)?.relu()?)?;
        let transition = candle_nn::ops::sigmoid(&s)?; // [B, 1]

        let mut seq = hist;
        for (l, lstm) in self.lstm.iter().enumerate() {
            if l > 0 {
                seq = ctx.dropout(&seq, c.dropout)?;
            }
            seq = lstm.seq(&seq, false)?;
        }
        let last = seq.narrow(1, n - 1, 1)?.squeeze(1)?; // [B, hid]

        let gated = attended.broadcast_mul(&transition.affine(1.0, 1.0)?)?;
        Ok((Tensor::cat(&[gated, last], 1)?, scores, transition))
    }

    /// The fusion MLP and both heads: fusion input → `[μ, σ]`. Shared by
    /// `forward_detailed` and segment 1.
    fn head(&self, f: &Tensor, ctx: &mut ForwardCtx) -> Result<[Tensor; 2]> {
        let c = &self.cfg;
        let f = self
            .fusion_ln
            .forward(&self.fusion_fc1.forward(f)?)?
            .gelu_erf()?;
        let f = ctx.dropout(&f, c.dropout)?;
        let f = self.fusion_fc2.forward(&f)?.gelu_erf()?;
        Ok([self.mu.forward(&f)?, softplus(&self.sigma.forward(&f)?)?])
    }

    /// Segment 1: the fusion input → `[μ, σ]`, each `[B, out_dim]`.
    fn fusion_output(&self, f: &Tensor, ctx: &mut ForwardCtx) -> Result<Vec<Tensor>> {
        let c = &self.cfg;
        check_shape(
            "regime fusion input",
            f,
            &[None, Some(c.token_dim + c.lstm_hidden)],
        )?;
        Ok(self.head(f, ctx)?.to_vec())
    }
}

/// The regime embedder as 2 segments: 0 the dimension attention, the
/// transition detector and the LSTM (packed input `[B, history_len + 1,
/// regime_dim]` → fusion input `[B, token_dim + lstm_hidden]`); 1 the
/// fusion MLP and both heads → μ ‖ σ `[B, 2 · out_dim]` (see
/// [`crate::segments`]).
impl Segmented for RegimeEmbedder {
    fn segment_count(&self) -> usize {
        2
    }

    fn forward_segment(&self, i: usize, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        match i {
            0 => self.fusion_input(x, ctx),
            1 => Ok(Tensor::cat(&self.fusion_output(x, ctx)?, 1)?),
            _ => Err(no_such_segment("regime embedder", i, 2)),
        }
    }

    /// `[μ, σ]`.
    fn forward_last_parts(&self, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Vec<Tensor>> {
        self.fusion_output(x, ctx)
    }
}
