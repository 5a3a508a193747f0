//! [`SystemReport`]: what the memory optimization system measured, as JSON
//! (serde) and Markdown, with recommendations derived from those
//! measurements (each rule fires only on the figures it names).

use std::time::Duration;

use gm_core::ByteSize;
use gm_gc::PassReport;
use gm_leak::{AllocStats, Verdict};
use serde::Serialize;

use crate::config::{MemoryOptimizationConfig, TrainingMemoryConfig};
use crate::leakwatch::LeakStatus;
use crate::proc::ProcMemory;
use crate::system::AlertRecord;

/// Heap counters of the tracking allocator.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HeapFigures {
    /// Live heap bytes now.
    pub current_bytes: u64,
    /// Peak live heap bytes.
    pub peak_bytes: u64,
    /// Bytes allocated in all.
    pub allocated_bytes: u64,
    /// Allocator calls that handed out memory.
    pub allocations: u64,
}

/// One component's memory.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentMemory {
    /// The component (`replay`, `params`, `optimizer_state`, `activations`, ...).
    pub name: String,
    /// Its bytes now (for `activations`: the last measured step's peak).
    pub bytes: u64,
    /// Share of the resident set, when both are known.
    pub share_of_rss: Option<f64>,
}

/// One reclaim pass, summarised.
#[derive(Debug, Clone, Serialize)]
pub struct ReclaimSummary {
    /// Pass number.
    pub seq: u64,
    /// Why it ran.
    pub trigger: String,
    /// Milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// Components visited.
    pub components: usize,
    /// Bytes the components claimed.
    pub claimed_bytes: u64,
    /// Heap drop over the pass (measured).
    pub heap_freed_bytes: Option<i64>,
    /// Resident anonymous drop over the pass, trim included (measured).
    pub rss_anon_freed_bytes: Option<i64>,
    /// Wall time, microseconds.
    pub duration_us: u64,
}

/// One recommendation: the rule, the measured figures it fired on, and
/// what to change.
#[derive(Debug, Clone, Serialize)]
pub struct Recommendation {
    /// A short rule id.
    pub rule: String,
    /// The measured finding, with figures.
    pub finding: String,
    /// What to change (config keys named).
    pub action: String,
}

/// The leak section.
#[derive(Debug, Clone, Serialize)]
pub struct LeakSection {
    /// `no leak`, `LEAK`, `insufficient data` or `unavailable`.
    pub verdict: String,
    /// Heap snapshots taken.
    pub snapshots: u64,
    /// Snapshots needed for a verdict.
    pub min_samples: usize,
    /// Heap growth, bytes per second (Theil–Sen), when computed.
    pub heap_rate_bytes_per_sec: Option<f64>,
    /// Its confidence interval.
    pub heap_rate_interval_bytes_per_sec: Option<(f64, f64)>,
    /// The trend test's z and the threshold it must reach.
    pub z: Option<f64>,
    /// The z a leak must reach.
    pub z_threshold: Option<f64>,
    /// Growing allocation sites (key, latest estimated live bytes).
    pub growing_sites: Vec<(String, u64)>,
}

/// Everything the system reports.
#[derive(Debug, Clone, Serialize)]
pub struct SystemReport {
    /// Milliseconds since the Unix epoch.
    pub generated_unix_ms: u64,
    /// Seconds the system ran.
    pub uptime_secs: f64,
    /// The limit, bytes.
    pub limit_bytes: u64,
    /// The warning line, bytes.
    pub warning_bytes: u64,
    /// The critical line, bytes.
    pub critical_bytes: u64,
    /// Resident memory now, its peak, anonymous part (the kernel's figures).
    pub process: ProcMemory,
    /// The tracking allocator's figures (`None` without it).
    pub heap: Option<HeapFigures>,
    /// Per component.
    pub components: Vec<ComponentMemory>,
    /// Replay compression: (name, raw bytes of compressed chunks,
    /// compressed bytes, compressed chunks).
    pub replay_compression: Vec<(String, u64, u64, usize)>,
    /// Alerts (the last 256) and their total.
    pub alerts: Vec<AlertRecord>,
    /// Total alerts.
    pub alerts_total: u64,
    /// The leak verdict.
    pub leak: LeakSection,
    /// Reclaim passes (the newest 64).
    pub reclaim_history: Vec<ReclaimSummary>,
    /// Reclaim passes run in all.
    pub reclaim_passes: u64,
    /// Monitor samples taken.
    pub monitor_samples: u64,
    /// The recommended batch and how often it was shrunk.
    pub batch: (usize, u64),
    /// Recommendations derived from the figures above.
    pub recommendations: Vec<Recommendation>,
}

pub(crate) struct Inputs<'a> {
    pub generated_unix_ms: u64,
    pub uptime: Duration,
    pub memory: &'a MemoryOptimizationConfig,
    pub training: &'a TrainingMemoryConfig,
    pub proc: ProcMemory,
    pub heap: Option<AllocStats>,
    pub components: Vec<(String, u64)>,
    pub compression: Vec<(String, u64, u64, usize)>,
    pub alerts: Vec<AlertRecord>,
    pub alerts_total: u64,
    pub leak: Option<LeakStatus>,
    pub reclaim: Vec<PassReport>,
    pub gc_stats: gm_gc::Stats,
    pub monitor_samples: u64,
    pub batch: (usize, u64),
}

fn b(x: u64) -> String {
    ByteSize(x).to_string()
}

fn bi(x: i64) -> String {
    if x < 0 {
        format!("-{}", ByteSize(x.unsigned_abs()))
    } else {
        ByteSize(x as u64).to_string()
    }
}

pub(crate) fn build(i: Inputs<'_>) -> SystemReport {
    let budget = i.memory.budget();
    let rss = i.proc.rss_bytes;
    let components: Vec<ComponentMemory> = i
        .components
        .iter()
        .map(|(n, bytes)| ComponentMemory {
            name: n.clone(),
            bytes: *bytes,
            share_of_rss: rss.filter(|&r| r > 0).map(|r| *bytes as f64 / r as f64),
        })
        .collect();
    let min_samples = gm_leak::DetectorConfig::default().min_samples;
    let leak = match &i.leak {
        None => LeakSection {
            verdict: "unavailable (no tracking allocator)".into(),
            snapshots: 0,
            min_samples,
            heap_rate_bytes_per_sec: None,
            heap_rate_interval_bytes_per_sec: None,
            z: None,
            z_threshold: None,
            growing_sites: Vec::new(),
        },
        Some(l) => LeakSection {
            verdict: l.verdict.to_string(),
            snapshots: l.snapshots,
            min_samples,
            heap_rate_bytes_per_sec: l.heap_rate_bytes_per_sec,
            heap_rate_interval_bytes_per_sec: l.heap_rate_interval_bytes_per_sec,
            z: Some(l.analysis.heap.z).filter(|z| z.is_finite()),
            z_threshold: Some(l.analysis.heap.z_threshold),
            growing_sites: l
                .analysis
                .top_growing_sites
                .iter()
                .map(|s| (s.key.clone(), s.latest))
                .collect(),
        },
    };
    let reclaim_history: Vec<ReclaimSummary> = i
        .reclaim
        .iter()
        .map(|p| ReclaimSummary {
            seq: p.seq,
            trigger: format!("{:?}", p.trigger).to_lowercase(),
            started_unix_ms: p.started_unix_ms,
            components: p.components.len(),
            claimed_bytes: p.claimed_bytes(),
            heap_freed_bytes: p.heap_freed_bytes(),
            rss_anon_freed_bytes: p.rss_anon_freed_bytes(),
            duration_us: p.duration_us,
        })
        .collect();
    let mut report = SystemReport {
        generated_unix_ms: i.generated_unix_ms,
        uptime_secs: i.uptime.as_secs_f64(),
        limit_bytes: budget.limit_bytes,
        warning_bytes: budget.warning_bytes(),
        critical_bytes: budget.critical_bytes(),
        process: i.proc,
        heap: i.heap.map(|h| HeapFigures {
            current_bytes: h.current_bytes,
            peak_bytes: h.peak_bytes,
            allocated_bytes: h.allocated_bytes,
            allocations: h.allocations,
        }),
        components,
        replay_compression: i.compression,
        alerts: i.alerts,
        alerts_total: i.alerts_total,
        leak,
        reclaim_history,
        reclaim_passes: i.gc_stats.passes,
        monitor_samples: i.monitor_samples,
        batch: i.batch,
        recommendations: Vec::new(),
    };
    report.recommendations = recommend(&report, i.memory, i.training, i.leak.as_ref());
    report
}

/// The rules. Each looks at measured figures and fires only when they say
/// something actionable; its text carries those figures.
fn recommend(
    r: &SystemReport,
    m: &MemoryOptimizationConfig,
    t: &TrainingMemoryConfig,
    leak: Option<&LeakStatus>,
) -> Vec<Recommendation> {
    let mut out = Vec::new();
    let limit = r.limit_bytes;
    let pct = |x: u64| 100.0 * x as f64 / limit as f64;
    if let Some(peak) = r.process.peak_rss_bytes {
        if peak >= r.critical_bytes {
            let replay = r
                .components
                .iter()
                .filter(|c| c.name.starts_with("replay"))
                .map(|c| c.bytes)
                .sum::<u64>();
            out.push(Recommendation {
                rule: "peak-near-limit".into(),
                finding: format!(
                    "peak RSS {} reached {:.0}% of the {} limit (critical line {:.0}%); the replay buffers hold {}",
                    b(peak),
                    pct(peak),
                    b(limit),
                    100.0 * m.critical_fraction,
                    b(replay)
                ),
                action: format!(
                    "raise memory.limit_bytes above {}, or lower memory.buffer_limit_bytes (now {}) or training.max_batch (now {})",
                    b((peak as f64 / m.warning_fraction).ceil() as u64),
                    b(m.buffer_limit_bytes),
                    t.max_batch
                ),
            });
        } else if peak < limit / 4 {
            let suggested = (peak as f64 / m.warning_fraction).ceil() as u64;
            out.push(Recommendation {
                rule: "limit-has-headroom".into(),
                finding: format!(
                    "peak RSS {} used {:.1}% of the {} limit: {} was never used",
                    b(peak),
                    pct(peak),
                    b(limit),
                    b(limit - peak)
                ),
                action: format!(
                    "a larger replay buffer or batch fits in this limit; or, on a shared machine, memory.limit_bytes = \"{}\" keeps this run below the warning line",
                    b(suggested)
                ),
            });
        }
    }
    if let Some(rss) = r.process.rss_bytes.filter(|&x| x > 0) {
        if let Some(top) = r.components.iter().max_by_key(|c| c.bytes) {
            let share = top.bytes as f64 / rss as f64;
            if share >= 0.3 {
                let action = match top.name.as_str() {
                    n if n.starts_with("replay") && !m.buffer_compression => {
                        "turn memory.buffer_compression on: cold replay chunks are LZ4-compressed from 80 % of memory.buffer_limit_bytes".to_string()
                    }
                    n if n.starts_with("replay") => format!(
                        "lower memory.buffer_limit_bytes (now {}) to make compression start earlier",
                        b(m.buffer_limit_bytes)
                    ),
                    "activations" if !t.gradient_checkpointing => {
                        "turn training.gradient_checkpointing on: it keeps one segment's activations at a time".to_string()
                    }
                    "activations" if !t.mixed_precision => {
                        "turn training.mixed_precision on: a bf16 working copy halves saved activations".to_string()
                    }
                    "activations" => format!(
                        "a smaller batch (now {}; training.max_batch caps it) or more checkpoint segments (training.checkpoint_segments, now {}) lower this peak",
                        r.batch.0, t.checkpoint_segments
                    ),
                    _ => "this component dominates the process's memory; size it first".to_string(),
                };
                out.push(Recommendation {
                    rule: "largest-component".into(),
                    finding: format!(
                        "{} holds {} = {:.0}% of the resident {}",
                        top.name,
                        b(top.bytes),
                        100.0 * share,
                        b(rss)
                    ),
                    action,
                });
            }
        }
    }
    for (name, raw, comp, chunks) in &r.replay_compression {
        if *comp > 0 {
            let ratio = *raw as f64 / *comp as f64;
            if ratio < 1.2 {
                out.push(Recommendation {
                    rule: "compression-ineffective".into(),
                    finding: format!(
                        "{name}: {chunks} compressed chunks shrank only {ratio:.2}x ({} -> {})",
                        b(*raw),
                        b(*comp)
                    ),
                    action: "this data does not compress: memory.buffer_compression = false saves the CPU time".into(),
                });
            }
        }
    }
    if let Some(l) = leak {
        match l.verdict {
            Verdict::Leak => {
                let site = l.analysis.top_growing_sites.first().map_or_else(
                    || "no sampled site grew significantly".to_string(),
                    |s| format!("fastest-growing site: {}", s.key),
                );
                out.push(Recommendation {
                    rule: "heap-leak".into(),
                    finding: format!(
                        "the heap grows at {}/s (interval {} .. {} /s) over {} snapshots; {site}",
                        bi(l.heap_rate_bytes_per_sec.unwrap_or(0.0) as i64),
                        bi(l.heap_rate_interval_bytes_per_sec.map_or(0.0, |r| r.0) as i64),
                        bi(l.heap_rate_interval_bytes_per_sec.map_or(0.0, |r| r.1) as i64),
                        l.snapshots
                    ),
                    action: "find what keeps growing there before a long run: at this rate the limit is reached eventually".into(),
                });
            }
            Verdict::Insufficient => out.push(Recommendation {
                rule: "leak-undecided".into(),
                finding: format!(
                    "{} heap snapshots taken; the leak test needs {}",
                    l.snapshots, r.leak.min_samples
                ),
                action: format!(
                    "run longer, or lower memory.leak_check_interval_secs (now {}) for a verdict",
                    m.leak_check_interval.as_secs_f64()
                ),
            }),
            Verdict::NoLeak => {}
        }
    }
    let periodic: Vec<&ReclaimSummary> = r
        .reclaim_history
        .iter()
        .filter(|p| p.trigger == "periodic")
        .collect();
    if periodic.len() >= 2 {
        let freed: i64 = periodic.iter().filter_map(|p| p.rss_anon_freed_bytes).sum();
        if freed < (1 << 20) {
            out.push(Recommendation {
                rule: "periodic-reclaim-idle".into(),
                finding: format!(
                    "{} periodic reclaim passes freed {} of resident memory in all",
                    periodic.len(),
                    bi(freed)
                ),
                action: format!(
                    "memory.reclaim_interval_secs (now {}) can be longer",
                    m.reclaim_interval.as_secs_f64()
                ),
            });
        }
    }
    let warnings = r.alerts.iter().filter(|a| a.level == "warning").count();
    let critical = r
        .alerts
        .iter()
        .filter(|a| a.level == "critical" || a.level == "exceeded")
        .count();
    if warnings + critical > 0 {
        let worst = r.alerts.iter().map(|a| a.value_bytes).max().unwrap_or(0);
        out.push(Recommendation {
            rule: "alerts-raised".into(),
            finding: format!(
                "{warnings} warning and {critical} critical/exceeded alerts; the highest measured value was {} ({:.0}% of the limit)",
                b(worst),
                pct(worst)
            ),
            action: format!(
                "give the run more room (memory.limit_bytes above {}) or shrink the replay (memory.buffer_limit_bytes, now {})",
                b((worst as f64 / m.warning_fraction).ceil() as u64),
                b(m.buffer_limit_bytes)
            ),
        });
    }
    if r.batch.1 > 0 {
        out.push(Recommendation {
            rule: "batch-shrunk".into(),
            finding: format!(
                "critical pressure shrank the recommended batch {} times, to {}",
                r.batch.1, r.batch.0
            ),
            action: format!(
                "start with training.max_batch = {} so the run does not reach the critical line",
                r.batch.0
            ),
        });
    }
    out
}

impl SystemReport {
    /// The report as pretty JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The report as Markdown.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let pct = |x: u64| 100.0 * x as f64 / self.limit_bytes as f64;
        s.push_str("## Memory\n\n");
        s.push_str(&format!(
            "Limit {} (warning {}, critical {}).\n\n",
            b(self.limit_bytes),
            b(self.warning_bytes),
            b(self.critical_bytes)
        ));
        s.push_str("| measure | bytes | of limit |\n|---|---:|---:|\n");
        let opt = |label: &str, v: Option<u64>, s: &mut String| {
            if let Some(v) = v {
                s.push_str(&format!("| {label} | {} | {:.1}% |\n", b(v), pct(v)));
            }
        };
        opt("RSS now (kernel)", self.process.rss_bytes, &mut s);
        opt(
            "peak RSS (kernel VmHWM)",
            self.process.peak_rss_bytes,
            &mut s,
        );
        opt(
            "heap now (counting allocator)",
            self.heap.map(|h| h.current_bytes),
            &mut s,
        );
        opt(
            "peak heap (counting allocator)",
            self.heap.map(|h| h.peak_bytes),
            &mut s,
        );
        s.push_str("\n### Components\n\n`activations` is the last training step's allocator peak (transient); the others are held.\n\n| component | bytes | of RSS |\n|---|---:|---:|\n");
        for c in &self.components {
            s.push_str(&format!(
                "| {} | {} | {} |\n",
                c.name,
                b(c.bytes),
                c.share_of_rss
                    .map_or_else(|| "-".into(), |x| format!("{:.1}%", 100.0 * x))
            ));
        }
        for (name, raw, comp, chunks) in &self.replay_compression {
            if *comp > 0 {
                s.push_str(&format!(
                    "\n{name}: {chunks} cold chunks compressed, {} -> {} ({:.2}x).\n",
                    b(*raw),
                    b(*comp),
                    *raw as f64 / *comp as f64
                ));
            }
        }
        s.push_str(&format!(
            "\n### Alerts\n\n{} alerts in all.\n\n",
            self.alerts_total
        ));
        if !self.alerts.is_empty() {
            s.push_str("| at (s) | level | value | action |\n|---:|---|---:|---|\n");
            for a in &self.alerts {
                s.push_str(&format!(
                    "| {:.1} | {} | {} | {} |\n",
                    a.elapsed_secs,
                    a.level,
                    b(a.value_bytes),
                    a.action
                ));
            }
        }
        s.push_str(&format!(
            "\n### Leak check\n\nVerdict: **{}** after {} heap snapshots (needs {}).",
            self.leak.verdict, self.leak.snapshots, self.leak.min_samples
        ));
        if let (Some(z), Some(zt)) = (self.leak.z, self.leak.z_threshold) {
            s.push_str(&format!(" Trend z = {z:.2} (a leak needs {zt:.2})."));
        }
        if let Some(rate) = self.leak.heap_rate_bytes_per_sec {
            s.push_str(&format!(" Heap rate {}/s.", bi(rate as i64)));
        }
        s.push('\n');
        for (k, v) in &self.leak.growing_sites {
            s.push_str(&format!("- growing site `{k}`: {}\n", b(*v)));
        }
        s.push_str(&format!(
            "\n### Reclaim\n\n{} passes in all.\n\n",
            self.reclaim_passes
        ));
        if !self.reclaim_history.is_empty() {
            s.push_str("| pass | trigger | components | claimed | heap freed | RSS anon freed |\n|---:|---|---:|---:|---:|---:|\n");
            for p in &self.reclaim_history {
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} |\n",
                    p.seq,
                    p.trigger,
                    p.components,
                    b(p.claimed_bytes),
                    p.heap_freed_bytes.map_or_else(|| "-".into(), bi),
                    p.rss_anon_freed_bytes.map_or_else(|| "-".into(), bi)
                ));
            }
        }
        s.push_str("\n### Recommendations\n\n");
        if self.recommendations.is_empty() {
            s.push_str("No rule fired on these measurements.\n");
        }
        for r in &self.recommendations {
            s.push_str(&format!("- **{}**: {}. {}.\n", r.rule, r.finding, r.action));
        }
        s
    }
}
