//! Convolutions on the GPU backends as im2col + batched matrix products, in Burn tensor ops.
//!
//! On an H200 through wgpu (Burn 0.22.1, f32), Burn's autotune runs ResNet-18's 3x3
//! forward convolutions with its direct kernel: 4.6-14.7 ms each at batch 256, 149 ms of a
//! 208 ms training step, while the backward's matrix products for the same layers take about
//! 1 ms (CubeCL's kernel profiler, `scripts/gpu_session.sh`, BENCHMARKS.md). Its other
//! forward candidates are implicit GEMMs on tensor cores, which f32 on Vulkan does not get,
//! and a 1x1-only im2col. Here the convolution is written as what the backward already does
//! well: the `k * k` shifted (strided) views of the padded input stacked into
//! `[batch, in_channels * k * k, out_h * out_w]`, multiplied by the weight as
//! `[1, out_channels, in_channels * k * k]`, in chunks of images that keep that matrix within
//! 128 MiB (one chunk for most layers at batch 64). Autodiff differentiates it like any tensor
//! code.
//!
//! It is opt-in ([`set_gpu_conv`], or `RESNET_BURN_GPU_CONV=im2col`) until its speed has been
//! measured on a GPU; the CPU backends have their own kernels ([`crate::cpu`]) and never use it.

use std::sync::atomic::{AtomicU8, Ordering};

use burn::nn::conv::Conv2d;
use burn::tensor::ops::PadMode;
use burn::tensor::{Slice, Tensor};

use crate::geometry::{is_plain, output_size, symmetric_padding};

/// How [`crate::ResNet`] computes its convolutions on a GPU backend (wgpu, cuda, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GpuConv {
    /// Burn's `Conv2d` (its autotuned kernels).
    #[default]
    Burn,
    /// im2col + batched matrix products in Burn tensor ops (ungrouped, undilated
    /// convolutions larger than 1x1; the others stay Burn's).
    Im2col,
}

impl std::str::FromStr for GpuConv {
    type Err = String;

    /// `burn` or `im2col`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "burn" => Ok(GpuConv::Burn),
            "im2col" => Ok(GpuConv::Im2col),
            _ => Err(format!("{text:?} is neither \"burn\" nor \"im2col\"")),
        }
    }
}

const UNSET: u8 = u8::MAX;
static GPU_CONV: AtomicU8 = AtomicU8::new(UNSET);

/// Chooses how convolutions run on GPU backends, for the whole process. Without a call the
/// choice is read once from `RESNET_BURN_GPU_CONV` (`burn` or `im2col`; default `burn`).
pub fn set_gpu_conv(choice: GpuConv) {
    GPU_CONV.store(choice as u8, Ordering::Relaxed);
}

/// The current choice (see [`set_gpu_conv`]).
pub fn gpu_conv() -> GpuConv {
    let mut value = GPU_CONV.load(Ordering::Relaxed);
    if value == UNSET {
        let choice = from_env() as u8;
        // An explicit choice made meanwhile wins over the environment.
        value = match GPU_CONV.compare_exchange(UNSET, choice, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => choice,
            Err(current) => current,
        };
    }
    if value == GpuConv::Im2col as u8 {
        GpuConv::Im2col
    } else {
        GpuConv::Burn
    }
}

/// `RESNET_BURN_GPU_CONV`: `im2col`, or `burn` (also when unset; any other value is reported
/// on stderr and read as `burn`).
fn from_env() -> GpuConv {
    let Ok(text) = std::env::var("RESNET_BURN_GPU_CONV") else {
        return GpuConv::Burn;
    };
    text.parse().unwrap_or_else(|error| {
        eprintln!("resnet-burn: RESNET_BURN_GPU_CONV={error}; using Burn's convolutions");
        GpuConv::Burn
    })
}

/// The most bytes of im2col matrix built at once: 128 MiB, the largest storage buffer that
/// every Vulkan device (`maxStorageBufferRange`) and WebGPU guarantee. Lavapipe allows no
/// more, and CubeCL refuses a larger buffer there ("can't allocate buffer of size:
/// 150994944" for ResNet-18's first stage at batch 64). Larger batches run in chunks of images.
const MAX_COLUMNS_BYTES: usize = 128 << 20;

/// `conv(x)` as im2col + matrix product when `conv` is ungrouped, undilated, bias-free,
/// symmetrically padded and larger than 1x1, and its window fits; `None` otherwise.
pub(crate) fn conv_im2col(conv: &Conv2d, x: &Tensor<4>) -> Option<Tensor<4>> {
    conv_im2col_within(conv, x, MAX_COLUMNS_BYTES)
}

/// [`conv_im2col`] with at most `max_bytes` of im2col matrix at once: the batch runs in
/// chunks of as many images as fit, and one image that does not fit is left to Burn (`None`).
fn conv_im2col_within(conv: &Conv2d, x: &Tensor<4>, max_bytes: usize) -> Option<Tensor<4>> {
    let [out_channels, in_channels, kh, kw] = conv.weight.dims();
    let [batch, channels, height, width] = x.dims();
    if !is_plain(conv) || kh * kw == 1 || channels != in_channels {
        return None;
    }
    let [ph, pw] = symmetric_padding(&conv.padding)?;
    let [sh, sw] = conv.stride;
    let out_h = output_size(height, kh, sh, ph)?;
    let out_w = output_size(width, kw, sw, pw)?;
    let rows = in_channels * kh * kw;
    let images_per_chunk = max_bytes / (rows * out_h * out_w * x.dtype().size());
    if images_per_chunk == 0 {
        return None;
    }
    let padded = if ph + pw == 0 {
        x.clone()
    } else {
        x.clone().pad([(ph, ph), (pw, pw)], PadMode::Constant(0.0))
    };
    // Tap (ky, kx) of every output position: rows ky, ky + sh, ...; columns likewise.
    let window = |start: usize, count: usize, step: usize| {
        Slice::new(
            start as isize,
            Some((start + (count - 1) * step + 1) as isize),
            step as isize,
        )
    };
    let weight = conv.weight.val().reshape([1, out_channels, rows]);
    // Split only when needed: a split of one chunk is still a slice, which autodiff undoes
    // with a zero-filled copy of the whole input in the backward.
    let chunks = if batch > images_per_chunk {
        padded.split(images_per_chunk, 0)
    } else {
        vec![padded]
    };
    let mut outputs: Vec<Tensor<4>> = chunks
        .into_iter()
        .map(|images| {
            let images_here = images.dims()[0];
            let taps: Vec<Tensor<4>> = (0..kh)
                .flat_map(|ky| (0..kw).map(move |kx| (ky, kx)))
                .map(|(ky, kx)| {
                    images.clone().slice([
                        Slice::full(),
                        Slice::full(),
                        window(ky, out_h, sh),
                        window(kx, out_w, sw),
                    ])
                })
                .collect();
            // [batch, in_channels, k*k, out_h, out_w]: row (c, ky, kx) as in the weight's
            // layout.
            let columns = Tensor::stack::<5>(taps, 2).reshape([images_here, rows, out_h * out_w]);
            weight
                .clone()
                .matmul(columns)
                .reshape([images_here, out_channels, out_h, out_w])
        })
        .collect();
    if outputs.len() == 1 {
        outputs.pop()
    } else {
        Some(Tensor::cat(outputs, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{devices, relative_difference};
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::Distribution;

    /// The output and both gradients against Burn's `Conv2d` and its backward, for every
    /// geometry ResNet uses and a non-square one, on every device.
    #[test]
    fn im2col_matches_burns_convolution_and_gradients() {
        // batch, in, out, kernel, stride, padding, height, width
        let cases = [
            (3, 8, 16, 3, 1, 1, 9, 9),  // ResNet's 3x3
            (3, 8, 16, 3, 2, 1, 9, 9),  // stride 2, odd side
            (2, 8, 16, 3, 2, 1, 8, 8),  // stride 2, even side
            (2, 3, 8, 7, 2, 3, 21, 21), // ImageNet stem
            (1, 3, 8, 3, 1, 1, 6, 6),   // CIFAR stem, one image
            (2, 4, 4, 3, 1, 0, 5, 7),   // no padding, not square
        ];
        for (device, gpu) in devices() {
            // lavapipe (wgpu on the CPU in CI) compiles every shape's kernels slowly: the
            // first three cases (3x3 at stride 1 and 2) there, all of them on the CPU backends.
            let count = if gpu { 3 } else { cases.len() };
            let device = device.autodiff();
            for &(batch, cin, cout, k, stride, padding, h, w) in &cases[..count] {
                let conv = Conv2dConfig::new([cin, cout], [k, k])
                    .with_stride([stride, stride])
                    .with_padding(PaddingConfig2d::Explicit(
                        padding, padding, padding, padding,
                    ))
                    .with_bias(false)
                    .init(&device);
                let x = Tensor::<4>::random(
                    [batch, cin, h, w],
                    Distribution::Normal(0.0, 1.0),
                    &device,
                )
                .require_grad();
                let case = format!(
                    "{device:?} {batch}x{cin}x{h}x{w}, {cout} {k}x{k}/{stride} pad {padding}"
                );
                let got = conv_im2col(&conv, &x).expect("applies");
                assert_matches_burn(&case, &conv, &x, got);
            }
        }
    }

    /// A batch whose im2col matrix exceeds the limit runs in chunks of images (here 2, 2
    /// and 1) with the same output and gradients; an image that alone exceeds it is left to
    /// Burn.
    #[test]
    fn large_batches_run_in_chunks() {
        for (device, _) in devices() {
            let device = device.autodiff();
            let conv = Conv2dConfig::new([3, 4], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_bias(false)
                .init(&device);
            let x = Tensor::<4>::random([5, 3, 6, 6], Distribution::Normal(0.0, 1.0), &device)
                .require_grad();
            let image_bytes = 3 * 3 * 3 * 6 * 6 * size_of::<f32>();
            let got = conv_im2col_within(&conv, &x, 2 * image_bytes + 1).expect("applies");
            assert_matches_burn(&format!("{device:?} in chunks"), &conv, &x, got);
            assert!(conv_im2col_within(&conv, &x, image_bytes - 1).is_none());
        }
    }

    /// `got` (from `conv` and `x`) against Burn's `conv.forward(x)`: the output, and the
    /// gradients of both `x` and the weight, to 1e-5.
    fn assert_matches_burn(case: &str, conv: &Conv2d, x: &Tensor<4>, got: Tensor<4>) {
        let expected = conv.forward(x.clone());
        assert_eq!(got.dims(), expected.dims(), "{case}");
        let weights = Tensor::<4>::random(
            expected.dims(),
            Distribution::Normal(0.0, 1.0),
            &expected.device(),
        );
        let grads_expected = (expected.clone() * weights.clone()).sum().backward();
        let grads_got = (got.clone() * weights).sum().backward();
        let output = relative_difference(got.inner(), expected.inner());
        assert!(output < 1e-5, "{case}: output differs by {output}");
        let dx = relative_difference(
            x.grad(&grads_got).expect("x grad"),
            x.grad(&grads_expected).expect("x grad"),
        );
        assert!(dx < 1e-5, "{case}: input gradient differs by {dx}");
        let dw = relative_difference(
            conv.weight.grad(&grads_got).expect("weight grad"),
            conv.weight.grad(&grads_expected).expect("weight grad"),
        );
        assert!(dw < 1e-5, "{case}: weight gradient differs by {dw}");
    }

    /// An explicit choice holds for the process until the next one. (The only test that
    /// sets it: the others call `conv_im2col` directly.)
    #[test]
    fn the_choice_is_explicit_and_process_wide() {
        set_gpu_conv(GpuConv::Im2col);
        assert_eq!(gpu_conv(), GpuConv::Im2col);
        assert_eq!(
            std::thread::spawn(gpu_conv).join().unwrap(),
            GpuConv::Im2col
        );
        set_gpu_conv(GpuConv::Burn);
        assert_eq!(gpu_conv(), GpuConv::Burn);
    }

    /// The names `--gpu-conv` and `RESNET_BURN_GPU_CONV` take, and the error for others.
    #[test]
    fn parses_its_two_names() {
        assert_eq!("burn".parse(), Ok(GpuConv::Burn));
        assert_eq!("im2col".parse(), Ok(GpuConv::Im2col));
        assert_eq!(
            "Im2col".parse::<GpuConv>(),
            Err("\"Im2col\" is neither \"burn\" nor \"im2col\"".to_string())
        );
    }

    /// Grouped, dilated and 1x1 convolutions are left to Burn.
    #[test]
    fn declines_what_it_does_not_compute() {
        let (device, _) = devices().remove(0);
        let x = Tensor::<4>::zeros([1, 4, 6, 6], &device);
        let grouped = Conv2dConfig::new([4, 4], [3, 3])
            .with_groups(2)
            .with_bias(false)
            .init(&device);
        let dilated = Conv2dConfig::new([4, 4], [3, 3])
            .with_dilation([2, 2])
            .with_bias(false)
            .init(&device);
        let pointwise = Conv2dConfig::new([4, 4], [1, 1])
            .with_bias(false)
            .init(&device);
        let biased = Conv2dConfig::new([4, 4], [3, 3]).init(&device);
        for conv in [grouped, dilated, pointwise, biased] {
            assert!(conv_im2col(&conv, &x).is_none());
        }
    }
}
