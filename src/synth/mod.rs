//! A synthetic dataset in exactly upstream's three formats (pretrain JSON + `pretrain_images.zip`,
//! SFT JSON with `COCO_train2014_`-prefixed names + `sft_images.zip`, two-image JSON with
//! `"a.jpg, b.jpg"` + an image directory), 128×128 JPEGs of coloured shapes, Chinese and English
//! templates. Deterministic for a seed. `faults` adds the kinds of bad entries real data has.
//!
//! Layout under `out`: `LLaVA-Pretrain/chat-translated.json`, `pretrain_images.zip`,
//! `LLaVA-Instruct/llava_instruct_230k.json`, `sft_images.zip`, `sft_multi_images/output.json`
//! (+ its images), and `labels.json` (what every image shows, for evaluation).

pub mod draw;

use std::collections::BTreeMap;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;
use serde_json::json;

use crate::error::{IoContext, Result};
use crate::text::Stage;
use draw::{Scene, BACKGROUNDS, COLOURS};

pub const IMAGE_SIZE: u32 = 128;

/// Images drawn this many at a time (see [`in_chunks`]).
const CHUNK: usize = 256;

#[derive(Debug, Clone)]
pub struct SynthConfig {
    pub out: PathBuf,
    pub seed: u64,
    /// Images (one caption record each) in the pretrain set.
    pub pretrain: usize,
    /// Images in the SFT set.
    pub sft: usize,
    /// Conversation records per SFT image (the same four questions, rotated).
    pub sft_records: usize,
    /// Records (image pairs) in the two-image set.
    pub multi: usize,
    pub faults: bool,
}

/// The label of one image, written to `labels.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Label {
    pub shape: &'static str,
    pub colour: &'static str,
    pub background: &'static str,
}

/// What was generated, for callers that check counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SynthSummary {
    pub pretrain_records: usize,
    pub sft_records: usize,
    pub multi_records: usize,
    /// Faulty entries planted per kind (record-level and image-level).
    pub faults: BTreeMap<String, usize>,
}

fn jpeg(img: &image::RgbImage) -> Vec<u8> {
    let mut buf = Cursor::new(Vec::new());
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 90);
    img.write_with_encoder(enc)
        .expect("in-memory JPEG encoding cannot fail");
    buf.into_inner()
}

fn label(s: &Scene) -> Label {
    Label {
        shape: s.shape.en(),
        colour: COLOURS[s.colour].en,
        background: BACKGROUNDS[s.background].en,
    }
}

fn turn(from: &str, value: String) -> serde_json::Value {
    json!({"from": from, "value": value})
}

/// A caption pair in one of four phrasings.
fn caption(s: &Scene, k: usize) -> (String, String) {
    let (c, b) = (&COLOURS[s.colour], &BACKGROUNDS[s.background]);
    match k % 4 {
        0 => (
            "<image>\n这个图片描述的是什么内容？".into(),
            format!("一个{}的{}在{}背景上。", c.zh, s.shape.zh(), b.zh),
        ),
        1 => (
            "提供给定图像的简要描述。\n<image>".into(),
            format!("{}背景上有一个{}的{}。", b.zh, c.zh, s.shape.zh()),
        ),
        2 => (
            "<image>\nDescribe this image briefly.".into(),
            format!("A {} {} on a {} background.", c.en, s.shape.en(), b.en),
        ),
        _ => (
            "What is in this picture?\n<image>".into(),
            format!(
                "There is a {} {} on a {} background.",
                c.en,
                s.shape.en(),
                b.en
            ),
        ),
    }
}

/// Instruction pairs about one image: shape, colour, and a description.
fn instructions(s: &Scene) -> Vec<(String, String)> {
    let c = &COLOURS[s.colour];
    vec![
        (
            "<image>\nWhat shape is in the image?".into(),
            format!("It is a {}.", s.shape.en()),
        ),
        (
            "<image>\nWhat colour is the shape?".into(),
            format!("The shape is {}.", c.en),
        ),
        (
            "<image>\n图中是什么形状？".into(),
            format!("图中是一个{}。", s.shape.zh()),
        ),
        (
            "<image>\n图中的形状是什么颜色？".into(),
            format!("形状是{}的。", c.zh),
        ),
    ]
}

/// Which of `instructions`' four questions record `k` of image `i` asks first: the English and
/// the Chinese shape question, then the colour questions, starting with English on even images and
/// Chinese on odd ones (so three records train both shape questions and one colour question).
fn first_question(i: usize, k: usize) -> usize {
    let colour = if i.is_multiple_of(2) { [1, 3] } else { [3, 1] };
    [0, 2, colour[0], colour[1]][k % 4]
}

/// `n` items in chunks of [`CHUNK`]: `draw` takes each item's random choices (scenes, noise)
/// from `rng` one item after another, `encode` turns them into images in parallel, and `write`
/// stores each in order while the next chunk is encoded. The dataset is the same for a seed
/// whatever the number of threads.
fn in_chunks<D: Send + Sync, E: Send>(
    n: usize,
    rng: &mut ChaCha8Rng,
    mut draw: impl FnMut(&mut ChaCha8Rng) -> D,
    encode: impl Fn(&D) -> E + Sync,
    mut write: impl FnMut(usize, D, E) -> Result<()> + Send,
) -> Result<()> {
    let mut done: Option<(usize, Vec<D>, Vec<E>)> = None;
    for start in (0..n).step_by(CHUNK).chain([n]) {
        let drawn: Vec<D> = (start..(start + CHUNK).min(n)).map(|_| draw(rng)).collect();
        let (encoded, written) = rayon::join(
            || drawn.par_iter().map(&encode).collect::<Vec<E>>(),
            || match done.take() {
                Some((first, drawn, encoded)) => (first..)
                    .zip(drawn.into_iter().zip(encoded))
                    .try_for_each(|(i, (d, e))| write(i, d, e)),
                None => Ok(()),
            },
        );
        written?;
        done = Some((start, drawn, encoded));
    }
    Ok(())
}

/// A scene with the noise of its picture, drawn from the generator.
fn draw_scene(scene: Scene, rng: &mut ChaCha8Rng) -> (Scene, Vec<i8>) {
    (scene, draw::noise(IMAGE_SIZE, rng))
}

fn encode_scene((scene, noise): &(Scene, Vec<i8>)) -> Vec<u8> {
    jpeg(&draw::render_with(scene, IMAGE_SIZE, noise))
}

fn zip_writer(path: &Path) -> Result<zip::ZipWriter<std::fs::File>> {
    let file = std::fs::File::create(path).at(path)?;
    Ok(zip::ZipWriter::new(file))
}

fn zip_add(
    z: &mut zip::ZipWriter<std::fs::File>,
    path: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<()> {
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file(name, opts)
        .map_err(|e| crate::error::bad_file(path, e.to_string()))?;
    z.write_all(bytes).at(path)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    crate::util::write_bytes_atomic(path, &serde_json::to_vec_pretty(value)?)
}

/// The two-image answer for images of (colour, shape) `first` and `second`, which differ in one
/// of the two: it names both images before it says what differs, so the comparison is between two
/// words the model has just written rather than made before it writes anything.
pub fn what_differs(first: [&str; 2], second: [&str; 2]) -> String {
    let attribute = if first[0] != second[0] {
        "colour"
    } else {
        "shape"
    };
    format!(
        "First: {} {}. Second: {} {}. The {attribute} differs.",
        first[0], first[1], second[0], second[1]
    )
}

/// Where `generate` puts one stage's JSON and images under `out`, and the prefix ingest must put
/// before the JSON's image names (upstream's SFT JSON drops `COCO_train2014_`).
pub fn stage_files(out: &Path, stage: Stage) -> (PathBuf, PathBuf, &'static str) {
    match stage {
        Stage::Pretrain => (
            out.join("LLaVA-Pretrain/chat-translated.json"),
            out.join("pretrain_images.zip"),
            "",
        ),
        Stage::Sft => (
            out.join("LLaVA-Instruct/llava_instruct_230k.json"),
            out.join("sft_images.zip"),
            "COCO_train2014_",
        ),
        Stage::SftMulti => (
            out.join("sft_multi_images/output.json"),
            out.join("sft_multi_images"),
            "",
        ),
    }
}

pub fn generate(cfg: &SynthConfig) -> Result<SynthSummary> {
    std::fs::create_dir_all(&cfg.out).at(&cfg.out)?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut labels: BTreeMap<String, Label> = BTreeMap::new();
    let mut summary = SynthSummary::default();
    let mut faults: BTreeMap<String, usize> = BTreeMap::new();
    let mut fault = |kind: &str| *faults.entry(kind.to_string()).or_insert(0) += 1;

    // Pretrain: one caption record per image, images in a zip folder like upstream's.
    let (pre_json, zpath, _) = stage_files(&cfg.out, Stage::Pretrain);
    let mut z = zip_writer(&zpath)?;
    let mut records = Vec::new();
    let draw_captioned = |rng: &mut ChaCha8Rng| {
        let scene = Scene::random(rng, IMAGE_SIZE);
        let k = rng.random_range(0..4);
        (k, draw_scene(scene, rng))
    };
    let encode = |(_, drawn): &(usize, (Scene, Vec<i8>))| encode_scene(drawn);
    in_chunks(
        cfg.pretrain,
        &mut rng,
        draw_captioned,
        encode,
        |i, (k, (scene, _)), mut bytes| {
            let name = format!("GCC_train_{i:09}.jpg");
            let (q, a) = caption(&scene, k);
            let mut conversations = vec![turn("human", q), turn("gpt", a)];
            let mut image = name.clone();
            if cfg.faults {
                match i % 97 {
                    13 => {
                        // A download cut off inside the header.
                        bytes.truncate(150);
                        fault("corrupt_image");
                    }
                    29 => {
                        bytes.clear();
                        fault("empty_image");
                    }
                    41 => {
                        image = format!("GCC_missing_{i:09}.jpg");
                        fault("missing_image");
                    }
                    53 => {
                        conversations[0] = turn("human", "Describe the picture.".into());
                        fault("image_tag_mismatch");
                    }
                    67 => {
                        conversations.clear();
                        fault("no_conversations");
                    }
                    79 => {
                        conversations[0] = turn("human", "Describe this image: <image>".into());
                        fault("space_before_image_repaired");
                    }
                    89 => {
                        // Truncation to 512 tokens would leave no answer token.
                        conversations[0] = turn(
                            "human",
                            format!("<image>\n{}", "请仔细看这张图片。".repeat(120)),
                        );
                        fault("answer_truncated");
                    }
                    5 => {
                        // Truncation to 512 tokens would cut the image placeholder.
                        conversations[0] = turn(
                            "human",
                            format!("{}<image>", "请仔细看这张图片。".repeat(120)),
                        );
                        fault("placeholder_truncated");
                    }
                    _ => {}
                }
            }
            zip_add(&mut z, &zpath, &format!("pretrain_images/{name}"), &bytes)?;
            labels.insert(name, label(&scene));
            records.push(json!({"id": format!("GCC_train_{i:09}"), "image": image, "conversations": conversations}));
            Ok(())
        },
    )?;
    if cfg.faults {
        records.push(json!({"id": "broken", "image": 17, "conversations": "not a list"}));
        fault("malformed_record");
    }
    z.finish()
        .map_err(|e| crate::error::bad_file(&zpath, e.to_string()))?;
    summary.pretrain_records = records.len();
    write_json(&pre_json, &serde_json::Value::Array(records))?;

    // SFT: several conversations per COCO-style image; names carry no prefix in the JSON.
    let (sft_json, zpath, _) = stage_files(&cfg.out, Stage::Sft);
    let mut z = zip_writer(&zpath)?;
    let mut records = Vec::new();
    let draw_one = |rng: &mut ChaCha8Rng| draw_scene(Scene::random(rng, IMAGE_SIZE), rng);
    in_chunks(
        cfg.sft,
        &mut rng,
        draw_one,
        encode_scene,
        |i, (scene, _), bytes| {
            let short = format!("{:012}.jpg", 100_000 + i);
            let full = format!("COCO_train2014_{short}");
            zip_add(&mut z, &zpath, &format!("sft_images/{full}"), &bytes)?;
            labels.insert(full, label(&scene));
            let pairs = instructions(&scene);
            // Every record asks all four questions (shape and colour, English and Chinese), in a
            // rotated order. SFT, as upstream's, trains only a record's first question–answer pair,
            // so the rotation decides which question each record trains: an image's `sft_records`
            // records train that many of its four questions, shape questions first (a model learns
            // colour in a hundred steps and shape in thousands).
            for k in 0..cfg.sft_records {
                let first = first_question(i, k);
                let mut conv = Vec::new();
                for j in 0..pairs.len() {
                    let (q, a) = pairs[(first + j) % pairs.len()].clone();
                    let q = if j == 0 {
                        q
                    } else {
                        q.replace("<image>\n", "")
                    };
                    conv.extend([turn("human", q), turn("gpt", a)]);
                }
                if cfg.faults && i % 89 == 7 && k == 0 {
                    conv[1] = turn("gpt", String::new());
                    fault("empty_answer");
                }
                records.push(json!({"id": format!("{:012}-{k}", 100_000 + i), "image": short, "conversations": conv}));
            }
            Ok(())
        },
    )?;
    z.finish()
        .map_err(|e| crate::error::bad_file(&zpath, e.to_string()))?;
    summary.sft_records = records.len();
    write_json(&sft_json, &serde_json::Value::Array(records))?;

    // Two-image SFT: pairs that differ in colour or in shape; images in a plain directory.
    let (multi_json, dir, _) = stage_files(&cfg.out, Stage::SftMulti);
    std::fs::create_dir_all(&dir).at(&dir)?;
    let mut records = Vec::new();
    let draw_pair = |rng: &mut ChaCha8Rng| {
        let a = Scene::random(rng, IMAGE_SIZE);
        let mut b = Scene::random(rng, IMAGE_SIZE);
        let colour_differs = rng.random_bool(0.5);
        if colour_differs {
            b.shape = a.shape;
            b.colour = (a.colour + rng.random_range(1..COLOURS.len())) % COLOURS.len();
        } else {
            b.colour = a.colour;
            b.shape = draw::SHAPES[(draw::SHAPES.iter().position(|s| *s == a.shape).unwrap_or(0)
                + rng.random_range(1..5))
                % 5];
        }
        [draw_scene(a, rng), draw_scene(b, rng)]
    };
    let encode_pair = |pair: &[(Scene, Vec<i8>); 2]| pair.each_ref().map(encode_scene);
    in_chunks(
        cfg.multi,
        &mut rng,
        draw_pair,
        encode_pair,
        |i, [(a, _), (b, _)], jpegs| {
            let names = [format!("{}.jpg", 2 * i), format!("{}.jpg", 2 * i + 1)];
            for ((scene, name), bytes) in [(&a, &names[0]), (&b, &names[1])].into_iter().zip(jpegs)
            {
                let path = dir.join(name);
                std::fs::write(&path, bytes).at(&path)?;
                labels.insert(format!("sft_multi_images/{name}"), label(scene));
            }
            let answer = what_differs(
                [COLOURS[a.colour].en, a.shape.en()],
                [COLOURS[b.colour].en, b.shape.en()],
            );
            let mut q = "<image>\n<image>\nWhat differs between the two images?".to_string();
            if cfg.faults && i % 83 == 11 {
                q = "<image>\nWhat differs between the two images?".into();
                fault("image_tag_mismatch");
            }
            records.push(json!({
                "id": format!("multi_{i}"),
                "image": format!("{}, {}", names[0], names[1]),
                "conversations": [turn("human", q), turn("gpt", answer)],
            }));
            Ok(())
        },
    )?;
    summary.multi_records = records.len();
    summary.faults = faults;
    write_json(&multi_json, &serde_json::Value::Array(records))?;
    write_json(
        &cfg.out.join("labels.json"),
        &serde_json::to_value(&labels)?,
    )?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sha256 over every file under `dir`: relative path, a zero byte, contents, in path order.
    fn tree_digest(dir: &Path) -> String {
        use sha2::{Digest, Sha256};
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.push(path);
                }
            }
        }
        let mut files = Vec::new();
        walk(dir, &mut files);
        let mut files: Vec<(String, PathBuf)> = files
            .into_iter()
            .map(|p| {
                (
                    p.strip_prefix(dir).unwrap().to_str().unwrap().to_string(),
                    p,
                )
            })
            .collect();
        files.sort();
        let mut h = Sha256::new();
        for (name, path) in &files {
            h.update(name.as_bytes());
            h.update([0]);
            h.update(std::fs::read(path).unwrap());
        }
        format!("{:x}", h.finalize())
    }

    /// The dataset for a seed is fixed: the same bytes with one thread or several (images are
    /// rendered in parallel), and the same as the generator has always written for this seed
    /// (the digest was taken from the one-image-at-a-time generator; the demo's settings were
    /// chosen on its data). Counts span more than one chunk of images.
    #[test]
    fn the_dataset_of_a_seed_is_the_same_bytes_whatever_the_threads() {
        let tmp = tempfile::tempdir().unwrap();
        for threads in [1, 3] {
            let out = tmp.path().join(format!("t{threads}"));
            let cfg = SynthConfig {
                out: out.clone(),
                seed: 7,
                pretrain: 300,
                sft: 270,
                sft_records: 3,
                multi: 260,
                faults: true,
            };
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| generate(&cfg)).unwrap();
            assert_eq!(
                tree_digest(&out),
                "55581313c50362d7da7e788ee1bc19ae72efc77485b314ab9e7dcd1bc3b2ceb9",
                "{threads} thread(s)"
            );
        }
    }

    #[test]
    fn what_differs_names_both_images_then_the_attribute_that_differs() {
        assert_eq!(
            what_differs(["red", "circle"], ["blue", "circle"]),
            "First: red circle. Second: blue circle. The colour differs."
        );
        assert_eq!(
            what_differs(["red", "star"], ["red", "cross"]),
            "First: red star. Second: red cross. The shape differs."
        );
    }

    #[test]
    fn the_shape_questions_are_trained_first() {
        let shape = [0, 2]; // instructions(): shape in English, then in Chinese, at 0 and 2
        for i in 0..4 {
            let firsts: Vec<usize> = (0..4).map(|k| first_question(i, k)).collect();
            assert_eq!(firsts[..2], shape, "image {i}");
            let mut all = firsts.clone();
            all.sort();
            assert_eq!(all, [0, 1, 2, 3], "image {i}: every question once");
        }
        assert_ne!(first_question(0, 2), first_question(1, 2));
    }
}
