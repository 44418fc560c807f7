//! burn-train's step traits for [`ResNet`] (feature `train`): hand a network to
//! [`SupervisedTraining`](burn::train::SupervisedTraining) and get burn-train's loop, dashboard,
//! metrics and checkpoints.
//!
//! A [`ResNet`] trains with plain cross-entropy; a [`Classifier`] wraps one with label
//! smoothing. Both take a [`ClassificationBatch`] and give burn-train's
//! [`ClassificationOutput`], which its accuracy, loss and top-k metrics read.
//!
//! ```no_run
//! # use burn::tensor::Device;
//! # use resnet_burn::{ResNetConfig, Stem};
//! use resnet_burn::train::Classifier;
//!
//! let device = Device::flex().autodiff();
//! let model = ResNetConfig::resnet18(10).with_stem(Stem::Cifar).init(&device);
//! let classifier = Classifier::new(model, 0.1);
//! // `Learner::new(classifier, optimizer, scheduler)`, then `SupervisedTraining::launch`.
//! ```

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Int, Tensor};
use burn::train::{ClassificationOutput, InferenceStep, TrainOutput, TrainStep};

use crate::ResNet;

/// A batch of images and their class indices, on the device the model is on.
#[derive(Clone, Debug)]
pub struct ClassificationBatch {
    /// Normalized images, `[batch, channels, height, width]`.
    pub images: Tensor<4>,
    /// Class indices, `[batch]`.
    pub targets: Tensor<1, Int>,
}

impl ClassificationBatch {
    /// A batch of `images` labelled `targets`.
    pub fn new(images: Tensor<4>, targets: Tensor<1, Int>) -> Self {
        Self { images, targets }
    }
}

/// A [`ResNet`] with the loss it trains with: cross-entropy with label smoothing
/// (`torch.nn.CrossEntropyLoss(label_smoothing=...)`). burn-train's checkpoints name its
/// weights `model.*`.
#[derive(Module, Debug)]
pub struct Classifier {
    /// The network.
    pub model: ResNet,
    /// The smoothing factor, in `[0, 1)`; 0 is plain cross-entropy.
    #[module(skip)]
    label_smoothing: f32,
}

impl Classifier {
    /// `model` trained with `label_smoothing` (0.1 in torchvision's reference recipes).
    pub fn new(model: ResNet, label_smoothing: f32) -> Self {
        Self {
            model,
            label_smoothing,
        }
    }

    /// The smoothing factor.
    pub fn label_smoothing(&self) -> f32 {
        self.label_smoothing
    }
}

/// The loss and logits of `model` on `batch`.
fn classify(model: &ResNet, batch: ClassificationBatch, smoothing: f32) -> ClassificationOutput {
    let ClassificationBatch { images, targets } = batch;
    let logits = model.forward(images);
    let loss = CrossEntropyLossConfig::new()
        .with_smoothing((smoothing > 0.0).then_some(smoothing))
        .init(&logits.device())
        .forward(logits.clone(), targets.clone());
    ClassificationOutput::new(loss, logits, targets)
}

fn train_step<M: Module>(
    module: &M,
    model: &ResNet,
    batch: ClassificationBatch,
    smoothing: f32,
) -> TrainOutput<ClassificationOutput> {
    let output = classify(model, batch, smoothing);
    TrainOutput::new(module, output.loss.backward(), output)
}

impl TrainStep for ResNet {
    type Input = ClassificationBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: ClassificationBatch) -> TrainOutput<ClassificationOutput> {
        train_step(self, self, batch, 0.0)
    }
}

impl InferenceStep for ResNet {
    type Input = ClassificationBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: ClassificationBatch) -> ClassificationOutput {
        classify(self, batch, 0.0)
    }
}

impl TrainStep for Classifier {
    type Input = ClassificationBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: ClassificationBatch) -> TrainOutput<ClassificationOutput> {
        train_step(self, &self.model, batch, self.label_smoothing)
    }
}

impl InferenceStep for Classifier {
    type Input = ClassificationBatch;
    type Output = ClassificationOutput;

    /// Validation reports the training criterion, smoothing included, as torchvision's
    /// reference scripts do.
    fn step(&self, batch: ClassificationBatch) -> ClassificationOutput {
        classify(&self.model, batch, self.label_smoothing)
    }
}
