//! `Precision`: a value of each network, saved with its config, that changes what a GPU
//! computes and nothing on the CPU backends.

use burn::module::Module;
use burn::tensor::Device;
use resnet_burn::{BlockKind, Precision, ResNetConfig, Stem};

use crate::support::{pseudo_random, relative_error, values};

/// The largest difference, relative to the largest magnitude of `expected`.
fn relative_difference(got: &[f32], expected: &[f32]) -> f32 {
    relative_error(got, expected)
}

device_tests!(two_precisions_live_side_by_side);

fn narrow() -> ResNetConfig {
    ResNetConfig::new(BlockKind::Basic, [1, 1, 1, 1])
        .with_num_classes(10)
        .with_base_channels(16)
        .with_stem(Stem::Cifar)
}

/// Two networks with the same weights, one in f32 and one in mixed f16, in one process: the
/// f32 one computes as before the other existed; the f16 one, where f16 applies to the device,
/// within f16's rounding of it (values and gradients), and exactly as f32 where it does not.
fn two_precisions_live_side_by_side(device: &Device) {
    let f32_model = narrow().init(device);
    let input = pseudo_random([4, 3, 16, 16], 5, device);
    let before = values(f32_model.valid().forward(input.clone()));
    let f16_model = f32_model.clone().with_precision(Precision::F16);
    assert_eq!(f16_model.precision(), Precision::F16);
    assert_eq!(f16_model.config().precision, Precision::F16);
    assert_eq!(f32_model.precision(), Precision::F32);

    let mixed = values(f16_model.valid().forward(input.clone()));
    let after = values(f32_model.valid().forward(input.clone()));
    assert_eq!(
        after, before,
        "the f32 network changed with the other's precision"
    );
    let error = relative_error(&mixed, &before);
    if Precision::F16.applies_to(device) {
        assert!(error > 0.0, "f16 computed exactly as f32: it did not apply");
        assert!(error < 2e-2, "outputs in f16 {error} from f32");
    } else {
        assert_eq!(mixed, before, "f16 changed a device it does not apply to");
    }

    // The gradients of the first convolution's weight, in training, with the loss scaled by
    // 1024 as loss scaling does.
    let autodiff = device.clone().autodiff();
    let gradient = |precision: Precision| {
        let model = narrow()
            .init(&autodiff)
            .load_record(f32_model.clone().into_record())
            .with_precision(precision);
        let x = pseudo_random([4, 3, 16, 16], 6, &autodiff);
        let grads = model.forward(x).sum().mul_scalar(1024.0).backward();
        let grad = model.conv1.weight.grad(&grads).expect("conv1's gradient");
        values(grad.div_scalar(1024.0))
    };
    let (exact, reduced) = (gradient(Precision::F32), gradient(Precision::F16));
    let error = relative_difference(&reduced, &exact);
    let dot: f32 = exact.iter().zip(&reduced).map(|(a, b)| a * b).sum();
    let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
    let cosine = dot / (norm(&exact) * norm(&reduced));
    println!("{device:?}: conv1's gradient in f16 {error} from f32, cosine {cosine}");
    if Precision::F16.applies_to(device) {
        // Lavapipe's f16 convolutions accumulate in f16 (GPUs' tensor cores in f32): over the
        // 1,024 products a value of this gradient sums, it read 0.19 from f32, cosine 0.969.
        assert!(
            error < 0.3 && cosine > 0.95,
            "conv1's gradient in f16: {error}, {cosine}"
        );
    } else {
        assert!(error <= 1e-6, "conv1's gradient: {error} from f32");
    }
}

#[test]
fn precision_is_saved_with_the_config() {
    let config = narrow().with_precision(Precision::F16);
    let json = serde_json::to_string(&config).unwrap();
    assert!(json.contains(r#""precision":"f16""#), "{json}");
    let back: ResNetConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, config);
    assert_eq!(ResNetConfig::resnet18(10).precision, Precision::F32);
    let model = config.init(&Device::flex());
    assert_eq!(model.precision(), Precision::F16);
}

#[test]
fn precision_names_parse_and_print() {
    for precision in [Precision::F32, Precision::F16, Precision::Bf16] {
        assert_eq!(precision.to_string().parse::<Precision>(), Ok(precision));
    }
    let error = "bf17".parse::<Precision>().unwrap_err().to_string();
    assert!(error.contains("bf17") && error.contains("bf16"), "{error}");
    assert!(!Precision::F16.applies_to(&Device::flex()));
    // bf16 products on the CPU backends exactly where the CPU has AVX512-BF16.
    assert_eq!(
        Precision::Bf16.applies_to(&Device::flex()),
        burn_cpu_kernels::bf16_supported()
    );
}

/// A network in mixed bf16 on flex: outputs and gradients within bf16's rounding of the same
/// network in f32 (where the CPU has AVX512-BF16; equal otherwise), the parameters f32.
#[test]
fn bf16_on_the_cpu_is_within_bf16_rounding_of_f32() {
    let device = Device::flex().autodiff();
    let f32_model = narrow().init(&device);
    let bf16_model = f32_model.clone().with_precision(Precision::Bf16);
    let input = pseudo_random([4, 3, 16, 16], 7, &device);
    let run = |model: &resnet_burn::ResNet| {
        let out = model.forward(input.clone());
        let grads = out.clone().sum().backward();
        let weight = &model.conv1.weight;
        (
            values(out),
            values(weight.grad(&grads).expect("the stem's gradient")),
        )
    };
    let (exact, exact_grad) = run(&f32_model);
    let (reduced, reduced_grad) = run(&bf16_model);
    let (output, gradient) = (
        relative_difference(&reduced, &exact),
        relative_difference(&reduced_grad, &exact_grad),
    );
    let dot: f32 = exact_grad
        .iter()
        .zip(&reduced_grad)
        .map(|(a, b)| a * b)
        .sum();
    let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
    let cosine = dot / (norm(&exact_grad) * norm(&reduced_grad));
    println!("bf16 on flex: output {output} from f32, stem gradient {gradient}, cosine {cosine}");
    if burn_cpu_kernels::bf16_supported() {
        // The stem's gradient sums bf16 rounding through every layer's backward, of a sum
        // that cancels: 0.26 and 0.29 of its largest value from f32 in two runs (AMD EPYC, Zen 4),
        // its direction within the cosine below (0.973).
        assert!(output > 0.0 && output < 3e-2, "output {output}");
        assert!(
            gradient < 0.5 && cosine > 0.95,
            "stem gradient {gradient}, {cosine}"
        );
    } else {
        assert_eq!((output, gradient), (0.0, 0.0));
    }
    assert_eq!(
        bf16_model.conv1.weight.val().dtype(),
        burn::tensor::DType::F32
    );
}
