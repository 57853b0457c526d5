//! Ingest: upstream's dataset (JSON + zip of images) → deduplicated CLIP-feature Parquet shards.
//!
//! Reads `cfg.json` and `cfg.images`; writes `cfg.out/shard-NNNNN.parquet`, a completion record
//! per shard under `cfg.out/progress/`, and, once every shard exists, `manifest.json` and
//! `rejects.jsonl`. The stages run concurrently with bounded queues: read + decode + resize
//! (rayon), CLIP (batched; one thread per stream, `clip_streams`), putting the chunks back in
//! order, Parquet writing (`WRITERS` shards at once).

pub mod chat;
pub mod clip;
pub mod plan;
pub mod preprocess;
pub mod records;
pub mod reject;
pub mod source;

use std::collections::BTreeMap;

use candle_core::Device;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::config::{ClipPrecision, IngestConfig};
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
    /// CLIP towers running side by side (on CUDA each on its own stream of the GPU); 0: the
    /// device's default (`crate::device::default_clip_streams`). The shards do not depend on it.
    pub clip_streams: usize,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            workers: 1,
            worker: 0,
            progress: false,
            device: Device::Cpu,
            clip_streams: 0,
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
    /// Where this run's time went; absent when every shard was already done.
    pub timing: Option<Timing>,
    /// Present once every shard of the plan exists.
    pub manifest: Option<Manifest>,
}

/// Where the pipeline's wall time went, seen from the CLIP stage: the share of it each CLIP
/// stream spent computing, waiting for decoded images, and waiting for the writer. The largest
/// says which stage limits the run.
#[derive(Debug, Clone, Default)]
pub struct Timing {
    pub wall_s: f64,
    pub clip_streams: usize,
    /// Summed over the streams.
    pub clip_s: f64,
    pub wait_images_s: f64,
    pub wait_writer_s: f64,
}

impl std::fmt::Display for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let share = |s: f64| 100.0 * s / (self.wall_s * self.clip_streams as f64).max(1e-9);
        write!(
            f,
            "{:.1} s; CLIP ({} stream{}) busy {:.0}%, waiting for decoded images {:.0}%, for the writer {:.0}%",
            self.wall_s,
            self.clip_streams,
            if self.clip_streams == 1 { "" } else { "s" },
            share(self.clip_s),
            share(self.wait_images_s),
            share(self.wait_writer_s)
        )
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "shards: {} written now, {} already done, {} in the plan; {} images through CLIP",
            self.shards_written, self.shards_skipped, self.shards_total, self.images_processed
        )?;
        if let Some(t) = &self.timing {
            writeln!(f, "time: {t}")?;
        }
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
    /// Position in the run: the CLIP streams may finish chunks out of order, the writer restores it.
    seq: usize,
    shard: usize,
    groups: std::ops::Range<usize>,
    /// Per row: its resized images, or why it has none.
    images: Vec<RowImages>,
    last: bool,
}

/// The same chunk with features.
struct Featured {
    seq: usize,
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

    // The precision changes the features, so it is part of what the shards are (their plan and
    // metadata). TF32 exists on CUDA only.
    let precision = match cfg.clip_precision {
        ClipPrecision::Tf32 if !opts.device.is_cuda() => {
            eprintln!("note: clip_precision = \"tf32\" applies on CUDA only; this run computes f32 features (and records f32)");
            "f32"
        }
        ClipPrecision::Tf32 => "tf32",
        ClipPrecision::F16 => "f16",
        ClipPrecision::F32 => "f32",
    };
    let clip_id = match precision {
        "f32" => cfg.clip.clone(),
        p => format!("{}+{p}", cfg.clip),
    };
    let plan = plan::make_plan(cfg, &tokenizer, &clip_id)?;
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
    let mut timing = None;
    let mut clip_random = matches!(clip_source, ClipSource::Random { .. });
    if !pending.is_empty() {
        let mut tower = ClipTower::load(&clip_source, &opts.device)?;
        if precision == "f16" {
            tower = tower.with_dtype(candle_core::DType::F16)?;
        }
        clip_random = tower.is_random();
        let meta = shard_meta(cfg, &tower, &tokenizer, precision);
        // A process-wide switch of candle's: set for this run only.
        let before = candle_core::cuda::gemm_reduced_precision_f32();
        candle_core::cuda::set_gemm_reduced_precision_f32(precision == "tf32");
        let result = process(cfg, opts, &plan, &pending, &tower, &meta);
        candle_core::cuda::set_gemm_reduced_precision_f32(before);
        let (n, t) = result?;
        images_processed = n;
        timing = Some(t);
    }

    let manifest = finalize(cfg, &plan, n_shards)?;
    Ok(Summary {
        records_read: plan.records_read,
        shards_total: n_shards,
        shards_written: pending.len(),
        shards_skipped: skipped,
        images_processed,
        clip_random,
        timing,
        manifest,
    })
}

fn shard_meta(
    cfg: &IngestConfig,
    tower: &ClipTower,
    tokenizer: &ChatTokenizer,
    precision: &str,
) -> ShardMeta {
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
        clip_precision: precision.into(),
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

/// Shards written at once.
pub const WRITERS: usize = 2;

/// Run the pipeline over the pending shards; returns the images through CLIP and
/// where the time went.
fn process(
    cfg: &IngestConfig,
    opts: &IngestOptions,
    plan: &Plan,
    pending: &[usize],
    tower: &ClipTower,
    meta: &ShardMeta,
) -> Result<(usize, Timing)> {
    let started = Instant::now();
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
    let (streams, more) = match opts.clip_streams {
        // Not asked for: a device that cannot give more streams still ingests, with one.
        0 => match tower.more_streams(crate::device::default_clip_streams(&tower.device) - 1) {
            Ok(more) => (more.len() + 1, more),
            Err(e) => {
                eprintln!("note: one CLIP stream only (another could not be made: {e})");
                (1, Vec::new())
            }
        },
        n => (n, tower.more_streams(n - 1)?),
    };
    let pb = progress_bar(total as u64, opts.progress);
    let (prep_tx, prep_rx) = bounded::<Result<Prepared>>(streams + 1);
    let (feat_tx, feat_rx) = bounded::<Featured>(streams + 1);
    // Set by the first CLIP stream that fails, so that the others stop too.
    let failed = AtomicBool::new(false);

    std::thread::scope(|s| -> Result<(usize, Timing)> {
        // Stage 1: read bytes (sequential) and decode + resize (parallel). Owns the sender, so
        // the CLIP streams end when this thread does.
        s.spawn(move || {
            let result = (|| -> Result<()> {
                let mut source = ImageSource::open(&cfg.images)?;
                let mut seq = 0;
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
                            seq,
                            shard,
                            groups: base + range.start..base + range.end,
                            images,
                            last: c + 1 == n_chunks,
                        };
                        seq += 1;
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

        // Stage 3: put the chunks back in order and assemble each shard's rows. A chunk lost to a
        // failed stream leaves its shard (and the later ones) unwritten: the run fails and a
        // rerun does them.
        let (shard_tx, shard_rx) = bounded::<(usize, Vec<ShardRow>, Vec<Reject>)>(1);
        let (pb, failed) = (&pb, &failed);
        s.spawn(move || {
            let mut acc: Vec<ShardRow> = Vec::new();
            let mut rejects: Vec<Reject> = Vec::new();
            let mut in_order = InOrder::default();
            for chunk in feat_rx {
                for chunk in in_order.push(chunk.seq, chunk) {
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
                        let shard = (
                            chunk.shard,
                            std::mem::take(&mut acc),
                            std::mem::take(&mut rejects),
                        );
                        if failed.load(Ordering::Relaxed) || shard_tx.send(shard).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        // Stage 4: write the shards, WRITERS at once (one Parquet writer is one core's work).
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                let rx = shard_rx.clone();
                s.spawn(move || -> Result<()> {
                    for (index, rows, rejects) in rx {
                        if failed.load(Ordering::Relaxed) {
                            break;
                        }
                        if let Err(e) = write_one(cfg, plan, index, rows, rejects, meta) {
                            failed.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                        pb.set_message(format!("shard {index} written"));
                    }
                    Ok(())
                })
            })
            .collect();
        drop(shard_rx);

        // Stage 2: CLIP, one thread per stream; this thread runs the first.
        let clip_stream = |tower: &ClipTower,
                           rx: Receiver<Result<Prepared>>,
                           tx: Sender<Featured>|
         -> Result<(usize, Timing)> {
            let mut processed = 0;
            let mut t = Timing::default();
            loop {
                let waited = Instant::now();
                let Ok(chunk) = rx.recv() else { break };
                t.wait_images_s += waited.elapsed().as_secs_f64();
                if failed.load(Ordering::Relaxed) {
                    break;
                }
                let busy = Instant::now();
                let chunk = match chunk.and_then(|c| featurize(tower, c)) {
                    Ok(c) => c,
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                };
                t.clip_s += busy.elapsed().as_secs_f64();
                processed += chunk
                    .features
                    .iter()
                    .map(|f| f.as_ref().map_or(0, |v| v.len()))
                    .sum::<usize>();
                pb.inc(
                    plan.groups[chunk.groups.clone()]
                        .iter()
                        .map(|g| g.images.len())
                        .sum::<usize>() as u64,
                );
                let waited = Instant::now();
                if tx.send(chunk).is_err() {
                    break;
                }
                t.wait_writer_s += waited.elapsed().as_secs_f64();
            }
            Ok((processed, t))
        };
        let others: Vec<_> = more
            .iter()
            .map(|t| {
                let (rx, tx) = (prep_rx.clone(), feat_tx.clone());
                s.spawn(move || clip_stream(t, rx, tx))
            })
            .collect();
        let mut results = vec![clip_stream(tower, prep_rx, feat_tx)];
        results.extend(
            others
                .into_iter()
                .map(|h| h.join().expect("CLIP stream panicked")),
        );
        let written: Vec<Result<()>> = writers
            .into_iter()
            .map(|h| h.join().expect("writer thread panicked"))
            .collect();
        pb.finish_and_clear();
        let mut processed = 0;
        let mut timing = Timing {
            clip_streams: streams,
            ..Timing::default()
        };
        for r in results {
            let (n, t) = r?;
            processed += n;
            timing.clip_s += t.clip_s;
            timing.wait_images_s += t.wait_images_s;
            timing.wait_writer_s += t.wait_writer_s;
        }
        written.into_iter().collect::<Result<()>>()?;
        timing.wall_s = started.elapsed().as_secs_f64();
        Ok((processed, timing))
    })
}

/// Restores a sequence numbered from 0 that arrives out of order: `push` gives back every item
/// that is next in line.
struct InOrder<T> {
    next: usize,
    early: BTreeMap<usize, T>,
}

impl<T> Default for InOrder<T> {
    fn default() -> Self {
        Self {
            next: 0,
            early: BTreeMap::new(),
        }
    }
}

impl<T> InOrder<T> {
    fn push(&mut self, seq: usize, item: T) -> Vec<T> {
        self.early.insert(seq, item);
        let mut ready = Vec::new();
        while let Some(item) = self.early.remove(&self.next) {
            ready.push(item);
            self.next += 1;
        }
        ready
    }
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
        seq: chunk.seq,
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

#[cfg(test)]
mod tests {
    use super::InOrder;

    #[test]
    fn in_order_gives_each_item_once_in_sequence_whatever_the_arrival_order() {
        let mut o = InOrder::default();
        assert!(o.push(2, 'c').is_empty());
        assert!(o.push(1, 'b').is_empty());
        assert_eq!(o.push(0, 'a'), vec!['a', 'b', 'c']);
        assert_eq!(o.push(3, 'd'), vec!['d']);
        assert!(o.push(5, 'f').is_empty());
        assert_eq!(o.push(4, 'e'), vec!['e', 'f']);
        assert!(o.early.is_empty());
    }
}
