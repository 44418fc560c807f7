//! Crash-safe files: everything is written to a temporary file, flushed to disk, then
//! renamed over the old one, so a kill at any moment leaves either the old or the new file,
//! never half of one. Training checkpoints ([`save`], [`load`]) are such files: the run's
//! state, the model's record and the optimizer's state in one body.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::store::ModuleRecord;
use burn::tensor::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Writes the checkpoint of a run at `path`: its `state` (as JSON), `model` and `optimizer`.
pub fn save<S: Serialize, M: Module>(
    path: &Path,
    state: &S,
    model: &M,
    optimizer: &ModuleOptimizer,
) -> Result<()> {
    // BatchNorm's running statistics keep the last update of each thread aside until they
    // are synced; `train()` syncs them (the clone shares them), so the record is current.
    let model_bytes = model.clone().train().into_record().into_bytes()?;
    let optimizer_bytes = optimizer.into_bytes()?;
    let state_json = serde_json::to_vec(state)?;
    let body = pack(&[
        ("state", &state_json),
        ("model", &model_bytes),
        ("optimizer", &optimizer_bytes),
    ]);
    write_atomic(path, &body)
}

/// Reads the checkpoint [`save`] wrote at `path` into `model` and `optimizer`; `check` sees
/// the state before the model is loaded and refuses a checkpoint of another run.
pub fn load<S: DeserializeOwned, M: Module>(
    path: &Path,
    model: M,
    optimizer: ModuleOptimizer,
    check: impl FnOnce(&S) -> Result<()>,
) -> Result<(M, ModuleOptimizer, S)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    load_bytes(&bytes, path, model, optimizer, check)
}

/// [`load`] from the `bytes` of the checkpoint file at `path` (read by another process, say;
/// `path` is for the messages).
pub fn load_bytes<S: DeserializeOwned, M: Module>(
    bytes: &[u8],
    path: &Path,
    model: M,
    optimizer: ModuleOptimizer,
    check: impl FnOnce(&S) -> Result<()>,
) -> Result<(M, ModuleOptimizer, S)> {
    let mut sections = unpack(bytes, path)?.into_iter();
    let mut section = |name: &str| -> Result<Vec<u8>> {
        match sections.next() {
            Some((found, data)) if found == name => Ok(data),
            _ => bail!(
                "{} has no {name} section; delete it or start without --resume",
                path.display()
            ),
        }
    };
    let state: S = serde_json::from_slice(&section("state")?)
        .with_context(|| format!("reading the state in {}", path.display()))?;
    check(&state)?;
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(section("model")?))
        .with_context(|| format!("reading the model in {}", path.display()))?;
    let model = model
        .try_load_record(record)
        .with_context(|| format!("loading the model in {}", path.display()))?;
    let optimizer = optimizer
        .from_bytes(Bytes::from_bytes_vec(section("optimizer")?))
        .with_context(|| format!("reading the optimizer state in {}", path.display()))?;
    Ok((model, optimizer, state))
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename, fsync of the folder).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp: PathBuf = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()));
    drop(file);
    let renamed = written.and_then(|()| {
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    });
    if renamed.is_err() {
        // A full disk, say: leave the old file as it was and no partial copy beside it.
        let _ = fs::remove_file(&tmp);
    }
    renamed?;
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

const MAGIC: &[u8; 8] = b"RBCKPT01";

/// Packs named byte sections into one file body: `MAGIC`, then for each section its name
/// length, name, data length and data (little-endian u64 lengths).
pub fn pack(sections: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    for (name, data) in sections {
        out.extend_from_slice(&(name.len() as u64).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        out.extend_from_slice(data);
    }
    out
}

/// Reads back what [`pack`] wrote; `path` is only for error messages.
pub fn unpack(bytes: &[u8], path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let corrupt = |what: &str| {
        anyhow::anyhow!(
            "{} is not a complete resnet-burn checkpoint ({what}); delete it or start without --resume",
            path.display()
        )
    };
    let Some(body) = bytes.strip_prefix(MAGIC.as_slice()) else {
        bail!(corrupt("bad header"));
    };
    let mut cursor = Cursor { bytes: body, at: 0 };
    let mut sections = Vec::new();
    while cursor.at < body.len() {
        let name = cursor.section().ok_or_else(|| corrupt("truncated"))?;
        let name = String::from_utf8(name.to_vec()).map_err(|_| corrupt("bad section name"))?;
        let data = cursor.section().ok_or_else(|| corrupt("truncated"))?;
        sections.push((name, data.to_vec()));
    }
    if sections.is_empty() {
        bail!(corrupt("empty"));
    }
    Ok(sections)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let slice = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(slice)
    }

    /// A u64 length, then that many bytes.
    fn section(&mut self) -> Option<&'a [u8]> {
        let len = u64::from_le_bytes(self.take(8)?.try_into().ok()?);
        self.take(usize::try_from(len).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("resnet-burn-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_file_is_replaced_whole() {
        let dir = scratch("atomic-replace");
        let path = dir.join("checkpoint.bin");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new contents").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new contents");
        assert_eq!(entries(&dir), ["checkpoint.bin"]);
    }

    #[test]
    fn a_failed_write_leaves_what_was_there_and_no_temporary_file() {
        let dir = scratch("atomic-fail");
        // The rename fails: the destination is a folder that holds a file.
        let path = dir.join("checkpoint.bin");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("kept"), b"kept").unwrap();
        let error = write_atomic(&path, b"new").unwrap_err();
        assert!(format!("{error:#}").contains("checkpoint.bin"), "{error:#}");
        assert_eq!(entries(&dir), ["checkpoint.bin"]);
        assert_eq!(fs::read(path.join("kept")).unwrap(), b"kept");
    }
}
