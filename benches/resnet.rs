//! Throughput of resnet-burn, in images per second, on every backend compiled in:
//! inference and one training step (forward, backward, SGD update) for the CIFAR-stem
//! ResNet-18 at batch 64 (32x32) and ResNet-50 at 224x224 (inference batch 8, training
//! batch 4). The same cases in PyTorch: `benches/pytorch_reference.py`; both side by side
//! with ratios: `python3 benches/compare.py`.
//!
//! Each case's id is `<case>/<backend>`; select with a filter, e.g.
//! `cargo bench --bench resnet -- flex`. The device is synced inside the timed region.
//! `BENCH_PRECISION=bf16` (or `f16`) measures the model in that precision, under ids
//! `<case>/<backend>-bf16`.

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Distribution, Int, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use resnet_burn::{ResNetConfig, Stem};
use resnet_burn_examples::bench::{backends, precision};
use std::time::Duration;

struct Case {
    name: &'static str,
    config: fn() -> ResNetConfig,
    size: usize,
    infer_batch: usize,
    train_batch: usize,
}

const CASES: [Case; 2] = [
    Case {
        name: "resnet18_cifar",
        config: || ResNetConfig::resnet18(10).with_stem(Stem::Cifar),
        size: 32,
        infer_batch: 64,
        train_batch: 64,
    },
    Case {
        name: "resnet50_224",
        config: || ResNetConfig::resnet50(1000),
        size: 224,
        infer_batch: 8,
        train_batch: 4,
    },
];

fn inference(c: &mut Criterion) {
    let mut group = c.benchmark_group("inference");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    let (precision, suffix) = precision();
    for (backend, device) in backends() {
        let id = format!("{backend}{suffix}");
        for case in &CASES {
            let model = (case.config)()
                .with_precision(precision)
                .init(&device)
                .valid();
            let input = Tensor::<4>::random(
                [case.infer_batch, 3, case.size, case.size],
                Distribution::Default,
                &device,
            );
            group.throughput(Throughput::Elements(case.infer_batch as u64));
            let mut warm = false;
            group.bench_function(BenchmarkId::new(case.name, &id), |b| {
                // Compile and autotune outside the timing, only in the cases the filter keeps.
                if !std::mem::replace(&mut warm, true) {
                    model.forward(input.clone()).into_data();
                }
                b.iter(|| {
                    let out = model.forward(input.clone());
                    device.sync().expect("sync");
                    out
                })
            });
        }
    }
    group.finish();
}

fn training_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_step");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    let (precision, suffix) = precision();
    for (backend, device) in backends() {
        let device = device.autodiff();
        let id = format!("{backend}{suffix}");
        for case in &CASES {
            let mut model = Some((case.config)().with_precision(precision).init(&device));
            let classes = (case.config)().num_classes;
            let images = Tensor::<4>::random(
                [case.train_batch, 3, case.size, case.size],
                Distribution::Default,
                &device,
            );
            let targets = Tensor::<1, Int>::from_data(
                (0..case.train_batch as i64)
                    .map(|i| i % classes as i64)
                    .collect::<Vec<_>>()
                    .as_slice(),
                &device,
            );
            let loss_fn = CrossEntropyLossConfig::new().init(&device);
            let mut optimizer = SgdConfig::new().init();
            let mut step = || {
                let current = model.take().expect("model");
                let loss = loss_fn.forward(current.forward(images.clone()), targets.clone());
                let grads = GradientsParams::from_grads(loss.backward(), &current);
                let updated = optimizer.step(0.01, current, grads);
                device.sync().expect("sync");
                model = Some(updated);
            };
            group.throughput(Throughput::Elements(case.train_batch as u64));
            let mut warm = false;
            group.bench_function(BenchmarkId::new(case.name, &id), |b| {
                // Compile and autotune outside the timing, only in the cases the filter keeps.
                if !std::mem::replace(&mut warm, true) {
                    step();
                }
                b.iter(&mut step)
            });
        }
    }
    group.finish();
}

criterion_group!(benches, inference, training_step);
criterion_main!(benches);
