//! Convolutions on the flex CPU backend in inference, through one matrix product an image,
//! with the BatchNorm and ReLU that follow them applied while the output is in cache.
//!
//! Burn's flex convolution converts its input to channels-last and builds its im2col
//! matrix tile by tile; on ResNet's early layers (64 channels at 32x32, batch 64) that runs at
//! half PyTorch's speed (`python3 benches/compare.py --bench layers`), and BatchNorm then
//! takes several more passes over the activations. Here each image's im2col matrix
//! (`[in_channels * k * k, out_h * out_w]`, built from NCHW rows with plain copies) is
//! multiplied by the weight matrix (`[out_channels, in_channels * k * k]`, the weight tensor
//! as it is) with the `gemm` crate that flex uses too, images in parallel; each output
//! channel is then scaled and shifted as BatchNorm's running statistics say (and clamped at
//! 0 when a ReLU follows) in the same pass.
//!
//! It applies to ungrouped, undilated, bias-free f32 convolutions on `Device::flex()` without
//! autodiff; everything else (training, other backends, ResNeXt's grouped and dilated
//! convolutions) goes through Burn's `Conv2d` and `BatchNorm`.

use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, PaddingConfig2d};
use burn::tensor::{DType, Device, Tensor, TensorData};
use rayon::prelude::*;

/// Inputs given back when the fast path does not apply: the convolution's input and the
/// residual.
pub(crate) type NotApplicable = (Tensor<4>, Option<Tensor<4>>);

/// `relu?(bn(conv(x)) [+ residual])` (ReLU always after a residual), with `x` given back
/// unchanged, through [`Im2col`] where it applies; otherwise the inputs come back.
///
/// Giving `x` back lets a block keep its input for the shortcut without a copy: a tensor
/// held twice would have to be copied to be read here.
// The error carries the caller's tensors back (handles, moved not copied): boxing them would
// only add an allocation to every declined call.
#[allow(clippy::result_large_err)]
pub(crate) fn fused(
    conv: &Conv2d,
    bn: &BatchNorm,
    x: Tensor<4>,
    relu: bool,
    residual: Option<Tensor<4>>,
) -> Result<(Tensor<4>, Tensor<4>), NotApplicable> {
    let Some(im2col) = Im2col::for_conv(conv, &x) else {
        return Err((x, residual));
    };
    let Some(affine) = Affine::of(bn, im2col.out_channels, relu || residual.is_some()) else {
        return Err((x, residual));
    };
    let residual_ok = residual
        .as_ref()
        .is_none_or(|r| r.dims() == im2col.out_shape() && r.dtype() == DType::F32);
    if !residual_ok {
        return Err((x, residual));
    }
    let device = x.device();
    let input = x.into_data();
    let weight = conv.weight.val().into_data();
    let residual = residual.map(Tensor::into_data);
    let residual_values = residual.as_ref().map(|r| r.as_slice::<f32>()).transpose();
    match (
        input.as_slice::<f32>(),
        weight.as_slice::<f32>(),
        residual_values,
    ) {
        (Ok(values), Ok(weight), Ok(residual)) => {
            let out = im2col.run(values, weight, &affine, residual);
            Ok(im2col.finish(out, input, &device))
        }
        // Unreachable after the dtype checks above; Burn's path stays correct.
        _ => Err((
            Tensor::from_data(input, &device),
            residual.map(|r| Tensor::from_data(r, &device)),
        )),
    }
}

/// BatchNorm in evaluation as a per-channel `x * scale + shift`, then ReLU if `relu`.
#[derive(Debug)]
struct Affine {
    scale: Vec<f32>,
    shift: Vec<f32>,
    relu: bool,
}

impl Affine {
    /// `scale = gamma / sqrt(running_var + eps)`, `shift = beta - running_mean * scale`.
    fn of(bn: &BatchNorm, channels: usize, relu: bool) -> Option<Self> {
        let host = |t: Tensor<1>| {
            t.into_data()
                .try_into_vec_as::<f32>()
                .ok()
                .filter(|v| v.len() == channels)
        };
        let gamma = host(bn.gamma.val())?;
        let beta = host(bn.beta.val())?;
        let mean = host(bn.running_mean.value())?;
        let var = host(bn.running_var.value())?;
        let scale: Vec<f32> = gamma
            .iter()
            .zip(&var)
            .map(|(g, v)| g / (v + bn.epsilon as f32).sqrt())
            .collect();
        let shift = beta
            .iter()
            .zip(&mean)
            .zip(&scale)
            .map(|((b, m), s)| b - m * s)
            .collect();
        Some(Self { scale, shift, relu })
    }

    /// Applies the affine map, the residual and ReLU to one image's `[channels, pixels]`
    /// output.
    fn apply(&self, out: &mut [f32], residual: Option<&[f32]>, pixels: usize) {
        let rows = out
            .chunks_exact_mut(pixels)
            .zip(&self.scale)
            .zip(&self.shift);
        match residual {
            Some(residual) => {
                for (((row, &scale), &shift), res) in rows.zip(residual.chunks_exact(pixels)) {
                    for (v, r) in row.iter_mut().zip(res) {
                        *v = (*v * scale + shift + r).max(0.0);
                    }
                }
            }
            None if self.relu => {
                for ((row, &scale), &shift) in rows {
                    row.iter_mut()
                        .for_each(|v| *v = (*v * scale + shift).max(0.0));
                }
            }
            None => {
                for ((row, &scale), &shift) in rows {
                    row.iter_mut().for_each(|v| *v = *v * scale + shift);
                }
            }
        }
    }
}

/// The geometry of one convolution computed as im2col + gemm.
#[derive(Clone, Copy, Debug)]
struct Im2col {
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
    /// The geometry of `conv` on `x`, if this path applies to them.
    fn for_conv(conv: &Conv2d, x: &Tensor<4>) -> Option<Self> {
        let device = x.device();
        // An autodiff device compares equal to the device it wraps: check it apart.
        if device.is_autodiff()
            || device != Device::flex()
            || x.dtype() != DType::F32
            || conv.weight.dtype() != DType::F32
        {
            return None;
        }
        if conv.groups != 1 || conv.dilation != [1, 1] || conv.bias.is_some() {
            return None;
        }
        let padding = match conv.padding {
            PaddingConfig2d::Valid => [0, 0],
            PaddingConfig2d::Explicit(top, left, bottom, right)
                if top == bottom && left == right =>
            {
                [top, left]
            }
            _ => return None,
        };
        let [batch, channels, height, width] = x.dims();
        let [out_channels, weight_channels, kh, kw] = conv.weight.dims();
        Self::new(
            [batch, channels, height, width],
            [out_channels, weight_channels, kh, kw],
            conv.stride,
            padding,
        )
    }

    /// The geometry of a convolution of an NCHW input by an OIHW weight, if consistent.
    fn new(
        input: [usize; 4],
        weight: [usize; 4],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> Option<Self> {
        let [batch, channels, height, width] = input;
        let [out_channels, weight_channels, kh, kw] = weight;
        let out = |size: usize, k: usize, s: usize, p: usize| {
            (s > 0 && size + 2 * p >= k).then(|| (size + 2 * p - k) / s + 1)
        };
        let out_height = out(height, kh, stride[0], padding[0])?;
        let out_width = out(width, kw, stride[1], padding[1])?;
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

    /// `[batch, out_channels, out_height, out_width]`.
    fn out_shape(&self) -> [usize; 4] {
        [
            self.batch,
            self.out_channels,
            self.out_height,
            self.out_width,
        ]
    }

    /// Output pixels of an image, the columns of its im2col matrix.
    fn pixels(&self) -> usize {
        self.out_height * self.out_width
    }

    /// Rows of the im2col matrix (`in_channels * kh * kw`).
    fn depth(&self) -> usize {
        self.channels * self.kernel[0] * self.kernel[1]
    }

    /// Whether the input is its own im2col matrix (1x1, stride 1, no padding).
    fn pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0, 0]
    }

    /// The output tensor, and the input tensor back from its data.
    fn finish(&self, out: Vec<f32>, input: TensorData, device: &Device) -> (Tensor<4>, Tensor<4>) {
        (
            Tensor::from_data(TensorData::new(out, self.out_shape()), device),
            Tensor::from_data(input, device),
        )
    }

    /// The convolution of `input` (NCHW) by `weight` (OIHW), NCHW, followed by `affine` and
    /// the `residual` (NCHW, the output's shape).
    fn run(
        &self,
        input: &[f32],
        weight: &[f32],
        affine: &Affine,
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        let image = self.channels * self.height * self.width;
        let pixels = self.pixels();
        let out_image = self.out_channels * pixels;
        assert_eq!(input.len(), self.batch * image, "input of {self:?}");
        assert_eq!(weight.len(), self.out_channels * self.depth(), "weight");
        if let Some(residual) = residual {
            assert_eq!(
                residual.len(),
                self.batch * out_image,
                "residual of {self:?}"
            );
        }
        // The residual of image `i`, if any.
        let residual_of = |i: usize| residual.map(|r| &r[i * out_image..(i + 1) * out_image]);
        let mut out = vec![0f32; self.batch * out_image];
        let columns = if self.pointwise() {
            0
        } else {
            self.depth() * pixels
        };
        if self.batch >= rayon::current_num_threads() {
            // Images in parallel, one single-threaded product each.
            out.par_chunks_mut(out_image)
                .zip(input.par_chunks(image))
                .enumerate()
                .for_each_init(
                    || vec![0f32; columns],
                    |col, (i, (out, x))| {
                        self.image(x, weight, col, out, gemm::Parallelism::None);
                        affine.apply(out, residual_of(i), pixels);
                    },
                );
        } else {
            // Too few images to share: the product of each one is parallel.
            let mut col = vec![0f32; columns];
            for (i, (out, x)) in out
                .chunks_mut(out_image)
                .zip(input.chunks(image))
                .enumerate()
            {
                self.image(x, weight, &mut col, out, gemm::Parallelism::Rayon(0));
                affine.apply(out, residual_of(i), pixels);
            }
        }
        out
    }

    /// One image: `out = weight x im2col(x)`.
    fn image(
        &self,
        x: &[f32],
        weight: &[f32],
        col: &mut [f32],
        out: &mut [f32],
        parallelism: gemm::Parallelism,
    ) {
        let pixels = self.pixels();
        let depth = self.depth();
        let rhs: &[f32] = if self.pointwise() {
            x
        } else {
            self.fill(x, col);
            col
        };
        assert_eq!(rhs.len(), depth * pixels, "im2col of {self:?}");
        assert_eq!(out.len(), self.out_channels * pixels, "output of {self:?}");
        // SAFETY: `out` is `out_channels x pixels`, `weight` is `out_channels x depth` and
        // `rhs` is `depth x pixels`, all row-major and contiguous (the lengths are checked
        // above), so every index the product touches is in bounds.
        unsafe {
            gemm::gemm(
                self.out_channels,
                pixels,
                depth,
                out.as_mut_ptr(),
                1,
                pixels as isize,
                false,
                weight.as_ptr(),
                1,
                depth as isize,
                rhs.as_ptr(),
                1,
                pixels as isize,
                0.0,
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
        let [kh, kw] = self.kernel;
        let [sy, sx] = self.stride;
        let [py, px] = self.padding;
        let (w, ow) = (self.width, self.out_width);
        for (r, row) in col.chunks_exact_mut(self.pixels()).enumerate() {
            let (c, i, j) = (r / (kh * kw), r / kw % kh, r % kw);
            let plane = &x[c * self.height * w..(c + 1) * self.height * w];
            // Output columns whose input column `ox * sx + j - px` is inside the image.
            let first = px.saturating_sub(j).div_ceil(sx);
            let end = ((w + px).saturating_sub(j)).div_ceil(sx).min(ow);
            for (oy, dst) in row.chunks_exact_mut(ow).enumerate() {
                let iy = (oy * sy + i).wrapping_sub(py);
                if iy >= self.height || first >= end {
                    dst.fill(0.0);
                    continue;
                }
                let src = &plane[iy * w..(iy + 1) * w];
                dst[..first].fill(0.0);
                dst[end..].fill(0.0);
                let start = first * sx + j - px;
                if sx == 1 {
                    dst[first..end].copy_from_slice(&src[start..start + end - first]);
                } else {
                    for (d, s) in dst[first..end]
                        .iter_mut()
                        .zip(src[start..].iter().step_by(sx))
                    {
                        *d = *s;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::{Param, RunningState};
    use burn::nn::BatchNormConfig;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::Distribution;
    use burn::tensor::activation::relu;

    /// A BatchNorm with random statistics and affine parameters.
    fn batch_norm(channels: usize, device: &Device) -> BatchNorm {
        let random = |low: f64, high: f64| {
            Tensor::<1>::random([channels], Distribution::Uniform(low, high), device)
        };
        let mut bn = BatchNormConfig::new(channels).init(device);
        bn.gamma = Param::from_tensor(random(0.5, 1.5));
        bn.beta = Param::from_tensor(random(-0.5, 0.5));
        bn.running_mean = RunningState::new(random(-0.5, 0.5));
        bn.running_var = RunningState::new(random(0.5, 2.0));
        bn
    }

    /// The fast path against Burn's convolution and BatchNorm, for every geometry ResNet
    /// uses, with and without ReLU.
    #[test]
    fn matches_burns_convolution_and_batch_norm() {
        let device = Device::flex();
        let cases = [
            // batch, in, out, kernel, stride, padding, side
            (4, 8, 16, 3, 1, 1, 9),  // ResNet's 3x3
            (4, 8, 16, 3, 2, 1, 9),  // stride 2, odd side
            (3, 8, 16, 3, 2, 1, 8),  // stride 2, even side
            (2, 3, 8, 7, 2, 3, 21),  // ImageNet stem
            (1, 3, 8, 3, 1, 1, 6),   // CIFAR stem, a single image
            (5, 16, 8, 1, 1, 0, 5),  // pointwise
            (5, 16, 32, 1, 2, 0, 7), // downsampling
            (2, 4, 4, 3, 1, 0, 3),   // no padding, one output pixel
        ];
        for (batch, channels, out, kernel, stride, padding, side) in cases {
            let conv = Conv2dConfig::new([channels, out], [kernel, kernel])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(
                    padding, padding, padding, padding,
                ))
                .with_bias(false)
                .init(&device);
            let bn = batch_norm(out, &device);
            let x = Tensor::<4>::random(
                [batch, channels, side, side],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            assert!(Im2col::for_conv(&conv, &x).is_some());
            let reference = bn.forward(conv.forward(x.clone()));
            let residual = Tensor::<4>::random(reference.dims(), Distribution::Default, &device);
            let expected = [
                reference.clone(),
                relu(reference.clone()),
                relu(reference + residual.clone()),
            ];
            let inputs = [(false, None), (true, None), (false, Some(residual))];
            for (expected, (relu, residual)) in expected.into_iter().zip(inputs) {
                let what = format!(
                    "{kernel}x{kernel} stride {stride} padding {padding} relu {relu} residual {}",
                    residual.is_some()
                );
                let Ok((got, input)) = fused(&conv, &bn, x.clone(), relu, residual) else {
                    panic!("{what}: the fast path does not apply");
                };
                assert_eq!(got.dims(), expected.dims());
                let difference: f32 = (got - expected).abs().max().into_scalar();
                assert!(difference < 1e-4, "{what}: {difference}");
                let unchanged: f32 = (input - x.clone()).abs().max().into_scalar();
                assert_eq!(unchanged, 0.0, "{what}: the input came back changed");
            }
        }
    }

    #[test]
    fn other_convolutions_keep_burns_path() {
        let device = Device::flex();
        let x = Tensor::<4>::zeros([1, 4, 8, 8], &device);
        let grouped = Conv2dConfig::new([4, 4], [3, 3])
            .with_groups(2)
            .init(&device);
        let dilated = Conv2dConfig::new([4, 4], [3, 3])
            .with_dilation([2, 2])
            .init(&device);
        let biased = Conv2dConfig::new([4, 4], [3, 3]).init(&device);
        for conv in [grouped, dilated, biased] {
            assert!(Im2col::for_conv(&conv, &x).is_none());
        }
    }
}
