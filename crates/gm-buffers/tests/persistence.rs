//! Persistence: `save`/`load` round trips are exact (uniform and
//! prioritized buffers, wrapped rings, compressed chunks, file-backed
//! storage), and truncated, corrupted, foreign or crafted files are typed
//! errors (never a panic, never `Ok`) that leave every file untouched.
//!
//! The file format is described in `src/persist.rs`; the helpers below parse
//! its section framing (`u8 tag, u64 length, payload, u32 CRC-32`) with an
//! independent CRC-32 so tests can patch a file and keep its checksums valid.

use gm_buffers::{
    col, Batch, BufferConfig, BufferStats, Column, DType, Error, Eviction, FieldSpec, PerConfig,
    PrioritizedReplayBuffer, Replay, ReplayBuffer, Schema, StorageMode,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeSet, VecDeque};
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

// ------------------------------------------------------------ transitions

const WIN: usize = 6;
const FEAT: usize = 3;
const FRAME: usize = 4;

/// One transition of the test schemas.
#[derive(Debug, Clone)]
struct Step {
    win: Vec<f32>,
    next_win: Vec<f32>,
    frame: Vec<f32>,
    next_frame: Vec<f32>,
    action: [i64; 1],
    reward: [f32; 1],
    done: [bool; 1],
    /// Mark the episode end after adding this step.
    end: bool,
}

/// A deterministic stream of episodes (3..=17 steps): a `[WIN, FEAT]`
/// window that slides by 0, 1 or 2 rows per step (fixed per episode) and a `[FRAME]` frame whose
/// `next` is the following step's frame, both random walks (compressible).
/// One episode in four is flat (all rows equal), where several overlaps fit
/// and the stream's shift hint decides how many rows are stored.
struct Episodes {
    rng: ChaCha8Rng,
    rows: VecDeque<[f32; FEAT]>,
    frame: Vec<f32>,
    left: usize,
    level: f32,
    flat: bool,
    stride: usize,
    t: i64,
}

impl Episodes {
    fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            rows: VecDeque::new(),
            frame: Vec::new(),
            left: 0,
            level: 1.0,
            flat: false,
            stride: 1,
            t: 0,
        }
    }

    fn row(&mut self) -> [f32; FEAT] {
        if !self.flat {
            self.level += self.rng.random_range(-0.01f32..0.01);
        }
        let l = self.level;
        [l, l * 0.5, l + 0.25]
    }

    fn next_frame(&mut self) -> Vec<f32> {
        let l = self.row()[0];
        (0..FRAME).map(|k| l * (k as f32 + 1.0)).collect()
    }

    fn window(&self) -> Vec<f32> {
        self.rows.iter().flatten().copied().collect()
    }

    fn step(&mut self) -> Step {
        if self.left == 0 {
            self.left = self.rng.random_range(3..=17);
            self.flat = false;
            let rows: VecDeque<_> = (0..WIN).map(|_| self.row()).collect();
            self.rows = rows;
            self.frame = self.next_frame();
            self.flat = self.rng.random_bool(0.25);
            self.stride = self.rng.random_range(0..=2);
        }
        let win = self.window();
        for _ in 0..self.stride {
            let r = self.row();
            self.rows.pop_front();
            self.rows.push_back(r);
        }
        let next_frame = self.next_frame();
        let frame = std::mem::replace(&mut self.frame, next_frame.clone());
        self.left -= 1;
        self.t += 1;
        Step {
            win,
            next_win: self.window(),
            frame,
            next_frame,
            action: [self.t % 5],
            reward: [self.rng.random_range(-1.0f32..1.0)],
            done: [self.left == 0],
            end: self.left == 0,
        }
    }

    fn take(&mut self, n: usize) -> Vec<Step> {
        (0..n).map(|_| self.step()).collect()
    }
}

/// The two schemas under test.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    /// A `[6, 3]` f32 window, a `[4]` f32 frame obs, plain i64/f32/bool.
    Streams,
    /// The same data with obs and next_obs as plain fields (needed for
    /// lowest-priority eviction).
    Plain,
}

impl Layout {
    fn schema(self) -> Schema {
        let tail = [
            FieldSpec::plain("action", DType::I64, &[]),
            FieldSpec::plain("reward", DType::F32, &[]),
            FieldSpec::plain("done", DType::Bool, &[]),
        ];
        let head = match self {
            Layout::Streams => vec![
                FieldSpec::window("win", DType::F32, &[WIN, FEAT]),
                FieldSpec::obs("frame", DType::F32, &[FRAME]),
            ],
            Layout::Plain => vec![
                FieldSpec::plain("obs", DType::F32, &[FRAME]),
                FieldSpec::plain("next_obs", DType::F32, &[FRAME]),
            ],
        };
        Schema::new(head.into_iter().chain(tail).collect()).unwrap()
    }

    fn columns(self, s: &Step) -> Vec<Column<'_>> {
        let mut cols = match self {
            Layout::Streams => vec![
                col(&s.win),
                col(&s.next_win),
                col(&s.frame),
                col(&s.next_frame),
            ],
            Layout::Plain => vec![col(&s.frame), col(&s.next_frame)],
        };
        cols.extend([col(&s.action), col(&s.reward), col(&s.done)]);
        cols
    }
}

/// Adds `steps` one by one (marking episode ends); returns the slots used.
fn feed<B: Replay>(b: &mut B, layout: Layout, steps: &[Step]) -> Vec<usize> {
    steps
        .iter()
        .map(|s| {
            let slot = b.add(&layout.columns(s)).unwrap();
            if s.end {
                b.mark_episode_end();
            }
            slot
        })
        .collect()
}

/// Samples and updates priorities `rounds` times (some TD errors are 0).
fn train(b: &mut PrioritizedReplayBuffer, rng: &mut ChaCha8Rng, rounds: usize) {
    let mut batch = b.new_batch();
    for _ in 0..rounds {
        b.sample_into(&mut batch, 16, rng).unwrap();
        let td: Vec<f64> = (0..16)
            .map(|i| {
                if i % 5 == 0 {
                    0.0
                } else {
                    rng.random_range(0.0..3.0)
                }
            })
            .collect();
        let idx = batch.indices().to_vec();
        b.update_priorities(&idx, &td).unwrap();
    }
}

fn config(capacity: usize, chunk_bytes: usize, storage: StorageMode) -> BufferConfig {
    BufferConfig {
        capacity,
        chunk_bytes,
        storage,
        ..BufferConfig::default()
    }
}

fn per_config(eviction: Eviction) -> PerConfig {
    PerConfig {
        beta_steps: 100,
        eviction,
        ..PerConfig::default()
    }
}

// ------------------------------------------------------------ comparisons

/// Save/load for both buffer types, so the comparisons are written once.
trait Persisted: Replay + Sized {
    fn save_to(&self, path: &Path) -> Result<(), Error>;
    fn load_from(path: &Path, storage: Option<StorageMode>) -> Result<Self, Error>;
    fn episode_end(&self, slot: usize) -> bool;
}

impl Persisted for ReplayBuffer {
    fn save_to(&self, path: &Path) -> Result<(), Error> {
        self.save(path)
    }
    fn load_from(path: &Path, storage: Option<StorageMode>) -> Result<Self, Error> {
        ReplayBuffer::load_with(path, storage)
    }
    fn episode_end(&self, slot: usize) -> bool {
        self.is_episode_end(slot)
    }
}

impl Persisted for PrioritizedReplayBuffer {
    fn save_to(&self, path: &Path) -> Result<(), Error> {
        self.save(path)
    }
    fn load_from(path: &Path, storage: Option<StorageMode>) -> Result<Self, Error> {
        PrioritizedReplayBuffer::load_with(path, storage)
    }
    fn episode_end(&self, slot: usize) -> bool {
        self.is_episode_end(slot)
    }
}

/// Loads, turning a panic into a test failure that names the file.
fn load_no_panic<B: Persisted>(path: &Path) -> Result<B, Error> {
    catch_unwind(AssertUnwindSafe(|| B::load_from(path, None)))
        .unwrap_or_else(|_| panic!("loading {path:?} panicked instead of returning Err"))
}

/// Stats without the parts that legitimately differ after a load (heap
/// scratch capacities, the backing directory).
fn counters(mut s: BufferStats) -> BufferStats {
    s.memory = Default::default();
    s.file_dir = None;
    s
}

fn resident(s: &BufferStats) -> u64 {
    s.memory.anon_bytes + s.memory.file_bytes
}

/// len, capacity, every stats counter, resident chunk bytes and every
/// episode-end flag are equal.
fn assert_same_state<B: Persisted>(a: &B, b: &B, ctx: &str) {
    assert_eq!(a.len(), b.len(), "{ctx}: len");
    assert_eq!(a.capacity(), b.capacity(), "{ctx}: capacity");
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(resident(&sa), resident(&sb), "{ctx}: resident chunk bytes");
    assert_eq!(counters(sa), counters(sb), "{ctx}: stats");
    let differ: Vec<usize> = (0..a.capacity())
        .filter(|&s| a.episode_end(s) != b.episode_end(s))
        .collect();
    assert!(
        differ.is_empty(),
        "{ctx}: episode-end flags differ in slots {differ:?}"
    );
}

/// Every column of a batch as bytes, plus indices, weights and episode ends.
fn batch_image(b: &Batch, schema: &Schema) -> Vec<(String, Vec<u8>)> {
    fn le<T: Copy, const N: usize>(v: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
        v.iter().flat_map(|&x| f(x)).collect()
    }
    let mut out: Vec<(String, Vec<u8>)> = schema
        .columns()
        .iter()
        .map(|c| {
            let n = c.name.as_str();
            let bytes = match c.dtype {
                DType::F32 => le(b.get::<f32>(n).unwrap(), f32::to_le_bytes),
                DType::F64 => le(b.get::<f64>(n).unwrap(), f64::to_le_bytes),
                DType::I32 => le(b.get::<i32>(n).unwrap(), i32::to_le_bytes),
                DType::I64 => le(b.get::<i64>(n).unwrap(), i64::to_le_bytes),
                DType::U8 => b.get::<u8>(n).unwrap().to_vec(),
                DType::Bool => b.get::<bool>(n).unwrap().iter().map(|&x| x as u8).collect(),
            };
            (c.name.clone(), bytes)
        })
        .collect();
    out.push(("indices".into(), le(b.indices(), usize::to_le_bytes)));
    out.push(("weights".into(), le(b.weights(), f32::to_le_bytes)));
    out.push((
        "episode_ends".into(),
        b.episode_ends().iter().map(|&x| x as u8).collect(),
    ));
    out
}

/// Sampling both buffers with the same seeded RNG gives byte-identical
/// batches, `rounds` times in a row.
fn assert_same_samples<B: Persisted>(a: &B, b: &B, seed: u64, rounds: usize, ctx: &str) {
    let (mut ra, mut rb) = (
        ChaCha8Rng::seed_from_u64(seed),
        ChaCha8Rng::seed_from_u64(seed),
    );
    let (mut ba, mut bb) = (a.new_batch(), b.new_batch());
    for round in 0..rounds {
        a.sample_into(&mut ba, 64, &mut ra).unwrap();
        b.sample_into(&mut bb, 64, &mut rb).unwrap();
        assert_eq!(ba.len(), 64);
        let (ia, ib) = (batch_image(&ba, a.schema()), batch_image(&bb, b.schema()));
        for ((name, x), (_, y)) in ia.iter().zip(&ib) {
            assert!(x == y, "{ctx}: sample round {round}: column {name} differs");
        }
    }
}

/// Saves `a`, loads it back with `storage`, checks the copy equals `a` in
/// state and samples; returns it.
fn round_trip<B: Persisted>(a: &B, dir: &Path, storage: Option<StorageMode>, ctx: &str) -> B {
    let path = dir.join(format!("{}.gmr", ctx.replace(' ', "_")));
    a.save_to(&path).unwrap();
    let b = B::load_from(&path, storage).unwrap();
    assert_same_state(a, &b, ctx);
    assert_same_samples(a, &b, 11, 4, ctx);
    b
}

fn uniform(layout: Layout, cfg: BufferConfig, seed: u64, steps: usize) -> ReplayBuffer {
    let mut b = ReplayBuffer::new(layout.schema(), cfg).unwrap();
    feed(&mut b, layout, &Episodes::new(seed).take(steps));
    b
}

// ------------------------------------------------------------ round trips

/// Adds the same transitions to both buffers and checks they stay equal
/// (slots, de-duplication counters, samples).
fn continue_both<B: Persisted>(a: &mut B, b: &mut B, layout: Layout, steps: &[Step], ctx: &str) {
    assert_eq!(
        feed(a, layout, steps),
        feed(b, layout, steps),
        "{ctx}: slots"
    );
    assert_same_state(a, b, ctx);
    assert_same_samples(a, b, 23, 4, ctx);
}

#[test]
fn uniform_round_trip_is_exact_after_the_ring_wraps() {
    let dir = tempfile::tempdir().unwrap();
    let mut gen = Episodes::new(1);
    let mut a =
        ReplayBuffer::new(Layout::Streams.schema(), BufferConfig::with_capacity(50)).unwrap();
    // ~4.6 wraps, saved in the middle of an episode (no mark on the last add).
    let mut steps = gen.take(230);
    while steps.last().unwrap().end {
        steps.push(gen.step());
    }
    feed(&mut a, Layout::Streams, &steps);
    assert_eq!(a.len(), 50);
    assert!((0..50).any(|s| a.is_episode_end(s)), "precondition: marks");
    let mut b = round_trip(&a, dir.path(), None, "uniform");
    continue_both(
        &mut a,
        &mut b,
        Layout::Streams,
        &gen.take(77),
        "uniform, continued",
    );
}

#[test]
fn empty_buffer_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.gmr");
    let mut a =
        ReplayBuffer::new(Layout::Streams.schema(), BufferConfig::with_capacity(9)).unwrap();
    a.save(&path).unwrap();
    let mut b = ReplayBuffer::load(&path).unwrap();
    assert!(b.is_empty());
    assert_eq!(b.capacity(), 9);
    assert_eq!(b.config(), a.config());
    assert_eq!(b.schema(), a.schema());
    assert!(matches!(
        b.sample(4, &mut ChaCha8Rng::seed_from_u64(0)),
        Err(Error::Empty)
    ));
    continue_both(
        &mut a,
        &mut b,
        Layout::Streams,
        &Episodes::new(2).take(30),
        "empty",
    );
}

#[test]
fn a_cleared_and_refilled_buffer_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let mut gen = Episodes::new(7);
    let mut a = uniform(Layout::Streams, BufferConfig::with_capacity(20), 7, 60);
    a.clear();
    feed(&mut a, Layout::Streams, &gen.take(15));
    let mut b = round_trip(&a, dir.path(), None, "cleared");
    continue_both(
        &mut a,
        &mut b,
        Layout::Streams,
        &gen.take(30),
        "cleared, continued",
    );
}

#[test]
fn saving_a_loaded_buffer_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (dir.path().join("1.gmr"), dir.path().join("2.gmr"));
    let a = uniform(Layout::Streams, BufferConfig::with_capacity(40), 3, 133);
    a.save(&p1).unwrap();
    ReplayBuffer::load(&p1).unwrap().save(&p2).unwrap();
    assert!(fs::read(&p1).unwrap() == fs::read(&p2).unwrap());
}

#[test]
fn round_trip_keeps_compressed_chunks_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut gen = Episodes::new(4);
    let cfg = config(2000, 4096, StorageMode::Memory);
    let mut a = ReplayBuffer::new(Layout::Streams.schema(), cfg).unwrap();
    feed(&mut a, Layout::Streams, &gen.take(5000));
    assert!(a.compress_cold(0) > 0);
    let compressed = a.stats().compressed_chunks;
    assert!(
        compressed >= 8,
        "precondition: {compressed} compressed chunks"
    );
    let mut b = round_trip(&a, dir.path(), None, "compressed");
    assert_eq!(b.stats().compressed_chunks, compressed);
    // The same file loaded into file-backed storage.
    let mut c = ReplayBuffer::load_with(dir.path().join("compressed.gmr"), Some(StorageMode::File))
        .unwrap();
    assert!(c.stats().file_dir.is_some());
    assert_same_state(&a, &c, "compressed -> file");
    assert_same_samples(&a, &c, 5, 4, "compressed -> file");
    // Adds decompress the chunks they write into: all three stay equal.
    let more = gen.take(1500);
    continue_both(
        &mut a,
        &mut b,
        Layout::Streams,
        &more,
        "compressed, continued",
    );
    let mut a2 = ReplayBuffer::load(dir.path().join("compressed.gmr")).unwrap();
    continue_both(
        &mut a2,
        &mut c,
        Layout::Streams,
        &more,
        "compressed -> file, continued",
    );
}

/// With a byte budget, adds compress cold chunks automatically. When they
/// do depends on resident bytes, heap scratch included, which a load does
/// not reproduce: after more adds the contents stay equal, the compression
/// counters may not.
#[test]
fn round_trip_with_a_byte_budget_keeps_the_contents() {
    let dir = tempfile::tempdir().unwrap();
    let mut gen = Episodes::new(5);
    let cfg = BufferConfig {
        byte_budget: Some(120_000),
        ..config(2000, 4096, StorageMode::Memory)
    };
    let mut a = ReplayBuffer::new(Layout::Streams.schema(), cfg).unwrap();
    feed(&mut a, Layout::Streams, &gen.take(4000));
    assert!(
        a.stats().compressed_chunks > 0,
        "precondition: automatic compression"
    );
    let mut b = round_trip(&a, dir.path(), None, "budget");
    assert_eq!(b.config(), a.config());
    let more = gen.take(1000);
    assert_eq!(
        feed(&mut a, Layout::Streams, &more),
        feed(&mut b, Layout::Streams, &more)
    );
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(
        (sa.len, sa.adds, sa.evicted_early),
        (sb.len, sb.adds, sb.evicted_early)
    );
    assert_eq!(sa.streams, sb.streams);
    assert!((0..2000).all(|s| a.is_episode_end(s) == b.is_episode_end(s)));
    assert_same_samples(&a, &b, 17, 4, "budget, continued");
}

#[test]
fn file_backed_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let mut gen = Episodes::new(6);
    let cfg = BufferConfig {
        storage_dir: Some(store.path().to_owned()),
        ..config(700, 4096, StorageMode::File)
    };
    let mut a = ReplayBuffer::new(Layout::Streams.schema(), cfg).unwrap();
    feed(&mut a, Layout::Streams, &gen.take(2500));
    assert_eq!(a.stats().file_dir.as_deref(), Some(store.path()));
    let mut b = round_trip(&a, dir.path(), None, "file");
    assert_eq!(b.stats().file_dir.as_deref(), Some(store.path()));
    assert_eq!(b.config(), a.config());
    let mut c =
        ReplayBuffer::load_with(dir.path().join("file.gmr"), Some(StorageMode::Memory)).unwrap();
    assert_eq!(c.stats().file_dir, None);
    assert_eq!(c.config().storage, StorageMode::Memory);
    assert_same_state(&a, &c, "file -> memory");
    assert_same_samples(&a, &c, 7, 4, "file -> memory");
    let more = gen.take(900);
    continue_both(&mut a, &mut b, Layout::Streams, &more, "file, continued");
    let mut a2 = ReplayBuffer::load(dir.path().join("file.gmr")).unwrap();
    continue_both(
        &mut a2,
        &mut c,
        Layout::Streams,
        &more,
        "file -> memory, continued",
    );
}

/// Priorities of every slot, β and the priority config are equal.
fn assert_same_priorities(a: &PrioritizedReplayBuffer, b: &PrioritizedReplayBuffer, ctx: &str) {
    let differ: Vec<usize> = (0..a.capacity())
        .filter(|&s| a.priority(s).to_bits() != b.priority(s).to_bits())
        .collect();
    assert!(
        differ.is_empty(),
        "{ctx}: priorities differ in slots {differ:?}"
    );
    assert_eq!(a.beta().to_bits(), b.beta().to_bits(), "{ctx}: beta");
    assert_eq!(
        a.max_priority().to_bits(),
        b.max_priority().to_bits(),
        "{ctx}"
    );
    assert_eq!(a.per_config(), b.per_config(), "{ctx}: PER config");
}

fn prioritized_round_trip(layout: Layout, eviction: Eviction, compress: bool, ctx: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut gen = Episodes::new(8);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let cfg = config(64, 4096, StorageMode::Memory);
    let mut a = PrioritizedReplayBuffer::new(layout.schema(), cfg, per_config(eviction)).unwrap();
    for _ in 0..6 {
        feed(&mut a, layout, &gen.take(50));
        train(&mut a, &mut rng, 7);
    }
    if compress {
        a.compress_cold(0);
    }
    let distinct: BTreeSet<u64> = (0..64).map(|s| a.priority(s).to_bits()).collect();
    assert!(distinct.len() > 20, "precondition: varied priorities");
    assert!(
        a.beta() > 0.4 && a.beta() < 1.0,
        "precondition: β mid-schedule"
    );
    let mut b = round_trip(&a, dir.path(), None, ctx);
    // round_trip sampled both 4 times: β advanced alike.
    assert_same_priorities(&a, &b, ctx);
    for round in 0..3 {
        let steps = gen.take(40);
        continue_both(&mut a, &mut b, layout, &steps, ctx);
        let (mut ra, mut rb) = (rng.clone(), rng.clone());
        train(&mut a, &mut ra, 5);
        train(&mut b, &mut rb, 5);
        rng = ra;
        assert_same_priorities(&a, &b, &format!("{ctx}, continued {round}"));
    }
}

#[test]
fn prioritized_round_trip_keeps_priorities_beta_and_sampling() {
    prioritized_round_trip(Layout::Streams, Eviction::Fifo, false, "per fifo");
}

#[test]
fn prioritized_round_trip_with_compressed_chunks() {
    prioritized_round_trip(Layout::Streams, Eviction::Fifo, true, "per compressed");
}

#[test]
fn lowest_priority_round_trip_keeps_the_victims() {
    prioritized_round_trip(Layout::Plain, Eviction::LowestPriority, false, "per lowest");
}

#[test]
fn prioritized_file_backed_round_trip_loads_into_memory() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(64, 4096, StorageMode::File);
    let mut a =
        PrioritizedReplayBuffer::new(Layout::Plain.schema(), cfg, per_config(Eviction::Fifo))
            .unwrap();
    feed(&mut a, Layout::Plain, &Episodes::new(10).take(150));
    train(&mut a, &mut ChaCha8Rng::seed_from_u64(1), 5);
    let path = dir.path().join("per.gmr");
    a.save(&path).unwrap();
    let b = PrioritizedReplayBuffer::load_with(&path, Some(StorageMode::Memory)).unwrap();
    assert_eq!(b.stats().file_dir, None);
    assert_same_state(&a, &b, "per file -> memory");
    assert_same_priorities(&a, &b, "per file -> memory");
    assert_same_samples(&a, &b, 3, 3, "per file -> memory");
}

// ------------------------------------------------------------ file format

/// CRC-32 (IEEE, reflected, as zlib and crc32fast compute it), bitwise.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

const TAG_HEADER: u8 = 1;
const TAG_EPISODES: u8 = 2;
const TAG_REGION: u8 = 3;
const TAG_PRIORITIES: u8 = 4;
const TAG_END: u8 = 255;

/// One framed section: `tag` at `start`, its payload, CRC, and `end`.
#[derive(Debug, Clone)]
struct Section {
    tag: u8,
    start: usize,
    payload: Range<usize>,
    end: usize,
}

impl Section {
    fn what(&self) -> &'static str {
        match self.tag {
            TAG_HEADER => "header",
            TAG_EPISODES => "episode",
            TAG_REGION => "column",
            TAG_PRIORITIES => "priority",
            _ => "end",
        }
    }
}

/// Parses a valid file's framing, checking every CRC with [`crc32`].
fn sections(file: &[u8]) -> Vec<Section> {
    assert_eq!(&file[..8], b"GMREPLAY");
    assert_eq!(u32_at(file, 8), 1, "format version");
    let (mut at, mut out) = (12, Vec::new());
    while at < file.len() {
        let len = u64_at(file, at + 1) as usize;
        let payload = at + 9..at + 9 + len;
        let crc = u32_at(file, payload.end);
        assert_eq!(crc32(&file[payload.clone()]), crc, "CRC at {at}");
        let end = payload.end + 4;
        out.push(Section {
            tag: file[at],
            start: at,
            payload,
            end,
        });
        at = end;
    }
    assert_eq!(at, file.len());
    assert_eq!(out.last().unwrap().tag, TAG_END);
    out
}

fn section(file: &[u8], tag: u8, nth: usize) -> Section {
    sections(file)
        .into_iter()
        .filter(|s| s.tag == tag)
        .nth(nth)
        .expect("section")
}

/// `file` with the payload of `s` replaced (length and CRC recomputed).
fn with_payload(file: &[u8], s: &Section, payload: &[u8]) -> Vec<u8> {
    let mut out = file[..s.start].to_vec();
    out.push(s.tag);
    out.extend((payload.len() as u64).to_le_bytes());
    out.extend(payload);
    out.extend(crc32(payload).to_le_bytes());
    out.extend(&file[s.end..]);
    out
}

/// `file` with section `s`'s payload edited in place by `f` (CRC recomputed).
fn patch_section(file: &[u8], s: &Section, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut p = file[s.payload.clone()].to_vec();
    f(&mut p);
    with_payload(file, s, &p)
}

/// Offsets (within the header payload) of the fields the tests patch.
#[derive(Debug)]
struct HeaderMap {
    /// Per field: offset of the dtype byte (kind follows, then `u32 nd`).
    fields: Vec<usize>,
    capacity: usize,
    chunk_bytes: usize,
    storage: usize,
    order: usize,
    head: usize,
    len: usize,
    last_slot: usize,
    /// `[adds, evicted_early, compress_sweeps, chunks_compressed, chunks_released]`.
    counters: usize,
    nstreams: usize,
    /// Per stream: offset of `[row_cap, row_head, hint, released_below, rows_appended]`.
    streams: Vec<usize>,
    /// Offset of α (then β, β_final, β_steps, ε, eviction u8, samples).
    per: Option<usize>,
}

fn header_map(h: &[u8]) -> HeaderMap {
    let mut at = 1;
    let nf = u32_at(h, at) as usize;
    at += 4;
    let mut fields = Vec::new();
    for _ in 0..nf {
        at += 4 + u32_at(h, at) as usize; // name
        fields.push(at);
        let nd = u32_at(h, at + 2) as usize;
        at += 2 + 4 + 8 * nd;
    }
    let capacity = at;
    let chunk_bytes = at + 16;
    let storage = at + 24;
    at = storage + 1 + if h[storage] == 0 { 8 } else { 0 };
    at += 4 + u32_at(h, at) as usize; // storage dir
    at += 16; // budget, compress_at
    let order = at;
    let (head, len, last_slot) = (at + 1, at + 9, at + 18);
    let nstreams = last_slot + 8 + 40;
    let ns = u32_at(h, nstreams) as usize;
    let streams: Vec<usize> = (0..ns).map(|i| nstreams + 4 + 40 * i).collect();
    let after = nstreams + 4 + 40 * ns;
    let per = (h[0] == 1).then_some(after);
    assert_eq!(
        after + if per.is_some() { 49 } else { 0 },
        h.len(),
        "header layout"
    );
    HeaderMap {
        fields,
        capacity,
        chunk_bytes,
        storage,
        order,
        head,
        len,
        last_slot,
        counters: last_slot + 8,
        nstreams,
        streams,
        per,
    }
}

/// `file` with its header payload edited by `f` (which may resize it).
fn patch_header(file: &[u8], f: impl FnOnce(&mut Vec<u8>, &HeaderMap)) -> Vec<u8> {
    let s = section(file, TAG_HEADER, 0);
    let map = header_map(&file[s.payload.clone()]);
    patch_section(file, &s, |p| f(p, &map))
}

/// (offset in the payload, state, data range) of every chunk of a region.
fn region_chunks(payload: &[u8], chunk_bytes: usize) -> Vec<(usize, u8, Range<usize>)> {
    let (mut at, mut out) = (0, Vec::new());
    while at < payload.len() {
        let st = payload[at];
        let data = match st {
            0 => at + 1..at + 1,
            1 => at + 1..at + 1 + chunk_bytes,
            2 => at + 5..at + 5 + u32_at(payload, at + 1) as usize,
            s => panic!("unknown chunk state {s}"),
        };
        out.push((at, st, data.clone()));
        at = data.end;
    }
    out
}

// ------------------------------------------------------------ bad files

fn reason(e: &Error) -> &str {
    match e {
        Error::Corrupt { reason, .. } => reason,
        e => panic!("expected Error::Corrupt, got {e:?}"),
    }
}

/// Writes `bytes` to `path`, loads it as `B` and returns the Corrupt reason.
fn corrupt_reason<B: Persisted>(path: &Path, bytes: &[u8], ctx: &str) -> String {
    fs::write(path, bytes).unwrap();
    match load_no_panic::<B>(path) {
        Ok(_) => panic!("{ctx}: loaded without an error"),
        Err(e) => {
            let r = reason(&e).to_owned();
            assert!(
                e.to_string().contains(&r) && e.to_string().contains(&*path.to_string_lossy()),
                "{ctx}: message names the file and the reason: {e}"
            );
            r
        }
    }
}

fn expect_corrupt<B: Persisted>(path: &Path, bytes: &[u8], needles: &[&str], ctx: &str) {
    let r = corrupt_reason::<B>(path, bytes, ctx);
    for n in needles {
        assert!(r.contains(n), "{ctx}: reason {r:?} lacks {n:?}");
    }
}

/// A small wrapped uniform buffer's file (raw chunks only).
fn small_uniform_file(dir: &Path) -> Vec<u8> {
    let path = dir.join("small.gmr");
    uniform(
        Layout::Streams,
        config(8, 4096, StorageMode::Memory),
        12,
        29,
    )
    .save(&path)
    .unwrap();
    fs::read(path).unwrap()
}

/// A prioritized buffer's file with compressed chunks and a priority section.
fn prioritized_file(dir: &Path, layout: Layout, eviction: Eviction, len: usize) -> Vec<u8> {
    let path = dir.join("per.gmr");
    let cfg = config(400, 4096, StorageMode::Memory);
    let mut b = PrioritizedReplayBuffer::new(layout.schema(), cfg, per_config(eviction)).unwrap();
    feed(&mut b, layout, &Episodes::new(13).take(len));
    train(&mut b, &mut ChaCha8Rng::seed_from_u64(2), 3);
    b.compress_cold(0);
    b.save(&path).unwrap();
    fs::read(path).unwrap()
}

/// Cut points: every byte up to the end of the header section, ±16 bytes
/// around every section boundary, and a stride of 61 bytes elsewhere.
fn cut_points(file: &[u8]) -> BTreeSet<usize> {
    let secs = sections(file);
    let mut cuts: BTreeSet<usize> = (0..secs[0].end + 16).collect();
    for s in &secs {
        for b in [s.start, s.payload.start, s.payload.end, s.end] {
            for d in 0..=16 {
                cuts.insert(b.saturating_sub(d));
                cuts.insert(b + d);
            }
        }
    }
    cuts.extend((0..file.len()).step_by(61));
    cuts.retain(|&c| c < file.len());
    cuts
}

fn check_truncations<B: Persisted>(file: &[u8], dir: &Path) -> usize {
    let path = dir.join("cut.gmr");
    let cuts = cut_points(file);
    for &cut in &cuts {
        let r = corrupt_reason::<B>(&path, &file[..cut], &format!("cut at {cut}"));
        assert!(
            r.contains("truncated") || (cut < 12 && r.contains("too short")),
            "cut at {cut} of {}: reason {r:?} does not say the file is truncated",
            file.len()
        );
    }
    cuts.len()
}

#[test]
fn every_truncation_is_a_corrupt_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = small_uniform_file(dir.path());
    let n = check_truncations::<ReplayBuffer>(&file, dir.path());
    let per = prioritized_file(dir.path(), Layout::Streams, Eviction::Fifo, 700);
    let m = check_truncations::<PrioritizedReplayBuffer>(&per, dir.path());
    assert!(n > 400 && m > 400, "{n} and {m} cut points");
}

/// What a single-bit flip at `pos` must be reported as (`None`: any
/// Corrupt reason, for flips in a section length or a region's chunk data,
/// which fail in several legitimate ways).
fn flip_reason(secs: &[Section], pos: usize) -> Option<String> {
    if pos < 8 {
        return Some("magic".into());
    }
    if pos < 12 {
        return Some("version".into());
    }
    let s = secs.iter().find(|s| s.start <= pos && pos < s.end).unwrap();
    if pos == s.start {
        Some("expected the".into())
    } else if pos < s.payload.start || (s.tag == TAG_REGION && pos < s.payload.end) {
        None
    } else {
        Some(format!("checksum mismatch in the {}", s.what()))
    }
}

fn check_bit_flips<B: Persisted>(file: &[u8], dir: &Path) -> usize {
    let path = dir.join("flip.gmr");
    let secs = sections(file);
    let mut positions: BTreeSet<usize> = (0..file.len()).step_by(7).collect();
    for s in &secs {
        positions.extend(s.start..s.payload.start);
        positions.extend(s.payload.end..s.end);
        if s.tag != TAG_REGION {
            positions.extend(s.payload.clone());
        }
    }
    positions.extend(0..12);
    let mut bad = file.to_vec();
    for &pos in &positions {
        let bit = 1u8 << (pos % 8);
        bad[pos] ^= bit;
        let ctx = format!("bit {} of byte {pos}", pos % 8);
        let r = corrupt_reason::<B>(&path, &bad, &ctx);
        if let Some(want) = flip_reason(&secs, pos) {
            assert!(r.contains(&want), "{ctx}: reason {r:?} lacks {want:?}");
        }
        bad[pos] ^= bit;
    }
    positions.len()
}

#[test]
fn every_single_bit_flip_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let file = small_uniform_file(dir.path());
    let n = check_bit_flips::<ReplayBuffer>(&file, dir.path());
    let per = prioritized_file(dir.path(), Layout::Streams, Eviction::Fifo, 700);
    let compressed = sections(&per)
        .iter()
        .filter(|s| s.tag == TAG_REGION)
        .flat_map(|s| region_chunks(&per[s.payload.clone()], 4096))
        .filter(|c| c.1 == 2)
        .count();
    assert!(
        compressed > 0,
        "precondition: compressed chunks in the file"
    );
    let m = check_bit_flips::<PrioritizedReplayBuffer>(&per, dir.path());
    assert!(n > 5000 && m > 5000, "{n} and {m} flips");
}

#[test]
fn foreign_files_are_rejected_with_a_clear_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreign");
    let good = small_uniform_file(dir.path());
    let mut random = vec![0u8; 5000];
    ChaCha8Rng::seed_from_u64(3).fill(&mut random[..]);
    let mut v2 = good.clone();
    v2[8..12].copy_from_slice(&2u32.to_le_bytes());
    let mut v0 = good.clone();
    v0[8..12].copy_from_slice(&0u32.to_le_bytes());
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"xyz");
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        ("empty", vec![], vec!["too short"]),
        ("magic only", b"GMREPLAY".to_vec(), vec!["too short"]),
        ("random bytes", random, vec!["bad magic"]),
        (
            "text",
            b"# a TOML file\n[buffer]\ncapacity = 10\n".to_vec(),
            vec!["bad magic"],
        ),
        ("version 2", v2, vec!["version 2", "reads version 1"]),
        ("version 0", v0, vec!["version 0"]),
        (
            "header only",
            good[..sections(&good)[0].end].to_vec(),
            vec!["truncated"],
        ),
        (
            "trailing bytes",
            trailing,
            vec!["3 unexpected bytes after the end"],
        ),
    ];
    for (ctx, bytes, needles) in cases {
        expect_corrupt::<ReplayBuffer>(&path, &bytes, &needles, ctx);
        expect_corrupt::<PrioritizedReplayBuffer>(&path, &bytes, &needles, ctx);
    }
    // OS-level failures are Io errors naming the path.
    let missing = dir.path().join("missing.gmr");
    match ReplayBuffer::load(&missing) {
        Err(Error::Io { path, source }) => {
            assert_eq!(path, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("missing file: {other:?}"),
    }
    match ReplayBuffer::load(dir.path()) {
        Err(Error::Io { path, .. }) => assert_eq!(path, dir.path()),
        other => panic!("a directory: {other:?}"),
    }
}

#[test]
fn a_file_of_the_other_kind_names_the_right_loader() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kind.gmr");
    let uni = small_uniform_file(dir.path());
    expect_corrupt::<PrioritizedReplayBuffer>(
        &path,
        &uni,
        &["uniform buffer", "ReplayBuffer::load"],
        "uniform as prioritized",
    );
    let per = prioritized_file(dir.path(), Layout::Streams, Eviction::Fifo, 100);
    expect_corrupt::<ReplayBuffer>(
        &path,
        &per,
        &["prioritized buffer", "PrioritizedReplayBuffer::load"],
        "prioritized as uniform",
    );
}

// ------------------------------------------------------------ crafted files

/// Rewrites the shape of field `i` (its `u32 nd` and dims).
fn set_dims(h: &mut Vec<u8>, m: &HeaderMap, i: usize, dims: &[u64]) {
    let at = m.fields[i] + 2;
    let old = 4 + 8 * u32_at(h, at) as usize;
    let mut new = (dims.len() as u32).to_le_bytes().to_vec();
    for d in dims {
        new.extend(d.to_le_bytes());
    }
    h.splice(at..at + old, new);
}

#[test]
fn crafted_headers_with_valid_checksums_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crafted.gmr");
    let file = small_uniform_file(dir.path());
    let h = &file[section(&file, TAG_HEADER, 0).payload];
    let m = header_map(h);
    assert_eq!(u64_at(h, m.capacity), 8);
    assert_eq!(u64_at(h, m.len), 8, "precondition: full");
    let row_head = u64_at(h, m.streams[0] + 8);
    assert_eq!(m.streams.len(), 2);
    let check = |ctx: &str, needles: &[&str], patch: &dyn Fn(&mut Vec<u8>, &HeaderMap)| {
        let bad = patch_header(&file, |h, m| patch(h, m));
        expect_corrupt::<ReplayBuffer>(&path, &bad, needles, ctx);
    };
    check("unknown kind", &["unknown buffer kind 7"], &|h, _| h[0] = 7);
    check("no fields", &["0 fields"], &|h, _| {
        h[1..5].copy_from_slice(&0u32.to_le_bytes())
    });
    check("bad dtype", &["unknown dtype"], &|h, m| h[m.fields[0]] = 99);
    check("bad field kind", &["unknown kind 9"], &|h, m| {
        h[m.fields[1] + 1] = 9
    });
    check(
        "zero-sized axis",
        &["recorded schema is invalid", "zero-sized"],
        &|h, m| set_dims(h, m, 1, &[0]),
    );
    check("shape overflows", &["action"], &|h, m| {
        set_dims(h, m, 2, &[1 << 32, 1 << 32, 1 << 32])
    });
    check(
        "capacity 0",
        &["recorded config is invalid", "capacity"],
        &|h, m| put_u64(h, m.capacity, 0),
    );
    check("chunk_bytes 5000", &["chunk_bytes"], &|h, m| {
        put_u64(h, m.chunk_bytes, 5000)
    });
    check("storage mode", &["unknown storage mode 7"], &|h, m| {
        h[m.storage] = 7
    });
    check("order", &["unknown order 5"], &|h, m| h[m.order] = 5);
    check(
        "len > capacity",
        &["inconsistent state", "do not fit capacity 8"],
        &|h, m| put_u64(h, m.len, 9),
    );
    check("head < len", &["inconsistent state", "head 7"], &|h, m| {
        put_u64(h, m.head, 7)
    });
    check(
        "last slot",
        &["inconsistent state", "last slot 8"],
        &|h, m| put_u64(h, m.last_slot, 8),
    );
    check(
        "more streams than fields",
        &["6 streams for 5 fields"],
        &|h, m| h[m.nstreams..m.nstreams + 4].copy_from_slice(&6u32.to_le_bytes()),
    );
    check(
        "stream ring size",
        &["inconsistent state", "stream rows"],
        &|h, m| {
            let v = u64_at(h, m.streams[0]);
            put_u64(h, m.streams[0], v + 1)
        },
    );
    check(
        "hint > window",
        &["inconsistent state", "out of range"],
        &|h, m| put_u64(h, m.streams[0] + 16, WIN as u64 + 1),
    );
    check(
        "rows appended > row head",
        &["inconsistent state", "out of range"],
        &|h, m| put_u64(h, m.streams[0] + 32, row_head + 1),
    );
    check(
        "row head behind the windows",
        &["inconsistent state", "window"],
        &|h, m| {
            put_u64(h, m.streams[0] + 8, row_head - 3);
            put_u64(h, m.streams[0] + 24, 0);
            put_u64(h, m.streams[0] + 32, row_head - 3);
        },
    );
    // Counters so large that the next add would overflow them.
    check("row head near u64::MAX", &["out of range"], &|h, m| {
        put_u64(h, m.streams[0] + 8, u64::MAX - 1);
        put_u64(h, m.streams[0] + 24, 0);
        put_u64(h, m.streams[0] + 32, 0);
    });
    check("adds near u64::MAX", &["out of range"], &|h, m| {
        put_u64(h, m.counters, u64::MAX)
    });
    check("head near u64::MAX", &["out of range"], &|h, m| {
        put_u64(h, m.head, u64::MAX)
    });
    check(
        "trailing header bytes",
        &["3 unexpected trailing"],
        &|h, _| h.extend([0, 0, 0]),
    );
    check(
        "short header",
        &["header is shorter than its fields"],
        &|h, _| h.truncate(h.len() - 5),
    );
    // A 40 KB file cannot hold a buffer of 4 billion slots.
    check("huge capacity", &["truncated"], &|h, m| {
        put_u64(h, m.capacity, u32::MAX as u64)
    });
}

#[test]
fn a_slot_order_uniform_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("order.gmr");
    let plain = dir.path().join("plain.gmr");
    uniform(Layout::Plain, config(8, 4096, StorageMode::Memory), 1, 20)
        .save(&plain)
        .unwrap();
    let file = fs::read(&plain).unwrap();
    let bad = patch_header(&file, |h, m| h[m.order] = 1);
    expect_corrupt::<ReplayBuffer>(&path, &bad, &["order"], "uniform with slot order");
}

#[test]
fn crafted_prioritized_headers_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crafted.gmr");
    let fifo = prioritized_file(dir.path(), Layout::Plain, Eviction::Fifo, 300);
    let lowest = prioritized_file(dir.path(), Layout::Plain, Eviction::LowestPriority, 300);
    let partial = prioritized_file(dir.path(), Layout::Plain, Eviction::LowestPriority, 100);
    let streams = prioritized_file(dir.path(), Layout::Streams, Eviction::Fifo, 300);
    let check =
        |ctx: &str, file: &[u8], needles: &[&str], patch: &dyn Fn(&mut Vec<u8>, &HeaderMap)| {
            let bad = patch_header(file, |h, m| patch(h, m));
            expect_corrupt::<PrioritizedReplayBuffer>(&path, &bad, needles, ctx);
        };
    check(
        "alpha NaN",
        &fifo,
        &["recorded priority config is invalid", "alpha"],
        &|h, m| put_u64(h, m.per.unwrap(), f64::NAN.to_bits()),
    );
    check(
        "beta 2",
        &fifo,
        &["recorded priority config is invalid", "beta"],
        &|h, m| put_u64(h, m.per.unwrap() + 8, 2f64.to_bits()),
    );
    check("eviction 9", &fifo, &["unknown eviction 9"], &|h, m| {
        h[m.per.unwrap() + 40] = 9
    });
    check(
        "lowest-priority eviction, FIFO order",
        &fifo,
        &["order"],
        &|h, m| h[m.per.unwrap() + 40] = 1,
    );
    check("FIFO eviction, slot order", &lowest, &["order"], &|h, m| {
        h[m.per.unwrap() + 40] = 0
    });
    check(
        "lowest-priority eviction with observation streams",
        &streams,
        &["cannot be rebuilt"],
        &|h, m| {
            h[m.order] = 1;
            h[m.per.unwrap() + 40] = 1;
        },
    );
    check(
        "slot order, head != len before full",
        &partial,
        &["head and len disagree"],
        &|h, m| {
            let v = u64_at(h, m.head);
            put_u64(h, m.head, v + 1)
        },
    );
}

#[test]
fn crafted_sections_with_valid_checksums_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crafted.gmr");
    let uni = small_uniform_file(dir.path());
    // Plain regions come first in column order: action, reward, done.
    let done = section(&uni, TAG_REGION, 2);
    let bad = patch_section(&uni, &done, |p| {
        assert_eq!(p[0], 1, "precondition: raw chunk");
        p[1 + 3] = 2;
    });
    expect_corrupt::<ReplayBuffer>(&path, &bad, &["bool column \"done\"", "slot 3"], "bool 2");
    let bad = patch_section(&uni, &done, |p| p[0] = 7);
    expect_corrupt::<ReplayBuffer>(&path, &bad, &["column 2", "unknown state 7"], "state 7");
    let bad = patch_section(&uni, &done, |p| p.push(0));
    expect_corrupt::<ReplayBuffer>(&path, &bad, &["1 bytes after its chunks"], "extra byte");
    let bad = patch_section(&uni, &done, |p| p.truncate(p.len() - 1));
    expect_corrupt::<ReplayBuffer>(&path, &bad, &["shorter than its chunks"], "short region");
    let eps = section(&uni, TAG_EPISODES, 0);
    let bad = patch_section(&uni, &eps, |p| p.extend([0; 8]));
    expect_corrupt::<ReplayBuffer>(&path, &bad, &["episode section", "capacity"], "episodes");
    let end = section(&uni, TAG_END, 0);
    let bad = patch_section(&uni, &end, |p| p.push(0));
    expect_corrupt::<ReplayBuffer>(&path, &bad, &["end section"], "end payload");
    let mut bad = uni.clone();
    bad[eps.start] = TAG_PRIORITIES;
    expect_corrupt::<ReplayBuffer>(&path, &bad, &["expected the episode section"], "tag");

    // A compressed image that does not decompress, with a valid CRC.
    let per = prioritized_file(dir.path(), Layout::Streams, Eviction::Fifo, 700);
    let (s, (_, _, data)) = sections(&per)
        .into_iter()
        .filter(|s| s.tag == TAG_REGION)
        .find_map(|s| {
            let c = region_chunks(&per[s.payload.clone()], 4096)
                .into_iter()
                .find(|c| c.1 == 2)?;
            Some((s, c))
        })
        .expect("precondition: a compressed chunk");
    let bad = patch_section(&per, &s, |p| p[data].fill(0xFF));
    expect_corrupt::<PrioritizedReplayBuffer>(&path, &bad, &["decompress"], "bad image");

    // Priorities that no live buffer can hold.
    let per = prioritized_file(dir.path(), Layout::Plain, Eviction::Fifo, 100);
    let pri = section(&per, TAG_PRIORITIES, 0);
    let cases: [(&str, usize, f64); 5] = [
        ("NaN priority", 5, f64::NAN),
        ("negative priority", 5, -1.0),
        ("zero priority of a live slot", 5, 0.0),
        ("priority of an empty slot", 300, 1.0),
        ("priority whose sum overflows", 6, f64::MAX),
    ];
    for (ctx, slot, v) in cases {
        let bad = patch_section(&per, &pri, |p| put_u64(p, slot * 8, v.to_bits()));
        let want = format!("of slot {slot} is invalid");
        expect_corrupt::<PrioritizedReplayBuffer>(&path, &bad, &[want.as_str()], ctx);
    }
    let bad = patch_section(&per, &pri, |p| p.truncate(p.len() - 8));
    expect_corrupt::<PrioritizedReplayBuffer>(&path, &bad, &["priority section"], "short");
}

// ------------------------------------------------------------ crash safety

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// (bytes, mtime, inode) of a file.
fn snapshot(p: &Path) -> (Vec<u8>, std::time::SystemTime, u64) {
    let m = fs::metadata(p).unwrap();
    (fs::read(p).unwrap(), m.modified().unwrap(), m.ino())
}

#[test]
fn a_failed_save_leaves_the_existing_file_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("buf.gmr");
    let a = uniform(Layout::Streams, BufferConfig::with_capacity(30), 1, 50);
    let b = uniform(Layout::Streams, BufferConfig::with_capacity(30), 2, 70);
    a.save(&p).unwrap();
    let before = snapshot(&p);
    // The parent of the target is a regular file.
    let under_file = p.join("x.gmr");
    assert!(matches!(b.save(&under_file), Err(Error::Io { ref path, .. }) if *path == under_file));
    // The target is a directory: the rename fails after the temp file is
    // fully written, and the temp file is removed.
    let as_dir = dir.path().join("dir.gmr");
    fs::create_dir(&as_dir).unwrap();
    assert!(matches!(b.save(&as_dir), Err(Error::Io { .. })));
    assert!(as_dir.is_dir() && listing(&as_dir).is_empty());
    assert_eq!(snapshot(&p), before, "existing file changed");
    assert_eq!(
        listing(dir.path()),
        ["buf.gmr", "dir.gmr"],
        "temp files left"
    );
    assert!(matches!(b.save(""), Err(Error::Io { .. })), "empty path");
}

#[test]
fn a_save_over_an_existing_file_replaces_it_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("buf.gmr");
    let a = uniform(Layout::Streams, BufferConfig::with_capacity(30), 1, 50);
    let b = uniform(Layout::Streams, BufferConfig::with_capacity(30), 2, 70);
    a.save(&p).unwrap();
    let (a_bytes, _, a_ino) = snapshot(&p);
    // A reader of the old file keeps seeing the old bytes: the new file is
    // renamed over it, not written into it.
    let mut old = fs::File::open(&p).unwrap();
    b.save(&p).unwrap();
    let mut seen = Vec::new();
    old.read_to_end(&mut seen).unwrap();
    assert!(seen == a_bytes, "the old file was modified in place");
    let (b_bytes, _, b_ino) = snapshot(&p);
    assert_ne!(a_ino, b_ino);
    assert!(b_bytes != a_bytes);
    assert_eq!(listing(dir.path()), ["buf.gmr"]);
    let loaded = ReplayBuffer::load(&p).unwrap();
    assert_same_state(&b, &loaded, "replaced");
}

#[test]
fn loading_never_modifies_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("buf.gmr");
    let bad = dir.path().join("bad.gmr");
    let a = uniform(Layout::Streams, BufferConfig::with_capacity(30), 1, 50);
    a.save(&p).unwrap();
    let mut bytes = fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    fs::write(&bad, &bytes).unwrap();
    // mtime granularity: make a write during the load observable.
    std::thread::sleep(Duration::from_millis(20));
    let (good0, bad0) = (snapshot(&p), snapshot(&bad));
    ReplayBuffer::load(&p).unwrap();
    ReplayBuffer::load_with(&p, Some(StorageMode::File)).unwrap();
    assert!(ReplayBuffer::load(&bad).is_err());
    assert!(PrioritizedReplayBuffer::load(&p).is_err());
    assert_eq!(snapshot(&p), good0);
    assert_eq!(snapshot(&bad), bad0);
    assert_eq!(listing(dir.path()), ["bad.gmr", "buf.gmr"]);
}

/// Runs the ignored test `name` of this binary in a child process with
/// `env` set; returns the child (stdout piped).
fn spawn_helper(name: &str, env: (&str, &Path)) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            name,
            "--nocapture",
            "--test-threads=1",
        ])
        .env(env.0, env.1)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_save_failing_mid_write_leaves_the_existing_file_untouched() {
    let work = tempfile::tempdir().unwrap();
    let inputs = tempfile::tempdir().unwrap();
    let p = work.path().join("buf.gmr");
    let a = uniform(
        Layout::Streams,
        config(30, 4096, StorageMode::Memory),
        1,
        50,
    );
    a.save(&p).unwrap();
    let b = uniform(
        Layout::Streams,
        config(300, 4096, StorageMode::Memory),
        2,
        700,
    );
    b.save(inputs.path().join("b.gmr")).unwrap();
    fs::write(inputs.path().join("target"), p.to_str().unwrap()).unwrap();
    let before = snapshot(&p);
    let out = spawn_helper(
        "helper_save_under_a_file_size_limit",
        ("GM_PERSIST_FSIZE", inputs.path()),
    )
    .wait_with_output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {stdout}");
    assert!(
        stdout.contains("SAVE FAILED WITH Io"),
        "child did not run: {stdout}"
    );
    assert_eq!(
        snapshot(&p),
        before,
        "existing file changed by the failed save"
    );
    assert_eq!(listing(work.path()), ["buf.gmr"], "temp file left behind");
}

/// Child side of the test above: with writes limited to 16 KiB (and
/// SIGXFSZ ignored, so the write fails with EFBIG), saving a larger buffer
/// over the target must fail with `Error::Io`.
#[test]
#[ignore = "helper: run in a child process by a_save_failing_mid_write_leaves_the_existing_file_untouched"]
fn helper_save_under_a_file_size_limit() {
    let Some(inputs) = std::env::var_os("GM_PERSIST_FSIZE").map(PathBuf::from) else {
        eprintln!("helper_save_under_a_file_size_limit: not in a child process, skipped");
        return;
    };
    let b = ReplayBuffer::load(inputs.join("b.gmr")).unwrap();
    let target = PathBuf::from(fs::read_to_string(inputs.join("target")).unwrap());
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit/signal are plain syscalls given valid
    // pointers; this process is a throw-away child that only runs this test.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim), 0);
        lim.rlim_cur = 16 << 10;
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    match b.save(&target) {
        Err(Error::Io { .. }) => println!("SAVE FAILED WITH Io"),
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

#[test]
fn a_killed_save_leaves_the_old_or_the_new_file() {
    let inputs = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let p = work.path().join("buf.gmr");
    for (name, seed) in [("a.gmr", 1), ("b.gmr", 2)] {
        let b = uniform(
            Layout::Streams,
            config(20_000, 16384, StorageMode::Memory),
            seed,
            21_000,
        );
        b.save(inputs.path().join(name)).unwrap();
    }
    let a_bytes = fs::read(inputs.path().join("a.gmr")).unwrap();
    let b_bytes = fs::read(inputs.path().join("b.gmr")).unwrap();
    assert!(a_bytes.len() > 1_000_000 && a_bytes != b_bytes);
    fs::write(&p, &a_bytes).unwrap();
    fs::write(inputs.path().join("target"), p.to_str().unwrap()).unwrap();
    for round in 0..6u64 {
        let mut child = spawn_helper("helper_save_in_a_loop", ("GM_PERSIST_LOOP", inputs.path()));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert!(
            lines.any(|l| l.unwrap().contains("SAVING")),
            "child did not start"
        );
        std::thread::sleep(Duration::from_millis(3 + round * 7));
        child.kill().unwrap();
        child.wait().unwrap();
        let now = fs::read(&p).unwrap();
        assert!(
            now == a_bytes || now == b_bytes,
            "round {round}: a mix of old and new"
        );
        ReplayBuffer::load(&p).unwrap();
    }
    // Only the target and the temp files of killed saves (named
    // `.buf.gmr.tmp-*`) can be there.
    for name in listing(work.path()) {
        assert!(
            name == "buf.gmr" || name.starts_with(".buf.gmr.tmp-"),
            "{name}"
        );
    }
}

/// Child side of the test above: saves the two input buffers over the
/// target alternately until killed (or for 20 s at most).
#[test]
#[ignore = "helper: run in a child process by a_killed_save_leaves_the_old_or_the_new_file"]
fn helper_save_in_a_loop() {
    let Some(inputs) = std::env::var_os("GM_PERSIST_LOOP").map(PathBuf::from) else {
        eprintln!("helper_save_in_a_loop: not in a child process, skipped");
        return;
    };
    let a = ReplayBuffer::load(inputs.join("a.gmr")).unwrap();
    let b = ReplayBuffer::load(inputs.join("b.gmr")).unwrap();
    let target = PathBuf::from(fs::read_to_string(inputs.join("target")).unwrap());
    println!("SAVING");
    // Bounded, in case the parent dies before it kills this process.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        b.save(&target).unwrap();
        a.save(&target).unwrap();
    }
}
