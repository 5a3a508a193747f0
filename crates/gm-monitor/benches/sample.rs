//! Criterion benchmarks of the monitor's per-sample cost: the three RSS
//! sources compared (`sample/rss/*`: ours on a kept-open `/proc/self/statm`,
//! a reopening `/proc` read, `memory-stats`, `sysinfo`) and one whole sample
//! of every CPU source (`sample/all_cpu_sources`), with and without the JSON
//! Lines export, plus one Prometheus encode.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gm_core::{MemoryBudget, MemoryReport, MemoryUsage};
use gm_monitor::{Monitor, RssReader};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

struct Buffer(AtomicU64, &'static str);

impl MemoryReport for Buffer {
    fn component(&self) -> &str {
        self.1
    }
    fn memory_usage(&self) -> MemoryUsage {
        MemoryUsage {
            heap_bytes: self.0.load(Ordering::Relaxed),
            ..MemoryUsage::default()
        }
    }
}

/// A monitor with every CPU source: RSS, a heap gauge, two closure gauges
/// and two weak reports; a budget (thresholds + trend over 60 samples).
fn all_cpu_monitor(
    jsonl: Option<&std::path::Path>,
) -> (Monitor, Vec<Arc<dyn MemoryReport + Send + Sync>>) {
    let heap = Arc::new(AtomicU64::new(1 << 20));
    let h = heap.clone();
    let mut b = Monitor::builder()
        .gpu_device(None)
        .budget(MemoryBudget::new(64u64 << 30))
        .heap_gauge(move || h.load(Ordering::Relaxed))
        .gauge("model/params", || 12 << 20)
        .gauge("optimizer/state", || 24 << 20);
    if let Some(p) = jsonl {
        b = b.jsonl(p);
    }
    let m = b.build().expect("valid config");
    let reports: Vec<Arc<dyn MemoryReport + Send + Sync>> = vec![
        Arc::new(Buffer(AtomicU64::new(1 << 30), "replay")),
        Arc::new(Buffer(AtomicU64::new(1 << 10), "cache")),
    ];
    for r in &reports {
        m.register_report(r).expect("unique names");
    }
    // Fill the trend window.
    for _ in 0..100 {
        m.sample_now();
    }
    (m, reports)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("sample");
    g.throughput(Throughput::Elements(1));
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));

    let mut ours = RssReader::new();
    let pid = sysinfo::get_current_pid().expect("own pid");
    let mut sys = sysinfo::System::new().expect("sysinfo");
    let mut sysinfo_rss = move || {
        sys.refresh_processes_specifics(
            sysinfo::ProcessesToUpdate::Some(&[pid]),
            false,
            sysinfo::ProcessRefreshKind::nothing().with_memory(),
        );
        sys.process(pid).map(|p| p.memory()).unwrap_or(0)
    };
    // The three read the same kernel counters: show they agree.
    eprintln!(
        "RSS now: proc {} / proc-reopen {} / memory-stats {} / sysinfo {} bytes",
        ours.read().unwrap(),
        gm_monitor::read_rss_reopening().unwrap(),
        memory_stats::memory_stats().map_or(0, |s| s.physical_mem),
        sysinfo_rss()
    );

    g.bench_function("rss/proc", |b| b.iter(|| black_box(ours.read().unwrap())));
    g.bench_function("rss/proc-reopen", |b| {
        b.iter(|| black_box(gm_monitor::read_rss_reopening().unwrap()))
    });
    g.bench_function("rss/memory-stats", |b| {
        b.iter(|| black_box(memory_stats::memory_stats().unwrap().physical_mem))
    });
    g.bench_function("rss/sysinfo", |b| b.iter(|| black_box(sysinfo_rss())));

    let (m, _keep) = all_cpu_monitor(None);
    g.bench_function("all_cpu_sources", |b| b.iter(|| black_box(m.sample_now())));
    g.bench_function("prometheus_encode", |b| {
        b.iter(|| black_box(m.prometheus_text()))
    });
    drop(m);

    let dir = tempfile::tempdir().expect("temp dir");
    let (m, _keep) = all_cpu_monitor(Some(&dir.path().join("bench.jsonl")));
    g.bench_function("all_cpu_sources+jsonl", |b| {
        b.iter(|| black_box(m.sample_now()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
