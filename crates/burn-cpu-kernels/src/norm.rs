//! BatchNorm in training, with the batch's statistics, on NCHW values on the host.
//!
//! Burn's generic `batch_norm_train` (which flex and ndarray use) swaps the batch and channel
//! dimensions to reduce each channel, which costs a strided copy of the activation, and runs
//! about ten elementwise passes forward and as many backward, each allocating a tensor of the
//! activation's size. Here the forward is two reading passes (mean, then variance about it)
//! and one writing pass; the backward one reading pass (two sums a channel) and one writing
//! pass. Sums are in f64, eight lanes at a time; the loops are compiled for the
//! instruction set the CPU has ([`Simd`]).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::simd::{Simd, dispatch};

/// The shape of a BatchNorm's `[batch, channels, height, width]` input, as planes of
/// `pixels` values.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Planes {
    batch: usize,
    channels: usize,
    pixels: usize,
    simd: Simd,
}

/// What the forward computes: the output, and each channel's batch mean and biased
/// variance (what Burn's `batch_norm_train` returns).
pub(crate) struct Normalized {
    pub output: Vec<f32>,
    pub mean: Vec<f32>,
    pub variance: Vec<f32>,
}

/// The gradients of the input, of gamma and of beta.
pub(crate) struct NormGradients {
    pub x: Vec<f32>,
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

impl Planes {
    /// The planes of an input of `shape`, if it has a value in each channel.
    pub(crate) fn new([batch, channels, height, width]: [usize; 4]) -> Option<Self> {
        let pixels = height * width;
        (batch * channels * pixels > 0).then_some(Self {
            batch,
            channels,
            pixels,
            simd: Simd::detect(),
        })
    }

    /// These planes with their loops compiled for `simd` (by default [`Simd::detect`]'s).
    #[cfg(test)]
    fn with_simd(self, simd: Simd) -> Self {
        Self { simd, ..self }
    }

    fn len(&self) -> usize {
        self.batch * self.channels * self.pixels
    }

    /// Values a channel's statistics are taken over.
    fn count(&self) -> f64 {
        (self.batch * self.pixels) as f64
    }

    /// The plane of image `n`, channel `c`.
    fn plane<'a>(&self, values: &'a [f32], n: usize, c: usize) -> &'a [f32] {
        let start = (n * self.channels + c) * self.pixels;
        &values[start..start + self.pixels]
    }

    /// `f` of channel `c`'s planes in `a` and `b`, summed over the batch.
    fn channel_sum(
        &self,
        a: &[f32],
        b: &[f32],
        c: usize,
        f: impl Fn(f32, f32) -> [f64; 2],
    ) -> [f64; 2] {
        (0..self.batch).fold([0.0; 2], |[s0, s1], n| {
            let (a, b) = (self.plane(a, n, c), self.plane(b, n, c));
            let [p0, p1] = dispatch!(self.simd, lane_sums(
                a: &[f32] = a,
                b: &[f32] = b,
                f: &impl Fn(f32, f32) -> [f64; 2] = &f,
            ) -> [f64; 2]);
            [s0 + p0, s1 + p1]
        })
    }

    /// `out[n, c, p] = f(c, a[n, c, p], b[n, c, p])` into a new vector, images in parallel.
    fn map(&self, a: &[f32], b: &[f32], f: impl Fn(usize, f32, f32) -> f32 + Sync) -> Vec<f32> {
        let (len, image) = (self.len(), self.channels * self.pixels);
        let mut out: Vec<f32> = Vec::with_capacity(len);
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(image)
            .zip(a.par_chunks(image).zip(b.par_chunks(image)))
            .for_each(|(out, (a, b))| {
                dispatch!(self.simd, map_image(
                    out: &mut [MaybeUninit<f32>] = out,
                    a: &[f32] = a,
                    b: &[f32] = b,
                    pixels: usize = self.pixels,
                    f: &impl Fn(usize, f32, f32) -> f32 = &f,
                ) -> ())
            });
        // SAFETY: the loop above wrote all `len` values, plane by plane.
        unsafe { out.set_len(len) };
        out
    }

    /// `(x - mean) / sqrt(variance + epsilon) * gamma + beta` with each channel's batch
    /// statistics.
    pub(crate) fn forward(
        &self,
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        epsilon: f64,
    ) -> Normalized {
        assert_eq!(x.len(), self.len(), "input of {self:?}");
        assert_eq!(gamma.len(), self.channels, "gamma of {self:?}");
        assert_eq!(beta.len(), self.channels, "beta of {self:?}");
        let statistics: Vec<(f64, f64)> = (0..self.channels)
            .into_par_iter()
            .map(|c| {
                let [sum, _] = self.channel_sum(x, x, c, |v, _| [v as f64, 0.0]);
                let mean = sum / self.count();
                let [squares, _] = self.channel_sum(x, x, c, |v, _| {
                    let d = v as f64 - mean;
                    [d * d, 0.0]
                });
                (mean, squares / self.count())
            })
            .collect();
        let mean: Vec<f32> = statistics.iter().map(|&(m, _)| m as f32).collect();
        let variance: Vec<f32> = statistics.iter().map(|&(_, v)| v as f32).collect();
        let scale: Vec<f32> = statistics
            .iter()
            .zip(gamma)
            .map(|(&(_, v), &g)| (g as f64 / (v + epsilon).sqrt()) as f32)
            .collect();
        let output = self.map(x, x, |c, v, _| (v - mean[c]) * scale[c] + beta[c]);
        Normalized {
            output,
            mean,
            variance,
        }
    }

    /// The gradients of [`Self::forward`] given the gradient of its output, `grad`; `mean`
    /// and `variance` are the statistics it returned.
    pub(crate) fn backward(
        &self,
        x: &[f32],
        gamma: &[f32],
        mean: &[f32],
        variance: &[f32],
        epsilon: f64,
        grad: &[f32],
    ) -> NormGradients {
        assert_eq!(x.len(), self.len(), "input of {self:?}");
        assert_eq!(grad.len(), self.len(), "gradient of {self:?}");
        for (what, values) in [("gamma", gamma), ("mean", mean), ("variance", variance)] {
            assert_eq!(values.len(), self.channels, "{what} of {self:?}");
        }
        let inv_std: Vec<f64> = variance
            .iter()
            .map(|&v| 1.0 / (v as f64 + epsilon).sqrt())
            .collect();
        // Per channel, sum(grad) and sum(grad * (x - mean)).
        let sums: Vec<[f64; 2]> = (0..self.channels)
            .into_par_iter()
            .map(|c| {
                let m = mean[c] as f64;
                self.channel_sum(grad, x, c, |g, v| [g as f64, g as f64 * (v as f64 - m)])
            })
            .collect();
        let beta: Vec<f32> = sums.iter().map(|&[g, _]| g as f32).collect();
        let gamma_grad: Vec<f64> = sums
            .iter()
            .zip(&inv_std)
            .map(|(&[_, gx], s)| gx * s)
            .collect();
        // x_grad = gamma * inv_std * (grad - mean(grad) - normalized * mean(grad * normalized))
        //        = a * grad + b * (x - mean) + d, per channel.
        let n = self.count();
        let coefficients: Vec<[f32; 3]> = (0..self.channels)
            .map(|c| {
                let a = gamma[c] as f64 * inv_std[c];
                let b = -a * inv_std[c] * gamma_grad[c] / n;
                let d = -a * sums[c][0] / n;
                [a as f32, b as f32, d as f32]
            })
            .collect();
        let x_grad = self.map(grad, x, |c, g, v| {
            let [a, b, d] = coefficients[c];
            a * g + b * (v - mean[c]) + d
        });
        NormGradients {
            x: x_grad,
            gamma: gamma_grad.iter().map(|&g| g as f32).collect(),
            beta,
        }
    }
}

/// `out[c, p] = f(c, a[c, p], b[c, p])` over one image's planes of `pixels` values.
#[inline(always)]
fn map_image(
    out: &mut [MaybeUninit<f32>],
    a: &[f32],
    b: &[f32],
    pixels: usize,
    f: &impl Fn(usize, f32, f32) -> f32,
) {
    let planes = out
        .chunks_mut(pixels)
        .zip(a.chunks(pixels).zip(b.chunks(pixels)));
    for (c, (out, (a, b))) in planes.enumerate() {
        for (o, (&a, &b)) in out.iter_mut().zip(a.iter().zip(b)) {
            *o = MaybeUninit::new(f(c, a, b));
        }
    }
}

/// `f(a[i], b[i])` summed over `i`, in eight independent lanes of each of the two sums, so
/// that the compiler can vectorize them.
#[inline(always)]
fn lane_sums(a: &[f32], b: &[f32], f: &impl Fn(f32, f32) -> [f64; 2]) -> [f64; 2] {
    let mut lanes = [[0f64; 8]; 2];
    let (chunks_a, chunks_b) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest = chunks_a.remainder().iter().zip(chunks_b.remainder());
    for (a, b) in chunks_a.zip(chunks_b) {
        for (lane, (&a, &b)) in a.iter().zip(b).enumerate() {
            let [v0, v1] = f(a, b);
            lanes[0][lane] += v0;
            lanes[1][lane] += v1;
        }
    }
    let [mut s0, mut s1] = lanes.map(|lanes| lanes.iter().sum::<f64>());
    for (&a, &b) in rest {
        let [v0, v1] = f(a, b);
        s0 += v0;
        s1 += v1;
    }
    [s0, s1]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, in f64, one channel at a time.
    fn reference(planes: &Planes, x: &[f32], c: usize) -> (f64, f64) {
        let values: Vec<f64> = (0..planes.batch)
            .flat_map(|n| planes.plane(x, n, c).iter().map(|&v| v as f64))
            .collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
        (mean, variance)
    }

    #[test]
    fn statistics_are_the_batchs_over_every_plane_of_a_channel() {
        // 13 pixels: the lanes' remainder is used too; an offset that f32 sums would round.
        let planes = Planes::new([3, 2, 1, 13]).unwrap();
        let x: Vec<f32> = (0..planes.len())
            .map(|i| 1000.0 + ((i * 7919) % 101) as f32 / 10.0)
            .collect();
        let (gamma, beta) = ([2.0f32, 0.5], [0.25f32, -1.0]);
        let out = planes.forward(&x, &gamma, &beta, 1e-5);
        for c in 0..2 {
            let (mean, variance) = reference(&planes, &x, c);
            assert!((out.mean[c] as f64 - mean).abs() < 1e-4, "mean {c}");
            assert!(
                (out.variance[c] as f64 - variance).abs() < 1e-4 * variance,
                "var {c}"
            );
            for n in 0..3 {
                let (input, output) = (planes.plane(&x, n, c), planes.plane(&out.output, n, c));
                for (&v, &o) in input.iter().zip(output) {
                    let expected = (v as f64 - mean) / (variance + 1e-5).sqrt() * gamma[c] as f64
                        + beta[c] as f64;
                    assert!((o as f64 - expected).abs() < 1e-4, "{o} {expected}");
                }
            }
        }
    }

    /// Forward and backward compiled for each instruction set the CPU has give the
    /// baseline's bits.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let planes = Planes::new([3, 4, 5, 7]).unwrap();
        let values = |seed: usize| -> Vec<f32> {
            (0..planes.len())
                .map(|i| ((i * 7919 + seed * 104_729) % 211) as f32 / 37.0 - 2.5)
                .collect()
        };
        let (x, grad) = (values(1), values(2));
        let (gamma, beta) = ([1.5f32, 0.5, -0.25, 2.0], [0.25f32, -1.0, 0.0, 3.0]);
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let run = |planes: Planes| {
            let out = planes.forward(&x, &gamma, &beta, 1e-5);
            let grads = planes.backward(&x, &gamma, &out.mean, &out.variance, 1e-5, &grad);
            [
                out.output,
                out.mean,
                out.variance,
                grads.x,
                grads.gamma,
                grads.beta,
            ]
            .map(|v| bits(&v))
        };
        let baseline = run(planes.with_simd(Simd::Baseline));
        for simd in Simd::available() {
            assert_eq!(run(planes.with_simd(simd)), baseline, "{simd:?}");
        }
    }

    #[test]
    fn empty_inputs_have_no_planes() {
        assert!(Planes::new([0, 4, 2, 2]).is_none());
        assert!(Planes::new([2, 4, 0, 2]).is_none());
    }
}
