//! `grandmodel buffer inspect FILE`: what a saved gm-buffers file holds.
//! The file is fully verified (magic, version, every section's CRC and
//! structure) by gm-buffers' own loader; a corrupt file is an
//! [`Error::BufferFile`] naming what is wrong.

use std::io::Read;
use std::path::{Path, PathBuf};

use gm_buffers::{BufferStats, PrioritizedReplayBuffer, ReplayBuffer};
use gm_core::ByteSize;
use serde::Serialize;

use crate::error::{Error, Result};

/// What a saved buffer holds.
#[derive(Debug, Clone, Serialize)]
pub struct BufferInfo {
    /// The file.
    pub path: PathBuf,
    /// Its size on disk.
    pub file_bytes: u64,
    /// The format's magic (`GMREPLAY`).
    pub magic: String,
    /// The format version.
    pub version: u32,
    /// `uniform` or `prioritized`.
    pub kind: &'static str,
    /// Live transitions.
    pub len: usize,
    /// Transition slots.
    pub capacity: usize,
    /// Transitions added over the buffer's life.
    pub adds: u64,
    /// Fields: (name, dtype, shape, kind).
    pub fields: Vec<(String, String, Vec<usize>, String)>,
    /// Bytes of one transition as passed in.
    pub logical_bytes_per_transition: usize,
    /// Bytes resident once loaded (heap + anonymous + file pages).
    pub resident_bytes: u64,
    /// Logical bytes of the live transitions over the resident bytes.
    pub dedup_and_compression_ratio: f64,
    /// Chunks held compressed.
    pub compressed_chunks: usize,
    /// Raw bytes of those chunks.
    pub compressed_raw_bytes: u64,
    /// Their compressed bytes.
    pub compressed_bytes: u64,
    /// Raw over compressed bytes of the compressed chunks (1.0: none).
    pub compression_ratio: f64,
    /// Per observation stream: (name, rows received per row stored).
    pub dedup: Vec<(String, f64)>,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::BufferFile {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Reads and verifies the buffer file at `path`.
pub fn inspect_buffer(path: &Path) -> Result<BufferInfo> {
    let mut f = std::fs::File::open(path).map_err(|e| bad(path, e.to_string()))?;
    let file_bytes = f.metadata().map_err(|e| bad(path, e.to_string()))?.len();
    let mut head = [0u8; 12];
    f.read_exact(&mut head).map_err(|_| {
        bad(
            path,
            format!("{file_bytes} bytes is too short for a gm-buffers file (12-byte header)"),
        )
    })?;
    if &head[..8] != b"GMREPLAY" {
        return Err(bad(path, "not a gm-buffers file (no GMREPLAY magic)"));
    }
    let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    drop(f);
    let (kind, stats) = match PrioritizedReplayBuffer::load(path) {
        Ok(b) => ("prioritized", (b.stats(), fields(b.schema()))),
        Err(gm_buffers::Error::Corrupt { reason, .. }) if reason.contains("uniform buffer") => {
            let b = ReplayBuffer::load(path).map_err(|e| bad(path, strip(e)))?;
            ("uniform", (b.stats(), fields(b.schema())))
        }
        Err(e) => return Err(bad(path, strip(e))),
    };
    let (s, fields): (BufferStats, _) = stats;
    let resident = s.memory.resident_bytes();
    Ok(BufferInfo {
        path: path.to_owned(),
        file_bytes,
        magic: "GMREPLAY".into(),
        version,
        kind,
        len: s.len,
        capacity: s.capacity,
        adds: s.adds,
        fields,
        logical_bytes_per_transition: s.logical_bytes_per_transition,
        resident_bytes: resident,
        dedup_and_compression_ratio: (s.len * s.logical_bytes_per_transition) as f64
            / resident.max(1) as f64,
        compressed_chunks: s.compressed_chunks,
        compressed_raw_bytes: s.compressed_raw_bytes,
        compressed_bytes: s.compressed_bytes,
        compression_ratio: s.compression_ratio(),
        dedup: s
            .streams
            .iter()
            .map(|st| (st.name.clone(), st.dedup_ratio()))
            .collect(),
    })
}

/// gm-buffers' message without its own "corrupt file <path>:" prefix.
fn strip(e: gm_buffers::Error) -> String {
    match e {
        gm_buffers::Error::Corrupt { reason, .. } => reason,
        other => other.to_string(),
    }
}

fn fields(schema: &gm_buffers::Schema) -> Vec<(String, String, Vec<usize>, String)> {
    schema
        .fields()
        .iter()
        .map(|f| {
            (
                f.name().to_string(),
                format!("{:?}", f.dtype()),
                f.shape().to_vec(),
                format!("{:?}", f.kind()),
            )
        })
        .collect()
}

impl BufferInfo {
    /// Human-readable text.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "file       {}\nsize       {} ({} bytes)\nformat     {} version {}\nkind       {}\n",
            self.path.display(),
            ByteSize(self.file_bytes),
            self.file_bytes,
            self.magic,
            self.version,
            self.kind
        );
        s.push_str(&format!(
            "transitions {} live of {} slots ({} added in all)\n",
            self.len, self.capacity, self.adds
        ));
        s.push_str(&format!(
            "bytes      {} per transition as passed in; {} resident once loaded ({:.2}x smaller than {} logical)\n",
            ByteSize(self.logical_bytes_per_transition as u64),
            ByteSize(self.resident_bytes),
            self.dedup_and_compression_ratio,
            ByteSize((self.len * self.logical_bytes_per_transition) as u64)
        ));
        s.push_str(&format!(
            "compression {} chunks, {} -> {} ({:.2}x)\n",
            self.compressed_chunks,
            ByteSize(self.compressed_raw_bytes),
            ByteSize(self.compressed_bytes),
            self.compression_ratio
        ));
        for (name, r) in &self.dedup {
            s.push_str(&format!(
                "dedup      {name}: {r:.2} rows received per row stored\n"
            ));
        }
        s.push_str("fields\n");
        for (n, d, shape, k) in &self.fields {
            s.push_str(&format!("  {n:<20} {d:<5} {shape:?} {k}\n"));
        }
        s
    }
}
