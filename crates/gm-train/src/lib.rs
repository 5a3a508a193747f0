//! Train the GrandModel agent inside a memory budget (tier 2): under
//! construction (issue 6).

pub mod agent;
mod error;
pub mod grads;
pub mod optim;

pub use agent::{AgentConfig, AgentNet, ObsBatch, OBS_PARTS};
pub use error::{Error, Result};
pub use grads::Grads;
pub use optim::{AdamW, AdamWConfig};
