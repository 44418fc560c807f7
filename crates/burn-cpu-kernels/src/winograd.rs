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
//! The products are the `gemm` crate's in f32, or bf16 ones ([`matmul`]). The transforms
//! compute eight blocks at a time, compiled for AVX2 where the CPU has it ([`Simd`]; SSE2
//! elsewhere on x86-64; an AVX-512 copy is tested, not chosen), and with AVX2 they move blocks
//! between the image planes and the transform's rows by in-register transposes, where the
//! compiler would copy value by value. Images are shared between threads in panels of a size
//! fixed by the geometry and the number of threads, and the weight's gradient sums the
//! threads' parts in order, so the results are the same on every run.

use rayon::prelude::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;

use crate::ConvPrecision;
use crate::matmul::{self, Strided};
use crate::scratch::with_scratch;
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

thread_local! {
    /// The transformed input blocks of a panel, reused between panels and calls.
    static TRANSFORMED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A panel's products (the forward), or its transformed output gradients (the weight's
    /// gradient).
    static PRODUCTS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Transformed values the input transform fills before transforming them: 256 KiB, within
/// a core's L2 cache.
const GROUP_VALUES: usize = 1 << 16;

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

/// A transform of `K` values of [`LANES`] blocks into `M`, for [`map_lines`]. (A trait, not
/// a closure: so the compiler inlines it into the AVX2 and AVX-512 copies of the
/// transforms.)
trait Line<const K: usize, const M: usize> {
    fn line(values: [Lane; K]) -> [Lane; M];
}

/// Runs `L` on rows `from` of `rows` (`[.][columns]`) into rows `to` (in place: each
/// [`LANES`] columns are read before they are written), the last columns padded.
#[inline(always)]
fn map_lines<L: Line<K, M>, const K: usize, const M: usize>(
    rows: &mut [f32],
    columns: usize,
    from: [usize; K],
    to: [usize; M],
) {
    let full = columns - columns % LANES;
    for start in (0..full).step_by(LANES) {
        let mut values = [[0.0; LANES]; K];
        for (value, &r) in values.iter_mut().zip(&from) {
            *value = *rows[r * columns + start..]
                .first_chunk()
                .expect("rows of `columns` values");
        }
        for (value, &r) in L::line(values).iter().zip(&to) {
            *rows[r * columns + start..]
                .first_chunk_mut()
                .expect("rows of `columns` values") = *value;
        }
    }
    let rest = columns - full;
    if rest > 0 {
        let mut values = [[0.0; LANES]; K];
        for (value, &r) in values.iter_mut().zip(&from) {
            value[..rest].copy_from_slice(&rows[r * columns + full..][..rest]);
        }
        for (value, &r) in L::line(values).iter().zip(&to) {
            rows[r * columns + full..][..rest].copy_from_slice(&value[..rest]);
        }
    }
}

/// `B^T` of F(2x2, 3x3) on four values: `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0],
/// [0, 1, 0, -1]]`.
struct InputSide;

impl Line<4, 4> for InputSide {
    #[inline(always)]
    fn line([d0, d1, d2, d3]: [Lane; 4]) -> [Lane; 4] {
        [sub(d0, d2), add(d1, d2), sub(d2, d1), sub(d1, d3)]
    }
}

/// [`input_side_4`], as a [`Line`].
struct InputSide4;

impl Line<6, 6> for InputSide4 {
    #[inline(always)]
    fn line(d: [Lane; 6]) -> [Lane; 6] {
        input_side_4(d)
    }
}

/// `A^T` of F(2x2, 3x3) on four values: `A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]`.
struct OutputSide;

impl Line<4, 2> for OutputSide {
    #[inline(always)]
    fn line([m0, m1, m2, m3]: [Lane; 4]) -> [Lane; 2] {
        [add(add(m0, m1), m2), sub(sub(m1, m2), m3)]
    }
}

/// [`output_side_4`], as a [`Line`].
struct OutputSide4;

impl Line<6, 4> for OutputSide4 {
    #[inline(always)]
    fn line(m: [Lane; 6]) -> [Lane; 4] {
        output_side_4(m)
    }
}

/// `A` of F(2x2, 3x3) on two values, the adjoint of [`OutputSide`]: `(a, b)` to `(a, a + b,
/// a - b, -b)`.
struct GradSide;

impl Line<2, 4> for GradSide {
    #[inline(always)]
    fn line([a, b]: [Lane; 2]) -> [Lane; 4] {
        [a, add(a, b), sub(a, b), neg(b)]
    }
}

/// `[start, start + step, start + 2 step, ...]`.
#[inline(always)]
fn indices<const K: usize>(start: usize, step: usize) -> [usize; K] {
    let mut indices = [start; K];
    for (k, index) in indices.iter_mut().enumerate() {
        *index += k * step;
    }
    indices
}

/// `B^T d B` of `SIDE x SIDE` blocks (`d[SIDE r + s]`: row `r`, column `s`) in place, given
/// `L`, `B^T` on `SIDE` values: on the columns, then on the rows.
#[inline(always)]
fn input_blocks<L: Line<SIDE, SIDE>, const SIDE: usize>(rows: &mut [f32], columns: usize) {
    for s in 0..SIDE {
        let column = indices(s, SIDE);
        map_lines::<L, SIDE, SIDE>(rows, columns, column, column);
    }
    for r in 0..SIDE {
        let row = indices(SIDE * r, 1);
        map_lines::<L, SIDE, SIDE>(rows, columns, row, row);
    }
}

/// `A^T m A` of `IN x IN` blocks (`m[IN k + l]`: row `k`, column `l`) into the first
/// `SIDE * SIDE` rows (pixel `(k, l)` in row `SIDE k + l`), given `L`, `A^T` from `IN`
/// values to `SIDE`: on the columns, then on the rows. (In place: each row is read before
/// it is written.)
#[inline(always)]
fn output_blocks<L: Line<IN, SIDE>, const IN: usize, const SIDE: usize>(
    rows: &mut [f32],
    columns: usize,
) {
    for l in 0..IN {
        map_lines::<L, IN, SIDE>(rows, columns, indices(l, IN), indices(l, IN));
    }
    for k in 0..SIDE {
        map_lines::<L, IN, SIDE>(rows, columns, indices(IN * k, 1), indices(SIDE * k, 1));
    }
}

/// Copies the `SIDE x SIDE` blocks, `STEP` pixels apart, of a plane (`plane`, `th x tw`
/// blocks in rows of `row` values) into `dst` (`[.][columns]`): position `(r, s)` of block
/// `(ty, tx)` into column `first + ty tw + tx` of row `SIDE r + s`. [`LANES`] blocks of a
/// block row at a time, a vector a position; the row's last blocks one by one.
#[inline(always)]
fn gather_blocks<const SIDE: usize, const STEP: usize>(
    plane: &[f32],
    row: usize,
    [th, tw]: [usize; 2],
    dst: &mut [f32],
    columns: usize,
    first: usize,
) {
    assert!(first + th * tw <= columns && dst.len() >= SIDE * SIDE * columns);
    assert!(plane.len() >= (STEP * th + SIDE - STEP) * row && row >= STEP * tw + SIDE - STEP);
    let full = tw - tw % LANES;
    for ty in 0..th {
        for tx in (0..full).step_by(LANES) {
            let column = first + ty * tw + tx;
            for r in 0..SIDE {
                let src = &plane[(STEP * ty + r) * row + STEP * tx..][..STEP * (LANES - 1) + SIDE];
                for s in 0..SIDE {
                    let mut lane = [0.0; LANES];
                    for (j, value) in lane.iter_mut().enumerate() {
                        *value = src[STEP * j + s];
                    }
                    *dst[(r * SIDE + s) * columns + column..]
                        .first_chunk_mut()
                        .expect("inside the block row") = lane;
                }
            }
        }
        for tx in full..tw {
            let block = &plane[STEP * (ty * row + tx)..];
            let mut dst = dst[first + ty * tw + tx..].as_mut_ptr();
            for r in 0..SIDE {
                let values: &[f32; SIDE] = block[r * row..]
                    .first_chunk()
                    .expect("the plane holds whole blocks");
                for &value in values {
                    // SAFETY: row `SIDE r + s` of `dst`'s `SIDE * SIDE` or more rows of
                    // `columns`, at a column below `columns` (asserted above).
                    unsafe {
                        dst.write(value);
                        dst = dst.wrapping_add(columns);
                    }
                }
            }
        }
    }
}

/// Where `K` blocks from block `b` on (in column order, `tw` a block row) start in a plane
/// of rows of `row` values, blocks `step` pixels apart: one division, then steps.
#[inline(always)]
fn block_starts<const K: usize>(b: usize, tw: usize, row: usize, step: usize) -> [usize; K] {
    let (mut ty, mut tx) = (b / tw, b % tw);
    let mut starts = [0; K];
    for start in &mut starts {
        *start = step * (ty * row + tx);
        tx += 1;
        if tx == tw {
            (ty, tx) = (ty + 1, 0);
        }
    }
    starts
}

/// [`gather_blocks`] with the instructions of `simd`: for blocks of 2, 4 or 6 values a
/// side, AVX2's shuffles where the CPU has them ([`gather_blocks_avx2`]), which the compiler does
/// not derive from the scalar loop (it copies value by value).
#[inline(always)]
fn gather<const SIDE: usize, const STEP: usize>(
    simd: Simd,
    plane: &[f32],
    row: usize,
    tiles: [usize; 2],
    dst: &mut [f32],
    columns: usize,
    first: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if simd != Simd::Baseline && matches!(SIDE, 2 | 4 | 6) {
        // SAFETY: a `simd` other than the baseline is one the CPU has (see `dispatch!`), and
        // every set above it includes AVX2.
        return unsafe { gather_blocks_avx2::<SIDE, STEP>(plane, row, tiles, dst, columns, first) };
    }
    let _ = simd;
    gather_blocks::<SIDE, STEP>(plane, row, tiles, dst, columns, first);
}

/// [`gather_blocks`] for blocks of 2, 4 or 6 values a side, by transposes: the plane's
/// blocks are taken in column order (block `(ty, tx)` is column `first + ty tw + tx`, so a
/// vector of eight may span block rows), each block row's first four values loaded as one
/// vector and transposed against seven other blocks' (eight blocks), or three others'
/// (four), and its last two (of 2 or 6) loaded as a pair and shuffled; the last blocks one
/// by one.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn gather_blocks_avx2<const SIDE: usize, const STEP: usize>(
    plane: &[f32],
    row: usize,
    [th, tw]: [usize; 2],
    dst: &mut [f32],
    columns: usize,
    first: usize,
) {
    use std::arch::x86_64::*;
    assert!(
        matches!(SIDE, 2 | 4 | 6),
        "blocks of 2, 4 or 6 values a side"
    );
    assert!(first + th * tw <= columns && dst.len() >= SIDE * SIDE * columns);
    assert!(plane.len() >= (STEP * th + SIDE - STEP) * row && row >= STEP * tw + SIDE - STEP);
    let blocks = th * tw;
    let (plane, out) = (plane.as_ptr(), dst.as_mut_ptr());
    // Value `(r, s)` of the blocks from column `column` on, in row `SIDE r + s`.
    let at = |column: usize, r: usize, s: usize| (r * SIDE + s) * columns + column;
    let eights = blocks - blocks % 8;
    for b in (0..eights).step_by(8) {
        let starts = block_starts::<8>(b, tw, row, STEP);
        for r in 0..SIDE {
            // SAFETY: each block's row `r` holds `SIDE` values inside the plane, and row
            // `SIDE r + s` of `dst` eight values from column `first + b` (asserted above).
            unsafe {
                let line = |j: usize| plane.add(starts[j] + r * row);
                let column = first + b;
                // Lanes 0-3: block j's values 0-3; lanes 4-7: block j + 4's.
                let quad = |j: usize| {
                    _mm256_insertf128_ps::<1>(
                        _mm256_castps128_ps256(_mm_loadu_ps(line(j))),
                        _mm_loadu_ps(line(j + 4)),
                    )
                };
                if SIDE >= 4 {
                    let (q0, q1, q2, q3) = (quad(0), quad(1), quad(2), quad(3));
                    let (t0, t1) = (_mm256_unpacklo_ps(q0, q1), _mm256_unpackhi_ps(q0, q1));
                    let (t2, t3) = (_mm256_unpacklo_ps(q2, q3), _mm256_unpackhi_ps(q2, q3));
                    let pd = _mm256_castps_pd;
                    let values = [
                        _mm256_unpacklo_pd(pd(t0), pd(t2)),
                        _mm256_unpackhi_pd(pd(t0), pd(t2)),
                        _mm256_unpacklo_pd(pd(t1), pd(t3)),
                        _mm256_unpackhi_pd(pd(t1), pd(t3)),
                    ];
                    for (s, value) in values.into_iter().enumerate() {
                        _mm256_storeu_ps(out.add(at(column, r, s)), _mm256_castpd_ps(value));
                    }
                }
                if SIDE % 4 == 2 {
                    // The last two values of blocks j and j + 1, and of j + 4 and j + 5.
                    let pairs = |j: usize| {
                        let pair = |j: usize| line(j).add(SIDE - 2).cast::<f64>();
                        let low = _mm_loadh_pd(_mm_load_sd(pair(j)), pair(j + 1));
                        let high = _mm_loadh_pd(_mm_load_sd(pair(j + 4)), pair(j + 5));
                        _mm256_castpd_ps(_mm256_insertf128_pd::<1>(
                            _mm256_castpd128_pd256(low),
                            high,
                        ))
                    };
                    let (p0, p2) = (pairs(0), pairs(2));
                    _mm256_storeu_ps(
                        out.add(at(column, r, SIDE - 2)),
                        _mm256_shuffle_ps::<0b10_00_10_00>(p0, p2),
                    );
                    _mm256_storeu_ps(
                        out.add(at(column, r, SIDE - 1)),
                        _mm256_shuffle_ps::<0b11_01_11_01>(p0, p2),
                    );
                }
            }
        }
    }
    let fours = blocks - blocks % 4;
    for b in (eights..fours).step_by(4) {
        let starts = block_starts::<4>(b, tw, row, STEP);
        for r in 0..SIDE {
            // SAFETY: as above, four blocks.
            unsafe {
                let line = |j: usize| plane.add(starts[j] + r * row);
                let column = first + b;
                if SIDE >= 4 {
                    let (q0, q1) = (_mm_loadu_ps(line(0)), _mm_loadu_ps(line(1)));
                    let (q2, q3) = (_mm_loadu_ps(line(2)), _mm_loadu_ps(line(3)));
                    let (t0, t1) = (_mm_unpacklo_ps(q0, q1), _mm_unpackhi_ps(q0, q1));
                    let (t2, t3) = (_mm_unpacklo_ps(q2, q3), _mm_unpackhi_ps(q2, q3));
                    let values = [
                        _mm_movelh_ps(t0, t2),
                        _mm_movehl_ps(t2, t0),
                        _mm_movelh_ps(t1, t3),
                        _mm_movehl_ps(t3, t1),
                    ];
                    for (s, value) in values.into_iter().enumerate() {
                        _mm_storeu_ps(out.add(at(column, r, s)), value);
                    }
                }
                if SIDE % 4 == 2 {
                    let pair = |j: usize| line(j).add(SIDE - 2).cast::<f64>();
                    let p0 = _mm_castpd_ps(_mm_loadh_pd(_mm_load_sd(pair(0)), pair(1)));
                    let p2 = _mm_castpd_ps(_mm_loadh_pd(_mm_load_sd(pair(2)), pair(3)));
                    _mm_storeu_ps(
                        out.add(at(column, r, SIDE - 2)),
                        _mm_shuffle_ps::<0b10_00_10_00>(p0, p2),
                    );
                    _mm_storeu_ps(
                        out.add(at(column, r, SIDE - 1)),
                        _mm_shuffle_ps::<0b11_01_11_01>(p0, p2),
                    );
                }
            }
        }
    }
    for b in fours..blocks {
        for r in 0..SIDE {
            for s in 0..SIDE {
                // SAFETY: as above, one block.
                unsafe {
                    let start = block_starts::<1>(b, tw, row, STEP)[0];
                    *out.add(at(first + b, r, s)) = *plane.add(start + r * row + s)
                };
            }
        }
    }
}

/// The inverse of [`gather_blocks`] for blocks side by side (`STEP` = `SIDE`): pixel
/// `(r, s)` of block `(ty, tx)`, from column `first + ty tw + tx` of `src`'s row `SIDE r + s`
/// (`[.][columns]`), into `plane` (rows of `row` values).
#[inline(always)]
fn scatter_blocks<const SIDE: usize>(
    src: &[f32],
    columns: usize,
    first: usize,
    [th, tw]: [usize; 2],
    plane: &mut [f32],
    row: usize,
) {
    assert!(first + th * tw <= columns && src.len() >= SIDE * SIDE * columns);
    assert!(plane.len() >= SIDE * th * row && row >= SIDE * tw);
    let full = tw - tw % LANES;
    for ty in 0..th {
        for tx in (0..full).step_by(LANES) {
            let column = first + ty * tw + tx;
            for r in 0..SIDE {
                let dst = &mut plane[(SIDE * ty + r) * row + SIDE * tx..][..SIDE * LANES];
                for s in 0..SIDE {
                    let lane: &Lane = src[(r * SIDE + s) * columns + column..]
                        .first_chunk()
                        .expect("inside the block row");
                    for (j, &value) in lane.iter().enumerate() {
                        dst[SIDE * j + s] = value;
                    }
                }
            }
        }
        for tx in full..tw {
            let block = &mut plane[SIDE * (ty * row + tx)..];
            let mut src = src[first + ty * tw + tx..].as_ptr();
            for r in 0..SIDE {
                let values: &mut [f32; SIDE] = block[r * row..]
                    .first_chunk_mut()
                    .expect("the plane holds whole blocks");
                for value in values {
                    // SAFETY: row `SIDE r + s` of `src`'s `SIDE * SIDE` or more rows of
                    // `columns`, at a column below `columns` (asserted above).
                    unsafe {
                        *value = src.read();
                        src = src.wrapping_add(columns);
                    }
                }
            }
        }
    }
}

/// [`scatter_blocks`] with the instructions of `simd`: AVX2's shuffles where the CPU has
/// them ([`scatter_blocks_avx2`]).
#[inline(always)]
fn scatter<const SIDE: usize>(
    simd: Simd,
    src: &[f32],
    columns: usize,
    first: usize,
    tiles: [usize; 2],
    plane: &mut [f32],
    row: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if simd != Simd::Baseline && (SIDE == 2 || SIDE == 4) {
        // SAFETY: a `simd` other than the baseline is one the CPU has (see `dispatch!`), and
        // every set above it includes AVX2.
        return unsafe { scatter_blocks_avx2::<SIDE>(src, columns, first, tiles, plane, row) };
    }
    let _ = simd;
    scatter_blocks::<SIDE>(src, columns, first, tiles, plane, row);
}

/// [`scatter_blocks`] for blocks of 2 or 4 pixels a side, by transposes (the inverse of
/// [`gather_blocks_avx2`]'s): eight blocks (then four) in column order, their rows' pixels
/// interleaved and each block's row stored as one piece; the last blocks one by one.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn scatter_blocks_avx2<const SIDE: usize>(
    src: &[f32],
    columns: usize,
    first: usize,
    [th, tw]: [usize; 2],
    plane: &mut [f32],
    row: usize,
) {
    use std::arch::x86_64::*;
    assert!(SIDE == 2 || SIDE == 4, "blocks of 2 or 4 pixels a side");
    assert!(first + th * tw <= columns && src.len() >= SIDE * SIDE * columns);
    assert!(plane.len() >= SIDE * th * row && row >= SIDE * tw);
    let blocks = th * tw;
    let (src, plane) = (src.as_ptr(), plane.as_mut_ptr());
    // Pixel `(r, s)` of the blocks from column `column` on, in row `SIDE r + s`.
    let at = |column: usize, r: usize, s: usize| (r * SIDE + s) * columns + column;
    let eights = blocks - blocks % 8;
    for b in (0..eights).step_by(8) {
        let (column, starts) = (first + b, block_starts::<8>(b, tw, row, SIDE));
        for r in 0..SIDE {
            // SAFETY: row `SIDE r + s` of `src` holds eight values from column `first + b`,
            // and each block's row `r` `SIDE` pixels inside the plane (asserted above).
            unsafe {
                let line = |j: usize| plane.add(starts[j] + r * row);
                let value = |s: usize| _mm256_loadu_ps(src.add(at(column, r, s)));
                if SIDE == 2 {
                    let (v0, v1) = (value(0), value(1));
                    // Blocks 0, 1 | 4, 5 and 2, 3 | 6, 7: a pair of pixels each.
                    let low = _mm256_castps_pd(_mm256_unpacklo_ps(v0, v1));
                    let high = _mm256_castps_pd(_mm256_unpackhi_ps(v0, v1));
                    for (half, pairs) in [(0, low), (2, high)] {
                        let (a, b) = (
                            _mm256_castpd256_pd128(pairs),
                            _mm256_extractf128_pd::<1>(pairs),
                        );
                        _mm_storel_pd(line(half).cast(), a);
                        _mm_storeh_pd(line(half + 1).cast(), a);
                        _mm_storel_pd(line(half + 4).cast(), b);
                        _mm_storeh_pd(line(half + 5).cast(), b);
                    }
                } else {
                    let (v0, v1, v2, v3) = (value(0), value(1), value(2), value(3));
                    let pd = _mm256_castps_pd;
                    let (t0, t1) = (
                        pd(_mm256_unpacklo_ps(v0, v1)),
                        pd(_mm256_unpackhi_ps(v0, v1)),
                    );
                    let (t2, t3) = (
                        pd(_mm256_unpacklo_ps(v2, v3)),
                        pd(_mm256_unpackhi_ps(v2, v3)),
                    );
                    // Block j's row in lanes 0-3, block j + 4's in lanes 4-7.
                    let rows = [
                        _mm256_unpacklo_pd(t0, t2),
                        _mm256_unpackhi_pd(t0, t2),
                        _mm256_unpacklo_pd(t1, t3),
                        _mm256_unpackhi_pd(t1, t3),
                    ];
                    for (j, pixels) in rows.into_iter().enumerate() {
                        let pixels = _mm256_castpd_ps(pixels);
                        _mm_storeu_ps(line(j), _mm256_castps256_ps128(pixels));
                        _mm_storeu_ps(line(j + 4), _mm256_extractf128_ps::<1>(pixels));
                    }
                }
            }
        }
    }
    let fours = blocks - blocks % 4;
    for b in (eights..fours).step_by(4) {
        let (column, starts) = (first + b, block_starts::<4>(b, tw, row, SIDE));
        for r in 0..SIDE {
            // SAFETY: as above, four blocks.
            unsafe {
                let line = |j: usize| plane.add(starts[j] + r * row);
                let value = |s: usize| _mm_loadu_ps(src.add(at(column, r, s)));
                if SIDE == 2 {
                    let (v0, v1) = (value(0), value(1));
                    let low = _mm_castps_pd(_mm_unpacklo_ps(v0, v1));
                    let high = _mm_castps_pd(_mm_unpackhi_ps(v0, v1));
                    _mm_storel_pd(line(0).cast(), low);
                    _mm_storeh_pd(line(1).cast(), low);
                    _mm_storel_pd(line(2).cast(), high);
                    _mm_storeh_pd(line(3).cast(), high);
                } else {
                    let (v0, v1, v2, v3) = (value(0), value(1), value(2), value(3));
                    let (t0, t1) = (_mm_unpacklo_ps(v0, v1), _mm_unpackhi_ps(v0, v1));
                    let (t2, t3) = (_mm_unpacklo_ps(v2, v3), _mm_unpackhi_ps(v2, v3));
                    _mm_storeu_ps(line(0), _mm_movelh_ps(t0, t2));
                    _mm_storeu_ps(line(1), _mm_movehl_ps(t2, t0));
                    _mm_storeu_ps(line(2), _mm_movelh_ps(t1, t3));
                    _mm_storeu_ps(line(3), _mm_movehl_ps(t3, t1));
                }
            }
        }
    }
    for b in fours..blocks {
        for r in 0..SIDE {
            for s in 0..SIDE {
                // SAFETY: as above, one block.
                unsafe {
                    let start = block_starts::<1>(b, tw, row, SIDE)[0];
                    *plane.add(start + r * row + s) = *src.add(at(first + b, r, s))
                };
            }
        }
    }
}

/// Where a pixel is written: an `f32`, or an output's `MaybeUninit<f32>`.
///
/// # Safety
/// The type has `f32`'s size and alignment, and holds an `f32` written to its address.
unsafe trait Slot {
    fn set(&mut self, value: f32);
}

// SAFETY: it is an `f32`.
unsafe impl Slot for f32 {
    #[inline(always)]
    fn set(&mut self, value: f32) {
        *self = value;
    }
}

// SAFETY: `MaybeUninit<f32>` has `f32`'s layout.
unsafe impl Slot for MaybeUninit<f32> {
    #[inline(always)]
    fn set(&mut self, value: f32) {
        self.write(value);
    }
}

/// `dst.copy_from_slice(src)` for rows of a few pixels, inlined: `copy_from_slice` calls
/// `memmove`, whose call cost more than the copy of a 4x4 image's rows.
#[inline(always)]
fn copy(dst: &mut [impl Slot], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    let (chunks, rest) = src.as_chunks::<LANES>();
    let (dst_chunks, dst_rest) = dst.as_chunks_mut::<LANES>();
    for (dst, src) in dst_chunks.iter_mut().zip(chunks) {
        // SAFETY: `LANES` slots of `f32`'s layout (`Slot`'s contract). One move of the whole
        // chunk: element by element, the compiler emitted a scalar load and store each.
        unsafe { dst.as_mut_ptr().cast::<Lane>().write_unaligned(*src) };
    }
    for (dst, &src) in dst_rest.iter_mut().zip(rest) {
        dst.set(src);
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
                // Every value of `v` and `z` a panel uses is written before it is read.
                with_scratch(&TRANSFORMED, c * most, |v| {
                    with_scratch(&PRODUCTS, o * most, |z| {
                        self.add_weight_grad_2(x, grad, v, z, &mut sums, parallelism);
                    })
                });
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

    /// Adds the transformed weight gradient of the images `x` (whose output gradients are
    /// `grad`) to `sums` (`[out_channels][16][channels]`), a panel at a time, in buffers `v`
    /// and `z` that hold a panel's transformed input blocks and output gradients.
    fn add_weight_grad_2(
        &self,
        x: &[f32],
        grad: &[f32],
        v: &mut [f32],
        z: &mut [f32],
        sums: &mut [f32],
        parallelism: gemm::Parallelism,
    ) {
        let (image, out_image) = (self.image_len(), self.out_image_len());
        let (c, o) = (self.channels, self.out_channels);
        assert_eq!(sums.len(), o * POSITIONS * c, "sums of {self:?}");
        let span = self.panel_images();
        for (x, grad) in x.chunks(span * image).zip(grad.chunks(span * out_image)) {
            let columns = x.len() / image * self.tiles();
            let v = &mut v[..c * POSITIONS * columns];
            let z = &mut z[..o * POSITIONS * columns];
            self.transform_input(x, v);
            self.transform_grad(grad, z);
            for p in 0..POSITIONS {
                // sums[., p, .] += z[., p, .] x v[., p, .]^T
                // SAFETY: `sums` is `out_channels` rows of 16 * `channels`, `z` `out_channels`
                // rows of 16 * `columns` and `v` `channels` rows of 16 * `columns`, read
                // transposed (lengths checked above); position `p` is `channels` (`columns`)
                // values at `p * channels` (`p * columns`) of each row, inside it.
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
        let most = span * self.tiles() * positions;
        let panel =
            |v: &mut [f32],
             m: &mut [f32],
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
        // Every value of the buffers a panel uses is written before it is read.
        let with_buffers = |item| {
            with_scratch(&TRANSFORMED, self.channels * most, |v| {
                with_scratch(&PRODUCTS, self.out_channels * most, |m| panel(v, m, item))
            })
        };
        let spare = &mut out.spare_capacity_mut()[..len];
        if matches!(parallelism, gemm::Parallelism::None) {
            spare
                .par_chunks_mut(span * out_image)
                .zip(input.par_chunks(span * image))
                .enumerate()
                .for_each(with_buffers);
        } else {
            spare
                .chunks_mut(span * out_image)
                .zip(input.chunks(span * image))
                .enumerate()
                .for_each(with_buffers);
        }
        // SAFETY: the panels above wrote all `len` values.
        unsafe { out.set_len(len) };
        out
    }

    dispatched! {
        /// The transformed input blocks of the images `x`,
        /// `[channels][positions][images * tiles]`: `B^T d B` ([`Self::input_rows_n`]).
        fn transform_input(&self, x: &[f32], v: &mut [f32]) => input_rows
    }

    #[inline(always)]
    fn input_rows(&self, x: &[f32], v: &mut [f32]) {
        match self.algorithm {
            Algorithm::F2 => self.input_rows_n::<InputSide, POSITIONS, 4, 2>(x, v),
            Algorithm::F4 => self.input_rows_n::<InputSide4, POSITIONS_4, 6, 4>(x, v),
        }
    }

    /// [`Self::transform_input`] of F(2x2, 3x3) ([`InputSide`]) or F(4x4, 3x3)
    /// ([`InputSide4`]): `SIDE x SIDE` input blocks `STEP` pixels apart (`N` their
    /// positions).
    ///
    /// Each plane is copied with its padding (a zero row and column before, and after as many
    /// as make whole blocks), its blocks' values are copied from there into `v`, a row a
    /// position ([`gather_blocks`]), and transformed in place, [`LANES`] blocks at a time
    /// ([`input_blocks`]). Blocks side by side in `v` may come from different block rows
    /// and images, so small images fill the lanes as well as large ones (a block row of a
    /// 4x4 image holds two blocks of F(2x2, 3x3)).
    #[inline(always)]
    fn input_rows_n<L: Line<SIDE, SIDE>, const N: usize, const SIDE: usize, const STEP: usize>(
        &self,
        x: &[f32],
        v: &mut [f32],
    ) {
        let (h, w) = (self.height, self.width);
        let (th, tw) = (self.tiles_high(), self.tiles_wide());
        let columns = x.len() / self.image_len() * self.tiles();
        // Padded pixel `(y + 1, x + 1)` of image pixel `(y, x)`; block `(ty, tx)` starts at
        // padded pixel `(STEP ty, STEP tx)`. The padding is never written, so it stays zero.
        let row = STEP * tw + SIDE - STEP;
        let mut padded = vec![0f32; (STEP * th + SIDE - STEP) * row];
        // Channels are taken in groups whose transformed blocks stay in cache until they are
        // transformed, image by image in a group: each image's planes are read in order, where
        // a plane at a time would read a few pixels every image (a cache miss each, on small
        // images).
        let group = (GROUP_VALUES / (N * columns)).max(1);
        for (g, v) in v.chunks_mut(group * N * columns).enumerate() {
            for (i, image) in x.chunks_exact(self.image_len()).enumerate() {
                let planes = image[g * group * h * w..].chunks_exact(h * w);
                for (plane, v) in planes.zip(v.chunks_exact_mut(N * columns)) {
                    for (y, src) in plane.chunks_exact(w).enumerate() {
                        copy(&mut padded[(y + 1) * row + 1..][..w], src);
                    }
                    let first = i * th * tw;
                    gather::<SIDE, STEP>(self.simd, &padded, row, [th, tw], v, columns, first);
                }
            }
            for v in v.chunks_exact_mut(N * columns) {
                input_blocks::<L, SIDE>(v, columns);
            }
        }
    }

    dispatched! {
        /// The transformed output gradients of a panel's images (NCHW),
        /// `[out_channels][16][images * tiles]`: `A dY A^T` of each 2x2 block (zero past the
        /// image's edge), the adjoint of [`Self::transform_output`]. Each block's four pixels
        /// are copied into `z`'s first four rows ([`gather_blocks`]), and transformed in
        /// place, [`LANES`] blocks at a time ([`GradSide`]).
        fn transform_grad(&self, grad: &[f32], z: &mut [f32]) => grad_rows
    }

    #[inline(always)]
    fn grad_rows(&self, grad: &[f32], z: &mut [f32]) {
        let (h, w) = (self.height, self.width);
        let (th, tw) = (self.tiles_high(), self.tiles_wide());
        let plane = h * w;
        let columns = grad.len() / self.out_image_len() * self.tiles();
        // The plane's 2x2 blocks, zero past its edge: `2 th` rows of `2 tw`. The padding is
        // never written, so it stays zero.
        let row = 2 * tw;
        let mut padded = vec![0f32; 2 * th * row];
        let group = (GROUP_VALUES / (POSITIONS * columns)).max(1);
        for (g, z) in z.chunks_mut(group * POSITIONS * columns).enumerate() {
            for (i, image) in grad.chunks_exact(self.out_image_len()).enumerate() {
                let planes = image[g * group * plane..].chunks_exact(plane);
                for (dy, z) in planes.zip(z.chunks_exact_mut(POSITIONS * columns)) {
                    for (y, src) in dy.chunks_exact(w).enumerate() {
                        copy(&mut padded[y * row..][..w], src);
                    }
                    let first = i * th * tw;
                    gather::<2, 2>(self.simd, &padded, row, [th, tw], z, columns, first);
                }
            }
            for z in z.chunks_exact_mut(POSITIONS * columns) {
                // `A dY` on the columns, into rows `s`, `4 + s`, `8 + s` and `12 + s`; then
                // `. A^T` on the rows.
                for s in 0..2 {
                    map_lines::<GradSide, 2, 4>(z, columns, [s, 2 + s], [s, 4 + s, 8 + s, 12 + s]);
                }
                for k in 0..4 {
                    let row = [4 * k, 4 * k + 1, 4 * k + 2, 4 * k + 3];
                    map_lines::<GradSide, 2, 4>(z, columns, [4 * k, 4 * k + 1], row);
                }
            }
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
            Algorithm::F2 => self.output_rows_n::<OutputSide, POSITIONS, 4, 2>(m, out),
            Algorithm::F4 => self.output_rows_n::<OutputSide4, POSITIONS_4, 6, 4>(m, out),
        }
    }

    /// [`Self::transform_output`] of F(2x2, 3x3) ([`OutputSide`]) or F(4x4, 3x3)
    /// ([`OutputSide4`]): `A^T m A` of the products' `IN x IN` blocks (`N` positions) into
    /// `SIDE x SIDE` output blocks, [`LANES`] blocks at a time into `m`'s first `SIDE * SIDE`
    /// rows (the blocks' pixels, row by row), from which each plane's blocks are gathered,
    /// cropped to the image, and copied into place.
    ///
    /// Output channels are taken in groups that stay in cache, and each group's planes are
    /// written image by image (see [`Self::input_rows_n`]).
    #[inline(always)]
    fn output_rows_n<L: Line<IN, SIDE>, const N: usize, const IN: usize, const SIDE: usize>(
        &self,
        m: &mut [f32],
        out: &mut [MaybeUninit<f32>],
    ) {
        let (h, w) = (self.height, self.width);
        let (th, tw) = (self.tiles_high(), self.tiles_wide());
        let plane = h * w;
        let columns = out.len() / self.out_image_len() * self.tiles();
        // The blocks of a plane, side by side: `SIDE th` rows of `SIDE tw`.
        let row = SIDE * tw;
        let mut blocks = vec![0f32; SIDE * th * row];
        let group = (GROUP_VALUES / (N * columns)).max(1);
        for (g, m) in m.chunks_mut(group * N * columns).enumerate() {
            for m in m.chunks_exact_mut(N * columns) {
                output_blocks::<L, IN, SIDE>(m, columns);
            }
            for (i, image) in out.chunks_exact_mut(self.out_image_len()).enumerate() {
                let planes = image[g * group * plane..].chunks_exact_mut(plane);
                for (dst, m) in planes.zip(m.chunks_exact(N * columns)) {
                    let first = i * th * tw;
                    scatter::<SIDE>(self.simd, m, columns, first, [th, tw], &mut blocks, row);
                    for (dst, src) in dst.chunks_exact_mut(w).zip(blocks.chunks_exact(row)) {
                        copy(dst, &src[..w]);
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
    /// (called through the dispatch with the baseline forced, and directly, with the
    /// baseline's scalar copies of blocks) give the same values bit for bit: only the vectors'
    /// width differs. With blocks past the last whole eight ([`map_lines`]' padded lanes, the
    /// transposes' groups of four and single blocks) and odd sides.
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
            // What every copy must match: the baseline's code, compiled for this copy.
            let baseline_code = g.with_simd(Simd::Baseline);
            let columns = n * g.tiles();
            let x = values(n * g.image_len(), 1);
            let transformed = values(c * algorithm.positions() * columns, 2);
            let [mut dispatched, mut baseline] = [0, 1].map(|_| vec![0f32; transformed.len()]);
            g.transform_input(&x, &mut dispatched);
            baseline_code.input_rows(&x, &mut baseline);
            assert_eq!(bits(&dispatched), bits(&baseline), "input of {g:?}");
            if algorithm == Algorithm::F2 {
                g.transform_grad(&x, &mut dispatched);
                baseline_code.grad_rows(&x, &mut baseline);
                assert_eq!(bits(&dispatched), bits(&baseline), "gradient of {g:?}");
            }
            // The output transform overwrites its products, so each gets its own copy.
            let [mut dispatched, mut baseline] =
                [0, 1].map(|_| (transformed.clone(), vec![MaybeUninit::new(0f32); x.len()]));
            g.transform_output(&mut dispatched.0, &mut dispatched.1);
            baseline_code.output_rows(&mut baseline.0, &mut baseline.1);
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
