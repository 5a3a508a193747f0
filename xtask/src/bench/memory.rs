//! `cargo xtask bench memory`: runs the measurement examples of gm-leak and
//! gm-monitor in release mode, merges their JSON into
//! `target/bench/memory.json` (flat keys) and writes `memory.md` with each
//! figure next to its target.

use std::path::Path;

use super::{parse_last_json, write_reports};
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use crate::{cargo, display_cmd};

/// (crate, example) pairs; each prints one JSON object on its last line.
const SOURCES: &[(&str, &str)] = &[
    ("gm-leak", "overhead"),
    ("gm-leak", "leak_accuracy"),
    ("gm-monitor", "sample_cost"),
];

/// key, target description, check.
pub(crate) type Target = (&'static str, &'static str, fn(f64) -> bool);

pub(crate) const TARGETS: &[Target] = &[
    (
        "alloc_free_overhead_ns",
        "<= 15 ns added per alloc+free pair (sampling off)",
        |v| v <= 15.0,
    ),
    (
        "monitor_sample_us",
        "<= 20 us per sample, all CPU sources",
        |v| v <= 20.0,
    ),
    (
        "monitor_cpu_fraction_at_5s",
        "<= 0.01 % of one core at the 5 s default",
        |v| v <= 1e-4,
    ),
    (
        "leak_detect_steps_1kib",
        "planted 1 KiB/step leak found within 300 steps",
        |v| v <= 300.0,
    ),
    (
        "leak_false_positives_10k",
        "0 leak verdicts over 10 000 steady steps",
        |v| v == 0.0,
    ),
];

pub(crate) fn run(args: &[String], dir: &Path) -> Result<()> {
    if let Some(a) = args.first() {
        bail!("unknown argument `{a}` for `bench memory` (it takes none)");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json_path = dir.join("memory.json");
    let md_path = dir.join("memory.md");
    for stale in [&json_path, &md_path] {
        if stale.exists() {
            std::fs::remove_file(stale).with_context(|| format!("removing {}", stale.display()))?;
        }
    }
    let mut flat = Map::new();
    let mut commands = Vec::new();
    for (krate, example) in SOURCES {
        let mut cmd = cargo();
        cmd.args(["run", "--release", "-q", "-p", krate, "--example", example]);
        commands.push(display_cmd(&cmd));
        println!("\n==> {krate}: {example}\n$ {}", display_cmd(&cmd));
        let out = cmd
            .output()
            .with_context(|| format!("running {krate} {example}"))?;
        if !out.status.success() {
            bail!(
                "{krate} example {example} failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        print!("{stdout}");
        let obj = parse_last_json(&stdout)
            .with_context(|| format!("{krate} example {example} printed no JSON object"))?;
        for (k, v) in obj {
            flat.insert(k, v);
        }
    }
    let value = Value::Object(flat);
    let md = render(&value, &commands);
    write_reports(&json_path, &md_path, &value, &md)?;
    Ok(())
}

/// Markdown: the targets with PASS/MISS, then every key.
fn render(v: &Value, commands: &[String]) -> String {
    let mut md = String::from(
        "# Memory toolkit benchmarks\n\n| figure | value | target | result |\n|---|--:|---|---|\n",
    );
    for (key, target, ok) in TARGETS {
        let (value, result) = match v.get(*key).and_then(Value::as_f64) {
            Some(x) => (format!("{x:.6}"), if ok(x) { "PASS" } else { "MISS" }),
            None => ("-".to_string(), "not measured"),
        };
        md.push_str(&format!("| `{key}` | {value} | {target} | {result} |\n"));
    }
    md.push_str("\n## All keys\n\n| key | value |\n|---|--:|\n");
    if let Some(obj) = v.as_object() {
        for (k, x) in obj {
            md.push_str(&format!("| {k} | {x} |\n"));
        }
    }
    md.push_str("\n## Commands\n\n```sh\ncargo xtask bench memory\n");
    for c in commands {
        md.push_str(c);
        md.push('\n');
    }
    md.push_str("```\n");
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_last_json_object_line() {
        let out = "warming up\n{\"a\": 1}\nnoise\n{\"b\": 2.5}\n";
        let m = parse_last_json(out).unwrap();
        assert_eq!(m.get("b").and_then(Value::as_f64), Some(2.5));
        assert!(parse_last_json("no json here\n[1,2]\n").is_none());
    }

    #[test]
    fn report_marks_each_target() {
        let v: Value = serde_json::json!({
            "alloc_free_overhead_ns": 3.2,
            "monitor_sample_us": 25.0,
            "leak_detect_steps_1kib": 120,
            "leak_false_positives_10k": 0,
        });
        let md = render(&v, &["cmd".into()]);
        assert!(md.contains("| `alloc_free_overhead_ns` | 3.200000 |") && md.contains("PASS"));
        assert!(md
            .lines()
            .any(|l| l.contains("monitor_sample_us") && l.contains("MISS")));
        assert!(md
            .lines()
            .any(|l| l.contains("monitor_cpu_fraction_at_5s") && l.contains("not measured")));
        assert!(md
            .lines()
            .any(|l| l.contains("leak_false_positives_10k") && l.contains("PASS")));
    }
}
