//! The im2col convolution as a Burn backend extension, so that it runs in training too: on
//! `Flex` it is [`Im2col::forward`], and on `Autodiff<Flex>` it records a backward step that
//! computes both gradients with [`Im2col::backward`] instead of Burn's generic
//! transposed-convolution backward.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Flex, TensorMetadata, backend_extension};
use burn::tensor::TensorData;

use super::im2col::Im2col;

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
