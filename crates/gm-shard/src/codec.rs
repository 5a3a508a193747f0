//! Integers through the `f32` collectives. [`Communicator`](crate::Communicator)
//! moves `f32`s; the small control messages (step counters, batch sizes,
//! CRCs, fingerprints, memory statistics) send each `u64` as three 24-bit
//! pieces, which an `f32`'s 24-bit significand holds exactly, so every
//! value round-trips bit for bit whatever the backend's sum order.

/// `f32` pieces per `u64`.
pub const U64_PIECES: usize = 3;

/// `x` as three exact `f32`s, least significant 24 bits first.
pub fn u64_to_f32s(x: u64) -> [f32; U64_PIECES] {
    [0, 24, 48].map(|s| ((x >> s) & 0xFF_FFFF) as f32)
}

/// The `u64` of the first [`U64_PIECES`] pieces of `p` (made by
/// [`u64_to_f32s`]). Panics when `p` is shorter: the callers' message
/// layouts fix the length.
pub fn f32s_to_u64(p: &[f32]) -> u64 {
    p[..U64_PIECES]
        .iter()
        .enumerate()
        .fold(0u64, |x, (i, &v)| x | (v as u64) << (24 * i))
}

/// `values` as [`U64_PIECES`] `f32`s each.
pub fn encode_u64s(values: &[u64]) -> Vec<f32> {
    values.iter().flat_map(|&x| u64_to_f32s(x)).collect()
}

/// The `u64`s of `pieces` (made by [`encode_u64s`]; a trailing partial
/// group is ignored).
pub fn decode_u64s(pieces: &[f32]) -> Vec<u64> {
    pieces.chunks_exact(U64_PIECES).map(f32s_to_u64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_u64_round_trips_exactly() {
        for x in [
            0,
            1,
            0xFF_FFFF,
            1 << 24,
            u64::from(u32::MAX),
            1 << 63,
            u64::MAX - 1,
            u64::MAX,
        ] {
            assert_eq!(f32s_to_u64(&u64_to_f32s(x)), x);
        }
        let v = [5, u64::MAX, 0, 123_456_789_012];
        assert_eq!(decode_u64s(&encode_u64s(&v)), v);
        // Each piece is an integer below 2^24 (the top one holds 16 bits).
        assert_eq!(
            u64_to_f32s(u64::MAX),
            [16_777_215.0, 16_777_215.0, 65_535.0]
        );
    }
}
