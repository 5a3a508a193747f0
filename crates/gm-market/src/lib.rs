//! Market data for GrandModel (tier 1): under construction (issue 4).

mod bar;
mod error;
mod norm;

pub use bar::{Bar, BarInterval, Regime};
pub use error::{Error, Result};
pub use norm::RunningNorm;
