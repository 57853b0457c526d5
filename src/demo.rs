//! `minimind-v demo`: the whole pipeline offline, on data it makes itself — synthesise an
//! upstream-format dataset (with planted faults), ingest all three stages into shards, inspect
//! them, train a small model (captions, then instructions; validated on a split of its own) and
//! score it on a held-out set (`demo_eval`). Uses the real CLIP under `model/clip_model/` if
//! present, otherwise a seeded random-initialised tower, announced as such. Writes everything
//! under `--out` (default `out/demo/`), ending with `report.md`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config::IngestConfig;
use crate::demo_eval::{train_stage, StageRun};
use crate::error::{IoContext, Result};
use crate::ingest::{self, IngestOptions};
use crate::model::ModelConfig;
use crate::synth::{self, SynthConfig};
use crate::text::Stage;

pub struct DemoConfig {
    pub out: PathBuf,
    pub seed: u64,
    pub pretrain: usize,
    pub sft: usize,
    /// Conversation records per instruction image.
    pub sft_records: usize,
    pub multi: usize,
    pub clip_dir: PathBuf,
    pub tokenizer: PathBuf,
    pub pretrain_steps: usize,
    pub sft_steps: usize,
    /// Global batch of both training stages.
    pub batch_size: usize,
    /// Peak learning rate of the instruction stage (cosine to a tenth after a 5% warmup).
    pub sft_lr: f64,
    /// Adam's β₂ in the instruction stage (the caption stage keeps Adam's 0.999).
    pub sft_adam_beta2: f64,
    pub eval_images: usize,
    pub eval_pairs: usize,
    /// Data-parallel CPU processes per training stage (1: train in this process); see
    /// `demo_eval::train_stage`.
    pub ranks: usize,
    /// The trained model's width and depth; `None`: `demo_eval::demo_model`'s.
    pub dim: Option<usize>,
    pub layers: Option<usize>,
}

/// Images of the validation split (the training stages' held-out loss).
const VAL_IMAGES: usize = 128;

/// What the demo writes under its `out`; a run starts by removing these (and nothing else), so
/// that a run with other settings or from another version never meets stale shards.
const DEMO_OUTPUTS: [&str; 10] = [
    "dataset",
    "eval",
    "val",
    "cache",
    "pretrain",
    "pretrain.toml",
    "sft",
    "sft.toml",
    "report_images",
    "report.md",
];

pub fn run(cfg: &DemoConfig, opts: &IngestOptions) -> Result<(String, crate::demo_eval::Accuracy)> {
    let started = std::time::Instant::now();
    for name in DEMO_OUTPUTS {
        let p = cfg.out.join(name);
        if p.is_dir() {
            std::fs::remove_dir_all(&p).at(&p)?;
        } else if p.exists() {
            std::fs::remove_file(&p).at(&p)?;
        }
    }
    let ds = cfg.out.join("dataset");
    eprintln!(
        "[1/5] synth: {} pretrain images, {} SFT images, {} image pairs → {}",
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
        sft_records: cfg.sft_records,
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
    // One synthetic stage → shards under `cfg.out/<cache>`; returns the ingest summary.
    // Shards of at most 512 rows, at least 8 per stage where there are images enough, so that
    // the epoch's shuffled file order has pieces to mix (and ranks that read disjoint shards,
    // `rank_data = "files"`, each get several).
    let ingest_stage = |root: &Path, stage: Stage, cache: &str, rows: usize| -> Result<String> {
        let (json, images, prefix) = synth::stage_files(root, stage);
        let mut c = IngestConfig::new(stage, json, images, cfg.out.join(cache));
        c.image_prefix = prefix.into();
        c.tokenizer = cfg.tokenizer.clone();
        c.clip = clip.clone();
        c.rows_per_shard = rows.div_ceil(8).clamp(1, 512);
        Ok(ingest::run(&c, opts)?.to_string())
    };
    for (stage, rows) in [
        (Stage::Pretrain, cfg.pretrain),
        (Stage::Sft, cfg.sft),
        (Stage::SftMulti, cfg.multi),
    ] {
        let name = stage.as_str();
        eprintln!("[2/5] ingest {name}");
        let summary = ingest_stage(&ds, stage, &format!("cache/{name}"), rows)?;
        eprint!("{summary}");
        let _ = writeln!(report, "## ingest {name}\n\n```\n{summary}```\n");
    }
    eprintln!("[3/5] inspect");
    let inspect = crate::inspect::report(&cfg.out.join("cache/pretrain"))?;
    let _ = writeln!(report, "## inspect cache/pretrain\n\n```\n{inspect}```\n");

    // Validation during training (the loss curves of `val.jsonl`) uses a split of its own, from a
    // third seed: the held-out evaluation set below is never looked at before the final score.
    let val_ds = cfg.out.join("val");
    synth::generate(&SynthConfig {
        out: val_ds.clone(),
        seed: cfg.seed + 2_000_003,
        pretrain: 0,
        sft: VAL_IMAGES,
        sft_records: 1,
        multi: 0,
        faults: false,
    })?;
    ingest_stage(&val_ds, Stage::Sft, "cache/val", VAL_IMAGES)?;
    let val_cache = cfg.out.join("cache/val");

    // Held-out images and pairs: another seed, never seen in training.
    let eval_ds = cfg.out.join("eval");
    synth::generate(&SynthConfig {
        out: eval_ds.clone(),
        seed: cfg.seed + 1_000_003,
        pretrain: 0,
        sft: cfg.eval_images,
        sft_records: 3,
        multi: cfg.eval_pairs,
        faults: false,
    })?;
    ingest_stage(&eval_ds, Stage::Sft, "cache/eval", cfg.eval_images)?;
    ingest_stage(
        &eval_ds,
        Stage::SftMulti,
        "cache/eval_multi",
        cfg.eval_pairs,
    )?;

    let eval_shards = crate::shards::reader::list_shards(&cfg.out.join("cache/eval"))?;
    let vision_dim = crate::shards::reader::read_meta(&eval_shards[0])?.feature_shape[1];
    let base = crate::demo_eval::demo_model(vision_dim);
    let model = ModelConfig {
        dim: cfg.dim.unwrap_or(base.dim),
        n_layers: cfg.layers.unwrap_or(base.n_layers),
        ..base
    };
    model.validate()?;
    eprintln!(
        "[4/5] train: pretrain {} steps, then SFT {} steps, batch {} (dim {}, {} layers)",
        cfg.pretrain_steps, cfg.sft_steps, cfg.batch_size, model.dim, model.n_layers
    );
    let (pre_shards, pre_out) = (cfg.out.join("cache/pretrain"), cfg.out.join("pretrain"));
    let stage = StageRun {
        shards: &pre_shards,
        out: &pre_out,
        init: None,
        steps: cfg.pretrain_steps,
        batch_size: cfg.batch_size,
        lr: 2e-3,
        adam_beta2: 0.999,
    };
    train_stage(stage, &val_cache, &model, &opts.device, cfg.ranks)?;
    let init = Some(crate::checkpoint::weights_file(&crate::checkpoint::dir(
        &pre_out,
    )));
    // Instructions: the single-image and the two-image sets together (like upstream's optional
    // two-image SFT, but mixed in, so the single-image answers are not forgotten).
    let sft_shards = mix_shards(
        &[cfg.out.join("cache/sft"), cfg.out.join("cache/sft_multi")],
        &cfg.out.join("cache/sft_mix"),
    )?;
    let sft_out = cfg.out.join("sft");
    let stage = StageRun {
        shards: &sft_shards,
        out: &sft_out,
        init,
        steps: cfg.sft_steps,
        batch_size: cfg.batch_size,
        lr: cfg.sft_lr,
        adam_beta2: cfg.sft_adam_beta2,
    };
    train_stage(stage, &val_cache, &model, &opts.device, cfg.ranks)?;

    eprintln!(
        "[5/5] evaluate on {} held-out images and {} pairs",
        cfg.eval_images, cfg.eval_pairs
    );
    let tok = crate::text::ChatTokenizer::load(&cfg.tokenizer)?;
    let acc = crate::demo_eval::evaluate_demo_dir(
        &cfg.out,
        &cfg.out.join("sft/checkpoint"),
        &tok,
        cfg.eval_images,
        &opts.device,
    )?;
    let summary = format!(
        "{}demo wall time: {:.0} s on {}\n",
        acc.report(),
        started.elapsed().as_secs_f64(),
        crate::device::cpu_description()
    );
    let shown = extract_examples(&acc, &synth::stage_files(&eval_ds, Stage::Sft).1, &cfg.out)?;
    let table = acc.examples_markdown(&|name: &str| {
        if shown.iter().any(|s| s == name) {
            format!("report_images/{name}")
        } else {
            format!("eval/sft_multi_images/{name}")
        }
    });
    let _ = writeln!(
        report,
        "## held-out evaluation\n\n![loss](sft/loss.png)\n\n```\n{summary}```\n\n{table}"
    );
    if clip.starts_with("random") {
        let _ = writeln!(
            report,
            "\nFeatures came from a RANDOM-INITIALISED CLIP-shaped tower (`{clip}`), not real CLIP; see docs/DEMO.md for what such a tower can carry."
        );
    }
    crate::util::write_bytes_atomic(&cfg.out.join("report.md"), report.as_bytes())?;
    Ok((format!("{inspect}\n{summary}"), acc))
}

/// A shard directory holding (symlinks to) the shards of `dirs`, renumbered.
fn mix_shards(dirs: &[PathBuf], mix: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(mix).at(mix)?;
    let mut n = 0;
    for dir in dirs {
        for file in crate::shards::reader::list_shards(dir)? {
            let link = mix.join(crate::shards::shard_name(n));
            let target = std::fs::canonicalize(&file).at(&file)?;
            std::os::unix::fs::symlink(&target, &link).at(&link)?;
            n += 1;
        }
    }
    Ok(mix.to_path_buf())
}

/// Copy the single-image examples out of the held-out zip so the report can show them.
fn extract_examples(
    acc: &crate::demo_eval::Accuracy,
    zip_path: &Path,
    out: &Path,
) -> Result<Vec<String>> {
    let file = std::fs::File::open(zip_path).at(zip_path)?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| crate::error::bad_file(zip_path, e.to_string()))?;
    let dir = out.join("report_images");
    std::fs::create_dir_all(&dir).at(&dir)?;
    let mut shown = Vec::new();
    for e in acc.examples.iter().filter(|e| e.images.len() == 1) {
        let name = &e.images[0];
        if shown.contains(name) {
            continue;
        }
        // Entries may sit in a folder (`sft_images/<name>`), as upstream's zips do.
        let suffix = format!("/{name}");
        let Some(entry_name) = zip
            .file_names()
            .filter_map(|n| n.ok())
            .find(|n| n.as_ref() == name.as_str() || n.ends_with(&suffix))
            .map(|n| n.to_string())
        else {
            continue;
        };
        let mut entry = zip
            .by_name(&entry_name)
            .map_err(|e| crate::error::bad_file(zip_path, e.to_string()))?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes).at(zip_path)?;
        crate::util::write_bytes_atomic(&dir.join(name), &bytes)?;
        shown.push(name.clone());
    }
    Ok(shown)
}

pub fn report_path(out: &Path) -> PathBuf {
    out.join("report.md")
}
