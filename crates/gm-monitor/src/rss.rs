//! Process resident set size. On Linux, [`RssReader`] keeps
//! `/proc/self/statm` open and re-reads it with one `pread` into a stack
//! buffer per sample: no open/close, no allocation. Elsewhere it asks the
//! `memory-stats` crate.
//!
//! Why not `memory-stats` or `sysinfo` on Linux: see the measurements in the
//! crate docs (`benches/sample.rs`, ids `sample/rss/*`). In short,
//! `memory-stats` 1.2 by default sums `/proc/self/smaps` (the kernel walks
//! every mapping's page tables: cost grows with the address space), and
//! `sysinfo` 0.40 refreshes a whole process record (several `/proc` files,
//! allocations); both read the same kernel counters `statm` exposes.

use std::io;

/// Reads the resident set size of this process.
#[derive(Debug)]
pub struct RssReader {
    #[cfg(target_os = "linux")]
    file: Option<std::fs::File>,
    #[cfg(target_os = "linux")]
    page_size: u64,
}

#[cfg(target_os = "linux")]
const STATM: &str = "/proc/self/statm";

impl RssReader {
    /// A reader. On Linux it opens `/proc/self/statm` now; if that fails
    /// (no `/proc`) every [`read`](Self::read) retries the open and returns
    /// its error.
    pub fn new() -> Self {
        #[cfg(target_os = "linux")]
        {
            Self {
                file: std::fs::File::open(STATM).ok(),
                page_size: page_size(),
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            Self {}
        }
    }

    /// The resident set size in bytes.
    #[cfg(target_os = "linux")]
    pub fn read(&mut self) -> io::Result<u64> {
        use std::os::unix::fs::FileExt;
        let file = match &self.file {
            Some(f) => f,
            None => self.file.insert(
                std::fs::File::open(STATM)
                    .map_err(|e| io::Error::new(e.kind(), format!("opening {STATM}: {e}")))?,
            ),
        };
        // "size resident shared text lib data dt\n": 7 numbers of at most
        // 20 digits each fit in 160 bytes.
        let mut buf = [0u8; 192];
        let n = file
            .read_at(&mut buf, 0)
            .map_err(|e| io::Error::new(e.kind(), format!("reading {STATM}: {e}")))?;
        let pages = parse_statm_resident(&buf[..n]).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{STATM}: cannot parse {:?}",
                    String::from_utf8_lossy(&buf[..n])
                ),
            )
        })?;
        Ok(pages * self.page_size)
    }

    /// The resident set size in bytes.
    #[cfg(not(target_os = "linux"))]
    pub fn read(&mut self) -> io::Result<u64> {
        memory_stats::memory_stats()
            .map(|s| s.physical_mem as u64)
            .ok_or_else(|| io::Error::other("memory-stats gave no reading on this platform"))
    }
}

impl Default for RssReader {
    fn default() -> Self {
        Self::new()
    }
}

/// The resident set size read the naive way: open `/proc/self/statm`, read
/// it into a `String`, close it (what a one-off `/proc` reader does; kept
/// for the benchmark's comparison).
#[cfg(target_os = "linux")]
pub fn read_rss_reopening() -> io::Result<u64> {
    let s = std::fs::read_to_string(STATM)?;
    let pages = parse_statm_resident(s.as_bytes())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "cannot parse statm"))?;
    Ok(pages * page_size())
}

/// The system page size.
#[cfg(target_os = "linux")]
fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions; it only reads a constant.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// The second field of a `statm` line (resident pages).
fn parse_statm_resident(line: &[u8]) -> Option<u64> {
    let mut fields = line
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty());
    let _size = fields.next()?;
    let resident = fields.next()?;
    let mut v: u64 = 0;
    for &b in resident {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_statm() {
        assert_eq!(parse_statm_resident(b"12345 678 90 1 0 555 0\n"), Some(678));
        assert_eq!(parse_statm_resident(b"1"), None);
        assert_eq!(parse_statm_resident(b""), None);
        assert_eq!(parse_statm_resident(b"1 x2 3"), None);
        assert_eq!(parse_statm_resident(b"1 99999999999999999999999 3"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn each_read_is_fresh_and_agrees_with_a_reopen() {
        let mut r = RssReader::new();
        let before = r.read().unwrap();
        assert!(before > 0);
        // Touch 64 MiB: the kept-open file must see it (pread at offset 0
        // regenerates the seq_file), and agree with a fresh open.
        let mut v = vec![0u8; 64 << 20];
        for i in (0..v.len()).step_by(4096) {
            v[i] = 1;
        }
        std::hint::black_box(&v);
        let after = r.read().unwrap();
        let reopened = read_rss_reopening().unwrap();
        assert!(after >= before + (48 << 20), "{before} -> {after}");
        let diff = after.abs_diff(reopened);
        assert!(diff < 16 << 20, "{after} vs {reopened}");
        drop(v);
    }
}
