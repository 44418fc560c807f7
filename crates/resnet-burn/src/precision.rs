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
}

impl Precision {
    /// The float type the convolutions of an f32 input `x_dtype` on `device` compute in, if
    /// narrower than f32.
    pub(crate) fn conv_dtype(self, x_dtype: DType, device: &Device) -> Option<FloatDType> {
        match self {
            Precision::F32 => None,
            Precision::F16 => (x_dtype == DType::F32
                && !burn_cpu_kernels::is_accelerated(device)
                && device.supports_dtype(DType::F16))
            .then_some(FloatDType::F16),
        }
    }

    /// Whether this precision changes what `device` computes.
    pub fn applies_to(self, device: &Device) -> bool {
        self.conv_dtype(DType::F32, device).is_some()
    }

    /// The name `FromStr` reads and `Display` writes: `f32` or `f16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
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
#[error("unknown precision {0:?}: expected \"f32\" or \"f16\"")]
pub struct ParsePrecisionError(String);

impl FromStr for Precision {
    type Err = ParsePrecisionError;

    /// `f32` or `f16`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        [Precision::F32, Precision::F16]
            .into_iter()
            .find(|p| p.name() == text)
            .ok_or_else(|| ParsePrecisionError(text.to_owned()))
    }
}
