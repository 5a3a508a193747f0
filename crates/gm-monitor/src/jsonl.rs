//! The JSON Lines exporter: one [`Sample`] per line (see `Sample`'s
//! `Serialize` for the fields), appended and flushed after every line so a
//! reader (or a crash) sees whole lines.

use crate::error::{Error, Result};
use crate::sample::Sample;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

pub(crate) struct JsonlWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl std::fmt::Debug for JsonlWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonlWriter")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl JsonlWriter {
    /// Opens `path` for appending (created if missing).
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| Error::Io {
                what: "opening the JSON Lines export",
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            path: path.to_owned(),
            out: BufWriter::with_capacity(4096, file),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one line and flushes it.
    pub(crate) fn write(&mut self, s: &Sample) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, s)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}
