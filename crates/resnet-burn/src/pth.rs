//! A reader for PyTorch `.pth` files (`torch.save(state_dict)`, the zip format of torch 1.6+)
//! that never runs code from the file.
//!
//! A `.pth` is a zip archive holding a pickle (`<name>/data.pkl`) and one file per tensor
//! storage (`<name>/data/<key>`). Pickles are programs: loading one with Python's `pickle`
//! can call any function. This reader interprets only the opcodes a state dict uses and
//! accepts only the few globals that describe tensors (`collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `torch.FloatStorage`, ...); anything else is an
//! error, never a call.
//!
//! Why a reader of our own rather than burn-store's `PytorchStore`: both refuse damaged files
//! without panicking (`tests/it/mutations.rs` feeds each the same 600 seeded mutants of a
//! fixture: truncations, bit flips, pickle edits with the zip's CRC made right again; neither
//! panicked, and both refused every truncation and bit flip). Ours is strict where the store
//! loads partially: of the 200 pickle edits it loaded 19 and the store 25, and a state dict
//! that misses, adds or misshapes keys is one error naming every such key
//! ([`ImportError::Mismatch`](crate::ImportError::Mismatch)). And it needs no key remapping
//! for torchvision's names, which this crate owns in `torchvision.rs`.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use crate::torchvision::{ImportError, RawTensor};

/// Reads every tensor of a `.pth` state dict (nested under `state_dict` or `model` when the
/// file is a training checkpoint), converted to f32.
pub(crate) fn read(path: &Path, bytes: &[u8]) -> Result<Vec<(String, RawTensor)>, ImportError> {
    let format = |message: String| ImportError::Format {
        path: path.to_path_buf(),
        message,
    };
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| format(format!("not a PyTorch zip file ({e})")))?;
    let pickle_name = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).map(str::to_owned))
        .find(|name| name == "data.pkl" || name.ends_with("/data.pkl"))
        .ok_or_else(|| format("it has no data.pkl: not a file written by torch.save".into()))?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
    let mut entry = |name: &str| -> Result<Vec<u8>, ImportError> {
        let mut file = zip
            .by_name(name)
            .map_err(|e| format(format!("cannot open {name} in the archive ({e})")))?;
        // The size is the archive's claim: no entry is larger than the archive itself.
        let mut data = Vec::with_capacity((file.size() as usize).min(bytes.len()));
        file.read_to_end(&mut data)
            .map_err(|e| format(format!("cannot read {name} in the archive ({e})")))?;
        Ok(data)
    };
    let pickle = entry(&pickle_name)?;
    if let Ok(order) = entry(&format!("{prefix}byteorder"))
        && order != b"little"
    {
        return Err(format(
            "it was written on a big-endian machine, which is not supported".into(),
        ));
    }

    let root = Machine::new(path, &pickle).run()?;
    let dict = state_dict_of(root).ok_or_else(|| ImportError::NotAStateDict {
        path: path.to_path_buf(),
    })?;

    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut tensors = Vec::new();
    for (key, value) in dict {
        let (Value::Str(key), Value::Tensor(tensor)) = (key, value) else {
            continue; // non-tensor entries (e.g. an epoch counter) are not weights
        };
        if !storages.contains_key(&tensor.storage_key) {
            let data = entry(&format!("{prefix}data/{}", tensor.storage_key))?;
            storages.insert(tensor.storage_key.clone(), data);
        }
        let storage = &storages[&tensor.storage_key];
        let raw = tensor.gather(storage).ok_or_else(|| ImportError::Pickle {
            path: path.to_path_buf(),
            message: format!("tensor {key} reaches past the end of its storage"),
        })?;
        tensors.push((key, raw));
    }
    Ok(tensors)
}

/// The state dict inside what the pickle built: the dict itself, or the dict under
/// `state_dict` or `model` (training checkpoints).
fn state_dict_of(root: Value) -> Option<Vec<(Value, Value)>> {
    let Value::Dict(entries) = root else {
        return None;
    };
    if entries.iter().any(|(_, v)| matches!(v, Value::Tensor(_))) {
        return Some(entries);
    }
    for wanted in ["state_dict", "model", "model_state_dict"] {
        for (key, value) in &entries {
            if matches!(key, Value::Str(k) if k == wanted)
                && let Some(inner) = state_dict_of(value.clone())
            {
                return Some(inner);
            }
        }
    }
    None
}

/// Element types of torch storages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dtype {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    fn from_storage(name: &str) -> Option<Self> {
        Some(match name {
            "torch.FloatStorage" => Dtype::F32,
            "torch.DoubleStorage" => Dtype::F64,
            "torch.HalfStorage" => Dtype::F16,
            "torch.BFloat16Storage" => Dtype::BF16,
            "torch.LongStorage" => Dtype::I64,
            "torch.IntStorage" => Dtype::I32,
            "torch.ShortStorage" => Dtype::I16,
            "torch.CharStorage" => Dtype::I8,
            "torch.ByteStorage" => Dtype::U8,
            "torch.BoolStorage" => Dtype::Bool,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }

    fn read(self, b: &[u8]) -> f32 {
        match self {
            Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Dtype::F64 => f64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as f32,
            Dtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            Dtype::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            Dtype::I64 => i64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as f32,
            Dtype::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
            Dtype::I16 => i16::from_le_bytes([b[0], b[1]]) as f32,
            Dtype::I8 => b[0] as i8 as f32,
            Dtype::U8 | Dtype::Bool => b[0] as f32,
        }
    }
}

/// A tensor as the pickle describes it: a view into a storage.
#[derive(Clone, Debug, PartialEq)]
struct TensorRef {
    dtype: Dtype,
    storage_key: String,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

impl TensorRef {
    /// The elements of the view in row-major order, or `None` if it leaves the storage.
    fn gather(&self, storage: &[u8]) -> Option<RawTensor> {
        let size = self.dtype.size();
        // The shape and strides are the file's claims: refuse a view with more elements than
        // its storage holds (a state dict never broadcasts) or reaching past it, before
        // allocating anything of that size.
        let count = self
            .shape
            .iter()
            .try_fold(1usize, |count, &d| count.checked_mul(d))?;
        let last = self
            .shape
            .iter()
            .zip(&self.stride)
            .try_fold(self.offset, |at, (&d, &s)| {
                at.checked_add(d.saturating_sub(1).checked_mul(s)?)
            })?;
        let fits = |elements: usize| {
            elements
                .checked_mul(size)
                .is_some_and(|b| b <= storage.len())
        };
        if count > 0 && !(fits(count) && fits(last.checked_add(1)?)) {
            return None;
        }
        let mut values = Vec::with_capacity(count);
        let mut index = vec![0usize; self.shape.len()];
        for _ in 0..count {
            let element = self.offset
                + index
                    .iter()
                    .zip(&self.stride)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            let bytes = storage.get(element * size..(element + 1) * size)?;
            values.push(self.dtype.read(bytes));
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < self.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Some(RawTensor {
            shape: self.shape.clone(),
            values,
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Value {
    Mark,
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String),
    Storage { dtype: Dtype, key: String },
    Tensor(TensorRef),
}

/// The globals a state dict may name. Nothing is ever called: REDUCE on these builds a
/// [`Value`] in Rust.
const ALLOWED_GLOBALS: [&str; 5] = [
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_parameter",
    "torch.device",
];

struct Machine<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    at: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl<'a> Machine<'a> {
    fn new(path: &'a Path, bytes: &'a [u8]) -> Self {
        Self {
            path,
            bytes,
            at: 0,
            stack: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn error(&self, message: impl Into<String>) -> ImportError {
        ImportError::Pickle {
            path: self.path.to_path_buf(),
            message: format!("{} (pickle byte {})", message.into(), self.at),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ImportError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len());
        match end {
            Some(end) => {
                let slice = &self.bytes[self.at..end];
                self.at = end;
                Ok(slice)
            }
            None => Err(self
                .error("the pickle ends in the middle of an instruction: the file is truncated")),
        }
    }

    fn u8(&mut self) -> Result<u8, ImportError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, ImportError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn len(&mut self, bytes: usize) -> Result<usize, ImportError> {
        let raw = self.take(bytes)?;
        let mut buf = [0u8; 8];
        buf[..bytes].copy_from_slice(raw);
        usize::try_from(u64::from_le_bytes(buf)).map_err(|_| self.error("length too large"))
    }

    fn string(&mut self, len: usize) -> Result<String, ImportError> {
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| self.error("a string is not UTF-8"))
    }

    fn line(&mut self) -> Result<String, ImportError> {
        let rest = &self.bytes[self.at..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.error("unterminated GLOBAL"))?;
        let line = self.string(end)?;
        self.at += 1;
        Ok(line)
    }

    fn pop(&mut self) -> Result<Value, ImportError> {
        self.stack
            .pop()
            .ok_or_else(|| self.error("the pickle pops an empty stack"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, ImportError> {
        let mark = self
            .stack
            .iter()
            .rposition(|v| *v == Value::Mark)
            .ok_or_else(|| self.error("no MARK on the stack"))?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    fn global(&self, name: String) -> Result<Value, ImportError> {
        if ALLOWED_GLOBALS.contains(&name.as_str()) || Dtype::from_storage(&name).is_some() {
            Ok(Value::Global(name))
        } else {
            Err(ImportError::UnsafePickle {
                path: self.path.to_path_buf(),
                global: name,
            })
        }
    }

    fn run(mut self) -> Result<Value, ImportError> {
        loop {
            let opcode = self.u8()?;
            match opcode {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"));
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes"));
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    // LONG1: n little-endian two's-complement bytes
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return Err(self.error("integer too large"));
                    }
                    let raw = self.take(n)?;
                    let mut buf = if raw.last().is_some_and(|b| b & 0x80 != 0) {
                        [0xff; 8]
                    } else {
                        [0; 8]
                    };
                    buf[..n].copy_from_slice(raw);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes"));
                    self.stack.push(Value::Float(v));
                }
                b'X' => {
                    let n = self.len(4)?;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                0x8c => {
                    let n = self.len(1)?;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                0x8d => {
                    let n = self.len(8)?;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                b'U' | b'C' => {
                    let n = self.len(1)?;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'T' | b'B' => {
                    let n = self.len(4)?;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let global = self.global(format!("{module}.{name}"))?;
                    self.stack.push(global);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(self.error("STACK_GLOBAL needs two strings"));
                    };
                    let global = self.global(format!("{module}.{name}"))?;
                    self.stack.push(global);
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memoize(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memoize(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memoize(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.recall(i)?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.recall(i)?;
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (opcode - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.error("tuple of missing items"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items));
                }
                b'a' => {
                    let item = self.pop()?;
                    match self.stack.last_mut() {
                        Some(Value::List(list)) => list.push(item),
                        _ => return Err(self.error("APPEND to something that is not a list")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.stack.last_mut() {
                        Some(Value::List(list)) => list.extend(items),
                        _ => return Err(self.error("APPENDS to something that is not a list")),
                    }
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.set_items(vec![key, value])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent(pid)?;
                    self.stack.push(storage);
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let value = self.reduce(callable, args)?;
                    self.stack.push(value);
                }
                b'b' => {
                    // BUILD: the state of an OrderedDict (its `_metadata`) is not needed.
                    self.pop()?;
                    if self.stack.is_empty() {
                        return Err(self.error("BUILD without an object"));
                    }
                }
                other => {
                    return Err(self.error(format!(
                        "pickle opcode 0x{other:02x} is not used by state dicts; this reader \
                         only reads plain state dicts"
                    )));
                }
            }
        }
    }

    fn memoize(&mut self, index: u32) -> Result<(), ImportError> {
        let top = self
            .stack
            .last()
            .cloned()
            .ok_or_else(|| self.error("memoize an empty stack"))?;
        self.memo.insert(index, top);
        Ok(())
    }

    fn recall(&mut self, index: u32) -> Result<(), ImportError> {
        let value = self
            .memo
            .get(&index)
            .cloned()
            .ok_or_else(|| self.error(format!("memo {index} is not set")))?;
        self.stack.push(value);
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), ImportError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.error("SETITEMS with an odd number of items"));
        }
        let Some(Value::Dict(dict)) = self.stack.last_mut() else {
            return Err(self.error("SETITEM on something that is not a dict"));
        };
        let mut items = items.into_iter();
        while let (Some(key), Some(value)) = (items.next(), items.next()) {
            dict.push((key, value));
        }
        Ok(())
    }

    fn persistent(&self, pid: Value) -> Result<Value, ImportError> {
        match pid {
            Value::Tuple(items) => match items.as_slice() {
                [
                    Value::Str(kind),
                    Value::Global(storage),
                    Value::Str(key),
                    ..,
                ] if kind == "storage" => {
                    let dtype = Dtype::from_storage(storage)
                        .ok_or_else(|| self.error(format!("unknown storage type {storage}")))?;
                    Ok(Value::Storage {
                        dtype,
                        key: key.clone(),
                    })
                }
                _ => Err(self.error("a persistent id that is not a tensor storage")),
            },
            _ => Err(self.error("a persistent id that is not a tuple")),
        }
    }

    fn reduce(&self, callable: Value, args: Value) -> Result<Value, ImportError> {
        let Value::Global(name) = callable else {
            return Err(self.error("REDUCE of something that is not a known global"));
        };
        let Value::Tuple(args) = args else {
            return Err(self.error("REDUCE arguments are not a tuple"));
        };
        match name.as_str() {
            "collections.OrderedDict" => Ok(Value::Dict(Vec::new())),
            "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
                match args.as_slice() {
                    [
                        Value::Storage { dtype, key },
                        Value::Int(offset),
                        Value::Tuple(shape),
                        Value::Tuple(stride),
                        ..,
                    ] => {
                        let ints = |values: &[Value]| -> Option<Vec<usize>> {
                            values
                                .iter()
                                .map(|v| match v {
                                    Value::Int(i) => usize::try_from(*i).ok(),
                                    _ => None,
                                })
                                .collect()
                        };
                        let (Some(shape), Some(stride)) = (ints(shape), ints(stride)) else {
                            return Err(
                                self.error("a tensor shape or stride is not a tuple of sizes")
                            );
                        };
                        if shape.len() != stride.len() {
                            return Err(self.error("a tensor's shape and stride differ in length"));
                        }
                        Ok(Value::Tensor(TensorRef {
                            dtype: *dtype,
                            storage_key: key.clone(),
                            offset: usize::try_from(*offset)
                                .map_err(|_| self.error("negative offset"))?,
                            shape,
                            stride,
                        }))
                    }
                    _ => Err(self.error("unexpected arguments to _rebuild_tensor")),
                }
            }
            "torch._utils._rebuild_parameter" => match args.into_iter().next() {
                Some(tensor @ Value::Tensor(_)) => Ok(tensor),
                _ => Err(self.error("unexpected arguments to _rebuild_parameter")),
            },
            "torch.device" => Ok(Value::None),
            _ => Err(self.error(format!("{name} cannot be called"))),
        }
    }
}
