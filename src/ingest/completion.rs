//! Which shards are done. Each shard's completion record (`progress/shard-NNNNN.json`, written
//! after the shard) says which plan it belongs to, its sha256 and a fingerprint of its images:
//! from them a run knows which of its shards are still to write, and once every shard of the
//! plan exists it writes `manifest.json` and `rejects.jsonl`.

use std::collections::BTreeMap;

use super::plan::Plan;
use super::source::ImageSource;
use super::IngestOptions;
use crate::config::IngestConfig;
use crate::error::{bad_file, Error, Result};
use crate::shards as sh;
use crate::shards::manifest::{self, Manifest, ShardEntry};
use crate::shards::reject::Reject;

/// What the windows of a plan add up to, for the manifest.
#[derive(Debug, Default)]
pub struct Totals {
    pub plan_id: String,
    pub records_read: usize,
    pub shards: usize,
    pub record_rejects: Vec<Reject>,
    pub placeholders_repaired: usize,
}

impl Totals {
    pub fn add(&mut self, plan: Plan, rows_per_shard: usize) {
        self.records_read += plan.records_read;
        self.shards += plan.n_shards(rows_per_shard);
        self.record_rejects.extend(plan.record_rejects);
        self.placeholders_repaired += plan.placeholders_repaired;
    }
}

/// Pending = this worker's shards of `plan` still to write, with the fingerprints of their
/// images as the source holds them now (indexed from the window's first shard); and how many of
/// its shards are already done.
pub type Pending = (Vec<usize>, Vec<String>);

pub fn pending_shards(
    cfg: &IngestConfig,
    opts: &IngestOptions,
    plan: &Plan,
) -> Result<(Pending, usize)> {
    let shards = plan.shards(cfg.rows_per_shard);
    let mine: Vec<usize> = shards
        .clone()
        .filter(|i| i % opts.workers == opts.worker)
        .collect();
    let inputs: Vec<String> = {
        let mut source = ImageSource::for_input(cfg)?;
        shards
            .clone()
            .map(|i| match mine.contains(&i) {
                true => source.fingerprint(
                    plan.shard(i, cfg.rows_per_shard)
                        .iter()
                        .flat_map(|g| g.images.iter().map(String::as_str)),
                ),
                false => String::new(),
            })
            .collect()
    };
    let mut pending = Vec::new();
    let mut skipped = 0;
    for &i in &mine {
        let input = &inputs[i - shards.start];
        match manifest::read_done(&cfg.out, i)? {
            Some(done) if done.plan_id == plan.plan_id => {
                let shard = cfg.out.join(&done.file);
                // A shard whose bytes changed since it was written (damaged), or whose images
                // changed in the source since, is redone.
                if !manifest::intact(&cfg.out, &done)? {
                    eprintln!(
                        "{}: its bytes changed since it was written (sha256 differs): redoing it",
                        shard.display()
                    );
                    pending.push(i);
                } else if !done.inputs.is_empty() && done.inputs != *input {
                    eprintln!(
                        "{}: its images changed in {} since it was written: redoing it",
                        shard.display(),
                        cfg.images.display()
                    );
                    pending.push(i);
                } else {
                    skipped += 1;
                }
            }
            Some(done) => {
                return Err(bad_file(
                    &cfg.out,
                    format!(
                        "holds shards of another plan ({} ≠ {}: different input or settings)\nHINT: delete the directory or set another `out`",
                        done.plan_id, plan.plan_id
                    ),
                ))
            }
            None => pending.push(i),
        }
    }
    Ok(((pending, inputs), skipped))
}

/// A run that rejects more than `max_reject_rate` of its records is most likely pointed at the
/// wrong images or prefix: it fails (the manifest and rejects stay, to look at), naming the top
/// reasons.
pub fn check_reject_rate(cfg: &IngestConfig, m: &Manifest) -> Result<()> {
    let rate = m.samples_rejected as f64 / m.records_read.max(1) as f64;
    if m.records_read == 0 || rate <= cfg.max_reject_rate {
        return Ok(());
    }
    let mut reasons: Vec<(&String, &usize)> = m.rejects_by_reason.iter().collect();
    reasons.sort_by(|a, b| b.1.cmp(a.1));
    let top: Vec<String> = reasons
        .iter()
        .take(3)
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    Err(Error::Data(format!(
        "{}: {} of {} records rejected ({:.0}%, over max_reject_rate {:.0}%): {}; see {}\nHINT: check `images` and `image_prefix` (missing_image), the JSON, or raise [ingest] max_reject_rate",
        cfg.out.display(),
        m.samples_rejected,
        m.records_read,
        100.0 * rate,
        100.0 * cfg.max_reject_rate,
        top.join(", "),
        cfg.out.join("rejects.jsonl").display()
    )))
}

/// Write `manifest.json` and `rejects.jsonl` if every shard of the plan is done.
pub fn finalize(cfg: &IngestConfig, plan: &Totals) -> Result<Option<Manifest>> {
    let mut dones = Vec::with_capacity(plan.shards);
    for i in 0..plan.shards {
        match manifest::read_done(&cfg.out, i)? {
            Some(d) if d.plan_id == plan.plan_id => dones.push(d),
            _ => return Ok(None),
        }
    }
    let meta = match dones.first() {
        Some(d) => Some(sh::reader::read_meta(&cfg.out.join(&d.file))?),
        None => None,
    };
    let mut rejects: Vec<Reject> = plan.record_rejects.clone();
    rejects.extend(dones.iter().flat_map(|d| d.rejects.iter().cloned()));
    rejects.sort_by_key(|r| r.record);
    let mut by_reason = BTreeMap::new();
    for r in &rejects {
        *by_reason.entry(r.reason.as_str().to_string()).or_insert(0) += r.ids.len();
    }
    let manifest = Manifest {
        schema_version: sh::SCHEMA_VERSION.into(),
        created_by: format!("minimind-v {}", env!("CARGO_PKG_VERSION")),
        plan_id: plan.plan_id.clone(),
        records_read: plan.records_read,
        samples_written: dones.iter().map(|d| d.samples).sum(),
        samples_val: dones
            .iter()
            .filter(|d| d.file.starts_with(&format!("{}/", sh::VAL_DIR)))
            .map(|d| d.samples)
            .sum(),
        samples_rejected: rejects.iter().map(|r| r.ids.len()).sum(),
        rows: dones.iter().map(|d| d.rows).sum(),
        unique_images: dones.iter().map(|d| d.images).sum(),
        placeholders_repaired: plan.placeholders_repaired,
        rejects_by_reason: by_reason,
        shards: dones
            .iter()
            .map(|d| ShardEntry {
                file: d.file.clone(),
                rows: d.rows,
                samples: d.samples,
                bytes: d.bytes,
                sha256: d.sha256.clone(),
                longest_sample: d.longest_sample,
            })
            .collect(),
        meta,
        config: serde_json::to_value(cfg)?,
    };
    manifest.check_balance(&format!(
        "ingest {} into {}",
        cfg.stage.as_str(),
        cfg.out.display()
    ))?;
    let mut lines = String::new();
    for r in &rejects {
        lines.push_str(&serde_json::to_string(r)?);
        lines.push('\n');
    }
    crate::util::write_bytes_atomic(&cfg.out.join("rejects.jsonl"), lines.as_bytes())?;
    crate::util::write_bytes_atomic(
        &cfg.out.join("manifest.json"),
        &serde_json::to_vec_pretty(&manifest)?,
    )?;
    Ok(Some(manifest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shards::{ClipPrecision, Sample, ShardMeta, ShardRow};

    /// A finished plan whose shards hold fewer samples than its records minus its rejects: ingest
    /// refuses to write the manifest, naming the stage and the counts.
    #[test]
    fn an_unbalanced_ingest_refuses_to_finish() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("cache");
        let cfg = IngestConfig::new(
            crate::text::Stage::SftMulti,
            "x.json".into(),
            "x.zip".into(),
            out.clone(),
        );
        let row = ShardRow {
            image_key: "a.jpg, b.jpg".into(),
            images: vec!["a.jpg".into(), "b.jpg".into()],
            features: vec![vec![0u8; 8], vec![0u8; 8]],
            samples: vec![Sample {
                id: "0".into(),
                input_ids: vec![1, 2],
                loss_mask: vec![0, 1],
            }],
        };
        let meta = ShardMeta {
            schema_version: sh::SCHEMA_VERSION.into(),
            stage: "sft_multi".into(),
            clip_source: "random:0".into(),
            clip_weights: "random:0".into(),
            clip_random: true,
            tokenizer_sha256: String::new(),
            image_size: 224,
            feature_dtype: "f16".into(),
            feature_shape: [2, 2],
            placeholder_ids: crate::text::placeholder_ids(),
            max_seq_len: 512,
            clip_precision: ClipPrecision::F32,
        };
        let file = sh::shard_name(0);
        let (bytes, sha256) = sh::writer::write_shard(&out.join(&file), &[row], &meta).unwrap();
        let done = |samples| manifest::ShardDone {
            index: 0,
            file: file.clone(),
            plan_id: "p".into(),
            rows: 1,
            samples,
            images: 2,
            bytes,
            sha256: sha256.clone(),
            rejects: Vec::new(),
            longest_sample: 2,
            inputs: String::new(),
        };
        let plan = |records_read| Totals {
            plan_id: "p".into(),
            records_read,
            shards: 1,
            ..Totals::default()
        };
        manifest::write_done(&out, &done(1)).unwrap();
        assert!(finalize(&cfg, &plan(1)).unwrap().is_some());
        std::fs::remove_file(out.join("manifest.json")).unwrap();

        let err = finalize(&cfg, &plan(3)).unwrap_err().to_string();
        assert!(
            err.contains("ingest sft_multi")
                && err.contains("records read 3 ≠ samples written 1 + samples rejected 0"),
            "{err}"
        );
        assert!(!out.join("manifest.json").exists());
    }
}
