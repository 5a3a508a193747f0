//! Behaviour of the structure, regime and LVN embedders and the agent heads:
//! shapes, shape errors, gradients reaching every variable, determinism,
//! Monte-Carlo dropout, safetensors round trips and bad files, bf16, and
//! parameter counts.
//!
//! The embedder properties are written once, generically over [`Case`], and
//! instantiated per model by `embedder_suite!`.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use gm_models::layers::vars_without_gradient;
use gm_models::{
    Action, AgentHeads, Embedder, Error, ForwardCtx, HeadsConfig, LvnConfig, LvnEmbedder,
    RegimeConfig, RegimeEmbedder, StructureConfig, StructureEmbedder,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Uniform values in [-1, 1) from `seed` (candle's CPU RNG cannot be seeded).
fn input(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    values(a)
        .iter()
        .zip(values(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn max_abs(t: &Tensor) -> f32 {
    values(t).iter().map(|x| x.abs()).fold(0.0, f32::max)
}

fn parameters(vm: &VarMap) -> usize {
    vm.all_vars().iter().map(|v| v.elem_count()).sum()
}

/// A loss that touches every element of `a` and `b` with unequal weights.
fn projection_loss(a: &Tensor, b: &Tensor, seed: u64) -> Tensor {
    let wa = input(a.dims(), seed).to_dtype(a.dtype()).unwrap();
    let wb = input(b.dims(), seed + 1).to_dtype(b.dtype()).unwrap();
    a.mul(&wa)
        .unwrap()
        .sum_all()
        .unwrap()
        .add(&b.mul(&wb).unwrap().sum_all().unwrap())
        .unwrap()
}

/// One embedder under test.
trait Case {
    type Cfg: Clone;
    type Model: Embedder;
    /// The `what` of the input's shape error.
    const INPUT: &'static str;
    /// μ and σ width.
    const OUT: usize;
    /// Parameters with the default config (as documented in the module).
    const PARAMS: usize;
    fn cfg() -> Self::Cfg;
    fn with_dropout(cfg: &Self::Cfg, p: f32) -> Self::Cfg;
    /// A different, valid config (for counts and a mis-shaped file).
    fn other_cfg() -> Self::Cfg;
    fn parameter_count(cfg: &Self::Cfg) -> usize;
    fn build(cfg: &Self::Cfg, vb: VarBuilder) -> gm_models::Result<Self::Model>;
    fn input_shape(batch: usize) -> Vec<usize>;
    fn bad_shapes() -> Vec<Vec<usize>>;
}

struct Structure;
impl Case for Structure {
    type Cfg = StructureConfig;
    type Model = StructureEmbedder;
    const INPUT: &'static str = "structure input";
    const OUT: usize = 64;
    const PARAMS: usize = 621_056;
    fn cfg() -> StructureConfig {
        StructureConfig::default()
    }
    fn with_dropout(cfg: &StructureConfig, p: f32) -> StructureConfig {
        StructureConfig {
            dropout: p,
            ..cfg.clone()
        }
    }
    fn other_cfg() -> StructureConfig {
        StructureConfig {
            model_dim: 96,
            heads: 3,
            blocks: 2,
            ffn_dim: 200,
            ..StructureConfig::default()
        }
    }
    fn parameter_count(cfg: &StructureConfig) -> usize {
        cfg.parameter_count()
    }
    fn build(cfg: &StructureConfig, vb: VarBuilder) -> gm_models::Result<StructureEmbedder> {
        StructureEmbedder::new(cfg.clone(), vb)
    }
    fn input_shape(batch: usize) -> Vec<usize> {
        vec![batch, 48, 8]
    }
    fn bad_shapes() -> Vec<Vec<usize>> {
        vec![vec![2, 47, 8], vec![2, 48, 7], vec![48, 8]]
    }
}

struct Regime;
impl Case for Regime {
    type Cfg = RegimeConfig;
    type Model = RegimeEmbedder;
    const INPUT: &'static str = "regime packed input";
    const OUT: usize = 16;
    const PARAMS: usize = 20_449;
    fn cfg() -> RegimeConfig {
        RegimeConfig::default()
    }
    fn with_dropout(cfg: &RegimeConfig, p: f32) -> RegimeConfig {
        RegimeConfig {
            dropout: p,
            ..cfg.clone()
        }
    }
    fn other_cfg() -> RegimeConfig {
        RegimeConfig {
            token_dim: 12,
            lstm_hidden: 24,
            lstm_layers: 3,
            ..RegimeConfig::default()
        }
    }
    fn parameter_count(cfg: &RegimeConfig) -> usize {
        cfg.parameter_count()
    }
    fn build(cfg: &RegimeConfig, vb: VarBuilder) -> gm_models::Result<RegimeEmbedder> {
        RegimeEmbedder::new(cfg.clone(), vb)
    }
    fn input_shape(batch: usize) -> Vec<usize> {
        vec![batch, 21, 8]
    }
    fn bad_shapes() -> Vec<Vec<usize>> {
        vec![vec![2, 20, 8], vec![2, 21, 7], vec![2, 8]]
    }
}

struct Lvn;
impl Case for Lvn {
    type Cfg = LvnConfig;
    type Model = LvnEmbedder;
    const INPUT: &'static str = "lvn input";
    const OUT: usize = 8;
    const PARAMS: usize = 400;
    fn cfg() -> LvnConfig {
        LvnConfig::default()
    }
    fn with_dropout(cfg: &LvnConfig, p: f32) -> LvnConfig {
        LvnConfig {
            dropout: p,
            ..cfg.clone()
        }
    }
    fn other_cfg() -> LvnConfig {
        LvnConfig {
            hidden_dim: 12,
            ..LvnConfig::default()
        }
    }
    fn parameter_count(cfg: &LvnConfig) -> usize {
        cfg.parameter_count()
    }
    fn build(cfg: &LvnConfig, vb: VarBuilder) -> gm_models::Result<LvnEmbedder> {
        LvnEmbedder::new(cfg.clone(), vb)
    }
    fn input_shape(batch: usize) -> Vec<usize> {
        vec![batch, 5]
    }
    fn bad_shapes() -> Vec<Vec<usize>> {
        vec![vec![2, 4], vec![2, 5, 1], vec![5]]
    }
}

fn build<C: Case>(cfg: &C::Cfg, dtype: DType) -> (VarMap, C::Model) {
    let vm = VarMap::new();
    let model = C::build(cfg, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
    gm_models::init::init_seeded(&vm, next_seed()).unwrap();
    (vm, model)
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

fn eval_mu_sigma<M: Embedder>(m: &M, x: &Tensor) -> (Tensor, Tensor) {
    let e = m.forward(x, &mut ForwardCtx::eval()).unwrap();
    (e.mu, e.sigma)
}

fn shapes_and_positive_sigma<C: Case>() {
    let (_vm, m) = build::<C>(&C::cfg(), DType::F32);
    let x = input(&C::input_shape(3), 1);
    for mut ctx in [ForwardCtx::eval(), ForwardCtx::train(5)] {
        let e = m.forward(&x, &mut ctx).unwrap();
        assert_eq!(e.mu.dims(), &[3, C::OUT]);
        assert_eq!(e.sigma.dims(), &[3, C::OUT]);
        assert!(values(&e.mu).iter().all(|v| v.is_finite()));
        assert!(values(&e.sigma).iter().all(|v| *v > 0.0 && v.is_finite()));
    }
}

fn bad_input_shape_is_named<C: Case>() {
    let (_vm, m) = build::<C>(&C::cfg(), DType::F32);
    for shape in C::bad_shapes() {
        let x = Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu).unwrap();
        match m.forward(&x, &mut ForwardCtx::eval()) {
            Err(Error::Shape { what, got, .. }) => {
                assert_eq!(what, C::INPUT);
                assert_eq!(got, shape);
            }
            other => panic!("{shape:?}: expected a shape error, got {other:?}"),
        }
    }
}

/// Every variable of `vm` gets a gradient from `loss`, finite and well
/// above rounding noise: a parameter that softmax's shift invariance cuts
/// off (a key-projection or pooling-score bias) still gets ~1e-7 from
/// rounding, which `vars_without_gradient`'s non-zero check accepts.
fn assert_every_variable_learns(vm: &VarMap, loss: &Tensor) {
    assert!(loss.to_scalar::<f32>().unwrap().is_finite());
    assert_eq!(
        vars_without_gradient(vm, loss).unwrap(),
        Vec::<String>::new()
    );
    let grads = loss.backward().unwrap();
    let data = vm.data().lock().unwrap();
    for (name, var) in data.iter() {
        let g = values(grads.get(var.as_tensor()).unwrap());
        assert!(g.iter().all(|v| v.is_finite()), "{name}");
        let largest = g.iter().map(|v| v.abs()).fold(0.0, f32::max);
        assert!(largest > 1e-4, "{name}: largest gradient {largest}");
    }
}

fn every_variable_gets_gradient<C: Case>() {
    let (vm, m) = build::<C>(&C::cfg(), DType::F32);
    let x = input(&C::input_shape(4), 2);
    let e = m.forward(&x, &mut ForwardCtx::train(3)).unwrap();
    assert_every_variable_learns(&vm, &projection_loss(&e.mu, &e.sigma, 10));
}

fn deterministic<C: Case>() {
    let (_vm, m) = build::<C>(&C::cfg(), DType::F32);
    let x = input(&C::input_shape(2), 4);
    let (mu1, s1) = eval_mu_sigma(&m, &x);
    let (mu2, s2) = eval_mu_sigma(&m, &input(&C::input_shape(2), 4));
    assert_eq!(values(&mu1), values(&mu2));
    assert_eq!(values(&s1), values(&s2));
    // Dropout masks come from the context's seed.
    let a = m.forward(&x, &mut ForwardCtx::train(7)).unwrap().mu;
    let b = m.forward(&x, &mut ForwardCtx::train(7)).unwrap().mu;
    let c = m.forward(&x, &mut ForwardCtx::train(8)).unwrap().mu;
    assert_eq!(values(&a), values(&b));
    assert_ne!(values(&a), values(&c));
    assert_ne!(values(&a), values(&mu1));
}

fn mc_dropout_variance<C: Case>() {
    let x = input(&C::input_shape(3), 5);
    let (_vm, m) = build::<C>(&C::cfg(), DType::F32);
    let mc = m.mc_dropout(&x, 8, 11).unwrap();
    assert_eq!(mc.passes, 8);
    assert_eq!(mc.mean.dims(), &[3, C::OUT]);
    assert_eq!(mc.variance.dims(), &[3, C::OUT]);
    let var = values(&mc.variance);
    assert!(var.iter().all(|v| *v >= 0.0));
    assert!(var.iter().sum::<f32>() > 0.0, "{var:?}");
    // The same seed gives the same estimate.
    let again = m.mc_dropout(&x, 8, 11).unwrap();
    assert_eq!(values(&mc.mean), values(&again.mean));

    // With p = 0 every pass is the eval pass: variance exactly 0 (two
    // passes, so the mean (a + a) / 2 is exact).
    let (_vm, m0) = build::<C>(&C::with_dropout(&C::cfg(), 0.0), DType::F32);
    let mc0 = m0.mc_dropout(&x, 2, 11).unwrap();
    assert!(values(&mc0.variance).iter().all(|v| *v == 0.0));
    assert_eq!(values(&mc0.mean), values(&eval_mu_sigma(&m0, &x).0));
    assert!(m0.mc_dropout(&x, 0, 1).is_err());
}

fn save_load_round_trip<C: Case>() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let x = input(&C::input_shape(2), 6);
    let (vm_a, a) = build::<C>(&C::cfg(), DType::F32);
    gm_models::weights::save(&vm_a, &path).unwrap();
    let (mu_a, s_a) = eval_mu_sigma(&a, &x);
    let (vm_b, b) = build::<C>(&C::cfg(), DType::F32);
    let (vm_c, c) = build::<C>(&C::cfg(), DType::F32);
    // Fresh models have their own random initialisation...
    assert_ne!(values(&eval_mu_sigma(&b, &x).0), values(&mu_a));
    // ...and after loading the same file all three agree exactly.
    gm_models::weights::load(&vm_b, &path).unwrap();
    gm_models::weights::load(&vm_c, &path).unwrap();
    for m in [&b, &c] {
        let (mu, s) = eval_mu_sigma(m, &x);
        assert_eq!(values(&mu), values(&mu_a));
        assert_eq!(values(&s), values(&s_a));
    }
}

/// The weights of `vm` saved with one tensor removed, or replaced by one of
/// another shape.
fn save_edited(vm: &VarMap, name: &str, reshape: bool, path: &std::path::Path) {
    let edited = VarMap::new();
    {
        let src = vm.data().lock().unwrap();
        let mut dst = edited.data().lock().unwrap();
        for (k, v) in src.iter() {
            if k != name {
                dst.insert(k.clone(), v.clone());
            } else if reshape {
                let mut dims = v.dims().to_vec();
                dims[0] += 1;
                dst.insert(
                    k.clone(),
                    Var::zeros(dims.as_slice(), DType::F32, &Device::Cpu).unwrap(),
                );
            }
        }
    }
    gm_models::weights::save(&edited, path).unwrap();
}

fn weights_error_reason(r: gm_models::Result<()>) -> String {
    match r {
        Err(Error::Weights { reason, .. }) => reason,
        other => panic!("expected a weights error, got {other:?}"),
    }
}

fn bad_weights_files_are_named<C: Case>() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, _m) = build::<C>(&C::cfg(), DType::F32);
    let mut names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    // First, last and a middle tensor, missing and mis-shaped.
    for name in [&names[0], &names[names.len() / 2], &names[names.len() - 1]] {
        for reshape in [false, true] {
            let path = dir.path().join("bad.safetensors");
            save_edited(&vm, name, reshape, &path);
            let reason = weights_error_reason(gm_models::weights::load(&vm, &path));
            assert!(reason.contains(&format!("{name:?}")), "{reason}");
            let what = if reshape { "has shape" } else { "is missing" };
            assert!(reason.contains(what), "{reason}");
        }
    }
    // A file of another configuration.
    let path = dir.path().join("other.safetensors");
    let (other, _m) = build::<C>(&C::other_cfg(), DType::F32);
    gm_models::weights::save(&other, &path).unwrap();
    let reason = weights_error_reason(gm_models::weights::load(&vm, &path));
    assert!(
        names.iter().any(|n| reason.contains(n.as_str())),
        "{reason}"
    );
}

/// bf16 against f32 with the same weights. bf16 keeps 8 significant bits
/// (relative rounding ≈ 0.4 % per operation); through a few layers the
/// difference stays within a few percent of the output's magnitude, so the
/// tolerance is 5 % of the largest f32 value (at least 0.05 absolute).
fn bf16_close_to_f32<C: Case>() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let x = input(&C::input_shape(2), 7);
    let (vm32, m32) = build::<C>(&C::cfg(), DType::F32);
    gm_models::weights::save(&vm32, &path).unwrap();
    let (vm16, m16) = build::<C>(&C::cfg(), DType::BF16);
    gm_models::weights::load(&vm16, &path).unwrap();
    let (mu32, s32) = eval_mu_sigma(&m32, &x);
    let (mu16, s16) = eval_mu_sigma(&m16, &x); // f32 input, converted inside
    assert_eq!(mu16.dtype(), DType::BF16);
    for (a, b) in [(&mu32, &mu16), (&s32, &s16)] {
        let tol = (0.05 * max_abs(a)).max(0.05);
        let diff = max_abs_diff(a, b);
        assert!(diff <= tol, "bf16 differs by {diff} (tolerance {tol})");
    }
    assert!(values(&s16).iter().all(|v| *v > 0.0));
}

fn parameter_counts<C: Case>() {
    let (vm, _m) = build::<C>(&C::cfg(), DType::F32);
    assert_eq!(parameters(&vm), C::PARAMS);
    assert_eq!(C::parameter_count(&C::cfg()), C::PARAMS);
    let (vm, _m) = build::<C>(&C::other_cfg(), DType::F32);
    assert_eq!(parameters(&vm), C::parameter_count(&C::other_cfg()));
}

macro_rules! embedder_suite {
    ($name:ident, $case:ty) => {
        mod $name {
            use super::*;
            #[test]
            fn shapes_and_positive_sigma() {
                super::shapes_and_positive_sigma::<$case>();
            }
            #[test]
            fn bad_input_shape_is_named() {
                super::bad_input_shape_is_named::<$case>();
            }
            #[test]
            fn every_variable_gets_gradient() {
                super::every_variable_gets_gradient::<$case>();
            }
            #[test]
            fn deterministic() {
                super::deterministic::<$case>();
            }
            #[test]
            fn mc_dropout_variance() {
                super::mc_dropout_variance::<$case>();
            }
            #[test]
            fn save_load_round_trip() {
                super::save_load_round_trip::<$case>();
            }
            #[test]
            fn bad_weights_files_are_named() {
                super::bad_weights_files_are_named::<$case>();
            }
            #[test]
            fn bf16_close_to_f32() {
                super::bf16_close_to_f32::<$case>();
            }
            #[test]
            fn parameter_counts() {
                super::parameter_counts::<$case>();
            }
        }
    };
}

embedder_suite!(structure, Structure);
embedder_suite!(regime, Regime);
embedder_suite!(lvn, Lvn);

fn config_error_key(r: gm_models::Result<()>) -> &'static str {
    match r {
        Err(Error::Config { key, .. }) => key,
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn configs_validate() -> Result<()> {
    StructureConfig::default().validate()?;
    RegimeConfig::default().validate()?;
    LvnConfig::default().validate()?;
    HeadsConfig::default().validate()?;
    let s = StructureConfig::default;
    assert_eq!(
        config_error_key(StructureConfig { heads: 3, ..s() }.validate()),
        "heads"
    );
    assert_eq!(
        config_error_key(StructureConfig { blocks: 0, ..s() }.validate()),
        "blocks"
    );
    assert_eq!(
        config_error_key(
            StructureConfig {
                dropout: 1.0,
                ..s()
            }
            .validate()
        ),
        "dropout"
    );
    assert_eq!(
        config_error_key(
            StructureConfig {
                dropout: f32::NAN,
                ..s()
            }
            .validate()
        ),
        "dropout"
    );
    let r = RegimeConfig::default;
    assert_eq!(
        config_error_key(
            RegimeConfig {
                history_len: 1,
                ..r()
            }
            .validate()
        ),
        "history_len"
    );
    assert_eq!(
        config_error_key(
            RegimeConfig {
                dropout: -0.1,
                ..r()
            }
            .validate()
        ),
        "dropout"
    );
    assert_eq!(
        config_error_key(
            LvnConfig {
                hidden_dim: 0,
                ..LvnConfig::default()
            }
            .validate()
        ),
        "hidden_dim"
    );
    assert_eq!(
        config_error_key(
            HeadsConfig {
                tactical_dim: 0,
                ..HeadsConfig::default()
            }
            .validate()
        ),
        "tactical_dim"
    );
    // The constructors validate too.
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    assert!(matches!(
        StructureEmbedder::new(StructureConfig { heads: 5, ..s() }, vb),
        Err(Error::Config { key: "heads", .. })
    ));
    Ok(())
}

#[test]
fn structure_positions_are_fixed_and_order_matters() {
    let (vm, m) = build::<Structure>(&StructureConfig::default(), DType::F32);
    assert!(vm.data().lock().unwrap().keys().all(|k| !k.contains("pos")));
    let x = input(&[1, 48, 8], 8);
    let reversed = x
        .index_select(
            &Tensor::arange(0u32, 48, &Device::Cpu)
                .unwrap()
                .affine(-1.0, 47.0)
                .unwrap(),
            1,
        )
        .unwrap();
    let (a, _) = eval_mu_sigma(&m, &x);
    let (b, _) = eval_mu_sigma(&m, &reversed);
    assert!(max_abs_diff(&a, &b) > 1e-4, "the model ignores bar order");
    let pe = gm_models::structure::sinusoidal_positions(48, 128, DType::F32, &Device::Cpu).unwrap();
    let row0 = values(&pe.get(0).unwrap());
    assert!(row0.iter().step_by(2).all(|v| *v == 0.0)); // sin 0
    assert!(row0.iter().skip(1).step_by(2).all(|v| *v == 1.0)); // cos 0
}

fn regime_parts(batch: usize, seed: u64) -> (Tensor, Tensor, Tensor) {
    let packed = input(&[batch, 21, 8], seed);
    let history = packed.narrow(1, 0, 20).unwrap();
    let current = packed.narrow(1, 20, 1).unwrap().squeeze(1).unwrap();
    (packed, current, history)
}

#[test]
fn regime_packed_input_is_history_then_current() {
    let (_vm, m) = build::<Regime>(&RegimeConfig::default(), DType::F32);
    let (packed, current, history) = regime_parts(3, 9);
    let a = m.forward(&packed, &mut ForwardCtx::eval()).unwrap();
    let b = m
        .forward2(&current, &history, &mut ForwardCtx::eval())
        .unwrap();
    assert_eq!(values(&a.mu), values(&b.mu));
    assert_eq!(values(&a.sigma), values(&b.sigma));
    let d = m
        .forward_detailed(&current, &history, &mut ForwardCtx::eval())
        .unwrap();
    assert_eq!(d.transition.dims(), &[3, 1]);
    assert!(values(&d.transition).iter().all(|s| *s > 0.0 && *s < 1.0));
    assert_eq!(d.dim_weights.dims(), &[3, 8]);
    for row in d.dim_weights.to_vec2::<f32>().unwrap() {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{row:?}");
    }
    // The current row matters separately from the history.
    let moved = current.affine(1.0, 0.5).unwrap();
    let c = m
        .forward2(&moved, &history, &mut ForwardCtx::eval())
        .unwrap();
    assert!(max_abs_diff(&a.mu, &c.mu) > 1e-5);
}

#[test]
fn regime_two_inputs_are_checked() {
    let (_vm, m) = build::<Regime>(&RegimeConfig::default(), DType::F32);
    let (_, current, history) = regime_parts(3, 9);
    let cases = [
        (input(&[3, 7], 1), history.clone(), "regime current"),
        (current.clone(), input(&[3, 19, 8], 1), "regime history"),
        (current.clone(), input(&[2, 20, 8], 1), "regime history"), // batch
    ];
    for (c, h, name) in cases {
        match m.forward2(&c, &h, &mut ForwardCtx::eval()) {
            Err(Error::Shape { what, .. }) => assert_eq!(what, name),
            other => panic!("expected a shape error for {name}, got {other:?}"),
        }
    }
}

#[test]
fn regime_constant_inputs_keep_gradients_finite() {
    // Equal rows make every difference zero: the norms' eps keeps sqrt's
    // gradient finite.
    let (vm, m) = build::<Regime>(&RegimeConfig::default(), DType::F32);
    let x = Tensor::ones((2, 21, 8), DType::F32, &Device::Cpu)
        .unwrap()
        .affine(0.3, 0.0)
        .unwrap();
    let x = Var::from_tensor(&x).unwrap();
    let e = m.forward(x.as_tensor(), &mut ForwardCtx::eval()).unwrap();
    let loss = projection_loss(&e.mu, &e.sigma, 20);
    // The point is finiteness: with every difference zero the transition
    // features are ~eps, so their weights' gradients are legitimately tiny
    // (how tiny depends on the random initialisation), and the "every
    // variable learns" bar of the other tests does not apply here.
    assert!(loss.to_scalar::<f32>().unwrap().is_finite());
    let grads = loss.backward().unwrap();
    for (name, var) in vm.data().lock().unwrap().iter() {
        let g = grads.get(var.as_tensor()).unwrap();
        assert!(values(g).iter().all(|v| v.is_finite()), "{name}");
    }
    let gx = grads.get(x.as_tensor()).unwrap();
    assert!(values(gx).iter().all(|v| v.is_finite()));
}

// ---- agent heads -------------------------------------------------------

fn heads(dtype: DType) -> (VarMap, AgentHeads) {
    let vm = VarMap::new();
    let h = AgentHeads::new(
        HeadsConfig::default(),
        VarBuilder::from_varmap(&vm, dtype, &Device::Cpu),
    )
    .unwrap();
    gm_models::init::init_seeded(&vm, next_seed()).unwrap();
    (vm, h)
}

fn mus(batch: usize, seed: u64) -> [Tensor; 4] {
    [
        input(&[batch, 64], seed),
        input(&[batch, 48], seed + 1),
        input(&[batch, 16], seed + 2),
        input(&[batch, 8], seed + 3),
    ]
}

fn heads_forward(h: &AgentHeads, m: &[Tensor; 4]) -> gm_models::Result<(Tensor, Tensor)> {
    h.forward(&m[0], &m[1], &m[2], &m[3])
}

#[test]
fn heads_shapes_and_dueling_combination() {
    let (_vm, h) = heads(DType::F32);
    let (q, v) = heads_forward(&h, &mus(5, 1)).unwrap();
    assert_eq!(q.dims(), &[5, 3]);
    assert_eq!(v.dims(), &[5, 1]);
    assert_eq!(Action::ALL.map(Action::index), [0, 1, 2]);
    assert_eq!(h.config().state_dim(), 136);
    // Deterministic.
    let (q2, v2) = heads_forward(&h, &mus(5, 1)).unwrap();
    assert_eq!(values(&q), values(&q2));
    assert_eq!(values(&v), values(&v2));
}

#[test]
fn heads_inputs_are_checked() {
    let (_vm, h) = heads(DType::F32);
    let good = mus(2, 1);
    let names = ["structure_mu", "tactical_mu", "regime_mu", "lvn_mu"];
    for (i, name) in names.iter().enumerate() {
        for bad in [
            input(&[2, good[i].dim(1).unwrap() + 1], 3), // width
            input(&[2], 3),                              // rank
        ] {
            let mut m = good.clone();
            m[i] = bad;
            match heads_forward(&h, &m) {
                Err(Error::Shape { what, .. }) => assert_eq!(what, *name),
                other => panic!("expected a shape error for {name}, got {other:?}"),
            }
        }
    }
    // A batch mismatch is named by the first disagreeing input.
    let mut m = good.clone();
    m[2] = input(&[3, 16], 3);
    assert!(matches!(
        heads_forward(&h, &m),
        Err(Error::Shape {
            what: "regime_mu",
            ..
        })
    ));
}

#[test]
fn heads_every_variable_gets_gradient() {
    let (vm, h) = heads(DType::F32);
    let (q, v) = heads_forward(&h, &mus(4, 2)).unwrap();
    assert_every_variable_learns(&vm, &projection_loss(&q, &v, 30));
    // The trap the dueling layout sets: Σ_a Q does not depend on A, so a
    // loss that only sums Q gives the advantage stream no gradient (up to
    // rounding).
    let (q, _) = heads_forward(&h, &mus(4, 2)).unwrap();
    let grads = q.sum_all().unwrap().backward().unwrap();
    let data = vm.data().lock().unwrap();
    let adv = data["q.advantage.1.weight"].as_tensor();
    let g = grads.get(adv).unwrap();
    assert!(max_abs(g) < 1e-5, "{}", max_abs(g));
}

#[test]
fn heads_save_load_bf16_and_parameter_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("heads.safetensors");
    let (vm, h) = heads(DType::F32);
    assert_eq!(parameters(&vm), 60_677);
    assert_eq!(HeadsConfig::default().parameter_count(), 60_677);
    gm_models::weights::save(&vm, &path).unwrap();
    let m = mus(3, 4);
    let (q, v) = heads_forward(&h, &m).unwrap();
    let (vm2, h2) = heads(DType::F32);
    gm_models::weights::load(&vm2, &path).unwrap();
    let (q2, v2) = heads_forward(&h2, &m).unwrap();
    assert_eq!(values(&q), values(&q2));
    assert_eq!(values(&v), values(&v2));
    let (vm16, h16) = heads(DType::BF16);
    gm_models::weights::load(&vm16, &path).unwrap();
    let (q16, v16) = heads_forward(&h16, &m).unwrap();
    assert_eq!(q16.dtype(), DType::BF16);
    for (a, b) in [(&q, &q16), (&v, &v16)] {
        let tol = (0.05 * max_abs(a)).max(0.05);
        assert!(max_abs_diff(a, b) <= tol, "{}", max_abs_diff(a, b));
    }
    // A file lacking a tensor is named.
    let bad = dir.path().join("bad.safetensors");
    save_edited(&vm, "value.ln.weight", false, &bad);
    let reason = weights_error_reason(gm_models::weights::load(&vm2, &bad));
    assert!(
        reason.contains("\"value.ln.weight\" is missing"),
        "{reason}"
    );
}

/// The four embedders' means feed the heads (a stand-in `[B, 48]` for the
/// tactical μ, which another module builds).
#[test]
fn embedders_feed_the_heads() {
    let (_a, s) = build::<Structure>(&StructureConfig::default(), DType::F32);
    let (_b, r) = build::<Regime>(&RegimeConfig::default(), DType::F32);
    let (_c, l) = build::<Lvn>(&LvnConfig::default(), DType::F32);
    let (_d, h) = heads(DType::F32);
    let mut ctx = ForwardCtx::eval();
    let s = s.forward(&input(&[2, 48, 8], 1), &mut ctx).unwrap().mu;
    let r = r.forward(&input(&[2, 21, 8], 2), &mut ctx).unwrap().mu;
    let l = l.forward(&input(&[2, 5], 3), &mut ctx).unwrap().mu;
    let t = input(&[2, 48], 4);
    let (q, v) = h.forward(&s, &t, &r, &l).unwrap();
    assert_eq!(q.dims(), &[2, 3]);
    assert_eq!(v.dims(), &[2, 1]);
}

/// The attention kernel is a config switch: the blocked memory-efficient
/// kernel (block 16 < 48 bars, so several tiles) gives the dense result up
/// to rounding, and gradients still reach every variable through it.
#[test]
fn structure_memory_efficient_attention_matches_dense() {
    let dense_cfg = StructureConfig::default();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.safetensors");
    let (vm, dense) = build::<Structure>(&dense_cfg, DType::F32);
    gm_models::weights::save(&vm, &path).unwrap();
    let blocked_cfg = StructureConfig {
        attention: gm_models::attention::AttentionKind::MemoryEfficient { block: 16 },
        ..dense_cfg
    };
    let (vm2, blocked) = build::<Structure>(&blocked_cfg, DType::F32);
    gm_models::weights::load(&vm2, &path).unwrap();
    let x = input(&[2, 48, 8], 12);
    let (a, _) = eval_mu_sigma(&dense, &x);
    let (b, _) = eval_mu_sigma(&blocked, &x);
    assert!(max_abs_diff(&a, &b) < 1e-4, "{}", max_abs_diff(&a, &b));
    let e = blocked.forward(&x, &mut ForwardCtx::train(1)).unwrap();
    assert_every_variable_learns(&vm2, &projection_loss(&e.mu, &e.sigma, 40));
}
