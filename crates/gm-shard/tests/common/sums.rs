//! The collectives tests' inputs and reference: shared by the in-process
//! backend's unit tests (`src/tests.rs`), `tests/mpi.rs` and
//! `tests/nccl.rs`, which include this file by path.
#![allow(dead_code)] // each test uses a subset

/// Rank `r`'s input of length `n`: values whose float sum depends on the
/// order of addition.
pub fn input(r: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (r as f32 + 1.0) * 0.1 + 1.0 / (i as f32 + 3.0) * 1e3_f32.powi(r as i32 % 3))
        .collect()
}

/// The reference: sequential element-wise sum in rank order.
pub fn reference_sum(world: usize, n: usize) -> Vec<f32> {
    let mut acc = input(0, n);
    for r in 1..world {
        for (a, x) in acc.iter_mut().zip(input(r, n)) {
            *a += x;
        }
    }
    acc
}

/// The bits of `v`, for exact comparisons.
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
