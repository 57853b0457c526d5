//! `[train]`: the trainer's settings, the model it trains and the precision it computes in.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::ModelConfig;

/// The model to train: a preset's name (`model = "minimind_512"`), or a table of fields over a
/// base (`[train.model]`: `preset = "minimind_512"` by default, or the model of an `init`
/// checkpoint of ours). Upstream fixes the rest (vocabulary, placeholder ids, `multiple_of`,
/// RoPE theta), so a table names only what differs: `dim = 96`. `--set train.model.dim=96` works
/// on either form.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelChoice {
    Preset(String),
    Custom(ModelSpec),
}

/// Fields of a model over a base; each one given replaces the base's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// minimind_512, minimind_768, demo or tiny.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dim: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_kv_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_dim: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiple_of: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_eps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seq_len: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision_dim: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_ids: Option<Vec<u32>>,
}

impl From<ModelConfig> for ModelSpec {
    fn from(c: ModelConfig) -> Self {
        Self {
            preset: None,
            dim: Some(c.dim),
            n_layers: Some(c.n_layers),
            n_heads: Some(c.n_heads),
            n_kv_heads: Some(c.n_kv_heads),
            vocab_size: Some(c.vocab_size),
            hidden_dim: c.hidden_dim,
            multiple_of: Some(c.multiple_of),
            norm_eps: Some(c.norm_eps),
            max_seq_len: Some(c.max_seq_len),
            rope_theta: Some(c.rope_theta),
            vision_dim: Some(c.vision_dim),
            image_ids: Some(c.image_ids),
        }
    }
}

/// A preset by name.
pub fn preset(name: &str) -> Result<ModelConfig> {
    match name {
        "minimind_512" => Ok(ModelConfig::minimind_512()),
        "minimind_768" => Ok(ModelConfig::minimind_768()),
        "tiny" => Ok(ModelConfig::tiny()),
        "demo" => Ok(ModelConfig::demo()),
        other => Err(Error::Config(format!(
            "model {other:?}: expected minimind_512, minimind_768, demo, tiny or a [train.model] table"
        ))),
    }
}

impl ModelChoice {
    /// The model config; a table's fields go over its `preset`, else over `base` (the model of
    /// an `init` checkpoint), else over minimind_512.
    pub fn resolve_over(&self, base: Option<&ModelConfig>) -> Result<ModelConfig> {
        let s = match self {
            Self::Preset(p) => return preset(p),
            Self::Custom(s) => s,
        };
        let mut c = match (&s.preset, base) {
            (Some(p), _) => preset(p)?,
            (None, Some(b)) => b.clone(),
            (None, None) => ModelConfig::minimind_512(),
        };
        let set = |v: &Option<usize>, f: &mut usize| {
            if let Some(v) = v {
                *f = *v;
            }
        };
        set(&s.dim, &mut c.dim);
        set(&s.n_layers, &mut c.n_layers);
        set(&s.n_heads, &mut c.n_heads);
        set(&s.n_kv_heads, &mut c.n_kv_heads);
        set(&s.vocab_size, &mut c.vocab_size);
        set(&s.multiple_of, &mut c.multiple_of);
        set(&s.max_seq_len, &mut c.max_seq_len);
        set(&s.vision_dim, &mut c.vision_dim);
        c.hidden_dim = s.hidden_dim.or(c.hidden_dim);
        c.norm_eps = s.norm_eps.unwrap_or(c.norm_eps);
        c.rope_theta = s.rope_theta.unwrap_or(c.rope_theta);
        if let Some(ids) = &s.image_ids {
            c.image_ids = ids.clone();
        }
        Ok(c)
    }

    pub fn resolve(&self) -> Result<ModelConfig> {
        self.resolve_over(None)
    }
}

impl Serialize for ModelChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Preset(p) => s.serialize_str(p),
            Self::Custom(spec) => spec.serialize(s),
        }
    }
}

/// A string is a preset; a table a [`ModelSpec`], whose own errors (an unknown field, a wrong
/// type) come through as they are.
impl<'de> Deserialize<'de> for ModelChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ModelChoice;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a preset name (minimind_512, minimind_768, tiny) or a table of model fields",
                )
            }
            fn visit_str<E: serde::de::Error>(
                self,
                v: &str,
            ) -> std::result::Result<ModelChoice, E> {
                Ok(ModelChoice::Preset(v.into()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> std::result::Result<ModelChoice, A::Error> {
                ModelSpec::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(ModelChoice::Custom)
            }
        }
        d.deserialize_any(Visitor)
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
    /// Default: the model of an `init` checkpoint of ours, else minimind_512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelChoice>,
    /// Start from this checkpoint (a checkpoint directory of ours, a `.safetensors` file or
    /// upstream's `.pth`); absent or `"none"`: random initialisation.
    #[serde(default, deserialize_with = "path_or_none")]
    pub init: Option<PathBuf>,
    #[serde(default = "default_trainable")]
    pub trainable: Trainable,
    /// Optimizer steps of the whole run; or `epochs`, exactly one of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// Passes over the shards (upstream counts its runs in epochs): the run takes
    /// `epochs × steps_per_epoch` steps, the schedule spanning all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
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
    /// How data-parallel ranks divide the data (no effect on a run of one).
    #[serde(default)]
    pub rank_data: RankData,
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

/// How data-parallel ranks divide the shards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RankData {
    /// Every rank reads every shard and takes its share of each global batch (`world ×
    /// batch_size` samples, length-sorted when bucketing): equal work per step, so no rank waits
    /// for another's longer batch. Each rank reads all the features, `world` times the reading.
    #[default]
    Batches,
    /// Each rank reads its own shard files (every `world`-th): each file is read once, but the
    /// ranks' batches differ in length and every step waits for the longest. For many ranks on
    /// data whose reading costs more than that wait.
    Files,
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

impl TrainConfig {
    /// Every numeric setting in its range, named when not: checked when the file is read and
    /// again when a run starts.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("[train] {m}")));
        let counts = [
            ("steps", self.steps.unwrap_or(1)),
            ("epochs", self.epochs.unwrap_or(1)),
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("shuffle_buffer", self.shuffle_buffer),
            ("bucket_batches", self.bucket_batches),
            ("checkpoint_every", self.checkpoint_every),
            ("val_every", self.val_every),
            ("val_batches", self.val_batches),
        ];
        for (name, v) in counts {
            if v == 0 {
                return bad(format!("{name} = 0: it must be at least 1"));
            }
        }
        if self.pad_to == Some(0) {
            return bad("pad_to = 0: leave it out for dynamic padding, or give a length".into());
        }
        match (self.steps, self.epochs) {
            (Some(_), Some(_)) => {
                return bad("both steps and epochs are set: give exactly one\nHINT: remove one from the file; an override of one (--set train.steps=N or train.epochs=N) replaces the other".into())
            }
            (None, None) => {
                return bad("neither steps nor epochs is set: give exactly one (e.g. epochs = 1)".into())
            }
            (Some(steps), None) if self.warmup_steps > steps => {
                return bad(format!(
                    "warmup_steps = {} is more than steps = {steps}",
                    self.warmup_steps
                ));
            }
            _ => {}
        }
        let positive = [("lr", self.lr), ("grad_clip", self.grad_clip)];
        for (name, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("{name} = {v}: it must be a number above 0"));
            }
        }
        if !(self.weight_decay.is_finite() && (0.0..1.0).contains(&self.weight_decay)) {
            return bad(format!(
                "weight_decay = {}: it must lie in [0, 1)",
                self.weight_decay
            ));
        }
        check_adam_beta2(self.adam_beta2)?;
        Ok(())
    }

    /// Optimizer steps in one pass over `samples` samples shared by `world` ranks, `grad_accum`
    /// batches a step. With `rank_data = "batches"` the ranks draw global batches of `world ×
    /// batch_size` (the last one short, as upstream's loader with `drop_last=False`; one with fewer
    /// rows than ranks joins the batch before it); with `"files"` each rank draws its share in
    /// batches of its own. With one rank and no accumulation this is upstream's `iter_per_epoch =
    /// len(train_loader)`.
    pub fn steps_per_epoch(&self, samples: usize, world: usize) -> usize {
        let world = world.max(1);
        let batches = match self.rank_data {
            RankData::Batches => {
                let global = self.batch_size * world;
                let n = samples.div_ceil(global);
                let last = samples % global;
                if n > 1 && last > 0 && last < world {
                    n - 1
                } else {
                    n
                }
            }
            RankData::Files => samples.div_ceil(world).div_ceil(self.batch_size),
        };
        batches.div_ceil(self.grad_accum).max(1)
    }

    /// The run's length in optimizer steps: `steps`, or `epochs` passes over `samples` (which
    /// must then be known).
    pub fn total_steps(&self, samples: Option<usize>, world: usize) -> Result<usize> {
        let (steps, epochs) = (self.steps, self.epochs);
        match (steps, epochs, samples) {
            (Some(steps), _, _) => Ok(steps),
            (None, Some(epochs), Some(n)) => {
                let total = epochs * self.steps_per_epoch(n, world);
                if self.warmup_steps > total {
                    return Err(Error::Config(format!(
                        "[train] warmup_steps = {} is more than the {total} steps of {epochs} epoch(s)",
                        self.warmup_steps
                    )));
                }
                Ok(total)
            }
            (None, Some(_), None) => Err(Error::Config(format!(
                "[train] epochs: the manifests of {} do not say how many samples the shards hold (manifest.json missing, or not listing every shard)\nHINT: give steps instead of epochs, or keep each shard directory's manifest.json beside its data/",
                self.shards.display()
            ))),
            (None, None, _) => Err(Error::Config(
                "[train] neither steps nor epochs is set: give exactly one".into(),
            )),
        }
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

/// A path, or `"none"` (so that `--set train.init=none` turns a file's `init` off).
fn path_or_none<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<PathBuf>, D::Error> {
    let p: Option<PathBuf> = Option::deserialize(d)?;
    Ok(p.filter(|p| p.as_os_str() != "none" && !p.as_os_str().is_empty()))
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
