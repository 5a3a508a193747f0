//! Safetensors save/load of a model's variables (candle's format), with a
//! clear error naming a missing or mis-shaped tensor.

use std::path::Path;

use candle_nn::VarMap;

use crate::{Error, Result};

/// Writes every variable of `varmap` to `path` (safetensors).
pub fn save(varmap: &VarMap, path: impl AsRef<Path>) -> Result<()> {
    varmap.save(path.as_ref()).map_err(|e| Error::Weights {
        path: path.as_ref().to_owned(),
        reason: e.to_string(),
    })
}

/// Loads `path` into the variables of `varmap`. Every variable must be in
/// the file with the same shape; otherwise the error names the first one
/// that is missing or differs, and no variable is changed.
pub fn load(varmap: &VarMap, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let err = |reason: String| Error::Weights {
        path: path.to_owned(),
        reason,
    };
    let data = varmap
        .data()
        .lock()
        .map_err(|_| err("the variable map's lock is poisoned".into()))?;
    let device = match data.values().next() {
        Some(v) => v.device().clone(),
        None => return Ok(()),
    };
    let file = candle_core::safetensors::load(path, &device).map_err(|e| err(e.to_string()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    // Check everything first, then set: a bad file changes nothing.
    for name in &names {
        let var = &data[*name];
        match file.get(*name) {
            None => return Err(err(format!("tensor {name:?} is missing"))),
            Some(t) if t.dims() != var.dims() => {
                return Err(err(format!(
                    "tensor {name:?} has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                )))
            }
            Some(_) => {}
        }
    }
    for name in names {
        let var = &data[name];
        let t = file[name].to_dtype(var.dtype())?;
        var.set(&t)
            .map_err(|e| err(format!("tensor {name:?}: {e}")))?;
    }
    Ok(())
}
