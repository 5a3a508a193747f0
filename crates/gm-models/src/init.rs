//! Seeded weight initialisation. candle cannot seed its CPU random
//! generator (`Device::Cpu.set_seed` is an error), so models built on a
//! `VarMap` start from different weights in every process; [`init_seeded`]
//! overwrites them from a ChaCha stream so runs and tests are reproducible.

use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// Re-initialises every variable of `varmap` from `seed`, visiting names in
/// sorted order: tensors of rank ≥ 2 (weights, tables) uniform in
/// `±1/√fan_in` (`fan_in` = product of all dimensions but the first, as
/// candle's and PyTorch's default `Linear` init); rank-1 tensors whose name
/// ends in `bias` become 0; other rank-1 tensors (LayerNorm scales) are
/// left as they are.
pub fn init_seeded(varmap: &VarMap, seed: u64) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::config("varmap", "poisoned", "an unpoisoned lock"))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let value = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..=bound)).collect();
            Tensor::from_vec(v, dims.as_slice(), var.device())?
        } else if name.ends_with("bias") {
            Tensor::zeros(dims.as_slice(), DType::F32, var.device())?
        } else {
            continue;
        };
        var.set(&value.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::{LayerNorm, Linear};
    use candle_core::{Device, Module};
    use candle_nn::VarBuilder;

    #[test]
    fn same_seed_same_weights_and_layer_norm_scales_stay_one() {
        let build = || {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
            let lin = Linear::new(16, 4, vb.pp("lin")).unwrap();
            let ln = LayerNorm::new(4, vb.pp("ln")).unwrap();
            (vm, lin, ln)
        };
        let (va, la, na) = build();
        let (vb, lb, nb) = build();
        init_seeded(&va, 7).unwrap();
        init_seeded(&vb, 7).unwrap();
        let x = Tensor::ones((2, 16), DType::F32, &Device::Cpu).unwrap();
        let ya = na
            .forward(&la.forward(&x).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let yb = nb
            .forward(&lb.forward(&x).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(ya, yb);
        let w = la.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(w.iter().all(|v| v.abs() <= 0.25 + 1e-6), "±1/√16");
        assert!(la
            .bias()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| *v == 0.0));
        let data = va.data().lock().unwrap();
        assert_eq!(data["ln.weight"].to_vec1::<f32>().unwrap(), vec![1.0; 4]);
        drop(data);
        init_seeded(&vb, 8).unwrap();
        assert_ne!(
            la.weight().to_vec2::<f32>().unwrap(),
            lb.weight().to_vec2::<f32>().unwrap()
        );
    }
}
