//! Image preprocessing and CLIP features against `../shared/reference/clip_small/` (HF
//! transformers' CLIPImageProcessor and CLIPVisionModel on a small seeded tower).
//! Tolerances: resized pixels within 1 u8 step (PIL's fixed-point bicubic vs ours); pixel values
//! 1e-6 (f32 rounding); features 1e-4 (f32, 4 layers, different matmul order).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use minimind_v::compare::Diff;
use minimind_v::vision::clip::{ClipSource, ClipTower};
use minimind_v::vision::preprocess::{decode_rgb, pixel_values, resize_rgb, Normalization};

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        common::reference().join("clip_small/expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::U8)
        .unwrap()
        .to_vec1::<u8>()
        .unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn max_u8_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// Pixel values within 1e-6 of CLIPImageProcessor's (f32 rounding).
fn check_pixel_values(got: &[f32], want: &[f32]) -> Result<(), String> {
    Diff::of(got, want).check_abs(1e-6, "pixel values")
}

/// Features within 1e-4 of HF's (f32, 4 layers, another matmul order).
fn check_features(got: &[f32], want: &[f32]) -> Result<(), String> {
    Diff::of(got, want).check_abs(1e-4, "features")
}

/// An f16 tower's features within 1e-2 of the f32 ones, relative to their largest magnitude.
fn check_f16_features(got: &[f32], want: &[f32]) -> Result<(), String> {
    Diff::of(got, want).check_rel(1e-2, "f16 features")
}

const IMAGES: [&str; 4] = ["img0.png", "img1.png", "img2.jpg", "img3.jpg"];

#[test]
fn decode_matches_pil() {
    let exp = expected();
    for (i, name) in IMAGES.iter().enumerate() {
        let bytes =
            std::fs::read(common::reference().join("clip_small/images").join(name)).unwrap();
        let img = decode_rgb(&bytes, &Default::default()).unwrap();
        let want = &exp[&format!("decoded_u8.{i}")];
        let (h, w, _) = want.dims3().unwrap();
        assert_eq!(
            (img.height() as usize, img.width() as usize),
            (h, w),
            "{name}"
        );
        let diff = max_u8_diff(img.as_raw(), &u8s(want));
        // PNG and JPEG alike: JPEGs are decoded by libjpeg-turbo with PIL's settings.
        assert_eq!(diff, 0, "{name}: decoded pixels differ by {diff}");
    }
}

#[test]
fn resize_matches_pil_bicubic_exactly() {
    let exp = expected();
    let resized = u8s(&exp["resized_u8"]);
    let per = 224 * 224 * 3;
    for (i, name) in IMAGES.iter().enumerate() {
        // Resize PIL's own decoded pixels, so only the resize is compared.
        let dec = &exp[&format!("decoded_u8.{i}")];
        let (h, w, _) = dec.dims3().unwrap();
        let img = image::RgbImage::from_raw(w as u32, h as u32, u8s(dec)).unwrap();
        let ours = resize_rgb(&img, 224);
        let diff = max_u8_diff(&ours, &resized[i * per..(i + 1) * per]);
        let off = ours
            .iter()
            .zip(&resized[i * per..(i + 1) * per])
            .filter(|(a, b)| a != b)
            .count();
        // PIL's own fixed-point taps and passes: identical.
        assert_eq!((diff, off), (0, 0), "{name}: resize differs from PIL");
    }
}

#[test]
fn pixel_values_match_clip_image_processor() {
    let exp = expected();
    let resized = u8s(&exp["resized_u8"]);
    let per = 224 * 224 * 3;
    let imgs: Vec<&[u8]> = (0..4).map(|i| &resized[i * per..(i + 1) * per]).collect();
    let pre: Normalization = serde_json::from_str(
        &std::fs::read_to_string(common::reference().join("clip_small/preprocessor_config.json"))
            .unwrap(),
    )
    .unwrap();
    let ours = pixel_values(&imgs, 224, &pre, &Device::Cpu).unwrap();
    assert_eq!(ours.dims(), &[4, 3, 224, 224]);
    check_pixel_values(&f32s(&ours), &f32s(&exp["pixel_values"])).unwrap();
}

#[test]
fn features_match_hf_last_hidden_state_before_post_layernorm() {
    let exp = expected();
    let tower = ClipTower::load(
        &ClipSource::Dir(common::reference().join("clip_small")),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!((tower.tokens, tower.hidden), (50, 192));
    assert!(!tower.is_random());
    let feats = tower.features(&exp["pixel_values"]).unwrap();
    assert_eq!(feats.dims(), &[4, 50, 192]);
    check_features(&f32s(&feats), &f32s(&exp["last_hidden_state"])).unwrap();
    // The weights hash is recorded in shard metadata.
    let sha =
        minimind_v::util::sha256_file(&common::reference().join("clip_small/model.safetensors"))
            .unwrap();
    assert_eq!(tower.weights_id, sha);
}

#[test]
fn f16_feature_bytes_are_the_host_rounding_of_the_f32_features() {
    // What ingest writes: rounded on the tower's device; must equal the host's f32 → f16.
    let tower = ClipTower::load(
        &ClipSource::Dir(common::reference().join("clip_small")),
        &Device::Cpu,
    )
    .unwrap();
    let imgs: Vec<Vec<u8>> = (0..3u8)
        .map(|k| {
            (0..224 * 224 * 3)
                .map(|i| ((i * 31 + k as usize * 97) % 256) as u8)
                .collect()
        })
        .collect();
    let refs: Vec<&[u8]> = imgs.iter().map(|v| v.as_slice()).collect();
    let got = tower.features_f16_bytes(&refs).unwrap();
    let f32s = f32s(&tower.features_u8(&refs).unwrap());
    let per = tower.tokens * tower.hidden;
    assert_eq!(got.len(), 3);
    for (g, chunk) in got.iter().zip(f32s.chunks_exact(per)) {
        assert_eq!(g, &minimind_v::shards::f32_to_f16_bytes(chunk));
    }
}

#[test]
fn missing_clip_directory_says_where_to_put_it() {
    let err = ClipTower::load(&ClipSource::Dir("/nonexistent/clip".into()), &Device::Cpu)
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("/nonexistent/clip") && msg.contains("HINT"),
        "{msg}"
    );
}

#[test]
fn random_tower_is_seeded_and_labelled() {
    let src: ClipSource = "random-small:7".parse().unwrap();
    let a = ClipTower::load(&src, &Device::Cpu).unwrap();
    let b = ClipTower::load(&src, &Device::Cpu).unwrap();
    let c = ClipTower::load(&"random-small:8".parse().unwrap(), &Device::Cpu).unwrap();
    assert!(a.is_random());
    assert_eq!(a.weights_id, "random-small:7");
    let img = vec![90u8; 224 * 224 * 3];
    let fa = f32s(&a.features_u8(&[&img]).unwrap());
    assert_eq!(fa, f32s(&b.features_u8(&[&img]).unwrap()));
    assert_ne!(fa, f32s(&c.features_u8(&[&img]).unwrap()));
    let big = ClipTower::load(&"random:1".parse().unwrap(), &Device::Cpu).unwrap();
    assert_eq!((big.tokens, big.hidden), (50, 768));
}

#[test]
fn any_colour_type_decodes_to_rgb() {
    // CMYK JPEG written by PIL: left-top block (10,200,90), rest (200,40,60) after convert('RGB').
    let cmyk = std::fs::read(common::repo().join("tests/fixtures/cmyk.jpg")).unwrap();
    let img = decode_rgb(&cmyk, &Default::default()).unwrap();
    let close =
        |p: &image::Rgb<u8>, q: [u8; 3]| p.0.iter().zip(q).all(|(a, b)| a.abs_diff(b) <= 12);
    assert!(
        close(img.get_pixel(5, 5), [10, 200, 90]),
        "{:?}",
        img.get_pixel(5, 5)
    );
    assert!(
        close(img.get_pixel(35, 25), [200, 40, 60]),
        "{:?}",
        img.get_pixel(35, 25)
    );

    let mut rgba = image::RgbaImage::new(4, 4);
    rgba.pixels_mut()
        .for_each(|p| *p = image::Rgba([10, 20, 30, 0]));
    let mut gray = image::GrayImage::new(4, 4);
    gray.pixels_mut().for_each(|p| *p = image::Luma([77]));
    for (img, want) in [
        (image::DynamicImage::ImageRgba8(rgba), [10, 20, 30]),
        (image::DynamicImage::ImageLuma8(gray), [77, 77, 77]),
    ] {
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png).unwrap();
        // PIL's convert('RGB') drops alpha without compositing; so do we.
        assert_eq!(
            decode_rgb(png.get_ref(), &Default::default())
                .unwrap()
                .get_pixel(1, 1)
                .0,
            want
        );
    }
    assert!(decode_rgb(&[], &Default::default()).is_err());
    assert!(decode_rgb(b"not an image", &Default::default()).is_err());
}

#[test]
fn an_f16_tower_stays_close_to_the_f32_features() {
    let exp = expected();
    let tower = ClipTower::load(
        &ClipSource::Dir(common::reference().join("clip_small")),
        &Device::Cpu,
    )
    .unwrap()
    .with_dtype(DType::F16)
    .unwrap();
    let want = f32s(&exp["last_hidden_state"]);
    let got = f32s(&tower.features(&exp["pixel_values"]).unwrap());
    let rel = Diff::of(&got, &want).rel();
    eprintln!("f16 tower: max abs diff / max abs = {rel:.3e}");
    check_f16_features(&got, &want).unwrap();
    assert!(
        rel > 0.0,
        "an f16 tower that computes exactly the f32 numbers is not running f16"
    );
}

#[test]
fn a_replica_rebuilt_from_the_weights_computes_the_same_features() {
    // What `ingest --clip-streams` does on CUDA (there onto another stream); here on the CPU.
    let img = vec![120u8; 224 * 224 * 3];
    for src in [
        ClipSource::Dir(common::reference().join("clip_small")),
        "random-small:4".parse().unwrap(),
    ] {
        let tower = ClipTower::load(&src, &Device::Cpu).unwrap();
        let replica = tower.replica(&Device::Cpu).unwrap();
        assert_eq!(replica.weights_id, tower.weights_id);
        assert_eq!(
            f32s(&replica.features_u8(&[&img]).unwrap()),
            f32s(&tower.features_u8(&[&img]).unwrap())
        );
        assert_eq!(tower.more_streams(2).unwrap().len(), 2);
    }
}

#[test]
fn a_weights_file_without_clip_tensors_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        common::reference().join("clip_small/config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let x = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &HashMap::from([("x".to_string(), x)]),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let err = ClipTower::load(&ClipSource::Dir(tmp.path().into()), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("not a CLIP vision checkpoint"),
        "{err}"
    );
}

/// Each check above fails when our side holds a NaN or an infinity.
#[test]
fn the_pixel_and_feature_checks_fail_on_non_finite_values() {
    let exp = expected();
    let (px, feats) = (f32s(&exp["pixel_values"]), f32s(&exp["last_hidden_state"]));
    assert!(check_pixel_values(&px, &px).is_ok() && check_features(&feats, &feats).is_ok());
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let poison = |v: &[f32]| {
            let mut v = v.to_vec();
            let mid = v.len() / 2;
            v[mid] = bad;
            v
        };
        assert!(check_pixel_values(&poison(&px), &px).is_err(), "{bad}");
        assert!(check_features(&poison(&feats), &feats).is_err(), "{bad}");
        assert!(
            check_f16_features(&poison(&feats), &feats).is_err(),
            "{bad}"
        );
        assert!(
            check_features(&vec![bad; feats.len()], &feats).is_err(),
            "all {bad}"
        );
    }
}
