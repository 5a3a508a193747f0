//! [`BufferConfig`]: capacity, storage placement, chunking and the memory
//! budget that drives compression, with the documented defaults.

use crate::error::{Error, Result};
use std::path::PathBuf;

/// Where a buffer's columns live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageMode {
    /// Anonymous memory while the buffer's reserved storage is at most
    /// `threshold_bytes`, a memory-mapped file above it (default 100 MB).
    Auto {
        /// Reserved bytes above which storage moves to a file.
        threshold_bytes: u64,
    },
    /// Always anonymous memory.
    Memory,
    /// Always a memory-mapped file.
    File,
}

impl Default for StorageMode {
    fn default() -> Self {
        StorageMode::Auto {
            threshold_bytes: 100_000_000,
        }
    }
}

/// Configuration shared by [`ReplayBuffer`](crate::ReplayBuffer) and
/// [`PrioritizedReplayBuffer`](crate::PrioritizedReplayBuffer).
#[derive(Debug, Clone, PartialEq)]
pub struct BufferConfig {
    /// Transitions the buffer holds (at least 1).
    pub capacity: usize,
    /// Rows kept per observation stream. `None` = `2 * capacity + 4 * window`,
    /// enough for episodes of any length above ~1 step per window row. Rows
    /// behind the oldest live transition are released, so a generous value
    /// costs address space, not memory. When a stream runs out of rows (very
    /// short episodes with long windows), the oldest transitions are evicted
    /// early and counted in [`BufferStats::evicted_early`](crate::BufferStats).
    pub rows_per_stream: Option<usize>,
    /// Bytes per storage chunk: the unit of compression, release and file
    /// growth. Power of two, 4 KiB..=16 MiB. Default 16 KiB.
    pub chunk_bytes: usize,
    /// Memory or file placement. Default: file above 100 MB reserved.
    pub storage: StorageMode,
    /// Directory for file-backed storage. `None` = `std::env::temp_dir()`.
    /// The file is created unlinked (nothing is left behind after a crash).
    pub storage_dir: Option<PathBuf>,
    /// Resident-byte budget of the buffer (`None` = no budget). When the
    /// buffer's resident bytes reach `compress_at` of it, cold chunks are
    /// LZ4-compressed, oldest first.
    pub byte_budget: Option<u64>,
    /// Fraction of `byte_budget` at which compression starts. Default 0.8.
    pub compress_at: f64,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            capacity: 100_000,
            rows_per_stream: None,
            chunk_bytes: 16 << 10,
            storage: StorageMode::default(),
            storage_dir: None,
            byte_budget: None,
            compress_at: 0.8,
        }
    }
}

impl BufferConfig {
    /// The default config with `capacity` transitions.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    /// Checks every field; the error names the key, the value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        if self.capacity == 0 {
            return Err(Error::config(
                "capacity",
                self.capacity,
                "at least 1 transition",
            ));
        }
        if self.capacity > u32::MAX as usize {
            return Err(Error::config(
                "capacity",
                self.capacity,
                format!("at most {}", u32::MAX),
            ));
        }
        if !self.chunk_bytes.is_power_of_two() || !(4096..=16 << 20).contains(&self.chunk_bytes) {
            return Err(Error::config(
                "chunk_bytes",
                self.chunk_bytes,
                "a power of two in 4096..=16777216",
            ));
        }
        if let Some(r) = self.rows_per_stream {
            if r > u32::MAX as usize {
                return Err(Error::config(
                    "rows_per_stream",
                    r,
                    format!("at most {}", u32::MAX),
                ));
            }
        }
        if self.byte_budget == Some(0) {
            return Err(Error::config("byte_budget", 0, "None or more than 0 bytes"));
        }
        if !(self.compress_at > 0.0 && self.compress_at <= 1.0) {
            return Err(Error::config(
                "compress_at",
                self.compress_at,
                "a fraction in (0, 1]",
            ));
        }
        Ok(())
    }

    pub(crate) fn dir(&self) -> PathBuf {
        self.storage_dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_that_overflow_are_config_errors() {
        let schema = crate::Schema::new(vec![crate::FieldSpec::plain(
            "x",
            crate::DType::F64,
            &[1 << 40],
        )])
        .unwrap();
        let cfg = BufferConfig {
            capacity: 1 << 30,
            ..BufferConfig::default()
        };
        let e = crate::ReplayBuffer::new(schema, cfg).unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
    }

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_key() {
        BufferConfig::default().validate().unwrap();
        let cases: [(BufferConfig, &str); 4] = [
            (BufferConfig::with_capacity(0), "capacity"),
            (
                BufferConfig {
                    chunk_bytes: 5000,
                    ..Default::default()
                },
                "chunk_bytes",
            ),
            (
                BufferConfig {
                    compress_at: 1.5,
                    ..Default::default()
                },
                "compress_at",
            ),
            (
                BufferConfig {
                    byte_budget: Some(0),
                    ..Default::default()
                },
                "byte_budget",
            ),
        ];
        for (c, key) in cases {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
    }
}
