//! Initialization from a seed of one's own: [`ResNetConfig::try_init_seeded`].
//!
//! Burn draws random tensors from one generator per backend, shared by the whole process:
//! `device.seed(s)` followed by `config.init(&device)` gives the same weights only if no other
//! thread draws in between, and different weights on different backends. Here every random
//! parameter is drawn on the host from a generator of its own, in the module's visiting order,
//! then placed on the device, with the distributions of [`ResNetConfig::init`] (torchvision's).

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::{ConfigError, ResNet, ResNetConfig};

impl ResNetConfig {
    /// Builds the network as [`init`](Self::init) does, with its random parameters drawn on
    /// the host from a generator seeded with `seed`: the same initial weights on every backend
    /// and device, whatever else draws from Burn's process-wide generator meanwhile (another
    /// thread, another model).
    ///
    /// ```
    /// use burn::tensor::Device;
    /// use resnet_burn::{ResNetConfig, Stem};
    ///
    /// let config = ResNetConfig::resnet18(10).with_stem(Stem::Cifar).with_base_channels(8);
    /// let a = config.try_init_seeded(&Device::flex(), 7)?;
    /// let b = config.try_init_seeded(&Device::flex(), 7)?;
    /// assert_eq!(a.conv1.weight.val().into_data(), b.conv1.weight.val().into_data());
    /// # Ok::<(), resnet_burn::ConfigError>(())
    /// ```
    pub fn try_init_seeded(&self, device: &Device, seed: u64) -> Result<ResNet, ConfigError> {
        let model = self.try_init(device)?;
        Ok(model.map(&mut SeededInit {
            rng: StdRng::seed_from_u64(seed),
            fields: Vec::new(),
            linear_fan_in: None,
        }))
    }
}

/// Replaces each random parameter with one drawn from `rng`, by the module it belongs to:
/// a convolution's weight from torchvision's `kaiming_normal_(mode="fan_out",
/// nonlinearity="relu")`, a linear layer's weight and bias from PyTorch's default
/// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`. BatchNorm's parameters are constants and stay.
struct SeededInit {
    rng: StdRng,
    /// The fields entered, with the type of the module that holds each.
    fields: Vec<(String, String)>,
    /// The input size of the linear layer whose weight was drawn last (its bias comes next).
    linear_fan_in: Option<usize>,
}

impl ModuleMapper for SeededInit {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.fields
            .push((name.to_owned(), container_type.to_owned()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.fields.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some((field, container)) = self.fields.last() else {
            return param;
        };
        let dims: [usize; D] = param.lazy_shape().dims();
        let distribution = match (container.as_str(), field.as_str(), dims.as_slice()) {
            ("Struct:Conv2d", "weight", &[out_channels, _, kh, kw]) => {
                let fan_out = out_channels * kh * kw;
                Distribution::Normal(0.0, (2.0 / fan_out as f64).sqrt())
            }
            ("Struct:Linear", "weight", &[fan_in, _]) => {
                self.linear_fan_in = Some(fan_in);
                uniform_for(fan_in)
            }
            ("Struct:Linear", "bias", _) => match self.linear_fan_in {
                Some(fan_in) => uniform_for(fan_in),
                None => return param,
            },
            _ => return param,
        };
        let data = TensorData::random::<f32, _, _>(dims, distribution, &mut self.rng);
        let tensor = Tensor::from_data(data, &param.lazy_device());
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

/// PyTorch's default for a linear layer: `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
fn uniform_for(fan_in: usize) -> Distribution {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Distribution::Uniform(-bound, bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Stem;
    use crate::testing::devices;
    use burn::module::ModuleVisitor;

    /// Every parameter, flattened, in visiting order.
    fn values(model: &ResNet) -> Vec<Vec<f32>> {
        struct Collect(Vec<Vec<f32>>);
        impl ModuleVisitor for Collect {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let data = param.val().into_data().convert::<f32>();
                self.0.push(data.try_to_vec::<f32>().expect("f32"));
            }
        }
        let mut collect = Collect(Vec::new());
        model.visit(&mut collect);
        collect.0
    }

    /// One seed, the same weights on every backend, also while other threads draw from
    /// Burn's generator; another seed, other weights; the distributions are torchvision's.
    #[test]
    fn a_seed_gives_the_same_weights_everywhere() {
        let config = ResNetConfig::resnet18(10)
            .with_stem(Stem::Cifar)
            .with_base_channels(8);
        let (flex, _) = devices().remove(0);
        let expected = values(&config.try_init_seeded(&flex, 11).unwrap());
        let noise = std::thread::spawn(move || {
            for _ in 0..50 {
                let _ = Tensor::<1>::random([1000], Distribution::Default, &flex);
            }
        });
        for (device, _) in devices() {
            for device in [device.clone(), device.autodiff()] {
                let got = values(&config.try_init_seeded(&device, 11).unwrap());
                assert_eq!(got, expected, "{device:?}");
            }
        }
        noise.join().unwrap();
        let (flex, _) = devices().remove(0);
        let other = values(&config.try_init_seeded(&flex, 12).unwrap());
        assert_ne!(other[0], expected[0]);

        // conv1: 8 x 3 x 3 x 3, N(0, sqrt(2 / (8 * 9))); fc: 64 -> 10, U(-1/8, 1/8).
        let conv = &expected[0];
        let std = (conv.iter().map(|v| v * v).sum::<f32>() / conv.len() as f32).sqrt();
        assert!(
            (std - (2.0f32 / 72.0).sqrt()).abs() < 0.05,
            "conv1 std {std}"
        );
        let (fc_weight, fc_bias) = (&expected[expected.len() - 2], &expected[expected.len() - 1]);
        assert_eq!((fc_weight.len(), fc_bias.len()), (640, 10));
        for v in fc_weight.iter().chain(fc_bias) {
            assert!(v.abs() <= 0.125, "{v}");
        }
        assert!(fc_weight.iter().any(|v| v.abs() > 0.1));
        // BatchNorm's weights and biases keep their constants.
        assert!(expected[1].iter().all(|&v| v == 1.0) && expected[2].iter().all(|&v| v == 0.0));
    }
}
