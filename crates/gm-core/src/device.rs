//! [`Device`]: where a tensor or buffer lives.

use std::fmt;

/// A compute device. Device-neutral code passes this around; only a crate's
/// `cuda` module turns `Cuda` into a real context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host memory and CPU kernels (the reference for every CUDA path).
    #[default]
    Cpu,
    /// A CUDA device by ordinal.
    Cuda {
        /// Device ordinal, as `cudaSetDevice` counts.
        ordinal: usize,
    },
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda { ordinal } => write!(f, "cuda:{ordinal}"),
        }
    }
}
