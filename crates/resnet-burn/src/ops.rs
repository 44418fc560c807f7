//! The fused operations the blocks are made of, in the model's [`Precision`]: the one place
//! that chooses how a convolution is computed. They are `burn-cpu-kernels`' entry points,
//! which run its kernels on the CPU backends (with bf16 products in bf16) and Burn's
//! operations elsewhere; in a mixed precision on another device that has the type, the
//! convolution runs in the narrower type through Burn and the rest as in f32.

use burn::nn::BatchNorm;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::tensor::FloatDType;
use burn::tensor::Tensor;
use burn::tensor::module::conv2d as burn_conv2d;
use burn::tensor::ops::ConvOptions;

use burn_cpu_kernels::ConvPrecision;
pub(crate) use burn_cpu_kernels::Epilogue;

use crate::Precision;
use crate::precision::ConvCompute;

/// `epilogue(bn(conv(x)))` in `precision`: one pass over each image's output in inference on
/// the CPU backends.
pub(crate) fn conv_bn(
    conv: &Conv2d,
    bn: &BatchNorm,
    x: Tensor<4>,
    epilogue: Epilogue,
    precision: Precision,
) -> Tensor<4> {
    match reduced(conv, &x, precision) {
        Ok((dtype, padding)) => {
            let y = conv2d_in(conv, x, dtype, padding);
            epilogue.apply(burn_cpu_kernels::batch_norm(bn, y))
        }
        Err(products) => burn_cpu_kernels::conv_batch_norm_in(conv, bn, x, epilogue, products),
    }
}

/// `pool.forward(x)`.
pub(crate) fn max_pool(pool: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
    burn_cpu_kernels::max_pool2d(pool, x)
}

/// The narrower float type `conv` computes `x` in through Burn under `precision`, with
/// `conv`'s padding as the pair the functional convolution takes; or the precision of the
/// products of `burn-cpu-kernels`' entry points.
fn reduced(
    conv: &Conv2d,
    x: &Tensor<4>,
    precision: Precision,
) -> Result<(FloatDType, [usize; 2]), ConvPrecision> {
    let dtype = match precision.conv_compute(x.dtype(), &x.device()) {
        ConvCompute::Cast(dtype) => dtype,
        ConvCompute::Kernels(products) => return Err(products),
    };
    let padding = match conv.padding {
        PaddingConfig2d::Valid => [0, 0],
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => {
            [top, left]
        }
        // Asymmetric or `Same` padding (never in a ResNet): f32, as Burn's module computes it.
        _ => return Err(ConvPrecision::F32),
    };
    Ok((dtype, padding))
}

/// `conv(x)` with the input, the weight and the bias cast to `dtype`, the output cast back.
fn conv2d_in(conv: &Conv2d, x: Tensor<4>, dtype: FloatDType, padding: [usize; 2]) -> Tensor<4> {
    let output_dtype = x.dtype();
    let weight = conv.weight.val().cast(dtype);
    let bias = conv.bias.as_ref().map(|b| b.val().cast(dtype));
    let options = ConvOptions::new(conv.stride, padding, conv.dilation, conv.groups);
    burn_conv2d(x.cast(dtype), weight, bias, options).cast(output_dtype)
}
