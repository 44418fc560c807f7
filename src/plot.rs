//! `curves.png`: training and test loss and accuracy per epoch, drawn without a plotting
//! library (a pixel buffer, a 3x5 font for the labels, and the `png` encoder).

use crate::train::EpochMetrics;

const WIDTH: usize = 960;
const HEIGHT: usize = 420;
const PANEL: usize = WIDTH / 2;
const MARGIN: (usize, usize, usize, usize) = (40, 20, 38, 60); // top, right, bottom, left

const WHITE: [u8; 3] = [255, 255, 255];
const BLACK: [u8; 3] = [30, 30, 30];
const GRID: [u8; 3] = [225, 225, 225];
const TRAIN: [u8; 3] = [31, 119, 180];
const TEST: [u8; 3] = [214, 39, 40];

/// Renders the curves of `history` as a PNG file's bytes; epochs not evaluated have no test
/// point, and the test line joins the evaluated ones.
pub fn curves(history: &[EpochMetrics]) -> Vec<u8> {
    let mut canvas = Canvas::new(WIDTH, HEIGHT);
    let epochs: Vec<f64> = history.iter().map(|m| m.epoch as f64).collect();
    let series = |f: fn(&EpochMetrics) -> f64| history.iter().map(f).collect::<Vec<f64>>();
    canvas.panel(
        0,
        "LOSS",
        &epochs,
        &[
            (series(|m| m.train_loss), TRAIN),
            (series(|m| m.test_loss.unwrap_or(f64::NAN)), TEST),
        ],
    );
    canvas.panel(
        PANEL,
        "ACCURACY %",
        &epochs,
        &[
            (series(|m| 100.0 * m.train_accuracy), TRAIN),
            (
                series(|m| 100.0 * m.test_accuracy.unwrap_or(f64::NAN)),
                TEST,
            ),
        ],
    );
    canvas.png()
}

struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            pixels: WHITE.repeat(width * height),
        }
    }

    fn set(&mut self, x: i64, y: i64, color: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = 3 * (y as usize * self.width + x as usize);
            self.pixels[i..i + 3].copy_from_slice(&color);
        }
    }

    fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, color: [u8; 3]) {
        for dy in 0..h {
            for dx in 0..w {
                self.set(x + dx, y + dy, color);
            }
        }
    }

    /// A 2-pixel line from `a` to `b` (Bresenham).
    fn line(&mut self, a: (i64, i64), b: (i64, i64), color: [u8; 3]) {
        let (mut x, mut y) = a;
        let (dx, dy) = ((b.0 - a.0).abs(), -(b.1 - a.1).abs());
        let (sx, sy) = ((b.0 - a.0).signum(), (b.1 - a.1).signum());
        let mut err = dx + dy;
        loop {
            self.rect(x, y, 2, 2, color);
            if (x, y) == b {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text in the 3x5 font at scale 2, top-left at `(x, y)`.
    fn text(&mut self, x: i64, y: i64, text: &str, color: [u8; 3]) {
        for (i, c) in text.chars().enumerate() {
            let rows = glyph(c);
            for (row, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits >> (2 - col) & 1 == 1 {
                        self.rect(x + i as i64 * 8 + col * 2, y + row as i64 * 2, 2, 2, color);
                    }
                }
            }
        }
    }

    fn panel(&mut self, left: usize, title: &str, xs: &[f64], series: &[(Vec<f64>, [u8; 3])]) {
        let (top, right, bottom, margin_left) = MARGIN;
        let x0 = (left + margin_left) as i64;
        let x1 = (left + PANEL - right) as i64;
        let y0 = top as i64;
        let y1 = (HEIGHT - bottom) as i64;
        self.text(x0, 12, title, BLACK);
        self.rect(x1 - 110, 12, 10, 10, TRAIN);
        self.text(x1 - 96, 12, "TRAIN", BLACK);
        self.rect(x1 - 50, 12, 10, 10, TEST);
        self.text(x1 - 36, 12, "TEST", BLACK);

        let values: Vec<f64> = series
            .iter()
            .flat_map(|(v, _)| v.iter().copied())
            .filter(|v| v.is_finite())
            .collect();
        let (mut lo, mut hi) = values
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        if values.is_empty() {
            (lo, hi) = (0.0, 1.0);
        }
        if hi - lo < 1e-9 {
            (lo, hi) = (lo - 0.5, hi + 0.5);
        }
        let pad = 0.05 * (hi - lo);
        let (lo, hi) = (lo - pad, hi + pad);
        let last = xs.last().copied().unwrap_or(1.0).max(1.0);
        let first = xs.first().copied().unwrap_or(0.0).min(last - 1.0);
        let px = |x: f64| x0 + ((x - first) / (last - first) * (x1 - x0) as f64).round() as i64;
        let py = |y: f64| y1 - ((y - lo) / (hi - lo) * (y1 - y0) as f64).round() as i64;

        for i in 0..=4 {
            let value = lo + (hi - lo) * i as f64 / 4.0;
            let y = py(value);
            self.rect(x0, y, x1 - x0, 1, GRID);
            self.text(x0 - 50, y - 5, &format!("{value:.2}"), BLACK);
        }
        self.rect(x0, y0, 1, y1 - y0, BLACK);
        self.rect(x0, y1, x1 - x0, 1, BLACK);
        let ticks = (last - first).clamp(1.0, 5.0) as usize;
        for i in 0..=ticks {
            let epoch = first + (last - first) * i as f64 / ticks as f64;
            let x = px(epoch);
            self.rect(x, y1, 1, 5, BLACK);
            self.text(x - 4, y1 + 8, &format!("{epoch:.0}"), BLACK);
        }
        self.text((x0 + x1) / 2 - 20, y1 + 18, "EPOCH", BLACK);

        for (values, color) in series {
            let points: Vec<(i64, i64)> = xs
                .iter()
                .zip(values)
                .filter(|(_, v)| v.is_finite())
                .map(|(&x, &y)| (px(x), py(y)))
                .collect();
            for pair in points.windows(2) {
                self.line(pair[0], pair[1], *color);
            }
            for &(x, y) in &points {
                self.rect(x - 2, y - 2, 5, 5, *color);
            }
        }
    }

    fn png(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().expect("PNG header into memory");
        writer
            .write_image_data(&self.pixels)
            .expect("PNG data into memory");
        writer.finish().expect("PNG end into memory");
        out
    }
}

/// The 3x5 glyph of `c` (rows top to bottom, 3 bits each); unknown characters are blank.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '%' => [5, 1, 2, 4, 5],
        'A' => [2, 5, 7, 5, 5],
        'C' => [7, 4, 4, 4, 7],
        'E' => [7, 4, 7, 4, 7],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'L' => [4, 4, 4, 4, 7],
        'N' => [6, 5, 5, 5, 5],
        'O' => [7, 5, 5, 5, 7],
        'P' => [7, 5, 7, 4, 4],
        'R' => [6, 5, 6, 5, 5],
        'S' => [7, 4, 7, 1, 7],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'Y' => [5, 5, 2, 2, 2],
        _ => [0; 5],
    }
}
