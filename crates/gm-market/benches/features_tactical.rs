//! Criterion suite for the tactical and regime feature computers
//! (`cargo bench -p gm-market --bench features_tactical`): bars per second
//! through `push` on a 10 000-bar synthetic 5-minute series, default
//! configs. A counting allocator runs underneath, and each case prints the
//! allocations of one iteration next to criterion's time (expected: none).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gm_market::features::regime::{RegimeConfig, RegimeFeatures};
use gm_market::features::tactical::{TacticalConfig, TacticalFeatures};
use gm_market::Bar;
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counts allocations and allocated bytes; forwards everything to `System`.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED_BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments,
// which uphold `GlobalAlloc`'s contract; the counters have no effect on
// the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED_BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: `ptr` came from `System` with this `layout`; the caller
        // upholds `realloc`'s contract for `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const BARS: usize = 10_000;

/// splitmix64: small and deterministic.
struct Rng(u64);

impl Rng {
    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (((z ^ (z >> 31)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// A 5-minute random walk whose opens gap by ±4σ on 8 % of the bars, so
/// that fair-value gaps form and get mitigated; log-normal volume.
fn series(n: usize) -> Vec<Bar> {
    let mut rng = Rng(42);
    let sigma = 0.003;
    let mut prev = 100.0;
    (0..n)
        .map(|i| {
            let open = if rng.uniform() < 0.08 {
                let sign = if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
                prev * (1.0 + 4.0 * sigma * sign)
            } else {
                prev
            };
            let close = open * (sigma * rng.normal()).exp();
            let wick = 0.5 * sigma * rng.normal().abs();
            prev = close;
            Bar {
                ts: 1_700_000_000 + 300 * i as i64,
                open,
                high: open.max(close) * (1.0 + wick),
                low: open.min(close) * (1.0 - wick),
                close,
                volume: 1000.0 * (0.5 * rng.normal()).exp(),
            }
        })
        .collect()
}

/// Runs one warm-up iteration, then prints what the next one allocates.
fn note_allocations(id: &str, mut f: impl FnMut()) {
    f();
    let (a0, b0) = (
        ALLOCATIONS.load(Ordering::Relaxed),
        ALLOCATED_BYTES.load(Ordering::Relaxed),
    );
    f();
    let (a1, b1) = (
        ALLOCATIONS.load(Ordering::Relaxed),
        ALLOCATED_BYTES.load(Ordering::Relaxed),
    );
    eprintln!(
        "{id}: one iteration ({BARS} bars) = {} allocations, {} bytes allocated",
        a1 - a0,
        b1 - b0
    );
}

fn bench_push(c: &mut Criterion) {
    let bars = series(BARS);
    let mut g = c.benchmark_group("features");
    g.throughput(Throughput::Elements(BARS as u64));

    let mut tactical = TacticalFeatures::new(TacticalConfig::default()).expect("config");
    let mut run_tactical = || {
        tactical.reset();
        for b in &bars {
            black_box(tactical.push(black_box(b)).expect("valid bar"));
        }
    };
    note_allocations("features/tactical/push10k", &mut run_tactical);
    g.bench_function("tactical/push10k", |b| b.iter(&mut run_tactical));

    let mut regime = RegimeFeatures::new(RegimeConfig::default()).expect("config");
    let mut run_regime = || {
        regime.reset();
        for b in &bars {
            black_box(regime.push(black_box(b)).expect("valid bar"));
        }
    };
    note_allocations("features/regime/push10k", &mut run_regime);
    g.bench_function("regime/push10k", |b| b.iter(&mut run_regime));
    g.finish();
}

criterion_group!(benches, bench_push);
criterion_main!(benches);
