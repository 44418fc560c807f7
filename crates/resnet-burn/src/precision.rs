//! [`Precision`]: the float types a [`ResNet`](crate::ResNet) computes in, a value the model
//! holds.

use std::fmt;
use std::str::FromStr;

use burn::tensor::{DType, Device, FloatDType};
use serde::{Deserialize, Serialize};

/// The float types a [`ResNet`](crate::ResNet) computes in; set with
/// [`ResNetConfig::with_precision`](crate::ResNetConfig::with_precision) or
/// [`ResNet::with_precision`](crate::ResNet::with_precision), saved with the config.
///
/// Parameters, BatchNorm, the residual sums, the head and the optimizer's state stay f32 in
/// every precision, as under PyTorch's autocast.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// Mixed precision with f16 convolutions, as `torch.autocast("cuda", torch.float16)`
    /// computes convolutions: the input and the weight are cast to f16, the convolution runs
    /// in f16 (on tensor cores where the device has them; how it accumulates is the kernel's)
    /// and its output is cast back to f32.
    ///
    /// It applies on devices with f16 arithmetic other than the CPU backends (wgpu, vulkan,
    /// metal, cuda); flex and ndarray compute in f32 regardless. Gradients through f16 can
    /// underflow: train with loss scaling (PyTorch's `GradScaler`), as the CIFAR-10 example
    /// does.
    F16,
    /// Mixed precision with bf16 convolution products, as `torch.autocast("cpu",
    /// torch.bfloat16)` computes convolutions: the input and the weight are rounded to bf16 and
    /// multiplied with f32 sums, forward and backward, the output f32.
    ///
    /// On flex and ndarray the products are `burn-cpu-kernels`' bf16 ones, on CPUs with
    /// AVX512-BF16 ([`burn_cpu_kernels::bf16_supported`]; elsewhere they stay f32 and
    /// [`Precision::applies_to`] says so). On other devices the convolution runs in bf16
    /// through Burn where the device has bf16 arithmetic. bf16 has f32's range: no loss
    /// scaling is needed.
    Bf16,
}

/// How a precision computes a convolution on a device.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ConvCompute {
    /// `burn-cpu-kernels`' entry points, products in this precision.
    Kernels(burn_cpu_kernels::ConvPrecision),
    /// Burn's convolution with the operands cast to this type.
    Cast(FloatDType),
}

impl Precision {
    /// How the convolutions of an input of `x_dtype` on `device` compute in this precision.
    pub(crate) fn conv_compute(self, x_dtype: DType, device: &Device) -> ConvCompute {
        use burn_cpu_kernels::ConvPrecision;
        let f32 = ConvCompute::Kernels(ConvPrecision::F32);
        let cast = |dtype: DType, float: FloatDType| {
            let applies = x_dtype == DType::F32
                && !burn_cpu_kernels::is_accelerated(device)
                && device.supports_dtype(dtype);
            if applies {
                ConvCompute::Cast(float)
            } else {
                f32
            }
        };
        match self {
            Precision::F32 => f32,
            Precision::F16 => cast(DType::F16, FloatDType::F16),
            Precision::Bf16 if burn_cpu_kernels::is_accelerated(device) => {
                ConvCompute::Kernels(ConvPrecision::Bf16)
            }
            Precision::Bf16 => cast(DType::BF16, FloatDType::BF16),
        }
    }

    /// Whether this precision changes what `device` computes: false for f32, for f16 on the
    /// CPU backends, for bf16 on a CPU without AVX512-BF16 and on devices without the type.
    pub fn applies_to(self, device: &Device) -> bool {
        match self.conv_compute(DType::F32, device) {
            ConvCompute::Cast(_) => true,
            ConvCompute::Kernels(precision) => {
                precision != burn_cpu_kernels::ConvPrecision::F32
                    && burn_cpu_kernels::bf16_supported()
            }
        }
    }

    /// The name `FromStr` reads and `Display` writes: `f32`, `f16` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A precision name that is none of [`Precision`]'s.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown precision {0:?}: expected \"f32\", \"f16\" or \"bf16\"")]
pub struct ParsePrecisionError(String);

impl FromStr for Precision {
    type Err = ParsePrecisionError;

    /// `f32`, `f16` or `bf16`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        [Precision::F32, Precision::F16, Precision::Bf16]
            .into_iter()
            .find(|p| p.name() == text)
            .ok_or_else(|| ParsePrecisionError(text.to_owned()))
    }
}
