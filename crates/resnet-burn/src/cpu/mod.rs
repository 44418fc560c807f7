//! Convolutions on the CPU backends (flex, ndarray) through one matrix product an image
//! ([`im2col`]) or, for ResNet's 3x3 convolutions of stride 1, Winograd's minimal filtering
//! ([`winograd`]), and the stem's max pooling ([`pool`]).
//!
//! Burn's flex convolution converts its input to channels-last and builds its im2col
//! matrix tile by tile; on ResNet's early layers (64 channels at 32x32, batch 64) that runs at
//! half PyTorch's speed (`python3 benches/compare.py --bench layers`). Its backward is Burn's
//! generic one (a transposed convolution for the input, a convolution for the weight).
//! Here each image's im2col matrix (`[in_channels * k * k, out_h * out_w]`, built from NCHW
//! rows with plain copies) is multiplied by the weight matrix (`[out_channels,
//! in_channels * k * k]`, the weight tensor as it is) with the `gemm` crate that flex uses
//! too, images in parallel; the backward is the two transposed products and col2im. A 3x3
//! convolution of stride 1 and padding 1 with 16 channels or more and enough pixels goes
//! through Winograd's minimal filtering instead, forward and backward: F(2x2, 3x3), which
//! takes 2.25 times fewer multiplications, and on images of 8x8 or more F(4x4, 3x3) in the
//! forward and the input's gradient, 4 times fewer ([`im2col::Im2col::winograd`]).
//!
//! - In inference ([`fused`]), BatchNorm (running statistics), the residual and ReLU are
//!   applied to each output channel while the output is in cache.
//! - In training ([`conv`](mod@conv)), the convolution is a backend extension
//!   ([`conv::CpuTraining`]) with its own backward step, and so is BatchNorm
//!   ([`batch_norm_train`], through [`norm`]: Burn's generic one copies and re-reads each
//!   activation about ten times); ReLU stays Burn's.
//!
//! The convolutions apply to ungrouped, undilated, bias-free f32 convolutions on
//! `Device::flex()` and `Device::ndarray()` (with or without autodiff), BatchNorm in training
//! to every f32 input there; everything else (other backends, ResNeXt's grouped and dilated
//! convolutions) goes through Burn's `Conv2d` and `BatchNorm`.

mod conv;
mod im2col;
mod norm;
mod pool;
mod winograd;

use burn::backend::Dispatch;
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::tensor::module::BatchNormTrainOutput;
use burn::tensor::{DType, Device, Tensor};

use crate::geometry::symmetric_padding;

use conv::{CpuInference, CpuTraining};
use im2col::Im2col;
use norm::Planes;
use pool::MaxPool;

/// Whether `device` is one of the CPU backends with the host kernels (with or without
/// autodiff: an autodiff device compares equal to the device it wraps).
#[allow(deprecated)] // Burn 0.22 deprecates ndarray; this crate still supports it.
pub(crate) fn on_host(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    if *device == Device::flex() {
        return true;
    }
    #[cfg(feature = "ndarray")]
    if *device == Device::ndarray() {
        return true;
    }
    false
}

/// The im2col geometry of `conv` on `x`, if the computation applies: f32 on a CPU backend
/// ([`on_host`]).
fn applies(conv: &Conv2d, x: &Tensor<4>) -> Option<Im2col> {
    if !on_host(&x.device()) || x.dtype() != DType::F32 || conv.weight.dtype() != DType::F32 {
        return None;
    }
    Im2col::for_conv(conv, x.dims(), symmetric_padding(&conv.padding)?)
}

/// `conv(x)`, through im2col + gemm where it applies (in training too), else Burn's.
pub(crate) fn conv(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    match applies(conv, &x) {
        Some(geometry) => Tensor::from_dispatch(<Dispatch as CpuTraining>::host_conv2d(
            x.into_dispatch(),
            conv.weight.val().into_dispatch(),
            geometry.stride(),
            geometry.padding(),
        )),
        None => conv.forward(x),
    }
}

/// `relu?(bn(conv(x)) [+ residual])` (ReLU always after a residual) in inference, through
/// [`CpuInference`] where it applies; `None` where it does not.
///
/// The tensors are read where they are (a clone of a flex tensor shares its storage), so a
/// block can keep `x` for its shortcut at no cost.
pub(crate) fn fused(
    conv: &Conv2d,
    bn: &BatchNorm,
    x: &Tensor<4>,
    relu: bool,
    residual: Option<&Tensor<4>>,
) -> Option<Tensor<4>> {
    let inference = !x.device().is_autodiff();
    let im2col = applies(conv, x).filter(|_| inference)?;
    let residual_ok =
        residual.is_none_or(|r| r.dims() == im2col.out_shape() && r.dtype() == DType::F32);
    if !residual_ok {
        return None;
    }
    let affine = Affine::of(bn, im2col.out_channels(), relu || residual.is_some())?;
    let (x, weight) = (x.clone().into_dispatch(), conv.weight.val().into_dispatch());
    let (stride, padding) = (im2col.stride(), im2col.padding());
    Some(Tensor::from_dispatch(match residual {
        None => <Dispatch as CpuInference>::host_conv2d_affine(x, weight, stride, padding, affine),
        Some(residual) => <Dispatch as CpuInference>::host_conv2d_affine_residual(
            x,
            weight,
            residual.clone().into_dispatch(),
            stride,
            padding,
            affine,
        ),
    }))
}

/// `bn(x)` in training on a CPU backend, through [`CpuTraining`]: the output, and the
/// batch's mean and biased variance, as Burn's `batch_norm_train` returns them (the caller
/// updates the running statistics); `None` where it does not apply: in inference, on other
/// backends, for a frozen BatchNorm (which Burn's module runs with its running statistics),
/// for other dtypes than f32 and for inputs without values.
pub(crate) fn batch_norm_train(bn: &BatchNorm, x: &Tensor<4>) -> Option<BatchNormTrainOutput<4>> {
    let device = x.device();
    // Burn's rule for the training path: an autodiff device and a layer not frozen.
    let training = device.is_autodiff() && bn.training.is_enabled();
    let (gamma, beta) = (bn.gamma.val(), bn.beta.val());
    let applies = training
        && on_host(&device)
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

/// `pool(x)` in inference on a CPU backend through [`MaxPool`] where it applies (f32, no
/// dilation, floor rounding, symmetric padding), else Burn's.
pub(crate) fn max_pool(pool: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
    let inference = on_host(&x.device()) && !x.device().is_autodiff();
    let geometry = symmetric_padding(&pool.padding)
        .filter(|_| {
            inference && x.dtype() == DType::F32 && pool.dilation == [1, 1] && !pool.ceil_mode
        })
        .and_then(|padding| MaxPool::new(x.dims(), pool.kernel_size, pool.stride, padding));
    match geometry {
        Some(geometry) => Tensor::from_dispatch(<Dispatch as CpuInference>::max_pool2d_planes(
            x.into_dispatch(),
            geometry.kernel(),
            geometry.stride(),
            geometry.padding(),
        )),
        None => pool.forward(x),
    }
}

/// BatchNorm in evaluation as a per-channel `x * scale + shift`, then ReLU if `relu`.
#[derive(Clone, Debug)]
pub(crate) struct Affine {
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
    pub(crate) fn apply(&self, out: &mut [f32], residual: Option<&[f32]>, pixels: usize) {
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

#[cfg(test)]
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

    /// Every geometry ResNet uses: batch, in, out, kernel, stride, padding, side.
    const CASES: [(usize, usize, usize, usize, usize, usize, usize); 9] = [
        (4, 8, 16, 3, 1, 1, 9),   // ResNet's 3x3, by im2col (few channels)
        (5, 16, 24, 3, 1, 1, 15), // ResNet's 3x3, by Winograd (odd side)
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
                let out_ours = conv(&ours, x_ours.clone());
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

    /// The fast path against Burn's convolution and BatchNorm, for every geometry ResNet
    /// uses, with and without ReLU.
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
                let inputs = [(false, None), (true, None), (false, Some(residual))];
                for (expected, (relu, residual)) in expected.into_iter().zip(inputs) {
                    let what = format!(
                        "{kernel}x{kernel} stride {stride} padding {padding} relu {relu} residual {}",
                        residual.is_some()
                    );
                    let Some(got) = fused(&conv, &bn, &x, relu, residual.as_ref()) else {
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
    /// (CI, 2026-11-29), where 300 seeds of these draws stayed within 9.3e-6. Hence 2e-5.
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
                let got = max_pool(&pool, x);
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
            let out: Vec<f32> = max_pool(&pool, x).into_data().try_to_vec().unwrap();
            assert_eq!(out[..3], [0.0, 0.0, 0.0]);
            assert!(out[3].is_nan(), "{out:?}");
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
