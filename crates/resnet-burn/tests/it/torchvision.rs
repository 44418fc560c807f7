//! torchvision weights in and out: parity with torchvision's outputs and gradients on
//! every device, the `.pth` reader on bad and hostile files, strictness, round trips.
//!
//! References: `tests/fixtures/make_parity.py` (torch 2.15, torchvision 0.29, seed 2026).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Device, Int, Tensor, TensorData};
use resnet_burn::{BlockKind, ImportError, LoadOptions, ResNet, ResNetConfig, ResidualBlock, Stem};

use crate::support::{fixture, pseudo_random, read_safetensors, relative_error, tempdir, values};

device_tests!(parity_with_torchvision);

/// The two networks of make_parity.py.
fn parity_config(name: &str) -> ResNetConfig {
    match name {
        "basic" => ResNetConfig::new(BlockKind::Basic, [2, 1, 1, 1])
            .with_num_classes(10)
            .with_base_channels(8)
            .with_stem(Stem::Cifar),
        "bottleneck" => ResNetConfig::new(BlockKind::Bottleneck, [1, 2, 1, 1])
            .with_num_classes(10)
            .with_base_channels(8)
            .with_groups(2)
            .with_width_per_group(32)
            .with_replace_stride_with_dilation([false, false, true]),
        _ => unreachable!(),
    }
}

fn parity_with_torchvision(device: &Device) {
    for name in ["basic", "bottleneck"] {
        let io = read_safetensors(&fixture(&format!("parity_{name}_io.safetensors")));
        let (shape, input) = io["input"].clone();
        let shape: [usize; 4] = shape.try_into().unwrap();
        for format in ["pth", "safetensors"] {
            let file = fixture(&format!("parity_{name}.{format}"));
            let what = format!("{name} from .{format}");

            // Evaluation: running statistics.
            let model = parity_config(name)
                .init(device)
                .load_torchvision(&file)
                .expect(&what);
            let x = Tensor::<4>::from_data(TensorData::new(input.clone(), shape), device);
            let eval = values(model.valid().forward(x));
            let error = relative_error(&eval, &io["eval_logits"].1);
            assert!(error < 1e-4, "{what}: eval logits differ by {error}");

            // Training: batch statistics, loss and gradients.
            let autodiff = device.clone().autodiff();
            let model = parity_config(name)
                .init(&autodiff)
                .load_torchvision(&file)
                .expect(&what);
            let x = Tensor::<4>::from_data(TensorData::new(input.clone(), shape), &autodiff);
            let targets: Vec<i64> = io["targets"].1.iter().map(|&t| t as i64).collect();
            let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [2]), &autodiff);
            let logits = model.forward(x);
            let error = relative_error(&values(logits.clone()), &io["train_logits"].1);
            assert!(error < 1e-4, "{what}: train logits differ by {error}");
            let loss = CrossEntropyLossConfig::new()
                .init(&autodiff)
                .forward(logits, targets);
            let error = relative_error(&values(loss.clone()), &io["loss"].1);
            assert!(error < 1e-4, "{what}: loss differs by {error}");

            let grads = loss.backward();
            let first_block = |model: &ResNet| match &model.layer1[0] {
                ResidualBlock::Basic(b) => b.conv1.weight.val(),
                ResidualBlock::Bottleneck(b) => b.conv1.weight.val(),
            };
            let downsample = |model: &ResNet| match &model.layer2[0] {
                ResidualBlock::Basic(b) => b.downsample.as_ref().unwrap().conv.weight.val(),
                ResidualBlock::Bottleneck(b) => b.downsample.as_ref().unwrap().conv.weight.val(),
            };
            let checks: Vec<(&str, Vec<f32>)> = vec![
                (
                    "conv1.weight",
                    values(model.conv1.weight.val().grad(&grads).unwrap()),
                ),
                (
                    "bn1.weight",
                    values(model.bn1.gamma.val().grad(&grads).unwrap()),
                ),
                (
                    "layer1.0.conv1.weight",
                    values(first_block(&model).grad(&grads).unwrap()),
                ),
                (
                    "layer2.0.downsample.0.weight",
                    values(downsample(&model).grad(&grads).unwrap()),
                ),
                // Burn stores the head's weight [in, out]; PyTorch [out, in].
                (
                    "fc.weight",
                    values(model.fc.weight.val().grad(&grads).unwrap().transpose()),
                ),
                (
                    "fc.bias",
                    values(model.fc.bias.as_ref().unwrap().val().grad(&grads).unwrap()),
                ),
            ];
            for (key, grad) in checks {
                let error = relative_error(&grad, &io[&format!("grad.{key}")].1);
                assert!(error < 1e-4, "{what}: gradient of {key} differs by {error}");
            }
        }
    }
}

fn load_error(config: ResNetConfig, path: &Path) -> ImportError {
    match config.init(&Device::flex()).load_torchvision(path) {
        Ok(_) => panic!("{} should not load", path.display()),
        Err(error) => error,
    }
}

#[test]
fn a_training_checkpoint_loads_its_state_dict() {
    let device = Device::flex();
    let nested = parity_config("basic")
        .init(&device)
        .load_torchvision(fixture("checkpoint_basic.pth"));
    let plain = parity_config("basic")
        .init(&device)
        .load_torchvision(fixture("parity_basic.pth"));
    let x = pseudo_random([1, 3, 16, 16], 1, &device);
    assert_eq!(
        values(nested.expect("nested").valid().forward(x.clone())),
        values(plain.expect("plain").valid().forward(x))
    );
}

#[test]
fn truncated_files_are_errors() {
    let dir = tempdir();
    for name in ["parity_basic.pth", "parity_basic.safetensors"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        for keep in [10, bytes.len() / 2, bytes.len() - 1] {
            let path = dir.join(format!("truncated-{keep}-{name}"));
            std::fs::write(&path, &bytes[..keep]).unwrap();
            let error = load_error(parity_config("basic"), &path);
            assert!(
                matches!(
                    error,
                    ImportError::Format { .. } | ImportError::Pickle { .. }
                ),
                "{name} cut at {keep}: {error:?}"
            );
            assert!(
                error.to_string().contains(&path.display().to_string()),
                "{error}"
            );
        }
    }
    let missing = dir.join("no-such-file.pth");
    assert!(matches!(
        load_error(parity_config("basic"), &missing),
        ImportError::Io { .. }
    ));
}

#[test]
fn a_file_without_a_state_dict_is_an_error() {
    let error = load_error(parity_config("basic"), &fixture("not_a_state_dict.pth"));
    assert!(
        matches!(error, ImportError::NotAStateDict { .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("torch.save(model.state_dict()"),
        "{error}"
    );
}

#[test]
fn a_pickle_that_asks_to_run_code_is_refused() {
    let error = load_error(parity_config("basic"), &fixture("unsafe.pth"));
    match &error {
        ImportError::UnsafePickle { global, .. } => assert!(global.ends_with("system"), "{global}"),
        other => panic!("expected UnsafePickle, got {other:?}"),
    }
    assert!(error.to_string().contains("was not run"), "{error}");
}

#[test]
fn the_wrong_architecture_lists_every_offending_key() {
    let error = load_error(
        parity_config("bottleneck"),
        &fixture("parity_basic.safetensors"),
    );
    let ImportError::Mismatch {
        missing,
        unexpected,
        shapes,
        ..
    } = &error
    else {
        panic!("expected Mismatch, got {error:?}")
    };
    assert!(
        missing
            .iter()
            .any(|(key, _)| key == "layer1.0.conv3.weight"),
        "{missing:?}"
    );
    assert!(
        unexpected
            .iter()
            .any(|(key, _)| key == "layer1.1.conv1.weight"),
        "{unexpected:?}"
    );
    assert!(
        shapes.iter().any(|(key, _, _)| key == "conv1.weight"),
        "{shapes:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("missing    layer1.0.conv3.weight"),
        "{message}"
    );
}

/// Rewrites the basic network's safetensors with `edit` applied to its tensors.
fn edited(edit: impl FnOnce(&mut HashMap<String, (Vec<usize>, Vec<f32>)>)) -> PathBuf {
    let mut tensors = read_safetensors(&fixture("parity_basic.safetensors"));
    edit(&mut tensors);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(k, (shape, v))| (k, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(k, shape, b)| {
            (
                k.as_str(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    let path = tempdir().join(format!("edited-{}.safetensors", std::process::id()));
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    path
}

#[test]
fn missing_extra_and_misshaped_keys_are_errors() {
    let path = edited(|t| {
        t.remove("layer2.0.bn1.running_var");
        t.insert("layer9.weight".into(), (vec![2], vec![0.0, 1.0]));
        let (_, values) = t.remove("fc.bias").unwrap();
        t.insert("fc.bias".into(), (vec![2, 5], values));
    });
    let error = load_error(parity_config("basic"), &path);
    let ImportError::Mismatch {
        missing,
        unexpected,
        shapes,
        ..
    } = &error
    else {
        panic!("expected Mismatch, got {error:?}")
    };
    assert_eq!(
        missing,
        &vec![("layer2.0.bn1.running_var".to_string(), vec![16])]
    );
    assert_eq!(unexpected, &vec![("layer9.weight".to_string(), vec![2])]);
    assert_eq!(shapes, &vec![("fc.bias".to_string(), vec![10], vec![2, 5])]);
}

#[test]
fn a_backbone_loads_under_a_new_head() {
    let device = Device::flex();
    let five = parity_config("basic").with_num_classes(5);
    let strict = five
        .init(&device)
        .load_torchvision(fixture("parity_basic.pth"));
    assert!(matches!(strict, Err(ImportError::Mismatch { .. })));

    let backbone = five
        .init(&device)
        .load_torchvision_with(fixture("parity_basic.pth"), &LoadOptions::backbone())
        .expect("backbone");
    let full = parity_config("basic")
        .init(&device)
        .load_torchvision(fixture("parity_basic.pth"))
        .unwrap();
    let x = pseudo_random([2, 3, 16, 16], 2, &device);
    assert_eq!(
        values(backbone.valid().forward_features(x.clone())),
        values(full.valid().forward_features(x.clone()))
    );
    assert_eq!(backbone.forward(x).dims(), [2, 5]);
}

#[test]
fn save_torchvision_round_trips() {
    let device = Device::flex();
    let model = parity_config("bottleneck")
        .init(&device)
        .load_torchvision(fixture("parity_bottleneck.pth"))
        .unwrap();
    let path = tempdir().join(format!("round-trip-{}.safetensors", std::process::id()));
    model.save_torchvision(&path).expect("save");

    // Same keys, shapes and values as torchvision's own file (num_batches_tracked aside).
    let ours = read_safetensors(&path);
    let theirs = read_safetensors(&fixture("parity_bottleneck.safetensors"));
    assert_eq!(ours.len(), theirs.len());
    for (key, (shape, values)) in &theirs {
        let (our_shape, our_values) = &ours[key];
        assert_eq!(our_shape, shape, "{key}");
        if !key.ends_with("num_batches_tracked") {
            assert_eq!(our_values, values, "{key}");
        }
    }
    let reloaded = parity_config("bottleneck")
        .init(&device)
        .load_torchvision(&path)
        .unwrap();
    let x = pseudo_random([2, 3, 32, 32], 3, &device);
    assert_eq!(
        values(reloaded.valid().forward(x.clone())),
        values(model.valid().forward(x))
    );
}

/// A full-size ResNet-18 and ResNet-50 (random weights) saved for torchvision, an input and
/// their outputs, which `tests/fixtures/check_roundtrip.py` loads into torchvision with
/// `strict=True` and compares, where Python has torchvision and safetensors.
#[test]
fn torchvision_loads_the_export_strictly() {
    let has_torchvision = std::process::Command::new("python3")
        .args(["-c", "import torchvision, safetensors"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !has_torchvision {
        eprintln!("skipped: python3 cannot import torchvision and safetensors");
        return;
    }
    let dir = tempdir().join("roundtrip");
    std::fs::create_dir_all(&dir).unwrap();
    let device = Device::flex();
    for (name, config) in [
        ("resnet18", ResNetConfig::resnet18(1000)),
        ("resnet50", ResNetConfig::resnet50(1000)),
    ] {
        let model = config.init(&device).valid();
        model
            .save_torchvision(dir.join(format!("{name}.safetensors")))
            .unwrap();
        let x = pseudo_random([2, 3, 64, 64], 4, &device);
        let y = values(model.forward(x.clone()));
        let io: Vec<(&str, Vec<usize>, Vec<u8>)> = vec![
            (
                "input",
                vec![2, 3, 64, 64],
                values(x).iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                "output",
                vec![2, 1000],
                y.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        ];
        let views: Vec<_> = io
            .iter()
            .map(|(k, s, b)| {
                (
                    *k,
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .unwrap(),
                )
            })
            .collect();
        std::fs::write(
            dir.join(format!("{name}_io.safetensors")),
            safetensors::serialize(views, None).unwrap(),
        )
        .unwrap();
    }
    let check = std::process::Command::new("python3")
        .arg(fixture("check_roundtrip.py"))
        .arg(&dir)
        .output()
        .expect("python3 runs");
    let printed = String::from_utf8_lossy(&check.stdout);
    println!("{printed}{}", String::from_utf8_lossy(&check.stderr));
    assert!(
        check.status.success(),
        "check_roundtrip.py failed: {printed}"
    );
}

/// Full-size `.pth` files written by current torch (`tests/fixtures/make_full_size.py`)
/// load and give torchvision's outputs.
/// Set `TORCHVISION_PTH_DIR` to the folder the script wrote (145 MB) to run it.
#[test]
fn full_size_pth_files_match_torchvision() {
    let Some(dir) = std::env::var_os("TORCHVISION_PTH_DIR").map(PathBuf::from) else {
        eprintln!(
            "skipped: TORCHVISION_PTH_DIR is not set (tests/fixtures/make_full_size.py writes it)"
        );
        return;
    };
    let device = Device::flex();
    for (name, config) in [
        ("resnet18", ResNetConfig::resnet18(1000)),
        ("resnet50", ResNetConfig::resnet50(1000)),
    ] {
        let model = config
            .init(&device)
            .load_torchvision(dir.join(format!("{name}.pth")))
            .expect(name);
        let io = read_safetensors(&dir.join(format!("{name}_io.safetensors")));
        let (shape, input) = io["input"].clone();
        let shape: [usize; 4] = shape.try_into().unwrap();
        let x = Tensor::<4>::from_data(TensorData::new(input, shape), &device);
        let error = relative_error(&values(model.valid().forward(x)), &io["output"].1);
        println!("{name}: max |burn - torch| / max |torch| = {error:.2e}");
        assert!(error < 1e-4, "{name}: {error}");
    }
}

#[cfg(feature = "pretrained")]
#[derive(serde::Deserialize)]
struct PublishedWeights {
    name: String,
    url: String,
    num_params: usize,
    top1: f64,
    resize: usize,
    default: bool,
}

#[cfg(feature = "pretrained")]
#[test]
fn pretrained_weights_are_torchvisions() {
    use resnet_burn::pretrained::Pretrained;
    let path = fixture("torchvision_architectures.json");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let published: Vec<PublishedWeights> =
        serde_json::from_value(reference["pretrained"].clone()).unwrap();
    assert_eq!(published.len(), Pretrained::ALL.len());
    for (weights, torchvision) in Pretrained::ALL.iter().zip(&published) {
        assert_eq!(weights.name(), torchvision.name);
        assert_eq!(weights.url(), torchvision.url);
        assert_eq!(
            weights.resize_size(),
            torchvision.resize,
            "{}",
            torchvision.name
        );
        assert_eq!(weights.top1(), torchvision.top1, "{}", torchvision.name);
        let model = weights.config().init(&Device::flex());
        assert_eq!(
            model.trainable_params(),
            torchvision.num_params,
            "{}",
            torchvision.name
        );
        assert_eq!(Pretrained::from_name(&torchvision.name), Some(*weights));
        assert_eq!(Pretrained::from_name(weights.file_name()), Some(*weights));
        if torchvision.default {
            assert_eq!(
                Pretrained::from_name(weights.preset()),
                Some(*weights),
                "DEFAULT of {}",
                weights.preset()
            );
        }
    }
    assert_eq!(Pretrained::ResNet18ImageNet1kV1.hash_prefix(), "f37072fd");
}

#[cfg(feature = "pretrained")]
#[test]
fn pretrained_offline_says_where_to_put_the_file() {
    use resnet_burn::pretrained::Pretrained;
    let dir = tempdir().join("pretrained-cache");
    let weights = Pretrained::ResNet18ImageNet1kV1;
    let error = weights
        .fetch_from("http://127.0.0.1:9/resnet18-f37072fd.pth", &dir)
        .unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, ImportError::Download { .. }), "{error:?}");
    assert!(
        message.contains(&dir.join("resnet18-f37072fd.pth").display().to_string()),
        "{message}"
    );
    assert!(!dir.join("resnet18-f37072fd.pth").exists());

    // A file that is there but is not the published one is refused.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        fixture("parity_basic.pth"),
        dir.join("resnet18-f37072fd.pth"),
    )
    .unwrap();
    let error = weights
        .fetch_from("http://127.0.0.1:9/unused", &dir)
        .unwrap_err();
    assert!(error.to_string().contains("SHA-256"), "{error}");
}
