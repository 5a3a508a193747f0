//! The GrandModel embedders and agent heads in candle (tier 2), with three
//! attention kernels and int8 inference quantization.
//!
//! # Key types
//! - [`StructureEmbedder`] (`[B, 48, 8]` → 64 + 64: pre-norm transformer,
//!   621 k parameters), [`TacticalEmbedder`] (`[B, 60, 7]` → 48 + 48:
//!   momentum-scaled positions, 3 bidirectional LSTM layers, multi-scale
//!   attention pooling, 2.52 M), [`RegimeEmbedder`] (8-D + 20-step history →
//!   16 + 16, 20 k), [`LvnEmbedder`] (5-D → 8 + 8, 400); each returns an
//!   [`Embedding`] (μ and a softplus σ) and supports Monte-Carlo dropout
//!   ([`Embedder::mc_dropout`]). Architectures layer by layer are on each
//!   module.
//! - [`AgentHeads`]: the four μ's (136) → dueling Q over
//!   {short, flat, long} and a value head.
//! - [`attention`]: dense reference, memory-efficient (blocked online
//!   softmax, backward by per-block recomputation: memory linear in N) and
//!   sparse (local window + strided + global tokens, O(N·w)), all
//!   differentiable, selected by [`attention::AttentionKind`].
//! - [`cuda`]: the sparse-attention forward and backward as CUDA C kernels
//!   (feature `cuda`, NVRTC at first use, cudarc) — the GPU twin of the CPU
//!   kernel on host slices, not wired into candle's autograd; without a
//!   driver every entry is [`Error::NoCuda`].
//! - [`device`]: a [`gm_core::Device`] as a candle device; candle's CUDA
//!   backend is the opt-in feature `candle-cuda` (the models are
//!   device-neutral; on CUDA, dense attention only), with the device's free
//!   memory from the driver.
//! - [`quant`]: int8 inference copies (`quantized()` on every model):
//!   per-channel int8 by default, Q8_0 on request; 0.26–0.45× the f32
//!   parameter bytes.
//! - [`segments`]: [`Segmented`], every model as a chain of segments
//!   (natural boundaries, output packed as one tensor) for gradient
//!   checkpointing in gm-train.
//! - [`layers`]: the gradient-safe building blocks (NOTES.md: candle's
//!   `softmax_last_dim` and fast `LayerNorm` drop gradients), seeded
//!   dropout ([`ForwardCtx`]); [`init::init_seeded`] (candle cannot seed its
//!   CPU generator); [`weights`]: safetensors save/load naming a missing or
//!   mis-shaped tensor.
//!
//! # Invariants
//! - Every trainable variable of every model receives a gradient (tests).
//! - Bad input shapes, configs and weight files are errors, not panics.
//! - Tier 2: depends on gm-core only (not on gm-market: shapes are the
//!   contract).

pub mod attention;
pub mod cuda;
pub mod device;
mod error;
pub mod heads;
pub mod init;
pub mod layers;
pub mod lvn;
pub mod quant;
pub mod regime;
pub mod segments;
pub mod structure;
pub mod tactical;
pub mod weights;

pub use cuda::{AttentionDims, SparseAttentionCuda};
pub use error::{Error, Result};
pub use heads::{Action, AgentHeads, HeadsConfig};
pub use layers::{Embedder, Embedding, ForwardCtx, LayerNorm, Linear, Lstm, McEmbedding};
pub use lvn::{LvnConfig, LvnEmbedder};
pub use quant::{QuantPolicy, QuantScheme};
pub use regime::{RegimeConfig, RegimeEmbedder, RegimeOutput};
pub use segments::Segmented;
pub use structure::{StructureConfig, StructureEmbedder};
pub use tactical::{TacticalConfig, TacticalEmbedder};
