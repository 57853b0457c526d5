//! Image bytes → 224×224 RGB → CLIP-normalised pixel values. Shared by ingest and generation so
//! both see identical pixels. The resize is PIL's `image.resize((224, 224))`: bicubic
//! (Catmull-Rom, a = -0.5, support scaled when shrinking), aspect ratio not kept.

use candle_core::{Device, Tensor};
use fast_image_resize::{images::Image, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::shards::reject::Reason;

/// CLIP's normalisation, as in `preprocessor_config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Normalization {
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl Default for Normalization {
    // OpenAI's published constants, verbatim.
    #[allow(clippy::excessive_precision)]
    fn default() -> Self {
        Self {
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_58, 0.275_777_11],
        }
    }
}

/// How large an image may be. Checked before decoding, from the file's size and its header's
/// width and height: a 97 KB PNG can declare 10,000 × 10,000 pixels, and decoding it would take
/// the memory of a whole run or server. Decoding the largest image allowed by the defaults (40 MP)
/// takes ~120 MB of RGB pixels; the resize adds a few tens of MB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageLimits {
    /// Widest and tallest image, pixels.
    #[serde(default = "default_max_side")]
    pub max_side: u32,
    /// Most pixels (width × height).
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    /// Largest file (or zip entry, inflated), bytes.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
}

fn default_max_side() -> u32 {
    8192
}
fn default_max_pixels() -> u64 {
    40_000_000
}
fn default_max_bytes() -> u64 {
    64 << 20
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_side: default_max_side(),
            max_pixels: default_max_pixels(),
            max_bytes: default_max_bytes(),
        }
    }
}

impl ImageLimits {
    /// Whether a `w`×`h` image fits.
    pub fn check(&self, w: u32, h: u32) -> std::result::Result<(), (Reason, String)> {
        if w > self.max_side || h > self.max_side || w as u64 * h as u64 > self.max_pixels {
            return Err((
                Reason::ImageTooLarge,
                format!(
                    "{w}×{h} pixels, over the limit of {} per side and {} in all",
                    self.max_side, self.max_pixels
                ),
            ));
        }
        Ok(())
    }
}

/// Decode JPEG/PNG (any colour type), WebP or GIF (its first frame) to 8-bit RGB, as PIL's `convert('RGB')` does — after
/// checking the file's size and the header's dimensions against `limits`.
pub fn decode_rgb(
    bytes: &[u8],
    limits: &ImageLimits,
) -> std::result::Result<image::RgbImage, (Reason, String)> {
    if bytes.is_empty() {
        return Err((Reason::EmptyImage, "zero bytes".into()));
    }
    if bytes.len() as u64 > limits.max_bytes {
        return Err((
            Reason::ImageTooLarge,
            format!(
                "{} bytes, over the limit of {}",
                bytes.len(),
                limits.max_bytes
            ),
        ));
    }
    let corrupt = |e: &dyn std::fmt::Display| (Reason::CorruptImage, e.to_string());
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| corrupt(&e))
    };
    let (w, h) = reader()?.into_dimensions().map_err(|e| corrupt(&e))?;
    limits.check(w, h)?;
    let mut decoder = reader()?;
    // The decoder's own allocation limit, as a second line behind the header check: RGBA at 16
    // bits per channel is the largest form the pixels can take.
    let mut guard = image::Limits::default();
    guard.max_image_width = Some(limits.max_side);
    guard.max_image_height = Some(limits.max_side);
    guard.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    decoder.limits(guard);
    let img = decoder.decode().map_err(|e| corrupt(&e))?;
    Ok(img.into_rgb8())
}

/// Rows converted to f32 at a time in the horizontal pass.
const BAND_ROWS: u32 = 64;

/// Bicubic resize of an RGB image to `size`×`size`, HWC u8.
///
/// Done as PIL does it: a horizontal pass, rounding and clipping to u8, then a vertical pass.
/// Each pass convolves in f32 (PIL uses 22-bit fixed-point taps, near exact). fast_image_resize's
/// one-shot u8 path (16-bit taps, no intermediate clipping) lands up to 3 steps from PIL; this
/// lands within 1.
///
/// The horizontal pass runs a band of rows at a time (each output row depends on its input row
/// only), so a large image is never copied whole into f32: the cost beyond its u8 pixels is one
/// band and the `size`-wide intermediate.
pub fn resize_rgb(img: &image::RgbImage, size: u32) -> Vec<u8> {
    resize_rgb_banded(img, size, BAND_ROWS)
}

fn resize_rgb_banded(img: &image::RgbImage, size: u32, band: u32) -> Vec<u8> {
    let (w, h) = img.dimensions();
    let raw = img.as_raw();
    let row = w as usize * 3;
    let mut pixels: Vec<f32> = if w != size {
        let mut narrow = Vec::with_capacity(size as usize * h as usize * 3);
        for top in (0..h).step_by(band.max(1) as usize) {
            let rows = band.min(h - top);
            let start = top as usize * row;
            let src = raw[start..start + rows as usize * row]
                .iter()
                .map(|&v| v as f32)
                .collect();
            narrow.extend(resize_pass(src, (w, rows), (size, rows)));
        }
        narrow
    } else {
        raw.iter().map(|&v| v as f32).collect()
    };
    if h != size {
        pixels = resize_pass(pixels, (size, h), (size, size));
    }
    pixels.into_iter().map(|v| v as u8).collect()
}

/// One bicubic pass in f32, rounded and clipped to the u8 range like PIL's intermediate image.
fn resize_pass(mut src: Vec<f32>, (w, h): (u32, u32), (dw, dh): (u32, u32)) -> Vec<f32> {
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut src);
    let src = Image::from_slice_u8(w, h, bytes, PixelType::F32x3).expect("buffer is w*h*3 f32");
    let mut dst = Image::new(dw, dh, PixelType::F32x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .expect("same pixel type, non-empty images");
    dst.buffer()
        .chunks_exact(4)
        .map(|b| {
            f32::from_ne_bytes([b[0], b[1], b[2], b[3]])
                .round()
                .clamp(0.0, 255.0)
        })
        .collect()
}

/// Decode and resize in one step: what each ingest worker does per image.
pub fn load_resized(
    bytes: &[u8],
    size: u32,
    limits: &ImageLimits,
) -> std::result::Result<Vec<u8>, (Reason, String)> {
    let img = decode_rgb(bytes, limits)?;
    if img.width() == 0 || img.height() == 0 {
        return Err((Reason::CorruptImage, "zero-sized image".into()));
    }
    Ok(resize_rgb(&img, size))
}

/// HWC u8 images → (B, 3, size, size) f32 pixel values, `(x/255 - mean) / std`, through a
/// 3×256 table holding exactly what HF computes for each channel and byte value. On a GPU the
/// bytes go to the device as they are (a quarter of the f32 size) and are mapped there.
pub fn pixel_values(
    images: &[&[u8]],
    size: usize,
    norm: &Normalization,
    device: &Device,
) -> Result<Tensor> {
    use rayon::prelude::*;
    let plane = size * size;
    if let Some(bad) = images.iter().find(|img| img.len() != plane * 3) {
        return Err(crate::Error::Data(format!(
            "pixel_values: an image has {} bytes, expected {size}×{size}×3",
            bad.len()
        )));
    }
    // HF rescales in f64 then casts to f32 before normalising; so does the table.
    let table: Vec<f32> = (0..3)
        .flat_map(|c| {
            (0..256).map(move |v| {
                let x = (v as f64 * (1.0 / 255.0)) as f32;
                (x - norm.image_mean[c]) / norm.image_std[c]
            })
        })
        .collect();
    let n = images.len();
    if device.is_cpu() {
        let mut data = vec![0f32; n * 3 * plane];
        data.par_chunks_mut(3 * plane)
            .zip(images.par_iter())
            .for_each(|(out, img)| {
                for (p, px) in img.chunks_exact(3).enumerate() {
                    for c in 0..3 {
                        out[c * plane + p] = table[c * 256 + px[c] as usize];
                    }
                }
            });
        return Ok(Tensor::from_vec(data, (n, 3, size, size), device)?);
    }
    mapped_on_device(images, size, table, device)
}

/// The GPU path of [`pixel_values`]: u8 bytes up, the table lookup on the device.
fn mapped_on_device(
    images: &[&[u8]],
    size: usize,
    table: Vec<f32>,
    device: &Device,
) -> Result<Tensor> {
    let n = images.len();
    let table = Tensor::from_vec(table, 3 * 256, device)?;
    let channel = Tensor::new(&[0u32, 256, 512], device)?;
    let index = Tensor::from_vec(images.concat(), (n, size, size, 3), device)?
        .to_dtype(candle_core::DType::U32)?
        .broadcast_add(&channel)?;
    Ok(table
        .index_select(&index.flatten_all()?, 0)?
        .reshape((n, size, size, 3))?
        .permute((0, 3, 1, 2))?
        .contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_path_of_pixel_values_equals_the_host_path_bit_for_bit() {
        let size = 8;
        let imgs: Vec<Vec<u8>> = (0..3u32)
            .map(|i| {
                (0..size * size * 3)
                    .map(|j| ((j as u32 * 37 + i * 101) % 256) as u8)
                    .collect()
            })
            .collect();
        let refs: Vec<&[u8]> = imgs.iter().map(|v| v.as_slice()).collect();
        let norm = Normalization::default();
        let host = pixel_values(&refs, size, &norm, &Device::Cpu).unwrap();
        let table: Vec<f32> = (0..3)
            .flat_map(|c| {
                (0..256).map(move |v| {
                    ((v as f64 * (1.0 / 255.0)) as f32 - norm.image_mean[c]) / norm.image_std[c]
                })
            })
            .collect();
        let dev = mapped_on_device(&refs, size, table, &Device::Cpu).unwrap();
        assert_eq!(host.dims(), &[3, 3, size, size]);
        let (a, b) = (
            host.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            dev.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        // Channel-first: pixel 0's red value sits at [0, 0, 0, 0], its green one a plane later.
        assert_eq!(a[size * size], b[size * size]);
        let bad = pixel_values(&[&imgs[0][1..]], size, &norm, &Device::Cpu);
        assert!(bad.is_err());
    }

    /// The banded horizontal pass computes exactly what one pass over the whole image does.
    #[test]
    fn a_banded_resize_equals_a_whole_image_resize() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for (w, h) in [(300, 131), (97, 500), (224, 300), (500, 224)] {
            let px: Vec<u8> = (0..w * h * 3).map(|_| rng.random()).collect();
            let img = image::RgbImage::from_raw(w, h, px).unwrap();
            let whole = resize_rgb_banded(&img, 224, h);
            for band in [1, 7, 64] {
                assert_eq!(
                    resize_rgb_banded(&img, 224, band),
                    whole,
                    "{w}×{h}, band {band}"
                );
            }
        }
    }

    #[test]
    fn images_over_the_limits_are_refused_from_their_header() {
        let limits = ImageLimits {
            max_side: 100,
            max_pixels: 5000,
            max_bytes: 1 << 20,
        };
        let png = |w, h| {
            let mut buf = std::io::Cursor::new(Vec::new());
            image::GrayImage::new(w, h)
                .write_to(&mut buf, image::ImageFormat::Png)
                .unwrap();
            buf.into_inner()
        };
        assert!(decode_rgb(&png(50, 100), &limits).is_ok());
        for (w, h) in [(101, 10), (10, 101), (80, 80)] {
            let err = decode_rgb(&png(w, h), &limits).unwrap_err();
            assert_eq!(err.0, Reason::ImageTooLarge, "{w}×{h}: {}", err.1);
        }
        let tiny = ImageLimits {
            max_bytes: 10,
            ..limits
        };
        assert_eq!(
            decode_rgb(&png(5, 5), &tiny).unwrap_err().0,
            Reason::ImageTooLarge
        );
    }
}
