//! # cifar10-burn
//!
//! CIFAR-10 for the [Burn](https://burn.dev) deep learning framework: an exact reader of the
//! official binary version, download with checksums, augmentation and fast batches.
//!
//! ```no_run
//! use burn::data::dataset::Dataset;
//! use cifar10_burn::{Cifar10Dataset, Split, CLASSES};
//!
//! let test = Cifar10Dataset::new("data/cifar-10-batches-bin", Split::Test)?;
//! let item = test.get(0)?;
//! println!("{} images; the first is a {}", test.len(), CLASSES[item.label as usize]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Map
//! - [`format`](mod@format): the 3073-byte record format, parsed and validated.
//! - [`Cifar10Dataset`] ([`dataset`]): a split in memory, from the folder, its parent or the
//!   `.tar.gz` archive; Burn's `Dataset<Cifar10Item>`.
//! - [`download`] (feature `download`, on by default): fetch, verify and extract the archive
//!   into a cache folder.
//! - [`augment`]: random crop, flip, Cutout, normalization; seeded.
//! - [`batcher`]: items to `[N, 3, 32, 32]` tensors, Burn's `Batcher` and a reproducible
//!   [`EpochLoader`].

#![warn(missing_docs)]

pub mod augment;
pub mod batcher;
pub mod dataset;
#[cfg(feature = "download")]
pub mod download;
mod error;
pub mod format;

pub use augment::{Augmentation, Rng};
pub use batcher::{
    Cifar10Batch, Cifar10Batcher, EpochLoader, HostBatch, epoch_batches, part_range,
};
pub use dataset::{Cifar10Dataset, Cifar10Item, Split};
pub use error::Cifar10Error;
pub use format::CLASSES;

#[cfg(all(doctest, feature = "download"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
