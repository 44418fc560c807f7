//! # resnet-burn
//!
//! The torchvision ResNet family for the [Burn](https://burn.dev) deep learning framework:
//! ResNet-18/34/50/101/152, ResNeXt and Wide ResNet, with torchvision's configuration,
//! initialization and parameter names, on every Burn backend.
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//! use resnet_burn::{ResNetConfig, Stem};
//!
//! let device = Device::flex();
//! let model = ResNetConfig::resnet18(10).with_stem(Stem::Cifar).init(&device);
//! let logits = model.forward(Tensor::<4>::zeros([2, 3, 32, 32], &device));
//! assert_eq!(logits.dims(), [2, 10]);
//! assert_eq!(model.trainable_params(), 11_173_962); // torchvision's count
//! ```
//!
//! ## Map
//! - [`ResNetConfig`] ([`config`]): what to build; presets such as [`ResNetConfig::resnet50`],
//!   torchvision's knobs (`groups`, `width_per_group`, `replace_stride_with_dilation`,
//!   `zero_init_residual`), `in_channels` and the [`Stem`]; [`ConfigError`] when it
//!   cannot be built; [`ResNetConfig::try_init_seeded`] for the same initial weights on every
//!   backend from a seed of one's own.
//! - [`ResNet`] ([`resnet`]): the network; [`forward`](ResNet::forward),
//!   [`forward_features`](ResNet::forward_features),
//!   [`forward_stages`](ResNet::forward_stages), [`with_new_head`](ResNet::with_new_head),
//!   [`trainable_params`](ResNet::trainable_params).
//! - [`BasicBlock`], [`Bottleneck`] and [`Downsample`] ([`block`]): the residual blocks.
//! - [`Precision`]: the float types a network computes in (f32, or f16 convolutions on GPUs),
//!   a value of its config ([`ResNetConfig::with_precision`]) and of the network
//!   ([`ResNet::with_precision`]).
//! - [`torchvision`]: torchvision weights in and out: [`ResNet::load_torchvision`] reads
//!   `.pth` (without running the pickle) and `.safetensors` files strictly, with
//!   [`ImportError`] listing every offending key; [`ResNet::save_torchvision`] writes
//!   safetensors that torchvision loads with `strict=True`.
//! - [`pretrained`] (feature `pretrained`): torchvision's published ImageNet weights,
//!   downloaded once and verified.
//! - [`train`] (feature `train`): burn-train's `TrainStep` and `InferenceStep` for [`ResNet`]
//!   and for a [`train::Classifier`] with label smoothing.
//!
//! ## Backends
//! Nothing here names a backend: the device a model is built on decides. The cargo features
//! `flex` (default), `ndarray`, `wgpu`, `vulkan`, `metal` and `cuda` turn on the matching Burn
//! backends together with the features that make each fast: on flex and ndarray the
//! convolutions, BatchNorm and pooling run on [`burn-cpu-kernels`](burn_cpu_kernels); the GPU
//! backends get fusion and autotuning.

#![warn(missing_docs)]

pub mod block;
pub mod config;
mod ops;
mod precision;
#[cfg(feature = "pretrained")]
pub mod pretrained;
mod pth;
pub mod resnet;
mod seeded;
pub mod torchvision;
#[cfg(feature = "train")]
pub mod train;

pub use block::{BasicBlock, Bottleneck, Downsample, ResidualBlock};
pub use config::{BlockKind, ConfigError, ResNetConfig, Stem};
pub use precision::{ParsePrecisionError, Precision};
pub use resnet::{InputError, ResNet};
pub use torchvision::{ImportError, LoadOptions, StateDictEntry};

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
