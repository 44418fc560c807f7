//! cifar10-burn's speed: opening the 50,000-image training split, and augmented batches of
//! 512 (crop + flip + normalize, then upload to the flex device), in images per second.
//!
//! Needs the real data: `CIFAR10_DIR=../shared/data/cifar-10-batches-bin cargo bench --bench cifar10`.

use std::sync::Arc;
use std::time::Duration;

use burn::tensor::Device;
use cifar10_burn::{Augmentation, Cifar10Dataset, EpochLoader, Split};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn data_dir() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("CIFAR10_DIR").map(std::path::PathBuf::from);
    if dir.is_none() {
        eprintln!("skipped: set CIFAR10_DIR to the cifar-10-batches-bin folder");
    }
    dir
}

fn open(c: &mut Criterion) {
    let Some(dir) = data_dir() else { return };
    let mut group = c.benchmark_group("open");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(50_000));
    group.bench_function("train_split", |b| {
        b.iter(|| Cifar10Dataset::new(&dir, Split::Train).expect("train split"))
    });
    group.finish();
}

fn batches(c: &mut Criterion) {
    let Some(dir) = data_dir() else { return };
    let train = Arc::new(Cifar10Dataset::new(&dir, Split::Train).expect("train split"));
    let loader = EpochLoader::train(train, 512, Some(Augmentation::default()), 0);
    let indices = loader.batches(0);
    let device = Device::flex();
    let mut group = c.benchmark_group("batch512");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(512));
    let mut i = 0;
    group.bench_function("augment_host", |b| {
        b.iter(|| {
            i = (i + 1) % indices.len();
            loader.host_batch(0, i, &indices[i])
        })
    });
    group.bench_function("augment_to_flex", |b| {
        b.iter(|| {
            i = (i + 1) % indices.len();
            let batch = loader.host_batch(0, i, &indices[i]).to_device(&device);
            device.sync().expect("sync");
            batch
        })
    });
    group.finish();
}

criterion_group!(benches, open, batches);
criterion_main!(benches);
