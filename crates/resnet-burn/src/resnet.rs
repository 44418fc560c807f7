//! [`ResNet`]: stem, four residual stages, global average pooling and a linear head.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor};

use crate::Precision;
use crate::block::{BasicBlock, BlockSpec, Bottleneck, ConvSpec, ResidualBlock, batch_norm};
use crate::config::{BlockKind, ConfigError, ResNetConfig, Stem};
use crate::ops::{Epilogue, conv_bn, max_pool};

/// A residual network as torchvision builds it: ResNet, ResNeXt or Wide ResNet.
///
/// Built from a [`ResNetConfig`] with [`ResNetConfig::init`]. Field names equal torchvision's
/// state-dict names, so `conv1`, `bn1`, `layer1`..`layer4` and `fc` are what they are there.
#[derive(Module, Debug)]
pub struct ResNet {
    /// The stem convolution: 7x7 with stride 2 (ImageNet stem) or 3x3 with stride 1 (CIFAR).
    pub conv1: Conv2d,
    /// BatchNorm after the stem convolution.
    pub bn1: BatchNorm,
    /// 3x3 max pool with stride 2 (ImageNet stem only).
    pub maxpool: Option<MaxPool2d>,
    /// Stage 1: 64 planes (`base_channels`), stride 1.
    pub layer1: Vec<ResidualBlock>,
    /// Stage 2: 128 planes, stride 2 (or dilation).
    pub layer2: Vec<ResidualBlock>,
    /// Stage 3: 256 planes, stride 2 (or dilation).
    pub layer3: Vec<ResidualBlock>,
    /// Stage 4: 512 planes, stride 2 (or dilation).
    pub layer4: Vec<ResidualBlock>,
    /// The classification head: `feature_channels -> num_classes`.
    pub fc: Linear,
    /// What this network was built from (kept in step with [`ResNet::with_new_head`]).
    #[module(skip)]
    config: ResNetConfig,
}

/// An input tensor that a [`ResNet`] cannot take.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// The channel dimension differs from the config's `in_channels`.
    #[error(
        "input has {found} channels (shape {shape:?}) but the model was built with \
         in_channels = {expected}; images must be [batch, {expected}, height, width]"
    )]
    Channels {
        /// The model's `in_channels`.
        expected: usize,
        /// The input's channel count.
        found: usize,
        /// The input's full shape.
        shape: [usize; 4],
    },
    /// The batch, the height or the width is 0.
    #[error("input shape {shape:?} is empty: batch, height and width must be at least 1")]
    Empty {
        /// The input's full shape.
        shape: [usize; 4],
    },
}

impl ResNetConfig {
    /// Builds the network on `device`, initialized as torchvision initializes it.
    ///
    /// # Panics
    ///
    /// Panics with the message of the [`ConfigError`] if [`validate`](Self::validate) fails;
    /// [`try_init`](Self::try_init) returns the error instead.
    pub fn init(&self, device: &Device) -> ResNet {
        match self.try_init(device) {
            Ok(model) => model,
            Err(error) => panic!("invalid ResNetConfig: {error}"),
        }
    }

    /// Builds the network on `device`, or says why the config cannot be built.
    pub fn try_init(&self, device: &Device) -> Result<ResNet, ConfigError> {
        self.validate()?;
        Ok(ResNet::build(self, device))
    }
}

impl ResNet {
    fn build(config: &ResNetConfig, device: &Device) -> Self {
        let (conv1, maxpool) = match config.stem {
            Stem::ImageNet => {
                let conv = ConvSpec {
                    stride: 2,
                    padding: 3,
                    ..ConvSpec::new(config.in_channels, config.base_channels, 7)
                };
                let pool = MaxPool2dConfig::new([3, 3])
                    .with_strides([2, 2])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .init();
                (conv, Some(pool))
            }
            Stem::Cifar => (
                ConvSpec::conv3x3(config.in_channels, config.base_channels, 1, 1, 1),
                None,
            ),
        };

        let mut stages = StageBuilder {
            config,
            in_channels: config.base_channels,
            dilation: 1,
            device,
        };
        let [d2, d3, d4] = config.replace_stride_with_dilation;
        let [p1, p2, p3, p4] = config.stage_planes();
        let layer1 = stages.stage(p1, config.layers[0], 1, false);
        let layer2 = stages.stage(p2, config.layers[1], 2, d2);
        let layer3 = stages.stage(p3, config.layers[2], 2, d3);
        let layer4 = stages.stage(p4, config.layers[3], 2, d4);

        Self {
            conv1: conv1.init(device),
            bn1: batch_norm(config.base_channels, false, device),
            maxpool,
            layer1,
            layer2,
            layer3,
            layer4,
            fc: LinearConfig::new(config.feature_channels(), config.num_classes).init(device),
            config: config.clone(),
        }
    }

    /// The configuration this network was built from.
    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// Class scores (logits): `[batch, in_channels, H, W] -> [batch, num_classes]`.
    ///
    /// Any `H, W >= 1` works; the ImageNet stem expects 224x224, the CIFAR stem 32x32.
    /// BatchNorm uses batch statistics on an autodiff device (training) unless the model
    /// was put in evaluation mode with [`Module::valid`], and running statistics otherwise.
    ///
    /// # Panics
    ///
    /// Panics if the input is not of the form the model takes (see
    /// [`try_forward`](Self::try_forward), which returns an [`InputError`] instead).
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.fc.forward(self.forward_features(x))
    }

    /// [`forward`](Self::forward) that checks the input first.
    pub fn try_forward(&self, x: Tensor<4>) -> Result<Tensor<2>, InputError> {
        self.check_input(&x)?;
        Ok(self.forward(x))
    }

    /// Pooled features before the head: `[batch, in_channels, H, W] -> [batch, C]`, with
    /// `C = 512` for basic blocks and `2048` for bottlenecks.
    pub fn forward_features(&self, x: Tensor<4>) -> Tensor<2> {
        let [.., c5] = self.forward_stages(x);
        let [batch, channels, height, width] = c5.dims();
        c5.reshape([batch, channels, height * width])
            .mean_dim(2)
            .reshape([batch, channels])
    }

    /// The four stage outputs, as a detection or segmentation backbone needs them.
    ///
    /// For a `[batch, in_channels, H, W]` input and the ImageNet stem, stage `i` (1 to 4)
    /// has `base_channels * 2^(i-1) * expansion` channels at `H / 2^(i+1)` (strides 4, 8, 16, 32; a
    /// stage with `replace_stride_with_dilation` keeps the previous stage's size). The CIFAR
    /// stem has strides 1, 2, 4, 8.
    pub fn forward_stages(&self, x: Tensor<4>) -> [Tensor<4>; 4] {
        let precision = self.config.precision;
        let x = conv_bn(&self.conv1, &self.bn1, x, Epilogue::Relu, precision);
        let x = match &self.maxpool {
            Some(pool) => max_pool(pool, x),
            None => x,
        };
        let c2 = forward_stage(&self.layer1, x);
        let c3 = forward_stage(&self.layer2, c2.clone());
        let c4 = forward_stage(&self.layer3, c3.clone());
        let c5 = forward_stage(&self.layer4, c4.clone());
        [c2, c3, c4, c5]
    }

    /// Checks that `x` has the shape this model takes.
    pub fn check_input(&self, x: &Tensor<4>) -> Result<(), InputError> {
        let shape = x.dims();
        let [batch, channels, height, width] = shape;
        if channels != self.config.in_channels {
            return Err(InputError::Channels {
                expected: self.config.in_channels,
                found: channels,
                shape,
            });
        }
        if batch == 0 || height == 0 || width == 0 {
            return Err(InputError::Empty { shape });
        }
        Ok(())
    }

    /// Replaces the classification head by a new, freshly initialized one with
    /// `num_classes` outputs, for fine-tuning on another task. The rest of the network
    /// (its weights and BatchNorm statistics) is kept.
    pub fn with_new_head(
        mut self,
        num_classes: usize,
        device: &Device,
    ) -> Result<Self, ConfigError> {
        if num_classes == 0 {
            return Err(ConfigError::NoClasses);
        }
        self.fc = LinearConfig::new(self.config.feature_channels(), num_classes).init(device);
        self.config.num_classes = num_classes;
        Ok(self)
    }

    /// The float types this network computes in (see [`Precision`]).
    pub fn precision(&self) -> Precision {
        self.config.precision
    }

    /// The same network, computing in `precision` from now on; its weights are unchanged.
    /// Two networks in one process may compute in different precisions.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.config.precision = precision;
        for stage in [
            &mut self.layer1,
            &mut self.layer2,
            &mut self.layer3,
            &mut self.layer4,
        ] {
            for block in stage.iter_mut() {
                block.set_precision(precision);
            }
        }
        self
    }

    /// Number of trainable parameters, as torchvision counts them:
    /// `sum(p.numel() for p in model.parameters())`.
    ///
    /// Burn's [`Module::num_params`] also counts the BatchNorm running mean and variance
    /// (buffers in PyTorch, not parameters): 11,183,562 instead of 11,173,962 for the CIFAR
    /// ResNet-18 with 10 classes.
    pub fn trainable_params(&self) -> usize {
        self.torchvision_state_dict()
            .iter()
            .filter(|entry| {
                let buffer =
                    entry.key.ends_with(".running_mean") || entry.key.ends_with(".running_var");
                entry.burn_path.is_some() && !buffer
            })
            .map(|entry| entry.shape.iter().product::<usize>())
            .sum()
    }
}

fn forward_stage(blocks: &[ResidualBlock], x: Tensor<4>) -> Tensor<4> {
    blocks.iter().fold(x, |x, block| block.forward(x))
}

/// torchvision's `_make_layer`, with the running input width and dilation it keeps.
struct StageBuilder<'a> {
    config: &'a ResNetConfig,
    in_channels: usize,
    dilation: usize,
    device: &'a Device,
}

impl StageBuilder<'_> {
    fn stage(
        &mut self,
        planes: usize,
        blocks: usize,
        stride: usize,
        dilate: bool,
    ) -> Vec<ResidualBlock> {
        let config = self.config;
        let expansion = config.block.expansion();
        let previous_dilation = self.dilation;
        let stride = if dilate {
            self.dilation *= stride;
            1
        } else {
            stride
        };
        let first = BlockSpec {
            in_channels: self.in_channels,
            planes,
            stride,
            groups: config.groups,
            width_per_group: config.width_per_group,
            dilation: previous_dilation,
            downsample: stride != 1 || self.in_channels != planes * expansion,
            zero_init_residual: config.zero_init_residual,
            precision: config.precision,
        };
        let rest = BlockSpec {
            in_channels: planes * expansion,
            stride: 1,
            dilation: self.dilation,
            downsample: false,
            ..first
        };
        self.in_channels = planes * expansion;

        std::iter::once(first)
            .chain(std::iter::repeat_n(rest, blocks - 1))
            .map(|spec| match config.block {
                BlockKind::Basic => ResidualBlock::Basic(BasicBlock::new(&spec, self.device)),
                BlockKind::Bottleneck => {
                    ResidualBlock::Bottleneck(Bottleneck::new(&spec, self.device))
                }
            })
            .collect()
    }
}
