//! [`LeakReport`]: what the allocator, the [`LeakDetector`](crate::LeakDetector)
//! and the [`Registry`](crate::Registry) say, as JSON (serde) and as an
//! aligned text report (`Display`, byte units from
//! [`ByteSize`](gm_core::ByteSize)).
//!
//! Every section is optional: a report is built from what the caller has
//! (`LeakReport::now()` reads the allocator; the analysis, live counts and
//! top sites are added as plain data). Building one never panics: without
//! the tracking allocator the allocator section says it is not installed.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use gm_core::ByteSize;
use serde::{Deserialize, Serialize};

use crate::counters::{is_active, stats, AllocStats};
use crate::detector::{LeakAnalysis, SeriesTrend, Trend, Verdict};

/// The allocator's counters, or why there are none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocatorSection {
    /// Whether a [`TrackingAllocator`](crate::TrackingAllocator) is the
    /// global allocator; when not, nothing below is counted.
    pub installed: bool,
    /// Bytes in live blocks.
    pub current_bytes: u64,
    /// Highest `current_bytes` since start or the last reset.
    pub peak_bytes: u64,
    /// Bytes handed out in all.
    pub allocated_bytes: u64,
    /// Bytes given back in all.
    pub freed_bytes: u64,
    /// Allocations (including reallocations).
    pub allocations: u64,
    /// Blocks freed.
    pub frees: u64,
    /// Blocks alive.
    pub live_blocks: u64,
}

impl AllocatorSection {
    /// The section for `stats`, or a not-installed one for `None`.
    pub fn from_stats(stats: Option<AllocStats>) -> Self {
        let s = stats.unwrap_or_default();
        Self {
            installed: stats.is_some(),
            current_bytes: s.current_bytes,
            peak_bytes: s.peak_bytes,
            allocated_bytes: s.allocated_bytes,
            freed_bytes: s.freed_bytes,
            allocations: s.allocations,
            frees: s.frees,
            live_blocks: s.live_blocks(),
        }
    }
}

/// A label's live objects and, when the detector has its series, its trend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelRow {
    /// The label.
    pub label: String,
    /// Live objects now.
    pub live: u64,
    /// The detector's verdict for the label (`None`: not in its window).
    pub verdict: Option<Verdict>,
    /// Objects per step (Theil–Sen), when known.
    pub rate_per_step: Option<f64>,
}

/// An allocation site and its estimated live bytes, as the caller's sampler
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRow {
    /// Stable site key.
    pub site: String,
    /// Estimated live bytes.
    pub live_bytes: u64,
}

/// The report; see the module docs. Serialises to JSON with the field names
/// below; `Display` writes the text report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeakReport {
    /// Allocator counters.
    pub allocator: AllocatorSection,
    /// The heap trend (verdict, rate, significance, window), if analysed.
    pub heap: Option<Trend>,
    /// Live objects by label, sorted by label.
    pub labels: Vec<LabelRow>,
    /// Labels the detector found growing.
    pub growing_labels: Vec<String>,
    /// Sites the detector found growing, fastest first.
    pub growing_sites: Vec<SeriesTrend>,
    /// Top sites by live bytes, as given.
    pub top_sites: Vec<SiteRow>,
}

impl LeakReport {
    /// A report with the allocator's counters now ([`stats`](crate::stats)),
    /// or a not-installed section when the tracking allocator is not the
    /// global allocator.
    pub fn now() -> Self {
        Self::new(is_active().then(stats))
    }

    /// A report with the given allocator counters (`None`: not installed) and
    /// nothing else yet.
    pub fn new(allocator: Option<AllocStats>) -> Self {
        Self {
            allocator: AllocatorSection::from_stats(allocator),
            heap: None,
            labels: Vec::new(),
            growing_labels: Vec::new(),
            growing_sites: Vec::new(),
            top_sites: Vec::new(),
        }
    }

    /// Adds the detector's analysis: the heap trend, label trends, growing
    /// labels and sites.
    pub fn with_analysis(mut self, analysis: &LeakAnalysis) -> Self {
        self.heap = Some(analysis.heap.clone());
        for s in &analysis.labels {
            let row = self.label_row(&s.key);
            row.verdict = Some(s.trend.verdict);
            row.rate_per_step = s.trend.rate.map(|r| r.per_step);
            if row.live == 0 {
                row.live = s.latest;
            }
        }
        self.growing_labels.clone_from(&analysis.growing_labels);
        self.growing_sites.clone_from(&analysis.top_growing_sites);
        self
    }

    /// Adds live object counts by label (e.g. [`Registry::snapshot`](crate::Registry::snapshot));
    /// they take precedence over the detector's latest values.
    pub fn with_live_objects(mut self, counts: &BTreeMap<String, u64>) -> Self {
        for (label, &live) in counts {
            self.label_row(label).live = live;
        }
        self
    }

    /// Adds top sites by live bytes, in the given order.
    pub fn with_top_sites<K: Into<String>>(
        mut self,
        sites: impl IntoIterator<Item = (K, u64)>,
    ) -> Self {
        self.top_sites
            .extend(sites.into_iter().map(|(k, b)| SiteRow {
                site: k.into(),
                live_bytes: b,
            }));
        self
    }

    fn label_row(&mut self, label: &str) -> &mut LabelRow {
        let i = match self
            .labels
            .binary_search_by(|r| r.label.as_str().cmp(label))
        {
            Ok(i) => i,
            Err(i) => {
                self.labels.insert(
                    i,
                    LabelRow {
                        label: label.to_owned(),
                        live: 0,
                        verdict: None,
                        rate_per_step: None,
                    },
                );
                i
            }
        };
        &mut self.labels[i]
    }

    /// The report as a JSON value.
    pub fn to_json(&self) -> serde_json::Value {
        // Every field serialises (finite numbers, string keys): cannot fail.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The report as pretty-printed JSON text.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The one-line verdict of the text report.
    pub fn verdict_line(&self) -> String {
        let Some(h) = &self.heap else {
            return "verdict: not analysed".to_owned();
        };
        let mut line = format!("verdict: {}", h.verdict);
        match (h.verdict, h.rate) {
            (Verdict::Insufficient, _) => {
                let _ = write!(line, " ({} snapshots in the window)", h.samples);
            }
            (_, Some(r)) => {
                let _ = write!(
                    line,
                    ", heap {} ({:.0}% CI {} .. {}), z = {:.2} (leak at >= {:.2}), p = {:.2e}",
                    Rate(r.per_step),
                    r.confidence * 100.0,
                    Rate(r.low),
                    Rate(r.high),
                    h.z,
                    h.z_threshold,
                    h.p_value
                );
            }
            (_, None) => {
                let _ = write!(line, ", z = {:.2} (leak at >= {:.2})", h.z, h.z_threshold);
            }
        }
        line
    }
}

/// A signed rate in bytes per step with binary units: `+1.00 KiB/step`.
struct Rate(f64);

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0.0 { '-' } else { '+' };
        let bytes = self.0.abs();
        if bytes < 10.0 {
            write!(f, "{sign}{bytes:.2} B/step")
        } else {
            write!(f, "{sign}{}/step", ByteSize(bytes.round() as u64))
        }
    }
}

/// Writes `rows` as columns padded to their widest cell; the first column
/// left-aligned, the others right-aligned.
fn table(f: &mut fmt::Formatter<'_>, rows: &[Vec<String>]) -> fmt::Result {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::from("  ");
        for (c, cell) in row.iter().enumerate() {
            if c == 0 {
                let _ = write!(line, "{cell:<w$}", w = widths[c]);
            } else {
                let _ = write!(line, "  {cell:>w$}", w = widths[c]);
            }
        }
        writeln!(f, "{}", line.trim_end())?;
    }
    Ok(())
}

impl fmt::Display for LeakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "gm-leak report")?;
        let a = &self.allocator;
        if a.installed {
            writeln!(
                f,
                "allocator: current {}, peak {}, allocated {} / freed {}, {} live blocks ({} allocations, {} frees)",
                ByteSize(a.current_bytes),
                ByteSize(a.peak_bytes),
                ByteSize(a.allocated_bytes),
                ByteSize(a.freed_bytes),
                a.live_blocks,
                a.allocations,
                a.frees
            )?;
        } else {
            writeln!(
                f,
                "allocator: not installed (no `#[global_allocator] static ALLOC: gm_leak::TrackingAllocator` in this binary): no counts"
            )?;
        }
        writeln!(f, "{}", self.verdict_line())?;
        if let Some(h) = &self.heap {
            let cycles = match (h.releases, h.shortest_cycle) {
                (0, _) => "no cycles".to_owned(),
                (r, Some(c)) => format!("{r} releases, shortest cycle {c} snapshots"),
                (r, None) => format!("{r} release"),
            };
            writeln!(
                f,
                "window: {} snapshots, steps {}..={}, {cycles}, {} pairs, variance x{:.2}",
                h.samples, h.first_step, h.last_step, h.pairs, h.variance_inflation
            )?;
        }
        if !self.labels.is_empty() {
            writeln!(f, "live objects:")?;
            let mut rows = vec![vec![
                "label".to_owned(),
                "live".to_owned(),
                "trend".to_owned(),
                "objects/step".to_owned(),
            ]];
            rows.extend(self.labels.iter().map(|r| {
                vec![
                    r.label.clone(),
                    r.live.to_string(),
                    r.verdict.map_or_else(|| "-".to_owned(), |v| v.to_string()),
                    r.rate_per_step
                        .map_or_else(|| "-".to_owned(), |x| format!("{x:+.3}")),
                ]
            }));
            table(f, &rows)?;
            if !self.growing_labels.is_empty() {
                writeln!(f, "growing labels: {}", self.growing_labels.join(", "))?;
            }
        }
        if !self.growing_sites.is_empty() {
            writeln!(f, "growing sites:")?;
            let mut rows = vec![vec![
                "site".to_owned(),
                "live".to_owned(),
                "rate".to_owned(),
                "z".to_owned(),
            ]];
            rows.extend(self.growing_sites.iter().map(|s| {
                vec![
                    s.key.clone(),
                    ByteSize(s.latest).to_string(),
                    s.trend
                        .rate
                        .map_or_else(|| "-".to_owned(), |r| Rate(r.per_step).to_string()),
                    format!("{:.2}", s.trend.z),
                ]
            }));
            table(f, &rows)?;
        }
        if !self.top_sites.is_empty() {
            writeln!(f, "top sites:")?;
            let mut rows = vec![vec!["site".to_owned(), "live".to_owned()]];
            rows.extend(
                self.top_sites
                    .iter()
                    .map(|s| vec![s.site.clone(), ByteSize(s.live_bytes).to_string()]),
            );
            table(f, &rows)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The unit-test binary does not install the tracking allocator.
    #[test]
    fn not_installed_allocator_is_reported_not_a_panic() {
        let report = LeakReport::now();
        assert!(!report.allocator.installed);
        assert_eq!(report.allocator.current_bytes, 0);
        let text = report.to_string();
        assert!(text.contains("allocator: not installed"), "{text}");
        assert_eq!(report.to_json()["allocator"]["installed"], false);
    }

    #[test]
    fn rates_print_signed_with_binary_units() {
        assert_eq!(Rate(1024.0).to_string(), "+1.00 KiB/step");
        assert_eq!(Rate(-64.4).to_string(), "-64 B/step");
        assert_eq!(Rate(0.25).to_string(), "+0.25 B/step");
    }
}
