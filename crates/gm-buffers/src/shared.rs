//! [`SharedReplay`]: a thread-safe handle (many writers, many samplers) over
//! any [`Replay`] buffer, and [`Writer`], a per-actor staging area that
//! hands transitions over in chunks so writers rarely contend for the lock.

use crate::batch::Batch;
use crate::buffer::Replay;
use crate::error::Result;
use crate::prioritized::PrioritizedReplayBuffer;
use crate::schema::{check_columns, Column, ColumnSpec, Schema};
use crate::stats::BufferStats;
use gm_core::{MemoryReport, MemoryUsage, Reclaim, ReclaimLevel, ReclaimTier};
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use rand::RngCore;
use std::sync::Arc;

/// A cloneable, thread-safe handle to a replay buffer.
///
/// Adds take the write lock; sampling takes the read lock, so samplers run
/// in parallel with each other. Each add is atomic: a sampler sees a
/// transition completely or not at all.
#[derive(Debug)]
pub struct SharedReplay<B: Replay> {
    inner: Arc<RwLock<B>>,
    name: Arc<str>,
}

impl<B: Replay> Clone for SharedReplay<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            name: self.name.clone(),
        }
    }
}

impl<B: Replay> SharedReplay<B> {
    /// Wraps `buffer`.
    pub fn new(buffer: B) -> Self {
        Self {
            inner: Arc::new(RwLock::new(buffer)),
            name: Arc::from("replay/shared"),
        }
    }

    /// Adds one transition.
    pub fn add(&self, cols: &[Column<'_>]) -> Result<usize> {
        self.inner.write().add(cols)
    }

    /// Adds transitions back to back (one lock acquisition).
    pub fn add_batch(&self, cols: &[Column<'_>]) -> Result<usize> {
        self.inner.write().add_batch(cols)
    }

    /// Marks the newest transition as the last of its episode.
    ///
    /// "Newest" is the buffer's, not the caller's: with several writers
    /// another thread may have added in between. Writers that share the
    /// buffer should go through a [`Writer`], whose
    /// [`mark_episode_end`](Writer::mark_episode_end) marks its own
    /// transition.
    pub fn mark_episode_end(&self) {
        self.inner.write().mark_episode_end()
    }

    /// Samples into `batch` under the read lock.
    pub fn sample_into(
        &self,
        batch: &mut Batch,
        batch_size: usize,
        rng: &mut dyn RngCore,
    ) -> Result<()> {
        self.inner.read().sample_into(batch, batch_size, rng)
    }

    /// An empty batch for the buffer's schema.
    pub fn new_batch(&self) -> Batch {
        self.inner.read().new_batch()
    }

    /// Live transitions.
    pub fn len(&self) -> usize {
        self.inner.read().len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Statistics.
    pub fn stats(&self) -> BufferStats {
        self.inner.read().stats()
    }

    /// Shared access to the buffer (blocks writers while held).
    pub fn read(&self) -> RwLockReadGuard<'_, B> {
        self.inner.read()
    }

    /// Exclusive access to the buffer.
    pub fn write(&self) -> RwLockWriteGuard<'_, B> {
        self.inner.write()
    }

    /// A staging writer that hands over `chunk` transitions at a time.
    pub fn writer(&self, chunk: usize) -> Writer<B> {
        let schema = self.inner.read().schema().clone();
        Writer::new(self.clone(), schema, chunk.max(1))
    }
}

impl SharedReplay<PrioritizedReplayBuffer> {
    /// Updates priorities under the write lock; see
    /// [`PrioritizedReplayBuffer::update_priorities`].
    pub fn update_priorities<P: Copy + Into<f64>>(
        &self,
        indices: &[usize],
        priorities: &[P],
    ) -> Result<()> {
        self.inner.write().update_priorities(indices, priorities)
    }
}

impl<B: Replay + MemoryReport> MemoryReport for SharedReplay<B> {
    fn component(&self) -> &str {
        &self.name
    }
    fn memory_usage(&self) -> MemoryUsage {
        self.inner.read().memory_usage()
    }
}

impl<B: Replay + MemoryReport> Reclaim for SharedReplay<B> {
    fn name(&self) -> &str {
        &self.name
    }

    /// Compression keeps every transition and costs CPU on access.
    fn tier(&self) -> ReclaimTier {
        ReclaimTier::Compressible
    }

    fn reclaimable_bytes(&self) -> u64 {
        self.inner.read().reclaimable_bytes()
    }

    /// `Cheap` gives nothing back (a replay buffer holds no caches of its
    /// own); `Moderate` compresses cold chunks down to half the resident
    /// bytes; `Emergency` compresses every cold chunk. Returns the drop in
    /// the buffer's own resident-byte accounting.
    fn reclaim(&self, level: ReclaimLevel) -> u64 {
        let mut b = self.inner.write();
        let before = b.memory_usage().resident_bytes();
        match level {
            ReclaimLevel::Cheap => {}
            ReclaimLevel::Moderate => {
                b.compress_cold(before / 2);
            }
            ReclaimLevel::Emergency => {
                b.compress_cold(0);
            }
        }
        before.saturating_sub(b.memory_usage().resident_bytes())
    }
}

/// A per-actor staging area: [`add`](Writer::add) copies into a local
/// chunk of `chunk` transitions, and the chunk goes into the buffer under
/// one lock acquisition when the next transition finds it full (or on
/// [`flush`](Writer::flush), or when the writer is dropped). A transition
/// therefore stays staged until the one after it arrives, so
/// [`mark_episode_end`](Writer::mark_episode_end) right after an `add`
/// always marks that transition, even while other writers add concurrently.
///
/// The staging memory is allocated once, at creation.
#[derive(Debug)]
pub struct Writer<B: Replay> {
    shared: SharedReplay<B>,
    schema: Schema,
    chunk: usize,
    staged: usize,
    cols: Vec<Vec<u8>>,
    episode_end: Vec<bool>,
    /// The buffer's `stats().adds` right after an explicit `flush` stored
    /// everything: while it is unchanged, the newest transition is ours.
    flushed_at: Option<u64>,
}

impl<B: Replay> Writer<B> {
    fn new(shared: SharedReplay<B>, schema: Schema, chunk: usize) -> Self {
        let cols = schema
            .columns()
            .iter()
            .map(|c| Vec::with_capacity(chunk * c.numel * c.dtype.size()))
            .collect();
        Self {
            shared,
            schema,
            chunk,
            staged: 0,
            cols,
            episode_end: Vec::with_capacity(chunk),
            flushed_at: None,
        }
    }

    /// Stages one transition. Bad input is rejected before anything else
    /// happens. If the chunk is full, it is flushed first; if that flush
    /// fails, `cols` is not staged, the transitions not stored stay staged
    /// (see [`flush`](Writer::flush)) and the error is returned.
    pub fn add(&mut self, cols: &[Column<'_>]) -> Result<()> {
        check_columns(&self.schema, cols, 1)?;
        if self.staged == self.chunk {
            self.store_staged(false)?;
        }
        for (dst, c) in self.cols.iter_mut().zip(cols) {
            dst.extend_from_slice(c.bytes);
        }
        self.episode_end.push(false);
        self.staged += 1;
        self.flushed_at = None;
        Ok(())
    }

    /// Marks this writer's newest transition as an episode end and returns
    /// true. That transition is normally still staged, so this is exact
    /// whatever other writers do. After an explicit [`flush`](Writer::flush)
    /// it is marked in the buffer if it is still the buffer's newest; if
    /// another writer has added since (or this writer never added anything),
    /// nothing is marked and the result is false.
    pub fn mark_episode_end(&mut self) -> bool {
        if let Some(e) = self.episode_end.last_mut() {
            *e = true;
            return true;
        }
        let Some(at) = self.flushed_at else {
            return false;
        };
        let mut buf = self.shared.write();
        if buf.stats().adds == at && !buf.is_empty() {
            buf.mark_episode_end();
            true
        } else {
            false
        }
    }

    /// Transitions staged and not yet in the buffer.
    pub fn staged(&self) -> usize {
        self.staged
    }

    /// Moves every staged transition into the buffer. On error the
    /// transitions not stored stay staged, so nothing is lost and `flush`
    /// can be retried.
    pub fn flush(&mut self) -> Result<()> {
        if self.staged == 0 {
            return Ok(());
        }
        self.store_staged(true)
    }

    /// Stores the staged transitions (see [`flush`](Writer::flush)); with
    /// `note_newest`, also remembers, under the same lock, the buffer's add
    /// count once everything is stored, for `mark_episode_end`.
    fn store_staged(&mut self, note_newest: bool) -> Result<()> {
        let specs: &[ColumnSpec] = self.schema.columns();
        let mut done = 0;
        let mut newest = None;
        let result = {
            let mut buf = self.shared.write();
            let mut result = Ok(());
            while done < self.staged {
                // Up to and including the next episode end.
                let end = self.episode_end[done..]
                    .iter()
                    .position(|&e| e)
                    .map_or(self.staged, |p| done + p + 1);
                let cols: Vec<Column<'_>> = self
                    .cols
                    .iter()
                    .zip(specs)
                    .map(|(bytes, s)| {
                        let per = s.numel * s.dtype.size();
                        Column {
                            dtype: s.dtype,
                            bytes: &bytes[done * per..end * per],
                            len: (end - done) * s.numel,
                        }
                    })
                    .collect();
                match buf.add_batch(&cols) {
                    Ok(_) => {
                        if self.episode_end[end - 1] {
                            buf.mark_episode_end();
                        }
                        done = end;
                    }
                    Err(crate::Error::BatchInterrupted { added, source, .. }) => {
                        done += added;
                        result = Err(*source);
                        break;
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            if note_newest && result.is_ok() {
                newest = Some(buf.stats().adds);
            }
            result
        };
        self.flushed_at = newest;
        // Drop what was stored, keep the rest staged.
        for (bytes, s) in self.cols.iter_mut().zip(specs) {
            bytes.drain(..done * s.numel * s.dtype.size());
        }
        self.episode_end.drain(..done);
        self.staged -= done;
        result
    }
}

impl<B: Replay> Drop for Writer<B> {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(staged = self.staged, error = %e, "replay writer dropped with transitions it could not store");
        }
    }
}
