//! The GPU memory source: the only module that names cudarc. With the
//! `cuda` feature it asks the CUDA driver (`cuMemGetInfo` on the device's
//! primary context); without it, a stand-in that always reports
//! [`Reading::Unavailable`], so the rest of the crate has no `#[cfg]`.
//!
//! Without a driver at run time cudarc panics on first use (it cannot load
//! `libcuda`), so every entry is guarded by `is_culib_present()` (checked
//! once) and, belt and braces, by `catch_unwind`: the source then reports
//! "unavailable", never a panic.
//!
//! The context is the device's **primary** context, retained on the first
//! sample (not when the monitor is built): if nothing else in the process
//! uses the GPU, that first sample creates the context, which itself takes
//! device memory (a few hundred MiB). Set
//! [`Config::gpu_device`](crate::Config::gpu_device) to `None` to avoid it.
//! A sample binds that context to the sampling thread (the sampler thread,
//! or the caller of [`Monitor::sample_now`](crate::Monitor::sample_now)).

use crate::sample::{GpuMemory, Reading};

/// `true` when the crate was built with the `cuda` feature and the CUDA
/// driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    imp::driver_present()
}

/// Samples one device's memory.
#[derive(Debug)]
pub(crate) struct GpuSource(imp::GpuSource);

impl GpuSource {
    /// A source for `device` (`None`: disabled). Does not touch the driver
    /// beyond checking that it can be loaded.
    pub(crate) fn new(device: Option<usize>) -> Self {
        Self(imp::GpuSource::new(device))
    }

    /// The device's memory now, or why there is none.
    pub(crate) fn read(&mut self) -> Reading<GpuMemory> {
        self.0.read()
    }

    /// The device label for metrics (`"cuda:0"`).
    pub(crate) fn label(&self) -> Option<String> {
        self.0.device().map(|d| format!("cuda:{d}"))
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;

    pub(super) fn driver_present() -> bool {
        false
    }

    #[derive(Debug)]
    pub(super) struct GpuSource {
        device: Option<usize>,
    }

    impl GpuSource {
        pub(super) fn new(device: Option<usize>) -> Self {
            Self { device }
        }
        pub(super) fn device(&self) -> Option<usize> {
            self.device
        }
        pub(super) fn read(&mut self) -> Reading<GpuMemory> {
            match self.device {
                None => Reading::Unavailable("disabled (gpu_device = None)".into()),
                Some(_) => Reading::Unavailable("built without the `cuda` feature".into()),
            }
        }
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use cudarc::driver::CudaContext;
    use std::borrow::Cow;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::{Arc, OnceLock};

    pub(super) fn driver_present() -> bool {
        static PRESENT: OnceLock<bool> = OnceLock::new();
        *PRESENT.get_or_init(|| {
            // SAFETY: `is_culib_present` only tries to dlopen the driver
            // library by its usual names and drops the handle; it calls no
            // CUDA function.
            catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
        })
    }

    #[derive(Debug)]
    enum State {
        Disabled,
        /// Not tried yet.
        Pending(usize),
        Ready(Arc<CudaContext>),
        /// Tried and failed for good (no driver, no such device).
        Unavailable(Cow<'static, str>),
    }

    #[derive(Debug)]
    pub(super) struct GpuSource {
        device: Option<usize>,
        state: State,
    }

    impl GpuSource {
        pub(super) fn new(device: Option<usize>) -> Self {
            let state = match device {
                None => State::Disabled,
                Some(_) if !driver_present() => {
                    State::Unavailable("no CUDA driver (libcuda could not be loaded)".into())
                }
                Some(d) => State::Pending(d),
            };
            Self { device, state }
        }

        pub(super) fn device(&self) -> Option<usize> {
            self.device
        }

        pub(super) fn read(&mut self) -> Reading<GpuMemory> {
            if let State::Pending(d) = self.state {
                self.state = match catch_unwind(|| CudaContext::new(d)) {
                    Ok(Ok(ctx)) => State::Ready(ctx),
                    Ok(Err(e)) => State::Unavailable(format!("cuda:{d}: {e:?}").into()),
                    Err(_) => State::Unavailable(format!("cuda:{d}: the driver panicked").into()),
                };
            }
            match &self.state {
                State::Disabled => Reading::Unavailable("disabled (gpu_device = None)".into()),
                State::Unavailable(why) => Reading::Unavailable(why.clone()),
                State::Pending(_) => unreachable!("resolved above"),
                State::Ready(ctx) => match catch_unwind(AssertUnwindSafe(|| ctx.mem_get_info())) {
                    Ok(Ok((free, total))) => Reading::Ok(GpuMemory {
                        used_bytes: total.saturating_sub(free) as u64,
                        total_bytes: total as u64,
                    }),
                    Ok(Err(e)) => Reading::Error(format!("cuMemGetInfo: {e:?}")),
                    Err(_) => Reading::Error("cuMemGetInfo panicked".into()),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_source_is_unavailable() {
        let r = GpuSource::new(None).read();
        assert!(
            matches!(r, Reading::Unavailable(ref w) if w.contains("disabled")),
            "{r:?}"
        );
    }

    /// Without a driver (this machine), with or without the feature, the
    /// source reports unavailable and never panics.
    #[test]
    fn no_driver_means_unavailable_not_a_panic() {
        if driver_present() {
            eprintln!("skipped: a CUDA driver is present");
            return;
        }
        let mut s = GpuSource::new(Some(0));
        for _ in 0..3 {
            let r = s.read();
            let Reading::Unavailable(why) = r else {
                panic!("expected unavailable, got {r:?}");
            };
            let expected = if cfg!(feature = "cuda") {
                "no CUDA driver"
            } else {
                "without the `cuda` feature"
            };
            assert!(why.contains(expected), "{why}");
        }
    }
}
