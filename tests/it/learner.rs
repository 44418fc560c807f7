//! resnet-burn's burn-train steps: two steps of `SupervisedTraining` on tiny data end with the
//! weights of two SGD steps taken by hand on the same batches, and burn-train writes its
//! checkpoint and metrics.

use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::optim::SgdConfig;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn::train::metric::{AccuracyMetric, LossMetric};
use burn::train::{Learner, SupervisedTraining, TrainStep};
use resnet_burn::train::{ClassificationBatch, Classifier};
use resnet_burn::{ResNetConfig, Stem};

use crate::cifar_files::scratch;
use crate::support::{pseudo_random, read_safetensors, values};

#[derive(Clone, Debug)]
struct Item {
    image: Vec<f32>,
    label: i64,
}

#[derive(Clone)]
struct ItemBatcher;

impl Batcher<Item, ClassificationBatch> for ItemBatcher {
    fn batch(&self, items: Vec<Item>, device: &Device) -> ClassificationBatch {
        let n = items.len();
        let images: Vec<f32> = items.iter().flat_map(|i| i.image.clone()).collect();
        let labels: Vec<i64> = items.iter().map(|i| i.label).collect();
        ClassificationBatch::new(
            Tensor::from_data(TensorData::new(images, [n, 3, 8, 8]), device),
            Tensor::<1, Int>::from_data(TensorData::new(labels, [n]), device),
        )
    }
}

fn items() -> Vec<Item> {
    (0..8)
        .map(|i| Item {
            image: values(pseudo_random([1, 3, 8, 8], 100 + i as u64, &Device::flex())),
            label: i % 3,
        })
        .collect()
}

#[test]
fn two_burn_train_steps_are_two_sgd_steps() {
    let device = Device::flex().autodiff();
    let config = ResNetConfig::resnet18(3)
        .with_stem(Stem::Cifar)
        .with_base_channels(4);
    let model = config.try_init_seeded(&device, 5).unwrap();
    let classifier = Classifier::new(model.clone(), 0.1);
    let lr = 0.05;

    // By hand: two steps on the batches the loader gives, in order.
    let mut by_hand = Classifier::new(model, 0.1);
    let mut optimizer = SgdConfig::new().init();
    for chunk in items().chunks(4) {
        let batch = ItemBatcher.batch(chunk.to_vec(), &device);
        let output = TrainStep::step(&by_hand, batch);
        by_hand = optimizer.step(lr, by_hand, output.grads);
    }

    let dir = scratch("learner-two-steps");
    let loader = |items| {
        DataLoaderBuilder::new(ItemBatcher)
            .batch_size(4)
            .set_device(device.clone())
            .build(InMemDataset::new(items))
    };
    let result = SupervisedTraining::new(&dir, loader(items()), loader(items()[..4].to_vec()))
        .metrics((AccuracyMetric::new(), LossMetric::new()))
        .with_default_checkpointers()
        .num_epochs(1)
        .with_application_logger(None)
        .launch(Learner::new(classifier, SgdConfig::new().init(), lr));
    assert!(result.error.is_none(), "{:?}", result.error);

    let save = |model: &Classifier, name: &str| {
        let path = dir.join(name);
        model.model.save_torchvision(&path).unwrap();
        read_safetensors(&path)
    };
    assert_eq!(
        save(&result.model, "learner.safetensors"),
        save(&by_hand.valid(), "by-hand.safetensors")
    );
    assert!(
        dir.join("checkpoint/model-1.bpk").is_file(),
        "burn-train's checkpoint"
    );
}
