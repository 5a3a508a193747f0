//! ZeRO per-rank memory formulas (Rajbhandari et al., "ZeRO: Memory
//! Optimizations Toward Training Trillion Parameter Models", 2020) for Adam,
//! to report next to measured per-rank memory.
//!
//! With Ψ parameters on N ranks, bytes per rank:
//!
//! | stage | mixed-precision Adam (f16 params/grads, f32 master + m + v) | f32 Adam (f32 params/grads, f32 m + v) |
//! |---|---|---|
//! | 0 (plain data parallel) | 16Ψ | 16Ψ |
//! | 1 (optimizer state sharded) | 4Ψ + 12Ψ/N | 8Ψ + 8Ψ/N |
//! | 2 (+ gradients sharded) | 2Ψ + 14Ψ/N | 4Ψ + 12Ψ/N |
//!
//! Ψ/N is rounded up ([`zero_memory`] counts the largest rank's
//! partition, ⌈Ψ/N⌉ elements). Activations, buffers and fragmentation are
//! not included.

use crate::error::{Error, Result};
use crate::plan::MAX_RANKS;
use serde::{Deserialize, Serialize};

/// What a ZeRO stage partitions across ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ZeroStage {
    /// Nothing: every rank holds everything (plain data parallelism).
    Stage0,
    /// Optimizer state partitioned.
    Stage1,
    /// Optimizer state and gradients partitioned.
    Stage2,
}

impl ZeroStage {
    /// The stage's number (0, 1 or 2), as configs and reports write it.
    pub fn number(self) -> u8 {
        match self {
            ZeroStage::Stage0 => 0,
            ZeroStage::Stage1 => 1,
            ZeroStage::Stage2 => 2,
        }
    }

    /// The stage numbered `n` ([`number`](Self::number)'s inverse).
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            0 => Some(ZeroStage::Stage0),
            1 => Some(ZeroStage::Stage1),
            2 => Some(ZeroStage::Stage2),
            _ => None,
        }
    }
}

/// The numeric precision of training with Adam.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AdamPrecision {
    /// f16/bf16 parameters and gradients (2 + 2 bytes), f32 master
    /// parameters, momentum and variance in the optimizer (12 bytes).
    Mixed,
    /// f32 parameters and gradients (4 + 4 bytes), f32 momentum and
    /// variance (8 bytes).
    F32,
}

impl AdamPrecision {
    /// Bytes per parameter of (parameters, gradients, optimizer state).
    pub fn bytes_per_param(self) -> (u64, u64, u64) {
        match self {
            AdamPrecision::Mixed => (2, 2, 12),
            AdamPrecision::F32 => (4, 4, 8),
        }
    }
}

/// One rank's model-state bytes under a ZeRO stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ZeroMemory {
    /// Parameter bytes (never partitioned in stages 0–2).
    pub param_bytes: u64,
    /// Gradient bytes.
    pub grad_bytes: u64,
    /// Optimizer-state bytes.
    pub optimizer_bytes: u64,
}

impl ZeroMemory {
    /// Sum of the three.
    pub fn total_bytes(&self) -> u64 {
        self.param_bytes + self.grad_bytes + self.optimizer_bytes
    }
}

/// Per-rank model-state bytes for `params` parameters on `ranks` ranks
/// (the table in the module docs). Errors: `ranks` outside
/// 1 ..= [`MAX_RANKS`], or a total beyond `u64`.
pub fn zero_memory(
    stage: ZeroStage,
    precision: AdamPrecision,
    params: u64,
    ranks: usize,
) -> Result<ZeroMemory> {
    if ranks == 0 || ranks > MAX_RANKS {
        return Err(Error::config("ranks", ranks, format!("1 ..= {MAX_RANKS}")));
    }
    let (p, g, o) = precision.bytes_per_param();
    let part = params.div_ceil(ranks as u64);
    let (g_elems, o_elems) = match stage {
        ZeroStage::Stage0 => (params, params),
        ZeroStage::Stage1 => (params, part),
        ZeroStage::Stage2 => (part, part),
    };
    let overflow = Error::Overflow {
        what: "ZeRO per-rank bytes",
    };
    let m = ZeroMemory {
        param_bytes: params.checked_mul(p).ok_or(overflow.clone())?,
        grad_bytes: g_elems.checked_mul(g).ok_or(overflow.clone())?,
        optimizer_bytes: o_elems.checked_mul(o).ok_or(overflow.clone())?,
    };
    m.param_bytes
        .checked_add(m.grad_bytes)
        .and_then(|x| x.checked_add(m.optimizer_bytes))
        .ok_or(overflow)?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_zero_paper_for_7_5b_params_on_64_ranks() {
        // ZeRO paper, figure 1: Ψ = 7.5 B, N = 64: 120 GB, 31.4 GB, 16.6 GB.
        let psi = 7_500_000_000u64;
        let t = |s| {
            zero_memory(s, AdamPrecision::Mixed, psi, 64)
                .unwrap()
                .total_bytes()
        };
        assert_eq!(t(ZeroStage::Stage0), 120_000_000_000);
        assert_eq!(t(ZeroStage::Stage1), 31_406_250_000); // 4Ψ + 12Ψ/N
        assert_eq!(t(ZeroStage::Stage2), 16_640_625_000); // 2Ψ + 14Ψ/N
    }

    #[test]
    fn formulas_for_both_precisions() {
        let (psi, n) = (1_000_000u64, 4usize);
        let q = psi / n as u64;
        let m = |s, p| zero_memory(s, p, psi, n).unwrap();
        use AdamPrecision::*;
        use ZeroStage::*;
        assert_eq!(m(Stage1, Mixed).total_bytes(), 4 * psi + 12 * q);
        assert_eq!(m(Stage2, Mixed).total_bytes(), 2 * psi + 14 * q);
        assert_eq!(m(Stage1, F32).total_bytes(), 8 * psi + 8 * q);
        assert_eq!(m(Stage2, F32).total_bytes(), 4 * psi + 12 * q);
        assert_eq!(m(Stage0, F32).total_bytes(), 16 * psi);
        assert_eq!(m(Stage2, Mixed).optimizer_bytes, 12 * q);
        // One rank: every stage is plain data parallelism.
        let one = |s| zero_memory(s, Mixed, psi, 1).unwrap();
        assert_eq!(one(Stage1), one(Stage0));
        assert_eq!(one(Stage2), one(Stage0));
    }

    #[test]
    fn rounds_the_partition_up_and_rejects_bad_input() {
        let m = zero_memory(ZeroStage::Stage1, AdamPrecision::Mixed, 10, 3).unwrap();
        assert_eq!(m.optimizer_bytes, 12 * 4);
        let e = zero_memory(ZeroStage::Stage1, AdamPrecision::Mixed, 10, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ranks = 0"), "{e}");
        let e = zero_memory(ZeroStage::Stage0, AdamPrecision::F32, u64::MAX / 4, 1).unwrap_err();
        assert!(matches!(e, Error::Overflow { .. }), "{e}");
    }
}
