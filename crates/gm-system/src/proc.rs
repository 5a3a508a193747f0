//! The process's memory as the kernel reports it (`/proc/self/status`):
//! resident now, its peak (high-water mark) and the anonymous part.

use serde::Serialize;

/// Resident memory of this process, from `/proc/self/status`. Fields are
/// `None` where the file or the line is missing (not Linux).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProcMemory {
    /// `VmRSS`: resident now, bytes.
    pub rss_bytes: Option<u64>,
    /// `VmHWM`: the peak resident size since the process started, bytes.
    pub peak_rss_bytes: Option<u64>,
    /// `RssAnon`: resident anonymous memory, bytes.
    pub rss_anon_bytes: Option<u64>,
}

impl ProcMemory {
    /// Reads `/proc/self/status`.
    pub fn read() -> Self {
        match std::fs::read_to_string("/proc/self/status") {
            Ok(text) => Self::parse(&text),
            Err(_) => Self::default(),
        }
    }

    /// Parses the text of a `/proc/<pid>/status` file.
    pub fn parse(text: &str) -> Self {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .map(|kb| kb * 1024)
        };
        Self {
            rss_bytes: field("VmRSS:"),
            peak_rss_bytes: field("VmHWM:"),
            rss_anon_bytes: field("RssAnon:"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_lines() {
        let m = ProcMemory::parse(
            "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nRssAnon:\t 512 kB\n",
        );
        assert_eq!(m.rss_bytes, Some(1 << 20));
        assert_eq!(m.peak_rss_bytes, Some(2 << 20));
        assert_eq!(m.rss_anon_bytes, Some(512 << 10));
        let here = ProcMemory::read();
        assert!(here.rss_bytes.unwrap() > 0 && here.peak_rss_bytes >= here.rss_bytes);
    }
}
