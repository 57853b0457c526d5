//! `minimind-v bench`: measurements on this machine. `ingest`: throughput of each ingest stage
//! (JPEG decode + resize on one core and all cores, CLIP forward, Parquet shard writing); `train`:
//! training-step throughput (dynamic padding vs upstream's pad-to-512); `stream`: the trainer's
//! loader; `parity` (parity.rs): a device's numbers against the CPU's; `breakdown`
//! (breakdown.rs): where a step's time goes. A failed measurement fails the command. Results go to
//! `docs/BENCHMARKS.md` by hand, with the command that produced them.

pub mod breakdown;
mod parity;

pub use parity::{parity, ParityCheck, Table};

use std::time::Instant;

use candle_core::Device;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::error::Result;
use crate::shards::{
    shard_name as sh_name, writer::write_shard, Sample, ShardMeta, ShardRow, SCHEMA_VERSION,
};
use crate::vision::clip::{ClipSource, ClipTower};
use crate::vision::preprocess::load_resized;

pub struct IngestBench {
    pub images: usize,
    pub clip: ClipSource,
    pub clip_batch: usize,
    pub clip_images: usize,
    /// Also time this many towers side by side, as `ingest --clip-streams` runs them (1: skip).
    pub clip_streams: usize,
    pub shard_rows: usize,
    /// The tower in f16 (ingest's `clip_precision = "f16"`).
    pub f16: bool,
}

fn synth_jpegs(n: usize) -> Vec<Vec<u8>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    (0..n)
        .map(|_| {
            let scene = crate::synth::draw::Scene::random(&mut rng, crate::synth::IMAGE_SIZE);
            let img = crate::synth::draw::render(&scene, crate::synth::IMAGE_SIZE, &mut rng);
            let mut buf = std::io::Cursor::new(Vec::new());
            img.write_to(&mut buf, image::ImageFormat::Jpeg)
                .expect("in-memory JPEG");
            buf.into_inner()
        })
        .collect()
}

/// Metadata of the synthetic shards the benchmarks make.
fn bench_meta(
    stage: &str,
    clip: String,
    feature_shape: [usize; 2],
    placeholder_ids: Vec<u32>,
    max_seq_len: usize,
) -> ShardMeta {
    ShardMeta {
        schema_version: SCHEMA_VERSION.into(),
        stage: stage.into(),
        clip_weights: clip.clone(),
        clip_source: clip,
        clip_random: true,
        tokenizer_sha256: String::new(),
        image_size: 224,
        feature_dtype: "f16".into(),
        feature_shape,
        placeholder_ids,
        max_seq_len,
        clip_precision: crate::shards::ClipPrecision::F32,
    }
}

/// Decode + resize (ingest's `load_resized`, default limits) of every file in `dir`, in name
/// order, `repeat` times on this thread; the best pass's images per second. An image that does
/// not decode fails the benchmark, naming it.
pub fn decode(dir: &std::path::Path, repeat: usize) -> Result<String> {
    use crate::error::IoContext;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .at(dir)?
        .map(|e| e.map(|e| e.path()).at(dir))
        .collect::<Result<_>>()?;
    files.retain(|f| f.is_file());
    files.sort();
    let images: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(f).at(f))
        .collect::<Result<_>>()?;
    if images.is_empty() {
        return Err(crate::error::bad_file(dir, "no image files to decode"));
    }
    let mut best = f64::INFINITY;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        for (bytes, f) in images.iter().zip(&files) {
            let pixels = load_resized(bytes, 224, &Default::default())
                .map_err(|(r, d)| crate::error::bad_file(f, format!("{}: {d}", r.as_str())))?;
            std::hint::black_box(pixels);
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(format!(
        "decode+resize to 224×224, 1 thread: {} images, best of {}: {:.0} images/s\n",
        images.len(),
        repeat.max(1),
        images.len() as f64 / best
    ))
}

/// Runs every stage and returns a Markdown table.
pub fn ingest(b: &IngestBench, device: &Device) -> Result<String> {
    let mut out = String::from("| stage | result |\n|---|---|\n");
    let jpegs = synth_jpegs(b.images);

    let t = Instant::now();
    for j in &jpegs {
        std::hint::black_box(load_resized(j, 224, &Default::default()).ok());
    }
    let one = b.images as f64 / t.elapsed().as_secs_f64();
    out.push_str(&format!(
        "| decode+resize 128²→224² JPEG, 1 core | {one:.0} images/s |\n"
    ));

    let t = Instant::now();
    jpegs.par_iter().for_each(|j| {
        std::hint::black_box(load_resized(j, 224, &Default::default()).ok());
    });
    let all = b.images as f64 / t.elapsed().as_secs_f64();
    out.push_str(&format!(
        "| decode+resize, {} threads | {all:.0} images/s |\n",
        rayon::current_num_threads()
    ));

    let mut tower = ClipTower::load(&b.clip, device)?;
    let precision = if b.f16 {
        tower = tower.with_dtype(candle_core::DType::F16)?;
        ", f16"
    } else if device.is_cuda() && candle_core::cuda::gemm_reduced_precision_f32() {
        ", TF32 matmuls"
    } else {
        ""
    };
    let img =
        load_resized(&jpegs[0], tower.image_size as u32, &Default::default()).unwrap_or_default();
    let batch: Vec<&[u8]> = (0..b.clip_batch).map(|_| img.as_slice()).collect();
    tower.features_f16_bytes(&batch)?; // warm-up
    let t = Instant::now();
    let mut done = 0;
    while done < b.clip_images {
        // What ingest does per batch; the host read forces completion on any device.
        std::hint::black_box(tower.features_f16_bytes(&batch)?);
        done += b.clip_batch;
    }
    let clip = done as f64 / t.elapsed().as_secs_f64();
    out.push_str(&format!(
        "| CLIP {} ({}×{} features), batch {}, {:?}{precision}: u8 pixels in, f16 feature bytes out (as ingest) | {clip:.1} images/s |\n",
        b.clip, tower.tokens, tower.hidden, b.clip_batch, device
    ));
    if b.clip_streams > 1 {
        let mut towers = vec![tower.clone()];
        towers.extend(tower.more_streams(b.clip_streams - 1)?);
        for t in &towers {
            t.features_f16_bytes(&batch)?; // warm-up
        }
        let per = b.clip_images.div_ceil(b.clip_batch * towers.len());
        let t = Instant::now();
        std::thread::scope(|s| -> Result<()> {
            let runs: Vec<_> = towers
                .iter()
                .map(|tower| {
                    let batch = &batch;
                    s.spawn(move || -> Result<()> {
                        for _ in 0..per {
                            std::hint::black_box(tower.features_f16_bytes(batch)?);
                        }
                        Ok(())
                    })
                })
                .collect();
            runs.into_iter()
                .try_for_each(|r| r.join().expect("CLIP stream panicked"))
        })?;
        let rate = (per * b.clip_batch * towers.len()) as f64 / t.elapsed().as_secs_f64();
        out.push_str(&format!(
            "| the same, {} streams side by side, one thread each (as `ingest --clip-streams {}`) | {rate:.1} images/s |\n",
            towers.len(),
            towers.len()
        ));
    }
    let px =
        crate::vision::preprocess::pixel_values(&batch, tower.image_size, &tower.norm, device)?
            .to_dtype(tower.dtype)?;
    device.synchronize()?;
    let t = Instant::now();
    let mut done = 0;
    while done < b.clip_images {
        std::hint::black_box(tower.hidden_state(&px)?);
        done += b.clip_batch;
    }
    device.synchronize()?;
    out.push_str(&format!(
        "| the same, tower forward alone (pixels already on the device) | {:.1} images/s |\n",
        done as f64 / t.elapsed().as_secs_f64()
    ));

    // Features like real ones: roughly normal, so compression has as little to gain as in practice.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut feature = || {
        let values: Vec<f32> = (0..tower.tokens * tower.hidden)
            .map(|_| (0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0)
            .collect();
        crate::shards::f32_to_f16_bytes(&values)
    };
    let rows: Vec<ShardRow> = (0..b.shard_rows)
        .map(|i| ShardRow {
            image_key: format!("{i}.jpg"),
            images: vec![format!("{i}.jpg")],
            features: vec![feature()],
            samples: vec![Sample {
                id: i.to_string(),
                input_ids: vec![7; 96],
                loss_mask: vec![1; 96],
            }],
        })
        .collect();
    let meta = bench_meta(
        "pretrain",
        b.clip.to_string(),
        [tower.tokens, tower.hidden],
        crate::text::placeholder_ids(),
        512,
    );
    let dir = std::env::temp_dir().join(format!("minimind-v-bench-{}", std::process::id()));
    // One shard alone, then as ingest writes them: `ingest::WRITERS` at once.
    for writers in [1, crate::ingest::WRITERS] {
        let t = Instant::now();
        let bytes = std::thread::scope(|s| -> Result<u64> {
            let runs: Vec<_> = (0..writers)
                .map(|i| {
                    let (path, rows, meta) = (dir.join(sh_name(i)), &rows, &meta);
                    s.spawn(move || write_shard(&path, rows, meta).map(|(bytes, _)| bytes))
                })
                .collect();
            runs.into_iter()
                .map(|r| r.join().expect("writer panicked"))
                .sum()
        })?;
        let secs = t.elapsed().as_secs_f64();
        out.push_str(&format!(
            "| Parquet shard write ({} rows, {:.1} MB, snappy, incl. sha256 and fsync), {writers} at once | {:.0} MB/s |\n",
            b.shard_rows,
            bytes as f64 / 1e6 / writers as f64,
            bytes as f64 / 1e6 / secs
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

/// `bench train`: optimizer steps of a model on synthetic batches with an upstream-like length
/// distribution, dynamic padding vs upstream's pad-to-512.
pub struct TrainBench {
    pub model: crate::model::ModelConfig,
    pub batch_size: usize,
    pub steps: usize,
    /// Mean sample length in tokens (upstream pretrain ~94, SFT ~114).
    pub mean_len: usize,
    pub precision: crate::config::Precision,
    pub padding: Padding,
}

/// Which paddings `bench train` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Padding {
    /// Each batch padded to its longest sample (what the trainer does).
    Dynamic,
    /// Dynamic, then upstream's pad-to-max_seq_len.
    Both,
}

/// `count` batches of synthetic samples for `cfg`: lengths uniform in ±20% of `mean_len`, the
/// last quarter of each sample trained, image features drawn from a few seeded random images.
fn synthetic_batches(
    cfg: &crate::model::ModelConfig,
    batch_size: usize,
    mean_len: usize,
    count: usize,
    seed: u64,
) -> Vec<Vec<crate::train::data::Item>> {
    use std::sync::Arc;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n_feat = cfg.image_ids.len() * cfg.vision_dim;
    let features: Vec<Arc<Vec<Vec<u8>>>> = (0..4)
        .map(|_| {
            let v: Vec<f32> = (0..n_feat)
                .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                .collect();
            Arc::new(vec![crate::shards::f32_to_f16_bytes(&v)])
        })
        .collect();
    (0..count)
        .map(|_| {
            (0..batch_size)
                .map(|_| {
                    let len = (mean_len as f64 * rng.random_range(0.8..1.2)) as usize;
                    let mut ids: Vec<u16> = vec![1, 320, 275, 201];
                    ids.extend(cfg.image_ids.iter().map(|&t| t as u16));
                    ids.extend((ids.len()..len).map(|_| rng.random_range(100..6000) as u16));
                    let answer = len * 3 / 4;
                    crate::train::data::Item {
                        id: String::new(),
                        mask: (0..ids.len()).map(|i| u8::from(i >= answer)).collect(),
                        ids,
                        features: features[rng.random_range(0..features.len())].clone(),
                    }
                })
                .collect()
        })
        .collect()
}

/// A trainer of a fresh model of `cfg` (seed 0, every parameter learning, Adam's defaults, clip
/// 1.0), and the shard metadata synthetic batches need.
fn fresh(
    cfg: &crate::model::ModelConfig,
    precision: crate::config::Precision,
    device: &Device,
) -> Result<(crate::train::Trainer, ShardMeta)> {
    use crate::model::weights;
    let (model, varmap, _) = weights::build(
        std::path::Path::new("random init"),
        weights::random_state(cfg, 0)?,
        cfg,
        false,
        device,
    )?;
    let trainer = crate::train::Trainer::new(
        model,
        varmap,
        crate::config::Trainable::All,
        crate::train::optim::AdamWConfig::default(),
        precision,
        1.0,
    )?;
    let meta = bench_meta(
        "pretrain",
        "bench".into(),
        [cfg.image_ids.len(), cfg.vision_dim],
        cfg.image_ids.clone(),
        cfg.max_seq_len,
    );
    Ok((trainer, meta))
}

/// Optimizer steps (the trainer's own, `train::Trainer::step`) of a fresh model on `batches`,
/// learning rate 1e-4: the loss of each step, the real tokens seen, and the seconds taken after
/// the first (warm-up) step.
fn train_steps(
    cfg: &crate::model::ModelConfig,
    batches: &[Vec<crate::train::data::Item>],
    pad_to: Option<usize>,
    precision: crate::config::Precision,
    device: &Device,
) -> Result<(Vec<f32>, usize, f64)> {
    use crate::train::data::collate;
    crate::train::apply_matmul_mode(precision);
    let (mut trainer, meta) = fresh(cfg, precision, device)?;
    let solo = crate::train::dist::Dist::solo();
    let (mut losses, mut tokens) = (Vec::new(), 0);
    let mut t = Instant::now();
    for (i, items) in batches.iter().enumerate() {
        let next = || collate(items, &meta, pad_to, false, &cfg.image_ids, device);
        let out = trainer.step(1, next, 1e-4, &solo, &[], |_| Ok(()))?;
        losses.push(out.stats.get(0)?);
        if i == 0 {
            device.synchronize()?;
            t = Instant::now();
        } else {
            tokens += out.tokens;
        }
    }
    device.synchronize()?;
    let secs = t.elapsed().as_secs_f64();
    // Read back at the end: a per-step host sync would hide the device's real speed.
    let losses = losses
        .iter()
        .map(|l| l.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>())
        .collect::<candle_core::Result<_>>()?;
    Ok((losses, tokens, secs))
}

/// Prints each row as soon as it is measured. A row that fails (a later one may run out of
/// device memory) says so and the bench goes on to the next; at the end any failed row makes the
/// whole command fail, so a table with a hole is never taken for a result.
pub fn train(b: &TrainBench, device: &Device) -> Result<()> {
    use std::io::Write;
    let cfg = &b.model;
    println!("| padding | model | precision | batch | mean len | tokens/s (real) | samples/s |\n|---|---|---|---|---|---|---|");
    let paddings: &[Option<usize>] = match b.padding {
        Padding::Dynamic => &[None],
        Padding::Both => &[None, Some(cfg.max_seq_len)],
    };
    let mut failed = Vec::new();
    for &pad_to in paddings {
        let batches = synthetic_batches(cfg, b.batch_size, b.mean_len, b.steps + 1, 3);
        let padding = pad_to.map_or("dynamic".to_string(), |p| format!("pad to {p}"));
        let measured = train_steps(cfg, &batches, pad_to, b.precision, device).and_then(
            |(losses, tokens, secs)| match losses.iter().find(|l| !l.is_finite()) {
                Some(l) => Err(crate::Error::Numerics(format!("a step's loss is {l}"))),
                None => Ok((tokens, secs)),
            },
        );
        let rate = match measured {
            Ok((tokens, secs)) => format!(
                "{:.0} | {:.1}",
                tokens as f64 / secs,
                (b.steps * b.batch_size) as f64 / secs
            ),
            Err(e) => {
                let first = e.to_string().lines().next().unwrap_or("").to_string();
                failed.push(format!("{padding}: {first}"));
                format!("failed: {first} |")
            }
        };
        println!(
            "| {padding} | dim {} × {} layers | {:?} | {} | {} | {rate} |",
            cfg.dim, cfg.n_layers, b.precision, b.batch_size, b.mean_len,
        );
        std::io::stdout().flush().ok();
    }
    if let Some(rss) = peak_rss() {
        println!(
            "\npeak host RSS: {:.2} GiB",
            rss as f64 / (1u64 << 30) as f64
        );
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(crate::Error::Numerics(format!(
            "bench train: {} of {} rows failed: {}",
            failed.len(),
            paddings.len(),
            failed.join("; ")
        )))
    }
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `bench stream`: write `samples` synthetic samples (ViT-B/32-sized features, `per_row` samples
/// per image) as shards, then stream one epoch through the trainer's loader and collation.
pub fn stream(
    dir: &std::path::Path,
    samples: usize,
    per_row: usize,
    batch_size: usize,
) -> Result<String> {
    use crate::train::data::{collate, DataConfig, Share, Stream};

    let rows_total = samples.div_ceil(per_row);
    let meta = bench_meta(
        "sft",
        "bench".into(),
        [50, 768],
        crate::text::placeholder_ids(),
        512,
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let t = Instant::now();
    let mut n = 0;
    for (s, start) in (0..rows_total).step_by(1024).enumerate() {
        let rows: Vec<ShardRow> = (start..(start + 1024).min(rows_total))
            .map(|r| {
                let values: Vec<f32> = (0..50 * 768).map(|_| rng.random::<f32>() - 0.5).collect();
                let samples = (0..per_row)
                    .take_while(|_| {
                        n += 1;
                        n <= samples
                    })
                    .map(|k| {
                        let len = rng.random_range(80..150);
                        let mut ids = vec![1u16, 320, 275, 201];
                        ids.extend(crate::text::placeholder_ids().iter().map(|&v| v as u16));
                        ids.extend((ids.len()..len).map(|_| rng.random_range(100..6000) as u16));
                        Sample {
                            id: format!("{r}-{k}"),
                            loss_mask: (0..len).map(|i| u8::from(i > 60)).collect(),
                            input_ids: ids,
                        }
                    })
                    .collect();
                ShardRow {
                    image_key: format!("{r}.jpg"),
                    images: vec![format!("{r}.jpg")],
                    features: vec![crate::shards::f32_to_f16_bytes(&values)],
                    samples,
                }
            })
            .collect();
        write_shard(&dir.join(crate::shards::shard_name(s)), &rows, &meta)?;
    }
    let write_secs = t.elapsed().as_secs_f64();
    let rss_before = peak_rss().unwrap_or(0);

    let files = crate::shards::reader::list_shards(dir)?;
    let cfg = DataConfig {
        batch_size,
        share: Share::WHOLE,
        shuffle_buffer: 4096,
        bucket_batches: 16,
        seed: 0,
        pad_to: None,
        verify: false,
    };
    let mut s = Stream::new(files, cfg)?;
    let t = Instant::now();
    let (mut seen, mut tokens) = (0, 0);
    while s.epoch() == 0 {
        let items = s.next_items()?;
        if s.epoch() > 0 {
            break;
        }
        let b = collate(
            &items,
            &meta,
            None,
            false,
            &meta.placeholder_ids,
            &Device::Cpu,
        )?;
        seen += items.len();
        tokens += b.tokens;
    }
    let secs = t.elapsed().as_secs_f64();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Ok(format!(
        "| shards | samples streamed | samples/s | tokens/s | peak RSS after writing | peak RSS after streaming |\n|---|---|---|---|---|---|\n| {} rows × 76.8 KB features, written in {write_secs:.0} s | {seen} | {:.0} | {:.0} | {:.2} GiB | {:.2} GiB |\n",
        rows_total,
        seen as f64 / secs,
        tokens as f64 / secs,
        gib(rss_before),
        gib(peak_rss().unwrap_or(0))
    ))
}
