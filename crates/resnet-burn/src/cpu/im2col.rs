//! The geometry and the kernels of a convolution computed as im2col + gemm: the forward
//! product, and both halves of its backward (the input's and the weight's gradient).
//!
//! Every kernel works on one image at a time, with the `gemm` crate (which flex uses too).
//! In the backward, images are shared between threads in fixed groups, so that sums over
//! the batch (the weight's gradient) are added in the same order on every run: training
//! stays deterministic.

use burn::nn::conv::Conv2d;
use rayon::prelude::*;
use std::marker::PhantomData;
use std::mem::MaybeUninit;

use crate::geometry::{is_plain, output_size};

/// The geometry of one convolution computed as im2col + gemm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Im2col {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    out_channels: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    out_height: usize,
    out_width: usize,
}

impl Im2col {
    /// The geometry of `conv` on an input of shape `input` (NCHW) with its (symmetric)
    /// `padding`, if these kernels compute it: ungrouped, undilated, bias-free.
    pub(crate) fn for_conv(conv: &Conv2d, input: [usize; 4], padding: [usize; 2]) -> Option<Self> {
        is_plain(conv)
            .then(|| Self::new(input, conv.weight.dims(), conv.stride, padding))
            .flatten()
    }

    /// The geometry of a convolution of an NCHW input by an OIHW weight, if consistent.
    pub(crate) fn new(
        input: [usize; 4],
        weight: [usize; 4],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> Option<Self> {
        let [batch, channels, height, width] = input;
        let [out_channels, weight_channels, kh, kw] = weight;
        let out_height = output_size(height, kh, stride[0], padding[0])?;
        let out_width = output_size(width, kw, stride[1], padding[1])?;
        (weight_channels == channels && batch * out_channels * out_height * out_width > 0)
            .then_some(Self {
                batch,
                channels,
                height,
                width,
                out_channels,
                kernel: [kh, kw],
                stride,
                padding,
                out_height,
                out_width,
            })
    }

    pub(crate) fn stride(&self) -> [usize; 2] {
        self.stride
    }

    pub(crate) fn padding(&self) -> [usize; 2] {
        self.padding
    }

    pub(crate) fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// `[batch, channels, height, width]`.
    pub(crate) fn in_shape(&self) -> [usize; 4] {
        [self.batch, self.channels, self.height, self.width]
    }

    /// `[out_channels, in_channels, kh, kw]`.
    pub(crate) fn weight_shape(&self) -> [usize; 4] {
        let [kh, kw] = self.kernel;
        [self.out_channels, self.channels, kh, kw]
    }

    /// `[batch, out_channels, out_height, out_width]`.
    pub(crate) fn out_shape(&self) -> [usize; 4] {
        [
            self.batch,
            self.out_channels,
            self.out_height,
            self.out_width,
        ]
    }

    /// Output pixels of an image, the columns of its im2col matrix.
    pub(crate) fn pixels(&self) -> usize {
        self.out_height * self.out_width
    }

    /// Rows of the im2col matrix (`in_channels * kh * kw`).
    fn depth(&self) -> usize {
        self.channels * self.kernel[0] * self.kernel[1]
    }

    /// Values in one input image.
    fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Values in one output image.
    fn out_image_len(&self) -> usize {
        self.out_channels * self.pixels()
    }

    /// Whether the input is its own im2col matrix (1x1, stride 1, no padding).
    fn pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0, 0]
    }

    /// An im2col buffer, empty where the input is its own matrix.
    fn column_buffer(&self) -> Vec<f32> {
        if self.pointwise() {
            Vec::new()
        } else {
            vec![0f32; self.depth() * self.pixels()]
        }
    }

    /// How the batch is shared: images per group, and whether each product is itself
    /// parallel (when there are fewer images than threads).
    fn groups(&self) -> (usize, gemm::Parallelism) {
        let threads = rayon::current_num_threads().max(1);
        if self.batch >= threads {
            (self.batch.div_ceil(threads), gemm::Parallelism::None)
        } else {
            (self.batch, gemm::Parallelism::Rayon(0))
        }
    }

    /// The convolution of `input` (NCHW) by `weight` (OIHW), NCHW; `epilogue(i, out)` then
    /// runs on image `i`'s `[out_channels, pixels]` output while it is still in cache.
    pub(crate) fn forward(
        &self,
        input: &[f32],
        weight: &[f32],
        epilogue: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Vec<f32> {
        let (image, out_image) = (self.image_len(), self.out_image_len());
        assert_eq!(input.len(), self.batch * image, "input of {self:?}");
        assert_eq!(weight.len(), self.out_channels * self.depth(), "weight");
        let len = self.batch * out_image;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let (_, parallelism) = self.groups();
        // out = weight x im2col(x), then the epilogue, for image `i`.
        let image_product =
            |col: &mut Vec<f32>, (i, (out, x)): (usize, (&mut [MaybeUninit<f32>], &[f32]))| {
                let rhs = self.columns(x, col);
                // SAFETY: `out` is `out_channels x pixels`, `weight` is `out_channels x depth`
                // and `rhs` is `depth x pixels`, all row-major and contiguous (lengths checked
                // here and in `columns`); the product writes every entry of `out`.
                let out = unsafe {
                    self.product(
                        Dst::uninit(out, self.pixels()),
                        Matrix::rows(weight, self.depth()),
                        Matrix::rows(rhs, self.pixels()),
                        false,
                        parallelism,
                    );
                    &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32])
                };
                epilogue(i, out);
            };
        let spare = &mut out.spare_capacity_mut()[..len];
        if matches!(parallelism, gemm::Parallelism::None) {
            // Images are independent here: threads take them as they come.
            spare
                .par_chunks_mut(out_image)
                .zip(input.par_chunks(image))
                .enumerate()
                .for_each_init(|| self.column_buffer(), image_product);
        } else {
            // Fewer images than threads: each product is parallel.
            let mut col = self.column_buffer();
            let images = spare.chunks_mut(out_image).zip(input.chunks(image));
            images
                .enumerate()
                .for_each(|item| image_product(&mut col, item));
        }
        // SAFETY: the products above wrote all `len` values, image by image.
        unsafe { out.set_len(len) };
        out
    }

    /// The gradients of the convolution's input and weight, given its input, weight and
    /// the gradient of its output (`grad`, NCHW); each only where asked for.
    pub(crate) fn backward(
        &self,
        input: &[f32],
        weight: &[f32],
        grad: &[f32],
        want_input: bool,
        want_weight: bool,
    ) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
        let (image, out_image) = (self.image_len(), self.out_image_len());
        assert_eq!(input.len(), self.batch * image, "input of {self:?}");
        assert_eq!(weight.len(), self.out_channels * self.depth(), "weight");
        assert_eq!(grad.len(), self.batch * out_image, "gradient of {self:?}");
        let (per_group, parallelism) = self.groups();
        let mut input_grad = want_input.then(|| vec![0f32; self.batch * image]);
        let input_grads: Vec<Option<&mut [f32]>> = match input_grad.as_mut() {
            Some(all) => all.chunks_mut(per_group * image).map(Some).collect(),
            None => input.chunks(per_group * image).map(|_| None).collect(),
        };
        let weight_grads: Vec<Option<Vec<f32>>> = input_grads
            .into_par_iter()
            .zip(input.par_chunks(per_group * image))
            .zip(grad.par_chunks(per_group * out_image))
            .map(|((input_grad, input), grad)| {
                self.backward_group(input, weight, grad, input_grad, want_weight, parallelism)
            })
            .collect();
        // The groups' partial sums, added in order.
        let weight_grad = weight_grads.into_iter().flatten().reduce(|mut sum, part| {
            sum.iter_mut().zip(&part).for_each(|(s, p)| *s += p);
            sum
        });
        (input_grad, weight_grad)
    }

    /// [`Self::backward`] for consecutive images: writes their input gradients (when
    /// given a buffer) and returns the sum of their weight gradients (when `want_weight`).
    fn backward_group(
        &self,
        input: &[f32],
        weight: &[f32],
        grad: &[f32],
        mut input_grad: Option<&mut [f32]>,
        want_weight: bool,
        parallelism: gemm::Parallelism,
    ) -> Option<Vec<f32>> {
        let (image, out_image) = (self.image_len(), self.out_image_len());
        let (pixels, depth) = (self.pixels(), self.depth());
        let mut weight_grad = want_weight.then(|| vec![0f32; self.out_channels * depth]);
        let mut col = self.column_buffer();
        let mut col_grad = self.column_buffer();
        for (k, (x, g)) in input
            .chunks_exact(image)
            .zip(grad.chunks_exact(out_image))
            .enumerate()
        {
            if let Some(weight_grad) = weight_grad.as_mut() {
                let columns = self.columns(x, &mut col);
                // weight_grad += grad x im2col(x)^T
                // SAFETY: `weight_grad` is `out_channels x depth` row-major, `g` is
                // `out_channels x pixels` row-major and `columns` is `depth x pixels`
                // row-major, read transposed (lengths checked above and in `columns`).
                unsafe {
                    self.product(
                        Dst::rows(weight_grad, depth),
                        Matrix::rows(g, pixels),
                        Matrix::columns(columns, pixels),
                        true,
                        parallelism,
                    );
                }
            }
            if let Some(all) = input_grad.as_mut() {
                let x_grad = &mut all[k * image..(k + 1) * image];
                let dst: &mut [f32] = if self.pointwise() {
                    x_grad
                } else {
                    &mut col_grad
                };
                // im2col(x_grad) = weight^T x grad
                // SAFETY: `dst` is `depth x pixels` row-major (the pointwise input image is
                // exactly that), `weight` is `out_channels x depth` row-major read
                // transposed, `g` is `out_channels x pixels` row-major.
                unsafe {
                    self.product(
                        Dst::rows(dst, pixels),
                        Matrix::columns(weight, depth),
                        Matrix::rows(g, pixels),
                        false,
                        parallelism,
                    );
                }
                if !self.pointwise() {
                    self.scatter(&col_grad, x_grad);
                }
            }
        }
        weight_grad
    }

    /// The im2col matrix of image `x` (`depth x pixels`): `x` itself when pointwise, else
    /// `col` filled.
    fn columns<'a>(&self, x: &'a [f32], col: &'a mut [f32]) -> &'a [f32] {
        let rhs: &[f32] = if self.pointwise() {
            x
        } else {
            self.fill(x, col);
            col
        };
        assert_eq!(
            rhs.len(),
            self.depth() * self.pixels(),
            "im2col of {self:?}"
        );
        rhs
    }

    /// `dst = lhs x rhs`, or `dst += lhs x rhs` with `accumulate`, checking that the three
    /// shapes agree.
    ///
    /// # Safety
    /// With `accumulate`, `dst` must be initialized (it always is when made by
    /// [`Dst::rows`]).
    unsafe fn product(
        &self,
        dst: Dst<'_>,
        lhs: Matrix<'_>,
        rhs: Matrix<'_>,
        accumulate: bool,
        parallelism: gemm::Parallelism,
    ) {
        let (m, n, k) = (dst.rows, dst.cols, lhs.cols);
        assert!(
            lhs.rows == m && rhs.rows == k && rhs.cols == n,
            "product of {self:?}: {m}x{n} = {}x{} x {}x{}",
            lhs.rows,
            lhs.cols,
            rhs.rows,
            rhs.cols
        );
        // SAFETY: each view addresses only its slice (see `Matrix` and `Dst`) and the shapes
        // agree, so every index the product touches is in bounds; gemm reads `dst` only with
        // `accumulate`, when the caller guarantees it is initialized.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.ptr,
                1,
                dst.cols as isize,
                accumulate,
                lhs.data.as_ptr(),
                lhs.col_stride,
                lhs.row_stride,
                rhs.data.as_ptr(),
                rhs.col_stride,
                rhs.row_stride,
                if accumulate { 1.0 } else { 0.0 },
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }

    /// The im2col matrix of one image: row `(c * kh + i) * kw + j` holds input channel `c`
    /// seen through kernel position `(i, j)` at every output pixel (0 in the padding).
    fn fill(&self, x: &[f32], col: &mut [f32]) {
        for (r, row) in col.chunks_exact_mut(self.pixels()).enumerate() {
            let (plane, first, end) = self.row_span(r);
            let plane = &x[plane];
            for (oy, dst) in row.chunks_exact_mut(self.out_width).enumerate() {
                match self.source(r, oy, first, end) {
                    None => dst.fill(0.0),
                    Some((start, sx)) => {
                        dst[..first].fill(0.0);
                        dst[end..].fill(0.0);
                        let src = &plane[start..];
                        if sx == 1 {
                            dst[first..end].copy_from_slice(&src[..end - first]);
                        } else {
                            for (d, s) in dst[first..end].iter_mut().zip(src.iter().step_by(sx)) {
                                *d = *s;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The adjoint of [`Self::fill`] (col2im): adds each entry of an im2col-shaped matrix
    /// to the input position it was read from.
    fn scatter(&self, col: &[f32], x: &mut [f32]) {
        for (r, row) in col.chunks_exact(self.pixels()).enumerate() {
            let (plane, first, end) = self.row_span(r);
            let plane = &mut x[plane];
            for (oy, src) in row.chunks_exact(self.out_width).enumerate() {
                let Some((start, sx)) = self.source(r, oy, first, end) else {
                    continue;
                };
                let (src, dst) = (&src[first..end], &mut plane[start..]);
                if sx == 1 {
                    // Two slices of one length: a loop the compiler vectorizes.
                    for (d, s) in dst[..src.len()].iter_mut().zip(src) {
                        *d += *s;
                    }
                } else {
                    for (d, s) in dst.iter_mut().step_by(sx).zip(src) {
                        *d += *s;
                    }
                }
            }
        }
    }

    /// For im2col row `r`: the range of its input channel's plane, and the output columns
    /// `first..end` whose input column `ox * sx + j - px` is inside the image.
    fn row_span(&self, r: usize) -> (std::ops::Range<usize>, usize, usize) {
        let [kh, kw] = self.kernel;
        let (c, j) = (r / (kh * kw), r % kw);
        let (sx, px, w) = (self.stride[1], self.padding[1], self.width);
        let first = px.saturating_sub(j).div_ceil(sx);
        let end = (w + px).saturating_sub(j).div_ceil(sx).min(self.out_width);
        let plane = self.height * w;
        (c * plane..(c + 1) * plane, first, end)
    }

    /// For im2col row `r` and output row `oy`: the offset in the plane of the input read by
    /// output column `first`, and the column stride; `None` when that input row is padding.
    fn source(&self, r: usize, oy: usize, first: usize, end: usize) -> Option<(usize, usize)> {
        let [kh, kw] = self.kernel;
        let (i, j) = (r / kw % kh, r % kw);
        let iy = (oy * self.stride[0] + i).wrapping_sub(self.padding[0]);
        (iy < self.height && first < end).then(|| {
            let sx = self.stride[1];
            (iy * self.width + first * sx + j - self.padding[1], sx)
        })
    }
}

/// A matrix view of a slice for [`Im2col::product`]: its shape and strides, which address
/// only the slice.
struct Matrix<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

impl<'a> Matrix<'a> {
    /// The slice as a row-major matrix with rows of `cols` values.
    fn rows(data: &'a [f32], cols: usize) -> Self {
        let rows = data.len() / cols;
        assert_eq!(rows * cols, data.len(), "a matrix of rows of {cols}");
        Self {
            data,
            rows,
            cols,
            row_stride: cols as isize,
            col_stride: 1,
        }
    }

    /// The transpose of [`Matrix::rows`]`(data, len)`: the slice as a column-major matrix
    /// with columns of `len` values.
    fn columns(data: &'a [f32], len: usize) -> Self {
        let Self {
            data, rows, cols, ..
        } = Self::rows(data, len);
        Self {
            data,
            rows: cols,
            cols: rows,
            row_stride: 1,
            col_stride: len as isize,
        }
    }
}

/// The destination of [`Im2col::product`]: a row-major matrix over a slice, initialized or
/// not.
struct Dst<'a> {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    _slice: PhantomData<&'a mut [f32]>,
}

impl<'a> Dst<'a> {
    /// The slice as a row-major matrix with rows of `cols` values.
    fn rows(data: &'a mut [f32], cols: usize) -> Self {
        let rows = data.len() / cols;
        assert_eq!(rows * cols, data.len(), "a matrix of rows of {cols}");
        Self {
            ptr: data.as_mut_ptr(),
            rows,
            cols,
            _slice: PhantomData,
        }
    }

    /// [`Dst::rows`] over memory that the product is to initialize.
    fn uninit(data: &'a mut [MaybeUninit<f32>], cols: usize) -> Self {
        let rows = data.len() / cols;
        assert_eq!(rows * cols, data.len(), "a matrix of rows of {cols}");
        Self {
            ptr: data.as_mut_ptr().cast(),
            rows,
            cols,
            _slice: PhantomData,
        }
    }
}
