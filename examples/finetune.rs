//! Fine-tune a ResNet on a folder of one's own images.
//!
//! ```text
//! cargo run --release --example finetune -- --data photos --weights resnet50
//! cargo run --release --example finetune -- --data photos --weights resnet18 --freeze backbone
//! cargo run --release --example finetune -- --data photos --weights my-resnet50.pth
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Parser;
use resnet_burn_examples::cli::{Backend, pick_device, preset_of_weights, stop_on_ctrl_c};
use resnet_burn_examples::finetune::{FinetuneOptions, Freeze, class_table, finetune};
use resnet_burn_examples::folder::ImageFolder;
use resnet_burn_examples::train::{Control, Outcome};

/// Fine-tune a ResNet on an image folder: one sub-folder of JPEG / PNG images per class, or
/// train/ and val/ each holding them. Starts from torchvision's weights (or a file), replaces
/// the head for the folder's classes and trains with torchvision's transforms
/// (RandomResizedCrop + flip; resize + center crop to evaluate). Writes config.json,
/// metrics.csv, curves.png, checkpoint.bin, model.safetensors (loadable by torchvision, with
/// the class names), model.bpk and summary.json (per-class accuracy, confusion matrix) into
/// --artifact-dir.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// The image folder.
    #[arg(long)]
    data: PathBuf,
    /// Starting weights: a torchvision name (ResNet50_Weights.IMAGENET1K_V2) or preset
    /// (resnet50: its best weights), downloaded once and verified; a .pth or .safetensors
    /// file; or `none` for a random initialization.
    #[arg(long)]
    weights: String,
    /// The network (any resnet-burn preset). Default: the weights' (a torchvision name's, or
    /// the one a file's name starts with, as in resnet18-f37072fd.pth); resnet50 without
    /// weights.
    #[arg(long)]
    model: Option<String>,
    /// Channels of the first stage (64 as in torchvision).
    #[arg(long, default_value_t = 64)]
    base_channels: usize,
    /// `backbone`: train only the head, on features computed once (a linear probe); `none`:
    /// fine-tune every layer.
    #[arg(long, default_value = "none")]
    freeze: Freeze,
    /// Side of the crops the network sees; evaluation resizes the shorter side to
    /// size * 256 / 224 first.
    #[arg(long, default_value_t = 224)]
    image_size: usize,
    /// Passes over the training images.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Training images per step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Images per evaluation or feature-extraction step.
    #[arg(long, default_value_t = 64)]
    eval_batch_size: usize,
    /// Peak learning rate of the head.
    #[arg(long, default_value_t = 0.01)]
    lr: f64,
    /// Peak learning rate of the backbone (full fine-tuning).
    #[arg(long, default_value_t = 0.001)]
    backbone_lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Weight decay of convolution and linear weights.
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f64,
    /// Label smoothing of the training loss.
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f32,
    /// Epochs of linear learning-rate warm-up before the cosine decay.
    #[arg(long, default_value_t = 0.0)]
    warmup_epochs: f64,
    /// Without val/: the fraction of each class held out for validation.
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f64,
    /// Seed of the split, the head's initialization, shuffling and augmentation.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Threads decoding and transforming images (default: the CPU's cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Where to train: auto (a GPU through wgpu when there is one, else flex), wgpu[:N],
    /// cuda[:N], vulkan[:N], flex or ndarray.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// Where the run writes its files.
    #[arg(long, default_value = "artifacts/finetune")]
    artifact_dir: PathBuf,
    /// Continue from the checkpoint in --artifact-dir (same options; --epochs may grow).
    #[arg(long)]
    resume: bool,
    /// Also write the checkpoint within epochs, every MINUTES (0: at the end of epochs only).
    #[arg(long, value_name = "MINUTES", default_value_t = 5.0)]
    checkpoint_every: f64,
    /// Only the line per epoch.
    #[arg(long)]
    no_progress: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !(args.checkpoint_every.is_finite() && args.checkpoint_every >= 0.0) {
        bail!(
            "--checkpoint-every {}: give the minutes between checkpoints, 0 or more",
            args.checkpoint_every
        );
    }
    let device = pick_device(args.backend)?;
    println!("device: {device:?}");
    let folder = ImageFolder::open(&args.data, args.val_fraction, args.seed)?;
    println!(
        "data: {} classes, {} training and {} validation images from {}{}",
        folder.classes.len(),
        folder.train.len(),
        folder.val.len(),
        args.data.display(),
        match folder.ignored.len() {
            0 => String::new(),
            n => format!(" ({n} files that are not JPEG or PNG left out)"),
        }
    );
    let weights = (args.weights != "none").then_some(args.weights);
    let model = match (args.model, &weights) {
        (Some(model), _) => model,
        (None, Some(weights)) => preset_of_weights(weights)?,
        (None, None) => "resnet50".into(),
    };
    let options = FinetuneOptions {
        model,
        base_channels: args.base_channels,
        weights,
        freeze: args.freeze,
        image_size: args.image_size,
        epochs: args.epochs,
        batch_size: args.batch_size,
        eval_batch_size: args.eval_batch_size,
        lr: args.lr,
        backbone_lr: args.backbone_lr,
        momentum: args.momentum,
        weight_decay: args.weight_decay,
        label_smoothing: args.label_smoothing,
        warmup_epochs: args.warmup_epochs,
        val_fraction: args.val_fraction,
        seed: args.seed,
    };
    let control = Control {
        resume: args.resume,
        stop: stop_on_ctrl_c()?,
        stop_after_steps: None,
        checkpoint_every: (args.checkpoint_every > 0.0)
            .then(|| Duration::from_secs_f64(60.0 * args.checkpoint_every)),
        progress: !args.no_progress,
    };
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    match finetune(
        &options,
        &folder,
        &device,
        &args.artifact_dir,
        workers,
        &control,
    )? {
        Outcome::Finished(summary) => {
            println!("\n{}", class_table(&summary));
            println!(
                "{} on {}: validation accuracy {:.2}% (best {:.2}%) after {} epochs",
                summary.model,
                summary.backend,
                100.0 * summary.val_accuracy,
                100.0 * summary.best_val_accuracy,
                summary.epochs
            );
            if !summary.skipped.is_empty() {
                println!(
                    "{} images could not be read and were left out (listed in summary.json)",
                    summary.skipped.len()
                );
            }
            println!("files: {}", args.artifact_dir.display());
        }
        Outcome::Interrupted { epoch, step } => println!(
            "stopped in epoch {epoch} after step {step}; continue with the same command and --resume"
        ),
    }
    Ok(())
}
