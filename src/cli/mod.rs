//! The command line: each subcommand's arguments (clap) beside the library call it makes —
//! `data` (ingest, inspect, synth, demo), `train`, `answer` (chat, serve), `bench`. No logic of
//! the stages lives here; a subcommand turns its arguments into the library's settings.

mod answer;
mod bench;
mod data;
mod train;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum Command {
    /// Upstream dataset (v1 JSON + zip of images, or the later Parquet with the images in its rows) → deduplicated CLIP-feature Parquet shards.
    Ingest(data::IngestArgs),
    /// Offline demo, no downloads: synthetic dataset → ingest (all three stages) → inspect →
    /// train (captions, then instructions) → score held-out answers; writes <out>/report.md.
    Demo(data::DemoArgs),
    /// Train the projector (+ LLM) on shards: pipeline file with a [train] section.
    Train(train::TrainArgs),
    /// Ask the model about one or two images (interactive without --prompt).
    Chat(answer::ChatArgs),
    /// Serve a web page and an OpenAI-compatible API (/v1/chat/completions) for a checkpoint.
    Serve(answer::ServeArgs),
    /// Show what a shard directory holds (Polars).
    Inspect {
        path: std::path::PathBuf,
        /// Check every shard against the sha256 its manifest records (exits non-zero on a
        /// damaged or missing shard).
        #[arg(long)]
        verify: bool,
    },
    /// Pipeline settings: `--list` prints every key with its default and meaning; a pipeline
    /// file prints its settings as they resolve (defaults and --set overrides applied).
    Config {
        /// The pipeline file to resolve.
        #[arg(required_unless_present = "list")]
        pipeline: Option<std::path::PathBuf>,
        /// Override a setting: --set train.steps=100 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Print every pipeline key, its default and what it means.
        #[arg(long, conflicts_with = "pipeline")]
        list: bool,
    },
    /// Write a checkpoint in upstream's formats: a PyTorch .pth for upstream's scripts, or a
    /// safetensors directory with upstream's LMConfig as config.json.
    Export {
        /// A checkpoint directory (out/<run>/checkpoint).
        #[arg(long)]
        ckpt: std::path::PathBuf,
        #[arg(long, value_enum)]
        format: minimind_v::export::Format,
        /// The .pth file, or the directory for safetensors.
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: minimind_v::export::Precision,
    },
    /// Write a synthetic dataset in upstream's three formats.
    Synth(data::SynthArgs),
    /// Measure throughput.
    Bench {
        #[command(subcommand)]
        what: bench::BenchWhat,
    },
}

impl Command {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Ingest(a) => a.run(),
            Command::Demo(a) => a.run(),
            Command::Train(a) => a.run(),
            Command::Chat(a) => a.run(),
            Command::Serve(a) => a.run(),
            Command::Export {
                ckpt,
                format,
                out,
                dtype,
            } => {
                println!(
                    "{}",
                    minimind_v::export::export(&ckpt, format, dtype, &out)?
                );
                Ok(())
            }
            Command::Inspect { path, verify } => {
                let report = match verify {
                    true => minimind_v::inspect::verify(&path)?,
                    false => minimind_v::inspect::report(&path)?,
                };
                print!("{report}");
                Ok(())
            }
            Command::Config {
                pipeline,
                overrides,
                list,
            } => {
                match (list, pipeline) {
                    (true, _) => print!("{}", minimind_v::config::keys::list()),
                    (false, Some(p)) => {
                        print!("{}", minimind_v::config::resolved(&p, &overrides)?)
                    }
                    (false, None) => unreachable!("clap requires a pipeline without --list"),
                }
                Ok(())
            }
            Command::Synth(a) => a.run(),
            Command::Bench { what } => what.run(),
        }
    }
}

/// The model config a `--model` preset names (for a bare weights file).
fn preset(model: Option<String>) -> minimind_v::Result<Option<minimind_v::model::ModelConfig>> {
    model
        .map(|m| minimind_v::config::ModelChoice::Preset(m).resolve())
        .transpose()
}
