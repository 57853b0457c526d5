//! The trainer: shards → checkpoint. Reads `[train]` of a pipeline file; streams batches
//! (`data`), takes one optimizer step at a time (`step`, AdamW from `optim`), logs one JSONL line
//! per step to `out/metrics.jsonl` (`metrics`) and the held-out loss to `out/val.jsonl`
//! (`validate`), and checkpoints to `out/checkpoint/` through `checkpoint` (weights, config,
//! optimizer moments, step and data position) so `--resume` continues bit for bit. Data
//! parallel over ranks: `dist`.

pub mod data;
pub mod dist;
mod metrics;
pub mod optim;
pub mod plot;
pub mod step;
mod validate;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::progress::Progress;
use candle_core::Device;
use candle_nn::VarMap;

use crate::checkpoint::{self, Checkpoint, TrainState};
use crate::config::{RankData, TrainConfig};
use crate::error::{IoContext, Result};
use crate::model::{vlm::Vlm, weights, ModelConfig};
use crate::shards::ShardMeta;
use data::{DataConfig, Stream};
use dist::Dist;
use metrics::Pending;
pub use metrics::{read_jsonl, read_metrics, StepLog};
use optim::AdamWConfig;
pub use step::{apply_matmul_mode, compute_model, trainable_params, Phase, Trainer};
use validate::Validation;
pub use validate::{evaluate, ValLog};

pub struct RunOptions {
    /// Continue the run in `out` from its checkpoint.
    pub resume: bool,
    /// Start over in an `out` that holds a run (its checkpoint and logs are replaced).
    pub overwrite: bool,
    /// Resume even with settings that change what the run computes.
    pub force: bool,
    /// Set (by a Ctrl-C handler) to stop at the next step with a checkpoint; every rank stops
    /// at the same step.
    pub interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Stop after this many steps of this invocation (tests; a clean "interruption").
    pub stop_after: Option<usize>,
    pub progress: bool,
    pub device: Device,
}

pub fn run(cfg: &TrainConfig, opts: &RunOptions) -> Result<Vec<StepLog>> {
    Ok(run_dist(cfg, opts, &Dist::solo())?.0)
}

/// One replica of a data-parallel run (`Dist::solo()`: the whole run). Every rank trains on its
/// share of the data (`[train] rank_data`) and applies the rank-averaged gradients; rank 0
/// writes. Returns the step logs and this replica's parameters.
pub fn run_dist(
    cfg: &TrainConfig,
    opts: &RunOptions,
    dist: &Dist,
) -> Result<(Vec<StepLog>, VarMap)> {
    let mut run = Run::start(cfg, opts, dist)?;
    let total = run.total;
    if run.step >= total && dist.is_main() {
        let raise = match cfg.epochs {
            Some(_) => "epochs (--set train.epochs=N)",
            None => "steps (--set train.steps=N)",
        };
        eprintln!(
            "the run in {} already finished: step {} of {total}; nothing to do\nHINT: to train further, raise {raise} and --resume --force",
            cfg.out.display(),
            run.step,
        );
    }
    let mut logs = Vec::new();
    let mut done_here = 0;
    while run.step < total {
        let started = Instant::now();
        let queued = run.take_step()?;
        done_here += 1;
        let stopping = opts.stop_after.is_some_and(|n| done_here >= n) || run.interrupted;
        let checkpoint = run.step % cfg.checkpoint_every == 0 || run.step == total || stopping;
        // Decided alike on every rank, so all read a step at the same point (rank 0 alone
        // validates, but every rank reads at once there).
        let validate = run.val.is_some() && (run.step % cfg.val_every == 0 || run.step == total);
        logs.extend(run.record(queued, checkpoint || validate, started)?);
        if checkpoint && dist.is_main() {
            run.save()?;
        }
        if validate && dist.is_main() {
            run.validate()?;
        }
        if stopping {
            if run.interrupted && dist.is_main() {
                eprintln!(
                    "interrupted: checkpoint written at step {} in {}; --resume continues from there",
                    run.step,
                    checkpoint::dir(&cfg.out).display()
                );
            }
            break;
        }
    }
    run.finish()?;
    Ok((logs, run.trainer.varmap))
}

/// A run in progress: its settings, data, model and outputs.
struct Run<'a> {
    cfg: &'a TrainConfig,
    opts: &'a RunOptions,
    dist: &'a Dist,
    mcfg: ModelConfig,
    meta: ShardMeta,
    trainer: Trainer,
    stream: Stream,
    val: Option<Validation>,
    /// Steps done, this run's and a resumed run's before it.
    step: usize,
    /// Steps the whole run takes (`steps`, or `epochs` passes over the shards).
    total: usize,
    /// Steps in one pass over the shards, when their manifests give the sample count.
    per_epoch: Option<usize>,
    /// When this process started stepping, and at which step (for the epoch's ETA).
    began: (Instant, usize),
    /// The host reads a step's loss only after the next step is queued, so a GPU never waits
    /// for the CPU between steps; a checkpoint, validation or the end reads at once.
    pending: Option<Pending>,
    last_read: Instant,
    /// Rank 0's `metrics.jsonl`.
    metrics: Option<std::fs::File>,
    /// A rank was interrupted (Ctrl-C), as the averaged step numbers tell every rank alike:
    /// stop after the step in progress, with a checkpoint.
    interrupted: bool,
    pb: Progress,
}

impl<'a> Run<'a> {
    /// Check the settings and the shards, build or restore the model, optimizer and data
    /// position, and open the outputs.
    fn start(cfg: &'a TrainConfig, opts: &'a RunOptions, dist: &'a Dist) -> Result<Self> {
        cfg.validate()?;
        let mcfg = model_config(cfg)?;
        mcfg.validate()?;
        apply_matmul_mode(cfg.precision);
        let files = crate::shards::reader::list_shards(&cfg.shards)?;
        let meta = data::check_shards(&files, mcfg.vision_dim)?;
        // Samples longer than the model reads would fail mid-run: refused now, with the numbers.
        let mut index = crate::shards::manifest::ShardIndex::default();
        let longest = index.longest_sample(&files)?;
        let samples = index.samples(&files)?;
        if let Some(longest) = longest.filter(|&l| l > mcfg.max_seq_len + 1) {
            return Err(crate::Error::Config(format!(
                "{} holds samples of up to {longest} tokens, but the model reads at most max_seq_len = {} (a sample of n tokens is n - 1 positions)\nHINT: --set train.model.max_seq_len={}, or ingest with [ingest] max_seq_len = {}",
                cfg.shards.display(),
                mcfg.max_seq_len,
                longest - 1,
                mcfg.max_seq_len + 1
            )));
        }
        let total = cfg.total_steps(samples, dist.world)?;
        let per_epoch = samples.map(|n| cfg.steps_per_epoch(n, dist.world));
        let total_files = files.len();
        let (files, share) = match cfg.rank_data {
            RankData::Batches => (
                files,
                data::Share {
                    rank: dist.rank,
                    world: dist.world,
                },
            ),
            RankData::Files => (dist.partition(files)?, data::Share::WHOLE),
        };
        let main = dist.is_main();
        if meta.clip_random && main {
            eprintln!(
                "NOTE: {} holds features of a RANDOM-INITIALISED CLIP tower",
                cfg.shards.display()
            );
        }
        std::fs::create_dir_all(&cfg.out).at(&cfg.out)?;
        let val_dir = val_shards(cfg)?;
        let val = match &val_dir {
            Some(dir) => {
                let files = crate::shards::reader::list_shards(dir)?;
                let val_meta = data::check_shards(&files, mcfg.vision_dim)?;
                data::check_same_clip((dir, &val_meta), (&cfg.shards, &meta))?;
                if cfg.verify_shards {
                    let mut verifier = crate::shards::manifest::Verifier::default();
                    for f in &files {
                        verifier.verify(f)?;
                    }
                }
                Some(Validation {
                    files,
                    meta: val_meta,
                    batch_size: cfg.batch_size,
                    batches: cfg.val_batches,
                })
            }
            None => None,
        };

        let (resume_from, state) = resume_point(cfg, opts, dist)?;
        let (model, varmap) = build_model(cfg, &mcfg, resume_from.as_ref(), &opts.device)?;
        let adam = AdamWConfig {
            weight_decay: cfg.weight_decay,
            beta2: cfg.adam_beta2,
            ..Default::default()
        };
        let mut trainer = Trainer::new(
            model,
            varmap,
            cfg.trainable,
            adam,
            cfg.precision,
            cfg.grad_clip,
        )?;
        let mut stream = Stream::new(
            files,
            DataConfig {
                batch_size: cfg.batch_size,
                share,
                shuffle_buffer: cfg.shuffle_buffer,
                bucket_batches: cfg.bucket_batches,
                seed: cfg.seed,
                pad_to: cfg.pad_to,
                verify: cfg.verify_shards,
            },
        )?;
        if main && opts.progress {
            let trainable: usize = trainer.opt.params.iter().map(|(_, v)| v.elem_count()).sum();
            let data = DataSummary {
                files: total_files,
                samples,
                longest,
                val: val_dir.filter(|_| cfg.val_shards.is_none()),
            };
            let length = Length { total, per_epoch };
            eprintln!(
                "{}",
                summary(
                    cfg,
                    &mcfg,
                    trainable,
                    &data,
                    length,
                    dist.world,
                    &opts.device
                )
            );
        }
        let mut step = 0;
        if let (Some(s), Some(c)) = (&state, &resume_from) {
            trainer
                .opt
                .load_state(&c.optimizer(&opts.device)?, s.adam_t, c.dir())?;
            stream.skip_to(s.data_position)?;
            step = s.step;
            if main {
                eprintln!(
                    "resuming at step {step} (data position {})",
                    s.data_position
                );
            }
        }
        let metrics = main
            .then(|| open_logs(&cfg.out, state.as_ref().map(|s| s.step)))
            .transpose()?;
        let pb = Progress::new(
            "train",
            "steps",
            (step as u64, total as u64),
            opts.progress && main,
        );
        Ok(Self {
            cfg,
            opts,
            dist,
            mcfg,
            meta,
            trainer,
            stream,
            val,
            step,
            total,
            per_epoch,
            began: (Instant::now(), step),
            pending: None,
            last_read: Instant::now(),
            metrics,
            interrupted: false,
            pb,
        })
    }

    /// One optimizer step on the next `grad_accum` batches; its numbers stay on the device.
    fn take_step(&mut self) -> Result<Pending> {
        let cfg = self.cfg;
        let lr = optim::lr_at(self.step, self.total, cfg.lr, cfg.warmup_steps);
        let (mut wait, mut batch_ids) = (0f64, Vec::new());
        let (stream, meta, image_ids) = (&mut self.stream, &self.meta, &self.mcfg.image_ids);
        let device = &self.opts.device;
        let next_batch = || {
            let t = Instant::now();
            let items = stream.next_items()?;
            let batch = data::collate(&items, meta, cfg.pad_to, false, image_ids, device)?;
            wait += t.elapsed().as_secs_f64();
            batch_ids.extend(batch.ids.iter().take(4).cloned());
            Ok(batch)
        };
        let interrupted = self
            .opts
            .interrupt
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst));
        let extras = [f32::from(u8::from(interrupted))];
        let out = self
            .trainer
            .step(cfg.grad_accum, next_batch, lr, self.dist, &extras, |_| {
                Ok(())
            })?;
        self.step += 1;
        Ok(Pending {
            step: self.step,
            lr,
            stats: out.stats,
            wait,
            epoch: self.stream.epoch(),
            batch_ids,
        })
    }

    /// Read back the step before `queued` and, when `now`, `queued` itself (which otherwise
    /// waits for the next step); log what was read.
    fn record(&mut self, queued: Pending, now: bool, started: Instant) -> Result<Vec<StepLog>> {
        let mut ready: Vec<Pending> = self.pending.take().into_iter().collect();
        if now {
            ready.push(queued);
        } else {
            self.pending = Some(queued);
        }
        let mut logs = Vec::new();
        for p in ready {
            // A step read one step late took the time since the last read; one read at once
            // (checkpoint, validation, end), the time since it began.
            let since = if p.step == self.step {
                started
            } else {
                self.last_read
            };
            let secs = since.elapsed().as_secs_f64();
            self.last_read = Instant::now();
            let read = p.read(self.dist, secs, &checkpoint::dir(&self.cfg.out))?;
            self.interrupted |= read.interrupted;
            let log = read.log;
            if let Some(m) = self.metrics.as_mut() {
                let path = self.cfg.out.join("metrics.jsonl");
                writeln!(m, "{}", serde_json::to_string(&log)?).at(&path)?;
            }
            let epoch = self.per_epoch.map_or(String::new(), |per_epoch| {
                let rate = (self.step - self.began.1) as f64 / self.began.0.elapsed().as_secs_f64();
                epoch_status(log.step, per_epoch, self.cfg.epochs, rate)
            });
            self.pb
                .set_message(format!("{epoch}loss {:.4} lr {:.2e}", log.loss, log.lr));
            self.pb.set_position(log.step as u64);
            logs.push(log);
        }
        Ok(logs)
    }

    fn save(&self) -> Result<()> {
        let state = TrainState {
            step: self.step,
            data_position: self.stream.position,
            adam_t: self.trainer.opt.t,
            config: self.cfg.clone(),
        };
        let training = checkpoint::Training {
            optimizer: self.trainer.opt.state_tensors(),
            state: &state,
            shards: &self.meta,
        };
        checkpoint::save(&self.cfg.out, &self.trainer.varmap, &self.mcfg, training)
    }

    fn validate(&self) -> Result<()> {
        let Some(val) = &self.val else { return Ok(()) };
        let v = val.run(
            &self.trainer.model,
            self.step,
            &self.cfg.out,
            &self.opts.device,
        )?;
        let msg = format!(
            "step {}: held-out loss {:.4}, with images zeroed {:.4}",
            v.step, v.loss, v.loss_no_image
        );
        self.pb.println(msg);
        Ok(())
    }

    /// At the end of the whole run, rank 0 draws the loss curve.
    fn finish(&self) -> Result<()> {
        self.pb.finish();
        if self.step == self.total && self.dist.is_main() {
            let out = &self.cfg.out;
            let all = read_metrics(out)?;
            let val_logs = read_jsonl::<ValLog>(&out.join("val.jsonl"))?;
            let title = format!("{} — {} steps", out.display(), self.total);
            plot::loss_curve(&out.join("loss.png"), &all, &val_logs, &title)?;
        }
        Ok(())
    }
}

/// Where step `step` (1-based: steps done) stands in its epoch, for the progress line:
/// `epoch 3/19 (120/3125, epoch ETA 4m10s) ` — the epoch count when the run is given in epochs,
/// the epoch's ETA at `rate` steps per second.
fn epoch_status(step: usize, per_epoch: usize, epochs: Option<usize>, rate: f64) -> String {
    let (epoch, within) = ((step - 1) / per_epoch + 1, (step - 1) % per_epoch + 1);
    let of = epochs.map_or(String::new(), |e| format!("/{e}"));
    let eta = match rate.is_finite() && rate > 0.0 {
        true => crate::progress::duration((per_epoch - within) as f64 / rate),
        false => "?".into(),
    };
    format!("epoch {epoch}{of} ({within}/{per_epoch}, epoch ETA {eta}) ")
}

/// How long a run is: its steps, and the steps of one pass over the shards when known.
#[derive(Clone, Copy)]
struct Length {
    total: usize,
    per_epoch: Option<usize>,
}

/// What the manifests say of the training shards.
struct DataSummary {
    files: usize,
    samples: Option<usize>,
    longest: Option<usize>,
    /// The held-out split found beside the shards, when `val_shards` is not set.
    val: Option<PathBuf>,
}

/// The held-out shards: `val_shards`, or else the split the ingest made beside the shards
/// (`[ingest] val_fraction`).
fn val_shards(cfg: &TrainConfig) -> Result<Option<PathBuf>> {
    match &cfg.val_shards {
        Some(dir) => Ok(Some(dir.clone())),
        None => crate::shards::reader::held_out_split(&cfg.shards),
    }
}

/// What a run is about to do, printed when it starts: the model, the data, the schedule and
/// where the outputs go.
fn summary(
    cfg: &TrainConfig,
    mcfg: &ModelConfig,
    trainable: usize,
    data: &DataSummary,
    length: Length,
    world: usize,
    device: &Device,
) -> String {
    let millions = |n: u64| format!("{:.2} M", n as f64 / 1e6);
    let per_step = cfg.batch_size * cfg.grad_accum * world;
    let total = length.total;
    let samples = match (data.samples, length.per_epoch, cfg.epochs) {
        (Some(n), Some(per_epoch), Some(epochs)) => format!(
            "{n} samples (longest {} tokens); {epochs} epochs × {per_epoch} steps = {total} steps × {per_step} samples",
            data.longest.unwrap_or(0),
        ),
        (Some(n), Some(per_epoch), None) => format!(
            "{n} samples (longest {} tokens); {total} steps × {per_step} samples ≈ {:.2} epochs (one epoch: {per_epoch} steps)",
            data.longest.unwrap_or(0),
            (total * per_step) as f64 / n.max(1) as f64
        ),
        _ => format!("{total} steps × {per_step} samples"),
    };
    let val = match (&cfg.val_shards, &data.val) {
        (Some(v), _) => format!("{} every {} steps", v.display(), cfg.val_every),
        (None, Some(v)) => format!(
            "{} (the ingest's held-out split) every {} steps",
            v.display(),
            cfg.val_every
        ),
        (None, None) => "none (val_shards)".into(),
    };
    let out = cfg.out.display();
    format!(
        "model: dim {}, {} layers, {} heads ({} KV), max_seq_len {}; {} parameters, {} trainable ({:?}); {:?} on {device:?}\n\
         data: {} ({} shard files): {samples}\n\
         batch {} per rank × {} accumulated × {world} rank(s); lr {:e} cosine to {:e}, warmup {} steps; clip {}; checkpoint every {} steps; validation: {val}\n\
         outputs: {out}/metrics.jsonl, {out}/val.jsonl, {out}/checkpoint/, {out}/loss.png",
        mcfg.dim,
        mcfg.n_layers,
        mcfg.n_heads,
        mcfg.n_kv_heads,
        mcfg.max_seq_len,
        millions(mcfg.parameter_count()),
        millions(trainable as u64),
        cfg.trainable,
        cfg.precision,
        cfg.shards.display(),
        data.files,
        cfg.batch_size,
        cfg.grad_accum,
        cfg.lr,
        cfg.lr / 10.0,
        cfg.warmup_steps,
        cfg.grad_clip,
        cfg.checkpoint_every,
    )
}

/// The checkpoint a `--resume` continues from, and its state; none for a fresh run. Rank 0
/// tidies the checkpoint directory first, the others wait for it.
fn resume_point(
    cfg: &TrainConfig,
    opts: &RunOptions,
    dist: &Dist,
) -> Result<(Option<Checkpoint>, Option<TrainState>)> {
    let dir = checkpoint::dir(&cfg.out);
    if dist.is_main() {
        checkpoint::tidy(&cfg.out)?;
        if !opts.resume {
            clear_or_refuse(&cfg.out, opts.overwrite)?;
        }
    }
    dist.barrier(&opts.device)?;
    let ckpt = match opts.resume && dir.exists() {
        true => Some(Checkpoint::open(&dir)?),
        false => None,
    };
    let state = match &ckpt {
        Some(c) => c.state()?,
        None => None,
    };
    if opts.resume && dist.is_main() && state.is_none() {
        eprintln!(
            "--resume: no checkpoint in {}; starting at step 0",
            cfg.out.display()
        );
    }
    if let Some(s) = &state {
        check_resume(cfg, s, opts.force)?;
    }
    Ok((ckpt.filter(|_| state.is_some()), state))
}

/// A fresh run must not silently replace one in `out`: refused unless `overwrite`, and then its
/// checkpoint and logs go (a stale `loss.png` included).
fn clear_or_refuse(out: &Path, overwrite: bool) -> Result<()> {
    let ckpt = checkpoint::dir(out);
    let logs = ["metrics.jsonl", "val.jsonl", "loss.png"].map(|f| out.join(f));
    if !ckpt.exists() && !logs[0].exists() {
        return Ok(());
    }
    if !overwrite {
        let step = Checkpoint::open(&ckpt)
            .ok()
            .and_then(|c| c.state().ok().flatten())
            .map_or("no checkpoint yet".into(), |s| {
                format!("a checkpoint at step {}", s.step)
            });
        return Err(crate::Error::Config(format!(
            "{} holds a run ({step})\nHINT: --resume to continue it, or --overwrite to start over (its checkpoint and logs are replaced)",
            out.display()
        )));
    }
    if ckpt.exists() {
        std::fs::remove_dir_all(&ckpt).at(&ckpt)?;
    }
    for f in logs.iter().filter(|f| f.exists()) {
        std::fs::remove_file(f).at(f)?;
    }
    Ok(())
}

/// Settings that may change between a run and its resume without changing what it computes.
const RESUMABLE_CHANGES: [&str; 7] = [
    "init",
    "checkpoint_every",
    "val_every",
    "val_batches",
    "val_shards",
    "verify_shards",
    "out",
];

/// A resume continues the same run: settings that change what it computes (learning rate,
/// steps and so the schedule, batch, data order, model, …) are refused unless `force`, and named
/// either way.
fn check_resume(cfg: &TrainConfig, state: &TrainState, force: bool) -> Result<()> {
    let (now, then) = (
        serde_json::to_value(cfg)?,
        serde_json::to_value(&state.config)?,
    );
    let empty = serde_json::Map::new();
    let now = now.as_object().unwrap_or(&empty);
    let then = then.as_object().unwrap_or(&empty);
    let mut keys: Vec<&String> = now.keys().chain(then.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&serde_json::Value>| v.map_or("(unset)".into(), |v| v.to_string());
    let changed: Vec<(String, bool)> = keys
        .into_iter()
        .filter(|k| now.get(*k) != then.get(*k))
        .map(|k| {
            (
                format!("{k} {} → {}", show(then.get(k)), show(now.get(k))),
                RESUMABLE_CHANGES.contains(&k.as_str()),
            )
        })
        .collect();
    let breaking: Vec<&str> = changed
        .iter()
        .filter(|c| !c.1)
        .map(|c| c.0.as_str())
        .collect();
    if !breaking.is_empty() && !force {
        return Err(crate::Error::Config(format!(
            "--resume with changed settings: {}; these change what the run computes, so it would not continue the same run\nHINT: --force to continue with the new settings anyway, or --overwrite (without --resume) to start over",
            breaking.join(", ")
        )));
    }
    for (c, _) in &changed {
        eprintln!("--resume: setting changed since the checkpoint: {c}");
    }
    Ok(())
}

/// The model a run trains: `model` over its base, the base being the model of an `init`
/// checkpoint of ours (a checkpoint directory, or the weights file inside one), else
/// minimind_512; without `model`, that base itself.
pub fn model_config(cfg: &TrainConfig) -> Result<ModelConfig> {
    let base = cfg.init.as_deref().and_then(|init| {
        let dir = if init.is_dir() { init } else { init.parent()? };
        Checkpoint::open(dir).ok()?.model_config().ok()
    });
    match &cfg.model {
        Some(choice) => choice.resolve_over(base.as_ref()),
        None => Ok(base.unwrap_or_else(ModelConfig::minimind_512)),
    }
}

/// Build the model: from a checkpoint to resume, from `init`, or random.
fn build_model(
    cfg: &TrainConfig,
    mcfg: &ModelConfig,
    resume_from: Option<&Checkpoint>,
    device: &Device,
) -> Result<(Vlm, VarMap)> {
    if let Some(ckpt) = resume_from {
        return ckpt.load_model(device);
    }
    if let Some(init) = &cfg.init {
        let file = if init.is_dir() {
            checkpoint::weights_file(init)
        } else {
            init.clone()
        };
        if !file.exists() {
            return Err(crate::error::bad_file(
                &file,
                "the init checkpoint does not exist\nHINT: put upstream's LLM weights there (512_llm.pth from MiniMind's release, for pipelines/pretrain.toml), point `init` at a checkpoint of ours, or train from random weights with --set train.init=none",
            ));
        }
        let (m, vm, report) = weights::load(&file, mcfg, true, device)?;
        if report.fresh_projector {
            eprintln!(
                "{}: no projector in this checkpoint (LLM only): initialising vision_proj freshly",
                init.display()
            );
        }
        return Ok((m, vm));
    }
    let state = weights::random_state(mcfg, cfg.seed)?;
    let (m, vm, _) = weights::build(Path::new("random init"), state, mcfg, false, device)?;
    Ok((m, vm))
}

/// Rank 0's `metrics.jsonl`, open for appending: cut at `resumed_at`'s step (with `val.jsonl`),
/// or both removed for a fresh run.
fn open_logs(out: &Path, resumed_at: Option<usize>) -> Result<std::fs::File> {
    let (metrics, val) = (out.join("metrics.jsonl"), out.join("val.jsonl"));
    match resumed_at {
        Some(step) => {
            metrics::truncate_jsonl::<StepLog>(&metrics, |s| s.step <= step)?;
            metrics::truncate_jsonl::<ValLog>(&val, |v| v.step <= step)?;
        }
        None => {
            for p in [&metrics, &val] {
                if p.exists() {
                    std::fs::remove_file(p).at(p)?;
                }
            }
        }
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics)
        .at(&metrics)
}
