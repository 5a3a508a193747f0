//! The markdown report of the `buffers` bench: gm-buffers' numbers next to the
//! peers' from the same run, and the target ratios with PASS/MISS.
//!
//! [`render`] is pure (two JSON values and the run facts in, markdown out) so
//! it is unit-tested with small fabricated inputs.

use std::fmt::Write as _;

use serde_json::{Map, Value};

/// Facts about the run that the JSON files do not carry.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunInfo {
    pub(crate) date: String,
    pub(crate) cpu: String,
    pub(crate) cores: usize,
    pub(crate) rustc: String,
    /// The exact command lines, in the order they ran.
    pub(crate) commands: Vec<String>,
    /// Anything the reader must know (peers skipped, setup trouble, timing).
    pub(crate) notes: Vec<String>,
}

/// How our value must relate to the peer's.
#[derive(Debug, Clone, Copy)]
enum Goal {
    /// ours / peer >= x (throughput)
    AtLeast(f64),
    /// ours / peer <= x (memory)
    AtMost(f64),
}

/// Which peer value a target is compared against.
#[derive(Debug, Clone, Copy)]
enum Peer {
    /// The highest value among the cpprb cases; `uniform_only` leaves out the
    /// prioritized ones (their `sample` is a prioritized sample).
    BestCpprb { uniform_only: bool },
    /// The highest value among all buffer cases (numpy-ref included).
    BestAny,
    /// One named case.
    Case(&'static str),
}

#[derive(Debug, Clone, Copy)]
enum Unit {
    /// transitions per second
    Rate,
    /// resident bytes per stored transition
    Bytes,
}

#[derive(Debug)]
struct Target {
    label: &'static str,
    /// key in buffers.json
    ours: &'static str,
    /// key in a peer case's result
    peer_key: &'static str,
    peer: Peer,
    goal: Goal,
    unit: Unit,
}

/// The targets gm-buffers must meet against the peers.
const TARGETS: &[Target] = &[
    Target {
        label: "uniform sample(256)",
        ours: "sample_per_s",
        peer_key: "sample",
        peer: Peer::BestCpprb { uniform_only: true },
        goal: Goal::AtLeast(1.5),
        unit: Unit::Rate,
    },
    Target {
        label: "PER sample+update(256)",
        ours: "per_sample_update_per_s",
        peer_key: "per_sample_update",
        peer: Peer::Case("cpprb-per"),
        goal: Goal::AtLeast(2.0),
        unit: Unit::Rate,
    },
    Target {
        label: "add256 (chunked add)",
        ours: "add256_per_s",
        peer_key: "add256",
        peer: Peer::BestCpprb {
            uniform_only: false,
        },
        goal: Goal::AtLeast(2.0),
        unit: Unit::Rate,
    },
    Target {
        label: "add1 (single add)",
        ours: "add1_per_s",
        peer_key: "add1",
        peer: Peer::BestAny,
        goal: Goal::AtLeast(5.0),
        unit: Unit::Rate,
    },
    Target {
        label: "bytes/transition, dedup",
        ours: "bytes_per_transition_dedup",
        peer_key: "bytes_per_tr_anon",
        peer: Peer::Case("cpprb-stack"),
        goal: Goal::AtMost(0.5),
        unit: Unit::Bytes,
    },
    Target {
        label: "bytes/transition, dedup+LZ4",
        ours: "bytes_per_transition_dedup_lz4",
        peer_key: "bytes_per_tr_anon",
        peer: Peer::Case("cpprb-stack"),
        goal: Goal::AtMost(0.5),
        unit: Unit::Bytes,
    },
];

/// The buffer cases of replay_peers.py in its own order (others follow, sorted).
const CASE_ORDER: &[&str] = &[
    "numpy-ref",
    "cpprb-base",
    "cpprb-nextof",
    "cpprb-stack",
    "cpprb-mmap",
    "cpprb-per",
    "cpprb-per-stack",
];

/// Peer cases with a CPU-busy fraction above this are flagged as noisy
/// (the same threshold replay_peers.py uses).
const NOISY_BUSY: f64 = 0.15;

/// Renders the report. `ours` is buffers.json (a flat object); `peers` is
/// replay_peers.py's JSON (`{"versions", "config", "results": {case: {..}}}`;
/// a bare `{case: {..}}` map is accepted too), `None` when the peers did not run.
pub(crate) fn render(ours: &Value, peers: Option<&Value>, info: &RunInfo) -> String {
    let empty = Map::new();
    let ours = ours.as_object().unwrap_or(&empty);
    let cases = peers.and_then(peer_cases);
    let mut md = String::new();
    let w = &mut md;

    line(w, "# gm-buffers vs Python replay-buffer peers");
    line(w, "");
    line(
        w,
        &format!(
            "{} · {} ({} cores) · {}",
            info.date, info.cpu, info.cores, info.rustc
        ),
    );
    line(w, "");

    // ---- targets
    line(w, "## Targets");
    line(w, "");
    w.push_str(&targets_table(ours, cases));
    line(w, "");
    line(
        w,
        "Ratio = gm-buffers / peer, both measured in this run. Peer bytes are cpprb-stack's \
         anonymous RSS growth per stored transition; \"best\" is the highest value among the \
         eligible peer cases (uniform sample leaves out the prioritized cpprb cases).",
    );
    line(w, "");

    // ---- our numbers
    line(w, "## gm-buffers (target/bench/buffers.json)");
    line(w, "");
    if ours.is_empty() {
        line(w, "buffers.json held no object of numbers.");
    } else {
        line(w, "| key | value |");
        line(w, "|---|--:|");
        let (nested, flat): (Vec<_>, Vec<_>) = ours
            .iter()
            .partition(|(_, v)| v.is_object() || v.is_array());
        for (k, v) in flat {
            line(w, &format!("| {k} | {} |", fmt_value(k, v)));
        }
        if !nested.is_empty() {
            let keys: Vec<String> = nested.iter().map(|(k, _)| format!("`{k}`")).collect();
            line(w, "");
            line(
                w,
                &format!("Nested details ({}) are in buffers.json.", keys.join(", ")),
            );
        }
    }
    line(w, "");

    // ---- peers
    line(w, "## Peers (target/bench/peers.json)");
    line(w, "");
    match cases {
        None => line(w, "Peers did not run; every ratio above is n/a."),
        Some(cases) => peers_table(w, cases, peers),
    }
    line(w, "");

    // ---- machine, commands, notes
    line(w, "## Machine");
    line(w, "");
    line(w, &format!("- date: {}", info.date));
    line(w, &format!("- CPU: {} ({} cores)", info.cpu, info.cores));
    line(w, &format!("- rustc: {}", info.rustc));
    if let Some(v) = peers
        .and_then(|p| p.get("versions"))
        .and_then(Value::as_object)
    {
        let keep: Vec<String> = v
            .iter()
            .filter(|(_, x)| !x.is_null())
            .map(|(k, x)| {
                format!(
                    "{k}={}",
                    x.as_str().map_or_else(|| x.to_string(), str::to_string)
                )
            })
            .collect();
        line(w, &format!("- peers: {}", keep.join(", ")));
    }
    line(w, "");
    line(w, "## Commands");
    line(w, "");
    line(w, "```sh");
    for c in &info.commands {
        line(w, c);
    }
    line(w, "```");
    let mut notes = info.notes.clone();
    if let Some(cases) = cases {
        let noisy: Vec<&str> = cases
            .iter()
            .filter(|(_, r)| busy(r) > NOISY_BUSY)
            .map(|(n, _)| n.as_str())
            .collect();
        if !noisy.is_empty() {
            notes.push(format!(
                "other processes were using the CPUs around these peer cases: {} (rerun them)",
                noisy.join(", ")
            ));
        }
    }
    if !notes.is_empty() {
        line(w, "");
        line(w, "## Notes");
        line(w, "");
        for n in &notes {
            line(w, &format!("- {n}"));
        }
    }
    md
}

/// The targets table (header, rule, one row per target, no trailing text):
/// gm-buffers' value, the peer it is compared with, the ratio and PASS/MISS.
/// `cases` is the peers' case map (`None` when the peers did not run).
pub(crate) fn targets_table(
    ours: &Map<String, Value>,
    cases: Option<&Map<String, Value>>,
) -> String {
    let mut md = String::new();
    let w = &mut md;
    line(
        w,
        "| metric | gm-buffers | peer | peer value | ratio | target | result |",
    );
    line(w, "|---|--:|---|--:|--:|--:|---|");
    for t in TARGETS {
        let row = evaluate(t, ours, cases);
        let ours_s = row
            .ours
            .map_or_else(|| "-".to_string(), |v| fmt_unit(v, t.unit));
        let (peer_name, peer_s) = match &row.peer {
            Some((name, v)) => (format!("{name} `{}`", t.peer_key), fmt_unit(*v, t.unit)),
            None => (peer_desc(t.peer).to_string(), "-".to_string()),
        };
        let ratio = row
            .ratio
            .map_or_else(|| "-".to_string(), |r| format!("{r:.2}×"));
        let goal = match t.goal {
            Goal::AtLeast(x) => format!("≥ {x}×"),
            Goal::AtMost(x) => format!("≤ {x}×"),
        };
        line(
            w,
            &format!(
                "| {} ({}) | {ours_s} | {peer_name} | {peer_s} | {ratio} | {goal} | {} |",
                t.label,
                unit_name(t.unit),
                row.verdict
            ),
        );
    }
    md
}

/// One evaluated target row.
#[derive(Debug)]
struct Row<'a> {
    ours: Option<f64>,
    peer: Option<(&'a str, f64)>,
    ratio: Option<f64>,
    verdict: String,
}

fn evaluate<'a>(
    t: &Target,
    ours: &Map<String, Value>,
    cases: Option<&'a Map<String, Value>>,
) -> Row<'a> {
    let our = ours
        .get(t.ours)
        .and_then(Value::as_f64)
        .filter(|v| v.is_finite());
    let peer = cases.and_then(|c| pick_peer(c, t.peer, t.peer_key));
    let ratio = match (our, peer) {
        (Some(o), Some((_, p))) if p > 0.0 => Some(o / p),
        _ => None,
    };
    let verdict = match (our, peer, ratio) {
        (None, _, _) => format!("n/a (`{}` missing)", t.ours),
        (_, None, _) => "n/a (no peer value)".to_string(),
        (_, Some(_), None) => "n/a (peer value ≤ 0)".to_string(),
        (_, _, Some(r)) => {
            let pass = match t.goal {
                Goal::AtLeast(x) => r >= x,
                Goal::AtMost(x) => r <= x,
            };
            if pass { "PASS" } else { "MISS" }.to_string()
        }
    };
    Row {
        ours: our,
        peer,
        ratio,
        verdict,
    }
}

/// The peer value a target compares against: (case name, value).
fn pick_peer<'a>(cases: &'a Map<String, Value>, peer: Peer, key: &str) -> Option<(&'a str, f64)> {
    let eligible = |name: &str, r: &Map<String, Value>| match peer {
        Peer::Case(want) => name == want,
        Peer::BestAny => true,
        Peer::BestCpprb { uniform_only } => {
            name.starts_with("cpprb") && !(uniform_only && is_prioritized(name, r))
        }
    };
    cases
        .iter()
        .filter_map(|(name, r)| Some((name.as_str(), r.as_object()?)))
        .filter(|(name, r)| case_ok(r) && eligible(name, r))
        .filter_map(|(name, r)| Some((name, r.get(key)?.as_f64().filter(|v| v.is_finite())?)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

fn is_prioritized(name: &str, r: &Map<String, Value>) -> bool {
    r.contains_key("per_sample_update") || name.split('-').any(|part| part == "per")
}

/// A case counts unless it says `"ok": false`.
fn case_ok(r: &Map<String, Value>) -> bool {
    r.get("ok").and_then(Value::as_bool).unwrap_or(true)
}

fn busy(r: &Value) -> f64 {
    ["system_busy_before", "system_busy_after"]
        .iter()
        .filter_map(|k| r.get(k).and_then(Value::as_f64))
        .fold(0.0, f64::max)
}

pub(crate) fn peer_cases(peers: &Value) -> Option<&Map<String, Value>> {
    peers.get("results").unwrap_or(peers).as_object()
}

fn peer_desc(peer: Peer) -> &'static str {
    match peer {
        Peer::BestCpprb { uniform_only: true } => "best uniform cpprb",
        Peer::BestCpprb {
            uniform_only: false,
        } => "best cpprb",
        Peer::BestAny => "best peer",
        Peer::Case(name) => name,
    }
}

pub(crate) fn peers_table(w: &mut String, cases: &Map<String, Value>, peers: Option<&Value>) {
    if let Some(bw) = cases
        .get("membw")
        .filter(|r| r.as_object().is_some_and(case_ok))
    {
        let num = |k: &str| bw.get(k).and_then(Value::as_f64);
        if let (Some(copy), Some(gather)) =
            (num("copy_GBps_median"), num("gather_transitions_per_s_est"))
        {
            line(
                w,
                &format!(
                    "Memory bandwidth: 1 GiB copy {copy:.2} GB/s; random 256-row gather ≈ {} \
                     obs+next_obs transitions/s (the physical ceiling for sampling).",
                    fmt_rate(gather)
                ),
            );
            line(w, "");
        }
    }
    if let Some(c) = peers.and_then(|p| p.get("config")) {
        line(w, &format!("Config: `{c}`"));
        line(w, "");
    }
    let cols: &[(&str, &str, Unit)] = &[
        ("fill256", "fill_rate", Unit::Rate),
        ("add256", "add256", Unit::Rate),
        ("add1", "add1", Unit::Rate),
        ("sample", "sample", Unit::Rate),
        ("PER s+u", "per_sample_update", Unit::Rate),
        ("B/tr anon", "bytes_per_tr_anon", Unit::Bytes),
        ("B/tr file", "bytes_per_tr_file", Unit::Bytes),
    ];
    let mut head = "| case |".to_string();
    let mut rule = "|---|".to_string();
    for (h, _, _) in cols {
        head.push_str(&format!(" {h} |"));
        rule.push_str("--:|");
    }
    line(w, &head);
    line(w, &rule);
    // serde_json's map is sorted by key; show the cases in the script's order.
    let mut names: Vec<&String> = cases
        .keys()
        .filter(|n| *n != "membw" && *n != "codec")
        .collect();
    names.sort_by_key(|n| {
        CASE_ORDER
            .iter()
            .position(|o| o == n)
            .unwrap_or(CASE_ORDER.len())
    });
    for name in names {
        let r = &cases[name.as_str()];
        let Some(r) = r.as_object() else { continue };
        if !case_ok(r) {
            let err = r
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("unknown error");
            line(w, &format!("| {name} | FAILED: {} |", escape(err)));
            continue;
        }
        let mut row = format!("| {name} |");
        for (_, key, unit) in cols {
            let cell = r
                .get(*key)
                .and_then(Value::as_f64)
                .map_or_else(|| "-".to_string(), |v| fmt_unit(v, *unit));
            row.push_str(&format!(" {cell} |"));
        }
        line(w, &row);
    }
    line(w, "");
    line(
        w,
        "Rates are transitions/s (PER rows: `sample` is a prioritized sample); \
         B/tr = resident bytes per stored transition.",
    );
}

fn unit_name(unit: Unit) -> &'static str {
    match unit {
        Unit::Rate => "transitions/s",
        Unit::Bytes => "B/transition",
    }
}

fn fmt_unit(v: f64, unit: Unit) -> String {
    match unit {
        Unit::Rate => fmt_rate(v),
        Unit::Bytes if v.abs() >= 100.0 => format!("{v:.0}"),
        Unit::Bytes => format!("{v:.1}"),
    }
}

/// `1234567.0` -> `1.23M`, `41600.0` -> `41.6k`, `12.0` -> `12` (as replay_peers.py prints).
pub(crate) fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// A value of buffers.json: rates (`*_per_s`) as `1.23M`, other numbers plainly.
fn fmt_value(key: &str, v: &Value) -> String {
    match v.as_f64() {
        Some(x) if key.ends_with("_per_s") => fmt_rate(x),
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x:.0}"),
        Some(x) => {
            let s = format!("{x:.3}");
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        }
        None if v.is_null() => "-".to_string(),
        None => escape(&v.as_str().map_or_else(|| v.to_string(), str::to_string)),
    }
}

/// Keeps a string from breaking a markdown table row.
pub(crate) fn escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn line(w: &mut String, s: &str) {
    let _ = writeln!(w, "{s}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ours() -> Value {
        json!({
            "add1_per_s": 1_000_000.0,
            "add256_per_s": 8_000_000.0,
            "sample_per_s": 3_000_000.0,
            "per_sample_update_per_s": 1_500_000.0,
            "bytes_per_transition_raw": 6549.0,
            "bytes_per_transition_dedup": 100.0,
            "bytes_per_transition_dedup_lz4": 150.0,
            "compression_ratio": 43.66,
            "extra_note": "x|y",
        })
    }

    fn peers() -> Value {
        json!({
            "versions": {"python": "3.11.7", "cpprb": "11.0.0", "torch": null},
            "config": {"capacity": 100000, "batch": 256},
            "results": {
                "membw": {"ok": true, "copy_GBps_median": 20.0,
                          "gather_transitions_per_s_est": 2.0e6},
                "numpy-ref": {"ok": true, "fill_rate": 2e6, "add256": 4.0e6,
                              "add1": 400_000.0, "sample": 1.6e6,
                              "bytes_per_tr_anon": 6536.0, "bytes_per_tr_file": 0.0},
                "cpprb-base": {"ok": true, "add256": 3.0e6, "add1": 75_000.0, "sample": 1.5e6,
                               "bytes_per_tr_anon": 6536.0},
                "cpprb-stack": {"ok": true, "add256": 700_000.0, "add1": 35_000.0, "sample": 2.0e6,
                                "bytes_per_tr_anon": 224.0},
                // prioritized: its `sample` (9M, fabricated high) must not count for uniform sample
                "cpprb-per": {"ok": true, "add256": 2.0e6, "add1": 60_000.0, "sample": 9.0e6,
                              "per_sample_update": 900_000.0, "bytes_per_tr_anon": 6536.0},
                // failed: must be ignored even though its numbers would win
                "cpprb-nextof": {"ok": false, "error": "boom", "add256": 99.0e6},
            }
        })
    }

    fn info() -> RunInfo {
        RunInfo {
            date: "2026-01-01 00:00:00 UTC".into(),
            cpu: "Test CPU".into(),
            cores: 2,
            rustc: "rustc 1.95.0".into(),
            commands: vec!["cargo xtask bench buffers".into()],
            notes: vec![],
        }
    }

    /// The targets table row whose metric starts with `label`.
    fn row<'a>(md: &'a str, label: &str) -> &'a str {
        md.lines()
            .find(|l| l.starts_with(&format!("| {label} (")))
            .unwrap_or_else(|| panic!("no row `{label}` in:\n{md}"))
    }

    #[test]
    fn picks_the_right_peer_and_verdict_for_each_target() {
        let md = render(&ours(), Some(&peers()), &info());
        // 3.0M / best uniform cpprb (stack 2.0M; per's 9M excluded) = 1.5 -> PASS (boundary)
        let r = row(&md, "uniform sample(256)");
        assert!(
            r.contains("cpprb-stack") && r.contains("1.50×") && r.ends_with("| PASS |"),
            "{r}"
        );
        // 1.5M / cpprb-per 0.9M = 1.67 < 2 -> MISS
        let r = row(&md, "PER sample+update(256)");
        assert!(
            r.contains("cpprb-per `per_sample_update`")
                && r.contains("1.67×")
                && r.ends_with("| MISS |"),
            "{r}"
        );
        // 8M / best cpprb add256 (base 3M; failed nextof ignored; numpy's 4M is no cpprb)
        // = 2.67 -> PASS
        let r = row(&md, "add256 (chunked add)");
        assert!(
            r.contains("cpprb-base") && r.contains("2.67×") && r.ends_with("| PASS |"),
            "{r}"
        );
        // 1M / best add1 of any peer (numpy-ref 400k) = 2.5 < 5 -> MISS
        let r = row(&md, "add1 (single add)");
        assert!(
            r.contains("numpy-ref") && r.contains("2.50×") && r.ends_with("| MISS |"),
            "{r}"
        );
        // 100 / 224 = 0.45 <= 0.5 -> PASS; 150 / 224 = 0.67 -> MISS
        let r = row(&md, "bytes/transition, dedup");
        assert!(
            r.contains("0.45×") && r.contains("≤ 0.5×") && r.ends_with("| PASS |"),
            "{r}"
        );
        let r = row(&md, "bytes/transition, dedup+LZ4");
        assert!(r.contains("0.67×") && r.ends_with("| MISS |"), "{r}");
    }

    #[test]
    fn lists_every_number_machine_and_command() {
        let md = render(&ours(), Some(&peers()), &info());
        assert!(md.contains("| add1_per_s | 1.00M |"), "{md}");
        assert!(md.contains("| compression_ratio | 43.66 |"), "{md}");
        assert!(
            md.contains("| extra_note | x\\|y |"),
            "pipe must be escaped:\n{md}"
        );
        assert!(md.contains("| cpprb-nextof | FAILED: boom |"), "{md}");
        assert!(
            md.contains("| cpprb-stack | - | 700.0k | 35.0k | 2.00M | - | 224 | - |"),
            "{md}"
        );
        assert!(md.contains("- CPU: Test CPU (2 cores)"));
        assert!(md.contains("- rustc: rustc 1.95.0"));
        assert!(
            md.contains("python=3.11.7") && !md.contains("torch="),
            "null versions dropped:\n{md}"
        );
        assert!(md.contains("```sh\ncargo xtask bench buffers\n```"));
        assert!(md.contains("1 GiB copy 20.00 GB/s"));
        let at = |case: &str| md.find(&format!("| {case} |")).unwrap();
        assert!(at("numpy-ref") < at("cpprb-base") && at("cpprb-stack") < at("cpprb-per"));
        assert!(!md.contains("## Notes"), "no notes expected:\n{md}");
    }

    #[test]
    fn without_peers_every_ratio_is_not_applicable() {
        let mut i = info();
        i.notes.push("peers skipped (--no-peers)".into());
        let md = render(&ours(), None, &i);
        let rows: Vec<&str> = md
            .lines()
            .filter(|l| l.contains("n/a (no peer value)"))
            .collect();
        assert_eq!(rows.len(), TARGETS.len(), "{md}");
        assert!(!md.contains("PASS") && !md.contains("MISS"));
        assert!(md.contains("Peers did not run"));
        assert!(md.contains("- peers skipped (--no-peers)"));
    }

    #[test]
    fn missing_key_zero_peer_and_bare_case_map() {
        // a bare {case: result} map, as an older script version wrote
        let peers = json!({
            "cpprb-stack": {"bytes_per_tr_anon": 0.0, "sample": 1.0e6, "system_busy_before": 0.4},
        });
        // null and nested values, as bench_buffers writes when a case is missing
        let ours = json!({"sample_per_s": 2.0e6, "add1_per_s": null, "cases": {"dedup": {}}});
        let md = render(&ours, Some(&peers), &info());
        assert!(
            row(&md, "uniform sample(256)").ends_with("| PASS |"),
            "{md}"
        );
        assert!(row(&md, "add1 (single add)").contains("n/a (`add1_per_s` missing)"));
        let r = row(&md, "bytes/transition, dedup");
        assert!(
            r.contains("n/a (`bytes_per_transition_dedup` missing)"),
            "{r}"
        );
        assert!(
            md.contains("around these peer cases: cpprb-stack"),
            "noisy case flagged:\n{md}"
        );
        assert!(md.contains("| add1_per_s | - |"), "{md}");
        assert!(
            md.contains("Nested details (`cases`) are in buffers.json."),
            "{md}"
        );
        assert!(!md.contains("| cases |"), "{md}");
    }

    #[test]
    fn zero_peer_value_gives_no_ratio() {
        let peers = json!({"results": {"cpprb-stack": {"ok": true, "bytes_per_tr_anon": 0.0}}});
        let md = render(&ours(), Some(&peers), &info());
        assert!(
            row(&md, "bytes/transition, dedup").contains("n/a (peer value ≤ 0)"),
            "{md}"
        );
    }

    #[test]
    fn formats_rates_and_plain_numbers() {
        assert_eq!(fmt_rate(1_234_567.0), "1.23M");
        assert_eq!(fmt_rate(41_600.0), "41.6k");
        assert_eq!(fmt_rate(12.0), "12");
        assert_eq!(
            fmt_value("bytes_per_transition_raw", &json!(6549.0)),
            "6549"
        );
        assert_eq!(fmt_value("compression_ratio", &json!(2.5)), "2.5");
        assert_eq!(fmt_value("nested", &json!({"a": 1})), "{\"a\":1}");
    }
}
