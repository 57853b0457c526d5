//! The trainer: shards → checkpoint. Reads `[train]` of a pipeline file; streams batches
//! (`data`), trains the projector (+ LLM) with AdamW (`optim`), logs one JSONL line per step to
//! `out/metrics.jsonl`, and checkpoints to `out/checkpoint/` through `checkpoint` (weights,
//! config, optimizer moments, step and data position) so `--resume` continues bit for bit.

pub mod data;
pub mod dist;
pub mod optim;
pub mod plot;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Checkpoint, TrainState};
use crate::config::{check_adam_beta2, Precision, TrainConfig, Trainable};
use crate::error::{bad_file, Error, IoContext, Result};
use crate::model::{vlm::Vlm, weights, ModelConfig};
use crate::shards::ShardMeta;
use data::{DataConfig, Stream};
use optim::{AdamW, AdamWConfig};

/// Set the process-wide matmul mode `precision` asks for (TF32 on or off; CUDA only).
pub fn apply_matmul_mode(precision: Precision) {
    candle_core::cuda::set_gemm_reduced_precision_f32(precision == Precision::Tf32);
}

/// The model a step computes with: the f32 master itself, or (bf16) a copy of the master
/// weights cast to bf16 through differentiable casts, so gradients land on the f32 variables.
pub fn compute_model(
    master: &Vlm,
    varmap: &VarMap,
    precision: Precision,
    device: &Device,
) -> Result<Option<Vlm>> {
    if precision != Precision::Bf16 {
        return Ok(None);
    }
    let cast: std::collections::HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("lock")
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(DType::BF16)?)))
        .collect::<Result<_>>()?;
    let vb = candle_nn::VarBuilder::from_tensors(cast, DType::BF16, device);
    Ok(Some(Vlm::new(vb, &master.cfg)?))
}

/// One line of `val.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValLog {
    pub step: usize,
    pub loss: f32,
    pub loss_no_image: f32,
}

/// Mean held-out loss per loss token over the first `batches` batches of a fixed stream.
pub fn evaluate(
    model: &Vlm,
    files: &[PathBuf],
    meta: &ShardMeta,
    batch_size: usize,
    batches: usize,
    zero_images: bool,
    device: &Device,
) -> Result<f32> {
    let cfg = DataConfig {
        batch_size,
        shuffle_buffer: 1,
        bucket_batches: 1,
        seed: 0,
        pad_to: None,
    };
    let mut stream = Stream::new(files.to_vec(), cfg)?;
    let (mut sum, mut n) = (0f64, 0usize);
    for _ in 0..batches {
        let items = stream.next_items()?;
        if stream.epoch() > 0 {
            break; // fewer held-out samples than asked for: each counted once
        }
        let b = data::collate(
            &items,
            meta,
            None,
            zero_images,
            &model.cfg.image_ids,
            device,
        )?;
        if b.loss_tokens == 0 {
            continue;
        }
        let l = b.loss(model)?.detach().to_scalar::<f32>()?;
        sum += l as f64 * b.loss_tokens as f64;
        n += b.loss_tokens;
    }
    Ok((sum / n.max(1) as f64) as f32)
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub samples_per_s: f64,
    /// Share of the step spent waiting for data (reading, collating).
    pub data_wait: f64,
    pub epoch: u64,
}

/// A queued step whose numbers are still on the device.
struct Pending {
    step: usize,
    lr: f64,
    /// (mean loss, tokens, samples, gradient norm); tokens and samples averaged over ranks.
    stats: Tensor,
    wait: f64,
    epoch: u64,
    batch_ids: Vec<String>,
}

impl Pending {
    /// Read the step back (waits for the device to finish it); a non-finite loss stops the run.
    fn read(self, dist: &dist::Dist, secs: f64, ckpt: &Path) -> Result<StepLog> {
        let v = self.stats.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let w = dist.world as f64;
        let (loss, tokens, samples, norm) = (v[0], v[1] as f64 * w, v[2] as f64 * w, v[3]);
        if !loss.is_finite() || !norm.is_finite() {
            return Err(Error::Config(format!(
                "loss is {loss} (gradient norm {norm}) at step {} (rank {}; first ids of its batches {:?}); stopping — the last good checkpoint is in {}",
                self.step,
                dist.rank,
                self.batch_ids,
                ckpt.display()
            )));
        }
        Ok(StepLog {
            step: self.step,
            loss,
            lr: self.lr,
            grad_norm: norm as f64,
            tokens_per_s: tokens.round() / secs,
            samples_per_s: samples.round() / secs,
            data_wait: self.wait / secs,
            epoch: self.epoch,
        })
    }
}

pub struct RunOptions {
    pub resume: bool,
    /// Stop after this many steps of this invocation (tests; a clean "interruption").
    pub stop_after: Option<usize>,
    pub progress: bool,
    pub device: Device,
}

/// Build the model: from `init`, a checkpoint to resume, or random.
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
        let (m, vm, report) = weights::load(init, mcfg, true, device)?;
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

/// Keep the metrics lines of steps ≤ `step` (a resumed run rewrites the rest).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    truncate_jsonl::<StepLog>(path, |s| s.step <= step)
}

fn truncate_jsonl<T: serde::de::DeserializeOwned>(
    path: &Path,
    keep: impl Fn(&T) -> bool,
) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).at(path)?;
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<T>(l).is_ok_and(|s| keep(&s)))
        .map(|l| format!("{l}\n"))
        .collect();
    crate::util::write_bytes_atomic(path, kept.as_bytes())
}

pub fn read_metrics(out: &Path) -> Result<Vec<StepLog>> {
    read_jsonl(&out.join("metrics.jsonl"))
}

/// All lines of a JSONL file; none if it does not exist.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).at(path)?;
    text.lines()
        .map(|l| serde_json::from_str(l).map_err(|e| bad_file(path, e.to_string())))
        .collect()
}

pub fn run(cfg: &TrainConfig, opts: &RunOptions) -> Result<Vec<StepLog>> {
    Ok(run_dist(cfg, opts, &dist::Dist::solo())?.0)
}

/// One replica of a data-parallel run (`Dist::solo()`: the whole run). Every rank trains on its
/// share of the shard files and applies the rank-averaged gradients; rank 0 writes. Returns the
/// step logs and this replica's parameters.
pub fn run_dist(
    cfg: &TrainConfig,
    opts: &RunOptions,
    dist: &dist::Dist,
) -> Result<(Vec<StepLog>, VarMap)> {
    let mcfg = cfg.model.resolve()?;
    mcfg.validate()?;
    check_adam_beta2(cfg.adam_beta2)?;
    apply_matmul_mode(cfg.precision);
    let files = crate::shards::reader::list_shards(&cfg.shards)?;
    let meta = data::check_shards(&files, mcfg.vision_dim)?;
    let files = dist.partition(files)?;
    let main = dist.is_main();
    if meta.clip_random && main {
        eprintln!(
            "NOTE: {} holds features of a RANDOM-INITIALISED CLIP tower",
            cfg.shards.display()
        );
    }
    std::fs::create_dir_all(&cfg.out).at(&cfg.out)?;
    let val = match &cfg.val_shards {
        Some(dir) => {
            let files = crate::shards::reader::list_shards(dir)?;
            let val_meta = data::check_shards(&files, mcfg.vision_dim)?;
            data::check_same_clip((dir, &val_meta), (&cfg.shards, &meta))?;
            Some((files, val_meta))
        }
        None => None,
    };

    let ckpt_dir = checkpoint::dir(&cfg.out);
    if main {
        checkpoint::tidy(&cfg.out)?;
    }
    // The other ranks read the checkpoint only once rank 0 has tidied it.
    dist.barrier(&opts.device)?;
    let resume_from = match opts.resume && ckpt_dir.exists() {
        true => Some(Checkpoint::open(&ckpt_dir)?).filter(|c| matches!(c.state(), Ok(Some(_)))),
        false => None,
    };
    if opts.resume && main && resume_from.is_none() {
        eprintln!(
            "--resume: no checkpoint in {}; starting at step 0",
            cfg.out.display()
        );
    }
    let state: Option<TrainState> = match &resume_from {
        Some(c) => c.state()?,
        None => None,
    };
    let (model, varmap) = build_model(cfg, &mcfg, resume_from.as_ref(), &opts.device)?;
    let mut params: Vec<(String, candle_core::Var)> = varmap
        .data()
        .lock()
        .expect("lock")
        .iter()
        .filter(|(n, _)| {
            cfg.trainable == Trainable::All || n.starts_with(weights::PROJECTOR_PREFIX)
        })
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let adam = AdamWConfig {
        weight_decay: cfg.weight_decay,
        beta2: cfg.adam_beta2,
        ..Default::default()
    };
    let mut opt = AdamW::new(params, adam)?;

    let mut stream = Stream::new(
        files,
        DataConfig {
            batch_size: cfg.batch_size,
            shuffle_buffer: cfg.shuffle_buffer,
            bucket_batches: cfg.bucket_batches,
            seed: cfg.seed,
            pad_to: cfg.pad_to,
        },
    )?;
    let mut step = 0;
    if let (Some(s), Some(c)) = (&state, &resume_from) {
        opt.load_state(&c.optimizer(&opts.device)?, s.adam_t, c.dir())?;
        stream.skip_to(s.data_position)?;
        step = s.step;
        if main {
            eprintln!(
                "resuming at step {step} (data position {})",
                s.data_position
            );
        }
    }
    let metrics_path = cfg.out.join("metrics.jsonl");
    let val_path = cfg.out.join("val.jsonl");
    let mut metrics = if main {
        if state.is_some() {
            truncate_metrics(&metrics_path, step)?;
            truncate_jsonl::<ValLog>(&val_path, |v| v.step <= step)?;
        } else {
            for p in [&metrics_path, &val_path] {
                if p.exists() {
                    std::fs::remove_file(p).at(p)?;
                }
            }
        }
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .at(&metrics_path)?,
        )
    } else {
        None
    };

    let pb = if opts.progress && main {
        ProgressBar::new(cfg.steps as u64)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template(
            "train [{elapsed_precise}] {wide_bar} {pos}/{len} steps (ETA {eta}) {msg}",
        )
        .expect("static template"),
    );
    pb.set_position(step as u64);
    let mut logs = Vec::new();
    let mut done_here = 0;
    // The host reads a step's loss only after the next step is queued, so a GPU never waits
    // for the CPU between steps; a checkpoint, validation or the end reads at once.
    let mut pending: Option<Pending> = None;
    let mut last_done = Instant::now();
    while step < cfg.steps {
        let started = Instant::now();
        let lr = optim::lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps);
        let shadow = compute_model(&model, &varmap, cfg.precision, &opts.device)?;
        let compute = shadow.as_ref().unwrap_or(&model);
        let mut grads: Option<Vec<Tensor>> = None;
        let mut loss_sum: Option<Tensor> = None;
        let (mut tokens, mut samples, mut wait) = (0, 0, 0f64);
        let mut batch_ids = Vec::new();
        for _ in 0..cfg.grad_accum {
            let tw = Instant::now();
            let items = stream.next_items()?;
            let batch = data::collate(
                &items,
                &meta,
                cfg.pad_to,
                false,
                &mcfg.image_ids,
                &opts.device,
            )?;
            wait += tw.elapsed().as_secs_f64();
            let loss = (batch.loss(compute)? / cfg.grad_accum as f64)?;
            batch_ids.extend(batch.ids.iter().take(4).cloned());
            tokens += batch.tokens;
            samples += items.len();
            let store = loss.backward()?;
            let l = loss.detach();
            loss_sum = Some(match loss_sum {
                None => l,
                Some(acc) => (acc + l)?,
            });
            let g: Vec<Tensor> = opt.grads(&store)?;
            grads = Some(match grads {
                None => g,
                Some(acc) => acc
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        let mut grads = grads.expect("grad_accum >= 1");
        let dev = &opts.device;
        // (loss, tokens, samples) of this step, averaged over ranks with the gradients.
        let mut totals = Tensor::cat(
            &[
                loss_sum.expect("grad_accum >= 1").reshape(1)?,
                Tensor::new(&[tokens as f32, samples as f32], dev)?,
            ],
            0,
        )?;
        if dist.world > 1 {
            grads.push(totals);
            dist.mean(&mut grads)?;
            totals = grads.pop().expect("pushed above");
        }
        let grad_norm = optim::clip_global_norm(&mut grads, cfg.grad_clip)?;
        // A non-finite loss is caught when the step is read (below, or with the next one);
        // no checkpoint is written before the step it covers has been read and checked.
        opt.step(&grads, lr)?;
        step += 1;
        done_here += 1;
        let queued = Pending {
            step,
            lr,
            stats: Tensor::cat(&[totals, grad_norm.reshape(1)?], 0)?,
            wait,
            epoch: stream.epoch(),
            batch_ids,
        };
        let stopping = opts.stop_after.is_some_and(|n| done_here >= n);
        let checkpoint = step % cfg.checkpoint_every == 0 || step == cfg.steps || stopping;
        // Decided alike on every rank, so all read a step at the same point (rank 0 alone
        // validates, but every rank reads at once there).
        let val_step = val.is_some() && (step % cfg.val_every == 0 || step == cfg.steps);
        let flush = checkpoint || val_step;
        let mut ready = Vec::new();
        ready.extend(pending.take());
        if flush {
            ready.push(queued);
        } else {
            pending = Some(queued);
        }
        for p in ready {
            // A step read one step late took the time since the last read; one read at once
            // (checkpoint, validation, end), the time since it began.
            let since = if p.step == step { started } else { last_done };
            let secs = since.elapsed().as_secs_f64();
            last_done = Instant::now();
            let log = p.read(dist, secs, &ckpt_dir)?;
            if let Some(m) = metrics.as_mut() {
                writeln!(m, "{}", serde_json::to_string(&log)?).at(&metrics_path)?;
            }
            pb.set_message(format!("loss {:.4} lr {:.2e}", log.loss, log.lr));
            pb.set_position(log.step as u64);
            logs.push(log);
        }
        if checkpoint && main {
            let state = TrainState {
                step,
                data_position: stream.position,
                adam_t: opt.t,
                config: cfg.clone(),
            };
            let training = checkpoint::Training {
                optimizer: opt.state_tensors(),
                state: &state,
                shards: &meta,
            };
            checkpoint::save(&cfg.out, &varmap, &mcfg, training)?;
        }
        if let Some(val) = val.as_ref().filter(|_| val_step && main) {
            let loss = evaluate(
                &model,
                &val.0,
                &val.1,
                cfg.batch_size,
                cfg.val_batches,
                false,
                &opts.device,
            )?;
            let loss_no_image = evaluate(
                &model,
                &val.0,
                &val.1,
                cfg.batch_size,
                cfg.val_batches,
                true,
                &opts.device,
            )?;
            let line = serde_json::to_string(&ValLog {
                step,
                loss,
                loss_no_image,
            })?;
            let path = cfg.out.join("val.jsonl");
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .at(&path)?;
            writeln!(f, "{line}").at(&path)?;
            let msg = format!(
                "step {step}: held-out loss {loss:.4}, with images zeroed {loss_no_image:.4}"
            );
            if pb.is_hidden() {
                eprintln!("{msg}");
            } else {
                pb.println(msg);
            }
        }
        if stopping {
            break;
        }
    }
    pb.finish_and_clear();
    if step == cfg.steps && main {
        let all = read_metrics(&cfg.out)?;
        let val_logs = read_jsonl::<ValLog>(&val_path)?;
        let title = format!("{} — {} steps", cfg.out.display(), cfg.steps);
        plot::loss_curve(&cfg.out.join("loss.png"), &all, &val_logs, &title)?;
    }
    Ok((logs, varmap))
}
