//! The Prometheus (OpenMetrics text) exposition: [`Metrics`], updated after
//! every sample with atomic stores, and [`HttpServer`], a loopback-only
//! `tiny_http` endpoint serving it at `/metrics`, owned by the monitor's
//! handle (stopped and joined on drop).
//!
//! Metrics (`prometheus-client` writes the OpenMetrics flavour of the text
//! format: counters get a `_total` suffix, the body ends with `# EOF`):
//!
//! | name | type | labels | value |
//! |---|---|---|---|
//! | `gm_process_rss_bytes` | gauge | | resident set size |
//! | `gm_heap_bytes` | gauge | | the heap gauge (only when one is configured) |
//! | `gm_gpu_memory_used_bytes` | gauge | `device` | device memory in use (absent until the first successful reading) |
//! | `gm_gpu_memory_total_bytes` | gauge | `device` | device memory |
//! | `gm_component_bytes` | gauge | `component` | each component gauge (series removed on unregister / drop; absent while none is registered) |
//! | `gm_memory_budget_bytes` | gauge | | the budget's limit (only with a budget) |
//! | `gm_memory_budget_warning_bytes`, `gm_memory_budget_critical_bytes` | gauge | | its lines |
//! | `gm_memory_measured_bytes` | gauge | `measure` | the value compared with the budget |
//! | `gm_memory_pressure` | gauge | | alert state: 0 normal, 1 warning, 2 critical, 3 exceeded |
//! | `gm_memory_growth_bytes_per_second` | gauge | | trend slope |
//! | `gm_memory_seconds_to_limit` | gauge | | trend ETA (`+Inf` when not growing) |
//! | `gm_source_up` | gauge | `source` | 1 when the source's last reading was a value (`rss`; `heap` with a heap gauge; `gpu` with the GPU source on) |
//! | `gm_monitor_samples_total` | counter | | samples taken |
//! | `gm_monitor_alerts_total` | counter | `level` | alerts raised (absent until the first) |
//! | `gm_monitor_callback_panics_total` | counter | | alert callbacks that panicked |
//! | `gm_monitor_sample_duration_seconds` | histogram | | time to take one sample |

use crate::components::ComponentFamily;
use crate::error::{Error, Result};
use crate::sample::{pressure_code, Reading, Sample};
use crate::threshold::AlertLevel;
use gm_core::MemoryBudget;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

type Labels = [(String, String); 1];
type U64Gauge = Gauge<u64, AtomicU64>;
type F64Gauge = Gauge<f64, AtomicU64>;

fn label(k: &str, v: &str) -> Labels {
    [(k.to_string(), v.to_string())]
}

/// Every exported metric, and the registry that encodes them.
pub(crate) struct Metrics {
    registry: Registry,
    rss: U64Gauge,
    heap: Option<U64Gauge>,
    gpu_used: Family<Labels, U64Gauge>,
    gpu_total: Family<Labels, U64Gauge>,
    gpu_labels: Option<Labels>,
    pub(crate) components: ComponentFamily,
    measured: Option<(Labels, Family<Labels, U64Gauge>)>,
    pressure: Gauge,
    slope: F64Gauge,
    eta: F64Gauge,
    up: Family<Labels, Gauge>,
    up_rss: Labels,
    up_heap: Labels,
    up_gpu: Labels,
    samples: Counter,
    alerts: Family<Labels, Counter>,
    alert_labels: [Labels; 4],
    callback_panics: Counter,
    duration: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers the metrics. `heap`: whether a heap gauge exists;
    /// `gpu_device`: the GPU label (`"cuda:0"`), if the GPU source is on;
    /// `budget`: the budget and its measure's name.
    pub(crate) fn new(
        heap: bool,
        gpu_device: Option<String>,
        budget: Option<(MemoryBudget, String)>,
    ) -> Self {
        let mut r = Registry::default();
        let rss = U64Gauge::default();
        r.register(
            "gm_process_rss_bytes",
            "Resident set size of the process",
            rss.clone(),
        );
        let heap = heap.then(|| {
            let g = U64Gauge::default();
            r.register("gm_heap_bytes", "Live heap bytes (heap gauge)", g.clone());
            g
        });
        let gpu_used = Family::<Labels, U64Gauge>::default();
        let gpu_total = Family::<Labels, U64Gauge>::default();
        r.register(
            "gm_gpu_memory_used_bytes",
            "GPU memory in use on the device (all processes)",
            gpu_used.clone(),
        );
        r.register(
            "gm_gpu_memory_total_bytes",
            "GPU memory on the device",
            gpu_total.clone(),
        );
        let components = ComponentFamily::default();
        r.register(
            "gm_component_bytes",
            "Bytes reported by each registered component",
            components.clone(),
        );
        let measured = budget.map(|(b, measure)| {
            for (name, help, v) in [
                (
                    "gm_memory_budget_bytes",
                    "Memory budget limit",
                    b.limit_bytes,
                ),
                (
                    "gm_memory_budget_warning_bytes",
                    "Budget warning line",
                    b.warning_bytes(),
                ),
                (
                    "gm_memory_budget_critical_bytes",
                    "Budget critical line",
                    b.critical_bytes(),
                ),
            ] {
                let g = U64Gauge::default();
                g.set(v);
                r.register(name, help, g);
            }
            let fam = Family::<Labels, U64Gauge>::default();
            r.register(
                "gm_memory_measured_bytes",
                "The value compared with the budget",
                fam.clone(),
            );
            (label("measure", &measure), fam)
        });
        let pressure = Gauge::default();
        r.register(
            "gm_memory_pressure",
            "Alert state against the budget: 0 normal, 1 warning, 2 critical, 3 exceeded",
            pressure.clone(),
        );
        let slope = F64Gauge::default();
        r.register(
            "gm_memory_growth_bytes_per_second",
            "Least-squares growth of the budget's measure over the trend window",
            slope.clone(),
        );
        let eta = F64Gauge::default();
        eta.set(f64::INFINITY);
        r.register(
            "gm_memory_seconds_to_limit",
            "Estimated seconds until the measure reaches the budget (+Inf when not growing)",
            eta.clone(),
        );
        let up = Family::<Labels, Gauge>::default();
        r.register(
            "gm_source_up",
            "1 when the source's last reading gave a value",
            up.clone(),
        );
        let samples = Counter::default();
        r.register("gm_monitor_samples", "Samples taken", samples.clone());
        let alerts = Family::<Labels, Counter>::default();
        r.register("gm_monitor_alerts", "Alerts raised", alerts.clone());
        let callback_panics = Counter::default();
        r.register(
            "gm_monitor_callback_panics",
            "Alert callbacks that panicked",
            callback_panics.clone(),
        );
        // 1 µs .. ~16 ms.
        let duration = Histogram::new(exponential_buckets(1e-6, 2.0, 15));
        r.register(
            "gm_monitor_sample_duration_seconds",
            "Time to take one sample",
            duration.clone(),
        );
        let alert_labels = [
            AlertLevel::Warning,
            AlertLevel::Critical,
            AlertLevel::Exceeded,
            AlertLevel::Recovered,
        ]
        .map(|l| label("level", l.name()));
        Self {
            registry: r,
            rss,
            heap,
            gpu_used,
            gpu_total,
            gpu_labels: gpu_device.map(|d| label("device", &d)),
            components,
            measured,
            pressure,
            slope,
            eta,
            up,
            up_rss: label("source", "rss"),
            up_heap: label("source", "heap"),
            up_gpu: label("source", "gpu"),
            samples,
            alerts,
            alert_labels,
            callback_panics,
            duration,
        }
    }

    /// Stores a sample's values (component gauges are stored by the
    /// registry as it reads them).
    pub(crate) fn record(&self, s: &Sample) {
        let up = |labels: &Labels, ok: bool| {
            self.up.get_or_create(labels).set(i64::from(ok));
        };
        if let Reading::Ok(v) = s.rss {
            self.rss.set(v);
        }
        up(&self.up_rss, s.rss.ok().is_some());
        if let Some(h) = &self.heap {
            if let Reading::Ok(v) = s.heap {
                h.set(v);
            }
            up(&self.up_heap, s.heap.ok().is_some());
        }
        if let Some(l) = &self.gpu_labels {
            if let Reading::Ok(g) = s.gpu {
                self.gpu_used.get_or_create(l).set(g.used_bytes);
                self.gpu_total.get_or_create(l).set(g.total_bytes);
            }
            up(&self.up_gpu, s.gpu.ok().is_some());
        }
        if let (Some((l, fam)), Some(v)) = (&self.measured, s.measured_bytes) {
            fam.get_or_create(l).set(v);
        }
        self.pressure.set(i64::from(pressure_code(s.pressure)));
        self.slope.set(s.trend.slope_bytes_per_sec);
        self.eta.set(
            s.trend
                .time_to_limit
                .map_or(f64::INFINITY, |d| d.as_secs_f64()),
        );
        self.samples.inc();
        self.duration.observe(s.duration.as_secs_f64());
    }

    pub(crate) fn alert(&self, level: AlertLevel) {
        let i = match level {
            AlertLevel::Warning => 0,
            AlertLevel::Critical => 1,
            AlertLevel::Exceeded => 2,
            AlertLevel::Recovered => 3,
        };
        self.alerts.get_or_create(&self.alert_labels[i]).inc();
    }

    pub(crate) fn callback_panicked(&self) {
        self.callback_panics.inc();
    }

    /// The exposition text.
    pub(crate) fn encode(&self) -> String {
        let mut s = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }
}

/// The OpenMetrics content type `prometheus-client` produces.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The loopback HTTP endpoint and its thread.
pub(crate) struct HttpServer {
    server: Arc<tiny_http::Server>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl HttpServer {
    /// Binds `127.0.0.1:port` (`0`: any free port) and starts serving.
    pub(crate) fn start(port: u16, metrics: Arc<Metrics>) -> Result<Self> {
        let want = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let server = tiny_http::Server::http(want).map_err(|e| Error::Bind {
            addr: want,
            reason: e.to_string(),
        })?;
        let addr = server.server_addr().to_ip().ok_or_else(|| Error::Bind {
            addr: want,
            reason: "the server reports no IP address".into(),
        })?;
        let server = Arc::new(server);
        let stopping = Arc::new(AtomicBool::new(false));
        let (srv, stop) = (server.clone(), stopping.clone());
        let thread = std::thread::Builder::new()
            .name("gm-monitor-http".into())
            .spawn(move || serve(&srv, &stop, &metrics))
            .map_err(|source| Error::Spawn {
                thread: "prometheus",
                source,
            })?;
        Ok(Self {
            server,
            stopping,
            thread: Some(thread),
            addr,
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops and joins the thread (idempotent).
    pub(crate) fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stopping.store(true, Ordering::SeqCst);
            self.server.unblock();
            if t.join().is_err() {
                tracing::error!("the Prometheus HTTP thread panicked");
            }
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(server: &tiny_http::Server, stopping: &AtomicBool, metrics: &Metrics) {
    let header = |k: &str, v: &str| tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes());
    let (Ok(content_type), Ok(allow)) = (
        header("Content-Type", CONTENT_TYPE),
        header("Allow", "GET, HEAD"),
    ) else {
        unreachable!("constant ASCII headers are valid");
    };
    loop {
        let req = match server.recv() {
            Ok(r) => r,
            Err(_) if stopping.load(Ordering::SeqCst) => return,
            Err(e) => {
                // tiny_http 0.12 reports an accept error (e.g. out of file
                // descriptors) once and then stops accepting: requests on
                // open connections are still served, new connections are not.
                tracing::error!(error = %e, "Prometheus endpoint: accept failed; it takes no new connections");
                continue;
            }
        };
        let path = req.url().split('?').next().unwrap_or("");
        let resp = match (path, req.method()) {
            ("/metrics", tiny_http::Method::Get | tiny_http::Method::Head) => {
                tiny_http::Response::from_string(metrics.encode()).with_header(content_type.clone())
            }
            ("/metrics", _) => tiny_http::Response::from_string("only GET /metrics\n")
                .with_status_code(405)
                .with_header(allow.clone()),
            _ => tiny_http::Response::from_string("not found: metrics are at /metrics\n")
                .with_status_code(404),
        };
        if let Err(e) = req.respond(resp) {
            tracing::debug!(error = %e, "Prometheus endpoint: client went away");
        }
    }
}
