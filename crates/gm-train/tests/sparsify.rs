//! Top-k sparsification with error feedback: exactly k entries kept, the
//! residual holds the rest (nothing lost), the traffic is reported, and on
//! a linear regression 1 % top-k with error feedback converges where top-k
//! without it stalls.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use gm_train::{Grads, TopK, TopKAmount, TopKConfig, TopKScope};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn randn(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    // Irwin–Hall approximation of a standard normal: good enough here.
    (0..n)
        .map(|_| (0..12).map(|_| rng.random::<f32>()).sum::<f32>() - 6.0)
        .collect()
}

/// Three variables of 100, 7 and 60 elements with seeded gradients.
fn three_vars(seed: u64) -> (VarMap, Grads) {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let a = vb.get_with_hints((10, 10), "a", Init::Const(0.0)).unwrap();
    let b = vb.get_with_hints(7, "b", Init::Const(0.0)).unwrap();
    let c = vb.get_with_hints((3, 4, 5), "c", Init::Const(0.0)).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let r = |rng: &mut ChaCha8Rng, t: &Tensor| {
        Tensor::from_vec(randn(rng, t.elem_count()), t.shape(), &dev).unwrap()
    };
    let (ra, rb, rc) = (r(&mut rng, &a), r(&mut rng, &b), r(&mut rng, &c));
    // loss = Σ r ⊙ w  ⇒  ∇ = r
    let loss = a
        .mul(&ra)
        .unwrap()
        .sum_all()
        .unwrap()
        .add(&b.mul(&rb).unwrap().sum_all().unwrap())
        .unwrap()
        .add(&c.mul(&rc).unwrap().sum_all().unwrap())
        .unwrap();
    let g = Grads::from_store(&vm, &loss.backward().unwrap()).unwrap();
    (vm, g)
}

fn flat(t: Option<&Tensor>) -> Vec<f32> {
    t.map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .unwrap_or_default()
}

#[test]
fn keeps_exactly_k_and_the_residual_holds_the_rest() {
    for (scope, amount, want_kept) in [
        // per tensor: ceil(0.1·100) + ceil(0.1·7) + ceil(0.1·60) = 10 + 1 + 6
        (TopKScope::PerTensor, TopKAmount::Fraction(0.1), 17),
        (TopKScope::PerTensor, TopKAmount::Count(5), 15),
        // global: ceil(0.05·167) = 9
        (TopKScope::Global, TopKAmount::Fraction(0.05), 9),
        (TopKScope::Global, TopKAmount::Count(20), 20),
    ] {
        let (_vm, g1) = three_vars(1);
        let mut topk = TopK::new(
            TopKConfig {
                amount,
                scope,
                error_feedback: true,
            },
            g1.len(),
        )
        .unwrap();
        // Step 1 fills the residuals; step 2 is checked against them.
        let mut g = g1.clone();
        topk.apply(&mut g).unwrap();
        let (_vm2, g2) = three_vars(2);
        let old_res: Vec<Vec<f32>> = topk.residuals.iter().map(|r| flat(r.as_ref())).collect();
        let mut g = g2.clone();
        let report = topk.apply(&mut g).unwrap();
        assert_eq!(report.kept, want_kept, "{scope:?} {amount:?}");
        assert_eq!(report.total, 167);
        assert_eq!(report.bytes_dense, 4 * 167);
        assert_eq!(report.bytes_sparse, 8 * want_kept as u64);

        let mut kept_total = 0;
        let mut kept_mags = Vec::new();
        let mut rest_mags = Vec::new();
        for (i, ((name, _, sent), (_, _, orig))) in g.iter().zip(g2.iter()).enumerate() {
            let sent = flat(sent);
            let orig = flat(orig);
            let res = flat(topk.residuals[i].as_ref());
            let nonzero = sent.iter().filter(|v| **v != 0.0).count();
            kept_total += nonzero;
            if scope == TopKScope::PerTensor {
                let k = amount.k(orig.len());
                assert_eq!(nonzero, k, "{name}: exactly k kept");
            }
            for j in 0..orig.len() {
                // kept + residual == original + old residual, element by element
                let before = orig[j] + old_res[i][j];
                assert_eq!(sent[j] + res[j], before, "{name}[{j}]");
                assert!(sent[j] == 0.0 || res[j] == 0.0, "an entry is sent or held");
                if sent[j] != 0.0 {
                    kept_mags.push(before.abs());
                } else {
                    rest_mags.push(before.abs());
                }
            }
            if scope == TopKScope::PerTensor {
                let min_kept = (0..orig.len())
                    .filter(|&j| sent[j] != 0.0)
                    .map(|j| sent[j].abs())
                    .fold(f32::INFINITY, f32::min);
                let max_rest = res.iter().map(|v| v.abs()).fold(0.0, f32::max);
                assert!(min_kept >= max_rest, "{name}: the largest were kept");
            }
        }
        assert_eq!(kept_total, want_kept);
        if scope == TopKScope::Global {
            let min_kept = kept_mags.iter().copied().fold(f32::INFINITY, f32::min);
            let max_rest = rest_mags.iter().copied().fold(0.0, f32::max);
            assert!(min_kept >= max_rest, "globally the largest were kept");
        }
    }
}

#[test]
fn without_error_feedback_the_rest_is_dropped() {
    let (_vm, g0) = three_vars(3);
    let mut topk = TopK::new(
        TopKConfig {
            error_feedback: false,
            ..TopKConfig::default()
        },
        g0.len(),
    )
    .unwrap();
    let mut g = g0.clone();
    let r = topk.apply(&mut g).unwrap();
    // 1 %: one entry of each tensor.
    assert_eq!((r.kept, r.total), (3, 167));
    assert!(topk.residuals.iter().all(|r| r.is_none()));
    assert_eq!(topk.residual_bytes(), 0);
    assert!((r.ratio() - 24.0 / 668.0).abs() < 1e-12);
    // Wrong variable count is an error, not a panic.
    let mut other = TopK::new(TopKConfig::default(), 2).unwrap();
    assert!(other.apply(&mut g).is_err());
}

/// Linear regression `y = X w* + noise`: `n = 1000` rows, `d = 100`
/// weights, `X` entries `N(0, 1/d)`, `w*` entries `N(0, 1)`, noise
/// `N(0, 0.01²)`; loss = mean squared error (≈ 0.95 at `w = 0`, noise floor
/// 1e-4); full-batch SGD with the (sparsified) gradient.
struct Regression {
    vm: VarMap,
    w: Tensor,
    x: Tensor,
    y: Tensor,
}

impl Regression {
    fn new() -> Self {
        let (n, d) = (1000, 100);
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let x = Tensor::from_vec(randn(&mut rng, n * d), (n, d), &dev)
            .unwrap()
            .affine(1.0 / (d as f64).sqrt(), 0.0)
            .unwrap();
        let w_star = Tensor::from_vec(randn(&mut rng, d), (d, 1), &dev).unwrap();
        let noise = Tensor::from_vec(randn(&mut rng, n), (n, 1), &dev)
            .unwrap()
            .affine(0.01, 0.0)
            .unwrap();
        let y = x.matmul(&w_star).unwrap().add(&noise).unwrap();
        let vm = VarMap::new();
        let w = VarBuilder::from_varmap(&vm, DType::F32, &dev)
            .get_with_hints((d, 1), "w", Init::Const(0.0))
            .unwrap();
        Self { vm, w, x, y }
    }

    fn loss(&self) -> Tensor {
        self.x
            .matmul(&self.w)
            .unwrap()
            .sub(&self.y)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    }

    /// `steps` SGD steps with learning rate `lr`, the gradient passed
    /// through `topk` when given; returns the loss before and after, and the
    /// sparse bytes sent in all.
    fn train(&self, steps: usize, lr: f64, mut topk: Option<TopK>) -> (f32, f32, u64) {
        let start = self.loss().to_scalar::<f32>().unwrap();
        let mut sent = 0;
        for _ in 0..steps {
            let mut g = Grads::from_store(&self.vm, &self.loss().backward().unwrap()).unwrap();
            if let Some(t) = topk.as_mut() {
                sent += t.apply(&mut g).unwrap().bytes_sparse;
            }
            for (_, var, g) in g.iter() {
                let g = g.unwrap();
                var.set(&var.as_tensor().sub(&g.affine(lr, 0.0).unwrap()).unwrap())
                    .unwrap();
            }
        }
        (start, self.loss().to_scalar::<f32>().unwrap(), sent)
    }
}

/// 1 % top-k keeps one of the 100 weights' gradients per step. Documented
/// bar: after 400 SGD steps (lr 0.6) error feedback is below 1 % of the
/// starting loss and within 2× of dense SGD; without it the loss stays
/// above 100× that. Measured (this machine): start 0.947; dense 5.9e-4,
/// top-1 % + error feedback 4.0e-4, top-1 % without 0.659 — 1/50 of the
/// dense traffic (8 B per step against 400 B).
///
/// The learning rate matters: error feedback applies each coordinate's
/// gradient about `1/fraction` = 100 steps late, and like any delayed
/// gradient method it diverges once `lr · λ_max · 100` is far above 1
/// (measured with `X` entries `N(0, 1)`, `n = 1000`, `d = 250`, lr 0.2:
/// error feedback blew up to 3e11 in 300 steps while plain top-k — greedy
/// coordinate descent — crept down to 3.0 from 265 and dense SGD reached
/// 7e-5).
#[test]
fn one_percent_top_k_with_error_feedback_converges_and_without_it_stalls() {
    const STEPS: usize = 400;
    const LR: f64 = 0.6;
    let dense = Regression::new().train(STEPS, LR, None);
    let cfg = TopKConfig::default(); // 1 % per tensor: 1 of 100 per step
    let ef = Regression::new().train(STEPS, LR, Some(TopK::new(cfg, 1).unwrap()));
    let no_ef = Regression::new().train(
        STEPS,
        LR,
        Some(
            TopK::new(
                TopKConfig {
                    error_feedback: false,
                    ..cfg
                },
                1,
            )
            .unwrap(),
        ),
    );
    println!(
        "{STEPS} SGD steps (lr {LR}), loss start {:.4}: dense {:.3e}, top-1% + error feedback {:.3e}, top-1% without {:.3e}; sent {} B vs dense {} B",
        dense.0,
        dense.1,
        ef.1,
        no_ef.1,
        ef.2,
        STEPS * 100 * 4
    );
    assert_eq!(ef.2, (STEPS * 8) as u64);
    assert!(ef.1 < 0.01 * ef.0, "error feedback: {ef:?}");
    assert!(
        ef.1 < 2.0 * dense.1,
        "error feedback {ef:?} vs dense {dense:?}"
    );
    assert!(no_ef.1 > 100.0 * ef.1, "without error feedback: {no_ef:?}");
}
