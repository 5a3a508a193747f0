//! The coordinator: [`Builder`] → [`Handle`] (owns the thread that runs
//! periodic and pressure passes), [`PressureSink`] (a cheap cloneable way to
//! send pressure from another thread), and the pass itself.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::measure::{trim, Rss, RssReader, TrimOutcome};
use crate::registry::{Planned, Registry};
use crate::report::{
    ComponentId, ComponentInfo, ComponentReport, Metric, Outcome, PassReport, Stats, Target,
    Trigger, TIER_ORDER,
};
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use gm_core::{Pressure, Reclaim};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A function returning the live heap bytes of the process (for instance a
/// counting global allocator's "current" figure).
type HeapGauge = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Builds a coordinator; [`spawn`](Builder::spawn) starts its thread.
pub struct Builder {
    config: Config,
    heap_gauge: Option<HeapGauge>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("config", &self.config)
            .field("heap_gauge", &self.heap_gauge.is_some())
            .finish()
    }
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder {
    /// [`Config::default`], no heap gauge (RSS only).
    pub fn new() -> Self {
        Self {
            config: Config::default(),
            heap_gauge: None,
        }
    }

    /// Replaces the whole config (checked by [`spawn`](Builder::spawn)).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Measures the heap with `gauge` before and after each component's
    /// reclaim (gm-system passes gm-leak's counting allocator here; gm-gc
    /// cannot depend on it). Must be cheap and must not block on anything a
    /// reclaim may hold; a gauge that panics reads as "no figure".
    pub fn heap_gauge(mut self, gauge: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.heap_gauge = Some(Arc::new(gauge));
        self
    }

    /// Checks the config and starts the coordinator thread (`gm-gc`).
    pub fn spawn(self) -> Result<Handle> {
        self.config.validate()?;
        let rss = RssReader::new();
        let shared = Arc::new(Shared {
            rss_available: rss.available(),
            has_gauge: self.heap_gauge.is_some(),
            config: self.config,
            gauge: self.heap_gauge,
            registry: Mutex::new(Registry::default()),
            history: Mutex::new(VecDeque::new()),
            pass: Mutex::new(PassState { rss, seq: 0 }),
            stopping: AtomicBool::new(false),
            stats: Mutex::new(Stats::default()),
            last_strong: Mutex::new(None),
        });
        let (tx, rx) = unbounded();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("gm-gc".into())
            .spawn(move || run(&thread_shared, &rx))
            .map_err(Error::Spawn)?;
        let sink = PressureSink {
            tx,
            shared: Arc::clone(&shared),
        };
        Ok(Handle {
            shared,
            sink,
            thread: Some(thread),
        })
    }
}

/// Owns the coordinator thread. Dropping it stops and joins the thread
/// promptly, whatever the period: it waits only for a component reclaim
/// that is running at that moment (the rest of that pass is skipped).
///
/// All methods take `&self`; share the handle in an `Arc`, or hand a
/// [`PressureSink`] to the thread that raises pressure.
///
/// A component's `reclaim` must not call back into this handle's
/// synchronous passes ([`emergency`](Handle::emergency),
/// [`run_pass`](Handle::run_pass)): passes are serialized, so that would
/// deadlock. Registering and sending pressure from a reclaim are fine.
#[derive(Debug)]
pub struct Handle {
    shared: Arc<Shared>,
    sink: PressureSink,
    thread: Option<JoinHandle<()>>,
}

impl Handle {
    /// Registers a component. The registry holds only a [`Weak`]
    /// reference: it never keeps the component alive, and once the last
    /// `Arc` is dropped the component disappears from the registry and from
    /// every later pass.
    pub fn register<R: Reclaim + 'static>(&self, component: &Arc<R>) -> ComponentId {
        let weak: Weak<dyn Reclaim> = Arc::downgrade(component) as Weak<dyn Reclaim>;
        self.register_weak(weak)
    }

    /// Registers a component given as a `Weak<dyn Reclaim>` (for an
    /// `Arc<dyn Reclaim>`: `register_weak(Arc::downgrade(&c))`).
    pub fn register_weak(&self, component: Weak<dyn Reclaim>) -> ComponentId {
        self.shared.registry.lock().register(component)
    }

    /// Forgets a component; `false` if it was not registered (or already
    /// dropped).
    pub fn unregister(&self, id: ComponentId) -> bool {
        self.shared.registry.lock().unregister(id)
    }

    /// The live registered components, in registration order (dropped ones
    /// are pruned here).
    pub fn components(&self) -> Vec<ComponentInfo> {
        let snapshot = self.shared.registry.lock().snapshot();
        Registry::describe(&snapshot)
    }

    /// Asks the coordinator thread for a pass for `pressure` (the table on
    /// [`Trigger`]) and returns at once; `Normal` does nothing. See
    /// [`PressureSink::on_pressure`].
    pub fn on_pressure(&self, pressure: Pressure) -> Result<()> {
        self.sink.on_pressure(pressure)
    }

    /// Like [`on_pressure`](Handle::on_pressure), stopping the pass once
    /// `target` is met.
    pub fn on_pressure_until(&self, pressure: Pressure, target: Target) -> Result<()> {
        self.sink.on_pressure_until(pressure, target)
    }

    /// A cloneable sender of pressure signals to this coordinator, for the
    /// thread that watches memory (the monitor's alert callback).
    pub fn pressure_sink(&self) -> PressureSink {
        self.sink.clone()
    }

    /// Emergency cleanup, synchronously on the calling thread: every tier
    /// at [`ReclaimLevel::Emergency`](gm_core::ReclaimLevel::Emergency),
    /// then a trim (if enabled). Waits for a pass in progress to finish
    /// first. Returns the pass report (also kept in the history).
    pub fn emergency(&self) -> PassReport {
        self.shared.pass(Trigger::Emergency, None, 0)
    }

    /// Runs a pass for `trigger` synchronously on the calling thread,
    /// stopping once `target` (if any) is met. Errors only if the target
    /// cannot be measured (see [`Error::Unmeasurable`]).
    pub fn run_pass(&self, trigger: Trigger, target: Option<Target>) -> Result<PassReport> {
        if let Some(t) = target {
            self.shared.check_target(t)?;
        }
        Ok(self.shared.pass(trigger, target, 0))
    }

    /// The kept pass reports, oldest first (at most
    /// [`Config::history_len`]).
    pub fn history(&self) -> Vec<PassReport> {
        self.shared.history.lock().iter().cloned().collect()
    }

    /// The newest pass report.
    pub fn last_pass(&self) -> Option<PassReport> {
        self.shared.history.lock().back().cloned()
    }

    /// Counters since the start.
    pub fn stats(&self) -> Stats {
        *self.shared.stats.lock()
    }

    /// The config in force.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Sinks may still hold senders, so a message (not a disconnect)
        // wakes the thread; it fails only if the thread is already gone.
        let _ = self.sink.tx.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(target: "gm_gc", "the gm-gc coordinator thread panicked");
            }
        }
    }
}

/// Sends pressure signals to a coordinator; cheap to clone, `Send + Sync`.
/// Signals after the [`Handle`] is dropped return [`Error::Stopped`].
#[derive(Debug, Clone)]
pub struct PressureSink {
    tx: Sender<Cmd>,
    shared: Arc<Shared>,
}

impl PressureSink {
    /// Queues a pass for `pressure` on the coordinator thread and returns
    /// at once. `Normal` does nothing. Signals that queue up while a pass
    /// runs are merged into one pass of the strongest; a signal no stronger
    /// than a pass that ran less than
    /// [`Config::min_pressure_interval`] ago is dropped.
    pub fn on_pressure(&self, pressure: Pressure) -> Result<()> {
        self.send(pressure, None)
    }

    /// Like [`on_pressure`](PressureSink::on_pressure), stopping the pass
    /// once `target` is met; errors at once if the target cannot be
    /// measured.
    pub fn on_pressure_until(&self, pressure: Pressure, target: Target) -> Result<()> {
        self.shared.check_target(target)?;
        self.send(pressure, Some(target))
    }

    fn send(&self, pressure: Pressure, target: Option<Target>) -> Result<()> {
        let Some(trigger) = Trigger::for_pressure(pressure) else {
            return Ok(());
        };
        self.tx
            .send(Cmd::Pressure { trigger, target })
            .map_err(|_| Error::Stopped(trigger))?;
        self.shared.stats.lock().signals_received += 1;
        Ok(())
    }
}

enum Cmd {
    Pressure {
        trigger: Trigger,
        target: Option<Target>,
    },
    Stop,
}

/// State shared by the handle, its sinks and the thread.
struct Shared {
    config: Config,
    gauge: Option<HeapGauge>,
    has_gauge: bool,
    rss_available: bool,
    registry: Mutex<Registry>,
    history: Mutex<VecDeque<PassReport>>,
    /// Held for a whole pass: passes never overlap, so their measurements
    /// do not mix.
    pass: Mutex<PassState>,
    stopping: AtomicBool,
    stats: Mutex<Stats>,
    /// The last non-periodic pass: its trigger and when it ended.
    last_strong: Mutex<Option<(Trigger, Instant)>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("heap_gauge", &self.has_gauge)
            .field("rss_available", &self.rss_available)
            .finish_non_exhaustive()
    }
}

struct PassState {
    rss: RssReader,
    seq: u64,
}

/// The coordinator thread: periodic passes on a deadline, pressure passes
/// on message, exit on `Stop`.
fn run(shared: &Shared, rx: &Receiver<Cmd>) {
    let period = shared.config.period;
    let mut next_periodic = period.map(|p| Instant::now() + p);
    loop {
        let msg = match next_periodic {
            Some(at) => rx.recv_deadline(at),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match msg {
            Err(RecvTimeoutError::Timeout) => {
                shared.pass(Trigger::Periodic, None, 0);
                next_periodic = period.map(|p| Instant::now() + p);
            }
            Err(RecvTimeoutError::Disconnected) | Ok(Cmd::Stop) => return,
            Ok(Cmd::Pressure { trigger, target }) => {
                // Fold everything already queued into one pass of the
                // strongest (the latest of equals wins, with its target).
                let (mut trigger, mut target, mut merged) = (trigger, target, 1u32);
                loop {
                    match rx.try_recv() {
                        Ok(Cmd::Pressure {
                            trigger: t,
                            target: tg,
                        }) => {
                            merged += 1;
                            if t >= trigger {
                                trigger = t;
                                target = tg;
                            }
                        }
                        Ok(Cmd::Stop) => return,
                        Err(_) => break,
                    }
                }
                if merged > 1 {
                    shared.stats.lock().signals_merged += u64::from(merged);
                }
                if shared.damped(trigger) {
                    shared.stats.lock().signals_dropped += u64::from(merged);
                    tracing::debug!(target: "gm_gc", ?trigger, merged, "pressure signal dropped (min_pressure_interval)");
                    continue;
                }
                shared.pass(trigger, target, merged);
            }
        }
    }
}

/// Runs `f`, turning a panic into `Err(message)`.
fn guarded<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        if let Some(s) = p.downcast_ref::<&str>() {
            (*s).to_owned()
        } else if let Some(s) = p.downcast_ref::<String>() {
            s.clone()
        } else {
            "panic with a non-string payload".to_owned()
        }
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn freed(before: Option<u64>, after: Option<u64>) -> Option<i64> {
    Some(before? as i64 - after? as i64)
}

fn merge_trim(acc: TrimOutcome, new: TrimOutcome) -> TrimOutcome {
    match (acc, new) {
        (TrimOutcome::Released, _) | (_, TrimOutcome::Released) => TrimOutcome::Released,
        (_, n) => n,
    }
}

impl Shared {
    fn check_target(&self, t: Target) -> Result<()> {
        match t.metric {
            Metric::Heap if !self.has_gauge => Err(Error::Unmeasurable {
                metric: t.metric.label(),
                reason: "no heap gauge: give one to Builder::heap_gauge or target an RSS metric",
            }),
            Metric::Rss | Metric::RssAnon if !self.rss_available => Err(Error::Unmeasurable {
                metric: t.metric.label(),
                reason: "/proc/self/statm cannot be read on this system: target Metric::Heap",
            }),
            _ => Ok(()),
        }
    }

    /// Whether a pressure pass for `trigger` should be dropped because a
    /// pass at least as strong ended less than `min_pressure_interval` ago.
    fn damped(&self, trigger: Trigger) -> bool {
        let min = self.config.min_pressure_interval;
        match *self.last_strong.lock() {
            Some((t, at)) => trigger <= t && at.elapsed() < min,
            None => false,
        }
    }

    fn heap(&self) -> Option<u64> {
        let g = self.gauge.as_ref()?;
        guarded(|| g()).ok()
    }

    /// Measures `target`'s metric (trimming first for RSS metrics when
    /// trimming is on) and says whether it is met.
    fn target_met(&self, st: &PassState, t: Target, trim_state: &mut (TrimOutcome, u32)) -> bool {
        let value = match t.metric {
            Metric::Heap => self.heap(),
            Metric::Rss | Metric::RssAnon => {
                if self.config.trim_after_pass {
                    trim_state.0 = merge_trim(trim_state.0, trim());
                    trim_state.1 += 1;
                }
                st.rss.read().map(|r| {
                    if t.metric == Metric::Rss {
                        r.resident_bytes
                    } else {
                        r.anon_bytes
                    }
                })
            }
        };
        value.is_some_and(|v| v < t.below_bytes)
    }

    /// One pass: visit the plan's tiers cheapest first, measure each
    /// component, trim, record.
    fn pass(&self, trigger: Trigger, target: Option<Target>, signals_merged: u32) -> PassReport {
        let mut st = self.pass.lock();
        st.seq += 1;
        let seq = st.seq;
        let started = Instant::now();
        let started_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));

        // Who to visit, in order: tier (cheapest first), then registration.
        let snapshot = self.registry.lock().snapshot();
        let mut planned: Vec<Planned> = Vec::with_capacity(snapshot.len());
        for (id, weak) in snapshot {
            let Some(c) = weak.upgrade() else { continue };
            match guarded(|| c.tier()) {
                Ok(tier) if trigger.level_for(tier).is_some() => planned.push((id, weak, tier)),
                Ok(_) => {}
                Err(msg) => {
                    tracing::error!(target: "gm_gc", ?id, %msg, "Reclaim::tier panicked; component skipped");
                }
            }
        }
        planned.sort_by_key(|(_, _, tier)| TIER_ORDER.iter().position(|t| t == tier));

        let rss_before = st.rss.read();
        let heap_before = self.heap();
        let mut trim_state = (TrimOutcome::Disabled, 0u32);
        let mut target_reached = None;
        let mut interrupted = false;
        let mut skipped = 0;
        let mut components = Vec::with_capacity(planned.len());
        let mut panics = 0u64;
        let total = planned.len();

        for (i, (id, weak, tier)) in planned.into_iter().enumerate() {
            if self.stopping.load(Ordering::SeqCst) {
                interrupted = true;
                skipped = total - i;
                break;
            }
            if let Some(t) = target {
                if self.target_met(&st, t, &mut trim_state) {
                    target_reached = Some(true);
                    skipped = total - i;
                    break;
                }
            }
            let Some(c) = weak.upgrade() else { continue };
            let level = trigger.level_for(tier).expect("planned tiers have a level");
            let name = guarded(|| c.name().to_owned()).unwrap_or_else(|_| format!("<{id:?}>"));
            let reclaimable_bytes = guarded(|| c.reclaimable_bytes()).ok();

            let heap0 = self.heap();
            let rss0 = st.rss.read();
            let t0 = Instant::now();
            let result = guarded(|| c.reclaim(level));
            let duration_us = micros(t0.elapsed());
            // Our reference goes first: if the owner let go meanwhile,
            // dropping the component is part of what this reclaim freed.
            drop(c);
            let rss1 = st.rss.read();
            let heap1 = self.heap();

            let (claimed_bytes, outcome) = match result {
                Ok(n) => (n, Outcome::Ok),
                Err(message) => {
                    panics += 1;
                    tracing::error!(target: "gm_gc", component = %name, ?level, %message, "reclaim panicked; continuing with the next component");
                    (0, Outcome::Panicked { message })
                }
            };
            let report = ComponentReport {
                id,
                name,
                tier,
                level,
                reclaimable_bytes,
                claimed_bytes,
                heap_freed_bytes: freed(heap0, heap1),
                rss_anon_freed_bytes: freed(rss0.map(|r| r.anon_bytes), rss1.map(|r| r.anon_bytes)),
                duration_us,
                outcome,
            };
            tracing::debug!(target: "gm_gc", component = %report.name, ?level, claimed = report.claimed_bytes, heap_freed = ?report.heap_freed_bytes, rss_anon_freed = ?report.rss_anon_freed_bytes, "reclaimed");
            components.push(report);
        }

        let heap_after = self.heap();
        let rss_after_reclaim = st.rss.read();
        let mut rss_after_trim: Option<Rss> = None;
        if self.config.trim_after_pass {
            trim_state.0 = merge_trim(trim_state.0, trim());
            trim_state.1 += 1;
            rss_after_trim = st.rss.read();
        }
        if let (Some(t), None) = (target, target_reached) {
            let now = match t.metric {
                Metric::Heap => heap_after,
                Metric::Rss => rss_after_trim
                    .or(rss_after_reclaim)
                    .map(|r| r.resident_bytes),
                Metric::RssAnon => rss_after_trim.or(rss_after_reclaim).map(|r| r.anon_bytes),
            };
            target_reached = Some(now.is_some_and(|v| v < t.below_bytes));
        }

        let report = PassReport {
            seq,
            trigger,
            target,
            target_reached,
            signals_merged,
            started_unix_ms,
            duration_us: micros(started.elapsed()),
            components,
            skipped_components: skipped,
            interrupted,
            heap_before_bytes: heap_before,
            heap_after_bytes: heap_after,
            rss_before,
            rss_after_reclaim,
            rss_after_trim,
            trim: trim_state.0,
            trim_calls: trim_state.1,
        };
        drop(st);

        if trigger == Trigger::Periodic {
            tracing::debug!(target: "gm_gc", seq, ?trigger, components = report.components.len(), claimed = report.claimed_bytes(), heap_freed = ?report.heap_freed_bytes(), rss_anon_freed = ?report.rss_anon_freed_bytes(), trim = ?report.trim, "reclaim pass");
        } else {
            tracing::info!(target: "gm_gc", seq, ?trigger, components = report.components.len(), claimed = report.claimed_bytes(), heap_freed = ?report.heap_freed_bytes(), rss_anon_freed = ?report.rss_anon_freed_bytes(), trim = ?report.trim, target_reached = ?report.target_reached, "reclaim pass");
            *self.last_strong.lock() = Some((trigger, Instant::now()));
        }
        {
            let mut s = self.stats.lock();
            s.passes += 1;
            s.component_panics += panics;
        }
        {
            let mut h = self.history.lock();
            h.push_back(report.clone());
            while h.len() > self.config.history_len {
                h.pop_front();
            }
        }
        report
    }
}
