//! The devices every backend-dependent check runs on, and the macro that instantiates them.
//!
//! - `flex` and `ndarray`: always.
//! - `wgpu`: the default adapter (`CUBECL_WGPU_DEFAULT_DEVICE=Cpu` selects Mesa's lavapipe
//!   on a machine without a GPU, as CI does).
//! - `cuda`: with the root package's `cuda` feature.

use burn::tensor::Device;

pub fn flex() -> Device {
    Device::flex()
}

#[allow(deprecated)] // burn-ndarray is deprecated in Burn 0.22; our users still ask for it.
pub fn ndarray() -> Device {
    Device::ndarray()
}

pub fn wgpu() -> Device {
    Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)
}

#[cfg(feature = "cuda")]
pub fn cuda() -> Device {
    Device::cuda(0)
}

/// `device_tests!(check_a, check_b)` writes `flex::check_a`, `ndarray::check_a`,
/// `wgpu::check_a`, ... as `#[test]`s calling `check_a(&device)`.
macro_rules! device_tests {
    ($($name:ident),* $(,)?) => {
        device_tests!(@backend flex, $($name),*);
        device_tests!(@backend ndarray, $($name),*);
        device_tests!(@backend wgpu, $($name),*);
        #[cfg(feature = "cuda")]
        device_tests!(@backend cuda, $($name),*);
    };
    (@backend $backend:ident, $($name:ident),*) => {
        mod $backend {
            $(
                #[test]
                fn $name() {
                    super::$name(&crate::devices::$backend());
                }
            )*
        }
    };
}
