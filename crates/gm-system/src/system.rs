//! [`MemoryOptimizationSystem`]: the monitor (gm-monitor), the reclaimer
//! (gm-gc) and the leak watch (gm-leak) running together under one budget,
//! with the reactions that turn alerts into actions.
//!
//! # Lifecycle
//! [`MemoryOptimizationSystem::start`] starts the reclaimer thread, the
//! monitor's sampler thread (and its HTTP thread with a Prometheus port)
//! and the leak-watch thread, and turns allocation-site sampling on when
//! profiling is configured. The system is the guard: dropping it stops and
//! joins every thread it started (monitor first, so no alert arrives at a
//! stopped reclaimer) and turns sampling off again if it turned it on.
//!
//! # Reactions (on the monitor's sampler thread, then the callbacks)
//! | alert | action |
//! |---|---|
//! | warning | a reclaim pass of the cheap tiers: caches, and compression of cold replay data (gm-gc's `Warning` trigger) |
//! | critical, exceeded | an emergency pass of every tier (gm-gc's `Exceeded` trigger), and the recommended batch is halved (not below `min_batch`) |
//! | recovered | nothing |
//!
//! Every alert is recorded with the action taken; [`report`](MemoryOptimizationSystem::report)
//! lists them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gm_buffers::{PrioritizedReplayBuffer, SharedReplay};
use gm_core::Pressure;
use gm_gc::PassReport;
use gm_monitor::{Alert, AlertLevel, MonitorHandle};
use parking_lot::Mutex;
use serde::Serialize;

use crate::config::{MemoryOptimizationConfig, TrainingMemoryConfig};
use crate::error::Result;
use crate::leakwatch::{LeakStatus, LeakWatch};
use crate::proc::ProcMemory;
use crate::report::{self, SystemReport};

/// An alert callback.
pub type AlertCallback = Arc<dyn Fn(&Alert) + Send + Sync>;

/// Alerts kept for the report (oldest dropped first).
const ALERTS_KEPT: usize = 256;

/// One alert and what the system did about it.
#[derive(Debug, Clone, Serialize)]
pub struct AlertRecord {
    /// Milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// Seconds since the system started.
    pub elapsed_secs: f64,
    /// `warning`, `critical`, `exceeded` or `recovered`.
    pub level: String,
    /// The measured value (RSS), bytes.
    pub value_bytes: u64,
    /// The limit, bytes.
    pub limit_bytes: u64,
    /// What the system did.
    pub action: String,
}

/// What [`MemoryOptimizationSystem::emergency_memory_cleanup`] freed, per
/// component, measured.
#[derive(Debug, Clone, Serialize)]
pub struct CleanupReport {
    /// Per component: name, what it claimed, the heap and resident
    /// anonymous memory measured before minus after its reclaim.
    pub components: Vec<ComponentFreed>,
    /// Heap gauge drop over the whole pass (bytes; negative = grew).
    pub heap_freed_bytes: Option<i64>,
    /// Resident anonymous memory drop over the pass, trim included.
    pub rss_anon_freed_bytes: Option<i64>,
    /// The part of it that `malloc_trim` released.
    pub trim_freed_bytes: Option<i64>,
    /// The full gm-gc pass report.
    pub pass: PassReport,
}

/// One component's part of a cleanup.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentFreed {
    /// The component.
    pub name: String,
    /// Bytes it said it freed.
    pub claimed_bytes: u64,
    /// Heap gauge before minus after its reclaim.
    pub heap_freed_bytes: Option<i64>,
    /// Resident anonymous memory before minus after its reclaim.
    pub rss_anon_freed_bytes: Option<i64>,
}

impl CleanupReport {
    fn from_pass(pass: PassReport) -> Self {
        Self {
            components: pass
                .components
                .iter()
                .map(|c| ComponentFreed {
                    name: c.name.clone(),
                    claimed_bytes: c.claimed_bytes,
                    heap_freed_bytes: c.heap_freed_bytes,
                    rss_anon_freed_bytes: c.rss_anon_freed_bytes,
                })
                .collect(),
            heap_freed_bytes: pass.heap_freed_bytes(),
            rss_anon_freed_bytes: pass.rss_anon_freed_bytes(),
            trim_freed_bytes: pass.trim_freed_bytes(),
            pass,
        }
    }
}

/// A named byte gauge the caller sets (model parameters, optimizer state,
/// the last step's activation peak); the monitor samples it and the report
/// lists it.
#[derive(Debug, Clone)]
pub struct ComponentGauge(Arc<AtomicU64>);

impl ComponentGauge {
    /// Sets the component's bytes.
    pub fn set(&self, bytes: u64) {
        self.0.store(bytes, Ordering::Relaxed);
    }

    /// The component's bytes.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

type ReplayHandle = SharedReplay<PrioritizedReplayBuffer>;

pub(crate) struct Shared {
    pub(crate) memory: MemoryOptimizationConfig,
    pub(crate) training: TrainingMemoryConfig,
    started: Instant,
    callbacks: Mutex<Vec<AlertCallback>>,
    alerts: Mutex<Vec<AlertRecord>>,
    alerts_total: AtomicU64,
    /// The recommended batch (0: none chosen yet).
    batch: AtomicUsize,
    shrinks: AtomicU64,
    gauges: Mutex<BTreeMap<String, ComponentGauge>>,
    replays: Mutex<Vec<(String, Arc<ReplayHandle>)>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("memory", &self.memory)
            .field("training", &self.training)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn on_alert(&self, alert: &Alert, sink: &gm_gc::PressureSink) {
        let action = match alert.level {
            AlertLevel::Warning => match sink.on_pressure(Pressure::Warning) {
                Ok(()) => {
                    "reclaim pass of caches and compressible data (cold replay chunks compressed)"
                        .to_string()
                }
                Err(e) => format!("reclaim pass not queued: {e}"),
            },
            AlertLevel::Critical | AlertLevel::Exceeded => {
                let pass = match sink.on_pressure(Pressure::Exceeded) {
                    Ok(()) => "emergency reclaim pass of every tier".to_string(),
                    Err(e) => format!("emergency pass not queued: {e}"),
                };
                match self.shrink_batch() {
                    Some((from, to)) => format!("{pass}; batch {from} -> {to}"),
                    None => format!("{pass}; batch already at its minimum or not chosen"),
                }
            }
            AlertLevel::Recovered => "none".to_string(),
        };
        let rec = AlertRecord {
            at_unix_ms: alert
                .at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            elapsed_secs: self.started.elapsed().as_secs_f64(),
            level: alert.level.name().to_string(),
            value_bytes: alert.value_bytes,
            limit_bytes: alert.budget.limit_bytes,
            action,
        };
        {
            let mut a = self.alerts.lock();
            if a.len() == ALERTS_KEPT {
                a.remove(0);
            }
            a.push(rec);
        }
        self.alerts_total.fetch_add(1, Ordering::Relaxed);
        let callbacks: Vec<AlertCallback> = self.callbacks.lock().clone();
        for cb in callbacks {
            cb(alert);
        }
    }

    /// Halves the recommended batch (multiple of 8, not below `min_batch`).
    fn shrink_batch(&self) -> Option<(usize, usize)> {
        let min = self.training.min_batch;
        let mut cur = self.batch.load(Ordering::Acquire);
        loop {
            if cur == 0 || cur <= min {
                return None;
            }
            let next = (cur / 2 / 8 * 8).max(min);
            match self
                .batch
                .compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.shrinks.fetch_add(1, Ordering::Relaxed);
                    return Some((cur, next));
                }
                Err(now) => cur = now,
            }
        }
    }
}

/// Options that are not configuration values.
#[derive(Debug, Clone, Default)]
pub struct SystemOptions {
    /// Append the monitor's samples as JSON lines to this file.
    pub monitor_jsonl: Option<PathBuf>,
    /// Serve Prometheus metrics on `127.0.0.1:PORT` (0: a free port).
    pub prometheus_port: Option<u16>,
}

/// The memory optimization system; see the module docs. Dropping it stops
/// and joins its threads.
pub struct MemoryOptimizationSystem {
    shared: Arc<Shared>,
    monitor: Option<MonitorHandle>,
    leak: Option<LeakWatch>,
    gc: Option<gm_gc::Handle>,
    sampling_enabled_here: bool,
}

impl std::fmt::Debug for MemoryOptimizationSystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryOptimizationSystem")
            .field("shared", &self.shared)
            .field("leak", &self.leak)
            .field("sampling_enabled_here", &self.sampling_enabled_here)
            .finish_non_exhaustive()
    }
}

fn heap_now() -> u64 {
    gm_leak::stats().current_bytes
}

impl MemoryOptimizationSystem {
    /// Starts the system with default options.
    pub fn start(memory: MemoryOptimizationConfig, training: TrainingMemoryConfig) -> Result<Self> {
        Self::start_with(memory, training, SystemOptions::default())
    }

    /// Starts the reclaimer, the monitor and the leak watch (see the module
    /// docs).
    pub fn start_with(
        memory: MemoryOptimizationConfig,
        training: TrainingMemoryConfig,
        options: SystemOptions,
    ) -> Result<Self> {
        memory
            .budget()
            .validate()
            .map_err(|e| crate::Error::Config {
                key: "memory".into(),
                value: format!("{:?}", memory.budget()),
                origin: "the system's configuration".into(),
                allowed: e.to_string(),
            })?;
        let tracking = gm_leak::is_active();
        let shared = Arc::new(Shared {
            memory: memory.clone(),
            training,
            started: Instant::now(),
            callbacks: Mutex::new(Vec::new()),
            alerts: Mutex::new(Vec::new()),
            alerts_total: AtomicU64::new(0),
            batch: AtomicUsize::new(0),
            shrinks: AtomicU64::new(0),
            gauges: Mutex::new(BTreeMap::new()),
            replays: Mutex::new(Vec::new()),
        });
        let mut gc_builder = gm_gc::Builder::new().config(gm_gc::Config {
            period: Some(memory.reclaim_interval),
            ..gm_gc::Config::default()
        });
        if tracking {
            gc_builder = gc_builder.heap_gauge(heap_now);
        }
        let gc = gc_builder.spawn()?;
        let sink = gc.pressure_sink();
        let mut mb = gm_monitor::Monitor::builder()
            .interval(memory.monitor_interval)
            .budget(memory.budget())
            .gpu_device(None);
        if tracking {
            mb = mb.heap_gauge(heap_now);
        }
        if let Some(p) = &options.monitor_jsonl {
            mb = mb.jsonl(p);
        }
        if let Some(port) = options.prometheus_port {
            mb = mb.prometheus_port(port);
        }
        let weak = Arc::downgrade(&shared);
        mb = mb.on_alert(move |a| {
            if let Some(s) = weak.upgrade() {
                s.on_alert(a, &sink);
            }
        });
        let monitor = mb.spawn()?;
        let mut sampling_enabled_here = false;
        if tracking && memory.profile_allocation_sites && !gm_leak::sampling_enabled() {
            sampling_enabled_here =
                gm_leak::enable_sampling(gm_leak::SamplingConfig::default()).is_ok();
        }
        let leak = if tracking {
            Some(LeakWatch::spawn(
                memory.leak_check_interval,
                memory.profile_allocation_sites,
            )?)
        } else {
            None
        };
        Ok(Self {
            shared,
            monitor: Some(monitor),
            leak,
            gc: Some(gc),
            sampling_enabled_here,
        })
    }

    /// The memory configuration.
    pub fn memory_config(&self) -> &MemoryOptimizationConfig {
        &self.shared.memory
    }

    /// The training configuration.
    pub fn training_config(&self) -> &TrainingMemoryConfig {
        &self.shared.training
    }

    /// Adds a callback that runs on every alert, after the built-in
    /// reactions (on the monitor's sampler thread: keep it quick).
    pub fn add_alert_callback(&self, f: impl Fn(&Alert) + Send + Sync + 'static) {
        self.shared.callbacks.lock().push(Arc::new(f));
    }

    /// The monitor.
    pub fn monitor(&self) -> &gm_monitor::Monitor {
        self.monitor
            .as_ref()
            .expect("the monitor lives as long as the system")
            .monitor()
    }

    /// The reclaimer.
    pub fn reclaimer(&self) -> &gm_gc::Handle {
        self.gc
            .as_ref()
            .expect("the reclaimer lives as long as the system")
    }

    /// The Prometheus endpoint's address, when one was asked for.
    pub fn prometheus_addr(&self) -> Option<SocketAddr> {
        self.monitor.as_ref().and_then(|m| m.prometheus_addr())
    }

    /// Takes one monitor sample now (alerts and reactions included) and
    /// returns the measured value (RSS), if any.
    pub fn sample_now(&self) -> Option<u64> {
        self.monitor().sample_now().measured_bytes
    }

    /// A replay buffer the reclaimer may compress (and release) and the
    /// monitor samples, under `name`. The system keeps the handle until it
    /// is dropped.
    pub fn register_replay(&self, name: &str, replay: &ReplayHandle) -> Result<()> {
        let r = replay.clone();
        self.monitor()
            .register_gauge(name, move || r.read().memory_usage_resident())?;
        // The registry holds a Weak: the system keeps the Arc alive.
        let arc = Arc::new(replay.clone());
        self.reclaimer().register(&arc);
        self.shared.replays.lock().push((name.to_string(), arc));
        Ok(())
    }

    /// A gauge the caller sets, sampled by the monitor and listed in the
    /// report under `name`.
    pub fn gauge(&self, name: &str) -> Result<ComponentGauge> {
        if let Some(g) = self.shared.gauges.lock().get(name) {
            return Ok(g.clone());
        }
        let g = ComponentGauge(Arc::new(AtomicU64::new(0)));
        let g2 = g.clone();
        self.monitor().register_gauge(name, move || g2.get())?;
        self.shared
            .gauges
            .lock()
            .insert(name.to_string(), g.clone());
        Ok(g)
    }

    /// Sets the recommended batch (what the batch shrink halves).
    pub fn set_batch(&self, batch: usize) {
        self.shared.batch.store(batch, Ordering::Release);
    }

    /// The recommended batch (0 before one is set) and how often a
    /// critical alert shrank it.
    pub fn batch(&self) -> (usize, u64) {
        (
            self.shared.batch.load(Ordering::Acquire),
            self.shared.shrinks.load(Ordering::Relaxed),
        )
    }

    /// Runs every tier of every registered component at `Emergency` now,
    /// trims the heap, and returns what each freed, measured.
    pub fn emergency_memory_cleanup(&self) -> CleanupReport {
        CleanupReport::from_pass(self.reclaimer().emergency())
    }

    /// The alerts so far (the last 256) and their total count.
    pub fn alerts(&self) -> (Vec<AlertRecord>, u64) {
        (
            self.shared.alerts.lock().clone(),
            self.shared.alerts_total.load(Ordering::Relaxed),
        )
    }

    /// The leak watch's findings (`None` without the tracking allocator).
    pub fn leak_status(&self) -> Option<LeakStatus> {
        self.leak.as_ref().map(|l| l.status())
    }

    /// Per-component memory now: the registered replay buffers and gauges.
    pub fn components(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .shared
            .replays
            .lock()
            .iter()
            .map(|(n, r)| (n.clone(), r.read().memory_usage_resident()))
            .collect();
        out.extend(
            self.shared
                .gauges
                .lock()
                .iter()
                .map(|(n, g)| (n.clone(), g.get())),
        );
        out
    }

    /// Compression figures of the registered replay buffers: (name, raw
    /// bytes of compressed chunks, their compressed bytes).
    pub fn replay_compression(&self) -> Vec<(String, u64, u64, usize)> {
        self.shared
            .replays
            .lock()
            .iter()
            .map(|(n, r)| {
                let s = r.stats();
                (
                    n.clone(),
                    s.compressed_raw_bytes,
                    s.compressed_bytes,
                    s.compressed_chunks,
                )
            })
            .collect()
    }

    /// The report: per-component memory, alerts, leak verdict, reclaim
    /// history and recommendations derived from the measurements.
    pub fn report(&self) -> SystemReport {
        let proc = ProcMemory::read();
        let heap = gm_leak::is_active().then(gm_leak::stats);
        let (alerts, alerts_total) = self.alerts();
        let history = self.reclaimer().history();
        let gc_stats = self.reclaimer().stats();
        let monitor_stats = self.monitor().stats();
        report::build(report::Inputs {
            generated_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            uptime: self.shared.started.elapsed(),
            memory: &self.shared.memory,
            training: &self.shared.training,
            proc,
            heap,
            components: self.components(),
            compression: self.replay_compression(),
            alerts,
            alerts_total,
            leak: self.leak_status(),
            reclaim: history,
            gc_stats,
            monitor_samples: monitor_stats.samples,
            batch: self.batch(),
        })
    }

    /// The time since the system started.
    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }
}

impl Drop for MemoryOptimizationSystem {
    fn drop(&mut self) {
        // Monitor first: no alert may reach a stopped reclaimer.
        drop(self.monitor.take());
        drop(self.leak.take());
        drop(self.gc.take());
        if self.sampling_enabled_here {
            gm_leak::disable_sampling();
        }
    }
}

/// Resident bytes of a replay buffer (heap + anonymous maps + file pages
/// in memory).
trait ResidentBytes {
    fn memory_usage_resident(&self) -> u64;
}

impl ResidentBytes for PrioritizedReplayBuffer {
    fn memory_usage_resident(&self) -> u64 {
        gm_core::MemoryReport::memory_usage(self).resident_bytes()
    }
}
