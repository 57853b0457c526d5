//! Every pipeline key with its default and meaning: what `minimind-v config --list` prints. The
//! defaults are not written here but read from the parser itself (a section with only its
//! required keys, parsed and written back), and a test checks that this list and the structs hold
//! the same keys.

use super::{IngestConfig, TrainConfig};

/// One key: `section.key` as `--set` takes it, and what it means.
pub struct Key {
    pub key: &'static str,
    pub meaning: &'static str,
}

const fn k(key: &'static str, meaning: &'static str) -> Key {
    Key { key, meaning }
}

/// In the order a reader meets them.
pub const KEYS: &[Key] = &[
    k("ingest.stage", "pretrain | sft | sft_multi: which of upstream's stages `input` holds"),
    k("ingest.input", "upstream's v1 conversation JSON, or the later Parquet (a file or a directory of them); `json` is the same key"),
    k("ingest.format", "auto | json | parquet: what `input` is (auto: told by its first bytes)"),
    k("ingest.images", "v1 JSON only: upstream's image zip, or a directory of images (searched like the zip)"),
    k("ingest.image_prefix", "prepended to every image name (`COCO_train2014_` for upstream's SFT set)"),
    k("ingest.out", "directory for the shards (in data/), manifest.json and rejects.jsonl"),
    k("ingest.tokenizer", "tokenizer directory (upstream's, shipped in assets/)"),
    k("ingest.clip", "HF CLIP directory, or random:<seed> / random-small:<seed> (tests and demos only)"),
    k("ingest.clip_precision", "f32 (upstream's numbers), tf32 (CUDA) or f16; recorded in the shards"),
    k("ingest.clip_batch", "images per CLIP forward pass"),
    k("ingest.max_seq_len", "tokens per sample; longer samples are truncated as upstream does"),
    k("ingest.max_images", "images allowed per record; none: 1, or 2 for sft_multi"),
    k("ingest.rows_per_shard", "rows (unique image sets) per Parquet shard"),
    k("ingest.max_reject_rate", "share of records that may be rejected before the run fails"),
    k("ingest.val_fraction", "share of image sets held out into out/val/ (train's default val_shards); 0: none"),
    k("ingest.plan_window", "Parquet rows planned together (whole row groups): planning memory; images are deduplicated within one"),
    k("ingest.image_limits.max_side", "largest image width or height, checked from the header before decoding"),
    k("ingest.image_limits.max_pixels", "largest image area in pixels"),
    k("ingest.image_limits.max_bytes", "largest image file in bytes"),
    k("train.shards", "shard directory written by ingest"),
    k("train.val_shards", "held-out shards: loss with and without image features every val_every steps"),
    k("train.val_every", "steps between held-out evaluations"),
    k("train.val_batches", "batches per held-out evaluation"),
    k("train.out", "directory for checkpoint/, metrics.jsonl, val.jsonl and loss.png"),
    k("train.init", "start from: a checkpoint directory of ours, a .safetensors or upstream .pth; none: random"),
    k("train.model", "a preset (minimind_512, minimind_768, tiny), or a table of the model.* fields; none: init's model, else minimind_512"),
    k("train.model.preset", "the preset the other model.* fields change"),
    k("train.model.dim", "hidden width"),
    k("train.model.n_layers", "transformer blocks"),
    k("train.model.n_heads", "attention heads"),
    k("train.model.n_kv_heads", "key/value heads (grouped-query attention)"),
    k("train.model.vocab_size", "vocabulary (upstream's tokenizer: 6400)"),
    k("train.model.hidden_dim", "feed-forward width; none: upstream's rule from dim and multiple_of"),
    k("train.model.multiple_of", "feed-forward width is rounded up to a multiple of this"),
    k("train.model.norm_eps", "RMSNorm epsilon"),
    k("train.model.max_seq_len", "longest sequence the model reads"),
    k("train.model.rope_theta", "RoPE base"),
    k("train.model.vision_dim", "width of the image features the projector takes (768 for ViT-B/32)"),
    k("train.model.image_ids", "the 50 placeholder token ids image features replace"),
    k("train.trainable", "all (projector and LLM, upstream's) or projector"),
    k("train.steps", "optimizer steps of the whole run (or epochs: exactly one; --set of one replaces the other)"),
    k("train.epochs", "passes over the shards (upstream's unit); the run takes epochs × steps per epoch"),
    k("train.batch_size", "samples per rank per micro-batch"),
    k("train.grad_accum", "micro-batches accumulated per optimizer step"),
    k("train.lr", "peak learning rate; cosine to lr/10 over all steps (upstream's schedule)"),
    k("train.warmup_steps", "linear warmup steps before the cosine"),
    k("train.grad_clip", "global gradient-norm clip"),
    k("train.weight_decay", "AdamW weight decay (upstream: 0)"),
    k("train.adam_beta2", "Adam's second-moment decay (upstream: 0.999)"),
    k("train.precision", "f32, tf32 (CUDA) or bf16 compute with f32 master weights"),
    k("train.seed", "seed of the initialisation and the data order"),
    k("train.shuffle_buffer", "samples in the shuffle buffer"),
    k("train.bucket_batches", "batches sorted by length together (less padding)"),
    k("train.rank_data", "batches (every rank reads every shard, takes its share of each batch) or files (each rank its own shards)"),
    k("train.pad_to", "pad every batch to this length (upstream: 512); none: dynamic padding"),
    k("train.checkpoint_every", "steps between checkpoints"),
    k("train.verify_shards", "check each shard's sha256 against its manifest when first opened"),
];

/// Keys a section cannot do without, each with a value the parser takes (for reading the defaults).
pub const REQUIRED: &[(&str, &str)] = &[
    ("ingest.stage", "\"pretrain\""),
    ("ingest.input", "\"\""),
    ("ingest.out", "\"\""),
    ("train.shards", "\"\""),
    ("train.out", "\"\""),
    ("train.steps", "1"),
];

fn is_required(key: &str) -> bool {
    REQUIRED.iter().any(|(k, _)| *k == key)
}

/// A section with only its required keys, as TOML.
fn minimal(section: &str) -> String {
    REQUIRED
        .iter()
        .filter_map(|(k, v)| {
            Some(format!(
                "{} = {v}\n",
                k.strip_prefix(section)?.strip_prefix('.')?
            ))
        })
        .collect()
}

/// Each section's defaults as the parser fills them in, flattened to `section.key` (nested
/// tables as `section.table.key`); JSON, so a setting without a value shows as null.
pub fn defaults() -> Vec<(String, serde_json::Value)> {
    let ingest: IngestConfig =
        toml::from_str(&minimal("ingest")).expect("a minimal [ingest] parses");
    let train: TrainConfig = toml::from_str(&minimal("train")).expect("a minimal [train] parses");
    let mut out = Vec::new();
    for (section, value) in [
        ("ingest", serde_json::to_value(ingest)),
        ("train", serde_json::to_value(train)),
    ] {
        flatten(section, value.expect("configs serialise"), &mut out);
    }
    out
}

fn flatten(prefix: &str, value: serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                flatten(&format!("{prefix}.{k}"), v, out);
            }
        }
        v => out.push((prefix.to_string(), v)),
    }
}

/// The text of `config --list`.
pub fn list() -> String {
    let defaults: std::collections::HashMap<String, serde_json::Value> =
        defaults().into_iter().collect();
    let width = KEYS.iter().map(|k| k.key.len()).max().unwrap_or(0);
    let mut text =
        String::from("Pipeline keys (pipelines/*.toml; override any with --set KEY=VALUE):\n");
    let mut section = "";
    for key in KEYS {
        let this = key.key.split('.').next().unwrap_or("");
        if this != section {
            section = this;
            text.push_str(&format!("\n[{section}]\n"));
        }
        let default = match (is_required(key.key), defaults.get(key.key)) {
            _ if super::alternative(key.key).is_some() => format!(
                "required (or {})",
                super::alternative(key.key).unwrap_or_default()
            ),
            (true, _) => "required".to_string(),
            (false, Some(v)) if !v.is_null() => format!("default {v}"),
            (false, _) if key.key.starts_with("train.model.") => "default: the preset's".into(),
            _ => "default none".into(),
        };
        text.push_str(&format!(
            "  {:width$}  {default}\n      {}\n",
            key.key, key.meaning
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key the structs hold is listed, and every listed key is one the structs hold.
    #[test]
    fn the_list_holds_exactly_the_keys_the_parser_takes() {
        let mut pairs = defaults();
        // `model` is absent by default; its fields are those of a full model table.
        let spec = super::super::train::ModelSpec {
            preset: Some("tiny".into()),
            hidden_dim: Some(1),
            ..crate::model::ModelConfig::tiny().into()
        };
        flatten(
            "train.model",
            serde_json::to_value(spec).unwrap(),
            &mut pairs,
        );
        let mut from_structs: Vec<String> = pairs.into_iter().map(|(k, _)| k).collect();
        from_structs.push("train.model".into());
        // `epochs` is absent where `steps` gives the run's length.
        from_structs.push("train.epochs".into());
        from_structs.sort();
        let mut listed: Vec<String> = KEYS.iter().map(|k| k.key.to_string()).collect();
        listed.sort();
        assert_eq!(listed, from_structs);
        for (r, _) in REQUIRED {
            assert!(listed.iter().any(|k| k == r), "{r}");
        }
    }

    #[test]
    fn the_list_shows_the_parsers_defaults() {
        let text = list();
        assert!(text.contains("ingest.rows_per_shard"), "{text}");
        let line = |key: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(&format!("{key} ")))
                .unwrap_or_else(|| panic!("{key} missing:\n{text}"))
                .to_string()
        };
        assert!(line("ingest.rows_per_shard").ends_with("default 1024"));
        assert!(line("ingest.max_reject_rate").ends_with("default 0.5"));
        assert!(line("train.adam_beta2").ends_with("default 0.999"));
        assert!(line("train.steps").ends_with("required (or train.epochs)"));
        assert!(line("train.epochs").ends_with("required (or train.steps)"));
        assert!(line("train.pad_to").ends_with("default none"));
        assert!(line("train.model.dim").ends_with("default: the preset's"));
    }
}
