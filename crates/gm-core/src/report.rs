//! The cross-crate traits through which a component reports its memory
//! ([`MemoryReport`]) and gives memory back ([`Reclaim`]).

use std::ops::AddAssign;

/// The memory a component holds, split by where it lives.
///
/// `*_used` is what is resident (what the OS counts in RSS or what the
/// counting allocator counts as live); `reserved` is what the component has
/// claimed (allocated capacity plus mapped address space it may touch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Live bytes from the global allocator (Vec, Box, ...).
    pub heap_bytes: u64,
    /// Resident bytes of anonymous memory maps.
    pub anon_bytes: u64,
    /// Resident-or-dirty bytes of file-backed maps (page cache, may be written back).
    pub file_bytes: u64,
    /// Bytes claimed in all: heap capacity + mapped lengths.
    pub reserved_bytes: u64,
}

impl MemoryUsage {
    /// Bytes held in process memory (heap + anonymous maps), the part that
    /// counts against a RAM budget.
    pub fn resident_bytes(&self) -> u64 {
        self.heap_bytes + self.anon_bytes
    }
}

impl AddAssign for MemoryUsage {
    fn add_assign(&mut self, o: Self) {
        self.heap_bytes += o.heap_bytes;
        self.anon_bytes += o.anon_bytes;
        self.file_bytes += o.file_bytes;
        self.reserved_bytes += o.reserved_bytes;
    }
}

/// A component that can say how much memory it holds.
pub trait MemoryReport {
    /// A short stable name for reports (`"replay/uniform"`, `"model/params"`).
    fn component(&self) -> &str;
    /// Its memory now. Must be cheap (no scan proportional to the data).
    fn memory_usage(&self) -> MemoryUsage;
}

/// How hard a [`Reclaim`] call should try.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReclaimLevel {
    /// Give back what is free to give back: caches, slack capacity.
    Cheap,
    /// Also trade speed for memory: compress cold data, shrink pools.
    Moderate,
    /// Everything short of losing data the component promised to keep.
    Emergency,
}

/// What a component gives back, from cheapest to most expensive to lose;
/// a coordinator asks the cheap tiers first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReclaimTier {
    /// Caches and pools that are rebuilt on demand (cost: a later miss).
    Cache,
    /// Data that can be kept in a smaller form (cost: CPU on access).
    Compressible,
    /// Working state whose loss or rebuild is expensive (cost: recompute).
    State,
}

/// A component that can give memory back on request.
///
/// Called from a reclaimer's thread, so it takes `&self`: implementors lock
/// what they need. What [`reclaim`](Reclaim::reclaim) returns is the
/// component's own claim; a coordinator measures the real effect (allocator
/// and RSS before and after) and reports that.
pub trait Reclaim: Send + Sync {
    /// A short stable name for reports.
    fn name(&self) -> &str;
    /// Which tier the memory belongs to.
    fn tier(&self) -> ReclaimTier;
    /// An estimate of what an `Emergency` reclaim could free now, in bytes.
    /// Must be cheap.
    fn reclaimable_bytes(&self) -> u64;
    /// Gives memory back at `level`; returns the bytes the component
    /// believes it freed.
    fn reclaim(&self, level: ReclaimLevel) -> u64;
}
