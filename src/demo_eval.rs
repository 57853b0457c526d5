//! The demo's learning stages: train a small MiniMind-V on the demo shards (captions, then
//! instructions) and score held-out answers — colour word and shape word — against `labels.json`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{bad_file, IoContext, Result};
use crate::generate::{chat_prompt, generate, Sampling};
use crate::ingest::chat::ChatTokenizer;
use crate::model::vlm::Images;
use crate::model::ModelConfig;
use crate::shards::f16_bytes_to_f32;
use crate::shards::reader::{list_shards, ShardReader};
use crate::train::{self, ModelChoice, RunOptions, TrainConfig, Trainable};

/// The small model the demo trains on CPU.
pub fn demo_model(vision_dim: usize) -> ModelConfig {
    ModelConfig {
        dim: 128,
        n_layers: 4,
        n_heads: 4,
        n_kv_heads: 2,
        vision_dim,
        max_seq_len: 512,
        ..ModelConfig::tiny()
    }
}

/// One training stage of the demo.
pub struct StageRun<'a> {
    pub shards: &'a Path,
    pub out: &'a Path,
    pub init: Option<PathBuf>,
    pub steps: usize,
    pub lr: f64,
}

pub fn train_stage(
    stage: StageRun,
    val: &Path,
    model: &ModelConfig,
    device: &Device,
) -> Result<()> {
    let StageRun {
        shards,
        out,
        init,
        steps,
        lr,
    } = stage;
    let cfg = TrainConfig {
        shards: shards.to_path_buf(),
        out: out.to_path_buf(),
        model: ModelChoice::Custom(model.clone()),
        init,
        trainable: Trainable::All,
        steps,
        batch_size: 16,
        grad_accum: 1,
        lr,
        warmup_steps: steps / 20,
        grad_clip: 1.0,
        weight_decay: 0.0,
        seed: 0,
        shuffle_buffer: 2048,
        bucket_batches: 8,
        pad_to: None,
        checkpoint_every: steps,
        val_shards: Some(val.to_path_buf()),
        val_every: (steps / 4).max(1),
        val_batches: 8,
    };
    train::run(
        &cfg,
        &RunOptions {
            resume: false,
            stop_after: None,
            progress: true,
            device: device.clone(),
        },
    )?;
    Ok(())
}

#[derive(Debug, Clone, Default)]
pub struct Accuracy {
    pub images: usize,
    pub colour_right: usize,
    pub shape_right: usize,
    /// (image, question, answer) for the report.
    pub examples: Vec<(String, String, String)>,
}

/// Ask every held-out image its colour and its shape; count answers naming the right word.
pub fn evaluate(
    ckpt: &Path,
    eval_shards: &Path,
    labels: &Path,
    tokenizer: &ChatTokenizer,
    limit: usize,
    device: &Device,
) -> Result<Accuracy> {
    let model = crate::generate::load_model(ckpt, None, device)?;
    let text = std::fs::read_to_string(labels).at(labels)?;
    let labels: BTreeMap<String, BTreeMap<String, String>> =
        serde_json::from_str(&text).map_err(|e| bad_file(labels, e.to_string()))?;
    let mut acc = Accuracy::default();
    let questions = [
        ("What colour is the shape?", "colour"),
        ("What shape is in the image?", "shape"),
    ];
    for file in list_shards(eval_shards)? {
        let reader = ShardReader::open(&file)?;
        let [tok, hid] = reader.meta.feature_shape;
        for row in reader {
            let row = row?;
            if acc.images >= limit {
                return Ok(acc);
            }
            let Some(label) = labels.get(&row.images[0]) else {
                continue;
            };
            let feats =
                Tensor::from_vec(f16_bytes_to_f32(&row.features[0]), (1, tok, hid), device)?;
            acc.images += 1;
            for (q, field) in questions {
                let ids = tokenizer.encode_text(&chat_prompt(q, 1));
                let imgs =
                    Images::for_rows(&[&ids], std::slice::from_ref(&feats), &model.cfg.image_ids)?;
                let out = generate(
                    &model,
                    &ids,
                    imgs.as_ref(),
                    &Sampling::greedy(16),
                    true,
                    |_| true,
                )?;
                let answer = tokenizer.decode(&out);
                let truth = &label[field];
                let right = answer
                    .split(|c: char| !c.is_alphanumeric())
                    .any(|w| w == truth);
                match field {
                    "colour" => acc.colour_right += right as usize,
                    _ => acc.shape_right += right as usize,
                }
                if acc.examples.len() < 8 {
                    acc.examples
                        .push((row.images[0].clone(), q.to_string(), answer));
                }
            }
        }
    }
    Ok(acc)
}

impl Accuracy {
    pub fn report(&self) -> String {
        let pct = |n: usize| 100.0 * n as f64 / self.images.max(1) as f64;
        let mut s = format!(
            "held-out images: {}\ncolour accuracy: {:.1}%  (chance 12.5%)\nshape accuracy:  {:.1}%  (chance 20%)\n",
            self.images,
            pct(self.colour_right),
            pct(self.shape_right)
        );
        for (img, q, a) in &self.examples {
            let _ = writeln!(s, "  {img}: {q} → {a}");
        }
        s
    }
}
