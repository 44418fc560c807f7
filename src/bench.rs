//! What the benchmarks in `benches/` share: the devices they measure.

use burn::tensor::{Device, DeviceKind};

/// Every backend compiled in, by name (`flex`, `ndarray`, `wgpu`, and `cuda` with its
/// feature), less those missing from `$BENCH_BACKENDS` (a comma-separated list) when it is
/// set.
pub fn backends() -> Vec<(&'static str, Device)> {
    #[allow(deprecated)] // burn-ndarray is deprecated in Burn 0.22; measured all the same
    let mut devices = vec![
        ("flex", Device::flex()),
        ("ndarray", Device::ndarray()),
        ("wgpu", Device::wgpu(DeviceKind::DefaultDevice)),
    ];
    #[cfg(feature = "cuda")]
    devices.push(("cuda", Device::cuda(0)));
    devices.retain(|(name, _)| {
        std::env::var("BENCH_BACKENDS").map_or(true, |list| list.split(',').any(|b| b == *name))
    });
    devices
}
