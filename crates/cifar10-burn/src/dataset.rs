//! [`Cifar10Dataset`]: a split of CIFAR-10 in memory, read from the official binary files.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use burn::data::dataset::Dataset;
use serde::{Deserialize, Serialize};

use crate::Cifar10Error;
use crate::format::{IMAGE_BYTES, parse_batch};

/// The folder the official archive extracts to.
pub const BATCHES_DIR: &str = "cifar-10-batches-bin";
/// The official archive's file name.
pub const ARCHIVE_NAME: &str = "cifar-10-binary.tar.gz";

/// Which part of CIFAR-10.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Split {
    /// 50,000 training images, `data_batch_1.bin` to `data_batch_5.bin`.
    Train,
    /// 10,000 test images, `test_batch.bin`.
    Test,
}

impl Split {
    /// The batch files of the split, in order.
    pub fn files(self) -> &'static [&'static str] {
        match self {
            Split::Train => &[
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
            ],
            Split::Test => &["test_batch.bin"],
        }
    }
}

/// One image and its label.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cifar10Item {
    /// The 3072 pixel bytes in file order: 1024 red, 1024 green, 1024 blue, each plane
    /// row-major (a `[3, 32, 32]` CHW image).
    pub image: Vec<u8>,
    /// The class, 0 to 9 (see [`CLASSES`](crate::CLASSES)).
    pub label: u8,
}

/// A split of CIFAR-10, held in memory as one contiguous block of pixels and one of labels
/// (50,000 training images cost 153.6 MB, their size on disk).
#[derive(Clone, Debug)]
pub struct Cifar10Dataset {
    images: Vec<u8>,
    labels: Vec<u8>,
}

impl Cifar10Dataset {
    /// Reads a split from `path`: the `cifar-10-batches-bin` folder, the folder that holds it
    /// (or the archive), or the `cifar-10-binary.tar.gz` archive itself.
    pub fn new(path: impl AsRef<Path>, split: Split) -> Result<Self, Cifar10Error> {
        match locate(path.as_ref(), split)? {
            Source::Folder(dir) => Self::from_folder(&dir, split),
            Source::Archive(archive) => Self::from_archive(&archive, split),
        }
    }

    fn from_folder(dir: &Path, split: Split) -> Result<Self, Cifar10Error> {
        // Size the buffers once from the file lengths: growing them file by file would
        // double their capacity past the data's size.
        let mut records = 0;
        for name in split.files() {
            let path = dir.join(name);
            let len = std::fs::metadata(&path)
                .map_err(|e| Cifar10Error::io(&path, e))?
                .len();
            records += len as usize / crate::format::RECORD_BYTES;
        }
        let mut dataset = Self {
            images: Vec::with_capacity(records * IMAGE_BYTES),
            labels: Vec::with_capacity(records),
        };
        for name in split.files() {
            let path = dir.join(name);
            let bytes = std::fs::read(&path).map_err(|e| Cifar10Error::io(&path, e))?;
            parse_batch(&bytes, &path, &mut dataset.labels, &mut dataset.images)?;
        }
        Ok(dataset)
    }

    fn from_archive(archive: &Path, split: Split) -> Result<Self, Cifar10Error> {
        let mut files: Vec<Option<Vec<u8>>> = vec![None; split.files().len()];
        for_each_archive_file(archive, |name, bytes| {
            if let Some(i) = split.files().iter().position(|f| *f == name) {
                files[i] = Some(bytes);
            }
        })?;
        let mut dataset = Self::empty();
        for (name, bytes) in split.files().iter().zip(files) {
            let path = archive.join(BATCHES_DIR).join(name);
            let bytes = bytes.ok_or_else(|| Cifar10Error::Archive {
                path: archive.to_path_buf(),
                message: format!("it has no {BATCHES_DIR}/{name}"),
            })?;
            parse_batch(&bytes, &path, &mut dataset.labels, &mut dataset.images)?;
        }
        Ok(dataset)
    }

    fn empty() -> Self {
        Self {
            images: Vec::new(),
            labels: Vec::new(),
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there is no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pixels of image `index` (3072 bytes, CHW), or `None` past the end.
    pub fn image(&self, index: usize) -> Option<&[u8]> {
        self.images
            .get(index * IMAGE_BYTES..(index + 1) * IMAGE_BYTES)
    }

    /// All labels, in order.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// All pixels, image after image (`len() * 3072` bytes).
    pub fn images(&self) -> &[u8] {
        &self.images
    }

    /// Keeps the first `count` images (all of them if there are fewer): quick runs and
    /// tests use a subset.
    pub fn truncate(mut self, count: usize) -> Self {
        let count = count.min(self.len());
        self.labels.truncate(count);
        self.images.truncate(count * IMAGE_BYTES);
        self.labels.shrink_to_fit();
        self.images.shrink_to_fit();
        self
    }

    /// Heap bytes held by the dataset.
    pub fn memory_bytes(&self) -> usize {
        self.images.capacity() + self.labels.capacity()
    }
}

impl Dataset<Cifar10Item> for Cifar10Dataset {
    fn get(&self, index: usize) -> Result<Cifar10Item, burn::data::dataset::DatasetError> {
        let image = self
            .image(index)
            .unwrap_or_else(|| panic!("index {index} out of range for {} images", self.len()));
        Ok(Cifar10Item {
            image: image.to_vec(),
            label: self.labels[index],
        })
    }

    fn len(&self) -> usize {
        self.labels.len()
    }
}

enum Source {
    Folder(PathBuf),
    Archive(PathBuf),
}

fn is_archive(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.ends_with(".tar.gz") || name.ends_with(".tgz")
}

/// Finds the split's files under `path`, whichever of the accepted forms it is.
fn locate(path: &Path, split: Split) -> Result<Source, Cifar10Error> {
    if path.is_file() && is_archive(path) {
        return Ok(Source::Archive(path.to_path_buf()));
    }
    if !path.exists() {
        return Err(Cifar10Error::Missing {
            path: path.to_path_buf(),
        });
    }
    let first = split.files()[0];
    for dir in [path.to_path_buf(), path.join(BATCHES_DIR)] {
        if dir.join(first).is_file() {
            return Ok(Source::Folder(dir));
        }
    }
    let archive = path.join(ARCHIVE_NAME);
    if archive.is_file() {
        return Ok(Source::Archive(archive));
    }
    Err(Cifar10Error::Missing {
        path: path.join(first),
    })
}

/// Calls `f(file name, contents)` for every regular file of a `.tar.gz` archive.
pub(crate) fn for_each_archive_file(
    archive: &Path,
    mut f: impl FnMut(&str, Vec<u8>),
) -> Result<(), Cifar10Error> {
    let bad = |e: std::io::Error| Cifar10Error::Archive {
        path: archive.to_path_buf(),
        message: e.to_string(),
    };
    let file = File::open(archive).map_err(|e| Cifar10Error::io(archive, e))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(bad)?.into_owned();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        // The size is the archive's claim: reserve no more than a batch file's.
        let mut bytes = Vec::with_capacity((entry.size() as usize).min(64 << 20));
        entry.read_to_end(&mut bytes).map_err(bad)?;
        f(&name, bytes);
    }
    Ok(())
}
