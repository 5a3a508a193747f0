//! The GrandModel embedders in candle (issue 5): under construction.

pub mod attention;
mod error;
pub mod layers;
pub mod weights;

pub use error::{Error, Result};
pub use layers::{Embedder, Embedding, ForwardCtx, LayerNorm, Linear, Lstm, McEmbedding};
