//! The matrix products of the convolutions, in their [`ConvPrecision`]: f32 by the `gemm`
//! crate, or bf16 operands with f32 sums by [`crate::bf16`] where the CPU has AVX512-BF16.

use std::cell::RefCell;

use crate::ConvPrecision;
use crate::scratch::with_scratch;

/// A strided f32 matrix: element `(i, j)` at `ptr + i * row_stride + j * col_stride`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Strided<T> {
    pub ptr: T,
    pub row_stride: isize,
    pub col_stride: isize,
}

// SAFETY: a view of memory that the caller of `product` lends for the call; the threads of a
// product write disjoint parts of `dst` and only read `lhs` and `rhs`.
unsafe impl<T> Send for Strided<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Strided<T> {}

impl Strided<*const f32> {
    /// The view whose element `(0, 0)` is this one's `(i, j)`.
    ///
    /// # Safety
    /// `(i, j)` is inside the matrix the caller lent, or one past its end.
    #[inline(always)]
    pub(crate) unsafe fn offset(self, i: usize, j: usize) -> Self {
        Self {
            // SAFETY: inside the matrix, by the caller.
            ptr: unsafe {
                self.ptr
                    .offset(i as isize * self.row_stride + j as isize * self.col_stride)
            },
            ..self
        }
    }

    /// Element `(i, j)`.
    ///
    /// # Safety
    /// `(i, j)` is inside the matrix the caller lent.
    #[inline(always)]
    pub(crate) unsafe fn at(&self, i: usize, j: usize) -> f32 {
        // SAFETY: inside the matrix, by the caller.
        unsafe {
            *self
                .ptr
                .offset(i as isize * self.row_stride + j as isize * self.col_stride)
        }
    }
}

/// `dst = lhs x rhs` (`dst += lhs x rhs` with `accumulate`) for an `m x k` `lhs` and a
/// `k x n` `rhs`, in `precision` (f32 where the CPU has no bf16 products).
///
/// # Safety
/// The three views address `m x n`, `m x k` and `k x n` elements of live memory, `dst` not
/// overlapping the others and, with `accumulate`, initialized.
#[allow(clippy::too_many_arguments)] // the shape of a strided product, as `gemm::gemm`'s
pub(crate) unsafe fn product(
    precision: ConvPrecision,
    [m, n, k]: [usize; 3],
    dst: Strided<*mut f32>,
    accumulate: bool,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    parallelism: gemm::Parallelism,
) {
    #[cfg(target_arch = "x86_64")]
    if precision == ConvPrecision::Bf16 && crate::bf16::supported() {
        let parallel = matches!(parallelism, gemm::Parallelism::Rayon(_));
        // SAFETY: the CPU has AVX512-BF16 (checked); the views are the caller's.
        unsafe { crate::bf16::product(m, n, k, dst, accumulate, lhs, rhs, parallel) };
        return;
    }
    // gemm computes a product into a row-major `dst` as its transpose, `dst^T = rhs^T lhs^T`,
    // and packs its left operand (`rhs^T` then, `lhs` else) with one scalar load per element
    // unless that operand is column-major. The weight gradients' products have such an operand
    // with a stride of hundreds of floats: a sixth of a ResNet-18 training step went to that
    // packing. A tiled copy into the layout gemm reads fast costs one pass instead.
    let row_major_dst = dst.col_stride.unsigned_abs() < dst.row_stride.unsigned_abs();
    let (packed, rows, cols) = if row_major_dst {
        (rhs, k, n)
    } else {
        (lhs, m, k)
    };
    let fast = if row_major_dst {
        packed.col_stride == 1
    } else {
        packed.row_stride == 1
    };
    if fast || rows < 2 || cols < 2 {
        // SAFETY: the caller's views.
        return unsafe { gemm_f32([m, n, k], dst, accumulate, lhs, rhs, parallelism) };
    }
    // SAFETY (of the closure): `packed` addresses `rows x cols` elements (the caller's);
    // `buffer` holds as many at `relaid`'s strides, and lives for the product.
    with_scratch(&RELAID, rows * cols, |buffer| unsafe {
        // Row-major `rhs`, or column-major `lhs`.
        let (row_stride, col_stride) = if row_major_dst {
            (cols as isize, 1)
        } else {
            (1, rows as isize)
        };
        let relaid = Strided {
            ptr: buffer.as_mut_ptr(),
            row_stride,
            col_stride,
        };
        let parallel = matches!(parallelism, gemm::Parallelism::Rayon(_));
        relayout(packed, [rows, cols], relaid, parallel);
        let relaid = Strided {
            ptr: relaid.ptr.cast_const(),
            row_stride,
            col_stride,
        };
        let (lhs, rhs) = if row_major_dst {
            (lhs, relaid)
        } else {
            (relaid, rhs)
        };
        gemm_f32([m, n, k], dst, accumulate, lhs, rhs, parallelism)
    })
}

thread_local! {
    /// The operand [`product`] copies into gemm's fast layout, reused between products.
    static RELAID: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `src`'s `rows x cols` elements into `dst`, whose strides are 1 and a positive one, split
/// between threads with `parallel`. A source contiguous along the other dimension is
/// transposed in 8 x 8 blocks (with AVX where the CPU has it), any other copied element by
/// element.
///
/// # Safety
/// `src` addresses `rows x cols` live elements; `dst` has room for every element at its
/// strides and overlaps nothing `src` addresses.
unsafe fn relayout(
    src: Strided<*const f32>,
    [rows, cols]: [usize; 2],
    dst: Strided<*mut f32>,
    parallel: bool,
) {
    // As the transpose of an `a x b` matrix whose rows are contiguous, `src_stride` apart,
    // into `b` rows of `a`, `dst_stride` apart.
    let transpose = if src.col_stride == 1 && dst.row_stride == 1 && src.row_stride > 0 {
        Some((rows, cols, src.row_stride as usize, dst.col_stride as usize))
    } else if src.row_stride == 1 && dst.col_stride == 1 && src.col_stride > 0 {
        Some((cols, rows, src.col_stride as usize, dst.row_stride as usize))
    } else {
        None
    };
    // Runs of rows of `src` (of the `a x b` matrix, transposing), one a thread.
    let run = |first: usize, last: usize| match transpose {
        // SAFETY: the caller's matrices, `first..last` inside `a`.
        Some((_, b, src_stride, dst_stride)) => unsafe {
            transpose_rows(src.ptr, src_stride, dst.ptr, dst_stride, b, first..last)
        },
        // SAFETY: the caller's matrices, `first..last` inside `rows`.
        None => unsafe { copy_rows(src, cols, dst, first..last) },
    };
    let count = transpose.map_or(rows, |(a, ..)| a);
    let threads = if parallel {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    let per_thread = count.div_ceil(8).div_ceil(threads) * 8;
    if threads > 1 && count > per_thread {
        rayon::scope(|scope| {
            for first in (0..count).step_by(per_thread) {
                scope.spawn(move |_| run(first, (first + per_thread).min(count)));
            }
        });
    } else {
        run(0, count);
    }
}

/// Rows `rows` of the `_ x b` matrix at `src` (rows `src_stride` apart) into the columns of
/// the same index of the `b x _` matrix at `dst` (rows `dst_stride` apart).
///
/// # Safety
/// Both matrices are live and disjoint, and hold the elements addressed.
unsafe fn transpose_rows(
    src: *const f32,
    src_stride: usize,
    dst: *mut f32,
    dst_stride: usize,
    b: usize,
    rows: std::ops::Range<usize>,
) {
    #[cfg(target_arch = "x86_64")]
    let avx = std::arch::is_x86_feature_detected!("avx");
    for i0 in rows.clone().step_by(8) {
        let i1 = (i0 + 8).min(rows.end);
        for j0 in (0..b).step_by(8) {
            let j1 = (j0 + 8).min(b);
            #[cfg(target_arch = "x86_64")]
            if avx && i1 - i0 == 8 && j1 - j0 == 8 {
                // SAFETY: a whole 8 x 8 block inside both matrices; the CPU has AVX.
                unsafe {
                    transpose_8x8(
                        src.add(i0 * src_stride + j0),
                        src_stride,
                        dst.add(j0 * dst_stride + i0),
                        dst_stride,
                    )
                };
                continue;
            }
            for i in i0..i1 {
                for j in j0..j1 {
                    // SAFETY: inside both matrices, by the loops' bounds.
                    unsafe { *dst.add(j * dst_stride + i) = *src.add(i * src_stride + j) };
                }
            }
        }
    }
}

/// The 8 x 8 block at `src` (rows `src_stride` apart), transposed, at `dst` (rows
/// `dst_stride` apart).
///
/// # Safety
/// Both blocks are live and disjoint; the CPU has AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_8x8(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
    use std::arch::x86_64::*;
    // SAFETY: eight rows of eight inside the caller's block.
    let r: [__m256; 8] =
        std::array::from_fn(|i| unsafe { _mm256_loadu_ps(src.add(i * src_stride)) });
    // Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves exchanged.
    let t = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    let u = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xee>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xee>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xee>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xee>(t[5], t[7]),
    ];
    let columns = [
        _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
        _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
    ];
    for (j, column) in columns.into_iter().enumerate() {
        // SAFETY: eight rows of eight inside the caller's block.
        unsafe { _mm256_storeu_ps(dst.add(j * dst_stride), column) };
    }
}

/// Rows `rows` of `src` (`cols` wide) to the same places of `dst`, element by element.
///
/// # Safety
/// Both matrices are live and disjoint, and hold the elements addressed.
unsafe fn copy_rows(
    src: Strided<*const f32>,
    cols: usize,
    dst: Strided<*mut f32>,
    rows: std::ops::Range<usize>,
) {
    for i in rows {
        for j in 0..cols {
            let at = i as isize * dst.row_stride + j as isize * dst.col_stride;
            // SAFETY: inside both matrices, by the loops' bounds and the caller.
            unsafe { *dst.ptr.offset(at) = src.at(i, j) };
        }
    }
}

/// [`product`] in f32, by gemm.
///
/// # Safety
/// As [`product`].
unsafe fn gemm_f32(
    [m, n, k]: [usize; 3],
    dst: Strided<*mut f32>,
    accumulate: bool,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the views are the caller's; gemm reads `dst` only with `accumulate`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.col_stride,
            dst.row_stride,
            accumulate,
            lhs.ptr,
            lhs.col_stride,
            lhs.row_stride,
            rhs.ptr,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::values;

    /// Strides of a `rows x cols` matrix, row- or column-major.
    fn strides(rows: usize, cols: usize, row_major: bool) -> (isize, isize) {
        if row_major {
            (cols as isize, 1)
        } else {
            (1, rows as isize)
        }
    }

    /// Every layout of the three matrices, the ones copied into gemm's layout first among
    /// them, with and without accumulation, against the product in f64.
    #[test]
    fn every_layout_gives_the_product() {
        for (m, n, k) in [(1, 5, 3), (17, 33, 40), (64, 27, 300)] {
            for layout in 0..16 {
                let [lhs_rm, rhs_rm, dst_rm, accumulate] =
                    [1, 2, 4, 8].map(|bit| layout & bit != 0);
                let (a, b, start) = (values(m * k, 1), values(k * n, 2), values(m * n, 3));
                let view = |ptr, (row_stride, col_stride)| Strided {
                    ptr,
                    row_stride,
                    col_stride,
                };
                let lhs = view(a.as_ptr(), strides(m, k, lhs_rm));
                let rhs = view(b.as_ptr(), strides(k, n, rhs_rm));
                let mut out = start.clone();
                let dst_strides = strides(m, n, dst_rm);
                let dst = Strided {
                    ptr: out.as_mut_ptr(),
                    row_stride: dst_strides.0,
                    col_stride: dst_strides.1,
                };
                let parallelism = if layout % 3 == 0 {
                    gemm::Parallelism::Rayon(0)
                } else {
                    gemm::Parallelism::None
                };
                // SAFETY: the views address the vectors above, with the shapes given.
                unsafe {
                    product(
                        ConvPrecision::F32,
                        [m, n, k],
                        dst,
                        accumulate,
                        lhs,
                        rhs,
                        parallelism,
                    )
                };
                for i in 0..m {
                    for j in 0..n {
                        // SAFETY: inside the operands.
                        let terms =
                            (0..k).map(|d| unsafe { lhs.at(i, d) as f64 * rhs.at(d, j) as f64 });
                        let at = (i as isize * dst_strides.0 + j as isize * dst_strides.1) as usize;
                        let base = if accumulate { start[at] as f64 } else { 0.0 };
                        let expected = base + terms.clone().sum::<f64>();
                        let scale = base.abs() + terms.map(f64::abs).sum::<f64>();
                        assert!(
                            (out[at] as f64 - expected).abs() <= 1e-6 * scale.max(1.0),
                            "{m}x{n}x{k}, layout {layout:04b}, at ({i}, {j}): {} vs {expected}",
                            out[at]
                        );
                    }
                }
            }
        }
    }
}
