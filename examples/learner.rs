//! Train a ResNet on CIFAR-10 with burn-train: its `SupervisedTraining` loop, terminal
//! dashboard, metrics and checkpointer, through resnet-burn's `train` feature.
//!
//! ```text
//! cargo run --release --example learner -- --epochs 30
//! cargo run --release --example learner -- --backend flex --base-channels 16 --limit-train 2000 --epochs 2
//! ```

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataloader::batcher::Batcher;
use burn::optim::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::tensor::Device;
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::metric::{AccuracyMetric, LearningRateMetric, LossMetric};
use burn::train::{Learner, SupervisedTraining};
use cifar10_burn::{Augmentation, Cifar10Batcher, Cifar10Dataset, Cifar10Item, Split};
use clap::Parser;
use resnet_burn::train::{ClassificationBatch, Classifier};
use resnet_burn::{ResNetConfig, Stem};
use resnet_burn_examples::cli::{Backend, cifar10_dir, pick_device};
use resnet_burn_examples::train::TrainOptions;

/// Train a ResNet (CIFAR stem) on CIFAR-10 with burn-train's Learner: SGD with Nesterov
/// momentum and weight decay, cosine learning rate, crop + flip augmentation, label smoothing.
/// burn-train writes its checkpoints, logs and metrics into --artifact-dir.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Where to train: auto, wgpu[:N], cuda[:N], vulkan[:N], flex or ndarray.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// The network: any resnet-burn preset.
    #[arg(long, default_value = "resnet18")]
    model: String,
    /// Channels of the first stage (64 as in torchvision; e.g. 16 for a quick CPU run).
    #[arg(long, default_value_t = 64)]
    base_channels: usize,
    /// Passes over the training set.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Training images per step.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Peak learning rate (cosine decay to 0).
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// Label smoothing of the loss.
    #[arg(long, default_value_t = 0.1)]
    label_smoothing: f32,
    /// Seed of initialization, shuffling and augmentation.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Train on the first N training images only (quick runs).
    #[arg(long)]
    limit_train: Option<usize>,
    /// Validate on the first N test images only.
    #[arg(long)]
    limit_test: Option<usize>,
    /// CIFAR-10 (default: $CIFAR10_DIR, else the cache folder, downloading it there).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where burn-train writes its files.
    #[arg(long, default_value = "artifacts/learner")]
    artifact_dir: PathBuf,
    /// Continue from burn-train's checkpoint of this epoch.
    #[arg(long)]
    resume_epoch: Option<usize>,
}

/// cifar10-burn's batches as the [`ClassificationBatch`] resnet-burn's steps take.
struct ToClassification(Cifar10Batcher);

impl Batcher<Cifar10Item, ClassificationBatch> for ToClassification {
    fn batch(&self, items: Vec<Cifar10Item>, device: &Device) -> ClassificationBatch {
        let batch = self.0.batch(items, device);
        ClassificationBatch::new(batch.images, batch.targets)
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = pick_device(args.backend)?;
    let data_dir = cifar10_dir(args.data_dir.clone())?;
    let limit = |set: Cifar10Dataset, n: Option<usize>| n.map_or(set.clone(), |n| set.truncate(n));
    let train = limit(
        Cifar10Dataset::new(&data_dir, Split::Train)?,
        args.limit_train,
    );
    let test = limit(
        Cifar10Dataset::new(&data_dir, Split::Test)?,
        args.limit_test,
    );
    let steps = train.len().div_ceil(args.batch_size) * args.epochs;

    let loader = |batcher, set: Cifar10Dataset, shuffle| {
        let builder = DataLoaderBuilder::new(ToClassification(batcher))
            .batch_size(args.batch_size)
            .set_device(device.clone())
            .num_workers(2);
        match shuffle {
            true => builder.shuffle(args.seed).build(set),
            false => builder.build(set),
        }
    };
    let augmentation = Cifar10Batcher::train(Augmentation::default(), args.seed);
    let train_loader = loader(augmentation, train, true);
    let test_loader = loader(Cifar10Batcher::eval(), test, false);

    let config = ResNetConfig::from_name(&args.model, 10)
        .ok_or_else(|| {
            anyhow!(
                "unknown --model {:?}; one of {:?}",
                args.model,
                ResNetConfig::PRESETS
            )
        })?
        .with_stem(Stem::Cifar)
        .with_base_channels(args.base_channels);
    let model = config.try_init_seeded(&device.clone().autodiff(), args.seed)?;
    // The CIFAR-10 loop's SGD: Nesterov momentum 0.9, weight decay 5e-4 on weights only.
    let optimizer = TrainOptions::default().optimizer()?;
    let schedule = CosineAnnealingLrSchedulerConfig::new(args.lr, steps.max(1))
        .init()
        .map_err(|e| anyhow!("--lr {}: {e}", args.lr))?;
    let learner = Learner::new(
        Classifier::new(model, args.label_smoothing),
        optimizer,
        schedule,
    );

    let mut training = SupervisedTraining::new(&args.artifact_dir, train_loader, test_loader)
        .metrics((AccuracyMetric::new(), LossMetric::new()))
        .metric_train_numeric(LearningRateMetric::new())
        .with_default_checkpointers()
        .with_checkpointing_strategy(KeepLastNCheckpoints::new(2))
        .num_epochs(args.epochs)
        .summary();
    if let Some(epoch) = args.resume_epoch {
        training = training.checkpoint(epoch);
    }
    let result = training.launch(learner);
    if let Some(error) = result.error {
        return Err(anyhow!("training stopped: {error}"));
    }
    println!("files: {}", args.artifact_dir.display());
    Ok(())
}
