//! `cargo xtask bench regen`: rewrites the generated blocks of BENCHMARKS.md
//! from the JSON the benches left in `target/bench/`, without measuring.
//!
//! A block is the text between `<!-- bench:NAME:begin -->` and
//! `<!-- bench:NAME:end -->`, each marker alone on its line; everything
//! outside the markers is kept byte for byte. [`replace_block`] is pure and
//! refuses a document whose markers are missing, repeated, nested or out of
//! order, so a damaged document is reported and left untouched, never
//! half-rewritten.
//!
//! Each block opens with a line saying when, on what machine and by which
//! command its figures were measured. That comes from
//! `target/bench/NAME.run.json`, which every `cargo xtask bench NAME` writes
//! next to `NAME.json`; for results older than that file, the header of the
//! area's own `NAME.md` is used where it has one, and otherwise the block
//! says the machine was not recorded and gives the JSON file's time.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use super::report::{self, RunInfo};
use super::{memory, models, train};
use crate::cmd_output;

/// The areas with a block in BENCHMARKS.md, in the order `cargo xtask bench` runs them.
pub(crate) const AREAS: &[&str] = &["buffers", "memory", "models", "train", "shard"];

fn begin_marker(area: &str) -> String {
    format!("<!-- bench:{area}:begin -->")
}

fn end_marker(area: &str) -> String {
    format!("<!-- bench:{area}:end -->")
}

/// What one regeneration did.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Areas whose block was rewritten from fresh JSON.
    pub(crate) updated: Vec<String>,
    /// Areas left as they were because their JSON is missing (a warning).
    pub(crate) missing: Vec<String>,
    /// Areas that could not be regenerated, with why (an error).
    pub(crate) failed: Vec<String>,
}

/// Rewrites the blocks of `doc_path` for every area in [`AREAS`] except those
/// in `skip`, from the JSON in `dir`. The file is written once, at the end,
/// and only if some block changed; an area that fails leaves its block as it
/// was and is named in [`Outcome::failed`].
pub(crate) fn regen(doc_path: &Path, dir: &Path, skip: &[&str]) -> Result<Outcome> {
    let original = std::fs::read_to_string(doc_path)
        .with_context(|| format!("reading {}", doc_path.display()))?;
    let mut doc = original.clone();
    let mut outcome = Outcome::default();
    for &area in AREAS.iter().filter(|a| !skip.contains(a)) {
        let json_path = dir.join(format!("{area}.json"));
        if !json_path.exists() {
            eprintln!(
                "WARNING: {} is missing; the `{area}` block of {} is left as it was \
                 (run `cargo xtask bench {area}`)",
                json_path.display(),
                doc_path.display()
            );
            outcome.missing.push(area.to_string());
            continue;
        }
        let block = render_area(area, dir).and_then(|body| replace_block(&doc, area, &body));
        match block {
            Ok(new_doc) => {
                doc = new_doc;
                outcome.updated.push(area.to_string());
            }
            Err(err) => {
                eprintln!("ERROR: `{area}` block not regenerated: {err:#}");
                outcome.failed.push(format!("{area}: {err:#}"));
            }
        }
    }
    if doc != original {
        std::fs::write(doc_path, &doc)
            .with_context(|| format!("writing {}", doc_path.display()))?;
    }
    Ok(outcome)
}

/// Replaces the body of block `area` in `doc` with `body`. Text outside the
/// markers is kept byte for byte, and applying the same body twice gives the
/// same document. Errors (and changes nothing) when either marker is missing
/// or repeated, when they are out of order or not alone on their lines, or
/// when another block's marker sits between them.
pub(crate) fn replace_block(doc: &str, area: &str, body: &str) -> Result<String> {
    let begin = begin_marker(area);
    let end = end_marker(area);
    let only = |marker: &str| -> Result<usize> {
        let at: Vec<usize> = doc.match_indices(marker).map(|(i, _)| i).collect();
        match at[..] {
            [i] => Ok(i),
            [] => bail!("BENCHMARKS.md has no `{marker}` line"),
            _ => bail!("`{marker}` appears {} times", at.len()),
        }
    };
    let b = only(&begin)?;
    let e = only(&end).with_context(|| format!("the `{area}` block is not closed"))?;
    if e < b {
        bail!("`{end}` comes before `{begin}`");
    }
    let body_start = b + begin.len();
    let line_start = |i: usize| i == 0 || doc[..i].ends_with('\n');
    if !line_start(b) || !doc[body_start..].starts_with('\n') {
        bail!("`{begin}` must be alone on its line");
    }
    if !line_start(e)
        || !(doc[e + end.len()..].is_empty() || doc[e + end.len()..].starts_with('\n'))
    {
        bail!("`{end}` must be alone on its line");
    }
    if doc[body_start..e].contains("<!-- bench:") {
        bail!("another block's marker sits inside the `{area}` block");
    }
    let body = body.trim_matches('\n');
    if body.contains("<!-- bench:") {
        bail!("the generated `{area}` block contains a block marker");
    }
    let mut out = String::with_capacity(doc.len() + body.len());
    out.push_str(&doc[..body_start]);
    out.push_str("\n\n");
    if !body.is_empty() {
        out.push_str(body);
        out.push_str("\n\n");
    }
    out.push_str(&doc[e..]);
    Ok(out)
}

/// Where `cargo xtask bench NAME` records how it ran (see [`write_run_info`]).
fn run_info_path(dir: &Path, area: &str) -> std::path::PathBuf {
    dir.join(format!("{area}.run.json"))
}

/// Records when, where and how `area` was measured, next to its JSON.
pub(crate) fn write_run_info(dir: &Path, area: &str, info: &RunInfo) -> Result<()> {
    let path = run_info_path(dir, area);
    let v = json!({
        "date": info.date,
        "cpu": info.cpu,
        "cores": info.cores,
        "rustc": info.rustc,
        "commands": info.commands,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&v)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Removes a run record left by an earlier run (it must not describe this one).
pub(crate) fn remove_run_info(dir: &Path, area: &str) -> Result<()> {
    let path = run_info_path(dir, area);
    if path.exists() {
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

fn run_info_from_json(v: &Value) -> Option<RunInfo> {
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    Some(RunInfo {
        date: s("date")?,
        cpu: s("cpu")?,
        cores: usize::try_from(v.get("cores")?.as_u64()?).ok()?,
        rustc: s("rustc")?,
        commands: v
            .get("commands")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
        notes: Vec::new(),
    })
}

/// The machine facts in the header line of an area's own report
/// (`2026-11-30 12:43:45 UTC · AMD EPYC (2 cores) · rustc 1.95.0 (…)` or
/// `Measured 2026-11-30 15:55:05 UTC on AMD EPYC (2 cores), rustc 1.95.0 (…).`).
fn run_info_from_md(md: &str) -> Option<RunInfo> {
    md.lines().find_map(|line| {
        let utc = line.find(" UTC")?;
        let date = line.get(utc.checked_sub(19)?..utc + 4)?;
        if !date.as_bytes()[..4].iter().all(u8::is_ascii_digit) {
            return None;
        }
        let cores_end = line.find(" cores)")?;
        let open = line[..cores_end].rfind(" (")?;
        let cores = line[open + 2..cores_end].parse().ok()?;
        let after = &line[utc + 4..open];
        let cpu = after
            .strip_prefix(" · ")
            .or_else(|| after.strip_prefix(" on "))?
            .trim();
        let r = line.find("rustc ")?;
        let rustc = match line[r..].find(')') {
            Some(close) => &line[r..=r + close],
            None => line[r..].trim_end_matches('.'),
        };
        Some(RunInfo {
            date: date.to_string(),
            cpu: cpu.to_string(),
            cores,
            rustc: rustc.trim().to_string(),
            commands: Vec::new(),
            notes: Vec::new(),
        })
    })
}

/// The first line of a block: when, where and by which command.
/// `file_time` is the JSON file's modification time, used only without `info`.
fn header_line(area: &str, info: Option<&RunInfo>, file_time: Option<&str>) -> String {
    let command = info
        .and_then(|i| i.commands.first().cloned())
        .unwrap_or_else(|| format!("cargo xtask bench {area}"));
    let tail = format!(
        "figures from `target/bench/{area}.json`, written into this file by \
         `cargo xtask bench regen` (edit outside the `bench:{area}` markers)"
    );
    match info {
        Some(i) => format!(
            "*Measured {} on {} ({} cores), {}, by `{command}`; {tail}.*",
            i.date, i.cpu, i.cores, i.rustc
        ),
        None => format!(
            "*Measured by `{command}`{}; machine and toolchain not recorded \
             (results from before `{area}.run.json` existed); {tail}.*",
            file_time.map_or_else(String::new, |t| format!(", JSON written {t}"))
        ),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The block of `area` from the files in `dir`: header line, then the tables.
fn render_area(area: &str, dir: &Path) -> Result<String> {
    let json_path = dir.join(format!("{area}.json"));
    let v = read_json(&json_path)?;
    if !v.is_object() {
        bail!("{} holds no JSON object", json_path.display());
    }
    let run_info = match read_json(&run_info_path(dir, area)) {
        Ok(r) => run_info_from_json(&r),
        Err(_) => std::fs::read_to_string(dir.join(format!("{area}.md")))
            .ok()
            .and_then(|md| run_info_from_md(&md)),
    };
    let file_time = cmd_output(
        std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M:%S UTC", "-r"])
            .arg(&json_path),
    );
    let mut out = header_line(area, run_info.as_ref(), file_time.as_deref());
    out.push_str("\n\n");
    out.push_str(&match area {
        "buffers" => {
            let peers_path = dir.join("peers.json");
            let peers = if peers_path.exists() {
                Some(read_json(&peers_path)?)
            } else {
                None
            };
            render_buffers(&v, peers.as_ref())
        }
        "memory" => render_memory(&v),
        "models" => render_models(&v),
        "train" => render_train(&v),
        "shard" => super::shard::render(&v),
        other => bail!("no renderer for bench area `{other}`"),
    });
    Ok(out)
}

fn line(w: &mut String, s: &str) {
    let _ = writeln!(w, "{s}");
}

fn f(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64).filter(|x| x.is_finite())
}

/// gm-buffers' layouts in the order of its example, with their labels.
const LAYOUTS: &[(&str, &str)] = &[
    ("dedup", "dedup"),
    ("dedup-lz4", "dedup + LZ4"),
    ("per-dedup", "prioritized, dedup"),
    ("raw", "raw (anonymous memory)"),
    ("raw-mmap", "raw, memory-mapped file"),
    ("per-raw", "prioritized, raw"),
];

fn rate(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), report::fmt_rate)
}

fn bytes_per_tr(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(b) if b.abs() >= 100.0 => format!("{b:.0}"),
        Some(b) => format!("{b:.1}"),
    }
}

/// buffers.json (ours) and peers.json (replay_peers.py, if it ran).
fn render_buffers(ours: &Value, peers: Option<&Value>) -> String {
    let empty = Map::new();
    let ours_map = ours.as_object().unwrap_or(&empty);
    let cases = peers.and_then(report::peer_cases);
    let mut md = String::new();
    let w = &mut md;
    line(
        w,
        &format!(
            "Capacity {}, batch {}, {} logical bytes per transition. Targets, each \
             ratio against the peer measured in the same run:",
            models::num(f(ours, "capacity"), 0),
            models::num(f(ours, "batch"), 0),
            models::num(f(ours, "transition_logical_bytes"), 0),
        ),
    );
    line(w, "");
    w.push_str(&report::targets_table(ours_map, cases));
    if cases.is_none() {
        line(w, "");
        line(
            w,
            "peers.json is missing: the peers did not run, so no ratio.",
        );
    }
    line(w, "");
    line(
        w,
        "All gm-buffers layouts (`buffers.json`, key `cases`; transitions/s and \
         resident bytes per stored transition):",
    );
    line(w, "");
    line(
        w,
        "| layout | add256 | add1 | sample(256) | PER s+u | B/tr anon | B/tr file | notes |",
    );
    line(w, "|---|--:|--:|--:|--:|--:|--:|---|");
    let layouts = ours.get("cases").and_then(Value::as_object);
    if let Some(layouts) = layouts {
        let mut names: Vec<(&str, &str)> = LAYOUTS
            .iter()
            .copied()
            .filter(|(k, _)| layouts.contains_key(*k))
            .collect();
        let mut others: Vec<&str> = layouts
            .keys()
            .map(String::as_str)
            .filter(|k| !LAYOUTS.iter().any(|(l, _)| l == k))
            .collect();
        others.sort_unstable();
        names.extend(others.into_iter().map(|k| (k, k)));
        for (key, label) in names {
            let c = &layouts[key];
            let mut notes = Vec::new();
            if key == "dedup" {
                if let (Some(a), Some(b)) = (f(c, "dedup_ratio_win48"), f(c, "dedup_ratio_win60")) {
                    notes.push(format!(
                        "window rows received per row stored: {a:.1}× (48-row), {b:.1}× (60-row)"
                    ));
                }
                if let Some(s) = f(c, "sample_alloc_per_s") {
                    notes.push(format!(
                        "`sample` into a fresh batch: {}",
                        report::fmt_rate(s)
                    ));
                }
            }
            if let Some(n) = f(c, "compressed_chunks").filter(|n| *n > 0.0) {
                notes.push(format!(
                    "{n:.0} chunks compressed, ratio {}",
                    models::num(f(c, "compression_ratio"), 2)
                ));
            }
            if let Some(h) = f(c, "lz4_cache_hit_rate") {
                notes.push(format!("decompression-cache hit rate {:.0} %", 100.0 * h));
            }
            line(
                w,
                &format!(
                    "| {label} | {} | {} | {} | {} | {} | {} | {} |",
                    rate(f(c, "add256_per_s")),
                    rate(f(c, "add1_per_s")),
                    rate(f(c, "sample_per_s")),
                    rate(f(c, "per_sample_update_per_s")),
                    bytes_per_tr(f(c, "bytes_per_tr_anon")),
                    bytes_per_tr(f(c, "bytes_per_tr_file")),
                    report::escape(&notes.join("; ")),
                ),
            );
        }
    } else {
        line(w, "| (buffers.json has no `cases`) | | | | | | | |");
    }
    if let Some(cases) = cases {
        line(w, "");
        line(w, "Peers, same run (`peers.json`):");
        line(w, "");
        report::peers_table(w, cases, None);
        if let Some(v) = peers
            .and_then(|p| p.get("versions"))
            .and_then(Value::as_object)
        {
            let keep: Vec<String> = v
                .iter()
                .filter(|(_, x)| !x.is_null())
                .map(|(k, x)| {
                    format!(
                        "{k} {}",
                        x.as_str().map_or_else(|| x.to_string(), str::to_string)
                    )
                })
                .collect();
            line(w, "");
            line(w, &format!("Peer environment: {}.", keep.join(", ")));
        }
    }
    md
}

/// memory.json: the targets of [`memory::TARGETS`] with context rows.
fn render_memory(v: &Value) -> String {
    let target = |key: &str| memory::TARGETS.iter().find(|t| t.0 == key);
    let verdict = |key: &str, x: Option<f64>| match (target(key), x) {
        (_, None) => "not measured",
        (Some(t), Some(x)) if (t.2)(x) => "met",
        (Some(_), Some(_)) => "**missed**",
        (None, Some(_)) => "",
    };
    let goal = |key: &str| target(key).map_or_else(|| "–".to_string(), |t| t.1.replace("<=", "≤"));
    let mut md = String::new();
    let w = &mut md;
    line(w, "| figure | measured | target | |");
    line(w, "|---|--:|---|---|");
    let num = models::num;
    let k = "alloc_free_overhead_ns";
    let x = f(v, k);
    line(
        w,
        &format!(
            "| `{k}`: added per alloc+free pair ({} B blocks), sampling off | **{} ns** \
             (system {} → tracking {} ns) | {} | {} |",
            num(f(v, "block_bytes"), 0),
            num(x, 2),
            num(f(v, "alloc_free_system_ns"), 2),
            num(f(v, "alloc_free_tracking_ns"), 2),
            goal(k),
            verdict(k, x)
        ),
    );
    line(
        w,
        &format!(
            "| `alloc_free_sampled_overhead_ns`: same with sampling on (mean {} between samples) | {} ns | – | |",
            models::bytes(f(v, "sampling_mean_bytes")),
            num(f(v, "alloc_free_sampled_overhead_ns"), 2),
        ),
    );
    let k = "monitor_sample_us";
    let x = f(v, k);
    line(
        w,
        &format!(
            "| `{k}`: one sample, all CPU sources ({} allocations, {} B per sample) | **{} µs** | {} | {} |",
            num(f(v, "monitor_sample_allocs"), 0),
            num(f(v, "monitor_sample_alloc_bytes"), 0),
            num(x, 2),
            goal(k),
            verdict(k, x)
        ),
    );
    let k = "monitor_cpu_fraction_at_5s";
    let x = f(v, k);
    line(
        w,
        &format!(
            "| `{k}`: the sampler thread's own CPU per tick ({} µs over {} samples, of which \
             {} µs is the timed wake-up) / 5 s | **{}** | {} | {} |",
            num(f(v, "monitor_thread_cpu_us_per_sample"), 1),
            num(f(v, "monitor_thread_samples"), 0),
            num(f(v, "idle_wakeup_cpu_us"), 1),
            models::sci(x),
            goal(k),
            verdict(k, x)
        ),
    );
    let k = "leak_detect_steps_1kib";
    let x = f(v, k);
    line(
        w,
        &format!(
            "| `{k}`: steps to find a planted 1 KiB/step leak, worst (median) | **{}** ({}) | {} | {} |",
            num(x, 0),
            num(f(v, "leak_detect_steps_1kib_median"), 0),
            goal(k),
            verdict(k, x)
        ),
    );
    let x = f(v, "leak_detect_steps_1kib_noise256k");
    line(
        w,
        &format!(
            "| `leak_detect_steps_1kib_noise256k`: same at noise SD 256 KiB, worst (median) | {} ({}) | {} (context) | {} |",
            num(x, 0),
            num(f(v, "leak_detect_steps_1kib_noise256k_median"), 0),
            goal(k),
            verdict(k, x)
        ),
    );
    let k = "leak_false_positives_10k";
    let x = f(v, k);
    line(
        w,
        &format!(
            "| `{k}`: leak verdicts over {} steady runs of 10 000 steps | **{}** | {} | {} |",
            num(f(v, "leak_steady_runs_10k"), 0),
            num(x, 0),
            goal(k),
            verdict(k, x)
        ),
    );
    md
}

/// models.json: the per-model table and the attention table by N.
fn render_models(v: &Value) -> String {
    let (bytes, num) = (models::bytes, models::num);
    let g = |k: String| f(v, &k);
    let mut md = String::new();
    let w = &mut md;
    line(
        w,
        "| model | parameters (f32) | fwd peak B=32 | fwd peak B=256 | fwd+bwd peak B=32 | \
         fwd+bwd peak B=256 | no-grad fwd B=32 | int8 parameters | int8 / f32 | \
         int8 max error / output range |",
    );
    line(w, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for m in models::MODELS {
        line(
            w,
            &format!(
                "| {m} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                bytes(g(format!("{m}_param_bytes"))),
                bytes(g(format!("{m}_fwd_peak_b32_bytes"))),
                bytes(g(format!("{m}_fwd_peak_b256_bytes"))),
                bytes(g(format!("{m}_fwd_bwd_peak_b32_bytes"))),
                bytes(g(format!("{m}_fwd_bwd_peak_b256_bytes"))),
                bytes(g(format!("{m}_fwd_nograd_peak_b32_bytes"))),
                bytes(g(format!("quant_{m}_param_bytes"))),
                num(g(format!("quant_{m}_param_bytes_ratio")), 3),
                g(format!("quant_{m}_max_err_of_range"))
                    .map_or_else(|| "–".into(), |r| format!("{:.2} %", 100.0 * r)),
            ),
        );
    }
    let shape: Vec<String> = [
        ("B=", "attn_batch"),
        ("H=", "attn_heads"),
        ("D=", "attn_head_dim"),
        ("memory-efficient block ", "attn_memeff_block"),
        ("sparse window ±", "attn_sparse_window"),
        ("global tokens ", "attn_sparse_global_tokens"),
        ("stride ", "attn_sparse_stride"),
    ]
    .iter()
    .filter_map(|(label, k)| Some(format!("{label}{}", f(v, k)?)))
    .collect();
    line(w, "");
    let mut head = "Attention, forward + backward".to_string();
    if !shape.is_empty() {
        head.push_str(&format!(" ({})", shape.join(", ")));
    }
    line(w, &format!("{head}:"));
    line(w, "");
    // The table alone: its own heading would break this document's outline,
    // and its shape line is in `head`.
    let attention = models::attention_table(v);
    let table = attention
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'));
    let mut any = false;
    for l in table {
        line(w, l);
        any = true;
    }
    if !any {
        line(
            w,
            "not measured (no `attn_*_peak_n*_bytes` keys in models.json).",
        );
    }
    md.trim_end_matches('\n').to_string() + "\n"
}

/// train.json: the configurations, the claims and targets, the budget batch
/// and the replay bytes.
fn render_train(v: &Value) -> String {
    let (mib, pct, num) = (train::mib, train::pct, train::num);
    let g = |k: &str| f(v, k);
    let mut md = String::new();
    let w = &mut md;
    line(
        w,
        &format!(
            "Batch {}, {} micro-batches of {}, {} checkpoint segments per embedder, \
             median of {} steps; resident before the step (weights, AdamW moments, batch) \
             {}. *Step peak* is what the step allocates on top.",
            num(g("batch"), 0),
            num(g("micro_batches"), 0),
            num(g("micro_batch"), 0),
            num(g("segments"), 0),
            num(g("reps"), 0),
            mib(g("baseline_resident_bytes")),
        ),
    );
    line(w, "");
    line(
        w,
        "| configuration | techniques | peak | of baseline | step peak / baseline | step ms | time / baseline | CPU / baseline |",
    );
    line(w, "|---|---|--:|--:|--:|--:|--:|--:|");
    for (name, what) in train::CONFIGS {
        let k = |s: &str| g(&format!("{name}_{s}"));
        line(
            w,
            &format!(
                "| {name} | {what} | {} | {} | {} | {} | {} | {} |",
                mib(k("peak_bytes")),
                pct(k("peak_ratio")),
                pct(k("activation_ratio")),
                num(k("step_ms"), 0),
                num(k("time_ratio"), 2),
                num(k("cpu_time_ratio"), 2),
            ),
        );
    }
    line(w, "");
    line(w, "Against the seed's claims and issue 6's targets:");
    line(w, "");
    w.push_str(&train::claims_table(v));
    line(w, "");
    match g("budget_bytes") {
        None => line(w, "Budget batch: not measured (`--skip-budget`)."),
        Some(budget) => line(
            w,
            &format!(
                "Largest batch a {} budget holds (`BatchSizer`, 85 % usable, linear fit \
                 over measured probes): baseline {}, all {}.",
                mib(Some(budget)),
                num(g("budget_batch_baseline"), 0),
                num(g("budget_batch_all"), 0),
            ),
        ),
    }
    line(w, "");
    match g("replay_transitions") {
        None => line(w, "Replay bytes: not measured (`--skip-replay`)."),
        Some(n) => {
            line(
                w,
                &format!(
                    "Replay bytes of {n:.0} transitions from gm-market's environments \
                     through the learner's schema and n-step add order:"
                ),
            );
            line(w, "");
            line(w, "| layout | bytes | of naïve |");
            line(w, "|---|--:|--:|");
            line(
                w,
                &format!(
                    "| naïve (every observation and next observation whole) | {} | 100 % |",
                    mib(g("replay_bytes_raw"))
                ),
            );
            line(
                w,
                &format!(
                    "| de-duplicated prioritized buffer (the learner's) | {} | {} |",
                    mib(g("replay_bytes_optimized")),
                    pct(g("replay_optimized_ratio"))
                ),
            );
            line(
                w,
                &format!(
                    "| de-duplicated + LZ4 on cold chunks (not the learner's default) | {} | {} |",
                    mib(g("replay_bytes_compressed")),
                    pct(g("replay_compressed_ratio"))
                ),
            );
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "# Title\n\nprose before\n\n<!-- bench:memory:begin -->\nold table\n<!-- bench:memory:end -->\n\nprose after, *kept*\n";

    #[test]
    fn replaces_only_the_block_and_keeps_the_rest() {
        let out = replace_block(DOC, "memory", "| a |\n|---|\n| 1 |\n").unwrap();
        assert!(!out.contains("old table"));
        assert!(out.contains(
            "<!-- bench:memory:begin -->\n\n| a |\n|---|\n| 1 |\n\n<!-- bench:memory:end -->\n"
        ));
        let (before, _) = DOC.split_once("<!-- bench:memory:begin -->").unwrap();
        let (_, after) = DOC.split_once("<!-- bench:memory:end -->").unwrap();
        assert!(out.starts_with(before));
        assert!(out.ends_with(after));
    }

    #[test]
    fn replacing_twice_gives_the_same_document() {
        let once = replace_block(DOC, "memory", "body\n").unwrap();
        let twice = replace_block(&once, "memory", "body\n").unwrap();
        assert_eq!(once, twice);
        // trailing or leading newlines in the body do not accumulate either
        let other = replace_block(&once, "memory", "\n\nbody\n\n\n").unwrap();
        assert_eq!(once, other);
    }

    #[test]
    fn missing_or_broken_markers_are_errors_not_edits() {
        let no_end = DOC.replace("<!-- bench:memory:end -->\n", "");
        let err = replace_block(&no_end, "memory", "x").unwrap_err();
        assert!(format!("{err:#}").contains("not closed"), "{err:#}");

        let no_begin = DOC.replace("<!-- bench:memory:begin -->\n", "");
        assert!(replace_block(&no_begin, "memory", "x").is_err());

        let swapped = DOC
            .replace("<!-- bench:memory:begin -->", "@@")
            .replace("<!-- bench:memory:end -->", "<!-- bench:memory:begin -->")
            .replace("@@", "<!-- bench:memory:end -->");
        assert!(replace_block(&swapped, "memory", "x").is_err());

        let twice = format!("{DOC}\n<!-- bench:memory:begin -->\n");
        assert!(replace_block(&twice, "memory", "x").is_err());

        let nested = DOC.replace(
            "old table\n",
            "<!-- bench:train:begin -->\n<!-- bench:train:end -->\n",
        );
        assert!(replace_block(&nested, "memory", "x").is_err());

        let inline = DOC.replace(
            "<!-- bench:memory:end -->",
            "text <!-- bench:memory:end -->",
        );
        assert!(replace_block(&inline, "memory", "x").is_err());

        assert!(replace_block(DOC, "memory", "<!-- bench:memory:end -->").is_err());
        assert!(replace_block(DOC, "train", "x").is_err());
    }

    #[test]
    fn regen_leaves_missing_areas_and_rewrites_the_rest() {
        let dir = std::env::temp_dir().join(format!("gm-xtask-regen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let doc_path = dir.join("BENCHMARKS.md");
        let doc = "intro\n<!-- bench:memory:begin -->\nold memory\n<!-- bench:memory:end -->\n\
                   middle\n<!-- bench:train:begin -->\nold train\n<!-- bench:train:end -->\nend\n";
        std::fs::write(&doc_path, doc).unwrap();
        std::fs::write(
            dir.join("memory.json"),
            r#"{"alloc_free_overhead_ns": 12.5, "monitor_sample_us": 30.0, "leak_false_positives_10k": 0}"#,
        )
        .unwrap();
        let info = RunInfo {
            date: "2000-01-02 03:04:05 UTC".into(),
            cpu: "Test CPU".into(),
            cores: 3,
            rustc: "rustc 9.9.9".into(),
            commands: vec!["cargo xtask bench memory".into()],
            notes: Vec::new(),
        };
        write_run_info(&dir, "memory", &info).unwrap();

        let outcome = regen(&doc_path, &dir, &[]).unwrap();
        assert_eq!(outcome.updated, ["memory"]);
        assert_eq!(outcome.missing, ["buffers", "models", "train", "shard"]);
        assert!(outcome.failed.is_empty());
        let out = std::fs::read_to_string(&doc_path).unwrap();
        assert!(out.contains("old train") && !out.contains("old memory"));
        assert!(out.starts_with("intro\n") && out.contains("\nmiddle\n") && out.ends_with("end\n"));
        assert!(out.contains(
            "*Measured 2000-01-02 03:04:05 UTC on Test CPU (3 cores), rustc 9.9.9, by `cargo xtask bench memory`"
        ));
        let row = |key: &str| {
            out.lines()
                .find(|l| l.contains(&format!("`{key}`")))
                .unwrap()
                .to_string()
        };
        assert!(row("alloc_free_overhead_ns").contains("**12.50 ns**"));
        assert!(row("alloc_free_overhead_ns").ends_with("| met |"));
        assert!(
            row("monitor_sample_us").contains("**30.00 µs**")
                && row("monitor_sample_us").contains("**missed**")
        );
        assert!(row("monitor_cpu_fraction_at_5s").ends_with("| not measured |"));

        // again: nothing changes
        regen(&doc_path, &dir, &[]).unwrap();
        assert_eq!(std::fs::read_to_string(&doc_path).unwrap(), out);

        // a broken block fails, names the area, and the file is not touched
        let broken = out.replace("<!-- bench:memory:end -->\n", "");
        std::fs::write(&doc_path, &broken).unwrap();
        let outcome = regen(&doc_path, &dir, &[]).unwrap();
        assert!(outcome.updated.is_empty());
        assert!(
            outcome.failed[0].starts_with("memory:"),
            "{:?}",
            outcome.failed
        );
        assert_eq!(std::fs::read_to_string(&doc_path).unwrap(), broken);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn machine_facts_come_from_an_older_report_header() {
        let buffers = "# gm-buffers vs Python replay-buffer peers\n\n\
                       2026-11-30 12:43:45 UTC · AMD EPYC (2 cores) · rustc 1.95.0 (59807616e 2026-04-14)\n";
        let i = run_info_from_md(buffers).unwrap();
        assert_eq!(i.date, "2026-11-30 12:43:45 UTC");
        assert_eq!((i.cpu.as_str(), i.cores), ("AMD EPYC", 2));
        assert_eq!(i.rustc, "rustc 1.95.0 (59807616e 2026-04-14)");
        let train = "# t\n\nMeasured 2026-11-30 15:55:05 UTC on AMD EPYC (2 cores), rustc 1.95.0 \
                     (59807616e 2026-04-14). One Double-DQN update (x) of (4 cores) no.\n";
        let i = run_info_from_md(train).unwrap();
        assert_eq!(i.date, "2026-11-30 15:55:05 UTC");
        assert_eq!((i.cpu.as_str(), i.cores), ("AMD EPYC", 2));
        assert_eq!(i.rustc, "rustc 1.95.0 (59807616e 2026-04-14)");
        assert!(run_info_from_md("# Memory toolkit benchmarks\n\n| a | b |\n").is_none());

        let h = header_line("models", None, Some("2026-11-30 14:37:00 UTC"));
        assert!(h.contains("not recorded") && h.contains("2026-11-30 14:37:00 UTC"));
        assert!(h.contains("`cargo xtask bench models`"));
    }
}
