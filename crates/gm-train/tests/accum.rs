//! Gradient accumulation: k micro-batches of b give the same gradient and
//! the same optimizer update as one batch of k·b (tiny agent, MSE averaged
//! over the batch, dropout off), also with unequal micro-batches, and the
//! plan follows `clamp(ceil(target / micro), 1, 32)`.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gm_market::OBS_DIM;
use gm_models::ForwardCtx;
use gm_train::{
    accumulate, AccumConfig, AdamW, AdamWConfig, AgentConfig, AgentNet, GradAccumulator, Grads,
    ObsBatch,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `batch` seeded flat observations and Q targets `[B, 3]`.
fn synthetic(batch: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let obs: Vec<f32> = (0..batch * OBS_DIM)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let target = (0..batch * 3)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    (obs, target)
}

/// Items `start..start + n` of the batch as model inputs.
fn slice(data: &(Vec<f32>, Vec<f32>), start: usize, n: usize) -> (ObsBatch, Tensor) {
    let dev = Device::Cpu;
    let obs = &data.0[start * OBS_DIM..(start + n) * OBS_DIM];
    let t = &data.1[start * 3..(start + n) * 3];
    (
        ObsBatch::from_flat(obs, n, &dev).unwrap(),
        Tensor::from_slice(t, (n, 3), &dev).unwrap(),
    )
}

/// A seeded tiny agent on its own master map.
fn agent() -> (VarMap, AgentNet) {
    let vm = VarMap::new();
    let net = AgentNet::new(
        &AgentConfig::tiny(),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    gm_models::init::init_seeded(&vm, 11).unwrap();
    (vm, net)
}

/// The mean squared error over the items of `(obs, target)`.
fn mean_loss(net: &AgentNet, obs: &ObsBatch, target: &Tensor) -> Tensor {
    net.q_values(obs, &mut ForwardCtx::eval())
        .unwrap()
        .sub(target)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
}

fn full_batch_grads(vm: &VarMap, net: &AgentNet, data: &(Vec<f32>, Vec<f32>), n: usize) -> Grads {
    let (obs, t) = slice(data, 0, n);
    let store = mean_loss(net, &obs, &t).backward().unwrap();
    Grads::from_store(vm, &store).unwrap()
}

/// Micro-batches as `(start, len)` over the batch.
fn accumulated_grads(
    vm: &VarMap,
    net: &AgentNet,
    data: &(Vec<f32>, Vec<f32>),
    parts: &[(usize, usize)],
) -> (Grads, f64) {
    accumulate(vm, parts.iter().copied(), |(start, n)| {
        let (obs, t) = slice(data, start, n);
        Ok((mean_loss(net, &obs, &t), n))
    })
    .unwrap()
}

fn max_abs_diff(a: &Grads, b: &Grads) -> f32 {
    let mut worst = 0f32;
    for ((na, _, ga), (nb, _, gb)) in a.iter().zip(b.iter()) {
        assert_eq!(na, nb);
        match (ga, gb) {
            (Some(x), Some(y)) => {
                let d = x
                    .sub(y)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                worst = worst.max(d);
            }
            (None, None) => {}
            _ => panic!("{na}: gradient present in only one"),
        }
    }
    worst
}

fn weights(vm: &VarMap) -> Vec<(String, Vec<f32>)> {
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

fn max_weight_diff(a: &VarMap, b: &VarMap) -> f32 {
    let mut worst = 0f32;
    for ((na, wa), (nb, wb)) in weights(a).iter().zip(&weights(b)) {
        assert_eq!(na, nb);
        for (x, y) in wa.iter().zip(wb) {
            worst = worst.max((x - y).abs());
        }
    }
    worst
}

/// `w ← w − lr · g` for every variable with a gradient.
fn sgd_step(grads: &Grads, lr: f64) {
    for (_, var, g) in grads.iter() {
        if let Some(g) = g {
            var.set(&var.as_tensor().sub(&g.affine(lr, 0.0).unwrap()).unwrap())
                .unwrap();
        }
    }
}

#[test]
fn four_micro_batches_of_four_update_like_one_batch_of_sixteen() {
    let data = synthetic(16, 5);
    let parts = [(0, 4), (4, 4), (8, 4), (12, 4)];

    // Same gradient (and the same mean loss).
    let (vm, net) = agent();
    let full = full_batch_grads(&vm, &net, &data, 16);
    let (acc, acc_loss) = accumulated_grads(&vm, &net, &data, &parts);
    let (obs, t) = slice(&data, 0, 16);
    let full_loss = f64::from(mean_loss(&net, &obs, &t).to_scalar::<f32>().unwrap());
    let gdiff = max_abs_diff(&full, &acc);
    let gnorm = full.global_norm().unwrap();
    println!("gradient max |diff| {gdiff:.2e} (global norm {gnorm:.3}); loss {full_loss:.6} vs {acc_loss:.6}");
    assert!(gdiff < 1e-6, "{gdiff}");
    assert!((full_loss - acc_loss).abs() < 1e-6);

    // One SGD step (lr 0.1) from the same weights: the same weights after.
    let (vm_a, net_a) = agent();
    let (vm_b, net_b) = agent();
    assert_eq!(max_weight_diff(&vm_a, &vm_b), 0.0);
    sgd_step(&full_batch_grads(&vm_a, &net_a, &data, 16), 0.1);
    sgd_step(&accumulated_grads(&vm_b, &net_b, &data, &parts).0, 0.1);
    let sgd_diff = max_weight_diff(&vm_a, &vm_b);
    println!("after one SGD step: max |Δw| {sgd_diff:.2e}");
    assert!(sgd_diff < 1e-5, "{sgd_diff}");

    // One AdamW step (lr 1e-3): the same.
    let (vm_a, net_a) = agent();
    let (vm_b, net_b) = agent();
    let n = Grads::empty(&vm_a).unwrap().len();
    let mut opt_a = AdamW::new(AdamWConfig::default(), n).unwrap();
    let mut opt_b = AdamW::new(AdamWConfig::default(), n).unwrap();
    opt_a
        .step(&full_batch_grads(&vm_a, &net_a, &data, 16))
        .unwrap();
    opt_b
        .step(&accumulated_grads(&vm_b, &net_b, &data, &parts).0)
        .unwrap();
    let adam_diff = max_weight_diff(&vm_a, &vm_b);
    println!("after one AdamW step: max |Δw| {adam_diff:.2e}");
    assert!(adam_diff < 1e-5, "{adam_diff}");
}

#[test]
fn unequal_micro_batches_are_weighted_by_their_items() {
    let data = synthetic(13, 9);
    let (vm, net) = agent();
    let full = full_batch_grads(&vm, &net, &data, 13);
    // 5 + 5 + 3 items: a short last micro-batch.
    let (acc, _) = accumulated_grads(&vm, &net, &data, &[(0, 5), (5, 5), (10, 3)]);
    let d = max_abs_diff(&full, &acc);
    assert!(d < 1e-6, "{d}");

    // Averaging the three micro-batch gradients equally is measurably wrong.
    let mut naive = GradAccumulator::new(&vm).unwrap();
    for (start, n) in [(0, 5), (5, 5), (10, 3)] {
        let (obs, t) = slice(&data, start, n);
        naive
            .add(&mean_loss(&net, &obs, &t).backward().unwrap(), 1)
            .unwrap();
    }
    let naive = naive.finish().unwrap();
    let wrong = max_abs_diff(&full, &naive);
    println!("item-weighted max |diff| {d:.2e}, equal weights {wrong:.2e}");
    assert!(wrong > 100.0 * d.max(1e-9), "{wrong} vs {d}");
}

#[test]
fn plan_reaches_the_target_and_the_accumulator_follows_it() {
    let cfg = AccumConfig::default();
    let cases = [
        (8, 16, 128),
        (24, 6, 144),
        (48, 3, 144),
        (128, 1, 128),
        (300, 1, 300),
        (2, 32, 64),
    ];
    for (micro, steps, effective) in cases {
        let plan = cfg.plan(micro).unwrap();
        assert_eq!(
            (plan.steps, plan.effective_batch()),
            (steps, effective),
            "micro {micro}"
        );
    }
    // Drive one update with the plan for micro-batches of 48 at a target of
    // 128: 3 micro-batches, 144 items, ready after the third.
    let plan = cfg.plan(48).unwrap();
    let (vm, _) = agent();
    let mut acc = GradAccumulator::new(&vm).unwrap();
    let w = vm.all_vars()[0].clone();
    let mut added = 0;
    while !acc.is_ready(&plan) {
        let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
        acc.add(&loss.backward().unwrap(), plan.micro_batch)
            .unwrap();
        added += 1;
    }
    assert_eq!((added, acc.items(), acc.micro_steps()), (3, 144, 3));
    let g = acc.finish().unwrap();
    assert_eq!(g.elem_count(), w.elem_count());
    assert_eq!(acc.items(), 0, "finish starts over");
    assert!(acc.finish().is_err(), "nothing to finish");
    assert!(acc
        .add(&w.as_tensor().sum_all().unwrap().backward().unwrap(), 0)
        .is_err());
}
