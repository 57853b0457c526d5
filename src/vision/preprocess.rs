//! Image bytes → 224×224 RGB → CLIP-normalised pixel values. Shared by ingest and generation so
//! both see identical pixels, PIL's: JPEGs decoded by libjpeg-turbo as PIL does, the resize PIL's
//! `image.resize((224, 224))` in its own fixed point (bicubic, a = -0.5, support scaled when
//! shrinking; aspect ratio not kept).

use candle_core::{Device, Tensor};
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
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return decode_jpeg(bytes, limits);
    }
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
    Ok(to_rgb8_as_pil(img))
}

/// `convert('RGB')` as PIL does it. 8-bit images convert as the `image` crate converts them (alpha
/// dropped, gray replicated). 16-bit ones do not: PIL reads 16-bit RGB, RGBA and gray + alpha
/// PNGs as 8-bit keeping each sample's high byte, where the `image` crate rounds v / 257; and it
/// opens 16-bit gray as `I;16`, whose conversion to 8 bits CLIPS at 255 (1000 → 255, so most of a
/// 16-bit gray photo turns white). Odd, but it is what upstream's model saw; we do the same.
fn to_rgb8_as_pil(img: image::DynamicImage) -> image::RgbImage {
    use image::DynamicImage as D;
    let rgb = |w, h, f: &dyn Fn(u32, u32) -> [u8; 3]| {
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)))
    };
    let high = |v: u16| (v >> 8) as u8;
    match img {
        D::ImageLuma16(g) => rgb(g.width(), g.height(), &|x, y| {
            let v = g.get_pixel(x, y)[0].min(255) as u8;
            [v; 3]
        }),
        D::ImageLumaA16(g) => rgb(g.width(), g.height(), &|x, y| {
            [high(g.get_pixel(x, y)[0]); 3]
        }),
        D::ImageRgb16(c) => rgb(c.width(), c.height(), &|x, y| c.get_pixel(x, y).0.map(high)),
        D::ImageRgba16(c) => rgb(c.width(), c.height(), &|x, y| {
            let [r, g, b, _] = c.get_pixel(x, y).0;
            [high(r), high(g), high(b)]
        }),
        other => other.into_rgb8(),
    }
}

/// A JPEG decoded by libjpeg-turbo with its defaults — accurate integer IDCT, "fancy" chroma
/// upsampling — which is what PIL does, so the pixels are PIL's bit for bit. Grayscale comes out
/// replicated to RGB as PIL's `convert('RGB')` does; CMYK and YCCK (Adobe's inverted form, as
/// Photoshop and PIL write it) through PIL's CMYK → RGB formula.
fn decode_jpeg(
    bytes: &[u8],
    limits: &ImageLimits,
) -> std::result::Result<image::RgbImage, (Reason, String)> {
    use turbojpeg::{Colorspace, PixelFormat};
    let corrupt = |e: turbojpeg::Error| (Reason::CorruptImage, e.to_string());
    let mut d = turbojpeg::Decompressor::new().map_err(corrupt)?;
    let header = d.read_header(bytes).map_err(corrupt)?;
    let (w, h) = (header.width, header.height);
    limits.check(w as u32, h as u32)?;
    let cmyk = matches!(header.colorspace, Colorspace::CMYK | Colorspace::YCCK);
    let format = if cmyk {
        PixelFormat::CMYK
    } else {
        PixelFormat::RGB
    };
    let channels = format.size();
    let mut pixels = vec![0u8; w * h * channels];
    let image = turbojpeg::Image {
        pixels: pixels.as_mut_slice(),
        width: w,
        pitch: w * channels,
        height: h,
        format,
    };
    d.decompress(bytes, image).map_err(corrupt)?;
    if cmyk {
        pixels = pixels.chunks_exact(4).flat_map(adobe_cmyk_to_rgb).collect();
    }
    Ok(image::RgbImage::from_raw(w as u32, h as u32, pixels).expect("w × h × 3 bytes"))
}

/// PIL's conversion of an Adobe (inverted) CMYK pixel as libjpeg returns it: PIL reads it as
/// `CMYK;I` (each value inverted), then `convert('RGB')` gives `255 - K - C × (255 - K) / 255`
/// per channel, the product rounded as PIL's `MULDIV255`.
fn adobe_cmyk_to_rgb(p: &[u8]) -> [u8; 3] {
    let nk = p[3] as u32; // 255 - K with K = 255 - p[3]
    let channel = |v: u8| {
        let c = 255 - v as u32;
        let t = c * nk + 128;
        (nk - (((t >> 8) + t) >> 8)) as u8
    };
    [channel(p[0]), channel(p[1]), channel(p[2])]
}

/// Fixed-point bits of PIL's 8-bit resampling taps (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Bicubic resize of an RGB image to `size`×`size`, HWC u8: PIL's `image.resize((size, size))`
/// exactly — the same taps (Catmull-Rom, a = -0.5, support widened when shrinking, normalised,
/// rounded to 22-bit fixed point), a horizontal pass rounded to u8, then a vertical one. General
/// resizers (fast_image_resize's 16-bit taps, or f32 ones) land one to three levels away.
pub fn resize_rgb(img: &image::RgbImage, size: u32) -> Vec<u8> {
    let (w, h) = img.dimensions();
    let narrow;
    let rows: &[u8] = match w != size {
        true => {
            narrow = resample(img.as_raw(), (w, h), size, Axis::Horizontal);
            &narrow
        }
        false => img.as_raw(),
    };
    match h != size {
        true => resample(rows, (size, h), size, Axis::Vertical),
        false => rows.to_vec(),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Axis {
    Horizontal,
    Vertical,
}

/// PIL's `precompute_coeffs` and `normalize_coeffs_8bpc`: for each output position, the first
/// input index, the number of taps, and the taps (`ksize` apart) in fixed point.
fn coefficients(in_size: u32, out_size: u32) -> (usize, Vec<(usize, usize)>, Vec<i32>) {
    let bicubic = |x: f64| {
        let (a, x) = (-0.5, x.abs());
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * a
        } else {
            0.0
        }
    };
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let one = (1u32 << PRECISION_BITS) as f64;
    let mut bounds = Vec::with_capacity(out_size as usize);
    let mut taps = vec![0i32; out_size as usize * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size as usize {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) casts truncate toward zero, as `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            *kx = bicubic(((x + xmin) as f64 - center + 0.5) / filterscale);
            ww += *kx;
        }
        for (x, &kx) in k.iter().enumerate().take(xmax) {
            let v = if ww != 0.0 { kx / ww } else { kx };
            let r = if v < 0.0 { -0.5 } else { 0.5 };
            taps[xx * ksize + x] = (r + v * one) as i32;
        }
        bounds.push((xmin, xmax));
    }
    (ksize, bounds, taps)
}

/// One pass of PIL's 8-bit resampling over RGB pixels `(w, h)`, along `axis` to `out` pixels.
fn resample(src: &[u8], (w, h): (u32, u32), out: u32, axis: Axis) -> Vec<u8> {
    let (w, h, out) = (w as usize, h as usize, out as usize);
    let in_size = if axis == Axis::Horizontal { w } else { h };
    let (ksize, bounds, taps) = coefficients(in_size as u32, out as u32);
    let (ow, oh) = match axis {
        Axis::Horizontal => (out, h),
        Axis::Vertical => (w, out),
    };
    let clip8 = |ss: i32| (ss >> PRECISION_BITS).clamp(0, 255) as u8;
    let mut dst = vec![0u8; ow * oh * 3];
    if axis == Axis::Vertical {
        // Row by row: each tap adds a whole input row (contiguous, so the compiler vectorises).
        let row = w * 3;
        let mut ss = vec![0i32; row];
        for (y, out_row) in dst.chunks_exact_mut(row).enumerate() {
            let (min, n) = bounds[y];
            ss.fill(1 << (PRECISION_BITS - 1));
            for (t, &kt) in taps[y * ksize..y * ksize + n].iter().enumerate() {
                let src_row = &src[(min + t) * row..(min + t + 1) * row];
                for (acc, &v) in ss.iter_mut().zip(src_row) {
                    *acc += v as i32 * kt;
                }
            }
            for (o, &acc) in out_row.iter_mut().zip(&ss) {
                *o = clip8(acc);
            }
        }
        return dst;
    }
    for y in 0..oh {
        for x in 0..ow {
            let i = if axis == Axis::Horizontal { x } else { y };
            let (min, n) = bounds[i];
            let k = &taps[i * ksize..i * ksize + n];
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for (t, &kt) in k.iter().enumerate() {
                let p = match axis {
                    Axis::Horizontal => (y * w + min + t) * 3,
                    Axis::Vertical => ((min + t) * w + x) * 3,
                };
                for c in 0..3 {
                    ss[c] += src[p + c] as i32 * kt;
                }
            }
            let o = (y * ow + x) * 3;
            for c in 0..3 {
                dst[o + c] = clip8(ss[c]);
            }
        }
    }
    dst
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
