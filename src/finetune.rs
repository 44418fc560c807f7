//! Fine-tuning on a folder of one's own images (`examples/finetune.rs`): torchvision's
//! pretrained weights (or a `.pth` / `.safetensors` file, or none), a new head for the
//! folder's classes, and either
//!
//! - full fine-tuning: SGD with momentum over `RandomResizedCrop` + flip batches, the backbone
//!   at its own (lower) learning rate, warm-up then cosine decay; or
//! - a linear probe (`Freeze::Backbone`): the backbone's features of every image are computed
//!   once, with the evaluation transform, standardized, and only the head trains, on them
//!   (the standardization is folded into the exported head).
//!
//! The run writes what the CIFAR-10 loop writes ([`crate::train`]): `config.json`,
//! `metrics.csv`, `curves.png`, `checkpoint.bin` (resumed exactly, also after Ctrl-C), then
//! `model.safetensors` (torchvision's keys, the class names and config in its metadata),
//! `model.bpk` and `summary.json` with per-class accuracy and the confusion matrix. Images that
//! cannot be read are left out of their batch, counted and listed, never fatal.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::{Module, Param, ParamGroup};
use burn::nn::Linear;
use burn::nn::loss::CrossEntropyLoss;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::lr_scheduler::constant::ConstantLr;
use burn::optim::lr_scheduler::module_lr_scheduler::{ModuleLearningRate, ModuleLrScheduler};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use cifar10_burn::epoch_batches;
use resnet_burn::pretrained::Pretrained;
use resnet_burn::{LoadOptions, ResNet, ResNetConfig};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, write_atomic};
use crate::folder::{FolderLoader, ImageBatch, ImageFolder, Skipped};
use crate::parallel::{initialize, loss_and_correct, loss_fn, read_joined};
use crate::progress::{LogLine, about, progress_bar, styled_bar};
use crate::train::{Control, EpochMetrics, NonFiniteLoss, Outcome, warmup_cosine, write_metrics};
use crate::transforms::Transforms;

/// What is trained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Freeze {
    /// Every layer (full fine-tuning).
    #[default]
    None,
    /// The head only, on features computed once (a linear probe).
    Backbone,
}

impl std::str::FromStr for Freeze {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "none" => Ok(Freeze::None),
            "backbone" => Ok(Freeze::Backbone),
            _ => Err(format!("unknown --freeze {text:?}; use none or backbone")),
        }
    }
}

/// Everything that decides what a fine-tuning run computes. Saved in `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinetuneOptions {
    /// A preset of resnet-burn (`resnet18`, `resnet50`, ...), with the ImageNet stem.
    pub model: String,
    /// Channels of the first stage (64 as in torchvision).
    pub base_channels: usize,
    /// Starting weights: a torchvision name or preset (`ResNet50_Weights.IMAGENET1K_V2`,
    /// `resnet50`), a `.pth` / `.safetensors` file, or none (seeded random initialization).
    pub weights: Option<String>,
    /// What stays fixed.
    pub freeze: Freeze,
    /// Side of the training and evaluation crops.
    pub image_size: usize,
    /// Passes over the training images.
    pub epochs: usize,
    /// Training images (or feature vectors) per step.
    pub batch_size: usize,
    /// Images per evaluation or feature-extraction step.
    pub eval_batch_size: usize,
    /// Peak learning rate of the head.
    pub lr: f64,
    /// Peak learning rate of the backbone (full fine-tuning).
    pub backbone_lr: f64,
    /// SGD momentum (PyTorch's, no dampening).
    pub momentum: f64,
    /// L2 weight decay of convolution and linear weights.
    pub weight_decay: f64,
    /// Label smoothing of the training loss.
    pub label_smoothing: f32,
    /// Epochs of linear warm-up before the cosine decay.
    pub warmup_epochs: f64,
    /// Fraction of each class held out for validation when the folder has no `val/`.
    pub val_fraction: f64,
    /// Seed of the split, the head's initialization, shuffling and augmentation.
    pub seed: u64,
}

impl Default for FinetuneOptions {
    fn default() -> Self {
        Self {
            model: "resnet50".into(),
            base_channels: 64,
            weights: None,
            freeze: Freeze::None,
            image_size: 224,
            epochs: 10,
            batch_size: 32,
            eval_batch_size: 64,
            lr: 0.01,
            backbone_lr: 0.001,
            momentum: 0.9,
            weight_decay: 1e-4,
            label_smoothing: 0.0,
            warmup_epochs: 0.0,
            val_fraction: 0.2,
            seed: 42,
        }
    }
}

/// Accuracy on one class of the validation images.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassAccuracy {
    /// The class name.
    pub class: String,
    /// Its validation images (read).
    pub images: usize,
    /// The fraction of them predicted as this class.
    pub accuracy: f64,
}

/// `summary.json` of a fine-tuning run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FinetuneSummary {
    /// The preset trained.
    pub model: String,
    /// The starting weights, if any.
    pub weights: Option<String>,
    /// What stayed fixed.
    pub freeze: Freeze,
    /// The device, as Burn names it.
    pub backend: String,
    /// Class names, in index order.
    pub classes: Vec<String>,
    /// Epochs trained.
    pub epochs: usize,
    /// Validation accuracy after the last epoch.
    pub val_accuracy: f64,
    /// Best validation accuracy over the epochs.
    pub best_val_accuracy: f64,
    /// Accuracy per class after the last epoch.
    pub per_class: Vec<ClassAccuracy>,
    /// `confusion[true][predicted]`: validation images of class `true` predicted as
    /// `predicted`, after the last epoch.
    pub confusion: Vec<Vec<usize>>,
    /// Training images (found; those that could not be read are in `skipped`).
    pub train_images: usize,
    /// Validation images (found).
    pub val_images: usize,
    /// Seconds of training steps over all epochs.
    pub train_seconds: f64,
    /// Training images (feature vectors for a probe) per second.
    pub images_per_second: f64,
    /// Linear probe: images per second of the feature extraction (decoding included).
    pub feature_images_per_second: Option<f64>,
    /// Images that could not be read, left out of training and evaluation.
    pub skipped: Vec<Skipped>,
    /// Files in the class folders that are not JPEG or PNG, not read.
    pub ignored: Vec<PathBuf>,
}

/// Progress saved in every checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct RunState {
    epoch: usize,
    step: usize,
    loss_sum: f64,
    correct: u64,
    seen: u64,
    epoch_seconds: f64,
    history: Vec<EpochMetrics>,
    options: Option<FinetuneOptions>,
    /// Images that could not be read, and why.
    skipped: BTreeMap<PathBuf, String>,
}

/// Where the starting weights come from.
enum Weights {
    Pretrained(Pretrained),
    File(PathBuf),
}

impl Weights {
    fn parse(text: &str) -> Result<Self> {
        let path = PathBuf::from(text);
        if path.is_file() {
            return Ok(Weights::File(path));
        }
        match Pretrained::from_name(text) {
            Some(weights) => Ok(Weights::Pretrained(weights)),
            None if text.ends_with(".pth") || text.ends_with(".safetensors") => {
                bail!("the weight file {text} does not exist")
            }
            None => bail!(
                "--weights {text:?} is neither a file nor torchvision weights; give a .pth or \
                 .safetensors file, a name such as ResNet50_Weights.IMAGENET1K_V2, or a preset \
                 such as resnet50"
            ),
        }
    }
}

impl FinetuneOptions {
    /// The network for `classes` classes: the preset with the ImageNet stem.
    pub fn model_config(&self, classes: usize) -> Result<ResNetConfig> {
        let config = ResNetConfig::from_name(&self.model, classes).with_context(|| {
            format!(
                "unknown --model {:?}; choose one of {:?}",
                self.model,
                ResNetConfig::PRESETS
            )
        })?;
        let config = config.with_base_channels(self.base_channels);
        config.validate()?;
        Ok(config)
    }

    fn check(&self) -> Result<()> {
        if self.epochs == 0 || self.batch_size == 0 || self.eval_batch_size == 0 {
            bail!("--epochs, --batch-size and --eval-batch-size must be at least 1");
        }
        if self.image_size < 8 {
            bail!("--image-size {} is below 8 pixels", self.image_size);
        }
        Ok(())
    }

    /// The network with its starting weights (the head freshly initialized for `classes`).
    fn network(&self, classes: usize, device: &Device) -> Result<ResNet> {
        let config = self.model_config(classes)?;
        let model = config.try_init_seeded(device, self.seed)?;
        initialize(&model);
        let Some(weights) = &self.weights else {
            return Ok(model);
        };
        let backbone = LoadOptions::backbone();
        Ok(match Weights::parse(weights)? {
            Weights::File(path) => model.load_torchvision_with(&path, &backbone)?,
            Weights::Pretrained(pretrained) => {
                if pretrained.preset() != self.model || self.base_channels != 64 {
                    bail!(
                        "--weights {} are a {} with 64 base channels; pass --model {}",
                        pretrained.name(),
                        pretrained.preset(),
                        pretrained.preset()
                    );
                }
                let path = pretrained.fetch(None)?;
                model.load_torchvision_with(&path, &backbone)?
            }
        })
    }

    fn optimizer(&self) -> Result<ModuleOptimizer> {
        let momentum = MomentumConfig {
            momentum: self.momentum,
            dampening: 0.0,
            nesterov: false,
        };
        let sgd = SgdConfig::new().with_momentum(Some(momentum));
        let decayed = sgd
            .clone()
            .with_weight_decay(Some(WeightDecayConfig::new(self.weight_decay as f32)));
        let no_decay = ParamGroup::from_regex(r"(^|\.)(gamma|beta|bias)$")
            .map_err(|e| anyhow::anyhow!("parameter group: {e:?}"))?;
        Ok(decayed.init().with_group(no_decay, sgd.build(), None))
    }

    /// The learning rates of step `step` of `total`: the head's, and the backbone's.
    fn learning_rates(&self, step: usize, steps_per_epoch: usize, total: usize) -> (f64, f64) {
        let at = |lr| warmup_cosine(lr, self.warmup_epochs, step, steps_per_epoch, total);
        (at(self.lr), at(self.backbone_lr))
    }
}

/// The parameters of a [`ResNet`] outside its head.
fn backbone_group() -> ParamGroup {
    ParamGroup::from_regex(r"^(conv1|bn1|layer[1-4])\.").expect("a valid regular expression")
}

/// A batch on the device: images, or feature vectors.
struct Batch<I> {
    input: I,
    targets: Tensor<1, Int>,
    len: usize,
    skipped: Vec<Skipped>,
}

impl Batch<Tensor<4>> {
    fn from_images(host: ImageBatch, size: usize, device: &Device) -> Self {
        let len = host.len();
        let images = Tensor::from_data(TensorData::new(host.images, [len, 3, size, size]), device);
        let targets = Tensor::from_data(TensorData::new(host.labels, [len]), device);
        Self {
            input: images,
            targets,
            len,
            skipped: host.skipped,
        }
    }
}

/// What a run trains: the network on images, or the head on feature vectors.
trait Trainee: Module + Clone + Send + 'static {
    type Input;
    fn logits(&self, input: Self::Input) -> Tensor<2>;
}

impl Trainee for ResNet {
    type Input = Tensor<4>;
    fn logits(&self, images: Tensor<4>) -> Tensor<2> {
        self.forward(images)
    }
}

impl Trainee for Linear {
    type Input = Tensor<2>;
    fn logits(&self, features: Tensor<2>) -> Tensor<2> {
        self.forward(features)
    }
}

/// The data of a run, by batch.
trait Batches<I> {
    fn num_batches(&self) -> usize;
    fn epoch_from(&self, epoch: usize, first: usize) -> Box<dyn Iterator<Item = Batch<I>> + '_>;
    fn eval(&self) -> Box<dyn Iterator<Item = Batch<I>> + '_>;
}

/// Full fine-tuning: images from files.
struct ImageBatches {
    train: FolderLoader,
    val: FolderLoader,
    size: usize,
    device: Device,
}

impl Batches<Tensor<4>> for ImageBatches {
    fn num_batches(&self) -> usize {
        self.train.num_batches()
    }

    fn epoch_from(
        &self,
        epoch: usize,
        first: usize,
    ) -> Box<dyn Iterator<Item = Batch<Tensor<4>>> + '_> {
        Box::new(
            self.train
                .epoch_from(epoch, first, 2)
                .map(|host| Batch::from_images(host, self.size, &self.device)),
        )
    }

    fn eval(&self) -> Box<dyn Iterator<Item = Batch<Tensor<4>>> + '_> {
        Box::new(
            self.val
                .epoch_from(0, 0, 2)
                .map(|host| Batch::from_images(host, self.size, &self.device)),
        )
    }
}

/// A linear probe: features computed once.
struct FeatureBatches {
    train: Features,
    val: Features,
    batch_size: usize,
    eval_batch_size: usize,
    seed: u64,
    device: Device,
}

/// Feature vectors of the images that could be read, on the device.
struct Features {
    values: Tensor<2>,
    labels: Vec<i64>,
}

impl FeatureBatches {
    fn batch(&self, features: &Features, indices: &[usize]) -> Batch<Tensor<2>> {
        let index = Tensor::<1, Int>::from_data(
            TensorData::new(indices.iter().map(|&i| i as i64).collect(), [indices.len()]),
            &self.device,
        );
        let labels = indices.iter().map(|&i| features.labels[i]).collect();
        Batch {
            input: features.values.clone().select(0, index),
            targets: Tensor::from_data(TensorData::new(labels, [indices.len()]), &self.device),
            len: indices.len(),
            skipped: Vec::new(),
        }
    }

    fn train_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let len = self.train.labels.len();
        epoch_batches(len, self.batch_size, Some(self.seed), epoch, true)
    }
}

impl Batches<Tensor<2>> for FeatureBatches {
    fn num_batches(&self) -> usize {
        self.train_batches(0).len()
    }

    fn epoch_from(
        &self,
        epoch: usize,
        first: usize,
    ) -> Box<dyn Iterator<Item = Batch<Tensor<2>>> + '_> {
        let batches = self.train_batches(epoch);
        Box::new(
            batches
                .into_iter()
                .skip(first)
                .map(move |indices| self.batch(&self.train, &indices)),
        )
    }

    fn eval(&self) -> Box<dyn Iterator<Item = Batch<Tensor<2>>> + '_> {
        let chunks = epoch_batches(self.val.labels.len(), self.eval_batch_size, None, 0, false);
        Box::new(
            chunks
                .into_iter()
                .map(move |indices| self.batch(&self.val, &indices)),
        )
    }
}

/// Fine-tunes on `folder` and writes the run's files into `artifact_dir`; see the module's
/// documentation. `workers` threads decode images.
pub fn finetune(
    options: &FinetuneOptions,
    folder: &ImageFolder,
    device: &Device,
    artifact_dir: &Path,
    workers: usize,
    control: &Control,
) -> Result<Outcome<FinetuneSummary>> {
    options.check()?;
    let classes = folder.classes.len();
    std::fs::create_dir_all(artifact_dir)
        .with_context(|| format!("creating the artifact folder {}", artifact_dir.display()))?;
    let autodiff = device.clone().autodiff();
    let model = options.network(classes, &autodiff)?;
    let config = model.config().clone();
    let run_config = serde_json::json!({
        "finetune": options,
        "model": config,
        "classes": folder.classes,
    });
    write_atomic(
        &artifact_dir.join("config.json"),
        serde_json::to_string_pretty(&run_config)?.as_bytes(),
    )?;
    let transforms = Transforms::new(options.image_size);
    let (train, val) = (Arc::new(folder.train.clone()), Arc::new(folder.val.clone()));
    let val_loader = FolderLoader::eval(val, transforms, options.eval_batch_size, workers);
    let mut trainer = Trainer::new(options, control, artifact_dir, &autodiff, classes)?;
    let summary = match options.freeze {
        Freeze::None => {
            let batches = ImageBatches {
                train: FolderLoader::train(
                    train,
                    transforms,
                    options.batch_size,
                    options.seed,
                    workers,
                ),
                val: val_loader,
                size: options.image_size,
                device: autodiff.clone(),
            };
            let Some(model) = trainer.run(model, &batches, Some(backbone_group()))? else {
                return Ok(trainer.interrupted());
            };
            let eval = trainer.last_evaluation(&model, &batches)?;
            trainer.finish(model, folder, device, None, eval)?
        }
        Freeze::Backbone => {
            let backbone = model.valid();
            let started = Instant::now();
            let train_loader =
                FolderLoader::eval(train, transforms, options.eval_batch_size, workers);
            let mut skipped = Vec::new();
            let label = "features of the training images";
            let train_features = extract(
                &backbone,
                &train_loader,
                device,
                &mut skipped,
                control,
                label,
            )?;
            let label = "features of the validation images";
            let val_features =
                extract(&backbone, &val_loader, device, &mut skipped, control, label)?;
            trainer.note_skipped(skipped);
            let images = train_features.labels.len() + val_features.labels.len();
            let seconds = started.elapsed().as_secs_f64();
            let per_second = images as f64 / seconds;
            println!("features of {images} images in {seconds:.1}s ({per_second:.1} images/s)");
            let standardize = Standardize::fit(&train_features.values);
            let to_autodiff = |f: Features| Features {
                values: standardize.apply(f.values).to_device(&autodiff),
                labels: f.labels,
            };
            let batches = FeatureBatches {
                train: to_autodiff(train_features),
                val: to_autodiff(val_features),
                batch_size: options.batch_size,
                eval_batch_size: options.eval_batch_size,
                seed: options.seed,
                device: autodiff.clone(),
            };
            let Some(head) = trainer.run(model.fc.clone(), &batches, None)? else {
                return Ok(trainer.interrupted());
            };
            let eval = trainer.last_evaluation(&head, &batches)?;
            let mut model = model;
            model.fc = standardize.fold_into(head.valid()).fork(&autodiff);
            trainer.finish(model, folder, device, Some(per_second), eval)?
        }
    };
    Ok(Outcome::Finished(summary))
}

/// The probe's standardization of the features: each dimension to mean 0 and variance 1 over
/// the training images (as a BatchNorm without affine parameters in MAE's linear probe), so
/// the head trains at the same learning rate whatever the scale of the backbone's features.
/// The exported head absorbs it: `W (x - mean) / std + b = (W / std) x + (b - W mean / std)`.
struct Standardize {
    mean: Tensor<2>,
    std: Tensor<2>,
}

impl Standardize {
    fn fit(features: &Tensor<2>) -> Self {
        let mean = features.clone().mean_dim(0);
        let variance = (features.clone() - mean.clone()).square().mean_dim(0);
        Self {
            mean,
            std: (variance + 1e-6).sqrt(),
        }
    }

    fn apply(&self, features: Tensor<2>) -> Tensor<2> {
        (features - self.mean.clone()) / self.std.clone()
    }

    /// The head that computes on raw features what `head` computes on standardized ones.
    fn fold_into(&self, head: Linear) -> Linear {
        let device = head.weight.val().device();
        let (mean, std) = (
            self.mean.clone().to_device(&device),
            self.std.clone().to_device(&device),
        );
        // Burn's weight is [inputs, outputs]; the statistics are [1, inputs].
        let weight = head.weight.val() / std.clone().transpose();
        let shift = (mean / std).matmul(head.weight.val()).reshape([-1]);
        let bias = head.bias.as_ref().map(|b| b.val() - shift);
        Linear {
            weight: Param::from_tensor(weight),
            bias: bias.map(Param::from_tensor),
        }
    }
}

/// The backbone's features of every image `loader` gives, on `device`.
fn extract(
    backbone: &ResNet,
    loader: &FolderLoader,
    device: &Device,
    skipped: &mut Vec<Skipped>,
    control: &Control,
    label: &str,
) -> Result<Features> {
    let bar = match control.progress {
        true => styled_bar(loader.num_batches(), label),
        false => indicatif::ProgressBar::hidden(),
    };
    let backbone = backbone.clone().fork(device);
    let (mut parts, mut labels) = (Vec::new(), Vec::new());
    for host in loader.epoch_from(0, 0, 2) {
        skipped.extend(host.skipped.iter().cloned());
        if !host.is_empty() {
            let batch = Batch::from_images(host, loader.transforms().size, device);
            parts.push(backbone.forward_features(batch.input));
            labels.extend(batch_labels(&batch.targets)?);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if parts.is_empty() {
        bail!("none of the images of {label} could be read (see the errors above)");
    }
    Ok(Features {
        values: Tensor::cat(parts, 0),
        labels,
    })
}

fn batch_labels(targets: &Tensor<1, Int>) -> Result<Vec<i64>> {
    targets
        .to_data()
        .try_into_vec_as::<i64>()
        .map_err(|e| anyhow::anyhow!("reading labels: {e:?}"))
}

/// The validation results of an epoch.
struct Evaluation {
    loss: f64,
    accuracy: f64,
    confusion: Vec<Vec<usize>>,
}

/// The loop over epochs and steps, whatever it trains.
struct Trainer<'a> {
    options: &'a FinetuneOptions,
    control: &'a Control,
    artifact_dir: &'a Path,
    checkpoint_path: PathBuf,
    optimizer: ModuleOptimizer,
    state: RunState,
    loss: CrossEntropyLoss,
    eval_loss: CrossEntropyLoss,
    last_checkpoint: Instant,
    steps_this_process: usize,
    classes: usize,
    last_eval: Option<Evaluation>,
}

impl<'a> Trainer<'a> {
    fn new(
        options: &'a FinetuneOptions,
        control: &'a Control,
        artifact_dir: &'a Path,
        device: &Device,
        classes: usize,
    ) -> Result<Self> {
        Ok(Self {
            options,
            control,
            artifact_dir,
            checkpoint_path: artifact_dir.join("checkpoint.bin"),
            optimizer: options.optimizer()?,
            state: RunState {
                options: Some(options.clone()),
                ..RunState::default()
            },
            loss: loss_fn(options.label_smoothing, device),
            eval_loss: loss_fn(0.0, device),
            last_checkpoint: Instant::now(),
            steps_this_process: 0,
            classes,
            last_eval: None,
        })
    }

    fn interrupted<S>(&self) -> Outcome<S> {
        Outcome::Interrupted {
            epoch: self.state.epoch + 1,
            step: self.state.step,
        }
    }

    /// Trains `model` over the epochs left, the parameters of `backbone` (if any) at the
    /// backbone's learning rate; `None` when stopped (after a checkpoint).
    fn run<M: Trainee>(
        &mut self,
        mut model: M,
        batches: &dyn Batches<M::Input>,
        backbone: Option<ParamGroup>,
    ) -> Result<Option<M>> {
        if self.control.resume && self.checkpoint_path.exists() {
            model = self.load_checkpoint(model)?;
            if self.control.progress {
                println!(
                    "resuming from {} at epoch {}, step {}",
                    self.checkpoint_path.display(),
                    self.state.epoch + 1,
                    self.state.step
                );
            }
        }
        let (epochs, steps_per_epoch) = (self.options.epochs, batches.num_batches());
        let total = steps_per_epoch * epochs;
        while self.state.epoch < epochs {
            let epoch = self.state.epoch;
            let bar = progress_bar(self.control.progress, steps_per_epoch, epoch, epochs);
            bar.set_position(self.state.step as u64);
            let mut log = LogLine::new(self.control.progress);
            let started = Instant::now();
            let mut lr = 0.0;
            for batch in batches.epoch_from(epoch, self.state.step) {
                let at = epoch * steps_per_epoch + self.state.step;
                let (head_lr, backbone_lr) =
                    self.options.learning_rates(at, steps_per_epoch, total);
                lr = head_lr;
                let mut rates = ModuleLrScheduler::new(ConstantLr::from(head_lr));
                if let Some(group) = &backbone {
                    rates = rates.with_group(group.clone(), ConstantLr::from(backbone_lr));
                }
                model = self.step(model, batch, rates.step())?;
                bar.inc(1);
                let state = &self.state;
                let seconds = state.epoch_seconds + started.elapsed().as_secs_f64();
                let message = format!(
                    "loss {:.3} acc {:.1}% lr {head_lr:.5} {:.1} img/s",
                    state.loss_sum / state.seen.max(1) as f64,
                    100.0 * state.correct as f64 / state.seen.max(1) as f64,
                    state.seen as f64 / seconds
                );
                if log.as_mut().is_some_and(LogLine::due) {
                    let per_step = started.elapsed().as_secs_f64() / self.steps_this_process as f64;
                    println!(
                        "epoch {}/{epochs} step {}/{steps_per_epoch}: {message}, the epoch ends in {}",
                        epoch + 1,
                        state.step,
                        about(per_step * (steps_per_epoch - state.step) as f64)
                    );
                }
                bar.set_message(message);
                let stop = self.control.stop_requested(self.steps_this_process);
                if stop && self.state.step < steps_per_epoch {
                    self.state.epoch_seconds += started.elapsed().as_secs_f64();
                    self.save_checkpoint(&model, &self.state.clone())?;
                    bar.abandon_with_message(format!(
                        "stopped; checkpoint in {}",
                        self.checkpoint_path.display()
                    ));
                    return Ok(None);
                }
                let due = self.control.checkpoint_due(self.last_checkpoint);
                if due && self.state.step < steps_per_epoch {
                    let mut state = self.state.clone();
                    state.epoch_seconds += started.elapsed().as_secs_f64();
                    self.save_checkpoint(&model, &state)?;
                }
            }
            bar.finish_and_clear();
            let seconds = self.state.epoch_seconds + started.elapsed().as_secs_f64();
            self.end_epoch(&model, batches, seconds, lr)?;
            if self.control.stop.load(Ordering::SeqCst) && self.state.epoch < epochs {
                return Ok(None);
            }
        }
        Ok(Some(model))
    }

    fn step<M: Trainee>(
        &mut self,
        model: M,
        batch: Batch<M::Input>,
        lr: ModuleLearningRate,
    ) -> Result<M> {
        let (epoch, step) = (self.state.epoch, self.state.step);
        self.note_skipped(batch.skipped);
        let mut model = model;
        if batch.len > 0 {
            let logits = model.logits(batch.input);
            let loss = self.loss.forward(logits.clone(), batch.targets.clone());
            let totals = loss_and_correct(&loss, logits, batch.targets);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let values = read_joined(vec![totals])
                .with_context(|| format!("epoch {}, step {}", epoch + 1, step + 1))?;
            if !values[0].is_finite() {
                return Err(NonFiniteLoss {
                    epoch: epoch + 1,
                    step: step + 1,
                    loss: values[0],
                }
                .into());
            }
            model = self.optimizer.step(lr, model, grads);
            self.state.loss_sum += values[0] as f64 * batch.len as f64;
            self.state.correct += values[1] as u64;
            self.state.seen += batch.len as u64;
        }
        self.state.step += 1;
        self.steps_this_process += 1;
        Ok(model)
    }

    fn evaluate<M: Trainee>(
        &mut self,
        model: &M,
        batches: &dyn Batches<M::Input>,
    ) -> Result<Evaluation> {
        let classes = self.classes;
        let model = model.valid();
        let mut confusion = vec![vec![0usize; classes]; classes];
        let (mut loss_sum, mut seen) = (0f64, 0usize);
        for batch in batches.eval() {
            self.note_skipped(batch.skipped);
            if batch.len == 0 {
                continue;
            }
            let logits = model.logits(batch.input);
            let loss = self
                .eval_loss
                .forward(logits.clone(), batch.targets.clone());
            let predicted = logits.argmax(1).reshape([batch.len]);
            let joined = Tensor::cat(
                vec![loss.reshape([1]), predicted.float(), batch.targets.float()],
                0,
            );
            let values = read_joined(vec![joined])?;
            loss_sum += values[0] as f64 * batch.len as f64;
            let (predicted, truth) = values[1..].split_at(batch.len);
            for (&p, &t) in predicted.iter().zip(truth) {
                confusion[t as usize][p as usize] += 1;
            }
            seen += batch.len;
        }
        let correct: usize = (0..classes).map(|c| confusion[c][c]).sum();
        Ok(Evaluation {
            loss: loss_sum / seen.max(1) as f64,
            accuracy: correct as f64 / seen.max(1) as f64,
            confusion,
        })
    }

    /// Remembers images that could not be read, reporting each once.
    fn note_skipped(&mut self, skipped: Vec<Skipped>) {
        for Skipped { path, reason } in skipped {
            if let Entry::Vacant(entry) = self.state.skipped.entry(path) {
                println!("skipping {}: {reason}", entry.key().display());
                entry.insert(reason);
            }
        }
    }

    /// After an epoch's steps: the evaluation, the epoch's line, `metrics.csv`, `curves.png`
    /// and the checkpoint.
    fn end_epoch<M: Trainee>(
        &mut self,
        model: &M,
        batches: &dyn Batches<M::Input>,
        seconds: f64,
        lr: f64,
    ) -> Result<()> {
        let epoch = self.state.epoch + 1;
        let eval = self
            .evaluate(model, batches)
            .with_context(|| format!("evaluating after epoch {epoch}"))?;
        let state = &mut self.state;
        let seen = state.seen.max(1) as f64;
        let metrics = EpochMetrics {
            epoch,
            lr,
            train_loss: state.loss_sum / seen,
            train_accuracy: state.correct as f64 / seen,
            test_loss: Some(eval.loss),
            test_accuracy: Some(eval.accuracy),
            seconds,
            images_per_second: state.seen as f64 / seconds,
        };
        println!(
            "epoch {:>3}/{}  train loss {:.4} acc {:.2}%  val loss {:.4} acc {:.2}%  {:.1}s  {:.1} img/s",
            epoch,
            self.options.epochs,
            metrics.train_loss,
            100.0 * metrics.train_accuracy,
            eval.loss,
            100.0 * eval.accuracy,
            seconds,
            metrics.images_per_second
        );
        state.history.push(metrics);
        state.epoch += 1;
        state.step = 0;
        state.loss_sum = 0.0;
        state.correct = 0;
        state.seen = 0;
        state.epoch_seconds = 0.0;
        write_metrics(self.artifact_dir, &state.history)?;
        self.last_eval = Some(eval);
        self.save_checkpoint(model, &self.state.clone())
    }

    fn save_checkpoint<M: Module>(&mut self, model: &M, state: &RunState) -> Result<()> {
        checkpoint::save(&self.checkpoint_path, state, model, &self.optimizer)?;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Continues from the checkpoint: refused when it was written with other options.
    fn load_checkpoint<M: Module>(&mut self, model: M) -> Result<M> {
        let (path, options) = (&self.checkpoint_path, self.options);
        let check = |state: &RunState| {
            let comparable = |o: &FinetuneOptions| FinetuneOptions {
                epochs: 0,
                eval_batch_size: 0,
                ..o.clone()
            };
            match &state.options {
                Some(saved) if comparable(saved) != comparable(options) => bail!(
                    "{} was written by a run with other options ({saved:?}); resume with the \
                     same options (only --epochs and --eval-batch-size may change) or use another \
                     --artifact-dir",
                    path.display()
                ),
                _ => Ok(()),
            }
        };
        let (model, optimizer, state) =
            checkpoint::load(path, model, self.optimizer.clone(), check)?;
        self.optimizer = optimizer;
        self.state = state;
        Ok(model)
    }

    /// The evaluation after the last epoch: the one [`end_epoch`](Self::end_epoch) made, or,
    /// when this process resumed a run that had ended, a new one.
    fn last_evaluation<M: Trainee>(
        &mut self,
        model: &M,
        batches: &dyn Batches<M::Input>,
    ) -> Result<Evaluation> {
        match self.last_eval.take() {
            Some(eval) => Ok(eval),
            None => self.evaluate(model, batches),
        }
    }

    /// After the last epoch: `model.safetensors`, `model.bpk` and `summary.json`.
    fn finish(
        self,
        model: ResNet,
        folder: &ImageFolder,
        device: &Device,
        feature_images_per_second: Option<f64>,
        eval: Evaluation,
    ) -> Result<FinetuneSummary> {
        let dir = self.artifact_dir;
        let model = model.valid();
        let metadata = HashMap::from([
            (
                "classes".to_string(),
                serde_json::to_string(&folder.classes)?,
            ),
            ("config".to_string(), serde_json::to_string(model.config())?),
        ]);
        let safetensors_path = dir.join("model.safetensors");
        model
            .save_torchvision_with_metadata(&safetensors_path, metadata)
            .with_context(|| format!("writing {}", safetensors_path.display()))?;
        let bytes = model.clone().into_record().into_bytes()?;
        write_atomic(&dir.join("model.bpk"), &bytes)?;

        let history = &self.state.history;
        let train_seconds: f64 = history.iter().map(|m| m.seconds).sum();
        let images: f64 = history
            .iter()
            .map(|m| m.images_per_second * m.seconds)
            .sum();
        let per_class = folder
            .classes
            .iter()
            .enumerate()
            .map(|(c, class)| {
                let images: usize = eval.confusion[c].iter().sum();
                ClassAccuracy {
                    class: class.clone(),
                    images,
                    accuracy: eval.confusion[c][c] as f64 / images.max(1) as f64,
                }
            })
            .collect();
        let summary = FinetuneSummary {
            model: self.options.model.clone(),
            weights: self.options.weights.clone(),
            freeze: self.options.freeze,
            backend: format!("{device:?}"),
            classes: folder.classes.clone(),
            epochs: history.len(),
            val_accuracy: eval.accuracy,
            best_val_accuracy: history
                .iter()
                .filter_map(|m| m.test_accuracy)
                .fold(0.0, f64::max),
            per_class,
            confusion: eval.confusion,
            train_images: folder.train.len(),
            val_images: folder.val.len(),
            train_seconds,
            images_per_second: images / train_seconds.max(1e-9),
            feature_images_per_second,
            skipped: self
                .state
                .skipped
                .iter()
                .map(|(path, reason)| Skipped {
                    path: path.clone(),
                    reason: reason.clone(),
                })
                .collect(),
            ignored: folder.ignored.clone(),
        };
        write_atomic(
            &dir.join("summary.json"),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
        Ok(summary)
    }
}

/// The per-class accuracy table of a summary, for a terminal.
pub fn class_table(summary: &FinetuneSummary) -> String {
    let width = summary
        .classes
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(5)
        .max(5);
    let mut table = format!("{:width$}  images  accuracy\n", "class");
    for class in &summary.per_class {
        table.push_str(&format!(
            "{:width$}  {:>6}  {:>7.2}%\n",
            class.class,
            class.images,
            100.0 * class.accuracy
        ));
    }
    table
}
