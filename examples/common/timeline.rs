//! Timeline plots for the demo and the recovery bench: successful and failed calls per bucket of
//! time (100 ms), chaos events shaded with a short label, rebuilds of the client's inner
//! cluster client marked — written as SVG with `plotters` (a dev-dependency; no font files
//! needed, the SVG backend writes `<text>` elements).
//!
//! Included with `#[path = "common/timeline.rs"] mod timeline;` (from `benches/`:
//! `#[path = "../examples/common/timeline.rs"]`).

use std::{
    io,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};
use tower_redis_cluster::Client;

/// The width of a bucket.
pub const BUCKET: Duration = Duration::from_millis(100);

/// What a plot shows. Times are offsets from the start of the plot.
pub struct Timeline {
    pub title: String,
    pub bucket: Duration,
    /// Calls per bucket; error series are drawn in red (then orange) against the right-hand
    /// axis, the others in blue (then green) against the left-hand one.
    pub series: Vec<Series>,
    /// Stretches of time shaded with a label on top, e.g. a chaos event from start to end.
    pub spans: Vec<Span>,
    /// Instants marked with a dashed line, labelled under the spans' labels, e.g. a rebuild.
    pub marks: Vec<Mark>,
}

/// Calls counted per bucket, drawn as calls per second.
pub struct Series {
    pub label: String,
    pub per_bucket: Vec<u64>,
    pub errors: bool,
}

/// A shaded stretch of time.
pub struct Span {
    pub from: Duration,
    pub to: Duration,
    pub label: String,
}

/// A marked instant.
pub struct Mark {
    pub at: Duration,
    pub label: String,
}

/// Successful and failed calls per bucket since `started`, counted from many tasks at once.
pub struct Counts {
    started: Instant,
    ok: Vec<AtomicU64>,
    errors: Vec<AtomicU64>,
}

impl Counts {
    /// Room for `span` of time from `started`; calls that end later are not counted.
    pub fn new(started: Instant, span: Duration) -> Counts {
        let buckets = span.as_millis().div_ceil(BUCKET.as_millis()).max(1) as usize;
        let zeros = || (0..buckets).map(|_| AtomicU64::new(0)).collect();
        Counts {
            started,
            ok: zeros(),
            errors: zeros(),
        }
    }

    /// Counts a call that ended at `at` (calls before the start or after the span are not).
    pub fn record_at(&self, at: Instant, ok: bool) {
        let Some(since) = at.checked_duration_since(self.started) else {
            return;
        };
        let bucket = (since.as_millis() / BUCKET.as_millis()) as usize;
        let counts = if ok { &self.ok } else { &self.errors };
        if let Some(count) = counts.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The successful and the failed calls per whole bucket up to `end`, as two series.
    pub fn series(&self, ok_label: &str, errors_label: &str, end: Instant) -> [Series; 2] {
        let since = end.saturating_duration_since(self.started);
        let buckets = (since.as_millis() / BUCKET.as_millis()) as usize;
        let take = |counts: &[AtomicU64]| -> Vec<u64> {
            counts
                .iter()
                .take(buckets)
                .map(|c| c.load(Ordering::Relaxed))
                .collect()
        };
        [
            Series {
                label: ok_label.to_string(),
                per_bucket: take(&self.ok),
                errors: false,
            },
            Series {
                label: errors_label.to_string(),
                per_bucket: take(&self.errors),
                errors: true,
            },
        ]
    }
}

/// Records when a client's generation changes, i.e. when its inner cluster client is rebuilt.
/// Stops when dropped.
pub struct Rebuilds {
    seen: Arc<Mutex<Vec<(Instant, u64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Rebuilds {
    /// Starts watching `client` (from a tokio runtime).
    pub fn watch(client: &Client) -> Rebuilds {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut status = client.rebuild_handle().subscribe();
        let mut generation = status.borrow_and_update().generation;
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                while status.changed().await.is_ok() {
                    let now = status.borrow_and_update().generation;
                    if now != generation {
                        generation = now;
                        seen.lock().unwrap().push((Instant::now(), now));
                    }
                }
            }
        });
        Rebuilds { seen, task }
    }

    /// The rebuilds so far, as marks relative to `origin` ("g3": generation 3 began).
    pub fn marks(&self, origin: Instant) -> Vec<Mark> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(at, generation)| Mark {
                at: at.saturating_duration_since(origin),
                label: format!("g{generation}"),
            })
            .collect()
    }
}

impl Drop for Rebuilds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes `timeline` to `path` as SVG (its directory is created if missing).
pub fn write_svg(path: &Path, timeline: &Timeline) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    draw(path, timeline).map_err(|e| io::Error::other(e.to_string()))
}

const FONT: &str = "sans-serif";
const SIZE: (u32, u32) = (1200, 500);
const OK_COLORS: [RGBColor; 2] = [RGBColor(31, 119, 180), RGBColor(44, 160, 44)];
const ERROR_COLORS: [RGBColor; 2] = [RGBColor(214, 39, 40), RGBColor(255, 127, 14)];
const SPAN_COLOR: RGBColor = RGBColor(120, 120, 120);
const MARK_COLOR: RGBColor = RGBColor(148, 103, 189);

/// Series colours: successes blue then green, errors red then orange.
fn colors(series: &[Series]) -> Vec<RGBColor> {
    let (mut oks, mut errors) = (0, 0);
    series
        .iter()
        .map(|s| {
            let (palette, n) = if s.errors {
                (&ERROR_COLORS, &mut errors)
            } else {
                (&OK_COLORS, &mut oks)
            };
            *n += 1;
            palette[(*n - 1) % palette.len()]
        })
        .collect()
}

/// How a legend entry's swatch is drawn.
enum Swatch {
    Line(ShapeStyle),
    Area,
}

fn draw(path: &Path, t: &Timeline) -> Result<(), Box<dyn std::error::Error>> {
    let bucket_s = t.bucket.as_secs_f64();
    let rate = |count: u64| count as f64 / bucket_s;
    // The busiest bucket, at least one call.
    let peak = |errors: bool| {
        t.series
            .iter()
            .filter(|s| s.errors == errors)
            .flat_map(|s| s.per_bucket.iter().copied())
            .max()
            .unwrap_or(0)
            .max(1)
    };
    let buckets = t
        .series
        .iter()
        .map(|s| s.per_bucket.len())
        .max()
        .unwrap_or(0);
    let end = (buckets as f64 * bucket_s)
        .max(
            t.spans
                .iter()
                .map(|s| s.to.as_secs_f64())
                .fold(0.0, f64::max),
        )
        .max(
            t.marks
                .iter()
                .map(|m| m.at.as_secs_f64())
                .fold(0.0, f64::max),
        )
        .max(bucket_s);
    // Headroom above the busiest bucket for the event labels.
    let (ok_top, errors_top) = (rate(peak(false)) * 1.3, rate(peak(true)) * 1.3);
    let colors = colors(&t.series);

    // The legend goes in the header, under the title, where it hides no data.
    let mut legend: Vec<(String, Swatch)> = t
        .series
        .iter()
        .zip(&colors)
        .map(|(s, c)| (s.label.clone(), Swatch::Line(c.stroke_width(2))))
        .collect();
    if !t.spans.is_empty() {
        legend.push(("event (start to end)".into(), Swatch::Area));
    }
    if !t.marks.is_empty() {
        legend.push((
            "gN: client rebuilt (generation N)".into(),
            Swatch::Line(MARK_COLOR.stroke_width(1)),
        ));
    }
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let label = TextStyle::from((FONT, 13).into_font());
    let mut placed = Vec::new();
    let (mut x, mut row) = (80, 0);
    for (text, swatch) in legend {
        let width = 30 + root.estimate_text_size(&text, &label)?.0 as i32;
        if x + width > SIZE.0 as i32 - 20 && x > 80 {
            (x, row) = (80, row + 1);
        }
        placed.push((x, 44 + 18 * row, text, swatch));
        x += width + 28;
    }
    let (header, body) = root.split_vertically(60 + 18 * row);
    header.draw(&Text::new(
        t.title.clone(),
        (SIZE.0 as i32 / 2, 12),
        TextStyle::from((FONT, 17).into_font()).pos(Pos::new(HPos::Center, VPos::Top)),
    ))?;
    for (x, y, text, swatch) in placed {
        match swatch {
            Swatch::Line(style) => header.draw(&PathElement::new([(x, y), (x + 24, y)], style))?,
            Swatch::Area => header.draw(&Rectangle::new(
                [(x, y - 6), (x + 24, y + 6)],
                SPAN_COLOR.mix(0.18).filled(),
            ))?,
        }
        header.draw(&Text::new(
            text,
            (x + 30, y),
            label.clone().pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }

    let mut chart = ChartBuilder::on(&body)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0.0..end, 0.0..ok_top)?
        .set_secondary_coord(0.0..end, 0.0..errors_top);
    let seconds = |v: &f64| {
        if (v - v.round()).abs() < 1e-6 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    };
    let whole = |v: &f64| format!("{v:.0}");
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc(format!(
            "seconds (one point per {} ms)",
            t.bucket.as_millis()
        ))
        .x_label_formatter(&seconds)
        .y_desc("successful calls/s")
        .y_label_formatter(&whole)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .light_line_style(BLACK.mix(0.03))
        .draw()?;
    // The errors' own scale, in red: a handful of errors must not vanish under thousands of
    // successes.
    let red = ERROR_COLORS[0];
    chart
        .configure_secondary_axes()
        .y_desc("failed calls/s")
        .y_label_formatter(&whole)
        .label_style((FONT, 13).into_font().color(&red))
        .axis_desc_style((FONT, 14).into_font().color(&red))
        .draw()?;

    // Events under the data, labels staggered over three rows so neighbours do not overlap.
    chart.draw_series(t.spans.iter().map(|s| {
        Rectangle::new(
            [(s.from.as_secs_f64(), 0.0), (s.to.as_secs_f64(), ok_top)],
            SPAN_COLOR.mix(0.18).filled(),
        )
    }))?;
    chart.draw_series(t.spans.iter().enumerate().map(|(i, s)| {
        EmptyElement::at((s.from.as_secs_f64(), ok_top))
            + Text::new(s.label.clone(), (3, 4 + 15 * (i as i32 % 3)), label.clone())
    }))?;
    // Rebuilds: a dashed line each, labelled under the event labels.
    for m in &t.marks {
        let x = m.at.as_secs_f64();
        chart.draw_series(DashedLineSeries::new(
            [(x, 0.0), (x, ok_top)],
            4,
            3,
            MARK_COLOR.stroke_width(1),
        ))?;
    }
    chart.draw_series(t.marks.iter().map(|m| {
        EmptyElement::at((m.at.as_secs_f64(), ok_top))
            + Text::new(
                m.label.clone(),
                (3, 50),
                (FONT, 12).into_font().color(&MARK_COLOR),
            )
    }))?;

    for (s, color) in t.series.iter().zip(colors) {
        let points = s
            .per_bucket
            .iter()
            .enumerate()
            .map(|(i, c)| ((i as f64 + 0.5) * bucket_s, rate(*c)));
        let series = LineSeries::new(points, color.stroke_width(2));
        if s.errors {
            chart.draw_secondary_series(series)?;
        } else {
            chart.draw_series(series)?;
        }
    }
    root.present()?;
    Ok(())
}

/// `cargo test --example demo --features test-util,tls timeline`
#[cfg(test)]
mod tests {
    /// Calls counted per bucket render to SVG with every label, the legend over two rows.
    #[test]
    fn writes_svg() {
        use super::*;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plots/timeline.svg");
        let origin = Instant::now();
        let end = origin + Duration::from_secs(30);
        let mut series = Vec::new();
        for (n, client) in ["Client (full stack)", "redis ClusterConnection"]
            .iter()
            .enumerate()
        {
            let counts = Counts::new(origin, Duration::from_secs(30));
            // A call every 10 ms; from 12 s down for 0.8 s (the second client 3 s), failing
            // for the first 0.3 s, hanging after.
            for ms in (0..30_000).step_by(10) {
                let down = (12_000..12_800 + 2_200 * n as u64).contains(&ms);
                if !down || ms < 12_300 {
                    counts.record_at(origin + Duration::from_millis(ms), !down);
                }
            }
            series.extend(counts.series(
                &format!("{client} ok/s"),
                &format!("{client} failed/s"),
                end,
            ));
        }
        assert_eq!(series[0].per_bucket.len(), 300);
        assert_eq!((series[0].per_bucket[0], series[1].per_bucket[0]), (10, 0));
        assert_eq!(
            (series[0].per_bucket[120], series[1].per_bucket[120]),
            (0, 10)
        );
        let timeline = Timeline {
            title: "synthetic".into(),
            bucket: BUCKET,
            series,
            spans: (0..5)
                .map(|i| Span {
                    from: Duration::from_secs(2 + 5 * i),
                    to: Duration::from_millis(3500 + 5000 * i),
                    label: format!("replace master {i}"),
                })
                .collect(),
            marks: vec![Mark {
                at: Duration::from_millis(12_300),
                label: "g2".into(),
            }],
        };
        write_svg(&path, &timeline).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        for label in [
            "synthetic",
            "replace master 4",
            "g2",
            "ClusterConnection failed/s",
        ] {
            assert!(svg.contains(label), "{label} is missing");
        }
    }
}
