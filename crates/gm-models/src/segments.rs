//! [`Segmented`]: a model seen as a chain of segments, each a function of
//! the previous one's output, for gradient checkpointing (gm-train's
//! `checkpoint` module, after PyTorch's `checkpoint_sequential`).
//!
//! A model splits at its natural boundaries into
//! [`Segmented::segment_count`] segments. Segment 0 takes the model's
//! input; each later segment takes the previous segment's output (one
//! tensor); the last segment returns the model's output packed as one
//! tensor:
//!
//! | model | segments | packed output |
//! |---|---|---|
//! | [`StructureEmbedder`](crate::StructureEmbedder) | `blocks + 2`: input projection + positions + dropout · one per transformer block · final norm + pooling + μ/σ heads | μ ‖ σ `[B, 2 · out_dim]` |
//! | [`TacticalEmbedder`](crate::TacticalEmbedder) | `lstm_layers + 2`: input projection + momentum scale + positions · one per BiLSTM layer · multi-scale attention + fusion + pooling + μ/σ heads | μ ‖ σ `[B, 2 · embed_dim]` |
//! | [`RegimeEmbedder`](crate::RegimeEmbedder) | 2: dimension attention + transition detector + LSTM → fusion input `[B, token_dim + lstm_hidden]` · fusion + μ/σ heads | μ ‖ σ `[B, 2 · out_dim]` |
//! | [`LvnEmbedder`](crate::LvnEmbedder) | 2: trunk → `[B, hidden_dim]` · μ/σ heads | μ ‖ σ `[B, 2 · out_dim]` |
//! | [`AgentHeads`](crate::AgentHeads) | 1: the state `[B, state_dim]` (the four μ's concatenated, [`AgentHeads::state`](crate::AgentHeads::state)) → Q and value | Q ‖ value `[B, 3 + 1]` |
//!
//! [`unpack_embedding`] splits an embedder's packed output back into an
//! [`Embedding`]. For the heads, Q is `out.narrow(1, 0, 3)` (columns in
//! [`Action::ALL`](crate::Action::ALL) order) and the value
//! `out.narrow(1, 3, 1)`. [`Segmented::forward_last_parts`] runs the last
//! segment returning the parts unpacked (`[μ, σ]`, `[Q, value]`), for
//! consumers of one part: differentiating through the packing `cat` would
//! give the other part's parameters a zero gradient where the model's own
//! `forward` gives them none.
//!
//! The heads have a single segment for the same reason: any split inside
//! them would pass on a tensor part of which (the value stream's, or the Q
//! trunk's) reaches only one of the two outputs, so a loss on Q alone would
//! give the value head a zero gradient instead of none.
//!
//! # Invariants (tested)
//!
//! - Running every segment in order with **one** [`ForwardCtx`]
//!   ([`Segmented::forward_segments`]) gives exactly the model's own
//!   `forward` (packed), dropout masks included: the segments draw from the
//!   context in the order `forward` does.
//! - A segment draws all its dropout masks from the context it is given,
//!   and from nothing else, so a segment re-run with an identically seeded
//!   context reproduces its output bit for bit (what checkpointing's
//!   recomputation relies on).
//! - Every segment but the first checks the shape of its input.

use std::ops::Range;

use candle_core::Tensor;

use crate::layers::{Embedding, ForwardCtx};
use crate::{Error, Result};

/// A model as a chain of segments (see the module docs for each model's
/// boundaries and output packing).
pub trait Segmented {
    /// Segments at the finest split (at least 1).
    fn segment_count(&self) -> usize;

    /// Runs segment `i` on `x`: the model input for `i == 0`, else the
    /// output of segment `i − 1`. Dropout masks come from `ctx`. The last
    /// segment returns the packed model output. An error for
    /// `i >= segment_count()` or an input of the wrong shape.
    fn forward_segment(&self, i: usize, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor>;

    /// The last segment (`x` is the output of segment
    /// `segment_count() − 2`, or the model input for a one-segment model)
    /// with its output unpacked into its parts: `[μ, σ]` for an embedder,
    /// `[Q, value]` for the heads; concatenated along dimension 1 they are
    /// exactly [`forward_segment`](Self::forward_segment)'s packed output.
    ///
    /// Use this where only some parts are consumed (the agent reads μ
    /// alone): the parameters that only feed an unused part then get **no**
    /// gradient, as with the model's own `forward`, whereas differentiating
    /// through the packed tensor (a `cat`) would give them a zero gradient,
    /// which an optimizer with weight decay treats differently. The default
    /// returns the packed output as a single part.
    fn forward_last_parts(&self, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Vec<Tensor>> {
        let last = self.segment_count().saturating_sub(1);
        Ok(vec![self.forward_segment(last, x, ctx)?])
    }

    /// The segments grouped into `n` contiguous runs (checkpoint segments)
    /// by [`group_evenly`]: `n` is clamped to `1..=segment_count()`, and
    /// when the count does not divide evenly the first runs get one segment
    /// more. With the defaults and `n = 4`: structure (5 segments)
    /// `input + block 0 | block 1 | block 2 | pool + heads`; tactical (5)
    /// `input + BiLSTM 1 | BiLSTM 2 | BiLSTM 3 | multi-scale + heads`;
    /// regime and LVN (2) one segment each; heads (1) one.
    fn segments(&self, n: usize) -> Vec<Range<usize>> {
        group_evenly(self.segment_count(), n)
    }

    /// Runs every segment in order with the one context `ctx`: the packed
    /// output of the model's own `forward` with that context.
    fn forward_segments(&self, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let mut h = self.forward_segment(0, x, ctx)?;
        for i in 1..self.segment_count() {
            h = self.forward_segment(i, &h, ctx)?;
        }
        Ok(h)
    }
}

/// Splits `count` segments into `n` contiguous runs covering `0..count`,
/// `n` clamped to `1..=count` (an empty list when `count == 0`); the first
/// `count % n` runs are one segment longer than the rest.
pub fn group_evenly(count: usize, n: usize) -> Vec<Range<usize>> {
    if count == 0 {
        return Vec::new();
    }
    let n = n.clamp(1, count);
    let (base, extra) = (count / n, count % n);
    let mut start = 0;
    (0..n)
        .map(|k| {
            let len = base + usize::from(k < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// Packs an [`Embedding`] as μ ‖ σ `[B, 2 · dim]` (the last segment's
/// output of every embedder).
pub fn pack_embedding(e: &Embedding) -> Result<Tensor> {
    Ok(Tensor::cat(&[&e.mu, &e.sigma], 1)?)
}

/// Splits a packed μ ‖ σ `[B, 2 · dim]` into its halves (views, no copy).
pub fn unpack_embedding(packed: &Tensor) -> Result<Embedding> {
    let (_, w) = packed.dims2()?;
    if w % 2 != 0 {
        return Err(Error::Shape {
            what: "packed embedding",
            expected: "[B, 2 · dim]".to_string(),
            got: packed.dims().to_vec(),
        });
    }
    Ok(Embedding {
        mu: packed.narrow(1, 0, w / 2)?,
        sigma: packed.narrow(1, w / 2, w / 2)?,
    })
}

/// The error for a segment index past the model's last segment.
pub(crate) fn no_such_segment(model: &'static str, i: usize, count: usize) -> Error {
    Error::config(
        "segment",
        i,
        format!("a segment of the {model}: 0..{count}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::init_seeded;
    use crate::{
        AgentHeads, Embedder, HeadsConfig, LvnConfig, LvnEmbedder, RegimeConfig, RegimeEmbedder,
        StructureConfig, StructureEmbedder, TacticalConfig, TacticalEmbedder,
    };
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    #[test]
    fn groups_are_contiguous_balanced_and_clamped() {
        assert_eq!(group_evenly(5, 4), vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(group_evenly(5, 2), vec![0..3, 3..5]);
        assert_eq!(group_evenly(2, 4), vec![0..1, 1..2]);
        assert_eq!(group_evenly(3, 0), vec![0..3]);
        assert_eq!(group_evenly(1, 9), vec![0..1]);
        assert!(group_evenly(0, 4).is_empty());
    }

    fn vb(vm: &VarMap) -> VarBuilder<'static> {
        VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu)
    }

    fn input(dims: &[usize]) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn assert_same(a: &Tensor, b: &Tensor) {
        assert_eq!(a.dims(), b.dims());
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b, "segments differ from forward");
    }

    /// The segments with one context equal `forward` with an identical
    /// one, bit for bit, with dropout on and off.
    fn check_embedder(m: &(impl Embedder + Segmented), x: &Tensor) {
        for ctx in [ForwardCtx::eval(), ForwardCtx::train(11)] {
            let direct = pack_embedding(&m.forward(x, &mut ctx.clone()).unwrap()).unwrap();
            let segs = m.forward_segments(x, &mut ctx.clone()).unwrap();
            assert_same(&direct, &segs);
            let back = unpack_embedding(&segs).unwrap();
            assert_eq!(back.mu.dims(), back.sigma.dims());
            // The unpacked last segment gives the same parts.
            let last = m.segment_count() - 1;
            let mut c = ctx.clone();
            let mut h = x.clone();
            for i in 0..last {
                h = m.forward_segment(i, &h, &mut c).unwrap();
            }
            let parts = m.forward_last_parts(&h, &mut c).unwrap();
            assert_eq!(parts.len(), 2);
            assert_same(&parts[0], &back.mu);
            assert_same(&parts[1], &back.sigma);
        }
        let count = m.segment_count();
        assert!(m
            .forward_segment(count, x, &mut ForwardCtx::eval())
            .is_err());
        if count > 1 {
            // A later segment rejects the model input.
            assert!(m.forward_segment(1, x, &mut ForwardCtx::eval()).is_err());
        }
    }

    #[test]
    fn every_embedder_equals_its_segments() {
        let vm = VarMap::new();
        let s = StructureEmbedder::new(
            StructureConfig {
                model_dim: 16,
                heads: 2,
                blocks: 2,
                ffn_dim: 32,
                head_hidden_dim: 8,
                out_dim: 4,
                dropout: 0.3,
                ..StructureConfig::default()
            },
            vb(&vm).pp("s"),
        )
        .unwrap();
        let t = TacticalEmbedder::new(
            TacticalConfig {
                seq_len: 12,
                proj_dim: 8,
                momentum_channels: 4,
                lstm_layers: 2,
                lstm_hidden_dim: 4,
                scales: vec![3, 5],
                heads: 2,
                head_hidden_dim: 8,
                embed_dim: 4,
                dropout: 0.3,
                ..TacticalConfig::default()
            },
            vb(&vm).pp("t"),
        )
        .unwrap();
        let r = RegimeEmbedder::new(
            RegimeConfig {
                lstm_layers: 2,
                dropout: 0.3,
                ..RegimeConfig::default()
            },
            vb(&vm).pp("r"),
        )
        .unwrap();
        let l = LvnEmbedder::new(
            LvnConfig {
                dropout: 0.3,
                ..LvnConfig::default()
            },
            vb(&vm).pp("l"),
        )
        .unwrap();
        init_seeded(&vm, 5).unwrap();
        assert_eq!(s.segment_count(), 4);
        assert_eq!(t.segment_count(), 4);
        assert_eq!(r.segment_count(), 2);
        assert_eq!(l.segment_count(), 2);
        check_embedder(&s, &input(&[3, 48, 8]));
        check_embedder(&t, &input(&[3, 12, 7]));
        check_embedder(&r, &input(&[3, 21, 8]));
        check_embedder(&l, &input(&[3, 5]));
    }

    #[test]
    fn heads_equal_their_segment() {
        let vm = VarMap::new();
        let cfg = HeadsConfig::default();
        let h = AgentHeads::new(cfg.clone(), vb(&vm)).unwrap();
        init_seeded(&vm, 2).unwrap();
        let parts = [
            input(&[3, cfg.structure_dim]),
            input(&[3, cfg.tactical_dim]),
            input(&[3, cfg.regime_dim]),
            input(&[3, cfg.lvn_dim]),
        ];
        let (q, v) = h
            .forward(&parts[0], &parts[1], &parts[2], &parts[3])
            .unwrap();
        let state = h.state(&parts[0], &parts[1], &parts[2], &parts[3]).unwrap();
        let out = h.forward_segments(&state, &mut ForwardCtx::eval()).unwrap();
        assert_same(&Tensor::cat(&[&q, &v], 1).unwrap(), &out);
        let parts = h
            .forward_last_parts(&state, &mut ForwardCtx::eval())
            .unwrap();
        assert_same(&parts[0], &q);
        assert_same(&parts[1], &v);
        assert_eq!(h.segment_count(), 1);
        assert_eq!(h.segments(4), vec![0..1]);
        assert!(h
            .forward_segment(0, &input(&[3, 7]), &mut ForwardCtx::eval())
            .is_err());
    }
}
