//! 3x3 convolutions of stride 1 and padding 1 by Winograd's minimal filtering F(2x2, 3x3)
//! (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! Each 2x2 block of output pixels comes from the 4x4 block of input around it. Both the
//! input blocks and the 3x3 kernels are transformed into 4x4 blocks (`B^T d B` and `G g G^T`,
//! sums and halves only), the 16 positions of a block are 16 independent matrix products over
//! the channels, and each 2x2 output block is transformed back (`A^T m A`). The products take
//! 16 multiplications a 2x2 block where the direct convolution takes 36.
//!
//! The products are the `gemm` crate's; the transforms run on whole rows. Images are shared
//! between threads in panels of a size fixed by the geometry and the number of threads, and
//! the weight's gradient sums the threads' parts in order, so the results are the same on
//! every run.

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// The 2x2 blocks a product is given at least, where images are small: several images side
/// by side.
const PANEL_TILES: usize = 256;

/// The output pixels a thread from which [`Winograd::weight_grad`] beats im2col's
/// product. Measured with `speed_against_im2col` on 2 cores, on 1,024 pixels (512 a thread)
/// it ran at 1.04-1.23x im2col's speed (64 to 512 channels), on 784 at 0.75-1.05x, on 196-392
/// at 0.5-0.76x, and on 3,136 or more at 1.27-1.84x (0.96x on one image of 3,136, where only
/// the products are parallel).
const GRADIENT_PIXELS_PER_THREAD: usize = 512;

/// Positions of a transformed 4x4 block.
const POSITIONS: usize = 16;

/// `G^T` on four values of a transformed block: `G^T = [[1, 1/2, 1/2, 0], [0, 1/2, -1/2,
/// 0], [0, 1/2, 1/2, 1]]`.
fn block_side(a: f32, b: f32, c: f32, d: f32) -> [f32; 3] {
    [a + 0.5 * (b + c), 0.5 * (b - c), 0.5 * (b + c) + d]
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

/// A 3x3 convolution of stride 1 and padding 1 (output as large as the input), computed by
/// F(2x2, 3x3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Winograd {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    out_channels: usize,
}

impl Winograd {
    /// The convolution of `batch` images of `channels x height x width` into `out_channels`.
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
        }
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
        self.height.div_ceil(2)
    }

    fn tiles_wide(&self) -> usize {
        self.width.div_ceil(2)
    }

    /// 2x2 output blocks an image.
    fn tiles(&self) -> usize {
        self.tiles_high() * self.tiles_wide()
    }

    fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    fn out_image_len(&self) -> usize {
        self.out_channels * self.height * self.width
    }

    /// Images a panel: as many as give its products [`PANEL_TILES`] columns, but no more
    /// than leave every thread a panel.
    fn panel_images(&self) -> usize {
        let threads = rayon::current_num_threads().max(1);
        PANEL_TILES
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
    /// gradient `grad` (NCHW both): the adjoint of the forward, `G^T [sum over blocks of
    /// (A dY A^T) * (B^T d B)] G`, where the sum is 16 products over the blocks (2.25 times
    /// fewer multiplications than im2col's product).
    ///
    /// Images are shared between threads in fixed groups, whose partial sums are added in
    /// order: the result is the same on every run.
    pub(crate) fn weight_grad(&self, x: &[f32], grad: &[f32]) -> Vec<f32> {
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
                            gemm::gemm(
                                o,
                                c,
                                columns,
                                sums.as_mut_ptr().add(p * c),
                                1,
                                (POSITIONS * c) as isize,
                                true,
                                z.as_ptr().add(p * columns),
                                1,
                                (POSITIONS * columns) as isize,
                                v.as_ptr().add(p * columns),
                                (POSITIONS * columns) as isize,
                                1,
                                1.0,
                                1.0,
                                false,
                                false,
                                false,
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

    /// The transformed kernels of an OIHW weight, `[out_channels][16][channels]`: for each
    /// output channel, 16 rows (one a position) over the input channels.
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

    /// `[out_channels][16][channels]` from `kernel(o, c)`.
    fn transform_weight(&self, kernel: impl Fn(usize, usize) -> [f32; 9] + Sync) -> Vec<f32> {
        let c = self.channels;
        let len = self.out_channels * POSITIONS * c;
        let mut u: Vec<f32> = Vec::with_capacity(len);
        u.spare_capacity_mut()[..len]
            .par_chunks_mut(POSITIONS * c)
            .enumerate()
            .for_each(|(oc, rows)| {
                for ic in 0..c {
                    for (p, v) in transform_kernel(kernel(oc, ic)).into_iter().enumerate() {
                        rows[p * c + ic].write(v);
                    }
                }
            });
        // SAFETY: each output channel's 16 rows of `channels` were written above.
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
        assert_eq!(input.len(), self.batch * image, "input of {self:?}");
        assert_eq!(
            u.len(),
            self.out_channels * POSITIONS * self.channels,
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
            let columns = span * self.tiles() * POSITIONS;
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
                let v = &mut v[..self.channels * POSITIONS * columns];
                let m = &mut m[..self.out_channels * POSITIONS * columns];
                self.transform_input(x, v);
                for p in 0..POSITIONS {
                    // m[., p, .] = u[., p, .] x v[., p, .]
                    // SAFETY: `m` is `out_channels` rows of 16 * `columns`, `u` `out_channels` rows
                    // of 16 * `channels` and `v` `channels` rows of 16 * `columns` (lengths
                    // checked above); position `p` is `columns` (`channels`) values at `p *
                    // columns` (`p * channels`) of each row, inside it.
                    unsafe {
                        gemm::gemm(
                            self.out_channels,
                            columns,
                            self.channels,
                            m.as_mut_ptr().add(p * columns),
                            1,
                            (POSITIONS * columns) as isize,
                            false,
                            u.as_ptr().add(p * self.channels),
                            1,
                            (POSITIONS * self.channels) as isize,
                            v.as_ptr().add(p * columns),
                            1,
                            (POSITIONS * columns) as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
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

    /// The transformed input blocks of the images `x`, `[channels][16][images * tiles]`:
    /// `B^T d B`, `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`.
    ///
    /// Each plane is copied with its padding (a zero row and column before, and after as
    /// many as make whole blocks) into its even and its odd columns, so that both halves of
    /// the transform run on contiguous rows, which the compiler vectorizes.
    fn transform_input(&self, x: &[f32], v: &mut [f32]) {
        let (h, w) = (self.height, self.width);
        let (th, tw) = (self.tiles_high(), self.tiles_wide());
        let columns = x.len() / self.image_len() * self.tiles();
        // Padded column `x + 1` of image column `x`: even ones in `even`, odd ones in `odd`,
        // `tw + 1` of each a row. The padding is never written, so it stays zero.
        let half = tw + 1;
        let mut even = vec![0f32; (2 * th + 2) * half];
        let mut odd = vec![0f32; (2 * th + 2) * half];
        let mut scratch = vec![0f32; 8 * half];
        for (c, v) in v.chunks_exact_mut(POSITIONS * columns).enumerate() {
            for (i, image) in x.chunks_exact(self.image_len()).enumerate() {
                let plane = &image[c * h * w..][..h * w];
                for (y, src) in plane.chunks_exact(w).enumerate() {
                    let (e, o) = (
                        &mut even[(y + 1) * half..][..half],
                        &mut odd[(y + 1) * half..][..half],
                    );
                    for (k, pair) in src.chunks(2).enumerate() {
                        o[k] = pair[0];
                        if let Some(&next) = pair.get(1) {
                            e[k + 1] = next;
                        }
                    }
                }
                for ty in 0..th {
                    // B^T d: the block's four rows combined, even and odd columns apart.
                    let (re, ro) = scratch.split_at_mut(4 * half);
                    for (plane, out) in [(&even, re), (&odd, ro)] {
                        let d = |k: usize| &plane[(2 * ty + k) * half..][..half];
                        let (d0, d1, d2, d3) = (d(0), d(1), d(2), d(3));
                        let (r0, rest) = out.split_at_mut(half);
                        let (r1, rest) = rest.split_at_mut(half);
                        let (r2, r3) = rest.split_at_mut(half);
                        for j in 0..half {
                            r0[j] = d0[j] - d2[j];
                            r1[j] = d1[j] + d2[j];
                            r2[j] = d2[j] - d1[j];
                            r3[j] = d1[j] - d3[j];
                        }
                    }
                    // ... then B on the right: block `tx` has columns e[tx], o[tx], e[tx + 1],
                    // o[tx + 1].
                    let first = i * th * tw + ty * tw;
                    let (re, ro) = scratch.split_at(4 * half);
                    for k in 0..4 {
                        let e = &re[k * half..][..half];
                        let o = &ro[k * half..][..half];
                        let (e0, e1, o0, o1) = (&e[..tw], &e[1..], &o[..tw], &o[1..]);
                        let row = |l: usize| (k * 4 + l) * columns + first;
                        let (v0, v1, v2, v3) = (row(0), row(1), row(2), row(3));
                        for (dst, (a, b)) in v[v0..][..tw].iter_mut().zip(e0.iter().zip(e1)) {
                            *dst = a - b;
                        }
                        for (dst, (a, b)) in v[v1..][..tw].iter_mut().zip(o0.iter().zip(e1)) {
                            *dst = a + b;
                        }
                        for (dst, (a, b)) in v[v2..][..tw].iter_mut().zip(e1.iter().zip(o0)) {
                            *dst = a - b;
                        }
                        for (dst, (a, b)) in v[v3..][..tw].iter_mut().zip(o0.iter().zip(o1)) {
                            *dst = a - b;
                        }
                    }
                }
            }
        }
    }

    /// The transformed output gradients of a panel's images (NCHW),
    /// `[out_channels][16][images * tiles]`: `A dY A^T` of each 2x2 block (zero past the
    /// image's edge), the adjoint of [`Self::transform_output`].
    fn transform_grad(&self, grad: &[f32], z: &mut [f32]) {
        let (h, w) = (self.height, self.width);
        let (th, tw) = (self.tiles_high(), self.tiles_wide());
        let plane = h * w;
        let columns = grad.len() / self.out_image_len() * self.tiles();
        // Each block row's two pixel rows, even and odd columns apart (zero past the edge).
        let mut halves = vec![0f32; 4 * tw];
        for (o, z) in z.chunks_exact_mut(POSITIONS * columns).enumerate() {
            for (i, image) in grad.chunks_exact(self.out_image_len()).enumerate() {
                let dy = &image[o * plane..][..plane];
                for ty in 0..th {
                    halves.fill(0.0);
                    let (top, bottom) = halves.split_at_mut(2 * tw);
                    for (row, half) in [(2 * ty, top), (2 * ty + 1, bottom)] {
                        if row >= h {
                            continue;
                        }
                        let (even, odd) = half.split_at_mut(tw);
                        for (k, pair) in dy[row * w..][..w].chunks(2).enumerate() {
                            even[k] = pair[0];
                            odd[k] = pair.get(1).copied().unwrap_or(0.0);
                        }
                    }
                    let (e0, o0) = halves[..2 * tw].split_at(tw);
                    let (e1, o1) = halves[2 * tw..].split_at(tw);
                    let first = i * th * tw + ty * tw;
                    // A dY: rows r0, r0 + r1, r0 - r1, -r1; then A^T on the right: columns
                    // e, e + o, e - o, -o.
                    for t in 0..tw {
                        let rows = [
                            (e0[t], o0[t]),
                            (e0[t] + e1[t], o0[t] + o1[t]),
                            (e0[t] - e1[t], o0[t] - o1[t]),
                            (-e1[t], -o1[t]),
                        ];
                        for (k, (e, od)) in rows.into_iter().enumerate() {
                            let at = (k * 4) * columns + first + t;
                            z[at] = e;
                            z[at + columns] = e + od;
                            z[at + 2 * columns] = e - od;
                            z[at + 3 * columns] = -od;
                        }
                    }
                }
            }
        }
    }

    /// The panel's outputs (NCHW) from the products `m`,
    /// `[out_channels][16][images * tiles]`: `A^T m A`, `A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]`,
    /// a row of blocks at a time.
    fn transform_output(&self, m: &[f32], out: &mut [MaybeUninit<f32>]) {
        let (h, w) = (self.height, self.width);
        let (th, tw) = (self.tiles_high(), self.tiles_wide());
        let plane = h * w;
        let columns = out.len() / self.out_image_len() * self.tiles();
        // The four pixels of each block of a row: top left, top right, bottom left, bottom
        // right.
        let mut pixels = vec![0f32; 4 * tw];
        for (o, m) in m.chunks_exact(POSITIONS * columns).enumerate() {
            for (i, image) in out.chunks_exact_mut(self.out_image_len()).enumerate() {
                let dst = &mut image[o * plane..][..plane];
                for ty in 0..th {
                    let first = i * th * tw + ty * tw;
                    let p: [&[f32]; POSITIONS] =
                        std::array::from_fn(|p| &m[p * columns + first..][..tw]);
                    let (top, bottom) = pixels.split_at_mut(2 * tw);
                    let (y00, y01) = top.split_at_mut(tw);
                    let (y10, y11) = bottom.split_at_mut(tw);
                    for t in 0..tw {
                        // A^T m: two rows of four; then A on the right.
                        let a: [f32; 4] =
                            std::array::from_fn(|l| p[l][t] + p[4 + l][t] + p[8 + l][t]);
                        let b: [f32; 4] =
                            std::array::from_fn(|l| p[4 + l][t] - p[8 + l][t] - p[12 + l][t]);
                        y00[t] = a[0] + a[1] + a[2];
                        y01[t] = a[1] - a[2] - a[3];
                        y10[t] = b[0] + b[1] + b[2];
                        y11[t] = b[1] - b[2] - b[3];
                    }
                    let y = 2 * ty;
                    for (row, (left, right)) in [(y, (&*y00, &*y01)), (y + 1, (&*y10, &*y11))] {
                        if row >= h {
                            continue;
                        }
                        let dst = &mut dst[row * w..][..w];
                        for (pair, (l, r)) in dst.chunks_mut(2).zip(left.iter().zip(right)) {
                            pair[0].write(*l);
                            if let Some(second) = pair.get_mut(1) {
                                second.write(*r);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::im2col::Im2col;
    use crate::testing::{assert_values_close as assert_close, seeded_values as values};

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
        ] {
            let g = Winograd::new(n, c, h, w, o);
            let x = values(n * g.image_len(), 1);
            let weight = values(o * c * 9, 2);
            let got = g.forward(&x, &g.weight(&weight), |_, _| {});
            assert_close(&format!("{g:?}"), &got, &direct(&g, &x, &weight));
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
        ] {
            let g = Winograd::new(n, c, h, w, o);
            let im =
                Im2col::new([n, c, h, w], [o, c, 3, 3], [1, 1], [1, 1]).expect("a valid geometry");
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

    /// A measurement more than a test (hence ignored): Winograd's speed against im2col's
    /// on ResNet's 3x3 layers, each of the three computations, median milliseconds of 7 runs
    /// (the forward's including the weight's transform), having checked that the two agree.
    /// ResNet-18's layers on CIFAR-10, or with `LAYERS=imagenet` ResNet-50's on ImageNet, on
    /// `BATCH` images (default 64):
    ///
    /// ```text
    /// cargo test --release -p resnet-burn --lib -- --ignored --nocapture speed_against_im2col
    /// LAYERS=imagenet BATCH=4 cargo test --release -p resnet-burn --lib -- --ignored \
    ///     --nocapture speed_against_im2col
    /// ```
    #[test]
    #[ignore = "a measurement: run it with --nocapture"]
    fn speed_against_im2col() {
        use std::time::Instant;

        let batch = std::env::var("BATCH").map_or(64, |b| b.parse().expect("BATCH: a number"));
        // Input channels, output channels, side. On CIFAR-10, the stem and a 16-channel layer
        // too, which show where Winograd stops paying (`WINOGRAD_CHANNELS` in `im2col.rs`).
        let layers = match std::env::var("LAYERS").as_deref() {
            Ok("imagenet") => vec![(64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 7)],
            _ => vec![
                (3, 64, 32),
                (16, 16, 32),
                (64, 64, 32),
                (128, 128, 16),
                (256, 256, 8),
                (512, 512, 4),
            ],
        };
        type Computation<'a> = dyn Fn() -> Vec<f32> + 'a;
        let median_ms = |f: &Computation| {
            let mut times: Vec<f64> = (0..7)
                .map(|_| {
                    let start = Instant::now();
                    std::hint::black_box(f());
                    start.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            times.sort_by(f64::total_cmp);
            times[3]
        };
        println!("{batch} images: milliseconds im2col / Winograd");
        for (c, o, side) in layers {
            let g = Winograd::new(batch, c, side, side, o);
            let im = Im2col::new([batch, c, side, side], [o, c, 3, 3], [1, 1], [1, 1])
                .expect("a valid geometry");
            let x = values(batch * g.image_len(), 1);
            let weight = values(o * c * 9, 2);
            let grad = values(batch * g.out_image_len(), 3);
            let pairs: [(&str, &Computation, &Computation); 3] = [
                ("forward", &|| im.forward(&x, &weight, |_, _| {}), &|| {
                    g.forward(&x, &g.weight(&weight), |_, _| {})
                }),
                (
                    "input gradient",
                    &|| {
                        im.backward(&x, &weight, &grad, true, false)
                            .0
                            .expect("asked for")
                    },
                    &|| g.input_grad(&grad, &weight),
                ),
                (
                    "weight gradient",
                    &|| {
                        im.backward(&x, &weight, &grad, false, true)
                            .1
                            .expect("asked for")
                    },
                    &|| g.weight_grad(&x, &grad),
                ),
            ];
            let mut line = format!("{c} -> {o} channels, {side}x{side}:");
            for (what, im2col, winograd) in pairs {
                assert_close(&format!("{what} of {g:?}"), &winograd(), &im2col());
                let (a, b) = (median_ms(im2col), median_ms(winograd));
                line += &format!("  {what} {a:.1} / {b:.1} ({:.2}x)", a / b);
            }
            println!("{line}");
        }
    }
}
