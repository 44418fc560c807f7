//! The host kernels as Burn backend extensions, which give them Burn's tensors: on flex they
//! read the storage in place, on ndarray they read a copy.
//!
//! - [`CpuTraining`]: the convolution alone ([`Im2col::forward`], or Winograd's
//!   [`forward`](crate::winograd::Winograd::forward) where [`Im2col::winograd`] applies) and
//!   BatchNorm with the batch's statistics ([`Planes::forward`]); on `Autodiff` over a CPU
//!   backend each records its own backward step ([`Im2col::backward`], or Winograd's
//!   [`input_grad`](crate::winograd::Winograd::input_grad) and
//!   [`weight_grad`](crate::winograd::Winograd::weight_grad); [`Planes::backward`]) instead
//!   of Burn's generic ones (a transposed convolution; BatchNorm's elementwise passes);
//! - [`CpuInference`], inference only: the convolution followed by an [`Affine`] map
//!   (BatchNorm with running statistics), the residual and ReLU, applied to each image's
//!   output right after its product; and max pooling.

// Burn 0.22 deprecates ndarray in favour of flex; this crate still supports it.
#![allow(deprecated)]

#[cfg(feature = "flex")]
use burn::backend::Flex;
#[cfg(feature = "ndarray")]
use burn::backend::NdArray;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
#[cfg(feature = "flex")]
use burn::backend::flex::FlexTensor;
#[cfg(feature = "ndarray")]
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{AutodiffBackend, Backend, TensorMetadata, backend_extension};
use burn::tensor::TensorData;

use crate::im2col::Im2col;
use crate::norm::{NormGradients, Normalized, Planes};
use crate::pool::MaxPool;
use crate::{Affine, ConvPlan};

/// Training, with gradients on `Autodiff`:
///
/// - `host_conv2d`: a bias-free, ungrouped, undilated 2-d convolution with symmetric
///   padding. Callers check the geometry with [`Im2col::new`] and the dtype (f32) first: the
///   implementations treat anything else as a bug.
/// - `batch_norm_train_planes`: BatchNorm with the batch's statistics; the output, and each
///   channel's mean and biased variance, as Burn's `batch_norm_train` returns them. `x` is
///   `[batch, channels, height, width]` with at least one value ([`Planes::new`]), all f32.
#[backend_extension(
    Flex: cfg(feature = "flex"),
    NdArray: cfg(feature = "ndarray"),
    Autodiff
)]
pub trait CpuTraining: Backend {
    fn host_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        plan: ConvPlan,
    ) -> FloatTensor<Self>;

    fn batch_norm_train_planes(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Inference: `relu?(affine(conv(x)))`, `relu(affine(conv(x)) + residual)` (the residual has
/// the output's shape), where [`CpuTraining`]'s rules for the convolution apply; and max
/// pooling, where [`MaxPool::new`] accepts the geometry.
#[backend_extension(Flex: cfg(feature = "flex"), NdArray: cfg(feature = "ndarray"))]
pub trait CpuInference: Backend {
    fn host_conv2d_affine(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        affine: Affine,
        plan: ConvPlan,
    ) -> FloatTensor<Self>;

    fn host_conv2d_affine_residual(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        affine: Affine,
        plan: ConvPlan,
    ) -> FloatTensor<Self>;

    fn max_pool2d_planes(
        x: FloatTensor<Self>,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self>;
}

/// A CPU backend whose f32 tensors the host kernels can read and make.
pub trait HostTensors: Backend {
    /// The values of `t` (f32), row-major.
    fn host(t: FloatTensor<Self>) -> Host;

    /// A tensor of `values`, row-major, with `shape`.
    fn from_host(values: Vec<f32>, shape: &[usize]) -> FloatTensor<Self>;
}

/// The f32 values of a tensor on the host: flex's storage itself, or a copy.
pub enum Host {
    #[cfg(feature = "flex")]
    Flex(FlexTensor),
    /// An ndarray tensor in standard (row-major, contiguous) layout, read in place.
    #[cfg(feature = "ndarray")]
    NdArray(NdArrayTensor),
    #[cfg(feature = "ndarray")]
    Data(TensorData),
}

impl Host {
    fn values(&self) -> &[f32] {
        match self {
            #[cfg(feature = "flex")]
            Host::Flex(t) => t.as_slice::<f32>(),
            #[cfg(feature = "ndarray")]
            Host::NdArray(NdArrayTensor::F32(storage)) => storage.view().to_slice(),
            #[cfg(feature = "ndarray")]
            Host::NdArray(_) => None,
            #[cfg(feature = "ndarray")]
            Host::Data(data) => data.as_slice::<f32>().ok(),
        }
        .expect("an f32 tensor (the caller checked the dtype)")
    }
}

#[cfg(feature = "flex")]
impl HostTensors for Flex {
    fn host(t: FlexTensor) -> Host {
        // Contiguous storage is read in place (shared, not copied).
        Host::Flex(if t.as_slice::<f32>().is_some() {
            t
        } else {
            t.to_contiguous()
        })
    }

    fn from_host(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
    }
}

#[cfg(feature = "ndarray")]
impl HostTensors for NdArray {
    fn host(t: NdArrayTensor) -> Host {
        use burn::backend::ops::FloatTensorOps;
        let in_place =
            matches!(&t, NdArrayTensor::F32(storage) if storage.view().is_standard_layout());
        if in_place {
            return Host::NdArray(t);
        }
        // ndarray's reads complete at once: there is nothing to wait for.
        let data = burn::tensor::read_sync(Self::float_into_data(t));
        Host::Data(data.expect("reading an ndarray tensor on the host"))
    }

    fn from_host(values: Vec<f32>, shape: &[usize]) -> NdArrayTensor {
        NdArrayTensor::from_data(TensorData::new(values, shape.to_vec()))
    }
}

/// The geometry of a convolution of `x` by `weight`.
fn geometry<B: Backend>(
    x: &FloatTensor<B>,
    weight: &FloatTensor<B>,
    stride: [usize; 2],
    padding: [usize; 2],
    plan: ConvPlan,
) -> Im2col {
    Im2col::new(x.shape().dims(), weight.shape().dims(), stride, padding)
        .expect("the caller checked the convolution's geometry")
        .with_algorithm(plan.algorithm)
        .with_precision(plan.precision)
}

/// The convolution of the images `x` by `weight`, with `epilogue(i, out)` on each image's
/// output: by Winograd's minimal filtering where [`Im2col::winograd`] says so, else im2col.
fn convolve(
    geometry: &Im2col,
    x: &[f32],
    weight: &[f32],
    epilogue: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    match geometry.winograd() {
        Some(winograd) => winograd.forward(x, &winograd.weight(weight), epilogue),
        None => geometry.forward(x, weight, epilogue),
    }
}

fn conv<B: HostTensors>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    stride: [usize; 2],
    padding: [usize; 2],
    plan: ConvPlan,
) -> FloatTensor<B> {
    let geometry = geometry::<B>(&x, &weight, stride, padding, plan);
    let (x, weight) = (B::host(x), B::host(weight));
    let out = convolve(&geometry, x.values(), weight.values(), |_, _| {});
    B::from_host(out, &geometry.out_shape())
}

fn conv_affine<B: HostTensors>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    residual: Option<FloatTensor<B>>,
    stride: [usize; 2],
    padding: [usize; 2],
    affine: &Affine,
    plan: ConvPlan,
) -> FloatTensor<B> {
    let geometry = geometry::<B>(&x, &weight, stride, padding, plan);
    let (x, weight) = (B::host(x), B::host(weight));
    let residual = residual.map(B::host);
    let residual = residual.as_ref().map(Host::values);
    let pixels = geometry.pixels();
    let out_image = geometry.out_channels() * pixels;
    let out = convolve(&geometry, x.values(), weight.values(), |i, out| {
        let residual = residual.map(|r| &r[i * out_image..(i + 1) * out_image]);
        affine.apply(out, residual, pixels);
    });
    B::from_host(out, &geometry.out_shape())
}

fn max_pool<B: HostTensors>(
    x: FloatTensor<B>,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
) -> FloatTensor<B> {
    let input = x.shape().dims::<4>();
    let pool = MaxPool::new(input, kernel, stride, padding)
        .expect("the caller checked the pooling's geometry");
    B::from_host(pool.forward(B::host(x).values()), &pool.out_shape(input[0]))
}

fn planes<B: Backend>(x: &FloatTensor<B>) -> ([usize; 4], Planes) {
    let shape = x.shape().dims();
    let planes = Planes::new(shape).expect("the caller checked that the input has values");
    (shape, planes)
}

fn batch_norm_train<B: HostTensors>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    beta: FloatTensor<B>,
    epsilon: f64,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let (shape, planes) = planes::<B>(&x);
    let (x, gamma, beta) = (B::host(x), B::host(gamma), B::host(beta));
    let Normalized {
        output,
        mean,
        variance,
    } = planes.forward(x.values(), gamma.values(), beta.values(), epsilon);
    let channels = [mean.len()];
    (
        B::from_host(output, &shape),
        B::from_host(mean, &channels),
        B::from_host(variance, &channels),
    )
}

/// The extensions on one CPU backend, through the generic functions above.
macro_rules! on_host {
    ($backend:ty) => {
        impl CpuTraining for $backend {
            fn host_conv2d(
                x: FloatTensor<Self>,
                weight: FloatTensor<Self>,
                stride: [usize; 2],
                padding: [usize; 2],
                plan: ConvPlan,
            ) -> FloatTensor<Self> {
                conv::<Self>(x, weight, stride, padding, plan)
            }

            fn batch_norm_train_planes(
                x: FloatTensor<Self>,
                gamma: FloatTensor<Self>,
                beta: FloatTensor<Self>,
                epsilon: f64,
            ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
                batch_norm_train::<Self>(x, gamma, beta, epsilon)
            }
        }

        impl CpuInference for $backend {
            fn host_conv2d_affine(
                x: FloatTensor<Self>,
                weight: FloatTensor<Self>,
                stride: [usize; 2],
                padding: [usize; 2],
                affine: Affine,
                plan: ConvPlan,
            ) -> FloatTensor<Self> {
                conv_affine::<Self>(x, weight, None, stride, padding, &affine, plan)
            }

            fn host_conv2d_affine_residual(
                x: FloatTensor<Self>,
                weight: FloatTensor<Self>,
                residual: FloatTensor<Self>,
                stride: [usize; 2],
                padding: [usize; 2],
                affine: Affine,
                plan: ConvPlan,
            ) -> FloatTensor<Self> {
                conv_affine::<Self>(x, weight, Some(residual), stride, padding, &affine, plan)
            }

            fn max_pool2d_planes(
                x: FloatTensor<Self>,
                kernel: [usize; 2],
                stride: [usize; 2],
                padding: [usize; 2],
            ) -> FloatTensor<Self> {
                max_pool::<Self>(x, kernel, stride, padding)
            }
        }
    };
}

#[cfg(feature = "flex")]
on_host!(Flex);
#[cfg(feature = "ndarray")]
on_host!(NdArray);

/// What the backward step keeps of the forward: both operands (shared, not copied).
#[derive(Clone, Debug)]
struct Saved<B: Backend> {
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    stride: [usize; 2],
    padding: [usize; 2],
    plan: ConvPlan,
}

#[derive(Debug)]
struct HostConvBackward;

impl<B: HostTensors> Backward<B, 2> for HostConvBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Saved<B>, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, weight_node] = ops.parents;
        let grad = B::host(grads.consume::<B>(&ops.node));
        let Saved {
            x,
            weight,
            stride,
            padding,
            plan,
        } = ops.state;
        let geometry = geometry::<B>(&x, &weight, stride, padding, plan);
        let (x, weight) = (B::host(x), B::host(weight));
        let (x, weight, grad) = (x.values(), weight.values(), grad.values());
        let (want_x, want_weight) = (x_node.is_some(), weight_node.is_some());
        let (x_grad, weight_grad) = match geometry.winograd() {
            Some(winograd) => {
                let x_grad = want_x.then(|| winograd.input_grad(grad, weight));
                let weight_grad = if want_weight && winograd.weight_grad_pays() {
                    Some(winograd.weight_grad(x, grad))
                } else {
                    geometry.backward(x, weight, grad, false, want_weight).1
                };
                (x_grad, weight_grad)
            }
            None => geometry.backward(x, weight, grad, want_x, want_weight),
        };
        if let (Some(node), Some(x_grad)) = (x_node, x_grad) {
            grads.register::<B>(node.id, B::from_host(x_grad, &geometry.in_shape()));
        }
        if let (Some(node), Some(weight_grad)) = (weight_node, weight_grad) {
            grads.register::<B>(node.id, B::from_host(weight_grad, &geometry.weight_shape()));
        }
    }
}

/// What BatchNorm's backward step keeps of the forward (shared, not copied).
#[derive(Clone, Debug)]
struct SavedNorm<B: Backend> {
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    mean: FloatTensor<B>,
    variance: FloatTensor<B>,
    epsilon: f64,
}

#[derive(Debug)]
struct BatchNormBackward;

impl<B: HostTensors> Backward<B, 3> for BatchNormBackward {
    type State = SavedNorm<B>;

    fn backward(self, ops: Ops<SavedNorm<B>, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, gamma_node, beta_node] = ops.parents;
        let grad = B::host(grads.consume::<B>(&ops.node));
        let SavedNorm {
            x,
            gamma,
            mean,
            variance,
            epsilon,
        } = ops.state;
        let (shape, planes) = planes::<B>(&x);
        let [x, gamma, mean, variance] = [x, gamma, mean, variance].map(B::host);
        let NormGradients {
            x: x_grad,
            gamma: gamma_grad,
            beta: beta_grad,
        } = planes.backward(
            x.values(),
            gamma.values(),
            mean.values(),
            variance.values(),
            epsilon,
            grad.values(),
        );
        let channels = [gamma_grad.len()];
        if let Some(node) = x_node {
            grads.register::<B>(node.id, B::from_host(x_grad, &shape));
        }
        if let Some(node) = gamma_node {
            grads.register::<B>(node.id, B::from_host(gamma_grad, &channels));
        }
        if let Some(node) = beta_node {
            grads.register::<B>(node.id, B::from_host(beta_grad, &channels));
        }
    }
}

impl<B: HostTensors + CpuTraining, C: CheckpointStrategy> CpuTraining for Autodiff<B, C> {
    fn host_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        plan: ConvPlan,
    ) -> FloatTensor<Self> {
        let nodes = [x.node(), weight.node()];
        let (x, weight) = (x.into_primitive(), weight.into_primitive());
        match HostConvBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::host_conv2d(x.clone(), weight.clone(), stride, padding, plan);
                let saved = Saved {
                    x,
                    weight,
                    stride,
                    padding,
                    plan,
                };
                prep.finish(saved, out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::host_conv2d(x, weight, stride, padding, plan))
            }
        }
    }

    fn batch_norm_train_planes(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let nodes = [x.node(), gamma.node(), beta.node()];
        let [x, gamma, beta] = [x, gamma, beta].map(|t| t.into_primitive());
        // The statistics are outputs without gradients, as in Burn's `batch_norm_train`.
        let constant = <Self as AutodiffBackend>::from_inner;
        match BatchNormBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, mean, variance) =
                    B::batch_norm_train_planes(x.clone(), gamma.clone(), beta, epsilon);
                let saved = SavedNorm {
                    x,
                    gamma,
                    mean: mean.clone(),
                    variance: variance.clone(),
                    epsilon,
                };
                (prep.finish(saved, out), constant(mean), constant(variance))
            }
            OpsKind::UnTracked(prep) => {
                let (out, mean, variance) = B::batch_norm_train_planes(x, gamma, beta, epsilon);
                (prep.finish(out), constant(mean), constant(variance))
            }
        }
    }
}
