//! The layers of the CIFAR-stem ResNet-18 one by one, at batch 64, in images per second:
//! where a backend's time goes, layer by layer, against the same layers in PyTorch
//! (`python3 benches/compare.py --bench layers`).
//!
//! Cases: every 3x3 convolution shape of the network (stride 1 in each stage, stride 2 at
//! the start of stages 2-4), a 1x1 stride-2 downsampling convolution, and BatchNorm
//! (evaluation) and ReLU on the largest activation, all forward only, on a device without
//! autodiff; plus forward and backward of the first stage's 3x3 convolution on the autodiff
//! device. Ids are `layer/<case>/<backend>`; `$BENCH_BACKENDS` selects backends.
//!
//! On the CPU backends (flex, ndarray), a ResNet-18 training step layer by layer: each
//! distinct convolution of the network with its BatchNorm (batch statistics) and ReLU,
//! forward and backward through [`burn_cpu_kernels::conv_batch_norm_in`] on the autodiff
//! device, as `ResNet` trains it, in the model's precision (`$BENCH_PRECISION`). Ids are
//! `train_layer/<case>/<backend>[-bf16]`; [`STEP`] says how often each case occurs in the
//! network, so that `compare.py --bench layers` can add them up into a step.

use std::time::Duration;

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::MaxPool2dConfig;
use burn::nn::{BatchNormConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Distribution, Tensor};
use burn_cpu_kernels::{ConvPrecision, Epilogue, conv_batch_norm_in};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use resnet_burn::Precision;
use resnet_burn_examples::bench::{backends, precision};

const BATCH: usize = 64;

/// A convolution case: name, input channels, output channels, kernel, stride, input side.
const CONVS: [(&str, usize, usize, usize, usize, usize); 8] = [
    ("conv3x3_64_32px", 64, 64, 3, 1, 32),
    ("conv3x3_128_16px", 128, 128, 3, 1, 16),
    ("conv3x3_256_8px", 256, 256, 3, 1, 8),
    ("conv3x3_512_4px", 512, 512, 3, 1, 4),
    ("conv3x3_s2_64_32px", 64, 128, 3, 2, 32),
    ("conv3x3_s2_128_16px", 128, 256, 3, 2, 16),
    ("conv3x3_s2_256_8px", 256, 512, 3, 2, 8),
    ("conv1x1_s2_64_32px", 64, 128, 1, 2, 32),
];

/// The convolutions of the CIFAR-stem ResNet-18, each with its BatchNorm and ReLU: name,
/// input channels, output channels, kernel, stride, input side, and how many the network has.
/// The same list is in `benches/pytorch_reference.py`.
const STEP: [(&str, usize, usize, usize, usize, usize, usize); 11] = [
    ("stem_conv3x3_3_32px", 3, 64, 3, 1, 32, 1),
    ("conv3x3_64_32px", 64, 64, 3, 1, 32, 4),
    ("conv3x3_s2_64_32px", 64, 128, 3, 2, 32, 1),
    ("conv1x1_s2_64_32px", 64, 128, 1, 2, 32, 1),
    ("conv3x3_128_16px", 128, 128, 3, 1, 16, 3),
    ("conv3x3_s2_128_16px", 128, 256, 3, 2, 16, 1),
    ("conv1x1_s2_128_16px", 128, 256, 1, 2, 16, 1),
    ("conv3x3_256_8px", 256, 256, 3, 1, 8, 3),
    ("conv3x3_s2_256_8px", 256, 512, 3, 2, 8, 1),
    ("conv1x1_s2_256_8px", 256, 512, 1, 2, 8, 1),
    ("conv3x3_512_4px", 512, 512, 3, 1, 4, 3),
];

fn conv(channels: usize, out: usize, kernel: usize, stride: usize, device: &Device) -> Conv2d {
    let pad = kernel / 2;
    Conv2dConfig::new([channels, out], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_bias(false)
        .init(device)
}

fn input(channels: usize, side: usize, device: &Device) -> Tensor<4> {
    Tensor::random([BATCH, channels, side, side], Distribution::Default, device)
}

/// `forward(x)`, then the gradients of its sum with respect to `x` and the layer's weight,
/// combined into one tensor to wait for.
fn forward_backward(
    layer: &Conv2d,
    x: &Tensor<4>,
    forward: impl Fn(Tensor<4>) -> Tensor<4>,
) -> Tensor<4> {
    let grads = forward(x.clone()).sum().backward();
    let input_grad = x.grad(&grads).expect("input gradient");
    let weight_grad = layer.weight.grad(&grads).expect("weight gradient");
    input_grad + weight_grad.sum().reshape([1, 1, 1, 1])
}

fn layers(c: &mut Criterion) {
    let mut group = c.benchmark_group("layer");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(BATCH as u64));
    for (backend, device) in backends() {
        let mut bench = |name: &str, run: &mut dyn FnMut() -> Tensor<4>| {
            let mut warm = false;
            group.bench_function(BenchmarkId::new(name, backend), |b| {
                // Compile and autotune outside the timing, only in the cases the filter keeps.
                if !std::mem::replace(&mut warm, true) {
                    run().into_data();
                }
                b.iter(|| {
                    let out = run();
                    device.sync().expect("sync");
                    out
                })
            });
        };
        for (name, channels, out, kernel, stride, side) in CONVS {
            let layer = conv(channels, out, kernel, stride, &device);
            let x = input(channels, side, &device);
            bench(name, &mut || layer.forward(x.clone()));
        }
        let x = input(64, 32, &device);
        let norm = BatchNormConfig::new(64).init(&device);
        bench("batchnorm_eval_64_32px", &mut || norm.forward(x.clone()));
        bench("relu_64_32px", &mut || relu(x.clone()));
        // The ImageNet stem's pooling (3x3, stride 2, padding 1), at this file's shapes.
        let pool = MaxPool2dConfig::new([3, 3])
            .with_strides([2, 2])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init();
        bench("maxpool3x3_s2_64_32px", &mut || pool.forward(x.clone()));

        let autodiff = device.clone().autodiff();
        let layer = conv(64, 64, 3, 1, &autodiff);
        let x = input(64, 32, &autodiff).require_grad();
        bench("conv3x3_64_32px_forward_backward", &mut || {
            forward_backward(&layer, &x, |x| layer.forward(x))
        });
    }
    group.finish();
}

/// A ResNet-18 training step layer by layer on the CPU backends: [`STEP`]'s convolutions
/// with BatchNorm and ReLU, forward and backward, in the model's precision.
fn train_layers(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_layer");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(BATCH as u64));
    let (precision, suffix) = precision();
    let products = match precision {
        Precision::Bf16 => ConvPrecision::Bf16,
        _ => ConvPrecision::F32,
    };
    for (backend, device) in backends() {
        if !burn_cpu_kernels::is_accelerated(&device) {
            continue;
        }
        let device = device.autodiff();
        for (name, channels, out, kernel, stride, side, _) in STEP {
            let layer = conv(channels, out, kernel, stride, &device);
            let norm = BatchNormConfig::new(out).init(&device);
            // The network's input needs no gradient; every other layer's input does.
            let x = input(channels, side, &device);
            let x = if channels == 3 { x } else { x.require_grad() };
            let id = BenchmarkId::new(name, format!("{backend}{suffix}"));
            group.bench_function(id, |b| {
                b.iter(|| {
                    let y = conv_batch_norm_in(&layer, &norm, x.clone(), Epilogue::Relu, products);
                    let grads = y.sum().backward();
                    let weight_grad = layer.weight.grad(&grads).expect("weight gradient");
                    device.sync().expect("sync");
                    weight_grad
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, layers, train_layers);
criterion_main!(benches);
