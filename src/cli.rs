//! What the examples share on their command lines: the device a `--backend` names, and a
//! Ctrl-C that stops a run after its step with a checkpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use burn::tensor::{Device, DeviceKind};
use resnet_burn::ResNetConfig;
use resnet_burn::pretrained::Pretrained;

/// One device of `--backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A GPU through wgpu when there is one (discrete, then integrated), else flex.
    Auto,
    /// wgpu on its default adapter, or on discrete GPU `n` (`wgpu:n`).
    Wgpu(Option<usize>),
    /// CUDA device `n` (`cuda`, `cuda:n`; needs the `cuda` feature).
    Cuda(usize),
    /// wgpu pinned to Vulkan, default adapter or discrete GPU `n` (needs `vulkan`).
    Vulkan(Option<usize>),
    /// Burn's pure-Rust CPU backend.
    Flex,
    /// The ndarray CPU backend (deprecated in Burn 0.22, still supported).
    Ndarray,
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (name, index) = match text.split_once(':') {
            Some((name, index)) => {
                let index = index
                    .parse::<usize>()
                    .map_err(|_| format!("{text:?}: the part after ':' must be a device number"))?;
                (name, Some(index))
            }
            None => (text, None),
        };
        Ok(match (name, index) {
            ("auto", None) => Backend::Auto,
            ("wgpu", index) => Backend::Wgpu(index),
            ("cuda", index) => Backend::Cuda(index.unwrap_or(0)),
            ("vulkan", index) => Backend::Vulkan(index),
            ("flex", None) => Backend::Flex,
            ("ndarray", None) => Backend::Ndarray,
            _ => {
                return Err(format!(
                    "unknown device {text:?}; use auto, wgpu[:N], cuda[:N], vulkan[:N], flex or \
                     ndarray"
                ));
            }
        })
    }
}

/// The device of `backend`; [`Backend::Auto`] probes for a GPU.
pub fn pick_device(backend: Backend) -> Result<Device> {
    Ok(match backend {
        Backend::Flex => Device::flex(),
        #[allow(deprecated)] // still supported here, see the README
        Backend::Ndarray => Device::ndarray(),
        Backend::Wgpu(index) => Device::wgpu(wgpu_kind(index)),
        Backend::Vulkan(index) => vulkan(wgpu_kind(index))?,
        Backend::Cuda(index) => cuda(index)?,
        Backend::Auto => [DeviceKind::DiscreteGpu(0), DeviceKind::IntegratedGpu(0)]
            .into_iter()
            .find_map(probe_wgpu)
            .unwrap_or_else(Device::flex),
    })
}

fn wgpu_kind(index: Option<usize>) -> DeviceKind {
    index.map_or(DeviceKind::DefaultDevice, DeviceKind::DiscreteGpu)
}

/// A wgpu device of `kind` if one exists: creating a tensor on a missing adapter panics in
/// Burn, so the probe runs under `catch_unwind` with the panic message silenced.
fn probe_wgpu(kind: DeviceKind) -> Option<Device> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let device = Device::wgpu(kind);
    let probe = device.clone();
    let works = std::panic::catch_unwind(move || {
        burn::tensor::Tensor::<1>::ones([1], &probe).into_data();
    })
    .is_ok();
    std::panic::set_hook(hook);
    works.then_some(device)
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<Device> {
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_index: usize) -> Result<Device> {
    anyhow::bail!(
        "this build has no CUDA backend: rebuild with `--features cuda` (needs internet to build)"
    )
}

#[cfg(feature = "vulkan")]
fn vulkan(kind: DeviceKind) -> Result<Device> {
    Ok(Device::vulkan(kind))
}

#[cfg(not(feature = "vulkan"))]
fn vulkan(_kind: DeviceKind) -> Result<Device> {
    anyhow::bail!("this build has no pinned Vulkan backend: rebuild with `--features vulkan`")
}

/// A flag set by the first Ctrl-C: the run finishes its step, writes a checkpoint and stops.
/// A second Ctrl-C exits at once (the last checkpoint is intact: files are replaced
/// atomically).
pub fn stop_on_ctrl_c() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let handler_stop = stop.clone();
    ctrlc::set_handler(move || {
        if handler_stop.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: exiting now (the last checkpoint is intact)");
            std::process::exit(130);
        }
        eprintln!(
            "\nCtrl-C: finishing this step and writing a checkpoint (Ctrl-C again to quit now)"
        );
    })
    .context("installing the Ctrl-C handler")?;
    Ok(stop)
}

/// The CIFAR-10 folder: `given`, else `$CIFAR10_DIR`, else the cache folder, downloading the
/// official archive there when it is missing.
pub fn cifar10_dir(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = given.or_else(|| std::env::var_os("CIFAR10_DIR").map(PathBuf::from)) {
        return Ok(dir);
    }
    let cache = cifar10_burn::download::default_dir();
    Ok(cifar10_burn::download::ensure(&cache)?)
}

/// The preset named at the start of a torchvision file name (`resnet18-f37072fd.pth`).
pub fn preset_of(path: &Path) -> Result<String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    match ResNetConfig::PRESETS
        .iter()
        .filter(|preset| name.starts_with(*preset))
        .max_by_key(|preset| preset.len())
    {
        Some(preset) => Ok(preset.to_string()),
        None => anyhow::bail!(
            "cannot tell the model from the file name {name:?}: pass --model (one of {:?})",
            ResNetConfig::PRESETS
        ),
    }
}

/// The preset of `--weights` when `--model` is not given: a torchvision name's, or the one at
/// the start of a file's name.
pub fn preset_of_weights(weights: &str) -> Result<String> {
    match Pretrained::from_name(weights) {
        Some(pretrained) if !Path::new(weights).is_file() => Ok(pretrained.preset().to_string()),
        _ => preset_of(Path::new(weights)),
    }
}
