//! The [`Prefetcher`]: batches of the configured size in the order a seeded
//! `StdRng` samples them, waiting for `min_len` (and again after a clear),
//! sampling errors handed to the consumer without wedging the thread,
//! dropping the handle stopping and joining the thread wherever it waits,
//! and the consumer side allocating nothing once warm (batches recycled).
//!
//! That the thread is gone after a drop is observed exactly: the test's
//! buffer ([`Probe`]) flags its own drop, and once the test has dropped its
//! own handles, only the prefetch thread holds the last `SharedReplay`.

use gm_buffers::{
    col, Batch, BufferConfig, BufferStats, Column, DType, Error, FieldSpec, PrefetchBuilder,
    Prefetcher, Replay, ReplayBuffer, Schema, SharedReplay, StorageMode,
};
use gm_leak::{measure_thread, TrackingAllocator};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator::system();

/// Deadline for something that must happen; a test that would otherwise
/// hang fails instead. Never a timing assertion.
const LIVENESS: Duration = Duration::from_secs(60);

/// "Nothing arrives" is checked over this window: a wrong implementation
/// would deliver a batch within it, a right one never does.
const QUIET: Duration = Duration::from_millis(100);

const X: usize = 8;

fn schema() -> Schema {
    Schema::new(vec![
        FieldSpec::plain("x", DType::F32, &[X]),
        FieldSpec::plain("id", DType::I64, &[]),
    ])
    .unwrap()
}

fn buffer(capacity: usize) -> ReplayBuffer {
    let cfg = BufferConfig {
        storage: StorageMode::Memory,
        ..BufferConfig::with_capacity(capacity)
    };
    ReplayBuffer::new(schema(), cfg).unwrap()
}

fn x_of(id: i64) -> [f32; X] {
    std::array::from_fn(|k| id as f32 + k as f32 / 16.0)
}

fn add<B: Replay>(shared: &SharedReplay<B>, ids: std::ops::Range<i64>) {
    for id in ids {
        shared.add(&[col(&x_of(id)), col(&[id])]).unwrap();
    }
}

/// Every item's `x` matches its `id`; returns the ids.
fn checked_ids(b: &Batch) -> Vec<i64> {
    let (x, ids) = (b.get::<f32>("x").unwrap(), b.get::<i64>("id").unwrap());
    for (i, &id) in ids.iter().enumerate() {
        assert_eq!(&x[i * X..(i + 1) * X], &x_of(id), "item {i}");
    }
    ids.to_vec()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < LIVENESS, "no progress: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Drops `p` on another thread and waits for that to finish, so that a drop
/// that never returns fails the test instead of hanging it.
fn drop_or_fail(p: Prefetcher) {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        drop(p);
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(LIVENESS).is_ok(),
        "dropping the Prefetcher did not return: its thread was not stopped"
    );
}

/// What the probe's sampling does.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Inject {
    Nothing,
    /// `sample_into` fails with `Error::Empty` (as after a racing clear).
    Empty,
    /// `sample_into` fails with another error.
    Broken,
}

/// A uniform buffer that counts calls, can inject sampling errors and
/// flags its own drop.
struct Probe {
    inner: ReplayBuffer,
    dropped: Arc<AtomicBool>,
    len_calls: Arc<AtomicUsize>,
    sample_calls: Arc<AtomicUsize>,
    inject: Arc<Mutex<Inject>>,
}

#[derive(Clone)]
struct ProbeView {
    dropped: Arc<AtomicBool>,
    len_calls: Arc<AtomicUsize>,
    sample_calls: Arc<AtomicUsize>,
    inject: Arc<Mutex<Inject>>,
}

impl ProbeView {
    fn set(&self, i: Inject) {
        *self.inject.lock().unwrap() = i;
    }
    fn samples(&self) -> usize {
        self.sample_calls.load(Ordering::SeqCst)
    }
    fn lens(&self) -> usize {
        self.len_calls.load(Ordering::SeqCst)
    }
    fn dropped(&self) -> bool {
        self.dropped.load(Ordering::SeqCst)
    }
}

fn probe(capacity: usize) -> (SharedReplay<Probe>, ProbeView) {
    let view = ProbeView {
        dropped: Arc::default(),
        len_calls: Arc::default(),
        sample_calls: Arc::default(),
        inject: Arc::new(Mutex::new(Inject::Nothing)),
    };
    let p = Probe {
        inner: buffer(capacity),
        dropped: view.dropped.clone(),
        len_calls: view.len_calls.clone(),
        sample_calls: view.sample_calls.clone(),
        inject: view.inject.clone(),
    };
    (SharedReplay::new(p), view)
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

impl Replay for Probe {
    fn schema(&self) -> &Schema {
        self.inner.schema()
    }
    fn len(&self) -> usize {
        self.len_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.len()
    }
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }
    fn add(&mut self, cols: &[Column<'_>]) -> gm_buffers::Result<usize> {
        self.inner.add(cols)
    }
    fn add_batch(&mut self, cols: &[Column<'_>]) -> gm_buffers::Result<usize> {
        self.inner.add_batch(cols)
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
        self.sample_calls.fetch_add(1, Ordering::SeqCst);
        match *self.inject.lock().unwrap() {
            Inject::Nothing => self.inner.sample_into(batch, batch_size, rng),
            Inject::Empty => Err(Error::Empty),
            Inject::Broken => Err(Error::Unsupported("injected sampling failure".into())),
        }
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

// ---------------------------------------------------------------------------

#[test]
fn batches_come_in_the_order_a_seeded_std_rng_samples_them() {
    let shared = SharedReplay::new(buffer(1000));
    add(&shared, 0..500);
    let p = PrefetchBuilder::new(32)
        .depth(3)
        .seed(42)
        .spawn(shared.clone())
        .unwrap();
    let mut rng = StdRng::seed_from_u64(42);
    let mut want = shared.new_batch();
    for n in 0..25 {
        let got = p.next().unwrap();
        shared.sample_into(&mut want, 32, &mut rng).unwrap();
        assert_eq!(got.len(), 32);
        assert_eq!(got.indices(), want.indices(), "batch {n}");
        assert_eq!(checked_ids(&got), checked_ids(&want), "batch {n}");
        assert!(got.weights().iter().all(|&w| w == 1.0));
    }
    drop(p);
    // Another seed gives another sequence.
    let p = PrefetchBuilder::new(32)
        .seed(43)
        .spawn(shared.clone())
        .unwrap();
    let mut rng = StdRng::seed_from_u64(42);
    shared.sample_into(&mut want, 32, &mut rng).unwrap();
    assert_ne!(p.next().unwrap().indices(), want.indices());
}

#[test]
fn it_waits_for_min_len_and_never_samples_before() {
    let (shared, view) = probe(1000);
    let p = PrefetchBuilder::new(8)
        .min_len(100)
        .spawn(shared.clone())
        .unwrap();
    wait_until("the thread checks the length", || view.lens() > 0);
    assert!(p.next_timeout(QUIET).is_none());
    add(&shared, 0..99);
    assert!(p.next_timeout(QUIET).is_none(), "99 < min_len 100");
    assert_eq!(view.samples(), 0, "no sampling below min_len");
    add(&shared, 99..100);
    let b = p
        .next_timeout(LIVENESS)
        .expect("a batch once min_len is reached");
    let b = b.unwrap();
    assert_eq!(b.len(), 8);
    assert!(checked_ids(&b).iter().all(|id| (0..100).contains(id)));
    drop(b);
    drop(p);

    // The default min_len is the batch size.
    let (shared, view) = probe(1000);
    let p = PrefetchBuilder::new(16).spawn(shared.clone()).unwrap();
    add(&shared, 0..15);
    wait_until("the thread checks the length", || view.lens() > 0);
    assert!(p.next_timeout(QUIET).is_none());
    assert_eq!(view.samples(), 0);
    add(&shared, 15..16);
    assert_eq!(p.next_timeout(LIVENESS).unwrap().unwrap().len(), 16);
}

#[test]
fn drop_stops_and_joins_the_thread_when_the_channel_is_full() {
    let (shared, view) = probe(100);
    add(&shared, 0..100);
    let p = PrefetchBuilder::new(4)
        .depth(2)
        .spawn(shared.clone())
        .unwrap();
    drop(shared); // from here on only the prefetch thread holds the buffer
    wait_until("the channel fills", || p.ready() == 2);
    // The thread fills one more batch and blocks handing it over.
    wait_until("a third batch is sampled", || view.samples() >= 3);
    assert!(!view.dropped());
    drop_or_fail(p);
    assert!(view.dropped(), "the thread is gone with its buffer handle");
    assert_eq!(view.samples(), 3, "nobody consumed: three batches sampled");
}

#[test]
fn drop_stops_and_joins_the_thread_while_it_waits_for_data() {
    let (shared, view) = probe(100);
    // A poll interval far longer than the liveness deadline: stopping must
    // not wait for it.
    let p = PrefetchBuilder::new(4)
        .poll_interval(Duration::from_secs(3600))
        .spawn(shared.clone())
        .unwrap();
    drop(shared);
    wait_until("the thread checks the length", || view.lens() > 0);
    drop_or_fail(p);
    assert!(view.dropped(), "the thread is gone with its buffer handle");
    assert_eq!(view.samples(), 0);
}

#[test]
fn drop_stops_and_joins_the_thread_while_the_consumer_is_active() {
    let (shared, view) = probe(100);
    add(&shared, 0..100);
    let p = PrefetchBuilder::new(4)
        .depth(1)
        .spawn(shared.clone())
        .unwrap();
    drop(shared);
    for _ in 0..10 {
        assert_eq!(p.next().unwrap().len(), 4);
    }
    drop_or_fail(p);
    assert!(view.dropped());
}

#[test]
fn the_consumer_allocates_nothing_once_warm_and_batches_are_recycled() {
    gm_leak::assert_active();
    let (shared, view) = probe(1000);
    add(&shared, 0..1000);
    let depth = 4;
    let p = PrefetchBuilder::new(64)
        .depth(depth)
        .seed(5)
        .spawn(shared.clone())
        .unwrap();
    // Warm-up without ever blocking in `next`.
    for _ in 0..20 {
        wait_until("a batch is ready", || p.ready() > 0);
        checked_ids(&p.next().unwrap());
    }
    let mut ptrs = Vec::with_capacity(200);
    let mut sum = 0i64;
    let mut take = |b: &Batch| {
        let ids = b.get::<i64>("id").unwrap();
        sum = sum.wrapping_add(ids.iter().sum::<i64>());
        ptrs.push(ids.as_ptr() as usize);
    };
    let ((), m) = measure_thread(|| {
        for _ in 0..50 {
            take(&p.next().unwrap());
        }
        // Starve the thread so that the consumer surely blocks, then let it
        // go on: the blocking receives must not allocate either.
        view.set(Inject::Empty);
        while let Some(b) = p.next_timeout(QUIET) {
            take(&b.unwrap());
        }
        view.set(Inject::Nothing);
        for _ in 0..50 {
            take(&p.next().unwrap());
        }
    });
    assert_eq!(
        (m.allocations, m.allocated_bytes),
        (0, 0),
        "receiving and dropping {} prefetched batches allocated: {m:?}",
        ptrs.len()
    );
    assert!(ptrs.len() >= 100 && sum > 0);
    // The same few batches go round: at most the pool (depth + 2).
    let distinct: HashSet<usize> = ptrs.iter().copied().collect();
    assert!(
        distinct.len() <= depth + 2,
        "{} distinct batch buffers for a pool of {}",
        distinct.len(),
        depth + 2
    );
}

#[test]
fn clearing_the_buffer_makes_it_wait_again_and_a_refill_resumes() {
    let shared = SharedReplay::new(buffer(1000));
    add(&shared, 0..100);
    let p = PrefetchBuilder::new(8)
        .depth(2)
        .min_len(50)
        .spawn(shared.clone())
        .unwrap();
    for _ in 0..3 {
        assert!(checked_ids(&p.next().unwrap()).iter().all(|&id| id < 100));
    }
    shared.write().clear();
    // Batches sampled before the clear (ids < 100) may still be queued, at
    // most depth + 1 of them and all before any sampled after the refill.
    // Nothing else comes: no error, no batch below min_len.
    let mut stale = 0;
    let mut is_stale = |b: &Batch| {
        let ids = checked_ids(b);
        if ids.iter().all(|&id| id < 100) {
            stale += 1;
            true
        } else {
            assert!(ids.iter().all(|&id| (1000..1050).contains(&id)), "{ids:?}");
            false
        }
    };
    while let Some(b) = p.next_timeout(QUIET) {
        let b = b.expect("an empty buffer is waited on, not an error");
        assert!(is_stale(&b), "sampled a cleared buffer");
    }
    add(&shared, 1000..1049);
    while let Some(b) = p.next_timeout(QUIET) {
        assert!(is_stale(&b.unwrap()), "sampled 49 < min_len 50");
    }
    add(&shared, 1049..1050);
    let mut fresh = 0;
    while fresh < 5 {
        let b = p.next_timeout(LIVENESS).expect("batches resume").unwrap();
        if is_stale(&b) {
            assert_eq!(fresh, 0, "a batch from before the clear after a new one");
        } else {
            fresh += 1;
        }
    }
    assert!(stale <= 3, "{stale} batches sampled before the clear");
}

#[test]
fn an_empty_sample_is_waited_on_and_other_errors_reach_the_consumer() {
    let (shared, view) = probe(100);
    add(&shared, 0..100);
    let depth = 2;
    let p = PrefetchBuilder::new(4)
        .depth(depth)
        .spawn(shared.clone())
        .unwrap();
    assert_eq!(p.next().unwrap().len(), 4);
    // Sampling fails with Empty over and over (a clear racing the length
    // check): the thread retries and hands no error out. What was sampled
    // before may still come.
    view.set(Inject::Empty);
    let mut queued = 0;
    let mut drain = || {
        while let Some(b) = p.next_timeout(QUIET) {
            assert_eq!(b.expect("Empty is waited on, not handed out").len(), 4);
            queued += 1;
        }
    };
    drain();
    let n = view.samples();
    wait_until("the thread retries", || view.samples() >= n + 3);
    drain();
    assert!(queued <= depth + 1, "{queued} batches while sampling fails");

    // Any other error reaches the consumer, more times than the pool has
    // batches: the failed batches are recycled, and the thread goes on.
    view.set(Inject::Broken);
    for _ in 0..3 * (depth + 2) {
        match p.next_timeout(LIVENESS).expect("the error is delivered") {
            Err(Error::Unsupported(m)) => assert!(m.contains("injected")),
            Err(e) => panic!("unexpected error {e}"),
            // Sampled before the switch.
            Ok(b) => assert_eq!(b.len(), 4),
        }
    }
    view.set(Inject::Nothing);
    let mut ok = 0;
    for _ in 0..(depth + 1) + 10 {
        if let Ok(b) = p.next_timeout(LIVENESS).expect("not wedged") {
            checked_ids(&b);
            ok += 1;
        }
    }
    assert!(ok >= 10, "batches resume after errors ({ok})");
    drop(shared);
    drop_or_fail(p);
    assert!(view.dropped());
}

#[test]
fn a_zero_batch_size_is_rejected_at_spawn() {
    let shared = SharedReplay::new(buffer(10));
    let e = PrefetchBuilder::new(0).spawn(shared.clone()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Config {
                key: "batch_size",
                ..
            }
        ),
        "{e}"
    );
    // A depth of 0 is raised to 1 and works.
    add(&shared, 0..10);
    let p = PrefetchBuilder::new(2).depth(0).spawn(shared).unwrap();
    assert_eq!(p.next().unwrap().len(), 2);
}
