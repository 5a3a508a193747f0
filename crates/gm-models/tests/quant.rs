//! Int8 inference quantization (`quant.rs`, `Linear::quantized`,
//! `Model::quantized`): for every embedder and the agent heads, the
//! quantized copy's outputs against the f32 model's on random inputs (max
//! absolute and relative error printed, and bounded), the measured
//! parameter-memory reduction, the per-layer scheme rule and its
//! fallbacks, and that a quantized model cannot be trained.
//!
//! # The error bound
//!
//! Per-channel int8 rounds each weight to within half a step, `max|w_row| /
//! 254`: at most ~0.4 % of the row's largest weight, ~0.23 % RMS for
//! uniform weights, so one layer's output moves by well under 1 % (measured
//! 0.3–0.46 % of max |output| over 32–1 920 rows for every layer shape of
//! the models, `examples/model_memory.rs`). Through a whole model the layers' errors
//! add up, partly cancel, and layer norms rescale them. Measured on these
//! seeded models (run with `--nocapture`): the largest output error is
//! **0.23–0.54 % of the output's range**; over 12 weight seeds × every
//! output of the five models the worst was 1.09 % (the heads' value, 64
//! scalars). The bound, [`BOUND`] = 2 % of the range, keeps a ~2× margin
//! over that and still catches a broken quantizer: scales 10 % off give
//! ~17 %, a u8-range scale that clips the larger half of each row more
//! (`a_wrong_scale_breaks_the_bound`). Rounding *toward zero* instead of
//! to nearest only doubles the error (~1.3 %): a max-error bound cannot
//! tell it from seed-to-seed spread, so the unit tests of `quant.rs` check
//! the rounding itself (every weight within half a step).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gm_models::layers::vars_without_gradient;
use gm_models::quant::{tensor_bytes, Int8Rows};
use gm_models::{
    AgentHeads, Embedder, ForwardCtx, HeadsConfig, Linear, Lstm, LvnConfig, LvnEmbedder,
    QuantPolicy, QuantScheme, RegimeConfig, RegimeEmbedder, StructureConfig, StructureEmbedder,
    TacticalConfig, TacticalEmbedder,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Largest output error allowed, as a fraction of the output's range
/// (max − min over the batch): see the module docs.
const BOUND: f32 = 0.02;

/// Uniform values in [-1, 1) from `seed`.
fn input(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Seeded weights (candle's CPU RNG cannot be seeded): dense weights
/// uniform in ±1/√fan_in, biases in ±0.1, layer-norm scales 1 ± 0.1,
/// tables (`pos`, the regime dimension tables) in ±1 (±0.035 for `pos`).
fn init(vm: &VarMap, seed: u64) {
    let data = vm.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let (center, half) = match (dims.len(), name.ends_with("weight")) {
            (1, true) => (1.0, 0.1),
            (1, false) => (0.0, 0.1),
            (_, true) => (
                0.0,
                1.0 / (dims[1..].iter().product::<usize>() as f32).sqrt(),
            ),
            _ if name.ends_with("pos") => (0.0, 0.035),
            _ => (0.0, 1.0),
        };
        let v: Vec<f32> = (0..n)
            .map(|_| center + rng.random_range(-half..=half))
            .collect();
        let t = Tensor::from_vec(v, dims.as_slice(), &Device::Cpu)
            .unwrap()
            .to_dtype(var.dtype())
            .unwrap();
        var.set(&t).unwrap();
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Quantization error of one output: max |q − f|, max |f|, range of f.
#[derive(Debug, Clone, Copy)]
struct Err {
    max_abs: f32,
    max_f32: f32,
    range: f32,
}

impl Err {
    fn of(f: &Tensor, q: &Tensor) -> Self {
        assert_eq!(f.dims(), q.dims());
        let (f, q) = (values(f), values(q));
        let max_abs = f
            .iter()
            .zip(&q)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let max_f32 = f.iter().fold(0f32, |m, v| m.max(v.abs()));
        let lo = f.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = f.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert!(max_abs.is_finite(), "non-finite quantized output");
        Err {
            max_abs,
            max_f32,
            range: hi - lo,
        }
    }

    /// max |q − f| / max |f|.
    fn rel(&self) -> f32 {
        self.max_abs / self.max_f32
    }

    /// max |q − f| / (max f − min f).
    fn of_range(&self) -> f32 {
        self.max_abs / self.range
    }
}

/// A model under test: how to build, run and quantize it.
trait Case: Sized + std::fmt::Debug {
    const NAME: &'static str;
    /// The outputs' names, in the order of [`Case::run`].
    const OUTPUTS: [&'static str; 2];
    fn build(vb: VarBuilder) -> gm_models::Result<Self>;
    fn parameter_count() -> usize;
    fn inputs(batch: usize, seed: u64) -> Vec<Tensor>;
    fn run(&self, inputs: &[Tensor]) -> gm_models::Result<[Tensor; 2]>;
    fn quantized_with(&self, policy: QuantPolicy) -> gm_models::Result<Self>;
    fn quantized(&self) -> gm_models::Result<Self>;
    fn parameter_bytes(&self) -> usize;
    fn is_quantized(&self) -> bool;
}

macro_rules! embedder_case {
    ($model:ty, $cfg:ty, $name:literal, $shape:expr) => {
        impl Case for $model {
            const NAME: &'static str = $name;
            const OUTPUTS: [&'static str; 2] = ["mu", "sigma"];
            fn build(vb: VarBuilder) -> gm_models::Result<Self> {
                <$model>::new(<$cfg>::default(), vb)
            }
            fn parameter_count() -> usize {
                <$cfg>::default().parameter_count()
            }
            fn inputs(batch: usize, seed: u64) -> Vec<Tensor> {
                let shape: Vec<usize> = std::iter::once(batch)
                    .chain($shape.iter().copied())
                    .collect();
                vec![input(&shape, seed)]
            }
            fn run(&self, inputs: &[Tensor]) -> gm_models::Result<[Tensor; 2]> {
                let e = Embedder::forward(self, &inputs[0], &mut ForwardCtx::eval())?;
                Ok([e.mu, e.sigma])
            }
            fn quantized_with(&self, policy: QuantPolicy) -> gm_models::Result<Self> {
                <$model>::quantized_with(self, policy)
            }
            fn quantized(&self) -> gm_models::Result<Self> {
                <$model>::quantized(self)
            }
            fn parameter_bytes(&self) -> usize {
                <$model>::parameter_bytes(self)
            }
            fn is_quantized(&self) -> bool {
                <$model>::is_quantized(self)
            }
        }
    };
}

embedder_case!(
    StructureEmbedder,
    StructureConfig,
    "structure",
    [48usize, 8]
);
embedder_case!(TacticalEmbedder, TacticalConfig, "tactical", [60usize, 7]);
embedder_case!(RegimeEmbedder, RegimeConfig, "regime", [21usize, 8]);
embedder_case!(LvnEmbedder, LvnConfig, "lvn", [5usize]);

impl Case for AgentHeads {
    const NAME: &'static str = "heads";
    const OUTPUTS: [&'static str; 2] = ["q", "value"];
    fn build(vb: VarBuilder) -> gm_models::Result<Self> {
        AgentHeads::new(HeadsConfig::default(), vb)
    }
    fn parameter_count() -> usize {
        HeadsConfig::default().parameter_count()
    }
    fn inputs(batch: usize, seed: u64) -> Vec<Tensor> {
        let c = HeadsConfig::default();
        [c.structure_dim, c.tactical_dim, c.regime_dim, c.lvn_dim]
            .iter()
            .enumerate()
            .map(|(i, d)| input(&[batch, *d], seed + i as u64))
            .collect()
    }
    fn run(&self, x: &[Tensor]) -> gm_models::Result<[Tensor; 2]> {
        let (q, v) = self.forward(&x[0], &x[1], &x[2], &x[3])?;
        Ok([q, v])
    }
    fn quantized_with(&self, policy: QuantPolicy) -> gm_models::Result<Self> {
        AgentHeads::quantized_with(self, policy)
    }
    fn quantized(&self) -> gm_models::Result<Self> {
        AgentHeads::quantized(self)
    }
    fn parameter_bytes(&self) -> usize {
        AgentHeads::parameter_bytes(self)
    }
    fn is_quantized(&self) -> bool {
        AgentHeads::is_quantized(self)
    }
}

fn build<C: Case>(seed: u64) -> (VarMap, C) {
    let vm = VarMap::new();
    let model = C::build(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    init(&vm, seed);
    (vm, model)
}

fn varmap_bytes(vm: &VarMap) -> usize {
    vm.all_vars()
        .iter()
        .map(|v| tensor_bytes(v.as_tensor()))
        .sum()
}

/// Errors of each output of `q` against `f` on `inputs`.
fn errors<C: Case>(f: &C, q: &C, inputs: &[Tensor]) -> [Err; 2] {
    let (a, b) = (f.run(inputs).unwrap(), q.run(inputs).unwrap());
    [Err::of(&a[0], &b[0]), Err::of(&a[1], &b[1])]
}

/// The figures the test asserts, for one model: error per output under the
/// default policy, the f32 and quantized parameter bytes.
fn check_model<C: Case>(batch: usize, max_ratio: f64) {
    let (vm, f32_model) = build::<C>(11);
    let inputs = C::inputs(batch, 5);

    // Bytes: the f32 count is what the variables hold, and 4 B/parameter.
    let f32_bytes = f32_model.parameter_bytes();
    assert_eq!(f32_bytes, varmap_bytes(&vm), "{}: f32 bytes", C::NAME);
    assert_eq!(f32_bytes, 4 * C::parameter_count(), "{}", C::NAME);

    let q = f32_model.quantized().unwrap();
    assert!(q.is_quantized() && !f32_model.is_quantized());
    let q_bytes = q.parameter_bytes();
    let ratio = q_bytes as f64 / f32_bytes as f64;

    let errs = errors(&f32_model, &q, &inputs);
    for (name, e) in C::OUTPUTS.iter().zip(&errs) {
        println!(
            "{:9} {name:5}: max abs err {:.3e}, max rel err {:.3e} (of max |f32|), {:.3e} of range {:.3}",
            C::NAME,
            e.max_abs,
            e.rel(),
            e.of_range(),
            e.range
        );
        assert!(
            e.of_range() <= BOUND,
            "{} {name}: error {:.3e} of the range > {BOUND}",
            C::NAME,
            e.of_range()
        );
    }
    // The alternative policy (Q8_0 wherever in_dim % 32 == 0) for the record.
    let q8 = f32_model.quantized_with(QuantPolicy::PreferQ8_0).unwrap();
    let e8 = errors(&f32_model, &q8, &inputs);
    println!(
        "{:9} bytes f32 {f32_bytes}, quantized {q_bytes} (ratio {ratio:.4}); \
         prefer-q8_0: {} B, errors {:.3e} / {:.3e} of range",
        C::NAME,
        q8.parameter_bytes(),
        e8[0].of_range(),
        e8[1].of_range()
    );
    assert!(
        ratio < max_ratio,
        "{}: quantized/f32 bytes {ratio:.4} ≥ {max_ratio}",
        C::NAME
    );
    // Quantizing twice is refused with a clear message.
    let again = q.quantized().unwrap_err().to_string();
    assert!(again.contains("already quantized"), "{again}");
}

#[test]
fn structure_quantized_is_close_and_under_a_third_of_the_bytes() {
    check_model::<StructureEmbedder>(8, 0.30);
}

#[test]
fn tactical_quantized_is_close_and_under_a_third_of_the_bytes() {
    check_model::<TacticalEmbedder>(2, 0.30);
}

#[test]
fn regime_quantized_is_close_and_smaller() {
    // Small layers: biases, the f32 tables and the layer norm weigh more.
    check_model::<RegimeEmbedder>(16, 0.35);
}

#[test]
fn lvn_quantized_is_close_and_smaller() {
    // 400 parameters, half of them biases and a layer norm that stay f32.
    check_model::<LvnEmbedder>(64, 0.50);
}

#[test]
fn heads_quantized_are_close_and_under_a_third_of_the_bytes() {
    check_model::<AgentHeads>(64, 0.30);
}

/// The bound must catch a broken quantizer: rebuild the heads with every
/// dense weight quantized per channel but dequantized with scales 10 % too
/// large, or with half the scale (so the larger weights clip), and the error
/// must exceed [`BOUND`] — while the correct scales stay inside it.
#[test]
fn a_wrong_scale_breaks_the_bound() {
    let (vm, f32_model) = build::<AgentHeads>(3);
    let inputs = AgentHeads::inputs(64, 9);
    let reference = f32_model.run(&inputs).unwrap();
    let broken = |distort: &dyn Fn(&Int8Rows, &[f32]) -> Vec<f32>| -> f32 {
        let (vm2, model2) = build::<AgentHeads>(3);
        let data = vm.data().lock().unwrap();
        let data2 = vm2.data().lock().unwrap();
        for (name, var) in data.iter() {
            if var.rank() == 2 {
                let w = var.as_tensor();
                let r = Int8Rows::quantize(w).unwrap();
                let orig = values(w);
                let v = distort(&r, &orig);
                data2[name]
                    .set(&Tensor::from_vec(v, w.dims(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        drop((data, data2));
        let out = model2.run(&inputs).unwrap();
        (0..2)
            .map(|i| Err::of(&reference[i], &out[i]).of_range())
            .fold(0f32, f32::max)
    };
    let dequant = |r: &Int8Rows, scale_factor: f32| -> Vec<f32> {
        let (_, in_dim) = r.dims();
        r.values()
            .chunks(in_dim)
            .zip(r.scales())
            .flat_map(|(row, s)| row.iter().map(move |q| f32::from(*q) * s * scale_factor))
            .collect()
    };
    let right = broken(&|r, _| dequant(r, 1.0));
    let scale_off = broken(&|r, _| dequant(r, 1.1));
    let clipped = broken(&|r, orig| {
        // The scale of a u8 range (max / 255) with i8 storage: the larger
        // half of every row saturates at ±127.
        let (_, in_dim) = r.dims();
        orig.chunks(in_dim)
            .zip(r.scales())
            .flat_map(|(row, s)| {
                let s = s * 127.0 / 255.0;
                row.iter().map(move |w| {
                    if s > 0.0 {
                        (w / s).round().clamp(-127.0, 127.0) * s
                    } else {
                        0.0
                    }
                })
            })
            .collect()
    });
    println!(
        "error of range: right {right:.3e}, scales +10 % {scale_off:.3e}, \
         clipped {clipped:.3e}"
    );
    assert!(right <= BOUND, "{right}");
    assert!(
        scale_off > BOUND,
        "a 10 % scale error went unnoticed: {scale_off}"
    );
    assert!(
        clipped > BOUND,
        "clipping half the range went unnoticed: {clipped}"
    );
}

#[test]
fn layer_schemes_follow_the_rule_and_tiny_layers_fall_back() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let one = Linear::new(1, 8, vb.pp("one")).unwrap();
    let tiny = Linear::new(5, 16, vb.pp("tiny")).unwrap();
    let wide = Linear::new(64, 8, vb.pp("wide")).unwrap();
    init(&vm, 1);

    // in_dim 1: int8 + a 4-byte row scale would not be smaller: stays f32.
    let q = one.quantized().unwrap();
    assert_eq!(q.scheme(), Some(QuantScheme::F32));
    assert_eq!(q.parameter_bytes(), one.parameter_bytes());
    let x = input(&[4, 1], 2);
    assert_eq!(
        values(&q.forward(&x).unwrap()),
        values(&one.forward(&x).unwrap())
    );

    // in_dim 5: per-channel int8 (Q8_0 needs a multiple of 32 and says so).
    let q = tiny.quantized().unwrap();
    assert_eq!(q.scheme(), Some(QuantScheme::PerChannelInt8));
    assert_eq!(q.parameter_bytes(), 16 * (5 + 4) + 16 * 4);
    assert!(tiny.parameter_bytes() == 16 * 5 * 4 + 16 * 4);
    let e = tiny
        .quantized_as(QuantScheme::Q8_0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("q8_0 for a 5→16 layer") && e.contains("multiple of 32"),
        "{e}"
    );
    assert_eq!(
        tiny.quantized_with(QuantPolicy::PreferQ8_0)
            .unwrap()
            .scheme(),
        Some(QuantScheme::PerChannelInt8)
    );
    let x = input(&[32, 5], 3);
    let err = Err::of(&tiny.forward(&x).unwrap(), &q.forward(&x).unwrap());
    assert!(err.of_range() < 0.01, "{err:?}");
    // The dequantized weight is within half a step of the original per row.
    let (w, wq) = (
        tiny.weight().to_vec2::<f32>().unwrap(),
        q.weight().to_vec2::<f32>().unwrap(),
    );
    for (a, b) in w.iter().zip(&wq) {
        let step = a.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        assert!(a
            .iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= step / 2.0 + 1e-7));
    }

    // in_dim 64: both apply; Q8_0 when asked (34 B per 32 weights).
    let q8 = wide.quantized_as(QuantScheme::Q8_0).unwrap();
    assert_eq!(q8.scheme(), Some(QuantScheme::Q8_0));
    assert_eq!(q8.parameter_bytes(), 8 * 2 * 34 + 8 * 4);
    assert_eq!(
        wide.quantized().unwrap().parameter_bytes(),
        8 * (64 + 4) + 8 * 4
    );
    let x = input(&[16, 3, 64], 4); // rank 3 as in the models
    let err = Err::of(&wide.forward(&x).unwrap(), &q8.forward(&x).unwrap());
    assert!(err.of_range() < 0.02, "{err:?}");

    // A quantized layer is not re-quantized.
    assert!(q.quantized().is_err());
}

#[test]
fn quantized_lstm_tracks_the_f32_one() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let lstm = Lstm::new(8, 32, vb.pp("lstm")).unwrap();
    init(&vm, 4);
    let q = lstm.quantized().unwrap();
    assert!(q.is_quantized() && !lstm.is_quantized());
    // ih: 128 × (8 + 4) + bias 512; hh: 128 × (32 + 4).
    assert_eq!(q.parameter_bytes(), 128 * 12 + 512 + 128 * 36);
    assert_eq!(lstm.parameter_bytes(), 4 * (128 * 8 + 128 + 128 * 32));
    let x = input(&[4, 20, 8], 6);
    for reverse in [false, true] {
        let err = Err::of(
            &lstm.seq(&x, reverse).unwrap(),
            &q.seq(&x, reverse).unwrap(),
        );
        println!("lstm reverse={reverse}: {err:?}");
        assert!(err.of_range() < 0.01, "{err:?}");
    }
}

/// A quantized copy is inference-only: no variable of the source receives
/// a gradient through it, and it is a snapshot of the dense weights (later
/// changes to the source's variables do not reach it).
#[test]
fn a_quantized_model_cannot_be_trained() {
    let (vm, model) = build::<StructureEmbedder>(2);
    let q = model.quantized().unwrap();
    let x = input(&[2, 48, 8], 1);
    let out = q.forward(&x, &mut ForwardCtx::train(1)).unwrap();
    let loss = out
        .mu
        .sum_all()
        .unwrap()
        .add(&out.sigma.sum_all().unwrap())
        .unwrap();
    let mut all: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    all.sort();
    assert_eq!(vars_without_gradient(&vm, &loss).unwrap(), all);

    let before = values(&q.forward(&x, &mut ForwardCtx::eval()).unwrap().mu);
    init(&vm, 99); // "train" the source: every variable changes
    let after = values(&q.forward(&x, &mut ForwardCtx::eval()).unwrap().mu);
    let moved = values(&model.forward(&x, &mut ForwardCtx::eval()).unwrap().mu);
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(diff(&before, &moved) > 0.1, "the source did change");
    // Only the shared layer norms follow the source; re-seeding moves their
    // scales by ±10 %, far less than replacing every weight would.
    assert!(
        diff(&before, &after) < diff(&before, &moved),
        "{} vs {}",
        diff(&before, &after),
        diff(&before, &moved)
    );
}

#[test]
fn bf16_models_quantize_too() {
    let vm = VarMap::new();
    let heads = AgentHeads::new(
        HeadsConfig::default(),
        VarBuilder::from_varmap(&vm, DType::BF16, &Device::Cpu),
    )
    .unwrap();
    init(&vm, 8);
    let q = heads.quantized().unwrap();
    let inputs = AgentHeads::inputs(32, 2);
    let (a, b) = (heads.run(&inputs).unwrap(), q.run(&inputs).unwrap());
    assert_eq!(b[0].dtype(), DType::BF16);
    for i in 0..2 {
        let e = Err::of(&a[i], &b[i]);
        assert!(e.of_range() <= 2.0 * BOUND, "bf16 {i}: {e:?}");
    }
    // bf16 parameters are 2 B each; int8 weights still halve them.
    assert_eq!(
        heads.parameter_bytes(),
        2 * HeadsConfig::default().parameter_count()
    );
    assert!((q.parameter_bytes() as f64) < 0.6 * heads.parameter_bytes() as f64);
}

/// A quantized copy is a snapshot: re-initialising (or training) the source
/// afterwards changes nothing in the copy, layer norms included.
fn copy_is_independent<C: Case>() {
    let (vm, f) = build::<C>(31);
    let q = f.quantized().unwrap();
    let inputs = C::inputs(4, 5);
    let before: Vec<Vec<f32>> = q.run(&inputs).unwrap().iter().map(values).collect();
    init(&vm, 32); // every source variable moves, layer-norm scales too
    let after: Vec<Vec<f32>> = q.run(&inputs).unwrap().iter().map(values).collect();
    assert_eq!(before, after, "{}", C::NAME);
    let moved: Vec<Vec<f32>> = f.run(&inputs).unwrap().iter().map(values).collect();
    assert_ne!(before, moved, "{}: the source did change", C::NAME);
}

#[test]
fn quantized_copies_do_not_follow_the_source() {
    copy_is_independent::<StructureEmbedder>();
    copy_is_independent::<RegimeEmbedder>();
    copy_is_independent::<LvnEmbedder>();
    copy_is_independent::<AgentHeads>();
}
