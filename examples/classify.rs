//! Classify an image with torchvision's ImageNet weights, or with a model the `finetune`
//! example trained, and print the top-5 classes.
//!
//! ```text
//! cargo run --release --example classify -- --weights resnet50 cat.jpg
//! cargo run --release --example classify -- --weights ~/resnet18-f37072fd.pth cat.jpg
//! cargo run --release --example classify -- --weights artifacts/finetune/model.safetensors cat.jpg
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use clap::Parser;
use resnet_burn::ResNetConfig;
use resnet_burn::pretrained::Pretrained;
use resnet_burn::torchvision::read_metadata;
use resnet_burn_examples::cli::preset_of;
use resnet_burn_examples::image::load_rgb;
use resnet_burn_examples::transforms::Transforms;

const IMAGENET_CLASSES: &str = include_str!("imagenet_classes.txt");
const CROP: usize = 224;

/// Classify an image with a ResNet and torchvision's evaluation preprocessing (resize the
/// shorter side with antialiased bilinear filtering, center crop 224x224, ImageNet mean and
/// std), printing the five most likely ImageNet classes.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Weights: a torchvision name (`ResNet50_Weights.IMAGENET1K_V2`), a preset (`resnet50`,
    /// the best published weights; downloaded once into the cache), a `.pth` /
    /// `.safetensors` file, or the `model.safetensors` of a `finetune` run (its classes).
    #[arg(long)]
    weights: String,
    /// The preset of a weight file (default: read from the file name, e.g. `resnet18-...`).
    #[arg(long)]
    model: Option<String>,
    /// Shorter side after resizing (default: the weights' own, 256 for a file).
    #[arg(long)]
    resize: Option<usize>,
    /// The image (JPEG or PNG).
    image: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = Device::flex();
    let (model, resize, classes) = match Pretrained::from_name(&args.weights) {
        Some(weights) if !Path::new(&args.weights).is_file() => {
            println!("weights: {} (top-1 {}%)", weights.name(), weights.top1());
            let classes = IMAGENET_CLASSES.lines().map(String::from).collect();
            (weights.load(&device)?, weights.resize_size(), classes)
        }
        _ => {
            let path = PathBuf::from(&args.weights);
            let (config, classes) = match fine_tuned(&path)? {
                Some(found) => found,
                None => {
                    let preset = match &args.model {
                        Some(model) => model.clone(),
                        None => preset_of(&path)?,
                    };
                    let config = ResNetConfig::from_name(&preset, 1000).with_context(|| {
                        format!(
                            "unknown --model {preset:?}; one of {:?}",
                            ResNetConfig::PRESETS
                        )
                    })?;
                    let classes = IMAGENET_CLASSES.lines().map(String::from).collect();
                    (config, classes)
                }
            };
            println!("weights: {} ({} classes)", path.display(), classes.len());
            (
                config.try_init(&device)?.load_torchvision(&path)?,
                256,
                classes,
            )
        }
    };
    let transforms = Transforms {
        size: CROP,
        resize: args.resize.unwrap_or(resize),
    };

    let image = load_rgb(&args.image)?;
    let mut pixels = vec![0f32; 3 * CROP * CROP];
    transforms.eval(&image, &mut pixels);
    let input = Tensor::<4>::from_data(TensorData::new(pixels, [1, 3, CROP, CROP]), &device);
    let probabilities = softmax(model.valid().forward(input), 1);
    let probabilities: Vec<f32> = probabilities.into_data().try_into_vec_as::<f32>()?;

    let mut ranked: Vec<(usize, f32)> = probabilities.into_iter().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("{}:", args.image.display());
    for (class, probability) in ranked.into_iter().take(5) {
        println!(
            "  {:6.2}%  {:4}  {}",
            100.0 * probability,
            class,
            classes[class]
        );
    }
    Ok(())
}

/// The config and class names a `finetune` run saved in its `model.safetensors`, if `path`
/// is such a file.
fn fine_tuned(path: &Path) -> Result<Option<(ResNetConfig, Vec<String>)>> {
    if path.extension().is_none_or(|e| e != "safetensors") {
        return Ok(None);
    }
    let metadata = read_metadata(path)?;
    let (Some(config), Some(classes)) = (metadata.get("config"), metadata.get("classes")) else {
        return Ok(None);
    };
    let config: ResNetConfig = serde_json::from_str(config)
        .with_context(|| format!("reading the config in the metadata of {}", path.display()))?;
    let classes: Vec<String> = serde_json::from_str(classes).with_context(|| {
        format!(
            "reading the class names in the metadata of {}",
            path.display()
        )
    })?;
    if classes.len() != config.num_classes {
        bail!(
            "{} names {} classes but its config has {}; the file is inconsistent",
            path.display(),
            classes.len(),
            config.num_classes
        );
    }
    Ok(Some((config, classes)))
}
