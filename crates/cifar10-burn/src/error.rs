//! [`Cifar10Error`]: everything that can go wrong reading or fetching CIFAR-10.

use std::path::PathBuf;

/// Where to get the data, said by every error about missing files.
pub const GET_THE_DATA: &str = "get the binary version of CIFAR-10 (cifar-10-binary.tar.gz, \
     https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz) and pass the archive, the extracted \
     cifar-10-batches-bin folder, or the folder that holds either";

/// An error reading, checking or fetching CIFAR-10; each names the file (and record) at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Cifar10Error {
    /// A file the split needs is not there.
    #[error("CIFAR-10 file {path} not found: {GET_THE_DATA}")]
    Missing {
        /// The file that was looked for.
        path: PathBuf,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A batch file's length is not a whole number of 3073-byte records (truncated or not
    /// a CIFAR-10 binary file), or it is empty.
    #[error(
        "{path} has {len} bytes, not a positive multiple of 3073 (1 label byte + 3072 pixel \
         bytes per image): the file is truncated or not a CIFAR-10 binary batch; download it again"
    )]
    Length {
        /// The file.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
    },
    /// A record's label is not a class index (0 to 9).
    #[error(
        "{path}, record {record} (byte offset {offset}): label {label} is not a CIFAR-10 class \
         (0-9): the file is corrupt or from another data set (CIFAR-100?)"
    )]
    Label {
        /// The file.
        path: PathBuf,
        /// The record's index in the file.
        record: usize,
        /// The record's byte offset in the file.
        offset: u64,
        /// The label byte found.
        label: u8,
    },
    /// The `.tar.gz` archive cannot be read.
    #[error("cannot read the archive {path}: {message}; download cifar-10-binary.tar.gz again")]
    Archive {
        /// The archive.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A file's checksum differs from the published one.
    #[error(
        "{path}: {algorithm} checksum {found} differs from the published {expected}: the file is \
         corrupt or incomplete; delete it and download it again"
    )]
    Checksum {
        /// The file.
        path: PathBuf,
        /// `MD5` or `SHA-256`.
        algorithm: &'static str,
        /// The published checksum.
        expected: String,
        /// The checksum of the file.
        found: String,
    },
    /// The download failed (offline, server error, interrupted).
    #[error(
        "cannot download {url}: {message}. Without internet, fetch that file on another machine and \
         put it (or its extracted cifar-10-batches-bin folder) into {dir}, or pass --data-dir"
    )]
    Download {
        /// What was fetched.
        url: String,
        /// Where it was going.
        dir: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl Cifar10Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Cifar10Error::Missing { path: path.into() }
        } else {
            Cifar10Error::Io {
                path: path.into(),
                source,
            }
        }
    }
}
