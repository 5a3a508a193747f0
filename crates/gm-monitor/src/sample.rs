//! What one sample holds: a [`Reading`] per source, the component gauges,
//! the budget measure, its pressure and trend; and how it is written as one
//! JSON line.

use crate::trend::Trend;
use gm_core::Pressure;
use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Serialize, Serializer};
use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The value one source gave in one sample.
///
/// A source never panics and never aborts a sample: what it cannot measure
/// is `Unavailable` (not configured, no driver, built without the feature)
/// or `Error` (it tried and failed, e.g. `/proc` unreadable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading<T = u64> {
    /// The value, in bytes.
    Ok(T),
    /// The source does not exist here (the reason, in words).
    Unavailable(Cow<'static, str>),
    /// The source exists but failed this time (the error, in words).
    Error(String),
}

impl<T: Copy> Reading<T> {
    /// The value, if the source gave one.
    pub fn ok(&self) -> Option<T> {
        match self {
            Reading::Ok(v) => Some(*v),
            _ => None,
        }
    }
}

impl<T> Reading<T> {
    /// `true` for [`Reading::Error`] (not for `Unavailable`).
    pub fn is_error(&self) -> bool {
        matches!(self, Reading::Error(_))
    }
}

/// GPU memory of one device, as the driver reports it.
///
/// `used_bytes` is `total - free` for the **whole device** (every process
/// and the CUDA context itself), not this process alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuMemory {
    /// Bytes in use on the device.
    pub used_bytes: u64,
    /// Bytes on the device.
    pub total_bytes: u64,
}

/// One component gauge's value in a sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentSample {
    /// The name it was registered under.
    pub name: Arc<str>,
    /// Its bytes (an `Error` if its gauge panicked).
    pub bytes: Reading,
}

/// One sample of every source.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// 1 for the monitor's first sample, then +1 per sample.
    pub seq: u64,
    /// Wall-clock time of the sample.
    pub at: SystemTime,
    /// Monotonic time since the monitor was built (what trends use).
    pub elapsed: Duration,
    /// How long taking the sample took (sources, thresholds, trend; not the
    /// exporters or alert callbacks).
    pub duration: Duration,
    /// Resident set size of the process.
    pub rss: Reading,
    /// The heap gauge (`Unavailable` when none was configured).
    pub heap: Reading,
    /// GPU memory (`Unavailable` without the `cuda` feature or a driver).
    pub gpu: Reading<GpuMemory>,
    /// The registered component gauges, in registration order.
    pub components: Vec<ComponentSample>,
    /// The value of the budget's measure ([`Config::budget_measure`](crate::Config::budget_measure)),
    /// if its source gave one.
    pub measured_bytes: Option<u64>,
    /// The alert state after this sample (with hysteresis; `Normal` when no
    /// budget is set).
    pub pressure: Pressure,
    /// The measure's trend over the trend window, this sample included.
    pub trend: Trend,
}

impl Sample {
    /// The bytes of the component called `name`, if it is in this sample
    /// and its gauge worked.
    pub fn component(&self, name: &str) -> Option<u64> {
        self.components
            .iter()
            .find(|c| &*c.name == name)
            .and_then(|c| c.bytes.ok())
    }
}

/// The lower-case name of a pressure level (`"normal"`, `"warning"`, ...).
pub fn pressure_name(p: Pressure) -> &'static str {
    match p {
        Pressure::Normal => "normal",
        Pressure::Warning => "warning",
        Pressure::Critical => "critical",
        Pressure::Exceeded => "exceeded",
    }
}

/// `0` normal, `1` warning, `2` critical, `3` exceeded (the Prometheus gauge).
pub fn pressure_code(p: Pressure) -> u8 {
    match p {
        Pressure::Normal => 0,
        Pressure::Warning => 1,
        Pressure::Critical => 2,
        Pressure::Exceeded => 3,
    }
}

fn problem<T>(r: &Reading<T>, errors: bool) -> Option<&str> {
    match r {
        Reading::Error(e) if errors => Some(e),
        Reading::Unavailable(why) if !errors => Some(why),
        _ => None,
    }
}

/// The errors (`.1 == true`) or unavailable reasons of a sample, as a JSON
/// object keyed by source.
struct Problems<'a>(&'a Sample, bool);

impl Serialize for Problems<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (sample, errors) = (self.0, self.1);
        let mut m = s.serialize_map(None)?;
        if let Some(p) = problem(&sample.rss, errors) {
            m.serialize_entry("rss", p)?;
        }
        if let Some(p) = problem(&sample.heap, errors) {
            m.serialize_entry("heap", p)?;
        }
        if let Some(p) = problem(&sample.gpu, errors) {
            m.serialize_entry("gpu", p)?;
        }
        for c in &sample.components {
            if let Some(p) = problem(&c.bytes, errors) {
                m.serialize_entry(&format!("component:{}", c.name), p)?;
            }
        }
        m.end()
    }
}

/// The components that gave a value, as a JSON object `name -> bytes`.
struct Components<'a>(&'a [ComponentSample]);

impl Serialize for Components<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        for c in self.0 {
            if let Reading::Ok(b) = c.bytes {
                m.serialize_entry(&*c.name, &b)?;
            }
        }
        m.end()
    }
}

/// One flat JSON object per sample (the JSON Lines export):
///
/// ```json
/// {"seq":3,"unix_ms":1767225600000,"elapsed_s":10.0,"sample_us":4.1,
///  "rss_bytes":52428800,"heap_bytes":1048576,"gpu_used_bytes":null,"gpu_total_bytes":null,
///  "components":{"replay":4096},"measured_bytes":52428800,"pressure":"normal",
///  "slope_bytes_per_s":0.0,"eta_s":null,
///  "errors":{},"unavailable":{"gpu":"built without the `cuda` feature"}}
/// ```
///
/// A source that gave no value is `null` and explained under `errors` (it
/// failed) or `unavailable` (it does not exist here).
impl Serialize for Sample {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let unix_ms = self
            .at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let gpu = self.gpu.ok();
        let mut st = s.serialize_struct("Sample", 17)?;
        st.serialize_field("seq", &self.seq)?;
        st.serialize_field("unix_ms", &unix_ms)?;
        st.serialize_field("elapsed_s", &self.elapsed.as_secs_f64())?;
        st.serialize_field("sample_us", &(self.duration.as_secs_f64() * 1e6))?;
        st.serialize_field("rss_bytes", &self.rss.ok())?;
        st.serialize_field("heap_bytes", &self.heap.ok())?;
        st.serialize_field("gpu_used_bytes", &gpu.map(|g| g.used_bytes))?;
        st.serialize_field("gpu_total_bytes", &gpu.map(|g| g.total_bytes))?;
        st.serialize_field("components", &Components(&self.components))?;
        st.serialize_field("measured_bytes", &self.measured_bytes)?;
        st.serialize_field("pressure", pressure_name(self.pressure))?;
        st.serialize_field("slope_bytes_per_s", &self.trend.slope_bytes_per_sec)?;
        st.serialize_field("eta_s", &self.trend.time_to_limit.map(|d| d.as_secs_f64()))?;
        st.serialize_field("errors", &Problems(self, true))?;
        st.serialize_field("unavailable", &Problems(self, false))?;
        st.end()
    }
}
