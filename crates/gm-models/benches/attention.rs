//! Forward and forward+backward time of the three attention kernels at
//! `B = 1, H = 4, D = 32`, `N = 512` and `2048`: ids
//! `attn/{dense,memeff,sparse}/n{N}/{fwd,fwd_bwd}`, throughput in tokens
//! (`B·N`). Memory-efficient uses [`attention::DEFAULT_BLOCK`]; sparse a
//! `±32` window with 2 global tokens and every 128th key (the pattern of
//! `examples/attention_memory.rs`). Peak memory is that example's job.

use std::hint::black_box;

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gm_models::attention::{self, AttentionKind, SparsePattern};

const B: usize = 1;
const H: usize = 4;
const D: usize = 32;

fn kinds() -> [(&'static str, AttentionKind); 3] {
    [
        ("dense", AttentionKind::Dense),
        (
            "memeff",
            AttentionKind::MemoryEfficient {
                block: attention::DEFAULT_BLOCK,
            },
        ),
        (
            "sparse",
            AttentionKind::Sparse(
                SparsePattern::local(32)
                    .with_global_tokens(2)
                    .with_stride(128),
            ),
        ),
    ]
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("attn");
    group.sample_size(10);
    for n in [512usize, 2048] {
        group.throughput(Throughput::Elements((B * n) as u64));
        let rand = |s: f32| Tensor::randn(0f32, s, (B, H, n, D), &dev).expect("randn");
        let (q, k, v) = (
            Var::from_tensor(&rand(1.0)).expect("var"),
            Var::from_tensor(&rand(1.0)).expect("var"),
            Var::from_tensor(&rand(1.0)).expect("var"),
        );
        let g = rand(1.0);
        for (name, kind) in kinds() {
            group.bench_function(format!("{name}/n{n}/fwd"), |b| {
                b.iter(|| {
                    attention::attend(
                        black_box(q.as_tensor()),
                        black_box(k.as_tensor()),
                        black_box(v.as_tensor()),
                        kind,
                    )
                    .expect("forward")
                })
            });
            group.bench_function(format!("{name}/n{n}/fwd_bwd"), |b| {
                b.iter(|| {
                    let out = attention::attend(q.as_tensor(), k.as_tensor(), v.as_tensor(), kind)
                        .expect("forward");
                    out.mul(&g)
                        .and_then(|x| x.sum_all())
                        .and_then(|l| l.backward())
                        .expect("backward")
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
