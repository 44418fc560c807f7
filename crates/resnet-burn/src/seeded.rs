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

/// Replaces each random parameter with one drawn from `rng`: a convolution's weight (the only
/// 4-d parameter) from torchvision's `kaiming_normal_(mode="fan_out", nonlinearity="relu")`, a
/// linear layer's weight (the only 2-d one) and its bias (the 1-d `bias` visited right after
/// it) from PyTorch's default `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`. BatchNorm's parameters
/// (`gamma`, `beta`) are constants and stay.
///
/// Parameters are told apart by their rank and field name, the names of Burn's `Conv2d`,
/// `Linear` and `BatchNorm` fields (public API), not by the container names burn-derive
/// generates; the test `a_seed_redraws_every_random_parameter` fails if a Burn release
/// changes what is visited.
struct SeededInit {
    rng: StdRng,
    /// The fields entered, innermost last.
    fields: Vec<String>,
    /// The input size of the linear layer whose weight was drawn last (its bias comes next).
    linear_fan_in: Option<usize>,
}

impl ModuleMapper for SeededInit {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.fields.push(name.to_owned());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.fields.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let field = self.fields.last().map_or("", String::as_str);
        let dims: [usize; D] = param.lazy_shape().dims();
        let distribution = match (field, dims.as_slice()) {
            ("weight", &[out_channels, _, kh, kw]) => {
                self.linear_fan_in = None;
                let fan_out = out_channels * kh * kw;
                Distribution::Normal(0.0, (2.0 / fan_out as f64).sqrt())
            }
            ("weight", &[fan_in, _]) => {
                self.linear_fan_in = Some(fan_in);
                uniform_for(fan_in)
            }
            ("bias", &[_]) => match self.linear_fan_in.take() {
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
