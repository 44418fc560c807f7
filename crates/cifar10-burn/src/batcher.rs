//! From items to device tensors: [`Cifar10Batcher`] for Burn's data loaders, and
//! [`EpochLoader`], a faster, fully reproducible loader over a [`Cifar10Dataset`].
//!
//! The pixels are augmented and normalized on the CPU, one image per task on all cores
//! (a few microseconds an image), then uploaded as one `[N, 3, 32, 32]` tensor. A loader
//! prepares the next batches on a background thread while the model trains on this one.

use std::ops::Range;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::mpsc;

use burn::data::dataloader::batcher::Batcher;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rayon::prelude::*;

use crate::augment::{Augmentation, Rng, normalize};
use crate::dataset::{Cifar10Dataset, Cifar10Item};
use crate::format::{IMAGE_BYTES, SIDE};

/// A batch on a device.
#[derive(Clone, Debug)]
pub struct Cifar10Batch {
    /// Normalized images, `[N, 3, 32, 32]`, f32.
    pub images: Tensor<4>,
    /// Class indices, `[N]`.
    pub targets: Tensor<1, Int>,
}

/// A batch prepared on the host, ready to upload with [`HostBatch::to_device`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostBatch {
    /// Normalized pixels, image after image, CHW.
    pub pixels: Vec<f32>,
    /// Class indices.
    pub labels: Vec<i64>,
}

impl HostBatch {
    /// Augments (when `augmentation` is given) and normalizes `images`, in parallel. The
    /// random choices for image `i` come from `Rng::stream(seed, &[i])`, so the result does
    /// not depend on the number of threads.
    pub fn prepare(
        images: &[&[u8]],
        labels: &[u8],
        augmentation: Option<&Augmentation>,
        seed: u64,
    ) -> Self {
        Self::prepare_part(images, labels, augmentation, seed, 0)
    }

    /// [`prepare`](Self::prepare) for part of a batch whose first image is image `first` of
    /// the whole batch: image `i` of the part draws from `Rng::stream(seed, &[first + i])`, so
    /// the parts of a batch, prepared apart (by the processes of a distributed run), join
    /// into the batch `prepare` gives.
    pub fn prepare_part(
        images: &[&[u8]],
        labels: &[u8],
        augmentation: Option<&Augmentation>,
        seed: u64,
        first: usize,
    ) -> Self {
        let mut pixels = vec![0f32; images.len() * IMAGE_BYTES];
        pixels
            .par_chunks_mut(IMAGE_BYTES)
            .zip(images.par_iter())
            .enumerate()
            .for_each(|(i, (out, image))| match augmentation {
                Some(augmentation) => {
                    let index = (first + i) as u64;
                    let choice = augmentation.draw(&mut Rng::stream(seed, &[index]));
                    augmentation.apply(image, choice, out);
                }
                None => normalize(image, out),
            });
        Self {
            pixels,
            labels: labels.iter().map(|&l| l as i64).collect(),
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Splits the batch into `parts` consecutive shards whose sizes differ by at most one
    /// (the first ones are larger), for data-parallel training. A batch smaller than
    /// `parts` gives one shard an image; an empty batch gives no shard.
    pub fn split(self, parts: usize) -> Vec<HostBatch> {
        let n = self.len();
        let parts = parts.clamp(1, n.max(1)).min(n);
        let per_image = self.pixels.len() / n.max(1);
        (0..parts)
            .map(|part| {
                let Range { start, end } = part_range(n, parts, part);
                HostBatch {
                    pixels: self.pixels[start * per_image..end * per_image].to_vec(),
                    labels: self.labels[start..end].to_vec(),
                }
            })
            .collect()
    }

    /// Uploads the batch to `device`.
    pub fn to_device(self, device: &Device) -> Cifar10Batch {
        let n = self.len();
        Cifar10Batch {
            images: Tensor::from_data(TensorData::new(self.pixels, [n, 3, SIDE, SIDE]), device),
            targets: Tensor::from_data(TensorData::new(self.labels, [n]), device),
        }
    }
}

/// The images of part `part` of `n` images split into `parts` consecutive parts whose sizes
/// differ by at most one, the first ones larger: the rule of [`HostBatch::split`] and of
/// [`EpochLoader::part`]. Parts past the `n`-th are empty.
pub fn part_range(n: usize, parts: usize, part: usize) -> Range<usize> {
    let parts = parts.max(1);
    let (size, larger) = (n / parts, n % parts);
    let start = part * size + part.min(larger);
    start..start + size + usize::from(part < larger)
}

/// Burn's [`Batcher`] for [`Cifar10Item`]s: normalization only (evaluation), or augmentation
/// too (training).
///
/// With augmentation, the `k`-th call draws from `Rng::stream(seed, &[k])`: reproducible
/// when batches are made in a fixed order (one loader worker). [`EpochLoader`] is
/// reproducible in every case.
#[derive(Debug)]
pub struct Cifar10Batcher {
    augmentation: Option<Augmentation>,
    seed: u64,
    calls: Mutex<u64>,
}

impl Cifar10Batcher {
    /// A batcher for evaluation: normalization only.
    pub fn eval() -> Self {
        Self {
            augmentation: None,
            seed: 0,
            calls: Mutex::new(0),
        }
    }

    /// A batcher for training, with `augmentation` drawn from `seed`.
    pub fn train(augmentation: Augmentation, seed: u64) -> Self {
        Self {
            augmentation: Some(augmentation),
            seed,
            calls: Mutex::new(0),
        }
    }
}

impl Batcher<Cifar10Item, Cifar10Batch> for Cifar10Batcher {
    fn batch(&self, items: Vec<Cifar10Item>, device: &Device) -> Cifar10Batch {
        let call = {
            let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            *calls += 1;
            *calls - 1
        };
        let images: Vec<&[u8]> = items.iter().map(|item| item.image.as_slice()).collect();
        let labels: Vec<u8> = items.iter().map(|item| item.label).collect();
        let seed = Rng::stream(self.seed, &[call]).next_u64();
        HostBatch::prepare(&images, &labels, self.augmentation.as_ref(), seed).to_device(device)
    }
}

/// The indices `0..len` of every batch of `epoch`, in chunks of `batch_size`: shuffled by a
/// generator of `shuffle`'s seed and the epoch (a new order each epoch, the same on every
/// machine), or in order; with `drop_last`, a last partial batch is dropped when there are
/// others. Any loader that shares [`EpochLoader`]'s resumption contract can use it.
pub fn epoch_batches(
    len: usize,
    batch_size: usize,
    shuffle: Option<u64>,
    epoch: usize,
    drop_last: bool,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut order: Vec<usize> = (0..len).collect();
    if let Some(seed) = shuffle {
        Rng::stream(seed, &[epoch as u64]).shuffle(&mut order);
    }
    let mut batches: Vec<Vec<usize>> = order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    if drop_last && batches.len() > 1 && batches.last().is_some_and(|b| b.len() < batch_size) {
        batches.pop();
    }
    batches
}

/// Batches of a [`Cifar10Dataset`] epoch after epoch: shuffled (or in order), augmented
/// (or not), the same for a given seed and epoch whatever the machine, so a run resumed at
/// an epoch boundary sees exactly the batches of an uninterrupted one.
#[derive(Clone, Debug)]
pub struct EpochLoader {
    dataset: Arc<Cifar10Dataset>,
    batch_size: usize,
    shuffle: bool,
    drop_last: bool,
    augmentation: Option<Augmentation>,
    seed: u64,
    /// `(part, parts)`: only this part of every batch ([`EpochLoader::part`]).
    part: (usize, usize),
}

impl EpochLoader {
    /// A loader for evaluation: in order, no augmentation, the last batch kept.
    pub fn eval(dataset: Arc<Cifar10Dataset>, batch_size: usize) -> Self {
        Self {
            dataset,
            batch_size: batch_size.max(1),
            shuffle: false,
            drop_last: false,
            augmentation: None,
            seed: 0,
            part: (0, 1),
        }
    }

    /// A loader for training: shuffled every epoch, augmented, the last partial batch
    /// dropped (a tiny last batch makes BatchNorm statistics noisy).
    pub fn train(
        dataset: Arc<Cifar10Dataset>,
        batch_size: usize,
        augmentation: Option<Augmentation>,
        seed: u64,
    ) -> Self {
        Self {
            dataset,
            batch_size: batch_size.max(1),
            shuffle: true,
            drop_last: true,
            augmentation,
            seed,
            part: (0, 1),
        }
    }

    /// This loader, giving only part `part` of `parts` of every batch ([`part_range`]), as
    /// the processes of a distributed run do: the parts of a batch join into the batch the
    /// whole loader gives, augmentation included.
    ///
    /// # Panics
    ///
    /// If `part` is not below `parts`.
    pub fn part(self, part: usize, parts: usize) -> Self {
        assert!(part < parts, "part {part} of {parts} does not exist");
        Self {
            part: (part, parts),
            ..self
        }
    }

    /// The dataset.
    pub fn dataset(&self) -> &Cifar10Dataset {
        &self.dataset
    }

    /// The image indices of every batch of `epoch`.
    pub fn batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let shuffle = self.shuffle.then_some(self.seed);
        epoch_batches(
            self.dataset.len(),
            self.batch_size,
            shuffle,
            epoch,
            self.drop_last,
        )
    }

    /// Number of batches an epoch has.
    pub fn num_batches(&self) -> usize {
        self.batches(0).len()
    }

    /// Prepares batch `index` of `epoch` (whose image indices are `indices`) on the host: this
    /// loader's part of it (all of it unless [`part`](Self::part) chose one).
    ///
    /// # Panics
    ///
    /// If an index is not below the dataset's length; [`batches`](Self::batches) gives
    /// only valid ones.
    pub fn host_batch(&self, epoch: usize, index: usize, indices: &[usize]) -> HostBatch {
        let (part, parts) = self.part;
        let range = part_range(indices.len(), parts, part);
        let first = range.start;
        let indices = &indices[range];
        let images: Vec<&[u8]> = indices
            .iter()
            .map(|&i| self.dataset.image(i).expect("index from batches()"))
            .collect();
        let labels: Vec<u8> = indices.iter().map(|&i| self.dataset.labels()[i]).collect();
        let seed = Rng::stream(self.seed, &[epoch as u64, index as u64, 1]).next_u64();
        HostBatch::prepare_part(&images, &labels, self.augmentation.as_ref(), seed, first)
    }

    /// The host batches of `epoch`, prepared `prefetch` batches ahead on a background thread.
    pub fn epoch(&self, epoch: usize, prefetch: usize) -> impl Iterator<Item = HostBatch> + use<> {
        self.epoch_from(epoch, 0, prefetch)
    }

    /// [`epoch`](Self::epoch) from batch `first` on (to resume an interrupted epoch).
    pub fn epoch_from(
        &self,
        epoch: usize,
        first: usize,
        prefetch: usize,
    ) -> impl Iterator<Item = HostBatch> + use<> {
        let (sender, receiver) = mpsc::sync_channel(prefetch.max(1));
        let loader = self.clone();
        std::thread::spawn(move || {
            for (index, indices) in loader.batches(epoch).iter().enumerate().skip(first) {
                if sender
                    .send(loader.host_batch(epoch, index, indices))
                    .is_err()
                {
                    break; // the consumer stopped early
                }
            }
        });
        receiver.into_iter()
    }
}
