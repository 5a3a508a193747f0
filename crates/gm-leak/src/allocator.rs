//! [`TrackingAllocator`]: the counting [`GlobalAlloc`] wrapper.

use std::alloc::{GlobalAlloc, Layout, System};

use crate::{counters, sampling};

/// A [`GlobalAlloc`] that forwards to an inner allocator and counts what
/// passes through it.
///
/// Install it once per binary:
///
/// ```
/// #[global_allocator]
/// static ALLOC: gm_leak::TrackingAllocator = gm_leak::TrackingAllocator::system();
///
/// fn main() {
///     let before = gm_leak::stats();
///     let b = std::hint::black_box(Box::new([0u8; 100]));
///     assert_eq!(gm_leak::stats().allocations - before.allocations, 1);
///     drop(b);
/// }
/// ```
///
/// The counters are process-wide statics shared by every instance, whatever
/// its inner allocator (only one instance can be the global allocator; an
/// instance called directly adds to the same counters). Read them with
/// [`stats`](crate::stats), [`thread_stats`](crate::thread_stats),
/// [`measure`](crate::measure) and [`measure_thread`](crate::measure_thread).
///
/// Counting costs one shared atomic read-modify-write (live bytes, for an
/// exact peak), a few plain stores to this thread's counters, and one relaxed
/// load of the sampling flag per call; it never allocates, locks or panics.
/// With [sampling](crate::enable_sampling) on, allocations also advance a
/// per-thread countdown, and sampled allocations and frees of sampled blocks
/// take a short spinlock (never while allocating; see the crate docs). See
/// the crate docs for how a `realloc` counts.
#[derive(Debug, Default, Clone, Copy)]
pub struct TrackingAllocator<A = System> {
    inner: A,
}

impl<A> TrackingAllocator<A> {
    /// Wraps `inner`.
    pub const fn new(inner: A) -> Self {
        Self { inner }
    }

    /// The wrapped allocator.
    pub const fn inner(&self) -> &A {
        &self.inner
    }
}

impl TrackingAllocator<System> {
    /// A tracking allocator around the system allocator, for
    /// `static ALLOC: TrackingAllocator = TrackingAllocator::SYSTEM;`.
    pub const SYSTEM: Self = Self::new(System);

    /// A tracking allocator around the system allocator, for
    /// `static ALLOC: TrackingAllocator = TrackingAllocator::system();`.
    pub const fn system() -> Self {
        Self::SYSTEM
    }
}

// `usize` -> `u64` is lossless on every target the workspace supports.
#[inline]
fn bytes(n: usize) -> u64 {
    n as u64
}

// SAFETY: every method forwards to `self.inner` with the caller's arguments
// unchanged and returns its result unchanged, so `inner`'s guarantees (which
// the `A: GlobalAlloc` bound promises) are this type's guarantees. The
// counting touches only atomics and const-initialised thread-locals, and the
// sampling only those, static tables and the platform unwinder: neither
// allocates, panics or unwinds, and neither re-enters the allocator.
unsafe impl<A: GlobalAlloc> GlobalAlloc for TrackingAllocator<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract for
        // `layout`, which is forwarded unchanged.
        let ptr = unsafe { self.inner.alloc(layout) };
        if !ptr.is_null() {
            counters::on_alloc(bytes(layout.size()));
            if sampling::active() {
                sampling::on_alloc(ptr, layout.size());
            }
        }
        ptr
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`: the caller's `layout` is forwarded unchanged.
        let ptr = unsafe { self.inner.alloc_zeroed(layout) };
        if !ptr.is_null() {
            counters::on_alloc(bytes(layout.size()));
            if sampling::active() {
                sampling::on_alloc(ptr, layout.size());
            }
        }
        ptr
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Forget a sampled block before its address can be handed out again.
        if sampling::active() {
            sampling::on_free(ptr);
        }
        // SAFETY: the caller guarantees `ptr` was allocated by this allocator
        // (hence by `inner`, which made every block we handed out) with
        // `layout`.
        unsafe { self.inner.dealloc(ptr, layout) };
        counters::on_dealloc(bytes(layout.size()));
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A sampled old block leaves the tables before its address can be
        // reused; the new block is sampled like a fresh allocation of
        // `new_size` (unbiased for what is live afterwards).
        let taken = if sampling::active() {
            sampling::take(ptr)
        } else {
            None
        };
        // SAFETY: the caller guarantees `ptr`/`layout` describe a block from
        // this allocator (so from `inner`) and that `new_size` is valid for
        // `layout.align()`; all are forwarded unchanged.
        let new_ptr = unsafe { self.inner.realloc(ptr, layout, new_size) };
        if new_ptr.is_null() {
            // The old block is untouched and still owned by the caller:
            // nothing to count; its sample, if any, goes back.
            if let Some(taken) = taken {
                sampling::restore(ptr, taken);
            }
        } else {
            counters::on_realloc(bytes(layout.size()), bytes(new_size));
            if sampling::active() {
                sampling::on_alloc(new_ptr, new_size);
            }
        }
        new_ptr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // This unit-test binary does not install the allocator globally: these
    // tests call an instance directly, which feeds the same counters.

    #[test]
    fn direct_calls_feed_the_shared_counters() {
        let a = TrackingAllocator::new(System);
        let layout = Layout::from_size_align(300, 64).unwrap();
        let before = crate::thread_stats();
        // SAFETY: `layout` has a non-zero size; the block is freed below with
        // the same layout and allocator, after a realloc that updates both.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            assert_eq!(p as usize % 64, 0);
            let p = a.realloc(p, layout, 500);
            assert!(!p.is_null());
            a.dealloc(p, Layout::from_size_align(500, 64).unwrap());
        }
        let after = crate::thread_stats();
        assert_eq!(after.allocations - before.allocations, 2);
        assert_eq!(after.reallocations - before.reallocations, 1);
        assert_eq!(after.frees - before.frees, 1);
        assert_eq!(after.allocated_bytes - before.allocated_bytes, 500);
        assert_eq!(after.freed_bytes - before.freed_bytes, 500);
    }

    #[test]
    fn system_constructors_agree() {
        const S: TrackingAllocator = TrackingAllocator::SYSTEM;
        let _: &System = S.inner();
        let _: TrackingAllocator = TrackingAllocator::system();
        let _: TrackingAllocator = TrackingAllocator::default();
    }
}
