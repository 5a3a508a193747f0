//! Criterion bench of the whole feature pipeline (`pipeline/m5`): tactical
//! bars per second through aggregation, the four feature families, the
//! running normalisation and the windows — what `MarketData` pays once per
//! series.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gm_market::{FeaturePipeline, GeneratorConfig, PipelineConfig, SyntheticMarket, OBS_DIM};
use std::hint::black_box;

const WARM: usize = 3_000;
const BARS: usize = 10_000;

fn pipeline(c: &mut Criterion) {
    let (bars, _) = SyntheticMarket::new(GeneratorConfig::default())
        .expect("default config")
        .generate(WARM + BARS);
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(BARS as u64));
    g.sample_size(10);
    g.bench_function("m5", |b| {
        b.iter_batched(
            || {
                let mut p =
                    FeaturePipeline::new(PipelineConfig::default()).expect("default config");
                for bar in &bars[..WARM] {
                    p.push(bar).expect("valid bar");
                }
                p
            },
            |mut p| {
                let mut obs = vec![0f32; OBS_DIM];
                for bar in &bars[WARM..] {
                    if p.push(bar).expect("valid bar").ready {
                        p.write_observation(&mut obs).expect("ready");
                    }
                }
                black_box(obs)
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
