//! The demo's learning stages: train a small MiniMind-V on the demo shards (captions, then
//! instructions) and score held-out answers — colour word and shape word — against `labels.json`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::config::{ModelChoice, TrainConfig, Trainable};
use crate::error::{bad_file, IoContext, Result};
use crate::generate::{generate, Sampling};
use crate::model::vlm::{Images, Vlm};
use crate::model::ModelConfig;
use crate::shards::f16_bytes_to_f32;
use crate::shards::reader::{list_shards, ShardReader};
use crate::text::chat_prompt;
use crate::text::ChatTokenizer;
use crate::train::{self, RunOptions};

/// The small model the demo trains on CPU.
pub fn demo_model(vision_dim: usize) -> ModelConfig {
    ModelConfig {
        vision_dim,
        ..ModelConfig::demo()
    }
}

/// Adam's β₂ in the demo's instruction stage. With upstream's 0.999 (the trainer's default) most
/// seeds found the shape reader too late for the step budget; with 0.9 all five seeds tried
/// clear the bar (docs/DEMO.md section 6).
pub const SFT_ADAM_BETA2: f64 = 0.9;

/// One training stage of the demo.
pub struct StageRun<'a> {
    pub shards: &'a Path,
    pub out: &'a Path,
    pub init: Option<PathBuf>,
    pub steps: usize,
    /// The global batch (split across data-parallel ranks).
    pub batch_size: usize,
    pub lr: f64,
    pub adam_beta2: f64,
}

/// The trainer settings of one demo stage (`val`: held-out shards for the loss curve).
pub fn stage_config(stage: &StageRun, val: Option<&Path>, model: &ModelConfig) -> TrainConfig {
    let steps = stage.steps;
    TrainConfig {
        shards: stage.shards.to_path_buf(),
        out: stage.out.to_path_buf(),
        model: Some(ModelChoice::Custom(model.clone().into())),
        init: stage.init.clone(),
        trainable: Trainable::All,
        steps: Some(steps),
        epochs: None,
        batch_size: stage.batch_size,
        grad_accum: 1,
        lr: stage.lr,
        warmup_steps: steps / 20,
        grad_clip: 1.0,
        weight_decay: 0.0,
        adam_beta2: stage.adam_beta2,
        seed: 0,
        shuffle_buffer: 2048,
        bucket_batches: 8,
        rank_data: Default::default(),
        pad_to: None,
        checkpoint_every: steps,
        val_shards: val.map(Path::to_path_buf),
        val_every: (steps / 4).max(1),
        val_batches: 8,
        verify_shards: true,
        precision: Default::default(),
    }
}

/// Train one demo stage. With `ranks > 1` on the CPU the stage runs as `ranks` data-parallel
/// processes of this program (`minimind-v train <out>.toml --ranks N --device cpu`, the pipeline
/// file written beside the stage's directory, so the stage can be rerun by hand), each with its
/// share of the cores and `batch / ranks` rows, so the global batch stays the same. On 2 cores two
/// single-threaded ranks step ~1.4× faster than one process whose matrix products use both cores,
/// because most of a small model's step is elementwise work that runs on one. Needs this
/// program's own binary (the `demo` command); library callers pass `ranks = 1`.
pub fn train_stage(
    stage: StageRun,
    val: &Path,
    model: &ModelConfig,
    device: &Device,
    ranks: usize,
) -> Result<()> {
    let mut cfg = stage_config(&stage, Some(val), model);
    if ranks <= 1 || !device.is_cpu() {
        train::run(
            &cfg,
            &RunOptions {
                resume: false,
                overwrite: false,
                force: false,
                interrupt: None,
                stop_after: None,
                progress: true,
                device: device.clone(),
            },
        )?;
        return Ok(());
    }
    if !cfg.batch_size.is_multiple_of(ranks) {
        return Err(crate::Error::Config(format!(
            "--ranks {ranks} does not divide the demo's batch of {}",
            cfg.batch_size
        )));
    }
    cfg.batch_size /= ranks;
    #[derive(serde::Serialize)]
    struct TrainOnly<'a> {
        train: &'a TrainConfig,
    }
    let pipeline = stage.out.with_extension("toml");
    let text = toml::to_string(&TrainOnly { train: &cfg })
        .map_err(|e| bad_file(&pipeline, e.to_string()))?;
    crate::util::write_bytes_atomic(&pipeline, text.as_bytes())?;
    eprintln!(
        "  as {ranks} CPU processes: minimind-v train {} --ranks {ranks} --device cpu",
        pipeline.display()
    );
    train::dist::launch(
        ranks,
        "cpu",
        &["train".to_string(), pipeline.display().to_string()],
    )
}

/// One answer shown in the report: the image file(s) (relative to the demo directory), the
/// question, the model's answer and the truth.
#[derive(Debug, Clone)]
pub struct Example {
    pub images: Vec<String>,
    pub question: String,
    pub answer: String,
    pub truth: String,
}

#[derive(Debug, Clone, Default)]
pub struct Accuracy {
    pub images: usize,
    pub colour_right: usize,
    pub shape_right: usize,
    /// The same questions with the image features zeroed: what the model gets right without
    /// looking (should sit near chance: 12.5% colour, 20% shape).
    pub colour_right_no_image: usize,
    pub shape_right_no_image: usize,
    /// Two-image "what differs": pairs asked, answers naming the right attribute, answers
    /// exactly right (attribute and both values).
    pub pairs: usize,
    pub pair_kind_right: usize,
    pub pair_exact_right: usize,
    pub examples: Vec<Example>,
}

type Labels = BTreeMap<String, BTreeMap<String, String>>;

fn read_labels(path: &Path) -> Result<Labels> {
    let text = std::fs::read_to_string(path).at(path)?;
    serde_json::from_str(&text).map_err(|e| bad_file(path, e.to_string()))
}

/// The lower-cased words of `text`.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Where `term` (one word or several) stands in `words`, as whole words: (start, end) spans.
fn spans(words: &[String], term: &str) -> Vec<(usize, usize)> {
    let want: Vec<&str> = term.split_whitespace().collect();
    if want.is_empty() {
        return Vec::new();
    }
    (0..words.len().saturating_sub(want.len() - 1))
        .filter(|&i| words[i..i + want.len()] == want[..])
        .map(|i| (i, i + want.len()))
        .collect()
}

/// Every colour word the demo's data uses: the shapes' colours and the backgrounds'.
fn colour_words() -> Vec<&'static str> {
    let (fg, bg) = (crate::synth::draw::COLOURS, crate::synth::draw::BACKGROUNDS);
    fg.iter().chain(bg.iter()).map(|c| c.en).collect()
}

fn shape_words() -> Vec<&'static str> {
    crate::synth::draw::SHAPES.iter().map(|s| s.en()).collect()
}

/// An answer is right when it names `truth` and no other word of `vocabulary`: "red" is right
/// for a red shape, "red or blue" and "a red square on a brown background" are not, and nor is
/// "light blue" for blue.
pub fn names_exactly(answer: &str, truth: &str, vocabulary: &[&str]) -> bool {
    let words = words(answer);
    let truths = spans(&words, truth);
    // Another term counts unless it stands inside the truth ("blue" within "light blue" when
    // the truth is light blue); one that contains the truth ("light blue" for blue) counts.
    let inside_truth = |&(a, b): &(usize, usize)| truths.iter().any(|&(s, e)| s <= a && b <= e);
    !truths.is_empty()
        && vocabulary
            .iter()
            .filter(|w| **w != truth)
            .all(|w| spans(&words, w).iter().all(inside_truth))
}

/// Greedy answer to `question` about the images whose features are `feats` (n, tokens, hidden).
fn answer(model: &Vlm, tok: &ChatTokenizer, feats: &Tensor, question: &str) -> Result<String> {
    let n = feats.dim(0)?;
    let ids = tok.encode_text(&chat_prompt(question, n));
    let imgs = Images::for_rows(&[&ids], std::slice::from_ref(feats), &model.cfg.image_ids)?;
    let out = crate::util::on_pool(|| {
        generate(
            model,
            &ids,
            imgs.as_ref(),
            &Sampling::greedy(32),
            true,
            |_| true,
        )
    })?;
    Ok(tok.decode(&out).trim().to_string())
}

/// Where the report finds an evaluation image (relative to the demo directory).
pub type ImagePath<'a> = &'a dyn Fn(&str) -> String;

/// Up to `limit` rows of the shards under `dir` that `label` knows (from the row's image
/// names), each with its label and its images' features as one (images, tokens, hidden) tensor.
/// Rows past the limit are not read.
fn labelled_rows<L>(
    dir: &Path,
    limit: usize,
    device: &Device,
    label: impl Fn(&[String]) -> Option<L>,
) -> Result<Vec<(Vec<String>, L, Tensor)>> {
    let mut rows = Vec::new();
    for file in list_shards(dir)? {
        let reader = ShardReader::open(&file)?;
        let [tok, hid] = reader.meta.feature_shape;
        for row in reader {
            if rows.len() >= limit {
                return Ok(rows);
            }
            let row = row?;
            let Some(label) = label(&row.images) else {
                continue;
            };
            let data: Vec<f32> = row
                .features
                .iter()
                .flat_map(|f| f16_bytes_to_f32(f))
                .collect();
            let feats = Tensor::from_vec(data, (row.features.len(), tok, hid), device)?;
            rows.push((row.images, label, feats));
        }
    }
    Ok(rows)
}

/// Score a checkpoint on a demo directory's held-out sets (`root`, the demo's `--out`): every
/// held-out image (at most `limit`) asked its colour and its shape, every held-out pair asked
/// what differs. The demo scores itself with this; experiments that retrain a stage by hand score
/// their checkpoint the same way.
pub fn evaluate_demo_dir(
    root: &Path,
    ckpt: &Path,
    tokenizer: &ChatTokenizer,
    limit: usize,
    device: &Device,
) -> Result<Accuracy> {
    let model = crate::generate::load_model(ckpt, None, device)?;
    let labels = read_labels(&root.join("eval/labels.json"))?;
    let mut acc = evaluate_images(
        &model,
        &root.join("cache/eval"),
        &labels,
        tokenizer,
        limit,
        device,
    )?;
    evaluate_pairs(
        &model,
        &root.join("cache/eval_multi"),
        &labels,
        tokenizer,
        &mut acc,
        device,
    )?;
    Ok(acc)
}

/// Ask every held-out image its colour and its shape; count answers naming the right word.
fn evaluate_images(
    model: &Vlm,
    eval_shards: &Path,
    labels: &Labels,
    tokenizer: &ChatTokenizer,
    limit: usize,
    device: &Device,
) -> Result<Accuracy> {
    let questions = [
        ("What colour is the shape?", "colour"),
        ("What shape is in the image?", "shape"),
    ];
    let rows = labelled_rows(eval_shards, limit, device, |images| labels.get(&images[0]))?;
    // Each question's answer, with the image and with its features zeroed.
    let answers = each_in_order(&rows, device, |(_, _, feats)| {
        let blind = feats.zeros_like()?;
        questions
            .iter()
            .map(|(q, _)| {
                Ok((
                    answer(model, tokenizer, feats, q)?,
                    answer(model, tokenizer, &blind, q)?,
                ))
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let mut acc = Accuracy::default();
    for ((images, label, _), answers) in rows.iter().zip(answers) {
        acc.images += 1;
        for ((q, field), (a, without)) in questions.iter().zip(answers) {
            let truth = &label[*field];
            let vocabulary = match *field {
                "colour" => colour_words(),
                _ => shape_words(),
            };
            let right = names_exactly(&a, truth, &vocabulary) as usize;
            let right_blind = names_exactly(&without, truth, &vocabulary) as usize;
            match *field {
                "colour" => {
                    acc.colour_right += right;
                    acc.colour_right_no_image += right_blind;
                }
                _ => {
                    acc.shape_right += right;
                    acc.shape_right_no_image += right_blind;
                }
            }
            if acc.examples.len() < 8 {
                acc.examples.push(Example {
                    images: images.clone(),
                    question: q.to_string(),
                    answer: a,
                    truth: truth.clone(),
                });
            }
        }
    }
    Ok(acc)
}

/// `f` of every item, in the items' order. On the CPU the items are worked on in parallel: a
/// greedy answer of the demo's small model is thousands of operations too small to use both
/// cores, and answers are independent (each the same as asked alone).
fn each_in_order<T: Sync, R: Send>(
    items: &[T],
    device: &Device,
    f: impl Fn(&T) -> Result<R> + Sync + Send,
) -> Result<Vec<R>> {
    use rayon::prelude::*;
    if device.is_cpu() {
        items.par_iter().map(f).collect()
    } else {
        items.iter().map(f).collect()
    }
}

/// Ask every held-out pair what differs; the truth is the sentence the data teaches.
fn evaluate_pairs(
    model: &Vlm,
    eval_shards: &Path,
    labels: &Labels,
    tokenizer: &ChatTokenizer,
    acc: &mut Accuracy,
    device: &Device,
) -> Result<()> {
    let q = "What differs between the two images?";
    let pairs = labelled_rows(eval_shards, usize::MAX, device, |images| {
        let label = |name: &str| labels.get(&format!("sft_multi_images/{name}"));
        let (a, b) = (label(&images[0])?, label(&images[1])?);
        let kind = if a["colour"] != b["colour"] {
            "colour"
        } else {
            "shape"
        };
        let truth =
            crate::synth::what_differs([&a["colour"], &a["shape"]], [&b["colour"], &b["shape"]]);
        Some((kind, truth))
    })?;
    let answers = each_in_order(&pairs, device, |(_, _, feats)| {
        answer(model, tokenizer, feats, q)
    })?;
    for ((images, (kind, truth), _), got) in pairs.into_iter().zip(answers) {
        acc.pairs += 1;
        acc.pair_kind_right += got.contains(&format!("The {kind} differs")) as usize;
        acc.pair_exact_right += (got == truth) as usize;
        if acc.pairs <= 3 {
            acc.examples.push(Example {
                images,
                question: q.to_string(),
                answer: got,
                truth,
            });
        }
    }
    Ok(())
}

/// The demo's bar: held-out colour ≥95%, shape ≥85%.
pub const COLOUR_BAR: f64 = 95.0;
pub const SHAPE_BAR: f64 = 85.0;

impl Accuracy {
    fn pct(n: usize, of: usize) -> f64 {
        100.0 * n as f64 / of.max(1) as f64
    }

    pub fn colour_pct(&self) -> f64 {
        Self::pct(self.colour_right, self.images)
    }

    pub fn shape_pct(&self) -> f64 {
        Self::pct(self.shape_right, self.images)
    }

    pub fn meets_bar(&self) -> bool {
        self.colour_pct() >= COLOUR_BAR && self.shape_pct() >= SHAPE_BAR
    }

    pub fn report(&self) -> String {
        let mut s = format!(
            "held-out images: {}\ncolour accuracy: {:.1}%  (chance 12.5%, bar {COLOUR_BAR}%)\nshape accuracy:  {:.1}%  (chance 20%, bar {SHAPE_BAR}%)\nwith the image features zeroed: colour {:.1}%, shape {:.1}% (a model that ignores the image sits near chance)\n",
            self.images,
            self.colour_pct(),
            self.shape_pct(),
            Self::pct(self.colour_right_no_image, self.images),
            Self::pct(self.shape_right_no_image, self.images),
        );
        if self.pairs > 0 {
            let _ = writeln!(
                s,
                "two-image pairs: {}; names what differs: {:.1}% (chance 50%); exactly right: {:.1}%",
                self.pairs,
                Self::pct(self.pair_kind_right, self.pairs),
                Self::pct(self.pair_exact_right, self.pairs)
            );
        }
        let _ = writeln!(
            s,
            "bar (colour ≥{COLOUR_BAR}%, shape ≥{SHAPE_BAR}%): {}",
            if self.meets_bar() { "MET" } else { "NOT MET" }
        );
        for e in &self.examples {
            let _ = writeln!(
                s,
                "  {}: {} → {}",
                e.images.join(" + "),
                e.question,
                e.answer
            );
        }
        s
    }

    /// Markdown table of the examples with their images; `path` maps an image name to a path
    /// relative to the report.
    pub fn examples_markdown(&self, path: ImagePath) -> String {
        let mut s = String::from("| image(s) | question | answer | truth |\n|---|---|---|---|\n");
        for e in &self.examples {
            let imgs: Vec<String> = e
                .images
                .iter()
                .map(|i| format!("<img src=\"{}\" width=\"96\">", path(i)))
                .collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                imgs.join(" "),
                e.question,
                e.answer.replace('|', "\\|"),
                e.truth
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers asked in parallel come back in the items' order; a failure is returned, not lost.
    #[test]
    fn each_in_order_keeps_the_items_order_and_returns_a_failure() {
        let items: Vec<usize> = (0..500).collect();
        let doubled = each_in_order(&items, &Device::Cpu, |&i| Ok(2 * i)).unwrap();
        assert_eq!(doubled, (0..500).map(|i| 2 * i).collect::<Vec<_>>());
        let failed = each_in_order(&items, &Device::Cpu, |&i| {
            if i == 321 {
                Err(crate::Error::Data(format!("item {i}")))
            } else {
                Ok(i)
            }
        });
        assert!(failed.unwrap_err().to_string().contains("item 321"));
    }

    #[test]
    fn an_answer_counts_only_when_it_names_exactly_the_right_word() {
        let colours = colour_words();
        let right = |a: &str, t: &str| names_exactly(a, t, &colours);
        assert!(right("The shape is red.", "red"));
        assert!(right("RED", "red"));
        assert!(!right("The shape is blue.", "red"));
        assert!(!right("The shape is red or blue.", "red"), "two colours");
        assert!(
            !right("A red square on a brown background.", "red"),
            "background"
        );
        assert!(
            !right("The shape is light blue.", "blue"),
            "light blue is not blue"
        );
        assert!(right("The shape is light blue.", "light blue"));
        assert!(!right("The shape is reddish.", "red"), "not a whole word");
        assert!(!right("", "red"));

        let shapes = shape_words();
        assert!(names_exactly("It is a star.", "star", &shapes));
        assert!(!names_exactly("It is a star or a cross.", "star", &shapes));
        assert!(!names_exactly("It is a starfish.", "star", &shapes));
        assert!(!names_exactly("It is a circle.", "square", &shapes));
    }

    #[test]
    fn the_report_gives_the_no_image_baseline_beside_the_accuracy() {
        let acc = Accuracy {
            images: 200,
            colour_right: 200,
            shape_right: 180,
            colour_right_no_image: 25,
            shape_right_no_image: 40,
            ..Default::default()
        };
        let r = acc.report();
        assert!(
            r.contains("colour accuracy: 100.0%") && r.contains("shape accuracy:  90.0%"),
            "{r}"
        );
        assert!(
            r.contains("with the image features zeroed: colour 12.5%, shape 20.0%"),
            "{r}"
        );
        assert!(acc.meets_bar());
    }
}
