//! Images from files as the examples read them: decoded strictly (a truncated or corrupt file
//! is an error that names it, as PIL refuses one, where a lenient decoder would fill the
//! missing part with grey) and converted to 8-bit RGB, as torchvision's `pil_loader` does
//! (`Image.open(f).convert("RGB")`): grey repeated, alpha dropped, palettes looked up, and
//! 16-bit samples cut to their high byte as Pillow reads 16-bit RGB. (Pillow's conversion of a
//! 16-bit *grey* image clips every value above 255 to white; that is not copied.)

use std::path::Path;

use anyhow::{Context, Result, bail};
use image::{DynamicImage, ImageFormat, RgbImage};

/// The image at `path` (JPEG or PNG), as 8-bit RGB.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    decode_rgb(&bytes).with_context(|| format!("decoding {}", path.display()))
}

/// [`load_rgb`] on the bytes of a file.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    let format = image::guess_format(bytes).context("not an image file (JPEG or PNG)")?;
    match format {
        ImageFormat::Jpeg if !jpeg_is_complete(bytes) => {
            bail!("the JPEG is truncated (it has no end-of-image marker); the file is damaged")
        }
        ImageFormat::Png if !png_is_complete(bytes) => {
            bail!("the PNG is truncated (it has no IEND chunk); the file is damaged")
        }
        ImageFormat::Jpeg | ImageFormat::Png => {}
        other => bail!("{other:?} images are not supported: convert it to PNG or JPEG"),
    }
    let image = image::load_from_memory_with_format(bytes, format)?;
    Ok(match image {
        DynamicImage::ImageRgb16(_)
        | DynamicImage::ImageRgba16(_)
        | DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_) => {
            let rgb16 = image.to_rgb16();
            let (width, height) = rgb16.dimensions();
            let high_bytes = rgb16
                .into_raw()
                .into_iter()
                .map(|v| (v >> 8) as u8)
                .collect();
            RgbImage::from_raw(width, height, high_bytes).expect("the same number of samples")
        }
        other => other.to_rgb8(),
    })
}

/// Whether a JPEG has its end-of-image marker (FF D9) after its first scan (FF DA). Inside a
/// scan's entropy-coded data an FF byte is followed by 00 or a restart marker, never D9, so
/// the marker marks the end.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let marker = |m: u8| move |w: &[u8]| w == [0xff, m];
    let Some(scan) = bytes.windows(2).position(marker(0xda)) else {
        return false;
    };
    bytes[scan..].windows(2).any(marker(0xd9))
}

/// Whether a PNG has its IEND chunk, the name and its CRC (the last 8 bytes of a whole file;
/// a few bytes may follow).
fn png_is_complete(bytes: &[u8]) -> bool {
    let start = bytes.len().saturating_sub(72);
    bytes[start..]
        .windows(4)
        .enumerate()
        .any(|(i, w)| w == b"IEND" && start + i + 8 <= bytes.len())
}
