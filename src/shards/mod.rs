//! Shard schema v1: one Parquet row per unique image set, carrying its CLIP features and every
//! tokenized conversation that uses it. Self-describing: the key-value metadata says which CLIP,
//! tokenizer, feature dtype/shape and stage produced it, and readers refuse unknown versions.
//!
//! | column      | type                                                          |
//! |-------------|---------------------------------------------------------------|
//! | image_key   | Utf8 — the `image` field as in the source JSON                 |
//! | images      | List<Utf8> — image names                                      |
//! | features    | List<Binary> — per image, tokens×hidden little-endian f16     |
//! | samples     | List<Struct{id Utf8, input_ids List<UInt16>, loss_mask List<UInt8>}> |
//!
//! An ingest's `out` directory:
//!
//! ```text
//! out/data/shard-NNNNN.parquet   the shards (Parquet only: pyarrow, Polars and DuckDB read
//!                                `out/data` as one dataset)
//! out/val/shard-NNNNN.parquet    the held-out split, when `[ingest] val_fraction` > 0
//! out/manifest.json              what the run produced (`manifest`)
//! out/rejects.jsonl              every record, image or sample that did not become a row, with
//!                                its reason (`reject`)
//! out/progress/                  per-shard completion records (resume)
//! ```
//!
//! Directories written before the `data/` layout hold their shards directly in `out`; every
//! reader takes both.

pub mod manifest;
pub mod reader;
pub mod reject;
pub mod writer;

use std::collections::HashMap;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema};
use serde::{Deserialize, Serialize};

pub const SCHEMA_VERSION: &str = "1";

/// One tokenized conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub id: String,
    pub input_ids: Vec<u16>,
    pub loss_mask: Vec<u8>,
}

/// One shard row: an image set, its features and its samples.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardRow {
    pub image_key: String,
    pub images: Vec<String>,
    /// Per image, `tokens * hidden` f16 values as little-endian bytes.
    pub features: Vec<Vec<u8>>,
    pub samples: Vec<Sample>,
}

/// What produced a shard; stored as Parquet key-value metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMeta {
    pub schema_version: String,
    pub stage: String,
    pub clip_source: String,
    /// sha256 of the CLIP weights file, or `random:<seed>` for a random tower.
    pub clip_weights: String,
    pub clip_random: bool,
    pub tokenizer_sha256: String,
    pub image_size: usize,
    pub feature_dtype: String,
    /// [tokens, hidden], e.g. [50, 768].
    pub feature_shape: [usize; 2],
    pub placeholder_ids: Vec<u32>,
    pub max_seq_len: usize,
    /// How CLIP computed the features; absent (so f32 shards keep the keys they always had) for
    /// f32.
    #[serde(default, skip_serializing_if = "ClipPrecision::is_f32")]
    pub clip_precision: ClipPrecision,
}

/// How CLIP computed the features: `f32` (upstream's numbers), `tf32` (CUDA matmuls with TF32
/// inputs) or `f16` (weights and activations in f16). `[ingest] clip_precision`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClipPrecision {
    #[default]
    F32,
    Tf32,
    F16,
}

impl ClipPrecision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Tf32 => "tf32",
            Self::F16 => "f16",
        }
    }

    /// The CLIP tower's dtype (TF32 is f32 storage with TF32 matmuls).
    pub fn tower_dtype(self) -> candle_core::DType {
        match self {
            Self::F16 => candle_core::DType::F16,
            Self::F32 | Self::Tf32 => candle_core::DType::F32,
        }
    }

    fn is_f32(&self) -> bool {
        *self == Self::F32
    }
}

impl ShardMeta {
    pub fn to_kv(&self) -> Vec<(String, String)> {
        let v = serde_json::to_value(self).expect("plain struct");
        v.as_object()
            .expect("struct serialises to an object")
            .iter()
            .map(|(k, v)| {
                let s = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), s)
            })
            .collect()
    }

    /// Parse key-value metadata; `None` for the version when it is absent.
    pub fn from_kv(kv: &HashMap<String, String>) -> std::result::Result<Self, String> {
        let mut obj = serde_json::Map::new();
        for (k, v) in kv {
            if k.starts_with("ARROW:") {
                continue;
            }
            let value = match k.as_str() {
                "schema_version" | "stage" | "clip_source" | "clip_weights"
                | "tokenizer_sha256" | "feature_dtype" | "clip_precision" => {
                    serde_json::Value::String(v.clone())
                }
                _ => serde_json::from_str(v).map_err(|e| format!("metadata {k}={v:?}: {e}"))?,
            };
            obj.insert(k.clone(), value);
        }
        serde_json::from_value(serde_json::Value::Object(obj)).map_err(|e| format!("metadata: {e}"))
    }

    pub fn feature_bytes(&self) -> usize {
        self.feature_shape[0] * self.feature_shape[1] * 2
    }
}

fn list_of(name: &str, item: DataType) -> Field {
    Field::new(
        name,
        DataType::List(Arc::new(Field::new("item", item, false))),
        false,
    )
}

pub fn sample_fields() -> Fields {
    Fields::from(vec![
        Field::new("id", DataType::Utf8, false),
        list_of("input_ids", DataType::UInt16),
        list_of("loss_mask", DataType::UInt8),
    ])
}

/// The Arrow schema of shard version 1.
pub fn schema() -> Schema {
    Schema::new(vec![
        Field::new("image_key", DataType::Utf8, false),
        list_of("images", DataType::Utf8),
        list_of("features", DataType::Binary),
        list_of("samples", DataType::Struct(sample_fields())),
    ])
}

/// f32 features → little-endian f16 bytes.
pub fn f32_to_f16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect()
}

/// Little-endian f16 bytes → f32.
pub fn f16_bytes_to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect()
}

/// The shards' directory inside an ingest's `out`.
pub const DATA_DIR: &str = "data";
/// The held-out split's directory inside an ingest's `out`.
pub const VAL_DIR: &str = "val";

/// Whether `dir` is an ingest's `data/` or `val/` directory (its manifest is one level up).
pub fn is_split_dir(dir: &std::path::Path) -> bool {
    [DATA_DIR, VAL_DIR]
        .iter()
        .any(|d| dir.file_name() == Some(std::ffi::OsStr::new(d)))
}

/// `shard-00042.parquet`: names are global indices, so workers never collide.
pub fn shard_name(index: usize) -> String {
    format!("shard-{index:05}.parquet")
}

/// Shard `index`'s path relative to the ingest's `out`: `data/shard-00042.parquet`, or
/// `val/shard-00042.parquet` for the held-out split.
pub fn shard_file(index: usize, val: bool) -> String {
    let dir = if val { VAL_DIR } else { DATA_DIR };
    format!("{dir}/{}", shard_name(index))
}

#[cfg(test)]
impl ShardMeta {
    /// f32 features of a random ViT-B/32-shaped tower, for unit tests.
    pub(crate) fn example() -> Self {
        ShardMeta {
            schema_version: SCHEMA_VERSION.into(),
            stage: "pretrain".into(),
            clip_source: "random:0".into(),
            clip_weights: "random:0".into(),
            clip_random: true,
            tokenizer_sha256: "abc".into(),
            image_size: 224,
            feature_dtype: "f16".into(),
            feature_shape: [50, 768],
            placeholder_ids: vec![30, 32],
            max_seq_len: 512,
            clip_precision: ClipPrecision::F32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_precision_is_written_only_when_not_f32_and_read_back_as_f32_when_absent() {
        let meta = ShardMeta::example();
        let kv = |m: &ShardMeta| m.to_kv().into_iter().collect::<HashMap<_, _>>();
        // f32 shards carry the keys they always had: their bytes do not change.
        assert!(!kv(&meta).contains_key("clip_precision"));
        assert_eq!(ShardMeta::from_kv(&kv(&meta)).unwrap(), meta);
        let tf32 = ShardMeta {
            clip_precision: ClipPrecision::Tf32,
            ..meta
        };
        assert_eq!(kv(&tf32)["clip_precision"], "tf32");
        assert_eq!(ShardMeta::from_kv(&kv(&tf32)).unwrap(), tf32);
    }
}
