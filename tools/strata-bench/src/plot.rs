//! The SVG written with `--plot`: four panels, IOPS against queue depth, server CPU per I/O
//! against queue depth (both on a log2 qd axis, medians over rounds), and latency CDFs at the
//! low and high queue depth (qd 1 and 32 when the sweep has them).
//!
//! plotters' SVG backend only (text goes out as SVG `<text>`; no font files or system
//! libraries are needed).

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::report::{Cell, Row, Run};

/// Size of the whole picture in pixels (four panels of 700 × 450).
const SIZE: (u32, u32) = (1400, 900);
/// Caption and label font sizes.
const CAPTION_FONT: u32 = 22;
const LABEL_FONT: u32 = 15;
/// Queue depths preferred for the two CDF panels (the qd 1 and qd 32).
const CDF_QDS: [u32; 2] = [1, 32];
/// Line colours: side A (Strata) takes blues and greens, side B (QSD) reds and oranges, so the
/// two systems read apart at a glance; the index within a side picks the shade.
const A_COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(23, 190, 207),
    RGBColor(148, 103, 189),
    RGBColor(0, 60, 120),
    RGBColor(100, 180, 100),
];
const B_COLOURS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(150, 20, 20),
    RGBColor(188, 189, 34),
];

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plot: {e:?}")
}

/// Everything of a cell but the queue depth: one line of the qd panels.
#[derive(Debug, Clone, Copy, PartialEq)]
struct SeriesKey {
    cell: Cell,
}

impl SeriesKey {
    fn of(cell: &Cell) -> Self {
        SeriesKey {
            cell: Cell { qd: 0, ..*cell },
        }
    }

    /// Legend text: the dimensions that vary in this run, after the system.
    fn label(&self, system: &str, vary: &Vary) -> String {
        let c = &self.cell;
        let mut s = system.to_string();
        if vary.backend {
            s += &format!(" {}", c.backend.name());
        }
        if vary.mode {
            s += &format!(" {}", c.mode.name());
        }
        if vary.workload {
            s += &format!(" {}", c.workload.name());
        }
        if vary.queues {
            s += &format!(" {}q", c.queues);
        }
        if vary.disks {
            s += &format!(" {}d", c.disks);
        }
        s
    }
}

/// Which cell dimensions take more than one value.
#[derive(Debug, Default)]
struct Vary {
    backend: bool,
    mode: bool,
    workload: bool,
    queues: bool,
    disks: bool,
}

impl Vary {
    fn of(rows: &[Row]) -> Self {
        let differs = |f: &dyn Fn(&Cell) -> String| {
            rows.iter()
                .map(|r| f(&r.cell))
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                > 1
        };
        Vary {
            backend: differs(&|c| c.backend.name().into()),
            mode: differs(&|c| c.mode.name().into()),
            workload: differs(&|c| c.workload.name().into()),
            queues: differs(&|c| c.queues.to_string()),
            disks: differs(&|c| c.disks.to_string()),
        }
    }
}

/// One plotted line.
struct Line {
    label: String,
    colour: RGBColor,
    points: Vec<(f64, f64)>,
}

/// Writes the four-panel SVG.
pub fn write_svg(
    path: &Path,
    runs: &[Run],
    rows: &[Row],
    labels: &[String; 2],
) -> anyhow::Result<()> {
    let vary = Vary::of(rows);
    let mut keys: Vec<SeriesKey> = Vec::new();
    for r in rows {
        let k = SeriesKey::of(&r.cell);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let colour = |side: usize, i: usize| {
        if side == 0 {
            A_COLOURS[i % A_COLOURS.len()]
        } else {
            B_COLOURS[i % B_COLOURS.len()]
        }
    };
    let mut iops_lines = Vec::new();
    let mut cpu_lines = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        for (side, side_label) in labels.iter().enumerate() {
            let mut pts: Vec<(u32, &Row)> = rows
                .iter()
                .filter(|r| SeriesKey::of(&r.cell) == *key)
                .map(|r| (r.cell.qd, r))
                .collect();
            pts.sort_by_key(|p| p.0);
            let pick = |r: &Row| if side == 0 { r.a } else { r.b };
            let label = key.label(side_label, &vary);
            iops_lines.push(Line {
                label: label.clone(),
                colour: colour(side, i),
                points: pts
                    .iter()
                    .map(|(qd, r)| (f64::from(*qd), pick(r).iops_median / 1e3))
                    .collect(),
            });
            cpu_lines.push(Line {
                label: format!("{label} (/proc)"),
                colour: colour(side, i),
                points: pts
                    .iter()
                    .map(|(qd, r)| (f64::from(*qd), pick(r).server_cpu_us_per_io_median))
                    .collect(),
            });
            if pts.iter().any(|(_, r)| pick(r).busy_us_per_io_median > 0.0) {
                cpu_lines.push(Line {
                    label: format!("{label} (busy, own counters)"),
                    colour: colour(side, i + 3),
                    points: pts
                        .iter()
                        .map(|(qd, r)| (f64::from(*qd), pick(r).busy_us_per_io_median))
                        .collect(),
                });
            }
        }
    }

    let mut qds: Vec<u32> = rows.iter().map(|r| r.cell.qd).collect();
    qds.sort_unstable();
    qds.dedup();
    let cdf_qds: Vec<u32> = if CDF_QDS.iter().all(|q| qds.contains(q)) {
        CDF_QDS.to_vec()
    } else {
        let mut v = vec![qds.first().copied().unwrap_or(1)];
        if let Some(&last) = qds.last() {
            if last != v[0] {
                v.push(last);
            }
        }
        v
    };
    let mut cdf_panels: Vec<(u32, Vec<Line>)> = Vec::new();
    for &qd in &cdf_qds {
        let mut lines = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            for (side, label) in labels.iter().enumerate() {
                // The run whose IOPS is the median of its side: a typical run, not a merge.
                let mut rs: Vec<&Run> = runs
                    .iter()
                    .filter(|r| {
                        r.cell.qd == qd && SeriesKey::of(&r.cell) == *key && &r.label == label
                    })
                    .collect();
                if rs.is_empty() {
                    continue;
                }
                rs.sort_by(|a, b| a.iops.total_cmp(&b.iops));
                let run = rs[rs.len() / 2];
                lines.push(Line {
                    label: key.label(label, &vary),
                    colour: colour(side, i),
                    points: run.cdf.iter().map(|p| (p[0].max(0.001), p[1])).collect(),
                });
            }
        }
        cdf_panels.push((qd, lines));
    }

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((2, 2));
    let qd_max = qds.last().copied().unwrap_or(1).max(2);
    let qd_range = || 0.8f64..f64::from(qd_max) * 1.25;
    qd_panel(
        &panels[0],
        "IOPS vs queue depth (medians)",
        "kIOPS",
        qd_range(),
        &iops_lines,
    )?;
    qd_panel(
        &panels[1],
        "Server CPU per I/O vs queue depth",
        "µs per I/O",
        qd_range(),
        &cpu_lines,
    )?;
    for (k, (qd, lines)) in cdf_panels.iter().enumerate().take(2) {
        cdf_panel(&panels[2 + k], *qd, lines)?;
    }
    root.present()
        .map_err(err)
        .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

fn y_max(lines: &[Line]) -> f64 {
    let m = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    if m > 0.0 {
        m * 1.1
    } else {
        1.0
    }
}

fn draw_lines<'a, DB: DrawingBackend + 'a, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    lines: &[Line],
    markers: bool,
) -> anyhow::Result<()>
where
    X: plotters::coord::ranged1d::Ranged<ValueType = f64>,
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64>,
{
    for line in lines {
        let c = line.colour;
        chart
            .draw_series(LineSeries::new(line.points.clone(), c.stroke_width(2)))
            .map_err(err)?
            .label(line.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        if !markers {
            continue;
        }
        chart
            .draw_series(line.points.iter().map(|&p| Circle::new(p, 3, c.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", LABEL_FONT))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

fn qd_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    x: std::ops::Range<f64>,
    lines: &[Line],
) -> anyhow::Result<()> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", CAPTION_FONT))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x.log_scale(), 0f64..y_max(lines))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("queue depth (per queue, log scale)")
        .y_desc(y_desc)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", LABEL_FONT))
        .draw()
        .map_err(err)?;
    draw_lines(&mut chart, lines, true)
}

fn cdf_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    qd: u32,
    lines: &[Line],
) -> anyhow::Result<()> {
    let xs = lines.iter().flat_map(|l| l.points.iter().map(|p| p.0));
    let lo = xs.clone().fold(f64::INFINITY, f64::min);
    let hi = xs.fold(0.0, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo * 0.8, hi * 1.25)
    } else {
        (1.0, 10.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("Latency CDF at qd {qd} (median run)"),
            ("sans-serif", CAPTION_FONT),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("latency, µs (log scale)")
        .y_desc("fraction of I/Os ≤ latency")
        .x_label_formatter(&|v| format!("{v:.1}"))
        .label_style(("sans-serif", LABEL_FONT))
        .draw()
        .map_err(err)?;
    draw_lines(&mut chart, lines, false)
}
