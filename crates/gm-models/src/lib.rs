//! The GrandModel embedders in candle (issue 5): under construction.

mod error;
pub mod layers;
pub mod weights;

pub use error::{Error, Result};
pub use layers::{Embedder, Embedding, ForwardCtx, LayerNorm, McEmbedding};
