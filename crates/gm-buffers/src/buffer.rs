//! [`ReplayBuffer`]: the uniform FIFO replay buffer, and the [`Replay`]
//! trait that the concurrent handle and the prefetcher are generic over.

use crate::batch::Batch;
use crate::config::BufferConfig;
use crate::error::{Error, Result};
use crate::schema::{check_columns, Column, Schema};
use crate::stats::BufferStats;
use crate::storage::{Order, Storage};
use gm_core::{MemoryReport, MemoryUsage};
use rand::{Rng, RngCore};

/// What every replay buffer offers; [`SharedReplay`](crate::SharedReplay)
/// and [`Prefetcher`](crate::Prefetcher) work with any implementor.
pub trait Replay: Send + Sync + 'static {
    /// The transition schema.
    fn schema(&self) -> &Schema;
    /// Live transitions.
    fn len(&self) -> usize;
    /// True when no transition is stored.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Transition slots.
    fn capacity(&self) -> usize;
    /// Adds one transition (columns in schema order); returns its slot.
    fn add(&mut self, cols: &[Column<'_>]) -> Result<usize>;
    /// Adds `n` transitions given back to back in each column; returns `n`.
    fn add_batch(&mut self, cols: &[Column<'_>]) -> Result<usize>;
    /// Marks the newest transition as the last of its episode.
    fn mark_episode_end(&mut self);
    /// Samples `batch_size` transitions into `batch` (allocation-free once
    /// the batch has held that many).
    fn sample_into(
        &self,
        batch: &mut Batch,
        batch_size: usize,
        rng: &mut dyn RngCore,
    ) -> Result<()>;
    /// Reads the live transitions at FIFO `ranks` (0 = oldest live, `len - 1`
    /// = newest) into `batch`, in that order, with weights 1. For exact
    /// inspection (tests, n-step targets, debugging); an out-of-range rank
    /// is an [`Error::IndexOutOfRange`] and leaves the batch unchanged.
    fn fetch_into(&self, batch: &mut Batch, ranks: &[usize]) -> Result<()>;
    /// An empty batch for this buffer's schema.
    fn new_batch(&self) -> Batch {
        Batch::new(self.schema())
    }
    /// Contents and memory statistics.
    fn stats(&self) -> BufferStats;
    /// Compresses cold chunks now (regardless of the budget) until resident
    /// bytes are at most `target_bytes`; returns resident bytes saved.
    fn compress_cold(&mut self, target_bytes: u64) -> u64;
    /// Resident bytes (heap + anonymous memory + touched file pages).
    fn bytes_used(&self) -> u64;
    /// An estimate of what compressing every cold chunk would free now: the
    /// raw bytes compression could still touch, times (1 - 1/ratio) with
    /// the ratio achieved so far (2 before anything was compressed).
    fn reclaimable_bytes(&self) -> u64;
    /// Bytes claimed (heap capacity + mapped address space).
    fn bytes_reserved(&self) -> u64;
}

/// Number of transitions in `cols` (validated against the schema).
pub(crate) fn batch_items(schema: &Schema, cols: &[Column<'_>]) -> Result<usize> {
    let n = match (cols.first(), schema.columns().first()) {
        (Some(c), Some(spec)) => c.len / spec.numel,
        _ => 0,
    };
    check_columns(schema, cols, n)?;
    Ok(n)
}

/// [`Replay::fetch_into`] for any storage.
pub(crate) fn fetch(st: &Storage, batch: &mut Batch, ranks: &[usize]) -> Result<()> {
    batch.check_layout(st.schema())?;
    if let Some((position, &index)) = ranks.iter().enumerate().find(|(_, &r)| r >= st.len()) {
        return Err(Error::IndexOutOfRange {
            position,
            index,
            capacity: st.capacity(),
            len: st.len(),
        });
    }
    batch.resize(ranks.len());
    for (i, &r) in ranks.iter().enumerate() {
        batch.indices[i] = st.live_slot(r);
    }
    batch.weights.fill(1.0);
    st.gather(batch)
}

/// Adds every transition of a validated batch through `push`, reporting a
/// mid-batch storage failure with the count stored so far.
pub(crate) fn push_all(n: usize, mut push: impl FnMut(usize) -> Result<()>) -> Result<usize> {
    for i in 0..n {
        if let Err(e) = push(i) {
            return Err(if i == 0 {
                e
            } else {
                Error::BatchInterrupted {
                    added: i,
                    total: n,
                    source: Box::new(e),
                }
            });
        }
    }
    Ok(n)
}

/// A uniform experience-replay ring buffer with columnar storage.
///
/// ```
/// use gm_buffers::{col, BufferConfig, DType, FieldSpec, ReplayBuffer, Schema};
/// use rand::SeedableRng;
///
/// let schema = Schema::new(vec![
///     FieldSpec::window("bars", DType::F32, &[4, 2]), // 4 bars x 2 features
///     FieldSpec::plain("action", DType::I64, &[]),
///     FieldSpec::plain("reward", DType::F32, &[]),
/// ])?;
/// let mut buf = ReplayBuffer::new(schema, BufferConfig::with_capacity(1000))?;
/// let obs = [1.0f32, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0];
/// let next = [2.0f32, 2.0, 3.0, 3.0, 4.0, 4.0, 5.0, 5.0];
/// buf.add(&[col(&obs), col(&next), col(&[1i64]), col(&[0.5f32])])?;
/// let mut rng = rand::rngs::StdRng::seed_from_u64(0);
/// let batch = buf.sample(8, &mut rng)?;
/// assert_eq!(batch.item::<f32>("next_bars", 3)?, &next);
/// # Ok::<(), gm_buffers::Error>(())
/// ```
#[derive(Debug)]
pub struct ReplayBuffer {
    st: Storage,
}

impl ReplayBuffer {
    /// A buffer for `schema` with `config` (validated).
    pub fn new(schema: Schema, config: BufferConfig) -> Result<Self> {
        Ok(Self {
            st: Storage::new(schema, config, Order::Fifo)?,
        })
    }

    pub(crate) fn from_storage(st: Storage) -> Self {
        Self { st }
    }

    pub(crate) fn storage(&self) -> &Storage {
        &self.st
    }

    /// The configuration.
    pub fn config(&self) -> &BufferConfig {
        self.st.config()
    }

    /// Adds one transition; see [`Replay::add`].
    pub fn add(&mut self, cols: &[Column<'_>]) -> Result<usize> {
        self.st.check(cols, 1)?;
        let slot = self.st.push(cols, 0, None)?.slot;
        self.st.housekeeping();
        Ok(slot)
    }

    /// Adds transitions back to back; see [`Replay::add_batch`].
    pub fn add_batch(&mut self, cols: &[Column<'_>]) -> Result<usize> {
        let n = batch_items(self.st.schema(), cols)?;
        let r = match self.st.push_batch(cols, n)? {
            Some(_) => Ok(n),
            None => push_all(n, |i| self.st.push(cols, i, None).map(|_| ())),
        };
        self.st.housekeeping();
        r
    }

    /// An empty batch for this buffer's schema, to pass to `sample_into`.
    pub fn new_batch(&self) -> Batch {
        Batch::new(self.st.schema())
    }

    /// Samples into a new batch (allocates; prefer [`sample_into`](Self::sample_into) in loops).
    pub fn sample<R: Rng + ?Sized>(&self, batch_size: usize, rng: &mut R) -> Result<Batch> {
        let mut b = Batch::new(self.st.schema());
        self.sample_into(&mut b, batch_size, rng)?;
        Ok(b)
    }

    /// Samples `batch_size` transitions uniformly with replacement.
    pub fn sample_into<R: Rng + ?Sized>(
        &self,
        batch: &mut Batch,
        batch_size: usize,
        rng: &mut R,
    ) -> Result<()> {
        batch.check_layout(self.st.schema())?;
        let len = self.st.len();
        if len == 0 {
            return Err(Error::Empty);
        }
        batch.resize(batch_size);
        for i in 0..batch_size {
            batch.indices[i] = self.st.live_slot(rng.random_range(0..len));
        }
        batch.weights.fill(1.0);
        self.st.gather(batch)
    }

    /// Marks the newest transition as the last of its episode.
    pub fn mark_episode_end(&mut self) {
        self.st.mark_episode_end()
    }

    /// Whether the transition in `slot` ended its episode.
    pub fn is_episode_end(&self, slot: usize) -> bool {
        self.st.is_episode_end(slot)
    }

    /// Live transitions.
    pub fn len(&self) -> usize {
        self.st.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.st.len() == 0
    }

    /// Transition slots.
    pub fn capacity(&self) -> usize {
        self.st.capacity()
    }

    /// Drops every transition and returns the storage's memory to the OS.
    pub fn clear(&mut self) {
        self.st.clear()
    }

    /// The schema.
    pub fn schema(&self) -> &Schema {
        self.st.schema()
    }

    /// Contents and memory statistics.
    pub fn stats(&self) -> BufferStats {
        self.st.stats()
    }

    /// Resident bytes: heap + anonymous memory + touched file pages.
    pub fn bytes_used(&self) -> u64 {
        let m = self.st.memory_usage();
        m.heap_bytes + m.anon_bytes + m.file_bytes
    }

    /// Bytes claimed: heap capacity + mapped address space.
    pub fn bytes_reserved(&self) -> u64 {
        self.st.memory_usage().reserved_bytes
    }

    /// Compresses cold chunks now; see [`Replay::compress_cold`].
    pub fn compress_cold(&mut self, target_bytes: u64) -> u64 {
        self.st.compress_cold(target_bytes)
    }
}

impl MemoryReport for ReplayBuffer {
    fn component(&self) -> &str {
        "replay/uniform"
    }
    fn memory_usage(&self) -> MemoryUsage {
        self.st.memory_usage()
    }
}

impl Replay for ReplayBuffer {
    fn schema(&self) -> &Schema {
        self.st.schema()
    }
    fn len(&self) -> usize {
        self.st.len()
    }
    fn capacity(&self) -> usize {
        self.st.capacity()
    }
    fn add(&mut self, cols: &[Column<'_>]) -> Result<usize> {
        ReplayBuffer::add(self, cols)
    }
    fn add_batch(&mut self, cols: &[Column<'_>]) -> Result<usize> {
        ReplayBuffer::add_batch(self, cols)
    }
    fn mark_episode_end(&mut self) {
        ReplayBuffer::mark_episode_end(self)
    }
    fn sample_into(
        &self,
        batch: &mut Batch,
        batch_size: usize,
        rng: &mut dyn RngCore,
    ) -> Result<()> {
        ReplayBuffer::sample_into(self, batch, batch_size, rng)
    }
    fn fetch_into(&self, batch: &mut Batch, ranks: &[usize]) -> Result<()> {
        fetch(&self.st, batch, ranks)
    }
    fn stats(&self) -> BufferStats {
        self.st.stats()
    }
    fn compress_cold(&mut self, target_bytes: u64) -> u64 {
        self.st.compress_cold(target_bytes)
    }
    fn bytes_used(&self) -> u64 {
        ReplayBuffer::bytes_used(self)
    }
    fn reclaimable_bytes(&self) -> u64 {
        self.st.reclaimable_bytes()
    }
    fn bytes_reserved(&self) -> u64 {
        ReplayBuffer::bytes_reserved(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{col, DType, FieldSpec};

    #[test]
    fn fetch_reads_live_transitions_oldest_first_and_rejects_dead_ranks() {
        let schema = Schema::new(vec![FieldSpec::plain("id", DType::I64, &[])]).unwrap();
        let mut buf = ReplayBuffer::new(schema, BufferConfig::with_capacity(5)).unwrap();
        for id in 0..8i64 {
            buf.add(&[col(&[id])]).unwrap();
        }
        let mut b = buf.new_batch();
        Replay::fetch_into(&buf, &mut b, &[0, 4, 2]).unwrap();
        assert_eq!(b.get::<i64>("id").unwrap(), &[3, 7, 5]);
        assert_eq!(b.weights(), &[1.0; 3]);
        let e = Replay::fetch_into(&buf, &mut b, &[1, 5]).unwrap_err();
        assert!(
            matches!(
                e,
                Error::IndexOutOfRange {
                    position: 1,
                    index: 5,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            b.get::<i64>("id").unwrap(),
            &[3, 7, 5],
            "a rejected fetch leaves the batch"
        );
    }
}
