//! What the unit tests share: the devices they run on and how they compare values.

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// The accelerated devices compiled in.
#[allow(deprecated)] // Burn 0.22 deprecates ndarray; this crate still supports it.
pub(crate) fn host_devices() -> Vec<Device> {
    Vec::from([
        #[cfg(feature = "flex")]
        Device::flex(),
        #[cfg(feature = "ndarray")]
        Device::ndarray(),
    ])
}

/// `len` values spread over [-5, 5.4] in a fixed order that `seed` shifts: operands of the
/// matrix-product tests.
pub(crate) fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919 + seed * 104_729) % 1009) as f32 / 97.0 - 5.0)
        .collect()
}

/// The largest difference between two tensors, relative to the largest magnitude of the
/// second.
pub(crate) fn relative_difference<const D: usize>(got: Tensor<D>, expected: Tensor<D>) -> f32 {
    let scale: f32 = expected.clone().abs().max().into_scalar();
    let difference: f32 = (got - expected).abs().max().into_scalar();
    difference / scale.max(f32::MIN_POSITIVE)
}

/// Standard normal values drawn on the host from `seed`: the same tensor on every device and
/// in every run, whatever else draws from Burn's process-wide generator.
pub(crate) fn seeded_normal<const D: usize>(
    dims: [usize; D],
    seed: u64,
    device: &Device,
) -> Tensor<D> {
    let mut rng = StdRng::seed_from_u64(seed);
    let data = TensorData::random::<f32, _, _>(dims, Distribution::Normal(0.0, 1.0), &mut rng);
    Tensor::from_data(data, device)
}

/// Values in [-1, 1) drawn from `seed`.
pub(crate) fn seeded_values(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Asserts that each value of `got` is within 1e-5 of `want`'s largest magnitude (or of 1)
/// of the value of `want` at the same place.
pub(crate) fn assert_values_close(what: &str, got: &[f32], want: &[f32]) {
    assert_values_within(what, got, want, 1e-5);
}

/// Asserts that each value of `got` is within `tolerance` times `want`'s largest magnitude
/// (or 1) of the value of `want` at the same place.
pub(crate) fn assert_values_within(what: &str, got: &[f32], want: &[f32], tolerance: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tolerance * scale,
            "{what}[{i}]: {g} against {w}, more than {tolerance} x {scale} apart"
        );
    }
}
