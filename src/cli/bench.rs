//! `bench`: measurements on this machine (docs/BENCHMARKS.md).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use minimind_v::{bench, config, device};

#[derive(Subcommand)]
pub enum BenchWhat {
    /// Does --device compute what the CPU computes? CLIP features and a training loss curve
    /// (f32, within 1e-3), then bf16 vs f32 on --device (within 2%). Exits non-zero when a check
    /// misses its tolerance or is not finite (NaN, infinity).
    Parity {
        /// minimind_512, minimind_768, demo or tiny.
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
    /// Decode + resize to 224×224 of every image file in a directory, on one thread, `repeat`
    /// times over (bench/decode_vs_pil.py runs it beside PIL). Fails when an image does not decode.
    Decode {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        repeat: usize,
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
#[derive(Args)]
pub struct StepShape {
    /// minimind_512, minimind_768, demo (the offline demo's dim-64 model) or tiny.
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

impl BenchWhat {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
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
            BenchWhat::Decode { dir, repeat } => print!("{}", bench::decode(&dir, repeat)?),
            BenchWhat::Stream {
                dir,
                samples,
                per_row,
                batch_size,
            } => {
                let result = bench::stream(&dir, samples, per_row, batch_size);
                let _ = std::fs::remove_dir_all(&dir);
                print!("{}", result?);
            }
            BenchWhat::Parity {
                model,
                clip,
                images,
                steps,
                batch_size,
                bf16_steps,
                require,
                device,
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
            BenchWhat::Breakdown { batch_size, step } => {
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
            BenchWhat::Train {
                batch_size,
                step,
                padding,
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
}
