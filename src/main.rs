//! The `minimind-v` command: parses arguments and dispatches to the library. No logic here.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use minimind_v::{bench, config, demo, device, generate, ingest, inspect, synth, train};

#[derive(Parser)]
#[command(
    name = "minimind-v",
    version,
    about = "Train a tiny vision-language model from precomputed CLIP-feature shards"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Upstream dataset (JSON + zip of images) → deduplicated CLIP-feature Parquet shards.
    Ingest {
        /// Pipeline file with an [ingest] section, e.g. pipelines/pretrain.toml.
        pipeline: PathBuf,
        /// Override a setting: --set ingest.clip=random:0 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Shorthand for --set ingest.clip=…: an HF CLIP directory or random:<seed>.
        #[arg(long)]
        clip: Option<String>,
        /// Machines sharing this ingest; this one writes shards i with i % workers == worker.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        #[arg(long, default_value_t = 0)]
        worker: usize,
        /// cpu, cuda, cuda:N or auto.
        #[arg(long, default_value = "auto")]
        device: String,
        /// CLIP towers running side by side, each on its own CUDA stream (0: 2 on a GPU, 1 on
        /// the CPU). The shards are the same whatever it is.
        #[arg(long, default_value_t = 0)]
        clip_streams: usize,
    },
    /// Offline demo, no downloads: synthetic dataset → ingest (all three stages) → inspect →
    /// train (captions, then instructions) → score held-out answers; writes <out>/report.md.
    Demo {
        #[arg(long, default_value = "out/demo")]
        out: PathBuf,
        /// Seed of the synthetic data, the random tower and the model's initialisation. The
        /// demo's settings were chosen on seeds 0–4; its accuracy is reported on 101–105, never
        /// used for a choice (docs/DEMO.md).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Caption (pretrain) images.
        #[arg(long, default_value_t = 2000)]
        pretrain: usize,
        /// Instruction images (--sft-records records each).
        #[arg(long, default_value_t = 6000)]
        sft: usize,
        /// Conversation records per instruction image. Each asks the image's four questions in
        /// another order; instruction tuning (as upstream's SFT) trains a record's first
        /// question–answer pair only.
        #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        sft_records: usize,
        /// Two-image pairs for the "what differs" instructions.
        #[arg(long, default_value_t = 200)]
        multi: usize,
        #[arg(long, default_value = minimind_v::config::DEFAULT_CLIP)]
        clip: PathBuf,
        #[arg(long, default_value_t = 400)]
        pretrain_steps: usize,
        #[arg(long, default_value_t = 5500)]
        sft_steps: usize,
        /// Peak learning rate of the instruction stage (chosen on the tuning seeds, docs/DEMO.md).
        #[arg(long, default_value_t = 2e-3)]
        sft_lr: f64,
        /// Adam's β₂ in the instruction stage (upstream's is 0.999; 0.9 was chosen on the tuning
        /// seeds, docs/DEMO.md).
        #[arg(long, default_value_t = minimind_v::demo_eval::SFT_ADAM_BETA2, value_parser = parse_adam_beta2)]
        sft_adam_beta2: f64,
        #[arg(long, default_value_t = 200)]
        eval_images: usize,
        /// Held-out image pairs asked "What differs between the two images?".
        #[arg(long, default_value_t = 100)]
        eval_pairs: usize,
        /// Exit with an error when held-out accuracy misses the bar (colour ≥95%, shape ≥85%).
        #[arg(long)]
        require_bar: bool,
        #[arg(long, default_value = "auto")]
        device: String,
        /// Train each stage as this many data-parallel CPU processes (1, 2, 4, 8 or 16; the
        /// global batch stays 16). Default: 2 on a CPU with at least 2 cores, else 1.
        #[arg(long)]
        ranks: Option<usize>,
        /// Width of the model the demo trains (default: the demo model's, 96).
        #[arg(long)]
        dim: Option<usize>,
        /// Layers of the model the demo trains (default: the demo model's, 4).
        #[arg(long)]
        layers: Option<usize>,
    },
    /// Train the projector (+ LLM) on shards: pipeline file with a [train] section.
    Train {
        pipeline: PathBuf,
        /// Override a setting: --set train.steps=100 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Continue from out/checkpoint exactly where it stopped.
        #[arg(long)]
        resume: bool,
        /// Stop (with a checkpoint) after this many steps of this run.
        #[arg(long)]
        stop_after: Option<usize>,
        /// Data parallel: start this many processes (rank r on cuda:r, or all on cpu), each on
        /// its share of the shards, gradients averaged every step.
        #[arg(long, alias = "gpus", default_value_t = 1)]
        ranks: usize,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Ask the model about one or two images (interactive without --prompt).
    Chat {
        /// Checkpoint directory (model.safetensors + config.json) or a weights file (.safetensors/.pth).
        #[arg(long)]
        ckpt: PathBuf,
        /// Model preset for a bare weights file: minimind_512, minimind_768, tiny.
        #[arg(long)]
        model: Option<String>,
        /// Image file (repeatable, at most 2).
        #[arg(long)]
        image: Vec<PathBuf>,
        #[arg(long)]
        prompt: Option<String>,
        /// HF CLIP directory or random:<seed>; default: the one the checkpoint was trained with
        /// (its shards.json), else model/clip_model/clip-vit-base-patch32.
        #[arg(long)]
        clip: Option<String>,
        #[arg(long, default_value_t = 0.5)]
        temperature: f64,
        #[arg(long, default_value_t = 8)]
        top_k: usize,
        #[arg(long)]
        top_p: Option<f64>,
        /// Upstream's repetition penalty (1 = off).
        #[arg(long, default_value_t = 1.0)]
        rp: f64,
        #[arg(long, default_value_t = 512)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Serve a web page and an OpenAI-compatible API (/v1/chat/completions) for a checkpoint.
    Serve {
        /// Checkpoint directory (model.safetensors + config.json) or a weights file (.safetensors/.pth).
        #[arg(long)]
        ckpt: PathBuf,
        /// Model preset for a bare weights file: minimind_512, minimind_768, tiny.
        #[arg(long)]
        model: Option<String>,
        /// HF CLIP directory, random-small:<seed> / random:<seed> (tests only), or none (text
        /// only); default: the one the checkpoint was trained with (its shards.json), else
        /// model/clip_model/clip-vit-base-patch32.
        #[arg(long)]
        clip: Option<String>,
        #[arg(long, default_value = "127.0.0.1:8000")]
        addr: String,
        /// Largest request body, MiB (images arrive base64-encoded inside the JSON).
        #[arg(long, default_value_t = 16)]
        max_body_mb: usize,
        /// Requests allowed to wait for the model; more are refused with 503.
        #[arg(long, default_value_t = 16)]
        max_queue: usize,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Show what a shard directory holds (Polars).
    Inspect { path: PathBuf },
    /// Write a synthetic dataset in upstream's three formats.
    Synth {
        #[arg(long, default_value = "dataset/synth")]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 2000)]
        pretrain: usize,
        #[arg(long, default_value_t = 1000)]
        sft: usize,
        /// Conversation records per SFT image (each asks the four questions in another order).
        #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        sft_records: usize,
        #[arg(long, default_value_t = 500)]
        multi: usize,
        /// Plant realistic bad entries (corrupt/missing images, tag mismatches, …).
        #[arg(long)]
        faults: bool,
    },
    /// Measure throughput.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Does --device compute what the CPU computes? CLIP features and a training loss curve
    /// (f32, within 1e-3), then bf16 vs f32 on --device (within 2%). Exits non-zero when a check
    /// misses its tolerance or is not finite (NaN, infinity).
    Parity {
        /// minimind_512, minimind_768 or tiny.
        #[arg(long, default_value = "minimind_512")]
        model: String,
        #[arg(long, default_value = "random:0")]
        clip: String,
        #[arg(long, default_value_t = 16)]
        images: usize,
        #[arg(long, default_value_t = 50)]
        steps: usize,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Steps of the bf16-vs-f32 comparison (0: skip).
        #[arg(long, default_value_t = 500)]
        bf16_steps: usize,
        /// For scripts on a GPU machine: also fail when --device is not a GPU (on the CPU the
        /// device's forms are the portable ones, so every check passes trivially).
        #[arg(long)]
        require: bool,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Decode+resize, CLIP and Parquet-write throughput.
    Ingest {
        #[arg(long, default_value_t = 2000)]
        images: usize,
        #[arg(long, default_value = "random:0")]
        clip: String,
        #[arg(long, default_value_t = 32)]
        clip_batch: usize,
        #[arg(long, default_value_t = 128)]
        clip_images: usize,
        /// Also time this many CLIP towers side by side (on CUDA: one stream each).
        #[arg(long, default_value_t = 1)]
        clip_streams: usize,
        #[arg(long, default_value_t = 1024)]
        shard_rows: usize,
        /// CUDA: CLIP's matrix products in TF32 (as ingest's clip_precision = "tf32").
        #[arg(long)]
        tf32: bool,
        /// CLIP's weights and activations in f16 (as ingest's clip_precision = "f16").
        #[arg(long, conflicts_with = "tf32")]
        f16: bool,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Trainer data loading: peak memory and rate streaming a large synthetic shard set.
    Stream {
        /// Where the synthetic shards go (deleted afterwards).
        #[arg(long, default_value = "cache/bench-stream")]
        dir: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        samples: usize,
        #[arg(long, default_value_t = 3)]
        per_row: usize,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
    },
    /// Where a training step's time goes: its phases (synchronised), then single operations at
    /// the step's shapes.
    Breakdown {
        #[arg(long, default_value_t = 256)]
        batch_size: usize,
        #[command(flatten)]
        step: StepShape,
    },
    /// Training-step throughput: dynamic padding vs pad-to-512.
    Train {
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        #[command(flatten)]
        step: StepShape,
        /// dynamic, or both (dynamic, then upstream's pad-to-512).
        #[arg(long, value_enum, default_value = "both")]
        padding: bench::Padding,
    },
}

/// The model and step that `bench train` and `bench breakdown` time.
#[derive(clap::Args)]
struct StepShape {
    /// minimind_512, minimind_768 or tiny.
    #[arg(long, default_value = "minimind_512")]
    model: String,
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Mean sample length (upstream: pretrain ~94, SFT ~114).
    #[arg(long, default_value_t = 94)]
    mean_len: usize,
    /// f32, tf32 (CUDA: TF32 matmuls) or bf16 (bf16 compute, f32 master weights and optimizer state).
    #[arg(long, default_value = "f32")]
    precision: String,
    #[arg(long, default_value = "auto")]
    device: String,
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain, one line each; no backtrace noise for user errors.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `--sft-adam-beta2`: a number the trainer accepts as `adam_beta2`, refused at parse time.
fn parse_adam_beta2(s: &str) -> Result<f64, String> {
    let beta2: f64 = s.parse().map_err(|e| format!("{e}"))?;
    minimind_v::config::check_adam_beta2(beta2).map_err(|e| e.to_string())
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Ingest {
            pipeline,
            mut overrides,
            clip,
            workers,
            worker,
            device,
            clip_streams,
        } => {
            if let Some(c) = clip {
                overrides.push(format!("ingest.clip={c:?}"));
            }
            let p = config::load_pipeline(&pipeline, &overrides)?;
            let cfg = p
                .ingest
                .with_context(|| format!("{}: no [ingest] section", pipeline.display()))?;
            let opts = ingest::IngestOptions {
                workers,
                worker,
                progress: true,
                device: device::select(&device)?,
                clip_streams,
            };
            eprintln!(
                "ingest {} ({}) → {}",
                cfg.json.display(),
                cfg.stage.as_str(),
                cfg.out.display()
            );
            let summary = ingest::run(&cfg, &opts)?;
            print!("{summary}");
        }
        Command::Demo {
            out,
            seed,
            pretrain,
            sft,
            sft_records,
            multi,
            clip,
            pretrain_steps,
            sft_steps,
            sft_lr,
            sft_adam_beta2,
            eval_images,
            eval_pairs,
            require_bar,
            device,
            ranks,
            dim,
            layers,
        } => {
            let device = device::select(&device)?;
            let ranks = match ranks {
                Some(n) => n,
                None if device.is_cpu() && minimind_v::train::dist::cpu_cores() >= 2 => 2,
                None => 1,
            };
            anyhow::ensure!(
                ranks >= 1 && 16 % ranks == 0,
                "--ranks {ranks}: use 1, 2, 4, 8 or 16 (it must divide the batch of 16)"
            );
            let cfg = demo::DemoConfig {
                out: out.clone(),
                seed,
                pretrain,
                sft,
                sft_records,
                multi,
                clip_dir: clip,
                tokenizer: config::DEFAULT_TOKENIZER.into(),
                pretrain_steps,
                sft_steps,
                sft_lr,
                sft_adam_beta2,
                eval_images,
                eval_pairs,
                ranks,
                dim,
                layers,
            };
            let opts = ingest::IngestOptions {
                progress: true,
                device,
                ..Default::default()
            };
            let (summary, acc) = demo::run(&cfg, &opts)?;
            print!("{summary}");
            println!("report: {}", demo::report_path(&out).display());
            anyhow::ensure!(
                !require_bar || acc.meets_bar(),
                "held-out accuracy misses the bar: colour {:.1}% (≥{}%), shape {:.1}% (≥{}%)",
                acc.colour_pct(),
                minimind_v::demo_eval::COLOUR_BAR,
                acc.shape_pct(),
                minimind_v::demo_eval::SHAPE_BAR
            );
        }
        Command::Train {
            pipeline,
            overrides,
            resume,
            stop_after,
            ranks,
            device,
        } => {
            if ranks > 1 {
                let mut args = vec!["train".to_string(), pipeline.display().to_string()];
                for o in &overrides {
                    args.extend(["--set".to_string(), o.clone()]);
                }
                if resume {
                    args.push("--resume".into());
                }
                if let Some(n) = stop_after {
                    args.extend(["--stop-after".to_string(), n.to_string()]);
                }
                train::dist::launch(ranks, &device, &args)?;
                return Ok(());
            }
            let p = config::load_pipeline(&pipeline, &overrides)?;
            let cfg = p
                .train
                .with_context(|| format!("{}: no [train] section", pipeline.display()))?;
            let opts = train::RunOptions {
                resume,
                stop_after,
                progress: true,
                device: device::select(&device)?,
            };
            let dist = train::dist::from_env(&opts.device)?;
            let (logs, _) = train::run_dist(&cfg, &opts, &dist)?;
            if let Some(last) = logs.last().filter(|_| dist.is_main()) {
                println!(
                    "step {} loss {:.4} ({:.0} tokens/s); checkpoint: {}",
                    last.step,
                    last.loss,
                    last.tokens_per_s,
                    cfg.out.join("checkpoint").display()
                );
            }
        }
        Command::Chat {
            ckpt,
            model,
            image,
            prompt,
            clip,
            temperature,
            top_k,
            top_p,
            rp,
            max_new_tokens,
            seed,
            device,
        } => {
            chat(
                ckpt,
                model,
                image,
                prompt,
                clip,
                generate::Sampling {
                    temperature,
                    top_k: Some(top_k),
                    top_p,
                    repetition_penalty: rp,
                    max_new_tokens,
                    seed,
                },
                &device,
            )?;
        }
        Command::Serve {
            ckpt,
            model,
            clip,
            addr,
            max_body_mb,
            max_queue,
            device,
        } => {
            let engine = generate::Engine::load(
                &ckpt,
                preset(model)?.as_ref(),
                &generate::clip_for(&ckpt, clip),
                std::path::Path::new(config::DEFAULT_TOKENIZER),
                &device::select(&device)?,
            )?;
            let limits = minimind_v::serve::Limits {
                max_body: max_body_mb << 20,
                max_queue,
            };
            tokio::runtime::Runtime::new()?
                .block_on(minimind_v::serve::run(engine, limits, &addr))?;
        }
        Command::Inspect { path } => print!("{}", inspect::report(&path)?),
        Command::Synth {
            out,
            seed,
            pretrain,
            sft,
            sft_records,
            multi,
            faults,
        } => {
            let s = synth::generate(&synth::SynthConfig {
                out: out.clone(),
                seed,
                pretrain,
                sft,
                sft_records,
                multi,
                faults,
            })?;
            println!(
                "wrote {}: {} pretrain, {} sft, {} two-image records; faults {:?}",
                out.display(),
                s.pretrain_records,
                s.sft_records,
                s.multi_records,
                s.faults
            );
        }
        Command::Bench {
            what:
                BenchWhat::Ingest {
                    images,
                    clip,
                    clip_batch,
                    clip_images,
                    clip_streams,
                    shard_rows,
                    tf32,
                    f16,
                    device,
                },
        } => {
            candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
            let b = bench::IngestBench {
                images,
                clip: clip.parse()?,
                clip_batch,
                clip_images,
                clip_streams,
                shard_rows,
                f16,
            };
            print!("{}", bench::ingest(&b, &device::select(&device)?)?);
        }
        Command::Bench {
            what:
                BenchWhat::Stream {
                    dir,
                    samples,
                    per_row,
                    batch_size,
                },
        } => {
            let result = bench::stream(&dir, samples, per_row, batch_size);
            let _ = std::fs::remove_dir_all(&dir);
            print!("{}", result?);
        }
        Command::Bench {
            what:
                BenchWhat::Parity {
                    model,
                    clip,
                    images,
                    steps,
                    batch_size,
                    bf16_steps,
                    require,
                    device,
                },
        } => {
            let p = bench::ParityCheck {
                model: config::ModelChoice::Preset(model).resolve()?,
                clip: clip.parse()?,
                images,
                steps,
                batch_size,
                bf16_steps,
            };
            let dev = device::select(&device)?;
            anyhow::ensure!(
                !require || dev.is_cuda(),
                "bench parity --require: the device is {dev:?}, not a GPU, so nothing of the GPU's would be checked\nHINT: run it on a GPU machine with a CUDA build (scripts/build-cuda.sh)"
            );
            println!("device: {dev:?}");
            let table = bench::parity(&p, &dev)?;
            print!("{}", table.text());
            anyhow::ensure!(
                table.failed().is_empty(),
                "PARITY FAILED: {} of {} checks outside their tolerance or not finite: {}",
                table.failed().len(),
                table.rows(),
                table.failed().join("; ")
            );
        }
        Command::Bench {
            what: BenchWhat::Breakdown { batch_size, step },
        } => {
            let b = bench::breakdown::Breakdown {
                model: config::ModelChoice::Preset(step.model).resolve()?,
                batch_size,
                steps: step.steps,
                mean_len: step.mean_len,
                precision: step.precision.parse()?,
            };
            print!(
                "{}",
                bench::breakdown::run(&b, &device::select(&step.device)?)?
            );
        }
        Command::Bench {
            what:
                BenchWhat::Train {
                    batch_size,
                    step,
                    padding,
                },
        } => {
            let b = bench::TrainBench {
                model: config::ModelChoice::Preset(step.model).resolve()?,
                batch_size,
                steps: step.steps,
                mean_len: step.mean_len,
                precision: step.precision.parse()?,
                padding,
            };
            bench::train(&b, &device::select(&step.device)?)?;
        }
    }
    Ok(())
}

/// `chat`: one answer for --prompt, or a question per stdin line.
/// The model config named by `--model` (for a bare weights file).
fn preset(model: Option<String>) -> minimind_v::Result<Option<minimind_v::model::ModelConfig>> {
    model
        .map(|m| config::ModelChoice::Preset(m).resolve())
        .transpose()
}

fn chat(
    ckpt: PathBuf,
    model: Option<String>,
    images: Vec<PathBuf>,
    prompt: Option<String>,
    clip: Option<String>,
    sampling: generate::Sampling,
    device: &str,
) -> anyhow::Result<()> {
    use minimind_v::model::vlm::Images;
    use std::io::{BufRead, Write};

    anyhow::ensure!(
        images.len() <= generate::MAX_IMAGES,
        "{} images given; the model was trained with at most {}",
        images.len(),
        generate::MAX_IMAGES
    );
    let device = device::select(device)?;
    // No images: no tower to load (the CLIP directory need not exist for text-only chat).
    let clip = if images.is_empty() {
        "none".to_string()
    } else {
        generate::clip_for(&ckpt, clip)
    };
    let engine = generate::Engine::load(
        &ckpt,
        preset(model)?.as_ref(),
        &clip,
        std::path::Path::new(config::DEFAULT_TOKENIZER),
        &device,
    )?;
    let (vlm, tok) = (&engine.vlm, &engine.tokenizer);
    let feats = match &engine.tower {
        Some(tower) => generate::image_features(tower, &images)?,
        None => None,
    };
    let answer = |question: &str| -> anyhow::Result<()> {
        let ids = tok.encode_text(&minimind_v::text::chat_prompt(question, images.len()));
        anyhow::ensure!(
            ids.len() < vlm.cfg.max_seq_len,
            "the prompt is {} tokens; the model's max_seq_len is {}",
            ids.len(),
            vlm.cfg.max_seq_len
        );
        let imgs = match &feats {
            Some(f) => Images::for_rows(&[&ids], std::slice::from_ref(f), &vlm.cfg.image_ids)?,
            None => None,
        };
        let mut stream = generate::TextStream::new(tok);
        let mut out = std::io::stdout();
        generate::generate(vlm, &ids, imgs.as_ref(), &sampling, true, |t| {
            if let Some(piece) = stream.push(t) {
                let _ = write!(out, "{piece}");
                let _ = out.flush();
            }
            true
        })?;
        println!();
        Ok(())
    };
    match prompt {
        Some(p) => answer(&p)?,
        None => {
            eprintln!("ask a question per line (Ctrl-D to quit)");
            for line in std::io::stdin().lock().lines() {
                let line = line?;
                if !line.trim().is_empty() {
                    answer(line.trim())?;
                }
            }
        }
    }
    Ok(())
}
