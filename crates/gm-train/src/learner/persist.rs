//! Learner checkpoints: a directory written crash-safely and verified on
//! load.
//!
//! # Layout (format `gm-train-learner`, version 1)
//!
//! | file | holds |
//! |---|---|
//! | `online.safetensors` | the online network ([`gm_models::weights::save`]) |
//! | `target.safetensors` | the target network |
//! | `optimizer.safetensors` | AdamW moments: `m/<variable>` and `v/<variable>` (variables that never had a gradient have none) |
//! | `replay.gmr` | the prioritized buffer with its priorities and β position (gm-buffers `save`) |
//! | `manifest.json` | format and version, step counters, AdamW's step, RNG states (seed, stream, word position), the live batch size, the f16 loss scaler's state, the synchronous actor's episode-round actions, the config (the update's techniques included) and data fingerprints, in data-parallel mode the world size and rank, and the size and CRC-32 of every other file; its own body is covered by a CRC-32 too |
//!
//! A data-parallel checkpoint is this directory written by rank 0 (with the
//! full optimizer state), plus one `rank-<r>/` directory per other rank
//! holding only that rank's `replay.gmr` and a `manifest.json` (the same
//! format: its counters, RNG and actor state, `rank`, `world`), each
//! written with the same crash-safe protocol ([`rank_dir`], [`RANK_FILES`]).
//!
//! # Crash safety
//! Everything is written into a fresh sibling directory
//! (`.<name>.tmp-<pid>-<nanos>`), each file is fsynced, then the directory;
//! it is renamed into place and the parent directory fsynced. An existing
//! checkpoint at the path is first renamed aside and removed only once the
//! new one is in place. A crash leaves the old checkpoint or the new one
//! (or, between the two renames, the old one under `.<name>.old-*`), never a
//! mix. Loading checks the manifest's checksum, format and version, and
//! every file's size and CRC before reading anything, so a truncated or
//! corrupted checkpoint is an [`Error::Checkpoint`], never a panic or a
//! silently different run.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::grads::Grads;
use crate::optim::AdamW;
use crate::precision::{LossScaler, Precision};
use crate::step::StepConfig;
use crate::{Error, Result};

/// The manifest's format name.
pub(crate) const FORMAT: &str = "gm-train-learner";
/// The manifest's version.
pub(crate) const VERSION: u32 = 1;
/// Online network weights.
pub(crate) const ONLINE: &str = "online.safetensors";
/// Target network weights.
pub(crate) const TARGET: &str = "target.safetensors";
/// AdamW moments.
pub(crate) const OPTIMIZER: &str = "optimizer.safetensors";
/// The replay buffer.
pub(crate) const REPLAY: &str = "replay.gmr";
/// The manifest.
pub(crate) const MANIFEST: &str = "manifest.json";
/// The data files of a checkpoint directory (what a single process needs).
pub(crate) const MAIN_FILES: &[&str] = &[ONLINE, TARGET, OPTIMIZER, REPLAY];
/// The data files of a data-parallel rank's own directory.
pub(crate) const RANK_FILES: &[&str] = &[REPLAY];
/// The files of the main directory every data-parallel rank reads (the
/// networks and the full optimizer state; rank 0 alone reads its replay).
pub(crate) const SHARED_FILES: &[&str] = &[ONLINE, TARGET, OPTIMIZER];

/// Where rank `rank` (> 0) of a data-parallel run keeps its own state
/// inside the checkpoint `dir`.
pub(crate) fn rank_dir(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("rank-{rank}"))
}

/// A ChaCha8 stream position: seed, stream and word position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RngState {
    /// The 32-byte seed, hex.
    pub seed: String,
    pub stream: u64,
    /// The word position (u128), decimal.
    pub word_pos: String,
}

impl RngState {
    pub(crate) fn of(rng: &ChaCha8Rng) -> Self {
        Self {
            seed: rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    pub(crate) fn restore(&self, path: &Path) -> Result<ChaCha8Rng> {
        use rand::SeedableRng;
        let bad = |what: &str| corrupt(path, format!("RNG state: bad {what}"));
        if self.seed.len() != 64 {
            return Err(bad("seed"));
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16).map_err(|_| bad("seed"))?;
        }
        let pos: u128 = self.word_pos.parse().map_err(|_| bad("word position"))?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(pos);
        Ok(rng)
    }
}

/// The synchronous actor's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ActorState {
    pub env_seed: u64,
    pub vec_steps: u64,
    pub rng: RngState,
    /// Action indices of the current episode round, env-major per step.
    pub round_actions: Vec<u8>,
}

/// What a checkpoint must agree with to be resumed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Fingerprint {
    pub seed: u64,
    pub threaded: bool,
    pub num_envs: usize,
    pub n_step: usize,
    pub gamma: f64,
    pub reward_scale: f64,
    pub episode_bars: usize,
    pub cost_bps: f64,
    pub segment_steps: usize,
    /// CRC-32 of the agent config's `Debug` text.
    pub agent_crc32: u32,
    pub data_bars: usize,
    /// CRC-32 of the data's closes (little-endian f64).
    pub data_crc32: u32,
    /// The update's techniques that change its numbers; absent for the
    /// default (plain f32, whole batch, dropout on), so checkpoints written
    /// before the step was configurable still match it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<StepFingerprint>,
}

/// The parts of a [`StepConfig`] that change an update's numbers: the
/// precision (and with it the loss scaler), micro-batches (summation order
/// and dropout masks), checkpoint segments (recomputation order) and
/// dropout. The Huber threshold and clip are the learner's own fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StepFingerprint {
    pub precision: Precision,
    pub micro_batch: Option<usize>,
    pub checkpoint_segments: Option<usize>,
    pub dropout: bool,
}

impl StepFingerprint {
    /// `None` for the default step.
    pub(crate) fn of(step: &StepConfig) -> Option<Self> {
        let f = Self {
            precision: step.precision,
            micro_batch: step.micro_batch,
            checkpoint_segments: step.checkpoint.map(|c| c.segments),
            dropout: step.dropout,
        };
        let plain = Self {
            precision: Precision::F32,
            micro_batch: None,
            checkpoint_segments: None,
            dropout: true,
        };
        (f != plain).then_some(f)
    }
}

/// A file of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub crc32: u32,
}

/// Everything in the manifest but its checksum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Body {
    pub format: String,
    pub version: u32,
    pub step: u64,
    pub updates: u64,
    pub transitions: u64,
    pub episodes: u64,
    pub optimizer_step: u64,
    pub learner_rng: RngState,
    /// The live batch size (absent in checkpoints written before it could
    /// change: the config's then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// The f16 loss scaler's state (absent for f32/bf16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<LossScaler>,
    /// Rows per micro-batch when a device out-of-memory made the step
    /// halve it ([`TrainStep::grads_retrying`](crate::TrainStep::grads_retrying));
    /// absent while the step runs with the config's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batch: Option<usize>,
    pub actor: Option<ActorState>,
    pub fingerprint: Fingerprint,
    /// Data-parallel runs: the number of ranks that wrote the checkpoint
    /// (absent for a single process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world: Option<usize>,
    /// Data-parallel runs: the rank whose replay, RNG and actor state the
    /// directory holds (0 for the main directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    /// CRC-32 of the body's JSON text.
    checksum: u32,
    body: Body,
}

pub(crate) fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn io(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    corrupt(path, format!("{what}: {e}"))
}

/// Size and CRC-32 of a file.
fn digest(path: &Path) -> Result<(u64, u32)> {
    let mut f = File::open(path).map_err(|e| io(path, "open", e))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(|e| io(path, "read", e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, h.finalize()))
}

fn fsync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(path, "fsync", e))
}

fn fsync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(path, "fsync directory", e))
}

/// AdamW's moments as named tensors (`m/<var>`, `v/<var>`).
pub(crate) fn save_optimizer(opt: &AdamW, varmap: &VarMap, path: &Path) -> Result<()> {
    let names = Grads::empty(varmap)?;
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (i, (name, _, _)) in names.iter().enumerate() {
        if let Some(m) = opt.m.get(i).and_then(|m| m.as_ref()) {
            map.insert(format!("m/{name}"), m.clone());
        }
        if let Some(v) = opt.v.get(i).and_then(|v| v.as_ref()) {
            map.insert(format!("v/{name}"), v.clone());
        }
    }
    if map.is_empty() {
        // safetensors needs no tensor, but keep the file non-empty and
        // self-describing.
        map.insert(
            "empty".into(),
            Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu)?,
        );
    }
    candle_core::safetensors::save(&map, path).map_err(|e| io(path, "write optimizer state", e))
}

/// Restores AdamW's moments saved by [`save_optimizer`], onto the
/// variables' device. Reads the file one tensor at a time through
/// [`OptimizerFile`] (never the whole file into memory at once); a moment
/// whose shape is not its variable's is an [`Error::Checkpoint`], and on
/// any error `opt` is unchanged.
pub(crate) fn load_optimizer(opt: &mut AdamW, varmap: &VarMap, path: &Path) -> Result<()> {
    let names = Grads::empty(varmap)?;
    if names.len() != opt.m.len() {
        return Err(corrupt(
            path,
            "optimizer and model disagree on the variables",
        ));
    }
    let mut file = OptimizerFile::open(path)?;
    let (mut m, mut v) = (
        Vec::with_capacity(names.len()),
        Vec::with_capacity(names.len()),
    );
    for (name, var, _) in names.iter() {
        for (out, key) in [(&mut m, format!("m/{name}")), (&mut v, format!("v/{name}"))] {
            let moment = match file.entries.get(&key) {
                None => None,
                Some((shape, _)) if shape.as_slice() != var.dims() => {
                    return Err(corrupt(
                        path,
                        format!("{key} has shape {shape:?}, expected {:?}", var.dims()),
                    ))
                }
                Some(_) => {
                    let mut values = Vec::with_capacity(var.elem_count());
                    file.read_range(&key, 0, var.elem_count(), &mut values)?;
                    Some(Tensor::from_vec(values, var.shape(), var.device())?)
                }
            };
            out.push(moment);
        }
    }
    opt.m = m;
    opt.v = v;
    Ok(())
}

/// The optimizer state file of a checkpoint ([`save_optimizer`]'s
/// safetensors layout) read range by range, for
/// [`ZeroOptimizer::load_state_from`](crate::ZeroOptimizer::load_state_from):
/// only the header is parsed up front, then each requested piece of `m/<name>`
/// and `v/<name>` is read with a seek, so a data-parallel rank resuming
/// reads (and holds) only the moments it owns. The manifest has already
/// verified the file's size and CRC; a header that does not describe f32
/// tensors inside the file is still an [`Error::Checkpoint`].
pub(crate) struct OptimizerFile {
    path: PathBuf,
    file: File,
    /// Name → (shape, absolute byte offset of its data).
    entries: HashMap<String, (Vec<usize>, u64)>,
    /// Bytes of moment data read so far (the header not counted).
    pub bytes_read: u64,
}

impl OptimizerFile {
    /// Opens `path` and parses its safetensors header.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        /// The longest header accepted (candle writes a few hundred bytes
        /// per tensor).
        const MAX_HEADER: u64 = 100 << 20;
        #[derive(Deserialize)]
        struct Entry {
            dtype: String,
            shape: Vec<usize>,
            data_offsets: [u64; 2],
        }
        let mut file = File::open(path).map_err(|e| io(path, "open optimizer state", e))?;
        let file_len = file
            .metadata()
            .map_err(|e| io(path, "stat optimizer state", e))?
            .len();
        let mut len8 = [0u8; 8];
        file.read_exact(&mut len8)
            .map_err(|e| io(path, "read optimizer state header", e))?;
        let header_len = u64::from_le_bytes(len8);
        if header_len > MAX_HEADER || header_len > file_len.saturating_sub(8) {
            return Err(corrupt(
                path,
                format!("safetensors header of {header_len} bytes in a {file_len}-byte file"),
            ));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| io(path, "read optimizer state header", e))?;
        let raw: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| io(path, "parse optimizer state header", e))?;
        let data_start = 8 + header_len;
        let mut entries = HashMap::new();
        for (name, value) in raw {
            if name == "__metadata__" {
                continue;
            }
            let e: Entry = serde_json::from_value(value)
                .map_err(|e| io(path, &format!("header entry {name:?}"), e))?;
            let count: usize = e.shape.iter().product();
            let [begin, end] = e.data_offsets;
            let fits =
                begin <= end && end - begin == 4 * count as u64 && data_start + end <= file_len;
            if e.dtype != "F32" || !fits {
                return Err(corrupt(
                    path,
                    format!(
                        "header entry {name:?}: {} {:?} at bytes {begin}..{end} is not an f32 \
                         tensor inside the file",
                        e.dtype, e.shape
                    ),
                ));
            }
            entries.insert(name, (e.shape, data_start + begin));
        }
        Ok(Self {
            path: path.to_owned(),
            file,
            entries,
            bytes_read: 0,
        })
    }

    /// Appends `len` f32s of tensor `key` from element `start` to `out`.
    fn read_range(
        &mut self,
        key: &str,
        start: usize,
        len: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        use std::io::{Seek, SeekFrom};
        let (count, offset) = self
            .entries
            .get(key)
            .map(|(shape, offset)| (shape.iter().product::<usize>(), *offset))
            .ok_or_else(|| corrupt(&self.path, format!("{key} is missing")))?;
        if start + len > count {
            return Err(corrupt(
                &self.path,
                format!("{key}: elements {start}..{} of {count}", start + len),
            ));
        }
        let mut bytes = vec![0u8; 4 * len];
        self.file
            .seek(SeekFrom::Start(offset + 4 * start as u64))
            .and_then(|_| self.file.read_exact(&mut bytes))
            .map_err(|e| io(&self.path, &format!("read {key}"), e))?;
        self.bytes_read += bytes.len() as u64;
        out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        Ok(())
    }
}

impl crate::zero::StateSource for OptimizerFile {
    fn state_len(&mut self, _var: usize, name: &str) -> Result<Option<usize>> {
        let len = |key: String| {
            self.entries
                .get(&key)
                .map(|e| e.0.iter().product::<usize>())
        };
        let (m, v) = (len(format!("m/{name}")), len(format!("v/{name}")));
        match (m, v) {
            (None, None) => Ok(None),
            (Some(m), Some(v)) if m == v => Ok(Some(m)),
            (m, v) => Err(corrupt(
                &self.path,
                format!("{name}: m/ has {m:?} elements, v/ has {v:?}"),
            )),
        }
    }

    fn read(
        &mut self,
        _var: usize,
        name: &str,
        start: usize,
        len: usize,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> Result<()> {
        self.read_range(&format!("m/{name}"), start, len, m)?;
        self.read_range(&format!("v/{name}"), start, len, v)
    }
}

/// Writes a checkpoint into `dir` crash-safely: `write` fills a fresh
/// temporary directory with the data files `files` ([`MAIN_FILES`] or
/// [`RANK_FILES`]), then the manifest (`body` with the files' digests) is
/// added and the directory renamed into place.
pub(crate) fn write_checkpoint(
    dir: &Path,
    mut body: Body,
    files: &[&str],
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<u64> {
    let name = dir
        .file_name()
        .ok_or_else(|| corrupt(dir, "a checkpoint path needs a final component"))?
        .to_string_lossy()
        .into_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| io(&parent, "create parent directory", e))?;
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let tmp = parent.join(format!(".{name}.tmp-{unique}"));
    let result = (|| {
        fs::create_dir(&tmp).map_err(|e| io(&tmp, "create temporary directory", e))?;
        write(&tmp)?;
        let mut total = 0;
        body.files.clear();
        for &f in files {
            let p = tmp.join(f);
            fsync_file(&p)?;
            let (bytes, crc32) = digest(&p)?;
            total += bytes;
            body.files.push(FileEntry {
                name: f.into(),
                bytes,
                crc32,
            });
        }
        let text = manifest_text(body)?;
        let mp = tmp.join(MANIFEST);
        let mut f = File::create(&mp).map_err(|e| io(&mp, "create", e))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| io(&mp, "write", e))?;
        fsync_dir(&tmp)?;
        Ok(total + text.len() as u64)
    })();
    let total = match result {
        Ok(t) => t,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let old = parent.join(format!(".{name}.old-{unique}"));
    let had_old = dir.exists();
    if had_old {
        fs::rename(dir, &old).map_err(|e| io(dir, "move the previous checkpoint aside", e))?;
    }
    if let Err(e) = fs::rename(&tmp, dir) {
        if had_old {
            let _ = fs::rename(&old, dir);
        }
        let _ = fs::remove_dir_all(&tmp);
        return Err(io(dir, "rename into place", e));
    }
    fsync_dir(&parent)?;
    if had_old {
        let _ = fs::remove_dir_all(&old);
    }
    Ok(total)
}

fn manifest_text(body: Body) -> Result<String> {
    let inner = serde_json::to_string(&body)
        .map_err(|e| corrupt(Path::new(MANIFEST), format!("serialize: {e}")))?;
    let checksum = crc32fast::hash(inner.as_bytes());
    serde_json::to_string_pretty(&Manifest { checksum, body })
        .map_err(|e| corrupt(Path::new(MANIFEST), format!("serialize: {e}")))
}

/// Reads and verifies the manifest of `dir` and the data files `files`
/// ([`MAIN_FILES`] or [`RANK_FILES`]), which it must list.
pub(crate) fn read_checkpoint(dir: &Path, files: &[&str]) -> Result<Body> {
    let mp = dir.join(MANIFEST);
    let text = fs::read_to_string(&mp).map_err(|e| io(&mp, "read manifest", e))?;
    let m: Manifest =
        serde_json::from_str(&text).map_err(|e| io(&mp, "manifest is not valid", e))?;
    let inner = serde_json::to_string(&m.body).map_err(|e| io(&mp, "manifest", e))?;
    if crc32fast::hash(inner.as_bytes()) != m.checksum {
        return Err(corrupt(&mp, "manifest checksum mismatch"));
    }
    let b = m.body;
    if b.format != FORMAT {
        return Err(corrupt(
            &mp,
            format!("format {:?}, expected {FORMAT:?}", b.format),
        ));
    }
    if b.version != VERSION {
        return Err(corrupt(
            &mp,
            format!("version {}, this build reads {VERSION}", b.version),
        ));
    }
    for &want in files {
        let Some(f) = b.files.iter().find(|f| f.name == want) else {
            return Err(corrupt(&mp, format!("the manifest lists no {want}")));
        };
        let p = dir.join(&f.name);
        let (bytes, crc) = digest(&p)?;
        if bytes != f.bytes {
            return Err(corrupt(
                &p,
                format!("{bytes} bytes, the manifest says {} (truncated?)", f.bytes),
            ));
        }
        if crc != f.crc32 {
            return Err(corrupt(
                &p,
                format!("CRC-32 {crc:08x}, the manifest says {:08x}", f.crc32),
            ));
        }
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamWConfig;
    use crate::zero::{ZeroConfig, ZeroOptimizer};
    use candle_nn::{Init, VarBuilder};
    use gm_shard::ThreadGroup;
    use rand::{RngCore, SeedableRng};

    /// Variables a (10), b (3), c (7), d (5); AdamW moments for a, b, c
    /// with distinct values, none for d (never had a gradient).
    fn model_and_state() -> (VarMap, AdamW) {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, candle_core::DType::F32, &Device::Cpu);
        for (n, s) in [("a", 10), ("b", 3), ("c", 7), ("d", 5)] {
            vb.get_with_hints(s, n, Init::Const(0.5)).unwrap();
        }
        let mut adam = AdamW::new(AdamWConfig::default(), 4).unwrap();
        adam.step = 17;
        for (i, len) in [10usize, 3, 7].into_iter().enumerate() {
            let vals = |k: f32| (0..len).map(|j| k + i as f32 * 100.0 + j as f32).collect();
            let t = |v: Vec<f32>| Tensor::from_vec(v, len, &Device::Cpu).unwrap();
            adam.m[i] = Some(t(vals(0.25)));
            adam.v[i] = Some(t(vals(1000.5)));
        }
        (vm, adam)
    }

    /// Resuming data-parallel, each rank reads its share of the moments
    /// from the file: the shards equal those `load_state` cuts from the
    /// whole state, and the ranks together read each moment byte once.
    #[test]
    fn the_optimizer_file_hands_each_rank_only_its_share() {
        let (vm, adam) = model_and_state();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(OPTIMIZER);
        save_optimizer(&adam, &vm, &path).unwrap();
        let file_len = fs::metadata(&path).unwrap().len();
        let cfg = ZeroConfig {
            max_shard_bytes: 32,
            ..ZeroConfig::default()
        };
        let out = ThreadGroup::run(3, std::time::Duration::from_secs(30), |c| {
            let mut from_file =
                ZeroOptimizer::new(Box::new(c), &vm, AdamWConfig::default(), cfg.clone())?;
            let mut file = OptimizerFile::open(&path)?;
            from_file.load_state_from(adam.step, &mut file)?;
            let gathered = from_file.gather_state()?;
            Ok::<_, Error>((file.bytes_read, gathered))
        })
        .unwrap();
        let mut total = 0;
        for (rank, r) in out.into_iter().enumerate() {
            let (read, gathered) = r.unwrap();
            assert!(
                read < file_len / 2,
                "rank {rank} read {read} of {file_len} bytes"
            );
            total += read;
            if rank == 0 {
                let g = gathered.expect("rank 0 gathers");
                assert_eq!(g.step, 17);
                for i in 0..4 {
                    let flat = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_vec1::<f32>().unwrap());
                    assert_eq!(flat(&g.m[i]), flat(&adam.m[i]), "m[{i}]");
                    assert_eq!(flat(&g.v[i]), flat(&adam.v[i]), "v[{i}]");
                }
            }
        }
        assert_eq!(
            total,
            8 * (10 + 3 + 7),
            "every moment byte read exactly once"
        );
    }

    /// The single-process resume: every moment back, bit for bit; a file
    /// of another model is refused and leaves the optimizer as it was.
    #[test]
    fn the_whole_optimizer_state_round_trips_and_a_wrong_shape_changes_nothing() {
        let (vm, adam) = model_and_state();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(OPTIMIZER);
        save_optimizer(&adam, &vm, &path).unwrap();
        let flat = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_vec1::<f32>().unwrap());
        let mut back = AdamW::new(AdamWConfig::default(), 4).unwrap();
        load_optimizer(&mut back, &vm, &path).unwrap();
        for i in 0..4 {
            assert_eq!(flat(&back.m[i]), flat(&adam.m[i]), "m[{i}]");
            assert_eq!(flat(&back.v[i]), flat(&adam.v[i]), "v[{i}]");
        }
        // The same names with other shapes: `a` has 10 elements, not 2×5.
        let other = VarMap::new();
        let vb = VarBuilder::from_varmap(&other, candle_core::DType::F32, &Device::Cpu);
        for (n, s) in [
            ("a", vec![2, 5]),
            ("b", vec![3]),
            ("c", vec![7]),
            ("d", vec![5]),
        ] {
            vb.get_with_hints(s, n, Init::Const(0.5)).unwrap();
        }
        let err = load_optimizer(&mut back, &other, &path).unwrap_err();
        assert!(
            matches!(&err, Error::Checkpoint { reason, .. } if reason.contains("m/a has shape [10]")),
            "{err}"
        );
        assert_eq!(flat(&back.m[0]), flat(&adam.m[0]), "unchanged");
    }

    #[test]
    fn a_bad_optimizer_file_is_a_checkpoint_error() {
        let (vm, adam) = model_and_state();
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        save_optimizer(&adam, &vm, &good).unwrap();
        let bytes = fs::read(&good).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("header longer than the file", {
                let mut b = bytes.clone();
                b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                b
            }),
            ("not JSON", {
                let mut b = bytes.clone();
                b[8] = b'#';
                b
            }),
            ("data cut off", bytes[..8 + header_len + 16].to_vec()),
        ];
        for (what, b) in cases {
            let p = dir.path().join("bad");
            fs::write(&p, b).unwrap();
            assert!(
                matches!(OptimizerFile::open(&p), Err(Error::Checkpoint { .. })),
                "{what}"
            );
        }
        // A piece beyond a tensor, or of a tensor that is not there.
        let mut f = OptimizerFile::open(&good).unwrap();
        let mut out = Vec::new();
        assert!(f.read_range("m/a", 8, 3, &mut out).is_err());
        assert!(f.read_range("m/zz", 0, 1, &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn rng_state_round_trips_mid_stream() {
        let mut a = ChaCha8Rng::seed_from_u64(9);
        for _ in 0..13 {
            a.next_u32();
        }
        let s = RngState::of(&a);
        let mut b = s.restore(Path::new("x")).unwrap();
        for _ in 0..50 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let bad = RngState {
            seed: "zz".into(),
            ..s
        };
        assert!(matches!(
            bad.restore(Path::new("x")),
            Err(Error::Checkpoint { .. })
        ));
    }
}
