//! `curves.png`: training and test loss and accuracy per epoch, drawn with `plotters` on a
//! bitmap in memory, with the DejaVu Sans font embedded (no system fonts needed).

use std::sync::Once;

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use plotters::style::FontStyle;

const WIDTH: u32 = 960;
const HEIGHT: u32 = 420;
const TRAIN: RGBColor = RGBColor(31, 119, 180);
const TEST: RGBColor = RGBColor(214, 39, 40);

/// One epoch's values of the curves; the test values are `None` for an epoch not evaluated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochPoint {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training accuracy, a fraction.
    pub train_accuracy: f64,
    /// Mean test loss, if evaluated.
    pub test_loss: Option<f64>,
    /// Test accuracy, a fraction, if evaluated.
    pub test_accuracy: Option<f64>,
}

/// Renders the curves of `points` as a PNG file's bytes: loss on the left, accuracy (%) on
/// the right, training in blue and test in red (its line joins the evaluated epochs).
pub fn curves(points: &[EpochPoint]) -> Result<Vec<u8>> {
    static FONT: Once = Once::new();
    FONT.call_once(|| {
        // The one font plotters draws text with; registering bytes it can parse cannot fail.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
    let mut pixels = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let (left, right) = root.split_horizontally(WIDTH / 2);
        let loss = |p: &EpochPoint| (p.train_loss, p.test_loss);
        let accuracy = |p: &EpochPoint| {
            let percent = |v: f64| 100.0 * v;
            (percent(p.train_accuracy), p.test_accuracy.map(percent))
        };
        panel(&left, "loss", points, loss)?;
        panel(&right, "accuracy (%)", points, accuracy)?;
        root.present().map_err(plot_error)?;
    }
    encode_png(&pixels)
}

/// One panel: the training and test series `values` gives for each point, against the epoch.
fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    points: &[EpochPoint],
    values: impl Fn(&EpochPoint) -> (f64, Option<f64>),
) -> Result<()> {
    let train: Vec<(f64, f64)> = points
        .iter()
        .map(|p| (p.epoch as f64, values(p).0))
        .filter(|(_, v)| v.is_finite())
        .collect();
    let test: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| values(p).1.map(|v| (p.epoch as f64, v)))
        .filter(|(_, v)| v.is_finite())
        .collect();
    let all = || train.iter().chain(&test);
    let last_epoch = points.iter().map(|p| p.epoch).max().unwrap_or(1).max(1) as f64;
    let (low, high) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, v)| {
        (lo.min(v), hi.max(v))
    });
    let (low, high) = if low.is_finite() {
        (low, high)
    } else {
        (0.0, 1.0)
    };
    let pad = ((high - low) * 0.05).max(1e-3);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(48)
        .build_cartesian_2d(1.0..last_epoch.max(2.0), (low - pad)..(high + pad))
        .map_err(plot_error)?;
    let epoch_labels = (last_epoch as usize).clamp(2, 10);
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_labels(epoch_labels)
        .x_label_formatter(&|epoch| format!("{epoch:.0}"))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(plot_error)?;
    for (series, color, label) in [(&train, TRAIN, "train"), (&test, TEST, "test")] {
        chart
            .draw_series(LineSeries::new(
                series.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(plot_error)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
        chart
            .draw_series(series.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(plot_error)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

fn plot_error<E: std::error::Error + Send + Sync>(error: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow!("drawing curves.png: {error}")
}

fn encode_png(pixels: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(pixels)?;
    writer.finish()?;
    Ok(out)
}
