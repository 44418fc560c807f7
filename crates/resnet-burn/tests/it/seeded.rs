//! `ResNetConfig::try_init_seeded`: the same weights from a seed on every device, every random
//! parameter redrawn, torchvision's distributions.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Distribution, Tensor};
use resnet_burn::{ResNet, ResNetConfig, Stem};

use crate::support::{flex, other_devices};

/// Every parameter, flattened, in visiting order, with its shape.
fn parameters(model: &ResNet) -> Vec<(Vec<usize>, Vec<f32>)> {
    struct Collect(Vec<(Vec<usize>, Vec<f32>)>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let tensor = param.val();
            let data = tensor.clone().into_data().convert::<f32>();
            let values = data.try_to_vec::<f32>().expect("f32");
            self.0.push((tensor.dims().to_vec(), values));
        }
    }
    let mut collect = Collect(Vec::new());
    model.visit(&mut collect);
    collect.0
}

fn config() -> ResNetConfig {
    ResNetConfig::resnet18(10)
        .with_stem(Stem::Cifar)
        .with_base_channels(8)
}

/// One seed, the same weights on every backend, also while other threads draw from Burn's
/// generator.
#[test]
fn a_seed_gives_the_same_weights_everywhere() {
    let expected = parameters(&config().try_init_seeded(&flex(), 11).unwrap());
    let noise = std::thread::spawn(|| {
        for _ in 0..50 {
            let _ = Tensor::<1>::random([1000], Distribution::Default, &flex());
        }
    });
    for device in [vec![flex()], other_devices()].concat() {
        for device in [device.clone(), device.autodiff()] {
            let got = parameters(&config().try_init_seeded(&device, 11).unwrap());
            assert_eq!(got, expected, "{device:?}");
        }
    }
    noise.join().unwrap();
}

/// Another seed redraws every convolution and linear parameter and keeps BatchNorm's
/// constants: a Burn release that renamed or reordered what a module visits fails here.
#[test]
fn a_seed_redraws_every_random_parameter() {
    let a = parameters(&config().try_init_seeded(&flex(), 11).unwrap());
    let b = parameters(&config().try_init_seeded(&flex(), 12).unwrap());
    let (mut redrawn, mut constant) = (0, 0);
    for ((shape, a), (_, b)) in a.iter().zip(&b) {
        // The head's bias is the only 1-d parameter of 10 values (BatchNorm's have 8 to 64).
        let head_bias = shape.as_slice() == [10];
        if shape.len() > 1 || head_bias {
            assert_ne!(a, b, "a parameter of shape {shape:?} was not redrawn");
            redrawn += 1;
        } else {
            assert_eq!(a, b, "BatchNorm's {shape:?} changed with the seed");
            assert!(a.iter().all(|&v| v == 1.0) || a.iter().all(|&v| v == 0.0));
            constant += 1;
        }
    }
    // ResNet-18: 20 convolutions (17 + 3 shortcuts), the head's weight and bias; 20
    // BatchNorms of 4 tensors each (weight, bias, running mean and variance).
    assert_eq!((redrawn, constant), (22, 80));

    // conv1: 8 x 3 x 3 x 3, N(0, sqrt(2 / (8 * 9))); fc: 64 -> 10, U(-1/8, 1/8).
    let conv = &a[0].1;
    let std = (conv.iter().map(|v| v * v).sum::<f32>() / conv.len() as f32).sqrt();
    let expected_std = (2.0f32 / 72.0).sqrt();
    assert!((std - expected_std).abs() < 0.05, "conv1 std {std}");
    let (fc_weight, fc_bias) = (&a[a.len() - 2].1, &a[a.len() - 1].1);
    assert_eq!((fc_weight.len(), fc_bias.len()), (640, 10));
    for v in fc_weight.iter().chain(fc_bias) {
        assert!(v.abs() <= 0.125, "{v}");
    }
    assert!(fc_weight.iter().any(|v| v.abs() > 0.1));
}
