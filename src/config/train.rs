//! `[train]`: the trainer's settings, the model it trains and the precision it computes in.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::ModelConfig;

/// A named preset or a full model config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModelChoice {
    Preset(String),
    Custom(ModelConfig),
}

impl ModelChoice {
    pub fn resolve(&self) -> Result<ModelConfig> {
        match self {
            Self::Custom(c) => Ok(c.clone()),
            Self::Preset(p) => match p.as_str() {
                "minimind_512" => Ok(ModelConfig::minimind_512()),
                "minimind_768" => Ok(ModelConfig::minimind_768()),
                "tiny" => Ok(ModelConfig::tiny()),
                other => Err(Error::Config(format!(
                    "model {other:?}: expected minimind_512, minimind_768, tiny or a table"
                ))),
            },
        }
    }
}

/// Which parameters learn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trainable {
    Projector,
    /// Projector and LLM: upstream's default.
    All,
}

/// `[train]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Shard directory written by ingest.
    pub shards: PathBuf,
    /// Checkpoint, metrics and plots go here.
    pub out: PathBuf,
    #[serde(default = "default_model")]
    pub model: ModelChoice,
    /// Start from this checkpoint (`.safetensors` or upstream `.pth`); none = random init.
    #[serde(default)]
    pub init: Option<PathBuf>,
    #[serde(default = "default_trainable")]
    pub trainable: Trainable,
    pub steps: usize,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "one")]
    pub grad_accum: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Adam's second-moment decay (torch's and upstream's 0.999; lower values, such as the demo's
    /// 0.9, forget old gradient scales faster, which damps the loss spikes of short
    /// high-learning-rate runs).
    #[serde(default = "default_beta2")]
    pub adam_beta2: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_shuffle")]
    pub shuffle_buffer: usize,
    #[serde(default = "default_bucket")]
    pub bucket_batches: usize,
    /// Pad every batch to this length (upstream pads to 512); default: dynamic padding.
    #[serde(default)]
    pub pad_to: Option<usize>,
    #[serde(default = "default_ckpt")]
    pub checkpoint_every: usize,
    /// Held-out shards: every `val_every` steps and at the end, the loss over `val_batches`
    /// batches, with the image features and with them zeroed (the gap shows the image is used).
    #[serde(default)]
    pub val_shards: Option<PathBuf>,
    #[serde(default = "default_val_every")]
    pub val_every: usize,
    #[serde(default = "default_val_batches")]
    pub val_batches: usize,
    /// Check each shard file against the sha256 its manifest records, the first time the run
    /// opens it (a damaged shard stops the run, named); `false` skips the check.
    #[serde(default = "yes")]
    pub verify_shards: bool,
    /// `f32`, or `bf16`: bf16 compute with f32 master weights and optimizer state.
    #[serde(default)]
    pub precision: Precision,
}

/// The dtype the forward and backward passes compute in. Weights, gradients as the optimizer
/// sees them, and the optimizer state stay f32 either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    F32,
    /// f32 tensors; on CUDA, matrix products on the tensor cores in TF32 (10-bit mantissa
    /// inputs, f32 accumulation), as PyTorch's `allow_tf32`. Same as f32 on the CPU.
    Tf32,
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        serde::Deserialize::deserialize(
            serde::de::value::StrDeserializer::<serde::de::value::Error>::new(s),
        )
        .map_err(|_| Error::Config(format!("precision {s:?}: expected f32, tf32 or bf16")))
    }
}

fn yes() -> bool {
    true
}
fn default_val_every() -> usize {
    500
}
fn default_val_batches() -> usize {
    20
}

fn default_model() -> ModelChoice {
    ModelChoice::Preset("minimind_512".into())
}
fn default_trainable() -> Trainable {
    Trainable::All
}
fn default_batch() -> usize {
    16
}
fn one() -> usize {
    1
}
fn default_lr() -> f64 {
    4e-4
}
/// Adam's β₂ must lie in [0, 1); the trainer checks its setting, the demo its option, with this.
pub fn check_adam_beta2(beta2: f64) -> Result<f64> {
    if (0.0..1.0).contains(&beta2) {
        Ok(beta2)
    } else {
        Err(Error::Config(format!(
            "adam_beta2 = {beta2}: it must lie in [0, 1) (Adam's default is 0.999)"
        )))
    }
}

fn default_beta2() -> f64 {
    0.999 // Adam's (torch's) default, and upstream's
}
fn default_grad_clip() -> f64 {
    1.0
}
fn default_shuffle() -> usize {
    4096
}
fn default_bucket() -> usize {
    16
}
fn default_ckpt() -> usize {
    500
}
