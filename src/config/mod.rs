//! Pipeline files (`pipelines/*.toml`): plain data, parsed and validated once into serde structs.
//! `--set section.key=value` overrides are applied to the TOML before it is deserialised, so an
//! override is checked exactly like the file.

use std::path::Path;

use serde::Deserialize;

mod ingest;
pub mod keys;
mod train;

use crate::error::{bad_file, Error, IoContext, Result};

pub use ingest::{IngestConfig, InputFormat};
pub use train::{check_adam_beta2, ModelChoice, Precision, RankData, TrainConfig, Trainable};

/// The MiniMind tokenizer, shipped in the repository.
pub const DEFAULT_TOKENIZER: &str = "assets/tokenizer";
/// HF's CLIP ViT-B/32, where upstream keeps it.
pub const DEFAULT_CLIP: &str = "model/clip_model/clip-vit-base-patch32";

/// One pipeline file. Each stage reads its own section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    pub ingest: Option<IngestConfig>,
    pub train: Option<TrainConfig>,
}

/// Apply one `a.b.c=value` override; the value is parsed as TOML, else taken as a string.
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| Error::Config(format!("--set {assignment:?}: expected key=value")))?;
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, parents) = parts.split_last().expect("split yields at least one part");
    let mut cur = &mut *table;
    for p in parents {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        // `model = "minimind_512"` with `--set train.model.dim=96`: the preset becomes the base of
        // a table of fields.
        if *p == "model" {
            if let toml::Value::String(preset) = entry {
                let mut t = toml::Table::new();
                t.insert("preset".into(), toml::Value::String(preset.clone()));
                *entry = toml::Value::Table(t);
            }
        }
        cur = entry
            .as_table_mut()
            .ok_or_else(|| Error::Config(format!("--set {key}: {p} is not a table")))?;
    }
    cur.insert(last.to_string(), value);
    // A run's length is given one way: overriding one of these replaces the other.
    if let Some(other) = alternative(key.trim()) {
        let (section, name) = other.split_once('.').expect("section.key");
        if let Some(t) = table.get_mut(section).and_then(toml::Value::as_table_mut) {
            t.remove(name);
        }
    }
    Ok(())
}

/// Settings of which a section takes exactly one.
const ALTERNATIVES: [(&str, &str); 2] = [
    ("train.steps", "train.epochs"),
    ("ingest.input", "ingest.json"),
];

/// The setting `key` is an alternative to, if any.
fn alternative(key: &str) -> Option<&'static str> {
    ALTERNATIVES.iter().find_map(|&(a, b)| match key {
        k if k == a => Some(b),
        k if k == b => Some(a),
        _ => None,
    })
}

/// One section of a pipeline file, overrides applied: `pick` takes it from the pipeline
/// (`|p| p.train`), `name` names it in the error when the file has none.
pub fn load_section<T>(
    path: &Path,
    overrides: &[String],
    name: &str,
    pick: impl FnOnce(Pipeline) -> Option<T>,
) -> Result<T> {
    pick(load_pipeline(path, overrides)?).ok_or_else(|| {
        bad_file(
            path,
            format!("no [{name}] section\nHINT: see pipelines/*.toml for the [{name}] settings"),
        )
    })
}

/// A pipeline file's settings as they resolve — defaults filled in, overrides applied — as TOML.
pub fn resolved(path: &Path, overrides: &[String]) -> Result<String> {
    let p = load_pipeline(path, overrides)?;
    let mut out = toml::Table::new();
    let section = |v: std::result::Result<toml::Value, toml::ser::Error>| {
        v.map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    };
    if let Some(i) = p.ingest {
        out.insert("ingest".into(), section(toml::Value::try_from(i))?);
    }
    if let Some(t) = p.train {
        out.insert("train".into(), section(toml::Value::try_from(t))?);
    }
    toml::to_string(&out).map_err(|e| Error::Config(e.to_string()))
}

/// Read a pipeline file and apply overrides.
pub fn load_pipeline(path: &Path, overrides: &[String]) -> Result<Pipeline> {
    let text = std::fs::read_to_string(path).at(path)?;
    let mut table: toml::Table = text.parse().map_err(|e| bad_file(path, format!("{e}")))?;
    for o in overrides {
        apply_override(&mut table, o)?;
    }
    let pipeline: Pipeline = toml::Value::Table(table)
        .try_into()
        .map_err(|e| bad_file(path, format!("{e}")))?;
    if let Some(ingest) = &pipeline.ingest {
        ingest
            .validate()
            .map_err(|e| bad_file(path, e.to_string()))?;
    }
    if let Some(train) = &pipeline.train {
        train
            .validate()
            .map_err(|e| bad_file(path, e.to_string()))?;
    }
    Ok(pipeline)
}
