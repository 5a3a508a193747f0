//! Streaming CSV loader for real bars ([`CsvBars`], [`load_csv`]) and the
//! matching writer ([`write_csv`]).
//!
//! The accepted format, the validation and the streaming behaviour are
//! documented on [`CsvBars`].

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDate};

use crate::aggregate::detect_interval;
use crate::{Bar, BarInterval, Error, Result};

/// The required columns, in [`Bar`] field order.
pub const REQUIRED_COLUMNS: [&str; 6] = ["timestamp", "open", "high", "low", "close", "volume"];

const TS: usize = 0;
const OPEN: usize = 1;
const HIGH: usize = 2;
const LOW: usize = 3;
const CLOSE: usize = 4;
const VOLUME: usize = 5;

/// Integer or float timestamps at least this large are milliseconds.
const MILLIS_THRESHOLD: f64 = 1e11;

/// How a file writes its timestamps (detected from the first data row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimestampFormat {
    /// Unix seconds, integer or float.
    UnixSeconds,
    /// Unix milliseconds (numbers `>= 1e11`).
    UnixMillis,
    /// ISO-8601 date and time.
    Iso8601,
    /// ISO-8601 date only (`2024-01-02`), for daily bars.
    IsoDate,
}

impl TimestampFormat {
    fn is_unix(self) -> bool {
        matches!(self, Self::UnixSeconds | Self::UnixMillis)
    }
}

impl fmt::Display for TimestampFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::UnixSeconds => "Unix seconds",
            Self::UnixMillis => "Unix milliseconds",
            Self::Iso8601 => "ISO-8601 date-time",
            Self::IsoDate => "ISO-8601 date",
        })
    }
}

/// A streaming reader of bars from CSV: an iterator over `Result<Bar>` that
/// stops after the first error.
///
/// # Format
///
/// A header row, then one bar per row. The required columns are
/// `timestamp,open,high,low,close,volume`: header names are matched
/// case-insensitively after trimming, in any order; other columns are
/// ignored; a missing (or repeated) required column is an error naming it.
/// Fields are trimmed; a UTF-8 byte-order mark is skipped. Every row must
/// have as many fields as the header.
///
/// The timestamp is the bar's **open** time. Its format is detected once per
/// file from the first data row ([`TimestampFormat`]) and every later row
/// must use the same family:
///
/// - **Unix seconds**, integer (`1704187800`) or float (`1704187800.25`,
///   the fraction is dropped); an integer or float of magnitude `>= 1e11`
///   (after the year 5000 as seconds) is read as **Unix milliseconds**.
/// - **ISO-8601** `YYYY-MM-DD[(T|t| )HH:MM[:SS[.fraction]]][Z|z|±HH:MM|±HHMM|±HH]`:
///   `2024-01-02T09:30:00Z`, `2024-01-02 09:30:00`, `2024-01-02T09:30:00.500+01:00`,
///   or a date alone (`2024-01-02`, midnight, for daily bars). Without an
///   offset the time is UTC; fractional seconds are dropped.
///
/// # Validation
///
/// Each row is checked, and the first bad one ends the stream with an
/// [`Error::Csv`] naming the 1-based line (the header is line 1) and the
/// column: wrong number of fields, unparsable numbers or timestamps (the
/// text is quoted), non-finite values, prices `<= 0`, negative volume,
/// `high < low`, `high` below `open`/`close`, `low` above `open`/`close`,
/// and a timestamp not after the previous row's. Gaps in time (weekends,
/// holidays, missing bars) are allowed; [`load_csv`] counts them.
///
/// # Streaming
///
/// [`CsvBars`] reads through the `csv` crate's buffered reader (64 KiB) into
/// one reused record, so a file of any size is read in constant memory;
/// [`load_csv`] collects into a `Vec` for files that fit.
///
/// # Example
///
/// ```
/// use gm_market::CsvBars;
/// let text = "Timestamp,Volume,Open,High,Low,Close\n\
///             2024-01-02T09:30:00Z,10,100,101,99.5,100.5\n";
/// let mut bars = CsvBars::from_reader(text.as_bytes(), "inline")?;
/// let bar = bars.next().unwrap()?;
/// assert_eq!((bar.ts, bar.volume), (1_704_187_800, 10.0));
/// assert!(bars.next().is_none());
/// # Ok::<(), gm_market::Error>(())
/// ```
#[derive(Debug)]
pub struct CsvBars<R> {
    rdr: csv::Reader<R>,
    name: String,
    /// Field index of each required column.
    cols: [usize; 6],
    /// Header names (trimmed), for messages.
    header: Vec<String>,
    format: Option<TimestampFormat>,
    record: csv::ByteRecord,
    prev: Option<(i64, u64)>,
    rows: u64,
    done: bool,
}

impl CsvBars<File> {
    /// Opens `path` and reads its header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_reader(file, path.display().to_string())
    }
}

impl<R: Read> CsvBars<R> {
    /// Reads the header from `reader`; `name` stands for the source in
    /// error messages. The reader is buffered here: do not wrap it in a
    /// `BufReader`.
    pub fn from_reader(reader: R, name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .trim(csv::Trim::All)
            .buffer_capacity(64 * 1024)
            .from_reader(reader);
        let header: Vec<String> = match rdr.byte_headers() {
            Ok(h) => h
                .iter()
                .map(|f| String::from_utf8_lossy(f).trim().to_string())
                .collect(),
            Err(e) => return Err(csv_error(&name, e)),
        };
        let csv_err = |column: &str, reason: String| Error::Csv {
            path: name.clone(),
            line: 1,
            column: column.to_string(),
            reason,
        };
        if header.iter().all(|h| h.is_empty()) {
            return Err(csv_err(
                "header",
                "empty file: expected a header naming timestamp,open,high,low,close,volume".into(),
            ));
        }
        let mut cols = [usize::MAX; 6];
        for (i, h) in header.iter().enumerate() {
            let lower = h.to_ascii_lowercase();
            if let Some(c) = REQUIRED_COLUMNS.iter().position(|r| *r == lower) {
                if cols[c] != usize::MAX {
                    return Err(csv_err(
                        REQUIRED_COLUMNS[c],
                        format!(
                            "column appears twice in the header (fields {} and {})",
                            cols[c] + 1,
                            i + 1
                        ),
                    ));
                }
                cols[c] = i;
            }
        }
        if let Some(c) = cols.iter().position(|&i| i == usize::MAX) {
            return Err(csv_err(
                REQUIRED_COLUMNS[c],
                format!(
                    "missing required column {:?} (the header has {:?}; required, in any order \
                     and any case: timestamp,open,high,low,close,volume)",
                    REQUIRED_COLUMNS[c], header
                ),
            ));
        }
        Ok(Self {
            rdr,
            name,
            cols,
            header,
            format: None,
            record: csv::ByteRecord::new(),
            prev: None,
            rows: 0,
            done: false,
        })
    }

    /// The timestamp format, once the first data row was read.
    pub fn format(&self) -> Option<TimestampFormat> {
        self.format
    }

    /// The header's column names, trimmed, as written.
    pub fn header(&self) -> &[String] {
        &self.header
    }

    /// Data rows read so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The source name used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn err(&self, line: u64, column: usize, reason: String) -> Error {
        Error::Csv {
            path: self.name.clone(),
            line,
            column: REQUIRED_COLUMNS[column].to_string(),
            reason,
        }
    }

    fn field(&self, line: u64, column: usize) -> Result<&str> {
        let bytes = &self.record[self.cols[column]];
        std::str::from_utf8(bytes).map_err(|_| {
            self.err(
                line,
                column,
                format!("not valid UTF-8: {:?}", String::from_utf8_lossy(bytes)),
            )
        })
    }

    fn number(&self, line: u64, column: usize) -> Result<f64> {
        let text = self.field(line, column)?;
        let v: f64 = text
            .parse()
            .map_err(|_| self.err(line, column, format!("cannot parse {text:?} as a number")))?;
        if !v.is_finite() {
            return Err(self.err(line, column, format!("non-finite value {text:?}")));
        }
        Ok(v)
    }

    fn timestamp(&mut self, line: u64) -> Result<i64> {
        let text = self.field(line, TS)?;
        let (parsed, detected) = match self.format {
            None => match detect_timestamp(text) {
                Some((ts, f)) => (Some(ts), Some(f)),
                None => (None, None),
            },
            Some(f) if f.is_unix() => (parse_unix(text, f), None),
            Some(_) => (parse_iso(text), None),
        };
        if let Some(ts) = parsed {
            if detected.is_some() {
                self.format = detected;
            }
            return Ok(ts);
        }
        let text = self.field(line, TS)?;
        let expected = match self.format {
            None => "ISO-8601 (like 2024-01-02T09:30:00Z) or Unix seconds".to_string(),
            Some(f) => format!("{f} like the first data row"),
        };
        Err(self.err(
            line,
            TS,
            format!("cannot parse {text:?} as a timestamp (expected {expected})"),
        ))
    }

    fn parse_row(&mut self, line: u64) -> Result<Bar> {
        let n = self.record.len();
        if n != self.header.len() {
            let (column, reason) = if n < self.header.len() {
                (
                    self.header[n].clone(),
                    format!(
                        "expected {} fields as in the header, found {n}",
                        self.header.len()
                    ),
                )
            } else {
                (
                    format!("field {}", self.header.len() + 1),
                    format!(
                        "expected {} fields as in the header, found {n} (extra field)",
                        self.header.len()
                    ),
                )
            };
            return Err(Error::Csv {
                path: self.name.clone(),
                line,
                column,
                reason,
            });
        }
        let ts = self.timestamp(line)?;
        if let Some((prev, prev_line)) = self.prev {
            if ts <= prev {
                let text = self.field(line, TS)?;
                return Err(self.err(
                    line,
                    TS,
                    format!(
                        "timestamp {text:?} ({}) is not after the previous row's ({}, line {prev_line})",
                        iso(ts),
                        iso(prev)
                    ),
                ));
            }
        }
        let open = self.number(line, OPEN)?;
        let high = self.number(line, HIGH)?;
        let low = self.number(line, LOW)?;
        let close = self.number(line, CLOSE)?;
        let volume = self.number(line, VOLUME)?;
        for (c, v) in [(OPEN, open), (HIGH, high), (LOW, low), (CLOSE, close)] {
            if v <= 0.0 {
                let text = self.field(line, c)?;
                return Err(self.err(line, c, format!("price must be > 0, found {text:?}")));
            }
        }
        if volume < 0.0 {
            let text = self.field(line, VOLUME)?;
            return Err(self.err(line, VOLUME, format!("negative volume {text:?}")));
        }
        if high < low {
            return Err(self.err(line, HIGH, format!("high {high} is below low {low}")));
        }
        for (name, v) in [("open", open), ("close", close)] {
            if high < v {
                return Err(self.err(line, HIGH, format!("high {high} is below {name} {v}")));
            }
            if low > v {
                return Err(self.err(line, LOW, format!("low {low} is above {name} {v}")));
            }
        }
        self.prev = Some((ts, line));
        Ok(Bar {
            ts,
            open,
            high,
            low,
            close,
            volume,
        })
    }
}

impl<R: Read> Iterator for CsvBars<R> {
    type Item = Result<Bar>;

    fn next(&mut self) -> Option<Result<Bar>> {
        if self.done {
            return None;
        }
        let mut record = std::mem::take(&mut self.record);
        let read = self.rdr.read_byte_record(&mut record);
        self.record = record;
        let out = match read {
            Ok(false) => {
                self.done = true;
                return None;
            }
            Ok(true) => {
                let line = self.record.position().map_or(0, |p| p.line());
                self.rows += 1;
                self.parse_row(line)
            }
            Err(e) => Err(csv_error(&self.name, e)),
        };
        if out.is_err() {
            self.done = true;
        }
        Some(out)
    }
}

fn csv_error(name: &str, e: csv::Error) -> Error {
    let line = e.position().map_or(0, |p| p.line());
    match e.into_kind() {
        csv::ErrorKind::Io(source) => Error::Io {
            path: PathBuf::from(name),
            source,
        },
        kind => Error::Csv {
            path: name.to_string(),
            line,
            column: "?".into(),
            reason: format!("{kind:?}"),
        },
    }
}

/// `ts` as `2024-01-02T09:30:00Z` (or the number if out of range).
fn iso(ts: i64) -> String {
    match DateTime::from_timestamp(ts, 0) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        None => ts.to_string(),
    }
}

/// Parses the first row's timestamp and decides the file's format.
fn detect_timestamp(text: &str) -> Option<(i64, TimestampFormat)> {
    if let Some(v) = parse_number(text) {
        let f = if v.abs() >= MILLIS_THRESHOLD {
            TimestampFormat::UnixMillis
        } else {
            TimestampFormat::UnixSeconds
        };
        return parse_unix(text, f).map(|ts| (ts, f));
    }
    let ts = parse_iso(text)?;
    let f = if text.len() == 10 {
        TimestampFormat::IsoDate
    } else {
        TimestampFormat::Iso8601
    };
    Some((ts, f))
}

fn parse_number(text: &str) -> Option<f64> {
    let v: f64 = text.parse().ok()?;
    v.is_finite().then_some(v)
}

/// Unix seconds or milliseconds, integer or float; fractions are floored.
fn parse_unix(text: &str, f: TimestampFormat) -> Option<i64> {
    let scale = if f == TimestampFormat::UnixMillis {
        1000
    } else {
        1
    };
    if let Ok(i) = text.parse::<i64>() {
        return Some(i.div_euclid(scale));
    }
    let v = parse_number(text)? / scale as f64;
    // Beyond ±2^53 seconds a float timestamp is meaningless anyway.
    (v.abs() < 9e15).then(|| v.floor() as i64)
}

/// Parses `n` ASCII digits at `s[at..]`.
fn digits(s: &[u8], at: usize, n: usize) -> Option<u32> {
    let part = s.get(at..at + n)?;
    part.iter().try_fold(0u32, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
    })
}

/// ISO-8601 (the subset documented on [`CsvBars`]) to Unix seconds.
pub(crate) fn parse_iso(text: &str) -> Option<i64> {
    let s = text.as_bytes();
    let year = digits(s, 0, 4)?;
    if s.get(4) != Some(&b'-') || s.get(7) != Some(&b'-') {
        return None;
    }
    let month = digits(s, 5, 2)?;
    let day = digits(s, 8, 2)?;
    let date = NaiveDate::from_ymd_opt(year as i32, month, day)?;
    let (mut h, mut mi, mut sec, mut offset) = (0, 0, 0, 0i64);
    if s.len() > 10 {
        if !matches!(s[10], b'T' | b't' | b' ') {
            return None;
        }
        h = digits(s, 11, 2)?;
        if s.get(13) != Some(&b':') {
            return None;
        }
        mi = digits(s, 14, 2)?;
        let mut i = 16;
        if s.get(16) == Some(&b':') {
            sec = digits(s, 17, 2)?;
            i = 19;
            if matches!(s.get(19), Some(b'.' | b',')) {
                i = 20;
                let start = i;
                while s.get(i).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                }
                if i == start {
                    return None;
                }
            }
        }
        match s.get(i) {
            None => {}
            Some(b'Z' | b'z') if i + 1 == s.len() => {}
            Some(&sign @ (b'+' | b'-')) => {
                let oh = digits(s, i + 1, 2)?;
                let om = match s.len() - (i + 3) {
                    0 => 0,
                    2 => digits(s, i + 3, 2)?,
                    3 if s[i + 3] == b':' => digits(s, i + 4, 2)?,
                    _ => return None,
                };
                if oh > 23 || om > 59 {
                    return None;
                }
                let o = i64::from(oh * 3600 + om * 60);
                offset = if sign == b'+' { o } else { -o };
            }
            _ => return None,
        }
    }
    let t = date.and_hms_opt(h, mi, sec)?;
    Some(t.and_utc().timestamp() - offset)
}

/// All bars of a file, with what was detected about them.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedBars {
    /// The source (path or reader name).
    pub source: String,
    /// The bars, in time order.
    pub bars: Vec<Bar>,
    /// The detected bar interval ([`detect_interval`]).
    pub interval: BarInterval,
    /// The detected timestamp format.
    pub format: TimestampFormat,
    /// Consecutive bars more than one interval apart (weekends, holidays,
    /// missing bars).
    pub gaps: usize,
    /// The longest distance between consecutive bars, in seconds.
    pub largest_gap_secs: i64,
}

impl fmt::Display for LoadedBars {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} bars of {} ({} timestamps), {} gaps (largest {} s)",
            self.source,
            self.bars.len(),
            self.interval,
            self.format,
            self.gaps,
            self.largest_gap_secs
        )
    }
}

/// Reads a whole CSV file (format: [`CsvBars`]) and detects its
/// interval ([`detect_interval`]); a file with no data rows or too few bars
/// to detect an interval is [`Error::NotEnoughData`]. For files that do not
/// fit in memory use [`CsvBars`].
pub fn load_csv(path: impl AsRef<Path>) -> Result<LoadedBars> {
    collect(CsvBars::open(path)?)
}

/// [`load_csv`] from any reader; `name` stands for it in messages.
pub fn load_csv_reader<R: Read>(reader: R, name: impl Into<String>) -> Result<LoadedBars> {
    collect(CsvBars::from_reader(reader, name)?)
}

fn collect<R: Read>(mut rows: CsvBars<R>) -> Result<LoadedBars> {
    let mut bars = Vec::new();
    for bar in rows.by_ref() {
        bars.push(bar?);
    }
    let format = rows
        .format()
        .ok_or_else(|| Error::NotEnoughData(format!("{}: no data rows", rows.name())))?;
    let interval = detect_interval(&bars).map_err(|e| match e {
        Error::NotEnoughData(m) => Error::NotEnoughData(format!("{}: {m}", rows.name())),
        Error::Invalid(m) => Error::Invalid(format!("{}: {m}", rows.name())),
        other => other,
    })?;
    let (mut gaps, mut largest) = (0, 0);
    for w in bars.windows(2) {
        let d = w[1].ts - w[0].ts;
        gaps += usize::from(d > interval.seconds());
        largest = largest.max(d);
    }
    Ok(LoadedBars {
        source: rows.name().to_string(),
        bars,
        interval,
        format,
        gaps,
        largest_gap_secs: largest,
    })
}

/// Writes `bars` as CSV (`timestamp,open,high,low,close,volume`) with
/// timestamps in `format`; prices and volumes are written in the shortest
/// form that reads back to the same `f64`, so a round trip is exact.
/// [`TimestampFormat::IsoDate`] needs bars at midnight UTC.
pub fn write_csv<W: Write>(writer: W, bars: &[Bar], format: TimestampFormat) -> Result<()> {
    let io = |source| Error::Io {
        path: PathBuf::from("<writer>"),
        source,
    };
    let mut w = std::io::BufWriter::new(writer);
    writeln!(w, "timestamp,open,high,low,close,volume").map_err(io)?;
    for b in bars {
        match format {
            TimestampFormat::UnixSeconds => write!(w, "{}", b.ts),
            TimestampFormat::UnixMillis => write!(w, "{}", i128::from(b.ts) * 1000),
            TimestampFormat::Iso8601 => write!(w, "{}", iso(b.ts)),
            TimestampFormat::IsoDate => {
                if b.ts.rem_euclid(86_400) != 0 {
                    return Err(Error::Invalid(format!(
                        "bar at {} is not at midnight UTC: cannot write it as a date",
                        iso(b.ts)
                    )));
                }
                write!(w, "{}", &iso(b.ts)[..10])
            }
        }
        .map_err(io)?;
        writeln!(
            w,
            ",{},{},{},{},{}",
            b.open, b.high, b.low, b.close, b.volume
        )
        .map_err(io)?;
    }
    w.flush().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_forms() {
        let t = 1_704_187_800; // 2024-01-02T09:30:00Z
        for s in [
            "2024-01-02T09:30:00Z",
            "2024-01-02t09:30:00z",
            "2024-01-02 09:30:00",
            "2024-01-02T09:30",
            "2024-01-02T09:30:00.999Z",
            "2024-01-02T09:30:00,5",
            "2024-01-02T10:30:00+01:00",
            "2024-01-02T10:30:00+0100",
            "2024-01-02T10:30:00+01",
            "2024-01-02T04:30:00-05:00",
        ] {
            assert_eq!(parse_iso(s), Some(t), "{s}");
        }
        assert_eq!(parse_iso("2024-01-02"), Some(1_704_153_600));
        for bad in [
            "2024-13-02",
            "2024-02-30",
            "2024-01-02X09:30",
            "2024-01-02T25:00",
            "2024-01-02T09:30:00.Z",
            "2024-01-02T09:30:00+1",
            "2024-01-02T09:30:00Zx",
            "24-01-02",
            "",
        ] {
            assert_eq!(parse_iso(bad), None, "{bad}");
        }
    }

    #[test]
    fn unix_detection() {
        assert_eq!(
            detect_timestamp("1704187800"),
            Some((1_704_187_800, TimestampFormat::UnixSeconds))
        );
        assert_eq!(
            detect_timestamp("1704187800.75"),
            Some((1_704_187_800, TimestampFormat::UnixSeconds))
        );
        assert_eq!(
            detect_timestamp("1704187800123"),
            Some((1_704_187_800, TimestampFormat::UnixMillis))
        );
        assert_eq!(
            detect_timestamp("2024-01-02"),
            Some((1_704_153_600, TimestampFormat::IsoDate))
        );
        assert_eq!(detect_timestamp("nan"), None);
        assert_eq!(detect_timestamp("yesterday"), None);
    }
}
