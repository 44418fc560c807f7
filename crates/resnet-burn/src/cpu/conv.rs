//! The im2col convolution as Burn backend extensions, which reach flex's tensors without
//! copying them:
//!
//! - [`Im2colConv`], the convolution alone: on `Flex` it is [`Im2col::forward`], and on
//!   `Autodiff<Flex>` it records a backward step that computes both gradients with
//!   [`Im2col::backward`] instead of Burn's generic transposed-convolution backward;
//! - [`FlexInference`], inference only: the convolution followed by an [`Affine`] map
//!   (BatchNorm with running statistics), the residual and ReLU, applied to each image's
//!   output right after its product; and max pooling.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Flex, TensorMetadata, backend_extension};
use burn::tensor::TensorData;

use super::Affine;
use super::im2col::Im2col;
use super::pool::MaxPool;

/// A bias-free, ungrouped, undilated 2-d convolution with symmetric padding.
///
/// Callers check the geometry with [`Im2col::new`] first: the implementations treat an
/// inconsistent one as a bug.
#[backend_extension(Flex, Autodiff)]
pub trait Im2colConv: Backend {
    fn im2col_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self>;
}

/// Inference on flex: `relu?(affine(conv(x)))`, `relu(affine(conv(x)) + residual)` (the
/// residual has the output's shape), where [`Im2colConv`]'s geometry rules apply; and max
/// pooling, where [`MaxPool::new`] accepts the geometry.
#[backend_extension(Flex)]
pub trait FlexInference: Backend {
    fn im2col_conv2d_affine(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        affine: Affine,
    ) -> FloatTensor<Self>;

    fn im2col_conv2d_affine_residual(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        affine: Affine,
    ) -> FloatTensor<Self>;

    fn max_pool2d_planes(
        x: FloatTensor<Self>,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self>;
}

/// The geometry of a convolution of `x` by `weight`.
fn geometry(
    x: &FlexTensor,
    weight: &FlexTensor,
    stride: [usize; 2],
    padding: [usize; 2],
) -> Im2col {
    let dims = |t: &FlexTensor| -> [usize; 4] { t.shape().dims::<4>() };
    Im2col::new(dims(x), dims(weight), stride, padding)
        .expect("the caller checked the convolution's geometry")
}

/// `t` with contiguous storage, so that [`values`] can read it.
fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The values of a contiguous f32 tensor.
fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("a contiguous f32 tensor (the caller checked the dtype)")
}

fn tensor(values: Vec<f32>, shape: [usize; 4]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

impl Im2colConv for Flex {
    fn im2col_conv2d(
        x: FlexTensor,
        weight: FlexTensor,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FlexTensor {
        let geometry = geometry(&x, &weight, stride, padding);
        let (x, weight) = (contiguous(x), contiguous(weight));
        let out = geometry.forward(values(&x), values(&weight), |_, _| {});
        tensor(out, geometry.out_shape())
    }
}

impl FlexInference for Flex {
    fn im2col_conv2d_affine(
        x: FlexTensor,
        weight: FlexTensor,
        stride: [usize; 2],
        padding: [usize; 2],
        affine: Affine,
    ) -> FlexTensor {
        conv_affine(x, weight, None, stride, padding, &affine)
    }

    fn im2col_conv2d_affine_residual(
        x: FlexTensor,
        weight: FlexTensor,
        residual: FlexTensor,
        stride: [usize; 2],
        padding: [usize; 2],
        affine: Affine,
    ) -> FlexTensor {
        conv_affine(x, weight, Some(residual), stride, padding, &affine)
    }

    fn max_pool2d_planes(
        x: FlexTensor,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FlexTensor {
        let input = x.shape().dims::<4>();
        let pool = MaxPool::new(input, kernel, stride, padding)
            .expect("the caller checked the pooling's geometry");
        let x = contiguous(x);
        tensor(pool.forward(values(&x)), pool.out_shape(input[0]))
    }
}

/// [`FlexInference`]'s convolution on flex's tensors.
fn conv_affine(
    x: FlexTensor,
    weight: FlexTensor,
    residual: Option<FlexTensor>,
    stride: [usize; 2],
    padding: [usize; 2],
    affine: &Affine,
) -> FlexTensor {
    let geometry = geometry(&x, &weight, stride, padding);
    let (x, weight) = (contiguous(x), contiguous(weight));
    let residual = residual.map(contiguous);
    let residual = residual.as_ref().map(values);
    let pixels = geometry.pixels();
    let out_image = geometry.out_channels() * pixels;
    let out = geometry.forward(values(&x), values(&weight), |i, out| {
        let residual = residual.map(|r| &r[i * out_image..(i + 1) * out_image]);
        affine.apply(out, residual, pixels);
    });
    tensor(out, geometry.out_shape())
}

/// What the backward step keeps of the forward: both operands (shared, not copied).
#[derive(Clone, Debug)]
struct Saved {
    x: FlexTensor,
    weight: FlexTensor,
    stride: [usize; 2],
    padding: [usize; 2],
}

#[derive(Debug)]
struct Im2colConvBackward;

impl Backward<Flex, 2> for Im2colConvBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, weight_node] = ops.parents;
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        let Saved {
            x,
            weight,
            stride,
            padding,
        } = ops.state;
        let geometry = geometry(&x, &weight, stride, padding);
        let (x, weight) = (contiguous(x), contiguous(weight));
        let (x_grad, weight_grad) = geometry.backward(
            values(&x),
            values(&weight),
            values(&grad),
            x_node.is_some(),
            weight_node.is_some(),
        );
        if let (Some(node), Some(x_grad)) = (x_node, x_grad) {
            grads.register::<Flex>(node.id, tensor(x_grad, geometry.in_shape()));
        }
        if let (Some(node), Some(weight_grad)) = (weight_node, weight_grad) {
            grads.register::<Flex>(node.id, tensor(weight_grad, geometry.weight_shape()));
        }
    }
}

impl<C: CheckpointStrategy> Im2colConv for Autodiff<Flex, C> {
    fn im2col_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self> {
        let nodes = [x.node(), weight.node()];
        let (x, weight) = (x.into_primitive(), weight.into_primitive());
        match Im2colConvBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = Flex::im2col_conv2d(x.clone(), weight.clone(), stride, padding);
                let saved = Saved {
                    x,
                    weight,
                    stride,
                    padding,
                };
                prep.finish(saved, out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::im2col_conv2d(x, weight, stride, padding))
            }
        }
    }
}
