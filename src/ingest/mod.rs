//! Ingest: upstream's dataset (v1's JSON + zip of images, or the later Parquet rows that carry
//! their images) → deduplicated CLIP-feature Parquet shards.
//!
//! Reads `cfg.input` (and for JSON `cfg.images`); writes `cfg.out/data/shard-NNNNN.parquet` (the held-out
//! split, `val_fraction`, in `cfg.out/val/`), a completion record
//! per shard under `cfg.out/progress/`, and, once every shard exists, `manifest.json` and
//! `rejects.jsonl`. Plans the run (records → samples → rows of unique image sets → shards), skips
//! the shards already done, and runs `pipeline` over the rest.

pub mod parquet_input;
mod pipeline;
pub mod plan;
pub mod records;
pub mod source;

use std::collections::BTreeMap;

use candle_core::Device;

use crate::config::{IngestConfig, InputFormat};
use crate::error::{bad_file, Error, Result};
use crate::shards::manifest::{self, Manifest, ShardEntry};
use crate::shards::reject::Reject;
use crate::shards::{self as sh, ClipPrecision, ShardMeta};
use crate::text::ChatTokenizer;
use crate::vision::clip::{ClipSource, ClipTower};
pub use pipeline::{Timing, WRITERS};
use plan::Plan;
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

/// What a plan holds, for `ingest --plan-only`.
#[derive(Debug, Clone, Default)]
pub struct PlanSummary {
    pub windows: usize,
    pub records_read: usize,
    pub rows: usize,
    pub rows_val: usize,
    pub samples: usize,
    pub images: usize,
    pub shards: usize,
    pub rejects_by_reason: BTreeMap<String, usize>,
    pub system_turns: usize,
    pub seconds: f64,
}

impl std::fmt::Display for PlanSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "planned in {:.1} s: {} records → {} samples in {} rows ({} held out) with {} images, {} shards; {} window{}",
            self.seconds, self.records_read, self.samples, self.rows, self.rows_val, self.images, self.shards,
            self.windows, if self.windows == 1 { "" } else { "s" }
        )?;
        for (reason, n) in &self.rejects_by_reason {
            writeln!(f, "  rejected before reading images, {reason}: {n}")?;
        }
        if self.system_turns > 0 {
            writeln!(f, "  system turns left out: {}", self.system_turns)?;
        }
        if let Some(rss) = crate::bench::peak_rss() {
            writeln!(f, "peak resident memory {:.0} MB", rss as f64 / 1e6)?;
        }
        writeln!(f, "nothing written (--plan-only); images are decoded, and may be rejected, when the shards are made")
    }
}

/// Read, tokenize and plan `cfg`'s input, writing nothing: what the shards would hold.
pub fn plan_only(cfg: &IngestConfig) -> Result<PlanSummary> {
    cfg.validate()?;
    input_format(cfg)?;
    let tokenizer = ChatTokenizer::load(&cfg.tokenizer)?;
    let started = std::time::Instant::now();
    let mut planner = plan::Planner::open(cfg, &tokenizer, &cfg.clip)?;
    let mut sum = PlanSummary {
        windows: planner.n_windows,
        ..PlanSummary::default()
    };
    for k in 0..planner.n_windows {
        let plan = planner.window(k, cfg, &tokenizer, sum.shards)?;
        for r in &plan.record_rejects {
            *sum.rejects_by_reason
                .entry(r.reason.as_str().to_string())
                .or_insert(0) += r.ids.len();
        }
        sum.records_read += plan.records_read;
        sum.rows += plan.groups.len();
        sum.rows_val += plan.groups.len() - plan.val_from;
        sum.samples += plan.groups.iter().map(|g| g.samples.len()).sum::<usize>();
        sum.images += plan.groups.iter().map(|g| g.images.len()).sum::<usize>();
        sum.shards += plan.n_shards(cfg.rows_per_shard);
        sum.system_turns += plan.system_turns;
    }
    sum.seconds = started.elapsed().as_secs_f64();
    Ok(sum)
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

/// What the windows of a plan add up to, for the manifest.
#[derive(Debug, Default)]
struct Totals {
    plan_id: String,
    records_read: usize,
    shards: usize,
    record_rejects: Vec<Reject>,
    placeholders_repaired: usize,
}

impl Totals {
    fn add(&mut self, plan: Plan, rows_per_shard: usize) {
        self.records_read += plan.records_read;
        self.shards += plan.n_shards(rows_per_shard);
        self.record_rejects.extend(plan.record_rejects);
        self.placeholders_repaired += plan.placeholders_repaired;
    }
}

/// Pending = this worker's shards of `plan` still to write, with the fingerprints of their
/// images as the source holds them now (indexed from the window's first shard); and how many of
/// its shards are already done.
type Pending = (Vec<usize>, Vec<String>);

fn pending_shards(
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

/// A run that rejects more than `max_reject_rate` of its records is most likely pointed at the
/// wrong images or prefix: it fails (the manifest and rejects stay, to look at), naming the top
/// reasons.
fn check_reject_rate(cfg: &IngestConfig, m: &Manifest) -> Result<()> {
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
fn finalize(cfg: &IngestConfig, plan: &Totals) -> Result<Option<Manifest>> {
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
    use crate::shards::{Sample, ShardRow};

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
