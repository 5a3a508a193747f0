//! [`Monitor`] (the sources, thresholds, history and exporters, sampled on
//! demand with [`Monitor::sample_now`]) and its [`Builder`].

use crate::components::{AsWeakReport, ComponentId, Components, GaugeFn, GaugeKind};
use crate::config::{Config, Measure};
use crate::cuda::GpuSource;
use crate::error::{Error, Result};
use crate::handle::MonitorHandle;
use crate::jsonl::JsonlWriter;
use crate::prometheus::Metrics;
use crate::ring::Ring;
use crate::rss::RssReader;
use crate::sample::{Reading, Sample};
use crate::threshold::{Alert, ThresholdTracker};
use crate::trend::Trend;
use gm_core::{MemoryBudget, Pressure};
use parking_lot::{Mutex, ReentrantMutex};
use std::collections::VecDeque;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

type AlertFn = Arc<dyn Fn(&Alert) + Send + Sync>;
type RssFn = Arc<dyn Fn() -> io::Result<u64> + Send + Sync>;

/// Builds a [`Monitor`] ([`build`](Self::build): no thread) or a running
/// one ([`spawn`](Self::spawn): sampler thread, optional HTTP endpoint).
///
/// ```
/// use gm_core::{ByteSize, MemoryBudget};
/// use gm_monitor::Monitor;
/// use std::time::Duration;
///
/// let handle = Monitor::builder()
///     .interval(Duration::from_millis(100))
///     .budget(MemoryBudget::new(ByteSize::gib(16)))
///     .on_alert(|a| eprintln!("{:?}: {} bytes", a.level, a.value_bytes))
///     .spawn()?;
/// let s = handle.sample_now();
/// assert!(s.rss.ok().unwrap() > 0);
/// let report = handle.stop(); // or drop it: stops and joins the thread
/// assert!(report.stats.samples >= 1);
/// # Ok::<(), gm_monitor::Error>(())
/// ```
#[must_use = "a builder does nothing until build() or spawn()"]
pub struct Builder {
    config: Config,
    heap: Option<GaugeFn>,
    rss: Option<RssFn>,
    callbacks: Vec<AlertFn>,
    gauges: Vec<(String, GaugeKind)>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("config", &self.config)
            .field("heap_gauge", &self.heap.is_some())
            .field("custom_rss", &self.rss.is_some())
            .field("callbacks", &self.callbacks.len())
            .field("gauges", &self.gauges.len())
            .finish()
    }
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder {
    /// A builder with [`Config::default`].
    pub fn new() -> Self {
        Self {
            config: Config::default(),
            heap: None,
            rss: None,
            callbacks: Vec::new(),
            gauges: Vec::new(),
        }
    }

    /// Replaces the whole configuration.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// [`Config::interval`].
    pub fn interval(mut self, interval: Duration) -> Self {
        self.config.interval = interval;
        self
    }

    /// [`Config::history_samples`].
    pub fn history_samples(mut self, n: usize) -> Self {
        self.config.history_samples = n;
        self
    }

    /// [`Config::trend_window_samples`].
    pub fn trend_window_samples(mut self, n: usize) -> Self {
        self.config.trend_window_samples = n;
        self
    }

    /// [`Config::budget`].
    pub fn budget(mut self, budget: MemoryBudget) -> Self {
        self.config.budget = Some(budget);
        self
    }

    /// [`Config::budget_measure`].
    pub fn budget_measure(mut self, measure: Measure) -> Self {
        self.config.budget_measure = measure;
        self
    }

    /// [`Config::hysteresis_fraction`].
    pub fn hysteresis_fraction(mut self, fraction: f64) -> Self {
        self.config.hysteresis_fraction = fraction;
        self
    }

    /// [`Config::gpu_device`].
    pub fn gpu_device(mut self, device: Option<usize>) -> Self {
        self.config.gpu_device = device;
        self
    }

    /// [`Config::jsonl_path`].
    pub fn jsonl(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.jsonl_path = Some(path.into());
        self
    }

    /// [`Config::prometheus_port`] (`0`: any free port).
    pub fn prometheus_port(mut self, port: u16) -> Self {
        self.config.prometheus_port = Some(port);
        self
    }

    /// The heap gauge: a function returning live heap bytes (for example
    /// gm-leak's allocator counters: `|| gm_leak::stats().current_bytes`),
    /// so the monitor needs no dependency on the allocator's crate. Must be
    /// cheap; a panic in it becomes a [`Reading::Error`].
    pub fn heap_gauge(mut self, f: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.heap = Some(Arc::new(f));
        self
    }

    /// Replaces the RSS source (default: `/proc/self/statm`, see
    /// [`RssReader`](crate::RssReader)). For tests (a fake or failing
    /// source) and platforms with their own counters; an `Err` becomes a
    /// [`Reading::Error`] in the sample.
    pub fn rss_source(mut self, f: impl Fn() -> io::Result<u64> + Send + Sync + 'static) -> Self {
        self.rss = Some(Arc::new(f));
        self
    }

    /// Adds an alert callback (several allowed; called in the order added).
    ///
    /// Callbacks run on the sampling thread (the sampler thread, or the
    /// caller of [`Monitor::sample_now`]), one alert at a time and in order,
    /// so they should be quick: hand the alert to a channel to act on it
    /// (dropping the handle waits for a running callback). A callback may
    /// call the monitor's methods (`history`, `stats`, even `sample_now`).
    /// A callback that panics is caught, counted
    /// ([`MonitorStats::callback_panics`]) and logged; the others still run
    /// and the monitor goes on.
    pub fn on_alert(mut self, f: impl Fn(&Alert) + Send + Sync + 'static) -> Self {
        self.callbacks.push(Arc::new(f));
        self
    }

    /// Registers a component gauge at build time (see
    /// [`Monitor::register_gauge`]).
    pub fn gauge(
        mut self,
        name: impl Into<String>,
        f: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Self {
        self.gauges.push((name.into(), GaugeKind::Fn(Arc::new(f))));
        self
    }

    /// Registers a weakly held report at build time (see
    /// [`Monitor::register_report`]).
    pub fn report(mut self, report: &impl AsWeakReport) -> Self {
        let w = report.as_weak_report();
        let name = w
            .upgrade()
            .map(|r| r.component().to_owned())
            .unwrap_or_default();
        self.gauges.push((name, GaugeKind::Report(w)));
        self
    }

    /// A monitor without a thread: call [`Monitor::sample_now`] yourself.
    /// Errors on an invalid config, a JSON Lines file that cannot be
    /// opened, a duplicate component name, or a Prometheus port (the HTTP
    /// server is a thread: use [`spawn`](Self::spawn)).
    pub fn build(self) -> Result<Monitor> {
        if let Some(p) = self.config.prometheus_port {
            return Err(Error::config(
                "prometheus_port",
                p,
                "none with build(): the HTTP server is a thread, use spawn()",
            ));
        }
        self.build_inner()
    }

    /// Starts the sampler thread (first sample at once, then every
    /// [`Config::interval`]) and, with [`Config::prometheus_port`], the
    /// HTTP endpoint. Dropping the handle stops and joins both.
    pub fn spawn(self) -> Result<MonitorHandle> {
        let port = self.config.prometheus_port;
        let monitor = self.build_inner()?;
        MonitorHandle::start(monitor, port)
    }

    fn build_inner(self) -> Result<Monitor> {
        let config = self.config;
        config.validate()?;
        let tracker = config
            .budget
            .map(|b| ThresholdTracker::new(b, config.hysteresis_fraction))
            .transpose()?;
        let jsonl = config
            .jsonl_path
            .as_deref()
            .map(JsonlWriter::open)
            .transpose()?;
        let gpu = GpuSource::new(config.gpu_device);
        let metrics = Arc::new(Metrics::new(
            self.heap.is_some(),
            gpu.label(),
            config
                .budget
                .map(|b| (b, config.budget_measure.to_string())),
        ));
        let components = Components::new(metrics.components.clone());
        for (name, kind) in self.gauges {
            components.register(&name, kind)?;
        }
        let rss = match self.rss {
            Some(f) => RssSource::Custom(f),
            None => RssSource::Proc(RssReader::new()),
        };
        let state = State {
            rss,
            gpu,
            tracker,
            history: Ring::new(config.history_samples),
            jsonl,
            seq: 0,
            stats: MonitorStats::default(),
            last_trend: Trend::default(),
            pending: VecDeque::new(),
        };
        Ok(Monitor {
            inner: Arc::new(Inner {
                config,
                started: Instant::now(),
                heap: self.heap,
                callbacks: self.callbacks,
                components,
                metrics,
                state: Mutex::new(state),
                deliver: ReentrantMutex::new(()),
                callback_panics: AtomicU64::new(0),
            }),
        })
    }
}

/// Counters of a monitor's life.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[non_exhaustive]
pub struct MonitorStats {
    /// Samples taken (by the thread and by [`Monitor::sample_now`]).
    pub samples: u64,
    /// Alerts raised.
    pub alerts: u64,
    /// Source readings that were [`Reading::Error`].
    pub source_errors: u64,
    /// Heap or component gauges that panicked (each became an error reading).
    pub gauge_panics: u64,
    /// Alert callbacks that panicked (caught; the monitor went on).
    pub callback_panics: u64,
    /// Failed writes to the JSON Lines export.
    pub export_errors: u64,
    /// Time the last sample took.
    pub last_sample: Duration,
    /// Longest sample.
    pub max_sample: Duration,
    /// All samples together.
    pub total_sample: Duration,
    /// CPU time (user + system) of the sampler thread: live while it runs
    /// ([`MonitorHandle::stats`]), final in [`MonitorHandle::stop`]'s
    /// report; `None` without a sampler thread.
    pub sampler_cpu_time: Option<Duration>,
}

impl MonitorStats {
    /// Mean time per sample.
    pub fn mean_sample(&self) -> Duration {
        if self.samples == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(self.total_sample.as_secs_f64() / self.samples as f64)
        }
    }
}

enum RssSource {
    Proc(RssReader),
    Custom(RssFn),
}

impl RssSource {
    fn read(&mut self) -> Reading {
        let r = match self {
            RssSource::Proc(r) => r.read(),
            RssSource::Custom(f) => match catch_unwind(AssertUnwindSafe(|| f())) {
                Ok(r) => r,
                Err(_) => Err(io::Error::other("the RSS source panicked")),
            },
        };
        match r {
            Ok(v) => Reading::Ok(v),
            Err(e) => Reading::Error(e.to_string()),
        }
    }
}

struct State {
    rss: RssSource,
    gpu: GpuSource,
    tracker: Option<ThresholdTracker>,
    history: Ring<Sample>,
    jsonl: Option<JsonlWriter>,
    seq: u64,
    stats: MonitorStats,
    last_trend: Trend,
    /// Alerts raised and not yet delivered (FIFO).
    pending: VecDeque<Alert>,
}

struct Inner {
    config: Config,
    started: Instant,
    heap: Option<GaugeFn>,
    callbacks: Vec<AlertFn>,
    components: Components,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    /// Held while alert callbacks run, so alerts are delivered one at a
    /// time and in order; never taken with `state` held; re-entrant so a
    /// callback may call `sample_now`.
    deliver: ReentrantMutex<()>,
    callback_panics: AtomicU64,
}

/// The monitor: sources, thresholds, history and exporters. Cheap to clone
/// (a shared handle); every method takes `&self` and is thread-safe.
///
/// Built by [`Builder::build`] (sample it yourself) or owned by a
/// [`MonitorHandle`] from [`Builder::spawn`] (a thread samples it).
#[derive(Clone)]
pub struct Monitor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Monitor {
    /// A [`Builder`] with the default configuration.
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Takes one sample now, on the calling thread: reads every source,
    /// updates history, trend, thresholds and metrics, writes the JSON
    /// line, and runs the alert callbacks (on this thread) if the alert
    /// state changed. Samples are serialised with the sampler thread's.
    pub fn sample_now(&self) -> Sample {
        let inner = &*self.inner;
        let mut guard = inner.state.lock();
        let st = &mut *guard;
        let t0 = Instant::now();
        let at = SystemTime::now();
        let elapsed = t0.saturating_duration_since(inner.started);
        let rss = st.rss.read();
        let mut gauge_panics = 0;
        let heap = match &inner.heap {
            None => Reading::Unavailable("no heap gauge configured".into()),
            Some(f) => match catch_unwind(AssertUnwindSafe(|| f())) {
                Ok(v) => Reading::Ok(v),
                Err(_) => {
                    gauge_panics += 1;
                    tracing::warn!("the heap gauge panicked");
                    Reading::Error("the heap gauge panicked".into())
                }
            },
        };
        let gpu = st.gpu.read();
        let (components, p) = inner.components.sample();
        gauge_panics += p;
        let measured_bytes = match &inner.config.budget_measure {
            Measure::Rss => rss.ok(),
            Measure::Heap => heap.ok(),
            Measure::Gpu => gpu.ok().map(|g| g.used_bytes),
            Measure::Component(name) => components
                .iter()
                .find(|c| &*c.name == name.as_str())
                .and_then(|c| c.bytes.ok()),
        };
        let t_now = elapsed.as_secs_f64();
        let trend = match measured_bytes {
            Some(v) => {
                let window = inner.config.trend_window_samples - 1;
                let past = st
                    .history
                    .iter()
                    .rev()
                    .filter_map(|s| s.measured_bytes.map(|m| (s.elapsed.as_secs_f64(), m)))
                    .take(window);
                let limit = inner.config.budget.map(|b| b.limit_bytes);
                Trend::fit_iter(std::iter::once((t_now, v)).chain(past), limit)
            }
            // No value this time: keep the last trend.
            None => st.last_trend,
        };
        st.last_trend = trend;
        let transition = match (&mut st.tracker, measured_bytes) {
            (Some(t), Some(v)) => t.observe(v),
            _ => None,
        };
        let pressure = st.tracker.as_ref().map_or(Pressure::Normal, |t| t.state());
        st.seq += 1;
        let source_errors = u64::from(rss.is_error())
            + u64::from(heap.is_error())
            + u64::from(gpu.is_error())
            + components.iter().filter(|c| c.bytes.is_error()).count() as u64;
        let mut sample = Sample {
            seq: st.seq,
            at,
            elapsed,
            duration: Duration::ZERO,
            rss,
            heap,
            gpu,
            components,
            measured_bytes,
            pressure,
            trend,
        };
        sample.duration = t0.elapsed();
        let stats = &mut st.stats;
        stats.samples += 1;
        stats.source_errors += source_errors;
        stats.gauge_panics += gauge_panics;
        stats.last_sample = sample.duration;
        stats.max_sample = stats.max_sample.max(sample.duration);
        stats.total_sample += sample.duration;
        inner.metrics.record(&sample);
        if let Some(w) = &mut st.jsonl {
            if let Err(e) = w.write(&sample) {
                st.stats.export_errors += 1;
                tracing::warn!(path = %w.path().display(), error = %e, "JSON Lines export failed");
            }
        }
        let alert = match (transition, st.tracker.as_ref(), measured_bytes) {
            (Some(tr), Some(tracker), Some(value_bytes)) => {
                st.stats.alerts += 1;
                inner.metrics.alert(tr.level);
                Some(Alert {
                    level: tr.level,
                    pressure: tr.to,
                    previous: tr.from,
                    source: inner.config.budget_measure.clone(),
                    value_bytes,
                    budget: tracker.budget(),
                    trend,
                    at,
                    elapsed,
                    sample_seq: sample.seq,
                })
            }
            _ => None,
        };
        st.history.push(sample.clone());
        let raised = alert.is_some();
        if let Some(a) = alert {
            st.pending.push_back(a);
        }
        drop(guard);
        if raised {
            self.deliver_pending();
        }
        sample
    }

    /// Delivers queued alerts, oldest first, one thread at a time. The state
    /// lock is never held while waiting for the delivery lock or running a
    /// callback, so a callback may call any method of the monitor; the
    /// delivery lock is re-entrant, so a callback may even call
    /// `sample_now` (whose alerts are then delivered from inside it).
    fn deliver_pending(&self) {
        let _deliver = self.inner.deliver.lock();
        loop {
            // The state lock is released at the end of this statement.
            let next = self.inner.state.lock().pending.pop_front();
            match next {
                Some(a) => self.deliver(&a),
                None => break,
            }
        }
    }

    fn deliver(&self, alert: &Alert) {
        let inner = &*self.inner;
        match alert.level {
            crate::AlertLevel::Recovered => tracing::info!(
                source = %alert.source, value_bytes = alert.value_bytes,
                pressure = crate::sample::pressure_name(alert.pressure), "memory pressure recovered"
            ),
            level => tracing::warn!(
                source = %alert.source, value_bytes = alert.value_bytes,
                limit_bytes = alert.budget.limit_bytes, level = level.name(), "memory alert"
            ),
        }
        for (i, cb) in inner.callbacks.iter().enumerate() {
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| cb(alert))) {
                inner.callback_panics.fetch_add(1, Ordering::Relaxed);
                inner.metrics.callback_panicked();
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic".into());
                tracing::error!(callback = i, panic = %msg, "alert callback panicked; the monitor goes on");
            }
        }
    }

    /// Registers a component gauge: `f` returns the component's bytes (a
    /// buffer's bytes, a model's parameter bytes) and is called once per
    /// sample, on the sampling thread, with the registry locked — so it must
    /// be cheap and must not call back into the monitor.
    ///
    /// It stays until [`unregister`](Self::unregister) (it holds `f`, and
    /// whatever `f` captures, until then: capture a `Weak` to let the
    /// component go). The name must be unique among registered gauges.
    pub fn register_gauge(
        &self,
        name: &str,
        f: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Result<ComponentId> {
        self.inner
            .components
            .register(name, GaugeKind::Fn(Arc::new(f)))
    }

    /// Registers a `gm_core::MemoryReport`, held **weakly** under its
    /// [`component()`](gm_core::MemoryReport::component) name: its value is
    /// `memory_usage().resident_bytes()` (heap + anonymous maps). When the
    /// component is dropped, its entry disappears at the next sample (and
    /// its Prometheus series with it); no unregister needed. Pass
    /// `&Arc<T>` or `&Arc<dyn MemoryReport + Send + Sync>`.
    pub fn register_report(&self, report: &impl AsWeakReport) -> Result<ComponentId> {
        let w = report.as_weak_report();
        let name = match w.upgrade() {
            Some(r) => r.component().to_owned(),
            None => String::new(),
        };
        self.inner.components.register(&name, GaugeKind::Report(w))
    }

    /// Removes a component gauge and its Prometheus series; `false` if it
    /// was not registered (or was a report whose component is gone).
    pub fn unregister(&self, id: ComponentId) -> bool {
        self.inner.components.unregister(id)
    }

    /// Names of the registered component gauges, in registration order.
    pub fn component_names(&self) -> Vec<String> {
        self.inner.components.names()
    }

    /// The newest sample.
    pub fn latest(&self) -> Option<Sample> {
        self.inner.state.lock().history.last().cloned()
    }

    /// The history ring, oldest first (at most
    /// [`Config::history_samples`]).
    pub fn history(&self) -> Vec<Sample> {
        self.inner.state.lock().history.to_vec()
    }

    /// The measure's trend as of the newest sample.
    pub fn trend(&self) -> Trend {
        self.inner.state.lock().last_trend
    }

    /// The alert state (`Normal` without a budget).
    pub fn pressure(&self) -> Pressure {
        self.inner
            .state
            .lock()
            .tracker
            .as_ref()
            .map_or(Pressure::Normal, |t| t.state())
    }

    /// Counters so far (`sampler_cpu_time` is filled in by the handle).
    pub fn stats(&self) -> MonitorStats {
        let mut s = self.inner.state.lock().stats;
        s.callback_panics = self.inner.callback_panics.load(Ordering::Relaxed);
        s
    }

    /// The Prometheus exposition of the newest sample, as the HTTP endpoint
    /// serves it.
    pub fn prometheus_text(&self) -> String {
        self.inner.metrics.encode()
    }

    pub(crate) fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }
}
