//! Honest accounting: a buffer's `bytes_used()` matches the process's
//! resident memory (RssAnon + RssFile growth) and its heap share matches the
//! counting allocator, within 5 %, as it fills, wraps, compresses and clears.
//!
//! Runs without the test harness (`harness = false`): RSS is per process, so
//! nothing else may run while it measures.

use gm_buffers::{col, BufferConfig, DType, FieldSpec, ReplayBuffer, Schema, StorageMode};
use gm_core::MemoryReport;
use gm_leak::TrackingAllocator;

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator::system();

/// Resident bytes of the process. Free memory the C allocator keeps cached
/// for reuse is first handed back (`malloc_trim`), so the figure is what
/// live objects hold, not what earlier temporaries left in the arena.
fn rss() -> u64 {
    // SAFETY: malloc_trim only releases free memory of glibc's arenas.
    unsafe { libc::malloc_trim(0) };
    let s = std::fs::read_to_string("/proc/self/status").expect("procfs");
    let get = |k: &str| -> u64 {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("RSS field")
    };
    (get("RssAnon:") + get("RssFile:")) * 1024
}

struct Check {
    failures: Vec<String>,
}

impl Check {
    /// `got` within 5 % of `want` (plus `slack` bytes for page rounding and
    /// allocator bookkeeping).
    fn close(&mut self, what: &str, got: u64, want: u64, slack: u64) {
        let diff = got.abs_diff(want);
        let ok = diff <= want / 20 + slack;
        println!(
            "{} {what}: measured {:.2} MiB, reported {:.2} MiB ({:+.2} %)",
            if ok { "ok  " } else { "FAIL" },
            got as f64 / 1048576.0,
            want as f64 / 1048576.0,
            100.0 * (got as f64 - want as f64) / want.max(1) as f64
        );
        if !ok {
            self.failures.push(what.to_owned());
        }
    }
}

const W: usize = 48;
const F: usize = 8;

fn window_schema() -> Schema {
    Schema::new(vec![
        FieldSpec::window("bars", DType::F32, &[W, F]),
        FieldSpec::obs("extra", DType::F32, &[13]),
        FieldSpec::plain("action", DType::I64, &[]),
        FieldSpec::plain("reward", DType::F32, &[]),
        FieldSpec::plain("done", DType::Bool, &[]),
    ])
    .unwrap()
}

/// Adds `n` transitions of a smooth sliding series (compressible rows).
fn fill(buf: &mut ReplayBuffer, start: usize, n: usize) {
    let chunk = 256;
    let mut t = start;
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk);
        let series: Vec<f32> = (t * F..(t + k + W + 1) * F)
            .map(|i| 100.0 + (i as f32 * 1e-4).sin())
            .collect();
        let obs: Vec<f32> = (0..k)
            .flat_map(|i| series[i * F..(i + W) * F].iter().copied())
            .collect();
        let next: Vec<f32> = (0..k)
            .flat_map(|i| series[(i + 1) * F..(i + 1 + W) * F].iter().copied())
            .collect();
        let ex: Vec<f32> = (t..t + k + 1).flat_map(|i| [i as f32; 13]).collect();
        let act: Vec<i64> = (0..k as i64).map(|i| i % 3).collect();
        let rew = vec![0.25f32; k];
        let done = vec![false; k];
        buf.add_batch(&[
            col(&obs),
            col(&next),
            col(&ex[..k * 13]),
            col(&ex[13..]),
            col(&act),
            col(&rew),
            col(&done),
        ])
        .unwrap();
        t += k;
        left -= k;
    }
}

fn heap_now() -> u64 {
    gm_leak::stats().current_bytes
}

fn main() {
    gm_leak::assert_active();
    let mut c = Check {
        failures: Vec::new(),
    };
    // Warm up: code pages, allocator arenas, procfs reads.
    {
        let mut warm =
            ReplayBuffer::new(window_schema(), BufferConfig::with_capacity(2048)).unwrap();
        fill(&mut warm, 0, 4096);
    }
    let cap = 200_000;
    let cfg = BufferConfig {
        storage: StorageMode::Memory,
        ..BufferConfig::with_capacity(cap)
    };
    let (r0, h0) = (rss(), heap_now());
    let mut buf = ReplayBuffer::new(window_schema(), cfg).unwrap();
    let m = buf.memory_usage();
    println!(
        "built: reserved {:.1} MiB, used {} B",
        buf.bytes_reserved() as f64 / 1048576.0,
        buf.bytes_used()
    );
    c.close("heap after build", heap_now() - h0, m.heap_bytes, 64 << 10);
    c.close("rss after build", rss() - r0, buf.bytes_used(), 256 << 10);
    let mut t = 0;
    for (label, n) in [
        ("25 %", cap / 4),
        ("50 %", cap / 4),
        ("100 %", cap / 2),
        ("wrapped 1.5x", cap / 2),
        ("wrapped 3x", 3 * cap / 2),
    ] {
        fill(&mut buf, t, n);
        t += n;
        c.close(
            &format!("rss at {label}"),
            rss() - r0,
            buf.bytes_used(),
            256 << 10,
        );
        c.close(
            &format!("heap at {label}"),
            heap_now() - h0,
            buf.memory_usage().heap_bytes,
            64 << 10,
        );
    }
    let before = buf.bytes_used();
    let saved = buf.compress_cold(0);
    let st = buf.stats();
    println!(
        "compressed {} chunks, ratio {:.2}, saved {:.1} MiB",
        st.compressed_chunks,
        st.compression_ratio(),
        saved as f64 / 1048576.0
    );
    assert!(
        buf.bytes_used() < before,
        "compression must lower bytes_used"
    );
    c.close(
        "rss after compression",
        rss() - r0,
        buf.bytes_used(),
        256 << 10,
    );
    c.close(
        "heap after compression",
        heap_now() - h0,
        buf.memory_usage().heap_bytes,
        64 << 10,
    );
    // Overwrite a quarter of the ring: chunks come back raw, images are freed.
    fill(&mut buf, t, cap / 4);
    c.close(
        "rss after overwriting compressed data",
        rss() - r0,
        buf.bytes_used(),
        512 << 10,
    );
    c.close(
        "heap after overwriting compressed data",
        heap_now() - h0,
        buf.memory_usage().heap_bytes,
        64 << 10,
    );
    buf.clear();
    c.close("rss after clear", rss() - r0, buf.bytes_used(), 512 << 10);
    drop(buf);

    // The raw layout (obs and next_obs stored whole, 817 floats each).
    let raw = Schema::new(vec![
        FieldSpec::plain("obs", DType::F32, &[817]),
        FieldSpec::plain("next_obs", DType::F32, &[817]),
        FieldSpec::plain("action", DType::I64, &[]),
    ])
    .unwrap();
    let o: Vec<f32> = (0..817 * 64).map(|i| i as f32).collect();
    let a = vec![1i64; 64];
    let (r0, h0) = (rss(), heap_now());
    let mut buf = ReplayBuffer::new(
        raw,
        BufferConfig {
            storage: StorageMode::Memory,
            ..BufferConfig::with_capacity(20_000)
        },
    )
    .unwrap();
    for (label, rounds) in [("raw 50 %", 156), ("raw 100 %", 157), ("raw wrapped", 200)] {
        for _ in 0..rounds {
            buf.add_batch(&[col(&o), col(&o), col(&a)]).unwrap();
        }
        c.close(label, rss() - r0, buf.bytes_used(), 256 << 10);
        c.close(
            &format!("heap {label}"),
            heap_now() - h0,
            buf.memory_usage().heap_bytes,
            64 << 10,
        );
    }
    if !c.failures.is_empty() {
        eprintln!("accounting off by more than 5 % for: {:?}", c.failures);
        std::process::exit(1);
    }
}
