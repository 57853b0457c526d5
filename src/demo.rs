//! `minimind-v demo`: the whole available pipeline offline, on data it makes itself —
//! synthesise an upstream-format dataset (with planted faults), ingest all three stages into
//! shards, and inspect them. Uses the real CLIP under `model/clip_model/` if present, otherwise a
//! seeded random-initialised tower, announced as such. Writes `out/demo/report.md`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config::IngestConfig;
use crate::error::Result;
use crate::ingest::{self, chat::Stage, IngestOptions};
use crate::synth::{self, SynthConfig};

pub struct DemoConfig {
    pub out: PathBuf,
    pub seed: u64,
    pub pretrain: usize,
    pub sft: usize,
    pub multi: usize,
    pub clip_dir: PathBuf,
    pub tokenizer: PathBuf,
}

pub fn run(cfg: &DemoConfig, opts: &IngestOptions) -> Result<String> {
    let ds = cfg.out.join("dataset");
    eprintln!(
        "[1/3] synth: {} pretrain images, {} SFT images, {} image pairs → {}",
        cfg.pretrain,
        cfg.sft,
        cfg.multi,
        ds.display()
    );
    let planted = synth::generate(&SynthConfig {
        out: ds.clone(),
        seed: cfg.seed,
        pretrain: cfg.pretrain,
        sft: cfg.sft,
        multi: cfg.multi,
        faults: true,
    })?;

    let clip = if cfg.clip_dir.join("config.json").exists() {
        cfg.clip_dir.to_string_lossy().to_string()
    } else {
        eprintln!(
            "NOTE: no CLIP at {} — using a RANDOM-INITIALISED small CLIP tower (random-small:{}); features are not real CLIP features",
            cfg.clip_dir.display(),
            cfg.seed
        );
        format!("random-small:{}", cfg.seed)
    };

    let mut report = String::from("# minimind-v demo report\n\n");
    let _ = writeln!(
        report,
        "CLIP: `{clip}`\n\nPlanted faults: {:?}\n",
        planted.faults
    );
    let stages: [(Stage, &str, PathBuf, PathBuf, &str); 3] = [
        (
            Stage::Pretrain,
            "pretrain",
            ds.join("LLaVA-Pretrain/chat-translated.json"),
            ds.join("pretrain_images.zip"),
            "",
        ),
        (
            Stage::Sft,
            "sft",
            ds.join("LLaVA-Instruct/llava_instruct_230k.json"),
            ds.join("sft_images.zip"),
            "COCO_train2014_",
        ),
        (
            Stage::SftMulti,
            "sft_multi",
            ds.join("sft_multi_images/output.json"),
            ds.join("sft_multi_images"),
            "",
        ),
    ];
    for (stage, name, json, images, prefix) in stages {
        eprintln!("[2/3] ingest {name}");
        let mut c = IngestConfig::new(stage, json, images, cfg.out.join("cache").join(name));
        c.image_prefix = prefix.into();
        c.tokenizer = cfg.tokenizer.clone();
        c.clip = clip.clone();
        c.rows_per_shard = 512;
        let summary = ingest::run(&c, opts)?;
        eprint!("{summary}");
        let _ = writeln!(report, "## ingest {name}\n\n```\n{summary}```\n");
    }
    eprintln!("[3/3] inspect");
    let inspect = crate::inspect::report(&cfg.out.join("cache/pretrain"))?;
    let _ = writeln!(report, "## inspect cache/pretrain\n\n```\n{inspect}```\n");
    let _ = writeln!(
        report,
        "Training, evaluation and chat are not part of this build yet."
    );
    crate::util::write_bytes_atomic(&cfg.out.join("report.md"), report.as_bytes())?;
    Ok(inspect)
}

pub fn report_path(out: &Path) -> PathBuf {
    out.join("report.md")
}
