//! Measuring what a reclaim really freed: the process's resident memory
//! ([`rss`], from `/proc/self/statm`) and returning freed heap to the OS
//! ([`trim`], glibc's `malloc_trim`).
//!
//! # Why RSS lags frees
//! Dropping a `Vec` hands its bytes back to the C allocator, not to the OS.
//! glibc returns memory to the kernel on `free` only in two cases: blocks
//! above the mmap threshold (128 KiB, rising dynamically up to 32 MiB) live
//! in their own mapping and are unmapped at once, and free space at the very
//! top of an arena is given back once it exceeds the trim threshold. Every
//! other freed block — the many small and medium allocations of caches,
//! maps and pools — stays resident inside the arena, waiting for reuse, and
//! RSS does not move. A single live block above them is enough to pin the
//! lot. `malloc_trim(0)` walks every arena and releases (`MADV_DONTNEED`)
//! each whole free page, wherever it sits; only then does RSS fall.
//!
//! The kernel's own RSS counters are also approximate by a few pages per
//! CPU (per-CPU counter batching), so a per-component RSS figure is good to
//! a few hundred KiB, never exact.

use serde::{Deserialize, Serialize};

/// The process's resident memory at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rss {
    /// Resident bytes in all (`statm` field 2, the `VmRSS` of `status`).
    pub resident_bytes: u64,
    /// Resident anonymous bytes (resident minus file-backed and shared
    /// pages: `RssAnon` of `status`). Heap frees show up here.
    pub anon_bytes: u64,
}

/// What [`trim`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrimOutcome {
    /// `malloc_trim` released memory to the OS.
    Released,
    /// `malloc_trim` ran and found nothing to release.
    NothingToRelease,
    /// Not glibc: there is no `malloc_trim`, nothing was done.
    Unsupported,
    /// Trimming is switched off (`Config::trim_after_pass = false`).
    Disabled,
}

/// Returns freed heap memory to the OS: `malloc_trim(0)` on Linux with
/// glibc; elsewhere a no-op that returns [`TrimOutcome::Unsupported`].
///
/// Costs time proportional to the heap's free space (it touches the free
/// lists of every arena), typically micro- to milliseconds; the memory it
/// releases comes back as fresh zeroed pages (page faults) when reused.
pub fn trim() -> TrimOutcome {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only releases free memory of glibc's arenas;
        // it takes the arena locks itself and touches no live allocation.
        let released = unsafe { libc::malloc_trim(0) };
        if released != 0 {
            TrimOutcome::Released
        } else {
            TrimOutcome::NothingToRelease
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        TrimOutcome::Unsupported
    }
}

/// The process's resident memory now, or `None` where it cannot be read
/// (not Linux, no `/proc`).
pub fn rss() -> Option<Rss> {
    RssReader::new().read()
}

/// Reads `/proc/self/statm` through a file descriptor kept open, so a
/// reading is one `pread` (no open/close, no allocation).
#[derive(Debug)]
pub(crate) struct RssReader {
    #[cfg(target_os = "linux")]
    file: Option<std::fs::File>,
}

impl RssReader {
    pub(crate) fn new() -> Self {
        Self {
            #[cfg(target_os = "linux")]
            file: std::fs::File::open("/proc/self/statm").ok(),
        }
    }

    /// Whether readings are available at all.
    pub(crate) fn available(&self) -> bool {
        #[cfg(target_os = "linux")]
        {
            self.file.is_some()
        }
        #[cfg(not(target_os = "linux"))]
        {
            false
        }
    }

    #[cfg(target_os = "linux")]
    pub(crate) fn read(&self) -> Option<Rss> {
        use std::os::unix::fs::FileExt;
        let file = self.file.as_ref()?;
        let mut buf = [0u8; 256];
        let n = file.read_at(&mut buf, 0).ok()?;
        parse_statm(&buf[..n], page_size())
    }

    #[cfg(not(target_os = "linux"))]
    pub(crate) fn read(&self) -> Option<Rss> {
        None
    }
}

/// `size resident shared text lib data dt`, in pages.
fn parse_statm(text: &[u8], page: u64) -> Option<Rss> {
    let text = std::str::from_utf8(text).ok()?;
    let mut fields = text.split_ascii_whitespace().skip(1);
    let resident: u64 = fields.next()?.parse().ok()?;
    let shared: u64 = fields.next()?.parse().ok()?;
    Some(Rss {
        resident_bytes: resident * page,
        anon_bytes: resident.saturating_sub(shared) * page,
    })
}

#[cfg(target_os = "linux")]
fn page_size() -> u64 {
    use std::sync::OnceLock;
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf reads a constant of the running system.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if p > 0 {
            p as u64
        } else {
            4096
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statm_parses_resident_and_anon() {
        let r = parse_statm(b"765 435 407 5 0 123 0\n", 4096).unwrap();
        assert_eq!(r.resident_bytes, 435 * 4096);
        assert_eq!(r.anon_bytes, 28 * 4096);
        assert_eq!(parse_statm(b"765", 4096), None);
        assert_eq!(parse_statm(b"a b c", 4096), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn rss_reads_and_matches_status() {
        let reader = RssReader::new();
        assert!(reader.available());
        let a = reader.read().unwrap();
        let b = reader.read().unwrap(); // re-reading the same descriptor works
        assert!(a.resident_bytes > 0 && a.anon_bytes > 0 && a.anon_bytes <= a.resident_bytes);
        assert!(b.resident_bytes > 0);
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let vm_rss_kib: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap();
        // Other test threads allocate concurrently: same order of magnitude.
        let ratio = vm_rss_kib as f64 * 1024.0 / b.resident_bytes as f64;
        assert!(
            (0.5..2.0).contains(&ratio),
            "VmRSS {vm_rss_kib} KiB vs {b:?}"
        );
    }

    #[test]
    fn trim_reports_what_it_did() {
        let t = trim();
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(matches!(
                t,
                TrimOutcome::Released | TrimOutcome::NothingToRelease
            ));
        } else {
            assert_eq!(t, TrimOutcome::Unsupported);
        }
    }
}
