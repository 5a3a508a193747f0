//! Concurrency of [`SharedReplay`] and [`Writer`]: several writer threads
//! (through `add`, `add_batch` and staging writers) with concurrent samplers
//! lose no transition and never show a torn one, de-duplicated sliding
//! windows stay exact under interleaved writers, `Writer` staging and
//! episode-end semantics, prioritized replay under concurrent priority
//! updates, and `Reclaim` keeping every byte.
//!
//! "No transition lost" is checked exactly: after the writers finish, the
//! whole buffer is read back with `Replay::fetch_into` (every live position,
//! oldest first), and the set of (writer, seq) read back must be every pair
//! written, each once.

use gm_buffers::{
    col, Batch, BufferConfig, BufferStats, Column, DType, Error, Eviction, FieldSpec, PerConfig,
    PrioritizedReplayBuffer, Replay, ReplayBuffer, Schema, SharedReplay, StorageMode,
};
use gm_core::{MemoryReport, Reclaim, ReclaimLevel};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Every live transition, oldest first, read under one read lock.
fn read_all<B: Replay>(shared: &SharedReplay<B>) -> Batch {
    let buf = shared.read();
    let ranks: Vec<usize> = (0..buf.len()).collect();
    let mut batch = buf.new_batch();
    buf.fetch_into(&mut batch, &ranks).unwrap();
    batch
}

fn mix(mut z: u64) -> u64 {
    // splitmix64
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn checksum(payload: &[i64], writer: i64, seq: i64) -> i64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &v in payload.iter().chain([writer, seq].iter()) {
        h = mix(h ^ v as u64);
    }
    h as i64
}

/// Deadline for waiting on another thread's progress: a test that would
/// otherwise hang fails instead. Never a timing assertion.
const LIVENESS: Duration = Duration::from_secs(120);

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < LIVENESS, "no progress: {what}");
        std::thread::yield_now();
    }
}

// ---------------------------------------------------------------------------
// 1. Plain payload stress: add / add_batch / Writer, concurrent samplers.
// ---------------------------------------------------------------------------

const P: usize = 64;
const WRITERS: usize = 4;
const PER_WRITER: usize = 5000;
const BLOCK: usize = 25;
/// Writers wait for sampler progress every this many transitions.
const CHECKPOINT: usize = 100;

fn plain_schema() -> Schema {
    Schema::new(vec![
        FieldSpec::plain("payload", DType::I64, &[P]),
        FieldSpec::plain("writer", DType::I64, &[]),
        FieldSpec::plain("seq", DType::I64, &[]),
        FieldSpec::plain("sum", DType::I64, &[]),
    ])
    .unwrap()
}

fn payload(writer: i64, seq: i64, out: &mut [i64]) {
    let base = mix(((writer as u64) << 32) | seq as u64);
    for (k, v) in out.iter_mut().enumerate() {
        *v = mix(base ^ k as u64) as i64;
    }
}

fn memory(capacity: usize) -> BufferConfig {
    BufferConfig {
        storage: StorageMode::Memory,
        ..BufferConfig::with_capacity(capacity)
    }
}

/// The columns of a plain-schema batch. (Columns are fetched once per
/// batch: `Batch::item` validates the whole column on every call, which is
/// quadratic over a large batch in a debug build.)
struct PlainView<'a> {
    payload: &'a [i64],
    writer: &'a [i64],
    seq: &'a [i64],
    sum: &'a [i64],
    slots: &'a [usize],
}

impl<'a> PlainView<'a> {
    fn of(b: &'a Batch) -> Self {
        Self {
            payload: b.get::<i64>("payload").unwrap(),
            writer: b.get::<i64>("writer").unwrap(),
            seq: b.get::<i64>("seq").unwrap(),
            sum: b.get::<i64>("sum").unwrap(),
            slots: b.indices(),
        }
    }

    /// Checks item `i`: not torn (checksum over the stored fields) and
    /// exactly what its writer wrote. Returns (writer, seq).
    fn verify(&self, i: usize, scratch: &mut [i64; P]) -> (i64, i64) {
        let p = &self.payload[i * P..(i + 1) * P];
        let (w, s) = (self.writer[i], self.seq[i]);
        assert_eq!(
            checksum(p, w, s),
            self.sum[i],
            "torn transition: writer {w} seq {s} (slot {})",
            self.slots[i]
        );
        assert!((0..WRITERS as i64).contains(&w) && (0..PER_WRITER as i64).contains(&s));
        payload(w, s, scratch);
        assert_eq!(p, &scratch[..], "payload of writer {w} seq {s}");
        (w, s)
    }
}

/// One writer thread: blocks of `BLOCK` transitions, each block through
/// `add`, one `add_batch`, or the thread's staging `Writer` in turn.
fn run_plain_writer(
    shared: &SharedReplay<ReplayBuffer>,
    w: usize,
    sampled: &AtomicUsize,
) -> [usize; 3] {
    let wi = w as i64;
    let mut writer = shared.writer(8 + 5 * w);
    let mut per_path = [0usize; 3];
    let (mut pay, mut ids, mut seqs, mut sums) = (
        Vec::with_capacity(BLOCK * P),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let mut one = [0i64; P];
    for block in 0..PER_WRITER.div_ceil(BLOCK) {
        let seqs_in = block * BLOCK..((block + 1) * BLOCK).min(PER_WRITER);
        let path = (block + w) % 3;
        if path == 1 {
            pay.clear();
            ids.clear();
            seqs.clear();
            sums.clear();
        }
        for seq in seqs_in.clone() {
            let s = seq as i64;
            payload(wi, s, &mut one);
            let sum = checksum(&one, wi, s);
            match path {
                0 => {
                    shared
                        .add(&[col(&one), col(&[wi]), col(&[s]), col(&[sum])])
                        .unwrap();
                }
                1 => {
                    pay.extend_from_slice(&one);
                    ids.push(wi);
                    seqs.push(s);
                    sums.push(sum);
                }
                _ => writer
                    .add(&[col(&one), col(&[wi]), col(&[s]), col(&[sum])])
                    .unwrap(),
            }
            per_path[path] += 1;
            if seq % CHECKPOINT == CHECKPOINT - 1 {
                // Sampling must overlap the writes: at each checkpoint the
                // samplers must have verified more batches before this
                // writer goes on.
                let want = 4 * (seq + 1) / CHECKPOINT;
                wait_until("samplers verify while writers run", || {
                    sampled.load(Ordering::Acquire) >= want
                });
            }
        }
        if path == 1 {
            let n = shared
                .add_batch(&[col(&pay), col(&ids), col(&seqs), col(&sums)])
                .unwrap();
            assert_eq!(n, seqs_in.len());
        }
    }
    drop(writer); // flushes the last staged transitions
    per_path
}

/// A sampler thread: samples continuously while writers run, checking every
/// item and that the length never goes down (nothing is evicted).
fn run_plain_sampler(
    shared: &SharedReplay<ReplayBuffer>,
    seed: u64,
    done: &AtomicBool,
    sampled: &AtomicUsize,
) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut batch = shared.new_batch();
    let mut scratch = [0i64; P];
    let (mut last_len, mut items) = (0, 0);
    loop {
        let finished = done.load(Ordering::Acquire);
        let len = shared.len();
        assert!(len >= last_len, "len went down from {last_len} to {len}");
        last_len = len;
        if len > 0 {
            shared.sample_into(&mut batch, 64, &mut rng).unwrap();
            assert_eq!(batch.len(), 64);
            let view = PlainView::of(&batch);
            for i in 0..batch.len() {
                view.verify(i, &mut scratch);
            }
            items += batch.len();
            sampled.fetch_add(1, Ordering::Release);
        } else {
            std::thread::yield_now();
        }
        if finished {
            return items;
        }
    }
}

#[test]
fn stress_many_writers_and_samplers_lose_and_tear_nothing() {
    let total = WRITERS * PER_WRITER;
    let shared = SharedReplay::new(ReplayBuffer::new(plain_schema(), memory(total)).unwrap());
    let done = AtomicBool::new(false);
    let sampled = AtomicUsize::new(0);
    let (per_path, sampled_items) = std::thread::scope(|s| {
        let samplers: Vec<_> = (0..2u64)
            .map(|k| {
                let (shared, done, sampled) = (&shared, &done, &sampled);
                s.spawn(move || run_plain_sampler(shared, 100 + k, done, sampled))
            })
            .collect();
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (shared, sampled) = (&shared, &sampled);
                s.spawn(move || run_plain_writer(shared, w, sampled))
            })
            .collect();
        let mut per_path = [0usize; 3];
        for h in writers {
            for (a, b) in per_path.iter_mut().zip(h.join().unwrap()) {
                *a += b;
            }
        }
        done.store(true, Ordering::Release);
        let items: Vec<usize> = samplers.into_iter().map(|h| h.join().unwrap()).collect();
        (per_path, items)
    });
    assert!(
        per_path.iter().all(|&n| n > total / 4),
        "every path carried a share of the writes: {per_path:?}"
    );
    assert!(
        sampled_items.iter().all(|&n| n > 0),
        "both samplers ran: {sampled_items:?}"
    );

    // Nothing lost: count, then every (writer, seq) read back exactly once.
    assert_eq!(shared.len(), total);
    assert_eq!(shared.stats().adds, total as u64);
    let all = read_all(&shared);
    assert_eq!(all.len(), total);
    let mut seen = vec![false; total];
    let mut scratch = [0i64; P];
    let view = PlainView::of(&all);
    for i in 0..all.len() {
        let (w, s) = view.verify(i, &mut scratch);
        let k = w as usize * PER_WRITER + s as usize;
        assert!(!seen[k], "writer {w} seq {s} stored twice");
        seen[k] = true;
    }
    assert!(seen.iter().all(|&x| x), "every transition is stored");
    let slots: HashSet<usize> = all.indices().iter().copied().collect();
    assert_eq!(slots.len(), total, "read back from distinct slots");

    // Statistical cross-check through plain random sampling: 20x the
    // contents sees (almost) every transition (expected miss e^-20).
    let mut rng = StdRng::seed_from_u64(7);
    let mut batch = shared.new_batch();
    let mut hit = vec![false; total];
    for _ in 0..20 {
        shared.sample_into(&mut batch, total, &mut rng).unwrap();
        let view = PlainView::of(&batch);
        for (&w, &s) in view.writer.iter().zip(view.seq) {
            hit[w as usize * PER_WRITER + s as usize] = true;
        }
    }
    let covered = hit.iter().filter(|&&h| h).count();
    assert!(
        covered * 1000 >= total * 999,
        "random sampling saw {covered} of {total}"
    );
}

// ---------------------------------------------------------------------------
// 2. De-duplicated sliding windows under interleaved writers.
// ---------------------------------------------------------------------------

const WIN: usize = 8;
const FEAT: usize = 4;
const WIN_PER_WRITER: usize = 4000;
const EPISODE: usize = 100;

fn window_schema() -> Schema {
    Schema::new(vec![
        FieldSpec::window("win", DType::F32, &[WIN, FEAT]),
        FieldSpec::plain("writer", DType::I64, &[]),
        FieldSpec::plain("seq", DType::I64, &[]),
    ])
    .unwrap()
}

/// First row of the observation of step `seq`: each episode of `EPISODE`
/// steps slides by one row, and a new episode jumps past the last one.
fn first_row(seq: usize) -> usize {
    seq + (WIN + 1) * (seq / EPISODE)
}

/// `WIN` rows of writer `w`'s series from row `r0`; every writer's values
/// are distinct from every other writer's (and exact in f32).
fn window_at(w: usize, r0: usize, out: &mut [f32]) {
    for (j, row) in out.chunks_exact_mut(FEAT).enumerate() {
        for (k, v) in row.iter_mut().enumerate() {
            *v = (w * 1_000_000 + (r0 + j) * FEAT + k) as f32;
        }
    }
}

/// Checks every item of a window-schema batch against the windows
/// recomputed from (writer, seq); returns the (writer, seq) pairs in order.
fn verify_windows(b: &Batch) -> Vec<(usize, usize)> {
    const N: usize = WIN * FEAT;
    let (win, next_win) = (
        b.get::<f32>("win").unwrap(),
        b.get::<f32>("next_win").unwrap(),
    );
    let (writer, seq) = (
        b.get::<i64>("writer").unwrap(),
        b.get::<i64>("seq").unwrap(),
    );
    let (mut obs, mut next) = ([0f32; N], [0f32; N]);
    (0..b.len())
        .map(|i| {
            let (w, s) = (writer[i] as usize, seq[i] as usize);
            assert!(w < WRITERS && s < WIN_PER_WRITER, "writer {w} seq {s}");
            window_at(w, first_row(s), &mut obs);
            window_at(w, first_row(s) + 1, &mut next);
            assert_eq!(&win[i * N..(i + 1) * N], obs, "obs of writer {w} seq {s}");
            assert_eq!(
                &next_win[i * N..(i + 1) * N],
                next,
                "next of writer {w} seq {s}"
            );
            assert_eq!(
                b.episode_ends()[i],
                s % EPISODE == EPISODE - 1,
                "episode end of writer {w} seq {s}"
            );
            (w, s)
        })
        .collect()
}

#[test]
fn dedup_windows_stay_exact_with_interleaved_writers() {
    let total = WRITERS * WIN_PER_WRITER;
    let shared = SharedReplay::new(ReplayBuffer::new(window_schema(), memory(total)).unwrap());
    let done = AtomicBool::new(false);
    let sampled = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let samplers: Vec<_> = (0..2u64)
            .map(|k| {
                let (shared, done, sampled) = (&shared, &done, &sampled);
                s.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(200 + k);
                    let mut batch = shared.new_batch();
                    loop {
                        let finished = done.load(Ordering::Acquire);
                        if shared.is_empty() {
                            std::thread::yield_now();
                            continue;
                        }
                        shared.sample_into(&mut batch, 64, &mut rng).unwrap();
                        verify_windows(&batch);
                        sampled.fetch_add(1, Ordering::Release);
                        if finished {
                            return;
                        }
                    }
                })
            })
            .collect();
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (shared, sampled) = (&shared, &sampled);
                s.spawn(move || {
                    let mut writer = shared.writer(32);
                    let (mut obs, mut next) = ([0f32; WIN * FEAT], [0f32; WIN * FEAT]);
                    for seq in 0..WIN_PER_WRITER {
                        window_at(w, first_row(seq), &mut obs);
                        window_at(w, first_row(seq) + 1, &mut next);
                        writer
                            .add(&[col(&obs), col(&next), col(&[w as i64]), col(&[seq as i64])])
                            .unwrap();
                        if seq % EPISODE == EPISODE - 1 {
                            assert!(writer.mark_episode_end(), "a staged step is marked");
                        }
                        if seq % CHECKPOINT == CHECKPOINT - 1 {
                            let want = 4 * (seq + 1) / CHECKPOINT;
                            wait_until("samplers verify while writers run", || {
                                sampled.load(Ordering::Acquire) >= want
                            });
                        }
                    }
                })
            })
            .collect();
        for h in writers {
            h.join().unwrap();
        }
        done.store(true, Ordering::Release);
        for h in samplers {
            h.join().unwrap();
        }
    });

    assert_eq!(shared.len(), total);
    let all = read_all(&shared);
    let pairs = verify_windows(&all);
    let mut seen = vec![false; total];
    for &(w, s) in &pairs {
        assert!(!std::mem::replace(&mut seen[w * WIN_PER_WRITER + s], true));
    }
    assert!(seen.iter().all(|&x| x), "every transition is stored");
    // Each writer's steps went in in order, chunk by chunk.
    let mut last = [None::<usize>; WRITERS];
    for &(w, s) in &pairs {
        assert_eq!(last[w].map_or(0, |l| l + 1), s, "writer {w} in order");
        last[w] = Some(s);
    }
    // De-duplication really happened: chunks of 32 slid-by-one windows keep
    // ~40 rows per 32 transitions instead of 2 * 8 * 32.
    let st: BufferStats = shared.stats();
    let ratio = st.streams[0].dedup_ratio();
    assert!(
        ratio > 8.0,
        "dedup ratio {ratio:.2} (stats {:?})",
        st.streams[0]
    );
}

// ---------------------------------------------------------------------------
// 3. Writer semantics.
// ---------------------------------------------------------------------------

fn id_schema() -> Schema {
    Schema::new(vec![
        FieldSpec::plain("writer", DType::I64, &[]),
        FieldSpec::plain("seq", DType::I64, &[]),
    ])
    .unwrap()
}

fn t<'a>(w: &'a [i64; 1], s: &'a [i64; 1]) -> [Column<'a>; 2] {
    [col(w), col(s)]
}

/// (writer, seq, episode_end) of every live transition, oldest first.
fn contents<B: Replay>(shared: &SharedReplay<B>) -> Vec<(i64, i64, bool)> {
    if shared.is_empty() {
        return Vec::new();
    }
    let b = read_all(shared);
    let (w, s) = (
        b.get::<i64>("writer").unwrap(),
        b.get::<i64>("seq").unwrap(),
    );
    (0..b.len())
        .map(|i| (w[i], s[i], b.episode_ends()[i]))
        .collect()
}

#[test]
fn writer_stages_until_the_chunk_is_handed_over_and_drop_flushes() {
    let shared = SharedReplay::new(ReplayBuffer::new(id_schema(), memory(100)).unwrap());
    let mut w = shared.writer(4);
    for s in 0..4 {
        w.add(&t(&[0], &[s])).unwrap();
        assert_eq!(shared.len(), 0, "staged transitions are invisible");
    }
    assert_eq!(w.staged(), 4);
    // The full chunk goes in, in one piece, when the next one arrives.
    w.add(&t(&[0], &[4])).unwrap();
    assert_eq!((shared.len(), w.staged()), (4, 1));
    w.flush().unwrap();
    assert_eq!((shared.len(), w.staged()), (5, 0));
    w.flush().unwrap();
    assert_eq!(shared.len(), 5, "an empty flush adds nothing");
    w.add(&t(&[0], &[5])).unwrap();
    w.add(&t(&[0], &[6])).unwrap();
    assert_eq!(shared.len(), 5);
    drop(w);
    let c = contents(&shared);
    assert_eq!(
        c.iter().map(|x| x.1).collect::<Vec<_>>(),
        (0..7).collect::<Vec<_>>(),
        "drop flushed, in order"
    );
    assert!(c.iter().all(|x| !x.2));
}

#[test]
fn writer_marks_its_own_transition_even_when_others_add_in_between() {
    let shared = SharedReplay::new(ReplayBuffer::new(id_schema(), memory(100)).unwrap());
    let mut a = shared.writer(4);
    let mut b = shared.writer(1);
    // `a` fills its chunk exactly; `b` and a direct add go in meanwhile.
    for s in 0..4 {
        a.add(&t(&[0], &[s])).unwrap();
    }
    b.add(&t(&[1], &[0])).unwrap();
    b.add(&t(&[1], &[1])).unwrap(); // hands (1, 0) over
    shared.add(&t(&[2], &[0])).unwrap();
    assert!(a.mark_episode_end());
    // Marking a staged transition in the middle of a chunk.
    a.add(&t(&[0], &[4])).unwrap(); // hands 0..4 over
    a.add(&t(&[0], &[5])).unwrap();
    assert!(a.mark_episode_end());
    a.add(&t(&[0], &[6])).unwrap();
    assert!(b.mark_episode_end()); // (1, 1), still staged
    drop(b);
    drop(a);
    let c = contents(&shared);
    let ends: Vec<(i64, i64)> = c.iter().filter(|x| x.2).map(|x| (x.0, x.1)).collect();
    assert_eq!(ends, [(0, 3), (1, 1), (0, 5)], "contents {c:?}");
    assert_eq!(c.len(), 10);
}

#[test]
fn writer_mark_after_an_explicit_flush_never_marks_another_writers_transition() {
    let shared = SharedReplay::new(ReplayBuffer::new(id_schema(), memory(100)).unwrap());
    let mut a = shared.writer(8);
    assert!(!a.mark_episode_end(), "nothing added yet: nothing to mark");
    shared.add(&t(&[1], &[0])).unwrap();
    assert!(!a.mark_episode_end(), "the buffer's newest is not a's");
    a.add(&t(&[0], &[0])).unwrap();
    a.flush().unwrap();
    assert!(
        a.mark_episode_end(),
        "a's flushed transition is still newest"
    );
    a.add(&t(&[0], &[1])).unwrap();
    a.flush().unwrap();
    shared.add(&t(&[1], &[1])).unwrap();
    assert!(!a.mark_episode_end(), "another add came in after a's flush");
    drop(a);
    let ends: Vec<(i64, i64)> = contents(&shared)
        .into_iter()
        .filter(|x| x.2)
        .map(|x| (x.0, x.1))
        .collect();
    assert_eq!(ends, [(0, 0)]);
}

#[test]
fn writer_rejects_bad_input_at_once_and_stages_nothing() {
    let shared = SharedReplay::new(ReplayBuffer::new(id_schema(), memory(100)).unwrap());
    let mut w = shared.writer(2);
    w.add(&t(&[0], &[0])).unwrap();
    w.add(&t(&[0], &[1])).unwrap(); // the chunk is full
    let e = w.add(&[col(&[0i64]), col(&[2i64, 3])]).unwrap_err();
    assert!(
        matches!(e, Error::Shape { ref field, got: 2, .. } if field == "seq"),
        "{e}"
    );
    let e = w.add(&[col(&[0i64]), col(&[2i32])]).unwrap_err();
    assert!(
        matches!(e, Error::DType { ref field, .. } if field == "seq"),
        "{e}"
    );
    let e = w.add(&[col(&[0i64])]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ColumnCount {
                expected: 2,
                got: 1,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(w.staged(), 2, "nothing staged by a rejected add");
    assert_eq!(shared.len(), 0, "a rejected add flushes nothing");
    w.add(&t(&[0], &[2])).unwrap();
    drop(w);
    let seqs: Vec<i64> = contents(&shared).iter().map(|x| x.1).collect();
    assert_eq!(seqs, [0, 1, 2]);
}

/// A buffer whose storage can be told to fill up: with `fail = Some(room)`,
/// `add_batch` stores up to `room` more transitions, then fails (a
/// `BatchInterrupted` after a partial store, as a full disk would).
struct Flaky {
    inner: ReplayBuffer,
    fail: Arc<Mutex<Option<usize>>>,
}

fn injected() -> Error {
    Error::Unsupported("injected storage failure".into())
}

impl Replay for Flaky {
    fn schema(&self) -> &Schema {
        self.inner.schema()
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }
    fn add(&mut self, cols: &[Column<'_>]) -> gm_buffers::Result<usize> {
        if self.fail.lock().unwrap().is_some() {
            return Err(injected());
        }
        self.inner.add(cols)
    }
    fn add_batch(&mut self, cols: &[Column<'_>]) -> gm_buffers::Result<usize> {
        let mut fail = self.fail.lock().unwrap();
        let Some(room) = *fail else {
            return self.inner.add_batch(cols);
        };
        let ids = decode_ids(cols);
        if room >= ids.len() {
            *fail = Some(room - ids.len());
            return self.inner.add_batch(cols);
        }
        if room == 0 {
            return Err(injected());
        }
        for (w, s) in &ids[..room] {
            self.inner.add(&t(&[*w], &[*s]))?;
        }
        *fail = Some(0);
        Err(Error::BatchInterrupted {
            added: room,
            total: ids.len(),
            source: Box::new(injected()),
        })
    }
    fn mark_episode_end(&mut self) {
        self.inner.mark_episode_end()
    }
    fn sample_into(
        &self,
        batch: &mut Batch,
        batch_size: usize,
        rng: &mut dyn RngCore,
    ) -> gm_buffers::Result<()> {
        self.inner.sample_into(batch, batch_size, rng)
    }
    fn fetch_into(&self, batch: &mut Batch, ranks: &[usize]) -> gm_buffers::Result<()> {
        self.inner.fetch_into(batch, ranks)
    }
    fn stats(&self) -> BufferStats {
        self.inner.stats()
    }
    fn compress_cold(&mut self, target_bytes: u64) -> u64 {
        self.inner.compress_cold(target_bytes)
    }
    fn reclaimable_bytes(&self) -> u64 {
        self.inner.reclaimable_bytes()
    }
    fn bytes_used(&self) -> u64 {
        self.inner.bytes_used()
    }
    fn bytes_reserved(&self) -> u64 {
        self.inner.bytes_reserved()
    }
}

/// The (writer, seq) pairs of an id-schema `add_batch` call, read back
/// through a scratch buffer (a public `Column` does not expose its bytes).
fn decode_ids(cols: &[Column<'_>]) -> Vec<(i64, i64)> {
    let mut scratch = ReplayBuffer::new(id_schema(), memory(cols[0].len())).unwrap();
    scratch.add_batch(cols).unwrap();
    contents(&SharedReplay::new(scratch))
        .into_iter()
        .map(|(w, s, _)| (w, s))
        .collect()
}

#[test]
fn a_failed_flush_keeps_what_was_not_stored_and_a_retry_loses_nothing() {
    let fail = Arc::new(Mutex::new(None));
    let shared = SharedReplay::new(Flaky {
        inner: ReplayBuffer::new(id_schema(), memory(100)).unwrap(),
        fail: fail.clone(),
    });
    let mut w = shared.writer(8);
    for s in 0..6 {
        w.add(&t(&[0], &[s])).unwrap();
        if s == 1 {
            assert!(w.mark_episode_end());
        }
    }
    // Room for 3: the first piece (0..=1, up to the episode end) goes in
    // and is marked, the second (2..=5) stores one and fails.
    *fail.lock().unwrap() = Some(3);
    let e = w.flush().unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    assert_eq!((shared.len(), w.staged()), (3, 3));
    // No room: nothing moves; a full chunk makes the next add fail, and
    // that add stages nothing.
    assert!(w.flush().is_err());
    assert_eq!((shared.len(), w.staged()), (3, 3));
    for s in 6..11 {
        w.add(&t(&[0], &[s])).unwrap();
    }
    assert_eq!(w.staged(), 8);
    assert!(w.add(&t(&[0], &[11])).is_err());
    assert_eq!(
        (shared.len(), w.staged()),
        (3, 8),
        "the failed add staged nothing"
    );
    // Storage recovers: retrying stores the rest, once each, in order.
    *fail.lock().unwrap() = None;
    w.add(&t(&[0], &[11])).unwrap();
    w.flush().unwrap();
    assert_eq!(w.staged(), 0);
    let c = contents(&shared);
    assert_eq!(
        c.iter().map(|x| x.1).collect::<Vec<_>>(),
        (0..12).collect::<Vec<_>>()
    );
    let ends: Vec<i64> = c.iter().filter(|x| x.2).map(|x| x.1).collect();
    assert_eq!(ends, [1]);
}

// ---------------------------------------------------------------------------
// 4. Prioritized replay: priority updates concurrent with writes and samples.
// ---------------------------------------------------------------------------

fn per_stress(eviction: Eviction) {
    let cap = 3000;
    let per_writer = 4000;
    let per = PerConfig {
        eviction,
        beta_steps: 1000,
        ..PerConfig::default()
    };
    let shared =
        SharedReplay::new(PrioritizedReplayBuffer::new(plain_schema(), memory(cap), per).unwrap());
    let done = AtomicBool::new(false);
    let progress = AtomicUsize::new(0);
    let (updates, samples) = std::thread::scope(|s| {
        let updater = {
            let (shared, done, progress) = (&shared, &done, &progress);
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(1);
                let mut batch = shared.new_batch();
                let mut prio = Vec::new();
                let mut calls = 0;
                while !done.load(Ordering::Acquire) || calls == 0 {
                    if shared.is_empty() {
                        std::thread::yield_now();
                        continue;
                    }
                    shared.sample_into(&mut batch, 32, &mut rng).unwrap();
                    prio.clear();
                    // |td error| including zeros and large values.
                    prio.extend((0..batch.len()).map(|i| match i % 4 {
                        0 => 0.0f32,
                        1 => rng.random::<f32>() * 1e3,
                        _ => rng.random::<f32>(),
                    }));
                    // Sampled slots stay live (eviction reuses a slot at once),
                    // so every update must be accepted.
                    shared.update_priorities(batch.indices(), &prio).unwrap();
                    calls += 1;
                    progress.fetch_add(1, Ordering::Release);
                }
                calls
            })
        };
        let sampler = {
            let (shared, done, progress) = (&shared, &done, &progress);
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(2);
                let mut batch = shared.new_batch();
                let mut scratch = [0i64; P];
                let mut calls = 0;
                while !done.load(Ordering::Acquire) || calls == 0 {
                    if shared.is_empty() {
                        std::thread::yield_now();
                        continue;
                    }
                    shared.sample_into(&mut batch, 64, &mut rng).unwrap();
                    let view = PlainView::of(&batch);
                    for i in 0..batch.len() {
                        let wt = batch.weights()[i];
                        assert!(wt.is_finite() && wt > 0.0 && wt <= 1.0, "weight {wt}");
                        view.verify(i, &mut scratch);
                    }
                    calls += 1;
                    progress.fetch_add(1, Ordering::Release);
                }
                calls
            })
        };
        let writers: Vec<_> = (0..2i64)
            .map(|w| {
                let (shared, progress) = (&shared, &progress);
                s.spawn(move || {
                    let mut one = [0i64; P];
                    for sq in 0..per_writer as i64 {
                        payload(w, sq, &mut one);
                        let sum = checksum(&one, w, sq);
                        shared
                            .add(&[col(&one), col(&[w]), col(&[sq]), col(&[sum])])
                            .unwrap();
                        if sq == per_writer as i64 / 2 {
                            wait_until("updates run while writers run", || {
                                progress.load(Ordering::Acquire) >= 8
                            });
                        }
                    }
                })
            })
            .collect();
        for h in writers {
            h.join().unwrap();
        }
        done.store(true, Ordering::Release);
        (updater.join().unwrap(), sampler.join().unwrap())
    });
    assert!(updates > 0 && samples > 0);
    let buf = shared.read();
    assert_eq!(buf.len(), cap);
    assert_eq!(buf.stats().adds, 2 * per_writer as u64);
    for slot in 0..cap {
        let p = buf.priority(slot);
        assert!(p.is_finite() && p > 0.0, "slot {slot} priority {p}");
    }
    let maxp = buf.max_priority();
    assert!(maxp.is_finite() && maxp > 0.0);
}

#[test]
fn per_priority_updates_race_with_writes_and_samples_fifo() {
    per_stress(Eviction::Fifo);
}

#[test]
fn per_priority_updates_race_with_writes_and_samples_lowest_priority() {
    per_stress(Eviction::LowestPriority);
}

// ---------------------------------------------------------------------------
// 5. Reclaim.
// ---------------------------------------------------------------------------

#[test]
fn reclaim_emergency_compresses_and_sampling_returns_the_same_bytes() {
    const D: usize = 256;
    let schema = Schema::new(vec![
        FieldSpec::plain("x", DType::F32, &[D]),
        FieldSpec::plain("id", DType::I64, &[]),
    ])
    .unwrap();
    let cfg = BufferConfig {
        chunk_bytes: 4096,
        ..memory(2000)
    };
    let shared = SharedReplay::new(ReplayBuffer::new(schema, cfg).unwrap());
    let smooth = |id: i64| -> Vec<f32> {
        (0..D)
            .map(|k| ((id as f32) * 0.01 + k as f32 * 0.001).sin())
            .collect()
    };
    for id in 0..2000i64 {
        shared.add(&[col(&smooth(id)), col(&[id])]).unwrap();
    }
    let sample = |seed: u64| {
        let mut b = shared.new_batch();
        shared
            .sample_into(&mut b, 512, &mut StdRng::seed_from_u64(seed))
            .unwrap();
        b
    };
    let before = sample(3);

    assert_eq!(shared.tier(), gm_core::ReclaimTier::Compressible);
    let estimate = shared.reclaimable_bytes();
    assert!(estimate > 0, "raw chunks could be compressed");
    let before_bytes = shared.memory_usage().resident_bytes();
    assert_eq!(
        shared.reclaim(ReclaimLevel::Cheap),
        0,
        "Cheap has nothing to give"
    );
    assert_eq!(shared.memory_usage().resident_bytes(), before_bytes);
    assert_eq!(shared.stats().compressed_chunks, 0);

    // Emergency while another thread samples and checks contents.
    let stop = AtomicBool::new(false);
    let r = std::thread::scope(|s| {
        let checker = s.spawn(|| {
            let mut rng = StdRng::seed_from_u64(4);
            let mut b = shared.new_batch();
            let mut n = 0;
            while !stop.load(Ordering::Acquire) || n == 0 {
                shared.sample_into(&mut b, 64, &mut rng).unwrap();
                let (x, ids) = (b.get::<f32>("x").unwrap(), b.get::<i64>("id").unwrap());
                for (i, &id) in ids.iter().enumerate() {
                    assert_eq!(&x[i * D..(i + 1) * D], &smooth(id)[..]);
                }
                n += 1;
            }
        });
        let r = shared.reclaim(ReclaimLevel::Emergency);
        stop.store(true, Ordering::Release);
        checker.join().unwrap();
        r
    });
    let after_bytes = shared.memory_usage().resident_bytes();
    assert_eq!(
        r,
        before_bytes - after_bytes,
        "the claim is the accounted drop"
    );
    assert!(
        after_bytes * 2 < before_bytes,
        "smooth data compresses: {before_bytes} -> {after_bytes}"
    );
    assert!(shared.stats().compressed_chunks > 0);

    let after = sample(3);
    assert_eq!(before.indices(), after.indices());
    let bits = |b: &Batch| -> Vec<u32> {
        b.get::<f32>("x")
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    assert_eq!(
        bits(&before),
        bits(&after),
        "the same bytes after compression"
    );
    assert_eq!(
        before.get::<i64>("id").unwrap(),
        after.get::<i64>("id").unwrap()
    );
    let (x, ids) = (
        after.get::<f32>("x").unwrap(),
        after.get::<i64>("id").unwrap(),
    );
    for (i, &id) in ids.iter().enumerate() {
        assert_eq!(&x[i * D..(i + 1) * D], &smooth(id)[..]);
    }
}
