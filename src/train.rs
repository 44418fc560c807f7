//! The CIFAR-10 training loop of `examples/cifar10.rs`: SGD with Nesterov momentum, weight
//! decay on convolution and linear weights only, linear warm-up then cosine decay of the
//! learning rate, label smoothing, crop + flip (+ Cutout) augmentation, evaluation with
//! BatchNorm's running statistics, and crash-safe checkpoints that resume exactly. Given
//! several devices, or several processes ([`train_with`]), it trains data-parallel
//! ([`crate::parallel`]); with f16 convolutions, with dynamic loss scaling
//! ([`crate::scaler`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use burn::module::{Module, ParamGroup};
use burn::nn::loss::CrossEntropyLoss;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{ModuleOptimizer, SgdConfig};
use burn::tensor::Device;
use cifar10_burn::{Augmentation, Cifar10Batch, Cifar10Dataset, EpochLoader, HostBatch};
use resnet_burn::{Precision, ResNet, ResNetConfig, Stem};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, write_atomic};
use crate::parallel::{
    Collective, DataParallel, Local, StepOutput, average_running_stats, check_in_step, checksum,
    differ_from_first, initialize, loss_and_correct, loss_fn, read_joined,
};
use crate::plot::EpochPoint;
use crate::progress::{LogLine, about, progress_bar, styled_bar};
use crate::scaler::{LossScaler, unscale};

/// Everything that decides what a run computes. Saved as `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// A preset of resnet-burn (`resnet18`, `resnet50`, ...), built with the CIFAR stem.
    pub model: String,
    /// Channels of the first stage (64 as in torchvision; smaller for quick runs).
    pub base_channels: usize,
    /// Passes over the training set.
    pub epochs: usize,
    /// Training images per step.
    pub batch_size: usize,
    /// Images per evaluation step.
    pub eval_batch_size: usize,
    /// Peak learning rate, reached at the end of the warm-up.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay of convolution and linear weights (not BatchNorm, not biases).
    pub weight_decay: f64,
    /// Label smoothing of the training loss (0 turns it off).
    pub label_smoothing: f32,
    /// Epochs of linear warm-up from 0 to `lr`, before the cosine decay to 0.
    pub warmup_epochs: f64,
    /// Random crop with 4-pixel padding and horizontal flip.
    pub augment: bool,
    /// Cutout square side (e.g. 16), if any.
    pub cutout: Option<usize>,
    /// Seed of initialization, shuffling and augmentation.
    pub seed: u64,
    /// Train on the first N training images only.
    pub limit_train: Option<usize>,
    /// Evaluate on the first N test images only.
    pub limit_test: Option<usize>,
    /// Evaluate every N epochs (and always after the last one). It does not change what is
    /// trained, so a resumed run may change it.
    #[serde(default = "every_epoch")]
    pub eval_every: usize,
    /// After the last epoch, also evaluate with horizontal-flip test-time augmentation (the
    /// mean of the logits of each image and of its mirror image), reported as
    /// [`Summary::test_accuracy_flip`]. Like `eval_every`, a resumed run may change it.
    #[serde(default)]
    pub eval_flip: bool,
    /// The network's float types ([`Precision`]); with [`Precision::F16`] the loop scales the
    /// loss dynamically ([`crate::scaler`]).
    #[serde(default)]
    pub precision: Precision,
}

fn every_epoch() -> usize {
    1
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            model: "resnet18".into(),
            base_channels: 64,
            epochs: 30,
            batch_size: 128,
            eval_batch_size: 500,
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            label_smoothing: 0.1,
            warmup_epochs: 1.0,
            augment: true,
            cutout: None,
            seed: 42,
            limit_train: None,
            limit_test: None,
            eval_every: every_epoch(),
            eval_flip: false,
            precision: Precision::F32,
        }
    }
}

impl TrainOptions {
    /// The network these options train: a preset with the CIFAR stem and 10 classes.
    pub fn model_config(&self) -> Result<ResNetConfig> {
        let config = ResNetConfig::from_name(&self.model, 10).with_context(|| {
            format!(
                "unknown model {:?}; choose one of {:?}",
                self.model,
                ResNetConfig::PRESETS
            )
        })?;
        let config = config
            .with_stem(Stem::Cifar)
            .with_base_channels(self.base_channels)
            .with_precision(self.precision);
        config.validate()?;
        Ok(config)
    }

    /// The learning rate at optimizer step `step` of `total` (`steps_per_epoch` a epoch):
    /// `lr * (step + 1) / warmup` over the warm-up steps, then a cosine from `lr` to 0.
    ///
    /// A pure function of the step, so a run resumed mid-epoch takes up exactly where it
    /// stopped. burn-optim's schedulers cannot give these values: its `LinearLrScheduler`
    /// refuses a start of 0 and a rate above 1, and its schedulers are stateful iterators.
    pub fn learning_rate(&self, step: usize, steps_per_epoch: usize, total: usize) -> f64 {
        warmup_cosine(self.lr, self.warmup_epochs, step, steps_per_epoch, total)
    }

    /// SGD with these options' momentum and weight decay (not on BatchNorm parameters and
    /// biases); the learning rate is given at each step.
    pub fn optimizer(&self) -> Result<ModuleOptimizer> {
        let momentum = MomentumConfig {
            momentum: self.momentum,
            dampening: 0.0, // PyTorch's SGD; Burn's default is 0.1
            nesterov: self.nesterov,
        };
        let sgd = SgdConfig::new().with_momentum(Some(momentum));
        let decayed = sgd
            .clone()
            .with_weight_decay(Some(WeightDecayConfig::new(self.weight_decay as f32)));
        // BatchNorm weights and biases, and the head's bias, are not decayed.
        let no_decay = ParamGroup::from_regex(r"\.(gamma|beta|bias)$")
            .map_err(|e| anyhow::anyhow!("parameter group: {e:?}"))?;
        Ok(decayed.init().with_group(no_decay, sgd.build(), None))
    }
}

/// The learning rate at step `step` of `total` (`steps_per_epoch` an epoch) of a schedule
/// peaking at `lr`: `lr * (step + 1) / warmup` over `warmup_epochs`, then a cosine to 0.
pub fn warmup_cosine(
    lr: f64,
    warmup_epochs: f64,
    step: usize,
    steps_per_epoch: usize,
    total: usize,
) -> f64 {
    let warmup = (warmup_epochs * steps_per_epoch as f64).round() as usize;
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    0.5 * lr * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// One line of `metrics.csv`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch.
    pub epoch: usize,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Mean training loss (with label smoothing) over the epoch.
    pub train_loss: f64,
    /// Training accuracy over the epoch (augmented images, training-mode BatchNorm).
    pub train_accuracy: f64,
    /// Mean test loss, if the epoch was evaluated (see [`TrainOptions::eval_every`]).
    pub test_loss: Option<f64>,
    /// Test accuracy, if the epoch was evaluated.
    pub test_accuracy: Option<f64>,
    /// Wall-clock seconds of the epoch's training steps (evaluation excluded).
    pub seconds: f64,
    /// Training images per second.
    pub images_per_second: f64,
}

impl EpochMetrics {
    /// The values `curves.png` draws.
    pub fn point(&self) -> EpochPoint {
        EpochPoint {
            epoch: self.epoch,
            train_loss: self.train_loss,
            train_accuracy: self.train_accuracy,
            test_loss: self.test_loss,
            test_accuracy: self.test_accuracy,
        }
    }

    const CSV_HEADER: &str =
        "epoch,lr,train_loss,train_accuracy,test_loss,test_accuracy,seconds,images_per_second";

    /// A line of `metrics.csv`; the test cells are empty for an epoch not evaluated.
    fn csv_line(&self) -> String {
        let cell = |value: Option<f64>| value.map_or(String::new(), |v| format!("{v:.6}"));
        format!(
            "{},{:.6},{:.6},{:.6},{},{},{:.3},{:.1}",
            self.epoch,
            self.lr,
            self.train_loss,
            self.train_accuracy,
            cell(self.test_loss),
            cell(self.test_accuracy),
            self.seconds,
            self.images_per_second
        )
    }
}

/// `summary.json`: what a program reading the run needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    /// The preset trained.
    pub model: String,
    /// The device, as Burn names it (devices, comma-separated, for data-parallel runs).
    pub backend: String,
    /// Epochs trained.
    pub epochs: usize,
    /// Test accuracy after the last epoch.
    pub test_accuracy: f64,
    /// Best test accuracy over the epochs evaluated.
    pub best_test_accuracy: f64,
    /// Seconds spent in training steps, over all epochs.
    pub train_seconds: f64,
    /// Training images per second over all epochs.
    pub images_per_second: f64,
    /// Trainable parameters (torchvision's count).
    pub trainable_params: usize,
    /// Training and test images used.
    pub train_images: usize,
    /// Test images used.
    pub test_images: usize,
    /// Seconds from the start of training (the model's construction included) to the end of
    /// this process's first step, on a GPU mostly kernel compilation and autotuning; 0 if this
    /// process took no step (a resumed run that was already complete).
    pub first_step_seconds: f64,
    /// Test accuracy after the last epoch with horizontal-flip test-time augmentation, when
    /// [`TrainOptions::eval_flip`] asked for it.
    #[serde(default)]
    pub test_accuracy_flip: Option<f64>,
    /// Steps skipped because their gradients overflowed f16 (loss scaling, see
    /// [`crate::scaler`]); 0 in f32.
    #[serde(default)]
    pub skipped_steps: usize,
    /// Processes that trained together ([`train_with`]); 1 for an ordinary run.
    #[serde(default = "one")]
    pub processes: usize,
    /// A 64-bit hash of the trained model's parameters and running statistics, in hex
    /// ([`checksum`]): equal on every process of a distributed run, and between runs that
    /// trained the same model bit for bit.
    #[serde(default)]
    pub checksum: String,
    /// Seconds process 0 spent in the all-reduce of the gradients, over this process's steps
    /// (see [`DataParallel::reduce_time`]); 0 for one process.
    #[serde(default)]
    pub all_reduce_seconds: f64,
}

fn one() -> usize {
    1
}

/// A loss that is NaN or infinite: the run stops, the last checkpoint stays as it was.
#[derive(Debug, thiserror::Error)]
#[error(
    "the training loss became {loss} at epoch {epoch}, step {step}: the run is stopped \
     (the checkpoint of the last completed epoch is intact); lower --lr or check the data"
)]
pub struct NonFiniteLoss {
    /// 1-based epoch.
    pub epoch: usize,
    /// 1-based step within the epoch.
    pub step: usize,
    /// The loss value.
    pub loss: f32,
}

/// How a run ended: with its summary, or stopped.
#[derive(Debug)]
pub enum Outcome<S = Summary> {
    /// All epochs done.
    Finished(S),
    /// Stopped on request (Ctrl-C) after a checkpoint; `--resume` continues.
    Interrupted {
        /// 1-based epoch in progress.
        epoch: usize,
        /// Steps of it done.
        step: usize,
    },
}

/// What the caller controls while a run goes on.
#[derive(Clone, Debug, Default)]
pub struct Control {
    /// Continue from `artifact_dir/checkpoint.bin` if it exists.
    pub resume: bool,
    /// Set (by a Ctrl-C handler) to stop after the current step with a checkpoint.
    pub stop: Arc<AtomicBool>,
    /// Stop as if interrupted once this many steps have run in this process (tests).
    pub stop_after_steps: Option<usize>,
    /// Also write a checkpoint within epochs, after the first step that ends this long after
    /// the last checkpoint: a crash then loses at most this much work (and a step). `None`:
    /// at the end of each epoch and on a stop only.
    pub checkpoint_every: Option<Duration>,
    /// Show progress within epochs and evaluations: bars on a terminal, a line a minute in a
    /// log (a line per epoch is printed either way).
    pub progress: bool,
}

impl Control {
    /// Whether to stop after the step just taken, the `steps`-th of this process: Ctrl-C, or
    /// `stop_after_steps` reached.
    pub(crate) fn stop_requested(&self, steps: usize) -> bool {
        self.stop.load(Ordering::SeqCst) || self.stop_after_steps.is_some_and(|n| steps >= n)
    }

    /// Whether a checkpoint within the epoch is due, the last one written at `last`.
    pub(crate) fn checkpoint_due(&self, last: Instant) -> bool {
        self.checkpoint_every
            .is_some_and(|every| last.elapsed() >= every)
    }
}

/// Progress that survives a restart: saved in every checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct RunState {
    /// Completed epochs.
    epoch: usize,
    /// Completed steps of the epoch in progress.
    step: usize,
    loss_sum: f64,
    correct: u64,
    seen: u64,
    epoch_seconds: f64,
    history: Vec<EpochMetrics>,
    options: Option<TrainOptions>,
    /// Loss scaling, in f16.
    #[serde(default)]
    scaler: Option<LossScaler>,
    /// Steps skipped by loss scaling, over the run.
    #[serde(default)]
    skipped_steps: usize,
    /// Processes of the run ([`train_with`]).
    #[serde(default = "one")]
    processes: usize,
}

/// Trains `options.model` on `train` and evaluates on `test` every `options.eval_every`
/// epochs and after the last, writing
/// `config.json`, `metrics.csv`, `curves.png`, `checkpoint.bin`, `model.bpk`,
/// `model.safetensors` and `summary.json` into `artifact_dir`.
///
/// With several `devices`, each step splits its batch between them (data parallel, see
/// [`crate::parallel`]); the first device holds the model and the optimizer, and
/// evaluates.
pub fn train(
    options: &TrainOptions,
    train: Arc<Cifar10Dataset>,
    test: Arc<Cifar10Dataset>,
    devices: &[Device],
    artifact_dir: &Path,
    control: &Control,
) -> Result<Outcome> {
    train_with(options, train, test, devices, artifact_dir, control, &Local)
}

/// [`train`] as one of the processes of `collective`, which every process calls with the
/// same arguments (but for `control.progress`): each takes its part of every batch (the
/// batches of a one-process run, split by rank), the gradients are summed over the processes
/// ([`crate::parallel`]), and every process steps the same optimizer, so the parameters stay
/// equal (checked after every epoch). Evaluation is shared. Process 0 writes the files and
/// prints the epoch lines; a checkpoint resumes with the same number of processes.
///
/// Fails on every process when one of them cannot go on, as far as the processes can tell
/// (a checkpoint for another number of processes, other options, parameters that drifted
/// apart); a process whose own step fails returns its error alone, and the caller must stop
/// the others (with MPI, `distributed::Mpi::abort`).
pub fn train_with(
    options: &TrainOptions,
    train: Arc<Cifar10Dataset>,
    test: Arc<Cifar10Dataset>,
    devices: &[Device],
    artifact_dir: &Path,
    control: &Control,
    collective: &dyn Collective,
) -> Result<Outcome> {
    let (mut run, mut model) =
        Run::start(options, &train, devices, artifact_dir, control, collective)?;
    while run.state.epoch < options.epochs {
        let end;
        (model, end) = run.epoch(model)?;
        let Some(end) = end else {
            return Ok(Outcome::Interrupted {
                epoch: run.state.epoch + 1,
                step: run.state.step,
            });
        };
        model = run.end_epoch(model, end, &test)?;
        let [stop] = run.any_process([control.stop.load(Ordering::SeqCst)])?;
        if stop && run.state.epoch < options.epochs {
            return Ok(Outcome::Interrupted {
                epoch: run.state.epoch + 1,
                step: 0,
            });
        }
    }
    run.finish(model, &train, &test).map(Outcome::Finished)
}

/// A run in progress: what [`train`]'s steps share besides the model, which they take and
/// give back (the optimizer updates it in place only where nothing else holds it).
struct Run<'a> {
    options: &'a TrainOptions,
    control: &'a Control,
    devices: &'a [Device],
    artifact_dir: &'a Path,
    checkpoint_path: PathBuf,
    collective: &'a dyn Collective,
    /// Process 0, which writes the files and prints the epoch lines.
    leader: bool,
    replicas: DataParallel<'a>,
    optimizer: ModuleOptimizer,
    state: RunState,
    loader: EpochLoader,
    eval_loss: CrossEntropyLoss,
    started: Instant,
    last_checkpoint: Instant,
    steps_this_process: usize,
    first_step_seconds: Option<f64>,
}

/// How an epoch's training steps ended.
struct EpochEnd {
    /// Seconds of training in the epoch, over every process that ran part of it.
    seconds: f64,
    /// The learning rate of its last step.
    lr: f64,
}

impl<'a> Run<'a> {
    /// Checks the options, builds the model and optimizer (from the checkpoint when
    /// resuming), and writes `config.json`.
    fn start(
        options: &'a TrainOptions,
        train: &Arc<Cifar10Dataset>,
        devices: &'a [Device],
        artifact_dir: &'a Path,
        control: &'a Control,
        collective: &'a dyn Collective,
    ) -> Result<(Self, ResNet)> {
        let config = options.model_config()?;
        let Some(device) = devices.first() else {
            bail!("no device to train on");
        };
        if options.eval_every == 0 {
            bail!("--eval-every must be at least 1");
        }
        let (rank, processes) = (collective.rank(), collective.size());
        let replicas_total = devices.len() * processes;
        let step_images = options.batch_size.min(train.len());
        if step_images < replicas_total {
            let (what, count) = match processes {
                1 => ("devices", format!("{}", devices.len())),
                _ => (
                    "devices times processes",
                    format!("{} x {processes}", devices.len()),
                ),
            };
            bail!(
                "--batch-size {} gives steps of {step_images} images, fewer than the {what} \
                 ({count}): each needs at least one image a step",
                options.batch_size
            );
        }
        agree_on_options(options, collective)?;
        let autodiff_devices: Vec<Device> = devices.iter().map(|d| d.clone().autodiff()).collect();
        let replicas =
            DataParallel::distributed(&autodiff_devices, options.label_smoothing, collective)?;
        let leader = rank == 0;
        if leader {
            std::fs::create_dir_all(artifact_dir).with_context(|| {
                format!("creating the artifact folder {}", artifact_dir.display())
            })?;
        }
        let checkpoint_path = artifact_dir.join("checkpoint.bin");
        let started = Instant::now();
        // Drawn from a generator of its own: the same weights on every backend, whatever other
        // threads draw from Burn's meanwhile.
        let mut model = config.try_init_seeded(replicas.main_device(), options.seed)?;
        initialize(&model);
        let mut optimizer = options.optimizer()?;
        let mut state = RunState {
            options: Some(options.clone()),
            scaler: (options.precision == Precision::F16).then(LossScaler::default),
            processes,
            ..RunState::default()
        };
        // Process 0 reads the checkpoint and sends it to the others (which may run on
        // machines without the folder); none at all is an empty one.
        let mut checkpoint = Vec::new();
        if leader && control.resume && checkpoint_path.exists() {
            checkpoint = std::fs::read(&checkpoint_path)
                .with_context(|| format!("reading {}", checkpoint_path.display()))?;
        }
        collective
            .broadcast(&mut checkpoint)
            .context("sending the checkpoint to every process")?;
        if !checkpoint.is_empty() {
            (model, optimizer, state) = load_checkpoint(
                &checkpoint_path,
                &checkpoint,
                model,
                optimizer,
                options,
                processes,
            )?;
            if control.progress {
                println!(
                    "resuming from {} at epoch {}, step {}",
                    checkpoint_path.display(),
                    state.epoch + 1,
                    state.step
                );
            }
        }
        if leader {
            let run_config =
                serde_json::json!({ "train": options, "model": config, "processes": processes });
            write_atomic(
                &artifact_dir.join("config.json"),
                serde_json::to_string_pretty(&run_config)?.as_bytes(),
            )?;
        }
        let augmentation = options.augment.then(|| Augmentation {
            cutout: options.cutout,
            ..Augmentation::default()
        });
        let loader = EpochLoader::train(
            train.clone(),
            options.batch_size,
            augmentation,
            options.seed,
        )
        .part(rank, processes);
        let run = Self {
            options,
            control,
            devices,
            artifact_dir,
            checkpoint_path,
            collective,
            leader,
            replicas,
            optimizer,
            state,
            loader,
            eval_loss: loss_fn(0.0, device),
            started,
            last_checkpoint: started,
            steps_this_process: 0,
            first_step_seconds: None,
        };
        Ok((run, model))
    }

    /// The learning rate of step `step` of the epoch in progress.
    fn learning_rate(&self, step: usize) -> f64 {
        let steps_per_epoch = self.loader.num_batches();
        let total = steps_per_epoch * self.options.epochs;
        let at = self.state.epoch * steps_per_epoch + step;
        self.options.learning_rate(at, steps_per_epoch, total)
    }

    /// The training steps of the epoch in progress, from the step the state is at; `None`
    /// when a stop was asked for within it (after writing a checkpoint).
    fn epoch(&mut self, mut model: ResNet) -> Result<(ResNet, Option<EpochEnd>)> {
        let (epoch, epochs) = (self.state.epoch, self.options.epochs);
        let steps_per_epoch = self.loader.num_batches();
        let bar = progress_bar(self.control.progress, steps_per_epoch, epoch, epochs);
        bar.set_position(self.state.step as u64);
        let mut log = LogLine::new(self.control.progress);
        let started = Instant::now();
        let first_step = self.state.step;
        let mut lr = self.learning_rate(self.state.step);
        // The images of each step over every process (this one prepares its part only).
        let step_images: Vec<usize> = self.loader.batches(epoch).iter().map(Vec::len).collect();
        for host in self.loader.epoch_from(epoch, self.state.step, 2) {
            lr = self.learning_rate(self.state.step);
            let images = step_images[self.state.step];
            model = self
                .step(model, host, images, lr, &bar)
                .inspect_err(|_| bar.abandon())?;
            bar.inc(1);
            let state = &self.state;
            let seconds = state.epoch_seconds + started.elapsed().as_secs_f64();
            let message = format!(
                "loss {:.3} acc {:.1}% lr {lr:.4} {:.0} img/s",
                state.loss_sum / state.seen as f64,
                100.0 * state.correct as f64 / state.seen as f64,
                state.seen as f64 / seconds
            );
            if log.as_mut().is_some_and(LogLine::due) {
                let per_step = started.elapsed().as_secs_f64() / (state.step - first_step) as f64;
                println!(
                    "epoch {}/{epochs} step {}/{steps_per_epoch}: {message}, the epoch ends in {}",
                    epoch + 1,
                    state.step,
                    about(per_step * (steps_per_epoch - state.step) as f64)
                );
            }
            bar.set_message(message);

            let (stop, due) = self.agree_on_checkpoints()?;
            if stop && self.state.step < steps_per_epoch {
                self.state.epoch_seconds += started.elapsed().as_secs_f64();
                let state = self.state.clone();
                model = self.save_checkpoint(model, &state)?;
                bar.abandon_with_message(format!(
                    "stopped; checkpoint in {}",
                    self.checkpoint_path.display()
                ));
                return Ok((model, None));
            }
            if due && self.state.step < steps_per_epoch {
                // The time of the epoch so far goes into the checkpoint, not into the state
                // this process goes on counting from.
                let mut state = self.state.clone();
                state.epoch_seconds += started.elapsed().as_secs_f64();
                model = self.save_checkpoint(model, &state)?;
            }
        }
        bar.finish_and_clear();
        let seconds = self.state.epoch_seconds + started.elapsed().as_secs_f64();
        Ok((model, Some(EpochEnd { seconds, lr })))
    }

    /// Whether to stop after the step just taken, and whether a checkpoint within the epoch
    /// is due: every process stops when one was asked to, and process 0's clock says when a
    /// checkpoint is due, so that all processes decide alike.
    fn agree_on_checkpoints(&self) -> Result<(bool, bool)> {
        let stop = self.control.stop_requested(self.steps_this_process);
        let due = self.leader && self.control.checkpoint_due(self.last_checkpoint);
        let [stop, due] = self.any_process([stop, due])?;
        Ok((stop, due))
    }

    /// For each of `flags`, this process's answer to a question, whether any process
    /// answered yes.
    fn any_process<const N: usize>(&self, flags: [bool; N]) -> Result<[bool; N]> {
        if self.collective.size() == 1 {
            return Ok(flags);
        }
        let mut votes = flags.map(|flag| f32::from(u8::from(flag)));
        self.collective.all_reduce_sum(&mut votes)?;
        Ok(votes.map(|votes| votes > 0.0))
    }

    /// One optimizer step on `host`'s images, this process's part of the step's `images`,
    /// at learning rate `lr`: the gradients (split between the devices, summed over the
    /// processes), loss scaling, the update, and the running totals, which count the images
    /// the step had.
    fn step(
        &mut self,
        model: ResNet,
        host: HostBatch,
        images: usize,
        lr: f64,
        bar: &indicatif::ProgressBar,
    ) -> Result<ResNet> {
        let (epoch, step) = (self.state.epoch, self.state.step);
        let loss_scale = self.state.scaler.as_ref().map_or(1.0, LossScaler::scale);
        let at = || format!("epoch {}, step {}", epoch + 1, step + 1);
        let StepOutput { mut grads, totals } = self
            .replicas
            .gradients(&model, host, images, loss_scale)
            .with_context(at)?;
        let images = images as u64;
        // The step's one wait for the device: the loss, the correct count and (when scaling)
        // whether the gradients overflowed, in one transfer.
        let overflow_check = match self.state.scaler {
            Some(_) => unscale(&mut grads, &model, loss_scale),
            None => None,
        };
        let values =
            read_joined([totals].into_iter().chain(overflow_check).collect()).with_context(at)?;
        let (loss, correct) = (values[0], values[1] as u64);
        let gradients_finite = values.get(2).is_none_or(|sum| sum.is_finite());
        if !loss.is_finite() {
            return Err(NonFiniteLoss {
                epoch: epoch + 1,
                step: step + 1,
                loss,
            }
            .into());
        }
        let apply = match &mut self.state.scaler {
            Some(scaler) => scaler.update(gradients_finite)?,
            None => true,
        };
        let model = if apply {
            self.optimizer.step(lr, model, grads)
        } else {
            self.state.skipped_steps += 1;
            let scale = self.state.scaler.as_ref().map_or(1.0, LossScaler::scale);
            let leader = self.leader;
            bar.suspend(|| {
                if !leader {
                    return;
                }
                println!(
                    "epoch {} step {}: the gradients overflowed f16; step skipped, loss scale \
                     now {scale}",
                    epoch + 1,
                    step + 1
                )
            });
            model
        };
        self.state.step += 1;
        self.state.loss_sum += loss as f64 * images as f64;
        self.state.correct += correct;
        self.state.seen += images;
        self.steps_this_process += 1;
        if self.first_step_seconds.is_none() {
            let seconds = self.started.elapsed().as_secs_f64();
            self.first_step_seconds = Some(seconds);
            bar.suspend(|| {
                if !self.leader {
                    return;
                }
                println!(
                    "first step done {seconds:.1}s after training started \
                     (on a GPU mostly kernel compilation and autotuning)"
                )
            });
        }
        Ok(model)
    }

    /// After an epoch's steps: the running statistics averaged over the processes and the
    /// processes' parameters checked equal, the evaluation when due, the epoch's line,
    /// `metrics.csv`, `curves.png` and the checkpoint.
    fn end_epoch(
        &mut self,
        model: ResNet,
        end: EpochEnd,
        test: &Arc<Cifar10Dataset>,
    ) -> Result<ResNet> {
        let (options, epoch) = (self.options, self.state.epoch + 1);
        let model = average_running_stats(model, self.collective)?;
        check_in_step(&model, self.collective, &format!("after epoch {epoch}"))?;
        let evaluated = epoch.is_multiple_of(options.eval_every) || epoch == options.epochs;
        let label = format!("evaluating after epoch {epoch}");
        let eval = evaluated
            .then(|| self.evaluate(&model.valid(), test, false, &label))
            .transpose()
            .with_context(|| label.clone())?;
        let state = &mut self.state;
        let seen = state.seen.max(1) as f64;
        let metrics = EpochMetrics {
            epoch,
            lr: end.lr,
            train_loss: state.loss_sum / seen,
            train_accuracy: state.correct as f64 / seen,
            test_loss: eval.as_ref().map(|e| e.loss),
            test_accuracy: eval.as_ref().map(|e| e.accuracy),
            seconds: end.seconds,
            images_per_second: state.seen as f64 / end.seconds,
        };
        let test = match &eval {
            Some(eval) => format!(
                "test loss {:.4} acc {:.2}%",
                eval.loss,
                100.0 * eval.accuracy
            ),
            None => "not evaluated".into(),
        };
        if self.leader {
            println!(
                "epoch {:>3}/{}  train loss {:.4} acc {:.2}%  {test}  {:.1}s  {:.0} img/s",
                metrics.epoch,
                options.epochs,
                metrics.train_loss,
                100.0 * metrics.train_accuracy,
                metrics.seconds,
                metrics.images_per_second
            );
        }
        state.history.push(metrics);
        state.epoch += 1;
        state.step = 0;
        state.loss_sum = 0.0;
        state.correct = 0;
        state.seen = 0;
        state.epoch_seconds = 0.0;
        if self.leader {
            write_metrics(self.artifact_dir, &state.history)?;
        }
        let state = self.state.clone();
        self.write_checkpoint(&model, &state)?;
        Ok(model)
    }

    /// Writes the checkpoint of `state` and `model` with the running statistics averaged
    /// over the processes, and gives that model back.
    fn save_checkpoint(&mut self, model: ResNet, state: &RunState) -> Result<ResNet> {
        let model = average_running_stats(model, self.collective)?;
        self.write_checkpoint(&model, state)?;
        Ok(model)
    }

    /// Writes the checkpoint of `state` and `model` (process 0 only: the optimizer's state is
    /// the same on every process).
    fn write_checkpoint(&mut self, model: &ResNet, state: &RunState) -> Result<()> {
        if self.leader {
            checkpoint::save(&self.checkpoint_path, state, model, &self.optimizer)?;
        }
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Test loss and accuracy of `model`, each process evaluating its part of every batch.
    fn evaluate(
        &self,
        model: &ResNet,
        test: &Arc<Cifar10Dataset>,
        flip: bool,
        label: &str,
    ) -> Result<Evaluation> {
        let (rank, processes) = (self.collective.rank(), self.collective.size());
        let loader =
            EpochLoader::eval(test.clone(), self.options.eval_batch_size).part(rank, processes);
        let label = self.control.progress.then_some(label);
        let mut sums = evaluate_sums(
            model,
            &loader,
            &self.devices[0],
            &self.eval_loss,
            flip,
            label,
        )?;
        self.collective.all_reduce_sum_f64(&mut sums)?;
        Ok(Evaluation::from_sums(sums))
    }

    /// After the last epoch: `model.bpk`, `model.safetensors`, the flip evaluation when asked
    /// for, and `summary.json`.
    fn finish(
        self,
        model: ResNet,
        train: &Arc<Cifar10Dataset>,
        test: &Arc<Cifar10Dataset>,
    ) -> Result<Summary> {
        let (options, dir) = (self.options, self.artifact_dir);
        // The last epoch's end averaged the running statistics (a resumed run that was
        // already complete loaded them averaged).
        let model = model.valid();
        if self.leader {
            let bytes = model.clone().into_record().into_bytes()?;
            write_atomic(&dir.join("model.bpk"), &bytes)?;
            let safetensors_path = dir.join("model.safetensors");
            model
                .save_torchvision(&safetensors_path)
                .with_context(|| format!("writing {}", safetensors_path.display()))?;
        }

        let label = "evaluating with flip test-time augmentation";
        let test_accuracy_flip = options
            .eval_flip
            .then(|| self.evaluate(&model, test, true, label))
            .transpose()
            .context(label)?
            .map(|eval| eval.accuracy);
        let summary = Summary {
            test_accuracy_flip,
            skipped_steps: self.state.skipped_steps,
            processes: self.collective.size(),
            checksum: format!("{:016x}", checksum(&model)?),
            all_reduce_seconds: self.replicas.reduce_time().as_secs_f64(),
            ..summarize(
                options,
                &self.state.history,
                self.devices,
                &model,
                train.len(),
                test.len(),
                self.first_step_seconds.unwrap_or(0.0),
            )
        };
        if self.leader {
            write_atomic(
                &dir.join("summary.json"),
                serde_json::to_string_pretty(&summary)?.as_bytes(),
            )?;
        }
        Ok(summary)
    }
}

/// Test loss and accuracy.
pub struct Evaluation {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Fraction of correct predictions.
    pub accuracy: f64,
}

/// Evaluates `model` (in evaluation mode) on `dataset`; with `flip`, on the mean of the
/// logits of each image and of its horizontal mirror (test-time augmentation). With a
/// `label`, shows its progress under it (a bar on a terminal, a line a minute in a log).
/// Fails when the device fails.
pub fn evaluate(
    model: &ResNet,
    dataset: &Arc<Cifar10Dataset>,
    batch_size: usize,
    device: &Device,
    loss_fn: &CrossEntropyLoss,
    flip: bool,
    label: Option<&str>,
) -> Result<Evaluation> {
    let loader = EpochLoader::eval(dataset.clone(), batch_size);
    evaluate_sums(model, &loader, device, loss_fn, flip, label).map(Evaluation::from_sums)
}

impl Evaluation {
    /// From `[loss sum, correct predictions, images]`.
    fn from_sums([loss_sum, correct, seen]: [f64; 3]) -> Self {
        let seen = seen.max(1.0);
        Self {
            loss: loss_sum / seen,
            accuracy: correct / seen,
        }
    }
}

/// `[loss sum, correct predictions, images]` of `model` over the batches of `loader` (its
/// part of each, skipping empty parts), as [`evaluate`] computes them.
fn evaluate_sums(
    model: &ResNet,
    loader: &EpochLoader,
    device: &Device,
    loss_fn: &CrossEntropyLoss,
    flip: bool,
    label: Option<&str>,
) -> Result<[f64; 3]> {
    let dataset = loader.dataset();
    let batches = loader.num_batches();
    let bar = match label {
        Some(label) => styled_bar(batches, label),
        None => indicatif::ProgressBar::hidden(),
    };
    let mut log = LogLine::new(label.is_some());
    let started = Instant::now();
    let (mut loss_sum, mut correct, mut seen) = (0f64, 0f64, 0usize);
    for (done, host) in loader.epoch(0, 2).enumerate() {
        let n = host.len();
        bar.inc(1);
        if n == 0 {
            continue;
        }
        let Cifar10Batch { images, targets } = host.to_device(device);
        let logits = if flip {
            let mirrored = model.forward(images.clone().flip([3]));
            (model.forward(images) + mirrored).mul_scalar(0.5)
        } else {
            model.forward(images)
        };
        let loss = loss_fn.forward(logits.clone(), targets.clone());
        let values = read_joined(vec![loss_and_correct(&loss, logits, targets)])?;
        loss_sum += values[0] as f64 * n as f64;
        correct += values[1] as f64;
        seen += n;
        if let (Some(label), Some(log)) = (label, &mut log)
            && log.due()
        {
            let per_batch = started.elapsed().as_secs_f64() / (done + 1) as f64;
            println!(
                "{label}: {seen}/{} images, done in {}",
                dataset.len(),
                about(per_batch * (batches - done - 1) as f64)
            );
        }
    }
    bar.finish_and_clear();
    Ok([loss_sum, correct, seen as f64])
}

fn summarize(
    options: &TrainOptions,
    history: &[EpochMetrics],
    devices: &[Device],
    model: &ResNet,
    train_images: usize,
    test_images: usize,
    first_step_seconds: f64,
) -> Summary {
    let train_seconds: f64 = history.iter().map(|m| m.seconds).sum();
    let images: f64 = history
        .iter()
        .map(|m| m.images_per_second * m.seconds)
        .sum();
    Summary {
        model: options.model.clone(),
        backend: devices
            .iter()
            .map(|d| format!("{d:?}"))
            .collect::<Vec<_>>()
            .join(", "),
        epochs: history.len(),
        test_accuracy: history.last().and_then(|m| m.test_accuracy).unwrap_or(0.0),
        best_test_accuracy: history
            .iter()
            .filter_map(|m| m.test_accuracy)
            .fold(0.0, f64::max),
        train_seconds,
        images_per_second: images / train_seconds.max(1e-9),
        trainable_params: model.trainable_params(),
        train_images,
        test_images,
        first_step_seconds,
        test_accuracy_flip: None,
        skipped_steps: 0,
        processes: 1,
        checksum: String::new(),
        all_reduce_seconds: 0.0,
    }
}

/// Checks that every process was given process 0's options; fails on every process, naming
/// those that were not, when one was not.
fn agree_on_options(options: &TrainOptions, collective: &dyn Collective) -> Result<()> {
    if collective.size() == 1 {
        return Ok(());
    }
    let ranks = differ_from_first(collective, serde_json::to_vec(options)?)
        .context("comparing the options of the processes")?;
    if !ranks.is_empty() {
        bail!(
            "process(es) {ranks:?} were started with other training options than process 0; \
             start every process with the same arguments"
        );
    }
    Ok(())
}

/// Writes `metrics.csv` and `curves.png` of the epochs so far.
pub(crate) fn write_metrics(dir: &Path, history: &[EpochMetrics]) -> Result<()> {
    let mut csv = String::from(EpochMetrics::CSV_HEADER);
    csv.push('\n');
    for metrics in history {
        csv.push_str(&metrics.csv_line());
        csv.push('\n');
    }
    write_atomic(&dir.join("metrics.csv"), csv.as_bytes())?;
    let points: Vec<EpochPoint> = history.iter().map(EpochMetrics::point).collect();
    let png = crate::plot::curves(&points)?;
    write_atomic(&dir.join("curves.png"), &png)
}

/// The checkpoint of `options`' run, read from `path` as `bytes`: refused when it was
/// written with other options or by another number of processes.
fn load_checkpoint(
    path: &Path,
    bytes: &[u8],
    model: ResNet,
    optimizer: ModuleOptimizer,
    options: &TrainOptions,
    processes: usize,
) -> Result<(ResNet, ModuleOptimizer, RunState)> {
    checkpoint::load_bytes(bytes, path, model, optimizer, |state: &RunState| {
        if state.processes != processes {
            bail!(
                "{} was written by a run of {} process(es) and this one has {processes}; \
                 resume with the same number (mpirun -n {}), or use another --artifact-dir",
                path.display(),
                state.processes,
                state.processes
            );
        }
        let Some(saved) = &state.options else {
            return Ok(());
        };
        let comparable = |o: &TrainOptions| TrainOptions {
            epochs: 0,
            eval_every: 0,
            eval_flip: false,
            ..o.clone()
        };
        if comparable(saved) != comparable(options) {
            bail!(
                "{} was written by a run with other options ({saved:?}); resume with the same \
                 options (only --epochs, --eval-every and --eval-flip may change) or use another \
                 --artifact-dir",
                path.display()
            );
        }
        Ok(())
    })
}
