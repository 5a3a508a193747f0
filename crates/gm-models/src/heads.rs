//! The GrandModel agent heads: the four embedders' means (structure,
//! tactical, regime, LVN) concatenated into one state vector, read by a
//! dueling Q-value head over the actions {short, flat, long} and by a
//! separate scalar value head (the critic).
//!
//! Also holds the crate-private config checks shared by the structure,
//! regime and LVN configs (`check_dims`, `check_dropout`).
//!
//! # Architecture (defaults, `B` = batch)
//!
//! | step | layer | shape |
//! |---|---|---|
//! | input | `structure_mu` ‖ `tactical_mu` ‖ `regime_mu` ‖ `lvn_mu` | `[B, 64 + 48 + 16 + 8]` = `[B, 136]` |
//! | Q trunk | `Linear` 136→128 → `LayerNorm` → ReLU | `[B, 128]` |
//! | value stream | `Linear` 128→64 → ReLU → `Linear` 64→1 = `V` | `[B, 1]` |
//! | advantage stream | `Linear` 128→64 → ReLU → `Linear` 64→3 = `A` | `[B, 3]` |
//! | Q | `V + A − mean(A)` (over actions) | `[B, 3]` |
//! | value head | `Linear` 136→128 → `LayerNorm` → ReLU → `Linear` 128→64 → ReLU → `Linear` 64→1 | `[B, 1]` |
//!
//! The value head shares no parameter with the Q head. Q's columns are in
//! the order of [`Action::ALL`] (short, flat, long).
//!
//! Parameters (defaults): Q head 34 564 (trunk 17 792, value stream 8 321,
//! advantage stream 8 451), value head 26 113; **60 677** in all
//! ([`HeadsConfig::parameter_count`]).
//!
//! Variable names under the builder's prefix: `q.trunk`, `q.trunk_ln`,
//! `q.value.{0,1}`, `q.advantage.{0,1}`, `value.{0,1,2}`, `value.ln`.
//!
//! Training note: the dueling combination makes `Σ_a Q(s, a)` independent
//! of `A`, so a loss that only sums Q gives the advantage stream exactly
//! zero gradient. Real TD losses pick one action's Q and are fine; tests
//! must weight the actions unequally.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::layers::{check_shape, input_like, LayerNorm, Linear};
use crate::quant::{check_not_quantized, layer_norm_bytes, QuantPolicy};
use crate::{Error, Result};

/// Fails with [`Error::Config`] naming the first of `dims` that is zero.
pub(crate) fn check_dims(dims: &[(&'static str, usize)]) -> Result<()> {
    match dims.iter().find(|(_, d)| *d == 0) {
        Some((key, d)) => Err(Error::config(key, d, "at least 1")),
        None => Ok(()),
    }
}

/// Fails with [`Error::Config`] unless `p` is a probability in `[0, 1)`.
pub(crate) fn check_dropout(p: f32) -> Result<()> {
    if (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err(Error::config("dropout", p, "a probability in [0, 1)"))
    }
}

/// The agent's actions, in the order of the Q head's columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Hold a short position.
    Short,
    /// Hold no position.
    Flat,
    /// Hold a long position.
    Long,
}

impl Action {
    /// Every action, in Q-column order.
    pub const ALL: [Action; 3] = [Action::Short, Action::Flat, Action::Long];

    /// This action's column in the Q output.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Dimensions of [`AgentHeads`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadsConfig {
    /// The structure embedder's μ (default 64).
    pub structure_dim: usize,
    /// The tactical embedder's μ (default 48).
    pub tactical_dim: usize,
    /// The regime embedder's μ (default 16).
    pub regime_dim: usize,
    /// The LVN embedder's μ (default 8).
    pub lvn_dim: usize,
    /// Width of the Q trunk and of the value head's first layer (default 128).
    pub hidden_dim: usize,
    /// Width of the value/advantage streams and of the value head's second
    /// layer (default 64).
    pub stream_dim: usize,
}

impl Default for HeadsConfig {
    fn default() -> Self {
        Self {
            structure_dim: 64,
            tactical_dim: 48,
            regime_dim: 16,
            lvn_dim: 8,
            hidden_dim: 128,
            stream_dim: 64,
        }
    }
}

impl HeadsConfig {
    /// Every dimension must be at least 1.
    pub fn validate(&self) -> Result<()> {
        check_dims(&[
            ("structure_dim", self.structure_dim),
            ("tactical_dim", self.tactical_dim),
            ("regime_dim", self.regime_dim),
            ("lvn_dim", self.lvn_dim),
            ("hidden_dim", self.hidden_dim),
            ("stream_dim", self.stream_dim),
        ])
    }

    /// The concatenated state width (default 136).
    pub fn state_dim(&self) -> usize {
        self.structure_dim + self.tactical_dim + self.regime_dim + self.lvn_dim
    }

    /// Trainable parameters of the heads built from this config.
    pub fn parameter_count(&self) -> usize {
        let lin = |i: usize, o: usize| i * o + o;
        let (s, h, m, a) = (
            self.state_dim(),
            self.hidden_dim,
            self.stream_dim,
            Action::ALL.len(),
        );
        let q = lin(s, h) + 2 * h + lin(h, m) + lin(m, 1) + lin(h, m) + lin(m, a);
        let value = lin(s, h) + 2 * h + lin(h, m) + lin(m, 1);
        q + value
    }
}

/// The dueling Q head and the value head over the four embedders' means.
#[derive(Debug, Clone)]
pub struct AgentHeads {
    cfg: HeadsConfig,
    q_trunk: Linear,
    q_trunk_ln: LayerNorm,
    q_value: [Linear; 2],
    q_advantage: [Linear; 2],
    value: [Linear; 3],
    value_ln: LayerNorm,
    dtype: DType,
    device: Device,
}

impl AgentHeads {
    /// Builds the heads under `vb` (its dtype and device are the model's).
    pub fn new(cfg: HeadsConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (s, h, m) = (cfg.state_dim(), cfg.hidden_dim, cfg.stream_dim);
        let q = vb.pp("q");
        let v = vb.pp("value");
        Ok(Self {
            q_trunk: Linear::new(s, h, q.pp("trunk"))?,
            q_trunk_ln: LayerNorm::new(h, q.pp("trunk_ln"))?,
            q_value: [
                Linear::new(h, m, q.pp("value").pp(0))?,
                Linear::new(m, 1, q.pp("value").pp(1))?,
            ],
            q_advantage: [
                Linear::new(h, m, q.pp("advantage").pp(0))?,
                Linear::new(m, Action::ALL.len(), q.pp("advantage").pp(1))?,
            ],
            value: [
                Linear::new(s, h, v.pp(0))?,
                Linear::new(h, m, v.pp(1))?,
                Linear::new(m, 1, v.pp(2))?,
            ],
            value_ln: LayerNorm::new(h, v.pp("ln"))?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &HeadsConfig {
        &self.cfg
    }

    /// Concatenates the four means (`[B, 64]`, `[B, 48]`, `[B, 16]`,
    /// `[B, 8]` by default; all with the same `B`) into `[B, 136]`.
    pub fn state(
        &self,
        structure_mu: &Tensor,
        tactical_mu: &Tensor,
        regime_mu: &Tensor,
        lvn_mu: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        check_shape("structure_mu", structure_mu, &[None, Some(c.structure_dim)])?;
        let b = Some(structure_mu.dim(0)?);
        check_shape("tactical_mu", tactical_mu, &[b, Some(c.tactical_dim)])?;
        check_shape("regime_mu", regime_mu, &[b, Some(c.regime_dim)])?;
        check_shape("lvn_mu", lvn_mu, &[b, Some(c.lvn_dim)])?;
        let parts = [structure_mu, tactical_mu, regime_mu, lvn_mu]
            .into_iter()
            .map(|t| input_like(t, self.dtype, &self.device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 1)?)
    }

    /// `(q [B, 3], value [B, 1])` from the four embedders' means (see
    /// [`AgentHeads::state`] for the expected shapes). Q's columns follow
    /// [`Action::ALL`].
    pub fn forward(
        &self,
        structure_mu: &Tensor,
        tactical_mu: &Tensor,
        regime_mu: &Tensor,
        lvn_mu: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let s = self.state(structure_mu, tactical_mu, regime_mu, lvn_mu)?;
        let t = self
            .q_trunk_ln
            .forward(&self.q_trunk.forward(&s)?)?
            .relu()?;
        let v = self.q_value[1].forward(&self.q_value[0].forward(&t)?.relu()?)?;
        let a = self.q_advantage[1].forward(&self.q_advantage[0].forward(&t)?.relu()?)?;
        let q = a.broadcast_sub(&a.mean_keepdim(1)?)?.broadcast_add(&v)?;
        let h = self.value_ln.forward(&self.value[0].forward(&s)?)?.relu()?;
        let h = self.value[1].forward(&h)?.relu()?;
        let value = self.value[2].forward(&h)?;
        Ok((q, value))
    }
}

/// Int8 inference quantization (see [`crate::quant`]).
impl AgentHeads {
    /// An inference-only copy with every dense layer of the Q head and the
    /// value head quantized by [`QuantPolicy::Auto`]. The layer norms
    /// (shared with this model) and the biases (copied) stay in the model's
    /// dtype.
    ///
    /// The copy has no trainable weight and no gradient flows through its
    /// dense layers: it cannot be trained ([`AgentHeads::is_quantized`]).
    /// Fails on heads that are already quantized.
    pub fn quantized(&self) -> Result<Self> {
        self.quantized_with(QuantPolicy::Auto)
    }

    /// As [`AgentHeads::quantized`], each layer's scheme chosen by
    /// `policy`.
    pub fn quantized_with(&self, policy: QuantPolicy) -> Result<Self> {
        check_not_quantized("agent heads", self.is_quantized())?;
        let q = |l: &Linear| l.quantized_with(policy);
        Ok(Self {
            cfg: self.cfg.clone(),
            q_trunk: q(&self.q_trunk)?,
            q_trunk_ln: self.q_trunk_ln.frozen()?,
            q_value: [q(&self.q_value[0])?, q(&self.q_value[1])?],
            q_advantage: [q(&self.q_advantage[0])?, q(&self.q_advantage[1])?],
            value: [q(&self.value[0])?, q(&self.value[1])?, q(&self.value[2])?],
            value_ln: self.value_ln.frozen()?,
            dtype: self.dtype,
            device: self.device.clone(),
        })
    }

    /// Whether this is a quantized, inference-only copy.
    pub fn is_quantized(&self) -> bool {
        self.q_trunk.is_quantized()
    }

    /// Bytes of parameter storage as actually held (dense weights in their
    /// stored form, biases, both layer norms).
    pub fn parameter_bytes(&self) -> usize {
        let dense: usize = std::iter::once(&self.q_trunk)
            .chain(&self.q_value)
            .chain(&self.q_advantage)
            .chain(&self.value)
            .map(Linear::parameter_bytes)
            .sum();
        dense + 2 * layer_norm_bytes(self.cfg.hidden_dim, self.dtype)
    }
}

use crate::layers::ForwardCtx;
use crate::segments::{no_such_segment, Segmented};

/// The heads as one segment: the state `[B, state_dim]` (the four μ's
/// concatenated, as [`AgentHeads::state`] builds it) → Q ‖ value
/// `[B, 3 + 1]` (see [`crate::segments`] for why there is no finer split).
/// The heads have no dropout; `ctx` is not used.
impl Segmented for AgentHeads {
    fn segment_count(&self) -> usize {
        1
    }

    fn forward_segment(&self, i: usize, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        if i != 0 {
            return Err(no_such_segment("agent heads", i, 1));
        }
        Ok(Tensor::cat(&self.forward_last_parts(x, ctx)?, 1)?)
    }

    /// `[Q, value]`.
    fn forward_last_parts(&self, x: &Tensor, _ctx: &mut ForwardCtx) -> Result<Vec<Tensor>> {
        let c = &self.cfg;
        check_shape("heads state", x, &[None, Some(c.state_dim())])?;
        let mut off = 0;
        let mut part = |w: usize| {
            let t = x.narrow(1, off, w);
            off += w;
            t
        };
        let (s, t) = (part(c.structure_dim)?, part(c.tactical_dim)?);
        let (r, l) = (part(c.regime_dim)?, part(c.lvn_dim)?);
        let (q, value) = self.forward(&s, &t, &r, &l)?;
        Ok(vec![q, value])
    }
}
