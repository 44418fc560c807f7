//! What the unit tests share: the devices they run on and how they compare tensors.

use burn::tensor::{Device, Tensor};

/// Every backend compiled in, and whether it is a GPU backend (wgpu on the default adapter:
/// lavapipe, on the CPU, in CI).
#[allow(deprecated)] // Burn 0.22 deprecates ndarray; this crate still supports it.
pub(crate) fn devices() -> Vec<(Device, bool)> {
    Vec::from([
        #[cfg(feature = "flex")]
        (Device::flex(), false),
        #[cfg(feature = "ndarray")]
        (Device::ndarray(), false),
        #[cfg(feature = "wgpu")]
        (Device::wgpu(burn::tensor::DeviceKind::DefaultDevice), true),
    ])
}

/// The CPU backends compiled in: the host kernels run on each.
#[cfg(any(feature = "flex", feature = "ndarray"))]
pub(crate) fn host_devices() -> Vec<Device> {
    devices()
        .into_iter()
        .filter_map(|(device, gpu)| (!gpu).then_some(device))
        .collect()
}

/// The largest difference between two tensors, relative to the largest magnitude of the
/// second.
pub(crate) fn relative_difference<const D: usize>(got: Tensor<D>, expected: Tensor<D>) -> f32 {
    let scale: f32 = expected.clone().abs().max().into_scalar();
    let difference: f32 = (got - expected).abs().max().into_scalar();
    difference / scale.max(f32::MIN_POSITIVE)
}
