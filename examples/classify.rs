//! Classify an image with torchvision's ImageNet weights and print the top-5 classes.
//!
//! ```text
//! cargo run --release --example classify -- --weights resnet50 cat.jpg
//! cargo run --release --example classify -- --weights ~/resnet18-f37072fd.pth cat.jpg
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use clap::Parser;
use image::imageops::FilterType;
use resnet_burn::ResNetConfig;
use resnet_burn::pretrained::Pretrained;
use resnet_burn_examples::image::load_rgb;

const CLASSES: &str = include_str!("imagenet_classes.txt");
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];
const CROP: u32 = 224;

/// Classify an image with a ResNet and torchvision's evaluation preprocessing (resize the
/// shorter side with antialiased bilinear filtering, center crop 224x224, ImageNet mean and
/// std), printing the five most likely ImageNet classes.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Weights: a torchvision name (`ResNet50_Weights.IMAGENET1K_V2`), a preset (`resnet50`,
    /// the best published weights; downloaded once into the cache), or a `.pth` /
    /// `.safetensors` file.
    #[arg(long)]
    weights: String,
    /// The preset of a weight file (default: read from the file name, e.g. `resnet18-...`).
    #[arg(long)]
    model: Option<String>,
    /// Shorter side after resizing (default: the weights' own, 256 for a file).
    #[arg(long)]
    resize: Option<u32>,
    /// The image (JPEG or PNG).
    image: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = Device::flex();
    let (model, resize) = match Pretrained::from_name(&args.weights) {
        Some(weights) if !Path::new(&args.weights).is_file() => {
            println!("weights: {} (top-1 {}%)", weights.name(), weights.top1());
            (weights.load(&device)?, weights.resize_size() as u32)
        }
        _ => {
            let path = PathBuf::from(&args.weights);
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
            println!("weights: {} ({preset})", path.display());
            (config.init(&device).load_torchvision(&path)?, 256)
        }
    };
    let resize = args.resize.unwrap_or(resize);

    let image = load_rgb(&args.image)?;
    let pixels = preprocess(&image, resize);
    let input = Tensor::<4>::from_data(
        TensorData::new(pixels, [1, 3, CROP as usize, CROP as usize]),
        &device,
    );
    let probabilities = softmax(model.valid().forward(input), 1);
    let probabilities: Vec<f32> = probabilities.into_data().try_into_vec_as::<f32>()?;

    let classes: Vec<&str> = CLASSES.lines().collect();
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

/// torchvision's `Resize(resize)` (antialiased bilinear, shorter side to `resize`),
/// `CenterCrop(224)`, `ToTensor()` and `Normalize(MEAN, STD)`: CHW floats.
fn preprocess(rgb: &image::RgbImage, resize: u32) -> Vec<f32> {
    let (width, height) = rgb.dimensions();
    let (new_width, new_height) = if width <= height {
        (
            resize,
            (resize as u64 * height as u64 / width as u64) as u32,
        )
    } else {
        (
            (resize as u64 * width as u64 / height as u64) as u32,
            resize,
        )
    };
    let resized = image::imageops::resize(rgb, new_width, new_height, FilterType::Triangle);
    let top = ((new_height.saturating_sub(CROP)) as f64 / 2.0).round() as u32;
    let left = ((new_width.saturating_sub(CROP)) as f64 / 2.0).round() as u32;
    let mut out = vec![0f32; 3 * (CROP * CROP) as usize];
    for y in 0..CROP {
        for x in 0..CROP {
            let pixel =
                resized.get_pixel((left + x).min(new_width - 1), (top + y).min(new_height - 1));
            for c in 0..3 {
                out[(c * CROP as usize + y as usize) * CROP as usize + x as usize] =
                    (pixel[c] as f32 / 255.0 - MEAN[c]) / STD[c];
            }
        }
    }
    out
}

/// The preset named at the start of a torchvision file name (`resnet18-f37072fd.pth`).
fn preset_of(path: &Path) -> Result<String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    match ResNetConfig::PRESETS
        .iter()
        .filter(|preset| name.starts_with(*preset))
        .max_by_key(|preset| preset.len())
    {
        Some(preset) => Ok(preset.to_string()),
        None => bail!(
            "cannot tell the model from the file name {name:?}: pass --model (one of {:?})",
            ResNetConfig::PRESETS
        ),
    }
}
