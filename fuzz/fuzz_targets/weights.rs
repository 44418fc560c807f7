// The model every weight target loads into: small, built once, cloned for each input.

use std::sync::OnceLock;

use burn::tensor::Device;
use resnet_burn::{BlockKind, LoadOptions, ResNet, ResNetConfig, Stem};

/// Loads `data` as the weights of a narrow ResNet: any result but a panic is a pass.
pub fn load(data: &[u8], name: &str) {
    static MODEL: OnceLock<ResNet> = OnceLock::new();
    let model = MODEL.get_or_init(|| {
        ResNetConfig::new(BlockKind::Basic, [2, 1, 1, 1])
            .with_num_classes(10)
            .with_base_channels(8)
            .with_stem(Stem::Cifar)
            .init(&Device::flex())
    });
    let _ = model
        .clone()
        .load_torchvision_bytes(data, name, &LoadOptions::default());
}
