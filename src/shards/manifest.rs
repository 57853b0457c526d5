//! What an ingest run produced: per-shard completion records (the commit markers that make
//! ingest resumable) and, once every shard exists, `manifest.json` + `rejects.jsonl`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{bad_file, IoContext, Result};
use crate::shards::reject::Reject;
use crate::shards::ShardMeta;

/// Written after its shard's Parquet file is in place; a shard counts as done only with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardDone {
    pub index: usize,
    pub file: String,
    /// Identifies the inputs and settings; a different plan in the same directory is refused.
    pub plan_id: String,
    pub rows: usize,
    pub samples: usize,
    pub images: usize,
    pub bytes: u64,
    pub sha256: String,
    /// Image sets of this shard that could not be read, with every sample they carried.
    pub rejects: Vec<Reject>,
    /// Tokens of the longest sample (0 in records written before it was kept).
    #[serde(default)]
    pub longest_sample: usize,
    /// A fingerprint of the shard's images as the source held them (zip: each entry's CRC-32
    /// and sizes; directory: each file's size and modification time); a resumed ingest redoes
    /// the shard when it changed. Empty in records written before it was kept.
    #[serde(default)]
    pub inputs: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub rows: usize,
    pub samples: usize,
    pub bytes: u64,
    pub sha256: String,
    /// Tokens of the longest sample (0: not recorded).
    #[serde(default)]
    pub longest_sample: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: String,
    pub created_by: String,
    pub plan_id: String,
    /// Elements of the source JSON array.
    pub records_read: usize,
    pub samples_written: usize,
    /// Of `samples_written`, those in the held-out split (`val/`, `[ingest] val_fraction`).
    #[serde(default)]
    pub samples_val: usize,
    /// Samples lost to rejects; `records_read == samples_written + samples_rejected`.
    pub samples_rejected: usize,
    pub rows: usize,
    pub unique_images: usize,
    /// Samples whose placeholder upstream's tokenization would have merged (space before
    /// `<image>`), tokenized correctly instead.
    pub placeholders_repaired: usize,
    pub rejects_by_reason: BTreeMap<String, usize>,
    pub shards: Vec<ShardEntry>,
    /// Metadata shared by every shard; absent when no record survived.
    pub meta: Option<ShardMeta>,
    pub config: serde_json::Value,
}

impl Manifest {
    /// Every record read must be a sample written or a sample rejected; anything else is data
    /// lost without a word. `stage` names the ingest in the message.
    pub fn check_balance(&self, stage: &str) -> Result<()> {
        if self.records_read == self.samples_written + self.samples_rejected {
            return Ok(());
        }
        Err(crate::Error::Data(format!(
            "{stage}: records read {} ≠ samples written {} + samples rejected {} ({} unaccounted for); refusing to write manifest.json\nHINT: this is a bug in ingest; keep the directory and report it",
            self.records_read,
            self.samples_written,
            self.samples_rejected,
            self.records_read as i64 - (self.samples_written + self.samples_rejected) as i64
        )))
    }
}

pub fn progress_dir(out: &Path) -> PathBuf {
    out.join("progress")
}

pub fn done_path(out: &Path, index: usize) -> PathBuf {
    progress_dir(out).join(format!("shard-{index:05}.json"))
}

pub fn write_done(out: &Path, done: &ShardDone) -> Result<()> {
    let path = done_path(out, done.index);
    crate::util::write_bytes_atomic(&path, &serde_json::to_vec_pretty(done)?)
}

/// The completion record of shard `index`, if the shard is fully written.
pub fn read_done(out: &Path, index: usize) -> Result<Option<ShardDone>> {
    let path = done_path(out, index);
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).at(&path)?;
    let done: ShardDone =
        serde_json::from_slice(&bytes).map_err(|e| bad_file(&path, e.to_string()))?;
    let shard = out.join(&done.file);
    match std::fs::metadata(&shard) {
        Ok(m) if m.len() == done.bytes => Ok(Some(done)),
        _ => Ok(None),
    }
}

/// Whether a done shard's bytes still hash to what its completion record says.
pub fn intact(out: &Path, done: &ShardDone) -> Result<bool> {
    Ok(crate::util::sha256_file(&out.join(&done.file))? == done.sha256)
}

/// What the manifests say of shard files — each file's entry in the `manifest.json` of the
/// ingest it really belongs to (a symlinked shard finds its own): the manifest beside a `data/`
/// or `val/` directory, or in the shard's own directory for the layout before `data/`.
#[derive(Default)]
pub struct ShardIndex {
    /// Ingest directory → its manifest's entries by file (`None`: no manifest there).
    manifests: HashMap<PathBuf, Option<HashMap<String, ShardEntry>>>,
}

impl ShardIndex {
    /// `file`'s entry and its real path, if a manifest records it.
    pub fn entry(&mut self, file: &Path) -> Result<Option<(ShardEntry, PathBuf)>> {
        let real = std::fs::canonicalize(file).at(file)?;
        let Some(dir) = real.parent().map(Path::to_path_buf) else {
            return Ok(None);
        };
        let split = crate::shards::is_split_dir(&dir);
        let roots = [Some(dir.as_path()), dir.parent().filter(|_| split)];
        for root in roots.into_iter().flatten() {
            let Ok(rel) = real.strip_prefix(root) else {
                continue;
            };
            let recorded = self.manifests.entry(root.to_path_buf()).or_insert_with(|| {
                read_manifest(root).ok().map(|m| {
                    m.shards
                        .into_iter()
                        .map(|s| (s.file.clone(), s))
                        .collect::<HashMap<_, _>>()
                })
            });
            if let Some(e) = recorded
                .as_ref()
                .and_then(|m| m.get(rel.to_string_lossy().as_ref()))
            {
                return Ok(Some((e.clone(), real)));
            }
        }
        Ok(None)
    }

    /// The samples in `files` as their manifests record them; `None` when any is unknown.
    pub fn samples(&mut self, files: &[PathBuf]) -> Result<Option<usize>> {
        let mut total = 0;
        for f in files {
            match self.entry(f)? {
                Some((e, _)) => total += e.samples,
                None => return Ok(None),
            }
        }
        Ok(Some(total))
    }

    /// The longest sample of `files` as their manifests record it; `None` when any is unknown.
    pub fn longest_sample(&mut self, files: &[PathBuf]) -> Result<Option<usize>> {
        let mut longest = 0;
        for f in files {
            match self.entry(f)? {
                Some((e, _)) if e.longest_sample > 0 => longest = longest.max(e.longest_sample),
                _ => return Ok(None),
            }
        }
        Ok(Some(longest))
    }
}

/// Checks shard files against the sha256 their manifests record.
#[derive(Default)]
pub struct Verifier {
    index: ShardIndex,
}

impl Verifier {
    /// `Ok(true)` when `file` hashes to what its manifest records, `Ok(false)` when no manifest
    /// records it (nothing to check against), and an error naming the file when it differs.
    pub fn verify(&mut self, file: &Path) -> Result<bool> {
        let Some((entry, real)) = self.index.entry(file)? else {
            return Ok(false);
        };
        let want = &entry.sha256;
        let got = crate::util::sha256_file(&real)?;
        if &got != want {
            return Err(crate::Error::Data(format!(
                "{}: damaged — its sha256 is {got}, its ingest's manifest.json records {want}\nHINT: re-run the ingest that wrote it: a resumed ingest redoes shards whose bytes do not match",
                file.display(),
            )));
        }
        Ok(true)
    }
}

pub fn read_manifest(out: &Path) -> Result<Manifest> {
    let path = out.join("manifest.json");
    let bytes = std::fs::read(&path).at(&path)?;
    serde_json::from_slice(&bytes).map_err(|e| bad_file(&path, e.to_string()))
}

pub fn read_rejects(out: &Path) -> Result<Vec<Reject>> {
    let path = out.join("rejects.jsonl");
    let text = std::fs::read_to_string(&path).at(&path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| bad_file(&path, e.to_string())))
        .collect()
}
