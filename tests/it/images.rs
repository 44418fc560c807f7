//! Image files as the examples read them: every colour type to RGB, truncated and corrupt
//! files refused with the file's name.

use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, LumaA, Rgb, Rgba};
use resnet_burn_examples::image::load_rgb;

use crate::cifar_files::scratch;

/// A 40x30 picture with structure in every channel.
fn picture() -> DynamicImage {
    DynamicImage::ImageRgb8(ImageBuffer::from_fn(40, 30, |x, y| {
        Rgb([(x * 6) as u8, (y * 8) as u8, ((x + y) * 3) as u8])
    }))
}

fn encoded(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, format).expect("encoded");
    out.into_inner()
}

#[test]
fn every_colour_type_reads_as_rgb() {
    let dir = scratch("images-colour");
    let rgb = picture();
    let grey = DynamicImage::ImageLuma8(ImageBuffer::from_fn(40, 30, |x, _| Luma([x as u8 * 6])));
    let grey_alpha =
        DynamicImage::ImageLumaA8(ImageBuffer::from_fn(40, 30, |x, _| LumaA([x as u8, 128])));
    let alpha = DynamicImage::ImageRgba8(ImageBuffer::from_fn(40, 30, |x, y| {
        Rgba([x as u8, y as u8, 7, 9])
    }));
    let deep = DynamicImage::ImageRgb16(ImageBuffer::from_fn(40, 30, |x, _| {
        Rgb([x as u16 * 1000, 65535, 257])
    }));
    let cases = [
        ("rgb.png", &rgb, ImageFormat::Png, [36u8, 40, 33]),
        ("rgb.jpg", &rgb, ImageFormat::Jpeg, [36, 40, 33]),
        ("grey.png", &grey, ImageFormat::Png, [36, 36, 36]),
        ("grey-alpha.png", &grey_alpha, ImageFormat::Png, [6, 6, 6]),
        ("alpha.png", &alpha, ImageFormat::Png, [6, 5, 7]),
        // 16 bits to 8: v / 257, rounded (6000 -> 23).
        ("deep.png", &deep, ImageFormat::Png, [23, 255, 1]),
    ];
    for (name, image, format, at_6_5) in cases {
        let path = dir.join(name);
        std::fs::write(&path, encoded(image, format)).unwrap();
        let rgb = load_rgb(&path).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(rgb.dimensions(), (40, 30), "{name}");
        let pixel = *rgb.get_pixel(6, 5);
        let tolerance = if format == ImageFormat::Jpeg { 6 } else { 0 };
        for c in 0..3 {
            let (got, want) = (i32::from(pixel[c]), i32::from(at_6_5[c]));
            assert!(
                (got - want).abs() <= tolerance,
                "{name}: {pixel:?} against {at_6_5:?}"
            );
        }
    }
}

#[test]
fn truncated_and_corrupt_files_are_errors_that_name_them() {
    let dir = scratch("images-truncated");
    for (name, format) in [
        ("cut.jpg", ImageFormat::Jpeg),
        ("cut.png", ImageFormat::Png),
    ] {
        let whole = encoded(&picture(), format);
        for keep in [
            whole.len() / 4,
            whole.len() / 2,
            whole.len() - 20,
            whole.len() - 2,
        ] {
            let path = dir.join(name);
            std::fs::write(&path, &whole[..keep]).unwrap();
            let error = format!("{:#}", load_rgb(&path).expect_err(name));
            assert!(
                error.contains(&path.display().to_string()) && error.contains("damaged"),
                "{name} cut at {keep}: {error}"
            );
        }
    }
    let text = dir.join("notes.jpg");
    std::fs::write(&text, "not a picture").unwrap();
    let error = format!("{:#}", load_rgb(&text).unwrap_err());
    assert!(
        error.contains("notes.jpg") && error.contains("not an image"),
        "{error}"
    );
    let missing = dir.join("missing.png");
    let error = format!("{:#}", load_rgb(&missing).unwrap_err());
    assert!(error.contains("missing.png"), "{error}");
}
