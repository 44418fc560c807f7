//! What the benchmarks in `benches/` share: the devices they measure.

use burn::tensor::{Device, DeviceKind};
use resnet_burn::Precision;

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

/// The model's precision, `$BENCH_PRECISION` (`f32`, `f16` or `bf16`; f32 when unset), and
/// the suffix of the benchmark ids it measures: none for f32, else `-bf16` and so on, so that
/// criterion keeps each precision's results apart.
///
/// # Panics
/// On a name that is no precision: a bench has no one to return an error to.
pub fn precision() -> (Precision, String) {
    let precision = match std::env::var("BENCH_PRECISION") {
        Ok(name) => name
            .parse()
            .unwrap_or_else(|e| panic!("BENCH_PRECISION: {e}")),
        Err(_) => Precision::F32,
    };
    let suffix = match precision {
        Precision::F32 => String::new(),
        other => format!("-{other}"),
    };
    (precision, suffix)
}
