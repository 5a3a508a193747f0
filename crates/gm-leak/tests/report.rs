//! [`gm_leak::LeakReport`]: the JSON shape (round trip through
//! `serde_json::Value`) and the text layout, with the tracking allocator
//! installed (the not-installed case is a unit test in `src/report.rs`).

use gm_leak::workload::Workload;
use gm_leak::{
    DetectorConfig, LeakDetector, LeakReport, Registry, Snapshot, TrackingAllocator, Verdict,
};
use serde_json::Value;
use std::sync::Arc;

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator::system();

/// A detector fed a 2 KiB/step leak with a growing label and a growing site.
fn analysed() -> (LeakReport, Registry, Vec<Arc<u64>>) {
    let registry = Registry::new();
    let mut kept = Vec::new();
    let mut d = LeakDetector::new(DetectorConfig::default()).unwrap();
    let heap = Workload {
        noise_sd_bytes: 16.0 * 1024.0,
        ..Workload::reference(5).with_leak(2048.0)
    };
    for (step, h) in (0..400u64).zip(heap.series()) {
        let o = Arc::new(step);
        registry.track("episodes", &o);
        kept.push(o);
        let _steady = registry.guard("workers");
        let snap = Snapshot::new(step, h)
            .with_objects(registry.snapshot())
            .with_sites([("replay.rs:88", 4096 * step), ("model.rs:12", 1 << 20)]);
        d.observe(&snap).unwrap();
    }
    let report = LeakReport::now()
        .with_analysis(&d.analyze())
        .with_live_objects(&registry.snapshot())
        .with_top_sites([("replay.rs:88", 4096 * 399), ("model.rs:12", 1 << 20)]);
    (report, registry, kept)
}

#[test]
fn json_has_the_documented_shape_and_round_trips() {
    let (report, _, _) = analysed();
    let v: Value = report.to_json();
    let obj = v.as_object().unwrap();
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    for k in [
        "allocator",
        "heap",
        "labels",
        "growing_labels",
        "growing_sites",
        "top_sites",
    ] {
        assert!(keys.contains(&k), "missing {k} in {keys:?}");
    }
    assert_eq!(v["allocator"]["installed"], Value::Bool(true));
    assert!(v["allocator"]["current_bytes"].as_u64().unwrap() > 0);
    let heap = &v["heap"];
    assert_eq!(heap["verdict"], "leak");
    for k in [
        "z",
        "p_value",
        "z_threshold",
        "samples",
        "first_step",
        "last_step",
        "s",
        "var_s",
    ] {
        assert!(heap.get(k).is_some(), "heap.{k}");
    }
    let rate = heap["rate"]["per_step"].as_f64().unwrap();
    assert!((rate - 2048.0).abs() < 100.0, "{rate}");
    assert!(heap["rate"]["low"].as_f64().unwrap() <= rate);
    assert_eq!(v["growing_labels"], serde_json::json!(["episodes"]));
    assert_eq!(v["labels"][0]["label"], "episodes");
    assert_eq!(v["labels"][0]["live"], 400);
    assert_eq!(v["labels"][1]["label"], "workers");
    assert_eq!(v["labels"][1]["verdict"], "no_leak");
    assert_eq!(v["growing_sites"][0]["key"], "replay.rs:88");
    assert_eq!(v["top_sites"][1]["site"], "model.rs:12");
    assert_eq!(v["top_sites"][1]["live_bytes"], 1 << 20);

    // Value -> report -> Value is the identity, and so is the text form.
    let back: LeakReport = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(back, report);
    assert_eq!(back.to_json(), v);
    // Through JSON text, floats come back within serde_json's parsing
    // accuracy (its default parser may differ in the last bit).
    let text: LeakReport = serde_json::from_str(&report.to_json_pretty()).unwrap();
    assert!(same_up_to_float_parsing(&text.to_json(), &v), "{text:?}");
}

fn same_up_to_float_parsing(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || ((x - y) / y).abs() < 1e-14
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_up_to_float_parsing(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_up_to_float_parsing(v, w)))
        }
        _ => a == b,
    }
}

#[test]
fn text_report_has_verdict_line_rate_with_units_and_aligned_columns() {
    let (report, _, _) = analysed();
    let text = report.to_string();
    println!("{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "gm-leak report");
    assert!(lines[1].starts_with("allocator: current "), "{}", lines[1]);
    let verdict = lines.iter().find(|l| l.starts_with("verdict: ")).unwrap();
    assert!(verdict.starts_with("verdict: LEAK, heap +2.0"), "{verdict}");
    assert!(
        verdict.contains(" KiB/step (95% CI +"),
        "rate with units: {verdict}"
    );
    assert_eq!(*verdict, report.verdict_line());
    assert!(
        text.contains("window: 400 snapshots, steps 0..=399"),
        "{text}"
    );
    assert!(text.contains("growing labels: episodes"));
    // The label table: header and rows aligned on the right edge of each column.
    let start = lines.iter().position(|l| *l == "live objects:").unwrap();
    let table = &lines[start + 1..start + 4];
    assert!(table[0].trim_start().starts_with("label"));
    let live_end = table[0].find("live").unwrap() + "live".len();
    for row in table {
        let cells: Vec<&str> = row.split_whitespace().collect();
        let live = cells[1];
        assert_eq!(row.find(live).unwrap() + live.len(), live_end, "{row:?}");
    }
    assert!(text.contains("replay.rs:88"));
    assert!(text.contains("1.00 MiB"), "top site bytes with units");
}

#[test]
fn report_without_analysis_says_so() {
    let report = LeakReport::now();
    assert!(report.allocator.installed);
    assert_eq!(report.heap, None);
    assert_eq!(report.verdict_line(), "verdict: not analysed");
    let v = report.to_json();
    assert_eq!(v["heap"], Value::Null);
    assert_eq!(v["labels"], serde_json::json!([]));
    let _: Verdict = serde_json::from_value(Value::String("insufficient".into())).unwrap();
}
