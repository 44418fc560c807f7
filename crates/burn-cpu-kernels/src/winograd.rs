//! 3x3 convolutions of stride 1 and padding 1 by Winograd's minimal filtering F(2x2, 3x3) or
//! F(4x4, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! In F(2x2, 3x3), each 2x2 block of output pixels comes from the 4x4 block of input around
//! it. Both the input blocks and the 3x3 kernels are transformed into 4x4 blocks (`B^T d B`
//! and `G g G^T`, sums and halves only), the 16 positions of a block are 16 independent
//! matrix products over the channels, and each 2x2 output block is transformed back
//! (`A^T m A`). The products take 16 multiplications a 2x2 block where the direct
//! convolution takes 36. F(4x4, 3x3) does the same with 4x4 output blocks and 6x6 input
//! ones: 36 multiplications where the direct convolution takes 144, for transforms with more
//! terms and a rounding error 7 to 9 times larger (still below 1e-5 of the output's
//! magnitude; `rounding_error_on_residual_network_layers`). The forward and the input's
//! gradient use either ([`Algorithm`]); the weight's gradient F(2x2, 3x3).
//!
//! The products are the `gemm` crate's in f32 ([`matmul`]). The transforms compute eight blocks at a time,
//! compiled for AVX2 where the CPU has it ([`Simd`]; SSE2 elsewhere on x86-64; an AVX-512 copy is tested, not chosen). Images are shared
//! between threads in panels of a size fixed by the geometry and the number of threads, and
//! the weight's gradient sums the threads' parts in order, so the results are the same on
//! every run.

use rayon::prelude::*;
use std::mem::MaybeUninit;

use crate::ConvPrecision;
use crate::matmul::{self, Strided};
use crate::simd::{Simd, dispatch};

/// The output pixels a panel's products are given at least, where images are small: several
/// images side by side. 256 blocks of F(2x2, 3x3), 64 of F(4x4, 3x3), whose transformed
/// blocks hold 2.25 values a pixel where F(2x2, 3x3)'s hold 4. With 256 blocks of
/// F(4x4, 3x3) instead, its forward took 1.4-1.7x as long on 64
/// images of 64 channels of 32x32 to 256 of 8x8, in two rounds of three (the same in the
/// third; 2 cores, whose L2 caches hold 512 KiB, the fastest of 9 runs, timed by a throwaway
/// test).
const PANEL_PIXELS: usize = 1024;

/// The output pixels a thread from which [`Winograd::weight_grad`] beats im2col's
/// product. Measured on a 2-core AMD EPYC (AVX2) by the timing the `kernels` bench now runs: on 1,024 pixels (512 a thread)
/// it ran at 1.04-1.23x im2col's speed (64 to 512 channels), on 784 at 0.75-1.05x, on 196-392
/// at 0.5-0.76x, and on 3,136 or more at 1.27-1.84x (0.96x on one image of 3,136, where only
/// the products are parallel).
const GRADIENT_PIXELS_PER_THREAD: usize = 512;

/// Positions of a transformed block of F(2x2, 3x3): 4x4.
const POSITIONS: usize = 16;

/// Positions of a transformed block of F(4x4, 3x3): 6x6.
const POSITIONS_4: usize = 36;

/// Which of Winograd's minimal filterings a [`Winograd`] computes its forward by (and so its
/// input's gradient, a forward of the transposed convolution; the weight's gradient is always
/// F(2x2, 3x3)'s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Algorithm {
    /// F(2x2, 3x3): 2x2 output blocks from 4x4 input ones, 16 multiplications a block where
    /// the direct convolution takes 36.
    F2,
    /// F(4x4, 3x3): 4x4 output blocks from 6x6 input ones, 36 multiplications a block where
    /// the direct convolution takes 144, at a larger rounding error: its transforms multiply
    /// by up to 8 and by 1/6, 1/15 and 1/30 ([`input_side_4`]).
    F4,
}

impl Algorithm {
    /// The side of an output block.
    fn side(self) -> usize {
        match self {
            Self::F2 => 2,
            Self::F4 => 4,
        }
    }

    /// Positions of a transformed block.
    fn positions(self) -> usize {
        match self {
            Self::F2 => POSITIONS,
            Self::F4 => POSITIONS_4,
        }
    }
}

/// `G^T` on four values of a transformed block: `G^T = [[1, 1/2, 1/2, 0], [0, 1/2, -1/2,
/// 0], [0, 1/2, 1/2, 1]]`.
fn block_side(a: f32, b: f32, c: f32, d: f32) -> [f32; 3] {
    [a + 0.5 * (b + c), 0.5 * (b - c), 0.5 * (b + c) + d]
}

/// Blocks the transforms compute at once, in vectors: one of AVX2 (or AVX-512's 256-bit
/// form, with its 32 registers), two of SSE2.
const LANES: usize = 8;

/// One value of [`LANES`] blocks.
type Lane = [f32; LANES];

// The lanes' arithmetic and the transforms below avoid `std::array::from_fn` and `map`,
// which the compiler does not always inline into the AVX2 and AVX-512 copies of the
// transforms.

#[inline(always)]
fn add(mut a: Lane, b: Lane) -> Lane {
    for (a, b) in a.iter_mut().zip(b) {
        *a += b;
    }
    a
}

#[inline(always)]
fn sub(mut a: Lane, b: Lane) -> Lane {
    for (a, b) in a.iter_mut().zip(b) {
        *a -= b;
    }
    a
}

#[inline(always)]
fn scale(factor: f32, mut a: Lane) -> Lane {
    for a in &mut a {
        *a *= factor;
    }
    a
}

#[inline(always)]
fn neg(mut a: Lane) -> Lane {
    for a in &mut a {
        *a = -*a;
    }
    a
}

/// A transform of [`LANES`] blocks at once, in place, from `IN` values a block to `OUT`, for
/// [`map_columns`]. (A trait, not a closure, and in place: so the compiler inlines it into
/// the AVX2 and AVX-512 copies of the transforms and keeps the values in registers.)
trait Blocks<const N: usize> {
    const IN: usize;
    const OUT: usize;
    fn blocks(values: &mut [Lane; N]);
}

/// `t B`, given `t = B^T d` (`t[4 k + s]`: row `k`, column `s`); `B^T` in
/// [`Winograd::transform_input`].
struct InputColumns;

impl Blocks<POSITIONS> for InputColumns {
    const IN: usize = POSITIONS;
    const OUT: usize = POSITIONS;

    #[inline(always)]
    fn blocks(values: &mut [Lane; POSITIONS]) {
        for row in values.chunks_exact_mut(4) {
            let [t0, t1, t2, t3] = [row[0], row[1], row[2], row[3]];
            row[0] = sub(t0, t2);
            row[1] = add(t1, t2);
            row[2] = sub(t2, t1);
            row[3] = sub(t1, t3);
        }
    }
}

/// `A^T m A`: the four pixels of each 2x2 output block, top left, top right, bottom left,
/// bottom right.
struct OutputColumns;

impl Blocks<POSITIONS> for OutputColumns {
    const IN: usize = POSITIONS;
    const OUT: usize = 4;

    #[inline(always)]
    fn blocks(m: &mut [Lane; POSITIONS]) {
        // A^T m: two rows of four; then A on the right.
        let (mut a, mut b) = ([[0.0; LANES]; 4], [[0.0; LANES]; 4]);
        for l in 0..4 {
            a[l] = add(add(m[l], m[4 + l]), m[8 + l]);
            b[l] = sub(sub(m[4 + l], m[8 + l]), m[12 + l]);
        }
        m[0] = add(add(a[0], a[1]), a[2]);
        m[1] = sub(sub(a[1], a[2]), a[3]);
        m[2] = add(add(b[0], b[1]), b[2]);
        m[3] = sub(sub(b[1], b[2]), b[3]);
    }
}

/// `A dY A^T` of 2x2 blocks (top left, top right, bottom left, bottom right), the adjoint
/// of [`OutputColumns`].
struct GradColumns;

impl Blocks<POSITIONS> for GradColumns {
    const IN: usize = 4;
    const OUT: usize = POSITIONS;

    #[inline(always)]
    fn blocks(z: &mut [Lane; POSITIONS]) {
        let [e0, o0, e1, o1] = [z[0], z[1], z[2], z[3]];
        // A dY: rows r0, r0 + r1, r0 - r1, -r1 (left and right columns apart) ...
        let rows = [
            (e0, o0),
            (add(e0, e1), add(o0, o1)),
            (sub(e0, e1), sub(o0, o1)),
            (neg(e1), neg(o1)),
        ];
        // ... then A^T on the right: columns e, e + o, e - o, -o.
        for (z, (e, o)) in z.chunks_exact_mut(4).zip(rows) {
            z[0] = e;
            z[1] = add(e, o);
            z[2] = sub(e, o);
            z[3] = neg(o);
        }
    }
}

/// `B^T` of F(4x4, 3x3) on six values: `B^T = [[2, -3, -4, 3, 2, 0], [0, -2, 1, 5, 2, 0], [0,
/// 2, -5, 1, 2, 0], [0, -2, -1, 2, 1, 0], [0, 1, -2, -1, 2, 0], [0, 2, -3, -4, 3, 2]]`.
///
/// The minimal filtering of F(4x4, 3x3) interpolates at five points and infinity; these
/// matrices take 0, 1, -1, 1/2 and -2 where Lavin and Gray take 0, 1, -1, 2 and -2, whose
/// rounding error is about three times larger (Barabasz et al., "Error Analysis and
/// Improving the Accuracy of Winograd Convolution for Deep Neural Networks", 2020; measured
/// here 1.0e-5 against 3.8e-6 of the output's magnitude, 128 channels in f32, by
/// `scripts/winograd_points.py`).
#[inline(always)]
fn input_side_4([d0, d1, d2, d3, d4, d5]: [Lane; 6]) -> [Lane; 6] {
    let (u, v) = (sub(d4, d2), sub(d3, d1));
    let (a, b) = (
        add(scale(2.0, u), scale(3.0, d3)),
        add(scale(2.0, v), scale(3.0, d2)),
    );
    [
        sub(add(scale(2.0, add(d0, d4)), scale(3.0, v)), scale(4.0, d2)),
        add(a, b),
        sub(a, b),
        add(u, scale(2.0, v)),
        sub(scale(2.0, u), v),
        sub(add(scale(2.0, add(d1, d5)), scale(3.0, u)), scale(4.0, d3)),
    ]
}

/// `A^T` of F(4x4, 3x3) on six values: `A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 1/2, -2, 0], [0,
/// 1, 1, 1/4, 4, 0], [0, 1, -1, 1/8, -8, 1]]` (its factors powers of two, exact).
#[inline(always)]
fn output_side_4([m0, m1, m2, m3, m4, m5]: [Lane; 6]) -> [Lane; 4] {
    let (p, q) = (add(m1, m2), sub(m1, m2));
    [
        add(add(m0, p), add(m3, m4)),
        add(q, sub(scale(0.5, m3), scale(2.0, m4))),
        add(p, add(scale(0.25, m3), scale(4.0, m4))),
        add(add(q, sub(scale(0.125, m3), scale(8.0, m4))), m5),
    ]
}

/// `t B` of F(4x4, 3x3), given `t = B^T d` (`t[6 k + s]`: row `k`, column `s`).
struct InputColumns4;

impl Blocks<POSITIONS_4> for InputColumns4 {
    const IN: usize = POSITIONS_4;
    const OUT: usize = POSITIONS_4;

    #[inline(always)]
    fn blocks(t: &mut [Lane; POSITIONS_4]) {
        for row in t.chunks_exact_mut(6) {
            let v = input_side_4([row[0], row[1], row[2], row[3], row[4], row[5]]);
            row.copy_from_slice(&v);
        }
    }
}

/// `A^T m A` of F(4x4, 3x3): the 16 pixels of each 4x4 output block, row by row.
struct OutputColumns4;

impl Blocks<POSITIONS_4> for OutputColumns4 {
    const IN: usize = POSITIONS_4;
    const OUT: usize = 16;

    #[inline(always)]
    fn blocks(m: &mut [Lane; POSITIONS_4]) {
        // A^T m: four rows of six; then A on the right.
        let mut t = [[[0.0; LANES]; 6]; 4];
        for s in 0..6 {
            let column =
                output_side_4([m[s], m[6 + s], m[12 + s], m[18 + s], m[24 + s], m[30 + s]]);
            for k in 0..4 {
                t[k][s] = column[k];
            }
        }
        for k in 0..4 {
            let row = output_side_4(t[k]);
            m[4 * k..4 * k + 4].copy_from_slice(&row);
        }
    }
}

/// Runs `B` on each column of `rows` (`[N][columns]`, read from its first `B::IN` rows,
/// written to its first `B::OUT`), [`LANES`] columns at a time, the last ones padded.
#[inline(always)]
fn map_columns<B: Blocks<N>, const N: usize>(rows: &mut [f32], columns: usize) {
    let mut lanes = [[0.0; LANES]; N];
    let full = columns - columns % LANES;
    for start in (0..full).step_by(LANES) {
        for (r, lane) in lanes[..B::IN].iter_mut().enumerate() {
            *lane = *rows[r * columns + start..]
                .first_chunk()
                .expect("rows of `columns` values");
        }
        B::blocks(&mut lanes);
        for (r, lane) in lanes[..B::OUT].iter().enumerate() {
            *rows[r * columns + start..]
                .first_chunk_mut()
                .expect("rows of `columns` values") = *lane;
        }
    }
    let rest = columns - full;
    if rest > 0 {
        lanes = [[0.0; LANES]; N];
        for (r, lane) in lanes[..B::IN].iter_mut().enumerate() {
            lane[..rest].copy_from_slice(&rows[r * columns + full..][..rest]);
        }
        B::blocks(&mut lanes);
        for (r, lane) in lanes[..B::OUT].iter().enumerate() {
            rows[r * columns + full..][..rest].copy_from_slice(&lane[..rest]);
        }
    }
}

/// Defines a method of [`Winograd`] that runs another, `#[inline(always)]` one, compiled for
/// the convolution's instruction set ([`dispatch`]; the same results on every path).
macro_rules! dispatched {
    ($(#[$doc:meta])* fn $name:ident(&self $(, $arg:ident: $ty:ty)*) => $body:ident) => {
        $(#[$doc])*
        fn $name(&self $(, $arg: $ty)*) {
            dispatch!(self.simd, Winograd::$body(this: &Winograd = self $(, $arg: $ty = $arg)*) -> ())
        }
    };
}

/// `G g G^T` of a 3x3 kernel `g` (row-major), row-major: `G = [[1, 0, 0], [1/2, 1/2, 1/2],
/// [1/2, -1/2, 1/2], [0, 0, 1]]`.
#[inline(always)]
fn transform_kernel(g: [f32; 9]) -> [f32; 16] {
    let side = |a: f32, b: f32, c: f32| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
    // G g, column by column; then G^T on the right, row by row.
    let columns = [
        side(g[0], g[3], g[6]),
        side(g[1], g[4], g[7]),
        side(g[2], g[5], g[8]),
    ];
    let mut u = [0f32; 16];
    for (k, row) in u.chunks_exact_mut(4).enumerate() {
        row.copy_from_slice(&side(columns[0][k], columns[1][k], columns[2][k]));
    }
    u
}

/// `G` of F(4x4, 3x3) on three values of [`LANES`] kernels: `G = [[1/2, 0, 0], [1/6, 1/6,
/// 1/6], [-1/6, 1/6, -1/6], [-16/15, -8/15, -4/15], [1/30, -1/15, 2/15], [0, 0, 1/2]]` (the
/// points of [`input_side_4`]).
#[inline(always)]
fn kernel_side_4([a, b, c]: [Lane; 3]) -> [Lane; 6] {
    let ends = add(a, c);
    [
        scale(0.5, a),
        scale(1.0 / 6.0, add(ends, b)),
        scale(1.0 / 6.0, sub(b, ends)),
        scale(-4.0 / 15.0, add(add(scale(4.0, a), scale(2.0, b)), c)),
        scale(1.0 / 30.0, add(sub(a, scale(2.0, b)), scale(4.0, c))),
        scale(0.5, c),
    ]
}

/// A 3x3 convolution of stride 1 and padding 1 (output as large as the input), computed by
/// Winograd's F(2x2, 3x3) or F(4x4, 3x3) ([`Algorithm`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Winograd {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    out_channels: usize,
    algorithm: Algorithm,
    precision: ConvPrecision,
    simd: Simd,
}

impl Winograd {
    /// The convolution of `batch` images of `channels x height x width` into `out_channels`,
    /// by F(2x2, 3x3).
    pub(crate) fn new(
        batch: usize,
        channels: usize,
        height: usize,
        width: usize,
        out_channels: usize,
    ) -> Self {
        Self {
            batch,
            channels,
            height,
            width,
            out_channels,
            algorithm: Algorithm::F2,
            precision: ConvPrecision::F32,
            simd: Simd::detect(),
        }
    }

    /// This convolution by `algorithm`.
    pub(crate) fn with_algorithm(self, algorithm: Algorithm) -> Self {
        Self { algorithm, ..self }
    }

    /// This convolution with its products in `precision`.
    pub(crate) fn with_precision(self, precision: ConvPrecision) -> Self {
        Self { precision, ..self }
    }

    /// This convolution with its transforms compiled for `simd` (by default [`Simd::detect`]'s).
    #[cfg(test)]
    pub(crate) fn with_simd(self, simd: Simd) -> Self {
        Self { simd, ..self }
    }

    /// The algorithm of its forward.
    #[cfg(test)]
    pub(crate) fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The convolution that computes this one's input gradient from its output gradient:
    /// channels swapped, its kernel flipped ([`Self::transposed_weight`]).
    fn transposed(&self) -> Self {
        Self {
            channels: self.out_channels,
            out_channels: self.channels,
            ..*self
        }
    }

    fn tiles_high(&self) -> usize {
        self.height.div_ceil(self.algorithm.side())
    }

    fn tiles_wide(&self) -> usize {
        self.width.div_ceil(self.algorithm.side())
    }

    /// Output blocks an image.
    fn tiles(&self) -> usize {
        self.tiles_high() * self.tiles_wide()
    }

    fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    fn out_image_len(&self) -> usize {
        self.out_channels * self.height * self.width
    }

    /// Images a panel: as many as give it [`PANEL_PIXELS`] output pixels, but no more than
    /// leave every thread a panel.
    fn panel_images(&self) -> usize {
        let threads = rayon::current_num_threads().max(1);
        let side = self.algorithm.side();
        (PANEL_PIXELS / (side * side))
            .div_ceil(self.tiles())
            .min(self.batch.div_ceil(threads))
            .max(1)
    }

    /// The gradient of this convolution's input (NCHW) from its output's, `grad`, given its
    /// OIHW weight: the convolution of `grad` by the weight turned by 180 degrees.
    pub(crate) fn input_grad(&self, grad: &[f32], weight: &[f32]) -> Vec<f32> {
        let transposed = self.transposed();
        transposed.forward(grad, &transposed.transposed_weight(weight), |_, _| {})
    }

    /// Whether [`Self::weight_grad`] is faster than im2col's: its sums, 16 blocks of the
    /// weight's size a thread, are repaid from [`GRADIENT_PIXELS_PER_THREAD`] output pixels a
    /// thread on.
    pub(crate) fn weight_grad_pays(&self) -> bool {
        let threads = rayon::current_num_threads().max(1);
        self.batch * self.height * self.width >= GRADIENT_PIXELS_PER_THREAD * threads
    }

    /// The gradient of this convolution's OIHW weight, given its input `x` and its output's
    /// gradient `grad` (NCHW both), by F(2x2, 3x3) whichever [`Algorithm`] the forward
    /// takes: the adjoint of the forward, `G^T [sum over blocks of (A dY A^T) * (B^T d B)] G`,
    /// where the sum is 16 products over the blocks (2.25 times fewer multiplications than
    /// im2col's product).
    ///
    /// Images are shared between threads in fixed groups, whose partial sums are added in
    /// order: the result is the same on every run.
    pub(crate) fn weight_grad(&self, x: &[f32], grad: &[f32]) -> Vec<f32> {
        self.with_algorithm(Algorithm::F2).weight_grad_2(x, grad)
    }

    /// [`Self::weight_grad`], this convolution being F(2x2, 3x3)'s.
    fn weight_grad_2(&self, x: &[f32], grad: &[f32]) -> Vec<f32> {
        debug_assert_eq!(self.algorithm, Algorithm::F2);
        let (image, out_image) = (self.image_len(), self.out_image_len());
        let (c, o) = (self.channels, self.out_channels);
        assert_eq!(x.len(), self.batch * image, "input of {self:?}");
        assert_eq!(grad.len(), self.batch * out_image, "gradient of {self:?}");
        let threads = rayon::current_num_threads().max(1);
        let per_group = self.batch.div_ceil(threads);
        // Fewer images than threads: each product is parallel.
        let parallelism = if self.batch >= threads {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(0)
        };
        let span = self.panel_images();
        let groups: Vec<Vec<f32>> = x
            .par_chunks(per_group * image)
            .zip(grad.par_chunks(per_group * out_image))
            .map(|(x, grad)| {
                // `[out_channels][16][channels]`, as the transformed weight.
                let mut sums = vec![0f32; o * POSITIONS * c];
                let most = span * self.tiles() * POSITIONS;
                let (mut v, mut z) = (vec![0f32; c * most], vec![0f32; o * most]);
                for (x, grad) in x.chunks(span * image).zip(grad.chunks(span * out_image)) {
                    let columns = x.len() / image * self.tiles();
                    let v = &mut v[..c * POSITIONS * columns];
                    let z = &mut z[..o * POSITIONS * columns];
                    self.transform_input(x, v);
                    self.transform_grad(grad, z);
                    for p in 0..POSITIONS {
                        // sums[., p, .] += z[., p, .] x v[., p, .]^T
                        // SAFETY: `sums` is `out_channels` rows of 16 * `channels`, `z`
                        // `out_channels` rows of 16 * `columns` and `v` `channels` rows of 16 *
                        // `columns`, read transposed (lengths set above); position `p` is
                        // `channels` (`columns`) values at `p * channels` (`p * columns`) of
                        // each row, inside it.
                        unsafe {
                            matmul::product(
                                self.precision,
                                [o, c, columns],
                                Strided {
                                    ptr: sums.as_mut_ptr().add(p * c),
                                    row_stride: (POSITIONS * c) as isize,
                                    col_stride: 1,
                                },
                                true,
                                Strided {
                                    ptr: z.as_ptr().add(p * columns),
                                    row_stride: (POSITIONS * columns) as isize,
                                    col_stride: 1,
                                },
                                Strided {
                                    ptr: v.as_ptr().add(p * columns),
                                    row_stride: 1,
                                    col_stride: (POSITIONS * columns) as isize,
                                },
                                parallelism,
                            );
                        }
                    }
                }
                sums
            })
            .collect();
        // The groups' partial sums, added in order.
        let sums = groups
            .into_iter()
            .reduce(|mut sum, part| {
                sum.iter_mut().zip(&part).for_each(|(s, p)| *s += p);
                sum
            })
            .expect("a batch of at least one image");
        let mut weight_grad = vec![0f32; o * c * 9];
        weight_grad
            .par_chunks_mut(c * 9)
            .zip(sums.par_chunks(POSITIONS * c))
            .for_each(|(dst, sums)| {
                for (ic, dst) in dst.chunks_exact_mut(9).enumerate() {
                    let m = |k: usize, l: usize| sums[(k * 4 + l) * c + ic];
                    // G^T m, column by column; then G on the right, row by row.
                    let columns: [[f32; 3]; 4] =
                        std::array::from_fn(|l| block_side(m(0, l), m(1, l), m(2, l), m(3, l)));
                    for (k, dst) in dst.chunks_exact_mut(3).enumerate() {
                        let [a, b, c, d] = columns.map(|column| column[k]);
                        dst.copy_from_slice(&block_side(a, b, c, d));
                    }
                }
            });
        weight_grad
    }

    /// The transformed kernels of an OIHW weight, `[out_channels][positions][channels]`: for
    /// each output channel, a row a position of the transformed block over the input channels.
    pub(crate) fn weight(&self, weight: &[f32]) -> Vec<f32> {
        let (o, c) = (self.out_channels, self.channels);
        assert_eq!(weight.len(), o * c * 9, "weight of {self:?}");
        self.transform_weight(|oc, ic| std::array::from_fn(|e| weight[(oc * c + ic) * 9 + e]))
    }

    /// [`Self::weight`] of the convolution [`Self::transposed`] made this one from, given
    /// that convolution's OIHW weight: `g[o][c] = w[c][o]` turned by 180 degrees.
    pub(crate) fn transposed_weight(&self, weight: &[f32]) -> Vec<f32> {
        let (o, c) = (self.out_channels, self.channels);
        assert_eq!(weight.len(), o * c * 9, "weight of {self:?}");
        self.transform_weight(|oc, ic| std::array::from_fn(|e| weight[(ic * o + oc) * 9 + 8 - e]))
    }

    /// `[out_channels][positions][channels]` from `kernel(o, c)`.
    fn transform_weight(&self, kernel: impl Fn(usize, usize) -> [f32; 9] + Sync) -> Vec<f32> {
        let (c, positions) = (self.channels, self.algorithm.positions());
        let len = self.out_channels * positions * c;
        let mut u: Vec<f32> = Vec::with_capacity(len);
        u.spare_capacity_mut()[..len]
            .par_chunks_mut(positions * c)
            .enumerate()
            .for_each(|(oc, rows)| {
                match self.algorithm {
                    Algorithm::F2 => {
                        for ic in 0..c {
                            for (p, v) in transform_kernel(kernel(oc, ic)).into_iter().enumerate() {
                                rows[p * c + ic].write(v);
                            }
                        }
                    }
                    Algorithm::F4 => {
                        // `LANES` kernels at a time: `G g`, column by column, then `G^T` on the
                        // right, row by row.
                        for first in (0..c).step_by(LANES) {
                            let n = LANES.min(c - first);
                            let mut g = [[0.0; LANES]; 9];
                            for (j, ic) in (first..first + n).enumerate() {
                                for (e, value) in kernel(oc, ic).into_iter().enumerate() {
                                    g[e][j] = value;
                                }
                            }
                            let columns = [
                                kernel_side_4([g[0], g[3], g[6]]),
                                kernel_side_4([g[1], g[4], g[7]]),
                                kernel_side_4([g[2], g[5], g[8]]),
                            ];
                            for k in 0..6 {
                                let row =
                                    kernel_side_4([columns[0][k], columns[1][k], columns[2][k]]);
                                for (l, lane) in row.iter().enumerate() {
                                    let dst = &mut rows[(6 * k + l) * c + first..][..n];
                                    for (dst, value) in dst.iter_mut().zip(lane) {
                                        dst.write(*value);
                                    }
                                }
                            }
                        }
                    }
                }
            });
        // SAFETY: each output channel's rows, a position each, of `channels` were written
        // above.
        unsafe { u.set_len(len) };
        u
    }

    /// The convolution of `input` (NCHW) by the transformed kernels `u` ([`Self::weight`]),
    /// NCHW; `epilogue(i, out)` then runs on image `i`'s `[out_channels, pixels]` output.
    pub(crate) fn forward(
        &self,
        input: &[f32],
        u: &[f32],
        epilogue: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Vec<f32> {
        let (image, out_image) = (self.image_len(), self.out_image_len());
        let positions = self.algorithm.positions();
        assert_eq!(input.len(), self.batch * image, "input of {self:?}");
        assert_eq!(
            u.len(),
            self.out_channels * positions * self.channels,
            "transformed weight of {self:?}"
        );
        let span = self.panel_images();
        let panels = self.batch.div_ceil(span);
        let threads = rayon::current_num_threads().max(1);
        let parallelism = if panels >= threads {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(0)
        };
        let len = self.batch * out_image;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let scratch = || {
            let columns = span * self.tiles() * positions;
            (
                vec![0f32; self.channels * columns],
                vec![0f32; self.out_channels * columns],
            )
        };
        let panel =
            |(v, m): &mut (Vec<f32>, Vec<f32>),
             (k, (out, x)): (usize, (&mut [MaybeUninit<f32>], &[f32]))| {
                let images = x.len() / image;
                let columns = images * self.tiles();
                let v = &mut v[..self.channels * positions * columns];
                let m = &mut m[..self.out_channels * positions * columns];
                self.transform_input(x, v);
                for p in 0..positions {
                    // m[., p, .] = u[., p, .] x v[., p, .]
                    // SAFETY: `m` is `out_channels` rows of `positions` * `columns`, `u`
                    // `out_channels` rows of `positions` * `channels` and `v` `channels` rows of
                    // `positions` * `columns` (lengths checked above); position `p` is `columns`
                    // (`channels`) values at `p * columns` (`p * channels`) of each row, inside
                    // it.
                    unsafe {
                        matmul::product(
                            self.precision,
                            [self.out_channels, columns, self.channels],
                            Strided {
                                ptr: m.as_mut_ptr().add(p * columns),
                                row_stride: (positions * columns) as isize,
                                col_stride: 1,
                            },
                            false,
                            Strided {
                                ptr: u.as_ptr().add(p * self.channels),
                                row_stride: (positions * self.channels) as isize,
                                col_stride: 1,
                            },
                            Strided {
                                ptr: v.as_ptr().add(p * columns),
                                row_stride: (positions * columns) as isize,
                                col_stride: 1,
                            },
                            parallelism,
                        );
                    }
                }
                self.transform_output(m, out);
                for (i, out) in out.chunks_exact_mut(out_image).enumerate() {
                    // SAFETY: `transform_output` wrote every value of the panel's outputs.
                    let out = unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) };
                    epilogue(k * span + i, out);
                }
            };
        let spare = &mut out.spare_capacity_mut()[..len];
        if matches!(parallelism, gemm::Parallelism::None) {
            spare
                .par_chunks_mut(span * out_image)
                .zip(input.par_chunks(span * image))
                .enumerate()
                .for_each_init(scratch, panel);
        } else {
            let mut buffers = scratch();
            spare
                .chunks_mut(span * out_image)
                .zip(input.chunks(span * image))
                .enumerate()
                .for_each(|item| panel(&mut buffers, item));
        }
        // SAFETY: the panels above wrote all `len` values.
        unsafe { out.set_len(len) };
        out
    }

    dispatched! {
        /// The transformed input blocks of the images `x`,
        /// `[channels][positions][images * tiles]`: `B^T d B` ([`Self::input_rows_2`],
        /// [`Self::input_rows_4`]).
        fn transform_input(&self, x: &[f32], v: &mut [f32]) => input_rows
    }

    #[inline(always)]
    fn input_rows(&self, x: &[f32], v: &mut [f32]) {
        match self.algorithm {
            Algorithm::F2 => self.input_rows_2(x, v),
            Algorithm::F4 => self.input_rows_4(x, v),
        }
    }

    /// [`Self::transform_input`] of F(2x2, 3x3): `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1,
    /// 1, 0], [0, 1, 0, -1]]`.
    ///
    /// Each plane is copied with its padding (a zero row and column before, and after as many
    /// as make whole blocks) into its even and its odd columns, so that a block row's values
    /// at one position of its blocks are contiguous. `B^T d` is computed from those rows into
    /// `v`, and `. B` in place, [`LANES`] blocks at a time.
    #[inline(always)]
    fn input_rows_2(&self, x: &[f32], v: &mut [f32]) {
        let (h, w) = (self.height, self.width);
        let (th, tw) = (self.tiles_high(), self.tiles_wide());
        let columns = x.len() / self.image_len() * self.tiles();
        // Padded column `x + 1` of image column `x`: even ones in `planes[0]`, odd ones in
        // `planes[1]`, `tw + 1` of each a row. The padding is never written, so it stays zero.
        let half = tw + 1;
        let len = (2 * th + 2) * half;
        let mut planes = [vec![0f32; len], vec![0f32; len]];
        for (c, v) in v.chunks_exact_mut(POSITIONS * columns).enumerate() {
            for (i, image) in x.chunks_exact(self.image_len()).enumerate() {
                let [even, odd] = &mut planes;
                for (y, src) in image[c * h * w..][..h * w].chunks_exact(w).enumerate() {
                    let (e, o) = (
                        &mut even[(y + 1) * half..][..half],
                        &mut odd[(y + 1) * half..][..half],
                    );
                    let (pairs, last) = src.as_chunks::<2>();
                    for (&[a, b], (o, e)) in pairs.iter().zip(o.iter_mut().zip(&mut e[1..])) {
                        *o = a;
                        *e = b;
                    }
                    if let [last] = *last {
                        o[pairs.len()] = last;
                    }
                }
                // Column `s` of block `tx` is column `tx + s / 2` of plane `s % 2`; row `r`
                // of block row `ty` is the planes' row `2 ty + r`.
                for ty in 0..th {
                    let first = i * th * tw + ty * tw;
                    for s in 0..4 {
                        let d = |r: usize| &planes[s % 2][(2 * ty + r) * half + s / 2..][..tw];
                        let (d0, d1, d2, d3) = (d(0), d(1), d(2), d(3));
                        // B^T d: row k of the block at position (k, s).
                        let rows = [
                            (d0, d2, false),
                            (d1, d2, true),
                            (d2, d1, false),
                            (d1, d3, false),
                        ];
                        for (k, (a, b, sum)) in rows.into_iter().enumerate() {
                            let dst = &mut v[(4 * k + s) * columns + first..][..tw];
                            if sum {
                                for (dst, (a, b)) in dst.iter_mut().zip(a.iter().zip(b)) {
                                    *dst = a + b;
                                }
                            } else {
                                for (dst, (a, b)) in dst.iter_mut().zip(a.iter().zip(b)) {
                                    *dst = a - b;
                                }
                            }
                        }
                    }
                }
            }
            map_columns::<InputColumns, POSITIONS>(v, columns);
        }
    }

    /// [`Self::transform_input`] of F(4x4, 3x3) ([`input_side_4`]).
    ///
    /// Each plane is copied with its padding (a zero row and column before, and after as many
    /// as make whole blocks) into four, a column in four each, so that a block row's values
    /// at one position of its blocks are contiguous. `B^T d` is computed from those rows into
    /// `v`, and `. B` in place, [`LANES`] blocks at a time both.
    #[inline(always)]
    fn input_rows_4(&self, x: &[f32], v: &mut [f32]) {
        let (h, w) = (self.height, self.width);
        let (th, tw) = (self.tiles_high(), self.tiles_wide());
        let columns = x.len() / self.image_len() * self.tiles();
        // Padded column `x + 1` of image column `x` is column `(x + 1) / 4` of plane
        // `(x + 1) % 4`, whose rows are `tw + 1` long. The padding is never written, so it
        // stays zero.
        let quarter = tw + 1;
        let len = (4 * th + 2) * quarter;
        // And `LANES` more, read past a row's blocks into lanes that are not kept.
        let mut planes = vec![0f32; 4 * len + LANES];
        for (c, v) in v.chunks_exact_mut(POSITIONS_4 * columns).enumerate() {
            for (i, image) in x.chunks_exact(self.image_len()).enumerate() {
                let (p0, rest) = planes.split_at_mut(len);
                let (p1, rest) = rest.split_at_mut(len);
                let (p2, p3) = rest.split_at_mut(len);
                for (y, src) in image[c * h * w..][..h * w].chunks_exact(w).enumerate() {
                    let row = (y + 1) * quarter;
                    let (quads, last) = src.as_chunks::<4>();
                    let n = quads.len();
                    let (d1, d2, d3) = (
                        &mut p1[row..][..=n],
                        &mut p2[row..][..=n],
                        &mut p3[row..][..=n],
                    );
                    let d0 = &mut p0[row + 1..][..n];
                    for (j, &[x0, x1, x2, x3]) in quads.iter().enumerate() {
                        d1[j] = x0;
                        d2[j] = x1;
                        d3[j] = x2;
                        d0[j] = x3;
                    }
                    for (dst, &value) in [d1, d2, d3].into_iter().zip(last) {
                        dst[n] = value;
                    }
                }
                // Column `s` of block `tx` is column `tx + s / 4` of plane `s % 4`; row `r`
                // of block row `ty` is the planes' row `4 ty + r`. `LANES` blocks at a time,
                // written whole where that leaves the row's last blocks alone: values past
                // the block row's last block are overwritten by the next block row's.
                for ty in 0..th {
                    for s in 0..6 {
                        let start = (s % 4) * len + 4 * ty * quarter + s / 4;
                        for tx in (0..tw).step_by(LANES) {
                            let first = i * th * tw + ty * tw + tx;
                            let d = |r: usize| {
                                *planes[start + r * quarter + tx..]
                                    .first_chunk::<LANES>()
                                    .expect("planes padded by a lane")
                            };
                            let t = input_side_4([d(0), d(1), d(2), d(3), d(4), d(5)]);
                            for (k, t) in t.iter().enumerate() {
                                let row = (6 * k + s) * columns;
                                if first + LANES <= columns {
                                    *v[row + first..]
                                        .first_chunk_mut::<LANES>()
                                        .expect("checked just above") = *t;
                                } else {
                                    let n = columns - first;
                                    v[row + first..][..n].copy_from_slice(&t[..n]);
                                }
                            }
                        }
                    }
                }
            }
            map_columns::<InputColumns4, POSITIONS_4>(v, columns);
        }
    }

    dispatched! {
        /// The transformed output gradients of a panel's images (NCHW),
        /// `[out_channels][16][images * tiles]`: `A dY A^T` of each 2x2 block (zero past the
        /// image's edge), the adjoint of [`Self::transform_output`]. Each block's four pixels
        /// are copied into `z`'s first four rows, and transformed in place, [`LANES`] blocks at
        /// a time.
        fn transform_grad(&self, grad: &[f32], z: &mut [f32]) => grad_rows
    }

    #[inline(always)]
    fn grad_rows(&self, grad: &[f32], z: &mut [f32]) {
        let (h, w) = (self.height, self.width);
        let (th, tw) = (self.tiles_high(), self.tiles_wide());
        let plane = h * w;
        let columns = grad.len() / self.out_image_len() * self.tiles();
        for (o, z) in z.chunks_exact_mut(POSITIONS * columns).enumerate() {
            for (i, image) in grad.chunks_exact(self.out_image_len()).enumerate() {
                let dy = &image[o * plane..][..plane];
                for ty in 0..th {
                    let first = i * th * tw + ty * tw;
                    // Rows 0 and 1 of `z` take the block row's top pixels (left, right), rows
                    // 2 and 3 its bottom ones; zero past the edge.
                    for (k, y) in [(0, 2 * ty), (2, 2 * ty + 1)] {
                        let (left, right) = z[k * columns..].split_at_mut(columns);
                        let (left, right) = (&mut left[first..][..tw], &mut right[first..][..tw]);
                        if y >= h {
                            left.fill(0.0);
                            right.fill(0.0);
                            continue;
                        }
                        let (pairs, last) = dy[y * w..][..w].as_chunks::<2>();
                        for (&[a, b], (l, r)) in pairs.iter().zip(left.iter_mut().zip(&mut *right))
                        {
                            *l = a;
                            *r = b;
                        }
                        if let [last] = *last {
                            left[pairs.len()] = last;
                            right[pairs.len()] = 0.0;
                        }
                    }
                }
            }
            map_columns::<GradColumns, POSITIONS>(z, columns);
        }
    }

    dispatched! {
        /// The panel's outputs (NCHW) from the products `m`,
        /// `[out_channels][positions][images * tiles]`: `A^T m A` ([`Self::output_rows_n`]).
        fn transform_output(&self, m: &mut [f32], out: &mut [MaybeUninit<f32>]) => output_rows
    }

    #[inline(always)]
    fn output_rows(&self, m: &mut [f32], out: &mut [MaybeUninit<f32>]) {
        match self.algorithm {
            Algorithm::F2 => self.output_rows_n::<OutputColumns, POSITIONS, 2>(m, out),
            Algorithm::F4 => self.output_rows_n::<OutputColumns4, POSITIONS_4, 4>(m, out),
        }
    }

    /// [`Self::transform_output`] of F(2x2, 3x3), `A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]`
    /// ([`OutputColumns`]), or of F(4x4, 3x3) ([`OutputColumns4`], [`output_side_4`]),
    /// `SIDE` the output blocks' side: [`LANES`] blocks at a time into `m`'s first
    /// `SIDE * SIDE` rows (the blocks' pixels, row by row), from which the pixels are copied
    /// into place.
    #[inline(always)]
    fn output_rows_n<B: Blocks<N>, const N: usize, const SIDE: usize>(
        &self,
        m: &mut [f32],
        out: &mut [MaybeUninit<f32>],
    ) {
        let (h, w) = (self.height, self.width);
        let (th, tw) = (self.tiles_high(), self.tiles_wide());
        let plane = h * w;
        let columns = out.len() / self.out_image_len() * self.tiles();
        for (o, m) in m.chunks_exact_mut(N * columns).enumerate() {
            map_columns::<B, N>(m, columns);
            for (i, image) in out.chunks_exact_mut(self.out_image_len()).enumerate() {
                let dst = &mut image[o * plane..][..plane];
                for (y, dst) in dst.chunks_exact_mut(w).enumerate() {
                    // Rows `SIDE k` to `SIDE k + SIDE - 1` of `m` hold row `k` of the blocks'
                    // pixels.
                    let first = i * th * tw + y / SIDE * tw;
                    let pixels = |l: usize| &m[(SIDE * (y % SIDE) + l) * columns + first..][..tw];
                    let (blocks, last) = dst.as_chunks_mut::<SIDE>();
                    for l in 0..SIDE {
                        for (block, value) in blocks.iter_mut().zip(pixels(l)) {
                            block[l].write(*value);
                        }
                    }
                    for (l, value) in last.iter_mut().enumerate() {
                        value.write(pixels(l)[blocks.len()]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::im2col::Im2col;
    use crate::testing::{assert_values_close as assert_close, seeded_values as values};

    const ALGORITHMS: [Algorithm; 2] = [Algorithm::F2, Algorithm::F4];

    /// The direct convolution, in f64.
    fn direct(g: &Winograd, x: &[f32], weight: &[f32]) -> Vec<f32> {
        let (c, h, w, o) = (g.channels, g.height, g.width, g.out_channels);
        let mut out = vec![0f32; g.batch * o * h * w];
        for n in 0..g.batch {
            for oc in 0..o {
                for y in 0..h {
                    for xx in 0..w {
                        let mut sum = 0f64;
                        for ic in 0..c {
                            for i in 0..3 {
                                for j in 0..3 {
                                    let (iy, ix) =
                                        ((y + i).wrapping_sub(1), (xx + j).wrapping_sub(1));
                                    if iy < h && ix < w {
                                        sum += f64::from(x[((n * c + ic) * h + iy) * w + ix])
                                            * f64::from(weight[((oc * c + ic) * 3 + i) * 3 + j]);
                                    }
                                }
                            }
                        }
                        out[((n * o + oc) * h + y) * w + xx] = sum as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_direct_convolution() {
        // batch, channels, height, width, out channels: odd sides, one pixel, panels.
        for (n, c, h, w, o) in [
            (2, 3, 5, 5, 4),
            (3, 2, 4, 7, 3),
            (1, 1, 1, 1, 1),
            (5, 4, 2, 3, 2),
            (70, 2, 4, 4, 3),
            (3, 2, 9, 6, 2),
            (2, 3, 11, 13, 2),
        ] {
            for algorithm in ALGORITHMS {
                let g = Winograd::new(n, c, h, w, o).with_algorithm(algorithm);
                let x = values(n * g.image_len(), 1);
                let weight = values(o * c * 9, 2);
                let got = g.forward(&x, &g.weight(&weight), |_, _| {});
                assert_close(&format!("{g:?}"), &got, &direct(&g, &x, &weight));
            }
        }
    }

    /// Both gradients against im2col's kernels: the input's as the adjoint of im2col (with
    /// col2im), the weight's as `grad x im2col(x)^T`.
    #[test]
    fn gradients_match_im2col() {
        for (n, c, h, w, o) in [
            (2, 3, 5, 5, 4),
            (3, 2, 4, 7, 3),
            (1, 1, 1, 1, 1),
            (40, 5, 4, 4, 2),
            (9, 4, 6, 3, 5),
            (2, 3, 10, 7, 2),
        ] {
            for algorithm in ALGORITHMS {
                let g = Winograd::new(n, c, h, w, o).with_algorithm(algorithm);
                let im = Im2col::new([n, c, h, w], [o, c, 3, 3], [1, 1], [1, 1])
                    .expect("a valid geometry");
                let x = values(n * g.image_len(), 1);
                let weight = values(o * c * 9, 2);
                let grad = values(n * g.out_image_len(), 3);
                let (input_want, weight_want) = im.backward(&x, &weight, &grad, true, true);
                assert_close(
                    &format!("input gradient of {g:?}"),
                    &g.input_grad(&grad, &weight),
                    &input_want.expect("asked for"),
                );
                assert_close(
                    &format!("weight gradient of {g:?}"),
                    &g.weight_grad(&x, &grad),
                    &weight_want.expect("asked for"),
                );
            }
        }
    }

    /// The transforms compiled for each instruction set the CPU has and for the baseline
    /// (called through the dispatch with the baseline forced, and directly) give the same
    /// values bit for bit: only the vectors' width differs. With blocks past the last whole
    /// eight (`map_columns`' padded lanes) and odd sides.
    #[test]
    fn transforms_are_the_same_in_every_vector_width() {
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let shapes = [(3, 4, 5, 7), (2, 3, 8, 8), (1, 2, 1, 1), (5, 3, 13, 11)];
        let cases = shapes
            .into_iter()
            .flat_map(|s| ALGORITHMS.map(|a| (s, a)))
            .flat_map(|case| Simd::available().into_iter().map(move |simd| (case, simd)));
        for (((n, c, h, w), algorithm), simd) in cases {
            let g = Winograd::new(n, c, h, w, c)
                .with_algorithm(algorithm)
                .with_simd(simd);
            let columns = n * g.tiles();
            let x = values(n * g.image_len(), 1);
            let transformed = values(c * algorithm.positions() * columns, 2);
            let [mut dispatched, mut baseline] = [0, 1].map(|_| vec![0f32; transformed.len()]);
            g.transform_input(&x, &mut dispatched);
            g.input_rows(&x, &mut baseline);
            assert_eq!(bits(&dispatched), bits(&baseline), "input of {g:?}");
            if algorithm == Algorithm::F2 {
                g.transform_grad(&x, &mut dispatched);
                g.grad_rows(&x, &mut baseline);
                assert_eq!(bits(&dispatched), bits(&baseline), "gradient of {g:?}");
            }
            // The output transform overwrites its products, so each gets its own copy.
            let [mut dispatched, mut baseline] =
                [0, 1].map(|_| (transformed.clone(), vec![MaybeUninit::new(0f32); x.len()]));
            g.transform_output(&mut dispatched.0, &mut dispatched.1);
            g.output_rows(&mut baseline.0, &mut baseline.1);
            // SAFETY: every value was initialized when the vectors were made.
            let written = |out: &[MaybeUninit<f32>]| {
                out.iter()
                    .map(|v| unsafe { v.assume_init() }.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                written(&dispatched.1),
                written(&baseline.1),
                "output of {g:?}"
            );
        }
    }

    /// The rounding error of each algorithm on a residual network's layers (two images,
    /// He-initialized weights), against the direct convolution in f64: the largest difference over the
    /// output's largest magnitude, printed with `--nocapture`. Measured 3.2e-7 to 9.0e-7 for
    /// F(2x2, 3x3) and 2.3e-6 to 6.7e-6 for F(4x4, 3x3) (64 channels of 32x32 to 512 of 4x4;
    /// 7.4e-6 to 1.3e-5 with Lavin and Gray's points), where f32 itself rounds at 6e-8.
    #[test]
    fn rounding_error_on_residual_network_layers() {
        for (c, side) in [(64, 32), (128, 16), (256, 8), (512, 4)] {
            let g = Winograd::new(2, c, side, side, c);
            let x = values(2 * g.image_len(), 1);
            let std = (2.0 / (9.0 * c as f32)).sqrt();
            let weight: Vec<f32> = values(c * c * 9, 2).iter().map(|v| v * std).collect();
            let want = direct(&g, &x, &weight);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut line = format!("{c} channels, {side}x{side}:");
            for algorithm in ALGORITHMS {
                let g = g.with_algorithm(algorithm);
                let got = g.forward(&x, &g.weight(&weight), |_, _| {});
                let error = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
                line += &format!(" {algorithm:?} {:.1e}", error / scale);
                let bound = match algorithm {
                    Algorithm::F2 => 2e-6,
                    Algorithm::F4 => 1e-5,
                };
                assert!(error <= bound * scale, "{line}: more than {bound}");
            }
            println!("{line}");
        }
    }
}
