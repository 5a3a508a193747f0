//! The CSV loader: round trips in every timestamp format, one test per kind
//! of bad input (exact line and column), header handling, gaps, and a large
//! file streamed row by row.

use std::io::{BufWriter, Write};

use gm_market::{
    load_csv, load_csv_reader, write_csv, Bar, BarInterval, CsvBars, Error, GeneratorConfig,
    SyntheticMarket, TimestampFormat,
};

fn generated(n: usize, interval_secs: i64) -> Vec<Bar> {
    let cfg = GeneratorConfig {
        bar_interval_secs: interval_secs,
        ..GeneratorConfig::default()
    };
    SyntheticMarket::new(cfg).unwrap().generate(n).0
}

fn to_csv(bars: &[Bar], format: TimestampFormat) -> Vec<u8> {
    let mut out = Vec::new();
    write_csv(&mut out, bars, format).unwrap();
    out
}

#[test]
fn round_trip_in_every_timestamp_format() -> anyhow::Result<()> {
    let bars = generated(3000, 300); // 2024-01-01 (Monday) .. 01-15: two weekends
    for format in [
        TimestampFormat::UnixSeconds,
        TimestampFormat::UnixMillis,
        TimestampFormat::Iso8601,
    ] {
        let text = to_csv(&bars, format);
        let loaded = load_csv_reader(&text[..], "mem.csv")?;
        assert_eq!(loaded.bars, bars, "{format}");
        assert_eq!(loaded.format, format);
        assert_eq!(loaded.interval, BarInterval::M5);
        assert_eq!(loaded.gaps, 2);
        assert_eq!(loaded.largest_gap_secs, 2 * 86_400 + 300);
    }
    let first_line = |t: &[u8]| {
        String::from_utf8_lossy(t)
            .lines()
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        first_line(&to_csv(&bars, TimestampFormat::UnixSeconds)),
        "1704067200"
    );
    assert_eq!(
        first_line(&to_csv(&bars, TimestampFormat::Iso8601)),
        "2024-01-01T00:00:00Z"
    );

    // Daily bars as dates, through a real file.
    let daily = generated(30, 86_400);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("daily.csv");
    write_csv(
        std::fs::File::create(&path)?,
        &daily,
        TimestampFormat::IsoDate,
    )?;
    let loaded = load_csv(&path)?;
    assert_eq!(loaded.bars, daily);
    assert_eq!(loaded.format, TimestampFormat::IsoDate);
    assert_eq!(loaded.interval, BarInterval::D1);
    assert_eq!(loaded.gaps, 5, "six weeks of weekdays: five weekends");
    assert_eq!(loaded.largest_gap_secs, 3 * 86_400);
    assert!(
        write_csv(Vec::new(), &bars[1..3], TimestampFormat::IsoDate).is_err(),
        "intraday bars are not dates"
    );

    // Written by hand: float seconds and the ISO variants.
    let text = "timestamp,open,high,low,close,volume\n\
                1704187800.9,1,2,0.5,1.5,10\n\
                1704188100,1.5,2,1,1,0\n";
    let b: Vec<Bar> = CsvBars::from_reader(text.as_bytes(), "f")?.collect::<Result<_, _>>()?;
    assert_eq!(b[0].ts, 1_704_187_800, "fraction dropped");
    assert_eq!((b[1].ts, b[1].volume), (1_704_188_100, 0.0));
    let text = "timestamp,open,high,low,close,volume\n\
                2024-01-02T09:30:00Z,1,1,1,1,1\n\
                2024-01-02 09:35:00,1,1,1,1,1\n\
                2024-01-02T09:40:00.250Z,1,1,1,1,1\n\
                2024-01-02T10:45:00+01:00,1,1,1,1,1\n\
                2024-01-02T04:50:00-0500,1,1,1,1,1\n";
    let mut rows = CsvBars::from_reader(text.as_bytes(), "iso")?;
    let ts: Vec<i64> = rows.by_ref().map(|b| b.unwrap().ts).collect();
    assert_eq!(rows.format(), Some(TimestampFormat::Iso8601));
    let t0 = 1_704_187_800;
    assert_eq!(ts, [t0, t0 + 300, t0 + 600, t0 + 900, t0 + 1200]);
    Ok(())
}

/// The error of the first bad row of `text`: (line, column, reason, message).
fn csv_error(text: &str) -> (u64, String, String, String) {
    let err = load_csv_reader(text.as_bytes(), "t.csv").unwrap_err();
    let msg = err.to_string();
    match err {
        Error::Csv {
            path,
            line,
            column,
            reason,
        } => {
            assert_eq!(path, "t.csv");
            assert!(
                msg.starts_with(&format!("t.csv:{line}: column {column:?}")),
                "{msg}"
            );
            (line, column, reason, msg)
        }
        other => panic!("expected Error::Csv, got {other:?}"),
    }
}

const HEADER: &str = "timestamp,open,high,low,close,volume\n";
const GOOD1: &str = "1704187800,100,101,99,100.5,10\n";
const GOOD2: &str = "1704188100,100.5,102,100,101,12\n";

fn with_bad(row: &str) -> String {
    format!("{HEADER}{GOOD1}{GOOD2}{row}\n1704189000,100,101,99,100,1\n")
}

#[test]
fn unparsable_number_names_line_column_and_text() {
    let (line, col, reason, _) = csv_error(&with_bad("1704188400,101,102,100,1O1.5,5"));
    assert_eq!((line, col.as_str()), (4, "close"));
    assert!(reason.contains("\"1O1.5\""), "{reason}");
    let (line, col, reason, _) = csv_error(&with_bad("1704188400,101,102,100,101,"));
    assert_eq!((line, col.as_str()), (4, "volume"));
    assert!(reason.contains("\"\""), "empty field: {reason}");
}

#[test]
fn non_finite_values_are_rejected() {
    let (line, col, reason, _) = csv_error(&with_bad("1704188400,101,102,100,101,NaN"));
    assert_eq!((line, col.as_str()), (4, "volume"));
    assert!(
        reason.contains("non-finite") && reason.contains("\"NaN\""),
        "{reason}"
    );
    let (line, col, _, _) = csv_error(&with_bad("1704188400,inf,102,100,101,1"));
    assert_eq!((line, col.as_str()), (4, "open"));
}

#[test]
fn non_positive_prices_are_rejected() {
    let (line, col, reason, _) = csv_error(&with_bad("1704188400,101,102,0,101,1"));
    assert_eq!((line, col.as_str()), (4, "low"));
    assert!(
        reason.contains("> 0") && reason.contains("\"0\""),
        "{reason}"
    );
    let (line, col, _, _) = csv_error(&with_bad("1704188400,-101,102,100,101,1"));
    assert_eq!((line, col.as_str()), (4, "open"));
}

#[test]
fn high_below_low_is_rejected() {
    let (line, col, reason, _) = csv_error(&with_bad("1704188400,101,99,100,101,1"));
    assert_eq!((line, col.as_str()), (4, "high"));
    assert!(reason.contains("below low"), "{reason}");
}

#[test]
fn high_below_open_or_close_is_rejected() {
    let (line, col, reason, _) = csv_error(&with_bad("1704188400,101,101.5,100,102,1"));
    assert_eq!((line, col.as_str()), (4, "high"));
    assert!(reason.contains("below close 102"), "{reason}");
    let (_, col, reason, _) = csv_error(&with_bad("1704188400,103,102,100,101,1"));
    assert_eq!(col, "high");
    assert!(reason.contains("below open 103"), "{reason}");
}

#[test]
fn low_above_open_or_close_is_rejected() {
    let (line, col, reason, _) = csv_error(&with_bad("1704188400,99.5,102,100,101,1"));
    assert_eq!((line, col.as_str()), (4, "low"));
    assert!(reason.contains("above open 99.5"), "{reason}");
    let (_, col, reason, _) = csv_error(&with_bad("1704188400,101,102,100,99,1"));
    assert_eq!(col, "low");
    assert!(reason.contains("above close 99"), "{reason}");
}

#[test]
fn negative_volume_is_rejected() {
    let (line, col, reason, _) = csv_error(&with_bad("1704188400,101,102,100,101,-3"));
    assert_eq!((line, col.as_str()), (4, "volume"));
    assert!(reason.contains("\"-3\""), "{reason}");
}

#[test]
fn non_increasing_timestamps_are_rejected() {
    let (line, col, reason, _) = csv_error(&with_bad("1704188100,101,102,100,101,1"));
    assert_eq!((line, col.as_str()), (4, "timestamp"));
    assert!(
        reason.contains("not after") && reason.contains("line 3"),
        "{reason}"
    );
    let (line, col, _, _) = csv_error(&with_bad("1704187500,101,102,100,101,1"));
    assert_eq!((line, col.as_str()), (4, "timestamp"));
}

#[test]
fn wrong_number_of_fields_is_rejected() {
    let (line, col, reason, _) = csv_error(&with_bad("1704188400,101,102,100,101"));
    assert_eq!(
        (line, col.as_str()),
        (4, "volume"),
        "the first missing column"
    );
    assert!(
        reason.contains("expected 6 fields") && reason.contains("found 5"),
        "{reason}"
    );
    let (line, col, reason, _) = csv_error(&with_bad("1704188400,101,102,100,101,1,7"));
    assert_eq!((line, col.as_str()), (4, "field 7"));
    assert!(reason.contains("found 7"), "{reason}");
}

#[test]
fn bad_timestamps_are_rejected() {
    let (line, col, reason, _) = csv_error(&with_bad("2024-01-02T09:40:00Z,101,102,100,101,1"));
    assert_eq!((line, col.as_str()), (4, "timestamp"));
    assert!(
        reason.contains("Unix seconds like the first data row"),
        "{reason}"
    );
    let (line, col, reason, _) = csv_error(&format!("{HEADER}2024-13-01,1,1,1,1,1\n"));
    assert_eq!((line, col.as_str()), (2, "timestamp"));
    assert!(reason.contains("\"2024-13-01\""), "{reason}");
}

#[test]
fn header_errors_are_on_line_one() {
    let (line, col, reason, _) = csv_error("timestamp,open,high,low,close,vol\n1,1,1,1,1,1\n");
    assert_eq!((line, col.as_str()), (1, "volume"));
    assert!(reason.contains("missing required column"), "{reason}");
    let (line, col, _, _) = csv_error("timestamp,open,high,low,close,volume,Close\n");
    assert_eq!((line, col.as_str()), (1, "close"), "a repeated column");
    let (line, col, _, _) = csv_error("");
    assert_eq!((line, col.as_str()), (1, "header"), "an empty file");
    assert!(matches!(
        load_csv_reader(HEADER.as_bytes(), "h"),
        Err(Error::NotEnoughData(_))
    ));
}

#[test]
fn the_stream_stops_after_the_first_error() {
    let text = with_bad("1704188400,101,102,100,101,-3");
    let mut rows = CsvBars::from_reader(text.as_bytes(), "t").unwrap();
    assert!(rows.next().unwrap().is_ok());
    assert!(rows.next().unwrap().is_ok());
    assert!(rows.next().unwrap().is_err());
    assert!(rows.next().is_none(), "fused after an error");
}

#[test]
fn line_numbers_skip_blank_lines_correctly() {
    let text = format!("{HEADER}{GOOD1}\n\n{GOOD2}1704188400,101,102,100,101,-3\n");
    let (line, col, _, _) = csv_error(&text);
    assert_eq!((line, col.as_str()), (6, "volume"));
}

#[test]
fn header_is_case_insensitive_in_any_order_with_extra_columns() -> anyhow::Result<()> {
    let text = "\u{feff}Volume, CLOSE ,symbol,TimeStamp,low,High,open\n\
                10,100.5,ES,2024-01-02T09:30:00Z,99,101,100\n\
                12,101,ES,2024-01-02T09:35:00Z,100,102,100.5\n\
                11,101.5,ES,2024-01-02T09:40:00Z,100.5,102,101\n";
    let loaded = load_csv_reader(text.as_bytes(), "reordered")?;
    assert_eq!(
        loaded.bars[0],
        Bar {
            ts: 1_704_187_800,
            open: 100.0,
            high: 101.0,
            low: 99.0,
            close: 100.5,
            volume: 10.0
        }
    );
    assert_eq!(loaded.bars.len(), 3);
    assert_eq!(loaded.interval, BarInterval::M5);
    let rows = CsvBars::from_reader(text.as_bytes(), "r")?;
    assert_eq!(
        rows.header()[0],
        "Volume",
        "BOM skipped, names kept as written"
    );
    Ok(())
}

#[test]
fn a_weekend_gap_loads_and_is_reported() -> anyhow::Result<()> {
    // Friday 2024-01-05 23:45 .. 23:55, then Monday 00:00 .. 00:10.
    let fri = 1_704_498_300;
    let mon = 1_704_672_000;
    let mut text = String::from(HEADER);
    for ts in [fri, fri + 300, fri + 600, mon, mon + 300, mon + 600] {
        text.push_str(&format!("{ts},100,101,99,100,1\n"));
    }
    let loaded = load_csv_reader(text.as_bytes(), "weekend.csv")?;
    assert_eq!(loaded.bars.len(), 6);
    assert_eq!(loaded.interval, BarInterval::M5);
    assert_eq!(loaded.gaps, 1);
    assert_eq!(loaded.largest_gap_secs, mon - (fri + 600));
    let summary = loaded.to_string();
    assert!(
        summary.contains("6 bars of 5m") && summary.contains("1 gaps"),
        "{summary}"
    );
    Ok(())
}

#[test]
fn a_large_file_streams_row_by_row() -> anyhow::Result<()> {
    const ROWS: usize = 200_000;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("big.csv");
    let mut w = BufWriter::new(std::fs::File::create(&path)?);
    writeln!(w, "timestamp,open,high,low,close,volume")?;
    let mut m = SyntheticMarket::new(GeneratorConfig::default())?;
    for _ in 0..ROWS {
        let (b, _) = m.next_bar();
        writeln!(
            w,
            "{},{},{},{},{},{}",
            b.ts, b.open, b.high, b.low, b.close, b.volume
        )?;
    }
    w.flush()?;
    drop(w);

    let mut check = SyntheticMarket::new(GeneratorConfig::default())?;
    let mut rows = CsvBars::open(&path)?;
    let mut n = 0;
    for bar in rows.by_ref() {
        assert_eq!(bar?, check.next_bar().0);
        n += 1;
    }
    assert_eq!(n, ROWS);
    assert_eq!(rows.rows(), ROWS as u64);
    assert_eq!(rows.format(), Some(TimestampFormat::UnixSeconds));
    Ok(())
}

#[test]
fn a_missing_file_is_an_io_error_naming_it() {
    match CsvBars::open("/nonexistent/bars.csv") {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("bars.csv")),
        other => panic!("{other:?}"),
    }
}
