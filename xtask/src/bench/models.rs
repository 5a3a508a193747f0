//! `cargo xtask bench models`: runs gm-models' memory examples in release
//! mode (`model_memory`: parameters, forward and forward+backward peaks,
//! int8 quantization; `attention_memory`: the attention kernels' peaks by
//! sequence length), merges their last-line JSON into
//! `target/bench/models.json` (flat keys) and writes `models.md` with the
//! per-model table, the quantization table, the per-layer Q8_0 vs
//! per-channel comparison and the attention peak table by N.
//!
//! An example that is missing or fails does not stop the others: what was
//! measured is still written, the report names what is missing, and the
//! command then exits with an error.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;

use super::{parse_last_json, write_reports};
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use crate::{cargo, display_cmd, project_root};

/// The crate whose examples this bench runs.
const CRATE: &str = "gm-models";

/// Its examples; each prints one JSON object on its last stdout line.
const EXAMPLES: &[&str] = &["model_memory", "attention_memory"];

/// The models of `model_memory`, in table order.
pub(crate) const MODELS: &[&str] = &["structure", "tactical", "regime", "lvn", "heads"];

pub(crate) fn run(args: &[String], dir: &Path) -> Result<()> {
    if let Some(a) = args.first() {
        bail!("unknown argument `{a}` for `bench models` (it takes none)");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json_path = dir.join("models.json");
    let md_path = dir.join("models.md");
    for stale in [&json_path, &md_path] {
        if stale.exists() {
            std::fs::remove_file(stale).with_context(|| format!("removing {}", stale.display()))?;
        }
    }
    let examples_dir = project_root().join("crates").join(CRATE).join("examples");
    let mut flat = Map::new();
    let mut commands = Vec::new();
    let mut missing = Vec::new();
    for example in EXAMPLES {
        let source = examples_dir.join(format!("{example}.rs"));
        if !source.exists() {
            let msg = format!(
                "example `{example}` is missing ({} does not exist)",
                source.display()
            );
            eprintln!("\nWARNING: {msg}; continuing without it");
            missing.push(msg);
            continue;
        }
        let mut cmd = cargo();
        cmd.args(["run", "--release", "-q", "-p", CRATE, "--example", example]);
        commands.push(display_cmd(&cmd));
        println!("\n==> {CRATE}: {example}\n$ {}", display_cmd(&cmd));
        // Its tables (stderr) show live; the JSON (stdout) is captured.
        let out = cmd
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {CRATE} {example}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let msg = format!(
                "example `{example}` failed ({}; its stderr is above)",
                out.status
            );
            eprintln!("\nWARNING: {msg}; continuing without it");
            missing.push(msg);
            continue;
        }
        match parse_last_json(&stdout) {
            Some(obj) => flat.extend(obj),
            None => {
                let msg = format!("example `{example}` printed no JSON object on stdout");
                eprintln!("\nWARNING: {msg}; continuing without it");
                missing.push(msg);
            }
        }
    }
    let value = Value::Object(flat);
    let md = render(&value, &commands, &missing);
    write_reports(&json_path, &md_path, &value, &md)?;
    if !missing.is_empty() {
        bail!(
            "the report is incomplete: {} (what was measured is written)",
            missing.join("; ")
        );
    }
    Ok(())
}

/// A byte count in binary units (`812 B`, `17.0 KiB`, `2.37 MiB`,
/// `2.90 GiB`); `-` when absent.
pub(crate) fn bytes(v: Option<f64>) -> String {
    const KIB: f64 = 1024.0;
    match v {
        None => "-".into(),
        Some(b) if b < KIB => format!("{b:.0} B"),
        Some(b) if b < KIB * KIB => format!("{:.1} KiB", b / KIB),
        Some(b) if b < KIB * KIB * KIB => format!("{:.2} MiB", b / (KIB * KIB)),
        Some(b) => format!("{:.2} GiB", b / (KIB * KIB * KIB)),
    }
}

/// A plain number with `digits` decimals (`-` when absent).
pub(crate) fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

/// A small error in scientific notation (`-` when absent).
pub(crate) fn sci(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.2e}"))
}

/// The markdown report.
fn render(v: &Value, commands: &[String], missing: &[String]) -> String {
    let get = |k: String| v.get(&k).and_then(Value::as_f64);
    let mut md = String::from("# gm-models: memory and int8 quantization\n\n");
    if !missing.is_empty() {
        md.push_str("**Incomplete run**:\n\n");
        for m in missing {
            md.push_str(&format!("- {m}\n"));
        }
        md.push('\n');
    }

    md.push_str(
        "## Per model (f32, CPU, default configs)\n\n\
         Parameters as stored; peaks are the heap high-water mark above what \
         was live before the pass (gm-leak's counting allocator), dropout off, \
         backward of a scalar loss. The f32 forward keeps candle's autograd \
         graph (the parameters are variables); *no-grad* holds the same \
         weights as plain tensors.\n\n\
         | model | parameters | fwd peak B=32 | fwd peak B=256 | fwd+bwd peak B=32 | fwd+bwd peak B=256 | no-grad fwd peak B=32 | no-grad fwd peak B=256 | int8 parameters | int8 / f32 |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for m in MODELS {
        md.push_str(&format!(
            "| {m} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            bytes(get(format!("{m}_param_bytes"))),
            bytes(get(format!("{m}_fwd_peak_b32_bytes"))),
            bytes(get(format!("{m}_fwd_peak_b256_bytes"))),
            bytes(get(format!("{m}_fwd_bwd_peak_b32_bytes"))),
            bytes(get(format!("{m}_fwd_bwd_peak_b256_bytes"))),
            bytes(get(format!("{m}_fwd_nograd_peak_b32_bytes"))),
            bytes(get(format!("{m}_fwd_nograd_peak_b256_bytes"))),
            bytes(get(format!("quant_{m}_param_bytes"))),
            num(get(format!("quant_{m}_param_bytes_ratio")), 3),
        ));
    }

    md.push_str(
        "\n## int8 quantization (inference)\n\n\
         Default rule: per-channel int8 (i8 weights + an f32 scale per output \
         row) for every layer with `in ≥ 2`; biases and layer norms f32. \
         Errors are the largest over both outputs at B=32: absolute, relative \
         to max |f32 output|, and relative to the output's range. \
         *prefer-q8_0* is the alternative rule (Q8_0 wherever `in % 32 == 0`). \
         The int8 forward peaks are for a copy quantized from plain-tensor \
         weights (as loaded for inference); *from VarMap*: quantized from the \
         training model (the copy's weights and layer norms are detached \
         snapshots, so the two should match).\n\n\
         | model | int8 parameters | ratio | max abs err | max rel err | err / range | int8 fwd peak B=32 | int8 fwd peak B=256 | from VarMap B=32 | from VarMap B=256 | fwd ms B=32 f32 / no-grad / int8 | prefer-q8_0 bytes | prefer-q8_0 err / range |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for m in MODELS {
        md.push_str(&format!(
            "| {m} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} | {} |\n",
            bytes(get(format!("quant_{m}_param_bytes"))),
            num(get(format!("quant_{m}_param_bytes_ratio")), 3),
            sci(get(format!("quant_{m}_max_abs_err"))),
            sci(get(format!("quant_{m}_max_rel_err"))),
            sci(get(format!("quant_{m}_max_err_of_range"))),
            bytes(get(format!("quant_{m}_fwd_peak_b32_bytes"))),
            bytes(get(format!("quant_{m}_fwd_peak_b256_bytes"))),
            bytes(get(format!("quant_{m}_fwd_peak_from_varmap_b32_bytes"))),
            bytes(get(format!("quant_{m}_fwd_peak_from_varmap_b256_bytes"))),
            num(get(format!("{m}_fwd_b32_ms")), 2),
            num(get(format!("{m}_fwd_nograd_b32_ms")), 2),
            num(get(format!("quant_{m}_fwd_b32_ms")), 2),
            bytes(get(format!("quant_q8pref_{m}_param_bytes"))),
            sci(get(format!("quant_q8pref_{m}_max_err_of_range"))),
        ));
    }

    // Per-layer comparison: keys qlayer_{in}x{out}_m{m}_{scheme}_{what}.
    let layers: BTreeSet<(u64, u64, u64)> = v
        .as_object()
        .into_iter()
        .flat_map(|o| o.keys())
        .filter_map(|k| {
            let rest = k.strip_prefix("qlayer_")?.strip_suffix("_f32_us")?;
            let (dims, m) = rest.split_once("_m")?;
            let (i, o) = dims.split_once('x')?;
            Some((i.parse().ok()?, o.parse().ok()?, m.parse().ok()?))
        })
        .collect();
    if !layers.is_empty() {
        md.push_str(
            "\n## Per layer: Q8_0 vs per-channel int8\n\n\
             Every layer shape of the models where both apply, at the rows it \
             sees at B=32. Errors relative to the f32 output (max / RMS); time \
             best of 10; *kept* = heap the first call left behind.\n\n\
             | in→out | rows | f32 µs | q8_0 bytes | q8_0 max err | q8_0 rms err | q8_0 µs | q8_0 kept | int8 bytes | int8 max err | int8 rms err | int8 µs | int8 kept |\n\
             |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
        );
        for (i, o, m) in layers {
            let key = |s: &str| format!("qlayer_{i}x{o}_m{m}_{s}");
            let mut row = format!("| {i}→{o} | {m} | {} ", num(get(key("f32_us")), 0));
            for s in ["q8_0", "int8_per_channel"] {
                row.push_str(&format!(
                    "| {} | {} | {} | {} | {} ",
                    bytes(get(key(&format!("{s}_bytes")))),
                    sci(get(key(&format!("{s}_max_err")))),
                    sci(get(key(&format!("{s}_rms_err")))),
                    num(get(key(&format!("{s}_us"))), 0),
                    bytes(get(key(&format!("{s}_retained_bytes")))),
                ));
            }
            row.push_str("|\n");
            md.push_str(&row);
        }
    }

    md.push_str(&attention_table(v));

    md.push_str("\n## Commands\n\n```sh\ncargo xtask bench models\n");
    for c in commands {
        md.push_str(c);
        md.push('\n');
    }
    md.push_str("```\n");
    md
}

/// The attention peak table by N from `attn_{kind}_peak_n{N}_bytes` (and
/// `attn_{kind}_fwd_bwd_n{N}_ms` where present), kinds as columns.
pub(crate) fn attention_table(v: &Value) -> String {
    let mut kinds: Vec<String> = Vec::new();
    let mut ns: BTreeSet<u64> = BTreeSet::new();
    for k in v.as_object().into_iter().flat_map(|o| o.keys()) {
        let Some(rest) = k
            .strip_prefix("attn_")
            .and_then(|r| r.strip_suffix("_bytes"))
        else {
            continue;
        };
        let Some((kind, n)) = rest.split_once("_peak_n") else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        // `attn_dense_fwd_peak_n48_bytes` is a forward-only peak: skip.
        if kind.contains('_') {
            continue;
        }
        if !kinds.iter().any(|x| x == kind) {
            kinds.push(kind.to_string());
        }
        ns.insert(n);
    }
    if kinds.is_empty() {
        return "\n## Attention peak by N\n\nnot measured (no `attn_*_peak_n*_bytes` keys: \
                is the `attention_memory` example there?)\n"
            .into();
    }
    // Dense first, as the reference.
    kinds.sort_by_key(|k| (k != "dense", k.clone()));
    let get = |k: String| v.get(&k).and_then(Value::as_f64);
    let mut md = String::from("\n## Attention peak by N (forward + backward)\n\n");
    let cfg: Vec<String> = ["batch", "heads", "head_dim"]
        .iter()
        .filter_map(|c| Some(format!("{c} {}", get(format!("attn_{c}"))?)))
        .collect();
    if !cfg.is_empty() {
        md.push_str(&format!("Shape: {}.\n\n", cfg.join(", ")));
    }
    let timed = kinds.iter().any(|k| {
        ns.iter()
            .any(|n| get(format!("attn_{k}_fwd_bwd_n{n}_ms")).is_some())
    });
    md.push_str("| N |");
    for k in &kinds {
        md.push_str(&format!(" {k} peak |"));
    }
    if timed {
        for k in &kinds {
            md.push_str(&format!(" {k} ms |"));
        }
    }
    md.push_str("\n|--:|");
    let cols = if timed { 2 * kinds.len() } else { kinds.len() };
    md.push_str(&"--:|".repeat(cols));
    md.push('\n');
    for n in &ns {
        md.push_str(&format!("| {n} |"));
        for k in &kinds {
            md.push_str(&format!(
                " {} |",
                bytes(get(format!("attn_{k}_peak_n{n}_bytes")))
            ));
        }
        if timed {
            for k in &kinds {
                md.push_str(&format!(
                    " {} |",
                    num(get(format!("attn_{k}_fwd_bwd_n{n}_ms")), 1)
                ));
            }
        }
        md.push('\n');
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_last_json_object_line() {
        let out = "table\n{\"a\": 1}\nnoise\n{\"b\": 2.5}\n";
        let m = parse_last_json(out).unwrap();
        assert_eq!(m.get("b").and_then(Value::as_f64), Some(2.5));
        assert!(parse_last_json("no json\n[1, 2]\n").is_none());
    }

    #[test]
    fn bytes_use_binary_units() {
        assert_eq!(bytes(None), "-");
        assert_eq!(bytes(Some(812.0)), "812 B");
        assert_eq!(bytes(Some(17408.0)), "17.0 KiB");
        assert_eq!(bytes(Some(2_484_224.0)), "2.37 MiB");
        assert_eq!(bytes(Some(3.0 * 1024.0 * 1024.0 * 1024.0)), "3.00 GiB");
    }

    fn sample() -> Value {
        serde_json::json!({
            "structure_param_bytes": 2_484_224,
            "structure_fwd_peak_b32_bytes": 117_545_000,
            "structure_fwd_peak_b256_bytes": 939_700_000u64,
            "structure_fwd_bwd_peak_b32_bytes": 177_000_000,
            "structure_fwd_bwd_peak_b256_bytes": 1_401_000_000u64,
            "quant_structure_param_bytes": 652_932,
            "quant_structure_param_bytes_ratio": 0.2628,
            "quant_structure_max_abs_err": 0.005971,
            "quant_structure_max_rel_err": 0.006033,
            "quant_structure_max_err_of_range": 0.005093,
            "structure_fwd_b32_ms": 266.7,
            "lvn_param_bytes": 1600,
            "qlayer_128x128_m1536_f32_us": 1306.0,
            "qlayer_128x128_m1536_q8_0_bytes": 17920,
            "qlayer_128x128_m1536_int8_per_channel_bytes": 17408,
            "qlayer_512x128_m1536_f32_us": 3972.0,
            "qlayer_512x128_m1536_q8_0_retained_bytes": 69632,
            "attn_dense_peak_n512_bytes": 50_000_000,
            "attn_dense_peak_n48_bytes": 600_000,
            "attn_memeff_peak_n48_bytes": 200_000,
            "attn_memeff_peak_n512_bytes": 2_000_000,
            "attn_dense_fwd_peak_n48_bytes": 1,
            "attn_sparse_peak_n512_bytes": 1_500_000,
            "attn_batch": 1,
            "attn_heads": 4,
        })
    }

    #[test]
    fn report_has_the_model_quantization_and_layer_tables() {
        let md = render(&sample(), &["cargo run x".into()], &[]);
        assert!(!md.contains("Incomplete"));
        let row = md
            .lines()
            .find(|l| l.starts_with("| structure | 2.37 MiB"))
            .expect("structure row");
        assert!(
            row.contains("| 112.10 MiB | 896.17 MiB | 168.80 MiB | 1.30 GiB |"),
            "{row}"
        );
        assert!(row.ends_with("| 637.6 KiB | 0.263 |"), "{row}");
        // Missing keys render as "-", not as zeros.
        assert!(md.lines().any(|l| l.starts_with("| tactical | - | - |")));
        assert!(md.contains("| 1.6 KiB |") || md.contains("| 1600 B |"));
        let q = md
            .lines()
            .find(|l| l.starts_with("| structure | 637.6 KiB | 0.263 | 5.97e-3"))
            .expect("quantization row");
        assert!(q.contains("| 6.03e-3 | 5.09e-3 |"), "{q}");
        assert!(q.contains("| 266.70 / - / - |"), "{q}");
        // Layers sorted by (in, out, rows); Q8_0's kept copy is shown.
        let l128 = md.find("| 128→128 | 1536 | 1306 |").expect("layer row");
        let l512 = md.find("| 512→128 | 1536 | 3972 |").expect("layer row");
        assert!(l128 < l512);
        assert!(md[l128..].lines().next().unwrap().contains("| 17.5 KiB |"));
        assert!(md[l512..].lines().next().unwrap().contains("| 68.0 KiB |"));
        assert!(md.contains("cargo run x"));
    }

    #[test]
    fn attention_table_orders_n_numerically_with_dense_first() {
        let md = render(&sample(), &[], &[]);
        let at = md
            .find("## Attention peak by N")
            .expect("attention section");
        let t = &md[at..];
        assert!(t.contains("Shape: batch 1, heads 4."), "{t}");
        assert!(
            t.contains("| N | dense peak | memeff peak | sparse peak |"),
            "{t}"
        );
        let n48 = t
            .find("| 48 | 585.9 KiB | 195.3 KiB | - |")
            .expect("N=48 row");
        let n512 = t
            .find("| 512 | 47.68 MiB | 1.91 MiB | 1.43 MiB |")
            .expect("N=512 row");
        assert!(n48 < n512, "48 before 512, not lexically");
        // The forward-only key is not a kind of its own.
        assert!(!t.contains("dense_fwd"));
    }

    #[test]
    fn missing_examples_are_named_and_the_rest_is_kept() {
        let mut v = sample();
        v.as_object_mut()
            .unwrap()
            .retain(|k, _| !k.starts_with("attn_"));
        let missing = ["example `attention_memory` is missing (x.rs does not exist)".to_string()];
        let md = render(&v, &[], &missing);
        assert!(md.starts_with("# gm-models"));
        assert!(md.contains("**Incomplete run**"));
        assert!(md.contains("- example `attention_memory` is missing"));
        assert!(md.contains("not measured (no `attn_*_peak_n*_bytes` keys"));
        assert!(md.contains("| structure | 2.37 MiB"));
    }
}
