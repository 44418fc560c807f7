//! CIFAR-10 files in the official binary format, written for tests (shared with the
//! workspace's integration tests, which include this file by path).

use std::path::{Path, PathBuf};

use cifar10_burn::Split;
use cifar10_burn::format::{IMAGE_BYTES, encode_batch};

/// A fresh folder for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cifar10-burn-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A recognizable image: every byte derived from the label and the record's index.
pub fn image(label: u8, index: usize) -> Vec<u8> {
    (0..IMAGE_BYTES)
        .map(|p| ((p * 7 + index * 13 + label as usize * 31) % 251) as u8)
        .collect()
}

/// Writes a folder in the official layout with `per_file` records per batch file; record
/// `i` of a file has label `i % 10`.
pub fn write_fake_cifar(dir: &Path, per_file: usize) {
    // The files are numbered within their split: the first test file is numbered as the first
    // training file.
    let train_files = Split::Train.files().len();
    write_cifar_files(dir, per_file, |file, i| {
        let label = (i % 10) as u8;
        (label, image(label, (file % train_files) * 1000 + i))
    });
}

/// Writes the six files of the official layout, training files first, `per_file` records each:
/// `record(file, i)`, the label and the image of record `i` of the `file`-th of them.
pub fn write_cifar_files(
    dir: &Path,
    per_file: usize,
    record: impl Fn(usize, usize) -> (u8, Vec<u8>),
) {
    let files = Split::Train.files().iter().chain(Split::Test.files());
    for (file, name) in files.enumerate() {
        let images: Vec<(u8, Vec<u8>)> = (0..per_file).map(|i| record(file, i)).collect();
        let bytes = encode_batch(images.iter().map(|(l, im)| (*l, im.as_slice())));
        std::fs::write(dir.join(name), bytes).expect("write batch");
    }
}
