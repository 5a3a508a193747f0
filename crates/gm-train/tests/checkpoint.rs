//! Gradient checkpointing (issue 6): gradients and losses equal to plain
//! backprop for every embedder, the heads and the whole agent, with dropout
//! off and on; a lower measured peak for the structure and tactical
//! embedders.
//!
//! Gradient metric: over every element of every variable,
//! `|g_ckpt − g_plain| / max(1, |g_plain|)` (absolute for entries up to 1,
//! relative above), asserted ≤ 1e-5 (f32); both runs must also give a
//! gradient to exactly the same variables. The maximum absolute difference
//! is printed next to it (`cargo test -- --nocapture`).

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gm_models::init::init_seeded;
use gm_models::{
    AgentHeads, Embedder, ForwardCtx, HeadsConfig, LvnConfig, LvnEmbedder, RegimeConfig,
    RegimeEmbedder, Segmented, StructureConfig, StructureEmbedder, TacticalConfig,
    TacticalEmbedder,
};
use gm_train::checkpoint::{
    agent_checkpointed_grads, agent_plain_grads, checkpointed_grads, plain_grads, CheckpointConfig,
    SegmentDropout,
};
use gm_train::{AgentConfig, AgentNet, Grads, ObsBatch};

#[global_allocator]
static A: gm_leak::TrackingAllocator = gm_leak::TrackingAllocator::system();

const TOL: f64 = 1e-5;

/// Deterministic values in [−1, 1) (a hash, so no two tests share data by
/// accident when `salt` differs).
fn data(dims: &[usize], salt: u64) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n as u64)
        .map(|i| {
            let mut z = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ salt.wrapping_mul(0xD6E8_FEB8_6659_FD93);
            z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z ^= z >> 29;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// A loss that weights every output column differently (a plain sum would
/// give the dueling advantage stream zero gradient) plus a square term.
fn weighted_loss(weights: Tensor) -> impl Fn(&Tensor) -> gm_train::Result<Tensor> {
    move |out: &Tensor| Ok(out.mul(&weights)?.sum_all()?.add(&out.sqr()?.mean_all()?)?)
}

#[derive(Debug, Clone, Copy)]
struct Diff {
    /// `max |a − b| / max(1, |b|)`.
    scaled: f64,
    /// `max |a − b|`.
    abs: f64,
    /// Variables with a gradient.
    with_grad: usize,
}

fn compare(ckpt: &Grads, plain: &Grads) -> Diff {
    assert_eq!(ckpt.len(), plain.len());
    let mut d = Diff {
        scaled: 0.0,
        abs: 0.0,
        with_grad: 0,
    };
    for ((name, _, a), (name_b, _, b)) in ckpt.iter().zip(plain.iter()) {
        assert_eq!(name, name_b);
        match (a, b) {
            (None, None) => {}
            (Some(a), Some(b)) => {
                d.with_grad += 1;
                let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (x, y) in a.iter().zip(&b) {
                    let (x, y) = (f64::from(*x), f64::from(*y));
                    assert!(x.is_finite() && y.is_finite(), "{name}: {x} vs {y}");
                    d.abs = d.abs.max((x - y).abs());
                    d.scaled = d.scaled.max((x - y).abs() / y.abs().max(1.0));
                }
            }
            (a, b) => panic!(
                "{name}: checkpointed has a gradient: {}, plain: {}",
                a.is_some(),
                b.is_some()
            ),
        }
    }
    d
}

/// Asserts equal losses and gradients within the metric; prints the figures.
fn check(what: &str, ckpt: (f32, Grads), plain: (f32, Grads)) -> Diff {
    let d = compare(&ckpt.1, &plain.1);
    let dl = (f64::from(ckpt.0) - f64::from(plain.0)).abs();
    println!(
        "{what}: loss {} vs {} (|Δ| {dl:.2e}); grads of {} vars: max scaled diff {:.2e}, max abs diff {:.2e}",
        ckpt.0, plain.0, d.with_grad, d.scaled, d.abs
    );
    assert!(
        dl <= TOL * f64::from(plain.0).abs().max(1.0),
        "{what}: loss"
    );
    assert!(d.scaled <= TOL, "{what}: gradient difference {d:?}");
    assert!(d.with_grad > 0, "{what}: no gradient at all");
    d
}

fn builder(vm: &VarMap) -> VarBuilder<'static> {
    VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu)
}

const DROPOUT: [SegmentDropout; 2] = [SegmentDropout::Off, SegmentDropout::On { seed: 17 }];

/// Checkpointed vs plain for one model, every dropout setting and segment
/// count in `counts`.
fn check_model<M: Segmented>(what: &str, m: &M, vm: &VarMap, x: &Tensor, counts: &[usize]) {
    let out_dims = m.forward_segments(x, &mut ForwardCtx::eval()).unwrap();
    let loss = weighted_loss(data(out_dims.dims(), 99));
    for dropout in DROPOUT {
        let plain = plain_grads(m, vm, x, &loss, dropout).unwrap();
        for &segments in counts {
            let cfg = CheckpointConfig { segments, dropout };
            let ckpt = checkpointed_grads(m, vm, x, &loss, &cfg).unwrap();
            check(
                &format!("{what} {dropout:?} ckpt{segments}"),
                ckpt,
                plain.clone(),
            );
        }
    }
}

fn tiny_structure() -> StructureConfig {
    StructureConfig {
        model_dim: 16,
        heads: 2,
        blocks: 3,
        ffn_dim: 32,
        head_hidden_dim: 16,
        out_dim: 8,
        dropout: 0.2,
        ..StructureConfig::default()
    }
}

fn tiny_tactical() -> TacticalConfig {
    TacticalConfig {
        proj_dim: 16,
        momentum_channels: 4,
        lstm_layers: 3,
        lstm_hidden_dim: 8,
        scales: vec![5, 15],
        heads: 2,
        head_hidden_dim: 16,
        embed_dim: 8,
        dropout: 0.2,
        ..TacticalConfig::default()
    }
}

#[test]
fn structure_tiny_equals_plain_for_every_segment_count() {
    let vm = VarMap::new();
    let m = StructureEmbedder::new(tiny_structure(), builder(&vm)).unwrap();
    init_seeded(&vm, 1).unwrap();
    assert_eq!(m.segment_count(), 5);
    check_model(
        "structure tiny",
        &m,
        &vm,
        &data(&[4, 48, 8], 1),
        &[1, 2, 3, 4, 5, 9],
    );
}

#[test]
fn structure_full_size_equals_plain() {
    let vm = VarMap::new();
    let m = StructureEmbedder::new(StructureConfig::default(), builder(&vm)).unwrap();
    init_seeded(&vm, 2).unwrap();
    check_model("structure full", &m, &vm, &data(&[4, 48, 8], 2), &[4]);
}

#[test]
fn tactical_tiny_equals_plain_for_every_segment_count() {
    let vm = VarMap::new();
    let m = TacticalEmbedder::new(tiny_tactical(), builder(&vm)).unwrap();
    init_seeded(&vm, 3).unwrap();
    assert_eq!(m.segment_count(), 5);
    check_model(
        "tactical tiny",
        &m,
        &vm,
        &data(&[3, 60, 7], 3),
        &[1, 2, 4, 5],
    );
}

#[test]
fn tactical_full_size_equals_plain() {
    let vm = VarMap::new();
    let m = TacticalEmbedder::new(TacticalConfig::default(), builder(&vm)).unwrap();
    init_seeded(&vm, 4).unwrap();
    check_model("tactical full", &m, &vm, &data(&[2, 60, 7], 4), &[4]);
}

#[test]
fn regime_equals_plain() {
    let vm = VarMap::new();
    let cfg = RegimeConfig {
        dropout: 0.2,
        ..RegimeConfig::default()
    };
    let m = RegimeEmbedder::new(cfg, builder(&vm)).unwrap();
    init_seeded(&vm, 5).unwrap();
    assert_eq!(m.segments(4), vec![0..1, 1..2]);
    check_model("regime", &m, &vm, &data(&[6, 21, 8], 5), &[1, 2, 4]);
}

#[test]
fn lvn_equals_plain() {
    let vm = VarMap::new();
    let cfg = LvnConfig {
        dropout: 0.2,
        ..LvnConfig::default()
    };
    let m = LvnEmbedder::new(cfg, builder(&vm)).unwrap();
    init_seeded(&vm, 6).unwrap();
    check_model("lvn", &m, &vm, &data(&[6, 5], 6), &[1, 2, 4]);
}

#[test]
fn heads_equal_plain() {
    let vm = VarMap::new();
    let cfg = HeadsConfig::default();
    let m = AgentHeads::new(cfg.clone(), builder(&vm)).unwrap();
    init_seeded(&vm, 7).unwrap();
    check_model("heads", &m, &vm, &data(&[6, cfg.state_dim()], 7), &[1, 4]);
}

fn obs(batch: usize, salt: u64) -> ObsBatch {
    ObsBatch {
        structure: data(&[batch, 48, 8], salt),
        tactical: data(&[batch, 60, 7], salt + 1),
        regime: data(&[batch, 21, 8], salt + 2),
        lvn: data(&[batch, 5], salt + 3),
    }
}

/// The tiny agent with two blocks and two BiLSTM layers, so both big
/// embedders have middle segments, and more dropout.
fn tiny_agent() -> AgentConfig {
    let mut cfg = AgentConfig::tiny();
    cfg.structure.blocks = 2;
    cfg.structure.dropout = 0.2;
    cfg.tactical.lstm_layers = 2;
    cfg.tactical.dropout = 0.2;
    cfg.regime.lstm_layers = 2;
    cfg.regime.dropout = 0.2;
    cfg.lvn.dropout = 0.2;
    cfg
}

fn q_loss(batch: usize) -> impl Fn(&Tensor) -> gm_train::Result<Tensor> {
    weighted_loss(data(&[batch, 3], 123))
}

#[test]
fn tiny_agent_equals_plain() {
    let vm = VarMap::new();
    let net = AgentNet::new(&tiny_agent(), builder(&vm)).unwrap();
    init_seeded(&vm, 8).unwrap();
    let (b, o) = (4, obs(4, 10));
    for dropout in DROPOUT {
        let plain = agent_plain_grads(&net, &vm, &o, q_loss(b), dropout).unwrap();
        for segments in [1, 2, 4] {
            let cfg = CheckpointConfig { segments, dropout };
            let ckpt = agent_checkpointed_grads(&net, &vm, &o, q_loss(b), &cfg).unwrap();
            let d = check(
                &format!("agent tiny {dropout:?} ckpt{segments}"),
                ckpt,
                plain.clone(),
            );
            // Every variable but the σ heads and the value head (which the
            // Q loss does not reach) has a gradient.
            assert!(d.with_grad > 0);
        }
    }
}

#[test]
fn full_agent_equals_plain() {
    let vm = VarMap::new();
    let net = AgentNet::new(&AgentConfig::default(), builder(&vm)).unwrap();
    init_seeded(&vm, 9).unwrap();
    let dropout = SegmentDropout::On { seed: 5 };
    let o = obs(2, 20);
    let plain = agent_plain_grads(&net, &vm, &o, q_loss(2), dropout).unwrap();
    let cfg = CheckpointConfig {
        segments: 4,
        dropout,
    };
    let ckpt = agent_checkpointed_grads(&net, &vm, &o, q_loss(2), &cfg).unwrap();
    check("agent full On ckpt4", ckpt, plain);
}

/// With dropout off, the plain twin is backprop through `AgentNet::q_values`
/// itself, and the σ heads and the value head get no gradient in either.
#[test]
fn plain_twin_without_dropout_is_backprop_through_q_values() {
    let vm = VarMap::new();
    let net = AgentNet::new(&tiny_agent(), builder(&vm)).unwrap();
    init_seeded(&vm, 11).unwrap();
    let o = obs(3, 30);
    let loss = q_loss(3);
    let q = net.q_values(&o, &mut ForwardCtx::eval()).unwrap();
    let direct_loss = loss(&q).unwrap();
    let direct = Grads::from_store(&vm, &direct_loss.backward().unwrap()).unwrap();
    let direct_value = direct_loss.to_scalar::<f32>().unwrap();
    let twin = agent_plain_grads(&net, &vm, &o, &loss, SegmentDropout::Off).unwrap();
    let d = check(
        "q_values vs plain twin",
        twin,
        (direct_value, direct.clone()),
    );
    assert_eq!(d.abs, 0.0, "same operations, same order");
    let cfg = CheckpointConfig::default();
    let ckpt = agent_checkpointed_grads(&net, &vm, &o, &loss, &cfg).unwrap();
    check("q_values vs ckpt4", ckpt.clone(), (direct_value, direct));
    for (name, _, g) in ckpt.1.iter() {
        let unreached = name.contains(".sigma.") || name.starts_with("heads.value.");
        assert_eq!(g.is_none(), unreached, "{name}");
    }
}

/// Dropout is really on (masks change the gradients), the masks follow the
/// seed, and the checkpointed run reproduces them.
#[test]
fn dropout_masks_follow_the_seed() {
    let vm = VarMap::new();
    let m = StructureEmbedder::new(tiny_structure(), builder(&vm)).unwrap();
    init_seeded(&vm, 12).unwrap();
    let x = data(&[2, 48, 8], 12);
    let loss = weighted_loss(data(&[2, 16], 13));
    let run = |seed: Option<u64>| {
        let dropout = seed.map_or(SegmentDropout::Off, |seed| SegmentDropout::On { seed });
        plain_grads(&m, &vm, &x, &loss, dropout).unwrap()
    };
    let (off, a, a2, b) = (run(None), run(Some(1)), run(Some(1)), run(Some(2)));
    assert_eq!(compare(&a.1, &a2.1).abs, 0.0);
    assert!(compare(&a.1, &b.1).abs > 1e-3);
    assert!(compare(&a.1, &off.1).abs > 1e-3);
    let cfg = CheckpointConfig {
        segments: 4,
        dropout: SegmentDropout::On { seed: 1 },
    };
    let ckpt = checkpointed_grads(&m, &vm, &x, &loss, &cfg).unwrap();
    check("structure tiny seed 1", ckpt, a);
}

#[test]
fn bad_config_and_non_scalar_loss_are_errors() {
    let vm = VarMap::new();
    let m = LvnEmbedder::new(LvnConfig::default(), builder(&vm)).unwrap();
    let x = data(&[2, 5], 1);
    let cfg = CheckpointConfig {
        segments: 0,
        ..CheckpointConfig::default()
    };
    let sum = |t: &Tensor| Ok(t.sum_all()?);
    assert!(checkpointed_grads(&m, &vm, &x, sum, &cfg).is_err());
    let not_scalar = |t: &Tensor| Ok(t.clone());
    let cfg = CheckpointConfig::default();
    assert!(checkpointed_grads(&m, &vm, &x, not_scalar, &cfg).is_err());
    assert!(plain_grads(&m, &vm, &x, not_scalar, SegmentDropout::Off).is_err());
    assert!(checkpointed_grads(&m, &vm, &data(&[2, 6], 1), sum, &cfg).is_err());
}

/// Peak bytes this thread held during one forward + backward.
fn peak(f: impl FnOnce() -> (f32, Grads)) -> (u64, (f32, Grads)) {
    let (r, m) = gm_leak::measure_thread(f);
    (m.peak_net_bytes, r)
}

fn check_peak<M: Segmented>(what: &str, m: &M, vm: &VarMap, x: &Tensor) {
    let out = m.forward_segments(x, &mut ForwardCtx::eval()).unwrap();
    let loss = weighted_loss(data(out.dims(), 77));
    drop(out);
    let dropout = SegmentDropout::On { seed: 3 };
    let cfg = CheckpointConfig {
        segments: 4,
        dropout,
    };
    let (plain_peak, plain) = peak(|| plain_grads(m, vm, x, &loss, dropout).unwrap());
    let (ckpt_peak, ckpt) = peak(|| checkpointed_grads(m, vm, x, &loss, &cfg).unwrap());
    println!(
        "{what}: fwd+bwd peak plain {:.1} MiB, checkpointed (4) {:.1} MiB ({:.0} % lower)",
        plain_peak as f64 / 1048576.0,
        ckpt_peak as f64 / 1048576.0,
        100.0 * (1.0 - ckpt_peak as f64 / plain_peak as f64)
    );
    check(what, ckpt, plain);
    assert!(
        ckpt_peak < plain_peak,
        "{what}: checkpointed {ckpt_peak} B vs plain {plain_peak} B"
    );
}

#[test]
fn checkpointing_lowers_the_measured_peak() {
    assert!(gm_leak::is_active());
    let vm = VarMap::new();
    let s = StructureEmbedder::new(StructureConfig::default(), builder(&vm).pp("s")).unwrap();
    let t = TacticalEmbedder::new(TacticalConfig::default(), builder(&vm).pp("t")).unwrap();
    init_seeded(&vm, 13).unwrap();
    check_peak("structure full b64", &s, &vm, &data(&[64, 48, 8], 14));
    check_peak("tactical full b8", &t, &vm, &data(&[8, 60, 7], 15));
}

/// The model's own forward is what the segments compute (the contract the
/// plain twin relies on), for a full-size structure embedder.
#[test]
fn full_structure_forward_equals_its_segments() {
    let vm = VarMap::new();
    let m = StructureEmbedder::new(StructureConfig::default(), builder(&vm)).unwrap();
    init_seeded(&vm, 16).unwrap();
    let x = data(&[3, 48, 8], 16);
    let e = m.forward(&x, &mut ForwardCtx::train(4)).unwrap();
    let packed = m.forward_segments(&x, &mut ForwardCtx::train(4)).unwrap();
    let direct = Tensor::cat(&[e.mu, e.sigma], 1).unwrap();
    let diff = direct
        .sub(&packed)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
}
