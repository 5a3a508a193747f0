//! [`Batch`]: a reusable sampled batch, one aligned array per column, plus
//! the sampled slot indices, importance weights and episode-end flags.
//! Sampling into an existing batch of the same size allocates nothing.

use crate::error::{Error, Result};
use crate::region::ReadCache;
use crate::schema::{DType, Element, Schema};

/// Bytes with 8-byte alignment, so any element type can be viewed in place.
#[derive(Debug, Default, Clone)]
pub(crate) struct AlignedBuf {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBuf {
    /// Resizes to `len` bytes, reusing capacity.
    pub(crate) fn set_len(&mut self, len: usize) {
        self.words.resize(len.div_ceil(8), 0);
        self.len = len;
    }
    pub(crate) fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
    }
    pub(crate) fn capacity_bytes(&self) -> usize {
        self.words.capacity() * 8
    }
}

#[derive(Debug, Clone)]
pub(crate) struct BatchColumn {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    numel: usize,
    data: AlignedBuf,
}

/// A sampled batch. Create one with `buffer.new_batch()` and pass it to
/// `sample_into` again and again: after the first call nothing is allocated.
///
/// Column `c` of item `i` is `get::<T>(name)?[i * numel .. (i + 1) * numel]`,
/// row-major in the field's shape (windows are `[window, features...]`).
#[derive(Debug)]
pub struct Batch {
    columns: Vec<BatchColumn>,
    len: usize,
    pub(crate) indices: Vec<usize>,
    pub(crate) weights: Vec<f32>,
    pub(crate) episode_end: Vec<bool>,
    pub(crate) positions: Vec<u64>,
    pub(crate) cache: ReadCache,
}

impl Clone for Batch {
    fn clone(&self) -> Self {
        Self {
            columns: self.columns.clone(),
            len: self.len,
            indices: self.indices.clone(),
            weights: self.weights.clone(),
            episode_end: self.episode_end.clone(),
            positions: Vec::new(),
            cache: ReadCache::default(),
        }
    }
}

impl BatchColumn {
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        self.data.bytes_mut()
    }
}

impl Batch {
    /// An empty batch for `schema`.
    pub fn new(schema: &Schema) -> Self {
        Self {
            columns: schema
                .columns()
                .iter()
                .map(|c| BatchColumn {
                    name: c.name.clone(),
                    dtype: c.dtype,
                    shape: c.shape.clone(),
                    numel: c.numel,
                    data: AlignedBuf::default(),
                })
                .collect(),
            len: 0,
            indices: Vec::new(),
            weights: Vec::new(),
            episode_end: Vec::new(),
            positions: Vec::new(),
            cache: ReadCache::default(),
        }
    }

    /// Checks that this batch was made for `schema`'s column layout.
    pub(crate) fn check_layout(&self, schema: &Schema) -> Result<()> {
        let ok = self.columns.len() == schema.columns().len()
            && self
                .columns
                .iter()
                .zip(schema.columns())
                .all(|(b, c)| b.dtype == c.dtype && b.numel == c.numel);
        if ok {
            Ok(())
        } else {
            Err(Error::Schema(
                "this batch was created for a different schema".into(),
            ))
        }
    }

    /// Sizes every column for `n` items (reusing capacity).
    pub(crate) fn resize(&mut self, n: usize) {
        self.len = n;
        for c in &mut self.columns {
            c.data.set_len(n * c.numel * c.dtype.size());
        }
        self.indices.resize(n, 0);
        self.weights.resize(n, 1.0);
        self.episode_end.resize(n, false);
    }

    /// Split borrows for the gather: (slots, columns, position scratch, cache).
    pub(crate) fn parts(
        &mut self,
    ) -> (&[usize], &mut [BatchColumn], &mut Vec<u64>, &mut ReadCache) {
        (
            &self.indices,
            &mut self.columns,
            &mut self.positions,
            &mut self.cache,
        )
    }

    /// Items in the batch.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the batch holds no items.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Column names, in schema order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|c| c.name.as_str())
    }

    /// The whole column `name` as `[len, shape...]`, row-major.
    pub fn get<T: Element>(&self, name: &str) -> Result<&[T]> {
        let c = self
            .columns
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| Error::UnknownField(name.to_owned()))?;
        if c.dtype != T::DTYPE {
            return Err(Error::DType {
                field: c.name.clone(),
                expected: c.dtype.name(),
                got: T::DTYPE.name(),
            });
        }
        bytemuck::checked::try_cast_slice(c.data.bytes()).map_err(|e| {
            Error::Unsupported(format!(
                "column {name:?} holds invalid {} values: {e}",
                c.dtype
            ))
        })
    }

    /// Item `i` of column `name`.
    pub fn item<T: Element>(&self, name: &str, i: usize) -> Result<&[T]> {
        let all = self.get::<T>(name)?;
        let numel = all.len() / self.len.max(1);
        all.get(i * numel..(i + 1) * numel)
            .ok_or(Error::IndexOutOfRange {
                position: 0,
                index: i,
                capacity: self.len,
                len: self.len,
            })
    }

    /// Shape of one item of column `name`.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        self.columns
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.shape.as_slice())
            .ok_or_else(|| Error::UnknownField(name.to_owned()))
    }

    /// The sampled slots (pass them to `update_priorities`).
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }

    /// Importance-sampling weights, normalised by the largest possible
    /// weight (all 1.0 for uniform sampling).
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// Whether each sampled transition was marked as its episode's last.
    pub fn episode_ends(&self) -> &[bool] {
        &self.episode_end
    }

    /// Heap bytes this batch holds (data, indices, decompression cache).
    pub fn heap_bytes(&self) -> usize {
        self.columns
            .iter()
            .map(|c| c.data.capacity_bytes())
            .sum::<usize>()
            + self.indices.capacity() * 8
            + self.weights.capacity() * 4
            + self.episode_end.capacity()
            + self.positions.capacity() * 8
            + self.cache.heap_bytes()
    }

    /// (hits, misses) of this batch's decompressed-chunk cache.
    pub fn cache_stats(&self) -> (u64, u64) {
        self.cache.stats()
    }
}
