//! `[ingest]`: upstream's dataset (v1's JSON + images, or the later Parquet) → shards.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::shards::ClipPrecision;
use crate::text::Stage;
use crate::vision::preprocess::ImageLimits;

/// `[ingest]`: upstream's dataset → shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    pub stage: Stage,
    /// Upstream's dataset: v1's conversation JSON, or a Parquet file (or a directory of them) in
    /// the later format, whose rows carry their images. `json` is read as the same key.
    #[serde(alias = "json")]
    pub input: PathBuf,
    /// Which of the two `input` is; `auto` tells them apart by the file's first bytes.
    #[serde(default)]
    pub format: InputFormat,
    /// Upstream's image zip, or a directory of images: v1's JSON only (Parquet rows hold theirs).
    #[serde(default)]
    pub images: PathBuf,
    /// Prepended to every image name (`COCO_train2014_` for upstream's SFT set).
    #[serde(default)]
    pub image_prefix: String,
    /// Output directory for shards, manifest and rejects.
    pub out: PathBuf,
    #[serde(default = "default_tokenizer")]
    pub tokenizer: PathBuf,
    /// HF CLIP directory, or `random:<seed>` / `random-small:<seed>` (tests and demos only).
    #[serde(default = "default_clip")]
    pub clip: String,
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Images allowed per record; default 1, or 2 for `sft_multi`.
    #[serde(default)]
    pub max_images: Option<usize>,
    #[serde(default = "default_rows_per_shard")]
    pub rows_per_shard: usize,
    /// Images per CLIP forward pass.
    #[serde(default = "default_clip_batch")]
    pub clip_batch: usize,
    /// `f32` (upstream's numbers), `tf32` (on CUDA CLIP's matrix products take TF32 inputs; the
    /// tower alone ran 2× faster on an H100; f32 on the CPU, with a note) or `f16` (the tower's
    /// weights and activations in f16, attention scores in f32; any device). Both change the
    /// features (`bench parity` on a GPU and tests/reference_clip.rs say by how much), so the
    /// shards record it (`clip_precision` in their metadata; f32 shards are unchanged) and it is
    /// part of the plan, so a resumed run cannot mix precisions.
    #[serde(default)]
    pub clip_precision: ClipPrecision,
    /// How large an image may be before it is decoded (bytes, width and height, pixels); larger
    /// ones are `image_too_large` rejects. `[ingest.image_limits]`: `max_side` (8192),
    /// `max_pixels` (40,000,000), `max_bytes` (64 MiB).
    #[serde(default)]
    pub image_limits: ImageLimits,
    /// The share of records that may be rejected before the run fails (0.5: half); the shards,
    /// manifest and rejects are kept either way.
    #[serde(default = "default_max_reject_rate")]
    pub max_reject_rate: f64,
    /// The share of image sets held out into `out/val/` (with every sample that uses them), so
    /// training can report a held-out loss without a second dataset; chosen by a hash of the
    /// image set's key, so the split does not depend on the order or number of records. 0: none.
    #[serde(default)]
    pub val_fraction: f64,
    /// Parquet input is planned in windows of this many rows (whole row groups), so that
    /// planning holds one window, whatever the corpus size. Rows that share an image share a
    /// shard row (one CLIP pass) within a window; the held-out split is drawn per window.
    /// v1's JSON is one window.
    #[serde(default = "default_plan_window")]
    pub plan_window: usize,
}

/// What `input` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    #[default]
    Auto,
    /// v1: a JSON array of `{id, image, conversations: [{from, value}, …]}`, images in `images`.
    Json,
    /// Later releases: rows of `conversations` (JSON text, or a list of `{role, content}`) and
    /// `image_bytes` (one binary, or a list).
    Parquet,
}

fn default_tokenizer() -> PathBuf {
    PathBuf::from(super::DEFAULT_TOKENIZER)
}
fn default_clip() -> String {
    super::DEFAULT_CLIP.into()
}
fn default_max_seq_len() -> usize {
    512
}
fn default_rows_per_shard() -> usize {
    1024
}
fn default_max_reject_rate() -> f64 {
    0.5
}
fn default_plan_window() -> usize {
    1 << 18
}
fn default_clip_batch() -> usize {
    32
}

impl IngestConfig {
    pub fn max_images(&self) -> usize {
        self.max_images.unwrap_or(match self.stage {
            Stage::SftMulti => 2,
            _ => 1,
        })
    }

    pub fn validate(&self) -> Result<()> {
        let fail = |m: &str| Err(Error::Config(format!("[ingest] {m}")));
        if self.max_seq_len == 0 || self.max_seq_len > u16::MAX as usize {
            return fail("max_seq_len must be in 1..=65535");
        }
        if self.rows_per_shard == 0 || self.clip_batch == 0 || self.plan_window == 0 {
            return fail("rows_per_shard, clip_batch and plan_window must be positive");
        }
        if self.max_images() == 0 {
            return fail("max_images must be positive");
        }
        if !(0.0..=1.0).contains(&self.max_reject_rate) {
            return fail("max_reject_rate must lie in [0, 1]");
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return fail("val_fraction must lie in [0, 1)");
        }
        let l = &self.image_limits;
        if l.max_side == 0 || l.max_pixels == 0 || l.max_bytes == 0 {
            return fail("image_limits: max_side, max_pixels and max_bytes must be positive");
        }
        Ok(())
    }
}

/// Convenience for building configs in code (tests, demo).
impl IngestConfig {
    pub fn new(stage: Stage, input: PathBuf, images: PathBuf, out: PathBuf) -> Self {
        Self {
            stage,
            input,
            format: InputFormat::Auto,
            images,
            image_prefix: String::new(),
            out,
            tokenizer: default_tokenizer(),
            clip: default_clip(),
            max_seq_len: default_max_seq_len(),
            max_images: None,
            rows_per_shard: default_rows_per_shard(),
            clip_batch: default_clip_batch(),
            clip_precision: ClipPrecision::F32,
            image_limits: ImageLimits::default(),
            max_reject_rate: default_max_reject_rate(),
            val_fraction: 0.0,
            plan_window: default_plan_window(),
        }
    }
}
