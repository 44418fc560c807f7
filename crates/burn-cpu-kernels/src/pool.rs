//! Max pooling of NCHW planes on the host, for the ImageNet stem's 3x3 stride-2 pooling in
//! inference, where flex's `max_pool2d` is slow (the `maxpool3x3_s2_64_32px` row of
//! `python3 benches/compare.py --bench layers`): a maximum over each window's rows, row by
//! row (a loop that vectorizes, compiled for the instruction set the CPU has: [`Simd`]),
//! then over its columns, planes in parallel.

use rayon::prelude::*;

use crate::geometry::output_size;
use crate::simd::{Simd, dispatch};

/// The geometry of a max pooling (no dilation, floor rounding, symmetric padding, which
/// counts as -infinity as in PyTorch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MaxPool {
    planes: usize,
    height: usize,
    width: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    out_height: usize,
    out_width: usize,
    simd: Simd,
}

impl MaxPool {
    /// The geometry on `[batch, channels, height, width]`, if consistent: the padding is at
    /// most half the kernel (PyTorch's rule), so that no window is all padding.
    pub(crate) fn new(
        input: [usize; 4],
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> Option<Self> {
        let [batch, channels, height, width] = input;
        let out = |axis: usize, size: usize| {
            let (k, p) = (kernel[axis], padding[axis]);
            (k > 0 && 2 * p <= k)
                .then(|| output_size(size, k, stride[axis], p))
                .flatten()
        };
        let (out_height, out_width) = (out(0, height)?, out(1, width)?);
        (batch * channels * out_height * out_width > 0).then_some(Self {
            planes: batch * channels,
            height,
            width,
            kernel,
            stride,
            padding,
            out_height,
            out_width,
            simd: Simd::detect(),
        })
    }

    /// This pooling with its loops compiled for `simd` (by default [`Simd::detect`]'s).
    #[cfg(test)]
    fn with_simd(self, simd: Simd) -> Self {
        Self { simd, ..self }
    }

    pub(crate) fn kernel(&self) -> [usize; 2] {
        self.kernel
    }

    pub(crate) fn stride(&self) -> [usize; 2] {
        self.stride
    }

    pub(crate) fn padding(&self) -> [usize; 2] {
        self.padding
    }

    /// `[batch, channels, out_height, out_width]` for `batch` images.
    pub(crate) fn out_shape(&self, batch: usize) -> [usize; 4] {
        [batch, self.planes / batch, self.out_height, self.out_width]
    }

    /// The pooled planes, NCHW. A NaN in a window is its maximum, as in PyTorch.
    pub(crate) fn forward(&self, input: &[f32]) -> Vec<f32> {
        let (plane, out_plane) = (self.height * self.width, self.out_height * self.out_width);
        assert_eq!(input.len(), self.planes * plane, "input of {self:?}");
        let mut out = vec![0f32; self.planes * out_plane];
        out.par_chunks_mut(out_plane)
            .zip(input.par_chunks(plane))
            .for_each_init(
                || vec![0f32; self.width],
                |rows_max, (out, x)| {
                    dispatch!(self.simd, MaxPool::plane(
                        pool: &MaxPool = self,
                        x: &[f32] = x,
                        out: &mut [f32] = out,
                        rows_max: &mut [f32] = rows_max,
                    ) -> ())
                },
            );
        out
    }

    /// One plane: for each output row, the maximum over the window's input rows column by
    /// column (a loop over whole rows, which vectorizes, into `rows_max`, a row long), then
    /// over each window's columns.
    #[inline(always)]
    fn plane(&self, x: &[f32], out: &mut [f32], rows_max: &mut [f32]) {
        let width = self.width;
        for (oy, out) in out.chunks_exact_mut(self.out_width).enumerate() {
            let mut rows = self
                .window(oy, 0, self.height)
                .map(|y| &x[y * width..(y + 1) * width]);
            // Not empty: the padding is at most half the kernel.
            let Some(first) = rows.next() else { continue };
            rows_max.copy_from_slice(first);
            for row in rows {
                for (m, &v) in rows_max.iter_mut().zip(row) {
                    *m = nan_max(*m, v);
                }
            }
            for (ox, out) in out.iter_mut().enumerate() {
                *out = rows_max[self.window(ox, 1, width)]
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &v| nan_max(m, v));
            }
        }
    }

    /// The input rows (`axis` 0) or columns (1) under output position `o`'s window, clipped
    /// to the image (`size` along that axis).
    #[inline(always)]
    fn window(&self, o: usize, axis: usize, size: usize) -> std::ops::Range<usize> {
        let start = (o * self.stride[axis]).saturating_sub(self.padding[axis]);
        let end = (o * self.stride[axis] + self.kernel[axis]).saturating_sub(self.padding[axis]);
        start..end.min(size)
    }
}

/// The larger of `m` and `v`, NaN if either is (PyTorch's max pooling propagates NaN).
#[inline(always)]
fn nan_max(m: f32, v: f32) -> f32 {
    if v > m || v.is_nan() { v } else { m }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::seeded_values;

    /// Every instruction set the CPU has pools to the baseline's bits, NaN included.
    #[test]
    fn pooling_is_the_same_on_every_instruction_set() {
        for (side, kernel, stride, padding) in [(37, 3, 2, 1), (12, 2, 2, 0), (9, 3, 1, 1)] {
            let pool = MaxPool::new([2, 3, side, side], [kernel; 2], [stride; 2], [padding; 2])
                .expect("a valid pooling");
            let mut x = seeded_values(2 * 3 * side * side, 1);
            x[side + 4] = f32::NAN;
            let bits = |v: Vec<f32>| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let baseline = bits(pool.with_simd(Simd::Baseline).forward(&x));
            for simd in Simd::available() {
                assert_eq!(bits(pool.with_simd(simd).forward(&x)), baseline, "{simd:?}");
            }
        }
    }
}
