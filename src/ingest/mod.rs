//! Ingest: upstream's dataset (JSON + zip of images) → deduplicated CLIP-feature Parquet shards.
//!
//! Reads `cfg.json` and `cfg.images`; writes `cfg.out/shard-NNNNN.parquet`, a completion record
//! per shard under `cfg.out/progress/`, and, once every shard exists, `manifest.json` and
//! `rejects.jsonl`. Three stages run concurrently with bounded queues: read + decode + resize
//! (rayon), CLIP (batched), Parquet writing (own thread).

pub mod chat;
pub mod clip;
pub mod plan;
pub mod preprocess;
pub mod records;
pub mod reject;
pub mod source;

use std::collections::BTreeMap;

use candle_core::Device;
use crossbeam_channel::bounded;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::config::IngestConfig;
use crate::error::{bad_file, Error, Result};
use crate::shards::manifest::{self, Manifest, ShardDone, ShardEntry};
use crate::shards::{self as sh, ShardMeta, ShardRow};
use chat::ChatTokenizer;
use clip::{ClipSource, ClipTower};
use plan::{Group, Plan};
use reject::{Reason, Reject};
use source::ImageSource;

/// How this process takes part in an ingest.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// `workers` processes share one dataset; this one writes shards `i` with `i % workers == worker`.
    pub workers: usize,
    pub worker: usize,
    pub progress: bool,
    pub device: Device,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            workers: 1,
            worker: 0,
            progress: false,
            device: Device::Cpu,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub records_read: usize,
    pub shards_total: usize,
    pub shards_written: usize,
    pub shards_skipped: usize,
    pub images_processed: usize,
    pub clip_random: bool,
    /// Present once every shard of the plan exists.
    pub manifest: Option<Manifest>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "shards: {} written now, {} already done, {} in the plan; {} images through CLIP",
            self.shards_written, self.shards_skipped, self.shards_total, self.images_processed
        )?;
        if self.clip_random {
            writeln!(f, "NOTE: features come from a RANDOM-INITIALISED CLIP tower (not real image features)")?;
        }
        match &self.manifest {
            Some(m) => {
                writeln!(
                    f,
                    "records read {}, samples written {}, rejected {}, rows (unique image sets) {}, unique images {}",
                    m.records_read, m.samples_written, m.samples_rejected, m.rows, m.unique_images
                )?;
                if m.placeholders_repaired > 0 {
                    writeln!(
                        f,
                        "placeholders repaired (space before <image>): {}",
                        m.placeholders_repaired
                    )?;
                }
                for (reason, n) in &m.rejects_by_reason {
                    writeln!(f, "  rejected {reason}: {n}")?;
                }
                Ok(())
            }
            None => writeln!(
                f,
                "other workers' shards are still missing: manifest.json not written yet"
            ),
        }
    }
}

/// One row's per-image data (resized pixels, then features), or why the row has none.
type RowImages = std::result::Result<Vec<Vec<u8>>, (Reason, String)>;

/// A chunk of rows whose images are decoded and resized.
struct Prepared {
    shard: usize,
    groups: std::ops::Range<usize>,
    /// Per row: its resized images, or why it has none.
    images: Vec<RowImages>,
    last: bool,
}

/// The same chunk with features.
struct Featured {
    shard: usize,
    groups: std::ops::Range<usize>,
    features: Vec<RowImages>,
    last: bool,
}

pub fn run(cfg: &IngestConfig, opts: &IngestOptions) -> Result<Summary> {
    cfg.validate()?;
    if opts.workers == 0 || opts.worker >= opts.workers {
        return Err(Error::Config(format!(
            "--worker {} must be below --workers {}",
            opts.worker, opts.workers
        )));
    }
    source::check_exists(&cfg.json)?;
    source::check_exists(&cfg.images)?;
    let clip_source: ClipSource = cfg.clip.parse()?;
    if let ClipSource::Dir(dir) = &clip_source {
        if !dir.join("config.json").exists() {
            return Err(Error::ClipMissing { path: dir.clone() });
        }
    }
    let tokenizer = ChatTokenizer::load(&cfg.tokenizer)?;
    std::fs::create_dir_all(&cfg.out).map_err(|e| bad_file(&cfg.out, e.to_string()))?;
    crate::util::remove_stale_tmp(&cfg.out)?;
    crate::util::remove_stale_tmp(&manifest::progress_dir(&cfg.out))?;

    let plan = plan::make_plan(cfg, &tokenizer, &cfg.clip)?;
    let n_shards = plan.n_shards(cfg.rows_per_shard);
    let mut pending = Vec::new();
    let mut skipped = 0;
    for i in (0..n_shards).filter(|i| i % opts.workers == opts.worker) {
        match manifest::read_done(&cfg.out, i)? {
            Some(done) if done.plan_id == plan.plan_id => skipped += 1,
            Some(done) => {
                return Err(bad_file(
                    &cfg.out,
                    format!(
                        "holds shards of another plan ({} ≠ {}: different input JSON or settings)\nHINT: delete the directory or set another `out`",
                        done.plan_id, plan.plan_id
                    ),
                ))
            }
            None => pending.push(i),
        }
    }

    let mut images_processed = 0;
    let mut clip_random = matches!(clip_source, ClipSource::Random { .. });
    if !pending.is_empty() {
        let tower = ClipTower::load(&clip_source, &opts.device)?;
        clip_random = tower.is_random();
        let meta = shard_meta(cfg, &tower, &tokenizer);
        images_processed = process(cfg, opts, &plan, &pending, &tower, &meta)?;
    }

    let manifest = finalize(cfg, &plan, n_shards)?;
    Ok(Summary {
        records_read: plan.records_read,
        shards_total: n_shards,
        shards_written: pending.len(),
        shards_skipped: skipped,
        images_processed,
        clip_random,
        manifest,
    })
}

fn shard_meta(cfg: &IngestConfig, tower: &ClipTower, tokenizer: &ChatTokenizer) -> ShardMeta {
    ShardMeta {
        schema_version: sh::SCHEMA_VERSION.into(),
        stage: cfg.stage.as_str().into(),
        clip_source: tower.source.to_string(),
        clip_weights: tower.weights_id.clone(),
        clip_random: tower.is_random(),
        tokenizer_sha256: tokenizer.sha256.clone(),
        image_size: tower.image_size,
        feature_dtype: "f16".into(),
        feature_shape: [tower.tokens, tower.hidden],
        placeholder_ids: chat::placeholder_ids(),
        max_seq_len: cfg.max_seq_len,
    }
}

fn progress_bar(total: u64, enabled: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "ingest [{elapsed_precise}] {wide_bar} {pos}/{len} images ({per_sec}, ETA {eta}) {msg}",
        )
        .expect("static template"),
    );
    pb
}

/// Run the three-stage pipeline over the pending shards; returns images through CLIP.
fn process(
    cfg: &IngestConfig,
    opts: &IngestOptions,
    plan: &Plan,
    pending: &[usize],
    tower: &ClipTower,
    meta: &ShardMeta,
) -> Result<usize> {
    let rows = cfg.rows_per_shard;
    let total: usize = pending
        .iter()
        .map(|&i| {
            plan.shard(i, rows)
                .iter()
                .map(|g| g.images.len())
                .sum::<usize>()
        })
        .sum();
    let pb = progress_bar(total as u64, opts.progress);
    let (prep_tx, prep_rx) = bounded::<Result<Prepared>>(2);
    let (feat_tx, feat_rx) = bounded::<Featured>(2);

    std::thread::scope(|s| -> Result<usize> {
        // Stage 1: read bytes (sequential) and decode + resize (parallel). Owns the sender, so
        // the CLIP loop ends when this thread does.
        s.spawn(move || {
            let result = (|| -> Result<()> {
                let mut source = ImageSource::open(&cfg.images)?;
                for &shard in pending {
                    let groups = plan.shard(shard, rows);
                    let base = shard * rows;
                    let n_chunks = groups.len().div_ceil(cfg.clip_batch).max(1);
                    for c in 0..n_chunks {
                        let range = (c * cfg.clip_batch).min(groups.len())
                            ..((c + 1) * cfg.clip_batch).min(groups.len());
                        let images =
                            prepare(&mut source, &groups[range.clone()], tower.image_size as u32);
                        let chunk = Prepared {
                            shard,
                            groups: base + range.start..base + range.end,
                            images,
                            last: c + 1 == n_chunks,
                        };
                        if prep_tx.send(Ok(chunk)).is_err() {
                            return Ok(());
                        }
                    }
                }
                Ok(())
            })();
            if let Err(e) = result {
                let _ = prep_tx.send(Err(e));
            }
        });

        // Stage 3: assemble rows and write each shard when its last chunk arrives.
        let writer = s.spawn(|| -> Result<()> {
            let mut acc: Vec<ShardRow> = Vec::new();
            let mut rejects: Vec<Reject> = Vec::new();
            for chunk in feat_rx {
                for (g, feats) in plan.groups[chunk.groups.clone()].iter().zip(chunk.features) {
                    match feats {
                        Ok(features) => acc.push(ShardRow {
                            image_key: g.image_key.clone(),
                            images: g.images.clone(),
                            features,
                            samples: g.samples.clone(),
                        }),
                        Err((reason, detail)) => rejects.push(image_reject(g, reason, detail)),
                    }
                }
                if chunk.last {
                    write_one(
                        cfg,
                        plan,
                        chunk.shard,
                        std::mem::take(&mut acc),
                        std::mem::take(&mut rejects),
                        meta,
                    )?;
                    pb.set_message(format!("shard {} written", chunk.shard));
                }
            }
            Ok(())
        });

        // Stage 2 (this thread): CLIP.
        let mut processed = 0;
        let mut failure = None;
        for chunk in prep_rx.iter() {
            let chunk = match chunk.and_then(|c| featurize(tower, c)) {
                Ok(c) => c,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            let n: usize = chunk
                .features
                .iter()
                .map(|f| f.as_ref().map_or(0, |v| v.len()))
                .sum();
            processed += n;
            pb.inc(
                plan.groups[chunk.groups.clone()]
                    .iter()
                    .map(|g| g.images.len())
                    .sum::<usize>() as u64,
            );
            if feat_tx.send(chunk).is_err() {
                break;
            }
        }
        drop(feat_tx);
        drop(prep_rx);
        let written = writer.join().expect("writer thread panicked");
        pb.finish_and_clear();
        if let Some(e) = failure {
            return Err(e);
        }
        written?;
        Ok(processed)
    })
}

fn image_reject(g: &Group, reason: Reason, detail: String) -> Reject {
    Reject {
        reason,
        record: g.first_record,
        ids: g.samples.iter().map(|s| s.id.clone()).collect(),
        image: g.image_key.clone(),
        detail,
    }
}

/// Read every image of `groups`, then decode and resize them in parallel.
fn prepare(source: &mut ImageSource, groups: &[Group], size: u32) -> Vec<RowImages> {
    let bytes: Vec<_> = groups
        .iter()
        .map(|g| {
            g.images
                .iter()
                .map(|name| source.read(name))
                .collect::<std::result::Result<Vec<_>, _>>()
        })
        .collect();
    bytes
        .into_par_iter()
        .zip(groups.par_iter())
        .map(|(b, g)| {
            let b = b?;
            b.iter()
                .zip(&g.images)
                .map(|(bytes, name)| {
                    preprocess::load_resized(bytes, size)
                        .map_err(|(r, d)| (r, format!("{name}: {d}")))
                })
                .collect()
        })
        .collect()
}

fn featurize(tower: &ClipTower, chunk: Prepared) -> Result<Featured> {
    let flat: Vec<&[u8]> = chunk
        .images
        .iter()
        .flat_map(|r| r.iter().flatten())
        .map(|v| v.as_slice())
        .collect();
    let per_image = if flat.is_empty() {
        Vec::new()
    } else {
        tower.features_f16_bytes(&flat)?
    };
    let mut it = per_image.into_iter();
    let features = chunk
        .images
        .into_iter()
        .map(|r| {
            r.map(|imgs| {
                imgs.iter()
                    .map(|_| it.next().expect("one feature per image"))
                    .collect()
            })
        })
        .collect();
    Ok(Featured {
        shard: chunk.shard,
        groups: chunk.groups,
        features,
        last: chunk.last,
    })
}

fn write_one(
    cfg: &IngestConfig,
    plan: &Plan,
    index: usize,
    rows: Vec<ShardRow>,
    rejects: Vec<Reject>,
    meta: &ShardMeta,
) -> Result<()> {
    let file = sh::shard_name(index);
    let (bytes, sha256) = sh::writer::write_shard(&cfg.out.join(&file), &rows, meta)?;
    let done = ShardDone {
        index,
        file,
        plan_id: plan.plan_id.clone(),
        rows: rows.len(),
        samples: rows.iter().map(|r| r.samples.len()).sum(),
        images: rows.iter().map(|r| r.images.len()).sum(),
        bytes,
        sha256,
        rejects,
    };
    manifest::write_done(&cfg.out, &done)
}

/// Write `manifest.json` and `rejects.jsonl` if every shard of the plan is done.
fn finalize(cfg: &IngestConfig, plan: &Plan, n_shards: usize) -> Result<Option<Manifest>> {
    let mut dones = Vec::with_capacity(n_shards);
    for i in 0..n_shards {
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
            })
            .collect(),
        meta,
        config: serde_json::to_value(cfg)?,
    };
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
