//! resnet-burn's models against torchvision's numbers, on every device.
//!
//! Reference figures come from `tests/fixtures/torchvision_architectures.json`, written by
//! `tests/fixtures/make_references.py` from torchvision itself.

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use resnet_burn::{BlockKind, ConfigError, InputError, ResNet, ResNetConfig, ResidualBlock, Stem};
use serde::Deserialize;

use crate::support::{pseudo_random, relative_error, tempdir, values};

device_tests!(
    output_shapes_of_small_presets,
    dilation_keeps_resolution,
    zero_init_block_is_identity_then_relu,
    batchnorm_uses_batch_statistics_in_training_only,
    save_load_round_trip,
    sgd_step_lowers_the_loss,
    bad_input_is_an_error,
);

// ---------------------------------------------------------------------------------------------
// Helpers

/// A narrow network (base width 8, one block a stage) for the slow backends.
pub fn tiny(block: BlockKind) -> ResNetConfig {
    ResNetConfig::new(block, [1, 1, 1, 1])
        .with_num_classes(10)
        .with_base_channels(8)
        .with_stem(Stem::Cifar)
}

fn stage_shapes(model: &ResNet, input: Tensor<4>) -> [[usize; 4]; 4] {
    model.forward_stages(input).map(|stage| stage.dims())
}

// ---------------------------------------------------------------------------------------------
// torchvision's architectures (device independent: parameters are counted before they exist)

#[derive(Deserialize)]
struct Reference {
    torchvision: String,
    architectures: Vec<Architecture>,
}

#[derive(Deserialize)]
struct Architecture {
    model: String,
    num_classes: usize,
    stem: String,
    trainable_params: usize,
    state_dict: Option<Vec<(String, Vec<usize>)>>,
}

fn reference() -> Reference {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/torchvision_architectures.json"
    );
    let text = std::fs::read_to_string(path).expect("reference file (run make_references.py)");
    serde_json::from_str(&text).expect("reference JSON")
}

fn config_of(arch: &Architecture) -> ResNetConfig {
    let config = ResNetConfig::from_name(&arch.model, arch.num_classes).expect("known preset");
    match arch.stem.as_str() {
        "imagenet" => config,
        "cifar" => config.with_stem(Stem::Cifar),
        other => panic!("unknown stem {other}"),
    }
}

#[test]
fn trainable_params_match_torchvision() {
    let reference = reference();
    let device = Device::flex();
    let mut checked = 0;
    for arch in &reference.architectures {
        let model = config_of(arch).init(&device);
        assert_eq!(
            model.trainable_params(),
            arch.trainable_params,
            "{} ({} classes, {} stem) against torchvision {}",
            arch.model,
            arch.num_classes,
            arch.stem,
            reference.torchvision
        );
        checked += 1;
    }
    // Every preset, at 1000 and 10 classes, with both stems.
    assert_eq!(checked, ResNetConfig::PRESETS.len() * 4);
}

#[test]
fn burn_num_params_also_counts_batchnorm_statistics() {
    let model = ResNetConfig::resnet18(10)
        .with_stem(Stem::Cifar)
        .init(&Device::flex());
    assert_eq!(model.trainable_params(), 11_173_962);
    assert_eq!(model.num_params(), 11_183_562);
}

#[test]
fn state_dict_keys_and_shapes_match_torchvision() {
    let reference = reference();
    let device = Device::flex();
    let mut checked = 0;
    for arch in &reference.architectures {
        let Some(expected) = &arch.state_dict else {
            continue;
        };
        let model = config_of(arch).init(&device);
        let actual: Vec<(String, Vec<usize>)> = model
            .torchvision_state_dict()
            .into_iter()
            .map(|entry| (entry.key, entry.shape))
            .collect();
        assert_eq!(
            actual.len(),
            expected.len(),
            "{}: number of keys",
            arch.model
        );
        for (a, e) in actual.iter().zip(expected) {
            assert_eq!(a, e, "{}: state-dict entry", arch.model);
        }
        checked += 1;
    }
    assert_eq!(checked, ResNetConfig::PRESETS.len());
}

#[test]
fn presets_match_their_names() {
    for name in ResNetConfig::PRESETS {
        let config = ResNetConfig::from_name(name, 7).expect("preset");
        assert_eq!(config.num_classes, 7);
        config.validate().expect("presets are valid");
    }
    assert!(ResNetConfig::from_name("resnet19", 10).is_none());
}

#[test]
fn config_json_round_trip() {
    let config = ResNetConfig::resnext50_32x4d(37)
        .with_stem(Stem::Cifar)
        .with_zero_init_residual(true)
        .with_in_channels(1)
        .with_replace_stride_with_dilation([false, true, true]);
    let json = serde_json::to_string(&config).expect("serialize");
    let back: ResNetConfig = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, config);

    let dir = tempdir();
    let path = dir.join("config.json");
    burn::config::Config::save(&config, &path).expect("save");
    let loaded: ResNetConfig = burn::config::Config::load(&path).expect("load");
    assert_eq!(loaded, config);
}

#[test]
fn every_config_error_names_the_value_at_fault() {
    let cases: Vec<(ResNetConfig, ConfigError)> = vec![
        (ResNetConfig::resnet18(0), ConfigError::NoClasses),
        (
            ResNetConfig::resnet18(10).with_in_channels(0),
            ConfigError::NoInputChannels,
        ),
        (
            ResNetConfig::resnet18(10).with_base_channels(0),
            ConfigError::NoBaseChannels,
        ),
        (
            ResNetConfig::new(BlockKind::Basic, [2, 0, 2, 2]),
            ConfigError::EmptyStage {
                stage: 2,
                layers: [2, 0, 2, 2],
            },
        ),
        (
            ResNetConfig::resnet18(10).with_groups(2),
            ConfigError::BasicBlockWidth {
                groups: 2,
                width_per_group: 64,
            },
        ),
        (
            ResNetConfig::resnet34(10).with_width_per_group(128),
            ConfigError::BasicBlockWidth {
                groups: 1,
                width_per_group: 128,
            },
        ),
        (
            ResNetConfig::resnet18(10).with_replace_stride_with_dilation([false, false, true]),
            ConfigError::BasicBlockDilation {
                replace_stride_with_dilation: [false, false, true],
            },
        ),
        (
            ResNetConfig::resnet50(10).with_groups(0),
            ConfigError::ZeroWidth {
                groups: 0,
                width_per_group: 64,
            },
        ),
        (
            ResNetConfig::resnet50(10)
                .with_base_channels(8)
                .with_width_per_group(4),
            ConfigError::ZeroBottleneckWidth {
                width_per_group: 4,
                base_channels: 8,
            },
        ),
    ];
    let device = Device::flex();
    for (config, expected) in cases {
        assert_eq!(config.validate(), Err(expected.clone()));
        match config.try_init(&device) {
            Err(error) => assert_eq!(error, expected),
            Ok(_) => panic!("{config:?} should not build"),
        }
        assert!(!expected.to_string().is_empty());
    }
    let message = ConfigError::EmptyStage {
        stage: 2,
        layers: [2, 0, 2, 2],
    }
    .to_string();
    assert!(
        message.contains("layer2") && message.contains("[2, 0, 2, 2]"),
        "{message}"
    );
}

#[test]
#[should_panic(expected = "invalid ResNetConfig: num_classes must be at least 1")]
fn init_panics_with_the_config_error() {
    ResNetConfig::resnet18(0).init(&Device::flex());
}

// ---------------------------------------------------------------------------------------------
// Device checks

fn output_shapes_of_small_presets(device: &Device) {
    // The deeper presets (101/152 layers) get their shapes checked by the ignored
    // `output_shapes_of_deep_presets` and their parameters by the tests above.
    for name in [
        "resnet18",
        "resnet34",
        "resnet50",
        "resnext50_32x4d",
        "wide_resnet50_2",
    ] {
        check_preset_shapes(name, device);
    }
}

fn check_preset_shapes(name: &str, device: &Device) {
    let config = ResNetConfig::from_name(name, 10).expect("preset");
    let expansion = config.block.expansion();
    let model = config.init(device).valid();
    let input = pseudo_random([1, 3, 64, 64], 1, device);
    // ImageNet stem: strides 4, 8, 16, 32.
    assert_eq!(
        stage_shapes(&model, input.clone()),
        [
            [1, 64 * expansion, 16, 16],
            [1, 128 * expansion, 8, 8],
            [1, 256 * expansion, 4, 4],
            [1, 512 * expansion, 2, 2],
        ],
        "{name}"
    );
    assert_eq!(
        model.forward_features(input.clone()).dims(),
        [1, 512 * expansion],
        "{name}"
    );
    assert_eq!(model.forward(input).dims(), [1, 10], "{name}");
}

#[test]
#[ignore = "slow: full forwards of the 101- and 152-layer presets; run with --ignored"]
fn output_shapes_of_deep_presets() {
    let device = Device::flex();
    for name in [
        "resnet101",
        "resnet152",
        "resnext101_32x8d",
        "resnext101_64x4d",
        "wide_resnet101_2",
    ] {
        check_preset_shapes(name, &device);
    }
}

fn dilation_keeps_resolution(device: &Device) {
    let base = tiny(BlockKind::Bottleneck).with_stem(Stem::ImageNet);
    let input = pseudo_random([1, 3, 64, 64], 2, device);
    for (dilation, last_size) in [
        ([false, false, false], 2), // output stride 32
        ([false, false, true], 4),  // output stride 16
        ([false, true, true], 8),   // output stride 8
    ] {
        let model = base
            .clone()
            .with_replace_stride_with_dilation(dilation)
            .init(device)
            .valid();
        let [c2, .., c5] = stage_shapes(&model, input.clone());
        assert_eq!(c2[2..], [16, 16]);
        assert_eq!(c5[2..], [last_size, last_size], "{dilation:?}");
        assert_eq!(c5[1], 8 * 8 * 4);
    }
}

fn zero_init_block_is_identity_then_relu(device: &Device) {
    for block in [BlockKind::Basic, BlockKind::Bottleneck] {
        // Bottleneck layer1[0] projects 8 -> 32 channels; layer1[1] has an identity shortcut.
        let config = ResNetConfig::new(block, [2, 1, 1, 1])
            .with_base_channels(8)
            .with_zero_init_residual(true);
        let channels = 8 * block.expansion();
        for training in [false, true] {
            let device = if training {
                device.clone().autodiff()
            } else {
                device.clone()
            };
            let model = config.init(&device);
            let x = pseudo_random([2, channels, 6, 6], 3, &device);
            let out = model.layer1[1].forward(x.clone());
            let expected = values(burn::tensor::activation::relu(x));
            let error = relative_error(&values(out), &expected);
            assert!(
                error < 1e-6,
                "{block:?} (training: {training}): relative error {error}"
            );
        }
        // Without zero init, the residual branch is not zero.
        let model = config.clone().with_zero_init_residual(false).init(device);
        let x = pseudo_random([2, channels, 6, 6], 3, device);
        let out = values(model.layer1[1].forward(x.clone()));
        assert!(relative_error(&out, &values(burn::tensor::activation::relu(x))) > 1e-3);
    }
}

fn batchnorm_uses_batch_statistics_in_training_only(device: &Device) {
    let autodiff = device.clone().autodiff();
    let model = tiny(BlockKind::Basic).init(&autodiff);
    let x = pseudo_random([4, 3, 8, 8], 4, &autodiff)
        .mul_scalar(3.0)
        .add_scalar(1.0);

    // Training: the stem BatchNorm normalizes with the batch's mean, and moves its running
    // mean 10% of the way there (PyTorch's momentum 0.1).
    let conv = model.conv1.forward(x.clone());
    let batch_mean = values(
        conv.clone()
            .permute([1, 0, 2, 3])
            .reshape([8, 4 * 8 * 8])
            .mean_dim(1),
    );
    let normalized = model.bn1.forward(conv);
    let normalized_mean = values(
        normalized
            .permute([1, 0, 2, 3])
            .reshape([8, 4 * 8 * 8])
            .mean_dim(1),
    );
    assert!(
        normalized_mean.iter().all(|m| m.abs() < 1e-4),
        "{normalized_mean:?}"
    );
    let running_mean = values(model.bn1.running_mean.value_sync());
    let expected: Vec<f32> = batch_mean.iter().map(|m| 0.1 * m).collect();
    assert!(
        relative_error(&running_mean, &expected) < 1e-4,
        "{running_mean:?} vs {expected:?}"
    );

    // The model's own training pass moves the running variance 10% of the way to the batch's
    // unbiased variance, as PyTorch's BatchNorm does (Burn's module, above, takes the biased
    // one).
    let fresh = tiny(BlockKind::Basic).init(&autodiff);
    let per_channel = fresh
        .conv1
        .forward(x.clone())
        .permute([1, 0, 2, 3])
        .reshape([8, 4 * 8 * 8]);
    let centered = per_channel.clone() - per_channel.mean_dim(1);
    let unbiased_variance = values(centered.powi_scalar(2).sum_dim(1).div_scalar(4 * 8 * 8 - 1));
    fresh.forward(x.clone());
    let running_var = values(fresh.bn1.running_var.value_sync());
    let expected: Vec<f32> = unbiased_variance.iter().map(|v| 0.9 + 0.1 * v).collect();
    assert!(
        relative_error(&running_var, &expected) < 1e-5,
        "{running_var:?} vs {expected:?}"
    );

    // Evaluation: running statistics, so the output of one image does not depend on the
    // rest of the batch, and the statistics stay as they are.
    let eval = model.valid();
    let running_before = values(eval.bn1.running_mean.value());
    let x = x.without_autodiff();
    let whole = values(eval.forward(x.clone()));
    let first = values(eval.forward(x.clone().narrow(0, 0, 1)));
    assert!(relative_error(&first, &whole[..10]) < 1e-5);
    assert_eq!(values(eval.bn1.running_mean.value()), running_before);

    // ...whereas in training, the batch changes every image's output.
    let model = tiny(BlockKind::Basic).init(&autodiff);
    let x = x.autodiff();
    let whole = values(model.forward(x.clone()));
    let first = values(model.forward(x.narrow(0, 0, 1)));
    assert!(relative_error(&first, &whole[..10]) > 1e-3);
}

fn save_load_round_trip(device: &Device) {
    let config = tiny(BlockKind::Bottleneck)
        .with_groups(2)
        .with_width_per_group(32);
    let model = config.init(device);
    let input = pseudo_random([2, 3, 8, 8], 5, device);
    let expected = values(model.valid().forward(input.clone()));

    let dir = tempdir();
    let path = dir.join(format!("model-{}.bpk", std::process::id()));
    model.save_file(&path).expect("save");
    let loaded = config.init(device).try_load_file(&path).expect("load");
    let actual = values(loaded.valid().forward(input));
    assert_eq!(actual, expected);
    std::fs::remove_file(path).ok();
}

fn sgd_step_lowers_the_loss(device: &Device) {
    let device = device.clone().autodiff();
    let mut model = tiny(BlockKind::Basic).init(&device);
    let images = pseudo_random([8, 3, 8, 8], 6, &device);
    let targets = Tensor::<1, Int>::from_data(TensorData::from([0, 1, 2, 3, 4, 5, 6, 7]), &device);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let loss = |model: &ResNet| loss_fn.forward(model.forward(images.clone()), targets.clone());

    let mut optimizer = SgdConfig::new().init();
    let before = loss(&model);
    let before_value = values(before.clone())[0];
    let grads = GradientsParams::from_grads(before.backward(), &model);
    model = optimizer.step(0.05, model, grads);
    let after = values(loss(&model))[0];
    assert!(after < before_value, "loss {before_value} -> {after}");
}

fn bad_input_is_an_error(device: &Device) {
    let model = tiny(BlockKind::Basic).with_in_channels(1).init(device);
    let rgb = pseudo_random([2, 3, 8, 8], 7, device);
    match model.try_forward(rgb) {
        Err(InputError::Channels {
            expected: 1,
            found: 3,
            shape: [2, 3, 8, 8],
        }) => {}
        other => panic!(
            "expected a channel error, got {:?}",
            other.map(|t| t.dims())
        ),
    }
    let gray = pseudo_random([2, 1, 8, 8], 7, device);
    assert_eq!(
        model.try_forward(gray).expect("one channel").dims(),
        [2, 10]
    );

    let message = model
        .try_forward(pseudo_random([2, 3, 8, 8], 7, device))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("in_channels = 1") && message.contains("3 channels"),
        "{message}"
    );

    assert_eq!(
        tiny(BlockKind::Basic)
            .init(device)
            .with_new_head(0, device)
            .err(),
        Some(ConfigError::NoClasses)
    );
}

#[test]
fn new_head_keeps_the_backbone() {
    let device = Device::flex();
    let model = tiny(BlockKind::Basic).init(&device);
    let input = pseudo_random([2, 3, 8, 8], 8, &device);
    let features = values(model.valid().forward_features(input.clone()));
    let model = model.with_new_head(3, &device).expect("new head");
    assert_eq!(model.config().num_classes, 3);
    assert_eq!(model.forward(input.clone()).dims(), [2, 3]);
    assert_eq!(values(model.valid().forward_features(input)), features);
}

// ---------------------------------------------------------------------------------------------
// The same weights give the same outputs on every backend

fn blocks_of(model: &ResNet) -> usize {
    [&model.layer1, &model.layer2, &model.layer3, &model.layer4]
        .iter()
        .flat_map(|stage| stage.iter())
        .filter(|block| {
            matches!(
                block,
                ResidualBlock::Basic(_) | ResidualBlock::Bottleneck(_)
            )
        })
        .count()
}

#[test]
fn backends_agree_on_the_same_weights() {
    let reference_device = Device::flex();
    let others = crate::support::other_devices();
    let configs = [
        ResNetConfig::resnet18(10).with_stem(Stem::Cifar),
        tiny(BlockKind::Bottleneck)
            .with_stem(Stem::ImageNet)
            .with_groups(4)
            .with_width_per_group(32)
            .with_replace_stride_with_dilation([false, false, true]),
    ];
    for config in configs {
        let model = config.init(&reference_device);
        assert_eq!(blocks_of(&model), config.layers.iter().sum::<usize>());
        let input = pseudo_random([2, 3, 32, 32], 9, &reference_device);
        let expected = values(model.valid().forward(input.clone()));
        for device in &others {
            let moved = config.init(device).load_record(model.clone().into_record());
            let input = Tensor::<4>::from_data(input.to_data(), device);
            let actual = values(moved.valid().forward(input));
            let error = relative_error(&actual, &expected);
            assert!(
                error < 1e-4,
                "{config:?} on {device:?}: relative error {error}"
            );
        }
    }
}
