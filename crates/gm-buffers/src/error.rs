//! The crate's one error type. Every variant carries enough context to act on
//! (which field, which index, which path, bytes wanted vs available).

use std::path::PathBuf;

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in gm-buffers. Bad input is always an `Err`,
/// never a panic, and a rejected call leaves the buffer unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range.
    #[error("invalid config: {key} = {value}: {allowed}")]
    Config {
        /// The config key (`capacity`, `chunk_bytes`, ...).
        key: &'static str,
        /// The rejected value, printed.
        value: String,
        /// What is allowed, in words.
        allowed: String,
    },
    /// The schema itself is malformed (duplicate names, empty shape, ...).
    #[error("invalid schema: {0}")]
    Schema(String),
    /// The number of input columns does not match the schema.
    #[error("expected {expected} input columns ({names}), got {got}")]
    ColumnCount {
        /// Columns the schema asks for.
        expected: usize,
        /// Columns given.
        got: usize,
        /// The expected column names, in order.
        names: String,
    },
    /// An input column has the wrong element type.
    #[error("column {field:?}: expected dtype {expected}, got {got}")]
    DType {
        /// Column name.
        field: String,
        /// Schema dtype.
        expected: &'static str,
        /// Given dtype.
        got: &'static str,
    },
    /// An input column has the wrong number of elements.
    #[error("column {field:?}: expected {expected} elements ({per_item} per transition x {items}), got {got}")]
    Shape {
        /// Column name.
        field: String,
        /// Elements expected in total.
        expected: usize,
        /// Elements per transition.
        per_item: usize,
        /// Transitions in the call.
        items: usize,
        /// Elements given.
        got: usize,
    },
    /// A name that is not in the schema or batch.
    #[error("no field named {0:?}")]
    UnknownField(String),
    /// Sampling from a buffer with no transitions.
    #[error("cannot sample from an empty buffer")]
    Empty,
    /// A priority that is NaN, negative or infinite.
    #[error("invalid priority {value} at position {position} (slot {index}): priorities must be finite and >= 0 (pass |TD error|)")]
    InvalidPriority {
        /// Position of the value in the call's slice.
        position: usize,
        /// The slot index it was meant for.
        index: usize,
        /// The rejected value.
        value: f64,
    },
    /// An index that does not hold a live transition.
    #[error("index {index} at position {position} does not hold a live transition (buffer has {capacity} slots, {len} live)")]
    IndexOutOfRange {
        /// Position in the call's slice.
        position: usize,
        /// The rejected index.
        index: usize,
        /// Slots in the buffer.
        capacity: usize,
        /// Live transitions.
        len: usize,
    },
    /// Two slices that must have the same length do not.
    #[error("length mismatch: {what}: {left} vs {right}")]
    LengthMismatch {
        /// What was compared.
        what: &'static str,
        /// First length.
        left: usize,
        /// Second length.
        right: usize,
    },
    /// An operation the buffer's mode does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Creating, growing or mapping backing storage failed (disk full,
    /// unwritable directory, out of address space).
    #[error("storage {action} failed for {path:?} ({bytes} bytes): {source}")]
    Storage {
        /// What was attempted (`create`, `reserve`, `map`).
        action: &'static str,
        /// The file or directory (empty for anonymous memory).
        path: PathBuf,
        /// Bytes requested.
        bytes: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing a persisted buffer failed at the OS level.
    #[error("I/O error on {path:?}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A persisted file is not a gm-buffers file, is from an unknown version,
    /// is truncated, or fails its checksums.
    #[error("cannot load {path:?}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words (section, expected vs found).
        reason: String,
    },
    /// A compressed chunk failed to decompress (memory corruption or a bug).
    #[error("chunk {chunk} failed to decompress: {reason}")]
    Codec {
        /// Chunk index within its region.
        chunk: usize,
        /// The codec's message.
        reason: String,
    },
    /// An item is larger than the whole cache limit.
    #[error("item of {bytes} bytes does not fit a cache limited to {limit} bytes")]
    TooLargeForCache {
        /// The item's size.
        bytes: u64,
        /// The cache limit.
        limit: u64,
    },
    /// `add_batch` stored the first `added` transitions, then failed on the
    /// next one (a storage error such as a full disk); the rest were not
    /// stored and can be retried.
    #[error("add_batch stored {added} of {total} transitions, then failed: {source}")]
    BatchInterrupted {
        /// Transitions stored before the failure.
        added: usize,
        /// Transitions in the call.
        total: usize,
        /// The failure.
        #[source]
        source: Box<Error>,
    },
    /// A background thread (prefetcher) has stopped.
    #[error("background thread stopped: {0}")]
    Disconnected(String),
}

impl Error {
    pub(crate) fn config(
        key: &'static str,
        value: impl std::fmt::Display,
        allowed: impl Into<String>,
    ) -> Self {
        Error::Config {
            key,
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }
}
