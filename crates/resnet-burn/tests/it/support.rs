//! What the tests share: the devices a check runs on, the macro that writes a test per
//! device, deterministic inputs and comparisons, fixtures. The workspace's integration tests
//! include this file by path.
//!
//! - `flex`: always; `ndarray` and `wgpu` with resnet-burn's features of those names (the
//!   workspace's tests turn both on).
//! - `wgpu`: the default adapter (`CUBECL_WGPU_DEFAULT_DEVICE=Cpu` selects Mesa's lavapipe on
//!   a machine without a GPU, as CI does). Where no adapter exists its checks print that they
//!   were skipped; with `RESNET_BURN_REQUIRE_WGPU=1` (set in CI) they fail instead.
//! - `cuda`: with the root package's `cuda` feature.

#![allow(dead_code)] // Each test binary uses its own part.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::tensor::{Device, Tensor, TensorData};

pub fn flex() -> Device {
    Device::flex()
}

#[cfg(feature = "ndarray")]
#[allow(deprecated)] // burn-ndarray is deprecated in Burn 0.22; our users still ask for it.
pub fn ndarray() -> Device {
    Device::ndarray()
}

#[cfg(feature = "wgpu")]
pub fn wgpu() -> Device {
    Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)
}

/// The devices compiled in besides flex that can run here (see [`runs_here`]).
pub fn other_devices() -> Vec<Device> {
    #[allow(unused_mut)] // with no other backend compiled in
    let mut devices = Vec::new();
    #[cfg(feature = "ndarray")]
    devices.push(ndarray());
    #[cfg(feature = "wgpu")]
    if runs_here("wgpu") {
        devices.push(wgpu());
    }
    #[cfg(feature = "cuda")]
    devices.push(cuda());
    devices
}

#[cfg(feature = "cuda")]
pub fn cuda() -> Device {
    Device::cuda(0)
}

/// Whether a check on `backend` can run here: every backend but wgpu always; wgpu where it
/// finds an adapter. A missing adapter prints a skip line, or panics under
/// `RESNET_BURN_REQUIRE_WGPU=1`.
pub fn runs_here(backend: &str) -> bool {
    static WGPU: OnceLock<bool> = OnceLock::new();
    if backend != "wgpu" {
        return true;
    }
    let found = *WGPU.get_or_init(|| {
        // Burn panics when it finds no adapter; the first operation tells.
        #[cfg(feature = "wgpu")]
        return std::panic::catch_unwind(|| Tensor::<1>::zeros([1], &wgpu()).into_data()).is_ok();
        #[cfg(not(feature = "wgpu"))]
        false
    });
    if !found {
        let required = std::env::var_os("RESNET_BURN_REQUIRE_WGPU").is_some_and(|v| v == "1");
        assert!(
            !required,
            "wgpu found no adapter and RESNET_BURN_REQUIRE_WGPU=1: install a Vulkan driver \
             (Mesa's lavapipe: apt-get install mesa-vulkan-drivers libvulkan1)"
        );
        eprintln!("skipped: wgpu found no adapter (install a Vulkan driver to run this check)");
    }
    found
}

/// `device_tests!(check_a, check_b)` writes `flex::check_a`, `ndarray::check_a`,
/// `wgpu::check_a`, ... as `#[test]`s calling `check_a(&device)`, for the backends compiled in.
macro_rules! device_tests {
    ($($name:ident),* $(,)?) => {
        device_tests!(@backend flex, $($name),*);
        #[cfg(feature = "ndarray")]
        device_tests!(@backend ndarray, $($name),*);
        #[cfg(feature = "wgpu")]
        device_tests!(@backend wgpu, $($name),*);
        #[cfg(feature = "cuda")]
        device_tests!(@backend cuda, $($name),*);
    };
    (@backend $backend:ident, $($name:ident),*) => {
        mod $backend {
            $(
                #[test]
                fn $name() {
                    if crate::support::runs_here(stringify!($backend)) {
                        super::$name(&crate::support::$backend());
                    }
                }
            )*
        }
    };
}

/// Deterministic values in [-1, 1), the same on every device.
pub fn pseudo_random(shape: [usize; 4], seed: u64, device: &Device) -> Tensor<4> {
    let count = shape.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let values: Vec<f32> = (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

pub fn values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("f32 data")
}

/// Largest absolute difference, relative to the largest absolute value of `expected`.
pub fn relative_error(actual: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(actual.len(), expected.len(), "lengths differ");
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let diff = actual
        .iter()
        .zip(expected)
        .fold(0f32, |m, (a, e)| m.max((a - e).abs()));
    diff / scale
}

pub fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "resnet-burn-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Tensors of a safetensors file: name -> (shape, f32 values).
pub fn read_safetensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).expect("fixture");
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = match view.dtype() {
                safetensors::Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::I64 => view
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
                    .collect(),
                other => panic!("{other:?}"),
            };
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}
