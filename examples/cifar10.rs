//! Train a ResNet on CIFAR-10.
//!
//! ```text
//! cargo run --release --example cifar10 -- --help
//! cargo run --release --example cifar10 -- --backend flex --limit-train 2000 --limit-test 1000 --epochs 2
//! cargo run --release --example cifar10 --features cuda -- --backend cuda:0,cuda:1
//! cargo build --release --example cifar10 --features mpi
//! mpirun -n 2 target/release/examples/cifar10 --distributed mpi --backend flex
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use burn::tensor::Device;
use cifar10_burn::{Cifar10Dataset, Split};
use clap::Parser;
use resnet_burn::{Precision, ResNetConfig};
use resnet_burn_examples::cli::{Backend, cifar10_dir, pick_device, stop_on_ctrl_c};
use resnet_burn_examples::parallel::{Collective, Local};
use resnet_burn_examples::train::{Control, Outcome, TrainOptions, train_with};

/// Train a ResNet (CIFAR stem) on CIFAR-10 with SGD + Nesterov momentum, weight decay on
/// weights only, warm-up then cosine learning rate, crop + flip augmentation and label
/// smoothing. Writes config.json, metrics.csv, curves.png, checkpoint.bin, model.bpk,
/// model.safetensors and summary.json into --artifact-dir.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Where to train: auto (a GPU through wgpu when there is one, else flex), wgpu,
    /// wgpu:N (discrete GPU N), cuda[:N] (needs the `cuda` feature), vulkan[:N] (needs
    /// `vulkan`), flex or ndarray (CPU). Several, comma-separated (cuda:0,cuda:1), train
    /// data-parallel: each step's batch is split between them and the first one holds the
    /// model and evaluates.
    #[arg(long, default_value = "auto", value_delimiter = ',')]
    backend: Vec<Backend>,
    /// The network: any resnet-burn preset (resnet18, resnet34, resnet50, resnext50_32x4d, ...).
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
    /// Test images per evaluation step.
    #[arg(long, default_value_t = 500)]
    eval_batch_size: usize,
    /// Peak learning rate (reached after the warm-up).
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Plain instead of Nesterov momentum.
    #[arg(long)]
    no_nesterov: bool,
    /// Weight decay of convolution and linear weights (BatchNorm and biases are not decayed).
    #[arg(long, default_value_t = 5e-4)]
    weight_decay: f64,
    /// Label smoothing of the training loss (0 to turn it off).
    #[arg(long, default_value_t = 0.1)]
    label_smoothing: f32,
    /// Epochs of linear learning-rate warm-up before the cosine decay.
    #[arg(long, default_value_t = 1.0)]
    warmup_epochs: f64,
    /// Cutout square side in pixels (e.g. 16); off by default.
    #[arg(long)]
    cutout: Option<usize>,
    /// Train without crop and flip augmentation.
    #[arg(long)]
    no_augment: bool,
    /// Seed of initialization, shuffling and augmentation.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// CIFAR-10: the cifar-10-batches-bin folder, its parent, or cifar-10-binary.tar.gz.
    /// Default: $CIFAR10_DIR, else the cache folder ($XDG_CACHE_HOME/cifar10-burn or ~/.cache/cifar10-burn),
    /// downloading the official archive there when it is missing.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where the run writes its files.
    #[arg(long, default_value = "artifacts/cifar10")]
    artifact_dir: PathBuf,
    /// Continue from the checkpoint in --artifact-dir (same options; --epochs may grow,
    /// --eval-every and --eval-flip may change).
    #[arg(long)]
    resume: bool,
    /// Train on the first N training images only (quick runs).
    #[arg(long)]
    limit_train: Option<usize>,
    /// Evaluate on the first N test images only (quick runs).
    #[arg(long)]
    limit_test: Option<usize>,
    /// Evaluate every N epochs (and after the last one), to save time on long runs.
    #[arg(long, default_value_t = 1)]
    eval_every: usize,
    /// After the last epoch, also report the test accuracy with horizontal-flip test-time
    /// augmentation (the mean of the logits of each image and its mirror image).
    #[arg(long)]
    eval_flip: bool,
    /// Only the line per epoch: no progress within epochs and evaluations (bars on a terminal,
    /// a line a minute where output goes to a file).
    #[arg(long)]
    no_progress: bool,
    /// Also write the checkpoint within epochs, every MINUTES (0: at the end of epochs only).
    /// A crash loses at most this much training (and a step); a checkpoint of ResNet-18
    /// takes well under a second (BENCHMARKS.md).
    #[arg(long, value_name = "MINUTES", default_value_t = 5.0)]
    checkpoint_every: f64,
    /// Float types: f32; f16 (mixed precision: convolutions in f16 on GPU backends, on
    /// tensor cores where the backend has kernels for them; the rest stays f32 and the loss is
    /// scaled dynamically); or bf16 (convolution products with bf16 operands and f32 sums on
    /// CPUs with AVX512-BF16, bf16 convolutions on GPU backends that have the type). See
    /// resnet_burn::Precision. Default: $RESNET_BURN_PRECISION, else f32.
    #[arg(long, env = "RESNET_BURN_PRECISION", default_value_t = Precision::F32)]
    precision: Precision,
    /// Train data-parallel with the other processes of an MPI job: `mpi` (needs the `mpi`
    /// feature; start with `mpirun -n N`, every process with the same arguments). Each
    /// process takes its part of every batch, so --batch-size stays the global batch; process
    /// 0 writes the files.
    #[arg(long, value_name = "mpi")]
    distributed: Option<Distributed>,
}

/// How the processes of a distributed run talk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Distributed {
    /// MPI, started by mpirun.
    Mpi,
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.distributed {
        None => run(args, &Local),
        Some(Distributed::Mpi) => run_mpi(args),
    }
}

/// Every process of the MPI job trains; one that fails stops them all.
#[cfg(feature = "mpi")]
fn run_mpi(args: Args) -> Result<()> {
    let mpi = resnet_burn_examples::distributed::Mpi::init()?;
    match run(args, &mpi) {
        Ok(()) => Ok(()),
        Err(error) => mpi.abort(&format!("{error:#}")),
    }
}

#[cfg(not(feature = "mpi"))]
fn run_mpi(_args: Args) -> Result<()> {
    anyhow::bail!(
        "this build has no MPI: rebuild with `--features mpi` (needs Open MPI's headers, \
         libopenmpi-dev, and libclang) and start it with mpirun"
    )
}

fn run(args: Args, collective: &dyn Collective) -> Result<()> {
    // Process 0 speaks for the run; the others print their errors only.
    let leader = collective.rank() == 0;
    macro_rules! say {
        ($($arg:tt)*) => {
            if leader {
                println!($($arg)*);
            }
        };
    }
    if ResNetConfig::from_name(&args.model, 10).is_none() {
        anyhow::bail!(
            "unknown --model {:?}; choose one of {:?}",
            args.model,
            ResNetConfig::PRESETS
        );
    }
    if !(args.checkpoint_every.is_finite() && args.checkpoint_every >= 0.0) {
        anyhow::bail!(
            "--checkpoint-every {}: give the minutes between checkpoints, 0 or more",
            args.checkpoint_every
        );
    }
    let precision = args.precision;
    let devices = args
        .backend
        .iter()
        .map(|&backend| pick_device(backend))
        .collect::<Result<Vec<_>>>()?;
    match (devices.as_slice(), collective.size()) {
        ([device], 1) => say!("device: {device:?}"),
        (_, 1) => say!("devices (data parallel): {devices:?}"),
        (_, processes) => say!("{processes} processes, each on {devices:?} (data parallel)"),
    }
    #[allow(deprecated)] // ndarray: deprecated by Burn 0.22, still supported
    let on_cpu = |d: &Device| *d == Device::flex() || *d == Device::ndarray();
    say!("precision: {precision}");
    for device in devices.iter().filter(|d| !on_cpu(d)) {
        if precision != Precision::F32 && !precision.applies_to(device) {
            say!("{device:?} has no {precision} arithmetic: its convolutions stay f32");
        }
    }
    if let Some(device) = devices.iter().find(|d| on_cpu(d)) {
        match precision {
            Precision::F16 => {
                say!("on CPU backends convolutions stay f32; --precision f16 only scales the loss")
            }
            Precision::Bf16 if !precision.applies_to(device) => say!(
                "this CPU has no AVX512-BF16: convolutions stay f32 (--precision bf16 changes nothing)"
            ),
            _ => {}
        }
    }

    // Process 0 downloads the data set when it is missing, before the others look for it:
    // processes on its machine then find it rather than download it into the same folder.
    if !leader {
        collective.barrier()?;
    }
    let data_dir = cifar10_dir(args.data_dir.clone())?;
    if leader {
        collective.barrier()?;
    }
    let load = |split, limit: Option<usize>| -> Result<Arc<Cifar10Dataset>> {
        let set = Cifar10Dataset::new(&data_dir, split)?;
        Ok(Arc::new(match limit {
            Some(n) => set.truncate(n),
            None => set,
        }))
    };
    let train_set = load(Split::Train, args.limit_train)?;
    let test_set = load(Split::Test, args.limit_test)?;
    say!(
        "data: {} training and {} test images from {}",
        train_set.len(),
        test_set.len(),
        data_dir.display()
    );

    let options = TrainOptions {
        model: args.model,
        base_channels: args.base_channels,
        epochs: args.epochs,
        batch_size: args.batch_size,
        eval_batch_size: args.eval_batch_size,
        lr: args.lr,
        momentum: args.momentum,
        nesterov: !args.no_nesterov,
        weight_decay: args.weight_decay,
        label_smoothing: args.label_smoothing,
        warmup_epochs: args.warmup_epochs,
        augment: !args.no_augment,
        cutout: args.cutout,
        seed: args.seed,
        limit_train: args.limit_train,
        limit_test: args.limit_test,
        eval_every: args.eval_every,
        eval_flip: args.eval_flip,
        precision,
    };
    let stop = stop_on_ctrl_c()?;
    let control = Control {
        resume: args.resume,
        stop,
        stop_after_steps: None,
        checkpoint_every: (args.checkpoint_every > 0.0)
            .then(|| Duration::from_secs_f64(60.0 * args.checkpoint_every)),
        progress: !args.no_progress && leader,
    };

    match train_with(
        &options,
        train_set,
        test_set,
        &devices,
        &args.artifact_dir,
        &control,
        collective,
    )? {
        Outcome::Finished(summary) => {
            say!(
                "\n{} on {}: test accuracy {:.2}% (best {:.2}%) after {} epochs, {:.0} s of training, {:.0} images/s",
                summary.model,
                summary.backend,
                100.0 * summary.test_accuracy,
                100.0 * summary.best_test_accuracy,
                summary.epochs,
                summary.train_seconds,
                summary.images_per_second
            );
            if summary.processes > 1 {
                say!(
                    "{} processes; the all-reduce of the gradients took {:.1} s of process 0's \
                     {:.1} s of training ({:.1}%)",
                    summary.processes,
                    summary.all_reduce_seconds,
                    summary.train_seconds,
                    100.0 * summary.all_reduce_seconds / summary.train_seconds.max(1e-9)
                );
            }
            if let Some(accuracy) = summary.test_accuracy_flip {
                say!(
                    "test accuracy with flip test-time augmentation: {:.2}%",
                    100.0 * accuracy
                );
            }
            say!("files: {}", args.artifact_dir.display());
        }
        Outcome::Interrupted { epoch, step } => {
            say!(
                "stopped in epoch {epoch} after step {step}; continue with the same command and --resume"
            );
        }
    }
    Ok(())
}
