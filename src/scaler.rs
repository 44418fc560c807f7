//! Dynamic loss scaling for f16 convolutions, as PyTorch's `torch.amp.GradScaler` does it:
//! the loss is multiplied by a scale before the backward pass, so that small gradients do
//! not underflow f16 on their way through the convolutions, and the gradients are divided by
//! it before the optimizer step. A step whose gradients overflowed (a value that is infinite
//! or NaN) is skipped and the scale halved; after [`LossScaler::GROWTH_INTERVAL`] steps in a
//! row without overflow the scale doubles. The scale is a power of two, so scaling and
//! unscaling are exact in f32.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use resnet_burn::ResNet;
use serde::{Deserialize, Serialize};

/// The state of dynamic loss scaling; saved in checkpoints so that a resumed run scales as
/// an uninterrupted one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    scale: f32,
    good_steps: u32,
}

/// Gradients that overflow even without scaling: f16 cannot hold them.
#[derive(Debug, thiserror::Error)]
#[error(
    "the gradients overflowed f16 even without loss scaling (the scale fell below 1): train \
     with --precision f32, or lower --lr"
)]
pub struct ScaleUnderflow;

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: Self::INITIAL_SCALE,
            good_steps: 0,
        }
    }
}

impl LossScaler {
    /// The first scale, 2^16 (PyTorch's).
    pub const INITIAL_SCALE: f32 = 65536.0;
    /// Steps in a row without overflow after which the scale doubles (PyTorch's).
    pub const GROWTH_INTERVAL: u32 = 2000;

    /// The factor to multiply the loss by.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Records whether this step's gradients were finite and returns whether to apply them:
    /// finite ones are, and count towards growing the scale; others are skipped and halve
    /// the scale. Fails when the scale would fall below 1.
    pub fn update(&mut self, finite: bool) -> Result<bool, ScaleUnderflow> {
        if !finite {
            self.good_steps = 0;
            self.scale /= 2.0;
            return if self.scale < 1.0 {
                Err(ScaleUnderflow)
            } else {
                Ok(false)
            };
        }
        self.good_steps += 1;
        if self.good_steps == Self::GROWTH_INTERVAL {
            self.good_steps = 0;
            self.scale *= 2.0;
        }
        Ok(true)
    }
}

/// Divides every gradient of `model`'s parameters in `grads` by `scale`, and returns the sum
/// of all their elements, on the device, without waiting for it: it is finite exactly when
/// every gradient is. `None` when `grads` holds none of them.
pub fn unscale(grads: &mut GradientsParams, model: &ResNet, scale: f32) -> Option<Tensor<1>> {
    struct Unscale<'a> {
        grads: &'a mut GradientsParams,
        inverse: f32,
        sum: Option<Tensor<1>>,
    }
    impl ModuleVisitor for Unscale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let Some(grad) = self.grads.remove::<D>(param.id) else {
                return;
            };
            let grad = grad.mul_scalar(self.inverse);
            // Any infinite or NaN element makes the sum infinite or NaN; sums of finite
            // gradients stay far below f32's range.
            let sum = grad.clone().sum();
            self.sum = Some(match self.sum.take() {
                Some(total) => total + sum,
                None => sum,
            });
            self.grads.register(param.id, grad);
        }
    }
    let mut visitor = Unscale {
        grads,
        inverse: 1.0 / scale,
        sum: None,
    };
    model.visit(&mut visitor);
    visitor.sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_skips_the_step_and_halves_the_scale() {
        let mut scaler = LossScaler::default();
        assert!(scaler.update(true).unwrap());
        assert!(!scaler.update(false).unwrap());
        assert_eq!(scaler.scale(), LossScaler::INITIAL_SCALE / 2.0);
        // The run of good steps starts again after an overflow.
        for _ in 0..LossScaler::GROWTH_INTERVAL - 1 {
            assert!(scaler.update(true).unwrap());
        }
        assert_eq!(scaler.scale(), LossScaler::INITIAL_SCALE / 2.0);
        assert!(scaler.update(true).unwrap());
        assert_eq!(scaler.scale(), LossScaler::INITIAL_SCALE);
    }

    #[test]
    fn a_scale_below_one_is_an_error() {
        let mut scaler = LossScaler::default();
        for _ in 0..16 {
            assert!(!scaler.update(false).unwrap());
        }
        assert_eq!(scaler.scale(), 1.0);
        assert!(scaler.update(false).is_err());
    }
}
