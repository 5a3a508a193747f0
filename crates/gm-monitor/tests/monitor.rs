//! End-to-end tests of the monitor: the sampler thread with a fake source,
//! alerts and panicking callbacks, failing sources, component gauges, the
//! JSON Lines export, history and trend, and the GPU source without a driver.

use gm_core::{MemoryBudget, MemoryReport, MemoryUsage, Pressure};
use gm_monitor::{Alert, AlertLevel, Error, Measure, Monitor, Reading};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Generous bound on waiting for the sampler thread: a guard against a hang,
/// not a timing assertion.
const PATIENCE: Duration = Duration::from_secs(30);

#[test]
fn threaded_fake_source_alerts_and_survives_a_panicking_callback() {
    let value = Arc::new(AtomicU64::new(100));
    let (tx, rx) = crossbeam_channel::unbounded::<Alert>();
    let v = value.clone();
    let handle = Monitor::builder()
        .interval(Duration::from_millis(1))
        .gpu_device(None)
        .rss_source(move || Ok(v.load(Ordering::SeqCst)))
        .budget(MemoryBudget::new(1000u64))
        .on_alert(|a| {
            if a.level == AlertLevel::Warning {
                panic!("a callback that panics on warnings");
            }
        })
        .on_alert(move |a| {
            let _ = tx.send(a.clone());
        })
        .spawn()
        .unwrap();

    let expect = |level: AlertLevel, pressure: Pressure| {
        let a = rx.recv_timeout(PATIENCE).expect("an alert");
        assert_eq!((a.level, a.pressure), (level, pressure), "{a:?}");
        assert_eq!(a.source, Measure::Rss);
        assert_eq!(a.budget, MemoryBudget::new(1000u64));
        a
    };
    value.store(800, Ordering::SeqCst);
    let w = expect(AlertLevel::Warning, Pressure::Warning);
    assert_eq!(w.value_bytes, 800);
    assert_eq!(w.previous, Pressure::Normal);
    // The first callback panicked on that warning; the monitor lives on and
    // the second callback still gets the next alerts.
    value.store(950, Ordering::SeqCst);
    let c = expect(AlertLevel::Critical, Pressure::Critical);
    assert_eq!(c.value_bytes, 950);
    value.store(100, Ordering::SeqCst);
    let r = expect(AlertLevel::Recovered, Pressure::Normal);
    assert_eq!(r.previous, Pressure::Critical);
    assert!(r.sample_seq > c.sample_seq && c.sample_seq > w.sample_seq);

    let stats = handle.stats();
    assert_eq!(stats.callback_panics, 1);
    assert_eq!(stats.alerts, 3);
    let seen = stats.samples;
    // Still sampling after the panic.
    let deadline = std::time::Instant::now() + PATIENCE;
    while handle.stats().samples <= seen + 2 && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert!(handle.stats().samples > seen + 2);
    let report = handle.stop();
    assert!(report.stats.samples >= 4);
    assert_eq!(report.stats.callback_panics, 1);
    assert!(report.stats.sampler_cpu_time.is_some());
    assert!(rx.try_recv().is_err(), "no further alerts");
}

#[test]
fn drop_stops_the_thread_without_waiting_out_the_interval() {
    let started = std::time::Instant::now();
    let handle = Monitor::builder().gpu_device(None).spawn().unwrap();
    assert_eq!(handle.config().interval, Duration::from_secs(5));
    // The first sample is taken at once; wait for it.
    while handle.stats().samples == 0 {
        std::thread::yield_now();
    }
    let report = handle.stop();
    // Exactly the first sample: the stop woke the thread out of its 5 s wait
    // (had it slept the interval out, nothing would differ here but the
    // time, which is printed, not asserted).
    assert_eq!(report.stats.samples, 1);
    assert_eq!(report.history.len(), 1);
    eprintln!("spawn + first sample + stop took {:?}", started.elapsed());
}

#[test]
fn sample_now_reads_real_rss_and_the_heap_gauge() {
    let m = Monitor::builder()
        .gpu_device(None)
        .heap_gauge(|| 12345)
        .build()
        .unwrap();
    let s = m.sample_now();
    assert_eq!(s.seq, 1);
    let rss = s.rss.ok().expect("RSS on Linux");
    assert!(rss > 1 << 20, "{rss}");
    assert_eq!(s.heap, Reading::Ok(12345));
    assert_eq!(s.measured_bytes, Some(rss));
    assert_eq!(s.pressure, Pressure::Normal);
    assert!(matches!(s.gpu, Reading::Unavailable(_)));
    assert_eq!(m.sample_now().seq, 2);
    assert_eq!(m.stats().samples, 2);
    assert_eq!(m.latest().unwrap().seq, 2);
}

#[test]
fn a_failing_source_is_an_error_value_not_a_panic() {
    let m = Monitor::builder()
        .gpu_device(None)
        .rss_source(|| {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                "/proc is not mounted",
            ))
        })
        .heap_gauge(|| panic!("a heap gauge that panics"))
        .budget(MemoryBudget::new(1000u64))
        .build()
        .unwrap();
    let s = m.sample_now();
    match &s.rss {
        Reading::Error(e) => assert!(e.contains("/proc is not mounted"), "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(s.heap.is_error());
    // No value: no threshold evaluation, no trend.
    assert_eq!(s.measured_bytes, None);
    assert_eq!(s.pressure, Pressure::Normal);
    let st = m.stats();
    assert_eq!((st.source_errors, st.gauge_panics), (2, 1));
    // The JSON line explains it.
    let v = serde_json::to_value(&s).unwrap();
    assert!(v["rss_bytes"].is_null());
    assert!(v["errors"]["rss"].as_str().unwrap().contains("not mounted"));
    assert!(v["errors"]["heap"].as_str().unwrap().contains("panicked"));
}

#[test]
fn bad_config_is_an_err() {
    let e = Monitor::builder()
        .interval(Duration::ZERO)
        .build()
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Config {
                key: "interval",
                ..
            }
        ),
        "{e}"
    );
    let e = Monitor::builder()
        .hysteresis_fraction(2.0)
        .spawn()
        .unwrap_err();
    assert!(e.to_string().contains("hysteresis_fraction = 2.0"), "{e}");
    let e = Monitor::builder()
        .budget(MemoryBudget::new(0u64))
        .build()
        .unwrap_err();
    assert!(matches!(e, Error::Budget(_)), "{e}");
    let e = Monitor::builder().prometheus_port(0).build().unwrap_err();
    assert!(e.to_string().contains("spawn()"), "{e}");
    let e = Monitor::builder()
        .jsonl("/nonexistent-dir/x.jsonl")
        .build()
        .unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
}

struct Buffer {
    bytes: AtomicU64,
}

impl MemoryReport for Buffer {
    fn component(&self) -> &str {
        "replay"
    }
    fn memory_usage(&self) -> MemoryUsage {
        MemoryUsage {
            heap_bytes: self.bytes.load(Ordering::Relaxed),
            anon_bytes: 1000,
            file_bytes: 5,
            reserved_bytes: 0,
        }
    }
}

#[test]
fn component_gauges_register_unregister_and_vanish_with_their_component() {
    let m = Monitor::builder()
        .gpu_device(None)
        .gauge("model/params", || 4 << 20)
        .build()
        .unwrap();
    let buf = Arc::new(Buffer {
        bytes: AtomicU64::new(24),
    });
    let id = m.register_report(&buf).unwrap();
    // A trait object works too.
    let dyn_report: Arc<dyn MemoryReport + Send + Sync> = Arc::new(Buffer {
        bytes: AtomicU64::new(0),
    });
    assert!(matches!(
        m.register_report(&dyn_report),
        Err(Error::DuplicateComponent { ref name }) if name == "replay"
    ));
    let g = m.register_gauge("cache", || 7).unwrap();
    assert!(m.register_gauge("cache", || 8).is_err());
    assert!(m.register_gauge("", || 8).is_err());

    let s = m.sample_now();
    assert_eq!(s.component("model/params"), Some(4 << 20));
    assert_eq!(s.component("replay"), Some(1024)); // heap + anon
    assert_eq!(s.component("cache"), Some(7));
    let names: Vec<_> = s.components.iter().map(|c| c.name.to_string()).collect();
    assert_eq!(names, ["model/params", "replay", "cache"]);
    assert!(m
        .prometheus_text()
        .contains("gm_component_bytes{component=\"replay\"} 1024"));

    buf.bytes.store(2024, Ordering::Relaxed);
    assert_eq!(m.sample_now().component("replay"), Some(3024));

    assert!(m.unregister(g));
    assert!(!m.unregister(g));
    drop(buf); // the weak report goes with its component
    let s = m.sample_now();
    assert_eq!(s.component("replay"), None);
    assert_eq!(s.component("cache"), None);
    assert_eq!(m.component_names(), ["model/params"]);
    let text = m.prometheus_text();
    assert!(!text.contains("component=\"replay\""), "{text}");
    assert!(!text.contains("component=\"cache\""), "{text}");
    // The name is free again, and unregistering the old report id is a no-op.
    let dyn_id = m.register_report(&dyn_report).unwrap();
    assert!(!m.unregister(id));
    assert!(m.unregister(dyn_id));
}

#[test]
fn the_budget_can_apply_to_a_component() {
    let bytes = Arc::new(AtomicU64::new(0));
    let b = bytes.clone();
    let alerts = Arc::new(Mutex::new(Vec::new()));
    let a = alerts.clone();
    let m = Monitor::builder()
        .gpu_device(None)
        .budget(MemoryBudget::new(1000u64))
        .budget_measure(Measure::Component("replay".into()))
        .gauge("replay", move || b.load(Ordering::Relaxed))
        .on_alert(move |al| a.lock().unwrap().push((al.level, al.value_bytes)))
        .build()
        .unwrap();
    for v in [100, 500, 760, 740, 760, 910, 100] {
        bytes.store(v, Ordering::Relaxed);
        m.sample_now();
    }
    assert_eq!(
        *alerts.lock().unwrap(),
        vec![
            (AlertLevel::Warning, 760),
            (AlertLevel::Critical, 910),
            (AlertLevel::Recovered, 100)
        ]
    );
    assert_eq!(m.pressure(), Pressure::Normal);
}

#[test]
fn history_is_a_bounded_ring_and_the_trend_follows_linear_growth() {
    let v = Arc::new(AtomicU64::new(0));
    let v2 = v.clone();
    let m = Monitor::builder()
        .gpu_device(None)
        .history_samples(50)
        .trend_window_samples(20)
        .budget(MemoryBudget::new(u64::MAX / 2))
        .budget_measure(Measure::Heap)
        .heap_gauge(move || v2.load(Ordering::Relaxed))
        .build()
        .unwrap();
    // Flat: no growth, no ETA.
    v.store(1 << 20, Ordering::Relaxed);
    for _ in 0..30 {
        m.sample_now();
    }
    assert_eq!(m.trend().slope_bytes_per_sec, 0.0);
    assert_eq!(m.trend().time_to_limit, None);
    // Growing: the trend sees a positive slope and an ETA. (Real time
    // between samples is whatever it is, so only signs are checked here;
    // exact slopes are tested on synthetic times in trend.rs.)
    for i in 0..100u64 {
        v.store((1 << 20) + i * 4096, Ordering::Relaxed);
        m.sample_now();
    }
    let t = m.trend();
    assert!(t.slope_bytes_per_sec > 0.0, "{t:?}");
    assert!(t.time_to_limit.is_some());
    assert_eq!(t.samples, 20);
    let h = m.history();
    assert_eq!(h.len(), 50);
    assert_eq!(h.first().unwrap().seq, 81);
    assert_eq!(h.last().unwrap().seq, 130);
}

#[test]
fn jsonl_export_writes_one_flushed_line_per_sample() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("samples.jsonl");
    let m = Monitor::builder()
        .gpu_device(None)
        .jsonl(&path)
        .heap_gauge(|| 4096)
        .gauge("replay", || 77)
        .budget(MemoryBudget::new(u64::MAX / 2))
        .build()
        .unwrap();
    let taken: Vec<_> = (0..5).map(|_| m.sample_now()).collect();
    // Read back while the monitor is still alive: each line was flushed.
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    for (line, s) in lines.iter().zip(&taken) {
        assert_eq!(line["seq"], s.seq);
        assert_eq!(line["rss_bytes"], s.rss.ok().unwrap());
        assert_eq!(line["heap_bytes"], 4096);
        assert_eq!(line["components"]["replay"], 77);
        assert_eq!(line["pressure"], "normal");
        assert!(line["gpu_used_bytes"].is_null());
        assert!(line["unavailable"]["gpu"].is_string());
        assert!(line["sample_us"].as_f64().unwrap() >= 0.0);
    }
    drop(m);
    // Appends on reopen.
    let m = Monitor::builder()
        .gpu_device(None)
        .jsonl(&path)
        .build()
        .unwrap();
    m.sample_now();
    assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 6);
}

/// With the `cuda` feature on and no driver (or with it off), the GPU source
/// reports unavailable; the monitor does not panic.
#[test]
fn gpu_source_without_a_driver_is_unavailable() {
    if gm_monitor::gpu_driver_present() {
        eprintln!("skipped: a CUDA driver is present");
        return;
    }
    let m = Monitor::builder()
        .gpu_device(Some(0))
        .budget(MemoryBudget::new(1u64 << 40))
        .budget_measure(Measure::Gpu)
        .build()
        .unwrap();
    let s = m.sample_now();
    let Reading::Unavailable(why) = &s.gpu else {
        panic!("expected unavailable, got {:?}", s.gpu);
    };
    eprintln!("gpu: {why}");
    assert_eq!(s.measured_bytes, None);
    assert!(!m.prometheus_text().contains("gm_gpu_memory_used_bytes{"));
}

/// A callback that reads the monitor while other threads sample (and raise
/// alerts) concurrently: no deadlock, every alert delivered once, in order.
#[test]
fn callbacks_may_call_back_into_the_monitor_while_others_sample() {
    let value = Arc::new(AtomicU64::new(0));
    let v = value.clone();
    let cell: Arc<std::sync::OnceLock<Monitor>> = Arc::new(std::sync::OnceLock::new());
    let c = cell.clone();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let m = Monitor::builder()
        .gpu_device(None)
        .history_samples(8)
        .trend_window_samples(4)
        .hysteresis_fraction(0.0)
        .budget(MemoryBudget::new(1000u64))
        .rss_source(move || Ok(v.fetch_add(1, Ordering::SeqCst) % 2 * 800))
        .on_alert(move |a| {
            let m = c.get().expect("set before sampling");
            assert!(!m.history().is_empty());
            let _ = m.stats();
            s2.lock().unwrap().push((a.sample_seq, a.level));
        })
        .build()
        .unwrap();
    cell.set(m.clone()).unwrap();
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                for _ in 0..300 {
                    m.sample_now();
                }
            });
        }
    });
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len() as u64, m.stats().alerts);
    assert!(seen.len() > 100, "{}", seen.len());
    // Delivered in the order raised, alternating warning / recovered.
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(seen.windows(2).all(|w| w[0].1 != w[1].1));
}
