//! [`PrioritizedReplayBuffer`]: proportional prioritized experience replay
//! (Schaul et al. 2015) on the same columnar storage as the uniform buffer.
//!
//! Stored priority `p_i = (|δ_i| + ε)^α`; a sum tree gives proportional,
//! stratified sampling (one draw per equal slice of the total), a min tree
//! the largest importance weight `(N · p_min / Σp)^-β` for normalisation,
//! and a max tree the current largest priority, which every new transition
//! gets: the maximum over the transitions stored *now*, not a running max
//! that remembers evicted or lowered ones. β anneals linearly from `beta` to
//! `beta_final` over `beta_steps` sample calls.
//!
//! A priority of 0 (possible with `eps = 0`) means "never sampled": such a
//! transition stays in the min tree (it is the first lowest-priority victim)
//! but is left out of the weight normaliser, whose largest weight is that of
//! the smallest *positive* priority; and a max of 0 does not make new
//! transitions unsampleable (they get `1.0`, as in an empty buffer).

use crate::batch::Batch;
use crate::buffer::{batch_items, fetch, push_all, Replay};
use crate::config::BufferConfig;
use crate::error::{Error, Result};
use crate::schema::{Column, Schema};
use crate::stats::BufferStats;
use crate::storage::{Order, Pushed, Storage};
use crate::tree::{MaxTree, MinTree, SumTree};
use gm_core::{MemoryReport, MemoryUsage};
use rand::{Rng, RngCore};
use std::sync::atomic::{AtomicU64, Ordering};

/// Which transition makes room for a new one when the buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Eviction {
    /// The oldest (ring order). Works with every schema.
    #[default]
    Fifo,
    /// The one with the lowest priority. Needs a schema without observation
    /// streams (rows shared by consecutive transitions must go in order).
    LowestPriority,
}

/// Prioritized-replay parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct PerConfig {
    /// Priority exponent α (0 = uniform). Default 0.6.
    pub alpha: f64,
    /// Initial importance-sampling exponent β. Default 0.4.
    pub beta: f64,
    /// β after annealing. Default 1.0.
    pub beta_final: f64,
    /// Sample calls over which β goes from `beta` to `beta_final` (0 = at once). Default 100 000.
    pub beta_steps: u64,
    /// Added to every priority so nothing has zero probability. Default 1e-6.
    pub eps: f64,
    /// Eviction when full. Default FIFO.
    pub eviction: Eviction,
}

impl Default for PerConfig {
    fn default() -> Self {
        Self {
            alpha: 0.6,
            beta: 0.4,
            beta_final: 1.0,
            beta_steps: 100_000,
            eps: 1e-6,
            eviction: Eviction::Fifo,
        }
    }
}

impl PerConfig {
    /// Checks ranges; the error names the key.
    pub fn validate(&self) -> Result<()> {
        if !(self.alpha >= 0.0 && self.alpha.is_finite()) {
            return Err(Error::config("alpha", self.alpha, "a finite value >= 0"));
        }
        for (k, v) in [("beta", self.beta), ("beta_final", self.beta_final)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::config(k, v, "a value in [0, 1]"));
            }
        }
        if !(self.eps >= 0.0 && self.eps.is_finite()) {
            return Err(Error::config("eps", self.eps, "a finite value >= 0"));
        }
        Ok(())
    }
}

/// Prioritized replay over columnar storage; see the module docs.
#[derive(Debug)]
pub struct PrioritizedReplayBuffer {
    st: Storage,
    cfg: PerConfig,
    sum: SumTree,
    min: MinTree,
    max: MaxTree,
    samples: AtomicU64,
    /// (slot, stored priority) of the update in progress (reused).
    pending: Vec<(usize, f64)>,
}

impl PrioritizedReplayBuffer {
    /// A buffer for `schema` with storage `config` and priority `per`.
    pub fn new(schema: Schema, config: BufferConfig, per: PerConfig) -> Result<Self> {
        per.validate()?;
        let order = match per.eviction {
            Eviction::Fifo => Order::Fifo,
            Eviction::LowestPriority => Order::Slots,
        };
        let st = Storage::new(schema, config, order)?;
        let n = st.capacity();
        Ok(Self {
            st,
            cfg: per,
            sum: SumTree::new(n),
            min: MinTree::new(n),
            max: MaxTree::new(n),
            samples: AtomicU64::new(0),
            pending: Vec::new(),
        })
    }

    pub(crate) fn from_parts(
        st: Storage,
        cfg: PerConfig,
        leaves: &[f64],
        samples: u64,
    ) -> Result<Self> {
        let n = st.capacity();
        let mut b = Self {
            st,
            cfg,
            sum: SumTree::new(n),
            min: MinTree::new(n),
            max: MaxTree::new(n),
            samples: AtomicU64::new(samples),
            pending: Vec::new(),
        };
        // Every live slot, zero priorities included: a live 0 is the first
        // lowest-priority victim, exactly as before saving.
        for (i, &v) in leaves.iter().enumerate() {
            if b.st.is_live(i) {
                b.set_leaf(i, v);
            }
        }
        Ok(b)
    }

    pub(crate) fn storage(&self) -> &Storage {
        &self.st
    }

    pub(crate) fn priority_leaves(&self) -> &[f64] {
        self.sum.leaves()
    }

    pub(crate) fn sample_calls(&self) -> u64 {
        self.samples.load(Ordering::Relaxed)
    }

    /// The priority configuration.
    pub fn per_config(&self) -> &PerConfig {
        &self.cfg
    }

    /// The storage configuration.
    pub fn config(&self) -> &BufferConfig {
        self.st.config()
    }

    fn set_leaf(&mut self, slot: usize, v: f64) {
        self.sum.set(slot, v);
        self.min.set(slot, v);
        self.max.set(slot, v);
    }

    fn unset_leaf(&mut self, slot: usize) {
        self.sum.set(slot, 0.0);
        self.min.unset(slot);
        self.max.unset(slot);
    }

    /// The priority every new transition gets: the largest stored now, or
    /// `1.0` when the buffer is empty or every stored priority is 0 (a new
    /// transition with priority 0 could never be sampled, so never updated).
    pub fn max_priority(&self) -> f64 {
        self.max.max().filter(|&m| m > 0.0).unwrap_or(1.0)
    }

    /// The smallest positive stored priority: the one with the largest
    /// importance weight among the transitions that can be sampled. Live
    /// zeros (only with `eps = 0`) cost a scan of the leaves.
    fn min_positive(&self) -> Option<f64> {
        match self.min.min() {
            Some(m) if m > 0.0 => Some(m),
            Some(_) => self
                .sum
                .leaves()
                .iter()
                .copied()
                .filter(|&v| v > 0.0)
                .min_by(f64::total_cmp),
            None => None,
        }
    }

    fn after_push(&mut self, p: Pushed) {
        let cap = self.st.capacity() as u64;
        for pos in p.evicted.0..p.evicted.1 {
            self.unset_leaf((pos % cap) as usize);
        }
        // The victim's own priority must not count as "current max".
        self.unset_leaf(p.slot);
        let v = self.max_priority();
        self.set_leaf(p.slot, v);
    }

    /// The slot a new transition replaces under lowest-priority eviction:
    /// a slot of minimum priority, the first at or after the slot written
    /// last (so equal priorities are replaced in ring order, oldest first,
    /// instead of the same lowest slot again and again).
    fn victim(&self) -> Option<usize> {
        match self.cfg.eviction {
            Eviction::LowestPriority if self.st.len() == self.st.capacity() => {
                self.min.argmin_from(self.st.last_slot() + 1)
            }
            _ => None,
        }
    }

    /// Adds one transition with the current max priority; returns its slot.
    pub fn add(&mut self, cols: &[Column<'_>]) -> Result<usize> {
        self.st.check(cols, 1)?;
        let p = self.st.push(cols, 0, self.victim())?;
        self.after_push(p);
        self.st.housekeeping();
        Ok(p.slot)
    }

    /// Adds transitions back to back; returns how many.
    pub fn add_batch(&mut self, cols: &[Column<'_>]) -> Result<usize> {
        let n = batch_items(self.st.schema(), cols)?;
        if let Some(evicted) = self.st.push_batch(cols, n)? {
            // Every item of the batch gets the max over the transitions that
            // remain after the batch's evictions.
            let cap = self.st.capacity() as u64;
            for pos in evicted.0..evicted.1 {
                self.unset_leaf((pos % cap) as usize);
            }
            let first = self.st.head_pos() - n as u64;
            self.give_batch_the_max((first..first + n as u64).map(|pos| (pos % cap) as usize));
            self.st.housekeeping();
            return Ok(n);
        }
        // Item by item (slot order, or a batch too large for one bulk push),
        // then the same rule as above: an early item must not keep (and pass
        // on) the priority of a transition that a later item evicted.
        let fifo = self.cfg.eviction == Eviction::Fifo;
        let head0 = self.st.head_pos();
        // Slot order only: the slots written (victims are not in ring order).
        let mut written = Vec::new();
        let r = push_all(n, |i| {
            let p = self.st.push(cols, i, self.victim())?;
            self.after_push(p);
            if !fifo {
                written.push(p.slot);
            }
            Ok(())
        });
        if fifo {
            // The positions pushed by this call that are still live.
            let cap = self.st.capacity() as u64;
            let head = self.st.head_pos();
            let live_from = head0.max(head - self.st.len() as u64);
            self.give_batch_the_max((live_from..head).map(|pos| (pos % cap) as usize));
        } else {
            // Every written slot holds an item of this call: slot order
            // evicts nothing but the victims it overwrites.
            self.give_batch_the_max(written.into_iter());
        }
        self.st.housekeeping();
        r
    }

    /// Gives the items of one `add_batch` call (in `slots`) the largest
    /// priority among the other transitions stored now.
    fn give_batch_the_max(&mut self, slots: impl Iterator<Item = usize> + Clone) {
        for s in slots.clone() {
            self.unset_leaf(s);
        }
        let v = self.max_priority();
        for s in slots {
            self.set_leaf(s, v);
        }
    }

    /// β for the next sample call.
    pub fn beta(&self) -> f64 {
        self.beta_at(self.samples.load(Ordering::Relaxed))
    }

    fn beta_at(&self, calls: u64) -> f64 {
        let c = &self.cfg;
        if c.beta_steps == 0 {
            return c.beta_final;
        }
        let t = (calls as f64 / c.beta_steps as f64).min(1.0);
        c.beta + (c.beta_final - c.beta) * t
    }

    /// An empty batch for this buffer's schema, to pass to `sample_into`.
    pub fn new_batch(&self) -> Batch {
        Batch::new(self.st.schema())
    }

    /// Samples into a new batch (allocates).
    pub fn sample<R: Rng + ?Sized>(&self, batch_size: usize, rng: &mut R) -> Result<Batch> {
        let mut b = Batch::new(self.st.schema());
        self.sample_into(&mut b, batch_size, rng)?;
        Ok(b)
    }

    /// Proportional stratified sampling of `batch_size` transitions, with
    /// importance weights normalised by the largest possible weight.
    pub fn sample_into<R: Rng + ?Sized>(
        &self,
        batch: &mut Batch,
        batch_size: usize,
        rng: &mut R,
    ) -> Result<()> {
        batch.check_layout(self.st.schema())?;
        let len = self.st.len();
        let total = self.sum.total();
        if len == 0 || total <= 0.0 {
            return Err(Error::Empty);
        }
        // The β schedule advances only when the call succeeds.
        let beta = self.beta_at(self.samples.load(Ordering::Relaxed));
        // w_i = (N·P(i))^-β / (N·P_min)^-β = (p_min / p_i)^β: N and the total
        // cancel, and the ratio form cannot overflow to inf/inf = NaN.
        let p_min = self.min_positive().unwrap_or(total);
        batch.resize(batch_size);
        let seg = total / batch_size.max(1) as f64;
        for i in 0..batch_size {
            let v = (i as f64 + rng.random::<f64>()) * seg;
            let slot = self.sum.find_prefix(v).ok_or(Error::Empty)?;
            batch.indices[i] = slot;
            batch.weights[i] = (p_min / self.sum.get(slot)).powf(beta) as f32;
        }
        self.st.gather(batch)?;
        self.samples.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Sets the priorities of `indices` (from a batch) to `(p + ε)^α`.
    ///
    /// Every value is checked first: a NaN, negative or infinite priority
    /// (or one whose stored priority `(p + ε)^α` would exceed
    /// `f64::MAX / (2 · capacity)`, so that the sum of all priorities stays
    /// finite), an index that holds no live transition, or mismatched
    /// lengths is an error naming the position, and then nothing is changed.
    pub fn update_priorities<P: Copy + Into<f64>>(
        &mut self,
        indices: &[usize],
        priorities: &[P],
    ) -> Result<()> {
        if indices.len() != priorities.len() {
            return Err(Error::LengthMismatch {
                what: "indices vs priorities",
                left: indices.len(),
                right: priorities.len(),
            });
        }
        let limit = f64::MAX / (2.0 * self.st.capacity() as f64);
        let mut pending = std::mem::take(&mut self.pending);
        pending.clear();
        for (position, (&index, &p)) in indices.iter().zip(priorities).enumerate() {
            let value: f64 = p.into();
            let stored = self.stored(value);
            if !value.is_finite() || value < 0.0 || stored > limit {
                self.pending = pending;
                return Err(Error::InvalidPriority {
                    position,
                    index,
                    value,
                });
            }
            if !self.st.is_live(index) {
                self.pending = pending;
                return Err(Error::IndexOutOfRange {
                    position,
                    index,
                    capacity: self.st.capacity(),
                    len: self.st.len(),
                });
            }
            pending.push((index, stored));
        }
        // One pass over the sum tree for the whole batch (shared ancestors
        // are recomputed once); min/max usually stop after a few levels.
        self.sum.set_many(&pending);
        for &(index, v) in &pending {
            self.min.set(index, v);
            self.max.set(index, v);
        }
        self.pending = pending;
        Ok(())
    }

    /// The stored priority `(p + ε)^α` of a raw priority `p`.
    fn stored(&self, p: f64) -> f64 {
        (p + self.cfg.eps).powf(self.cfg.alpha)
    }

    /// The stored priority `(p + ε)^α` of `slot` (0 if it holds nothing).
    pub fn priority(&self, slot: usize) -> f64 {
        if slot < self.st.capacity() {
            self.sum.get(slot)
        } else {
            0.0
        }
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

    /// Drops every transition and priority and returns storage to the OS.
    pub fn clear(&mut self) {
        self.st.clear();
        self.sum.clear();
        self.min.clear();
        self.max.clear();
    }

    /// The schema.
    pub fn schema(&self) -> &Schema {
        self.st.schema()
    }

    /// Contents and memory statistics (trees included in heap bytes).
    pub fn stats(&self) -> BufferStats {
        let mut s = self.st.stats();
        s.memory = self.memory_usage();
        s
    }

    fn tree_bytes(&self) -> u64 {
        (self.sum.memory_bytes()
            + self.min.memory_bytes()
            + self.max.memory_bytes()
            + self.pending.capacity() * std::mem::size_of::<(usize, f64)>()) as u64
    }

    /// Resident bytes: heap (trees included) + anonymous memory + file pages.
    pub fn bytes_used(&self) -> u64 {
        let m = self.memory_usage();
        m.heap_bytes + m.anon_bytes + m.file_bytes
    }

    /// Bytes claimed: heap capacity + mapped address space.
    pub fn bytes_reserved(&self) -> u64 {
        self.memory_usage().reserved_bytes
    }

    /// Compresses cold chunks now; see [`Replay::compress_cold`].
    pub fn compress_cold(&mut self, target_bytes: u64) -> u64 {
        self.st.compress_cold(target_bytes)
    }
}

impl MemoryReport for PrioritizedReplayBuffer {
    fn component(&self) -> &str {
        "replay/prioritized"
    }
    fn memory_usage(&self) -> MemoryUsage {
        let mut m = self.st.memory_usage();
        m.heap_bytes += self.tree_bytes();
        m.reserved_bytes += self.tree_bytes();
        m
    }
}

impl Replay for PrioritizedReplayBuffer {
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
        PrioritizedReplayBuffer::add(self, cols)
    }
    fn add_batch(&mut self, cols: &[Column<'_>]) -> Result<usize> {
        PrioritizedReplayBuffer::add_batch(self, cols)
    }
    fn mark_episode_end(&mut self) {
        PrioritizedReplayBuffer::mark_episode_end(self)
    }
    fn sample_into(
        &self,
        batch: &mut Batch,
        batch_size: usize,
        rng: &mut dyn RngCore,
    ) -> Result<()> {
        PrioritizedReplayBuffer::sample_into(self, batch, batch_size, rng)
    }
    fn fetch_into(&self, batch: &mut Batch, ranks: &[usize]) -> Result<()> {
        fetch(&self.st, batch, ranks)
    }
    fn stats(&self) -> BufferStats {
        PrioritizedReplayBuffer::stats(self)
    }
    fn compress_cold(&mut self, target_bytes: u64) -> u64 {
        self.st.compress_cold(target_bytes)
    }
    fn bytes_used(&self) -> u64 {
        PrioritizedReplayBuffer::bytes_used(self)
    }
    fn reclaimable_bytes(&self) -> u64 {
        self.st.reclaimable_bytes()
    }
    fn bytes_reserved(&self) -> u64 {
        PrioritizedReplayBuffer::bytes_reserved(self)
    }
}
