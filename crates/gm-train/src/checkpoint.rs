//! Gradient checkpointing (issue 6, after PyTorch's
//! `checkpoint_sequential`): trade compute for activation memory by keeping
//! only the inputs of a model's segments during the forward pass and
//! recomputing each segment, one at a time, during the backward pass.
//!
//! # How it works
//!
//! A model is a chain of segments ([`Segmented`], gm-models), grouped into
//! `n` checkpoint segments ([`Segmented::segments`]). For one model,
//! [`CheckpointedForward::run`]:
//!
//! 1. runs every checkpoint segment but the last on the **detached** output
//!    of the one before, keeps that detached input (a few MiB) and detaches
//!    the output, so the autograd graph candle records inside a segment
//!    (every intermediate activation) is dropped as soon as the segment
//!    ends;
//! 2. runs the last checkpoint segment (the *tail*) on its input wrapped in a
//!    [`Var`], keeping its graph, its last segment through
//!    [`Segmented::forward_last_parts`] (the output as its parts, `[μ, σ]`):
//!    the loss is built on the tail's output, and one `loss.backward()`
//!    gives the tail's parameter gradients and the gradient of the tail's
//!    input. The tail is therefore never recomputed (as in
//!    `checkpoint_sequential`).
//!
//! [`CheckpointedBackward::run`] then walks the saved inputs back to front:
//! segment `k` is recomputed from its saved input as a fresh [`Var`], a
//! vector-Jacobian product with the upstream gradient `g` —
//! `(out · g.detach()).sum_all().backward()` (shared/NOTES.md) — gives its
//! parameter gradients, which are accumulated into a [`Grads`], and the
//! gradient of its input, which becomes the upstream gradient of segment
//! `k − 1`. The first segment's input (the model input) gets no gradient.
//! Only one segment's graph is alive at a time.
//!
//! Memory: plain backprop holds every segment's activations at once;
//! checkpointing holds the saved inputs plus one checkpoint segment's
//! activations at a time (the tail's from its forward to the loss
//! backward, then each recomputed segment's in turn). Time: one extra
//! forward of every segment but the tail.
//!
//! # The agent
//!
//! [`agent_checkpointed_grads`] checkpoints each of the four embedders this
//! way; their tails' μ (the first output part) meet in the heads, which are
//! the agent's final segment: the heads run on the tails' μ with their
//! graph, `loss_fn(q)` is differentiated once through heads and tails, and
//! then each embedder's earlier segments are recomputed in turn. The four
//! tails' activations are alive together until that backward. Since the
//! loss reaches the embedders only through μ, the σ heads and the value
//! head get no gradient (`None`), exactly as in backprop through
//! [`AgentNet::q_values`].
//!
//! # Dropout: the same masks on recomputation
//!
//! Each segment gets its own [`ForwardCtx`], made by [`SegmentDropout::ctx`] from
//! the step's seed, the model's *stream* (0 structure, 1 tactical,
//! 2 regime, 3 LVN in the agent; 0 for a single model) and the segment's
//! index (the finest split, so the masks do not depend on how many
//! checkpoint segments are used), afresh for the forward and again for the
//! recomputation: both draw identical masks. The plain-backprop twins
//! ([`plain_grads`], [`agent_plain_grads`]) use the same per-segment
//! contexts, so for the same seed they compute the same function; they
//! differ from a model's own `forward` with one [`ForwardCtx::train`] only
//! in which masks are drawn (with dropout off they are the same).
//!
//! # Exactness
//!
//! The recomputation repeats the same operations on the same values with
//! the same masks, and the VJP multiplies the incoming all-ones gradient by
//! `g`, so the gradients equal plain backprop's up to the order in which
//! floating-point contributions are summed (`tests/checkpoint.rs` measures
//! the difference per model).

use std::ops::Range;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use gm_models::{ForwardCtx, Segmented};

use crate::agent::{AgentNet, ObsBatch};
use crate::grads::Grads;
use crate::{Error, Result};

/// The agent's streams (see [`SegmentDropout::ctx`]): structure, tactical, regime,
/// LVN.
pub const AGENT_STREAMS: [u64; 4] = [0, 1, 2, 3];

/// How each segment's [`ForwardCtx`] is made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SegmentDropout {
    /// Dropout off: every segment runs with [`ForwardCtx::eval`].
    #[default]
    Off,
    /// Dropout on: segment `i` of stream `s` runs with
    /// `ForwardCtx::train(segment_seed(seed, s, i))`. Use a new seed for
    /// every training step.
    On {
        /// The step's seed.
        seed: u64,
    },
}

impl SegmentDropout {
    /// A fresh context for segment `segment` of stream `stream`; two calls
    /// with the same arguments draw the same masks.
    pub fn ctx(self, stream: u64, segment: usize) -> ForwardCtx {
        match self {
            SegmentDropout::Off => ForwardCtx::eval(),
            SegmentDropout::On { seed } => ForwardCtx::train(segment_seed(seed, stream, segment)),
        }
    }
}

/// The dropout seed of one segment: SplitMix64 of `seed` mixed with the
/// stream and segment index. A plain `seed ^ segment` would give segment 0
/// of every embedder the same masks; mixing keeps the streams of all
/// (stream, segment) pairs apart.
pub fn segment_seed(seed: u64, stream: u64, segment: usize) -> u64 {
    splitmix64(seed ^ splitmix64((stream << 32) ^ segment as u64))
}

/// One step of SplitMix64 (Steele, Lea & Flood 2014): a bijective mixer.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Checkpointing options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointConfig {
    /// Checkpoint segments per model (default 4); each model clamps it to
    /// `1..=segment_count()` ([`Segmented::segments`]). 1 is plain backprop
    /// (the whole model is the tail).
    pub segments: usize,
    /// Dropout masks (default off).
    pub dropout: SegmentDropout,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            segments: 4,
            dropout: SegmentDropout::Off,
        }
    }
}

impl CheckpointConfig {
    /// `segments` must be at least 1.
    pub fn validate(&self) -> Result<()> {
        if self.segments == 0 {
            return Err(Error::config("segments", 0, "at least 1"));
        }
        Ok(())
    }
}

/// Runs the segments `range` of `model` in order from `x`, each with its
/// own context from `dropout` (see [`SegmentDropout::ctx`]).
pub fn run_segments<M: Segmented + ?Sized>(
    model: &M,
    range: Range<usize>,
    x: &Tensor,
    dropout: SegmentDropout,
    stream: u64,
) -> Result<Tensor> {
    let mut h = x.clone();
    for i in range {
        h = model.forward_segment(i, &h, &mut dropout.ctx(stream, i))?;
    }
    Ok(h)
}

/// Runs the segments `range` like [`run_segments`], the last of them with
/// [`Segmented::forward_last_parts`]: the model output unpacked into its
/// parts (`range` must end at the model's last segment).
pub fn run_tail<M: Segmented + ?Sized>(
    model: &M,
    range: Range<usize>,
    x: &Tensor,
    dropout: SegmentDropout,
    stream: u64,
) -> Result<Vec<Tensor>> {
    let last = range.end.checked_sub(1).filter(|l| *l >= range.start);
    let last = last.ok_or_else(|| Error::config("tail", "an empty range", "at least 1 segment"))?;
    let h = run_segments(model, range.start..last, x, dropout, stream)?;
    Ok(model.forward_last_parts(&h, &mut dropout.ctx(stream, last))?)
}

/// The forward pass of one checkpointed model: the saved inputs of its
/// checkpoint segments and the tail's output parts with their graph (see
/// the module docs).
#[derive(Debug)]
pub struct CheckpointedForward<'m, M: Segmented + ?Sized> {
    model: &'m M,
    /// The checkpoint segments before the tail.
    plan: Vec<Range<usize>>,
    /// Their inputs, detached (`saved[k]` is the input of `plan[k]`).
    saved: Vec<Tensor>,
    /// The tail's input as a variable; `None` when the tail is the whole
    /// model (its input is the model input).
    tail_input: Option<Var>,
    /// The model's output parts ([`Segmented::forward_last_parts`]), graph
    /// attached.
    parts: Vec<Tensor>,
    dropout: SegmentDropout,
    stream: u64,
}

impl<'m, M: Segmented + ?Sized> CheckpointedForward<'m, M> {
    /// Runs `model` on `input` split into `cfg.segments` checkpoint
    /// segments; `stream` selects the dropout masks ([`SegmentDropout::ctx`]).
    pub fn run(model: &'m M, input: &Tensor, cfg: &CheckpointConfig, stream: u64) -> Result<Self> {
        cfg.validate()?;
        let mut plan = model.segments(cfg.segments);
        let tail = plan.pop().ok_or_else(|| {
            Error::config("segment_count", 0, "a model with at least one segment")
        })?;
        let mut saved = Vec::with_capacity(plan.len());
        let mut x = input.detach();
        for range in &plan {
            let out = run_segments(model, range.clone(), &x, cfg.dropout, stream)?;
            saved.push(x);
            // Detaching drops the segment's graph with `out`.
            x = out.detach();
        }
        let (tail_input, parts) = if plan.is_empty() {
            (None, run_tail(model, tail, &x, cfg.dropout, stream)?)
        } else {
            let var = Var::from_tensor(&x)?;
            drop(x);
            let parts = run_tail(model, tail, var.as_tensor(), cfg.dropout, stream)?;
            (Some(var), parts)
        };
        Ok(Self {
            model,
            plan,
            saved,
            tail_input,
            parts,
            dropout: cfg.dropout,
            stream,
        })
    }

    /// The model's output parts (`[μ, σ]` for an embedder, `[Q, value]` for
    /// the heads; graph attached to the tail): build the loss on them.
    pub fn parts(&self) -> &[Tensor] {
        &self.parts
    }

    /// The parts packed into one tensor (concatenated along dimension 1),
    /// as [`Segmented::forward_segment`] returns them.
    pub fn packed(&self) -> Result<Tensor> {
        Ok(Tensor::cat(&self.parts, 1)?)
    }

    /// Bytes held by the saved segment inputs.
    pub fn saved_bytes(&self) -> usize {
        self.saved
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Takes the gradient of the tail's input from `store` (the result of
    /// the loss's `backward()`) and drops the tail's graph. Drop the loss
    /// and everything else built on [`parts`](Self::parts) before
    /// [`CheckpointedBackward::run`], or their graphs stay alive during the
    /// recomputation. The tail's parameter gradients are in `store`: add
    /// them to the [`Grads`] once ([`Grads::add_store`]).
    pub fn into_backward(self, store: &GradStore) -> Result<CheckpointedBackward<'m, M>> {
        let grad = self
            .tail_input
            .as_ref()
            .and_then(|v| store.get(v.as_tensor()))
            .cloned();
        Ok(CheckpointedBackward {
            model: self.model,
            plan: self.plan,
            saved: self.saved,
            grad,
            dropout: self.dropout,
            stream: self.stream,
        })
    }
}

/// The rest of one model's backward pass: the checkpoint segments before
/// the tail, recomputed back to front (see the module docs).
#[derive(Debug)]
pub struct CheckpointedBackward<'m, M: Segmented + ?Sized> {
    model: &'m M,
    plan: Vec<Range<usize>>,
    saved: Vec<Tensor>,
    /// The gradient of the output of `plan`'s last segment (`None`: the
    /// loss does not reach it, and no parameter before the tail gets a
    /// gradient).
    grad: Option<Tensor>,
    dropout: SegmentDropout,
    stream: u64,
}

impl<M: Segmented + ?Sized> CheckpointedBackward<'_, M> {
    /// Recomputes every saved segment from its input, back to front, and
    /// adds its parameter gradients to `grads`.
    pub fn run(mut self, grads: &mut Grads) -> Result<()> {
        let Some(mut g) = self.grad.take() else {
            return Ok(());
        };
        while let (Some(range), Some(x)) = (self.plan.pop(), self.saved.pop()) {
            // The model input (first segment) needs no gradient: recompute
            // from it as it is; any other input becomes a variable (a copy:
            // the saved tensor is dropped).
            let (input, x) = if self.plan.is_empty() {
                (None, x)
            } else {
                let var = Var::from_tensor(&x)?;
                drop(x);
                let t = var.as_tensor().clone();
                (Some(var), t)
            };
            let out = run_segments(self.model, range, &x, self.dropout, self.stream)?;
            drop(x);
            let store = out.mul(&g.detach())?.sum_all()?.backward()?;
            drop(out);
            grads.add_store(&store, 1.0)?;
            match input.and_then(|v| store.get(v.as_tensor()).cloned()) {
                Some(next) => g = next,
                None => break,
            }
        }
        Ok(())
    }
}

/// The loss's value; an error unless it is a single number.
fn scalar(loss: &Tensor) -> Result<f32> {
    if loss.elem_count() != 1 {
        return Err(Error::config(
            "loss",
            format!("{:?}", loss.dims()),
            "a scalar (one element)",
        ));
    }
    Ok(loss.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?[0])
}

/// Loss and gradients of one model with checkpointing: `loss_fn` gets the
/// model's packed output (μ ‖ σ for an embedder, see
/// [`gm_models::segments`]) and returns a scalar. (Parameters that feed
/// only a part of the output the loss ignores get a zero gradient here, as
/// in [`plain_grads`]; see [`Segmented::forward_last_parts`].) The gradients of every
/// variable of `varmap` the loss reaches, in [`Grads`] order.
pub fn checkpointed_grads<M: Segmented + ?Sized>(
    model: &M,
    varmap: &VarMap,
    input: &Tensor,
    loss_fn: impl FnOnce(&Tensor) -> Result<Tensor>,
    cfg: &CheckpointConfig,
) -> Result<(f32, Grads)> {
    let fwd = CheckpointedForward::run(model, input, cfg, 0)?;
    let loss = loss_fn(&fwd.packed()?)?;
    let value = scalar(&loss)?;
    let store = loss.backward()?;
    drop(loss);
    let mut grads = Grads::empty(varmap)?;
    grads.add_store(&store, 1.0)?;
    let bwd = fwd.into_backward(&store)?;
    drop(store);
    bwd.run(&mut grads)?;
    Ok((value, grads))
}

/// The plain-backprop twin of [`checkpointed_grads`]: the same segments
/// with the same per-segment dropout contexts, one graph, one backward.
pub fn plain_grads<M: Segmented + ?Sized>(
    model: &M,
    varmap: &VarMap,
    input: &Tensor,
    loss_fn: impl FnOnce(&Tensor) -> Result<Tensor>,
    dropout: SegmentDropout,
) -> Result<(f32, Grads)> {
    let out = run_segments(model, 0..model.segment_count(), input, dropout, 0)?;
    let loss = loss_fn(&out)?;
    let value = scalar(&loss)?;
    let grads = Grads::from_store(varmap, &loss.backward()?)?;
    Ok((value, grads))
}

/// μ: the first of an embedder's output parts.
fn mu_of(parts: &[Tensor]) -> Result<Tensor> {
    parts
        .first()
        .cloned()
        .ok_or_else(|| Error::config("embedder output", "no parts", "[μ, σ]"))
}

/// Loss and gradients of the whole agent with checkpointing: each embedder
/// in `cfg.segments` checkpoint segments (streams [`AGENT_STREAMS`]), the
/// heads as the final segment on the four μ's, `loss_fn` on the Q-values
/// `[B, 3]` (columns in `Action::ALL` order) returning a scalar. See the
/// module docs.
pub fn agent_checkpointed_grads(
    net: &AgentNet,
    varmap: &VarMap,
    obs: &ObsBatch,
    loss_fn: impl FnOnce(&Tensor) -> Result<Tensor>,
    cfg: &CheckpointConfig,
) -> Result<(f32, Grads)> {
    let [ss, st, sr, sl] = AGENT_STREAMS;
    let s = CheckpointedForward::run(&net.structure, &obs.structure, cfg, ss)?;
    let t = CheckpointedForward::run(&net.tactical, &obs.tactical, cfg, st)?;
    let r = CheckpointedForward::run(&net.regime, &obs.regime, cfg, sr)?;
    let l = CheckpointedForward::run(&net.lvn, &obs.lvn, cfg, sl)?;
    let (value, store) = {
        let (q, _value_head) = net.heads.forward(
            &mu_of(s.parts())?,
            &mu_of(t.parts())?,
            &mu_of(r.parts())?,
            &mu_of(l.parts())?,
        )?;
        let loss = loss_fn(&q)?;
        (scalar(&loss)?, loss.backward()?)
    };
    let mut grads = Grads::empty(varmap)?;
    grads.add_store(&store, 1.0)?;
    // Drop all four tails' graphs before recomputing anything.
    let backward = (
        s.into_backward(&store)?,
        t.into_backward(&store)?,
        r.into_backward(&store)?,
        l.into_backward(&store)?,
    );
    drop(store);
    backward.0.run(&mut grads)?;
    backward.1.run(&mut grads)?;
    backward.2.run(&mut grads)?;
    backward.3.run(&mut grads)?;
    Ok((value, grads))
}

/// The plain-backprop twin of [`agent_checkpointed_grads`]: every
/// embedder's segments with the same per-segment dropout contexts, the
/// heads on their μ's, one graph, one backward. With [`SegmentDropout::Off`] this
/// is backprop through [`AgentNet::q_values`] in eval mode.
pub fn agent_plain_grads(
    net: &AgentNet,
    varmap: &VarMap,
    obs: &ObsBatch,
    loss_fn: impl FnOnce(&Tensor) -> Result<Tensor>,
    dropout: SegmentDropout,
) -> Result<(f32, Grads)> {
    let [ss, st, sr, sl] = AGENT_STREAMS;
    let all = |m: &dyn Segmented, x: &Tensor, stream: u64| {
        mu_of(&run_tail(m, 0..m.segment_count(), x, dropout, stream)?)
    };
    let (q, _value_head) = net.heads.forward(
        &all(&net.structure, &obs.structure, ss)?,
        &all(&net.tactical, &obs.tactical, st)?,
        &all(&net.regime, &obs.regime, sr)?,
        &all(&net.lvn, &obs.lvn, sl)?,
    )?;
    let loss = loss_fn(&q)?;
    let value = scalar(&loss)?;
    let grads = Grads::from_store(varmap, &loss.backward()?)?;
    Ok((value, grads))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_seeds_differ_across_streams_and_segments() {
        let mut seen = std::collections::HashSet::new();
        for stream in 0..5 {
            for seg in 0..8 {
                assert!(seen.insert(segment_seed(42, stream, seg)));
            }
        }
        assert_eq!(segment_seed(1, 2, 3), segment_seed(1, 2, 3));
        assert_ne!(segment_seed(1, 2, 3), segment_seed(2, 2, 3));
        assert!(!SegmentDropout::Off.ctx(0, 0).is_train());
        assert!(SegmentDropout::On { seed: 1 }.ctx(0, 0).is_train());
        assert!(CheckpointConfig {
            segments: 0,
            ..CheckpointConfig::default()
        }
        .validate()
        .is_err());
    }
}
