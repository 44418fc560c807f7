//! Matrix products that read their f32 operands as bf16 and accumulate in f32, with
//! AVX512-BF16's `vdpbf16ps`: what PyTorch's CPU autocast does to a convolution's inputs, at
//! twice the multiplications a cycle of f32.
//!
//! Each operand is rounded to bf16 (to nearest, ties to even) as it is packed, so callers keep
//! f32 values and the result is `round_bf16(lhs) x round_bf16(rhs)` summed in f32. The layout is
//! the classic one (Goto and van de Geijn): the left operand packed a block of [`KC`] values of
//! depth at a time into panels of [`MR`] rows, the right one panel by panel of [`NR`] columns,
//! each panel used against every row panel while it sits in the L1 cache. Pairs of bf16 along
//! the depth sit in one 32-bit lane, as `vdpbf16ps` multiplies them: lane `j` of a right panel
//! holds column `j` at depths `2p` and `2p + 1`, and each left value pair is broadcast.

use std::arch::x86_64::*;
use std::cell::RefCell;

use rayon::prelude::*;

use crate::matmul::Strided;
use crate::scratch::with_scratch;

/// Rows of the left operand a micro-kernel computes: 12 rows of two 16-lane vectors are 24
/// accumulators, of AVX-512's 32 registers.
const MR: usize = 12;
/// Columns a micro-kernel computes: two vectors of 16 f32.
const NR: usize = 32;
/// Depth of a packed block, a multiple of 2: a right panel of `KC x NR` bf16 is 16 KiB, half
/// an L1 data cache.
const KC: usize = 256;

/// Whether this CPU has the instructions [`product`] needs (AVX512-BF16 with AVX-512 F and
/// BW).
pub(crate) fn supported() -> bool {
    std::arch::is_x86_feature_detected!("avx512bf16")
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

/// `x` rounded to bf16 (to nearest, ties to even; NaN stays NaN), as its 16 bits.
#[inline(always)]
pub(crate) fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// Two bf16 as one lane: `first` in the low half.
#[inline(always)]
fn pair(first: f32, second: f32) -> u32 {
    to_bf16(first) as u32 | (to_bf16(second) as u32) << 16
}

/// `dst = lhs x rhs` (`dst += lhs x rhs` with `accumulate`) for an `m x k` `lhs` and a
/// `k x n` `rhs`, both rounded to bf16, accumulated in f32; the columns shared between rayon's
/// threads with `parallel`.
///
/// # Safety
/// [`supported`] is true; the three views address `m x n`, `m x k` and `k x n` elements of
/// live memory, `dst` not overlapping the others and, with `accumulate`, initialized.
#[allow(clippy::too_many_arguments)] // the shape of a strided product, as `gemm::gemm`'s
pub(crate) unsafe fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: Strided<*mut f32>,
    accumulate: bool,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty sum: zeros, or `dst` as it is.
        if !accumulate {
            for i in 0..m as isize {
                for j in 0..n as isize {
                    // SAFETY: inside `dst` (by the caller).
                    unsafe { *dst.ptr.offset(i * dst.row_stride + j * dst.col_stride) = 0.0 };
                }
            }
        }
        return;
    }
    let row_panels = m.div_ceil(MR);
    with_scratch(&PACKED_LHS, row_panels * MR * KC / 2, |packed_lhs| {
        let col_panels = n.div_ceil(NR);
        for start in (0..k).step_by(KC) {
            let depth = (k - start).min(KC);
            let pairs = depth.div_ceil(2);
            let load = accumulate || start > 0;
            // SAFETY: the block's rows and depths are inside `lhs` (by the caller); the CPU has
            // AVX512-BF16 (by the caller).
            unsafe { pack_lhs(lhs, m, start, depth, packed_lhs, parallel) };
            let packed_lhs = &packed_lhs[..];
            let panel = |packed_rhs: &mut [u32], column_panel: usize| {
                let first = column_panel * NR;
                let columns = (n - first).min(NR);
                // SAFETY: as for the left operand; `dst`'s tiles are inside it, and each column
                // panel is one thread's.
                unsafe {
                    pack_rhs(rhs, first, columns, start, depth, packed_rhs);
                    for row_panel in 0..row_panels {
                        let rows = (m - row_panel * MR).min(MR);
                        let lhs = &packed_lhs[row_panel * MR * pairs..][..MR * pairs];
                        let rhs = &packed_rhs[..NR * pairs];
                        let (at, size) = ([row_panel * MR, first], [rows, columns]);
                        // A last panel of a few rows computes only as many (64 rows are five
                        // panels of 12 and one of 4).
                        match rows {
                            ..=4 => kernel::<4>(pairs, lhs, rhs, dst, at, size, load),
                            5..=8 => kernel::<8>(pairs, lhs, rhs, dst, at, size, load),
                            _ => kernel::<MR>(pairs, lhs, rhs, dst, at, size, load),
                        }
                    }
                }
            };
            // `pack_rhs` writes every lane the kernel reads.
            let panel = |column_panel| {
                with_scratch(&PACKED_RHS, NR * KC / 2, |packed| {
                    panel(packed, column_panel)
                })
            };
            if parallel && col_panels > 1 {
                (0..col_panels).into_par_iter().for_each(panel);
            } else {
                (0..col_panels).for_each(panel);
            }
        }
    })
}

thread_local! {
    /// [`product`]'s packed left operand, reused between products (a convolution makes
    /// dozens of them, one per Winograd position).
    static PACKED_LHS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// A right panel of [`product`], reused between panels and products.
    static PACKED_RHS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Packs rows `0..m`, depths `start..start + depth` of `lhs` into panels of [`MR`] rows,
/// `[panel][pair][row]`, zero past the last row and the last depth; the panels shared between
/// rayon's threads with `parallel`.
///
/// # Safety
/// Those elements are inside `lhs`; the CPU has AVX512-BF16.
unsafe fn pack_lhs(
    lhs: Strided<*const f32>,
    m: usize,
    start: usize,
    depth: usize,
    out: &mut [u32],
    parallel: bool,
) {
    let pairs = depth.div_ceil(2);
    let panel = |(panel, out): (usize, &mut [u32])| {
        let first = panel * MR;
        // SAFETY: the panel's rows and depths are inside `lhs` (by the caller).
        unsafe {
            let rows = lhs.offset(first, start);
            pack_panel(rows, (m - first).min(MR), depth, MR, out);
        }
    };
    let out = &mut out[..m.div_ceil(MR) * MR * pairs];
    // Panels of 4,096 values (16 KiB) or more go to rayon's threads one by one, smaller ones
    // stay on this thread: a heuristic, not tuned.
    if parallel && m > MR && MR * pairs >= 4096 {
        out.par_chunks_exact_mut(MR * pairs)
            .enumerate()
            .for_each(panel);
    } else {
        out.chunks_exact_mut(MR * pairs).enumerate().for_each(panel);
    }
}

/// Packs columns `first..first + columns`, depths `start..start + depth` of `rhs` into one
/// panel, `[pair][column]` of [`NR`] columns, zero past the last column and depth.
///
/// # Safety
/// Those elements are inside `rhs`; the CPU has AVX512-BF16.
unsafe fn pack_rhs(
    rhs: Strided<*const f32>,
    first: usize,
    columns: usize,
    start: usize,
    depth: usize,
    out: &mut [u32],
) {
    // The panel's lines are `rhs`'s columns: its transpose's rows.
    let lines = Strided {
        ptr: rhs.ptr,
        row_stride: rhs.col_stride,
        col_stride: rhs.row_stride,
    };
    // SAFETY: the panel's columns and depths are inside `rhs` (by the caller).
    unsafe { pack_panel(lines.offset(first, start), columns, depth, NR, out) };
}

/// Packs `lines` lines of `depth` values (`src`'s rows, its columns the depth) as a panel of
/// `width` lanes a depth pair, `out[p * width + l]` = line `l`'s depths `2p` and `2p + 1`
/// rounded to bf16, zero past the last line and depth.
///
/// A source contiguous along the depth is converted 32 depths of 16 lines at a time and
/// transposed in registers; one contiguous along the lines, a pair of depths of 16 lines at a
/// time, interleaved; any other strides element by element.
///
/// # Safety
/// `src` addresses `lines x depth` elements; `lines <= width <= 32`, `out` holds `width`
/// lanes for each of the `depth` pairs (`depth / 2` rounded up); the CPU has AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_panel(
    src: Strided<*const f32>,
    lines: usize,
    depth: usize,
    width: usize,
    out: &mut [u32],
) {
    let pairs = depth.div_ceil(2);
    assert!(
        lines <= width && width <= 32 && out.len() >= width * pairs,
        "a panel of {lines} lines in {width} lanes"
    );
    let first_n = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
    if src.col_stride == 1 || src.row_stride == 1 {
        for group in (0..width).step_by(16) {
            let loaded = lines.saturating_sub(group).min(16);
            let stored = first_n(width - group);
            // SAFETY (of the stores): `stored` keeps lanes `group..width` of a pair's
            // `width`, inside `out`.
            let mut store = |pair: usize, lanes: __m512i| unsafe {
                let at = out.as_mut_ptr().add(pair * width + group);
                _mm512_mask_storeu_epi32(at.cast(), stored, lanes)
            };
            if src.col_stride == 1 {
                for from in (0..depth).step_by(32) {
                    let count = (depth - from).min(32);
                    let rows: [__m512i; 16] = std::array::from_fn(|l| {
                        if l >= loaded {
                            return _mm512_setzero_si512();
                        }
                        // SAFETY: the masks read depths `from..from + count` of line
                        // `group + l`, inside `src`; bf16 vectors are bits.
                        unsafe {
                            let line = src.ptr.offset((group + l) as isize * src.row_stride);
                            let low = _mm512_maskz_loadu_ps(first_n(count), line.add(from));
                            let high = _mm512_maskz_loadu_ps(
                                first_n(count.saturating_sub(16)),
                                line.add(from + 16),
                            );
                            std::mem::transmute(_mm512_cvtne2ps_pbh(high, low))
                        }
                    });
                    let pairs_here = transpose(rows);
                    for (q, &lanes) in pairs_here.iter().enumerate().take(count.div_ceil(2)) {
                        store(from / 2 + q, lanes);
                    }
                }
            } else {
                // Interleaves two depths' 16 bf16: lane j takes (first[j], second[j]).
                let order: [i16; 32] = std::array::from_fn(|i| ((i % 2) * 16 + i / 2) as i16);
                // SAFETY: `order` is 64 bytes.
                let order = unsafe { _mm512_loadu_si512(order.as_ptr().cast()) };
                let at_depth = |d: usize| {
                    if d >= depth {
                        return _mm512_setzero_ps();
                    }
                    // SAFETY: the mask reads lines `group..group + loaded` at depth `d`,
                    // contiguous and inside `src`.
                    unsafe {
                        let at = src.ptr.offset(d as isize * src.col_stride).add(group);
                        _mm512_maskz_loadu_ps(first_n(loaded), at)
                    }
                };
                for p in 0..pairs {
                    let both: __m512i =
                        // SAFETY: same size; bf16 vectors are bits.
                        unsafe { std::mem::transmute(_mm512_cvtne2ps_pbh(at_depth(2 * p + 1), at_depth(2 * p))) };
                    store(p, _mm512_permutexvar_epi16(order, both));
                }
            }
        }
        return;
    }
    for p in 0..pairs {
        for l in 0..width {
            let value = |d: usize| {
                if l < lines && d < depth {
                    // SAFETY: inside `src`, checked.
                    unsafe { src.at(l, d) }
                } else {
                    0.0
                }
            };
            out[p * width + l] = pair(value(2 * p), value(2 * p + 1));
        }
    }
}

/// The transpose of 16 rows of 16 lanes of 32 bits: lane `r` of vector `c` is lane `c` of
/// row `r`. Four rounds of shuffles: 32-bit and 64-bit unpacks inside 128-bit lanes, then two
/// of 128-bit lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose(rows: [__m512i; 16]) -> [__m512i; 16] {
    // In each 128-bit lane k: t[2i] = (r[2i][4k], r[2i+1][4k], r[2i][4k+1], r[2i+1][4k+1]),
    // t[2i+1] the same of lanes 4k+2 and 4k+3.
    let t: [__m512i; 16] = std::array::from_fn(|i| {
        let (a, b) = (rows[i & !1], rows[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_epi32(a, b)
        } else {
            _mm512_unpackhi_epi32(a, b)
        }
    });
    // u[4i + j]: lane 4k + j of rows 4i..4i + 4, in each 128-bit lane k.
    let u: [__m512i; 16] = std::array::from_fn(|i| {
        let (base, j) = (i & !3, i % 4);
        let (a, b) = (t[base + j / 2], t[base + j / 2 + 2]);
        if j % 2 == 0 {
            _mm512_unpacklo_epi64(a, b)
        } else {
            _mm512_unpackhi_epi64(a, b)
        }
    });
    // v[j] (j < 4): 128-bit lanes 0 and 2 of u[j] and u[4 + j]; v[4 + j] lanes 1 and 3; the
    // same of rows 8..16 in v[8..].
    let v: [__m512i; 16] = std::array::from_fn(|i| {
        let (base, odd, j) = (i & 8, i & 4 != 0, i % 4);
        let (a, b) = (u[base + j], u[base + 4 + j]);
        if odd {
            _mm512_shuffle_i32x4::<0xdd>(a, b)
        } else {
            _mm512_shuffle_i32x4::<0x88>(a, b)
        }
    });
    // Column 4k + j: 128-bit lane k of u[j], u[4 + j], u[8 + j], u[12 + j].
    std::array::from_fn(|c| {
        let (k, j) = (c / 4, c % 4);
        let (a, b) = (v[(k % 2) * 4 + j], v[8 + (k % 2) * 4 + j]);
        if k < 2 {
            _mm512_shuffle_i32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_i32x4::<0xdd>(a, b)
        }
    })
}

/// `dst[at.., ..] (+)= lhs panel x rhs panel` over `pairs` depth pairs, `size` of the tile
/// inside `dst`: the panels' first `ROWS` rows (of [`MR`]) x [`NR`] columns, accumulated in
/// registers.
///
/// # Safety
/// The tile is inside `dst`, initialized where `load`, and has at most `ROWS` rows; the CPU
/// has AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn kernel<const ROWS: usize>(
    pairs: usize,
    lhs: &[u32],
    rhs: &[u32],
    dst: Strided<*mut f32>,
    at: [usize; 2],
    size: [usize; 2],
    load: bool,
) {
    let mut sums = [[_mm512_setzero_ps(); 2]; ROWS];
    // At least one pair: with none, the accumulators would have a path that skips the loop,
    // and the compiler keeps them in memory for it, zeroed by `memset` at every call (7% of
    // the samples of a 64 x 256 x 64 product).
    assert!(
        ROWS <= MR && size[0] <= ROWS && pairs > 0 && lhs.len() >= MR * pairs,
        "a tile of {size:?} in {ROWS} rows"
    );
    assert!(rhs.len() >= NR * pairs, "a right panel of {pairs} pairs");
    let (lhs, rhs) = (lhs.as_ptr(), rhs.as_ptr());
    for p in 0..pairs {
        // SAFETY: `rhs` holds `NR` lanes a pair and `lhs` `MR` (asserted above); bf16
        // vectors are bits.
        unsafe {
            let b = rhs.add(p * NR);
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(16).cast()));
            let a = lhs.add(p * MR);
            for (i, sums) in sums.iter_mut().enumerate() {
                let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(i) as i32));
                sums[0] = _mm512_dpbf16_ps(sums[0], a, b0);
                sums[1] = _mm512_dpbf16_ps(sums[1], a, b1);
            }
        }
    }
    let [rows, columns] = size;
    let tile = |i: usize, j: usize| {
        let (i, j) = ((at[0] + i) as isize, (at[1] + j) as isize);
        // SAFETY: inside `dst` for a tile position (by the caller).
        unsafe { dst.ptr.offset(i * dst.row_stride + j * dst.col_stride) }
    };
    if dst.col_stride == 1 && columns == NR {
        for (i, sums) in sums.iter().enumerate().take(rows) {
            for (half, &sum) in sums.iter().enumerate() {
                let out = tile(i, 16 * half);
                // SAFETY: 16 contiguous values of row `i` inside the tile.
                unsafe {
                    let sum = if load {
                        _mm512_add_ps(_mm512_loadu_ps(out), sum)
                    } else {
                        sum
                    };
                    _mm512_storeu_ps(out, sum);
                }
            }
        }
        return;
    }
    for (i, sums) in sums.iter().enumerate().take(rows) {
        let mut row = [0f32; NR];
        // SAFETY: 32 values into a 32-value array.
        unsafe {
            _mm512_storeu_ps(row.as_mut_ptr(), sums[0]);
            _mm512_storeu_ps(row.as_mut_ptr().add(16), sums[1]);
        }
        for (j, &sum) in row.iter().enumerate().take(columns) {
            let out = tile(i, j);
            // SAFETY: inside the tile.
            unsafe { *out = if load { *out + sum } else { sum } };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::values;

    fn bf16(x: f32) -> f64 {
        f32::from_bits((to_bf16(x) as u32) << 16) as f64
    }

    #[test]
    fn rounds_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even, 1.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to the even one.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(-2.5), 0xc020);
        assert!(f32::from_bits((to_bf16(f32::NAN) as u32) << 16).is_nan());
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
    }

    /// A panel packed from a source contiguous along the depth, along the lines, or neither
    /// (each its own path) holds every line's rounded pairs where the definition puts them,
    /// and zeros past the last line and depth.
    #[test]
    fn packs_panels_from_every_layout() {
        if !supported() {
            println!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for (lines, depth, width) in [
            (12, 64, 12),
            (5, 33, 12),
            (32, 31, 32),
            (17, 1, 32),
            (1, 70, 32),
        ] {
            let values = values(lines * depth, 4);
            let expected: Vec<u32> = (0..depth.div_ceil(2) * width)
                .map(|i| {
                    let (p, l) = (i / width, i % width);
                    let value = |d: usize| {
                        if l < lines && d < depth {
                            values[l * depth + d]
                        } else {
                            0.0
                        }
                    };
                    pair(value(2 * p), value(2 * p + 1))
                })
                .collect();
            // The same matrix laid out three ways: row-major, column-major, every other
            // element of a row-major matrix twice as wide.
            let column_major: Vec<f32> = (0..lines * depth)
                .map(|i| values[(i % lines) * depth + i / lines])
                .collect();
            let spread: Vec<f32> = values.iter().flat_map(|&v| [v, -1.0]).collect();
            for (src, row_stride, col_stride) in [
                (&values[..], depth as isize, 1),
                (&column_major[..], 1, lines as isize),
                (&spread[..], 2 * depth as isize, 2),
            ] {
                let mut out = vec![u32::MAX; expected.len()];
                let view = Strided {
                    ptr: src.as_ptr(),
                    row_stride,
                    col_stride,
                };
                // SAFETY: the view addresses `lines x depth` elements of `src`; `out` holds
                // `width` lanes a pair.
                unsafe { pack_panel(view, lines, depth, width, &mut out) };
                assert_eq!(
                    out, expected,
                    "{lines} lines of {depth} in {width}, strides ({row_stride}, {col_stride})"
                );
            }
        }
    }

    /// Every shape and layout against the product of the rounded operands in f64: tiles and
    /// depths with remainders (last row panels of 1 to 4, 5 to 8 and 9 to 12 rows),
    /// transposed operands, a column-major `dst`, accumulation, and the parallel split.
    #[test]
    fn matches_the_product_of_the_rounded_operands() {
        if !supported() {
            println!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for (m, n, k) in [
            (1, 1, 1),
            (12, 32, 2),
            (13, 33, 3),
            (64, 100, 600),
            (5, 70, 257),
            (22, 35, 9),
            (3, 40, 0),
        ] {
            for (transposed, accumulate, parallel) in [
                (false, false, false),
                (true, false, true),
                (false, true, true),
            ] {
                let (a, b, start) = (values(m * k, 1), values(k * n, 2), values(m * n, 3));
                // `transposed`: lhs and rhs column-major, dst column-major.
                let (lhs, rhs, dst_strides) = if transposed {
                    (
                        Strided {
                            ptr: a.as_ptr(),
                            row_stride: 1,
                            col_stride: m as isize,
                        },
                        Strided {
                            ptr: b.as_ptr(),
                            row_stride: 1,
                            col_stride: k as isize,
                        },
                        (1, m as isize),
                    )
                } else {
                    (
                        Strided {
                            ptr: a.as_ptr(),
                            row_stride: k as isize,
                            col_stride: 1,
                        },
                        Strided {
                            ptr: b.as_ptr(),
                            row_stride: n as isize,
                            col_stride: 1,
                        },
                        (n as isize, 1),
                    )
                };
                let mut out = start.clone();
                let dst = Strided {
                    ptr: out.as_mut_ptr(),
                    row_stride: dst_strides.0,
                    col_stride: dst_strides.1,
                };
                // SAFETY: the views address the vectors above, with the shapes given.
                unsafe { product(m, n, k, dst, accumulate, lhs, rhs, parallel) };
                for i in 0..m {
                    for j in 0..n {
                        // SAFETY: inside the operands.
                        let exact: f64 = (0..k)
                            .map(|d| unsafe { bf16(lhs.at(i, d)) * bf16(rhs.at(d, j)) })
                            .sum();
                        let at = (i as isize * dst_strides.0 + j as isize * dst_strides.1) as usize;
                        let expected = exact + if accumulate { start[at] as f64 } else { 0.0 };
                        let scale = (0..k)
                            .map(|d| unsafe { (bf16(lhs.at(i, d)) * bf16(rhs.at(d, j))).abs() })
                            .sum::<f64>()
                            + start[at].abs() as f64;
                        let error = (out[at] as f64 - expected).abs();
                        assert!(
                            error <= 1e-6 * scale.max(1.0),
                            "{m}x{n}x{k} ({transposed}, {accumulate}, {parallel}) at ({i}, {j}): {} vs {expected}",
                            out[at]
                        );
                    }
                }
            }
        }
    }
}
