//! Behaviour of the coordinator through its public API, with test
//! components that record their calls and a heap gauge the tests control.

use crate::*;
use gm_core::{Pressure, Reclaim, ReclaimLevel, ReclaimTier};
use parking_lot::Mutex;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

// ---- a real heap gauge: live bytes allocated by *this thread* ----------
//
// Synchronous passes run on the caller's thread, so a per-thread counter
// sees exactly what a component's reclaim frees there, while other tests
// allocate in parallel on their own threads.

struct ThreadCounting;

thread_local! {
    static NET: Cell<i64> = const { Cell::new(0) };
}

fn count(delta: i64) {
    let _ = NET.try_with(|c| c.set(c.get() + delta));
}

// SAFETY: forwards every call to `System` unchanged and only adjusts a
// const-initialised thread-local counter (which never allocates).
unsafe impl GlobalAlloc for ThreadCounting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed through to System.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as i64));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

#[global_allocator]
static ALLOC: ThreadCounting = ThreadCounting;

fn thread_heap() -> u64 {
    (NET.with(|c| c.get()) + (1 << 40)) as u64
}

// ---- test components ------------------------------------------------------

type Log = Arc<Mutex<Vec<(String, ReclaimLevel)>>>;

/// Records each call; "holds" `holds` bytes of a gauge the test controls.
struct Probe {
    name: String,
    tier: ReclaimTier,
    log: Log,
    gauge: Arc<AtomicU64>,
    holds: AtomicU64,
    /// `Some(n)`: claims `n` and frees nothing (a liar).
    claim: Option<u64>,
    panics: bool,
    dropped: Option<Arc<AtomicBool>>,
}

impl Probe {
    fn new(name: &str, tier: ReclaimTier, log: &Log, gauge: &Arc<AtomicU64>) -> Self {
        Self {
            name: name.into(),
            tier,
            log: log.clone(),
            gauge: gauge.clone(),
            holds: AtomicU64::new(0),
            claim: None,
            panics: false,
            dropped: None,
        }
    }
    fn holding(self, bytes: u64) -> Self {
        self.gauge.fetch_add(bytes, Ordering::SeqCst);
        self.holds.store(bytes, Ordering::SeqCst);
        self
    }
    fn claiming(mut self, bytes: u64) -> Self {
        self.claim = Some(bytes);
        self
    }
    fn panicking(mut self) -> Self {
        self.panics = true;
        self
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Some(f) = &self.dropped {
            f.store(true, Ordering::SeqCst);
        }
    }
}

impl Reclaim for Probe {
    fn name(&self) -> &str {
        &self.name
    }
    fn tier(&self) -> ReclaimTier {
        self.tier
    }
    fn reclaimable_bytes(&self) -> u64 {
        self.holds.load(Ordering::SeqCst)
    }
    fn reclaim(&self, level: ReclaimLevel) -> u64 {
        self.log.lock().push((self.name.clone(), level));
        if self.panics {
            panic!("{} failed on purpose", self.name);
        }
        if let Some(c) = self.claim {
            return c;
        }
        let freed = self.holds.swap(0, Ordering::SeqCst);
        self.gauge.fetch_sub(freed, Ordering::SeqCst);
        freed
    }
}

/// Holds a real `Vec` and drops it on reclaim.
struct VecHolder {
    data: Mutex<Option<Vec<u8>>>,
}

impl Reclaim for VecHolder {
    fn name(&self) -> &str {
        "vec-holder"
    }
    fn tier(&self) -> ReclaimTier {
        ReclaimTier::Cache
    }
    fn reclaimable_bytes(&self) -> u64 {
        self.data.lock().as_ref().map_or(0, |v| v.capacity() as u64)
    }
    fn reclaim(&self, _: ReclaimLevel) -> u64 {
        self.data.lock().take().map_or(0, |v| v.capacity() as u64)
    }
}

// ---- helpers ----------------------------------------------------------------

/// No periodic passes, no pressure damping, trimming off (fast, and the
/// trim path has its own test binary).
fn quiet() -> Config {
    Config {
        period: None,
        trim_after_pass: false,
        history_len: 64,
        min_pressure_interval: Duration::ZERO,
    }
}

fn spawn_with_gauge(config: Config, gauge: &Arc<AtomicU64>) -> Handle {
    let g = gauge.clone();
    Builder::new()
        .config(config)
        .heap_gauge(move || g.load(Ordering::SeqCst))
        .spawn()
        .unwrap()
}

/// Liveness, not timing: fails only if `f` stays false for 30 s.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn names(log: &Log) -> Vec<String> {
    log.lock().iter().map(|(n, _)| n.clone()).collect()
}

fn four_tiers(log: &Log, gauge: &Arc<AtomicU64>) -> Vec<Arc<Probe>> {
    // Registered most expensive first, to show the order is the coordinator's.
    vec![
        Arc::new(Probe::new("state", ReclaimTier::State, log, gauge)),
        Arc::new(Probe::new(
            "compressible",
            ReclaimTier::Compressible,
            log,
            gauge,
        )),
        Arc::new(Probe::new("cache-a", ReclaimTier::Cache, log, gauge)),
        Arc::new(Probe::new("cache-b", ReclaimTier::Cache, log, gauge)),
    ]
}

// ---- tests ------------------------------------------------------------------

#[test]
fn tiers_are_visited_cheapest_first_and_emergency_asks_all_at_emergency() {
    let (log, gauge) = (Log::default(), Arc::new(AtomicU64::new(0)));
    let h = spawn_with_gauge(quiet(), &gauge);
    let comps = four_tiers(&log, &gauge);
    for c in &comps {
        h.register(c);
    }
    let r = h.emergency();
    assert_eq!(names(&log), ["cache-a", "cache-b", "compressible", "state"]);
    assert!(log
        .lock()
        .iter()
        .all(|(_, l)| *l == ReclaimLevel::Emergency));
    let tiers: Vec<_> = r.components.iter().map(|c| c.tier).collect();
    assert_eq!(
        tiers,
        [
            ReclaimTier::Cache,
            ReclaimTier::Cache,
            ReclaimTier::Compressible,
            ReclaimTier::State
        ]
    );
    assert_eq!(r.trigger, Trigger::Emergency);
    assert_eq!(r.trim, TrimOutcome::Disabled);
    assert_eq!(h.history().len(), 1);
}

#[test]
fn pressure_levels_follow_the_documented_plan() {
    let (log, gauge) = (Log::default(), Arc::new(AtomicU64::new(0)));
    let h = spawn_with_gauge(quiet(), &gauge);
    let comps = four_tiers(&log, &gauge);
    for c in &comps {
        h.register(c);
    }
    use ReclaimLevel::*;
    let cases = [
        (
            Pressure::Warning,
            vec![
                ("cache-a", Moderate),
                ("cache-b", Moderate),
                ("compressible", Moderate),
            ],
        ),
        (
            Pressure::Critical,
            vec![
                ("cache-a", Emergency),
                ("cache-b", Emergency),
                ("compressible", Emergency),
                ("state", Moderate),
            ],
        ),
        (
            Pressure::Exceeded,
            vec![
                ("cache-a", Emergency),
                ("cache-b", Emergency),
                ("compressible", Emergency),
                ("state", Emergency),
            ],
        ),
    ];
    for (i, (p, want)) in cases.into_iter().enumerate() {
        log.lock().clear();
        h.on_pressure(p).unwrap();
        wait_until("the pressure pass", || h.history().len() == i + 1);
        let got: Vec<(String, ReclaimLevel)> = log.lock().clone();
        let want: Vec<(String, ReclaimLevel)> =
            want.into_iter().map(|(n, l)| (n.to_owned(), l)).collect();
        assert_eq!(got, want, "{p:?}");
        assert_eq!(
            h.last_pass().unwrap().trigger,
            Trigger::for_pressure(p).unwrap()
        );
    }
    // Normal is not a signal: nothing is queued.
    h.on_pressure(Pressure::Normal).unwrap();
    assert_eq!(h.stats().signals_received, 3);
}

#[test]
fn a_liar_is_measured_at_zero_and_an_honest_component_exactly() {
    let (log, gauge) = (Log::default(), Arc::new(AtomicU64::new(100 * MIB)));
    let h = spawn_with_gauge(quiet(), &gauge);
    let liar = Arc::new(Probe::new("liar", ReclaimTier::Cache, &log, &gauge).claiming(10 * MIB));
    let honest = Arc::new(Probe::new("honest", ReclaimTier::Cache, &log, &gauge).holding(4 * MIB));
    h.register(&liar);
    h.register(&honest);
    let r = h.emergency();
    let (l, o) = (&r.components[0], &r.components[1]);
    assert_eq!((l.name.as_str(), l.claimed_bytes), ("liar", 10 * MIB));
    assert_eq!(l.heap_freed_bytes, Some(0));
    assert_eq!((o.name.as_str(), o.claimed_bytes), ("honest", 4 * MIB));
    assert_eq!(o.heap_freed_bytes, Some(4 * MIB as i64));
    assert_eq!(o.reclaimable_bytes, Some(4 * MIB));
    assert_eq!(r.claimed_bytes(), 14 * MIB);
    assert_eq!(r.heap_freed_bytes(), Some(4 * MIB as i64));
    assert_eq!(r.heap_before_bytes, Some(104 * MIB));
    if cfg!(target_os = "linux") {
        assert!(l.rss_anon_freed_bytes.is_some() && r.rss_before.is_some());
    }
}

#[test]
fn dropping_a_real_vec_shows_through_a_real_heap_gauge() {
    let h = Builder::new()
        .config(quiet())
        .heap_gauge(thread_heap)
        .spawn()
        .unwrap();
    let mut v = vec![0u8; 3 * MIB as usize + 12345];
    v[100] = 1; // used
    let cap = v.capacity() as u64;
    let holder = Arc::new(VecHolder {
        data: Mutex::new(Some(v)),
    });
    h.register(&holder);
    // Synchronous: the pass runs on this thread, where the Vec was allocated.
    let r = h.emergency();
    let c = &r.components[0];
    assert_eq!(c.claimed_bytes, cap);
    assert_eq!(c.heap_freed_bytes, Some(cap as i64), "{c:?}");
    assert!(holder.data.lock().is_none());
}

#[test]
fn a_panicking_component_is_reported_and_the_rest_still_run() {
    let (log, gauge) = (Log::default(), Arc::new(AtomicU64::new(0)));
    let h = spawn_with_gauge(quiet(), &gauge);
    let bad = Arc::new(Probe::new("bad", ReclaimTier::Cache, &log, &gauge).panicking());
    let good = Arc::new(Probe::new("good", ReclaimTier::Cache, &log, &gauge).holding(MIB));
    let later = Arc::new(Probe::new("later", ReclaimTier::Compressible, &log, &gauge));
    h.register(&bad);
    h.register(&good);
    h.register(&later);

    // On the coordinator thread.
    h.on_pressure(Pressure::Critical).unwrap();
    wait_until("the first pass", || h.history().len() == 1);
    let r = h.last_pass().unwrap();
    assert_eq!(names(&log), ["bad", "good", "later"]);
    let failed: Vec<_> = r.failures().map(|c| c.name.clone()).collect();
    assert_eq!(failed, ["bad"]);
    match &r.components[0].outcome {
        Outcome::Panicked { message } => assert!(message.contains("bad failed on purpose")),
        o => panic!("expected a panic, got {o:?}"),
    }
    assert_eq!(r.components[0].claimed_bytes, 0);
    assert_eq!(r.components[1].outcome, Outcome::Ok);
    assert_eq!(r.components[1].heap_freed_bytes, Some(MIB as i64));

    // The thread survived: it runs the next signal.
    h.on_pressure(Pressure::Exceeded).unwrap();
    wait_until("the second pass", || h.history().len() == 2);
    assert_eq!(h.last_pass().unwrap().trigger, Trigger::Exceeded);
    assert_eq!(h.stats().component_panics, 2);

    // And on the caller's thread.
    let r = h.emergency();
    assert_eq!(r.failures().count(), 1);
    assert_eq!(r.components.len(), 3);
}

#[test]
fn periodic_passes_fire_and_ask_only_caches_cheaply() {
    let (log, gauge) = (Log::default(), Arc::new(AtomicU64::new(0)));
    let config = Config {
        period: Some(Duration::from_millis(5)),
        ..quiet()
    };
    let h = spawn_with_gauge(config, &gauge);
    let comps = four_tiers(&log, &gauge);
    for c in &comps {
        h.register(c);
    }
    wait_until("three periodic passes", || {
        h.history()
            .iter()
            .filter(|r| r.trigger == Trigger::Periodic && r.components.len() == 2)
            .count()
            >= 3
    });
    let log = log.lock();
    assert!(log.len() >= 6);
    assert!(log
        .iter()
        .all(|(n, l)| n.starts_with("cache") && *l == ReclaimLevel::Cheap));
}

#[test]
fn drop_stops_and_joins_promptly_with_a_day_long_period() {
    let (log, gauge) = (Log::default(), Arc::new(AtomicU64::new(0)));
    let config = Config {
        period: Some(Duration::from_secs(86_400)),
        ..quiet()
    };
    let h = spawn_with_gauge(config, &gauge);
    let c = Arc::new(Probe::new("c", ReclaimTier::Cache, &log, &gauge));
    h.register(&c);
    let sink = h.pressure_sink();
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        drop(h);
        let _ = tx.send(());
    });
    // Liveness: a drop that waited for the period would take a day.
    rx.recv_timeout(Duration::from_secs(30))
        .expect("dropping the handle did not return");
    // The thread is gone: its receiver was dropped with it.
    match sink.on_pressure(Pressure::Critical) {
        Err(Error::Stopped(Trigger::Critical)) => {}
        other => panic!("expected Stopped, got {other:?}"),
    }
    assert!(log.lock().is_empty(), "no pass ran");
}

#[test]
fn a_dropped_component_disappears_and_is_not_kept_alive() {
    let (log, gauge) = (Log::default(), Arc::new(AtomicU64::new(0)));
    let h = spawn_with_gauge(quiet(), &gauge);
    let flag = Arc::new(AtomicBool::new(false));
    let mut gone = Probe::new("gone", ReclaimTier::Cache, &log, &gauge);
    gone.dropped = Some(flag.clone());
    let gone = Arc::new(gone);
    let stays = Arc::new(Probe::new("stays", ReclaimTier::State, &log, &gauge));
    let gone_id = h.register(&gone);
    let stays_id = h.register(&stays);
    assert_eq!(h.components().len(), 2);
    // Visited once, by a synchronous pass and by the thread: neither may
    // keep a reference behind.
    h.emergency();
    h.on_pressure(Pressure::Warning).unwrap();
    wait_until("the warning pass", || h.history().len() == 2);
    assert_eq!(names(&log), ["gone", "stays", "gone"]);
    log.lock().clear();

    drop(gone);
    assert!(flag.load(Ordering::SeqCst), "the registry kept it alive");
    let live = h.components();
    assert_eq!(live.len(), 1);
    assert_eq!((live[0].id, live[0].name.as_str()), (stays_id, "stays"));
    let r = h.emergency();
    assert_eq!(names(&log), ["stays"]);
    assert_eq!(r.components.len(), 1);
    assert!(!h.unregister(gone_id));

    // Explicit unregistering works too.
    assert!(h.unregister(stays_id));
    assert!(h.components().is_empty());
    assert!(h.emergency().components.is_empty());
    let dyn_c: Arc<dyn Reclaim> = stays;
    h.register_weak(Arc::downgrade(&dyn_c));
    assert_eq!(h.components().len(), 1);
}

#[test]
fn a_target_stops_the_pass_once_met() {
    let (log, gauge) = (Log::default(), Arc::new(AtomicU64::new(100 * MIB)));
    let h = spawn_with_gauge(quiet(), &gauge);
    let a = Arc::new(Probe::new("a", ReclaimTier::Cache, &log, &gauge).holding(4 * MIB));
    let b = Arc::new(Probe::new("b", ReclaimTier::Compressible, &log, &gauge).holding(4 * MIB));
    let c = Arc::new(Probe::new("c", ReclaimTier::State, &log, &gauge).holding(4 * MIB));
    for p in [&a, &b, &c] {
        h.register(p);
    }
    // 112 MiB now; freeing `a` gets below 110 MiB.
    let target = Target {
        metric: Metric::Heap,
        below_bytes: 110 * MIB,
    };
    let r = h.run_pass(Trigger::Emergency, Some(target)).unwrap();
    assert_eq!(names(&log), ["a"]);
    assert_eq!(r.target_reached, Some(true));
    assert_eq!(r.skipped_components, 2);

    // Already met: nothing is visited.
    log.lock().clear();
    let r = h.run_pass(Trigger::Emergency, Some(target)).unwrap();
    assert!(names(&log).is_empty());
    assert_eq!(r.skipped_components, 3);
    assert_eq!(r.target_reached, Some(true));

    // Out of reach: everything is visited, and the report says it missed.
    let far = Target {
        metric: Metric::Heap,
        below_bytes: MIB,
    };
    h.on_pressure_until(Pressure::Critical, far).unwrap();
    wait_until("the pressure pass", || h.history().len() == 3);
    let r = h.last_pass().unwrap();
    assert_eq!(names(&log), ["a", "b", "c"]);
    assert_eq!(r.target_reached, Some(false));
    assert_eq!(r.target, Some(far));

    // A heap target needs a heap gauge.
    let no_gauge = Builder::new().config(quiet()).spawn().unwrap();
    let e = no_gauge
        .on_pressure_until(Pressure::Warning, far)
        .unwrap_err();
    assert!(
        matches!(e, Error::Unmeasurable { metric: "heap", .. }),
        "{e}"
    );
    assert!(no_gauge.run_pass(Trigger::Warning, Some(far)).is_err());
}

#[test]
fn repeated_weaker_signals_are_damped_and_stronger_ones_run() {
    let (log, gauge) = (Log::default(), Arc::new(AtomicU64::new(0)));
    let config = Config {
        min_pressure_interval: Duration::from_secs(3600),
        ..quiet()
    };
    let h = spawn_with_gauge(config, &gauge);
    let c = Arc::new(Probe::new("c", ReclaimTier::Cache, &log, &gauge));
    h.register(&c);
    h.on_pressure(Pressure::Warning).unwrap();
    wait_until("the warning pass", || h.stats().passes == 1);
    h.on_pressure(Pressure::Warning).unwrap();
    wait_until("the repeat to be dropped", || {
        h.stats().signals_dropped == 1
    });
    h.on_pressure(Pressure::Critical).unwrap();
    wait_until("the critical pass", || h.stats().passes == 2);
    let triggers: Vec<_> = h.history().iter().map(|r| r.trigger).collect();
    assert_eq!(triggers, [Trigger::Warning, Trigger::Critical]);
    assert_eq!(h.stats().signals_received, 3);
}

#[test]
fn history_is_a_bounded_ring() {
    let gauge = Arc::new(AtomicU64::new(0));
    let config = Config {
        history_len: 3,
        ..quiet()
    };
    let h = spawn_with_gauge(config, &gauge);
    for _ in 0..5 {
        h.emergency();
    }
    let seqs: Vec<u64> = h.history().iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [3, 4, 5]);
    assert_eq!(h.stats().passes, 5);
}

#[test]
fn a_pass_report_round_trips_through_json() {
    let (log, gauge) = (Log::default(), Arc::new(AtomicU64::new(0)));
    let h = spawn_with_gauge(quiet(), &gauge);
    let bad = Arc::new(Probe::new("bad", ReclaimTier::Cache, &log, &gauge).panicking());
    let ok = Arc::new(Probe::new("ok", ReclaimTier::State, &log, &gauge).claiming(7));
    h.register(&bad);
    h.register(&ok);
    let r = h.emergency();
    let json = serde_json::to_string(&r).unwrap();
    for needle in [
        r#""trigger":"emergency""#,
        r#""tier":"cache""#,
        r#""level":"emergency""#,
        r#""status":"panicked""#,
        r#""claimed_bytes":7"#,
        r#""trim":"disabled""#,
    ] {
        assert!(json.contains(needle), "{needle} not in {json}");
    }
    let back: PassReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back, r);
}

#[test]
fn a_bad_config_is_refused_at_spawn() {
    let e = Builder::new()
        .config(Config {
            history_len: 0,
            ..Config::default()
        })
        .spawn()
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Config {
                key: "history_len",
                ..
            }
        ),
        "{e}"
    );
}
