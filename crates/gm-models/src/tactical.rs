//! The tactical embedder (issue 5): a momentum-scaled positional encoding,
//! a 3-layer bidirectional LSTM and multi-scale attention pooling, from a
//! window of 60 bars × 7 features to a 48-dim embedding with uncertainty.
//!
//! # Architecture (default [`TacticalConfig`], `B` = batch)
//!
//! | stage | operation | shape |
//! |---|---|---|
//! | input | `x` (converted to the model's dtype and device) | `[B, 60, 7]` |
//! | projection | `dropout(relu(LayerNorm(Linear 7→128 (x))))` | `[B, 60, 128]` |
//! | momentum | unfold 3-step windows (zero padding 1 both sides) → `Linear 21→32` (= Conv1d 7→32, kernel 3, "same") | `[B, 60, 32]` |
//! | | `score = Linear 32→1, no bias (tanh(conv))` | `[B, 60, 1]` |
//! | | `m = 60 · softmax_time(score)` (averages 1 over the window) | `[B, 60, 1]` |
//! | position | `h₀ = projection + m ⊙ P`, `P` a learned `[60, 128]` table | `[B, 60, 128]` |
//! | BiLSTM 1 | `h₁ = LN(dropout([fwd(h₀), bwd(h₀)]))`, two `Lstm 128→128` | `[B, 60, 256]` |
//! | BiLSTM 2, 3 | `hₗ = LN(dropout([fwd(hₗ₋₁), bwd(hₗ₋₁)]) + hₗ₋₁)` | `[B, 60, 256]` |
//! | scale `s` ∈ {5, 15, 30} | `a = A_s h₃`, moving average, window `s`, stride 1 | `[B, 61 − s, 256]` |
//! | | `o = Wₒ · attend(Q = W_q h₃, K = W_k a, V = W_v a)`, 4 heads × 64 | `[B, 60, 256]` |
//! | | `g = σ(Linear 512→256 ([o, h₃]))`, `y_s = g ⊙ o + (1 − g) ⊙ h₃` | `[B, 60, 256]` |
//! | fusion | `f = dropout(Linear 768→256 ([y₅, y₁₅, y₃₀]))` | `[B, 60, 256]` |
//! | pooling | `layers::attention_pool(f, Linear 256→1, no bias (f))` | `[B, 256]` |
//! | μ head | `Linear 128→48 (dropout(relu(Linear 256→128)))` | `[B, 48]` |
//! | σ head | the same, then `softplus + 1e-6` | `[B, 48]` |
//!
//! **2,520,896 parameters** with the defaults
//! ([`TacticalConfig::parameter_count`]; the test suite checks it against
//! the variables actually created): input projection and norm 1,280;
//! momentum convolution 704 and score 32; positional table 7,680; BiLSTM
//! 1,053,184 (three layers of two LSTMs, 263,168 + 2 × 394,240, and their
//! layer norms, 1,536); three scales × 394,240 = 1,182,720; fusion 196,864;
//! pooling score 256; μ and σ heads 2 × 39,088.
//!
//! # Design decisions
//!
//! - **Conv1d as `Linear` over unfolded windows.** The momentum convolution
//!   is a [`Linear`] over the `kernel` zero-padded, time-shifted copies of the
//!   input concatenated along features (feature index `j · 7 + i` for tap `j`,
//!   input feature `i`; conv weight `w[o, i, j]` = linear weight
//!   `W[o, j · 7 + i]`). It is the same function as `candle_nn::conv1d` with
//!   padding `kernel / 2` (a unit test checks it), back-propagates through
//!   plain `narrow`/`cat`/matmul, works in bf16, and is quantized with every
//!   other dense layer.
//! - **From 32 channels to a per-step scale.** `tanh` of the convolution,
//!   a learned channel mix `32→1` *without bias*, softmax over time, times
//!   the window length so the scale averages 1 and an uninformative signal
//!   leaves the positional table as it is. A bare channel mean straight into
//!   the softmax (the obvious alternative) would leave the convolution's bias
//!   without gradient: softmax is invariant to a shift that is constant in
//!   time, and a conv bias is exactly that. The `tanh` makes the bias matter
//!   and bounds each channel; the learned mix lets the model choose the
//!   temperature. [`TacticalEmbedder::momentum_scale`] exposes the scale.
//! - **Biases that softmax would ignore are left out.** For the same
//!   reason the momentum score, the pooling score and every attention key
//!   projection (`q·(k + b)` shifts all scores of one query equally) have
//!   no bias, so every variable the model has can learn (the test suite
//!   checks that each one receives a non-zero gradient).
//! - **BiLSTM.** Each layer runs one [`Lstm`] forward and one in reverse
//!   and concatenates (`2 × 128 = 256`). Post-norm residual
//!   (`LN(layer(h) + h)`) from layer 2 on, where input and output widths
//!   agree; layer 1 (128→256) is only normalised. Dropout on each layer's
//!   output, before the residual.
//! - **Multi-scale attention.** The moving averages use stride 1 over
//!   "valid" windows (56, 46 and 31 of them): overlapping averages like
//!   moving-average lines of 5, 15 and 30 bars; stride = scale would leave the
//!   30-bar scale only 2 keys. The average is a fixed `[61 − s, 60]`
//!   averaging matrix (a constant, not a variable) applied by matmul, so
//!   gradients flow back into the BiLSTM. **Queries come from the BiLSTM
//!   output, keys and values from the averaged sequence**: every one of the
//!   60 steps asks what the sequence looks like at scale `s`, so each
//!   scale's output stays aligned to the 60 steps, the gate can mix it
//!   per step with the BiLSTM output (the gate's "input"), and the three
//!   scales concatenate along features. The kernel is
//!   [`attention::attend`] with the configured [`AttentionKind`] on
//!   `[B, 4, 60, 64]` queries and `[B, 4, 61 − s, 64]` keys/values.
//! - **σ** is `softplus(·) + 1e-6`, so it is strictly positive even where
//!   softplus underflows.
//! - **Dropout** (probability [`TacticalConfig::dropout`]) after the input
//!   projection, after every BiLSTM layer, after the fusion and inside both
//!   heads, every mask drawn from the caller's [`ForwardCtx`]: with
//!   [`ForwardCtx::eval`] the model is deterministic; [`Embedder::mc_dropout`]
//!   gives Monte-Carlo dropout.
//! - **dtype.** Parameters take the `VarBuilder`'s dtype (f32 or bf16);
//!   inputs are converted to it. Layer norms compute in f32 internally.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::attention::{self, AttentionKind};
use crate::layers::{
    attention_pool, check_shape, input_like, softmax, softplus, Embedder, Embedding, ForwardCtx,
    LayerNorm, Linear, Lstm,
};
use crate::quant::{self, check_not_quantized, layer_norm_bytes, tensor_bytes, QuantPolicy};
use crate::{Error, Result};

/// Added to the softplus of the σ head so that σ > 0 even where softplus
/// underflows to 0.
const SIGMA_FLOOR: f64 = 1e-6;

/// Sizes and options of a [`TacticalEmbedder`].
#[derive(Debug, Clone)]
pub struct TacticalConfig {
    /// Time steps of the input window (60 bars).
    pub seq_len: usize,
    /// Features per step (7).
    pub input_dim: usize,
    /// Width of the input projection and of the positional table (128).
    pub proj_dim: usize,
    /// Output channels of the momentum convolution (32).
    pub momentum_channels: usize,
    /// Kernel of the momentum convolution in steps; odd, so "same" padding
    /// keeps the window length (3).
    pub momentum_kernel: usize,
    /// Stacked bidirectional LSTM layers (3).
    pub lstm_layers: usize,
    /// LSTM hidden size per direction (128; the BiLSTM output is twice it).
    pub lstm_hidden_dim: usize,
    /// Moving-average windows of the multi-scale attention, in steps, each
    /// in `1..=seq_len` (5, 15, 30).
    pub scales: Vec<usize>,
    /// Attention heads per scale; must divide `2 · lstm_hidden_dim` (4).
    pub heads: usize,
    /// Hidden width of the μ and σ heads (128).
    pub head_hidden_dim: usize,
    /// Width of μ and of σ (48).
    pub embed_dim: usize,
    /// Dropout probability in `[0, 1)` (0.1).
    pub dropout: f32,
    /// The attention kernel of the multi-scale attention (dense).
    pub attention: AttentionKind,
}

impl Default for TacticalConfig {
    fn default() -> Self {
        Self {
            seq_len: 60,
            input_dim: 7,
            proj_dim: 128,
            momentum_channels: 32,
            momentum_kernel: 3,
            lstm_layers: 3,
            lstm_hidden_dim: 128,
            scales: vec![5, 15, 30],
            heads: 4,
            head_hidden_dim: 128,
            embed_dim: 48,
            dropout: 0.1,
            attention: AttentionKind::Dense,
        }
    }
}

impl TacticalConfig {
    /// Checks every value; the error names the key, the value and what is
    /// allowed.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("seq_len", self.seq_len),
            ("input_dim", self.input_dim),
            ("proj_dim", self.proj_dim),
            ("momentum_channels", self.momentum_channels),
            ("lstm_layers", self.lstm_layers),
            ("lstm_hidden_dim", self.lstm_hidden_dim),
            ("heads", self.heads),
            ("head_hidden_dim", self.head_hidden_dim),
            ("embed_dim", self.embed_dim),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(Error::config(key, value, "at least 1"));
            }
        }
        if self.momentum_kernel.is_multiple_of(2) {
            return Err(Error::config(
                "momentum_kernel",
                self.momentum_kernel,
                "an odd number of steps (\"same\" padding keeps the window length)",
            ));
        }
        if self.momentum_kernel > 2 * self.seq_len - 1 {
            return Err(Error::config(
                "momentum_kernel",
                self.momentum_kernel,
                format!("at most 2 · seq_len − 1 = {}", 2 * self.seq_len - 1),
            ));
        }
        let scales = format!("{:?}", self.scales);
        if self.scales.is_empty() {
            return Err(Error::config("scales", scales, "at least one window"));
        }
        if let Some(s) = self.scales.iter().find(|s| **s == 0 || **s > self.seq_len) {
            return Err(Error::config(
                "scales",
                scales,
                format!(
                    "windows in 1..={} steps (seq_len); {s} is not",
                    self.seq_len
                ),
            ));
        }
        let width = 2 * self.lstm_hidden_dim;
        if !width.is_multiple_of(self.heads) {
            return Err(Error::config(
                "heads",
                self.heads,
                format!("a divisor of the BiLSTM width 2 · lstm_hidden_dim = {width}"),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(
                "dropout",
                self.dropout,
                "a probability in [0, 1)",
            ));
        }
        Ok(())
    }

    /// The number of trainable scalars a model with this configuration has
    /// (2,520,896 with the defaults).
    pub fn parameter_count(&self) -> usize {
        let linear = |i: usize, o: usize| i * o + o;
        let lstm = |i: usize, h: usize| linear(i, 4 * h) + h * 4 * h;
        let (p, h, w) = (
            self.proj_dim,
            self.lstm_hidden_dim,
            2 * self.lstm_hidden_dim,
        );
        let input = linear(self.input_dim, p) + 2 * p;
        let momentum = linear(
            self.momentum_kernel * self.input_dim,
            self.momentum_channels,
        ) + self.momentum_channels
            + self.seq_len * p;
        let bilstm =
            2 * lstm(p, h) + (self.lstm_layers - 1) * 2 * lstm(w, h) + self.lstm_layers * 2 * w;
        let scale = 3 * linear(w, w) + w * w + linear(2 * w, w);
        let fusion = linear(self.scales.len() * w, w);
        let pool = w;
        let head = linear(w, self.head_hidden_dim) + linear(self.head_hidden_dim, self.embed_dim);
        input + momentum + bilstm + self.scales.len() * scale + fusion + pool + 2 * head
    }
}

/// One stacked BiLSTM layer: a forward and a reverse [`Lstm`] and the
/// layer norm after them.
#[derive(Debug, Clone)]
struct BiLstmLayer {
    fwd: Lstm,
    bwd: Lstm,
    norm: LayerNorm,
}

/// One scale of the multi-scale attention.
#[derive(Debug, Clone)]
struct ScaleAttention {
    /// The `[N, T]` moving-average matrix (a constant).
    avg: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
}

/// A μ or σ head `w → hidden → embed`.
#[derive(Debug, Clone)]
struct Head {
    hidden: Linear,
    out: Linear,
}

impl Head {
    fn new(w: usize, hidden: usize, out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            hidden: Linear::new(w, hidden, vb.pp("hidden"))?,
            out: Linear::new(hidden, out, vb.pp("out"))?,
        })
    }

    fn forward(&self, x: &Tensor, p: f32, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let h = ctx.dropout(&self.hidden.forward(x)?.relu()?, p)?;
        Ok(self.out.forward(&h)?)
    }
}

/// Quantization and parameter bytes of a μ/σ head.
impl Head {
    fn quantized_with(&self, policy: QuantPolicy) -> Result<Self> {
        Ok(Self {
            hidden: self.hidden.quantized_with(policy)?,
            out: self.out.quantized_with(policy)?,
        })
    }

    fn parameter_bytes(&self) -> usize {
        self.hidden.parameter_bytes() + self.out.parameter_bytes()
    }
}

/// The tactical embedder: `[B, 60, 7]` → μ, σ `[B, 48]` (see the module
/// docs for the architecture).
#[derive(Debug, Clone)]
pub struct TacticalEmbedder {
    cfg: TacticalConfig,
    dtype: DType,
    device: Device,
    proj: Linear,
    proj_norm: LayerNorm,
    momentum_conv: Linear,
    momentum_score: Linear,
    pos: Tensor,
    lstm: Vec<BiLstmLayer>,
    scales: Vec<ScaleAttention>,
    fusion: Linear,
    pool_score: Linear,
    mu: Head,
    sigma: Head,
}

impl TacticalEmbedder {
    /// Builds the model after validating `cfg`; the parameters are created
    /// (or looked up) under `vb`, in its dtype and on its device.
    ///
    /// Variable names: `input.proj`, `input.norm`, `momentum.conv`,
    /// `momentum.score`, `pos`, `lstm.{l}.{fwd,bwd,norm}`,
    /// `scale.{i}.{q,k,v,o,gate}`, `fusion`, `pool.score`,
    /// `{mu,sigma}.{hidden,out}`.
    pub fn new(cfg: TacticalConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (p, h, w) = (cfg.proj_dim, cfg.lstm_hidden_dim, 2 * cfg.lstm_hidden_dim);
        let t = cfg.seq_len;
        let proj = Linear::new(cfg.input_dim, p, vb.pp("input.proj"))?;
        let proj_norm = LayerNorm::new(p, vb.pp("input.norm"))?;
        let momentum_conv = Linear::new(
            cfg.momentum_kernel * cfg.input_dim,
            cfg.momentum_channels,
            vb.pp("momentum.conv"),
        )?;
        let momentum_score = Linear::no_bias(cfg.momentum_channels, 1, vb.pp("momentum.score"))?;
        let pos = vb.get_with_hints(
            (t, p),
            "pos",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let lstm = (0..cfg.lstm_layers)
            .map(|l| {
                let vb = vb.pp(format!("lstm.{l}"));
                let in_dim = if l == 0 { p } else { w };
                Ok(BiLstmLayer {
                    fwd: Lstm::new(in_dim, h, vb.pp("fwd"))?,
                    bwd: Lstm::new(in_dim, h, vb.pp("bwd"))?,
                    norm: LayerNorm::new(w, vb.pp("norm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let scales = cfg
            .scales
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let vb = vb.pp(format!("scale.{i}"));
                Ok(ScaleAttention {
                    avg: averaging_matrix(t, s)?
                        .to_dtype(vb.dtype())?
                        .to_device(vb.device())?,
                    q: Linear::new(w, w, vb.pp("q"))?,
                    k: Linear::no_bias(w, w, vb.pp("k"))?,
                    v: Linear::new(w, w, vb.pp("v"))?,
                    o: Linear::new(w, w, vb.pp("o"))?,
                    gate: Linear::new(2 * w, w, vb.pp("gate"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let fusion = Linear::new(cfg.scales.len() * w, w, vb.pp("fusion"))?;
        let pool_score = Linear::no_bias(w, 1, vb.pp("pool.score"))?;
        let mu = Head::new(w, cfg.head_hidden_dim, cfg.embed_dim, vb.pp("mu"))?;
        let sigma = Head::new(w, cfg.head_hidden_dim, cfg.embed_dim, vb.pp("sigma"))?;
        Ok(Self {
            dtype: vb.dtype(),
            device: vb.device().clone(),
            cfg,
            proj,
            proj_norm,
            momentum_conv,
            momentum_score,
            pos,
            lstm,
            scales,
            fusion,
            pool_score,
            mu,
            sigma,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TacticalConfig {
        &self.cfg
    }

    /// Checks `x: [B, seq_len, input_dim]` (B ≥ 1) and converts it to the
    /// model's dtype and device.
    fn prepare(&self, x: &Tensor) -> Result<Tensor> {
        let dims = [None, Some(self.cfg.seq_len), Some(self.cfg.input_dim)];
        check_shape("tactical input", x, &dims)?;
        if x.dim(0)? == 0 {
            return Err(Error::Shape {
                what: "tactical input",
                expected: format!("[B ≥ 1, {}, {}]", self.cfg.seq_len, self.cfg.input_dim),
                got: x.dims().to_vec(),
            });
        }
        input_like(x, self.dtype, &self.device)
    }

    /// The momentum scale `[B, seq_len, 1]` of the input `x:
    /// [B, seq_len, input_dim]`: `seq_len · softmax_time(score)`, positive
    /// and averaging 1 over the window; it multiplies the positional table.
    pub fn momentum_scale(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.prepare(x)?;
        self.momentum_scale_prepared(&x)
    }

    fn momentum_scale_prepared(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.cfg.momentum_kernel;
        let t = self.cfg.seq_len;
        let padded = x.pad_with_zeros(1, k / 2, k / 2)?; // [B, T + k − 1, C]
        let taps = (0..k)
            .map(|j| padded.narrow(1, j, t))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let windows = Tensor::cat(&taps, 2)?; // [B, T, k · C]
        let conv = self.momentum_conv.forward(&windows)?; // [B, T, channels]
        let score = self.momentum_score.forward(&conv.tanh()?)?; // [B, T, 1]
        Ok(softmax(&score, 1)?.affine(t as f64, 0.0)?)
    }

    /// One scale of the multi-scale attention on the BiLSTM output
    /// `h: [B, T, W]` → `[B, T, W]`.
    fn scale_forward(&self, s: &ScaleAttention, h: &Tensor) -> Result<Tensor> {
        let (b, t, w) = h.dims3()?;
        let heads = self.cfg.heads;
        let dh = w / heads;
        let avg = s.avg.broadcast_matmul(h)?; // [B, N, W]
        let n = avg.dim(1)?;
        let split = |x: Tensor, len: usize| -> Result<Tensor> {
            Ok(x.reshape((b, len, heads, dh))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(s.q.forward(h)?, t)?;
        let k = split(s.k.forward(&avg)?, n)?;
        let v = split(s.v.forward(&avg)?, n)?;
        let att = attention::attend(&q, &k, &v, self.cfg.attention)?; // [B, heads, T, dh]
        let att = att.transpose(1, 2)?.reshape((b, t, w))?;
        let o = s.o.forward(&att)?;
        let g = candle_nn::ops::sigmoid(&s.gate.forward(&Tensor::cat(&[&o, h], 2)?)?)?;
        // g ⊙ o + (1 − g) ⊙ h
        Ok(h.add(&g.mul(&o.sub(h)?)?)?)
    }
}

/// Int8 inference quantization (see [`crate::quant`]).
impl TacticalEmbedder {
    /// An inference-only copy with every dense layer quantized by
    /// [`QuantPolicy::Auto`]: the input projection, the momentum
    /// convolution and score, all six LSTMs (input and recurrent weights),
    /// every scale's q/k/v/o and gate, the fusion, the pooling score and
    /// both heads. The positional table is not a matmul weight and stays in
    /// the model's dtype (copied), like the biases (copied) and the layer
    /// norms (shared with this model); the averaging matrices are
    /// constants.
    ///
    /// The copy has no trainable weight and no gradient flows through its
    /// dense layers: it cannot be trained ([`TacticalEmbedder::is_quantized`]).
    /// Fails on a model that is already quantized.
    pub fn quantized(&self) -> Result<Self> {
        self.quantized_with(QuantPolicy::Auto)
    }

    /// As [`TacticalEmbedder::quantized`], each layer's scheme chosen by
    /// `policy`.
    pub fn quantized_with(&self, policy: QuantPolicy) -> Result<Self> {
        check_not_quantized("tactical embedder", self.is_quantized())?;
        let q = |l: &Linear| l.quantized_with(policy);
        Ok(Self {
            cfg: self.cfg.clone(),
            dtype: self.dtype,
            device: self.device.clone(),
            proj: q(&self.proj)?,
            proj_norm: self.proj_norm.frozen()?,
            momentum_conv: q(&self.momentum_conv)?,
            momentum_score: q(&self.momentum_score)?,
            pos: quant::frozen(&self.pos)?,
            lstm: self
                .lstm
                .iter()
                .map(|l| {
                    Ok(BiLstmLayer {
                        fwd: l.fwd.quantized_with(policy)?,
                        bwd: l.bwd.quantized_with(policy)?,
                        norm: l.norm.frozen()?,
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            scales: self
                .scales
                .iter()
                .map(|s| {
                    Ok(ScaleAttention {
                        avg: s.avg.clone(),
                        q: q(&s.q)?,
                        k: q(&s.k)?,
                        v: q(&s.v)?,
                        o: q(&s.o)?,
                        gate: q(&s.gate)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            fusion: q(&self.fusion)?,
            pool_score: q(&self.pool_score)?,
            mu: self.mu.quantized_with(policy)?,
            sigma: self.sigma.quantized_with(policy)?,
        })
    }

    /// Whether this is a quantized, inference-only copy.
    pub fn is_quantized(&self) -> bool {
        self.proj.is_quantized()
    }

    /// Bytes of parameter storage as actually held: dense weights in their
    /// stored form, biases, layer norms and the positional table. The
    /// averaging matrices are constants, not parameters, and are not
    /// counted.
    pub fn parameter_bytes(&self) -> usize {
        let (p, w) = (self.cfg.proj_dim, 2 * self.cfg.lstm_hidden_dim);
        let dense: usize = [
            &self.proj,
            &self.momentum_conv,
            &self.momentum_score,
            &self.fusion,
            &self.pool_score,
        ]
        .into_iter()
        .chain(
            self.scales
                .iter()
                .flat_map(|s| [&s.q, &s.k, &s.v, &s.o, &s.gate]),
        )
        .map(Linear::parameter_bytes)
        .sum();
        let lstm: usize = self
            .lstm
            .iter()
            .map(|l| {
                l.fwd.parameter_bytes() + l.bwd.parameter_bytes() + layer_norm_bytes(w, self.dtype)
            })
            .sum();
        dense
            + lstm
            + layer_norm_bytes(p, self.dtype)
            + tensor_bytes(&self.pos)
            + self.mu.parameter_bytes()
            + self.sigma.parameter_bytes()
    }
}

impl Embedder for TacticalEmbedder {
    fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Embedding> {
        let x = self.prepare(x)?;
        let p = self.cfg.dropout;

        let proj = self.proj_norm.forward(&self.proj.forward(&x)?)?.relu()?;
        let proj = ctx.dropout(&proj, p)?;
        let scale = self.momentum_scale_prepared(&x)?; // [B, T, 1]
        let mut h = proj.add(&scale.broadcast_mul(&self.pos)?)?;

        for (l, layer) in self.lstm.iter().enumerate() {
            let bi = Tensor::cat(&[layer.fwd.seq(&h, false)?, layer.bwd.seq(&h, true)?], 2)?;
            let bi = ctx.dropout(&bi, p)?;
            let pre = if l == 0 { bi } else { bi.add(&h)? };
            h = layer.norm.forward(&pre)?;
        }

        let outs = self
            .scales
            .iter()
            .map(|s| self.scale_forward(s, &h))
            .collect::<Result<Vec<_>>>()?;
        let fused = ctx.dropout(&self.fusion.forward(&Tensor::cat(&outs, 2)?)?, p)?;
        let pooled = attention_pool(&fused, &self.pool_score.forward(&fused)?)?; // [B, W]

        let mu = self.mu.forward(&pooled, p, ctx)?;
        let sigma = softplus(&self.sigma.forward(&pooled, p, ctx)?)?.affine(1.0, SIGMA_FLOOR)?;
        Ok(Embedding { mu, sigma })
    }
}

/// The `[t − s + 1, t]` matrix whose row `n` averages steps `n..n + s`
/// (stride-1 moving average over the valid windows), in f32.
fn averaging_matrix(t: usize, s: usize) -> Result<Tensor> {
    let n = t + 1 - s;
    let mut a = vec![0f32; n * t];
    for row in 0..n {
        for col in row..row + s {
            a[row * t + col] = 1.0 / s as f32;
        }
    }
    Ok(Tensor::from_vec(a, (n, t), &Device::Cpu)?)
}

use crate::segments::{no_such_segment, Segmented};

/// The tactical embedder as `lstm_layers + 2` segments: 0 the input
/// projection, momentum scale and positional table (`[B, seq_len,
/// input_dim]` → `[B, seq_len, proj_dim]`); `1..=lstm_layers` one BiLSTM
/// layer each (→ `[B, seq_len, 2 · lstm_hidden_dim]`); the last the
/// multi-scale attention, fusion, pooling and both heads → μ ‖ σ
/// `[B, 2 · embed_dim]` (see [`crate::segments`]).
impl Segmented for TacticalEmbedder {
    fn segment_count(&self) -> usize {
        self.lstm.len() + 2
    }

    fn forward_segment(&self, i: usize, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let p = self.cfg.dropout;
        let last = self.lstm.len() + 1;
        match i {
            0 => {
                let x = self.prepare(x)?;
                let proj = self.proj_norm.forward(&self.proj.forward(&x)?)?.relu()?;
                let proj = ctx.dropout(&proj, p)?;
                let scale = self.momentum_scale_prepared(&x)?; // [B, T, 1]
                Ok(proj.add(&scale.broadcast_mul(&self.pos)?)?)
            }
            i if i < last => {
                self.check_hidden(x, i)?;
                let (l, layer) = (i - 1, &self.lstm[i - 1]);
                let bi = Tensor::cat(&[layer.fwd.seq(x, false)?, layer.bwd.seq(x, true)?], 2)?;
                let bi = ctx.dropout(&bi, p)?;
                let pre = if l == 0 { bi } else { bi.add(x)? };
                Ok(layer.norm.forward(&pre)?)
            }
            i if i == last => Ok(Tensor::cat(&self.forward_last_parts(x, ctx)?, 1)?),
            _ => Err(no_such_segment("tactical embedder", i, last + 1)),
        }
    }

    /// `[μ, σ]`.
    fn forward_last_parts(&self, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Vec<Tensor>> {
        let p = self.cfg.dropout;
        self.check_hidden(x, self.lstm.len() + 1)?;
        let outs = self
            .scales
            .iter()
            .map(|s| self.scale_forward(s, x))
            .collect::<Result<Vec<_>>>()?;
        let fused = ctx.dropout(&self.fusion.forward(&Tensor::cat(&outs, 2)?)?, p)?;
        let pooled = attention_pool(&fused, &self.pool_score.forward(&fused)?)?; // [B, W]
        let mu = self.mu.forward(&pooled, p, ctx)?;
        let sigma = softplus(&self.sigma.forward(&pooled, p, ctx)?)?.affine(1.0, SIGMA_FLOOR)?;
        Ok(vec![mu, sigma])
    }
}

impl TacticalEmbedder {
    /// The input of segment `i ≥ 1`: `[B, seq_len, proj_dim]` for the first
    /// BiLSTM layer, `[B, seq_len, 2 · lstm_hidden_dim]` after it.
    fn check_hidden(&self, x: &Tensor, i: usize) -> Result<()> {
        let width = if i == 1 {
            self.cfg.proj_dim
        } else {
            2 * self.cfg.lstm_hidden_dim
        };
        check_shape(
            "tactical hidden state",
            x,
            &[None, Some(self.cfg.seq_len), Some(width)],
        )
    }
}

/// Unit tests of the internal pieces (the model's behaviour is tested in
/// `tests/tactical.rs`).
#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    #[test]
    fn unfolded_linear_equals_candle_conv1d_with_same_padding() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let (c, o, k, t) = (7, 32, 3, 60);
        let lin = Linear::new(k * c, o, vb.pp("conv")).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, t, c), &dev).unwrap();
        let padded = x.pad_with_zeros(1, k / 2, k / 2).unwrap();
        let taps: Vec<Tensor> = (0..k).map(|j| padded.narrow(1, j, t).unwrap()).collect();
        let ours = lin.forward(&Tensor::cat(&taps, 2).unwrap()).unwrap(); // [B, T, O]
                                                                          // W[o, j·C + i] → conv kernel w[o, i, j].
        let kernel = lin
            .weight()
            .reshape((o, k, c))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let conv = x
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .conv1d(&kernel, k / 2, 1, 1, 1)
            .unwrap()
            .broadcast_add(&lin.bias().unwrap().reshape((1, o, 1)).unwrap())
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let diff = ours
            .sub(&conv)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn averaging_matrix_is_a_stride_one_moving_average() {
        let dev = Device::Cpu;
        let a = averaging_matrix(6, 3).unwrap();
        assert_eq!(a.dims(), &[4, 6]);
        let x = Tensor::new(&[[[1f32], [2.0], [3.0], [4.0], [5.0], [9.0]]], &dev).unwrap();
        let avg = a.broadcast_matmul(&x).unwrap().flatten_all().unwrap();
        let got = avg.to_vec1::<f32>().unwrap();
        let want = [2.0f32, 3.0, 4.0, 6.0];
        assert!(
            got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-6),
            "{got:?}"
        );
        assert_eq!(averaging_matrix(5, 5).unwrap().dims(), &[1, 5]);
    }
}
