//! Image folders as torchvision's `ImageFolder` reads them: one sub-folder per class (class
//! indices in the sorted order of the folder names), JPEG and PNG files inside; either at the
//! top of the folder, or under `train/` and `val/`. Without `val/`, a seeded split holds out a
//! fraction of each class.
//!
//! burn-dataset's `ImageFolderDataset` is not used: its loader panics on a file it cannot
//! decode and pads a truncated one, where a run over one's own pictures must report the file
//! and go on or stop cleanly.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use anyhow::{Context, Result, bail};
use cifar10_burn::augment::Rng;
use cifar10_burn::epoch_batches;
use serde::{Deserialize, Serialize};

use crate::image::decode_rgb;
use crate::transforms::Transforms;

/// File extensions read as images (compared without case).
pub const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// An image and its class index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// The file.
    pub path: PathBuf,
    /// Index into [`ImageFolder::classes`].
    pub label: usize,
}

/// The training and validation images of a folder.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    /// Class names: the sub-folder names, sorted.
    pub classes: Vec<String>,
    /// Training images, sorted by path.
    pub train: Vec<Sample>,
    /// Validation images, sorted by path.
    pub val: Vec<Sample>,
    /// Files in the class folders that are not JPEG or PNG by their extension: not read.
    pub ignored: Vec<PathBuf>,
}

impl ImageFolder {
    /// Reads the layout of `root`. With `train/` in it, the training images come from there
    /// and the validation images from `val/` (which must have the same classes); else the
    /// classes are `root`'s sub-folders and `val_fraction` of each class (at least one image
    /// of a class with two or more), drawn with `seed`, is held out for validation.
    pub fn open(root: &Path, val_fraction: f64, seed: u64) -> Result<Self> {
        if !root.is_dir() {
            bail!(
                "the image folder {} does not exist or is not a folder; pass --data a folder \
                 with one sub-folder of images per class",
                root.display()
            );
        }
        let train_dir = root.join("train");
        if train_dir.is_dir() {
            let (classes, train, mut ignored) = scan(&train_dir)?;
            let val_dir = root.join("val");
            if !val_dir.is_dir() {
                return Self::split(classes, train, ignored, val_fraction, seed, &train_dir);
            }
            let (val_classes, val, val_ignored) = scan(&val_dir)?;
            if val_classes != classes {
                bail!(
                    "{} has the classes {val_classes:?} but {} has {classes:?}; both need the \
                     same class folders",
                    val_dir.display(),
                    train_dir.display()
                );
            }
            ignored.extend(val_ignored);
            return Ok(Self {
                classes,
                train,
                val,
                ignored,
            });
        }
        let (classes, samples, ignored) = scan(root)?;
        Self::split(classes, samples, ignored, val_fraction, seed, root)
    }

    fn split(
        classes: Vec<String>,
        samples: Vec<Sample>,
        ignored: Vec<PathBuf>,
        val_fraction: f64,
        seed: u64,
        root: &Path,
    ) -> Result<Self> {
        if !(0.0..1.0).contains(&val_fraction) || val_fraction == 0.0 {
            bail!(
                "--val-fraction {val_fraction} must be above 0 and below 1 ({} has no val/ \
                 folder, so a fraction of each class is held out)",
                root.display()
            );
        }
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for label in 0..classes.len() {
            let mut members: Vec<Sample> = samples
                .iter()
                .filter(|s| s.label == label)
                .cloned()
                .collect();
            Rng::stream(seed, &[label as u64]).shuffle(&mut members);
            let held_out = if members.len() < 2 {
                0
            } else {
                ((members.len() as f64 * val_fraction).round() as usize).clamp(1, members.len() - 1)
            };
            val.extend(members.drain(..held_out));
            train.extend(members);
        }
        if val.is_empty() {
            bail!(
                "{} has no class with two images, so none can be held out for validation; add \
                 images, or put the validation images in val/ beside train/",
                root.display()
            );
        }
        train.sort_by(|a, b| a.path.cmp(&b.path));
        val.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Self {
            classes,
            train,
            val,
            ignored,
        })
    }
}

/// The class folders of `dir` and their images.
fn scan(dir: &Path) -> Result<(Vec<String>, Vec<Sample>, Vec<PathBuf>)> {
    let read = |dir: &Path| -> Result<Vec<PathBuf>> {
        let mut paths = std::fs::read_dir(dir)
            .with_context(|| format!("reading the folder {}", dir.display()))?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<std::io::Result<Vec<_>>>()
            .with_context(|| format!("reading the folder {}", dir.display()))?;
        paths.sort();
        Ok(paths)
    };
    let class_dirs: Vec<PathBuf> = read(dir)?.into_iter().filter(|p| p.is_dir()).collect();
    if class_dirs.len() < 2 {
        bail!(
            "{} has {} class folder(s) ({:?}); a classifier needs at least two: put each \
             class's images in a sub-folder named after it",
            dir.display(),
            class_dirs.len(),
            class_dirs
                .iter()
                .filter_map(|p| p.file_name())
                .collect::<Vec<_>>()
        );
    }
    let (mut classes, mut samples, mut ignored) = (Vec::new(), Vec::new(), Vec::new());
    for (label, class_dir) in class_dirs.iter().enumerate() {
        let name = class_dir
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("the folder name {} is not UTF-8", class_dir.display()))?;
        classes.push(name.to_string());
        let before = samples.len();
        for path in read(class_dir)? {
            let is_image = path.is_file()
                && path
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)));
            if is_image {
                samples.push(Sample { path, label });
            } else {
                ignored.push(path);
            }
        }
        if samples.len() == before {
            bail!(
                "the class folder {} has no JPEG or PNG images; add some or remove the folder",
                class_dir.display()
            );
        }
    }
    Ok((classes, samples, ignored))
}

/// A file that could not be read as an image, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// The file.
    pub path: PathBuf,
    /// The reason, as the decoder gave it.
    pub reason: String,
}

/// A batch of transformed images on the host.
#[derive(Clone, Debug, Default)]
pub struct ImageBatch {
    /// `len * 3 * size * size` values, CHW per image.
    pub images: Vec<f32>,
    /// Class indices.
    pub labels: Vec<i64>,
    /// The images of the batch that could not be read (left out of it).
    pub skipped: Vec<Skipped>,
}

impl ImageBatch {
    /// Images in the batch.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether no image of the batch could be read.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Batches of images read from files and transformed, epoch after epoch: the same batches
/// and augmentations for a seed, an epoch and a batch index on every run, so a resumed run
/// sees what an uninterrupted one would have.
#[derive(Clone, Debug)]
pub struct FolderLoader {
    samples: Arc<Vec<Sample>>,
    transforms: Transforms,
    batch_size: usize,
    /// Training: shuffled, augmented, the last partial batch dropped.
    train: bool,
    seed: u64,
    workers: usize,
}

impl FolderLoader {
    /// Training batches: shuffled every epoch, `RandomResizedCrop` and flip, decoded by
    /// `workers` threads.
    pub fn train(
        samples: Arc<Vec<Sample>>,
        transforms: Transforms,
        batch_size: usize,
        seed: u64,
        workers: usize,
    ) -> Self {
        Self {
            samples,
            transforms,
            batch_size: batch_size.max(1),
            train: true,
            seed,
            workers: workers.max(1),
        }
    }

    /// Evaluation batches: in order, resize and center crop, the last batch kept.
    pub fn eval(
        samples: Arc<Vec<Sample>>,
        transforms: Transforms,
        batch_size: usize,
        workers: usize,
    ) -> Self {
        Self {
            train: false,
            seed: 0,
            ..Self::train(samples, transforms, batch_size, 0, workers)
        }
    }

    /// The sample indices of every batch of `epoch`.
    pub fn batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let shuffle = self.train.then_some(self.seed);
        epoch_batches(
            self.samples.len(),
            self.batch_size,
            shuffle,
            epoch,
            self.train,
        )
    }

    /// Number of batches an epoch has.
    pub fn num_batches(&self) -> usize {
        self.batches(0).len()
    }

    /// The transforms it applies.
    pub fn transforms(&self) -> Transforms {
        self.transforms
    }

    /// Reads and transforms the images `indices` of batch `index` of `epoch`, spread over the
    /// worker threads.
    pub fn batch(&self, epoch: usize, index: usize, indices: &[usize]) -> ImageBatch {
        let size = self.transforms.size;
        let image_len = 3 * size * size;
        let mut values = vec![0f32; indices.len() * image_len];
        let mut results: Vec<Option<Result<(), String>>> = vec![None; indices.len()];
        let per_worker = indices.len().div_ceil(self.workers).max(1);
        std::thread::scope(|scope| {
            for ((chunk, out), result) in indices
                .chunks(per_worker)
                .zip(values.chunks_mut(per_worker * image_len))
                .zip(results.chunks_mut(per_worker))
            {
                scope.spawn(move || {
                    for ((&i, out), result) in
                        chunk.iter().zip(out.chunks_mut(image_len)).zip(result)
                    {
                        *result = Some(self.transform(epoch, index, i, out));
                    }
                });
            }
        });
        let mut batch = ImageBatch::default();
        batch.images.reserve(values.len());
        for ((&i, image), result) in indices.iter().zip(values.chunks(image_len)).zip(results) {
            let sample = &self.samples[i];
            match result.expect("every image is transformed") {
                Ok(()) => {
                    batch.images.extend_from_slice(image);
                    batch.labels.push(sample.label as i64);
                }
                Err(reason) => batch.skipped.push(Skipped {
                    path: sample.path.clone(),
                    reason,
                }),
            }
        }
        batch
    }

    fn transform(
        &self,
        epoch: usize,
        index: usize,
        sample: usize,
        out: &mut [f32],
    ) -> Result<(), String> {
        let path = &self.samples[sample].path;
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        let image = decode_rgb(&bytes).map_err(|e| format!("{e:#}"))?;
        if self.train {
            let mut rng = Rng::stream(self.seed, &[epoch as u64, index as u64, sample as u64, 1]);
            self.transforms.train(&image, &mut rng, out);
        } else {
            self.transforms.eval(&image, out);
        }
        Ok(())
    }

    /// The batches of `epoch` from batch `first` on, prepared `prefetch` batches ahead on a
    /// background thread while the caller trains.
    pub fn epoch_from(
        &self,
        epoch: usize,
        first: usize,
        prefetch: usize,
    ) -> impl Iterator<Item = ImageBatch> + use<> {
        let (sender, receiver) = mpsc::sync_channel(prefetch.max(1));
        let loader = self.clone();
        std::thread::spawn(move || {
            for (index, indices) in loader.batches(epoch).iter().enumerate().skip(first) {
                if sender.send(loader.batch(epoch, index, indices)).is_err() {
                    break; // the consumer stopped early
                }
            }
        });
        receiver.into_iter()
    }
}
