//! Crash-safe persistence: `save(path)` / `load(path)` for both buffers.
//!
//! # Format (version 1, little-endian)
//! ```text
//! "GMREPLAY" u32 version
//! section*   = u8 tag, u64 length, payload, u32 CRC-32 of the payload
//!   1 header : kind, schema, config, scalar state, PER parameters
//!   2 episode-end bitset
//!   3 region : per chunk u8 state (0 empty, 1 raw + chunk bytes,
//!              2 compressed + u32 length + image), one per column in order
//!   4 priorities (prioritized buffers): capacity x f64
//!   255 end  : empty payload
//! ```
//! Saving writes a temporary file next to the target, fsyncs it, renames it
//! over the target and fsyncs the directory: a crash leaves either the old
//! file or the new one, never a mix. Loading checks the magic, version,
//! every section's CRC and length, and every structural invariant before it
//! returns a buffer; it never modifies the file.

use crate::config::{BufferConfig, StorageMode};
use crate::error::{Error, Result};
use crate::prioritized::{Eviction, PerConfig, PrioritizedReplayBuffer};
use crate::region::{Chunk, Region};
use crate::schema::{DType, FieldKind, FieldSpec, Schema};
use crate::storage::{Order, Storage, StorageState};
use crate::ReplayBuffer;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"GMREPLAY";
const VERSION: u32 = 1;
const TAG_HEADER: u8 = 1;
const TAG_EPISODES: u8 = 2;
const TAG_REGION: u8 = 3;
const TAG_PRIORITIES: u8 = 4;
const TAG_END: u8 = 255;
const KIND_UNIFORM: u8 = 0;
const KIND_PRIORITIZED: u8 = 1;
/// Largest position or counter a file may record (2^62: no run gets there).
const MAX_COUNTER: u64 = 1 << 62;
/// Largest storage a file may describe: more than any address space maps.
const MAX_STORAGE_BYTES: u64 = 1 << 47;

// ------------------------------------------------------------------ encoding

#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
    }
}

struct Dec<'a> {
    buf: &'a [u8],
    path: &'a Path,
}

impl<'a> Dec<'a> {
    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            path: self.path.to_owned(),
            reason: reason.into(),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(self.err("header is shorter than its fields"));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    /// A position or counter that later adds increment: bounded far below
    /// `u64::MAX`, so a crafted value cannot make an add overflow.
    fn counter(&mut self, what: &str) -> Result<u64> {
        let v = self.u64()?;
        if v > MAX_COUNTER {
            return Err(self.err(format!("{what} = {v} is out of range")));
        }
        Ok(v)
    }
    fn usize(&mut self, what: &str, max: u64) -> Result<usize> {
        let v = self.u64()?;
        if v > max {
            return Err(self.err(format!("{what} = {v} exceeds {max}")));
        }
        Ok(v as usize)
    }
    fn str(&mut self) -> Result<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| self.err("a name is not UTF-8"))
    }
}

/// A section writer that computes the CRC as it streams.
struct Out {
    w: BufWriter<File>,
    path: PathBuf,
}

impl Out {
    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.w.write_all(b).map_err(|e| Error::Io {
            path: self.path.clone(),
            source: e,
        })
    }
    fn section(&mut self, tag: u8, payload: &[u8]) -> Result<()> {
        self.write(&[tag])?;
        self.write(&(payload.len() as u64).to_le_bytes())?;
        self.write(payload)?;
        self.write(&crc32fast::hash(payload).to_le_bytes())
    }
    fn region(&mut self, r: &Region) -> Result<()> {
        let cb = r.chunk_bytes();
        let len: u64 = (0..r.chunk_count())
            .map(|c| match r.state(c) {
                Chunk::Empty => 1,
                Chunk::Raw { .. } => 1 + cb as u64,
                Chunk::Compressed { data, .. } => 5 + data.len() as u64,
            })
            .sum();
        self.write(&[TAG_REGION])?;
        self.write(&len.to_le_bytes())?;
        let mut crc = crc32fast::Hasher::new();
        for c in 0..r.chunk_count() {
            let mut put = |out: &mut Self, b: &[u8]| {
                crc.update(b);
                out.write(b)
            };
            match r.state(c) {
                Chunk::Empty => put(self, &[0])?,
                Chunk::Raw { .. } => {
                    put(self, &[1])?;
                    put(self, r.chunk_raw(c))?;
                }
                Chunk::Compressed { data, .. } => {
                    put(self, &[2])?;
                    put(self, &(data.len() as u32).to_le_bytes())?;
                    put(self, data)?;
                }
            }
        }
        self.write(&crc.finalize().to_le_bytes())
    }
}

struct In {
    r: BufReader<File>,
    path: PathBuf,
    left: u64,
}

impl In {
    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<()> {
        if (buf.len() as u64) > self.left {
            return Err(self.err(format!(
                "file is truncated ({} bytes missing)",
                buf.len() as u64 - self.left
            )));
        }
        self.r.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.err("file is truncated")
            } else {
                Error::Io {
                    path: self.path.clone(),
                    source: e,
                }
            }
        })?;
        self.left -= buf.len() as u64;
        Ok(())
    }
    fn u64(&mut self) -> Result<u64> {
        let mut b = [0; 8];
        self.read(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    /// Reads a section header, expecting `tag`; returns the payload length.
    fn begin(&mut self, tag: u8, what: &str) -> Result<u64> {
        let mut t = [0u8];
        self.read(&mut t)?;
        if t[0] != tag {
            return Err(self.err(format!(
                "expected the {what} section (tag {tag}), found tag {}",
                t[0]
            )));
        }
        let len = self.u64()?;
        if len > self.left {
            return Err(self.err(format!(
                "file is truncated (or its length field corrupt): the {what} section claims \
                 {len} bytes, the file has {} left",
                self.left
            )));
        }
        Ok(len)
    }
    fn end(&mut self, crc: u32, what: &str) -> Result<()> {
        let mut b = [0; 4];
        self.read(&mut b)?;
        if u32::from_le_bytes(b) != crc {
            return Err(self.err(format!("checksum mismatch in the {what} section")));
        }
        Ok(())
    }
    fn section(&mut self, tag: u8, what: &str, max: u64) -> Result<Vec<u8>> {
        let len = self.begin(tag, what)?;
        if len > max {
            return Err(self.err(format!("{what} section of {len} bytes exceeds {max}")));
        }
        let mut v = vec![0; len as usize];
        self.read(&mut v)?;
        self.end(crc32fast::hash(&v), what)?;
        Ok(v)
    }
    fn region(&mut self, r: &mut Region, index: usize, scratch: &mut Vec<u8>) -> Result<()> {
        let what = format!("column {index}");
        let mut left = self.begin(TAG_REGION, &what)?;
        let cb = r.chunk_bytes();
        let mut crc = crc32fast::Hasher::new();
        let mut raw = vec![0u8; cb];
        let short = |i: &Self| i.err(format!("{what} section is shorter than its chunks"));
        for c in 0..r.chunk_count() {
            let mut st = [0u8];
            if left < 1 {
                return Err(short(self));
            }
            self.read(&mut st)?;
            crc.update(&st);
            left -= 1;
            match st[0] {
                0 => {}
                1 => {
                    if left < cb as u64 {
                        return Err(short(self));
                    }
                    self.read(&mut raw)?;
                    crc.update(&raw);
                    left -= cb as u64;
                    r.load_raw_chunk(c, &raw)?;
                }
                2 => {
                    let mut lb = [0u8; 4];
                    if left < 4 {
                        return Err(short(self));
                    }
                    self.read(&mut lb)?;
                    crc.update(&lb);
                    let n = u32::from_le_bytes(lb) as u64;
                    if n > cb as u64 || left < 4 + n {
                        return Err(
                            self.err(format!("{what}: compressed chunk {c} claims {n} bytes"))
                        );
                    }
                    let mut data = vec![0u8; n as usize];
                    self.read(&mut data)?;
                    crc.update(&data);
                    left -= 4 + n;
                    // Decompression is checked too, so even a file with a
                    // valid CRC cannot plant an undecodable image.
                    r.load_compressed_chunk(c, data.into_boxed_slice(), scratch)
                        .map_err(|e| self.err(format!("{what}: {e}")))?;
                }
                s => return Err(self.err(format!("{what}: chunk {c} has unknown state {s}"))),
            }
        }
        if left != 0 {
            return Err(self.err(format!("{what} section has {left} bytes after its chunks")));
        }
        self.end(crc.finalize(), &what)
    }
}

// ------------------------------------------------------------------ header

fn encode_header(e: &mut Enc, kind: u8, st: &Storage, per: Option<(&PerConfig, u64)>) {
    e.u8(kind);
    let schema = st.schema();
    e.u32(schema.fields().len() as u32);
    for f in schema.fields() {
        e.str(f.name());
        e.u8(f.dtype().code());
        match f.kind() {
            FieldKind::Plain => e.u8(0),
            FieldKind::Observation { window } => {
                e.u8(if f.shape().first() == Some(&window) && window > 1 {
                    2
                } else {
                    1
                });
            }
        }
        e.u32(f.shape().len() as u32);
        for &d in f.shape() {
            e.u64(d as u64);
        }
    }
    let c = st.config();
    e.u64(c.capacity as u64);
    e.u64(c.rows_per_stream.map_or(u64::MAX, |r| r as u64));
    e.u64(c.chunk_bytes as u64);
    match c.storage {
        StorageMode::Auto { threshold_bytes } => {
            e.u8(0);
            e.u64(threshold_bytes)
        }
        StorageMode::Memory => e.u8(1),
        StorageMode::File => e.u8(2),
    }
    e.str(
        &c.storage_dir
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    e.u64(c.byte_budget.unwrap_or(u64::MAX));
    e.f64(c.compress_at);
    e.u8(match st.order() {
        Order::Fifo => 0,
        Order::Slots => 1,
    });
    let s = st.state();
    e.u64(s.head);
    e.u64(s.len);
    e.u8(s.fresh_episode as u8);
    e.u64(s.last_slot);
    for v in s.counters {
        e.u64(v);
    }
    e.u32(s.streams.len() as u32);
    for v in &s.streams {
        for &x in v {
            e.u64(x);
        }
    }
    if let Some((p, samples)) = per {
        e.f64(p.alpha);
        e.f64(p.beta);
        e.f64(p.beta_final);
        e.u64(p.beta_steps);
        e.f64(p.eps);
        e.u8(match p.eviction {
            Eviction::Fifo => 0,
            Eviction::LowestPriority => 1,
        });
        e.u64(samples);
    }
}

/// Bytes of one item of a field (`None` on overflow).
fn item_bytes(dtype: DType, shape: &[usize]) -> Option<u64> {
    shape
        .iter()
        .try_fold(dtype.size() as u64, |a, &d| a.checked_mul(d as u64))
}

/// An upper bound of the bytes the storage for `schema` and `config` maps
/// (`None` on overflow): per slot every item, plus the rows of each
/// observation stream.
fn storage_bound(schema: &Schema, config: &BufferConfig) -> Option<u64> {
    let cap = config.capacity as u64;
    schema.fields().iter().try_fold(0u64, |total, f| {
        let item = item_bytes(f.dtype(), f.shape())?;
        let bytes = match f.kind() {
            FieldKind::Plain => cap.checked_mul(item)?,
            FieldKind::Observation { window } => {
                let rows = match config.rows_per_stream {
                    Some(r) => r as u64,
                    None => cap.checked_mul(2)?.checked_add(4 * window as u64)?,
                };
                let row_bytes = item / window.max(1) as u64;
                rows.checked_mul(row_bytes)?
                    .checked_add(cap.checked_mul(6)?)?
            }
        };
        total.checked_add(bytes)
    })
}

struct Header {
    kind: u8,
    schema: Schema,
    config: BufferConfig,
    order: Order,
    state: StorageState,
    per: Option<(PerConfig, u64)>,
}

fn decode_header(d: &mut Dec<'_>) -> Result<Header> {
    let kind = d.u8()?;
    if kind != KIND_UNIFORM && kind != KIND_PRIORITIZED {
        return Err(d.err(format!("unknown buffer kind {kind}")));
    }
    let nf = d.u32()? as usize;
    if nf == 0 || nf > 4096 {
        return Err(d.err(format!("{nf} fields")));
    }
    let mut fields = Vec::with_capacity(nf);
    for _ in 0..nf {
        let name = d.str()?;
        let dtype = DType::from_code(d.u8()?)
            .ok_or_else(|| d.err(format!("field {name:?}: unknown dtype")))?;
        let k = d.u8()?;
        let nd = d.u32()? as usize;
        if nd > 16 {
            return Err(d.err(format!("field {name:?}: {nd} dimensions")));
        }
        let shape = (0..nd)
            .map(|_| d.usize("dimension", 1 << 32))
            .collect::<Result<Vec<_>>>()?;
        // Checked here: the schema and storage compute sizes unchecked.
        if item_bytes(dtype, &shape).is_none_or(|b| b > MAX_STORAGE_BYTES) {
            return Err(d.err(format!(
                "field {name:?}: shape {shape:?} of {dtype} is too large"
            )));
        }
        fields.push(match k {
            0 => FieldSpec::plain(name, dtype, &shape),
            1 => FieldSpec::obs(name, dtype, &shape),
            2 => FieldSpec::window(name, dtype, &shape),
            _ => return Err(d.err(format!("field {name:?}: unknown kind {k}"))),
        });
    }
    let schema =
        Schema::new(fields).map_err(|e| d.err(format!("recorded schema is invalid: {e}")))?;
    let capacity = d.usize("capacity", u32::MAX as u64)?;
    let rows = d.u64()?;
    let chunk_bytes = d.usize("chunk_bytes", 1 << 24)?;
    let storage = match d.u8()? {
        0 => StorageMode::Auto {
            threshold_bytes: d.u64()?,
        },
        1 => StorageMode::Memory,
        2 => StorageMode::File,
        m => return Err(d.err(format!("unknown storage mode {m}"))),
    };
    let dir = d.str()?;
    let budget = d.u64()?;
    let compress_at = d.f64()?;
    let config = BufferConfig {
        capacity,
        rows_per_stream: (rows != u64::MAX).then_some(rows as usize),
        chunk_bytes,
        storage,
        storage_dir: (!dir.is_empty()).then(|| PathBuf::from(dir)),
        byte_budget: (budget != u64::MAX).then_some(budget),
        compress_at,
    };
    config
        .validate()
        .map_err(|e| d.err(format!("recorded config is invalid: {e}")))?;
    if storage_bound(&schema, &config).is_none_or(|b| b > MAX_STORAGE_BYTES) {
        return Err(d.err(format!(
            "the recorded schema needs more than {MAX_STORAGE_BYTES} bytes for {capacity} \
             transitions"
        )));
    }
    let order = match d.u8()? {
        0 => Order::Fifo,
        1 => Order::Slots,
        o => return Err(d.err(format!("unknown order {o}"))),
    };
    let head = d.counter("head")?;
    let len = d.u64()?;
    let fresh_episode = d.u8()? != 0;
    let last_slot = d.u64()?;
    let mut counters = [0u64; 5];
    for c in &mut counters {
        *c = d.counter("a statistics counter")?;
    }
    let ns = d.u32()? as usize;
    if ns > nf {
        return Err(d.err(format!("{ns} streams for {nf} fields")));
    }
    let mut streams = Vec::with_capacity(ns);
    for _ in 0..ns {
        let mut v = [0u64; 5];
        for x in &mut v {
            *x = d.counter("a stream counter")?;
        }
        streams.push(v);
    }
    let state = StorageState {
        head,
        len,
        fresh_episode,
        last_slot,
        counters,
        streams,
    };
    let per = if kind == KIND_PRIORITIZED {
        let p = PerConfig {
            alpha: d.f64()?,
            beta: d.f64()?,
            beta_final: d.f64()?,
            beta_steps: d.u64()?,
            eps: d.f64()?,
            eviction: match d.u8()? {
                0 => Eviction::Fifo,
                1 => Eviction::LowestPriority,
                e => return Err(d.err(format!("unknown eviction {e}"))),
            },
        };
        p.validate()
            .map_err(|e| d.err(format!("recorded priority config is invalid: {e}")))?;
        let samples = d.counter("sample calls")?;
        Some((p, samples))
    } else {
        None
    };
    // The order follows from the kind: FIFO for uniform buffers, slot order
    // exactly for lowest-priority eviction.
    let slots = match &per {
        None => false,
        Some((p, _)) => p.eviction == Eviction::LowestPriority,
    };
    if slots != (order == Order::Slots) {
        return Err(d.err(format!(
            "recorded order {order:?} does not match a {} buffer",
            match &per {
                None => "uniform".to_owned(),
                Some((p, _)) => format!("prioritized {:?}-eviction", p.eviction),
            }
        )));
    }
    if !d.buf.is_empty() {
        return Err(d.err(format!(
            "header has {} unexpected trailing bytes",
            d.buf.len()
        )));
    }
    Ok(Header {
        kind,
        schema,
        config,
        order,
        state,
        per,
    })
}

// ------------------------------------------------------------------ save/load

fn save_storage(
    path: &Path,
    kind: u8,
    st: &Storage,
    per: Option<(&PerConfig, u64, &[f64])>,
) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| io(std::io::Error::other("path has no file name")))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{nanos}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io)?;
        let mut out = Out {
            w: BufWriter::with_capacity(1 << 20, file),
            path: tmp.clone(),
        };
        out.write(MAGIC)?;
        out.write(&VERSION.to_le_bytes())?;
        let mut h = Enc::default();
        encode_header(&mut h, kind, st, per.map(|(p, s, _)| (p, s)));
        out.section(TAG_HEADER, &h.0)?;
        out.section(TAG_EPISODES, bytemuck::cast_slice(st.episode_bits()))?;
        for r in st.regions() {
            out.region(r)?;
        }
        if let Some((_, _, leaves)) = per {
            out.section(TAG_PRIORITIES, bytemuck::cast_slice(leaves))?;
        }
        out.section(TAG_END, &[])?;
        let file = out.w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(io)?;
        // Make the rename itself durable.
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn load_storage(
    path: &Path,
    storage_override: Option<StorageMode>,
) -> Result<(Header, Storage, Option<Vec<f64>>)> {
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?
        .len();
    let mut inp = In {
        r: BufReader::with_capacity(1 << 20, file),
        path: path.to_owned(),
        left: size,
    };
    let mut magic = [0u8; 12];
    if size < 12 {
        return Err(inp.err("file is too short to be a gm-buffers file"));
    }
    inp.read(&mut magic)?;
    if &magic[..8] != MAGIC {
        return Err(inp.err("not a gm-buffers file (bad magic)"));
    }
    let version = u32::from_le_bytes(magic[8..].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(inp.err(format!(
            "file format version {version}, this build reads version {VERSION}"
        )));
    }
    let hb = inp.section(TAG_HEADER, "header", 1 << 24)?;
    let header = decode_header(&mut Dec { buf: &hb, path })?;
    // The episode bitset (and priorities) alone take this many bytes: a
    // file too short for them is rejected before any storage is mapped.
    let cap = header.config.capacity as u64;
    let needed = cap.div_ceil(64) * 8 + if header.per.is_some() { 8 * cap } else { 0 };
    if needed > inp.left {
        return Err(inp.err(format!(
            "file is truncated: a buffer of {cap} transitions needs at least {needed} more \
             bytes, the file has {} left",
            inp.left
        )));
    }
    let mut config = header.config.clone();
    if let Some(m) = storage_override {
        config.storage = m;
    }
    let mut st =
        Storage::new(header.schema.clone(), config, header.order).map_err(|e| match e {
            Error::Storage { .. } => e,
            e => inp.err(format!("recorded buffer cannot be rebuilt: {e}")),
        })?;
    let bits = inp.section(TAG_EPISODES, "episode", 1 << 32)?;
    if bits.len() != st.episode_bits().len() * 8 {
        return Err(inp.err("episode section does not match the capacity"));
    }
    st.episode_bits_mut().copy_from_slice(
        &bits
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
            .collect::<Vec<_>>(),
    );
    let mut scratch = Vec::new();
    for (i, r) in st.regions_mut().enumerate() {
        inp.region(r, i, &mut scratch)?;
    }
    st.restore_state(&header.state)
        .map_err(|reason| inp.err(format!("inconsistent state: {reason}")))?;
    st.check_bools().map_err(|reason| inp.err(reason))?;
    let leaves = if header.kind == KIND_PRIORITIZED {
        let b = inp.section(TAG_PRIORITIES, "priority", 1 << 36)?;
        if b.len() != st.capacity() * 8 {
            return Err(inp.err("priority section does not match the capacity"));
        }
        let leaves: Vec<f64> = b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8")))
            .collect();
        // As `update_priorities` guarantees: the sum of all stays finite.
        let limit = f64::MAX / (2.0 * st.capacity() as f64);
        for (slot, &v) in leaves.iter().enumerate() {
            let live = st.is_live(slot);
            if !(v.is_finite() && v >= 0.0 && v <= limit)
                || (live && v == 0.0 && header.per.as_ref().is_some_and(|p| p.0.eps > 0.0))
                || (!live && v != 0.0)
            {
                return Err(inp.err(format!(
                    "priority {v} of slot {slot} is invalid (live: {live})"
                )));
            }
        }
        Some(leaves)
    } else {
        None
    };
    let end = inp.section(TAG_END, "end", 0)?;
    debug_assert!(end.is_empty());
    if inp.left != 0 {
        return Err(inp.err(format!(
            "{} unexpected bytes after the end section",
            inp.left
        )));
    }
    Ok((header, st, leaves))
}

impl ReplayBuffer {
    /// Writes the buffer to `path` crash-safely (temp file, fsync, rename).
    /// On error the previous file at `path`, if any, is untouched.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        save_storage(path.as_ref(), KIND_UNIFORM, self.storage(), None)
    }

    /// Loads a buffer saved by [`save`](Self::save), with its recorded
    /// storage placement. A truncated, corrupted or foreign file is an
    /// [`Error::Corrupt`] naming what is wrong.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_with(path, None)
    }

    /// Like [`load`](Self::load), choosing the storage placement.
    pub fn load_with(path: impl AsRef<Path>, storage: Option<StorageMode>) -> Result<Self> {
        let path = path.as_ref();
        let (h, st, _) = load_storage(path, storage)?;
        if h.kind != KIND_UNIFORM {
            return Err(Error::Corrupt {
                path: path.to_owned(),
                reason: "this file holds a prioritized buffer; use PrioritizedReplayBuffer::load"
                    .into(),
            });
        }
        Ok(ReplayBuffer::from_storage(st))
    }
}

impl PrioritizedReplayBuffer {
    /// Writes the buffer, priorities and β schedule position to `path`
    /// crash-safely. On error the previous file is untouched.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        save_storage(
            path.as_ref(),
            KIND_PRIORITIZED,
            self.storage(),
            Some((
                self.per_config(),
                self.sample_calls(),
                self.priority_leaves(),
            )),
        )
    }

    /// Loads a buffer saved by [`save`](Self::save).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_with(path, None)
    }

    /// Like [`load`](Self::load), choosing the storage placement.
    pub fn load_with(path: impl AsRef<Path>, storage: Option<StorageMode>) -> Result<Self> {
        let path = path.as_ref();
        let (h, st, leaves) = load_storage(path, storage)?;
        let (Some((per, samples)), Some(leaves)) = (h.per, leaves) else {
            return Err(Error::Corrupt {
                path: path.to_owned(),
                reason: "this file holds a uniform buffer; use ReplayBuffer::load".into(),
            });
        };
        PrioritizedReplayBuffer::from_parts(st, per, &leaves, samples)
    }
}
