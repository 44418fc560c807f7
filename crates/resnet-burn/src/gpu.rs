//! Convolutions on the GPU backends: as im2col + batched matrix products in Burn tensor ops
//! ([`GpuConv`]), and in f16 ([`GpuPrecision`]).
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
//! It is opt-in ([`set_gpu_conv`], or `RESNET_BURN_GPU_CONV=im2col`): on the H200 it ran at a
//! tenth of Burn's convolutions in f16 on Vulkan (616 against 6,416 images/s in a training
//! probe). The CPU backends have their own kernels ([`crate::cpu`]) and never use it.
//!
//! The tensor-core candidates need f16 (or bf16) inputs, and on wgpu CubeCL's SPIR-V compiler
//! (Burn's `vulkan` feature). [`GpuPrecision::F16`] gives either way of computing f16 inputs
//! ([`set_gpu_precision`], or `RESNET_BURN_GPU_PRECISION=f16`); with Burn's convolutions on
//! Vulkan it trained ResNet-18 at 6,338 images/s on the H200, against 1,210 in f32 through
//! wgpu. It is opt-in, as PyTorch's autocast is: it changes the numbers computed.

use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

use burn::nn::conv::Conv2d;
use burn::tensor::module::conv2d as burn_conv2d;
use burn::tensor::ops::{ConvOptions, PadMode};
use burn::tensor::{DType, FloatDType, Slice, Tensor};

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

impl FromStr for GpuConv {
    type Err = String;

    /// `burn` or `im2col`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_variant(text)
    }
}

/// The float type convolutions compute in on a GPU backend, as PyTorch's autocast does for
/// convolutions: with [`GpuPrecision::F16`] an f32 input and the weight are cast to f16, the
/// convolution runs in f16 (on tensor cores where the device has them; how it accumulates is
/// the kernel's: lavapipe's accumulates in f16, off by up to 6.3e-3 of the scale in the
/// small weight gradient of its test), and its output is cast back to f32. Everything else
/// (BatchNorm, the residual sums, the head, the parameters and the optimizer) stays f32.
///
/// Gradients through an f16 convolution can underflow: train with loss scaling, as the
/// CIFAR-10 example does for `--precision f16`. Devices without f16 arithmetic, the CPU
/// backends, and convolutions with asymmetric padding (never in a ResNet) compute in f32
/// regardless.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuPrecision {
    /// f32 throughout.
    #[default]
    F32,
    /// Convolutions in f16, the rest in f32.
    F16,
}

impl FromStr for GpuPrecision {
    type Err = String;

    /// `f32` or `f16`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_variant(text)
    }
}

/// The variants of a process-wide choice with their names, in a fixed order (a choice is
/// stored as an index).
trait Variants: 'static + Copy + PartialEq + Default + std::fmt::Debug {
    const NAMED: &'static [(Self, &'static str)];
}

impl Variants for GpuConv {
    const NAMED: &[(Self, &str)] = &[(GpuConv::Burn, "burn"), (GpuConv::Im2col, "im2col")];
}

impl Variants for GpuPrecision {
    const NAMED: &[(Self, &str)] = &[(GpuPrecision::F32, "f32"), (GpuPrecision::F16, "f16")];
}

/// The variant named `text`, or an error listing the names.
fn parse_variant<T: Variants>(text: &str) -> Result<T, String> {
    T::NAMED
        .iter()
        .find(|(_, name)| *name == text)
        .map(|&(variant, _)| variant)
        .ok_or_else(|| {
            let names: Vec<String> = T::NAMED
                .iter()
                .map(|(_, name)| format!("{name:?}"))
                .collect();
            format!("{text:?} is neither {}", names.join(" nor "))
        })
}

/// A process-wide choice: set by a call, or else read once from the environment variable
/// `var` (unset: the default; a value that does not parse is reported on stderr and read as
/// the default).
struct Choice {
    index: AtomicU8,
    var: &'static str,
}

impl Choice {
    const UNSET: u8 = u8::MAX;

    const fn new(var: &'static str) -> Self {
        Self {
            index: AtomicU8::new(Self::UNSET),
            var,
        }
    }

    fn set<T: Variants>(&self, choice: T) {
        self.index.store(Self::index_of(choice), Ordering::Relaxed);
    }

    fn get<T: Variants>(&self) -> T {
        let mut index = self.index.load(Ordering::Relaxed);
        if index == Self::UNSET {
            let from_env = Self::index_of(self.read_env::<T>());
            // An explicit choice made meanwhile wins over the environment.
            index = match self.index.compare_exchange(
                Self::UNSET,
                from_env,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => from_env,
                Err(current) => current,
            };
        }
        T::NAMED[usize::from(index)].0
    }

    fn index_of<T: Variants>(choice: T) -> u8 {
        T::NAMED
            .iter()
            .position(|(v, _)| *v == choice)
            .expect("a variant") as u8
    }

    fn read_env<T: Variants>(&self) -> T {
        let Ok(text) = std::env::var(self.var) else {
            return T::default();
        };
        parse_variant(&text).unwrap_or_else(|error| {
            let default = T::default();
            eprintln!("resnet-burn: {}={error}; using {default:?}", self.var);
            default
        })
    }
}

static GPU_CONV: Choice = Choice::new("RESNET_BURN_GPU_CONV");
static GPU_PRECISION: Choice = Choice::new("RESNET_BURN_GPU_PRECISION");

/// Chooses how convolutions run on GPU backends, for the whole process. Without a call the
/// choice is read once from `RESNET_BURN_GPU_CONV` (`burn` or `im2col`; default `burn`).
pub fn set_gpu_conv(choice: GpuConv) {
    GPU_CONV.set(choice);
}

/// The current choice (see [`set_gpu_conv`]).
pub fn gpu_conv() -> GpuConv {
    GPU_CONV.get()
}

/// Chooses the float type of convolutions on GPU backends ([`GpuPrecision`]), for the whole
/// process. Without a call the choice is read once from `RESNET_BURN_GPU_PRECISION` (`f32` or
/// `f16`; default `f32`).
pub fn set_gpu_precision(choice: GpuPrecision) {
    GPU_PRECISION.set(choice);
}

/// The current choice (see [`set_gpu_precision`]).
pub fn gpu_precision() -> GpuPrecision {
    GPU_PRECISION.get()
}

/// `conv(x)` on a GPU backend, as [`gpu_conv`] and [`gpu_precision`] choose.
pub(crate) fn conv(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    conv_with(conv, x, gpu_conv(), gpu_precision())
}

/// `conv(x)` computed as `how` and in `precision` says.
fn conv_with(conv: &Conv2d, x: Tensor<4>, how: GpuConv, precision: GpuPrecision) -> Tensor<4> {
    let im2col = how == GpuConv::Im2col;
    // The functional convolution that takes the cast weight needs the padding as one pair.
    let reduced = reduced_dtype(&x, precision).zip(symmetric_padding(&conv.padding));
    let Some((dtype, padding)) = reduced else {
        let weight = conv.weight.val();
        return im2col
            .then(|| conv_im2col(conv, &weight, &x))
            .flatten()
            .unwrap_or_else(|| conv.forward(x));
    };
    let output_dtype = x.dtype();
    let x = x.cast(dtype);
    let weight = conv.weight.val().cast(dtype);
    let out = im2col
        .then(|| conv_im2col(conv, &weight, &x))
        .flatten()
        .unwrap_or_else(|| {
            let bias = conv.bias.as_ref().map(|b| b.val().cast(dtype));
            let options = ConvOptions::new(conv.stride, padding, conv.dilation, conv.groups);
            burn_conv2d(x, weight, bias, options)
        });
    out.cast(output_dtype)
}

/// The float type to compute `x`'s convolutions in, if `precision` asks for a narrower one
/// than `x`'s and `x`'s device computes in it.
fn reduced_dtype(x: &Tensor<4>, precision: GpuPrecision) -> Option<FloatDType> {
    match precision {
        GpuPrecision::F32 => None,
        GpuPrecision::F16 => (x.dtype() == DType::F32 && x.device().supports_dtype(DType::F16))
            .then_some(FloatDType::F16),
    }
}

/// The most bytes of im2col matrix built at once: 128 MiB, the largest storage buffer that
/// every Vulkan device (`maxStorageBufferRange`) and WebGPU guarantee. Lavapipe allows no
/// more, and CubeCL refuses a larger buffer there ("can't allocate buffer of size:
/// 150994944" for ResNet-18's first stage at batch 64). Larger batches run in chunks of images.
const MAX_COLUMNS_BYTES: usize = 128 << 20;

/// `conv(x)` with `weight` (`conv`'s, possibly cast to another float type) as im2col + matrix
/// product when `conv` is ungrouped, undilated, bias-free, symmetrically padded and larger
/// than 1x1, and its window fits; `None` otherwise.
pub(crate) fn conv_im2col(conv: &Conv2d, weight: &Tensor<4>, x: &Tensor<4>) -> Option<Tensor<4>> {
    conv_im2col_within(conv, weight, x, MAX_COLUMNS_BYTES)
}

/// [`conv_im2col`] with at most `max_bytes` of im2col matrix at once: the batch runs in
/// chunks of as many images as fit, and one image that does not fit is left to Burn (`None`).
fn conv_im2col_within(
    conv: &Conv2d,
    weight: &Tensor<4>,
    x: &Tensor<4>,
    max_bytes: usize,
) -> Option<Tensor<4>> {
    let [out_channels, in_channels, kh, kw] = weight.dims();
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
    let weight = weight.clone().reshape([1, out_channels, rows]);
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
    use crate::testing::{devices, relative_difference, seeded_normal};
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
                let got = conv_im2col(&conv, &conv.weight.val(), &x).expect("applies");
                assert_matches_burn(&case, &conv, &x, got, 1e-5);
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
            let got = conv_im2col_within(&conv, &conv.weight.val(), &x, 2 * image_bytes + 1)
                .expect("applies");
            assert_matches_burn(&format!("{device:?} in chunks"), &conv, &x, got, 1e-5);
            assert!(conv_im2col_within(&conv, &conv.weight.val(), &x, image_bytes - 1).is_none());
        }
    }

    /// `got` (from `conv` and `x`) against Burn's `conv.forward(x)`: the output, and the
    /// gradients of both `x` and the weight (all f32), to `tolerance`.
    fn assert_matches_burn(
        case: &str,
        conv: &Conv2d,
        x: &Tensor<4>,
        got: Tensor<4>,
        tolerance: f32,
    ) {
        let expected = conv.forward(x.clone());
        assert_eq!(got.dims(), expected.dims(), "{case}");
        let weights = seeded_normal(expected.dims(), 0, &expected.device());
        let grads_expected = (expected.clone() * weights.clone()).sum().backward();
        let grads_got = (got.clone() * weights).sum().backward();
        let output = relative_difference(got.inner(), expected.inner());
        assert!(output < tolerance, "{case}: output differs by {output}");
        let x_grad = x.grad(&grads_got).expect("x grad");
        assert_eq!(x_grad.dtype(), DType::F32, "{case}");
        let dx = relative_difference(x_grad, x.grad(&grads_expected).expect("x grad"));
        assert!(dx < tolerance, "{case}: input gradient differs by {dx}");
        let w_grad = conv.weight.grad(&grads_got).expect("weight grad");
        assert_eq!(w_grad.dtype(), DType::F32, "{case}");
        let dw = relative_difference(
            w_grad,
            conv.weight.grad(&grads_expected).expect("weight grad"),
        );
        assert!(dw < tolerance, "{case}: weight gradient differs by {dw}");
    }

    /// On every GPU device (lavapipe in CI), f16 convolutions, Burn's and im2col, with and
    /// without bias, return f32 and differ from the f32 convolution by f16 rounding only, in
    /// the output and both gradients; f32 precision leaves the convolution as it was.
    ///
    /// How far f16 goes: Burn's f16 convolution on lavapipe accumulates in f16 too, so a sum
    /// of K products is off by about sqrt(K) * 2^-11 of its scale. The weight gradient sums
    /// K = 3 * 9 * 9 = 243 products (7.6e-3 by that estimate); over 50 random draws it
    /// differed by 3.8e-3 on average and 6.3e-3 at most (the output by 3.2e-3, the input
    /// gradient by 1.5e-3). With the seeded inputs here: 3.3e-3, and 5.5e-4 for im2col. Each
    /// run computes the same; the bound, 2e-2, stays far below what a wrong kernel gives
    /// (differences of order 1).
    #[cfg(feature = "wgpu")]
    #[test]
    fn f16_convolutions_match_f32_to_f16_rounding() {
        use burn::module::Param;
        use burn::tensor::Device;

        let gpus: Vec<Device> = devices()
            .into_iter()
            .filter_map(|(device, gpu)| gpu.then(|| device.autodiff()))
            .collect();
        assert!(!gpus.is_empty(), "the wgpu feature gives a GPU device");
        for device in gpus {
            assert!(
                device.supports_dtype(DType::F16),
                "{device:?} has no f16 arithmetic: this test needs one that has"
            );
            for bias in [false, true] {
                let mut conv = Conv2dConfig::new([8, 16], [3, 3])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .with_bias(bias)
                    .init(&device);
                conv.weight = Param::from_tensor(seeded_normal([16, 8, 3, 3], 1, &device) * 0.2);
                if bias {
                    conv.bias = Some(Param::from_tensor(seeded_normal([16], 2, &device) * 0.2));
                }
                let x = seeded_normal([3, 8, 9, 9], 3, &device).require_grad();
                for how in [GpuConv::Burn, GpuConv::Im2col] {
                    let case = format!("{device:?} {how:?} bias {bias}");
                    let exact = conv_with(&conv, x.clone(), how, GpuPrecision::F32);
                    assert_matches_burn(&case, &conv, &x, exact, 1e-5);
                    let got = conv_with(&conv, x.clone(), how, GpuPrecision::F16);
                    assert_eq!(got.dtype(), DType::F32, "{case}");
                    let rounding =
                        relative_difference(got.clone().inner(), conv.forward(x.clone()).inner());
                    assert!(rounding > 1e-6, "{case}: not computed in f16 ({rounding})");
                    assert_matches_burn(&case, &conv, &x, got, 2e-2);
                }
            }
        }
    }

    /// An explicit choice holds for the process until the next one and wins over the
    /// environment. (A choice of its own: the global ones would change what other tests
    /// running at the same time compute.)
    #[test]
    fn a_choice_is_explicit_and_process_wide() {
        static CHOICE: Choice = Choice::new("RESNET_BURN_TEST_CHOICE_UNSET");
        assert_eq!(CHOICE.get::<GpuPrecision>(), GpuPrecision::F32);
        CHOICE.set(GpuPrecision::F16);
        assert_eq!(CHOICE.get::<GpuPrecision>(), GpuPrecision::F16);
        assert_eq!(
            std::thread::spawn(|| CHOICE.get::<GpuPrecision>())
                .join()
                .unwrap(),
            GpuPrecision::F16
        );
        CHOICE.set(GpuPrecision::F32);
        assert_eq!(CHOICE.get::<GpuPrecision>(), GpuPrecision::F32);
    }

    /// The names `--gpu-conv`, `--precision` and their environment variables take, and the
    /// error for others.
    #[test]
    fn parses_the_names_of_the_choices() {
        assert_eq!("burn".parse(), Ok(GpuConv::Burn));
        assert_eq!("im2col".parse(), Ok(GpuConv::Im2col));
        assert_eq!(
            "Im2col".parse::<GpuConv>(),
            Err("\"Im2col\" is neither \"burn\" nor \"im2col\"".to_string())
        );
        assert_eq!("f32".parse(), Ok(GpuPrecision::F32));
        assert_eq!("f16".parse(), Ok(GpuPrecision::F16));
        assert_eq!(
            "bf16".parse::<GpuPrecision>(),
            Err("\"bf16\" is neither \"f32\" nor \"f16\"".to_string())
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
            assert!(conv_im2col(&conv, &conv.weight.val(), &x).is_none());
        }
    }
}
