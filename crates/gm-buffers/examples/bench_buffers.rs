//! `cargo xtask bench buffers` runs this: the replay_peers.py measurements
//! (chunked and single add, uniform sample, prioritized sample + update,
//! resident bytes per stored transition) for gm-buffers' layouts, each in a
//! fresh process so RSS deltas are clean, written as flat JSON.
//!
//! Usage: bench_buffers [--json PATH] [--quick] [--case NAME]

#[path = "../benches/support/pool.rs"]
mod pool;

use gm_buffers::{
    BufferConfig, Eviction, PerConfig, PrioritizedReplayBuffer, ReplayBuffer, Schema, StorageMode,
};
use pool::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};
use std::time::Instant;

const CASES: [&str; 6] = [
    "raw",
    "raw-mmap",
    "dedup",
    "dedup-lz4",
    "per-dedup",
    "per-raw",
];

fn mem() -> (u64, u64) {
    // (RssAnon, RssFile) in bytes
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (get("RssAnon:"), get("RssFile:"))
}

/// Median items/s over 3 windows of `secs` (after 3 warm-up calls), as replay_peers.py.
fn timed_rate(mut call: impl FnMut(), items: usize, secs: f64, mut after: impl FnMut()) -> f64 {
    for _ in 0..3 {
        call();
    }
    after();
    let mut rates = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        let mut n = 0u64;
        loop {
            call();
            n += 1;
            let dt = t0.elapsed().as_secs_f64();
            if dt >= secs {
                rates.push(n as f64 * items as f64 / dt);
                break;
            }
        }
        after();
    }
    rates.sort_by(|a, b| a.total_cmp(b));
    rates[1]
}

enum Buf {
    Uniform(Box<ReplayBuffer>),
    Per(Box<PrioritizedReplayBuffer>),
}

impl Buf {
    fn new(schema: Schema, cfg: BufferConfig, per: bool) -> Self {
        if per {
            let pc = PerConfig {
                alpha: 0.6,
                beta: 0.4,
                eps: 1e-4,
                eviction: Eviction::Fifo,
                ..PerConfig::default()
            };
            Buf::Per(Box::new(
                PrioritizedReplayBuffer::new(schema, cfg, pc).expect("buffer"),
            ))
        } else {
            Buf::Uniform(Box::new(ReplayBuffer::new(schema, cfg).expect("buffer")))
        }
    }
    fn add_batch(&mut self, cols: &[gm_buffers::Column<'_>]) {
        match self {
            Buf::Uniform(b) => b.add_batch(cols).map(|_| ()),
            Buf::Per(b) => b.add_batch(cols).map(|_| ()),
        }
        .expect("add")
    }
    fn mark(&mut self) {
        match self {
            Buf::Uniform(b) => b.mark_episode_end(),
            Buf::Per(b) => b.mark_episode_end(),
        }
    }
    fn len(&self) -> usize {
        match self {
            Buf::Uniform(b) => b.len(),
            Buf::Per(b) => b.len(),
        }
    }
    fn stats(&self) -> gm_buffers::BufferStats {
        match self {
            Buf::Uniform(b) => b.stats(),
            Buf::Per(b) => b.stats(),
        }
    }
}

fn run_case(name: &str, secs: f64) -> Map<String, Value> {
    let pool = Pool::new(0);
    let dedup = name.contains("dedup");
    let per = name.starts_with("per");
    let schema = if dedup { dedup_schema() } else { raw_schema() };
    let mut cfg = config(CAP);
    if name == "raw-mmap" {
        cfg.storage = StorageMode::File;
    }
    if name == "dedup-lz4" {
        // A budget below what the de-duplicated buffer needs raw (~14 MB), so
        // cold chunks are compressed as the buffer fills; 4 KiB chunks make a
        // random sample decompress less (measured: 16 KiB chunks sample ~2x
        // slower at the same bytes per transition).
        cfg.byte_budget = Some(10_000_000);
        cfg.chunk_bytes = 4096;
    }
    let cols = |s: usize, n: usize| -> Vec<gm_buffers::Column<'_>> {
        if dedup {
            pool.dedup_cols(s, n).to_vec()
        } else {
            pool.raw_cols(s, n).to_vec()
        }
    };
    // Warm-up twin (1024 slots) so lazy initialisation is not charged to the buffer.
    {
        let mut warm = Buf::new(
            schema.clone(),
            BufferConfig {
                capacity: 1024,
                ..cfg.clone()
            },
            per,
        );
        for _ in 0..8 {
            warm.add_batch(&cols(0, B));
        }
    }
    let m0 = mem();
    let mut buf = Buf::new(schema, cfg, per);
    let mb = mem();
    let mut cur = Cursor::default();
    let add = |buf: &mut Buf, cur: &mut Cursor, n: usize| {
        let (s, end) = cur.take(n);
        buf.add_batch(&cols(s, n));
        if end {
            buf.mark();
        }
    };
    let t0 = Instant::now();
    let mut n = 0;
    while n < CAP {
        add(&mut buf, &mut cur, B);
        n += B;
    }
    let fill = n as f64 / t0.elapsed().as_secs_f64();
    let m1 = mem();
    let stored = buf.len();
    let st = buf.stats();
    let mut r = Map::new();
    r.insert("case".into(), json!(name));
    r.insert("stored".into(), json!(stored));
    r.insert("fill256_per_s".into(), json!(fill));
    r.insert(
        "rss_at_build_MiB".into(),
        json!((mb.0 + mb.1).saturating_sub(m0.0 + m0.1) as f64 / 1048576.0),
    );
    r.insert(
        "bytes_per_tr_anon".into(),
        json!(m1.0.saturating_sub(m0.0) as f64 / stored as f64),
    );
    r.insert(
        "bytes_per_tr_file".into(),
        json!(m1.1.saturating_sub(m0.1) as f64 / stored as f64),
    );
    r.insert(
        "bytes_per_tr_reported".into(),
        json!(st.bytes_per_transition()),
    );
    r.insert("compression_ratio".into(), json!(st.compression_ratio()));
    r.insert("compressed_chunks".into(), json!(st.compressed_chunks));
    r.insert("evicted_early".into(), json!(st.evicted_early));
    for s in &st.streams {
        r.insert(format!("dedup_ratio_{}", s.name), json!(s.dedup_ratio()));
    }
    // Steady-state adds (buffer full, overwriting).
    r.insert(
        "add256_per_s".into(),
        json!(timed_rate(|| add(&mut buf, &mut cur, B), B, secs, || {})),
    );
    let pad = |buf: &mut Buf, cur: &mut Cursor| {
        while !cur.0.is_multiple_of(B) {
            add(buf, cur, 1);
        }
    };
    // add1: one transition per call, padded back to a chunk boundary between windows.
    {
        let mut rate = Vec::new();
        for _ in 0..3 {
            let t0 = Instant::now();
            let mut k = 0u64;
            while t0.elapsed().as_secs_f64() < secs {
                for _ in 0..64 {
                    add(&mut buf, &mut cur, 1);
                }
                k += 64;
            }
            rate.push(k as f64 / t0.elapsed().as_secs_f64());
            pad(&mut buf, &mut cur);
        }
        rate.sort_by(|a, b| a.total_cmp(b));
        r.insert("add1_per_s".into(), json!(rate[1]));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    match &mut buf {
        Buf::Uniform(b) => {
            let mut batch = b.new_batch();
            r.insert(
                "sample_per_s".into(),
                json!(timed_rate(
                    || b.sample_into(&mut batch, B, &mut rng).expect("sample"),
                    B,
                    secs,
                    || {}
                )),
            );
            r.insert(
                "sample_alloc_per_s".into(),
                json!(timed_rate(
                    || drop(b.sample(B, &mut rng).expect("sample")),
                    B,
                    secs,
                    || {}
                )),
            );
            if name == "dedup-lz4" {
                let (h, m) = batch.cache_stats();
                r.insert(
                    "lz4_cache_hit_rate".into(),
                    json!(h as f64 / (h + m).max(1) as f64),
                );
            }
        }
        Buf::Per(b) => {
            let mut batch = b.new_batch();
            r.insert(
                "sample_per_s".into(),
                json!(timed_rate(
                    || b.sample_into(&mut batch, B, &mut rng).expect("sample"),
                    B,
                    secs,
                    || {}
                )),
            );
            let mut k = 0usize;
            let prio = pool.prio.clone();
            let rate = timed_rate(
                || {
                    b.sample_into(&mut batch, B, &mut rng).expect("sample");
                    let p = &prio[(k & 63) * B..((k & 63) + 1) * B];
                    b.update_priorities(batch.indices(), p).expect("update");
                    k += 1;
                },
                B,
                secs,
                || {},
            );
            r.insert("per_sample_update_per_s".into(), json!(rate));
        }
    }
    r
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let quick = args.iter().any(|a| a == "--quick");
    let secs = if quick { 0.3 } else { 0.6 };
    if let Some(case) = arg("--case") {
        let r = run_case(&case, secs);
        println!("RESULT {}", Value::Object(r));
        return;
    }
    let json_path = arg("--json").unwrap_or_else(|| "target/bench/buffers.json".into());
    let exe = std::env::current_exe().expect("current exe");
    let mut cases = Map::new();
    for case in CASES {
        let t0 = Instant::now();
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["--case", case]);
        if quick {
            cmd.arg("--quick");
        }
        let out = cmd.output().expect("run case");
        let line = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("RESULT ").map(str::to_owned));
        match line.and_then(|l| serde_json::from_str::<Value>(&l).ok()) {
            Some(v) => {
                eprintln!("[{case}] {:.1}s ok", t0.elapsed().as_secs_f64());
                cases.insert(case.into(), v);
            }
            None => {
                eprintln!("[{case}] FAILED: {}", String::from_utf8_lossy(&out.stderr));
                std::process::exit(1);
            }
        }
    }
    let get = |c: &str, k: &str| {
        cases
            .get(c)
            .and_then(|v| v.get(k))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let bytes = |c: &str| {
        let a = get(c, "bytes_per_tr_anon").as_f64().unwrap_or(0.0);
        let f = get(c, "bytes_per_tr_file").as_f64().unwrap_or(0.0);
        json!(a + f)
    };
    let flat = json!({
        "add1_per_s": get("dedup", "add1_per_s"),
        "add256_per_s": get("dedup", "add256_per_s"),
        "sample_per_s": get("dedup", "sample_per_s"),
        "per_sample_update_per_s": get("per-dedup", "per_sample_update_per_s"),
        "bytes_per_transition_raw": bytes("raw"),
        "bytes_per_transition_dedup": bytes("dedup"),
        "bytes_per_transition_dedup_lz4": bytes("dedup-lz4"),
        "compression_ratio": get("dedup-lz4", "compression_ratio"),
        "sample_lz4_per_s": get("dedup-lz4", "sample_per_s"),
        "raw_add1_per_s": get("raw", "add1_per_s"),
        "raw_add256_per_s": get("raw", "add256_per_s"),
        "raw_sample_per_s": get("raw", "sample_per_s"),
        "per_sample_per_s": get("per-dedup", "sample_per_s"),
        "per_raw_sample_update_per_s": get("per-raw", "per_sample_update_per_s"),
        "transition_logical_bytes": LOGICAL_BYTES,
        "capacity": CAP,
        "batch": B,
        "cases": Value::Object(cases),
    });
    if let Some(dir) = std::path::Path::new(&json_path).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&flat).expect("json"),
    )
    .expect("write json");
    println!(
        "{}",
        serde_json::to_string_pretty(&flat)
            .expect("json")
            .lines()
            .take(16)
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!("written {json_path}");
}
