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

/// What a [`Reclaim`] call gave back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reclaimed {
    /// Resident bytes before the call.
    pub before_bytes: u64,
    /// Resident bytes after the call.
    pub after_bytes: u64,
}

impl Reclaimed {
    /// Bytes freed (0 if the call grew the component).
    pub fn freed_bytes(&self) -> u64 {
        self.before_bytes.saturating_sub(self.after_bytes)
    }
}

/// A component that can give memory back on request. Called from the
/// reclaimer's thread, so it takes `&self`: implementors lock what they need.
pub trait Reclaim: MemoryReport + Send + Sync {
    /// Give back memory at `level`; report resident bytes before and after.
    fn reclaim(&self, level: ReclaimLevel) -> Reclaimed;
}
