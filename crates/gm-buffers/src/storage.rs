//! [`Storage`]: the columnar core shared by the uniform and prioritized
//! buffers: a ring (or slot array) of transitions, one [`Region`] per plain
//! field, and one row stream per observation field with de-duplicated
//! sliding windows.
//!
//! # Observation streams
//! Each observation field is stored as a ring of rows (`rows_per_stream`
//! rows). A transition keeps, per stream, the ring index of its
//! observation's last row (`u32`) and how many rows its next observation is
//! ahead (`u8`/`u16`). Windows are rebuilt at sample time by copying
//! `window` consecutive rows. On add, the new observation is compared
//! byte-for-byte with the newest stored rows, and the next observation with
//! the observation itself, at every shift; only rows that are not already
//! stored are appended. So a 48-row window sliding one bar per step costs one
//! row per step, a window that did not move costs nothing, and a new episode
//! costs one full window.
//!
//! # Invariants
//! - Live transitions are `[head - len, head)` (FIFO) or slots `0..len`
//!   (slot order, plain schemas only).
//! - The obs-window start of live transitions is non-decreasing in insertion
//!   order, and every live transition's rows are among the last
//!   `rows_per_stream` rows of its stream. Before rows are overwritten the
//!   transitions that use them are evicted (FIFO), so no sampled window is
//!   ever stale.
//! - A call that returns `Err` has changed nothing.

use crate::batch::Batch;
use crate::codec::Scratch;
use crate::config::{BufferConfig, StorageMode};
use crate::error::{Error, Result};
use crate::region::{Backing, Chunk, ReadCache, Region};
use crate::schema::{check_columns, Column, FieldKind, Schema};
use gm_core::MemoryUsage;

/// Plain fields narrower than this (bytes per transition), and the stream
/// positions, are compressed only when compressing the bulk (row streams,
/// wide fields) did not reach the target: a sampled slot decompresses a
/// whole chunk for a few bytes.
pub(crate) const BULK_SLOT_BYTES: usize = 16;

/// How slots are reused once the buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    /// Oldest first (ring).
    Fifo,
    /// The caller picks the victim slot (lowest-priority eviction).
    Slots,
}

#[derive(Debug)]
struct PlainCol {
    region: Region,
    slot_bytes: usize,
    col: usize,
}

#[derive(Debug)]
pub(crate) struct Stream {
    window: usize,
    row_bytes: usize,
    rows: Region,
    row_cap: u64,
    /// Rows ever appended.
    row_head: u64,
    /// `row_head % row_cap`, kept incrementally (no division on the add path).
    ring_head: u64,
    /// Per slot: ring index of the obs window's last row.
    ends: Region,
    /// Per slot: rows from the obs window's end to the next window's end.
    shifts: Region,
    shift_bytes: usize,
    obs_col: usize,
    next_col: usize,
    /// Last next-shift seen (tried first).
    hint: usize,
    /// Rows below this absolute position are released (or were never live).
    released_below: u64,
    /// A lower bound of the oldest live transition's first row (obs starts
    /// only grow as the tail advances), so the overwrite check reads the
    /// tail's position only when appending could reach it. 0 = unknown.
    tail_start_lb: u64,
    /// Stored rows (for the de-duplication ratio).
    rows_appended: u64,
}

/// How each batch column is produced.
#[derive(Debug, Clone, Copy)]
pub(crate) enum OutCol {
    Plain(usize),
    Obs(usize),
    Next(usize),
}

/// What one push did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pushed {
    /// The slot written.
    pub slot: usize,
    /// Absolute FIFO positions evicted (`start..end`); slots are `pos % capacity`.
    pub evicted: (u64, u64),
}

/// Rows of `b` (a `w`-row window) that are new after `a`: the smallest `k`
/// (trying `hint` first) with `b[..w-k rows] == a[k rows..]`, or `w` when
/// they share nothing. Identical memory needs no comparison.
#[inline]
fn overlap(a: &[u8], b: &[u8], w: usize, rb: usize, hint: usize) -> usize {
    if std::ptr::eq(a, b) {
        return 0;
    }
    let fits = |k: usize| k < w && b[..(w - k) * rb] == a[k * rb..];
    if fits(hint) {
        hint
    } else {
        (0..w).find(|&k| fits(k)).unwrap_or(w)
    }
}

/// Counters reported by [`BufferStats`](crate::BufferStats).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counters {
    pub adds: u64,
    pub evicted_early: u64,
    pub compress_sweeps: u64,
    pub chunks_compressed: u64,
    pub chunks_released: u64,
}

#[derive(Debug)]
pub(crate) struct Storage {
    schema: Schema,
    cfg: BufferConfig,
    order: Order,
    cap: usize,
    head: u64,
    len: usize,
    plain: Vec<PlainCol>,
    streams: Vec<Stream>,
    out: Vec<OutCol>,
    episode_end: Vec<u64>,
    /// The last transition ended an episode: do not look for overlap.
    fresh_episode: bool,
    /// Slot written by the newest push.
    last_slot: usize,
    /// Per-item plans of `push_batch` (reused).
    plan_buf: Vec<(u16, u16)>,
    /// Resident bytes at which the next automatic sweep may run (raised
    /// after a sweep that could not reach its target, so a buffer whose
    /// compressed form still exceeds the mark does not sweep on every add).
    next_sweep_at: u64,
    write_cache: ReadCache,
    scratch: Vec<u8>,
    codec: Scratch,
    pub(crate) counters: Counters,
}

fn ring_ranges(start: u64, count: u64, ring: u64) -> [(u64, u64); 2] {
    // Splits ring positions start..start+count (absolute) into at most two
    // (ring_index, count) pieces.
    let s = start % ring;
    let first = count.min(ring - s);
    [(s, first), (0, count - first)]
}

impl Storage {
    pub(crate) fn new(schema: Schema, cfg: BufferConfig, order: Order) -> Result<Self> {
        cfg.validate()?;
        if order == Order::Slots && schema.has_observations() {
            return Err(Error::Unsupported(
                "lowest-priority eviction needs a schema without observation streams: \
                 de-duplicated rows are shared by consecutive transitions and must be evicted \
                 in order (use FIFO eviction, or plain fields for obs and next_obs)"
                    .into(),
            ));
        }
        let cap = cfg.capacity;
        let cb = cfg.chunk_bytes;
        // Plan every region first, so the placement decision sees the total.
        let mut total = 0u64;
        let mut stream_rows = Vec::new();
        // Sizes in checked arithmetic: an absurd shape or capacity is an
        // error, not an overflow.
        let too_big = |what: &str| {
            Error::config(
                "capacity",
                cap,
                format!("a size that fits in memory ({what} overflows)"),
            )
        };
        for f in schema.fields() {
            let elem = f.dtype().size();
            match f.kind() {
                FieldKind::Plain => {
                    let bytes = cap
                        .checked_mul(f.numel())
                        .and_then(|x| x.checked_mul(elem))
                        .ok_or_else(|| too_big(f.name()))?;
                    total = total.saturating_add(bytes as u64);
                }
                FieldKind::Observation { window } => {
                    let rows = match cfg.rows_per_stream {
                        Some(r) => r,
                        None => cap
                            .checked_mul(2)
                            .and_then(|x| x.checked_add(window.checked_mul(4)?))
                            .ok_or_else(|| too_big(f.name()))?,
                    };
                    if rows < 2 * window + 1 {
                        return Err(Error::config(
                            "rows_per_stream",
                            rows,
                            format!(
                                "at least 2 * window + 1 = {} for field {:?}",
                                2 * window + 1,
                                f.name()
                            ),
                        ));
                    }
                    let bytes = rows
                        .checked_mul(f.row_numel())
                        .and_then(|x| x.checked_mul(elem))
                        .and_then(|x| x.checked_add(cap.checked_mul(6)?))
                        .ok_or_else(|| too_big(f.name()))?;
                    if rows > u32::MAX as usize {
                        return Err(Error::config(
                            "rows_per_stream",
                            rows,
                            format!("at most {}", u32::MAX),
                        ));
                    }
                    total = total.saturating_add(bytes as u64);
                    stream_rows.push(rows);
                }
            }
        }
        let backing = match cfg.storage {
            StorageMode::Memory => Backing::Anon,
            StorageMode::File => Backing::File(cfg.dir()),
            StorageMode::Auto { threshold_bytes } if total > threshold_bytes => {
                Backing::File(cfg.dir())
            }
            StorageMode::Auto { .. } => Backing::Anon,
        };
        let mut plain = Vec::new();
        let mut streams = Vec::new();
        let mut out = Vec::new();
        let mut rows_iter = stream_rows.into_iter();
        for c in schema.columns() {
            let f = &schema.fields()[c.field];
            let elem = f.dtype().size();
            match (f.kind(), c.is_next) {
                (FieldKind::Plain, _) => {
                    let slot_bytes = f.numel() * elem;
                    let mut region = Region::new(cap * slot_bytes, elem, cb, &backing)?;
                    if slot_bytes < BULK_SLOT_BYTES {
                        region = region.second_tier();
                    }
                    out.push(OutCol::Plain(plain.len()));
                    plain.push(PlainCol {
                        region,
                        slot_bytes,
                        col: out.len() - 1,
                    });
                }
                (FieldKind::Observation { window }, false) => {
                    let rows = rows_iter.next().expect("planned above");
                    let row_bytes = f.row_numel() * elem;
                    let shift_bytes = if window <= u8::MAX as usize { 1 } else { 2 };
                    out.push(OutCol::Obs(streams.len()));
                    streams.push(Stream {
                        window,
                        row_bytes,
                        rows: Region::new(rows * row_bytes, elem, cb, &backing)?,
                        row_cap: rows as u64,
                        row_head: 0,
                        ring_head: 0,
                        ends: Region::new(cap * 4, 4, cb, &backing)?.second_tier(),
                        shifts: Region::new(cap * shift_bytes, shift_bytes, cb, &backing)?
                            .second_tier(),
                        shift_bytes,
                        obs_col: out.len() - 1,
                        next_col: out.len(),
                        hint: 1,
                        released_below: 0,
                        tail_start_lb: 0,
                        rows_appended: 0,
                    });
                }
                (FieldKind::Observation { .. }, true) => out.push(OutCol::Next(streams.len() - 1)),
            }
        }
        Ok(Self {
            schema,
            cfg,
            order,
            cap,
            head: 0,
            len: 0,
            plain,
            streams,
            out,
            episode_end: vec![0; cap.div_ceil(64)],
            fresh_episode: true,
            last_slot: 0,
            plan_buf: Vec::new(),
            next_sweep_at: 0,
            write_cache: ReadCache::new(4),
            scratch: Vec::new(),
            codec: Scratch::default(),
            counters: Counters::default(),
        })
    }

    pub(crate) fn schema(&self) -> &Schema {
        &self.schema
    }
    pub(crate) fn config(&self) -> &BufferConfig {
        &self.cfg
    }
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }
    pub(crate) fn len(&self) -> usize {
        self.len
    }
    /// The slot written by the newest push.
    pub(crate) fn last_slot(&self) -> usize {
        self.last_slot
    }
    /// Transitions pushed ever (FIFO position of the next one).
    pub(crate) fn head_pos(&self) -> u64 {
        self.head
    }
    pub(crate) fn order(&self) -> Order {
        self.order
    }

    /// The slot of the `r`-th live transition (0 = oldest in FIFO order).
    #[inline]
    pub(crate) fn live_slot(&self, r: usize) -> usize {
        match self.order {
            Order::Fifo => ((self.head - self.len as u64 + r as u64) % self.cap as u64) as usize,
            Order::Slots => r,
        }
    }

    /// True when `slot` holds a live transition.
    pub(crate) fn is_live(&self, slot: usize) -> bool {
        if slot >= self.cap {
            return false;
        }
        match self.order {
            Order::Fifo => {
                let cap = self.cap as u64;
                let tail = self.head - self.len as u64;
                // The absolute position congruent to `slot` in [tail, tail + cap).
                let pos = tail + (slot as u64 + cap - tail % cap) % cap;
                pos < self.head
            }
            Order::Slots => slot < self.len,
        }
    }

    /// Marks the newest transition as the last of its episode.
    pub(crate) fn mark_episode_end(&mut self) {
        if self.len == 0 {
            return;
        }
        let slot = match self.order {
            Order::Fifo => ((self.head - 1) % self.cap as u64) as usize,
            Order::Slots => self.last_slot,
        };
        self.episode_end[slot / 64] |= 1 << (slot % 64);
        self.fresh_episode = true;
    }

    pub(crate) fn is_episode_end(&self, slot: usize) -> bool {
        slot < self.cap && self.episode_end[slot / 64] & (1 << (slot % 64)) != 0
    }

    /// Validates `items` transitions' columns.
    pub(crate) fn check(&self, cols: &[Column<'_>], items: usize) -> Result<()> {
        check_columns(&self.schema, cols, items)
    }

    /// Rows to append for `obs` (`k_obs`) and `next` (`k_next`).
    /// Rows to append for `obs` (`k_obs`) and `next` (`k_next`).
    /// `prev_next`: the previous item's next observation in the same call,
    /// which is exactly the newest stored window.
    fn plan_stream(
        &self,
        s: &Stream,
        obs: &[u8],
        next: &[u8],
        prev_next: Option<&[u8]>,
        hint: usize,
    ) -> (usize, usize) {
        let (w, rb) = (s.window, s.row_bytes);
        let k_obs = match prev_next {
            Some(prev) => overlap(prev, obs, w, rb, 0),
            None if self.len > 0 && !self.fresh_episode => {
                // obs[..w-k] must equal the newest w-k stored rows.
                (0..w)
                    .find(|&k| {
                        self.stored_rows_eq(s, s.row_head - (w - k) as u64, &obs[..(w - k) * rb])
                    })
                    .unwrap_or(w)
            }
            None => w,
        };
        (k_obs, overlap(obs, next, w, rb, hint))
    }

    fn stored_rows_eq(&self, s: &Stream, start: u64, want: &[u8]) -> bool {
        let rb = s.row_bytes as u64;
        let mut off = 0usize;
        for (ri, n) in ring_ranges(start, want.len() as u64 / rb, s.row_cap) {
            if n == 0 {
                continue;
            }
            let len = (n * rb) as usize;
            match s.rows.raw_slice((ri * rb) as usize, len) {
                Some(have) if have == &want[off..off + len] => off += len,
                _ => return false,
            }
        }
        true
    }

    /// Absolute row position of the ring index `ring` (the newest such).
    fn abs_row(s: &Stream, ring: u64) -> u64 {
        let last = s.row_head - 1;
        last - ((last % s.row_cap + s.row_cap - ring) % s.row_cap)
    }

    fn read_u32(region: &Region, slot: usize, cache: &mut ReadCache) -> Result<u32> {
        let mut b = [0u8; 4];
        region.read(slot * 4, &mut b, cache)?;
        Ok(u32::from_le_bytes(b))
    }

    fn read_shift(s: &Stream, slot: usize, cache: &mut ReadCache) -> Result<u64> {
        let mut b = [0u8; 2];
        s.shifts
            .read(slot * s.shift_bytes, &mut b[..s.shift_bytes], cache)?;
        Ok(u16::from_le_bytes(b) as u64)
    }

    /// Absolute first row of the obs window of FIFO position `pos`.
    fn obs_start(&mut self, si: usize, pos: u64) -> Result<u64> {
        let slot = (pos % self.cap as u64) as usize;
        let s = &self.streams[si];
        let end = Self::read_u32(&s.ends, slot, &mut self.write_cache)? as u64;
        Ok(Self::abs_row(s, end) + 1 - s.window as u64)
    }

    /// How many of the oldest transitions must go (at least `evict`, the
    /// count already decided) so that appending `rows` rows to stream `si`
    /// overwrites no row of a live transition. Only reads; records the new
    /// oldest transition's first row as the stream's lower bound.
    fn evict_for_rows(&mut self, si: usize, rows: u64, mut evict: usize) -> Result<usize> {
        let s = &self.streams[si];
        let floor = (s.row_head + rows).saturating_sub(s.row_cap);
        if floor <= s.tail_start_lb {
            return Ok(evict);
        }
        let tail = self.head - self.len as u64;
        while evict < self.len {
            let start = self.obs_start(si, tail + evict as u64)?;
            if start >= floor {
                // tail + evict becomes the oldest live transition
                self.streams[si].tail_start_lb = start;
                break;
            }
            evict += 1;
        }
        Ok(evict)
    }

    /// Adds transition `item` of `cols` (already validated for `items`).
    /// `victim`: the slot to overwrite in slot order once full.
    pub(crate) fn push(
        &mut self,
        cols: &[Column<'_>],
        item: usize,
        victim: Option<usize>,
    ) -> Result<Pushed> {
        // 1. Plan: rows per stream, evictions. Nothing is changed yet.
        let mut plans = [(0usize, 0usize); 16];
        let mut plans_vec = Vec::new();
        let nstreams = self.streams.len();
        let plans: &mut [(usize, usize)] = if nstreams <= 16 {
            &mut plans[..nstreams]
        } else {
            plans_vec.resize(nstreams, (0, 0));
            &mut plans_vec
        };
        for (si, s) in self.streams.iter().enumerate() {
            let per = s.window * s.row_bytes;
            let obs = &cols[s.obs_col].bytes[item * per..(item + 1) * per];
            let next = &cols[s.next_col].bytes[item * per..(item + 1) * per];
            let prev_next = item
                .checked_sub(1)
                .map(|p| &cols[s.next_col].bytes[p * per..(p + 1) * per]);
            plans[si] = self.plan_stream(s, obs, next, prev_next, s.hint);
        }
        let (slot, evict) = match self.order {
            Order::Slots => {
                let slot = if self.len < self.cap {
                    self.len
                } else {
                    victim.filter(|&v| v < self.cap).ok_or_else(|| {
                        Error::Unsupported("slot order needs a victim slot when full".into())
                    })?
                };
                (slot, 0)
            }
            Order::Fifo => {
                let mut evict = usize::from(self.len == self.cap);
                for (si, &(k_obs, k_next)) in plans.iter().enumerate() {
                    evict = self.evict_for_rows(si, (k_obs + k_next) as u64, evict)?;
                }
                ((self.head % self.cap as u64) as usize, evict)
            }
        };
        // 2. Prepare every write (file space, decompression): the only
        //    fallible step. On error nothing has been modified.
        let mut scratch = std::mem::take(&mut self.scratch);
        let prep = self.prepare(slot, plans, &mut scratch);
        self.scratch = scratch;
        prep?;
        // 3. Apply.
        let tail = self.head - self.len as u64;
        let evicted = (tail, tail + evict as u64);
        if evict > 0 {
            let early = evict - usize::from(self.len == self.cap);
            self.counters.evicted_early += early as u64;
            self.len -= evict;
        }
        for (si, &(k_obs, k_next)) in plans.iter().enumerate() {
            let s = &mut self.streams[si];
            let per = s.window * s.row_bytes;
            let obs = &cols[s.obs_col].bytes[item * per..(item + 1) * per];
            let next = &cols[s.next_col].bytes[item * per..(item + 1) * per];
            let obs_end = Self::append_rows(s, &obs[(s.window - k_obs) * s.row_bytes..]);
            Self::append_rows(s, &next[(s.window - k_next) * s.row_bytes..]);
            if k_next < s.window {
                s.hint = k_next;
            }
            s.ends.write(slot * 4, &(obs_end as u32).to_le_bytes());
            let sh = (k_next as u16).to_le_bytes();
            s.shifts.write(slot * s.shift_bytes, &sh[..s.shift_bytes]);
        }
        for p in &mut self.plain {
            let b = &cols[p.col].bytes[item * p.slot_bytes..(item + 1) * p.slot_bytes];
            p.region.write(slot * p.slot_bytes, b);
        }
        self.episode_end[slot / 64] &= !(1 << (slot % 64));
        self.fresh_episode = false;
        self.head += 1;
        self.len = (self.len + 1).min(self.cap);
        self.last_slot = slot;
        self.counters.adds += 1;
        Ok(Pushed { slot, evicted })
    }

    /// Pushes items `0..n` of a validated batch in bulk (FIFO only): plans
    /// every item, evicts once, then writes each column's slot range with
    /// one copy. Returns `Ok(None)` without changing anything when the batch
    /// does not qualify (slot order, more than half the capacity, or more
    /// rows than a stream can hold at once); the caller then pushes item by
    /// item. Otherwise returns the evicted FIFO positions.
    pub(crate) fn push_batch(
        &mut self,
        cols: &[Column<'_>],
        n: usize,
    ) -> Result<Option<(u64, u64)>> {
        if self.order != Order::Fifo || n == 0 || n > self.cap / 2 {
            return Ok(None);
        }
        let ns = self.streams.len();
        // 1. Plan every item of every stream.
        let mut plans = std::mem::take(&mut self.plan_buf);
        plans.clear();
        plans.resize(n * ns, (0, 0));
        let mut fits = true;
        for (si, s) in self.streams.iter().enumerate() {
            let per = s.window * s.row_bytes;
            let (obs_col, next_col) = (cols[s.obs_col].bytes, cols[s.next_col].bytes);
            let mut hint = s.hint;
            let mut total = 0u64;
            for i in 0..n {
                let obs = &obs_col[i * per..(i + 1) * per];
                let next = &next_col[i * per..(i + 1) * per];
                let prev = i.checked_sub(1).map(|p| &next_col[p * per..(p + 1) * per]);
                let (k_obs, k_next) = self.plan_stream(s, obs, next, prev, hint);
                if k_next < s.window {
                    hint = k_next;
                }
                total += (k_obs + k_next) as u64;
                plans[si * n + i] = (k_obs as u16, k_next as u16);
            }
            fits &= total + s.window as u64 <= s.row_cap;
        }
        if !fits {
            self.plan_buf = plans;
            return Ok(None);
        }
        // 2. Evictions: slots, then rows each stream is about to overwrite.
        let tail = self.head - self.len as u64;
        let slot_evict = (self.len + n).saturating_sub(self.cap);
        let mut evict = slot_evict;
        for si in 0..ns {
            let total: u64 = plans[si * n..(si + 1) * n]
                .iter()
                .map(|&(a, b)| (a + b) as u64)
                .sum();
            evict = self.evict_for_rows(si, total, evict)?;
        }
        // 3. Prepare (the only fallible step).
        let cap = self.cap as u64;
        let slots = ring_ranges(self.head, n as u64, cap);
        let mut scratch = std::mem::take(&mut self.scratch);
        let prep = (|| -> Result<()> {
            for (si, s) in self.streams.iter_mut().enumerate() {
                let rb = s.row_bytes as u64;
                let total: u64 = plans[si * n..(si + 1) * n]
                    .iter()
                    .map(|&(a, b)| (a + b) as u64)
                    .sum();
                for (ri, k) in ring_ranges(s.row_head, total, s.row_cap) {
                    s.rows
                        .prepare_write((ri * rb) as usize, (k * rb) as usize, &mut scratch)?;
                }
                for (si0, k) in slots {
                    s.ends
                        .prepare_write(si0 as usize * 4, k as usize * 4, &mut scratch)?;
                    s.shifts.prepare_write(
                        si0 as usize * s.shift_bytes,
                        k as usize * s.shift_bytes,
                        &mut scratch,
                    )?;
                }
            }
            for p in &mut self.plain {
                for (si0, k) in slots {
                    p.region.prepare_write(
                        si0 as usize * p.slot_bytes,
                        k as usize * p.slot_bytes,
                        &mut scratch,
                    )?;
                }
            }
            Ok(())
        })();
        if let Err(e) = prep {
            self.scratch = scratch;
            self.plan_buf = plans;
            return Err(e);
        }
        // 4. Apply.
        self.counters.evicted_early += (evict - slot_evict) as u64;
        self.len -= evict;
        for (si, s) in self.streams.iter_mut().enumerate() {
            let per = s.window * s.row_bytes;
            let (obs_col, next_col) = (cols[s.obs_col].bytes, cols[s.next_col].bytes);
            scratch.clear();
            scratch.resize(n * (4 + s.shift_bytes), 0);
            let (ends, shifts) = scratch.split_at_mut(n * 4);
            for i in 0..n {
                let (k_obs, k_next) = plans[si * n + i];
                let (k_obs, k_next) = (k_obs as usize, k_next as usize);
                let obs = &obs_col[i * per..(i + 1) * per];
                let next = &next_col[i * per..(i + 1) * per];
                let obs_end = Self::append_rows(s, &obs[(s.window - k_obs) * s.row_bytes..]) as u32;
                Self::append_rows(s, &next[(s.window - k_next) * s.row_bytes..]);
                if k_next < s.window {
                    s.hint = k_next;
                }
                ends[i * 4..i * 4 + 4].copy_from_slice(&obs_end.to_le_bytes());
                shifts[i * s.shift_bytes..(i + 1) * s.shift_bytes]
                    .copy_from_slice(&(k_next as u16).to_le_bytes()[..s.shift_bytes]);
            }
            let mut off = 0;
            for (si0, k) in slots {
                let (si0, k) = (si0 as usize, k as usize);
                s.ends.write(si0 * 4, &ends[off * 4..(off + k) * 4]);
                s.shifts.write(
                    si0 * s.shift_bytes,
                    &shifts[off * s.shift_bytes..(off + k) * s.shift_bytes],
                );
                off += k;
            }
        }
        for p in &mut self.plain {
            let src = cols[p.col].bytes;
            let mut off = 0;
            for (si0, k) in slots {
                let (si0, k) = (si0 as usize, k as usize);
                p.region.write(
                    si0 * p.slot_bytes,
                    &src[off * p.slot_bytes..(off + k) * p.slot_bytes],
                );
                off += k;
            }
        }
        for pos in self.head..self.head + n as u64 {
            let slot = (pos % cap) as usize;
            self.episode_end[slot / 64] &= !(1 << (slot % 64));
        }
        self.scratch = scratch;
        self.plan_buf = plans;
        self.fresh_episode = false;
        self.head += n as u64;
        self.len += n;
        self.last_slot = ((self.head - 1) % cap) as usize;
        self.counters.adds += n as u64;
        Ok(Some((tail, tail + evict as u64)))
    }

    /// After a call's pushes: hands back dead rows and compresses under
    /// memory pressure. Never fails the call: the data is already stored.
    pub(crate) fn housekeeping(&mut self) {
        if !self.streams.is_empty() {
            // Reading a live position cannot fail unless memory is corrupt;
            // then the rows are simply kept.
            if let Err(e) = self.release_dead_rows() {
                tracing::warn!(error = %e, "could not release dead rows");
            }
        }
        self.maybe_compress();
    }

    fn prepare(
        &mut self,
        slot: usize,
        plans: &[(usize, usize)],
        scratch: &mut Vec<u8>,
    ) -> Result<()> {
        for (s, &(k_obs, k_next)) in self.streams.iter_mut().zip(plans) {
            let rb = s.row_bytes as u64;
            for (ri, n) in ring_ranges(s.row_head, (k_obs + k_next) as u64, s.row_cap) {
                s.rows
                    .prepare_write((ri * rb) as usize, (n * rb) as usize, scratch)?;
            }
            s.ends.prepare_write(slot * 4, 4, scratch)?;
            s.shifts
                .prepare_write(slot * s.shift_bytes, s.shift_bytes, scratch)?;
        }
        for p in &mut self.plain {
            p.region
                .prepare_write(slot * p.slot_bytes, p.slot_bytes, scratch)?;
        }
        Ok(())
    }

    /// Appends whole rows at the stream's head; returns the ring index of
    /// the last row written (of the newest row if `rows` is empty).
    #[inline]
    fn append_rows(s: &mut Stream, rows: &[u8]) -> u64 {
        if rows.is_empty() {
            return if s.ring_head == 0 {
                s.row_cap - 1
            } else {
                s.ring_head - 1
            };
        }
        let rb = s.row_bytes;
        let n = (rows.len() / rb) as u64;
        let ri = s.ring_head;
        debug_assert_eq!(ri, s.row_head % s.row_cap);
        let mut end = ri + n;
        if end <= s.row_cap {
            s.rows.write(ri as usize * rb, rows);
        } else {
            let first = (s.row_cap - ri) as usize * rb;
            s.rows.write(ri as usize * rb, &rows[..first]);
            s.rows.write(0, &rows[first..]);
        }
        if end >= s.row_cap {
            end -= s.row_cap;
        }
        s.ring_head = end;
        s.row_head += n;
        s.rows_appended += n;
        // ring index of the newest row
        if end == 0 {
            s.row_cap - 1
        } else {
            end - 1
        }
    }

    /// Releases whole row chunks that no live transition can reach any more.
    ///
    /// Live rows are `[live_from, row_head)`; every other ring position is
    /// dead. Only chunks touched by rows that died since the last call are
    /// examined, and each is released only if all of its rows are dead.
    fn release_dead_rows(&mut self) -> Result<()> {
        let tail = self.head - self.len as u64;
        for si in 0..self.streams.len() {
            let live_from = if self.len == 0 {
                self.streams[si].row_head
            } else {
                self.obs_start(si, tail)?
            };
            let s = &mut self.streams[si];
            let rb = s.row_bytes as u64;
            let cb = s.rows.chunk_bytes() as u64;
            // Wait until a few chunks' worth of rows have died, then release
            // them with one madvise per contiguous run (fewer syscalls on the
            // add path); an empty buffer releases at once.
            if live_from <= s.released_below
                || (self.len > 0 && (live_from - s.released_below) * rb < 4 * cb)
            {
                continue;
            }
            let ring = s.row_cap;
            let from = s.released_below.max(s.row_head.saturating_sub(ring));
            let dead_len = ring - (s.row_head - live_from);
            let d0 = s.row_head % ring;
            let len = s.rows.len() as u64;
            for (ri, n) in ring_ranges(from, live_from - from, ring) {
                if n == 0 {
                    continue;
                }
                let mut run: Option<(u64, u64)> = None;
                for c in (ri * rb) / cb..=((ri + n) * rb - 1) / cb {
                    let row_lo = c * cb / rb;
                    let row_hi = ((c + 1) * cb).min(len).div_ceil(rb);
                    let dead = (row_lo + ring - d0) % ring + (row_hi - row_lo) <= dead_len;
                    if dead && !matches!(s.rows.state(c as usize), Chunk::Empty) {
                        run = Some(run.map_or((c, c + 1), |(a, _)| (a, c + 1)));
                        self.counters.chunks_released += 1;
                    } else if let Some((a, b)) = run.take() {
                        s.rows.release_run(a as usize, b as usize);
                    }
                }
                if let Some((a, b)) = run {
                    s.rows.release_run(a as usize, b as usize);
                }
            }
            s.released_below = live_from;
        }
        Ok(())
    }

    /// Resident bytes that count against the byte budget (heap + anonymous).
    pub(crate) fn resident_bytes(&self) -> u64 {
        self.memory_usage().resident_bytes()
    }

    fn maybe_compress(&mut self) {
        let Some(budget) = self.cfg.byte_budget else {
            return;
        };
        let start = (budget as f64 * self.cfg.compress_at) as u64;
        let resident = self.resident_bytes();
        if resident < start.max(self.next_sweep_at) {
            return;
        }
        // Compress down to 90 % of the start mark so sweeps are not triggered
        // by every add; if that is out of reach, wait for 1/64 of the budget
        // (at least 4 chunks) of growth before trying again.
        self.compress_cold((start as f64 * 0.9) as u64);
        let after = self.resident_bytes();
        self.next_sweep_at = if after > start {
            after + (budget / 64).max(4 * self.cfg.chunk_bytes as u64)
        } else {
            0
        };
    }

    /// Compresses cold chunks, oldest first, until resident bytes are at most
    /// `target` or nothing cold is left. Returns bytes saved.
    pub(crate) fn compress_cold(&mut self, target: u64) -> u64 {
        self.counters.compress_sweeps += 1;
        let mut resident = self.resident_bytes();
        let mut saved = 0u64;
        let cap = self.cap as u64;
        // Regions in order of size (rows first); the chunks near the write
        // head stay raw (they are matched against and written next).
        let mut work: Vec<(usize, usize)> = Vec::new(); // (kind, index)
        for si in 0..self.streams.len() {
            work.push((0, si));
            work.push((1, si));
            work.push((2, si));
        }
        for pi in 0..self.plain.len() {
            work.push((3, pi));
        }
        let size = |st: &Self, (k, i): (usize, usize)| -> usize {
            match k {
                0 => st.streams[i].rows.resident_bytes(),
                1 => st.streams[i].ends.resident_bytes(),
                2 => st.streams[i].shifts.resident_bytes(),
                _ => st.plain[i].region.resident_bytes(),
            }
        };
        work.sort_by_key(|&w| std::cmp::Reverse(size(self, w)));
        for (pass, (k, i)) in [1u8, 2]
            .into_iter()
            .flat_map(|t| work.iter().map(move |&w| (t, w)))
        {
            if resident <= target {
                break;
            }
            // (region, write-head byte, hot byte range)
            let (region, head_byte, hot) = match k {
                0 => {
                    let s = &mut self.streams[i];
                    let rb = s.row_bytes as u64;
                    let w = s.window as u64;
                    let hot_from = s.row_head.saturating_sub(2 * w + 1);
                    let hot_to = s.row_head + 2 * w + 1;
                    let head_byte = (s.row_head % s.row_cap) * rb;
                    let hot = (
                        (hot_from % s.row_cap) * rb,
                        (hot_to - hot_from).min(s.row_cap) * rb,
                    );
                    (&mut s.rows, head_byte, hot)
                }
                _ => {
                    let (region, unit) = match k {
                        1 => (&mut self.streams[i].ends, 4),
                        2 => {
                            let s = &mut self.streams[i];
                            (&mut s.shifts, s.shift_bytes as u64)
                        }
                        _ => {
                            let p = &mut self.plain[i];
                            (&mut p.region, p.slot_bytes as u64)
                        }
                    };
                    let hot_from = self.head.saturating_sub(1) % cap;
                    (
                        region,
                        (self.head % cap) * unit,
                        (hot_from * unit, 2 * unit),
                    )
                }
            };
            if region.tier() != pass {
                continue;
            }
            let n = region.chunk_count();
            let cb = region.chunk_bytes() as u64;
            let total = region.len() as u64;
            let is_hot = |c: u64| {
                let (h0, hl) = hot;
                // hot range in ring bytes, possibly wrapping
                let (c0, c1) = (c * cb, (c + 1) * cb);
                let a = (h0, (h0 + hl).min(total));
                let b = (0, (h0 + hl).saturating_sub(total));
                (c0 < a.1 && a.0 < c1) || (c0 < b.1 && b.0 < c1)
            };
            // Newest cold chunk first: the oldest ones are overwritten soonest,
            // and compressing them would only buy a decompression on overwrite.
            let start = region.chunk_of(head_byte as usize);
            for j in 1..=n {
                if resident <= target {
                    break;
                }
                let c = (start + n - j) % n;
                if is_hot(c as u64) {
                    continue;
                }
                let s = region.compress_chunk(c, &mut self.codec) as u64;
                if s > 0 {
                    self.counters.chunks_compressed += 1;
                }
                saved += s;
                resident = resident.saturating_sub(s);
            }
        }
        saved
    }

    /// Copies the transitions at `batch.indices` into the batch's columns
    /// (already sized by [`Batch::resize`]) and their episode-end flags.
    pub(crate) fn gather(&self, batch: &mut Batch) -> Result<()> {
        for i in 0..batch.indices.len() {
            batch.episode_end[i] = self.is_episode_end(batch.indices[i]);
        }
        let (slots, out, positions, cache) = batch.parts();
        let n = slots.len();
        // Resolve each stream's window starts once per item.
        positions.clear();
        for s in &self.streams {
            for &slot in slots {
                let end = Self::read_u32(&s.ends, slot, cache)? as u64;
                let shift = Self::read_shift(s, slot, cache)?;
                let w = s.window as u64;
                let obs_start = (end + s.row_cap + 1 - w) % s.row_cap;
                positions.push(obs_start);
                positions.push((obs_start + shift) % s.row_cap);
            }
        }
        for (ci, kind) in self.out.iter().enumerate() {
            let dst = out[ci].bytes_mut();
            match *kind {
                OutCol::Plain(pi) => {
                    let p = &self.plain[pi];
                    let sb = p.slot_bytes;
                    for (i, &slot) in slots.iter().enumerate() {
                        p.region
                            .read(slot * sb, &mut dst[i * sb..(i + 1) * sb], cache)?;
                    }
                }
                OutCol::Obs(si) | OutCol::Next(si) => {
                    let s = &self.streams[si];
                    let which = usize::from(matches!(kind, OutCol::Next(_)));
                    let per = s.window * s.row_bytes;
                    let base = si * n * 2;
                    for i in 0..n {
                        let start = positions[base + 2 * i + which];
                        let d = &mut dst[i * per..(i + 1) * per];
                        let mut off = 0;
                        for (ri, k) in ring_ranges(start, s.window as u64, s.row_cap) {
                            let len = k as usize * s.row_bytes;
                            s.rows.read(
                                ri as usize * s.row_bytes,
                                &mut d[off..off + len],
                                cache,
                            )?;
                            off += len;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Drops every transition and hands all storage back to the OS.
    pub(crate) fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
        self.counters.adds = 0;
        self.fresh_episode = true;
        self.next_sweep_at = 0;
        self.episode_end.fill(0);
        for p in &mut self.plain {
            p.region.release_all();
        }
        for s in &mut self.streams {
            s.rows.release_all();
            s.ends.release_all();
            s.shifts.release_all();
            s.row_head = 0;
            s.ring_head = 0;
            s.rows_appended = 0;
            s.released_below = 0;
            s.tail_start_lb = 0;
            s.hint = 1;
        }
    }

    pub(crate) fn regions(&self) -> impl Iterator<Item = &Region> {
        self.plain.iter().map(|p| &p.region).chain(
            self.streams
                .iter()
                .flat_map(|s| [&s.rows, &s.ends, &s.shifts]),
        )
    }

    pub(crate) fn memory_usage(&self) -> MemoryUsage {
        let mut u = MemoryUsage::default();
        for r in self.regions() {
            let resident = r.resident_bytes() as u64;
            if r.is_file_backed() {
                u.file_bytes += resident;
            } else {
                u.anon_bytes += resident;
            }
            u.heap_bytes += r.heap_bytes() as u64;
            u.reserved_bytes += (r.mapped_bytes() + r.heap_bytes()) as u64;
        }
        let heap = (self.episode_end.capacity() * 8
            + self.schema.heap_bytes()
            + self.plain.capacity() * std::mem::size_of::<PlainCol>()
            + self.streams.capacity() * std::mem::size_of::<Stream>()
            + self.out.capacity() * std::mem::size_of::<OutCol>()
            + self.scratch.capacity()
            + self.plan_buf.capacity() * 4
            + self.write_cache.heap_bytes()
            + self.codec_heap()) as u64;
        u.heap_bytes += heap;
        u.reserved_bytes += heap;
        u
    }

    fn codec_heap(&self) -> usize {
        self.codec.heap_bytes()
    }

    pub(crate) fn streams(&self) -> &[Stream] {
        &self.streams
    }

    /// (compressed chunks, their raw bytes, their compressed bytes).
    pub(crate) fn compression(&self) -> (usize, u64, u64) {
        let mut out = (0, 0, 0);
        for r in self.regions() {
            out.0 += r.compressed_chunks();
            out.1 += (r.compressed_chunks() * r.chunk_bytes()) as u64;
            out.2 += r.compressed_bytes() as u64;
        }
        out
    }

    /// See [`Replay::reclaimable_bytes`](crate::Replay::reclaimable_bytes).
    pub(crate) fn reclaimable_bytes(&self) -> u64 {
        let (_, raw, packed) = self.compression();
        let ratio = if packed > 0 {
            raw as f64 / packed as f64
        } else {
            2.0
        };
        let candidates: u64 = self
            .regions()
            .filter(|r| !r.is_file_backed())
            .map(|r| r.compressible_raw_bytes() as u64)
            .sum();
        (candidates as f64 * (1.0 - 1.0 / ratio.max(1.0))) as u64
    }

    /// Whether storage is file-backed, and where.
    pub(crate) fn backing_dir(&self) -> Option<&std::path::Path> {
        self.regions().find_map(|r| r.backing_dir())
    }
}

/// The scalar state of a [`Storage`] (everything but region contents), for
/// persistence.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StorageState {
    pub head: u64,
    pub len: u64,
    pub fresh_episode: bool,
    pub last_slot: u64,
    pub counters: [u64; 5],
    /// Per stream: (row_cap, row_head, hint, released_below, rows_appended).
    pub streams: Vec<[u64; 5]>,
}

impl Storage {
    pub(crate) fn state(&self) -> StorageState {
        let c = &self.counters;
        StorageState {
            head: self.head,
            len: self.len as u64,
            fresh_episode: self.fresh_episode,
            last_slot: self.last_slot as u64,
            counters: [
                c.adds,
                c.evicted_early,
                c.compress_sweeps,
                c.chunks_compressed,
                c.chunks_released,
            ],
            streams: self
                .streams
                .iter()
                .map(|s| {
                    [
                        s.row_cap,
                        s.row_head,
                        s.hint as u64,
                        s.released_below,
                        s.rows_appended,
                    ]
                })
                .collect(),
        }
    }

    /// Restores scalar state after the regions were loaded; checks every
    /// invariant a crafted file could break (`Err(reason)`).
    pub(crate) fn restore_state(&mut self, st: &StorageState) -> std::result::Result<(), String> {
        let cap = self.cap as u64;
        if st.len > cap || st.head < st.len || st.last_slot >= cap {
            return Err(format!(
                "len {} / head {} / last slot {} do not fit capacity {cap}",
                st.len, st.head, st.last_slot
            ));
        }
        if self.order == Order::Slots && st.len < cap && st.head != st.len {
            return Err("slot-order buffer: head and len disagree before it is full".into());
        }
        if st.streams.len() != self.streams.len() {
            return Err(format!(
                "{} streams recorded, schema has {}",
                st.streams.len(),
                self.streams.len()
            ));
        }
        for (s, &[row_cap, row_head, hint, released_below, rows_appended]) in
            self.streams.iter().zip(&st.streams)
        {
            if row_cap != s.row_cap {
                return Err(format!(
                    "stream rows {row_cap} recorded, {} configured",
                    s.row_cap
                ));
            }
            if hint > s.window as u64 || released_below > row_head || rows_appended > row_head {
                return Err("stream counters out of range".into());
            }
        }
        self.head = st.head;
        self.len = st.len as usize;
        self.fresh_episode = st.fresh_episode;
        self.last_slot = st.last_slot as usize;
        let [adds, evicted_early, compress_sweeps, chunks_compressed, chunks_released] =
            st.counters;
        self.counters = Counters {
            adds,
            evicted_early,
            compress_sweeps,
            chunks_compressed,
            chunks_released,
        };
        for (s, v) in self.streams.iter_mut().zip(&st.streams) {
            s.row_head = v[1];
            s.ring_head = v[1] % s.row_cap;
            s.hint = v[2] as usize;
            s.released_below = v[3];
            s.rows_appended = v[4];
            s.tail_start_lb = 0;
        }
        // Every live transition's windows must lie in the stored rows.
        for r in 0..self.len {
            let slot = self.live_slot(r);
            for s in &self.streams {
                let mut cache = ReadCache::new(1);
                let end =
                    Self::read_u32(&s.ends, slot, &mut cache).map_err(|e| e.to_string())? as u64;
                let shift = Self::read_shift(s, slot, &mut cache).map_err(|e| e.to_string())?;
                if end >= s.row_cap || shift > s.window as u64 || s.row_head == 0 {
                    return Err(format!(
                        "slot {slot}: window end {end} / shift {shift} out of range"
                    ));
                }
                let start = Self::abs_row(s, end) + 1;
                if start < s.window as u64
                    || start + shift > s.row_head
                    || start - s.window as u64 + s.row_cap < s.row_head
                {
                    return Err(format!("slot {slot}: window outside the stored rows"));
                }
            }
        }
        Ok(())
    }

    /// Checks that every live value of a bool column is 0 or 1.
    pub(crate) fn check_bools(&self) -> std::result::Result<(), String> {
        let mut cache = ReadCache::new(2);
        let mut buf = Vec::new();
        for p in &self.plain {
            let spec = &self.schema.columns()[p.col];
            if spec.dtype != crate::DType::Bool {
                continue;
            }
            buf.resize(p.slot_bytes, 0);
            for r in 0..self.len {
                let slot = self.live_slot(r);
                p.region
                    .read(slot * p.slot_bytes, &mut buf, &mut cache)
                    .map_err(|e| e.to_string())?;
                if buf.iter().any(|&b| b > 1) {
                    return Err(format!(
                        "bool column {:?} holds a value other than 0/1 in slot {slot}",
                        spec.name
                    ));
                }
            }
        }
        Ok(())
    }

    pub(crate) fn episode_bits(&self) -> &[u64] {
        &self.episode_end
    }

    pub(crate) fn episode_bits_mut(&mut self) -> &mut [u64] {
        &mut self.episode_end
    }

    pub(crate) fn regions_mut(&mut self) -> impl Iterator<Item = &mut Region> {
        self.plain.iter_mut().map(|p| &mut p.region).chain(
            self.streams
                .iter_mut()
                .flat_map(|s| [&mut s.rows, &mut s.ends, &mut s.shifts]),
        )
    }
}

impl Stream {
    pub(crate) fn rows_appended(&self) -> u64 {
        self.rows_appended
    }
    pub(crate) fn window(&self) -> usize {
        self.window
    }
    pub(crate) fn row_bytes(&self) -> usize {
        self.row_bytes
    }
}

#[cfg(test)]
mod tests {
    use crate::{col, BufferConfig, DType, FieldSpec, ReplayBuffer, Schema, StorageMode};

    fn schema() -> Schema {
        Schema::new(vec![
            FieldSpec::window("w", DType::F32, &[8, 4]),
            FieldSpec::plain("r", DType::F32, &[16]),
        ])
        .unwrap()
    }

    /// Adds step `t` of a smooth series (compressible rows).
    fn add(buf: &mut ReplayBuffer, t: usize) {
        let row = |i: usize| (0..4).map(move |k| 100.0 + ((i * 4 + k) as f32 * 1e-3).sin());
        let obs: Vec<f32> = (t..t + 8).flat_map(row).collect();
        let next: Vec<f32> = (t + 1..t + 9).flat_map(row).collect();
        let r = [t as f32; 16];
        buf.add(&[col(&obs), col(&next), col(&r)]).unwrap();
    }

    #[test]
    fn compression_starts_when_resident_bytes_reach_the_budget_mark() {
        let budget = 400_000u64;
        let cfg = BufferConfig {
            chunk_bytes: 4096,
            byte_budget: Some(budget),
            storage: StorageMode::Memory,
            ..BufferConfig::with_capacity(20_000)
        };
        let mut buf = ReplayBuffer::new(schema(), cfg).unwrap();
        let mark = (budget as f64 * 0.8) as u64;
        let mut t = 0;
        // Below the mark nothing is compressed.
        loop {
            let before = buf.stats();
            add(&mut buf, t);
            t += 1;
            let after = buf.stats();
            if after.compressed_chunks > 0 {
                let used = before.memory.resident_bytes();
                assert!(
                    used + 2 * 4096 + 1024 >= mark,
                    "compressed at {used} B, mark {mark} B"
                );
                break;
            }
            assert!(
                after.memory.resident_bytes() < mark + 64 * 1024,
                "no compression past the mark"
            );
            assert!(t < 20_000, "the mark was never reached");
        }
        // From then on the buffer stays around the mark while it keeps filling.
        for _ in 0..10_000 {
            add(&mut buf, t);
            t += 1;
        }
        let st = buf.stats();
        assert!(
            st.memory.resident_bytes() <= budget,
            "{} B resident, budget {budget}",
            st.memory.resident_bytes()
        );
        assert!(
            st.compression_ratio() > 1.5,
            "ratio {}",
            st.compression_ratio()
        );
        assert!(st.compress_sweeps > 0);
    }

    #[test]
    fn auto_storage_moves_to_a_file_above_the_threshold() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |threshold_bytes| BufferConfig {
            storage: StorageMode::Auto { threshold_bytes },
            storage_dir: Some(dir.path().to_owned()),
            ..BufferConfig::with_capacity(1000)
        };
        let small = ReplayBuffer::new(schema(), mk(100_000_000)).unwrap();
        assert_eq!(small.stats().file_dir, None);
        let big = ReplayBuffer::new(schema(), mk(10_000)).unwrap();
        assert_eq!(big.stats().file_dir.as_deref(), Some(dir.path()));
        // The default threshold is 100 MB.
        assert_eq!(
            BufferConfig::default().storage,
            StorageMode::Auto {
                threshold_bytes: 100_000_000
            }
        );
    }
}
