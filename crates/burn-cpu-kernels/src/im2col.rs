//! The geometry and the kernels of a convolution computed as im2col + gemm: the forward
//! product, and both halves of its backward (the input's and the weight's gradient).
//!
//! The products are the `gemm` crate's (which flex uses too). The forward multiplies one
//! image at a time. In the backward, images are shared between threads in fixed groups, and
//! small images go through the products several at a time, side by side, in panels of a
//! size fixed by the geometry: sums over the batch (the weight's gradient) are added in the
//! same order on every run, so training stays deterministic.

use burn::nn::conv::Conv2d;
use rayon::prelude::*;
use std::cell::RefCell;
use std::marker::PhantomData;
use std::mem::MaybeUninit;

use crate::geometry::{is_plain, output_size};
use crate::matmul::{self, Strided};
use crate::scratch::with_scratch;
use crate::winograd::{Algorithm, Winograd};
use crate::{ConvAlgorithm, ConvPrecision};

/// The output pixels a product of the backward is given at least, where images are small:
/// several images side by side (see `Im2col::backward_group`).
const PANEL_COLUMNS: usize = 256;

thread_local! {
    /// An image's im2col matrix in the forward, reused between images and calls.
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A panel's matrices in the backward ([`Im2col::backward_group`]).
    static PANELS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The fewest channels, in and out, for which [`Im2col::winograd`] computes a 3x3
/// convolution: its products are over the input channels (the output channels for the input's
/// gradient), and with few of them the transforms cost more than they save. A heuristic, set on
/// a 2-core AVX2 x86-64 (AMD EPYC) with the timing loop that the `kernels` bench
/// (`cargo bench -p burn-cpu-kernels`) now runs: on 64 images Winograd ran at 0.43-0.6x
/// im2col's speed with 3 input channels and at 1.08-2.1x with 16.
const WINOGRAD_CHANNELS: usize = 16;

/// The fewest output pixels over the batch for which [`Im2col::winograd`] computes a 3x3
/// convolution: Winograd transforms the whole weight whatever the batch, which few pixels do
/// not repay. A heuristic, set the same way on the same machine: forward, 512
/// channels ran at 0.36x im2col's speed on 16 pixels (one 4x4 image), 0.58x on 64, 1.0-1.2x
/// on 196-256 and 1.3-1.5x on 1,024; 256 channels at 0.82x on 64, 1.1-1.2x on 256-392.
const WINOGRAD_PIXELS: usize = 256;

/// The smallest image side (height and width) for which [`Im2col::winograd`] takes
/// F(4x4, 3x3) rather than F(2x2, 3x3). A heuristic, set the same way on the same machine
/// (twice):
/// F(4x4, 3x3) ran the forward and the input's gradient 1.1-1.9x as fast as F(2x2, 3x3) on 64
/// images of 16 to 256 channels from 32x32 to 8x8, and 0.95-2.0x on 8 ImageNet images of
/// 56x56 to 14x14; but 0.6-0.7x on 512 channels of 4x4 and 0.5-0.55x on 512 of 7x7, where the
/// weight's transform costs more than the products save: 36 values a kernel where
/// F(2x2, 3x3) has 16, 38 MB at 512 channels, which glibc maps afresh each time (above its
/// 32 MiB threshold) and the kernel faults in page by page (27 ms a transform, where
/// F(2x2, 3x3)'s 17 MB took 3 ms, in a throwaway timing).
const WINOGRAD_4_SIDE: usize = 8;

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
    algorithm: ConvAlgorithm,
    precision: ConvPrecision,
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
                algorithm: ConvAlgorithm::Auto,
                precision: ConvPrecision::F32,
            })
    }

    /// The same geometry, computed by `algorithm` where it applies (see [`Self::winograd`]).
    pub(crate) fn with_algorithm(self, algorithm: ConvAlgorithm) -> Self {
        Self { algorithm, ..self }
    }

    /// The same geometry, its products in `precision`.
    pub(crate) fn with_precision(self, precision: ConvPrecision) -> Self {
        Self { precision, ..self }
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

    /// The same convolution by Winograd's minimal filtering, where that applies and is the
    /// faster: 3x3 kernels of stride 1 and padding 1 with at least [`WINOGRAD_CHANNELS`]
    /// channels in and out and [`WINOGRAD_PIXELS`] output pixels over the batch; by
    /// F(4x4, 3x3) on images of [`WINOGRAD_4_SIDE`] pixels a side or more, else by
    /// F(2x2, 3x3). (Its weight's gradient asks for more: [`Winograd::weight_grad_pays`].)
    pub(crate) fn winograd(&self) -> Option<Winograd> {
        let stencil = self.kernel == [3, 3] && self.stride == [1, 1] && self.padding == [1, 1];
        let algorithm = match self.algorithm {
            ConvAlgorithm::Im2col => return None,
            ConvAlgorithm::WinogradF2 => Algorithm::F2,
            ConvAlgorithm::WinogradF4 => Algorithm::F4,
            ConvAlgorithm::Auto => {
                let pays = self.channels.min(self.out_channels) >= WINOGRAD_CHANNELS
                    && self.batch * self.pixels() >= WINOGRAD_PIXELS;
                if !pays {
                    return None;
                }
                // F(4x4, 3x3)'s transforms scale values by up to 8 and 1/30: with bf16
                // operands its error reached 3% of the output's magnitude, F(2x2, 3x3)'s
                // stays within bf16's own rounding (`bf16_training_is_within_...`).
                if self.height.min(self.width) >= WINOGRAD_4_SIDE
                    && self.precision == ConvPrecision::F32
                {
                    Algorithm::F4
                } else {
                    Algorithm::F2
                }
            }
        };
        stencil.then(|| {
            Winograd::new(
                self.batch,
                self.channels,
                self.height,
                self.width,
                self.out_channels,
            )
            .with_algorithm(algorithm)
            .with_precision(self.precision)
        })
    }

    /// Values of an image's im2col buffer: none where the input is its own matrix.
    fn column_len(&self) -> usize {
        if self.pointwise() {
            0
        } else {
            self.depth() * self.pixels()
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
            |col: &mut [f32], (i, (out, x)): (usize, (&mut [MaybeUninit<f32>], &[f32]))| {
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
        // `columns` writes every value of the buffer it reads.
        let with_buffer =
            |item| with_scratch(&COLUMNS, self.column_len(), |col| image_product(col, item));
        let spare = &mut out.spare_capacity_mut()[..len];
        if matches!(parallelism, gemm::Parallelism::None) {
            // Images are independent here: threads take them as they come.
            spare
                .par_chunks_mut(out_image)
                .zip(input.par_chunks(image))
                .enumerate()
                .for_each(with_buffer);
        } else {
            // Fewer images than threads: each product is parallel.
            let images = spare.chunks_mut(out_image).zip(input.chunks(image));
            images.enumerate().for_each(with_buffer);
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
        let (per_group, _) = self.groups();
        let span = self.panel_images(per_group);
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
                self.backward_group(input, weight, grad, input_grad, want_weight, span)
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
    ///
    /// The products take `span` images at a time, side by side (see [`Self::panel_images`]):
    /// one 4x4 image (the last stage of an 18-layer residual network on CIFAR-10) has 16
    /// output pixels, and its weight gradient alone is a product that reads and writes the
    /// whole gradient (2.4 million values) for 16 multiply-adds per value.
    fn backward_group(
        &self,
        input: &[f32],
        weight: &[f32],
        grad: &[f32],
        mut input_grad: Option<&mut [f32]>,
        want_weight: bool,
        span: usize,
    ) -> Option<Vec<f32>> {
        let (image, out_image) = (self.image_len(), self.out_image_len());
        let (pixels, depth) = (self.pixels(), self.depth());
        let (_, parallelism) = self.groups();
        assert!(span > 0, "panels of at least one image");
        let mut weight_grad = want_weight.then(|| vec![0f32; self.out_channels * depth]);
        // A panel's im2col matrix (for the weight's gradient), its gradient (for the input's)
        // and its images' output gradients side by side, each only where it is used: a single
        // pointwise image is its own im2col matrix, one image needs no copy.
        let copies = span > 1 || !self.pointwise();
        let len = |rows: usize, used: bool| if used { rows * span * pixels } else { 0 };
        let lens = [
            len(depth, want_weight && copies),
            len(depth, input_grad.is_some() && copies),
            len(self.out_channels, span > 1),
        ];
        // One buffer cut in three; every value of each is written before it is read.
        with_scratch(&PANELS, lens.iter().sum(), |buffer| {
            let (col, rest) = buffer.split_at_mut(lens[0]);
            let (col_grad, grads) = rest.split_at_mut(lens[1]);
            for (k, (x, g)) in input
                .chunks(span * image)
                .zip(grad.chunks(span * out_image))
                .enumerate()
            {
                let images = x.len() / image;
                let width = images * pixels;
                let g = self.side_by_side(g, grads);
                if let Some(weight_grad) = weight_grad.as_mut() {
                    let columns = self.columns(x, col);
                    // weight_grad += grad x im2col(x)^T
                    // SAFETY: `weight_grad` is `out_channels x depth` row-major, `g` is
                    // `out_channels x width` row-major and `columns` is `depth x width` row-major,
                    // read transposed (lengths checked above and in `Matrix::rows`).
                    unsafe {
                        self.product(
                            Dst::rows(weight_grad, depth),
                            Matrix::rows(g, width),
                            Matrix::columns(columns, width),
                            true,
                            parallelism,
                        );
                    }
                }
                if let Some(all) = input_grad.as_mut() {
                    let x_grad = &mut all[k * span * image..][..images * image];
                    // A pointwise image is its own im2col matrix, and so is its gradient.
                    let direct = images == 1 && self.pointwise();
                    let dst: &mut [f32] = if direct {
                        x_grad
                    } else {
                        &mut col_grad[..depth * width]
                    };
                    // im2col(x_grad) = weight^T x grad
                    // SAFETY: `dst` is `depth x width` row-major (the pointwise input image is
                    // exactly that), `weight` is `out_channels x depth` row-major read
                    // transposed, `g` is `out_channels x width` row-major.
                    unsafe {
                        self.product(
                            Dst::rows(dst, width),
                            Matrix::columns(weight, depth),
                            Matrix::rows(g, width),
                            false,
                            parallelism,
                        );
                    }
                    if !direct {
                        self.scatter(&col_grad[..depth * width], x_grad);
                    }
                }
            }
        });
        weight_grad
    }

    /// How many images of a group of `images` go through one product of the backward: as
    /// many as give it [`PANEL_COLUMNS`] columns (output pixels), at least one.
    fn panel_images(&self, images: usize) -> usize {
        PANEL_COLUMNS
            .div_ceil(self.pixels())
            .clamp(1, images.max(1))
    }

    /// The im2col matrices of the images `x`, side by side (`depth x images * pixels`): `x`
    /// itself for one pointwise image, else filled into `col`.
    fn columns<'a>(&self, x: &'a [f32], col: &'a mut [f32]) -> &'a [f32] {
        let images = x.len() / self.image_len();
        if images == 1 && self.pointwise() {
            return x;
        }
        let col = &mut col[..self.depth() * images * self.pixels()];
        self.fill(x, col);
        col
    }

    /// The output gradients `g` of a panel's images, side by side (`out_channels x images *
    /// pixels`): `g` itself for one image, else copied into `buf`.
    fn side_by_side<'a>(&self, g: &'a [f32], buf: &'a mut [f32]) -> &'a [f32] {
        let (pixels, images) = (self.pixels(), g.len() / self.out_image_len());
        if images == 1 {
            return g;
        }
        let width = images * pixels;
        let buf = &mut buf[..self.out_channels * width];
        for (i, g) in g.chunks_exact(self.out_image_len()).enumerate() {
            for (dst, src) in buf.chunks_exact_mut(width).zip(g.chunks_exact(pixels)) {
                dst[i * pixels..][..pixels].copy_from_slice(src);
            }
        }
        buf
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
        let view = |m: &Matrix<'_>| Strided {
            ptr: m.data.as_ptr(),
            row_stride: m.row_stride,
            col_stride: m.col_stride,
        };
        let out = Strided {
            ptr: dst.ptr,
            row_stride: dst.cols as isize,
            col_stride: 1,
        };
        // SAFETY: each view addresses only its slice (see `Matrix` and `Dst`) and the shapes
        // agree, so every index the product touches is in bounds; `dst` is read only with
        // `accumulate`, when the caller guarantees it is initialized.
        unsafe {
            matmul::product(
                self.precision,
                [m, n, k],
                out,
                accumulate,
                view(&lhs),
                view(&rhs),
                parallelism,
            );
        }
    }

    /// The im2col matrix of the images `x`, side by side: row `(c * kh + i) * kw + j` holds
    /// input channel `c` seen through kernel position `(i, j)` at every output pixel of each
    /// image in turn (0 in the padding).
    fn fill(&self, x: &[f32], col: &mut [f32]) {
        let (image, pixels, width) = (self.image_len(), self.pixels(), self.out_width);
        let images = x.len() / image;
        let row_len = images * pixels;
        assert_eq!(col.len(), self.depth() * row_len, "im2col of {self:?}");
        self.segments(|r, oy, source| {
            for (i, x) in x.chunks_exact(image).enumerate() {
                let dst = &mut col[r * row_len + i * pixels + oy * width..][..width];
                let Some(Segment { start, first, end }) = source else {
                    dst.fill(0.0);
                    continue;
                };
                dst[..first].fill(0.0);
                dst[end..].fill(0.0);
                let (dst, sx) = (&mut dst[first..end], self.stride[1]);
                if sx == 1 {
                    dst.copy_from_slice(&x[start..start + dst.len()]);
                } else if let Some((last, dst)) = dst.split_last_mut()
                    && sx == 2
                {
                    // Pairs, of which the first: a loop the compiler vectorizes, where
                    // `step_by` reads one value at a time.
                    let pairs = x[start..start + 2 * dst.len()].as_chunks::<2>().0;
                    for (d, &[s, _]) in dst.iter_mut().zip(pairs) {
                        *d = s;
                    }
                    *last = x[start + 2 * dst.len()];
                } else {
                    for (d, s) in dst.iter_mut().zip(x[start..].iter().step_by(sx)) {
                        *d = *s;
                    }
                }
            }
        });
    }

    /// The adjoint of [`Self::fill`] (col2im): adds each entry of an im2col-shaped matrix
    /// of the images `x` to the position of `x` it was read from.
    fn scatter(&self, col: &[f32], x: &mut [f32]) {
        let (image, pixels, width) = (self.image_len(), self.pixels(), self.out_width);
        let row_len = x.len() / image * pixels;
        assert_eq!(col.len(), self.depth() * row_len, "col2im of {self:?}");
        self.segments(|r, oy, source| {
            let Some(Segment { start, first, end }) = source else {
                return;
            };
            for (i, x) in x.chunks_exact_mut(image).enumerate() {
                let src = &col[r * row_len + i * pixels + oy * width..][first..end];
                let sx = self.stride[1];
                if sx == 1 {
                    // Two slices of one length: a loop the compiler vectorizes.
                    for (d, s) in x[start..start + src.len()].iter_mut().zip(src) {
                        *d += *s;
                    }
                } else {
                    for (d, s) in x[start..].iter_mut().step_by(sx).zip(src) {
                        *d += *s;
                    }
                }
            }
        });
    }

    /// Calls `visit(r, oy, source)` for every row `r` of the im2col matrix, in order, and
    /// every output row `oy`: `source` tells where in the image that stretch of output
    /// columns reads, `None` where its input row is padding. The loops run over channels and
    /// kernel positions, with no division per row: a 4x4 image (the last stage of a residual
    /// network on CIFAR-10) has rows of 4 values, and a row's indices were computed with
    /// four.
    fn segments(&self, mut visit: impl FnMut(usize, usize, Option<Segment>)) {
        let [kh, kw] = self.kernel;
        let [sy, sx] = self.stride;
        let [py, px] = self.padding;
        let (height, width) = (self.height, self.width);
        let mut r = 0;
        for c in 0..self.channels {
            let plane = c * height * width;
            for i in 0..kh {
                for j in 0..kw {
                    // The output columns whose input column `ox * sx + j - px` is inside.
                    let first = px.saturating_sub(j).div_ceil(sx);
                    let end = (width + px)
                        .saturating_sub(j)
                        .div_ceil(sx)
                        .min(self.out_width);
                    for oy in 0..self.out_height {
                        let iy = (oy * sy + i).wrapping_sub(py);
                        let source = (iy < height && first < end).then(|| Segment {
                            start: plane + iy * width + first * sx + j - px,
                            first,
                            end,
                        });
                        visit(r, oy, source);
                    }
                    r += 1;
                }
            }
        }
    }
}

/// Where a stretch of an im2col row reads in the image (see [`Im2col::segments`]): output
/// columns `first..end` read from offset `start` on, every `stride[1]` values.
#[derive(Clone, Copy)]
struct Segment {
    start: usize,
    first: usize,
    end: usize,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_values_close, seeded_values as values};

    /// The backward in panels of every size, against the same images one at a time: the
    /// im2col matrices and gradients side by side, a last panel shorter than the others
    /// (a single image among them), pointwise inputs copied into a panel.
    #[test]
    fn panels_match_images_one_by_one() {
        // batch, channels, out channels, kernel, stride, padding, side
        for (batch, c, o, k, s, p, side) in [
            (5, 3, 4, 3, 1, 1, 5),
            (4, 2, 3, 3, 2, 1, 7),
            (5, 6, 4, 1, 1, 0, 3),
            (3, 4, 2, 1, 2, 0, 6),
            (4, 2, 2, 3, 1, 0, 3),
        ] {
            let geometry = Im2col::new([batch, c, side, side], [o, c, k, k], [s, s], [p, p])
                .expect("a valid geometry");
            let input = values(batch * geometry.image_len(), 1);
            let weight = values(o * geometry.depth(), 2);
            let grad = values(batch * geometry.out_image_len(), 3);
            let run = |span| {
                let mut input_grad = vec![0f32; input.len()];
                let weight_grad = geometry
                    .backward_group(&input, &weight, &grad, Some(&mut input_grad), true, span)
                    .expect("asked for");
                (input_grad, weight_grad)
            };
            let (input_want, weight_want) = run(1);
            for span in 2..=batch + 1 {
                let (input_got, weight_got) = run(span);
                let case = format!("{geometry:?} in panels of {span}, against one by one");
                assert_values_close(
                    &format!("input gradient of {case}"),
                    &input_got,
                    &input_want,
                );
                assert_values_close(
                    &format!("weight gradient of {case}"),
                    &weight_got,
                    &weight_want,
                );
            }
        }
    }

    #[test]
    fn winograd_takes_wide_3x3_convolutions_of_enough_pixels() {
        let winograd = |batch, c, o, k, s, p, side| {
            Im2col::new([batch, c, side, side], [o, c, k, k], [s, s], [p, p])
                .expect("a valid geometry")
                .winograd()
                .map(|winograd| winograd.algorithm())
        };
        let (f2, f4) = (Some(Algorithm::F2), Some(Algorithm::F4));
        assert_eq!(
            winograd(64, 64, 64, 3, 1, 1, 32),
            f4,
            "64 channels at 32x32"
        );
        assert_eq!(winograd(64, 256, 256, 3, 1, 1, 8), f4, "its third");
        assert_eq!(
            winograd(64, 512, 512, 3, 1, 1, 4),
            f2,
            "its last: 1,024 pixels"
        );
        assert_eq!(winograd(16, 512, 512, 3, 1, 1, 4), f2, "256 pixels");
        assert_eq!(
            winograd(8, 512, 512, 3, 1, 1, 7),
            f2,
            "512 channels at 7x7, 392 pixels"
        );
        assert_eq!(
            winograd(5, 16, 24, 3, 1, 1, 15),
            f4,
            "the case of cpu::tests"
        );
        assert_eq!(winograd(64, 3, 64, 3, 1, 1, 32), None, "CIFAR-10's stem");
        assert_eq!(winograd(64, 64, 128, 3, 2, 1, 32), None, "stride 2");
        assert_eq!(winograd(64, 64, 64, 1, 1, 0, 32), None, "pointwise");
        assert_eq!(
            winograd(4, 512, 512, 3, 1, 1, 7),
            None,
            "512 channels at 7x7, 196 pixels"
        );
    }

    #[test]
    fn panels_hold_enough_pixels() {
        let geometry = |side| Im2col::new([64, 8, side, side], [8, 8, 3, 3], [1, 1], [1, 1]);
        let images = |side, group| geometry(side).unwrap().panel_images(group);
        assert_eq!(images(32, 32), 1, "1,024 pixels an image");
        assert_eq!(images(8, 32), PANEL_COLUMNS / 64);
        assert_eq!(images(4, 32), PANEL_COLUMNS / 16);
        assert_eq!(images(4, 3), 3, "no more than the group");
        assert_eq!(images(1, 0), 1);
    }
}
