//! Segment trees for prioritized experience replay (Schaul et al. 2015): a [`SumTree`] for
//! priority-proportional sampling and [`MinTree`] / [`MaxTree`] for the smallest priority
//! (importance-weight normalisation) and the largest one (priority of new items).
//!
//! All trees are flat `Vec<f64>`s in the usual array layout: the root is at index 1, node `k` has
//! children `2k` and `2k + 1`, and the `capacity` real leaves start at index `size`, the capacity
//! rounded up to a power of two. Padding leaves hold the tree's identity (`0` for sums, `+inf`
//! for minima, `-inf` for maxima). Every update recomputes the touched ancestors from their
//! children, never by adding deltas, so an internal node is always *exactly* the combination of
//! its two children, whatever sequence of updates led there: no floating-point drift, and a tree
//! rebuilt with `from_leaves(tree.leaves())` is bit-for-bit the same tree.
//!
//! Index arguments must be `< capacity()`. Callers validate them first; a debug build asserts it,
//! and a release build ignores an out-of-range write and reads the identity (`0.0` / `None`)
//! for an out-of-range read. Nothing here panics on any value, NaN and infinities included.

use std::fmt;
use std::marker::PhantomData;

/// Number of leaves of the perfect binary tree backing `capacity` real leaves (at least 1).
#[inline]
fn padded_size(capacity: usize) -> usize {
    capacity.max(1).next_power_of_two()
}

/// Clamps a priority to what a [`SumTree`] leaf may hold: NaN, negative values and `-0.0`
/// become `+0.0`; everything else (including `+inf`) is kept.
#[inline]
fn sanitize_priority(v: f64) -> f64 {
    if v > 0.0 {
        v
    } else {
        0.0
    }
}

/// A sum segment tree over non-negative `f64` priorities, supporting O(log n) point updates,
/// O(1) totals and O(log n) priority-proportional lookup ([`SumTree::find_prefix`]).
///
/// Leaves hold values `>= 0` (or `+inf`); [`SumTree::set`] stores NaN and negative values as `0`.
/// A zero leaf is "empty": [`SumTree::find_prefix`] never returns it.
#[derive(Clone)]
pub(crate) struct SumTree {
    /// `tree[1]` is the root; leaves are `tree[size..size + len]`; `tree[0]` is unused.
    tree: Vec<f64>,
    /// Leaf count of the padded (power-of-two) tree.
    size: usize,
    /// Number of real leaves (the capacity).
    len: usize,
    /// Reused buffer of node indices for [`SumTree::set_many`], so batches do not allocate.
    scratch: Vec<usize>,
}

impl SumTree {
    /// Creates a tree of `capacity` leaves, all zero.
    ///
    /// `capacity == 0` gives a valid, always-empty tree. Allocates
    /// `2 * capacity.next_power_of_two()` values (like any `Vec`, it panics only if that
    /// allocation is impossible).
    pub(crate) fn new(capacity: usize) -> Self {
        let size = padded_size(capacity);
        Self {
            tree: vec![0.0; 2 * size],
            size,
            len: capacity,
            scratch: Vec::new(),
        }
    }

    /// Builds a tree whose leaves are `leaves` (capacity `leaves.len()`), in O(n).
    ///
    /// Values are sanitized as by [`SumTree::set`], so `from_leaves(t.leaves())` reproduces `t`
    /// exactly, internal nodes included.
    pub(crate) fn from_leaves(leaves: &[f64]) -> Self {
        let mut t = Self::new(leaves.len());
        let size = t.size;
        for (slot, &v) in t.tree[size..size + leaves.len()].iter_mut().zip(leaves) {
            *slot = sanitize_priority(v);
        }
        for k in (1..size).rev() {
            t.tree[k] = t.tree[2 * k] + t.tree[2 * k + 1];
        }
        t
    }

    /// Number of leaves (valid indices are `0..capacity()`).
    #[inline]
    pub(crate) fn capacity(&self) -> usize {
        self.len
    }

    /// Sets leaf `i` to `v` and recomputes its ancestors as `left + right`, in O(log n), without
    /// allocating.
    ///
    /// NaN, negative values and `-0.0` are stored as `0.0`. `+inf` is stored as is; the total is
    /// then `+inf` and [`SumTree::find_prefix`] still returns non-zero leaves.
    ///
    /// Debug builds assert `i < capacity()`; release builds ignore an out-of-range `i`.
    #[inline]
    pub(crate) fn set(&mut self, i: usize, v: f64) {
        debug_assert!(
            i < self.len,
            "SumTree::set: index {i} >= capacity {}",
            self.len
        );
        if i >= self.len {
            return;
        }
        let v = sanitize_priority(v);
        let mut k = self.size + i;
        if self.tree[k] == v {
            return;
        }
        self.tree[k] = v;
        while k > 1 {
            k >>= 1;
            let sum = self.tree[2 * k] + self.tree[2 * k + 1];
            if self.tree[k] == sum {
                // Every ancestor is already the sum of its children.
                return;
            }
            self.tree[k] = sum;
        }
    }

    /// Sets several leaves at once, recomputing each touched ancestor once; the result is exactly
    /// the tree that the same sequence of [`SumTree::set`] calls gives (a later update of the same
    /// index wins).
    ///
    /// Faster than repeated `set` for batches (the upper levels are shared). Allocates only while
    /// its reused scratch buffer grows to the largest batch seen. Same value and index rules as
    /// [`SumTree::set`].
    pub(crate) fn set_many(&mut self, updates: &[(usize, f64)]) {
        let size = self.size;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        for &(i, v) in updates {
            debug_assert!(
                i < self.len,
                "SumTree::set_many: index {i} >= capacity {}",
                self.len
            );
            if i < self.len {
                self.tree[size + i] = sanitize_priority(v);
                scratch.push(size + i);
            }
        }
        // All leaves sit on one level of a perfect tree, so after sorting, `k >> 1` keeps the
        // indices sorted on every level and `dedup` leaves each touched node once.
        scratch.sort_unstable();
        scratch.dedup();
        while scratch.first().is_some_and(|&k| k > 1) {
            for k in &mut scratch {
                *k >>= 1;
            }
            scratch.dedup();
            for &k in &scratch {
                self.tree[k] = self.tree[2 * k] + self.tree[2 * k + 1];
            }
        }
        self.scratch = scratch;
    }

    /// Value of leaf `i` (`0.0` for an empty leaf).
    ///
    /// Debug builds assert `i < capacity()`; release builds return `0.0` for an out-of-range `i`.
    #[inline]
    pub(crate) fn get(&self, i: usize) -> f64 {
        debug_assert!(
            i < self.len,
            "SumTree::get: index {i} >= capacity {}",
            self.len
        );
        if i < self.len {
            self.tree[self.size + i]
        } else {
            0.0
        }
    }

    /// Sum of all leaves, in O(1). Never NaN; `+inf` only if a leaf is `+inf` or the sum overflows.
    #[inline]
    pub(crate) fn total(&self) -> f64 {
        self.tree[1]
    }

    /// Sets every leaf to zero, keeping the capacity and the allocation.
    pub(crate) fn clear(&mut self) {
        self.tree.fill(0.0);
    }

    /// Finds the leaf where the running sum of the leaves crosses `value`: the index `i` with
    /// `sum(leaves[..i]) <= value < sum(leaves[..=i])` (half-open, so a value exactly on a
    /// boundary picks the later leaf; partial sums are the tree's own, so up to rounding), in
    /// O(log n), without allocating.
    ///
    /// Sampling `value` uniformly from `[0, total())` therefore picks leaf `i` with probability
    /// `leaves[i] / total()`.
    ///
    /// Returns `None` exactly when `total() == 0` (every leaf empty, or capacity 0). Otherwise the
    /// result is **always a leaf with a non-zero value**, for every `value` and despite rounding:
    /// the descent goes left only into a non-zero left subtree, and right only into a non-zero
    /// right subtree. In particular:
    /// - `value < 0` (including `-inf`) gives the first non-zero leaf;
    /// - `value >= total()` (including `+inf`) gives a non-zero leaf near the end: the last one
    ///   when the partial sums are exact, otherwise possibly one a little earlier;
    /// - NaN gives the last non-zero leaf.
    #[inline]
    pub(crate) fn find_prefix(&self, mut value: f64) -> Option<usize> {
        if self.tree[1] <= 0.0 {
            return None;
        }
        let mut k = 1;
        while k < self.size {
            let left = self.tree[2 * k];
            let right = self.tree[2 * k + 1];
            if left > 0.0 && (value < left || right == 0.0) {
                k *= 2;
            } else {
                value -= left;
                k = 2 * k + 1;
            }
        }
        Some(k - self.size)
    }

    /// The `capacity()` leaf values, in index order (for persistence; see
    /// [`SumTree::from_leaves`]).
    #[inline]
    pub(crate) fn leaves(&self) -> &[f64] {
        &self.tree[self.size..self.size + self.len]
    }

    /// Bytes of heap memory held (the capacity of the backing buffers).
    pub(crate) fn memory_bytes(&self) -> usize {
        self.tree.capacity() * std::mem::size_of::<f64>()
            + self.scratch.capacity() * std::mem::size_of::<usize>()
    }
}

impl fmt::Debug for SumTree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SumTree")
            .field("capacity", &self.len)
            .field("total", &self.total())
            .finish_non_exhaustive()
    }
}

/// The combine rule of an [`ExtremumTree`]: which of two values a node keeps, and the identity
/// that marks an unused leaf. Implemented by [`Min`] and [`Max`].
pub(crate) trait Extremum {
    /// The identity of [`Extremum::pick`] (`+inf` for minima, `-inf` for maxima); a leaf holding
    /// it counts as unset.
    const IDENTITY: f64;
    /// Name used by `Debug`.
    const NAME: &'static str;
    /// The preferred of two non-NaN values.
    fn pick(a: f64, b: f64) -> f64;
}

/// Marker for [`MinTree`]: nodes keep the smaller child, unused leaves are `+inf`.
#[derive(Debug)]
pub(crate) enum Min {}

/// Marker for [`MaxTree`]: nodes keep the larger child, unused leaves are `-inf`.
#[derive(Debug)]
pub(crate) enum Max {}

impl Extremum for Min {
    const IDENTITY: f64 = f64::INFINITY;
    const NAME: &'static str = "MinTree";
    #[inline]
    fn pick(a: f64, b: f64) -> f64 {
        a.min(b)
    }
}

impl Extremum for Max {
    const IDENTITY: f64 = f64::NEG_INFINITY;
    const NAME: &'static str = "MaxTree";
    #[inline]
    fn pick(a: f64, b: f64) -> f64 {
        a.max(b)
    }
}

/// A min segment tree: O(log n) updates, O(1) minimum, O(log n) arg-minimum over the set leaves.
pub(crate) type MinTree = ExtremumTree<Min>;

/// A max segment tree: O(log n) updates, O(1) maximum, O(log n) arg-maximum over the set leaves.
pub(crate) type MaxTree = ExtremumTree<Max>;

/// A segment tree keeping the minimum ([`MinTree`]) or maximum ([`MaxTree`]) of its set leaves.
///
/// A leaf is either set to a value or unset ([`ExtremumTree::unset`]); an unset leaf holds the
/// identity `K::IDENTITY` (`+inf` for [`MinTree`], `-inf` for [`MaxTree`]). Setting a leaf to
/// the identity or to NaN is the same as unsetting it. Ties are broken towards the lowest index.
pub(crate) struct ExtremumTree<K: Extremum> {
    /// `tree[1]` is the root; leaves are `tree[size..size + len]`; `tree[0]` is unused.
    tree: Vec<f64>,
    /// Leaf count of the padded (power-of-two) tree.
    size: usize,
    /// Number of real leaves (the capacity).
    len: usize,
    /// Which extremum the tree keeps.
    _kind: PhantomData<K>,
}

impl<K: Extremum> Clone for ExtremumTree<K> {
    fn clone(&self) -> Self {
        Self {
            tree: self.tree.clone(),
            size: self.size,
            len: self.len,
            _kind: PhantomData,
        }
    }
}

impl<K: Extremum> fmt::Debug for ExtremumTree<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(K::NAME)
            .field("capacity", &self.len)
            .field("root", &self.tree[1])
            .finish_non_exhaustive()
    }
}

impl<K: Extremum> ExtremumTree<K> {
    /// Creates a tree of `capacity` leaves, all unset.
    ///
    /// `capacity == 0` gives a valid, always-empty tree. Allocates
    /// `2 * capacity.next_power_of_two()` values (like any `Vec`, it panics only if that
    /// allocation is impossible).
    pub(crate) fn new(capacity: usize) -> Self {
        let size = padded_size(capacity);
        Self {
            tree: vec![K::IDENTITY; 2 * size],
            size,
            len: capacity,
            _kind: PhantomData,
        }
    }

    /// Builds a tree whose leaves are `leaves` (capacity `leaves.len()`), in O(n); the identity
    /// (or NaN) marks an unset leaf, as in [`ExtremumTree::leaves`].
    ///
    /// `from_leaves(t.leaves())` reproduces `t` exactly, internal nodes included.
    pub(crate) fn from_leaves(leaves: &[f64]) -> Self {
        let mut t = Self::new(leaves.len());
        let size = t.size;
        for (slot, &v) in t.tree[size..size + leaves.len()].iter_mut().zip(leaves) {
            *slot = Self::sanitize(v);
        }
        for k in (1..size).rev() {
            t.tree[k] = K::pick(t.tree[2 * k], t.tree[2 * k + 1]);
        }
        t
    }

    /// NaN is stored as the identity (unset), so nodes never hold NaN; `-0.0` is stored as `+0.0`,
    /// so `==` on stored values is bit equality.
    #[inline]
    fn sanitize(v: f64) -> f64 {
        if v.is_nan() {
            K::IDENTITY
        } else {
            v + 0.0
        }
    }

    /// Number of leaves (valid indices are `0..capacity()`).
    #[inline]
    pub(crate) fn capacity(&self) -> usize {
        self.len
    }

    /// Sets leaf `i` to `v` and recomputes its ancestors, in O(log n), without allocating; stops
    /// early once an ancestor is unchanged.
    ///
    /// `v` equal to the identity, or NaN, unsets the leaf; `-0.0` is stored as `0.0`.
    ///
    /// Debug builds assert `i < capacity()`; release builds ignore an out-of-range `i`.
    #[inline]
    pub(crate) fn set(&mut self, i: usize, v: f64) {
        debug_assert!(
            i < self.len,
            "{}::set: index {i} >= capacity {}",
            K::NAME,
            self.len
        );
        if i >= self.len {
            return;
        }
        let v = Self::sanitize(v);
        let mut k = self.size + i;
        if self.tree[k] == v {
            return;
        }
        self.tree[k] = v;
        while k > 1 {
            k >>= 1;
            let best = K::pick(self.tree[2 * k], self.tree[2 * k + 1]);
            if self.tree[k] == best {
                // Every ancestor is already the extremum of its children.
                return;
            }
            self.tree[k] = best;
        }
    }

    /// Marks leaf `i` as holding no item (stores the identity). Same index rule as
    /// [`ExtremumTree::set`].
    #[inline]
    pub(crate) fn unset(&mut self, i: usize) {
        self.set(i, K::IDENTITY);
    }

    /// Value of leaf `i`, or `None` if it is unset.
    ///
    /// Debug builds assert `i < capacity()`; release builds return `None` for an out-of-range `i`.
    #[inline]
    pub(crate) fn get(&self, i: usize) -> Option<f64> {
        debug_assert!(
            i < self.len,
            "{}::get: index {i} >= capacity {}",
            K::NAME,
            self.len
        );
        if i >= self.len {
            return None;
        }
        let v = self.tree[self.size + i];
        (v != K::IDENTITY).then_some(v)
    }

    /// Unsets every leaf, keeping the capacity and the allocation.
    pub(crate) fn clear(&mut self) {
        self.tree.fill(K::IDENTITY);
    }

    /// The extremum over the set leaves, or `None` if none is set; O(1).
    #[inline]
    fn extremum(&self) -> Option<f64> {
        let v = self.tree[1];
        (v != K::IDENTITY).then_some(v)
    }

    /// Lowest index of a leaf holding the extremum, or `None` if none is set; O(log n).
    #[inline]
    fn arg_extremum(&self) -> Option<usize> {
        let best = self.tree[1];
        if best == K::IDENTITY {
            return None;
        }
        // Nodes hold exactly one of their children's values (never NaN), so `==` finds the path.
        let mut k = 1;
        while k < self.size {
            k = if self.tree[2 * k] == best {
                2 * k
            } else {
                2 * k + 1
            };
        }
        Some(k - self.size)
    }

    /// The `capacity()` leaf values in index order, the identity marking unset leaves (for
    /// persistence; see [`ExtremumTree::from_leaves`]).
    #[inline]
    pub(crate) fn leaves(&self) -> &[f64] {
        &self.tree[self.size..self.size + self.len]
    }

    /// Bytes of heap memory held (the capacity of the backing buffer).
    pub(crate) fn memory_bytes(&self) -> usize {
        self.tree.capacity() * std::mem::size_of::<f64>()
    }
}

impl ExtremumTree<Min> {
    /// Smallest value over the set leaves, or `None` if no leaf is set; O(1).
    #[inline]
    pub(crate) fn min(&self) -> Option<f64> {
        self.extremum()
    }

    /// Lowest index of a leaf holding [`MinTree::min`], or `None` if no leaf is set; O(log n).
    #[inline]
    pub(crate) fn argmin(&self) -> Option<usize> {
        self.arg_extremum()
    }
}

impl ExtremumTree<Min> {
    /// Lowest index `>= start` of a leaf holding [`MinTree::min`], wrapping
    /// around to the lowest index overall when there is none at or after
    /// `start`; `None` if no leaf is set. O(log n). Used to break ties among
    /// equal lowest priorities in ring order (oldest first) rather than
    /// always at the lowest index.
    pub(crate) fn argmin_from(&self, start: usize) -> Option<usize> {
        let best = self.tree[1];
        if best == Min::IDENTITY {
            return None;
        }
        if start < self.len {
            // Nodes covering leaves [start, size) from left to right.
            let mut nodes = [0usize; 64];
            let mut n = 0;
            let (mut l, mut r) = (start + self.size, 2 * self.size);
            while l < r {
                if l & 1 == 1 {
                    nodes[n] = l;
                    n += 1;
                    l += 1;
                }
                l >>= 1;
                r >>= 1;
            }
            if let Some(&top) = nodes[..n].iter().find(|&&k| self.tree[k] == best) {
                let mut k = top;
                while k < self.size {
                    k = if self.tree[2 * k] == best {
                        2 * k
                    } else {
                        2 * k + 1
                    };
                }
                return Some(k - self.size);
            }
        }
        self.arg_extremum()
    }
}

impl ExtremumTree<Max> {
    /// Largest value over the set leaves, or `None` if no leaf is set; O(1).
    #[inline]
    pub(crate) fn max(&self) -> Option<f64> {
        self.extremum()
    }

    /// Lowest index of a leaf holding [`MaxTree::max`], or `None` if no leaf is set; O(log n).
    #[inline]
    pub(crate) fn argmax(&self) -> Option<usize> {
        self.arg_extremum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;

    #[test]
    fn argmin_from_finds_the_first_minimum_at_or_after_start_and_wraps() {
        let mut t = MinTree::new(10);
        for (i, v) in [3.0, 1.0, 2.0, 1.0, 5.0, 1.0, 4.0, 9.0, 1.0, 7.0]
            .into_iter()
            .enumerate()
        {
            t.set(i, v);
        }
        let naive = |start: usize| {
            let m = t.min().unwrap();
            (start..10).chain(0..start).find(|&i| t.get(i) == Some(m))
        };
        for start in 0..12 {
            assert_eq!(
                t.argmin_from(start),
                naive(start.min(10) % 10).or(t.argmin()),
                "start {start}"
            );
        }
        assert_eq!(t.argmin_from(2), Some(3));
        assert_eq!(t.argmin_from(9), Some(1));
        t.clear();
        assert_eq!(t.argmin_from(0), None);
    }

    proptest! {
        #[test]
        fn argmin_from_matches_a_scan(vals in proptest::collection::vec(prop::option::of(0u8..4), 1..70), start in 0usize..80) {
            let mut t = MinTree::new(vals.len());
            for (i, v) in vals.iter().enumerate() {
                if let Some(v) = v {
                    t.set(i, *v as f64);
                }
            }
            let n = vals.len();
            let expect = t.min().and_then(|m| {
                let s = if start < n { start } else { 0 };
                (s..n).chain(0..s).find(|&i| t.get(i) == Some(m))
            });
            prop_assert_eq!(t.argmin_from(start), expect);
        }
    }

    // ---------------------------------------------------------------- helpers

    /// What the tree must store for `v`, stated independently of `sanitize_priority`.
    fn model_priority(v: f64) -> f64 {
        if v.is_nan() || v <= 0.0 {
            0.0
        } else {
            v
        }
    }

    /// Every internal node is exactly the sum of its children; padding is zero; leaves are
    /// non-negative, never NaN, never `-0.0`.
    fn assert_sum_invariants(t: &SumTree) {
        assert_eq!(t.tree.len(), 2 * t.size);
        assert!(t.size.is_power_of_two() && t.size >= t.len.max(1));
        for (i, &v) in t.tree[t.size..].iter().enumerate() {
            assert!(v >= 0.0, "leaf {i} = {v}");
            assert_ne!(v.to_bits(), (-0.0f64).to_bits(), "leaf {i} is -0.0");
            if i >= t.len {
                assert_eq!(v.to_bits(), 0.0f64.to_bits(), "padding leaf {i} = {v}");
            }
        }
        for k in 1..t.size {
            let sum = t.tree[2 * k] + t.tree[2 * k + 1];
            assert_eq!(t.tree[k].to_bits(), sum.to_bits(), "node {k}");
        }
    }

    fn assert_ext_invariants<K: Extremum>(t: &ExtremumTree<K>) {
        assert_eq!(t.tree.len(), 2 * t.size);
        for (i, &v) in t.tree[t.size..].iter().enumerate() {
            assert!(!v.is_nan(), "leaf {i} is NaN");
            assert_ne!(v.to_bits(), (-0.0f64).to_bits(), "leaf {i} is -0.0");
            if i >= t.len {
                assert_eq!(v, K::IDENTITY, "padding leaf {i}");
            }
        }
        for k in 1..t.size {
            let best = K::pick(t.tree[2 * k], t.tree[2 * k + 1]);
            assert_eq!(t.tree[k].to_bits(), best.to_bits(), "node {k}");
        }
    }

    /// Reference prefix search: the `i` with `sum(m[..i]) <= value < sum(m[..=i])`.
    fn scan(m: &[f64], value: f64) -> Option<usize> {
        let mut acc = 0.0;
        for (i, &v) in m.iter().enumerate() {
            acc += v;
            if value < acc {
                return Some(i);
            }
        }
        None
    }

    fn first_nonzero(m: &[f64]) -> Option<usize> {
        m.iter().position(|&v| v > 0.0)
    }

    fn last_nonzero(m: &[f64]) -> Option<usize> {
        m.iter().rposition(|&v| v > 0.0)
    }

    /// Checks `t` against the model `m` of its leaves: values, totals and every find_prefix rule.
    fn check_sum_against_model(t: &SumTree, m: &[f64], probe: f64) {
        assert_sum_invariants(t);
        assert_eq!(t.capacity(), m.len());
        assert_eq!(t.leaves().len(), m.len());
        for (i, (&a, &b)) in t.leaves().iter().zip(m).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "leaf {i}");
            assert_eq!(t.get(i).to_bits(), b.to_bits(), "get({i})");
        }
        let naive: f64 = m.iter().sum();
        let total = t.total();
        assert!(
            (total - naive).abs() <= 1e-9 * naive,
            "total {total} vs naive {naive}"
        );
        if naive == 0.0 {
            assert_eq!(total, 0.0);
            for v in [0.0, 1.0, -1.0, f64::NAN, f64::INFINITY, probe] {
                assert_eq!(t.find_prefix(v), None, "find_prefix({v}) on an empty tree");
            }
            return;
        }
        assert!(total > 0.0);

        // Whatever the value, the answer is a non-zero leaf.
        let specials = [
            0.0,
            -0.0,
            total,
            total * 1.0000001,
            total * (1.0 - 1e-15),
            -1.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            probe * total,
        ];
        for v in specials {
            let i = t.find_prefix(v).expect("total > 0 must give Some");
            assert!(i < m.len(), "find_prefix({v}) = {i} beyond capacity");
            assert!(m[i] > 0.0, "find_prefix({v}) = {i}, a zero leaf");
        }
        // The documented results for out-of-range values.
        assert_eq!(t.find_prefix(-1.0), first_nonzero(m));
        assert_eq!(t.find_prefix(f64::NEG_INFINITY), first_nonzero(m));
        assert_eq!(t.find_prefix(f64::NAN), last_nonzero(m));

        // Values well inside a non-zero leaf's interval agree with the linear scan.
        let tol = 1e-12 * total;
        let mut before = 0.0;
        for (i, &v) in m.iter().enumerate() {
            let through = before + v;
            if v > 0.0 {
                for frac in [0.5, 0.01, 0.99] {
                    let x = before + frac * v;
                    if x - before > tol && through - x > tol {
                        assert_eq!(scan(m, x), Some(i));
                        assert_eq!(t.find_prefix(x), Some(i), "value {x} inside leaf {i}");
                    }
                }
            }
            before = through;
        }
    }

    fn priority() -> impl Strategy<Value = f64> {
        prop_oneof![
            4 => Just(0.0),
            4 => 0.0..1.0f64,
            2 => (1u32..20).prop_map(f64::from),
            1 => 1e-12..1e-6f64,
            1 => 1.0..1e9f64,
            1 => prop_oneof![
                Just(f64::NAN),
                Just(-1.0),
                Just(-0.0),
                Just(f64::NEG_INFINITY),
                Just(f64::MIN_POSITIVE),
                Just(5e-324),
            ],
        ]
    }

    #[derive(Debug, Clone)]
    enum SumOp {
        Set(Index, f64),
        SetMany(Vec<(Index, f64)>),
        Clear,
        Probe(f64),
    }

    fn sum_op() -> impl Strategy<Value = SumOp> {
        prop_oneof![
            12 => (any::<Index>(), priority()).prop_map(|(i, v)| SumOp::Set(i, v)),
            3 => prop::collection::vec((any::<Index>(), priority()), 0..40)
                .prop_map(SumOp::SetMany),
            1 => Just(SumOp::Clear),
            2 => (0.0..1.0f64).prop_map(SumOp::Probe),
        ]
    }

    #[derive(Debug, Clone)]
    enum ExtOp {
        Set(Index, f64),
        Unset(Index),
        Clear,
    }

    fn ext_value() -> impl Strategy<Value = f64> {
        prop_oneof![
            6 => (-5i32..5).prop_map(f64::from),
            3 => -1e6..1e6f64,
            1 => prop_oneof![
                Just(-0.0),
                Just(f64::INFINITY),
                Just(f64::NEG_INFINITY),
                Just(f64::NAN),
                Just(f64::MAX),
                Just(f64::MIN),
            ],
        ]
    }

    fn ext_op() -> impl Strategy<Value = ExtOp> {
        prop_oneof![
            10 => (any::<Index>(), ext_value()).prop_map(|(i, v)| ExtOp::Set(i, v)),
            4 => any::<Index>().prop_map(ExtOp::Unset),
            1 => Just(ExtOp::Clear),
        ]
    }

    /// Runs `ops` on a tree and on a `Vec<Option<f64>>` model. `better(a, b)`: `a` strictly beats
    /// `b`; `extreme`/`arg` read the tree's answer.
    fn run_ext_model<K: Extremum>(
        n: usize,
        ops: &[ExtOp],
        better: fn(f64, f64) -> bool,
        extreme: fn(&ExtremumTree<K>) -> Option<f64>,
        arg: fn(&ExtremumTree<K>) -> Option<usize>,
    ) {
        let mut t = ExtremumTree::<K>::new(n);
        let mut m: Vec<Option<f64>> = vec![None; n];
        for op in ops {
            match op {
                ExtOp::Set(i, v) => {
                    let i = i.index(n);
                    t.set(i, *v);
                    m[i] = if v.is_nan() || *v == K::IDENTITY {
                        None
                    } else {
                        Some(*v)
                    };
                }
                ExtOp::Unset(i) => {
                    let i = i.index(n);
                    t.unset(i);
                    m[i] = None;
                }
                ExtOp::Clear => {
                    t.clear();
                    m.iter_mut().for_each(|x| *x = None);
                }
            }
            assert_ext_invariants(&t);
            for (i, &x) in m.iter().enumerate() {
                assert_eq!(t.get(i), x, "get({i})");
                assert_eq!(t.leaves()[i], x.unwrap_or(K::IDENTITY), "leaves()[{i}]");
            }
            let mut best: Option<(usize, f64)> = None;
            for (i, x) in m.iter().enumerate() {
                if let Some(x) = *x {
                    if best.is_none_or(|(_, b)| better(x, b)) {
                        best = Some((i, x));
                    }
                }
            }
            assert_eq!(extreme(&t), best.map(|(_, b)| b));
            assert_eq!(arg(&t), best.map(|(i, _)| i));
        }
        let rebuilt = ExtremumTree::<K>::from_leaves(t.leaves());
        assert_eq!(bits(&rebuilt.tree), bits(&t.tree));
    }

    fn bits(v: &[f64]) -> Vec<u64> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    // ---------------------------------------------------------------- properties

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random set / set_many / clear sequences agree with a plain Vec model.
        #[test]
        fn sum_tree_matches_model(
            n in 1usize..300,
            ops in prop::collection::vec(sum_op(), 0..120),
        ) {
            let mut t = SumTree::new(n);
            let mut m = vec![0.0; n];
            let mut probe = 0.5;
            for op in &ops {
                match op {
                    SumOp::Set(i, v) => {
                        let i = i.index(n);
                        t.set(i, *v);
                        m[i] = model_priority(*v);
                    }
                    SumOp::SetMany(ups) => {
                        let ups: Vec<(usize, f64)> =
                            ups.iter().map(|(i, v)| (i.index(n), *v)).collect();
                        t.set_many(&ups);
                        for &(i, v) in &ups {
                            m[i] = model_priority(v);
                        }
                    }
                    SumOp::Clear => {
                        t.clear();
                        m.iter_mut().for_each(|x| *x = 0.0);
                    }
                    SumOp::Probe(p) => probe = *p,
                }
                check_sum_against_model(&t, &m, probe);
            }
            // Persistence round trip is bit-exact, internal nodes included.
            let rebuilt = SumTree::from_leaves(t.leaves());
            prop_assert_eq!(bits(&rebuilt.tree), bits(&t.tree));
        }

        /// With integer leaves every partial sum is exact, so find_prefix must equal the linear
        /// scan for every value, boundaries included (half-open intervals), and the documented
        /// out-of-range results hold exactly.
        #[test]
        fn find_prefix_exact_on_integer_leaves(
            leaves in prop::collection::vec(prop_oneof![3 => Just(0u8), 2 => 1u8..6], 1..300),
            via_set in any::<bool>(),
        ) {
            let m: Vec<f64> = leaves.iter().map(|&x| f64::from(x)).collect();
            let t = if via_set {
                let mut t = SumTree::new(m.len());
                for (i, &v) in m.iter().enumerate().rev() {
                    t.set(i, v);
                }
                t
            } else {
                SumTree::from_leaves(&m)
            };
            let total: f64 = m.iter().sum();
            prop_assert_eq!(t.total(), total);
            if total == 0.0 {
                prop_assert_eq!(t.find_prefix(0.0), None);
                return Ok(());
            }
            let mut k = 0.0;
            while k < total {
                prop_assert_eq!(t.find_prefix(k), scan(&m, k), "value {}", k);
                prop_assert_eq!(t.find_prefix(k + 0.5), scan(&m, k + 0.5), "value {}", k + 0.5);
                k += 1.0;
            }
            for v in [total, total + 0.5, total * 1.0000001, 1e300, f64::INFINITY, f64::NAN] {
                prop_assert_eq!(t.find_prefix(v), last_nonzero(&m), "value {}", v);
            }
            for v in [-0.5, -1.0, f64::NEG_INFINITY] {
                prop_assert_eq!(t.find_prefix(v), first_nonzero(&m), "value {}", v);
            }
        }

        /// set_many gives bit-for-bit the tree of the same sets applied one by one.
        #[test]
        fn set_many_equals_sequential_sets(
            n in 1usize..300,
            batches in prop::collection::vec(
                prop::collection::vec((any::<Index>(), priority()), 0..64), 1..6),
        ) {
            let mut a = SumTree::new(n);
            let mut b = SumTree::new(n);
            for batch in &batches {
                let ups: Vec<(usize, f64)> = batch.iter().map(|(i, v)| (i.index(n), *v)).collect();
                a.set_many(&ups);
                for &(i, v) in &ups {
                    b.set(i, v);
                }
                prop_assert_eq!(bits(&a.tree), bits(&b.tree));
            }
        }

        #[test]
        fn min_tree_matches_model(
            n in 1usize..300,
            ops in prop::collection::vec(ext_op(), 0..120),
        ) {
            run_ext_model::<Min>(n, &ops, |a, b| a < b, MinTree::min, MinTree::argmin);
        }

        #[test]
        fn max_tree_matches_model(
            n in 1usize..300,
            ops in prop::collection::vec(ext_op(), 0..120),
        ) {
            run_ext_model::<Max>(n, &ops, |a, b| a > b, MaxTree::max, MaxTree::argmax);
        }
    }

    // ---------------------------------------------------------------- unit tests

    #[test]
    fn capacity_one() {
        let mut s = SumTree::new(1);
        assert_eq!(s.capacity(), 1);
        assert_eq!(s.find_prefix(0.0), None);
        s.set(0, 2.5);
        assert_eq!(s.total(), 2.5);
        for v in [0.0, 1.0, 2.5, 100.0, -3.0, f64::NAN] {
            assert_eq!(s.find_prefix(v), Some(0));
        }
        s.set(0, 0.0);
        assert_eq!(s.find_prefix(1.0), None);
        assert_sum_invariants(&s);

        let mut mn = MinTree::new(1);
        let mut mx = MaxTree::new(1);
        assert_eq!(
            (mn.min(), mn.argmin(), mx.max(), mx.argmax()),
            (None, None, None, None)
        );
        mn.set(0, -7.0);
        mx.set(0, -7.0);
        assert_eq!((mn.min(), mn.argmin()), (Some(-7.0), Some(0)));
        assert_eq!((mx.max(), mx.argmax()), (Some(-7.0), Some(0)));
        mn.unset(0);
        mx.unset(0);
        assert_eq!(
            (mn.min(), mn.argmin(), mx.max(), mx.argmax()),
            (None, None, None, None)
        );
        assert_eq!((mn.get(0), mx.get(0)), (None, None));
    }

    #[test]
    fn capacity_zero_is_an_empty_tree() {
        let s = SumTree::new(0);
        assert_eq!((s.capacity(), s.total(), s.leaves().len()), (0, 0.0, 0));
        assert_eq!(s.find_prefix(0.0), None);
        assert_eq!(SumTree::from_leaves(&[]).total(), 0.0);
        let mn = MinTree::new(0);
        let mx = MaxTree::from_leaves(&[]);
        assert_eq!(
            (mn.min(), mn.argmin(), mx.max(), mx.argmax()),
            (None, None, None, None)
        );
        assert!(mn.leaves().is_empty() && mx.leaves().is_empty());
    }

    #[test]
    fn non_power_of_two_capacities() {
        for n in [3usize, 5, 7, 100, 1000, 100_000] {
            let mut s = SumTree::new(n);
            let mut mn = MinTree::new(n);
            let mut mx = MaxTree::new(n);
            assert_eq!(s.size, n.next_power_of_two());
            assert_eq!(s.leaves().len(), n);
            assert_eq!(mn.leaves().len(), n);
            // Only the last real leaf is non-zero: every value lands on it, never on padding.
            s.set(n - 1, 1.0);
            mn.set(n - 1, 3.0);
            mx.set(n - 1, 3.0);
            for v in [0.0, 0.5, 1.0, 2.0, -1.0, f64::NAN, f64::INFINITY] {
                assert_eq!(s.find_prefix(v), Some(n - 1), "n={n} value={v}");
            }
            assert_eq!((mn.min(), mn.argmin()), (Some(3.0), Some(n - 1)));
            assert_eq!((mx.max(), mx.argmax()), (Some(3.0), Some(n - 1)));
            s.set(0, 1.0);
            assert_eq!(s.total(), 2.0);
            assert_eq!(s.find_prefix(0.999), Some(0));
            assert_eq!(s.find_prefix(1.0), Some(n - 1));
            assert_sum_invariants(&s);
            assert_ext_invariants(&mn);
            assert_ext_invariants(&mx);
        }
    }

    #[test]
    fn clear_resets_everything_and_keeps_the_allocation() {
        let mut s = SumTree::from_leaves(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        let mut mn = MinTree::from_leaves(&[1.0, 2.0, 3.0]);
        let mut mx = MaxTree::from_leaves(&[1.0, 2.0, 3.0]);
        let bytes = (s.memory_bytes(), mn.memory_bytes(), mx.memory_bytes());
        s.clear();
        mn.clear();
        mx.clear();
        assert_eq!(
            bytes,
            (s.memory_bytes(), mn.memory_bytes(), mx.memory_bytes())
        );
        assert_eq!(s.capacity(), 5);
        assert_eq!(s.total(), 0.0);
        assert_eq!(s.find_prefix(0.0), None);
        assert!(s.leaves().iter().all(|&v| v == 0.0));
        assert_eq!(
            (mn.min(), mn.argmin(), mx.max(), mx.argmax()),
            (None, None, None, None)
        );
        assert!(mn.leaves().iter().all(|&v| v == f64::INFINITY));
        assert!(mx.leaves().iter().all(|&v| v == f64::NEG_INFINITY));
        // Still usable afterwards.
        s.set(4, 2.0);
        mn.set(2, 9.0);
        mx.set(1, -9.0);
        assert_eq!((s.total(), s.find_prefix(0.0)), (2.0, Some(4)));
        assert_eq!((mn.min(), mn.argmin()), (Some(9.0), Some(2)));
        assert_eq!((mx.max(), mx.argmax()), (Some(-9.0), Some(1)));
    }

    #[test]
    fn from_leaves_round_trip() {
        let leaves = [0.5, 0.0, 3.0, 1e-9, 0.0, 7.25, 2.0];
        let built = SumTree::from_leaves(&leaves);
        let mut incremental = SumTree::new(leaves.len());
        for (i, &v) in leaves.iter().enumerate() {
            incremental.set(i, v);
        }
        assert_eq!(built.leaves(), &leaves);
        assert_eq!(bits(&built.tree), bits(&incremental.tree));
        let again = SumTree::from_leaves(built.leaves());
        assert_eq!(bits(&again.tree), bits(&built.tree));

        // Invalid priorities are sanitized exactly as `set` does.
        let odd = SumTree::from_leaves(&[f64::NAN, -2.0, -0.0, 4.0]);
        assert_eq!(bits(odd.leaves()), bits(&[0.0, 0.0, 0.0, 4.0]));
        assert_eq!(odd.total(), 4.0);

        let ext = [3.0, f64::INFINITY, -1.0, 2.0, f64::NEG_INFINITY];
        let mn = MinTree::from_leaves(&ext);
        assert_eq!(mn.leaves(), &ext);
        assert_eq!((mn.min(), mn.argmin()), (Some(f64::NEG_INFINITY), Some(4)));
        assert_eq!(mn.get(1), None);
        assert_eq!(
            bits(&MinTree::from_leaves(mn.leaves()).tree),
            bits(&mn.tree)
        );
        let mx = MaxTree::from_leaves(&ext);
        assert_eq!((mx.max(), mx.argmax()), (Some(f64::INFINITY), Some(1)));
        assert_eq!(mx.get(4), None);
        assert_eq!(
            bits(&MaxTree::from_leaves(mx.leaves()).tree),
            bits(&mx.tree)
        );
        // NaN leaves load as unset.
        let nan = MaxTree::from_leaves(&[f64::NAN, 1.0]);
        assert_eq!((nan.get(0), nan.argmax()), (None, Some(1)));
        assert_eq!(nan.leaves()[0], f64::NEG_INFINITY);
    }

    #[test]
    fn invalid_priorities_are_stored_as_zero() {
        let mut s = SumTree::new(4);
        s.set(0, 1.0);
        for v in [f64::NAN, -1.0, -0.0, f64::NEG_INFINITY] {
            s.set(1, 5.0);
            s.set(1, v);
            assert_eq!(s.get(1).to_bits(), 0.0f64.to_bits(), "set({v})");
            assert_eq!(s.total(), 1.0);
            assert_sum_invariants(&s);
        }
    }

    #[test]
    fn infinite_and_overflowing_priorities_still_sample_non_zero_leaves() {
        let mut s = SumTree::new(6);
        s.set(1, f64::MAX);
        s.set(4, f64::MAX);
        assert_eq!(s.total(), f64::INFINITY); // overflowed
        assert_sum_invariants(&s);
        for v in [0.0, 1.0, f64::MAX, f64::INFINITY, -1.0, f64::NAN] {
            let i = s.find_prefix(v).unwrap();
            assert!(i == 1 || i == 4, "value {v} gave {i}");
        }
        assert_eq!(s.find_prefix(1e300), Some(1));
        s.set(2, f64::INFINITY);
        assert_eq!(s.get(2), f64::INFINITY);
        for v in [0.0, f64::MAX, f64::INFINITY, f64::NAN, -1.0] {
            let i = s.find_prefix(v).unwrap();
            assert!(s.get(i) > 0.0, "value {v} gave {i}");
        }
    }

    #[test]
    fn sampling_is_proportional_to_priority() {
        // A deterministic quantile grid over [0, total) hits each leaf in proportion to it.
        let leaves = [1.0, 0.0, 3.0, 0.5, 0.0, 0.0, 4.0, 1.5, 0.0, 0.25];
        let s = SumTree::from_leaves(&leaves);
        let total = s.total();
        let draws = 100_000;
        let mut hits = [0usize; 10];
        for k in 0..draws {
            let u = (k as f64 + 0.5) / draws as f64;
            hits[s.find_prefix(u * total).unwrap()] += 1;
        }
        for (i, &h) in hits.iter().enumerate() {
            let expected = leaves[i] / total * draws as f64;
            assert!(
                (h as f64 - expected).abs() <= 1.0,
                "leaf {i}: {h} vs {expected}"
            );
        }
    }

    #[test]
    fn no_drift_after_many_updates() {
        // Incremental-delta trees drift; recomputing from children must not.
        let n = 1000;
        let mut s = SumTree::new(n);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..200_000 {
            let i = (next() % n as u64) as usize;
            let v = (next() % 1_000_000) as f64 * 1e-3 * if next() % 7 == 0 { 1e6 } else { 1.0 };
            s.set(i, v);
        }
        for i in 0..n {
            s.set(i, 0.0);
        }
        assert_eq!(s.total().to_bits(), 0.0f64.to_bits());
        assert_eq!(s.find_prefix(0.0), None);
        s.set(17, 1e-300);
        assert_eq!(s.total(), 1e-300);
        assert_eq!(s.find_prefix(0.5), Some(17));
    }

    #[test]
    fn ties_pick_the_lowest_index() {
        let mut mn = MinTree::new(9);
        let mut mx = MaxTree::new(9);
        for i in [8, 5, 2, 6] {
            mn.set(i, 1.0);
            mx.set(i, 1.0);
        }
        assert_eq!((mn.argmin(), mx.argmax()), (Some(2), Some(2)));
        mn.set(3, -0.0);
        mn.set(7, 0.0);
        assert_eq!((mn.min(), mn.argmin()), (Some(0.0), Some(3)));
        assert_eq!(mn.get(3).map(f64::to_bits), Some(0.0f64.to_bits()));
        mn.unset(3);
        assert_eq!(mn.argmin(), Some(7));
        // Setting the identity is unsetting.
        mx.set(2, f64::NEG_INFINITY);
        assert_eq!((mx.get(2), mx.argmax()), (None, Some(5)));
    }

    #[test]
    fn memory_bytes_counts_the_backing_vec() {
        let n = 100_000;
        let s = SumTree::new(n);
        let mn = MinTree::new(n);
        let expected = 2 * n.next_power_of_two() * std::mem::size_of::<f64>();
        assert_eq!(s.memory_bytes(), expected);
        assert_eq!(mn.memory_bytes(), expected);
        let mut s = s;
        s.set_many(&[(1, 1.0), (2, 2.0)]);
        assert!(s.memory_bytes() >= expected + 2 * std::mem::size_of::<usize>());
    }

    #[test]
    fn debug_output_is_a_summary() {
        let s = SumTree::from_leaves(&[1.0; 10_000]);
        let text = format!("{s:?} {:?} {:?}", MinTree::new(10_000), MaxTree::new(3));
        assert!(text.len() < 200, "{text}");
        assert!(text.contains("SumTree") && text.contains("MinTree") && text.contains("MaxTree"));
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "index 4 >= capacity 4")]
    fn out_of_range_set_asserts_in_debug() {
        SumTree::new(4).set(4, 1.0);
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "index 3 >= capacity 3")]
    fn out_of_range_get_asserts_in_debug() {
        MinTree::new(3).get(3);
    }

    #[cfg(not(debug_assertions))]
    #[test]
    fn out_of_range_is_ignored_in_release() {
        let mut s = SumTree::new(3);
        s.set(3, 1.0);
        s.set(usize::MAX, 1.0);
        s.set_many(&[(3, 1.0), (0, 2.0)]);
        assert_eq!(
            (s.get(3), s.total(), s.leaves()),
            (0.0, 2.0, &[2.0, 0.0, 0.0][..])
        );
        let mut mx = MaxTree::new(3);
        mx.set(3, 1.0);
        mx.unset(99);
        assert_eq!((mx.get(3), mx.max()), (None, None));
        assert_sum_invariants(&s);
        assert_ext_invariants(&mx);
    }
}
