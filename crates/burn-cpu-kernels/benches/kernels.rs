//! The convolution algorithms against each other on the layers their heuristics choose
//! between: 3x3 convolutions of stride 1 and padding 1, forward (inference) and a training
//! step's forward and backward, by im2col, F(2x2, 3x3) and F(4x4, 3x3). The thresholds in
//! `src/im2col.rs` (`WINOGRAD_CHANNELS`, `WINOGRAD_PIXELS`, `WINOGRAD_4_SIDE`) are set from it.
//!
//! ```text
//! cargo bench -p burn-cpu-kernels --bench kernels
//! BATCH=8 LAYERS=imagenet cargo bench -p burn-cpu-kernels --bench kernels
//! LAYERS='256,256,8;512,512,4' cargo bench -p burn-cpu-kernels --bench kernels -- forward
//! ```
//!
//! `LAYERS`: `cifar` (default: the layers of an 18-layer residual network on 32x32 images,
//! and a 3- and a 16-channel one that show where Winograd stops paying), `imagenet` (a
//! 50-layer network's 3x3 layers at 224x224), or `in,out,side` triples separated by `;`.
//! Ids read `<forward|train_step>/<in>_<out>_<side>px/<algorithm>`, in images per second.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::{Device, Distribution, Tensor};
use burn_cpu_kernels::{ConvAlgorithm, conv2d_with};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const ALGORITHMS: [(ConvAlgorithm, &str); 3] = [
    (ConvAlgorithm::Im2col, "im2col"),
    (ConvAlgorithm::WinogradF2, "winograd_f2"),
    (ConvAlgorithm::WinogradF4, "winograd_f4"),
];

/// `(in, out, side)` of each layer, from `LAYERS`.
fn layers() -> Vec<(usize, usize, usize)> {
    match std::env::var("LAYERS").as_deref() {
        Ok("imagenet") => vec![(64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 7)],
        Ok("cifar") | Err(_) => vec![
            (3, 64, 32),
            (16, 16, 32),
            (64, 64, 32),
            (128, 128, 16),
            (256, 256, 8),
            (512, 512, 4),
        ],
        Ok(layers) => layers
            .split(';')
            .map(|layer| {
                let numbers: Vec<usize> = layer
                    .split(',')
                    .map(|n| n.trim().parse().expect("LAYERS: numbers"))
                    .collect();
                match numbers[..] {
                    [c, o, side] => (c, o, side),
                    _ => panic!("LAYERS: `in,out,side` a layer, `;` between layers"),
                }
            })
            .collect(),
    }
}

fn conv3x3(channels: usize, out: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([channels, out], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_bias(false)
        .init(device)
}

fn bench(c: &mut Criterion) {
    let batch = std::env::var("BATCH").map_or(64, |b| b.parse().expect("BATCH: a number"));
    let device = Device::flex();
    let autodiff = device.clone().autodiff();
    for (channels, out, side) in layers() {
        let layer = format!("{channels}_{out}_{side}px");
        let shape = [batch, channels, side, side];
        let x = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let conv = conv3x3(channels, out, &device);
        let mut group = c.benchmark_group(format!("forward/{layer}"));
        group.throughput(Throughput::Elements(batch as u64));
        group.sample_size(10);
        for (algorithm, name) in ALGORITHMS {
            group.bench_function(name, |b| {
                b.iter(|| {
                    let y = conv2d_with(&conv, x.clone(), algorithm);
                    y.into_data() // waits for the result
                })
            });
        }
        group.finish();

        let x = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &autodiff);
        let conv = conv3x3(channels, out, &autodiff);
        let mut group = c.benchmark_group(format!("train_step/{layer}"));
        group.throughput(Throughput::Elements(batch as u64));
        group.sample_size(10);
        for (algorithm, name) in ALGORITHMS {
            group.bench_function(name, |b| {
                b.iter(|| {
                    let x = x.clone().require_grad();
                    let grads = conv2d_with(&conv, x.clone(), algorithm).sum().backward();
                    let x_grad = x.grad(&grads).expect("the input's gradient");
                    let weight_grad = conv.weight.grad(&grads).expect("the weight's gradient");
                    (x_grad.into_data(), weight_grad.into_data())
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
