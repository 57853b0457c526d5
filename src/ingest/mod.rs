//! Ingest: upstream's dataset (v1's JSON + zip of images, or the later Parquet rows that carry
//! their images) → deduplicated CLIP-feature Parquet shards.
//!
//! Reads `cfg.input` (and for JSON `cfg.images`); writes `cfg.out/data/shard-NNNNN.parquet` (the held-out
//! split, `val_fraction`, in `cfg.out/val/`), a completion record
//! per shard under `cfg.out/progress/`, and, once every shard exists, `manifest.json` and
//! `rejects.jsonl`. Plans the run (records → samples → rows of unique image sets → shards), skips
//! the shards already done, and runs `pipeline` over the rest.

mod completion;
pub mod parquet_input;
mod parquet_rows;
mod pipeline;
pub mod plan;
pub mod records;
pub mod source;

use candle_core::Device;

use crate::config::{IngestConfig, InputFormat};
use crate::error::{bad_file, Error, Result};
use crate::shards::manifest::{self, Manifest};
use crate::shards::{self as sh, ClipPrecision, ShardMeta};
use crate::text::ChatTokenizer;
use crate::vision::clip::{ClipSource, ClipTower};
use completion::{check_reject_rate, finalize, pending_shards, Totals};
pub use pipeline::{Timing, WRITERS};
pub use plan::{plan_only, PlanSummary};

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
                if m.samples_val > 0 {
                    writeln!(
                        f,
                        "held out (val_fraction): {} of the samples written, in val/",
                        m.samples_val
                    )?;
                }
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

/// What `cfg.input` is: as stated, or told by its first bytes (Parquet's magic, else JSON).
pub fn input_format(cfg: &IngestConfig) -> Result<InputFormat> {
    source::check_exists(&cfg.input)?;
    let parquet = parquet_input::is_parquet(&cfg.input)?;
    match (cfg.format, parquet) {
        (InputFormat::Auto, true) => Ok(InputFormat::Parquet),
        (InputFormat::Auto, false) => Ok(InputFormat::Json),
        (InputFormat::Json, false) | (InputFormat::Parquet, true) => Ok(cfg.format),
        (stated, _) => Err(bad_file(
            &cfg.input,
            format!(
                "format = \"{}\" is set, but this is {}\nHINT: set [ingest] format = \"auto\"",
                match stated {
                    InputFormat::Json => "json",
                    _ => "parquet",
                },
                if parquet { "Parquet" } else { "not Parquet" }
            ),
        )),
    }
}

pub fn run(cfg: &IngestConfig, opts: &IngestOptions) -> Result<Summary> {
    cfg.validate()?;
    if opts.workers == 0 || opts.worker >= opts.workers {
        return Err(Error::Config(format!(
            "--worker {} must be below --workers {}",
            opts.worker, opts.workers
        )));
    }
    match input_format(cfg)? {
        InputFormat::Parquet if !cfg.images.as_os_str().is_empty() => {
            return Err(Error::Config(format!(
                "[ingest] images = {:?}: {} is Parquet, whose rows hold their images\nHINT: remove `images`",
                cfg.images,
                cfg.input.display()
            )))
        }
        InputFormat::Parquet => {}
        _ if cfg.images.as_os_str().is_empty() => {
            return Err(Error::Config(format!(
                "[ingest] images: {} is v1's JSON, whose images are in a zip or directory\nHINT: set `images` to upstream's image zip (e.g. dataset/pretrain_images.zip)",
                cfg.input.display()
            )))
        }
        _ => source::check_exists(&cfg.images)?,
    }
    let clip_source: ClipSource = cfg.clip.parse()?;
    if let ClipSource::Dir(dir) = &clip_source {
        if !dir.join("config.json").exists() {
            return Err(Error::ClipMissing { path: dir.clone() });
        }
    }
    let tokenizer = ChatTokenizer::load(&cfg.tokenizer)?;
    std::fs::create_dir_all(&cfg.out).map_err(|e| bad_file(&cfg.out, e.to_string()))?;
    // One process per worker slot: a second ingest into the same `out` would do all the work
    // again beside the first.
    let _lock = crate::util::LockFile::acquire(
        &cfg.out
            .join(format!(".ingest-{}-of-{}.lock", opts.worker, opts.workers)),
        &format!(
            "an ingest into {} (worker {} of {})",
            cfg.out.display(),
            opts.worker,
            opts.workers
        ),
    )?;
    for dir in [sh::DATA_DIR, sh::VAL_DIR] {
        let dir = cfg.out.join(dir);
        std::fs::create_dir_all(&dir).map_err(|e| bad_file(&dir, e.to_string()))?;
        crate::util::remove_stale_tmp(&dir)?;
    }
    crate::util::remove_stale_tmp(&cfg.out)?;
    crate::util::remove_stale_tmp(&manifest::progress_dir(&cfg.out))?;

    // The precision changes the features, so it is part of what the shards are (their plan and
    // metadata). TF32 exists on CUDA only.
    let precision = match cfg.clip_precision {
        ClipPrecision::Tf32 if !opts.device.is_cuda() => {
            eprintln!("note: clip_precision = \"tf32\" applies on CUDA only; this run computes f32 features (and records f32)");
            ClipPrecision::F32
        }
        p => p,
    };
    let clip_id = match precision {
        ClipPrecision::F32 => cfg.clip.clone(),
        p => format!("{}+{}", cfg.clip, p.as_str()),
    };
    let mut planner = plan::Planner::open(cfg, &tokenizer, &clip_id)?;
    let mut totals = Totals {
        plan_id: planner.plan_id.clone(),
        ..Totals::default()
    };
    let (mut written, mut skipped, mut images_processed) = (0, 0, 0);
    let mut timing: Option<Timing> = None;
    let mut clip_random = matches!(clip_source, ClipSource::Random { .. });
    // Loaded when the first shard to write comes up: a finished ingest needs no tower.
    let mut towers: Option<(ClipTower, Vec<ClipTower>, ShardMeta)> = None;
    for k in 0..planner.n_windows {
        let planning = std::time::Instant::now();
        if opts.progress {
            match planner.rows() {
                Some((total, rows)) => eprintln!(
                    "planning window {}/{}: reading and tokenizing {} of {total} rows",
                    k + 1,
                    planner.n_windows,
                    rows[k]
                ),
                None => eprintln!("planning: reading and tokenizing {}", cfg.input.display()),
            }
        }
        let plan = planner.window(k, cfg, &tokenizer, totals.shards)?;
        let shards = plan.shards(cfg.rows_per_shard);
        if opts.progress {
            eprintln!(
                "planned in {:.1} s: {} records → {} rows (unique image sets) in {} shards; {} records rejected so far",
                planning.elapsed().as_secs_f64(),
                plan.records_read,
                plan.groups.len(),
                shards.len(),
                plan.record_rejects.len()
            );
            if plan.system_turns > 0 {
                eprintln!(
                    "note: {} system turns left out (v1's template, which the model was trained on, has none)",
                    plan.system_turns
                );
            }
        }
        let (pending, done) = pending_shards(cfg, opts, &plan)?;
        skipped += done;
        if !pending.0.is_empty() {
            if towers.is_none() {
                let tower =
                    ClipTower::load_as(&clip_source, &opts.device, precision.tower_dtype())?;
                clip_random = tower.is_random();
                let meta = shard_meta(cfg, &tower, &tokenizer, precision);
                let more = more_streams(&tower, opts.clip_streams)?;
                towers = Some((tower, more, meta));
            }
            let (tower, more, meta) = towers.as_ref().expect("loaded");
            let (n, t) = crate::device::with_tf32(precision == ClipPrecision::Tf32, || {
                pipeline::process(
                    cfg,
                    &plan,
                    &pending.0,
                    (tower, more),
                    meta,
                    &pending.1,
                    opts.progress,
                )
            })?;
            written += pending.0.len();
            images_processed += n;
            timing = Some(match timing {
                Some(before) => before.add(&t),
                None => t,
            });
        }
        totals.add(plan, cfg.rows_per_shard);
    }

    let manifest = finalize(cfg, &totals)?;
    if let Some(m) = &manifest {
        check_reject_rate(cfg, m)?;
    }
    Ok(Summary {
        records_read: totals.records_read,
        shards_total: totals.shards,
        shards_written: written,
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
    precision: ClipPrecision,
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
        placeholder_ids: crate::text::placeholder_ids(),
        max_seq_len: cfg.max_seq_len,
        clip_precision: precision,
    }
}

/// The towers to run beside `tower`: `streams - 1` of them, or when not told (0) the device's
/// default — and then a device that cannot make another stream still ingests, with one.
fn more_streams(tower: &ClipTower, streams: usize) -> Result<Vec<ClipTower>> {
    if streams > 0 {
        return tower.more_streams(streams - 1);
    }
    match tower.more_streams(crate::device::default_clip_streams(&tower.device) - 1) {
        Ok(more) => Ok(more),
        Err(e) => {
            eprintln!("note: one CLIP stream only (another could not be made: {e})");
            Ok(Vec::new())
        }
    }
}
