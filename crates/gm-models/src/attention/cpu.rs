//! CPU plumbing shared by the custom attention ops: borrowing contiguous
//! `f32` slices out of candle storage, spreading per-head work over scoped
//! threads, and the two vector primitives (`dot`, `axpy`) the kernels are
//! built from (written so the compiler vectorises them in optimised builds).

use std::sync::{Mutex, PoisonError};

use candle_core::{CpuStorage, Layout, Storage};

/// Below this many multiply-adds (`B·H·Nq·Nk·D`, or the sparse equivalent)
/// a kernel runs on the calling thread: spawning threads costs more than it
/// saves, and small calls stay allocation-deterministic.
pub(super) const PARALLEL_MIN_WORK: usize = 1 << 21;

/// The shape of one attention call: `q: [b, h, nq, d]`, `k, v: [b, h, nk, d]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Dims {
    pub b: usize,
    pub h: usize,
    pub nq: usize,
    pub nk: usize,
    pub d: usize,
}

impl Dims {
    /// Independent (batch, head) pairs.
    pub fn bh(&self) -> usize {
        self.b * self.h
    }

    /// Elements of `q` (and of the output).
    pub fn q_len(&self) -> usize {
        self.bh() * self.nq * self.d
    }

    /// Elements of `k` (and of `v`).
    pub fn k_len(&self) -> usize {
        self.bh() * self.nk * self.d
    }

    /// `1/√d`.
    pub fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }

    /// The output shape `[b, h, nq, d]`.
    pub fn out_shape(&self) -> (usize, usize, usize, usize) {
        (self.b, self.h, self.nq, self.d)
    }
}

/// The contiguous `f32` data of a CPU storage viewed through `layout`.
pub(super) fn cpu_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
    len: usize,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("attention {what}: the kernel takes f32 storage")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("attention {what}: the kernel takes a contiguous layout")
    };
    if end - start != len {
        candle_core::bail!(
            "attention {what}: expected {len} elements, got {}",
            end - start
        )
    }
    Ok(&data[start..end])
}

/// [`cpu_slice`] for a tensor's storage (as seen in a backward pass).
pub(super) fn storage_slice<'a>(
    storage: &'a Storage,
    layout: &Layout,
    what: &str,
    len: usize,
) -> candle_core::Result<&'a [f32]> {
    match storage {
        Storage::Cpu(s) => cpu_slice(s, layout, what, len),
        _ => candle_core::bail!("attention {what}: this kernel runs on the CPU only"),
    }
}

/// Runs `f` on every item, each chunk of items with a scratch made by
/// `init`, on candle's own CPU worker pool
/// (`candle_core::utils::barrier_pool`, all joined before this returns).
/// With less than [`PARALLEL_MIN_WORK`] of `work`, one item, or a pool
/// without workers, everything runs on the calling thread.
///
/// Candle's pool rather than our own threads: its workers spin for a while
/// after every candle op, so extra threads of ours would compete with them
/// for the cores (measured: 2× slower backward passes at `N = 512` on two
/// cores). `f` must not itself run candle ops (a nested call from the
/// calling thread would wait on the pool's lock).
pub(super) fn par_items<T: Send, S>(
    items: Vec<T>,
    work: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, T) + Sync,
) {
    let pool = candle_core::utils::barrier_pool();
    if work < PARALLEL_MIN_WORK || items.len() <= 1 || pool.n_workers() == 0 {
        let mut scratch = init();
        for item in items {
            f(&mut scratch, item);
        }
        return;
    }
    let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
    pool.execute_chunked(slots.len(), |range| {
        let mut scratch = init();
        for slot in &slots[range] {
            let item = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(item) = item {
                f(&mut scratch, item);
            }
        }
    });
}

/// `Σ a[i]·b[i]` over the shorter length, in eight interleaved partial
/// sums (vectorisable; the summation order differs from a plain loop).
#[inline]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// `eˣ` to within a few ulp (`≤ 3e-7` relative) for `x ≤ 88`, and `0` for
/// `x < −87.3` (so `e^(−∞) = 0`; NaN gives 0 too), written without calls
/// or branches so loops over it vectorise (the libm `expf` does not, and
/// the kernels spend much of their time here).
///
/// Cephes' `expf`: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2` (`n` rounded by
/// the `1.5·2²³` trick, `ln 2` split in two for an exact product), a
/// degree-6 polynomial for `eʳ`, and `2ⁿ` built in the exponent bits.
#[inline]
pub(super) fn exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    let xc = x.min(88.0);
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let p = p * r * r + r + 1.0;
    // n as an integer, from the low mantissa bits of t.
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let two_n = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    if x >= -87.3 {
        p * two_n
    } else {
        0.0
    }
}

/// `Σ x`, in eight interleaved partial sums (vectorisable).
#[inline]
pub(super) fn sum(x: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (s, v) in acc.iter_mut().zip(c) {
            *s += v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// `y += a·x` element-wise over the shorter length.
#[inline]
pub(super) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Writes the `rows × cols` row-major `src` transposed into `dst`
/// (`cols × rows`).
#[inline]
pub(super) fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    for (r, row) in src.chunks_exact(cols).take(rows).enumerate() {
        for (c, x) in row.iter().enumerate() {
            dst[c * rows + r] = *x;
        }
    }
}

/// `out[c] = Σ_dd x[dd]·scale·mt[dd·n + c]` for `c < n`, where `mt` is a
/// `d × n` block (a transposed `n × d` block of keys or values): one row of
/// a score tile, computed as `d` vectorisable `axpy`s.
#[inline]
pub(super) fn row_times_block(x: &[f32], mt: &[f32], n: usize, scale: f32, out: &mut [f32]) {
    out.fill(0.0);
    for (xd, col) in x.iter().zip(mt.chunks_exact(n)) {
        axpy(out, xd * scale, col);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primitives_agree_with_plain_loops() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32 * 0.25).collect();
        let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - plain).abs() < 1e-4);
        let mut y = vec![1f32; 19];
        axpy(&mut y, 2.0, &a);
        assert_eq!(y[3], 1.0 + 2.0 * a[3]);
        // 3×2 → 2×3
        let src = [1f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut dst = [0f32; 6];
        transpose(&src, 3, 2, &mut dst);
        assert_eq!(dst, [1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
        let mut out = [0f32; 3];
        row_times_block(&[1.0, 10.0], &dst, 3, 0.5, &mut out);
        assert_eq!(out, [10.5, 21.5, 32.5]);
    }

    #[test]
    fn exp_is_accurate_and_zero_below_range() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        for x in [0.0f32, -1e-7, 1e-7, 0.5, -0.5, 1.0, -20.0] {
            assert!(((exp(x) - x.exp()) / x.exp()).abs() < 3e-7, "{x}");
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(88.0).is_finite());
        let xs: Vec<f32> = (0..21).map(|i| i as f32).collect();
        assert_eq!(sum(&xs), 210.0);
    }

    #[test]
    fn par_items_visits_every_item_once_on_any_thread_count() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for work in [0, PARALLEL_MIN_WORK] {
            let sum = AtomicUsize::new(0);
            par_items(
                (1..=100).collect(),
                work,
                || (),
                |_, i: usize| {
                    sum.fetch_add(i, Ordering::Relaxed);
                },
            );
            assert_eq!(sum.into_inner(), 5050);
        }
    }
}
