//! Behaviour of the tactical embedder: shapes, gradients to every variable,
//! determinism and weights round trips, Monte-Carlo dropout, bf16 against
//! f32, and the momentum-scaled positional encoding.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gm_models::layers::vars_without_gradient;
use gm_models::{weights, Embedder, Error, ForwardCtx, TacticalConfig, TacticalEmbedder};

fn model(cfg: TacticalConfig, dtype: DType) -> Result<(VarMap, TacticalEmbedder)> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
    let m = TacticalEmbedder::new(cfg, vb)?;
    gm_models::init::init_seeded(&vm, next_seed())?;
    Ok((vm, m))
}

/// A seed per model built in this test: the test's name (libtest names the
/// thread after it) and how many models the test built before, so every
/// run of a test starts from the same weights (candle cannot seed its CPU
/// generator; `gm_models::init::init_seeded` overwrites them).
fn next_seed() -> u64 {
    use std::hash::{Hash, Hasher};
    thread_local! {
        static BUILT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::thread::current().name().unwrap_or("main").hash(&mut h);
    let k = BUILT.with(|b| {
        let k = b.get();
        b.set(k + 1);
        k
    });
    h.finish() ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// A deterministic `[b, 60, 7]` input (no RNG involved).
fn input(b: usize, phase: f32) -> Result<Tensor> {
    let v: Vec<f32> = (0..b * 60 * 7)
        .map(|i| ((i as f32) * 0.37 + phase).sin() + 0.1 * ((i % 7) as f32))
        .collect();
    Ok(Tensor::from_vec(v, (b, 60, 7), &Device::Cpu)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok(a.to_dtype(DType::F32)?
        .sub(&b.to_dtype(DType::F32)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?)
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

#[test]
fn output_shapes_and_positive_sigma() -> Result<()> {
    let (_vm, m) = model(TacticalConfig::default(), DType::F32)?;
    let e = m.forward(&input(3, 0.0)?, &mut ForwardCtx::eval())?;
    assert_eq!(e.mu.dims(), &[3, 48]);
    assert_eq!(e.sigma.dims(), &[3, 48]);
    assert!(flat(&e.mu)?.iter().all(|v| v.is_finite()));
    assert!(flat(&e.sigma)?.iter().all(|v| v.is_finite() && *v > 0.0));
    // f64 input is converted to the model's dtype.
    let e64 = m.forward(
        &input(3, 0.0)?.to_dtype(DType::F64)?,
        &mut ForwardCtx::eval(),
    )?;
    assert_eq!(e64.mu.dtype(), DType::F32);
    Ok(())
}

#[test]
fn bad_input_shapes_are_shape_errors() -> Result<()> {
    let (_vm, m) = model(TacticalConfig::default(), DType::F32)?;
    let dev = Device::Cpu;
    let bad = [
        Tensor::zeros((2, 59, 7), DType::F32, &dev)?,
        Tensor::zeros((2, 60, 8), DType::F32, &dev)?,
        Tensor::zeros((60, 7), DType::F32, &dev)?,
        Tensor::zeros((0, 60, 7), DType::F32, &dev)?,
    ];
    for x in &bad {
        match m.forward(x, &mut ForwardCtx::eval()) {
            Err(Error::Shape { what, got, .. }) => {
                assert_eq!(what, "tactical input");
                assert_eq!(got, x.dims());
            }
            other => panic!("{:?}: expected a shape error, got {other:?}", x.dims()),
        }
    }
    let e = m.momentum_scale(&bad[0]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "tactical input: expected shape [B, 60, 7], got [2, 59, 7]"
    );
    Ok(())
}

#[test]
fn config_validation_names_the_key() {
    let cases: Vec<(TacticalConfig, &str)> = vec![
        (
            TacticalConfig {
                dropout: 1.0,
                ..Default::default()
            },
            "dropout",
        ),
        (
            TacticalConfig {
                scales: vec![],
                ..Default::default()
            },
            "scales",
        ),
        (
            TacticalConfig {
                scales: vec![5, 61],
                ..Default::default()
            },
            "scales",
        ),
        (
            TacticalConfig {
                heads: 3,
                ..Default::default()
            },
            "heads",
        ),
        (
            TacticalConfig {
                momentum_kernel: 4,
                ..Default::default()
            },
            "momentum_kernel",
        ),
        (
            TacticalConfig {
                lstm_layers: 0,
                ..Default::default()
            },
            "lstm_layers",
        ),
    ];
    for (cfg, want) in cases {
        match cfg.validate() {
            Err(Error::Config { key, allowed, .. }) => {
                assert_eq!(key, want);
                assert!(!allowed.is_empty());
            }
            other => panic!("{want}: expected a config error, got {other:?}"),
        }
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        assert!(matches!(
            TacticalEmbedder::new(cfg, vb),
            Err(Error::Config { .. })
        ));
    }
    TacticalConfig::default().validate().unwrap();
    let e = TacticalConfig {
        scales: vec![5, 61],
        ..Default::default()
    }
    .validate()
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid config: scales = [5, 61]: windows in 1..=60 steps (seq_len); 61 is not"
    );
}

#[test]
fn parameter_count_matches_the_created_variables() -> Result<()> {
    let cfg = TacticalConfig::default();
    let (vm, _m) = model(cfg.clone(), DType::F32)?;
    let created: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
    println!("tactical embedder parameters: {created}");
    assert_eq!(created, cfg.parameter_count());
    assert_eq!(created, 2_520_896);
    Ok(())
}

#[test]
fn every_variable_receives_a_gradient() -> Result<()> {
    let (vm, m) = model(TacticalConfig::default(), DType::F32)?;
    let start = Instant::now();
    // Dropout on, so the gradient goes through the training path.
    let e = m.forward(&input(2, 0.3)?, &mut ForwardCtx::train(7))?;
    let dev = Device::Cpu;
    let wm = Tensor::randn(0f32, 1.0, e.mu.dims(), &dev)?;
    let ws = Tensor::randn(0f32, 1.0, e.sigma.dims(), &dev)?;
    let loss =
        e.mu.mul(&wm)?
            .sum_all()?
            .add(&e.sigma.mul(&ws)?.sum_all()?)?;
    let forward = start.elapsed();
    let missing = vars_without_gradient(&vm, &loss)?;
    println!(
        "B=2 forward {forward:?}, forward + backward {:?}",
        start.elapsed()
    );
    assert_eq!(missing, Vec::<String>::new());

    // "Non-zero" is not enough: a bias that a softmax ignores (a key bias,
    // a score bias) gets pure rounding noise, which passes the check above.
    // Measured, relative to the largest gradient entry of the model: such a
    // bias ~2e-9, the weakest real variable (a query bias) ~7e-4. Every
    // variable's largest entry must be above 1e-6 of the model's largest.
    let grads = loss.backward()?;
    let mut largest = Vec::new();
    for (name, var) in vm.data().lock().expect("unpoisoned").iter() {
        let g = grads.get(var.as_tensor()).expect("checked above");
        largest.push((g.abs()?.max_all()?.to_scalar::<f32>()?, name.clone()));
    }
    let top = largest.iter().fold(0f32, |m, (g, _)| m.max(*g));
    let low = largest.iter().fold(
        (f32::MAX, ""),
        |m, (g, n)| {
            if *g < m.0 {
                (*g, n.as_str())
            } else {
                m
            }
        },
    );
    println!(
        "largest gradient {top:e}; weakest variable {} at {:e}",
        low.1, low.0
    );
    let weak: Vec<_> = largest.iter().filter(|(g, _)| *g < 1e-6 * top).collect();
    assert!(
        weak.is_empty(),
        "negligible gradients: {weak:?} (top {top})"
    );
    Ok(())
}

#[test]
fn eval_is_deterministic_and_weights_round_trip() -> Result<()> {
    let cfg = TacticalConfig::default();
    let (vm, m) = model(cfg.clone(), DType::F32)?;
    let x = input(2, 1.0)?;
    let a = m.forward(&x, &mut ForwardCtx::eval())?;
    let b = m.forward(&x, &mut ForwardCtx::eval())?;
    assert_eq!(flat(&a.mu)?, flat(&b.mu)?);
    assert_eq!(flat(&a.sigma)?, flat(&b.sigma)?);

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tactical.safetensors");
    weights::save(&vm, &path)?;
    let (vm2, m2) = model(cfg.clone(), DType::F32)?;
    let before = m2.forward(&x, &mut ForwardCtx::eval())?;
    assert_ne!(flat(&before.mu)?, flat(&a.mu)?, "fresh models differ");
    weights::load(&vm2, &path)?;
    let c = m2.forward(&x, &mut ForwardCtx::eval())?;
    assert_eq!(flat(&c.mu)?, flat(&a.mu)?);
    assert_eq!(flat(&c.sigma)?, flat(&a.sigma)?);

    // A file without one tensor is rejected with its name, and changes nothing.
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    assert!(tensors.remove("scale.1.k.weight").is_some());
    let partial = dir.path().join("partial.safetensors");
    candle_core::safetensors::save(&tensors, &partial)?;
    let (vm3, m3) = model(cfg, DType::F32)?;
    let untouched = m3.forward(&x, &mut ForwardCtx::eval())?;
    match weights::load(&vm3, &partial) {
        Err(Error::Weights { path, reason }) => {
            assert_eq!(path, partial);
            assert!(reason.contains("scale.1.k.weight"), "{reason}");
        }
        other => panic!("expected a weights error, got {other:?}"),
    }
    let still = m3.forward(&x, &mut ForwardCtx::eval())?;
    assert_eq!(flat(&still.mu)?, flat(&untouched.mu)?);
    Ok(())
}

#[test]
fn mc_dropout_variance_follows_the_dropout_probability() -> Result<()> {
    let x = input(2, 2.0)?;
    let (_vm, m) = model(TacticalConfig::default(), DType::F32)?;
    let mc = m.mc_dropout(&x, 3, 11)?;
    assert_eq!(mc.passes, 3);
    assert_eq!(mc.mean.dims(), &[2, 48]);
    let var = flat(&mc.variance)?;
    assert!(var.iter().all(|v| *v >= 0.0));
    assert!(var.iter().sum::<f32>() > 0.0, "dropout 0.1 must vary");
    // Seeded: the same seed gives the same passes.
    assert_eq!(flat(&m.mc_dropout(&x, 3, 11)?.mean)?, flat(&mc.mean)?);

    let cfg = TacticalConfig {
        dropout: 0.0,
        ..Default::default()
    };
    let (_vm, m0) = model(cfg, DType::F32)?;
    let mc0 = m0.mc_dropout(&x, 2, 11)?;
    assert!(flat(&mc0.variance)?.iter().all(|v| *v == 0.0));
    Ok(())
}

/// bf16 keeps ~8 bits of mantissa (relative rounding 2⁻⁸ ≈ 0.4 %) in
/// every parameter, activation and the 60 × 3 × 2 recurrent steps; the
/// tolerance is loose: each output within 0.05 + 5 % of the f32 range.
#[test]
fn bf16_forward_is_close_to_f32() -> Result<()> {
    let cfg = TacticalConfig::default();
    let (vm32, m32) = model(cfg.clone(), DType::F32)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tactical.safetensors");
    weights::save(&vm32, &path)?;
    let (vm16, m16) = model(cfg, DType::BF16)?;
    weights::load(&vm16, &path)?;
    let x = input(2, 0.5)?;
    let a = m32.forward(&x, &mut ForwardCtx::eval())?;
    let b = m16.forward(&x, &mut ForwardCtx::eval())?;
    assert_eq!(b.mu.dtype(), DType::BF16);
    for (name, f, h) in [("mu", &a.mu, &b.mu), ("sigma", &a.sigma, &b.sigma)] {
        let range = flat(f)?.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(f, h)?;
        println!("{name}: max |f32 − bf16| = {diff}, max |f32| = {range}");
        assert!(
            diff <= 0.05 + 0.05 * range,
            "{name}: {diff} (range {range})"
        );
    }
    assert!(flat(&b.sigma)?.iter().all(|v| *v > 0.0));
    Ok(())
}

#[test]
fn momentum_scale_follows_the_input_and_averages_one() -> Result<()> {
    let (_vm, m) = model(TacticalConfig::default(), DType::F32)?;
    let dev = Device::Cpu;
    // A flat window and a rising one (different momentum).
    let flat_in = Tensor::ones((1, 60, 7), DType::F32, &dev)?;
    let ramp: Vec<f32> = (0..60 * 7).map(|i| (i / 7) as f32 / 10.0).collect();
    let ramp = Tensor::from_vec(ramp, (1, 60, 7), &dev)?;
    let both = Tensor::cat(&[&flat_in, &ramp], 0)?;
    let s = m.momentum_scale(&both)?;
    assert_eq!(s.dims(), &[2, 60, 1]);
    for row in s.squeeze(2)?.to_vec2::<f32>()? {
        assert!(row.iter().all(|v| *v > 0.0));
        let mean = row.iter().sum::<f32>() / 60.0;
        assert!((mean - 1.0).abs() < 1e-4, "{mean}");
    }
    let d = max_abs_diff(&s.narrow(0, 0, 1)?, &s.narrow(0, 1, 1)?)?;
    assert!(d > 1e-3, "scales differ by only {d}");
    // Different windows, different embeddings.
    let e = m.forward(&both, &mut ForwardCtx::eval())?;
    assert!(max_abs_diff(&e.mu.narrow(0, 0, 1)?, &e.mu.narrow(0, 1, 1)?)? > 0.0);
    Ok(())
}

/// Release timings for the report, B = 32, the fastest of 5 runs (the
/// build machines are shared; means wander with their load):
/// `cargo test --release -p gm-models --test tactical -- --ignored --nocapture`.
#[test]
#[ignore = "timing report, run in release"]
fn timing_b32() -> Result<()> {
    let (vm, m) = model(TacticalConfig::default(), DType::F32)?;
    let x = input(32, 0.0)?;
    m.forward(&x, &mut ForwardCtx::eval())?; // warm-up
    let runs = 5;
    for (label, train) in [("eval", false), ("train (dropout on)", true)] {
        let mut fwd = f64::MAX;
        let mut bwd = f64::MAX;
        for r in 0..runs {
            let mut ctx = if train {
                ForwardCtx::train(r)
            } else {
                ForwardCtx::eval()
            };
            let t0 = Instant::now();
            let e = m.forward(&x, &mut ctx)?;
            let loss = e.mu.sqr()?.sum_all()?.add(&e.sigma.sum_all()?)?;
            let _ = loss.to_scalar::<f32>()?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            let t2 = Instant::now();
            assert!(grads.get(vm.all_vars()[0].as_tensor()).is_some());
            fwd = fwd.min((t1 - t0).as_secs_f64());
            bwd = bwd.min((t2 - t1).as_secs_f64());
        }
        println!(
            "B=32 {label}: forward {:.0} ms, backward {:.0} ms (fastest of {runs})",
            1e3 * fwd,
            1e3 * bwd
        );
    }
    Ok(())
}
