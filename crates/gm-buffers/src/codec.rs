//! The cold-chunk codec: byte shuffle (blosc-style: byte k of every element
//! grouped together) followed by LZ4 block compression (lz4_flex).
//!
//! On float rows the shuffle is what makes LZ4 worth running: sign, exponent
//! and high mantissa bytes of neighbouring values repeat, low mantissa bytes
//! do not, and grouping them gives LZ4 long runs to match. (An XOR with the
//! previous row before the shuffle was measured on the benchmark's random
//! walks: ratio 1.88 -> 1.92, sampling from compressed chunks 3x slower, so
//! it is not used.) A chunk that does not shrink by at least [`MIN_GAIN`] is
//! left uncompressed.

/// A chunk is only kept compressed when it shrinks to at most this fraction.
pub(crate) const MIN_GAIN: f64 = 0.9;

/// Groups byte `k` of every `elem`-byte element: `dst[k * n + i] = src[i * elem + k]`.
pub(crate) fn shuffle(src: &[u8], elem: usize, dst: &mut [u8]) {
    debug_assert_eq!(src.len(), dst.len());
    match elem {
        4 if src.len().is_multiple_of(4) => shuffle_n::<4>(src, dst),
        8 if src.len().is_multiple_of(8) => shuffle_n::<8>(src, dst),
        2 if src.len().is_multiple_of(2) => shuffle_n::<2>(src, dst),
        _ => dst.copy_from_slice(src),
    }
}

fn shuffle_n<const E: usize>(src: &[u8], dst: &mut [u8]) {
    let n = src.len() / E;
    if n == 0 {
        return;
    }
    let (elems, _) = src.as_chunks::<E>();
    for (k, plane) in dst.chunks_exact_mut(n).enumerate() {
        for (d, e) in plane.iter_mut().zip(elems) {
            *d = e[k];
        }
    }
}

/// Inverse of [`shuffle`].
pub(crate) fn unshuffle(src: &[u8], elem: usize, dst: &mut [u8]) {
    debug_assert_eq!(src.len(), dst.len());
    match elem {
        4 if src.len().is_multiple_of(4) => unshuffle_n::<4>(src, dst),
        8 if src.len().is_multiple_of(8) => unshuffle_n::<8>(src, dst),
        2 if src.len().is_multiple_of(2) => unshuffle_n::<2>(src, dst),
        _ => dst.copy_from_slice(src),
    }
}

fn unshuffle_n<const E: usize>(src: &[u8], dst: &mut [u8]) {
    let n = src.len() / E;
    if n == 0 {
        return;
    }
    let (elems, _) = dst.as_chunks_mut::<E>();
    for (k, plane) in src.chunks_exact(n).enumerate() {
        for (e, &b) in elems.iter_mut().zip(plane) {
            e[k] = b;
        }
    }
}

/// Reusable scratch space for compression (no allocation per chunk beyond
/// the compressed result itself).
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    shuffled: Vec<u8>,
    out: Vec<u8>,
}

impl Scratch {
    /// Heap bytes held.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.shuffled.capacity() + self.out.capacity()
    }
}

/// Compresses `src` (elements of `elem` bytes). Returns `None` when the
/// result would not be smaller than [`MIN_GAIN`] of the input.
pub(crate) fn compress(src: &[u8], elem: usize, scratch: &mut Scratch) -> Option<Box<[u8]>> {
    scratch.shuffled.resize(src.len(), 0);
    shuffle(src, elem, &mut scratch.shuffled);
    scratch
        .out
        .resize(lz4_flex::block::get_maximum_output_size(src.len()), 0);
    let n = lz4_flex::block::compress_into(&scratch.shuffled, &mut scratch.out).ok()?;
    if n as f64 > src.len() as f64 * MIN_GAIN {
        return None;
    }
    Some(scratch.out[..n].to_vec().into_boxed_slice())
}

/// Decompresses `src` into `dst` (whose length is the original size), using
/// `tmp` (same length) for the shuffled bytes.
pub(crate) fn decompress_into(
    src: &[u8],
    elem: usize,
    tmp: &mut [u8],
    dst: &mut [u8],
) -> Result<(), String> {
    let n = lz4_flex::block::decompress_into(src, tmp).map_err(|e| e.to_string())?;
    if n != dst.len() {
        return Err(format!("decompressed {n} bytes, expected {}", dst.len()));
    }
    unshuffle(tmp, elem, dst);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn shuffle_round_trips(data in proptest::collection::vec(any::<u8>(), 0..512), elem in 1usize..9) {
            let mut s = vec![0; data.len()];
            let mut back = vec![0; data.len()];
            shuffle(&data, elem, &mut s);
            unshuffle(&s, elem, &mut back);
            prop_assert_eq!(back, data);
        }

        #[test]
        fn codec_round_trips_or_declines(data in proptest::collection::vec(0u8..4, 64..4096), elem in prop::sample::select(vec![1usize, 2, 4, 8])) {
            let len = data.len() / elem * elem;
            let data = &data[..len];
            let mut sc = Scratch::default();
            if let Some(c) = compress(data, elem, &mut sc) {
                prop_assert!(c.len() as f64 <= len as f64 * MIN_GAIN);
                let mut tmp = vec![0; len];
                let mut out = vec![0; len];
                decompress_into(&c, elem, &mut tmp, &mut out).unwrap();
                prop_assert_eq!(&out[..], data);
            }
        }
    }

    #[test]
    fn random_walk_floats_compress_and_noise_does_not() {
        let mut x = 100.0f32;
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let walk: Vec<f32> = (0..4096)
            .map(|_| {
                x += next() * 0.02;
                x
            })
            .collect();
        let bytes: &[u8] = bytemuck::cast_slice(&walk);
        let mut sc = Scratch::default();
        let c = compress(bytes, 4, &mut sc).expect("a random walk compresses");
        assert!(
            (c.len() as f64) < bytes.len() as f64 * 0.8,
            "ratio {}",
            bytes.len() as f64 / c.len() as f64
        );
        let noise: Vec<u8> = (0..16384).map(|_| (next() * 255.0) as i32 as u8).collect();
        assert!(compress(&noise, 1, &mut sc).is_none());
        let mut tmp = vec![0; bytes.len()];
        let mut out = vec![0; bytes.len()];
        decompress_into(&c, 4, &mut tmp, &mut out).unwrap();
        assert_eq!(out, bytes);
        assert!(decompress_into(&c[..c.len() / 2], 4, &mut tmp, &mut out).is_err());
    }
}
