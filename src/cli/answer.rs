//! `chat` and `serve`: a checkpoint answering, in a terminal or over HTTP.

use std::path::PathBuf;

use clap::Args;
use minimind_v::device;
use minimind_v::generate::{self, chat::Session};

#[derive(Args)]
pub struct ChatArgs {
    /// Checkpoint directory (as `train` writes it) or a weights file (.safetensors/.pth).
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
    /// Tokenizer directory; default: upstream's, built into the program.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
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
}

impl ChatArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let sampling = generate::Sampling {
            temperature: self.temperature,
            top_k: Some(self.top_k),
            top_p: self.top_p,
            repetition_penalty: self.rp,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
        };
        // No images: no tower to load (the CLIP directory need not exist for text-only chat).
        let clip = if self.image.is_empty() {
            "none".to_string()
        } else {
            generate::clip_for(&self.ckpt, self.clip)
        };
        let engine = generate::Engine::load(
            &self.ckpt,
            super::preset(self.model)?.as_ref(),
            &clip,
            self.tokenizer.as_deref(),
            &device::select(&self.device)?,
        )?;
        let session = Session::new(&engine, &self.image, sampling)?;
        let mut out = std::io::stdout();
        match self.prompt {
            Some(p) => {
                let stop = session.answer(&p, &mut out)?;
                if let Some(note) = stop.note(engine.vlm.cfg.max_seq_len) {
                    eprintln!("{note}");
                }
            }
            None => {
                session.interactive(std::io::stdin().lock(), &mut out, &mut std::io::stderr())?
            }
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct ServeArgs {
    /// Checkpoint directory (as `train` writes it) or a weights file (.safetensors/.pth).
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
    /// Tokenizer directory; default: upstream's, built into the program.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
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
}

impl ServeArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let engine = generate::Engine::load(
            &self.ckpt,
            super::preset(self.model)?.as_ref(),
            &generate::clip_for(&self.ckpt, self.clip),
            self.tokenizer.as_deref(),
            &device::select(&self.device)?,
        )?;
        let limits = minimind_v::serve::Limits {
            max_body: self.max_body_mb << 20,
            max_queue: self.max_queue,
            ..Default::default()
        };
        tokio::runtime::Runtime::new()?
            .block_on(minimind_v::serve::run(engine, limits, &self.addr))?;
        Ok(())
    }
}
