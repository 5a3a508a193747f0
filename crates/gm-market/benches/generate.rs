//! Criterion benches of the data path: bars per second of the synthetic
//! market (`generate/m5`, the default 5-minute config) and of the CSV loader
//! on an in-memory file (`load/csv_unix`, `load/csv_iso`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gm_market::{write_csv, CsvBars, GeneratorConfig, SyntheticMarket, TimestampFormat};
use std::hint::black_box;

const BARS: usize = 100_000;

fn generate(c: &mut Criterion) {
    let mut group = c.benchmark_group("generate");
    group.throughput(Throughput::Elements(BARS as u64));
    let mut market = SyntheticMarket::new(GeneratorConfig::default()).expect("default config");
    let mut bars = Vec::with_capacity(BARS);
    let mut regimes = Vec::with_capacity(BARS);
    group.bench_function(BenchmarkId::from_parameter("m5"), |b| {
        b.iter(|| {
            bars.clear();
            regimes.clear();
            market.generate_into(&mut bars, &mut regimes, BARS);
            black_box((&bars, &regimes));
        })
    });
    group.finish();
}

fn load(c: &mut Criterion) {
    let mut group = c.benchmark_group("load");
    group.throughput(Throughput::Elements(BARS as u64));
    let (bars, _) = SyntheticMarket::new(GeneratorConfig::default())
        .expect("default config")
        .generate(BARS);
    for (id, format) in [
        ("csv_unix", TimestampFormat::UnixSeconds),
        ("csv_iso", TimestampFormat::Iso8601),
    ] {
        let mut text = Vec::new();
        write_csv(&mut text, &bars, format).expect("in-memory write");
        group.bench_function(BenchmarkId::from_parameter(id), |b| {
            b.iter(|| {
                let rows = CsvBars::from_reader(&text[..], "bench").expect("header");
                let mut n = 0usize;
                for bar in rows {
                    black_box(bar.expect("valid row"));
                    n += 1;
                }
                assert_eq!(n, BARS);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, generate, load);
criterion_main!(benches);
