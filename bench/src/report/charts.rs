//! Charts with plotters, each written as SVG (inlined in report.html) and PNG. Every chart has
//! a title saying what was measured and a subtitle saying where and how many times.
//!
//! Text needs a TrueType font (ab_glyph, no system libraries): the first of the usual
//! DejaVu/Liberation paths, or any .ttf under /usr/share/fonts. Without one no chart is drawn
//! and the report says so.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::results::{Record, Results};
use crate::stats::{median, quantile};

const W: u32 = 1000;
const H: u32 = 560;

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("no TrueType font found (apt-get install fonts-dejavu-core); charts skipped")]
    NoFont,
    #[error("drawing {chart}: {message}")]
    Draw { chart: String, message: String },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A chart that was written: `<stem>.svg` and `<stem>.png` in the report directory.
#[derive(Debug, Clone)]
pub struct Chart {
    pub stem: String,
    pub title: String,
    pub caption: String,
}

const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Register a font for "sans-serif" once; false when none was found.
fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let mut candidates: Vec<PathBuf> = FONT_PATHS.iter().map(PathBuf::from).collect();
        if let Ok(w) = std::fs::read_dir("/usr/share/fonts") {
            let mut stack: Vec<PathBuf> = w.flatten().map(|e| e.path()).collect();
            while let Some(p) = stack.pop() {
                if p.is_dir() {
                    stack.extend(std::fs::read_dir(&p).into_iter().flatten().flatten().map(|e| e.path()));
                } else if p.extension().is_some_and(|e| e == "ttf") {
                    candidates.push(p);
                }
            }
        }
        for p in candidates {
            let Ok(bytes) = std::fs::read(&p) else { continue };
            // plotters keeps fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, bytes);
                tracing::debug!(font = %p.display(), "chart font");
                return true;
            }
        }
        false
    })
}

/// A fixed colour per backend, the same in every chart.
pub fn color(backend: &str) -> RGBColor {
    match backend {
        "process" => RGBColor(110, 110, 110),
        "twinbox-container" => RGBColor(31, 119, 180),
        "runc" => RGBColor(255, 127, 14),
        "crun" => RGBColor(44, 160, 44),
        "twinbox-microvm" => RGBColor(148, 103, 189),
        "twinbox-microvm-snapshot" => RGBColor(227, 119, 194),
        "qemu-microvm" => RGBColor(214, 39, 40),
        "firecracker" => RGBColor(140, 86, 75),
        _ => RGBColor(23, 190, 207),
    }
}

type DrawResult = Result<(), String>;

/// An x axis of named categories at 0, 1, 2, …, each labelled with its name.
struct Categories(Vec<String>);

impl Ranged for Categories {
    type FormatOption = plotters::coord::ranged1d::NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let span = self.0.len().max(1) as f64;
        limit.0 + ((v + 0.5) / span * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: plotters::coord::ranged1d::KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        (0..self.0.len()).map(|i| i as f64).collect()
    }

    fn range(&self) -> std::ops::Range<f64> {
        -0.5..self.0.len() as f64 - 0.5
    }
}

impl plotters::coord::ranged1d::ValueFormatter<f64> for Categories {
    fn format_ext(&self, value: &f64) -> String {
        let i = value.round();
        if (value - i).abs() < 1e-6 && i >= 0.0 {
            self.0.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    }
}

fn e2s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Title and subtitle on top; the rest of the area for the chart.
fn header<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    sub: &str,
) -> Result<DrawingArea<DB, Shift>, String> {
    root.fill(&WHITE).map_err(e2s)?;
    let lines: Vec<&str> = sub.split('\n').collect();
    let (top, body) = root.split_vertically(44 + 18 * lines.len() as u32);
    top.draw(&Text::new(title.to_owned(), (16, 10), ("sans-serif", 22).into_font().style(FontStyle::Bold)))
        .map_err(e2s)?;
    for (i, l) in lines.iter().enumerate() {
        let style = ("sans-serif", 13).into_font().color(&RGBColor(80, 80, 80));
        top.draw(&Text::new(l.to_string(), (16, 38 + 18 * i as i32), style)).map_err(e2s)?;
    }
    Ok(body)
}

/// Latency distribution per backend: every run a dot, the box p25–p75, the bar the median.
fn strip<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    sub: &str,
    unit: &str,
    records: &[&Record],
) -> DrawResult {
    let body = header(root, title, sub)?;
    let ymax = records.iter().flat_map(|r| r.samples.iter().copied()).fold(0.0_f64, f64::max).max(1e-3) * 1.12;
    let names: Vec<String> = records.iter().map(|r| r.backend.clone()).collect();
    let mut chart = ChartBuilder::on(&body)
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(Categories(names.to_vec()), 0.0..ymax)
        .map_err(e2s)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(RGBColor(245, 245, 245))
        .y_desc(unit)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 14))
        .draw()
        .map_err(e2s)?;
    for (i, r) in records.iter().enumerate() {
        let c = color(&r.backend);
        let x = i as f64;
        let n = r.samples.len();
        chart
            .draw_series(r.samples.iter().enumerate().map(|(j, &v)| {
                let jitter = ((j as f64 * 0.618_034).fract() - 0.5) * 0.5;
                Circle::new((x + jitter, v), 2, c.mix(0.55).filled())
            }))
            .map_err(e2s)?;
        if n == 0 {
            continue;
        }
        let (q1, q3, med) = (quantile(&r.samples, 0.25), quantile(&r.samples, 0.75), median(&r.samples));
        chart.draw_series([Rectangle::new([(x - 0.3, q1), (x + 0.3, q3)], c.stroke_width(2))]).map_err(e2s)?;
        chart
            .draw_series([PathElement::new(vec![(x - 0.36, med), (x + 0.36, med)], BLACK.stroke_width(3))])
            .map_err(e2s)?;
        chart
            .draw_series([Text::new(
                format!("median {} {unit}", super::num(med)),
                (x - 0.3, q3 + ymax * 0.045),
                ("sans-serif", 14).into_font(),
            )])
            .map_err(e2s)?;
    }
    body.draw(&Text::new(
        "dot: one run · box: 25th–75th percentile · black bar: median".to_owned(),
        (80, 4),
        ("sans-serif", 12).into_font().color(&RGBColor(80, 80, 80)),
    ))
    .map_err(e2s)?;
    Ok(())
}

/// Bars per backend, stacked from `parts` (label, colour, value per backend).
fn bars<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    sub: &str,
    unit: &str,
    names: &[String],
    parts: &[(String, RGBColor, Vec<f64>)],
) -> DrawResult {
    let body = header(root, title, sub)?;
    let k = names.len();
    let totals: Vec<f64> = (0..k).map(|i| parts.iter().map(|p| p.2[i].max(0.0)).sum()).collect();
    // Headroom above the tallest bar for its value and the legend, which would otherwise
    // cover the tallest bar's top wherever it stands.
    let ymax = totals.iter().copied().fold(0.0_f64, f64::max).max(1e-3) * 1.4;
    let mut chart = ChartBuilder::on(&body)
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(72)
        .build_cartesian_2d(Categories(names.to_vec()), 0.0..ymax)
        .map_err(e2s)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(RGBColor(245, 245, 245))
        .y_desc(unit)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 14))
        .draw()
        .map_err(e2s)?;
    let mut base = vec![0.0; k];
    for (label, c, values) in parts {
        let c = *c;
        let rects: Vec<_> = (0..k)
            .map(|i| {
                let v = values[i].max(0.0);
                let r = Rectangle::new([(i as f64 - 0.3, base[i]), (i as f64 + 0.3, base[i] + v)], c.filled());
                base[i] += v;
                r
            })
            .collect();
        chart
            .draw_series(rects)
            .map_err(e2s)?
            .label(label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled()));
    }
    chart
        .draw_series((0..k).map(|i| {
            Text::new(
                format!("{} {unit}", super::num(totals[i])),
                (i as f64 - 0.2, totals[i] + ymax * 0.04),
                ("sans-serif", 14).into_font(),
            )
        }))
        .map_err(e2s)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(e2s)?;
    Ok(())
}

/// One line per backend, y against instance count.
fn lines<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    sub: &str,
    unit: &str,
    records: &[&Record],
) -> DrawResult {
    let body = header(root, title, sub)?;
    let n = records.iter().map(|r| r.samples.len()).max().unwrap_or(1).max(2);
    let ymin = records.iter().flat_map(|r| r.samples.iter().copied()).fold(0.0_f64, f64::min);
    let top = records.iter().flat_map(|r| r.samples.iter().copied()).fold(0.0_f64, f64::max).max(1e-3);
    // Headroom for the legend (a row of ~20 px per backend in the upper left): every point
    // stays below it, so none is hidden (a slow first launch at N = 1 was).
    let plot_px = (f64::from(body.dim_in_pixel().1) - 44.0 - 32.0).max(100.0);
    let legend = ((records.len() as f64 * 20.0 + 24.0) / plot_px).min(0.6);
    let ymax = ymin + (top - ymin) / (1.0 - legend);
    let mut chart = ChartBuilder::on(&body)
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(1.0..n as f64, ymin..ymax)
        .map_err(e2s)?;
    chart
        .configure_mesh()
        .x_desc("instances running (N)")
        // One label per N up to 11, so a short run does not repeat rounded labels (1 1 2 2).
        .x_labels(n.min(11))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .light_line_style(RGBColor(245, 245, 245))
        .y_desc(unit)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 14))
        .draw()
        .map_err(e2s)?;
    for r in records {
        let c = color(&r.backend);
        chart
            .draw_series(LineSeries::new(
                r.samples.iter().enumerate().map(|(i, &v)| ((i + 1) as f64, v)),
                c.stroke_width(2),
            ))
            .map_err(e2s)?
            .label(r.backend.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3)));
        chart
            .draw_series(r.samples.iter().enumerate().map(|(i, &v)| Circle::new(((i + 1) as f64, v), 2, c.filled())))
            .map_err(e2s)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(e2s)?;
    Ok(())
}

/// Ratios to the bare process: a bar per backend and loop (median), a whisker for the
/// 10th–90th percentile, a line at 1.
fn ratios<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    sub: &str,
    names: &[String],
    series: &[(String, RGBColor, Vec<Vec<f64>>)],
) -> DrawResult {
    let body = header(root, title, sub)?;
    let k = names.len();
    let ymax = series
        .iter()
        .flat_map(|s| s.2.iter().map(|v| quantile(v, 0.9)))
        .filter(|v| v.is_finite())
        .fold(1.0_f64, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(&body)
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(Categories(names.to_vec()), 0.0..ymax)
        .map_err(e2s)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(RGBColor(245, 245, 245))
        .y_desc("time in backend / time as bare process")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 14))
        .draw()
        .map_err(e2s)?;
    let m = series.len().max(1) as f64;
    let width = 0.7 / m;
    for (si, (label, c, per_backend)) in series.iter().enumerate() {
        let c = *c;
        let off = -0.35 + width * si as f64;
        let mut bars = Vec::new();
        let mut whiskers = Vec::new();
        let mut texts = Vec::new();
        for (i, v) in per_backend.iter().enumerate() {
            if v.is_empty() {
                continue;
            }
            let x0 = i as f64 + off + 0.02;
            let x1 = i as f64 + off + width - 0.02;
            let med = median(v);
            bars.push(Rectangle::new([(x0, 0.0), (x1, med)], c.filled()));
            let xm = (x0 + x1) / 2.0;
            whiskers
                .push(PathElement::new(vec![(xm, quantile(v, 0.1)), (xm, quantile(v, 0.9))], BLACK.stroke_width(2)));
            texts.push(Text::new(format!("{med:.3}"), (x0, med + ymax * 0.04), ("sans-serif", 13).into_font()));
        }
        chart
            .draw_series(bars)
            .map_err(e2s)?
            .label(label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled()));
        chart.draw_series(whiskers).map_err(e2s)?;
        chart.draw_series(texts).map_err(e2s)?;
    }
    chart
        .draw_series([PathElement::new(vec![(-0.5, 1.0), (k as f64 - 0.5, 1.0)], BLACK.mix(0.6).stroke_width(1))])
        .map_err(e2s)?
        .label("bare process = 1")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(1)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(e2s)?;
    Ok(())
}

/// Costs relative to the bare process, one group of bars per backend and one bar per metric,
/// on a log scale (a VM's start is a hundred times the process's, its compute loop the same).
fn costs<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    sub: &str,
    reference: &str,
    names: &[String],
    series: &[(String, RGBColor, Vec<Option<f64>>)],
) -> DrawResult {
    let body = header(root, title, sub)?;
    // The legend in a column of its own at the right: inside the plot it would hide bars.
    let (plot, legend) = body.split_horizontally(body.dim_in_pixel().0.saturating_sub(250));
    let k = names.len();
    let values = series.iter().flat_map(|s| s.2.iter().flatten().copied());
    let (lo, hi) = values.fold((1.0_f64, 1.0_f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (ymin, ymax) = (lo * 0.5, hi * 4.0);
    let mut chart = ChartBuilder::on(&plot)
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(Categories(names.to_vec()), (ymin..ymax).log_scale())
        .map_err(e2s)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(RGBColor(245, 245, 245))
        .y_desc(format!("cost ÷ {reference}'s (log scale; more is worse)"))
        .y_label_formatter(&|v| format!("{v}×"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 14))
        .draw()
        .map_err(e2s)?;
    let m = series.len().max(1) as f64;
    let width = 0.84 / m;
    for (si, (_, c, per_backend)) in series.iter().enumerate() {
        let c = *c;
        let off = -0.42 + width * si as f64;
        let bars: Vec<_> = per_backend
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let v = (*v)?;
                let x0 = i as f64 + off + 0.005;
                Some(Rectangle::new([(x0, ymin), (x0 + width - 0.01, v)], c.filled()))
            })
            .collect();
        chart.draw_series(bars).map_err(e2s)?;
    }
    chart
        .draw_series([PathElement::new(vec![(-0.5, 1.0), (k as f64 - 0.5, 1.0)], BLACK.mix(0.6).stroke_width(1))])
        .map_err(e2s)?;
    let font = ("sans-serif", 13).into_font();
    let row = |i: usize| 40 + 22 * i as i32;
    for (i, (label, c, _)) in series.iter().enumerate() {
        legend.draw(&Rectangle::new([(8, row(i) - 6), (22, row(i) + 6)], c.filled())).map_err(e2s)?;
        legend.draw(&Text::new(label.clone(), (30, row(i) - 7), font.clone())).map_err(e2s)?;
    }
    let last = row(series.len());
    legend.draw(&PathElement::new(vec![(6, last), (24, last)], BLACK.stroke_width(1))).map_err(e2s)?;
    legend.draw(&Text::new(format!("{reference} = 1×"), (30, last - 7), font)).map_err(e2s)?;
    Ok(())
}

/// Draw one chart into `<dir>/<stem>.svg` and `<stem>.png` with the same drawing code.
macro_rules! emit {
    ($dir:expr, $stem:expr, |$root:ident| $draw:expr) => {{
        let svg_path = $dir.join(format!("{}.svg", $stem));
        let png_path = $dir.join(format!("{}.png", $stem));
        let draw_err = |message: String| ChartError::Draw { chart: $stem.to_string(), message };
        let mut svg = String::new();
        {
            let $root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
            $draw.map_err(draw_err)?;
            $root.present().map_err(|e| draw_err(e.to_string()))?;
        }
        std::fs::write(&svg_path, svg).map_err(|source| ChartError::Write { path: svg_path.clone(), source })?;
        {
            let $root = BitMapBackend::new(&png_path, (W, H)).into_drawing_area();
            $draw.map_err(draw_err)?;
            $root.present().map_err(|e| draw_err(e.to_string()))?;
        }
    }};
}

/// "on host (PVM, kernel 6.x) at rev abc1234"
fn where_(r: &Results) -> String {
    let c = &r.context;
    format!(
        "on {} ({}, {} CPUs, kernel {}, {}) at rev {}{}",
        c.host,
        c.virtualization.kind,
        c.cpus,
        c.kernel,
        c.cgroup_layout,
        c.rev,
        if c.dirty { "+changes" } else { "" }
    )
}

fn measured<'a>(r: &'a Results, scenario: &str, metric: &str) -> Vec<&'a Record> {
    r.records.iter().filter(|x| x.scenario == scenario && x.metric == metric && !x.samples.is_empty()).collect()
}

/// Draw every chart the results have data for into `dir`.
pub fn draw_all(r: &Results, dir: &Path) -> Result<Vec<Chart>, ChartError> {
    if !font_ready() {
        return Err(ChartError::NoFont);
    }
    let mut out = Vec::new();
    let s = &r.settings;
    let at = where_(r);

    let g = super::glance::glance(r);
    if !g.rows.is_empty() {
        let names: Vec<String> =
            g.columns.iter().skip(1).map(|c| c.label().replace(" (nested, emulated)", "*")).collect();
        // One colour per metric of glance::METRICS (in its order), pairs of a scenario in shades.
        const PALETTE: [RGBColor; 13] = [
            RGBColor(31, 119, 180),
            RGBColor(174, 199, 232),
            RGBColor(23, 190, 207),
            RGBColor(148, 103, 189),
            RGBColor(255, 127, 14),
            RGBColor(44, 160, 44),
            RGBColor(152, 223, 138),
            RGBColor(214, 39, 40),
            RGBColor(255, 152, 150),
            RGBColor(227, 119, 194),
            RGBColor(140, 86, 75),
            RGBColor(196, 156, 148),
            RGBColor(127, 127, 127),
        ];
        let colour = |label: &str| {
            let i = super::glance::METRICS.iter().position(|m| m.0 == label).unwrap_or(0);
            PALETTE[i % PALETTE.len()]
        };
        let series: Vec<(String, RGBColor, Vec<Option<f64>>)> = g
            .rows
            .iter()
            .map(|(label, costs)| (label.to_string(), colour(label), costs.iter().skip(1).copied().collect()))
            .collect();
        let reference = g.reference_label();
        let title = format!("The trade-off at a glance: each backend's cost against {reference}");
        let sub = format!(
            "each metric's median ÷ {reference}'s in the same run; throughput, IOPS and launch rate turned round\n{}{at}",
            if g.columns.iter().any(|c| c.nested) {
                format!("*: microVMs measured under emulation in a nested L1, ÷ {reference}'s of that run\n")
            } else {
                String::new()
            }
        );
        let stem = "glance";
        emit!(dir, stem, |root| costs(&root, &title, &sub, &reference, &names, &series));
        out.push(Chart { stem: stem.into(), title, caption: sub });
    }

    // The user's own image (`--ready`): what its instances are, and the path its requests ask for.
    let ready: Option<crate::ready::ReadySpec> = s.ready.as_deref().and_then(|t| t.parse().ok());
    let path = match &ready {
        Some(crate::ready::ReadySpec::Http { path, .. }) => path.clone(),
        _ => "/".to_owned(),
    };
    let own = ready.as_ref().map(|_| format!("{}'s own command", s.image));
    for (metric, title, what) in [
        ("time_to_workload", "Start latency: time to workload", "launch → first byte from `hello spin 0`".to_owned()),
        ("end_to_end", "Start latency: end to end", "launch → exit of `hello true`, instance removed".to_owned()),
        (
            "time_to_ready",
            "Start latency: time to ready",
            format!(
                "launch of {} → ready ({})",
                own.as_deref().unwrap_or("the image"),
                ready.as_ref().map(ToString::to_string).unwrap_or_default()
            ),
        ),
    ] {
        let recs = measured(r, "start", metric);
        if recs.is_empty() {
            continue;
        }
        let stem = format!("start-{}", metric.replace('_', "-"));
        let runs = recs.iter().map(|x| x.samples.len()).max().unwrap_or(0);
        let sub =
            format!("{what}; {runs} runs per backend after {} warm-up, interleaved round by round\n{at}", s.warmup);
        emit!(dir, stem, |root| strip(&root, title, &sub, "ms", &recs));
        out.push(Chart { stem, title: title.into(), caption: sub });
    }

    let pss = measured(r, "memory", "pss_per_instance");
    if !pss.is_empty() {
        let names: Vec<String> = pss.iter().map(|x| x.backend.clone()).collect();
        let kernel: Vec<f64> = names
            .iter()
            .map(|n| r.record(n, "memory", "kernel_per_instance").map(|x| median(&x.samples)).unwrap_or(0.0))
            .collect();
        let parts = vec![
            (
                "PSS of processes left running".to_owned(),
                RGBColor(31, 119, 180),
                pss.iter().map(|x| median(&x.samples)).collect(),
            ),
            ("kernel: Slab + PageTables + KernelStack + Percpu growth".to_owned(), RGBColor(255, 127, 14), kernel),
        ];
        let title = "Memory per idle instance";
        let sub = format!(
            "{} idle {} instances per backend; PSS median per instance + kernel growth / N (median of {} \
             rounds)\n{at}",
            s.instances,
            own.as_ref().map_or_else(|| "`hello sleep`".to_owned(), |_| format!("ready {}", s.image)),
            s.memory_rounds
        );
        let stem = "memory";
        emit!(dir, stem, |root| bars(&root, title, &sub, "KiB", &names, &parts));
        out.push(Chart { stem: stem.into(), title: title.into(), caption: sub });
    }

    let nth = match &own {
        Some(_) => format!("launch of the N-th instance of {} until it is ready", s.image),
        None => "launch of the N-th `hello sleep` instance".to_owned(),
    };
    for (metric, title, unit, what) in [
        ("launch_latency", "Density: launch latency vs instances running", "ms", nth.as_str()),
        (
            "host_memory",
            "Density: host memory vs instances running",
            "MiB",
            "PSS of the instances' processes + kernel growth",
        ),
    ] {
        let recs = measured(r, "density", metric);
        if recs.is_empty() {
            continue;
        }
        let stem = format!("density-{}", metric.replace('_', "-"));
        let passes = match s.density_passes {
            1 => "once".to_owned(),
            2 => "the mean of 2 passes".to_owned(),
            n => format!("the median of {n} passes"),
        };
        let sub = format!("{what}; up to {} instances per backend, started one after another, {passes}\n{at}", s.max);
        emit!(dir, stem, |root| lines(&root, title, &sub, unit, &recs));
        out.push(Chart { stem, title: title.into(), caption: sub });
    }

    for (metric, title, what, unit) in [
        (
            "latency_keepalive",
            "Network: request latency through a published port",
            format!(
                "GET {path} over one kept-alive connection to 127.0.0.1:PORT, each backend published the way its users do"
            ),
            "µs",
        ),
        (
            // Only for a server that closes every connection (no kept-alive figure).
            "latency_new_connection",
            "Network: request latency through a published port, a new connection each",
            format!("connect + GET {path} + close to 127.0.0.1:PORT, each backend published the way its users do"),
            "µs",
        ),
        (
            "time_to_ready",
            "Network: time to ready",
            format!(
                "launch of {} → first HTTP response through the port",
                own.as_deref().unwrap_or("`hello serve`")
            ),
            "ms",
        ),
    ] {
        let recs = measured(r, "net", metric);
        if recs.is_empty() || (metric == "latency_new_connection" && !measured(r, "net", "latency_keepalive").is_empty())
        {
            continue;
        }
        let stem = format!("net-{}", metric.replace('_', "-"));
        let sub = format!("{what}\n{at}");
        emit!(dir, stem, |root| strip(&root, title, &sub, unit, &recs));
        out.push(Chart { stem, title: title.into(), caption: sub });
    }
    let tput = measured(r, "net", "throughput");
    if !tput.is_empty() {
        let names: Vec<String> = tput.iter().map(|x| x.backend.clone()).collect();
        let parts = vec![(
            "one large response".to_owned(),
            RGBColor(44, 160, 44),
            tput.iter().map(|x| median(&x.samples)).collect(),
        )];
        let title = "Network: throughput through a published port";
        let sub = format!("median MB/s of one large HTTP response per round from 127.0.0.1:PORT\n{at}");
        let stem = "net-throughput";
        emit!(dir, stem, |root| bars(&root, title, &sub, "MB/s", &names, &parts));
        out.push(Chart { stem: stem.into(), title: title.into(), caption: sub });
    }

    let compute = measured(r, "cpu", "compute_ratio");
    if !compute.is_empty() {
        let names: Vec<String> = compute.iter().map(|x| x.backend.clone()).collect();
        let mut series = vec![(
            "compute loop (hello spin)".to_owned(),
            RGBColor(31, 119, 180),
            compute.iter().map(|x| x.samples.clone()).collect::<Vec<_>>(),
        )];
        let sys: Vec<Vec<f64>> = names
            .iter()
            .map(|n| r.record(n, "cpu", "syscalls_ratio").map(|x| x.samples.clone()).unwrap_or_default())
            .collect();
        if sys.iter().any(|v| !v.is_empty()) {
            series.push(("syscall loop (hello syscalls: getppid)".to_owned(), RGBColor(255, 127, 14), sys));
        }
        let title = "CPU cost: the same loop inside each backend vs the bare process";
        let sub = format!(
            "median ratio of the loops' own times, whisker 10th–90th percentile; {} rounds, loops calibrated to {} ms bare\n{at}",
            s.cpu_runs, s.cpu_target_ms
        );
        let stem = "cpu";
        emit!(dir, stem, |root| ratios(&root, title, &sub, &names, &series));
        out.push(Chart { stem: stem.into(), title: title.into(), caption: sub });
    }
    Ok(out)
}
