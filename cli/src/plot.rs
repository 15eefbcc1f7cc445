//! The seed paper's Fig. 7 for the user's data: bits each method sends per coordinate against
//! the rate-distortion bounds, over steps, as a PNG.
//!
//! Text is drawn with an embedded subset of DejaVu Sans (assets/fonts, made by
//! scripts/make_font_subset.py), so plotting needs no system fonts.

use super::error::CliError as AnalyzeError;
use super::report::Report;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::ops::Range;
use std::path::Path;
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-gradsift.ttf");
static REGISTER: Once = Once::new();

pub(crate) fn register_font() {
    REGISTER.call_once(|| {
        // The bytes are a valid TrueType font checked in with the crate; a failure here would
        // only leave text undrawn, which the test of the plot catches.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// `(step, bits per coordinate)` points of one line.
type Points = Vec<(f64, f64)>;

pub(crate) const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Draws the plot: for every method, the bits it sent per coordinate (all `K` workers) per
/// step (solid) and `R_sum` at its measured distortion (dashed, same colour); in black, Fig.
/// 7's `R_in(D_sign)` ("ideal quantization", constant) and `R_sum(D_sign)` (the theoretical
/// minimum at scaled sign's distortion). Logarithmic rate axis.
pub fn draw(report: &Report, path: &Path) -> Result<(), AnalyzeError> {
    register_font();
    let err = |e: String| AnalyzeError::Output {
        path: path.to_path_buf(),
        message: format!("cannot draw the plot: {e}"),
    };
    let steps: Vec<f64> = report.statistics.iter().map(|s| s.step as f64).collect();
    if steps.is_empty() {
        return Err(err("no steps to plot".into()));
    }
    let lines = Lines::of(report);
    let Some((lo, hi)) = lines.rate_range() else {
        return Err(err("no finite positive rate to plot".into()));
    };
    let (ylo, yhi) = (lo / 2.0, hi * 2.0);
    let (x0, x1) = (steps[0], *steps.last().unwrap_or(&steps[0]));
    let pad = ((x1 - x0) * 0.03).max(0.5);
    let frame = Frame {
        x: (x0 - pad)..(x1 + pad),
        y: ylo..yhi,
        x_labels: steps.len().clamp(2, 12),
    };
    render(report.workers, &lines, &frame, path).map_err(err)
}

/// One method's lines: its name, the bits it sent and `R_sum` at its measured distortion.
type Series = (String, Points, Points);

/// Every line of the plot, as measured (points that cannot go on a log axis included).
struct Lines {
    series: Vec<Series>,
    r_in: Points,
    r_sum: Points,
}

impl Lines {
    fn of(report: &Report) -> Self {
        let mut series: Vec<Series> = Vec::new();
        for m in &report.methods {
            let sent = m
                .steps
                .iter()
                .map(|s| (s.step as f64, s.sent_per_coordinate()))
                .collect();
            let bound = m
                .steps
                .iter()
                .map(|s| (s.step as f64, s.r_sum_per_coordinate()))
                .collect();
            series.push((m.name.clone(), sent, bound));
        }
        let r_in: Vec<(f64, f64)> = report
            .statistics
            .iter()
            .map(|s| (s.step as f64, s.r_in_sign))
            .collect();
        let r_sum: Vec<(f64, f64)> = report
            .statistics
            .iter()
            .map(|s| (s.step as f64, s.r_sum_sign))
            .collect();
        Lines {
            series,
            r_in,
            r_sum,
        }
    }

    /// The least and greatest plottable rate, `None` when there is none.
    fn rate_range(&self) -> Option<(f64, f64)> {
        let all = self
            .series
            .iter()
            .flat_map(|(_, a, b)| a.iter().chain(b))
            .chain(&self.r_in)
            .chain(&self.r_sum)
            .map(|p| p.1)
            .filter(plottable);
        let (lo, hi) = all.fold((f64::INFINITY, 0.0f64), |(l, h), v| (l.min(v), h.max(v)));
        (lo.is_finite() && hi > 0.0).then_some((lo, hi))
    }
}

/// The axes' ranges and how many step labels the x axis gets.
struct Frame {
    x: Range<f64>,
    y: Range<f64>,
    x_labels: usize,
}

type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, LogCoord<f64>>>;

fn plottable(v: &f64) -> bool {
    v.is_finite() && *v > 0.0
}

/// The points of `v` a log axis can show.
fn finite(v: &[(f64, f64)]) -> Points {
    v.iter().copied().filter(|p| plottable(&p.1)).collect()
}

fn render(workers: usize, lines: &Lines, frame: &Frame, path: &Path) -> Result<(), String> {
    let root = BitMapBackend::new(path, (1200, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let caption =
        format!("Bits per coordinate (all K = {workers} workers) vs rate-distortion bounds");
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(frame.x.clone(), frame.y.clone().log_scale())
        .map_err(|e| e.to_string())?;
    draw_mesh(&mut chart, frame.x_labels)?;
    for (i, series) in lines.series.iter().enumerate() {
        draw_method(&mut chart, PALETTE[i % PALETTE.len()], series)?;
    }
    for (label, data, dashed) in [
        (
            "R_in(D_sign), dashed: ideal quantization",
            finite(&lines.r_in),
            true,
        ),
        (
            "R_sum(D_sign): theoretical minimum",
            finite(&lines.r_sum),
            false,
        ),
    ] {
        draw_reference(&mut chart, label, &data, dashed)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| e.to_string())?;
    root.draw(&Text::new(
        "dashed/crosses: R_sum(D) at each method's own measured distortion",
        (90, 740),
        ("sans-serif", 14),
    ))
    .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

fn draw_mesh(chart: &mut Chart<'_, '_>, x_labels: usize) -> Result<(), String> {
    chart
        .configure_mesh()
        .x_desc("training step")
        .y_desc("bits per coordinate, summed over workers")
        .x_labels(x_labels)
        .x_label_formatter(&|x| {
            // Only whole steps get a label (and never "-0").
            if (x - x.round()).abs() < 1e-9 {
                format!("{}", x.round() as i64)
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| {
            let s = format!("{y:.3}");
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        })
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(|e| e.to_string())
}

/// One method's sent bits (solid, circles, in the legend) and bound (dashed, crosses).
fn draw_method(chart: &mut Chart<'_, '_>, color: RGBColor, series: &Series) -> Result<(), String> {
    let (name, sent, bound) = series;
    let sent = finite(sent);
    chart
        .draw_series(LineSeries::new(sent.clone(), color.stroke_width(2)))
        .map_err(|e| e.to_string())?
        .label(format!("{name}: sent"))
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(2)));
    chart
        .draw_series(sent.iter().map(|&p| Circle::new(p, 4, color.filled())))
        .map_err(|e| e.to_string())?;
    let bound = finite(bound);
    chart
        .draw_series(DashedLineSeries::new(
            bound.clone(),
            6,
            4,
            color.stroke_width(1),
        ))
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(
            bound
                .iter()
                .map(|&p| Cross::new(p, 4, color.stroke_width(1))),
        )
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// One of Fig. 7's black reference lines, with triangles and a legend entry.
fn draw_reference(
    chart: &mut Chart<'_, '_>,
    label: &str,
    data: &Points,
    dashed: bool,
) -> Result<(), String> {
    let style = BLACK.stroke_width(2);
    if dashed {
        chart
            .draw_series(DashedLineSeries::new(data.clone(), 10, 6, style))
            .map_err(|e| e.to_string())?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], style));
    } else {
        chart
            .draw_series(LineSeries::new(data.clone(), style))
            .map_err(|e| e.to_string())?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], style));
    }
    chart
        .draw_series(
            data.iter()
                .map(|&p| TriangleMarker::new(p, 5, BLACK.filled())),
        )
        .map_err(|e| e.to_string())?;
    Ok(())
}
