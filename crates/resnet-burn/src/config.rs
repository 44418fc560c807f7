//! [`ResNetConfig`]: what to build, with torchvision's knobs, presets and validation.

use burn::config::Config;
use serde::{Deserialize, Serialize};

use crate::Precision;

/// Which residual block the network stacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockKind {
    /// Two 3x3 convolutions, expansion 1 ([`BasicBlock`](crate::BasicBlock)): ResNet-18/34.
    Basic,
    /// 1x1 -> 3x3 -> 1x1 convolutions, expansion 4 ([`Bottleneck`](crate::Bottleneck)):
    /// ResNet-50/101/152, ResNeXt, Wide ResNet.
    Bottleneck,
}

impl BlockKind {
    /// Output channels of a block divided by its `planes` (1 for basic, 4 for bottleneck).
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// The first layers of the network, before the four residual stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stem {
    /// torchvision's stem: 7x7 convolution with stride 2, BatchNorm, ReLU, 3x3 max pool with
    /// stride 2. The features are 1/32 of the input size.
    ImageNet,
    /// The stem used for 32x32 images (CIFAR): 3x3 convolution with stride 1, BatchNorm, ReLU
    /// and no max pool. The features are 1/8 of the input size.
    Cifar,
}

/// Configuration of a [`ResNet`](crate::ResNet), with torchvision's parameters and defaults.
///
/// Start from a preset such as [`ResNetConfig::resnet18`] and adjust it with the `with_*`
/// methods; the config serializes to JSON, so a training run can save what it built.
///
/// ```
/// use resnet_burn::{ResNetConfig, Stem};
///
/// let config = ResNetConfig::resnet18(10).with_stem(Stem::Cifar);
/// assert!(config.validate().is_ok());
/// ```
#[derive(Config, Debug, PartialEq)]
pub struct ResNetConfig {
    /// The residual block of every stage.
    pub block: BlockKind,
    /// Number of blocks in each of the four stages (`[2, 2, 2, 2]` for ResNet-18).
    pub layers: [usize; 4],
    /// Number of output classes of the final linear layer.
    #[config(default = 1000)]
    pub num_classes: usize,
    /// Groups of the 3x3 convolution in bottleneck blocks (32 for ResNeXt-50 32x4d).
    #[config(default = 1)]
    pub groups: usize,
    /// Channels per group of the bottleneck's 3x3 convolution, for 64 planes (4 for
    /// ResNeXt-50 32x4d, 128 for Wide ResNet-50-2).
    #[config(default = 64)]
    pub width_per_group: usize,
    /// For stages 2, 3 and 4: replace the stride 2 by a dilation, which keeps the feature map
    /// larger (output stride 16 or 8, as in segmentation backbones). Bottleneck blocks only.
    #[config(default = "[false, false, false]")]
    pub replace_stride_with_dilation: [bool; 3],
    /// Start the last BatchNorm of every residual branch at zero, so that each block begins as
    /// the identity (followed by ReLU). Improves training of deep networks by 0.2-0.3% in
    /// "Accurate, Large Minibatch SGD" (Goyal et al., 2017).
    #[config(default = false)]
    pub zero_init_residual: bool,
    /// Number of channels of the input images.
    #[config(default = 3)]
    pub in_channels: usize,
    /// The stem: ImageNet (7x7 conv and max pool) or CIFAR (3x3 conv).
    #[config(default = "Stem::ImageNet")]
    pub stem: Stem,
    /// Channels of the stem and planes of the first stage; stage `i` has
    /// `base_channels * 2^(i-1)` planes. torchvision fixes it at 64; smaller values give the
    /// narrow networks used in tests and on small data sets.
    #[config(default = 64)]
    pub base_channels: usize,
    /// The float types the network computes in; f32 by default (see [`Precision`]).
    #[config(default = "Precision::F32")]
    pub precision: Precision,
}

/// A [`ResNetConfig`] that cannot be built, with the values at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `num_classes` is 0.
    #[error("num_classes must be at least 1, got 0")]
    NoClasses,
    /// `in_channels` is 0.
    #[error("in_channels must be at least 1, got 0")]
    NoInputChannels,
    /// `base_channels` is 0.
    #[error("base_channels must be at least 1, got 0")]
    NoBaseChannels,
    /// A stage has no block.
    #[error(
        "stage {stage} (layer{stage}) has 0 blocks; every stage needs at least one (layers = {layers:?})"
    )]
    EmptyStage {
        /// The stage at fault, 1 to 4.
        stage: usize,
        /// All four block counts.
        layers: [usize; 4],
    },
    /// A basic block was asked for groups or a width it does not have.
    #[error(
        "BasicBlock only supports groups = 1 and width_per_group = 64, got groups = {groups} and \
         width_per_group = {width_per_group}; use BlockKind::Bottleneck for ResNeXt or Wide ResNet"
    )]
    BasicBlockWidth {
        /// The configured groups.
        groups: usize,
        /// The configured width per group.
        width_per_group: usize,
    },
    /// A basic block was asked for dilation.
    #[error(
        "BasicBlock does not support dilation (replace_stride_with_dilation = {replace_stride_with_dilation:?}); \
         use BlockKind::Bottleneck"
    )]
    BasicBlockDilation {
        /// The configured dilation flags.
        replace_stride_with_dilation: [bool; 3],
    },
    /// `groups` or `width_per_group` is 0.
    #[error(
        "groups and width_per_group must be at least 1, got groups = {groups} and width_per_group = {width_per_group}"
    )]
    ZeroWidth {
        /// The configured groups.
        groups: usize,
        /// The configured width per group.
        width_per_group: usize,
    },
    /// The bottleneck width of the first stage rounds down to 0.
    #[error(
        "width_per_group = {width_per_group} with base_channels = {base_channels} gives layer1 a \
         bottleneck width of 0 (width = planes * width_per_group / 64 * groups); make \
         base_channels * width_per_group at least 64"
    )]
    ZeroBottleneckWidth {
        /// The configured width per group.
        width_per_group: usize,
        /// The configured base channels.
        base_channels: usize,
    },
}

impl ResNetConfig {
    fn preset(block: BlockKind, layers: [usize; 4], num_classes: usize) -> Self {
        Self::new(block, layers).with_num_classes(num_classes)
    }

    /// ResNet-18: basic blocks `[2, 2, 2, 2]` (torchvision `resnet18`).
    pub fn resnet18(num_classes: usize) -> Self {
        Self::preset(BlockKind::Basic, [2, 2, 2, 2], num_classes)
    }

    /// ResNet-34: basic blocks `[3, 4, 6, 3]` (torchvision `resnet34`).
    pub fn resnet34(num_classes: usize) -> Self {
        Self::preset(BlockKind::Basic, [3, 4, 6, 3], num_classes)
    }

    /// ResNet-50: bottleneck blocks `[3, 4, 6, 3]` (torchvision `resnet50`).
    pub fn resnet50(num_classes: usize) -> Self {
        Self::preset(BlockKind::Bottleneck, [3, 4, 6, 3], num_classes)
    }

    /// ResNet-101: bottleneck blocks `[3, 4, 23, 3]` (torchvision `resnet101`).
    pub fn resnet101(num_classes: usize) -> Self {
        Self::preset(BlockKind::Bottleneck, [3, 4, 23, 3], num_classes)
    }

    /// ResNet-152: bottleneck blocks `[3, 8, 36, 3]` (torchvision `resnet152`).
    pub fn resnet152(num_classes: usize) -> Self {
        Self::preset(BlockKind::Bottleneck, [3, 8, 36, 3], num_classes)
    }

    /// ResNeXt-50 32x4d: ResNet-50 with 32 groups of 4 channels (torchvision `resnext50_32x4d`).
    pub fn resnext50_32x4d(num_classes: usize) -> Self {
        Self::resnet50(num_classes)
            .with_groups(32)
            .with_width_per_group(4)
    }

    /// ResNeXt-101 32x8d (torchvision `resnext101_32x8d`).
    pub fn resnext101_32x8d(num_classes: usize) -> Self {
        Self::resnet101(num_classes)
            .with_groups(32)
            .with_width_per_group(8)
    }

    /// ResNeXt-101 64x4d (torchvision `resnext101_64x4d`).
    pub fn resnext101_64x4d(num_classes: usize) -> Self {
        Self::resnet101(num_classes)
            .with_groups(64)
            .with_width_per_group(4)
    }

    /// Wide ResNet-50-2: ResNet-50 with bottlenecks twice as wide (torchvision
    /// `wide_resnet50_2`).
    pub fn wide_resnet50_2(num_classes: usize) -> Self {
        Self::resnet50(num_classes).with_width_per_group(128)
    }

    /// Wide ResNet-101-2 (torchvision `wide_resnet101_2`).
    pub fn wide_resnet101_2(num_classes: usize) -> Self {
        Self::resnet101(num_classes).with_width_per_group(128)
    }

    /// The preset of the given torchvision name (`"resnet18"`, ..., `"wide_resnet101_2"`).
    pub fn from_name(name: &str, num_classes: usize) -> Option<Self> {
        let build = match name {
            "resnet18" => Self::resnet18,
            "resnet34" => Self::resnet34,
            "resnet50" => Self::resnet50,
            "resnet101" => Self::resnet101,
            "resnet152" => Self::resnet152,
            "resnext50_32x4d" => Self::resnext50_32x4d,
            "resnext101_32x8d" => Self::resnext101_32x8d,
            "resnext101_64x4d" => Self::resnext101_64x4d,
            "wide_resnet50_2" => Self::wide_resnet50_2,
            "wide_resnet101_2" => Self::wide_resnet101_2,
            _ => return None,
        };
        Some(build(num_classes))
    }

    /// The names [`from_name`](Self::from_name) accepts, smallest network first.
    pub const PRESETS: [&'static str; 10] = [
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "resnext50_32x4d",
        "resnext101_32x8d",
        "resnext101_64x4d",
        "wide_resnet50_2",
        "wide_resnet101_2",
    ];

    /// Checks that the configuration describes a network that can be built.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.num_classes == 0 {
            return Err(ConfigError::NoClasses);
        }
        if self.in_channels == 0 {
            return Err(ConfigError::NoInputChannels);
        }
        if self.base_channels == 0 {
            return Err(ConfigError::NoBaseChannels);
        }
        if let Some(stage) = self.layers.iter().position(|&blocks| blocks == 0) {
            return Err(ConfigError::EmptyStage {
                stage: stage + 1,
                layers: self.layers,
            });
        }
        if self.groups == 0 || self.width_per_group == 0 {
            return Err(ConfigError::ZeroWidth {
                groups: self.groups,
                width_per_group: self.width_per_group,
            });
        }
        match self.block {
            BlockKind::Basic => {
                if self.groups != 1 || self.width_per_group != 64 {
                    return Err(ConfigError::BasicBlockWidth {
                        groups: self.groups,
                        width_per_group: self.width_per_group,
                    });
                }
                if self.replace_stride_with_dilation.iter().any(|&d| d) {
                    return Err(ConfigError::BasicBlockDilation {
                        replace_stride_with_dilation: self.replace_stride_with_dilation,
                    });
                }
            }
            BlockKind::Bottleneck => {
                if bottleneck_width(self.base_channels, self.width_per_group, self.groups) == 0 {
                    return Err(ConfigError::ZeroBottleneckWidth {
                        width_per_group: self.width_per_group,
                        base_channels: self.base_channels,
                    });
                }
            }
        }
        Ok(())
    }

    /// Channels of the pooled features, the input of the `fc` head (512 for ResNet-18/34,
    /// 2048 for the bottleneck networks).
    pub fn feature_channels(&self) -> usize {
        self.stage_planes()[3] * self.block.expansion()
    }

    /// Planes of the four stages: `base_channels * [1, 2, 4, 8]`.
    pub fn stage_planes(&self) -> [usize; 4] {
        [1, 2, 4, 8].map(|factor| self.base_channels * factor)
    }
}

/// Channels of a bottleneck's 3x3 convolution, as torchvision computes them:
/// `int(planes * (width_per_group / 64.0)) * groups`.
pub(crate) fn bottleneck_width(planes: usize, width_per_group: usize, groups: usize) -> usize {
    planes * width_per_group / 64 * groups
}
