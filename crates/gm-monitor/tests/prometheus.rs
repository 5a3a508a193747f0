//! Scrapes the Prometheus endpoint with a real HTTP client and checks the
//! exposition: metric names, `# TYPE` lines, values; 404 and 405 elsewhere.

use gm_core::MemoryBudget;
use gm_monitor::{Monitor, PROMETHEUS_CONTENT_TYPE};
use std::time::Duration;

/// The value of the sample line that starts with `series ` (exact series).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

#[test]
fn scrape_metrics_over_http() {
    let handle = Monitor::builder()
        .interval(Duration::from_secs(3600)) // only the first sample and ours
        .gpu_device(None)
        .rss_source(|| Ok(800_000))
        .heap_gauge(|| 4096)
        .gauge("replay", || 123_456)
        .budget(MemoryBudget::new(1_000_000u64))
        .prometheus_port(0)
        .spawn()
        .unwrap();
    let addr = handle.prometheus_addr().unwrap();
    assert!(addr.ip().is_loopback());
    assert_ne!(addr.port(), 0);
    // The thread's first sample, then ours: two in all.
    while handle.stats().samples == 0 {
        std::thread::yield_now();
    }
    handle.sample_now();

    let url = format!("http://{addr}/metrics");
    let mut resp = ureq::get(&url).call().unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(ct, PROMETHEUS_CONTENT_TYPE);
    let text = resp.body_mut().read_to_string().unwrap();

    for (name, ty) in [
        ("gm_process_rss_bytes", "gauge"),
        ("gm_heap_bytes", "gauge"),
        ("gm_component_bytes", "gauge"),
        ("gm_memory_budget_bytes", "gauge"),
        ("gm_memory_pressure", "gauge"),
        ("gm_memory_growth_bytes_per_second", "gauge"),
        ("gm_memory_seconds_to_limit", "gauge"),
        ("gm_source_up", "gauge"),
        ("gm_monitor_samples", "counter"),
        ("gm_monitor_alerts", "counter"),
        ("gm_monitor_callback_panics", "counter"),
        ("gm_monitor_sample_duration_seconds", "histogram"),
    ] {
        let line = format!("# TYPE {name} {ty}");
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert_eq!(value(&text, "gm_process_rss_bytes"), Some(800_000.0));
    assert_eq!(value(&text, "gm_heap_bytes"), Some(4096.0));
    assert_eq!(
        value(&text, "gm_component_bytes{component=\"replay\"}"),
        Some(123_456.0)
    );
    assert_eq!(value(&text, "gm_memory_budget_bytes"), Some(1e6));
    assert_eq!(
        value(&text, "gm_memory_budget_warning_bytes"),
        Some(750_000.0)
    );
    // 800 000 of 1 000 000: warning.
    assert_eq!(value(&text, "gm_memory_pressure"), Some(1.0));
    assert_eq!(
        value(&text, "gm_memory_measured_bytes{measure=\"rss\"}"),
        Some(800_000.0)
    );
    assert_eq!(value(&text, "gm_monitor_samples_total"), Some(2.0));
    assert_eq!(
        value(&text, "gm_monitor_alerts_total{level=\"warning\"}"),
        Some(1.0)
    );
    assert_eq!(value(&text, "gm_source_up{source=\"rss\"}"), Some(1.0));
    assert_eq!(
        value(&text, "gm_monitor_sample_duration_seconds_count"),
        Some(2.0)
    );
    // Flat series: no ETA.
    assert_eq!(
        value(&text, "gm_memory_seconds_to_limit"),
        Some(f64::INFINITY)
    );
    // No GPU here: a family without series is not written at all.
    assert!(!text.contains("gm_gpu_memory_used_bytes"));
    assert_eq!(value(&text, "gm_source_up{source=\"gpu\"}"), None);
    assert!(text.ends_with("# EOF\n"));
    assert_eq!(text, handle.prometheus_text());

    // Other paths: 404; other methods: 405.
    match ureq::get(&format!("http://{addr}/other")).call() {
        Err(ureq::Error::StatusCode(404)) => {}
        other => panic!("expected 404, got {other:?}"),
    }
    match ureq::post(&url).send("x") {
        Err(ureq::Error::StatusCode(405)) => {}
        other => panic!("expected 405, got {other:?}"),
    }
    // A query string is fine.
    assert_eq!(
        ureq::get(&format!("{url}?x=1")).call().unwrap().status(),
        200
    );

    drop(handle);
    // The server is gone with the handle.
    assert!(ureq::get(&url).call().is_err());
}
