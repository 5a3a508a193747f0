//! Scoped measurements: [`measure`] (process-wide) and [`measure_thread`]
//! (calling thread only).

use std::fmt;
use std::time::{Duration, Instant};

use gm_core::ByteSize;

use crate::counters::{self, assert_active, stats, thread_stats};

/// What a closure did to the process-wide counters; see [`measure`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Measurement {
    /// Highest process-wide live bytes during the closure, minus live bytes
    /// at its start (0 if it never rose above the start).
    pub peak_delta_bytes: u64,
    /// Live bytes at the end minus live bytes at the start: what the closure
    /// left allocated (its return value included); negative if it freed more
    /// than it allocated.
    pub retained_bytes: i64,
    /// Allocations (`alloc`, `alloc_zeroed`, `realloc`) during the closure.
    pub allocations: u64,
    /// How many of `allocations` were `realloc`s.
    pub reallocations: u64,
    /// Blocks freed during the closure.
    pub frees: u64,
    /// Bytes handed out during the closure (new blocks plus realloc growth).
    pub allocated_bytes: u64,
    /// Bytes given back during the closure (freed blocks plus realloc
    /// shrinkage).
    pub freed_bytes: u64,
    /// Wall-clock time the closure took.
    pub duration: Duration,
}

impl fmt::Display for Measurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peak +{}, retained {}, allocated {} in {} allocations, {} frees, {:?}",
            ByteSize(self.peak_delta_bytes),
            Signed(self.retained_bytes),
            ByteSize(self.allocated_bytes),
            self.allocations,
            self.frees,
            self.duration,
        )
    }
}

/// What a closure did on the calling thread; see [`measure_thread`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadMeasurement {
    /// Allocations (`alloc`, `alloc_zeroed`, `realloc`) on this thread during
    /// the closure.
    pub allocations: u64,
    /// How many of `allocations` were `realloc`s.
    pub reallocations: u64,
    /// Blocks freed on this thread during the closure (whoever allocated
    /// them).
    pub frees: u64,
    /// Bytes handed out on this thread (new blocks plus realloc growth).
    pub allocated_bytes: u64,
    /// Bytes given back on this thread (freed blocks plus realloc shrinkage).
    pub freed_bytes: u64,
    /// `allocated_bytes - freed_bytes`: what the closure left allocated;
    /// negative if it freed blocks allocated before it or by other threads.
    pub net_bytes: i64,
    /// Highest running `allocated - freed` on this thread during the closure,
    /// counted from its start (0 if it never rose above the start).
    pub peak_net_bytes: u64,
    /// Wall-clock time the closure took.
    pub duration: Duration,
}

impl fmt::Display for ThreadMeasurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "thread peak +{}, net {}, allocated {} in {} allocations, {} frees, {:?}",
            ByteSize(self.peak_net_bytes),
            Signed(self.net_bytes),
            ByteSize(self.allocated_bytes),
            self.allocations,
            self.frees,
            self.duration,
        )
    }
}

/// A signed byte count with binary units: `+1.00 KiB`, `-12 B`.
struct Signed(i64);

impl fmt::Display for Signed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { '-' } else { '+' };
        write!(f, "{sign}{}", ByteSize(self.0.unsigned_abs()))
    }
}

/// Runs `f` and reports what it did to the **process-wide** counters.
///
/// The peak is reset to the current level at the start, so
/// `peak_delta_bytes` is the closure's own high-water mark. Afterwards the
/// process-wide peak is raised back to at least what it was before the call
/// (also when `f` panics), so an enclosing `measure` or a later
/// [`stats`](crate::stats) still sees earlier peaks: nesting works.
///
/// Everything is process-wide: allocations that other threads make or free
/// while `f` runs are counted too (and two `measure`s running at once on
/// different threads disturb each other's peak). For figures that belong to
/// `f` alone, use [`measure_thread`]; `measure` suits benches, `harness =
/// false` test binaries, and closures that spread work over several threads.
///
/// # Panics
///
/// When the tracking allocator is not the global allocator (see
/// [`assert_active`](crate::assert_active)), and when `f` panics.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Measurement) {
    assert_active();
    let _restore = RestorePeak(counters::peak());
    counters::reset_peak_to_current();
    let start = stats();
    let t0 = Instant::now();
    let r = f();
    let duration = t0.elapsed();
    let end = stats();
    let m = Measurement {
        peak_delta_bytes: end.peak_bytes.saturating_sub(start.current_bytes),
        retained_bytes: end.current_bytes.wrapping_sub(start.current_bytes) as i64,
        allocations: end.allocations.wrapping_sub(start.allocations),
        reallocations: end.reallocations.wrapping_sub(start.reallocations),
        frees: end.frees.wrapping_sub(start.frees),
        allocated_bytes: end.allocated_bytes.wrapping_sub(start.allocated_bytes),
        freed_bytes: end.freed_bytes.wrapping_sub(start.freed_bytes),
        duration,
    };
    (r, m)
}

/// Raises the process-wide peak back to the saved value on drop.
struct RestorePeak(u64);

impl Drop for RestorePeak {
    fn drop(&mut self) {
        counters::raise_peak_to(self.0);
    }
}

/// Runs `f` and reports what it did on the **calling thread** only:
/// allocations made by other threads meanwhile are not counted, so exact
/// assertions ("0 allocations", "exactly N") hold under `cargo test`'s
/// parallel test threads.
///
/// Work that `f` hands to other threads (a thread pool, a spawned thread) is
/// not counted either, except the frees of blocks those threads hand back.
///
/// Nesting works: counts are differences of the thread's cumulative
/// counters, and the scoped peak is saved at the start, restarted from the
/// current level for `f`, and on exit (also when `f` panics) set back to the
/// larger of the saved peak and `f`'s peak, so an enclosing `measure_thread`
/// sees both the peaks before the inner call and those inside it.
///
/// # Panics
///
/// When the tracking allocator is not the global allocator (see
/// [`assert_active`](crate::assert_active)), and when `f` panics.
pub fn measure_thread<R>(f: impl FnOnce() -> R) -> (R, ThreadMeasurement) {
    assert_active();
    let (start_net, saved_peak) = counters::thread_net_and_peak().unwrap_or((0, 0));
    let _restore = RestoreThreadPeak(saved_peak);
    counters::set_thread_peak(start_net);
    let start = thread_stats();
    let t0 = Instant::now();
    let r = f();
    let duration = t0.elapsed();
    let end = thread_stats();
    let (_, peak) = counters::thread_net_and_peak().unwrap_or((0, start_net));
    let m = ThreadMeasurement {
        allocations: end.allocations.wrapping_sub(start.allocations),
        reallocations: end.reallocations.wrapping_sub(start.reallocations),
        frees: end.frees.wrapping_sub(start.frees),
        allocated_bytes: end.allocated_bytes.wrapping_sub(start.allocated_bytes),
        freed_bytes: end.freed_bytes.wrapping_sub(start.freed_bytes),
        net_bytes: end.net_bytes().wrapping_sub(start.net_bytes()),
        peak_net_bytes: peak.wrapping_sub(start_net).max(0) as u64,
        duration,
    };
    (r, m)
}

/// Sets the thread's scoped peak back to at least the saved value on drop.
struct RestoreThreadPeak(i64);

impl Drop for RestoreThreadPeak {
    fn drop(&mut self) {
        let inner_peak = counters::thread_net_and_peak().map_or(self.0, |(_, p)| p);
        counters::set_thread_peak(inner_peak.max(self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // This unit-test binary does not install the allocator globally.

    #[test]
    #[should_panic(expected = "tracking allocator is not installed")]
    fn measure_thread_refuses_to_report_zeros_when_not_installed() {
        let _ = measure_thread(|| ());
    }

    #[test]
    #[should_panic(expected = "tracking allocator is not installed")]
    fn measure_refuses_to_report_zeros_when_not_installed() {
        let _ = measure(|| ());
    }

    #[test]
    fn display_shows_signed_bytes() {
        let m = ThreadMeasurement {
            allocations: 2,
            frees: 1,
            allocated_bytes: 3072,
            net_bytes: -1024,
            peak_net_bytes: 2048,
            ..ThreadMeasurement::default()
        };
        assert_eq!(
            m.to_string(),
            "thread peak +2.00 KiB, net -1.00 KiB, allocated 3.00 KiB in 2 allocations, 1 frees, 0ns"
        );
        let m = Measurement {
            retained_bytes: 5,
            ..Measurement::default()
        };
        assert!(m.to_string().contains("retained +5 B"), "{m}");
    }
}
