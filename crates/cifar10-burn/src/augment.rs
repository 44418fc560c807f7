//! Training augmentation (random crop with padding, horizontal flip, Cutout) and
//! normalization, on the raw CHW bytes of an image.
//!
//! The order is torchvision's usual CIFAR recipe: `RandomCrop(32, padding=4)`,
//! `RandomHorizontalFlip()`, `ToTensor()`, `Normalize(MEAN, STD)`, then Cutout on the
//! normalized image (DeVries & Taylor, 2017). Padding pixels are black (0) before
//! normalization, as in torchvision. Every random choice comes from a [`Rng`] seeded by the
//! caller, so a seed gives the same images on every run and every machine.

use serde::{Deserialize, Serialize};

use crate::format::{CHANNELS, IMAGE_BYTES, SIDE};

/// Per-channel mean of the training images, in pixel units (0-255).
pub const MEAN: [f32; 3] = [125.307, 122.950, 113.865];
/// Per-channel standard deviation of the training images, in pixel units (0-255).
pub const STD: [f32; 3] = [62.993, 62.089, 66.705];

/// A small, fast, seedable random number generator (SplitMix64): the same numbers on every
/// platform and in every version of this crate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator for a stream of `seed` named by `keys` (epoch, batch, image...): streams
    /// with different keys are independent.
    pub fn stream(seed: u64, keys: &[u64]) -> Self {
        let mut rng = Self::new(seed);
        for &key in keys {
            rng = Self::new(rng.next_u64() ^ key.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        rng
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`), without modulo bias worth speaking of for small `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    /// A fair coin.
    pub fn coin(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }

    /// Shuffles `items` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// The random transformations of a training image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Augmentation {
    /// Zero padding on each side before a random 32x32 crop (4 in the usual recipe; 0
    /// turns cropping off).
    pub crop_padding: usize,
    /// Flip horizontally with probability 1/2.
    pub horizontal_flip: bool,
    /// Side of a square set to 0 after normalization, centred at a random pixel and clipped
    /// at the border (Cutout; 16 for CIFAR-10 in the paper). `None` turns it off.
    pub cutout: Option<usize>,
}

impl Default for Augmentation {
    /// Crop with 4-pixel padding and horizontal flip, no Cutout.
    fn default() -> Self {
        Self {
            crop_padding: 4,
            horizontal_flip: true,
            cutout: None,
        }
    }
}

/// The random choices for one image, drawn by [`Augmentation::draw`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    /// Top-left corner of the crop in the padded image (`0..=2 * padding`).
    pub offset: (usize, usize),
    /// Whether to flip.
    pub flip: bool,
    /// Centre of the Cutout square (row, column), if any.
    pub cutout_center: Option<(usize, usize)>,
}

impl Augmentation {
    /// Draws the random choices for one image.
    pub fn draw(&self, rng: &mut Rng) -> Choice {
        let span = 2 * self.crop_padding + 1;
        let offset = (rng.below(span), rng.below(span));
        let flip = self.horizontal_flip && rng.coin();
        let cutout_center = self.cutout.map(|_| (rng.below(SIDE), rng.below(SIDE)));
        Choice {
            offset,
            flip,
            cutout_center,
        }
    }

    /// Writes the augmented, normalized image into `out` (3072 floats, CHW).
    ///
    /// One pass over the output: this fuses [`crop`], [`flip_horizontal`], [`normalize`] and
    /// Cutout, and gives the same values as applying them one after the other.
    pub fn apply(&self, image: &[u8], choice: Choice, out: &mut [f32]) {
        debug_assert_eq!(image.len(), IMAGE_BYTES);
        let pad = self.crop_padding as isize;
        let (oy, ox) = (choice.offset.0 as isize, choice.offset.1 as isize);
        for c in 0..CHANNELS {
            let (mean, inv_std) = (MEAN[c], 1.0 / STD[c]);
            let plane = &image[c * SIDE * SIDE..(c + 1) * SIDE * SIDE];
            let out = &mut out[c * SIDE * SIDE..(c + 1) * SIDE * SIDE];
            for y in 0..SIDE {
                let sy = y as isize + oy - pad;
                for x in 0..SIDE {
                    let xc = if choice.flip { SIDE - 1 - x } else { x };
                    let sx = xc as isize + ox - pad;
                    let inside =
                        (0..SIDE as isize).contains(&sy) && (0..SIDE as isize).contains(&sx);
                    let pixel = if inside {
                        plane[sy as usize * SIDE + sx as usize]
                    } else {
                        0
                    };
                    out[y * SIDE + x] = (pixel as f32 - mean) * inv_std;
                }
            }
        }
        if let (Some(side), Some(center)) = (self.cutout, choice.cutout_center) {
            cutout(out, side, center);
        }
    }
}

/// Normalizes an image with [`MEAN`] and [`STD`] into `out` (evaluation preprocessing).
pub fn normalize(image: &[u8], out: &mut [f32]) {
    for c in 0..CHANNELS {
        let (mean, inv_std) = (MEAN[c], 1.0 / STD[c]);
        let range = c * SIDE * SIDE..(c + 1) * SIDE * SIDE;
        for (o, &p) in out[range.clone()].iter_mut().zip(&image[range]) {
            *o = (p as f32 - mean) * inv_std;
        }
    }
}

/// The 32x32 crop at `offset` of the image padded by `padding` black pixels on each side.
pub fn crop(image: &[u8], padding: usize, offset: (usize, usize)) -> Vec<u8> {
    let mut out = vec![0u8; IMAGE_BYTES];
    for c in 0..CHANNELS {
        for y in 0..SIDE {
            for x in 0..SIDE {
                let (sy, sx) = (y + offset.0, x + offset.1);
                if (padding..padding + SIDE).contains(&sy)
                    && (padding..padding + SIDE).contains(&sx)
                {
                    out[(c * SIDE + y) * SIDE + x] =
                        image[(c * SIDE + sy - padding) * SIDE + sx - padding];
                }
            }
        }
    }
    out
}

/// The image mirrored left to right.
pub fn flip_horizontal(image: &[u8]) -> Vec<u8> {
    let mut out = image.to_vec();
    for row in out.chunks_exact_mut(SIDE) {
        row.reverse();
    }
    out
}

/// Sets a `side x side` square centred at `center` (clipped at the border) to 0 in every
/// channel of a normalized image.
pub fn cutout(image: &mut [f32], side: usize, center: (usize, usize)) {
    let half = side / 2;
    let rows = center.0.saturating_sub(half)..(center.0 + side - half).min(SIDE);
    let cols = center.1.saturating_sub(half)..(center.1 + side - half).min(SIDE);
    for c in 0..CHANNELS {
        for y in rows.clone() {
            let row = (c * SIDE + y) * SIDE;
            image[row + cols.start..row + cols.end].fill(0.0);
        }
    }
}
