//! Window geometry shared by the convolution paths.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;

/// `[vertical, horizontal]` padding, if it is the same on both sides of each axis.
pub(crate) fn symmetric_padding(padding: &PaddingConfig2d) -> Option<[usize; 2]> {
    match *padding {
        PaddingConfig2d::Valid => Some([0, 0]),
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => {
            Some([top, left])
        }
        _ => None,
    }
}

/// The output size along one axis of a window of `kernel` moved by `stride` over `size`
/// values padded by `padding` on both sides (floor rounding), if the window fits.
pub(crate) fn output_size(
    size: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Option<usize> {
    (stride > 0 && size + 2 * padding >= kernel).then(|| (size + 2 * padding - kernel) / stride + 1)
}

/// Whether `conv` is what the im2col paths compute: ungrouped, undilated, bias-free.
pub(crate) fn is_plain(conv: &Conv2d) -> bool {
    conv.groups == 1 && conv.dilation == [1, 1] && conv.bias.is_none()
}
