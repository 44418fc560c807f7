//! The CIFAR-10 binary record format: parsing and validation, no I/O policy.
//!
//! A batch file is a sequence of 3073-byte records: one label byte (0-9), then 3072 pixel
//! bytes, the 1024 red values, the 1024 green values and the 1024 blue values of a 32x32
//! image, each plane row-major. The record count comes from the file length.

use std::path::Path;

use crate::Cifar10Error;

/// Image height and width.
pub const SIDE: usize = 32;
/// Colour channels.
pub const CHANNELS: usize = 3;
/// Pixel bytes of one image: `3 * 32 * 32`.
pub const IMAGE_BYTES: usize = CHANNELS * SIDE * SIDE;
/// Bytes of one record: a label byte and the image.
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
/// Number of classes.
pub const NUM_CLASSES: usize = 10;

/// The ten class names, indexed by label.
pub const CLASSES: [&str; NUM_CLASSES] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Checks that `bytes` (the contents of `path`) is a batch file and appends its labels and
/// pixels to `labels` and `images`. Returns the number of records.
pub fn parse_batch(
    bytes: &[u8],
    path: &Path,
    labels: &mut Vec<u8>,
    images: &mut Vec<u8>,
) -> Result<usize, Cifar10Error> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD_BYTES) {
        return Err(Cifar10Error::Length {
            path: path.to_path_buf(),
            len: bytes.len() as u64,
        });
    }
    let records = bytes.len() / RECORD_BYTES;
    labels.reserve_exact(records);
    images.reserve_exact(records * IMAGE_BYTES);
    for (record, chunk) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let label = chunk[0];
        if label as usize >= NUM_CLASSES {
            return Err(Cifar10Error::Label {
                path: path.to_path_buf(),
                record,
                offset: (record * RECORD_BYTES) as u64,
                label,
            });
        }
        labels.push(label);
        images.extend_from_slice(&chunk[1..]);
    }
    Ok(records)
}

/// Encodes images and labels as a batch file: the inverse of [`parse_batch`], for tests and
/// tools that write small CIFAR-10 files.
///
/// # Panics
///
/// If an image does not have [`IMAGE_BYTES`] bytes.
pub fn encode_batch<'a>(records: impl IntoIterator<Item = (u8, &'a [u8])>) -> Vec<u8> {
    let mut bytes = Vec::new();
    for (label, image) in records {
        assert_eq!(image.len(), IMAGE_BYTES, "an image has {IMAGE_BYTES} bytes");
        bytes.push(label);
        bytes.extend_from_slice(image);
    }
    bytes
}
