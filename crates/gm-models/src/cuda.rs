//! CUDA kernels behind the `cuda` feature: the GPU twin of the CPU sparse
//! attention ([`crate::attention::sparse`]), forward and backward.
//!
//! This is the only module that names `cudarc` or tests the `cuda` feature;
//! its API is the same with and without the feature (without it, or without
//! a driver, NVRTC or a device, every entry returns [`Error::NoCuda`], never
//! a panic).
//!
//! # What it is, and what it is not
//!
//! [`SparseAttentionCuda`] runs the kernels of `kernels/sparse_attention.cu`
//! on host slices: it copies `q, k, v` (and `dO`) to the device, launches,
//! and copies the results back. The models in this crate run on the CPU, and
//! this type is **not** wired into candle's autograd (candle's own CUDA
//! backend needs `nvcc` at build time and is a separate, later opt-in); it
//! is the device implementation of the same math, checked against the CPU
//! op by `tests/cuda.rs` and timed by `examples/cuda_attention_bench.rs`.
//!
//! # Kernels
//!
//! The CUDA C source is embedded with `include_str!` ([`KERNEL_SOURCES`]),
//! compiled by NVRTC on the first [`SparseAttentionCuda::new`] for a device
//! (for that device's compute capability) and cached per device ordinal for
//! the life of the process. [`compile_kernels_to_ptx`] needs NVRTC only (no
//! driver, no GPU), so CI can reject a kernel that does not compile.
//!
//! The thread mapping and the backward strategy are documented at the top of
//! the `.cu` file. In short: one warp per query row (forward, `dQ`) or key
//! row (`dK`, `dV`), online softmax forward, and a backward in two passes
//! (query-major for `dQ`, key-major over the transposed pattern for `dK`
//! and `dV`) without atomics, so results are identical run to run. Keys are
//! visited in [`SparsePattern::for_each_key`] order; the summation order
//! within a row differs from the CPU's (warp reductions, an online softmax),
//! so the two agree to rounding (`~1e-6` relative), not bit for bit.
//!
//! # Loading CUDA
//!
//! `cudarc` loads `libcuda` and `libnvrtc` at run time (`dynamic-loading`),
//! by the names of CUDA 12 (`libnvrtc.so`, `libnvrtc.so.12`, ...): put the
//! directory of `libnvrtc.so.12` (e.g. from PyPI's `nvidia-cuda-nvrtc-cu12`)
//! on `LD_LIBRARY_PATH`. A CUDA-13-only machine needs a `libnvrtc.so`
//! symlink to its `libnvrtc.so.13` there.

use std::time::Duration;

use crate::attention::SparsePattern;
use crate::{Error, Result};

/// `true` when the crate was built with the `cuda` feature.
pub const FEATURE_ENABLED: bool = cfg!(feature = "cuda");

/// The kernel sources, `(file name, CUDA C)`, embedded at build time.
pub const KERNEL_SOURCES: &[(&str, &str)] = &[(
    "sparse_attention.cu",
    include_str!("../kernels/sparse_attention.cu"),
)];

/// The largest head dimension `D` the kernels take (each lane keeps
/// `D / 32` accumulators in registers).
pub const MAX_HEAD_DIM: usize = 256;

/// The head-dimension classes: an entry point per class, the smallest that
/// fits `D` is launched.
const DIM_CLASSES: [usize; 4] = [32, 64, 128, 256];

/// The entry points of `sparse_attention.cu`, per head-dimension class
/// (`D ≤ 32, 64, 128, 256`): forward, backward pass 1 (`dQ`), backward
/// pass 2 (`dK`, `dV`).
pub const SPARSE_ATTENTION_ENTRIES: [[&str; 3]; 4] = [
    [
        "gm_sparse_attn_fwd_d32",
        "gm_sparse_attn_bwd_dq_d32",
        "gm_sparse_attn_bwd_dkdv_d32",
    ],
    [
        "gm_sparse_attn_fwd_d64",
        "gm_sparse_attn_bwd_dq_d64",
        "gm_sparse_attn_bwd_dkdv_d64",
    ],
    [
        "gm_sparse_attn_fwd_d128",
        "gm_sparse_attn_bwd_dq_d128",
        "gm_sparse_attn_bwd_dkdv_d128",
    ],
    [
        "gm_sparse_attn_fwd_d256",
        "gm_sparse_attn_bwd_dq_d256",
        "gm_sparse_attn_bwd_dkdv_d256",
    ],
];

/// Threads per block (4 warps; one warp per row).
const THREADS_PER_BLOCK: u32 = 128;
/// Rows (warps) per block.
const ROWS_PER_BLOCK: u64 = THREADS_PER_BLOCK as u64 / 32;

/// The shape of one call: `q` and the output are `[b, h, nq, d]`, `k` and
/// `v` are `[b, h, nk, d]`, all row-major `f32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttentionDims {
    /// Batch size.
    pub b: usize,
    /// Heads.
    pub h: usize,
    /// Query positions.
    pub nq: usize,
    /// Key (and value) positions, at least 1.
    pub nk: usize,
    /// Head dimension, `1..=MAX_HEAD_DIM`.
    pub d: usize,
}

impl AttentionDims {
    /// Self-attention shape: `nq = nk = n`.
    pub fn new(b: usize, h: usize, n: usize, d: usize) -> Self {
        Self {
            b,
            h,
            nq: n,
            nk: n,
            d,
        }
    }

    /// Elements of `q`, the output and `dO` (`b·h·nq·d`).
    pub fn q_len(&self) -> usize {
        self.b * self.h * self.nq * self.d
    }

    /// Elements of `k` and `v` (`b·h·nk·d`).
    pub fn k_len(&self) -> usize {
        self.b * self.h * self.nk * self.d
    }

    /// Elements of the logsumexp (`b·h·nq`).
    pub fn lse_len(&self) -> usize {
        self.b * self.h * self.nq
    }
}

/// Device times of [`SparseAttentionCuda::time_kernels`]: the median over
/// the iterations, kernels only (inputs already on the device, launch and
/// synchronisation included).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelTimes {
    /// One forward pass.
    pub forward: Duration,
    /// A forward pass and the two backward passes.
    pub forward_backward: Duration,
    /// Iterations timed (each).
    pub iters: usize,
}

/// Whether NVRTC (`libnvrtc`) can be loaded (always `false` without the
/// `cuda` feature).
pub fn nvrtc_present() -> bool {
    imp::nvrtc_present()
}

/// Whether the CUDA driver (`libcuda`) can be loaded (always `false`
/// without the `cuda` feature). A driver does not mean a device: see
/// [`device_count`].
pub fn driver_present() -> bool {
    imp::driver_present()
}

/// NVRTC's version `(major, minor)`, when it can be loaded.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    imp::nvrtc_version()
}

/// The number of CUDA devices; [`Error::NoCuda`] without the feature or a
/// driver.
pub fn device_count() -> Result<usize> {
    imp::device_count()
}

/// Compiles every kernel source ([`KERNEL_SOURCES`]) to PTX with NVRTC for
/// its default virtual architecture, returning `(file name, PTX)`. Needs
/// NVRTC only: no driver, no GPU. [`Error::NoCuda`] when NVRTC is missing
/// or the feature is off, and also (with the NVRTC log) when a source does
/// not compile: check [`nvrtc_present`] to tell the two apart.
pub fn compile_kernels_to_ptx() -> Result<Vec<(&'static str, String)>> {
    imp::compile_all(None)
}

/// Like [`compile_kernels_to_ptx`], for the virtual architecture `arch`
/// (`"compute_90"` for Hopper).
pub fn compile_kernels_to_ptx_for(arch: &str) -> Result<Vec<(&'static str, String)>> {
    imp::compile_all(Some(arch))
}

/// The sparse-attention kernels on one CUDA device (see the module docs).
///
/// Cheap to create after the first one per device (the compiled module is
/// cached per ordinal); uses the device's primary context and its default
/// stream; `Send + Sync`, calls from several threads are serialised by the
/// stream.
#[derive(Debug)]
pub struct SparseAttentionCuda {
    inner: imp::Device,
}

impl SparseAttentionCuda {
    /// The kernels on device `ordinal`, compiled by NVRTC on first use.
    /// [`Error::NoCuda`] without the feature, the driver, NVRTC or the
    /// device, or when the module does not compile or load (the message
    /// says which); never panics.
    pub fn new(ordinal: usize) -> Result<Self> {
        if i32::try_from(ordinal).is_err() {
            return Err(Error::NoCuda(format!("no CUDA device {ordinal}")));
        }
        Ok(Self {
            inner: imp::Device::new(ordinal)?,
        })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.inner.ordinal()
    }

    /// The device's name (`"NVIDIA H200"`).
    pub fn name(&self) -> &str {
        self.inner.name()
    }

    /// The device's compute capability `(major, minor)`.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.inner.compute_capability()
    }

    /// Sparse attention forward: `(out [b, h, nq, d], lse [b, h, nq])`, the
    /// output and the per-row logsumexp of the scaled scores (`−∞` and a
    /// zero row for a query that sees no key), as the CPU op computes them.
    /// Wrong slice lengths, `D` outside `1..=MAX_HEAD_DIM`, `nk = 0` and an
    /// invalid pattern are errors.
    pub fn forward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: AttentionDims,
        pattern: &SparsePattern,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let launch = Launch::new(dims, pattern)?;
        check_len("q", q, dims.q_len(), "[b, h, nq, d]")?;
        check_len("k", k, dims.k_len(), "[b, h, nk, d]")?;
        check_len("v", v, dims.k_len(), "[b, h, nk, d]")?;
        self.inner.forward(&launch, q, k, v)
    }

    /// Sparse attention backward for the upstream gradient `dout` (`dO`,
    /// `[b, h, nq, d]`): `(dq, dk, dv)`, the gradients of `Σ out ∘ dO`. Runs
    /// the forward kernel first (its output and logsumexp stay on the
    /// device), then the two backward passes; the same checks as
    /// [`forward`](Self::forward).
    pub fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dout: &[f32],
        dims: AttentionDims,
        pattern: &SparsePattern,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let launch = Launch::new(dims, pattern)?;
        check_len("q", q, dims.q_len(), "[b, h, nq, d]")?;
        check_len("k", k, dims.k_len(), "[b, h, nk, d]")?;
        check_len("v", v, dims.k_len(), "[b, h, nk, d]")?;
        check_len("dout", dout, dims.q_len(), "[b, h, nq, d]")?;
        self.inner.backward(&launch, q, k, v, dout)
    }

    /// Times the kernels alone on seeded pseudo-random inputs of shape
    /// `dims`: after one warm-up, `iters` forward passes and `iters`
    /// forward + backward passes, each synchronised; the medians.
    pub fn time_kernels(
        &self,
        dims: AttentionDims,
        pattern: &SparsePattern,
        iters: usize,
    ) -> Result<KernelTimes> {
        let launch = Launch::new(dims, pattern)?;
        self.inner.time_kernels(&launch, iters.max(1))
    }
}

/// A slice of the wrong length is a shape error.
fn check_len(what: &'static str, x: &[f32], want: usize, shape: &str) -> Result<()> {
    if x.len() == want {
        return Ok(());
    }
    Err(Error::Shape {
        what,
        expected: format!("{want} elements ({shape})"),
        got: vec![x.len()],
    })
}

/// The validated launch parameters of one call, in the kernels' `int`s.
///
/// The pattern is clamped into `int` range without changing which keys
/// any query sees (for `i < nq`, `j < nk`): a window `≥ max(nq, nk)` allows
/// every pair, a stride above `nk` selects no key (as `nk + 1` does), and
/// `global_tokens ≥ max(nq, nk)` makes every position global. Stride `0`
/// means none.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Launch {
    dims: AttentionDims,
    bh: i32,
    nq: i32,
    nk: i32,
    d: i32,
    scale: f32,
    window: i32,
    stride: i32,
    global_tokens: i32,
    causal: i32,
    /// Index into [`SPARSE_ATTENTION_ENTRIES`].
    class: usize,
}

impl Launch {
    fn new(dims: AttentionDims, pattern: &SparsePattern) -> Result<Self> {
        pattern.validate()?;
        let AttentionDims { b, h, nq, nk, d } = dims;
        if d == 0 || d > MAX_HEAD_DIM {
            return Err(Error::config(
                "cuda sparse attention head dim",
                d,
                format!("1..={MAX_HEAD_DIM}"),
            ));
        }
        if nk == 0 {
            return Err(Error::Shape {
                what: "cuda sparse attention k",
                expected: "[b, h, nk ≥ 1, d]".into(),
                got: vec![b, h, nk, d],
            });
        }
        // The kernels index positions with `int` and rows (warps) with
        // 64-bit integers; the grid has at most 2³¹ − 1 blocks.
        let limit = i32::MAX as usize / 2;
        let bh = b.checked_mul(h);
        let rows = bh.and_then(|bh| bh.checked_mul(nq.max(nk)));
        let blocks = rows.map(|r| (r as u64).div_ceil(ROWS_PER_BLOCK));
        let fits = bh.is_some_and(|bh| bh <= limit)
            && nq <= limit
            && nk <= limit
            && blocks.is_some_and(|n| n <= i32::MAX as u64)
            && dims.q_len().checked_mul(4).is_some()
            && dims.k_len().checked_mul(4).is_some();
        if !fits {
            return Err(Error::Shape {
                what: "cuda sparse attention",
                expected: format!(
                    "b·h, nq, nk ≤ {limit} and at most {} rows",
                    i32::MAX as u64 * ROWS_PER_BLOCK
                ),
                got: vec![b, h, nq, nk, d],
            });
        }
        let max_n = nq.max(nk);
        let class = DIM_CLASSES
            .iter()
            .position(|&c| d <= c)
            .expect("d ≤ MAX_HEAD_DIM was checked");
        Ok(Self {
            dims,
            bh: (b * h) as i32,
            nq: nq as i32,
            nk: nk as i32,
            d: d as i32,
            scale: 1.0 / (d as f32).sqrt(),
            window: pattern.window.min(max_n) as i32,
            stride: pattern.stride.map_or(0, |s| s.min(nk + 1) as i32),
            global_tokens: pattern.global_tokens.min(max_n) as i32,
            causal: i32::from(pattern.causal),
            class,
        })
    }

    /// The pattern the kernels see, as a [`SparsePattern`] (for tests).
    #[cfg(test)]
    fn clamped_pattern(&self) -> SparsePattern {
        SparsePattern {
            window: self.window as usize,
            stride: (self.stride > 0).then_some(self.stride as usize),
            global_tokens: self.global_tokens as usize,
            causal: self.causal != 0,
        }
    }

    /// Rows (one warp each) of the query-major kernels.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn query_rows(&self) -> u64 {
        self.bh as u64 * self.nq as u64
    }

    /// Rows of the key-major kernel.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn key_rows(&self) -> u64 {
        self.bh as u64 * self.nk as u64
    }
}

/// Seeded values in `[-amp, amp)` (SplitMix64), for [`SparseAttentionCuda::time_kernels`].
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn pseudo_random(n: usize, amp: f32, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
        })
        .collect()
}

#[cfg(not(feature = "cuda"))]
mod imp {
    //! Stand-ins without the `cuda` feature: nothing is present.

    use super::Launch;
    use crate::{Error, Result};

    fn off() -> Error {
        Error::NoCuda("gm-models was built without the `cuda` feature".into())
    }

    pub(super) fn nvrtc_present() -> bool {
        false
    }

    pub(super) fn driver_present() -> bool {
        false
    }

    pub(super) fn nvrtc_version() -> Option<(i32, i32)> {
        None
    }

    pub(super) fn device_count() -> Result<usize> {
        Err(off())
    }

    pub(super) fn compile_all(_arch: Option<&str>) -> Result<Vec<(&'static str, String)>> {
        Err(off())
    }

    /// No value exists: [`Device::new`] always fails.
    #[derive(Debug)]
    pub(super) enum Device {}

    impl Device {
        pub(super) fn new(_ordinal: usize) -> Result<Self> {
            Err(off())
        }
        pub(super) fn ordinal(&self) -> usize {
            match *self {}
        }
        pub(super) fn name(&self) -> &str {
            match *self {}
        }
        pub(super) fn compute_capability(&self) -> (i32, i32) {
            match *self {}
        }
        pub(super) fn forward(
            &self,
            _: &Launch,
            _: &[f32],
            _: &[f32],
            _: &[f32],
        ) -> Result<(Vec<f32>, Vec<f32>)> {
            match *self {}
        }
        pub(super) fn backward(
            &self,
            _: &Launch,
            _: &[f32],
            _: &[f32],
            _: &[f32],
            _: &[f32],
        ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
            match *self {}
        }
        pub(super) fn time_kernels(&self, _: &Launch, _: usize) -> Result<super::KernelTimes> {
            match *self {}
        }
    }
}

#[cfg(feature = "cuda")]
mod imp {
    //! The cudarc implementation. Every call into cudarc runs inside
    //! [`guard`] (`catch_unwind`), after checking that the library it needs
    //! can be loaded: cudarc panics when it cannot load one.

    use std::collections::HashMap;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::{Duration, Instant};

    use cudarc::driver::{
        CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg,
    };
    use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

    use super::{
        pseudo_random, KernelTimes, Launch, KERNEL_SOURCES, ROWS_PER_BLOCK,
        SPARSE_ATTENTION_ENTRIES, THREADS_PER_BLOCK,
    };
    use crate::{Error, Result};

    /// Runs `f`, turning a panic inside cudarc into [`Error::NoCuda`].
    fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            Err(Error::NoCuda(format!("{what}: cudarc panicked: {msg}")))
        })
    }

    /// A driver error during `what`, as [`Error::NoCuda`].
    fn driver_err(what: String) -> impl FnOnce(DriverError) -> Error {
        move |e| Error::NoCuda(format!("{what}: {e:?}"))
    }

    pub(super) fn nvrtc_present() -> bool {
        static PRESENT: OnceLock<bool> = OnceLock::new();
        *PRESENT.get_or_init(|| {
            // SAFETY: `is_culib_present` only tries to dlopen libnvrtc by its
            // usual names and drops the handle; it calls no NVRTC function.
            catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
        })
    }

    pub(super) fn driver_present() -> bool {
        static PRESENT: OnceLock<bool> = OnceLock::new();
        *PRESENT.get_or_init(|| {
            // SAFETY: as above, for libcuda.
            catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
        })
    }

    pub(super) fn nvrtc_version() -> Option<(i32, i32)> {
        if !nvrtc_present() {
            return None;
        }
        let (mut major, mut minor) = (0, 0);
        // SAFETY: the library is present (checked above); `nvrtcVersion`
        // writes two ints through valid pointers.
        let res = catch_unwind(AssertUnwindSafe(|| unsafe {
            cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor)
        }));
        matches!(res, Ok(cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS)).then_some((major, minor))
    }

    fn no_driver() -> Error {
        Error::NoCuda("no CUDA driver (libcuda could not be loaded)".into())
    }

    fn no_nvrtc() -> Error {
        Error::NoCuda(
            "NVRTC not found (libnvrtc could not be loaded: put the directory of libnvrtc.so.12 \
             (pip install nvidia-cuda-nvrtc-cu12) on LD_LIBRARY_PATH; with only CUDA 13's \
             libnvrtc.so.13, add a libnvrtc.so symlink to it there, next to \
             libnvrtc-builtins.so.13.0)"
                .into(),
        )
    }

    pub(super) fn device_count() -> Result<usize> {
        if !driver_present() {
            return Err(no_driver());
        }
        guard("cuDeviceGetCount", || {
            CudaContext::device_count()
                .map(|n| n.max(0) as usize)
                .map_err(driver_err("cuDeviceGetCount".into()))
        })
    }

    /// One source to PTX; the error carries the NVRTC log.
    fn compile_one(name: &'static str, src: &str, arch: Option<&str>) -> Result<String> {
        let opts = CompileOptions {
            name: Some(name.to_string()),
            options: arch
                .map(|a| vec![format!("--gpu-architecture={a}")])
                .unwrap_or_default(),
            ..Default::default()
        };
        match cudarc::nvrtc::compile_ptx_with_opts(src, opts) {
            Ok(ptx) => Ok(ptx.to_src()),
            Err(CompileError::CompileError { log, options, .. }) => Err(Error::NoCuda(format!(
                "NVRTC failed to compile {name} (options {options:?}):\n{}",
                log.to_string_lossy()
            ))),
            Err(e) => Err(Error::NoCuda(format!("NVRTC, {name}: {e:?}"))),
        }
    }

    pub(super) fn compile_all(arch: Option<&str>) -> Result<Vec<(&'static str, String)>> {
        if !nvrtc_present() {
            return Err(no_nvrtc());
        }
        guard("NVRTC", || {
            KERNEL_SOURCES
                .iter()
                .map(|&(name, src)| Ok((name, compile_one(name, src, arch)?)))
                .collect()
        })
    }

    /// One device's loaded module.
    #[derive(Debug)]
    struct Kernels {
        ctx: Arc<CudaContext>,
        name: String,
        cc: (i32, i32),
        /// `[class][forward, dq, dkdv]`, as [`SPARSE_ATTENTION_ENTRIES`].
        functions: Vec<[CudaFunction; 3]>,
    }

    /// The loaded modules, by device ordinal.
    fn cache() -> &'static Mutex<HashMap<usize, Arc<Kernels>>> {
        static CACHE: OnceLock<Mutex<HashMap<usize, Arc<Kernels>>>> = OnceLock::new();
        CACHE.get_or_init(Default::default)
    }

    /// Creates the context and compiles and loads the module for `ordinal`.
    fn load(ordinal: usize) -> Result<Kernels> {
        let ctx = CudaContext::new(ordinal).map_err(driver_err(format!(
            "no CUDA device {ordinal} (CudaContext::new)"
        )))?;
        let name = ctx
            .name()
            .map_err(driver_err(format!("cuda:{ordinal}: device name")))?;
        let cc = ctx
            .compute_capability()
            .map_err(driver_err(format!("cuda:{ordinal}: compute capability")))?;
        let (file, src) = KERNEL_SOURCES[0];
        // PTX for the device's own architecture; an NVRTC older than the
        // device does not know it, then its default (JIT-compiled forward).
        let arch = format!("compute_{}{}", cc.0, cc.1);
        let ptx = compile_one(file, src, Some(&arch)).or_else(|_| compile_one(file, src, None))?;
        let module = ctx
            .load_module(Ptx::from_src(ptx))
            .map_err(driver_err(format!(
                "cuda:{ordinal}: loading the PTX of {file} (an NVRTC newer than the driver \
             emits PTX the driver cannot load)"
            )))?;
        let functions = SPARSE_ATTENTION_ENTRIES
            .iter()
            .map(|names| {
                let f = |n: &str| {
                    module
                        .load_function(n)
                        .map_err(driver_err(format!("cuda:{ordinal}: kernel {n}")))
                };
                Ok([f(names[0])?, f(names[1])?, f(names[2])?])
            })
            .collect::<Result<_>>()?;
        Ok(Kernels {
            ctx,
            name,
            cc,
            functions,
        })
    }

    #[derive(Debug)]
    pub(super) struct Device {
        kernels: Arc<Kernels>,
        stream: Arc<CudaStream>,
    }

    /// A launch configuration over `rows` warps.
    fn config(rows: u64) -> LaunchConfig {
        LaunchConfig {
            // Launch::new checked that the block count fits.
            grid_dim: (rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
            block_dim: (THREADS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Device buffers of one call.
    struct Buffers {
        q: CudaSlice<f32>,
        k: CudaSlice<f32>,
        v: CudaSlice<f32>,
        out: CudaSlice<f32>,
        lse: CudaSlice<f32>,
    }

    /// Backward buffers.
    struct Grads {
        dout: CudaSlice<f32>,
        delta: CudaSlice<f32>,
        dq: CudaSlice<f32>,
        dk: CudaSlice<f32>,
        dv: CudaSlice<f32>,
    }

    impl Device {
        pub(super) fn new(ordinal: usize) -> Result<Self> {
            if !driver_present() {
                return Err(no_driver());
            }
            if !nvrtc_present() {
                return Err(no_nvrtc());
            }
            guard(&format!("cuda:{ordinal}"), || {
                let mut map = cache().lock().unwrap_or_else(|e| e.into_inner());
                let kernels = match map.get(&ordinal) {
                    Some(k) => k.clone(),
                    None => {
                        let k = Arc::new(load(ordinal)?);
                        map.insert(ordinal, k.clone());
                        k
                    }
                };
                let stream = kernels.ctx.default_stream();
                Ok(Self { kernels, stream })
            })
        }

        pub(super) fn ordinal(&self) -> usize {
            self.kernels.ctx.ordinal()
        }

        pub(super) fn name(&self) -> &str {
            &self.kernels.name
        }

        pub(super) fn compute_capability(&self) -> (i32, i32) {
            self.kernels.cc
        }

        fn what(&self, op: &str) -> String {
            format!("cuda:{}: {op}", self.ordinal())
        }

        /// Uploads `q, k, v` and allocates the output and lse.
        fn upload(&self, l: &Launch, q: &[f32], k: &[f32], v: &[f32]) -> Result<Buffers> {
            let s = &self.stream;
            let e = || driver_err(self.what("host → device copy"));
            Ok(Buffers {
                q: s.clone_htod(q).map_err(e())?,
                k: s.clone_htod(k).map_err(e())?,
                v: s.clone_htod(v).map_err(e())?,
                out: s.alloc_zeros(l.dims.q_len()).map_err(e())?,
                lse: s.alloc_zeros(l.dims.lse_len()).map_err(e())?,
            })
        }

        fn alloc_grads(&self, l: &Launch, dout: &[f32]) -> Result<Grads> {
            let s = &self.stream;
            let e = || driver_err(self.what("device allocation"));
            Ok(Grads {
                dout: s.clone_htod(dout).map_err(e())?,
                delta: s.alloc_zeros(l.dims.lse_len()).map_err(e())?,
                dq: s.alloc_zeros(l.dims.q_len()).map_err(e())?,
                dk: s.alloc_zeros(l.dims.k_len()).map_err(e())?,
                dv: s.alloc_zeros(l.dims.k_len()).map_err(e())?,
            })
        }

        /// Launches the forward kernel.
        fn launch_forward(&self, l: &Launch, b: &mut Buffers) -> Result<()> {
            let f = &self.kernels.functions[l.class][0];
            let mut args = self.stream.launch_builder(f);
            args.arg(&b.q)
                .arg(&b.k)
                .arg(&b.v)
                .arg(&mut b.out)
                .arg(&mut b.lse);
            args.arg(&l.bh)
                .arg(&l.nq)
                .arg(&l.nk)
                .arg(&l.d)
                .arg(&l.scale);
            args.arg(&l.window)
                .arg(&l.stride)
                .arg(&l.global_tokens)
                .arg(&l.causal);
            // SAFETY: the arguments match `gm_sparse_attn_fwd_*` in
            // sparse_attention.cu in number, order and type (5 f32 pointers,
            // 4 ints, a float, 4 ints); q/out hold bh·nq·d floats, k/v
            // bh·nk·d, lse bh·nq (Launch::new and the callers' length
            // checks); the kernel reads and writes only within those.
            unsafe { args.launch(config(l.query_rows())) }
                .map_err(driver_err(self.what("launch gm_sparse_attn_fwd")))?;
            Ok(())
        }

        /// Launches the two backward kernels (after the forward one).
        fn launch_backward(&self, l: &Launch, b: &Buffers, g: &mut Grads) -> Result<()> {
            let [_, dq_fn, dkdv_fn] = &self.kernels.functions[l.class];
            let mut args = self.stream.launch_builder(dq_fn);
            args.arg(&b.q)
                .arg(&b.k)
                .arg(&b.v)
                .arg(&b.out)
                .arg(&g.dout)
                .arg(&b.lse);
            args.arg(&mut g.dq).arg(&mut g.delta);
            args.arg(&l.bh)
                .arg(&l.nq)
                .arg(&l.nk)
                .arg(&l.d)
                .arg(&l.scale);
            args.arg(&l.window)
                .arg(&l.stride)
                .arg(&l.global_tokens)
                .arg(&l.causal);
            // SAFETY: the arguments match `gm_sparse_attn_bwd_dq_*` (8 f32
            // pointers, 4 ints, a float, 4 ints); sizes as in
            // `launch_forward`, dout/dq bh·nq·d and delta bh·nq floats.
            unsafe { args.launch(config(l.query_rows())) }
                .map_err(driver_err(self.what("launch gm_sparse_attn_bwd_dq")))?;

            let mut args = self.stream.launch_builder(dkdv_fn);
            args.arg(&b.q)
                .arg(&b.k)
                .arg(&b.v)
                .arg(&g.dout)
                .arg(&b.lse)
                .arg(&g.delta);
            args.arg(&mut g.dk).arg(&mut g.dv);
            args.arg(&l.bh)
                .arg(&l.nq)
                .arg(&l.nk)
                .arg(&l.d)
                .arg(&l.scale);
            args.arg(&l.window)
                .arg(&l.stride)
                .arg(&l.global_tokens)
                .arg(&l.causal);
            // SAFETY: the arguments match `gm_sparse_attn_bwd_dkdv_*` (8 f32
            // pointers, 4 ints, a float, 4 ints); dk/dv hold bh·nk·d floats.
            // The same stream orders it after the dq pass that writes delta.
            unsafe { args.launch(config(l.key_rows())) }
                .map_err(driver_err(self.what("launch gm_sparse_attn_bwd_dkdv")))?;
            Ok(())
        }

        fn download(&self, x: &CudaSlice<f32>) -> Result<Vec<f32>> {
            self.stream
                .clone_dtoh(x)
                .map_err(driver_err(self.what("device → host copy")))
        }

        fn sync(&self) -> Result<()> {
            self.stream
                .synchronize()
                .map_err(driver_err(self.what("synchronize")))
        }

        pub(super) fn forward(
            &self,
            l: &Launch,
            q: &[f32],
            k: &[f32],
            v: &[f32],
        ) -> Result<(Vec<f32>, Vec<f32>)> {
            if l.query_rows() == 0 {
                return Ok((Vec::new(), Vec::new()));
            }
            guard(&self.what("sparse attention forward"), || {
                let mut b = self.upload(l, q, k, v)?;
                self.launch_forward(l, &mut b)?;
                let out = self.download(&b.out)?;
                let lse = self.download(&b.lse)?;
                self.sync()?;
                Ok((out, lse))
            })
        }

        pub(super) fn backward(
            &self,
            l: &Launch,
            q: &[f32],
            k: &[f32],
            v: &[f32],
            dout: &[f32],
        ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
            if l.query_rows() == 0 {
                // No query: no gradient anywhere.
                let zeros = vec![0.0; l.dims.k_len()];
                return Ok((Vec::new(), zeros.clone(), zeros));
            }
            guard(&self.what("sparse attention backward"), || {
                let mut b = self.upload(l, q, k, v)?;
                let mut g = self.alloc_grads(l, dout)?;
                self.launch_forward(l, &mut b)?;
                self.launch_backward(l, &b, &mut g)?;
                let dq = self.download(&g.dq)?;
                let dk = self.download(&g.dk)?;
                let dv = self.download(&g.dv)?;
                self.sync()?;
                Ok((dq, dk, dv))
            })
        }

        pub(super) fn time_kernels(&self, l: &Launch, iters: usize) -> Result<KernelTimes> {
            if l.query_rows() == 0 {
                return Ok(KernelTimes {
                    forward: Duration::ZERO,
                    forward_backward: Duration::ZERO,
                    iters,
                });
            }
            let dims = l.dims;
            let q = pseudo_random(dims.q_len(), 2.0, 1);
            let k = pseudo_random(dims.k_len(), 2.0, 2);
            let v = pseudo_random(dims.k_len(), 1.0, 3);
            let dout = pseudo_random(dims.q_len(), 1.0, 4);
            guard(&self.what("timing the sparse attention kernels"), || {
                let mut b = self.upload(l, &q, &k, &v)?;
                let mut g = self.alloc_grads(l, &dout)?;
                // Warm-up (first launches load the module's code).
                self.launch_forward(l, &mut b)?;
                self.launch_backward(l, &b, &mut g)?;
                self.sync()?;
                let median = |mut times: Vec<Duration>| {
                    times.sort();
                    times[times.len() / 2]
                };
                let mut fwd = Vec::with_capacity(iters);
                for _ in 0..iters {
                    let t = Instant::now();
                    self.launch_forward(l, &mut b)?;
                    self.sync()?;
                    fwd.push(t.elapsed());
                }
                let mut both = Vec::with_capacity(iters);
                for _ in 0..iters {
                    let t = Instant::now();
                    self.launch_forward(l, &mut b)?;
                    self.launch_backward(l, &b, &mut g)?;
                    self.sync()?;
                    both.push(t.elapsed());
                }
                Ok(KernelTimes {
                    forward: median(fwd),
                    forward_backward: median(both),
                    iters,
                })
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(p: &SparsePattern, i: usize, nk: usize) -> Vec<usize> {
        let mut v = Vec::new();
        p.for_each_key(i, nk, |j| v.push(j));
        v
    }

    #[test]
    fn clamping_the_pattern_keeps_every_key_list() {
        for window in [0, 1, 3, 7, 40, usize::MAX] {
            for stride in [None, Some(1), Some(2), Some(5), Some(21), Some(usize::MAX)] {
                for global_tokens in [0, 1, 4, 30, usize::MAX] {
                    for causal in [false, true] {
                        let p = SparsePattern {
                            window,
                            stride,
                            global_tokens,
                            causal,
                        };
                        for (nq, nk) in [(1, 1), (9, 9), (12, 20), (20, 6), (17, 17)] {
                            let l = Launch::new(
                                AttentionDims {
                                    b: 1,
                                    h: 1,
                                    nq,
                                    nk,
                                    d: 8,
                                },
                                &p,
                            )
                            .unwrap();
                            let c = l.clamped_pattern();
                            for i in 0..nq {
                                assert_eq!(keys(&p, i, nk), keys(&c, i, nk), "{p:?} {c:?} i={i}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn launch_checks_and_classes() {
        let p = SparsePattern::local(2);
        let l = |d| Launch::new(AttentionDims::new(2, 3, 10, d), &p);
        assert_eq!(l(1).unwrap().class, 0);
        assert_eq!(l(32).unwrap().class, 0);
        assert_eq!(l(33).unwrap().class, 1);
        assert_eq!(l(100).unwrap().class, 2);
        assert_eq!(l(256).unwrap().class, 3);
        assert!(matches!(l(0), Err(Error::Config { .. })));
        assert!(matches!(l(257), Err(Error::Config { .. })));
        let no_keys = AttentionDims {
            nk: 0,
            ..AttentionDims::new(1, 1, 4, 8)
        };
        assert!(matches!(Launch::new(no_keys, &p), Err(Error::Shape { .. })));
        let bad = SparsePattern::local(1).with_stride(0);
        assert!(Launch::new(AttentionDims::new(1, 1, 4, 8), &bad).is_err());
        let huge = AttentionDims::new(1 << 20, 1 << 20, 4, 8);
        assert!(matches!(Launch::new(huge, &p), Err(Error::Shape { .. })));
        let x = l(16).unwrap();
        assert_eq!((x.bh, x.nq, x.nk, x.d), (6, 10, 10, 16));
        assert_eq!(x.scale, 0.25);
    }

    #[test]
    fn entry_names_are_in_the_source() {
        let src = KERNEL_SOURCES[0].1;
        for (names, dmax) in SPARSE_ATTENTION_ENTRIES.iter().zip(DIM_CLASSES) {
            for name in names {
                assert!(name.ends_with(&format!("_d{dmax}")), "{name}");
                let stem = name.trim_end_matches(&format!("_d{dmax}"));
                assert!(src.contains(&format!("{stem}_d##DMAX")), "{stem}");
            }
            assert!(src.contains(&format!("GM_ENTRIES({dmax}, {})", dmax / 32)));
        }
    }

    #[test]
    fn the_device_handle_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<SparseAttentionCuda>();
    }

    #[test]
    fn pseudo_random_is_seeded_and_in_range() {
        let a = pseudo_random(1000, 2.0, 7);
        assert_eq!(a, pseudo_random(1000, 2.0, 7));
        assert_ne!(a, pseudo_random(1000, 2.0, 8));
        assert!(a.iter().all(|x| (-2.0..2.0).contains(x)));
        let mean = a.iter().sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.2, "{mean}");
    }
}
