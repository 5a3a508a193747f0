//! [`BufferStats`]: what a buffer holds and what its memory techniques
//! achieved (de-duplication per stream, compression ratio, early evictions).

use crate::storage::Storage;
use gm_core::MemoryUsage;
use std::path::PathBuf;

/// De-duplication of one observation stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamStats {
    /// Field name.
    pub name: String,
    /// Rows per observation.
    pub window: usize,
    /// Bytes per row.
    pub row_bytes: usize,
    /// Rows written since creation (or the last `clear`).
    pub rows_stored: u64,
    /// Rows the caller passed in (2 windows per add: obs and next).
    pub rows_received: u64,
}

impl StreamStats {
    /// Rows received per row stored (1.0 = no sharing; 2·window = ideal
    /// sliding by one row).
    pub fn dedup_ratio(&self) -> f64 {
        if self.rows_stored == 0 {
            1.0
        } else {
            self.rows_received as f64 / self.rows_stored as f64
        }
    }
}

/// A snapshot of a buffer's contents and memory.
#[derive(Debug, Clone, PartialEq)]
pub struct BufferStats {
    /// Live transitions.
    pub len: usize,
    /// Transition slots.
    pub capacity: usize,
    /// Transitions added since creation (or the last `clear`).
    pub adds: u64,
    /// Transitions evicted before their slot was needed, because an
    /// observation stream ran out of rows (see `rows_per_stream`).
    pub evicted_early: u64,
    /// Bytes of one transition as the caller passes it.
    pub logical_bytes_per_transition: usize,
    /// Memory held now.
    pub memory: MemoryUsage,
    /// Per observation stream.
    pub streams: Vec<StreamStats>,
    /// Chunks held compressed.
    pub compressed_chunks: usize,
    /// Raw bytes of the compressed chunks.
    pub compressed_raw_bytes: u64,
    /// Bytes of their compressed images.
    pub compressed_bytes: u64,
    /// Compression sweeps run.
    pub compress_sweeps: u64,
    /// Chunks handed back because no live transition used them.
    pub chunks_released: u64,
    /// Directory of the backing file, if storage is file-backed.
    pub file_dir: Option<PathBuf>,
}

impl BufferStats {
    /// Raw bytes per compressed byte over the compressed chunks (1.0 when
    /// nothing is compressed).
    pub fn compression_ratio(&self) -> f64 {
        if self.compressed_bytes == 0 {
            1.0
        } else {
            self.compressed_raw_bytes as f64 / self.compressed_bytes as f64
        }
    }

    /// Resident bytes (heap + anonymous + file pages) per live transition.
    pub fn bytes_per_transition(&self) -> f64 {
        let m = &self.memory;
        (m.heap_bytes + m.anon_bytes + m.file_bytes) as f64 / self.len.max(1) as f64
    }
}

impl Storage {
    pub(crate) fn stats(&self) -> BufferStats {
        let (compressed_chunks, compressed_raw_bytes, compressed_bytes) = self.compression();
        let streams =
            self.streams()
                .iter()
                .zip(
                    self.schema().fields().iter().filter(|f| {
                        f.window_len() > 0 && !matches!(f.kind(), crate::FieldKind::Plain)
                    }),
                )
                .map(|(s, f)| StreamStats {
                    name: f.name().to_owned(),
                    window: s.window(),
                    row_bytes: s.row_bytes(),
                    rows_stored: s.rows_appended(),
                    rows_received: self.counters.adds * 2 * s.window() as u64,
                })
                .collect();
        BufferStats {
            len: self.len(),
            capacity: self.capacity(),
            adds: self.counters.adds,
            evicted_early: self.counters.evicted_early,
            logical_bytes_per_transition: self.schema().transition_bytes(),
            memory: self.memory_usage(),
            streams,
            compressed_chunks,
            compressed_raw_bytes,
            compressed_bytes,
            compress_sweeps: self.counters.compress_sweeps,
            chunks_released: self.counters.chunks_released,
            file_dir: self.backing_dir().map(|p| p.to_owned()),
        }
    }
}
