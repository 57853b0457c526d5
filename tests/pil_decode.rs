//! Decoding and resizing against PIL on files Pillow wrote (`tests/fixtures/pil/`, with the
//! pixels PIL's `Image.open(f).convert('RGB')` and `.resize((224, 224))` give, and the Pillow and
//! libjpeg-turbo versions in `meta.json`): JPEG baseline and progressive with 4:4:4, 4:2:2 and
//! 4:2:0 chroma, an odd size, grayscale and Adobe CMYK; PNG RGBA, palette (with and without
//! transparency) and gray + alpha; 16-bit PNG gray (which PIL clips at 255), gray + alpha, RGB and
//! RGBA (PIL keeps the high byte). Decoding and resizing must equal PIL's byte for byte.

mod common;

use minimind_v::vision::preprocess::{decode_rgb, load_resized, ImageLimits};

fn fixtures() -> std::path::PathBuf {
    common::repo().join("tests/fixtures/pil")
}

fn png_rgb(name: &str) -> image::RgbImage {
    image::open(fixtures().join(name)).unwrap().into_rgb8()
}

fn cases() -> Vec<String> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("meta.json")).unwrap())
            .unwrap();
    let mut names: Vec<String> = meta["cases"].as_object().unwrap().keys().cloned().collect();
    names.sort();
    names
}

#[test]
fn decoding_and_resizing_equal_pil_byte_for_byte() {
    let limits = ImageLimits::default();
    let names = cases();
    assert!(names.len() >= 16, "{names:?}");
    let mut failures = Vec::new();
    for name in &names {
        let bytes = std::fs::read(fixtures().join(name)).unwrap();
        let ours = decode_rgb(&bytes, &limits).unwrap();
        let pil = png_rgb(&format!("{name}.pil.decoded.png"));
        assert_eq!(ours.dimensions(), pil.dimensions(), "{name}");
        let (a, b) = (ours.as_raw(), pil.as_raw());
        let differ = a.iter().zip(b).filter(|(x, y)| x != y).count();
        let worst = a.iter().zip(b).map(|(&x, &y)| x.abs_diff(y)).max().unwrap();
        if differ > 0 {
            failures.push(format!(
                "{name}: decoded: {differ} of {} values differ, by up to {worst}",
                a.len()
            ));
        }
        let resized = load_resized(&bytes, 224, &limits).unwrap();
        let pil = png_rgb(&format!("{name}.pil.resized.png"));
        let worst = resized
            .iter()
            .zip(pil.as_raw())
            .map(|(&x, &y)| x.abs_diff(y))
            .max()
            .unwrap();
        if worst > 0 {
            failures.push(format!("{name}: resized: up to {worst} levels from PIL"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The fixtures tell decoders apart: the `image` crate's own JPEG decoder (its IDCT and chroma
/// upsampling are not libjpeg's) lands several levels from PIL on the 4:2:0 file.
#[test]
fn the_fixtures_tell_another_jpeg_decoder_from_pils() {
    let bytes = std::fs::read(fixtures().join("rgb420.jpg")).unwrap();
    let other = image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg)
        .unwrap()
        .into_rgb8();
    let pil = png_rgb("rgb420.jpg.pil.decoded.png");
    let worst = other
        .as_raw()
        .iter()
        .zip(pil.as_raw())
        .map(|(&x, &y)| x.abs_diff(y))
        .max();
    assert!(worst > Some(1), "{worst:?}");
}

/// The 16-bit fixtures can tell PIL's conversion from another: the `image` crate's own
/// `into_rgb8` (v / 257, rounded; no clipping) differs from PIL's on every one of them.
#[test]
fn the_16_bit_fixtures_tell_a_scaling_conversion_from_pils() {
    let sixteen: Vec<String> = cases().into_iter().filter(|n| n.contains("16")).collect();
    assert_eq!(sixteen.len(), 5, "{sixteen:?}");
    for name in &sixteen {
        let bytes = std::fs::read(fixtures().join(name)).unwrap();
        let scaled = image::load_from_memory(&bytes).unwrap().into_rgb8();
        let pil = png_rgb(&format!("{name}.pil.decoded.png"));
        let differ = scaled
            .as_raw()
            .iter()
            .zip(pil.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert!(differ > 0, "{name}: a scaling conversion passes as PIL's");
    }
}
