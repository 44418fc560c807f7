//! The matrix products of the convolutions, in their [`ConvPrecision`]: f32 by the `gemm`
//! crate, or bf16 operands with f32 sums by [`crate::bf16`] where the CPU has AVX512-BF16.

use crate::ConvPrecision;

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
