//! torchvision's ImageNet transforms on 8-bit RGB images, computed as torchvision computes
//! them on PIL images:
//!
//! - evaluation: `Resize(resize)` (the shorter side, bilinear with PIL's antialiasing),
//!   `CenterCrop(size)`, `ToTensor()`, `Normalize(IMAGENET_MEAN, IMAGENET_STD)`;
//! - training: `RandomResizedCrop(size)` (scale 0.08-1, aspect ratio 3/4-4/3),
//!   `RandomHorizontalFlip()`, then the same two.
//!
//! The resampling is Pillow's (`Image.resize(..., BILINEAR)`: a triangle filter widened by
//! the reduction factor, fixed-point coefficients, the horizontal pass first, rounded to 8 bits
//! between the passes), so a PNG gives the values torchvision gives; the random draws are
//! this crate's own (a seed gives the same crops on every machine, not PyTorch's).

use cifar10_burn::augment::Rng;
use image::RgbImage;

/// ImageNet's per-channel mean, as torchvision's weights expect (0-1 units).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet's per-channel standard deviation (0-1 units).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The transforms of a run: training images are `size` squares cut by `RandomResizedCrop`,
/// evaluation images `size` squares cut from the middle after resizing the shorter side to
/// `resize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transforms {
    /// Side of the square the network sees (224 in torchvision's recipes).
    pub size: usize,
    /// Shorter side before the evaluation's center crop (256 for 224).
    pub resize: usize,
}

impl Transforms {
    /// torchvision's ratio: `resize = size * 256 / 224`, rounded.
    pub fn new(size: usize) -> Self {
        Self {
            size,
            resize: (size * 256 + 112) / 224,
        }
    }

    /// The evaluation transform into `out` (`3 * size * size` values, CHW).
    pub fn eval(&self, image: &RgbImage, out: &mut [f32]) {
        let resized = resize_shorter_side(image, self.resize);
        let (width, height) = resized.dimensions();
        let top = center_offset(height as usize, self.size);
        let left = center_offset(width as usize, self.size);
        normalize_region(&resized, top, left, self.size, self.size, false, out);
    }

    /// The training transform into `out`, its random choices drawn from `rng`.
    pub fn train(&self, image: &RgbImage, rng: &mut Rng, out: &mut [f32]) {
        let (width, height) = image.dimensions();
        let (top, left, h, w) = random_resized_crop(height as usize, width as usize, rng);
        let cropped = image::imageops::crop_imm(image, left as u32, top as u32, w as u32, h as u32)
            .to_image();
        let resized = resize_bilinear(&cropped, self.size, self.size);
        let flip = rng.coin();
        normalize_region(&resized, 0, 0, self.size, self.size, flip, out);
    }
}

/// `ToTensor()` then `Normalize`: the `height x width` region at (`top`, `left`), mirrored
/// when `flip`, as f32 CHW, in the order of operations torchvision uses (so the same f32s).
fn normalize_region(
    image: &RgbImage,
    top: usize,
    left: usize,
    height: usize,
    width: usize,
    flip: bool,
    out: &mut [f32],
) {
    let plane = height * width;
    for y in 0..height {
        for x in 0..width {
            let source_x = if flip { width - 1 - x } else { x };
            let pixel = image.get_pixel((left + source_x) as u32, (top + y) as u32);
            for c in 0..3 {
                let value = pixel[c] as f32 / 255.0;
                out[c * plane + y * width + x] = (value - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            }
        }
    }
}

/// torchvision's `Resize(side)` with one number: the shorter side becomes `side`, the longer
/// `int(side * long / short)`.
pub fn resize_shorter_side(image: &RgbImage, side: usize) -> RgbImage {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let (short, long) = (width.min(height), width.max(height));
    let new_long = (side as f64 * long as f64 / short as f64) as usize;
    let (new_width, new_height) = if width <= height {
        (side, new_long)
    } else {
        (new_long, side)
    };
    resize_bilinear(image, new_width, new_height)
}

/// `CenterCrop`'s offset: `int(round((outer - inner) / 2))`, Python's round (half to even).
fn center_offset(outer: usize, inner: usize) -> usize {
    let difference = outer.saturating_sub(inner);
    let half = difference / 2;
    if difference % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// `RandomResizedCrop.get_params` with scale (0.08, 1) and ratio (3/4, 4/3): (top, left,
/// height, width) of the crop.
fn random_resized_crop(height: usize, width: usize, rng: &mut Rng) -> (usize, usize, usize, usize) {
    let (min_ratio, max_ratio) = (3.0f64 / 4.0, 4.0f64 / 3.0);
    let area = (height * width) as f64;
    let uniform = |rng: &mut Rng, low: f64, high: f64| {
        low + (high - low) * (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    };
    for _ in 0..10 {
        let target_area = area * uniform(rng, 0.08, 1.0);
        let aspect_ratio = uniform(rng, min_ratio.ln(), max_ratio.ln()).exp();
        let w = (target_area * aspect_ratio).sqrt().round_ties_even() as usize;
        let h = (target_area / aspect_ratio).sqrt().round_ties_even() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.below(height - h + 1);
            let left = rng.below(width - w + 1);
            return (top, left, h, w);
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (h, w) = if in_ratio < min_ratio {
        ((width as f64 / min_ratio).round_ties_even() as usize, width)
    } else if in_ratio > max_ratio {
        (
            height,
            (height as f64 * max_ratio).round_ties_even() as usize,
        )
    } else {
        (height, width)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// Bits after the point of Pillow's fixed-point coefficients (`PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `Image.resize((width, height), Image.BILINEAR)` on an RGB image.
pub fn resize_bilinear(image: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (in_width, in_height) = (image.width() as usize, image.height() as usize);
    let horizontal = Coefficients::new(in_width, width);
    let vertical = Coefficients::new(in_height, height);
    let source = image.as_raw();

    // The horizontal pass covers only the rows the vertical pass reads.
    let first_row = vertical.bounds[0].0;
    let last = vertical.bounds[height - 1];
    let rows = last.0 + last.1 - first_row;
    let mut temp = vec![0u8; rows * width * 3];
    for y in 0..rows {
        let row = &source[(first_row + y) * in_width * 3..][..in_width * 3];
        for x in 0..width {
            let (start, weights) = horizontal.taps(x);
            for c in 0..3 {
                let sum = weights
                    .iter()
                    .enumerate()
                    .fold(1i64 << (PRECISION_BITS - 1), |s, (k, w)| {
                        s + row[(start + k) * 3 + c] as i64 * *w as i64
                    });
                temp[(y * width + x) * 3 + c] = clip8(sum);
            }
        }
    }
    let mut out = vec![0u8; height * width * 3];
    for y in 0..height {
        let (start, weights) = vertical.taps(y);
        let start = start - first_row;
        for x in 0..width {
            for c in 0..3 {
                let sum = weights
                    .iter()
                    .enumerate()
                    .fold(1i64 << (PRECISION_BITS - 1), |s, (k, w)| {
                        s + temp[((start + k) * width + x) * 3 + c] as i64 * *w as i64
                    });
                out[(y * width + x) * 3 + c] = clip8(sum);
            }
        }
    }
    RgbImage::from_raw(width as u32, height as u32, out)
        .expect("the buffer has width * height pixels")
}

fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` for the bilinear filter: for each
/// output pixel, its first input pixel and fixed-point weights.
struct Coefficients {
    /// (first input pixel, number of taps) per output pixel.
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    taps: usize,
}

impl Coefficients {
    fn new(in_size: usize, out_size: usize) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = filter_scale; // the triangle's support is 1
        let taps = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * taps];
        let mut row = vec![0f64; taps];
        let inverse_scale = 1.0 / filter_scale;
        for x in 0..out_size {
            let center = (x as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero; the clamp makes it a floor here.
            let min = ((center - support + 0.5) as i64).max(0) as usize;
            let max = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let count = max - min;
            let mut total = 0.0;
            for (k, w) in row.iter_mut().enumerate().take(count) {
                let distance = ((k + min) as f64 - center + 0.5) * inverse_scale;
                *w = (1.0 - distance.abs()).max(0.0);
                total += *w;
            }
            for (k, w) in row.iter().enumerate().take(count) {
                let w = if total != 0.0 { w / total } else { *w };
                let fixed = w * (1i64 << PRECISION_BITS) as f64;
                weights[x * taps + k] = if fixed < 0.0 {
                    (fixed - 0.5) as i32
                } else {
                    (fixed + 0.5) as i32
                };
            }
            bounds.push((min, count));
        }
        Self {
            bounds,
            weights,
            taps,
        }
    }

    fn taps(&self, x: usize) -> (usize, &[i32]) {
        let (start, count) = self.bounds[x];
        (start, &self.weights[x * self.taps..][..count])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_resize_is_the_identity() {
        let image = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 7]));
        assert_eq!(resize_bilinear(&image, 7, 5), image);
    }

    #[test]
    fn center_offsets_round_half_to_even() {
        // Python: int(round(1 / 2)) == 0, int(round(3 / 2)) == 2, int(round(5 / 2)) == 2.
        assert_eq!(
            [0, 1, 2, 3, 4, 5].map(|d| center_offset(10 + d, 10)),
            [0, 0, 1, 2, 2, 2]
        );
    }

    #[test]
    fn random_crops_stay_inside_the_image() {
        let mut rng = Rng::new(3);
        for (height, width) in [(1, 1), (3, 200), (200, 3), (500, 375), (32, 32)] {
            for _ in 0..200 {
                let (top, left, h, w) = random_resized_crop(height, width, &mut rng);
                assert!(h > 0 && w > 0 && top + h <= height && left + w <= width);
            }
        }
    }
}
