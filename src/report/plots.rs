//! The per-round plots of the report (plotters, bitmap backend), with the
//! embedded font they draw their text in.

use anyhow::{Result, bail};
use greyfed_coordinator::metrics::RoundRecord;
use plotters::prelude::*;

use crate::preview;

/// Width and height of every plot, in pixels.
const PLOT_SIZE: (u32, u32) = (960, 480);
/// The font family the plots use (registered from the embedded font).
const FONT: &str = "sans-serif";

/// The embedded font: DejaVu Sans cut down to Latin-1 (licence:
/// `assets/fonts/LICENSE-DejaVu.txt`).
static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");

type DrawFn = fn(&[RoundRecord]) -> Result<Vec<u8>>;

/// A plot: id, title, caption, how to draw.
pub(super) type Plot = (&'static str, &'static str, &'static str, DrawFn);

/// The per-round plots of `rounds`: always accuracy, loss, bytes, stages
/// and survivors; then round time against training when participants
/// reported their training time; the privacy plot after accuracy when the
/// run used DP.
pub(super) fn plots(rounds: &[RoundRecord]) -> Vec<Plot> {
    let mut plots = vec![
        (
            "accuracy",
            "Accuracy per round",
            "Accuracy of each round's global model on the participants' test splits together \
             (and on the coordinator's test set with central evaluation).",
            plot_accuracy as DrawFn,
        ),
        (
            "loss",
            "Loss per round",
            "Mean test cross-entropy of each round's global model; the training loss where \
             participants report it (plain aggregation only).",
            plot_loss,
        ),
        (
            "bytes",
            "Bytes per round",
            "Frame bytes the coordinator received (up) and sent (down) during each round, \
             headers included.",
            plot_bytes,
        ),
        (
            "stages",
            "Time per stage",
            "Seconds of each round by stage, as measured at the coordinator: the secure \
             aggregation stages (masked includes local training), the evaluation, and the \
             rest of the round.",
            plot_stages,
        ),
        (
            "survivors",
            "Participants per round",
            "Participants asked to train (cohort), whose updates are in the sum (survivors), \
             that dropped out while training, and that evaluated.",
            plot_survivors,
        ),
    ];
    if rounds.iter().any(|r| r.train_cpu_secs.is_some()) {
        plots.push((
            "training",
            "Round time against the training in it",
            "Wall seconds of each round at the coordinator, and the CPU seconds the \
             participants' local training took, summed over them: spread over the cores the \
             participants could use, that is the floor a round cannot beat (summary.json's \
             round_overhead is the ratio).",
            plot_training,
        ));
    }
    if rounds.iter().any(|r| r.dp_epsilon.is_some()) {
        plots.insert(
            1,
            (
                "privacy",
                "Privacy spent per round",
                "Cumulative ε of participant-level differential privacy after each round (at \
                 the run's δ, in run.json): against whoever sees only the models, with the \
                 amplification of Poisson-sampled cohorts, and against the coordinator, which \
                 knows the cohorts (docs/privacy.md).",
                plot_privacy,
            ),
        );
    }
    plots
}

/// Registers the embedded font once; plotters draws no text without it.
fn ensure_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
            && plotters::style::register_font(FONT, FontStyle::Bold, FONT_BYTES).is_ok()
    });
    if ok {
        Ok(())
    } else {
        bail!("the embedded font could not be loaded")
    }
}

/// A line of a line chart.
struct Series {
    name: &'static str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

const BLUE_: RGBColor = RGBColor(31, 119, 180);
const ORANGE_: RGBColor = RGBColor(255, 127, 14);
const GREEN_: RGBColor = RGBColor(44, 160, 44);
const RED_: RGBColor = RGBColor(214, 39, 40);
const PURPLE_: RGBColor = RGBColor(148, 103, 189);
const GREY_: RGBColor = RGBColor(150, 150, 150);

/// Draws into an RGB buffer of [`PLOT_SIZE`] and encodes it as PNG.
fn render_png(
    draw: impl FnOnce(DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<()>,
) -> Result<Vec<u8>> {
    ensure_font()?;
    let (w, h) = PLOT_SIZE;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        draw(root.clone())?;
        root.present().map_err(plot_err)?;
    }
    preview::encode_png(w as usize, h as usize, png::ColorType::Rgb, &buf)
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e}")
}

/// Rounds as x values, and the x range that shows them all.
fn round_range(rounds: &[RoundRecord]) -> std::ops::Range<f64> {
    let first = rounds.iter().map(|r| r.round).min().unwrap_or(1) as f64;
    let last = rounds.iter().map(|r| r.round).max().unwrap_or(1) as f64;
    first - 0.5..last + 0.5
}

/// A chart over the rounds (x) and `y`, with the title, axes and mesh that
/// every plot of the report shares.
fn round_chart<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    title: &str,
    rounds: &[RoundRecord],
    y: std::ops::Range<f64>,
    y_desc: &str,
    y_format: &dyn Fn(&f64) -> String,
) -> Result<RoundChart<'a, 'b>> {
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d(round_range(rounds), y)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc(y_desc)
        .x_labels(rounds.len().clamp(2, 20))
        .x_label_formatter(&round_label)
        .y_label_formatter(y_format)
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(plot_err)?;
    Ok(chart)
}

/// What [`round_chart`] returns.
type RoundChart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// Integer labels only (the axis is continuous).
fn round_label(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{x:.0}")
    } else {
        String::new()
    }
}

/// A y range that holds every point of `series`, padded; `floor` pins the
/// bottom (e.g. 0 for counts).
fn y_range(series: &[Series], floor: Option<f64>) -> std::ops::Range<f64> {
    let values = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() || !hi.is_finite() {
        return floor.unwrap_or(0.0)..1.0;
    }
    let pad = if hi > lo {
        (hi - lo) * 0.08
    } else {
        hi.abs().max(1.0) * 0.1
    };
    let lo = floor.map_or(lo - pad, |f| f.min(lo));
    lo..hi + pad
}

/// A line chart of `series` over the rounds, its legend at `legend`.
fn line_chart(
    rounds: &[RoundRecord],
    title: &str,
    y_desc: &str,
    series: Vec<Series>,
    y_floor: Option<f64>,
    y_format: &dyn Fn(&f64) -> String,
    legend: SeriesLabelPosition,
) -> Result<Vec<u8>> {
    let y = y_range(&series, y_floor);
    let many = rounds.len() > 40;
    render_png(|root| {
        let mut chart = round_chart(&root, title, rounds, y, y_desc, y_format)?;
        let mut any = false;
        for s in &series {
            if s.points.is_empty() {
                continue;
            }
            any = true;
            let color = s.color;
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(3),
                ))
                .map_err(plot_err)?
                .label(s.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                });
            if !many {
                chart
                    .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(plot_err)?;
            }
        }
        if any {
            chart
                .configure_series_labels()
                .position(legend)
                .label_font((FONT, 16))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .draw()
                .map_err(plot_err)?;
        } else {
            let (w, h) = root.dim_in_pixel();
            root.draw(&Text::new(
                "no values recorded",
                (w as i32 / 2 - 90, h as i32 / 2),
                (FONT, 22).into_font().color(&GREY_),
            ))
            .map_err(plot_err)?;
        }
        Ok(())
    })
}

/// `(round, value)` for the rounds where `f` has a finite value.
fn points(rounds: &[RoundRecord], f: impl Fn(&RoundRecord) -> Option<f64>) -> Vec<(f64, f64)> {
    rounds
        .iter()
        .filter_map(|r| f(r).filter(|v| v.is_finite()).map(|v| (r.round as f64, v)))
        .collect()
}

fn plot_accuracy(rounds: &[RoundRecord]) -> Result<Vec<u8>> {
    let pct = |v: Option<f64>| v.map(|a| 100.0 * a);
    line_chart(
        rounds,
        "Accuracy per round",
        "accuracy (%)",
        vec![
            Series {
                name: "participants' test splits",
                color: BLUE_,
                points: points(rounds, |r| pct(r.accuracy)),
            },
            Series {
                name: "central test set",
                color: ORANGE_,
                points: points(rounds, |r| pct(r.central_accuracy)),
            },
        ],
        None,
        &|y| format!("{y:.0}"),
        SeriesLabelPosition::LowerRight,
    )
}

fn plot_privacy(rounds: &[RoundRecord]) -> Result<Vec<u8>> {
    line_chart(
        rounds,
        "Privacy spent per round",
        "cumulative epsilon",
        vec![
            Series {
                name: "against model holders",
                color: PURPLE_,
                points: points(rounds, |r| r.dp_epsilon),
            },
            Series {
                name: "against the coordinator",
                color: RED_,
                points: points(rounds, |r| r.dp_epsilon_coordinator),
            },
        ],
        Some(0.0),
        &|y| format!("{y:.1}"),
        SeriesLabelPosition::UpperLeft,
    )
}

fn plot_loss(rounds: &[RoundRecord]) -> Result<Vec<u8>> {
    line_chart(
        rounds,
        "Loss per round",
        "cross-entropy",
        vec![
            Series {
                name: "test loss",
                color: BLUE_,
                points: points(rounds, |r| r.loss),
            },
            Series {
                name: "training loss",
                color: GREEN_,
                points: points(rounds, |r| r.train_loss),
            },
            Series {
                name: "central test loss",
                color: ORANGE_,
                points: points(rounds, |r| r.central_loss),
            },
        ],
        Some(0.0),
        &|y| format!("{y:.2}"),
        SeriesLabelPosition::UpperRight,
    )
}

fn plot_training(rounds: &[RoundRecord]) -> Result<Vec<u8>> {
    line_chart(
        rounds,
        "Round time against the training in it",
        "seconds",
        vec![
            Series {
                name: "round (wall)",
                color: BLUE_,
                points: points(rounds, |r| Some(r.secs)),
            },
            Series {
                name: "training (CPU, summed over participants)",
                color: GREEN_,
                points: points(rounds, |r| r.train_cpu_secs),
            },
        ],
        Some(0.0),
        &|y| format!("{y:.1}"),
        SeriesLabelPosition::UpperRight,
    )
}

fn plot_bytes(rounds: &[RoundRecord]) -> Result<Vec<u8>> {
    let mb = |b: u64| Some(b as f64 / 1e6);
    bar_chart(
        rounds,
        "Bytes per round",
        "MB",
        vec![
            Series {
                name: "up (participants to coordinator)",
                color: BLUE_,
                points: points(rounds, |r| mb(r.bytes_up)),
            },
            Series {
                name: "down (coordinator to participants)",
                color: ORANGE_,
                points: points(rounds, |r| mb(r.bytes_down)),
            },
        ],
        &|y| format!("{y:.1}"),
    )
}

fn plot_survivors(rounds: &[RoundRecord]) -> Result<Vec<u8>> {
    let n = |v: usize| Some(v as f64);
    bar_chart(
        rounds,
        "Participants per round",
        "participants",
        vec![
            Series {
                name: "cohort",
                color: GREY_,
                points: points(rounds, |r| n(r.cohort)),
            },
            Series {
                name: "survivors",
                color: GREEN_,
                points: points(rounds, |r| n(r.participants)),
            },
            Series {
                name: "dropped",
                color: RED_,
                points: points(rounds, |r| n(r.dropped)),
            },
            Series {
                name: "evaluators",
                color: PURPLE_,
                points: points(rounds, |r| n(r.evaluators)),
            },
        ],
        &|y| {
            if (y - y.round()).abs() < 1e-9 {
                format!("{y:.0}")
            } else {
                String::new()
            }
        },
    )
}

/// Grouped bars: per round one bar of each series side by side, with room
/// above the tallest for the legend.
fn bar_chart(
    rounds: &[RoundRecord],
    title: &str,
    y_desc: &str,
    series: Vec<Series>,
    y_format: &dyn Fn(&f64) -> String,
) -> Result<Vec<u8>> {
    let top = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.35 } else { 1.0 };
    let group = 0.8;
    let width = group / series.len().max(1) as f64;
    render_png(|root| {
        let mut chart = round_chart(&root, title, rounds, 0.0..top, y_desc, y_format)?;
        for (k, s) in series.iter().enumerate() {
            let color = s.color;
            let left = -group / 2.0 + k as f64 * width;
            chart
                .draw_series(s.points.iter().map(|&(x, y)| {
                    Rectangle::new(
                        [(x + left, 0.0), (x + left + width * 0.9, y)],
                        color.filled(),
                    )
                }))
                .map_err(plot_err)?
                .label(s.name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(plot_err)?;
        Ok(())
    })
}

/// Stages in the order a round runs them, with their colours.
const STAGES: [(&str, RGBColor); 6] = [
    ("advertise", RGBColor(31, 119, 180)),
    ("share", RGBColor(255, 127, 14)),
    ("masked", RGBColor(44, 160, 44)),
    ("consistency", RGBColor(140, 86, 75)),
    ("unmask", RGBColor(214, 39, 40)),
    ("evaluate", RGBColor(148, 103, 189)),
];

/// A round's stage times in [`STAGES`] order, then the rest of the round
/// (plain training and aggregation, strategy, waiting).
fn stage_bars(r: &RoundRecord) -> Vec<(&'static str, RGBColor, f64)> {
    let mut bars: Vec<(&'static str, RGBColor, f64)> = STAGES
        .iter()
        .map(|&(name, color)| (name, color, r.stage_secs.get(name).copied().unwrap_or(0.0)))
        .collect();
    let known: f64 = bars.iter().map(|b| b.2).sum();
    bars.push(("rest of the round", GREY_, (r.secs - known).max(0.0)));
    bars
}

fn plot_stages(rounds: &[RoundRecord]) -> Result<Vec<u8>> {
    let top = rounds
        .iter()
        .map(|r| stage_bars(r).iter().map(|b| b.2).sum::<f64>())
        .fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.35 } else { 1.0 };
    render_png(|root| {
        let mut chart = round_chart(&root, "Time per stage", rounds, 0.0..top, "seconds", &|y| {
            format!("{y:.1}")
        })?;
        let half = 0.35;
        let mut shown: Vec<&str> = Vec::new();
        for (i, &(name, color)) in STAGES
            .iter()
            .chain(std::iter::once(&("rest of the round", GREY_)))
            .enumerate()
        {
            let boxes: Vec<Rectangle<(f64, f64)>> = rounds
                .iter()
                .filter_map(|r| {
                    let bars = stage_bars(r);
                    let below: f64 = bars[..i].iter().map(|b| b.2).sum();
                    let secs = bars[i].2;
                    let x = r.round as f64;
                    (secs > 0.0).then(|| {
                        Rectangle::new(
                            [(x - half, below), (x + half, below + secs)],
                            color.filled(),
                        )
                    })
                })
                .collect();
            if boxes.is_empty() {
                continue;
            }
            shown.push(name);
            chart
                .draw_series(boxes)
                .map_err(plot_err)?
                .label(name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled())
                });
        }
        if !shown.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .label_font((FONT, 16))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .draw()
                .map_err(plot_err)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::record;

    #[test]
    fn stage_bars_add_up_to_the_round() {
        let r = record(1);
        let bars = stage_bars(&r);
        assert_eq!(bars.len(), STAGES.len() + 1);
        let total: f64 = bars.iter().map(|b| b.2).sum();
        assert!((total - r.secs).abs() < 1e-12);
        assert!((bars.last().unwrap().2 - 0.7).abs() < 1e-12);
    }
}
