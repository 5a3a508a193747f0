//! Where the models run: a [`gm_core::Device`] turned into a candle device,
//! and how much memory a CUDA device has free.
//!
//! The models are written against candle's device-neutral tensor API, so
//! they run on any device candle was built for. candle's CUDA backend is the
//! opt-in feature `candle-cuda` (it needs the CUDA toolkit's `nvcc` at build
//! time and `libcuda`, `libcudart`, `libcublas`, `libcurand` at run time;
//! `cargo xtask cuda-check --bundle` builds it). Without that feature, or
//! without a driver or a device, asking for [`gm_core::Device::Cuda`] is
//! [`Error::NoCuda`], never a panic.
//!
//! On CUDA the dense attention is the only kernel: the memory-efficient and
//! sparse attention ops are CPU custom ops (their CUDA twin is
//! [`crate::cuda::SparseAttentionCuda`], on host slices, not wired into
//! candle's autograd), and [`crate::attention`] refuses them on another
//! device with [`Error::Config`].

use crate::{Error, Result};

/// `true` when candle was built with its CUDA backend (feature
/// `candle-cuda`).
pub const CANDLE_CUDA: bool = cfg!(feature = "candle-cuda");

/// The candle device for `device`: the CPU, or CUDA device `ordinal`
/// (feature `candle-cuda`, a driver and that device needed; otherwise
/// [`Error::NoCuda`] saying which is missing).
pub fn candle_device(device: gm_core::Device) -> Result<candle_core::Device> {
    match device {
        gm_core::Device::Cpu => Ok(candle_core::Device::Cpu),
        gm_core::Device::Cuda { ordinal } => cuda_device(ordinal),
    }
}

#[cfg(feature = "candle-cuda")]
fn cuda_device(ordinal: usize) -> Result<candle_core::Device> {
    candle_core::Device::new_cuda(ordinal).map_err(|e| {
        // candle appends a backtrace when RUST_BACKTRACE is set: keep the
        // driver's words.
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default();
        Error::NoCuda(format!("cuda:{ordinal}: {first}"))
    })
}

#[cfg(not(feature = "candle-cuda"))]
fn cuda_device(ordinal: usize) -> Result<candle_core::Device> {
    Err(Error::NoCuda(format!(
        "cuda:{ordinal} asked for, but this build has no candle CUDA backend \
         (rebuild with `--features candle-cuda` and a CUDA toolkit; see \
         `cargo xtask cuda-check --bundle`)"
    )))
}

/// Free and total bytes of the CUDA device `device` runs on, from the
/// driver (`cuMemGetInfo`); `None` for the CPU.
pub fn memory_info(device: &candle_core::Device) -> Result<Option<DeviceMemory>> {
    match device {
        candle_core::Device::Cpu => Ok(None),
        #[cfg(feature = "candle-cuda")]
        candle_core::Device::Cuda(d) => {
            let (free, total) = d
                .cuda_stream()
                .context()
                .mem_get_info()
                .map_err(|e| Error::NoCuda(format!("cuMemGetInfo: {e}")))?;
            Ok(Some(DeviceMemory { free, total }))
        }
        #[allow(unreachable_patterns)]
        other => Err(Error::NoCuda(format!(
            "memory of {other:?}: only CUDA devices are supported"
        ))),
    }
}

/// A device's memory as the driver reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes free now (other processes' allocations included).
    pub free: usize,
    /// The device's memory in bytes.
    pub total: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_maps_to_cpu_and_has_no_device_memory() {
        let d = candle_device(gm_core::Device::Cpu).unwrap();
        assert!(d.is_cpu());
        assert_eq!(memory_info(&d).unwrap(), None);
    }

    #[test]
    fn cuda_without_a_backend_or_device_is_a_typed_error() {
        // On a machine without a GPU both builds answer NoCuda; with
        // `candle-cuda` and a device this is the GPU bundle's business.
        if CANDLE_CUDA && std::env::var_os("GM_REQUIRE_CUDA").is_some() {
            return;
        }
        match candle_device(gm_core::Device::Cuda { ordinal: 0 }) {
            Err(Error::NoCuda(msg)) => assert!(msg.contains("cuda:0"), "{msg}"),
            Ok(_) if CANDLE_CUDA => {} // a real device
            other => panic!("expected NoCuda, got {other:?}"),
        }
    }
}
