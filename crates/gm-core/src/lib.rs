//! Shared vocabulary of the GrandModel workspace (tier 0).
//!
//! Every other crate may depend on this one; this one depends on no other
//! workspace crate, and holds **no behaviour beyond the vocabulary itself**:
//!
//! - [`ByteSize`]: a byte count that formats and parses as `512 KiB`, `1.5 GiB`.
//! - [`MemoryBudget`]: a byte limit with warning/critical fractions and the
//!   [`Pressure`] level of a usage against it.
//! - [`MemoryReport`] / [`MemoryUsage`]: how a component reports the bytes it
//!   uses and reserves, split by where they live (heap, anonymous maps, files).
//! - [`Reclaim`] / [`ReclaimLevel`] / [`ReclaimTier`]: how a component gives
//!   memory back when the system asks, and how expensive that memory is.
//! - [`Device`]: which device a tensor or buffer lives on.
//!
//! Invariants: no workspace dependencies, no threads, no I/O, no global state.

mod budget;
mod bytes;
mod device;
mod report;

pub use budget::{BudgetError, MemoryBudget, Pressure};
pub use bytes::{ByteSize, ParseByteSizeError};
pub use device::Device;
pub use report::{MemoryReport, MemoryUsage, Reclaim, ReclaimLevel, ReclaimTier};
