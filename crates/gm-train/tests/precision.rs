//! Mixed precision: the bf16/f16 working copy back-propagates f32
//! gradients into the master weights, the f16 loss scaler skips and backs
//! off on overflow and grows after its interval, a short bf16 (and f16)
//! training run matches f32, and the activation peaks of bf16 vs f32 are
//! measured with the counting allocator.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gm_market::OBS_DIM;
use gm_models::{ForwardCtx, Linear};
use gm_train::{
    AdamW, AdamWConfig, AgentConfig, AgentNet, Grads, LossScaler, LossScalerConfig, MixedPrecision,
    ObsBatch, Precision,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[global_allocator]
static A: gm_leak::TrackingAllocator = gm_leak::TrackingAllocator::system();

/// `batch` seeded observations in [-1, 1) and learnable Q targets `[B, 3]`.
fn synthetic(batch: usize, seed: u64) -> (ObsBatch, Tensor) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let obs: Vec<f32> = (0..batch * OBS_DIM)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let mut t = Vec::with_capacity(batch * 3);
    for o in obs.chunks(OBS_DIM) {
        let s = (4.0 * o[..384].iter().step_by(8).sum::<f32>() / 48.0).tanh();
        let l = o[OBS_DIM - 5..].iter().sum::<f32>() / 5.0;
        t.extend([s, l, s - l]);
    }
    let dev = Device::Cpu;
    (
        ObsBatch::from_flat(&obs, batch, &dev).unwrap(),
        Tensor::from_vec(t, (batch, 3), &dev).unwrap(),
    )
}

/// A seeded f32 master map holding the agent's variables.
fn master(cfg: &AgentConfig) -> VarMap {
    let vm = VarMap::new();
    AgentNet::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    gm_models::init::init_seeded(&vm, 1).unwrap();
    vm
}

/// Mean squared error in f32 of the working model's Q-values.
fn mse(net: &AgentNet, obs: &ObsBatch, target: &Tensor) -> Tensor {
    let q = net.q_values(obs, &mut ForwardCtx::eval()).unwrap();
    q.to_dtype(DType::F32)
        .unwrap()
        .sub(target)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
}

fn snapshot(vm: &VarMap) -> Vec<(String, Vec<f32>)> {
    let data = vm.data().lock().unwrap();
    let mut v: Vec<_> = data
        .iter()
        .map(|(n, var)| {
            (
                n.clone(),
                var.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn low_precision_working_copy_sends_f32_gradients_to_every_master_variable() {
    let dev = Device::Cpu;
    let cfg = AgentConfig::tiny();
    let vm = master(&cfg);
    let (obs, target) = synthetic(4, 7);

    // The trap the working builder avoids: from_varmap ignores the dtype
    // for names the map already holds and hands back the f32 variables.
    let (name, dims) = {
        let data = vm.data().lock().unwrap();
        let (n, v) = data.iter().next().unwrap();
        (n.clone(), v.dims().to_vec())
    };
    let trap = VarBuilder::from_varmap(&vm, DType::BF16, &dev);
    assert_eq!(
        trap.get(dims.as_slice(), &name).unwrap().dtype(),
        DType::F32
    );

    // The f32 reference gradients (the Q loss does not reach the σ heads,
    // in any precision).
    let reference = {
        let net = AgentNet::new(&cfg, Precision::F32.working_builder(&vm, &dev).unwrap()).unwrap();
        Grads::from_store(&vm, &mse(&net, &obs, &target).backward().unwrap()).unwrap()
    };
    let with_grad = reference.iter().filter(|(_, _, g)| g.is_some()).count();
    assert!(
        with_grad > reference.len() / 2,
        "{with_grad} of {}",
        reference.len()
    );
    // (precision, loss scale) → (global cosine, worst per-variable cosine)
    // of its unscaled gradients against f32.
    let mut worst = Vec::new();
    for (p, scale) in [
        (Precision::Bf16, 1.0),
        (Precision::F16, 1.0),
        (Precision::F16, 65536.0),
    ] {
        let net = AgentNet::new(&cfg, p.working_builder(&vm, &dev).unwrap()).unwrap();
        let q = net.q_values(&obs, &mut ForwardCtx::eval()).unwrap();
        assert_eq!(q.dtype(), p.dtype(), "the forward runs in {p:?}");
        let store = mse(&net, &obs, &target)
            .affine(scale, 0.0)
            .unwrap()
            .backward()
            .unwrap();
        let mut low = Grads::from_store(&vm, &store).unwrap();
        low.scale(1.0 / scale).unwrap();
        let mut total = [0f64; 3];
        let mut worst_var = (1f64, String::new());
        for ((name, var, r), (_, _, l)) in reference.iter().zip(low.iter()) {
            let Some(r) = r else {
                assert!(
                    l.is_none(),
                    "{p:?}: {name} has a gradient only in low precision"
                );
                continue;
            };
            // The master variable itself received an f32 gradient.
            let g = store
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{p:?}: no gradient for {name}"));
            assert_eq!(g.dtype(), DType::F32, "{p:?}: {name}");
            assert_eq!(g.dims(), var.dims());
            let r = r.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let l = l.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut v = [0f64; 3];
            for (a, b) in r.iter().zip(&l) {
                let (a, b) = (f64::from(*a), f64::from(*b));
                v[0] += a * b;
                v[1] += a * a;
                v[2] += b * b;
            }
            let cos = v[0] / (v[1].sqrt() * v[2].sqrt());
            if cos < worst_var.0 {
                worst_var = (cos, name.to_string());
            }
            (0..3).for_each(|i| total[i] += v[i]);
        }
        let cosine = total[0] / (total[1].sqrt() * total[2].sqrt());
        println!(
            "{p:?}, loss scale {scale}: gradient cosine vs f32 {cosine:.4}, worst variable {} at {:.3}",
            worst_var.1, worst_var.0
        );
        assert!(cosine > 0.99, "{p:?}: cosine {cosine}");
        worst.push(worst_var.0);
    }
    // Without scaling some f16 gradients underflow; 2^16 rescues them.
    assert!(worst[2] > worst[1] + 0.2, "{worst:?}");
    // The builder never invents variables and refuses non-f32 masters.
    let vb = Precision::Bf16.working_builder(&vm, &dev).unwrap();
    assert!(vb.get(3, "not.a.variable").is_err());
    let bad = VarMap::new();
    VarBuilder::from_varmap(&bad, DType::F16, &dev)
        .get(2, "w")
        .unwrap();
    assert!(Precision::Bf16.working_builder(&bad, &dev).is_err());
}

/// A 4 → 1 linear layer on f32 masters, its bias zero and weight fixed.
fn linear_master() -> (VarMap, Linear) {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let lin = Linear::new(4, 1, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    gm_models::init::init_seeded(&vm, 3).unwrap();
    (vm, lin)
}

/// `factor × mean(linear(x))` through an f16 working copy, scaled.
fn scaled_f16_grads(vm: &VarMap, x: &Tensor, factor: f64, scaler: &LossScaler) -> Grads {
    let vb = Precision::F16.working_builder(vm, &Device::Cpu).unwrap();
    let lin = Linear::new(4, 1, vb).unwrap();
    let x = x.to_dtype(DType::F16).unwrap();
    let y = candle_core::Module::forward(&lin, &x).unwrap();
    let loss = y
        .to_dtype(DType::F32)
        .unwrap()
        .mean_all()
        .unwrap()
        .affine(factor, 0.0)
        .unwrap();
    let store = scaler.scale_loss(&loss).unwrap().backward().unwrap();
    Grads::from_store(vm, &store).unwrap()
}

#[test]
fn f16_overflow_skips_the_step_and_halves_the_scale_until_it_fits() {
    let dev = Device::Cpu;
    let (vm, _) = linear_master();
    let x = Tensor::new(&[[0.5f32, -1.0, 0.25, 1.0]], &dev).unwrap();
    // d(100 · y)/dy = 100; at S = 2^16 the f16 gradient of y is 6.5e6 >
    // 65504 (f16's max): inf. It fits once S·100 ≤ 65504, i.e. S = 512,
    // after 7 halvings.
    let mut scaler = LossScaler::default();
    let mut opt = AdamW::new(AdamWConfig::default(), 2).unwrap();
    let before = snapshot(&vm);

    let mut g = scaled_f16_grads(&vm, &x, 100.0, &scaler);
    assert!(
        !g.all_finite().unwrap(),
        "the scaled f16 gradient overflows"
    );
    assert!(!scaler.step(&mut g, &mut opt).unwrap(), "step skipped");
    assert_eq!(
        snapshot(&vm),
        before,
        "the optimizer did not move the weights"
    );
    assert_eq!(opt.step, 0);
    assert_eq!(scaler.scale(), 32768.0, "scale halved");
    assert_eq!((scaler.skipped_steps, scaler.growth_tracker), (1, 0));

    let mut stepped = false;
    for _ in 0..10 {
        let mut g = scaled_f16_grads(&vm, &x, 100.0, &scaler);
        if scaler.step(&mut g, &mut opt).unwrap() {
            // The unscaled gradient is the true one: d/dw = 100·x, d/db = 100.
            let (_, _, gb) = g.iter().find(|(n, _, _)| *n == "bias").unwrap();
            assert_eq!(gb.unwrap().to_vec1::<f32>().unwrap(), [100.0]);
            let (_, _, gw) = g.iter().find(|(n, _, _)| *n == "weight").unwrap();
            assert_eq!(
                gw.unwrap().to_vec2::<f32>().unwrap(),
                [[50.0, -100.0, 25.0, 100.0]]
            );
            stepped = true;
            break;
        }
    }
    assert!(stepped);
    assert_eq!((scaler.scale(), scaler.skipped_steps), (512.0, 7));
    assert_eq!(opt.step, 1);
    assert_ne!(snapshot(&vm), before, "the clean step moved the weights");
}

#[test]
fn f16_scale_grows_after_the_interval_of_clean_steps() {
    let dev = Device::Cpu;
    let (vm, _) = linear_master();
    let x = Tensor::new(&[[0.5f32, -1.0, 0.25, 1.0]], &dev).unwrap();
    let mut mp = MixedPrecision {
        precision: Precision::F16,
        scaler: Some(
            LossScaler::new(LossScalerConfig {
                init_scale: 256.0,
                growth_interval: 5,
                ..LossScalerConfig::default()
            })
            .unwrap(),
        ),
    };
    let mut opt = AdamW::new(AdamWConfig::default(), 2).unwrap();
    let mut scales = Vec::new();
    for _ in 0..12 {
        let scaler = mp.scaler.clone().unwrap();
        let mut g = scaled_f16_grads(&vm, &x, 1.0, &scaler);
        assert!(mp.step(&mut g, &mut opt).unwrap());
        scales.push(mp.scaler.as_ref().unwrap().scale());
    }
    assert_eq!(
        scales,
        [256.0, 256.0, 256.0, 256.0, 512.0, 512.0, 512.0, 512.0, 512.0, 1024.0, 1024.0, 1024.0]
    );
    let s = mp.scaler.as_ref().unwrap();
    assert_eq!((s.growth_tracker, s.skipped_steps), (2, 0));
    assert_eq!(opt.step, 12);
    // Checkpointable: the state round-trips through JSON.
    let json = serde_json::to_string(&mp).unwrap();
    assert_eq!(serde_json::from_str::<MixedPrecision>(&json).unwrap(), mp);
}

/// Trains the tiny agent on one fixed batch for `steps` AdamW steps in
/// `precision`; returns the f32 loss of the master weights before and
/// after, and the skipped steps.
fn train(precision: Precision, steps: usize) -> (f32, f32, u64) {
    let dev = Device::Cpu;
    let cfg = AgentConfig::tiny();
    let vm = master(&cfg);
    let (obs, target) = synthetic(8, 3);
    let eval = |vm: &VarMap| {
        let net = AgentNet::new(&cfg, Precision::F32.working_builder(vm, &dev).unwrap()).unwrap();
        mse(&net, &obs, &target).to_scalar::<f32>().unwrap()
    };
    let start = eval(&vm);
    let mut mp = MixedPrecision::new(precision);
    let n = Grads::empty(&vm).unwrap().len();
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: 3e-3,
            ..AdamWConfig::default()
        },
        n,
    )
    .unwrap();
    for _ in 0..steps {
        let net = AgentNet::new(&cfg, mp.working_builder(&vm, &dev).unwrap()).unwrap();
        let loss = mse(&net, &obs, &target);
        let store = mp.scale_loss(&loss).unwrap().backward().unwrap();
        let mut g = Grads::from_store(&vm, &store).unwrap();
        mp.step(&mut g, &mut opt).unwrap();
    }
    let skipped = mp.scaler.map_or(0, |s| s.skipped_steps);
    (start, eval(&vm), skipped)
}

/// Tolerance: after 100 AdamW steps (lr 3e-3) on a fixed batch of 8, the
/// bf16 and f16 runs' final f32 losses are within 1 % of the starting loss
/// of the f32 run's, and every run is below 1 % of its start. Measured
/// (this machine): start 0.1025; final f32 5.6e-7, bf16 1.9e-5, f16 1.4e-6
/// (no f16 step skipped); bf16's floor is its 8-bit mantissa.
#[test]
fn bf16_and_f16_training_match_f32_within_tolerance() {
    const STEPS: usize = 100;
    let t0 = Instant::now();
    let (f32_run, bf16_run, f16_run) = std::thread::scope(|s| {
        let a = s.spawn(|| train(Precision::F32, STEPS));
        let b = s.spawn(|| train(Precision::Bf16, STEPS));
        let c = s.spawn(|| train(Precision::F16, STEPS));
        (a.join().unwrap(), b.join().unwrap(), c.join().unwrap())
    });
    println!(
        "{STEPS} AdamW steps, tiny agent, batch 8 ({:?}): start {:.4e}; final f32 {:.3e}, bf16 {:.3e}, f16 {:.3e} ({} f16 steps skipped)",
        t0.elapsed(),
        f32_run.0,
        f32_run.1,
        bf16_run.1,
        f16_run.1,
        f16_run.2
    );
    let start = f32_run.0;
    assert!((bf16_run.0 - start).abs() < 1e-6 && (f16_run.0 - start).abs() < 1e-6);
    for (name, (_, end, _)) in [("f32", f32_run), ("bf16", bf16_run), ("f16", f16_run)] {
        assert!(end < 0.01 * start, "{name}: {end} vs start {start}");
    }
    assert!((bf16_run.1 - f32_run.1).abs() < 0.01 * start);
    assert!((f16_run.1 - f32_run.1).abs() < 0.01 * start);
    assert_eq!(f16_run.2, 0, "no overflow at this loss size");
}

/// Prints (does not assert) the peak bytes one forward + backward allocates
/// on this thread in f32 and bf16, for the tiny and the full agent.
#[test]
fn measure_bf16_activation_peak_against_f32() {
    let dev = Device::Cpu;
    for (name, cfg, batch) in [
        ("tiny", AgentConfig::tiny(), 32),
        ("full", AgentConfig::default(), 8),
    ] {
        let vm = master(&cfg);
        let (obs, target) = synthetic(batch, 5);
        let mut peaks = Vec::new();
        for p in [Precision::F32, Precision::Bf16] {
            let (_, m) = gm_leak::measure_thread(|| {
                let net = AgentNet::new(&cfg, p.working_builder(&vm, &dev).unwrap()).unwrap();
                let store = mse(&net, &obs, &target).backward().unwrap();
                Grads::from_store(&vm, &store).unwrap()
            });
            peaks.push(m.peak_net_bytes);
            println!(
                "{name} agent, batch {batch}, {p:?}: forward+backward peak {:.1} MiB ({:?})",
                m.peak_net_bytes as f64 / (1 << 20) as f64,
                m.duration
            );
        }
        println!(
            "{name} agent, batch {batch}: bf16 peak / f32 peak = {:.2}",
            peaks[1] as f64 / peaks[0] as f64
        );
    }
}
