//! The SVG chart of memory over a run (plotters, SVG backend only): RSS,
//! live heap and replay bytes against time, with the limit and the warning
//! and critical lines.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};

/// One point of the chart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryPoint {
    /// Seconds since the run started.
    pub secs: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Live heap (counting allocator), bytes.
    pub heap_bytes: u64,
    /// Replay buffer resident bytes.
    pub replay_bytes: u64,
}

const MIB: f64 = (1u64 << 20) as f64;

/// Draws `points` into an SVG file at `path`; `lines` are horizontal
/// reference lines (label, bytes).
pub fn memory_chart(
    path: &Path,
    title: &str,
    points: &[MemoryPoint],
    lines: &[(&str, u64)],
) -> Result<()> {
    let err = |e: String| Error::Chart {
        path: path.to_owned(),
        reason: e,
    };
    let x_max = points
        .iter()
        .map(|p| p.secs)
        .fold(1.0f64, f64::max)
        .max(1.0);
    let data_max = points
        .iter()
        .map(|p| p.rss_bytes.max(p.heap_bytes).max(p.replay_bytes))
        .max()
        .unwrap_or(0) as f64
        / MIB;
    // Show the reference lines only when they are within reach of the data
    // (an 8 GiB limit would flatten a 200 MiB run to the floor).
    let shown: Vec<(&str, f64)> = lines
        .iter()
        .map(|(l, b)| (*l, *b as f64 / MIB))
        .filter(|(_, v)| *v <= data_max * 4.0)
        .collect();
    let y_max = shown
        .iter()
        .map(|(_, v)| *v)
        .fold(data_max, f64::max)
        .max(1.0)
        * 1.1;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("MiB")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    type Series = (&'static str, RGBColor, fn(&MemoryPoint) -> u64);
    let series: [Series; 3] = [
        ("RSS (kernel)", RGBColor(31, 119, 180), |p| p.rss_bytes),
        ("heap (counting allocator)", RGBColor(255, 127, 14), |p| {
            p.heap_bytes
        }),
        ("replay buffer", RGBColor(44, 160, 44), |p| p.replay_bytes),
    ];
    for (label, color, f) in series {
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.secs, f(p) as f64 / MIB)),
                color.stroke_width(2),
            ))
            .map_err(|e| err(e.to_string()))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    let palette = [
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(127, 127, 127),
    ];
    for (i, (label, v)) in shown.iter().enumerate() {
        let color = palette[i % palette.len()];
        chart
            .draw_series(LineSeries::new(
                [(0.0, *v), (x_max, *v)],
                color.stroke_width(1),
            ))
            .map_err(|e| err(e.to_string()))?
            .label(format!("{label} ({v:.0} MiB)"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg_with_the_series() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.svg");
        let pts: Vec<MemoryPoint> = (0..10)
            .map(|i| MemoryPoint {
                secs: i as f64,
                rss_bytes: (100 + i) << 20,
                heap_bytes: (50 + i) << 20,
                replay_bytes: (10 * i) << 20,
            })
            .collect();
        memory_chart(&path, "memory", &pts, &[("limit", 300 << 20)]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..50.min(svg.len())]);
        assert!(svg.contains("RSS (kernel)") && svg.contains("limit (300 MiB)"));
        assert!(svg.matches("<polyline").count() >= 4);
    }
}
