//! Fine-tuning on image folders: torchvision's evaluation transform on committed images
//! against a committed reference, folders written from real CIFAR-10 test images (PNG, JPEG at
//! other sizes, grey, alpha, damaged files), the linear probe, exact resumption of a run from a
//! `.pth` file, and the errors of bad folders.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use cifar10_burn::{Cifar10Dataset, Split};
use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb, RgbImage};
use resnet_burn::ResNetConfig;
use resnet_burn::torchvision::read_metadata;
use resnet_burn_examples::finetune::{FinetuneOptions, FinetuneSummary, Freeze, finetune};
use resnet_burn_examples::folder::{FolderLoader, ImageFolder};
use resnet_burn_examples::image::load_rgb;
use resnet_burn_examples::train::{Control, Outcome};
use resnet_burn_examples::transforms::Transforms;

use crate::cifar_files::scratch;
use crate::support::{fixture, read_safetensors};

/// The committed images under `tests/fixtures/transforms/`.
fn transform_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/transforms")
}

/// torchvision's `Resize(64)`, `CenterCrop(56)`, `ToTensor()`, `Normalize` on the committed
/// images (`tests/fixtures/make_transforms_reference.py`): the same f32s for every PNG
/// (Pillow's resampling is reproduced exactly); for the JPEG, within the difference of two
/// JPEG decoders (libjpeg-turbo's and the `image` crate's IDCTs round differently).
#[test]
fn the_evaluation_transform_is_torchvisions() {
    let reference_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/transforms_reference.safetensors");
    let reference = read_safetensors(&reference_path);
    let transforms = Transforms {
        size: 56,
        resize: 64,
    };
    assert_eq!(transforms, Transforms::new(56));
    let mut names: Vec<&String> = reference.keys().collect();
    names.sort();
    assert_eq!(names.len(), 8, "every committed image has a reference");
    for name in names {
        let (shape, want) = &reference[name];
        assert_eq!(shape, &[3, 56, 56], "{name}");
        let image = load_rgb(&transform_fixtures().join(name)).unwrap();
        let mut got = vec![0f32; 3 * 56 * 56];
        transforms.eval(&image, &mut got);
        let differences: Vec<f32> = got.iter().zip(want).map(|(a, b)| (a - b).abs()).collect();
        let max = differences.iter().copied().fold(0.0, f32::max);
        let mean = differences.iter().sum::<f32>() / differences.len() as f32;
        if name.ends_with(".jpg") {
            // One 8-bit level is 1 / 255 / std = 0.0171 to 0.0175 after normalization; the
            // decoders differ by up to 2 levels (max 0.035, mean 0.0063 here).
            assert!(max < 0.06 && mean < 0.01, "{name}: max {max}, mean {mean}");
        } else {
            assert_eq!(
                max, 0.0,
                "{name}: the values differ (mean difference {mean})"
            );
        }
    }
}

/// Writes an image folder of `per_class` real CIFAR-10 test images for each of `classes`:
/// PNG mostly; every fifth re-encoded as JPEG at 48x48; every seventh shrunk to 20x20 (below
/// the 32-pixel crop); the first of a class grey, the second with an alpha channel. `None`
/// without `CIFAR10_DIR`.
fn cifar_folder(name: &str, classes: &[usize], per_class: usize) -> Option<PathBuf> {
    let Some(data) = std::env::var_os("CIFAR10_DIR") else {
        eprintln!(
            "skipped: CIFAR10_DIR is not set (point it at cifar-10-batches-bin to run this test)"
        );
        return None;
    };
    let test = Cifar10Dataset::new(Path::new(&data), Split::Test).expect("the CIFAR-10 test set");
    let root = scratch(name);
    for &class in classes {
        let folder = root.join(cifar10_burn::CLASSES[class]);
        std::fs::create_dir_all(&folder).unwrap();
        let members = (0..test.len()).filter(|&i| test.labels()[i] as usize == class);
        for (n, index) in members.take(per_class).enumerate() {
            let chw = test.image(index).unwrap();
            let rgb: RgbImage = ImageBuffer::from_fn(32, 32, |x, y| {
                let at = |c: usize| chw[c * 1024 + y as usize * 32 + x as usize];
                Rgb([at(0), at(1), at(2)])
            });
            let image = DynamicImage::ImageRgb8(rgb);
            let stem = folder.join(format!("{index:05}"));
            let (image, format) = match n {
                0 => (DynamicImage::ImageLuma8(image.to_luma8()), ImageFormat::Png),
                1 => (DynamicImage::ImageRgba8(image.to_rgba8()), ImageFormat::Png),
                n if n % 5 == 0 => (
                    image.resize_exact(48, 48, image::imageops::FilterType::Triangle),
                    ImageFormat::Jpeg,
                ),
                n if n % 7 == 0 => (
                    image.resize_exact(20, 20, image::imageops::FilterType::Triangle),
                    ImageFormat::Png,
                ),
                _ => (image, ImageFormat::Png),
            };
            let extension = if format == ImageFormat::Jpeg {
                "jpg"
            } else {
                "png"
            };
            image
                .save_with_format(stem.with_extension(extension), format)
                .unwrap();
        }
    }
    Some(root)
}

fn quick_options(weights: Option<String>, freeze: Freeze) -> FinetuneOptions {
    FinetuneOptions {
        model: "resnet18".into(),
        base_channels: 8,
        weights,
        freeze,
        image_size: 32,
        epochs: 2,
        batch_size: 16,
        eval_batch_size: 64,
        lr: 0.01,
        backbone_lr: 0.001,
        seed: 7,
        ..FinetuneOptions::default()
    }
}

fn quiet() -> Control {
    Control::default()
}

fn finished(outcome: Outcome<FinetuneSummary>) -> FinetuneSummary {
    match outcome {
        Outcome::Finished(summary) => summary,
        Outcome::Interrupted { epoch, step } => panic!("stopped at epoch {epoch}, step {step}"),
    }
}

/// A linear probe over a randomly initialised ResNet-18 (16 base channels, seed 7) on 3
/// CIFAR-10 classes (airplane, frog, truck; 200 images each, 20% held out, 30 epochs at
/// learning rate 0.01): the random features separate them well above the 33% of chance
/// (60.8% on an Intel Xeon; 50% is 3.9 standard deviations above chance on 120 images).
#[test]
fn a_linear_probe_on_random_features_learns_real_pictures() {
    let Some(root) = cifar_folder("finetune-probe", &[0, 6, 9], 200) else {
        return;
    };
    let folder = ImageFolder::open(&root, 0.2, 7).unwrap();
    assert_eq!(folder.classes, ["airplane", "frog", "truck"]);
    assert_eq!((folder.train.len(), folder.val.len()), (480, 120));
    let options = FinetuneOptions {
        epochs: 30,
        lr: 0.01,
        base_channels: 16,
        batch_size: 32,
        ..quick_options(None, Freeze::Backbone)
    };
    let dir = scratch("finetune-probe-run");
    let summary =
        finished(finetune(&options, &folder, &Device::flex(), &dir, 2, &quiet()).unwrap());
    eprintln!(
        "linear probe: validation accuracy {:.1}% ({:?}), features at {:.0} images/s",
        100.0 * summary.val_accuracy,
        summary
            .per_class
            .iter()
            .map(|c| c.accuracy)
            .collect::<Vec<_>>(),
        summary.feature_images_per_second.unwrap()
    );
    assert!(summary.val_accuracy > 0.5, "{summary:?}");
    assert_eq!(summary.confusion.iter().flatten().sum::<usize>(), 120);
    assert!(summary.skipped.is_empty() && summary.ignored.is_empty());
    for file in [
        "config.json",
        "metrics.csv",
        "curves.png",
        "model.safetensors",
        "model.bpk",
        "summary.json",
    ] {
        assert!(dir.join(file).is_file(), "{file}");
    }
    // The class names and config travel with the weights, which load strictly.
    let metadata = read_metadata(dir.join("model.safetensors")).unwrap();
    let classes: Vec<String> = serde_json::from_str(&metadata["classes"]).unwrap();
    assert_eq!(classes, folder.classes);
    let config: ResNetConfig = serde_json::from_str(&metadata["config"]).unwrap();
    assert_eq!(config.num_classes, 3);
    let device = Device::flex();
    let model = config
        .init(&device)
        .load_torchvision(dir.join("model.safetensors"))
        .unwrap();
    // The exported network, standardization folded into its head, on the raw validation
    // images: the predictions the probe was scored with.
    let loader = FolderLoader::eval(Arc::new(folder.val.clone()), Transforms::new(32), 64, 2);
    let mut correct = 0;
    for batch in loader.epoch_from(0, 0, 1) {
        let n = batch.len();
        let images = Tensor::<4>::from_data(TensorData::new(batch.images, [n, 3, 32, 32]), &device);
        let predicted = model
            .forward(images)
            .argmax(1)
            .into_data()
            .try_into_vec_as::<i64>()
            .unwrap();
        correct += predicted
            .iter()
            .zip(&batch.labels)
            .filter(|(p, l)| p == l)
            .count();
    }
    let exported = correct as f64 / folder.val.len() as f64;
    assert!(
        (exported - summary.val_accuracy).abs() <= 1.0 / 120.0,
        "{exported} against {}",
        summary.val_accuracy
    );
}

/// Full fine-tuning from a torchvision `.pth` file, stopped after 2 of the 3 steps of its first
/// epoch (as Ctrl-C stops it) and resumed, ends with the weights and metrics of an uninterrupted run; damaged and
/// foreign files are skipped or left out, and reported.
#[test]
fn fine_tuning_from_a_pth_file_resumes_exactly() {
    let Some(root) = cifar_folder("finetune-resume", &[3, 5], 40) else {
        return;
    };
    // A damaged JPEG, a text file named as a PNG, and a file that is no image at all.
    let cat = root.join("cat");
    let jpeg = std::fs::read_dir(&cat)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "jpg"))
        .unwrap();
    let bytes = std::fs::read(&jpeg).unwrap();
    std::fs::write(cat.join("damaged.jpg"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(cat.join("notes.png"), "not a picture").unwrap();
    std::fs::write(cat.join("README.txt"), "cats").unwrap();

    let folder = ImageFolder::open(&root, 0.25, 7).unwrap();
    assert_eq!(folder.ignored, [cat.join("README.txt")]);
    let weights = fixture("resnet18_narrow.pth");
    let options = quick_options(Some(weights.display().to_string()), Freeze::None);
    let device = Device::flex();

    let whole = scratch("finetune-whole");
    let summary = finished(finetune(&options, &folder, &device, &whole, 2, &quiet()).unwrap());
    let skipped: Vec<&Path> = summary.skipped.iter().map(|s| s.path.as_path()).collect();
    let mut expected = vec![cat.join("damaged.jpg"), cat.join("notes.png")];
    expected.retain(|p| folder.train.iter().chain(&folder.val).any(|s| &s.path == p));
    assert_eq!(
        skipped,
        expected.iter().map(PathBuf::as_path).collect::<Vec<_>>()
    );

    let resumed = scratch("finetune-resumed");
    let stop = Control {
        stop_after_steps: Some(2),
        ..quiet()
    };
    match finetune(&options, &folder, &device, &resumed, 2, &stop).unwrap() {
        Outcome::Interrupted { epoch: 1, step: 2 } => {}
        other => panic!("expected a stop after step 2, got {other:?}"),
    }
    let resume = Control {
        resume: true,
        ..quiet()
    };
    finished(finetune(&options, &folder, &device, &resumed, 2, &resume).unwrap());
    let values = |dir: &Path| read_safetensors(&dir.join("model.safetensors"));
    assert_eq!(
        values(&whole),
        values(&resumed),
        "the resumed run's weights differ"
    );
    let metrics = |dir: &Path| -> Vec<String> {
        std::fs::read_to_string(dir.join("metrics.csv"))
            .unwrap()
            .lines()
            .map(|l| l.split(',').take(6).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(metrics(&whole), metrics(&resumed));
}

#[test]
fn bad_folders_are_clear_errors() {
    let root = scratch("finetune-bad");
    let error = |dir: &Path| format!("{:#}", ImageFolder::open(dir, 0.2, 1).unwrap_err());

    let missing = root.join("missing");
    let message = error(&missing);
    assert!(
        message.contains("does not exist") && message.contains("missing"),
        "{message}"
    );

    let single = root.join("single");
    write_png(&single.join("cats/a.png"));
    let message = error(&single);
    assert!(
        message.contains("at least two") && message.contains("cats"),
        "{message}"
    );

    let empty = root.join("empty");
    write_png(&empty.join("cats/a.png"));
    std::fs::create_dir_all(empty.join("dogs")).unwrap();
    std::fs::write(empty.join("dogs/list.txt"), "nothing").unwrap();
    let message = error(&empty);
    assert!(
        message.contains("no JPEG or PNG") && message.contains("dogs"),
        "{message}"
    );

    let mismatched = root.join("mismatched");
    for path in [
        "train/cats/a.png",
        "train/dogs/b.png",
        "val/cats/c.png",
        "val/birds/d.png",
    ] {
        write_png(&mismatched.join(path));
    }
    let message = error(&mismatched);
    assert!(message.contains("same class folders"), "{message}");

    let split = root.join("split");
    for path in [
        "train/cats/a.png",
        "train/cats/b.png",
        "train/dogs/c.png",
        "train/dogs/d.png",
    ] {
        write_png(&split.join(path));
    }
    let folder = ImageFolder::open(&split, 0.5, 1).unwrap();
    assert_eq!(
        (folder.train.len(), folder.val.len()),
        (2, 2),
        "one of each class held out"
    );
    let message = format!("{:#}", ImageFolder::open(&split, 1.0, 1).unwrap_err());
    assert!(message.contains("--val-fraction"), "{message}");
}

/// A folder whose images cannot be read at all stops with the reason, not a panic.
#[test]
fn a_folder_of_unreadable_images_is_an_error() {
    let root = scratch("finetune-unreadable");
    for path in ["cats/a.png", "cats/b.png", "dogs/c.jpg", "dogs/d.jpg"] {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "text").unwrap();
    }
    let folder = ImageFolder::open(&root, 0.5, 1).unwrap();
    let options = FinetuneOptions {
        epochs: 1,
        ..quick_options(None, Freeze::Backbone)
    };
    let dir = scratch("finetune-unreadable-run");
    let message = format!(
        "{:#}",
        finetune(&options, &folder, &Device::flex(), &dir, 1, &quiet()).unwrap_err()
    );
    assert!(message.contains("could be read"), "{message}");
    assert!(dir.join("config.json").is_file());
}

fn write_png(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_pixel(4, 4, Rgb([1, 2, 3]))
        .save(path)
        .unwrap();
}
