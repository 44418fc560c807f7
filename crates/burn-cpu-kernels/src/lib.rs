//! # burn-cpu-kernels
//!
//! Fast convolutional-network operations for [Burn](https://burn.dev)'s CPU backends, flex
//! and ndarray, for any model: each entry point takes Burn's modules and tensors, computes with
//! this crate's kernels where they apply and with Burn's operations everywhere else (other
//! backends, dtypes or geometries), so a model calls it without asking which device it is on.
//!
//! ```
//! use burn::nn::conv::Conv2dConfig;
//! use burn::nn::{BatchNormConfig, PaddingConfig2d};
//! use burn::tensor::{Device, Tensor};
//! use burn_cpu_kernels::{Epilogue, conv_batch_norm};
//!
//! let device = Device::flex();
//! let conv = Conv2dConfig::new([16, 32], [3, 3])
//!     .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
//!     .with_bias(false)
//!     .init(&device);
//! let bn = BatchNormConfig::new(32).init(&device);
//! let x = Tensor::<4>::ones([2, 16, 8, 8], &device);
//! // relu(bn(conv(x))), in one pass over each image's output in inference.
//! let y = conv_batch_norm(&conv, &bn, x, Epilogue::Relu);
//! assert_eq!(y.dims(), [2, 32, 8, 8]);
//! ```
//!
//! ## Entry points
//! - [`conv2d`] (and [`conv2d_with`], which names the [`ConvAlgorithm`]): a 2-d convolution,
//!   forward and backward.
//! - [`conv_batch_norm`]: a convolution, BatchNorm and an [`Epilogue`] (ReLU, or a residual
//!   add then ReLU): fused into one pass in inference.
//! - [`conv2d_in`], [`conv_batch_norm_in`]: the same with the products in a
//!   [`ConvPrecision`]: bf16 operands and f32 sums, as PyTorch's CPU autocast, on CPUs with
//!   AVX512-BF16 ([`bf16_supported`]).
//! - [`batch_norm`]: BatchNorm as PyTorch's `BatchNorm2d` computes it, in training too.
//! - [`max_pool2d`]: max pooling, in inference.
//! - [`is_accelerated`]: whether a device runs these kernels.
//!
//! ## How
//! Each image's convolution is one matrix product (im2col, built from NCHW rows with plain
//! copies, times the weight as it is) with the `gemm` crate that flex uses too (its AVX-512
//! kernels built, chosen at run time where the CPU has them), images in parallel on rayon's
//! pool; the backward is the two transposed products and col2im, several small images side by
//! side. A 3x3 convolution of stride 1 and padding 1 with enough channels
//! and pixels goes through Winograd's minimal filtering instead, forward and backward:
//! F(2x2, 3x3), which takes 2.25 times fewer multiplications, and on images of 8x8 or more
//! F(4x4, 3x3) in the forward and the input's gradient, 4 times fewer.
//!
//! In inference the BatchNorm (running statistics), residual and ReLU after a convolution are
//! applied to each output channel while it is in cache. In training the convolution and
//! BatchNorm are Burn backend extensions with their own backward steps: BatchNorm takes three
//! passes over the activation forward and two backward, where Burn's generic one copies it and
//! makes about ten.
//!
//! The kernels take ungrouped, undilated, bias-free f32 convolutions with symmetric padding and
//! f32 BatchNorm on `Device::flex()` and `Device::ndarray()`, with or without autodiff.
//!
//! ## Features
//! `flex` and `ndarray` turn on the kernels for each backend (and the backend itself in Burn,
//! with its SIMD and thread features). Without either, every entry point is Burn's operation.

#![warn(missing_docs)]

#[cfg(all(target_arch = "x86_64", any(feature = "flex", feature = "ndarray")))]
mod bf16;
#[cfg(any(feature = "flex", feature = "ndarray"))]
mod extension;
#[cfg(any(feature = "flex", feature = "ndarray"))]
mod geometry;
#[cfg(any(feature = "flex", feature = "ndarray"))]
mod im2col;
#[cfg(any(feature = "flex", feature = "ndarray"))]
mod matmul;
#[cfg(any(feature = "flex", feature = "ndarray"))]
mod norm;
#[cfg(any(feature = "flex", feature = "ndarray"))]
mod pool;
#[cfg(any(feature = "flex", feature = "ndarray"))]
mod scratch;
#[cfg(any(feature = "flex", feature = "ndarray"))]
mod simd;
#[cfg(all(test, any(feature = "flex", feature = "ndarray")))]
mod testing;
#[cfg(any(feature = "flex", feature = "ndarray"))]
mod winograd;

use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::tensor::Tensor;
use burn::tensor::activation::relu;
use burn::tensor::module::BatchNormTrainOutput;
#[cfg(any(feature = "flex", feature = "ndarray"))]
use burn::{
    backend::Dispatch,
    tensor::{DType, Device},
};

#[cfg(any(feature = "flex", feature = "ndarray"))]
use extension::{CpuInference, CpuTraining};
#[cfg(any(feature = "flex", feature = "ndarray"))]
use im2col::Im2col;
#[cfg(any(feature = "flex", feature = "ndarray"))]
use norm::Planes;
#[cfg(any(feature = "flex", feature = "ndarray"))]
use pool::MaxPool;

/// How [`conv2d_with`] computes a convolution where this crate's kernels apply.
///
/// Every algorithm gives the same convolution to float rounding: relative to the output's
/// largest magnitude, im2col and F(2x2, 3x3) stay within 1e-5 of an exact result and
/// F(4x4, 3x3) within 1e-4 (it rounds 7 to 9 times as much as F(2x2, 3x3); measured by the
/// tests in `src/winograd.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConvAlgorithm {
    /// The fastest for the geometry, by the heuristics in `src/im2col.rs` (the `kernels`
    /// bench of this crate times the algorithms against each other).
    #[default]
    Auto,
    /// im2col and one matrix product an image, for every geometry.
    Im2col,
    /// Winograd's F(2x2, 3x3) for 3x3 convolutions of stride 1 and padding 1, im2col for
    /// the others.
    WinogradF2,
    /// Winograd's F(4x4, 3x3) for 3x3 convolutions of stride 1 and padding 1 in the forward
    /// and the input's gradient (the weight's gradient stays F(2x2, 3x3)'s), im2col for the
    /// others.
    WinogradF4,
}

/// The type a convolution's matrix products read their operands in; they sum in f32 either
/// way, and the input, the weight and the output stay f32 tensors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConvPrecision {
    /// f32 operands.
    #[default]
    F32,
    /// Operands rounded to bf16 (to nearest, ties to even) as they are packed for the
    /// product, as PyTorch's CPU autocast computes a convolution in `torch.bfloat16`, with
    /// AVX512-BF16's `vdpbf16ps` at twice f32's multiplications a cycle. Where the CPU lacks
    /// AVX512-BF16 ([`bf16_supported`] is false) the products are f32.
    Bf16,
}

/// Whether this CPU computes [`ConvPrecision::Bf16`] products in bf16 (it has AVX512-BF16).
pub fn bf16_supported() -> bool {
    #[cfg(all(target_arch = "x86_64", any(feature = "flex", feature = "ndarray")))]
    return bf16::supported();
    #[cfg(not(all(target_arch = "x86_64", any(feature = "flex", feature = "ndarray"))))]
    false
}

/// How a convolution is computed where the kernels apply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct ConvPlan {
    algorithm: ConvAlgorithm,
    precision: ConvPrecision,
}

/// What follows BatchNorm in [`conv_batch_norm`].
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // passed by value once a call; boxing would allocate
pub enum Epilogue {
    /// Nothing: `bn(conv(x))`.
    None,
    /// `relu(bn(conv(x)))`.
    Relu,
    /// `relu(bn(conv(x)) + residual)`, the end of a residual block; the residual has the
    /// output's shape.
    AddRelu(Tensor<4>),
}

impl Epilogue {
    /// Applies the epilogue to `x` with Burn's operations.
    pub fn apply(self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Epilogue::None => x,
            Epilogue::Relu => relu(x),
            Epilogue::AddRelu(residual) => relu(x + residual),
        }
    }
}

/// Whether `device` runs this crate's kernels: flex or ndarray, with or without autodiff,
/// where the matching feature is on.
#[allow(deprecated)] // Burn 0.22 deprecates ndarray; this crate still supports it.
pub fn is_accelerated(device: &burn::tensor::Device) -> bool {
    // An autodiff device compares equal to the device it wraps.
    #[cfg(feature = "flex")]
    if *device == Device::flex() {
        return true;
    }
    #[cfg(feature = "ndarray")]
    if *device == Device::ndarray() {
        return true;
    }
    let _ = device;
    false
}

/// The im2col geometry of `conv` on `x`, if the kernels compute it: f32 on an accelerated
/// device, ungrouped, undilated, bias-free, symmetrically padded.
#[cfg(any(feature = "flex", feature = "ndarray"))]
fn applies(conv: &Conv2d, x: &Tensor<4>) -> Option<Im2col> {
    if !is_accelerated(&x.device()) || x.dtype() != DType::F32 || conv.weight.dtype() != DType::F32
    {
        return None;
    }
    Im2col::for_conv(conv, x.dims(), geometry::symmetric_padding(&conv.padding)?)
}

/// `conv.forward(x)`, by [`ConvAlgorithm::Auto`]: `[batch, in, H, W] -> [batch, out, H', W']`.
///
/// ```
/// use burn::nn::conv::Conv2dConfig;
/// use burn::nn::PaddingConfig2d;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let conv = Conv2dConfig::new([3, 8], [3, 3])
///     .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
///     .with_bias(false)
///     .init(&device);
/// let x = Tensor::<4>::ones([2, 3, 16, 16], &device);
/// let ours = burn_cpu_kernels::conv2d(&conv, x.clone());
/// let burns = conv.forward(x);
/// assert!(ours.sub(burns).abs().max().into_scalar::<f32>() < 1e-4);
/// ```
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    conv2d_with(conv, x, ConvAlgorithm::Auto)
}

/// `conv.forward(x)` by `algorithm` where the kernels apply (with their own backward step on an
/// autodiff device), else Burn's convolution.
pub fn conv2d_with(conv: &Conv2d, x: Tensor<4>, algorithm: ConvAlgorithm) -> Tensor<4> {
    let plan = ConvPlan {
        algorithm,
        precision: ConvPrecision::F32,
    };
    planned_conv2d(conv, x, plan)
}

/// `conv.forward(x)` with its products in `precision` where the kernels apply (with their own
/// backward step, in the same precision, on an autodiff device), else Burn's convolution.
pub fn conv2d_in(conv: &Conv2d, x: Tensor<4>, precision: ConvPrecision) -> Tensor<4> {
    let plan = ConvPlan {
        algorithm: ConvAlgorithm::Auto,
        precision,
    };
    planned_conv2d(conv, x, plan)
}

/// `conv.forward(x)` as `plan` says where the kernels apply, else Burn's convolution.
fn planned_conv2d(conv: &Conv2d, x: Tensor<4>, plan: ConvPlan) -> Tensor<4> {
    #[cfg(any(feature = "flex", feature = "ndarray"))]
    if let Some(geometry) = applies(conv, &x) {
        return Tensor::from_dispatch(<Dispatch as CpuTraining>::host_conv2d(
            x.into_dispatch(),
            conv.weight.val().into_dispatch(),
            geometry.stride(),
            geometry.padding(),
            plan,
        ));
    }
    let _ = plan;
    conv.forward(x)
}

/// `epilogue(bn(conv(x)))`: `[batch, in, H, W] -> [batch, out, H', W']`.
///
/// In inference (a device without autodiff) on an accelerated device, BatchNorm with its
/// running statistics, the residual and ReLU are applied to each image's output right after
/// its product, in one pass. Elsewhere it is [`conv2d`], [`batch_norm`] and the epilogue.
pub fn conv_batch_norm(
    conv: &Conv2d,
    bn: &BatchNorm,
    x: Tensor<4>,
    epilogue: Epilogue,
) -> Tensor<4> {
    conv_batch_norm_in(conv, bn, x, epilogue, ConvPrecision::F32)
}

/// [`conv_batch_norm`] with the convolution's products in `precision` (BatchNorm and the
/// epilogue in f32).
pub fn conv_batch_norm_in(
    conv: &Conv2d,
    bn: &BatchNorm,
    x: Tensor<4>,
    epilogue: Epilogue,
    precision: ConvPrecision,
) -> Tensor<4> {
    let plan = ConvPlan {
        algorithm: ConvAlgorithm::Auto,
        precision,
    };
    #[cfg(any(feature = "flex", feature = "ndarray"))]
    if let Some(out) = fused(conv, bn, &x, &epilogue, plan) {
        return out;
    }
    epilogue.apply(batch_norm(bn, planned_conv2d(conv, x, plan)))
}

/// [`conv_batch_norm`] in one pass where it applies; `None` where it does not.
///
/// The tensors are read where they are (a clone of a flex tensor shares its storage).
#[cfg(any(feature = "flex", feature = "ndarray"))]
fn fused(
    conv: &Conv2d,
    bn: &BatchNorm,
    x: &Tensor<4>,
    epilogue: &Epilogue,
    plan: ConvPlan,
) -> Option<Tensor<4>> {
    let inference = !x.device().is_autodiff();
    let im2col = applies(conv, x).filter(|_| inference)?;
    let residual_ok = match epilogue {
        Epilogue::AddRelu(r) => r.dims() == im2col.out_shape() && r.dtype() == DType::F32,
        _ => true,
    };
    let relu = !matches!(epilogue, Epilogue::None);
    let affine = Affine::of(bn, im2col.out_channels(), relu).filter(|_| residual_ok)?;
    let (x, weight) = (x.clone().into_dispatch(), conv.weight.val().into_dispatch());
    let (stride, padding) = (im2col.stride(), im2col.padding());
    Some(Tensor::from_dispatch(match epilogue {
        Epilogue::AddRelu(residual) => <Dispatch as CpuInference>::host_conv2d_affine_residual(
            x,
            weight,
            residual.clone().into_dispatch(),
            stride,
            padding,
            affine,
            plan,
        ),
        _ => {
            <Dispatch as CpuInference>::host_conv2d_affine(x, weight, stride, padding, affine, plan)
        }
    }))
}

/// `bn.forward(x)` as PyTorch's `BatchNorm2d` computes it.
///
/// In training (Burn's rule: an autodiff device and a module not frozen) the output is
/// normalized with the batch's statistics and the running statistics move toward the batch's
/// mean and its *unbiased* variance, as PyTorch's do (Burn's module takes the biased one). On
/// an accelerated device the training pass is this crate's kernel, with its own backward step.
/// In inference it is Burn's module, with the running statistics.
// Without a CPU backend the kernel's result is a literal `None`.
#[cfg_attr(
    not(any(feature = "flex", feature = "ndarray")),
    allow(clippy::unnecessary_literal_unwrap)
)]
pub fn batch_norm(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    if !(x.device().is_autodiff() && bn.training.is_enabled()) {
        return bn.forward(x);
    }
    let [batch, _, height, width] = x.dims();
    #[cfg(any(feature = "flex", feature = "ndarray"))]
    let train = batch_norm_train(bn, &x);
    #[cfg(not(any(feature = "flex", feature = "ndarray")))]
    let train = None;
    let BatchNormTrainOutput {
        output,
        mean,
        variance,
    } = train.unwrap_or_else(|| {
        burn::tensor::module::batch_norm_train(x, bn.gamma.val(), bn.beta.val(), bn.epsilon)
    });
    // The unbiased variance of the `count` values each channel's statistics are taken over
    // (a single value, which PyTorch refuses in training, keeps its variance of 0).
    let count = (batch * height * width) as f64;
    let unbiased = variance.mul_scalar(count / (count - 1.0).max(1.0));
    for (running, batch) in [(&bn.running_mean, mean), (&bn.running_var, unbiased)] {
        let value = running
            .value_sync()
            .to_device(&batch.device())
            .mul_scalar(1.0 - bn.momentum)
            .add(batch.mul_scalar(bn.momentum));
        running.update(value.detach());
    }
    output
}

/// `bn(x)` in training through [`CpuTraining`]: the output, and the batch's mean and biased
/// variance, as Burn's `batch_norm_train` returns them (the caller updates the running
/// statistics); `None` where it does not apply: in inference, on other backends, for a frozen
/// BatchNorm (which Burn's module runs with its running statistics), for other dtypes than f32
/// and for inputs without values.
#[cfg(any(feature = "flex", feature = "ndarray"))]
fn batch_norm_train(bn: &BatchNorm, x: &Tensor<4>) -> Option<BatchNormTrainOutput<4>> {
    let device = x.device();
    // Burn's rule for the training path: an autodiff device and a layer not frozen.
    let training = device.is_autodiff() && bn.training.is_enabled();
    let (gamma, beta) = (bn.gamma.val(), bn.beta.val());
    let applies = training
        && is_accelerated(&device)
        && [x.dtype(), gamma.dtype(), beta.dtype()] == [DType::F32; 3]
        && x.dims()[1] == gamma.dims()[0]
        && Planes::new(x.dims()).is_some();
    if !applies {
        return None;
    }
    let (output, mean, variance) = <Dispatch as CpuTraining>::batch_norm_train_planes(
        x.clone().into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        bn.epsilon,
    );
    Some(BatchNormTrainOutput {
        output: Tensor::from_dispatch(output),
        mean: Tensor::<1>::from_dispatch(mean).detach(),
        variance: Tensor::<1>::from_dispatch(variance).detach(),
    })
}

/// `pool.forward(x)`; in inference on an accelerated device through this crate's kernel where
/// it applies (f32, no dilation, floor rounding, symmetric padding), else Burn's.
pub fn max_pool2d(pool: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
    #[cfg(any(feature = "flex", feature = "ndarray"))]
    {
        let inference = is_accelerated(&x.device()) && !x.device().is_autodiff();
        let geometry = geometry::symmetric_padding(&pool.padding)
            .filter(|_| {
                inference && x.dtype() == DType::F32 && pool.dilation == [1, 1] && !pool.ceil_mode
            })
            .and_then(|padding| MaxPool::new(x.dims(), pool.kernel_size, pool.stride, padding));
        if let Some(geometry) = geometry {
            return Tensor::from_dispatch(<Dispatch as CpuInference>::max_pool2d_planes(
                x.into_dispatch(),
                geometry.kernel(),
                geometry.stride(),
                geometry.padding(),
            ));
        }
    }
    pool.forward(x)
}

#[cfg(any(feature = "flex", feature = "ndarray"))]
/// BatchNorm in evaluation as a per-channel `x * scale + shift`, then ReLU if `relu`.
#[derive(Clone, Debug)]
pub(crate) struct Affine {
    scale: Vec<f32>,
    shift: Vec<f32>,
    relu: bool,
    simd: simd::Simd,
}

#[cfg(any(feature = "flex", feature = "ndarray"))]
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
        let simd = simd::Simd::detect();
        Some(Self {
            scale,
            shift,
            relu,
            simd,
        })
    }

    /// Applies the affine map, the residual and ReLU to one image's `[channels, pixels]`
    /// output.
    pub(crate) fn apply(&self, out: &mut [f32], residual: Option<&[f32]>, pixels: usize) {
        simd::dispatch!(self.simd, Affine::apply_rows(
            affine: &Affine = self,
            out: &mut [f32] = out,
            residual: Option<&[f32]> = residual,
            pixels: usize = pixels,
        ) -> ())
    }

    /// [`Self::apply`], compiled where it is inlined.
    #[inline(always)]
    fn apply_rows(&self, out: &mut [f32], residual: Option<&[f32]>, pixels: usize) {
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

#[cfg(all(test, any(feature = "flex", feature = "ndarray")))]
mod tests {
    use super::*;
    use crate::testing::{host_devices, relative_difference, seeded_normal};
    use burn::module::{Param, RunningState};
    use burn::nn::conv::Conv2dConfig;
    use burn::nn::pool::MaxPool2dConfig;
    use burn::nn::{BatchNormConfig, PaddingConfig2d};
    use burn::tensor::activation::relu;
    use burn::tensor::{Distribution, TensorData};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// Values drawn uniformly from `low..high` with the generator `rng`.
    fn uniform<const D: usize>(
        dims: [usize; D],
        (low, high): (f64, f64),
        rng: &mut StdRng,
        device: &Device,
    ) -> Tensor<D> {
        let data = TensorData::random::<f32, _, _>(dims, Distribution::Uniform(low, high), rng);
        Tensor::from_data(data, device)
    }

    /// A BatchNorm with random statistics and affine parameters, drawn from `seed`.
    fn batch_norm(channels: usize, seed: u64, device: &Device) -> BatchNorm {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut random = |low, high| uniform([channels], (low, high), &mut rng, device);
        let mut bn = BatchNormConfig::new(channels).init(device);
        bn.gamma = Param::from_tensor(random(0.5, 1.5));
        bn.beta = Param::from_tensor(random(-0.5, 0.5));
        bn.running_mean = RunningState::new(random(-0.5, 0.5));
        bn.running_var = RunningState::new(random(0.5, 2.0));
        bn
    }

    /// Every geometry of a residual network: batch, in, out, kernel, stride, padding, side.
    const CASES: [(usize, usize, usize, usize, usize, usize, usize); 9] = [
        (4, 8, 16, 3, 1, 1, 9),   // 3x3, by im2col (few channels)
        (5, 16, 24, 3, 1, 1, 15), // 3x3, by Winograd (odd side)
        (4, 8, 16, 3, 2, 1, 9),   // stride 2, odd side
        (3, 8, 16, 3, 2, 1, 8),   // stride 2, even side
        (2, 3, 8, 7, 2, 3, 21),   // ImageNet stem
        (1, 3, 8, 3, 1, 1, 6),    // CIFAR stem, a single image
        (5, 16, 8, 1, 1, 0, 5),   // pointwise, images shared unevenly between threads
        (5, 16, 32, 1, 2, 0, 7),  // downsampling
        (2, 4, 4, 3, 1, 0, 3),    // no padding, one output pixel
    ];

    /// A convolution with random weights for `case`, and a random input for it.
    fn convolution(
        (batch, channels, out, kernel, stride, padding, side): (
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
        ),
        device: &Device,
    ) -> (Conv2d, Tensor<4>) {
        let conv = Conv2dConfig::new([channels, out], [kernel, kernel])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(
                padding, padding, padding, padding,
            ))
            .with_bias(false)
            .init(device);
        let x = Tensor::<4>::random(
            [batch, channels, side, side],
            Distribution::Normal(0.0, 1.0),
            device,
        );
        (conv, x)
    }

    /// In training, the output and both gradients against Burn's convolution and its
    /// autodiff backward, for every geometry.
    #[test]
    fn training_matches_burns_convolution_and_gradients() {
        for device in host_devices() {
            let device = device.autodiff();
            for case @ (_, _, _, kernel, stride, padding, _) in CASES {
                let what = format!("{kernel}x{kernel} stride {stride} padding {padding} {case:?}");
                let (reference, x) = convolution(case, &device);
                assert!(applies(&reference, &x).is_some(), "{what}");
                let ours = reference.clone();
                let x_ours = x.clone().detach().require_grad();
                let x_reference = x.detach().require_grad();
                let out_ours = conv2d(&ours, x_ours.clone());
                let out_reference = reference.forward(x_reference.clone());
                // A loss whose gradient differs at every output position.
                let weights =
                    Tensor::<4>::random(out_reference.dims(), Distribution::Default, &device);
                let grads_ours = (out_ours.clone() * weights.clone()).sum().backward();
                let grads_reference = (out_reference.clone() * weights).sum().backward();

                let difference = relative_difference(out_ours, out_reference);
                assert!(difference < 1e-5, "{what}: output {difference}");
                let x_grad = |x: &Tensor<4>, grads| x.grad(grads).expect("the input's gradient");
                let difference = relative_difference(
                    x_grad(&x_ours, &grads_ours),
                    x_grad(&x_reference, &grads_reference),
                );
                assert!(difference < 1e-5, "{what}: input gradient {difference}");
                let weight_grad =
                    |conv: &Conv2d, grads| conv.weight.grad(grads).expect("the weight's gradient");
                let difference = relative_difference(
                    weight_grad(&ours, &grads_ours),
                    weight_grad(&reference, &grads_reference),
                );
                assert!(difference < 1e-5, "{what}: weight gradient {difference}");
            }
        }
    }

    /// bf16 products in training: the output and both gradients within bf16's rounding of
    /// Burn's f32 convolution, for every geometry; and, where the CPU has AVX512-BF16, not
    /// the f32 products' values (the bf16 path ran). Measured: at most 6e-3 of the largest
    /// magnitude (bf16 keeps 8 significant bits: 2^-9 = 2e-3 a rounding).
    #[test]
    fn bf16_training_is_within_bf16_rounding_of_burns() {
        for device in host_devices() {
            let device = device.autodiff();
            let mut largest = 0f32;
            for case in CASES {
                let (conv, x) = convolution(case, &device);
                let x_ours = x.clone().detach().require_grad();
                let x_reference = x.detach().require_grad();
                let out_ours = conv2d_in(&conv, x_ours.clone(), ConvPrecision::Bf16);
                let out_f32 = conv2d(&conv, x_ours.clone());
                let out_reference = conv.forward(x_reference.clone());
                let weights =
                    Tensor::<4>::random(out_reference.dims(), Distribution::Default, &device);
                let grads_ours = (out_ours.clone() * weights.clone()).sum().backward();
                let grads_reference = (out_reference.clone() * weights).sum().backward();
                let x_grad = |x: &Tensor<4>, grads| x.grad(grads).expect("the input's gradient");
                let weight_grad = |grads| conv.weight.grad(grads).expect("the weight's gradient");
                let differences = [
                    relative_difference(out_ours.clone(), out_reference),
                    relative_difference(
                        x_grad(&x_ours, &grads_ours),
                        x_grad(&x_reference, &grads_reference),
                    ),
                    relative_difference(weight_grad(&grads_ours), weight_grad(&grads_reference)),
                ];
                for (what, difference) in ["output", "input gradient", "weight gradient"]
                    .into_iter()
                    .zip(differences)
                {
                    assert!(difference < 1e-2, "{case:?}: {what} {difference}");
                    largest = largest.max(difference);
                }
                if bf16_supported() {
                    let from_f32 = relative_difference(out_ours, out_f32);
                    assert!(from_f32 > 1e-5, "{case:?}: bf16 products gave f32's values");
                }
            }
            println!("{device:?}: largest difference {largest:e}");
        }
    }

    /// The fast path against Burn's convolution and BatchNorm, for every geometry of a
    /// residual network, with and without ReLU.
    #[test]
    fn matches_burns_convolution_and_batch_norm() {
        for device in host_devices() {
            for (seed, case @ (_, _, out, kernel, stride, padding, _)) in (0..).zip(CASES) {
                let (conv, x) = convolution(case, &device);
                let bn = batch_norm(out, seed, &device);
                let original = x.to_data();
                assert!(applies(&conv, &x).is_some());
                let reference = bn.forward(conv.forward(x.clone()));
                let residual =
                    Tensor::<4>::random(reference.dims(), Distribution::Default, &device);
                let expected = [
                    reference.clone(),
                    relu(reference.clone()),
                    relu(reference + residual.clone()),
                ];
                let epilogues = [Epilogue::None, Epilogue::Relu, Epilogue::AddRelu(residual)];
                for (expected, epilogue) in expected.into_iter().zip(epilogues) {
                    let what =
                        format!("{kernel}x{kernel} stride {stride} padding {padding} {epilogue:?}");
                    let Some(got) = fused(&conv, &bn, &x, &epilogue, ConvPlan::default()) else {
                        panic!("{what}: the fast path does not apply");
                    };
                    assert_eq!(got.dims(), expected.dims());
                    let difference: f32 = (got - expected).abs().max().into_scalar();
                    assert!(difference < 1e-4, "{what}: {difference}");
                    // The input is read in place, never written.
                    x.to_data().assert_eq(&original, true);
                }
            }
        }
    }

    /// In training, BatchNorm's output, the gradients of its input, gamma and beta, and the
    /// batch's mean and variance, against Burn's module, its `batch_norm_train` and its
    /// autodiff backward.
    ///
    /// The values are seeded, the same on every run. Burn sums in f32, and with 3 values a
    /// channel the input's gradient cancels: drawn from Burn's shared generator, whose draws
    /// depend on the other tests, one run differed from ours by 1.5e-5 of the largest value
    /// (in CI), where 300 seeds of these draws stayed within 9.3e-6. Hence 2e-5.
    #[test]
    fn training_batch_norm_matches_burns() {
        for device in host_devices() {
            let plain = device.clone();
            let device = device.autodiff();
            // batch, channels, side: lanes and a remainder, one pixel, a single image.
            let cases = [(4, 8, 9), (2, 16, 4), (3, 5, 1), (1, 3, 7)];
            for (seed, (batch, channels, side)) in (0..).zip(cases) {
                let what = format!("batch {batch} channels {channels} side {side}");
                let reference = batch_norm(channels, seed, &device);
                // A second module with the same values (a clone would share the running
                // statistics).
                let mut ours = BatchNormConfig::new(channels).init(&device);
                ours.gamma = Param::from_tensor(reference.gamma.val().detach());
                ours.beta = Param::from_tensor(reference.beta.val().detach());
                ours.running_mean = RunningState::new(reference.running_mean.value());
                ours.running_var = RunningState::new(reference.running_var.value());
                let x = seeded_normal([batch, channels, side, side], seed, &device) * 2.0 + 1.0;
                let x_ours = x.clone().detach().require_grad();
                let x_reference = x.detach().require_grad();
                let Some(trained) = batch_norm_train(&ours, &x_ours) else {
                    panic!("{what}: the host BatchNorm does not apply");
                };
                let out_ours = trained.output;
                let out_reference = reference.forward(x_reference.clone());
                let statistics = burn::tensor::module::batch_norm_train(
                    x_reference.clone(),
                    reference.gamma.val(),
                    reference.beta.val(),
                    reference.epsilon,
                );
                let mut rng = StdRng::seed_from_u64(seed);
                let weights = uniform(out_reference.dims(), (0.0, 1.0), &mut rng, &device);
                let grads_ours = (out_ours.clone() * weights.clone()).sum().backward();
                let grads_reference = (out_reference.clone() * weights).sum().backward();

                let close = |part: &str| {
                    let what = format!("{what}: {part}");
                    move |difference: f32| assert!(difference < 2e-5, "{what} {difference}")
                };
                close("output")(relative_difference(out_ours, out_reference));
                let x_grad = |x: &Tensor<4>, grads| x.grad(grads).expect("the input's gradient");
                close("input gradient")(relative_difference(
                    x_grad(&x_ours, &grads_ours),
                    x_grad(&x_reference, &grads_reference),
                ));
                let grad = |param: &Param<Tensor<1>>, grads| param.grad(grads).expect("gradient");
                for (part, ours, reference) in [
                    ("gamma gradient", &ours.gamma, &reference.gamma),
                    ("beta gradient", &ours.beta, &reference.beta),
                ] {
                    close(part)(relative_difference(
                        grad(ours, &grads_ours),
                        grad(reference, &grads_reference),
                    ));
                }
                close("mean")(relative_difference(trained.mean, statistics.mean));
                close("variance")(relative_difference(trained.variance, statistics.variance));
                // In inference Burn's module runs, with the running statistics.
                let inference = batch_norm(channels, seed, &plain);
                let x = Tensor::<4>::zeros([batch, channels, side, side], &plain);
                assert!(batch_norm_train(&inference, &x).is_none(), "{what}");
            }
        }
    }

    /// Max pooling against Burn's: the ImageNet stem's 3x3 stride 2 with padding 1 on even
    /// and odd sides, a window wider than the stride, and no padding.
    #[test]
    fn max_pool_matches_burns() {
        for device in host_devices() {
            // kernel, stride, padding, side
            for (kernel, stride, padding, side) in
                [(3, 2, 1, 12), (3, 2, 1, 7), (2, 2, 0, 6), (3, 1, 1, 5)]
            {
                let pool = MaxPool2dConfig::new([kernel, kernel])
                    .with_strides([stride, stride])
                    .with_padding(PaddingConfig2d::Explicit(
                        padding, padding, padding, padding,
                    ))
                    .init();
                let x = Tensor::<4>::random(
                    [2, 3, side, side],
                    Distribution::Normal(0.0, 1.0),
                    &device,
                );
                let expected = pool.forward(x.clone());
                let got = max_pool2d(&pool, x);
                assert_eq!(
                    got.dims(),
                    expected.dims(),
                    "{kernel} {stride} {padding} {side}"
                );
                got.into_data().assert_eq(&expected.into_data(), true);
            }
        }
    }

    /// A NaN is the maximum of every window it is in, as in PyTorch.
    #[test]
    fn max_pool_propagates_nan() {
        for device in host_devices() {
            let pool = MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init();
            let mut values = vec![0f32; 16];
            values[3 * 4 + 3] = f32::NAN; // only the window of output (1, 1) covers (3, 3)
            let x = Tensor::<4>::from_data(TensorData::new(values, [1, 1, 4, 4]), &device);
            let out: Vec<f32> = max_pool2d(&pool, x).into_data().try_to_vec().unwrap();
            assert_eq!(out[..3], [0.0, 0.0, 0.0]);
            assert!(out[3].is_nan(), "{out:?}");
        }
    }

    /// The inference epilogue compiled for each instruction set the CPU has gives the
    /// baseline's bits, with and without the residual and ReLU.
    #[test]
    fn the_epilogue_is_the_same_on_every_instruction_set() {
        let (channels, pixels) = (3, 37);
        let values = |seed: usize| -> Vec<f32> {
            (0..channels * pixels)
                .map(|i| ((i * 7919 + seed * 104_729) % 97) as f32 / 13.0 - 3.5)
                .collect()
        };
        let (out, residual) = (values(1), values(2));
        for (relu, residual) in [(false, None), (true, None), (true, Some(&residual[..]))] {
            let affine = |simd| Affine {
                scale: vec![0.5, -1.25, 3.0],
                shift: vec![0.1, 0.0, -2.0],
                relu,
                simd,
            };
            let applied = |simd| {
                let mut out = out.clone();
                affine(simd).apply(&mut out, residual, pixels);
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            for simd in simd::Simd::available() {
                assert_eq!(applied(simd), applied(simd::Simd::Baseline), "{simd:?}");
            }
        }
    }

    #[test]
    fn other_convolutions_keep_burns_path() {
        for device in host_devices() {
            let x = Tensor::<4>::zeros([1, 4, 8, 8], &device);
            let grouped = Conv2dConfig::new([4, 4], [3, 3])
                .with_groups(2)
                .init(&device);
            let dilated = Conv2dConfig::new([4, 4], [3, 3])
                .with_dilation([2, 2])
                .init(&device);
            let biased = Conv2dConfig::new([4, 4], [3, 3]).init(&device);
            for conv in [grouped, dilated, biased] {
                assert!(applies(&conv, &x).is_none());
            }
        }
    }
}

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
