//! torchvision's state-dict names and layouts: every key rule in one place.
//!
//! A Burn module path such as `layer1.0.Basic.downsample.bn.gamma` becomes torchvision's
//! `layer1.0.downsample.1.weight` by these rules:
//! - the block variant segment (`Basic`, `Bottleneck`) is dropped;
//! - `downsample.conv` is `downsample.0` and `downsample.bn` is `downsample.1`
//!   (torchvision's `nn.Sequential`);
//! - BatchNorm's `gamma` and `beta` are `weight` and `bias`; its running statistics keep
//!   their names, and torchvision adds a `num_batches_tracked` counter after them;
//! - the linear head's weight is stored `[in, out]` by Burn and `[out, in]` by PyTorch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};

use crate::ResNet;

/// torchvision's state-dict key for a Burn module path of a [`ResNet`].
pub fn torchvision_key(burn_path: &str) -> String {
    let mut key: Vec<&str> = Vec::new();
    let mut segments = burn_path.split('.').peekable();
    while let Some(segment) = segments.next() {
        match segment {
            "Basic" | "Bottleneck" => {}
            "downsample" => {
                key.push(segment);
                match segments.next() {
                    Some("conv") => key.push("0"),
                    Some("bn") => key.push("1"),
                    Some(other) => key.push(other),
                    None => {}
                }
            }
            "gamma" if segments.peek().is_none() => key.push("weight"),
            "beta" if segments.peek().is_none() => key.push("bias"),
            _ => key.push(segment),
        }
    }
    key.join(".")
}

/// One entry of a torchvision state dict: its key and the shape PyTorch gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateDictEntry {
    /// The torchvision key, such as `layer1.0.conv1.weight`.
    pub key: String,
    /// The Burn module path of the tensor, or `None` for `num_batches_tracked`, which Burn
    /// does not keep.
    pub burn_path: Option<String>,
    /// The shape in PyTorch's layout (`[]` for `num_batches_tracked`).
    pub shape: Vec<usize>,
}

impl ResNet {
    /// The keys and shapes of the state dict torchvision has for this network, in
    /// torchvision's order (that of `model.state_dict()`).
    pub fn torchvision_state_dict(&self) -> Vec<StateDictEntry> {
        let mut collector = Collector::default();
        self.visit(&mut collector);
        collector.entries
    }
}

#[derive(Default)]
struct Collector {
    path: Vec<String>,
    entries: Vec<StateDictEntry>,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let burn_path = self.path.join(".");
        let key = torchvision_key(&burn_path);
        let mut shape = param.lazy_shape().to_vec();
        if key == "fc.weight" {
            shape.reverse();
        }
        let running_var = key.ends_with(".running_var");
        self.entries.push(StateDictEntry {
            key: key.clone(),
            burn_path: Some(burn_path),
            shape,
        });
        if running_var {
            let prefix = key.trim_end_matches("running_var");
            self.entries.push(StateDictEntry {
                key: format!("{prefix}num_batches_tracked"),
                burn_path: None,
                shape: Vec::new(),
            });
        }
    }
}

/// A tensor read from a weight file, as f32 in row-major order.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RawTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// A weight file that cannot be loaded into (or written from) a [`ResNet`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// The file cannot be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is neither a `torch.save` zip nor a safetensors file, or is damaged.
    #[error("{path} is not a readable PyTorch weight file: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The pickle inside a `.pth` is malformed or truncated.
    #[error("{path}: malformed pickle: {message}")]
    Pickle {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The pickle names a global a state dict never uses; nothing was run.
    #[error(
        "{path} asks to call `{global}`, which no state dict needs; it was not run and the file \
         was not loaded. Only plain state dicts (torch.save(model.state_dict())) are read"
    )]
    UnsafePickle {
        /// The file.
        path: PathBuf,
        /// The global the pickle asked for.
        global: String,
    },
    /// The file holds no dict of tensors (nor one under `state_dict` or `model`).
    #[error(
        "{path} holds no state dict: save one with torch.save(model.state_dict(), path) \
         (a dict under \"state_dict\" or \"model\" is found too)"
    )]
    NotAStateDict {
        /// The file.
        path: PathBuf,
    },
    /// Pretrained weights could not be downloaded.
    #[error(
        "cannot download {url}: {message}. Without internet, download that file elsewhere and \
         put it at {path} (or pass the file's path instead of the weights' name)"
    )]
    Download {
        /// The address.
        url: String,
        /// Where the file belongs.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Keys or shapes differ from the model's; every offending key is listed.
    #[error("{}", mismatch_message(path, missing, unexpected, shapes))]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// Keys the model needs that the file lacks, with the expected shape.
        missing: Vec<(String, Vec<usize>)>,
        /// Keys of the file the model does not have, with their shape.
        unexpected: Vec<(String, Vec<usize>)>,
        /// Keys whose shape differs: key, expected shape, found shape.
        shapes: Vec<(String, Vec<usize>, Vec<usize>)>,
    },
}

fn mismatch_message(
    path: &Path,
    missing: &[(String, Vec<usize>)],
    unexpected: &[(String, Vec<usize>)],
    shapes: &[(String, Vec<usize>, Vec<usize>)],
) -> String {
    let mut message = format!(
        "{} does not fit the model ({} missing, {} unexpected, {} wrong shape); check the \
         architecture (preset, num_classes, stem), or load a backbone with \
         LoadOptions::backbone() to skip the head:",
        path.display(),
        missing.len(),
        unexpected.len(),
        shapes.len()
    );
    for (key, shape) in missing {
        message.push_str(&format!("\n  missing    {key} (expected {shape:?})"));
    }
    for (key, shape) in unexpected {
        message.push_str(&format!("\n  unexpected {key} {shape:?}"));
    }
    for (key, expected, found) in shapes {
        message.push_str(&format!(
            "\n  shape      {key}: expected {expected:?}, found {found:?}"
        ));
    }
    message
}

/// How [`ResNet::load_torchvision_with`] matches the file to the model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Leave the model's `fc` head as it is and ignore the file's: loads a backbone
    /// pretrained with another number of classes, for fine-tuning.
    pub skip_head: bool,
}

impl LoadOptions {
    /// Load everything but the head.
    pub fn backbone() -> Self {
        Self { skip_head: true }
    }
}

impl ResNet {
    /// Loads torchvision weights: a `.pth` file (`torch.save(model.state_dict(), path)`,
    /// also a checkpoint dict with the state dict under `state_dict` or `model`) or a
    /// `.safetensors` file, with torchvision's key names.
    ///
    /// Strict: every key of the model must be in the file with the same shape, and the
    /// file may hold no other key (`num_batches_tracked` aside). The error lists every
    /// offending key. Reading a `.pth` never runs code from the file.
    pub fn load_torchvision(self, path: impl AsRef<Path>) -> Result<Self, ImportError> {
        self.load_torchvision_with(path, &LoadOptions::default())
    }

    /// [`load_torchvision`](Self::load_torchvision) with [`LoadOptions`].
    pub fn load_torchvision_with(
        self,
        path: impl AsRef<Path>,
        options: &LoadOptions,
    ) -> Result<Self, ImportError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| ImportError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        self.load_torchvision_bytes(&bytes, path, options)
    }

    /// [`load_torchvision_with`](Self::load_torchvision_with) on the bytes of a `.pth` or
    /// `.safetensors` file already in memory (embedded, downloaded); errors call them `name`.
    pub fn load_torchvision_bytes(
        self,
        bytes: &[u8],
        name: impl AsRef<Path>,
        options: &LoadOptions,
    ) -> Result<Self, ImportError> {
        let name = name.as_ref();
        let tensors = parse_weights(name, bytes)?;
        self.apply_weights(name, tensors, options)
    }

    fn apply_weights(
        self,
        path: &Path,
        tensors: Vec<(String, RawTensor)>,
        options: &LoadOptions,
    ) -> Result<Self, ImportError> {
        let is_head = |key: &str| options.skip_head && key.starts_with("fc.");
        let prefix = common_prefix(&tensors);
        let mut file: HashMap<String, RawTensor> = tensors
            .into_iter()
            .map(|(key, tensor)| (key[prefix.len()..].to_string(), tensor))
            .filter(|(key, _)| !key.ends_with("num_batches_tracked") && !is_head(key))
            .collect();

        let (mut missing, mut shapes) = (Vec::new(), Vec::new());
        let mut by_path = HashMap::new();
        for entry in self.torchvision_state_dict() {
            let Some(burn_path) = entry.burn_path else {
                continue;
            };
            if is_head(&entry.key) {
                continue;
            }
            match file.remove(&entry.key) {
                None => missing.push((entry.key, entry.shape)),
                Some(tensor) if tensor.shape != entry.shape => {
                    shapes.push((entry.key, entry.shape, tensor.shape));
                }
                Some(mut tensor) => {
                    if entry.key == "fc.weight" {
                        tensor = transpose(tensor);
                    }
                    by_path.insert(burn_path, tensor);
                }
            }
        }
        let mut unexpected: Vec<(String, Vec<usize>)> = file
            .into_iter()
            .map(|(key, tensor)| (key, tensor.shape))
            .collect();
        unexpected.sort();
        if !missing.is_empty() || !unexpected.is_empty() || !shapes.is_empty() {
            return Err(ImportError::Mismatch {
                path: path.to_path_buf(),
                missing,
                unexpected,
                shapes,
            });
        }
        Ok(self.map(&mut Loader {
            path: Vec::new(),
            tensors: by_path,
        }))
    }

    /// Writes the weights as a safetensors file with torchvision's keys and layouts, so
    /// that `model.load_state_dict(safetensors.torch.load_file(path), strict=True)` works on
    /// the torchvision model of the same configuration. `num_batches_tracked` is written
    /// as 0 (PyTorch uses it only for BatchNorm with `momentum=None`). The file is written
    /// atomically (temporary file, then rename).
    pub fn save_torchvision(&self, path: impl AsRef<Path>) -> Result<(), ImportError> {
        self.save_torchvision_with_metadata(path, HashMap::new())
    }

    /// [`save_torchvision`](Self::save_torchvision) with string `metadata` in the file's
    /// header (`__metadata__`, which PyTorch ignores): class names, the config, what a
    /// program loading the weights needs besides them. [`read_metadata`] reads it back.
    pub fn save_torchvision_with_metadata(
        &self,
        path: impl AsRef<Path>,
        metadata: HashMap<String, String>,
    ) -> Result<(), ImportError> {
        let path = path.as_ref();
        let mut values: HashMap<String, Result<Vec<f32>, String>> = HashMap::new();
        // `valid()` also folds BatchNorm's pending running-statistics update in.
        self.valid().visit(&mut Exporter {
            path: Vec::new(),
            values: &mut values,
        });
        let zero = 0i64.to_le_bytes();
        let mut views = Vec::new();
        let mut buffers: Vec<(String, Vec<usize>, Vec<u8>, safetensors::Dtype)> = Vec::new();
        for entry in self.torchvision_state_dict() {
            match entry.burn_path {
                Some(burn_path) => {
                    let mut data = values
                        .remove(&burn_path)
                        .unwrap_or_else(|| Err("not found".into()))
                        .map_err(|e| ImportError::Format {
                            path: path.to_path_buf(),
                            message: format!("cannot read the values of {burn_path}: {e}"),
                        })?;
                    if entry.key == "fc.weight" {
                        let [inputs, outputs] = [entry.shape[1], entry.shape[0]];
                        data = transpose(RawTensor {
                            shape: vec![inputs, outputs],
                            values: data,
                        })
                        .values;
                    }
                    let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
                    buffers.push((entry.key, entry.shape, bytes, safetensors::Dtype::F32));
                }
                None => buffers.push((
                    entry.key,
                    entry.shape,
                    zero.to_vec(),
                    safetensors::Dtype::I64,
                )),
            }
        }
        for (key, shape, bytes, dtype) in &buffers {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).map_err(
                |e| ImportError::Format {
                    path: path.to_path_buf(),
                    message: format!("{key}: {e}"),
                },
            )?;
            views.push((key.as_str(), view));
        }
        let metadata = (!metadata.is_empty()).then_some(metadata);
        let bytes = safetensors::serialize(views, metadata).map_err(|e| ImportError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let io = |source| ImportError::Io {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_extension("safetensors.tmp");
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

/// The string metadata of a `.safetensors` file (empty when it has none), as
/// [`ResNet::save_torchvision_with_metadata`] writes it.
pub fn read_metadata(path: impl AsRef<Path>) -> Result<HashMap<String, String>, ImportError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| ImportError::Format {
            path: path.to_path_buf(),
            message: format!("not a safetensors file ({e})"),
        })?;
    Ok(header.metadata().clone().unwrap_or_default())
}

/// Parses the bytes of a `.pth` or `.safetensors` file (`path` names it in errors) into named
/// f32 tensors.
fn parse_weights(path: &Path, bytes: &[u8]) -> Result<Vec<(String, RawTensor)>, ImportError> {
    if bytes.starts_with(b"PK") {
        return crate::pth::read(path, bytes);
    }
    let tensors =
        safetensors::SafeTensors::deserialize(bytes).map_err(|e| ImportError::Format {
            path: path.to_path_buf(),
            message: format!("neither a torch.save zip file nor safetensors ({e})"),
        })?;
    tensors
        .tensors()
        .into_iter()
        .map(|(key, view)| {
            let values = safetensors_values(&view).ok_or_else(|| ImportError::Format {
                path: path.to_path_buf(),
                message: format!("tensor {key} has the unsupported type {:?}", view.dtype()),
            })?;
            let shape = view.shape().to_vec();
            Ok((key, RawTensor { shape, values }))
        })
        .collect()
}

fn safetensors_values(view: &safetensors::tensor::TensorView<'_>) -> Option<Vec<f32>> {
    use safetensors::Dtype;
    let data = view.data();
    let values = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        _ => return None,
    };
    Some(values)
}

/// The prefix every key shares when the state dict was saved from a wrapped model
/// (`module.` from `DataParallel`, `model.` from some training scripts), else "".
fn common_prefix(tensors: &[(String, RawTensor)]) -> String {
    for prefix in ["module.", "model."] {
        if !tensors.is_empty() && tensors.iter().all(|(key, _)| key.starts_with(prefix)) {
            return prefix.to_string();
        }
    }
    String::new()
}

fn transpose(tensor: RawTensor) -> RawTensor {
    let [rows, cols] = [tensor.shape[0], tensor.shape[1]];
    let mut values = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            values[c * rows + r] = tensor.values[r * cols + c];
        }
    }
    RawTensor {
        shape: vec![cols, rows],
        values,
    }
}

/// Replaces each parameter whose Burn path is in `tensors`.
struct Loader {
    path: Vec<String>,
    tensors: HashMap<String, RawTensor>,
}

impl ModuleMapper for Loader {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        match self.tensors.remove(&self.path.join(".")) {
            Some(raw) => {
                let device = param.lazy_device();
                let tensor = Tensor::from_data(TensorData::new(raw.values, raw.shape), &device);
                let id = param.id;
                param.transform_for_load(tensor, id)
            }
            None => param,
        }
    }
}

/// Reads every parameter's values by Burn path.
struct Exporter<'a> {
    path: Vec<String>,
    values: &'a mut HashMap<String, Result<Vec<f32>, String>>,
}

impl ModuleVisitor for Exporter<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let values = param
            .val()
            .into_data()
            .try_into_vec_as::<f32>()
            .map_err(|e| format!("{e:?}"));
        self.values.insert(self.path.join("."), values);
    }
}

#[cfg(test)]
mod tests {
    use super::torchvision_key;

    #[test]
    fn keys_follow_torchvision() {
        let cases = [
            ("conv1.weight", "conv1.weight"),
            ("bn1.gamma", "bn1.weight"),
            ("bn1.beta", "bn1.bias"),
            ("layer1.0.Basic.conv1.weight", "layer1.0.conv1.weight"),
            (
                "layer2.0.Bottleneck.downsample.conv.weight",
                "layer2.0.downsample.0.weight",
            ),
            (
                "layer2.0.Basic.downsample.bn.running_var",
                "layer2.0.downsample.1.running_var",
            ),
            (
                "layer2.0.Basic.downsample.bn.gamma",
                "layer2.0.downsample.1.weight",
            ),
            ("fc.weight", "fc.weight"),
        ];
        for (burn, torch) in cases {
            assert_eq!(torchvision_key(burn), torch, "key of {burn}");
        }
    }
}
