//! Residual blocks: [`BasicBlock`], [`Bottleneck`] and their [`Downsample`] shortcut.
//!
//! Field names follow torchvision's state-dict keys (`conv1`, `bn1`, ..., `downsample`), and
//! initialization follows torchvision: convolutions are Kaiming-normal in `fan_out` mode for
//! ReLU, BatchNorm weights start at 1 and biases at 0. BatchNorm computes as PyTorch's: in
//! training its running variance moves toward the batch's unbiased variance.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, PaddingConfig2d};
use burn::tensor::{Device, Tensor};

use crate::Precision;
use crate::config::bottleneck_width;
use crate::ops::{Epilogue, conv_bn};

/// A bias-free convolution initialized as torchvision initializes ResNet convolutions:
/// `kaiming_normal_(mode="fan_out", nonlinearity="relu")`, that is a normal distribution
/// with standard deviation `sqrt(2 / (out_channels * k * k))`. PyTorch's `fan_out` ignores
/// `groups`, which is why this does not use Burn's `KaimingNormal` (it divides by groups).
pub(crate) struct ConvSpec {
    pub channels: [usize; 2],
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub groups: usize,
}

impl ConvSpec {
    /// A `kernel x kernel` convolution with stride 1, no padding, no dilation, one group.
    pub fn new(in_channels: usize, out_channels: usize, kernel: usize) -> Self {
        Self {
            channels: [in_channels, out_channels],
            kernel,
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
        }
    }

    /// torchvision's `conv3x3`: padding equal to the dilation keeps the size at stride 1.
    pub fn conv3x3(
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        groups: usize,
        dilation: usize,
    ) -> Self {
        Self {
            stride,
            padding: dilation,
            dilation,
            groups,
            ..Self::new(in_channels, out_channels, 3)
        }
    }

    pub fn init(&self, device: &Device) -> Conv2d {
        let fan_out = self.channels[1] * self.kernel * self.kernel;
        let std = (2.0 / fan_out as f64).sqrt();
        let p = self.padding;
        Conv2dConfig::new(self.channels, [self.kernel, self.kernel])
            .with_stride([self.stride, self.stride])
            .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
            .with_dilation([self.dilation, self.dilation])
            .with_groups(self.groups)
            .with_bias(false)
            .with_initializer(Initializer::Normal { mean: 0.0, std })
            .init(device)
    }
}

/// A BatchNorm with PyTorch's defaults (epsilon 1e-5, momentum 0.1); with `zero` its weight
/// (gamma) starts at 0 instead of 1.
pub(crate) fn batch_norm(channels: usize, zero: bool, device: &Device) -> BatchNorm {
    let mut bn = BatchNormConfig::new(channels).init(device);
    if zero {
        bn.gamma = Initializer::Zeros.init([channels], device);
    }
    bn
}

/// The projection shortcut of a block whose input and output shapes differ: a 1x1
/// convolution with the block's stride, then BatchNorm.
///
/// torchvision stores it as `nn.Sequential(conv, bn)`, so its keys are `downsample.0.*`
/// (the convolution) and `downsample.1.*` (the BatchNorm).
#[derive(Module, Debug)]
pub struct Downsample {
    /// 1x1 convolution, torchvision's `downsample.0`.
    pub conv: Conv2d,
    /// BatchNorm, torchvision's `downsample.1`.
    pub bn: BatchNorm,
    #[module(skip)]
    precision: Precision,
}

impl Downsample {
    pub(crate) fn new(
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        precision: Precision,
        device: &Device,
    ) -> Self {
        let conv = ConvSpec {
            stride,
            ..ConvSpec::new(in_channels, out_channels, 1)
        };
        Self {
            conv: conv.init(device),
            bn: batch_norm(out_channels, false, device),
            precision,
        }
    }

    fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// `[batch, in, H, W] -> [batch, out, H / stride, W / stride]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        conv_bn(&self.conv, &self.bn, x, Epilogue::None, self.precision)
    }
}

/// The shape of one block: what a stage asks of each block it builds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockSpec {
    pub in_channels: usize,
    pub planes: usize,
    pub stride: usize,
    pub groups: usize,
    pub width_per_group: usize,
    pub dilation: usize,
    pub downsample: bool,
    pub zero_init_residual: bool,
    pub precision: Precision,
}

/// The residual block of ResNet-18 and ResNet-34: two 3x3 convolutions and a shortcut.
///
/// `out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`, with `planes` output
/// channels (expansion 1). The stride, when there is one, is on `conv1`.
#[derive(Module, Debug)]
pub struct BasicBlock {
    /// 3x3 convolution, `in -> planes`, carries the stride.
    pub conv1: Conv2d,
    /// BatchNorm after `conv1`.
    pub bn1: BatchNorm,
    /// 3x3 convolution, `planes -> planes`.
    pub conv2: Conv2d,
    /// BatchNorm after `conv2`; zero-initialized with `zero_init_residual`.
    pub bn2: BatchNorm,
    /// Projection shortcut when the shape changes, else the identity.
    pub downsample: Option<Downsample>,
    #[module(skip)]
    precision: Precision,
}

impl BasicBlock {
    fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
        if let Some(downsample) = &mut self.downsample {
            downsample.set_precision(precision);
        }
    }

    /// Output channels per `planes`.
    pub const EXPANSION: usize = 1;

    pub(crate) fn new(spec: &BlockSpec, device: &Device) -> Self {
        let BlockSpec {
            in_channels,
            planes,
            stride,
            ..
        } = *spec;
        Self {
            conv1: ConvSpec::conv3x3(in_channels, planes, stride, 1, 1).init(device),
            bn1: batch_norm(planes, false, device),
            conv2: ConvSpec::conv3x3(planes, planes, 1, 1, 1).init(device),
            bn2: batch_norm(planes, spec.zero_init_residual, device),
            downsample: spec
                .downsample
                .then(|| Downsample::new(in_channels, planes, stride, spec.precision, device)),
            precision: spec.precision,
        }
    }

    /// `[batch, in, H, W] -> [batch, planes, H / stride, W / stride]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let out = conv_bn(
            &self.conv1,
            &self.bn1,
            x.clone(),
            Epilogue::Relu,
            self.precision,
        );
        let shortcut = match &self.downsample {
            Some(downsample) => downsample.forward(x),
            None => x,
        };
        let end = Epilogue::AddRelu(shortcut);
        conv_bn(&self.conv2, &self.bn2, out, end, self.precision)
    }
}

/// The residual block of ResNet-50 and deeper, ResNeXt and Wide ResNet: 1x1, 3x3 and 1x1
/// convolutions and a shortcut, with `4 * planes` output channels.
///
/// This is "ResNet v1.5", as in torchvision: the stride is on the 3x3 convolution (`conv2`),
/// not on the first 1x1 as in the original paper, which is about 0.5% more accurate on
/// ImageNet. The inner width is `planes * width_per_group / 64 * groups`: `planes` for
/// ResNet, `2 * planes` for Wide ResNet-50-2 (`width_per_group = 128`), and 32 groups of 4
/// channels at 64 planes for ResNeXt-50 32x4d.
#[derive(Module, Debug)]
pub struct Bottleneck {
    /// 1x1 convolution, `in -> width`.
    pub conv1: Conv2d,
    /// BatchNorm after `conv1`.
    pub bn1: BatchNorm,
    /// 3x3 convolution, `width -> width`, with the stride, the groups and the dilation.
    pub conv2: Conv2d,
    /// BatchNorm after `conv2`.
    pub bn2: BatchNorm,
    /// 1x1 convolution, `width -> 4 * planes`.
    pub conv3: Conv2d,
    /// BatchNorm after `conv3`; zero-initialized with `zero_init_residual`.
    pub bn3: BatchNorm,
    /// Projection shortcut when the shape changes, else the identity.
    pub downsample: Option<Downsample>,
    #[module(skip)]
    precision: Precision,
}

impl Bottleneck {
    fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
        if let Some(downsample) = &mut self.downsample {
            downsample.set_precision(precision);
        }
    }

    /// Output channels per `planes`.
    pub const EXPANSION: usize = 4;

    pub(crate) fn new(spec: &BlockSpec, device: &Device) -> Self {
        let width = bottleneck_width(spec.planes, spec.width_per_group, spec.groups);
        let out_channels = spec.planes * Self::EXPANSION;
        Self {
            conv1: ConvSpec::new(spec.in_channels, width, 1).init(device),
            bn1: batch_norm(width, false, device),
            conv2: ConvSpec::conv3x3(width, width, spec.stride, spec.groups, spec.dilation)
                .init(device),
            bn2: batch_norm(width, false, device),
            conv3: ConvSpec::new(width, out_channels, 1).init(device),
            bn3: batch_norm(out_channels, spec.zero_init_residual, device),
            downsample: spec.downsample.then(|| {
                Downsample::new(
                    spec.in_channels,
                    out_channels,
                    spec.stride,
                    spec.precision,
                    device,
                )
            }),
            precision: spec.precision,
        }
    }

    /// `[batch, in, H, W] -> [batch, 4 * planes, H / stride, W / stride]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let out = conv_bn(
            &self.conv1,
            &self.bn1,
            x.clone(),
            Epilogue::Relu,
            self.precision,
        );
        let out = conv_bn(&self.conv2, &self.bn2, out, Epilogue::Relu, self.precision);
        let shortcut = match &self.downsample {
            Some(downsample) => downsample.forward(x),
            None => x,
        };
        let end = Epilogue::AddRelu(shortcut);
        conv_bn(&self.conv3, &self.bn3, out, end, self.precision)
    }
}

/// One block of a stage: basic or bottleneck, as the config says.
///
/// In module paths the variant name is one more segment (`layer1.0.Basic.conv1`); the
/// torchvision key rules in [`torchvision`](crate::torchvision) drop it.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum ResidualBlock {
    /// A [`BasicBlock`].
    Basic(BasicBlock),
    /// A [`Bottleneck`].
    Bottleneck(Bottleneck),
}

impl ResidualBlock {
    pub(crate) fn set_precision(&mut self, precision: Precision) {
        match self {
            ResidualBlock::Basic(block) => block.set_precision(precision),
            ResidualBlock::Bottleneck(block) => block.set_precision(precision),
        }
    }

    /// Applies the block; see [`BasicBlock::forward`] and [`Bottleneck::forward`].
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            ResidualBlock::Basic(block) => block.forward(x),
            ResidualBlock::Bottleneck(block) => block.forward(x),
        }
    }
}
