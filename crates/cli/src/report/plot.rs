//! Line charts of the report, each written as SVG and PNG with `plotters`.

use anyhow::{Result, anyhow, bail};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// One line: a method across bit widths, or a cell across k_chunk.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Horizontal reference lines (the full-precision model).
    pub levels: Vec<(String, f64)>,
    /// A gray dashed line under the series (the Pareto front).
    pub front: Option<Vec<(f64, f64)>>,
    /// A logarithmic y axis (perplexities spanning an order of magnitude).
    pub log_y: bool,
}

const SIZE: (u32, u32) = (960, 600);

/// Fonts plotters measures text with: a system DejaVu Sans, or `RECOUP_FONT`.
fn register_font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let candidates = std::env::var("RECOUP_FONT").into_iter().chain(
            [
                "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/TTF/DejaVuSans.ttf",
                "/usr/share/fonts/dejavu/DejaVuSans.ttf",
                "/Library/Fonts/Arial.ttf",
                "C:\\Windows\\Fonts\\arial.ttf",
            ]
            .map(String::from),
        );
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{path} is not a TrueType font"));
            }
        }
        Err("no TrueType font found for the plots' text; set RECOUP_FONT to a .ttf file".into())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn color(i: usize) -> RGBColor {
    // Distinguishable on white, in the order methods first appear.
    const COLORS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(23, 190, 207),
    ];
    COLORS[i % COLORS.len()]
}

/// Writes `stem.svg` and `stem.png`.
pub fn write(chart: &Chart, stem: &Path) -> Result<()> {
    register_font()?;
    // A log axis is drawn as ln(y) on a linear one, labelled with y itself: plotters' own
    // log axis labels only powers of ten, too few for perplexities between 20 and 200.
    let to_axis = |y: f64| if chart.log_y { y.ln() } else { y };
    let mapped = |pts: &[(f64, f64)]| {
        pts.iter()
            .map(|&(x, y)| (x, to_axis(y)))
            .collect::<Vec<_>>()
    };
    let axis_chart = AxisChart {
        series: chart
            .series
            .iter()
            .map(|s| (s.name.as_str(), mapped(&s.points)))
            .collect(),
        levels: chart
            .levels
            .iter()
            .map(|(n, y)| (n.as_str(), to_axis(*y)))
            .collect(),
        front: chart.front.as_deref().map(mapped),
    };
    let points = axis_chart
        .series
        .iter()
        .flat_map(|s| s.1.iter())
        .chain(axis_chart.front.iter().flatten());
    let ys = points
        .clone()
        .map(|p| p.1)
        .chain(axis_chart.levels.iter().map(|l| l.1));
    let (y0, y1) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    let (x0, x1) = points.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
        (a.min(p.0), b.max(p.0))
    });
    if !(y0.is_finite() && x0.is_finite()) {
        bail!("chart '{}' has no points", chart.title);
    }
    // Margins so that no point sits on the frame.
    let dx = ((x1 - x0) * 0.08).max(0.1);
    let dy = ((y1 - y0) * 0.1).max(1e-3);
    let (x, y) = (x0 - dx..x1 + dx, y0 - dy..y1 + dy);
    let svg = stem.with_extension("svg");
    let png = stem.with_extension("png");
    let err = |what: &Path, e: String| anyhow!("cannot draw {}: {e}", what.display());
    draw(
        SVGBackend::new(&svg, SIZE).into_drawing_area(),
        chart,
        &axis_chart,
        x.clone(),
        y.clone(),
    )
    .map_err(|e| err(&svg, e))?;
    draw(
        BitMapBackend::new(&png, SIZE).into_drawing_area(),
        chart,
        &axis_chart,
        x,
        y,
    )
    .map_err(|e| err(&png, e))?;
    Ok(())
}

/// A chart's lines in axis units.
struct AxisChart<'a> {
    series: Vec<(&'a str, Vec<(f64, f64)>)>,
    levels: Vec<(&'a str, f64)>,
    front: Option<Vec<(f64, f64)>>,
}

/// A tick label with enough digits to tell neighbouring ticks apart.
fn tick(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    chart: &Chart,
    lines: &AxisChart,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| format!("{e:?}");
    root.fill(&WHITE).map_err(e)?;
    let mut ctx = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 26))
        .margin(18)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x.clone(), y)
        .map_err(e)?;
    let log_y = chart.log_y;
    let y_label = move |v: &f64| tick(if log_y { v.exp() } else { *v });
    ctx.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .light_line_style(WHITE.mix(0.0))
        .y_labels(10)
        .y_label_formatter(&y_label)
        .draw()
        .map_err(e)?;
    if let Some(front) = &lines.front {
        let style = ShapeStyle::from(&RGBColor(160, 160, 160)).stroke_width(9);
        ctx.draw_series(LineSeries::new(front.iter().copied(), style))
            .map_err(e)?
            .label("Pareto front")
            .legend(move |(lx, ly)| PathElement::new([(lx, ly), (lx + 24, ly)], style));
    }
    for (name, level) in &lines.levels {
        let style = ShapeStyle::from(&BLACK.mix(0.6)).stroke_width(2);
        ctx.draw_series(DashedLineSeries::new(
            [(x.start, *level), (x.end, *level)],
            8,
            6,
            style,
        ))
        .map_err(e)?
        .label(*name)
        .legend(move |(lx, ly)| PathElement::new([(lx, ly), (lx + 24, ly)], style));
    }
    for (i, (name, points)) in lines.series.iter().enumerate() {
        let c = color(i);
        let style = ShapeStyle::from(&c).stroke_width(3);
        ctx.draw_series(LineSeries::new(points.iter().copied(), style))
            .map_err(e)?
            .label(*name)
            .legend(move |(lx, ly)| PathElement::new([(lx, ly), (lx + 24, ly)], style));
        ctx.draw_series(points.iter().map(|&p| Circle::new(p, 5, c.filled())))
            .map_err(e)?;
    }
    ctx.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}
