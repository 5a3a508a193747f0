//! Prints the monitor's overhead as JSON, for `cargo xtask bench memory`:
//!
//! ```json
//! {"monitor_sample_us": 2.0, "monitor_cpu_fraction_at_5s": 4.0e-6, ...}
//! ```
//!
//! - `monitor_sample_us`: median wall time of one `sample_now` with every
//!   CPU source (RSS, a heap gauge, four component gauges, a budget with
//!   thresholds and a 60-sample trend; no exporters), over 20 000 samples.
//! - `monitor_cpu_fraction_at_5s`: the sampler thread's measured CPU time
//!   per sample (below, wake-up included) divided by the default 5 s
//!   interval: the fraction of one core the monitor really costs.
//!   `monitor_sample_cpu_fraction_at_5s` is the same for the sample work
//!   alone (`monitor_sample_us` / 5 s).
//! - `monitor_thread_cpu_us_per_sample`: the sampler thread's own CPU time
//!   (its POSIX thread CPU clock) over a 2 s run at a 1 ms interval, per
//!   sample — it includes waking up; `monitor_thread_samples`: samples in
//!   that run.
//! - `monitor_sample_allocs`, `monitor_sample_alloc_bytes`: heap
//!   allocations (and bytes) per sample, from a counting global allocator.
//! - `idle_wakeup_cpu_us`: for comparison, the CPU time per wake-up of a
//!   thread that waits on a channel with the same 1 ms deadline and does
//!   nothing else (what the wake-up alone costs on this machine).
//!
//! Run with `cargo run --release -p gm-monitor --example sample_cost`.

use anyhow::Result;
use crossbeam_channel::RecvTimeoutError;
use gm_core::{MemoryBudget, MemoryReport, MemoryUsage};
use gm_monitor::{Builder, Monitor};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counts allocations (number and bytes) around the system allocator.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static ALLOC_BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the counters are lock-free atomics that never
// allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        ALLOC_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's layout contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        ALLOC_BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged; `ptr` came from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

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

/// Every CPU source; the reports must outlive the monitor's use.
fn builder(reports: &[Arc<Buffer>]) -> Builder {
    let heap = Arc::new(AtomicU64::new(1 << 20));
    let mut b = Monitor::builder()
        .gpu_device(None)
        .budget(MemoryBudget::new(64u64 << 30))
        .heap_gauge(move || heap.load(Ordering::Relaxed))
        .gauge("model/params", || 12 << 20)
        .gauge("optimizer/state", || 24 << 20);
    for r in reports {
        b = b.report(r);
    }
    b
}

fn main() -> Result<()> {
    let reports = vec![
        Arc::new(Buffer(AtomicU64::new(1 << 30), "replay")),
        Arc::new(Buffer(AtomicU64::new(1 << 10), "cache")),
    ];

    let m = builder(&reports).build()?;
    for _ in 0..1000 {
        m.sample_now();
    }
    let mut times: Vec<Duration> = (0..20_000)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(m.sample_now());
            t.elapsed()
        })
        .collect();
    times.sort_unstable();
    let (a0, b0) = (
        ALLOCS.load(Ordering::Relaxed),
        ALLOC_BYTES.load(Ordering::Relaxed),
    );
    const N: u64 = 10_000;
    for _ in 0..N {
        std::hint::black_box(m.sample_now());
    }
    let allocs = (ALLOCS.load(Ordering::Relaxed) - a0) as f64 / N as f64;
    let alloc_bytes = (ALLOC_BYTES.load(Ordering::Relaxed) - b0) as f64 / N as f64;
    let median_us = times[times.len() / 2].as_secs_f64() * 1e6;
    drop(m);

    let handle = builder(&reports)
        .interval(Duration::from_millis(1))
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    let report = handle.stop();
    let cpu = report
        .stats
        .sampler_cpu_time
        .map_or(f64::NAN, |d| d.as_secs_f64());
    let n = report.stats.samples.max(1);

    let idle_us = idle_wakeup_cpu_us(Duration::from_millis(1), Duration::from_secs(1));

    let out = serde_json::json!({
        "monitor_sample_us": median_us,
        "monitor_cpu_fraction_at_5s": cpu / n as f64 / 5.0,
        "monitor_sample_cpu_fraction_at_5s": median_us * 1e-6 / 5.0,
        "monitor_thread_cpu_us_per_sample": cpu * 1e6 / n as f64,
        "monitor_thread_samples": n,
        "idle_wakeup_cpu_us": idle_us,
        "monitor_sample_allocs": allocs,
        "monitor_sample_alloc_bytes": alloc_bytes,
    });
    println!("{out}");
    Ok(())
}

/// CPU time per wake-up of a thread doing nothing but wait on a channel
/// with a deadline every `interval`, over `run`.
fn idle_wakeup_cpu_us(interval: Duration, run: Duration) -> f64 {
    let (tx, rx) = crossbeam_channel::bounded::<()>(0);
    let t = std::thread::spawn(move || {
        let mut next = Instant::now();
        let mut n = 0u64;
        loop {
            next += interval;
            match rx.recv_deadline(next) {
                Err(RecvTimeoutError::Timeout) => n += 1,
                _ => break,
            }
        }
        (thread_cpu(), n)
    });
    std::thread::sleep(run);
    drop(tx);
    let (cpu, n) = t.join().expect("idle thread");
    cpu.as_secs_f64() * 1e6 / n.max(1) as f64
}

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer and the clock id is a constant.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
