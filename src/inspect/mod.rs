//! `minimind-v inspect`: a Polars view of a shard directory (or one shard) — schema and
//! metadata, rows / samples / images, token-length histogram, loss-token share, feature
//! statistics of a few rows, and rejects by reason from the manifest.

use std::fmt::Write as _;
use std::path::Path;

use polars::prelude::*;

use crate::error::{bad_file, Result};
use crate::shards::reader::{list_shards, read_meta, ShardReader};
use crate::shards::{f16_bytes_to_f32, manifest};

/// Per-sample token counts read through Polars (`explode("samples")`).
#[derive(Debug, Clone, PartialEq)]
pub struct SampleStats {
    pub rows: usize,
    pub images: usize,
    pub samples: usize,
    pub lengths: Vec<u32>,
    pub loss_tokens: u64,
}

fn polars_err(path: &Path) -> impl Fn(PolarsError) -> crate::Error + '_ {
    move |e| bad_file(path, format!("polars: {e}"))
}

/// Scan shards with Polars: one lazy frame over every `shard-*.parquet` (in `data/` for an
/// ingest's directory).
pub fn scan(path: &Path) -> Result<LazyFrame> {
    let data = path.join(crate::shards::DATA_DIR);
    let pattern = match (path.is_dir(), data.is_dir()) {
        (true, true) => data.join("shard-*.parquet"),
        (true, false) => path.join("shard-*.parquet"),
        _ => path.to_path_buf(),
    };
    let pattern = pattern.to_string_lossy().to_string();
    LazyFrame::scan_parquet(PlRefPath::new(pattern.as_str()), ScanArgsParquet::default())
        .map_err(polars_err(path))
}

/// Counts and per-sample lengths, computed by Polars.
pub fn sample_stats(path: &Path) -> Result<SampleStats> {
    let err = polars_err(path);
    let lf = scan(path)?;
    let rows = lf
        .clone()
        .select([
            col("image_key").count().alias("rows"),
            col("images").list().len().sum().alias("images"),
        ])
        .collect()
        .map_err(&err)?;
    let get = |name: &str| -> Result<usize> {
        let s = rows.column(name).map_err(&err)?;
        Ok(s.get(0).map_err(&err)?.extract::<u64>().unwrap_or(0) as usize)
    };
    let (n_rows, n_images) = (get("rows")?, get("images")?);
    let samples = lf
        .explode(
            cols(["samples"]),
            ExplodeOptions {
                empty_as_null: false,
                keep_nulls: false,
            },
        )
        .unnest(cols(["samples"]), None)
        .select([
            col("input_ids").list().len().alias("len"),
            col("loss_mask")
                .list()
                .sum()
                .cast(DataType::UInt64)
                .alias("loss_tokens"),
        ])
        .collect()
        .map_err(&err)?;
    let lengths: Vec<u32> = samples
        .column("len")
        .map_err(&err)?
        .cast(&DataType::UInt32)
        .map_err(&err)?
        .u32()
        .map_err(&err)?
        .into_no_null_iter()
        .collect();
    let loss_tokens: u64 = samples
        .column("loss_tokens")
        .map_err(&err)?
        .u64()
        .map_err(&err)?
        .into_no_null_iter()
        .sum();
    Ok(SampleStats {
        rows: n_rows,
        images: n_images,
        samples: lengths.len(),
        lengths,
        loss_tokens,
    })
}

/// A text histogram of token lengths in 8 equal buckets from the shortest to the longest.
fn histogram(lengths: &[u32]) -> String {
    let mut out = String::new();
    let (Some(&min), Some(&max)) = (lengths.iter().min(), lengths.iter().max()) else {
        return "  (no samples)\n".into();
    };
    let width = ((max - min + 1) as usize).div_ceil(8);
    let mut counts = [0usize; 8];
    for &l in lengths {
        counts[((l - min) as usize / width).min(7)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(1).max(1);
    for (i, c) in counts.iter().enumerate() {
        let lo = min as usize + i * width;
        let bar = "#".repeat((c * 40).div_ceil(top));
        let _ = writeln!(out, "  {:>4}-{:<4} {:>8} {bar}", lo, lo + width - 1, c);
    }
    out
}

/// The full report printed by `minimind-v inspect`.
pub fn report(path: &Path) -> Result<String> {
    let shards = list_shards(path)?;
    let first = shards
        .first()
        .ok_or_else(|| bad_file(path, "no shard-*.parquet files here"))?;
    let meta = read_meta(first)?;
    let mut out = String::new();
    let _ = writeln!(out, "{} shard file(s) in {}", shards.len(), path.display());

    let schema = scan(path)?.collect_schema().map_err(polars_err(path))?;
    let _ = writeln!(out, "\nschema (Polars):");
    for (name, dtype) in schema.iter() {
        let _ = writeln!(out, "  {name}: {dtype}");
    }
    let _ = writeln!(out, "\nmetadata:");
    for (k, v) in meta.to_kv() {
        let v = if v.chars().count() > 80 {
            format!("{}…", v.chars().take(80).collect::<String>())
        } else {
            v
        };
        let _ = writeln!(out, "  {k} = {v}");
    }
    if meta.clip_random {
        let _ = writeln!(
            out,
            "  NOTE: features come from a RANDOM-INITIALISED CLIP tower"
        );
    }

    let stats = sample_stats(path)?;
    let total_tokens: u64 = stats.lengths.iter().map(|&l| l as u64).sum();
    let _ = writeln!(
        out,
        "\nrows (unique image sets): {}\nimages: {}\nsamples: {}",
        stats.rows, stats.images, stats.samples
    );
    if stats.samples > 0 {
        let _ = writeln!(
            out,
            "tokens: {total_tokens} (mean {:.1} per sample, max {})\nloss-token share: {:.1}%",
            total_tokens as f64 / stats.samples as f64,
            stats.lengths.iter().max().unwrap_or(&0),
            100.0 * stats.loss_tokens as f64 / total_tokens.max(1) as f64
        );
    }
    let _ = writeln!(
        out,
        "\ntoken-length histogram:\n{}",
        histogram(&stats.lengths)
    );

    let _ = writeln!(
        out,
        "feature stats of the first rows (stored as {}):",
        meta.feature_dtype
    );
    for row in ShardReader::open(first)?.take(3) {
        let row = row?;
        for (name, f) in row.images.iter().zip(&row.features) {
            let v = f16_bytes_to_f32(f);
            let n = v.len() as f64;
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
            let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
            let (min, max) = v
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            let _ = writeln!(
                out,
                "  {name}: mean {mean:+.4} std {std:.4} min {min:+.3} max {max:+.3}"
            );
        }
    }

    let mut dir = match path.is_dir() {
        true => path,
        false => path.parent().unwrap_or(Path::new(".")),
    };
    if crate::shards::is_split_dir(dir) {
        dir = dir.parent().unwrap_or(dir);
    }
    match manifest::read_manifest(dir) {
        Ok(m) => {
            let _ = writeln!(
                out,
                "\nmanifest: {} records read, {} samples written ({} held out in val/), {} rejected",
                m.records_read, m.samples_written, m.samples_val, m.samples_rejected
            );
            for (reason, n) in &m.rejects_by_reason {
                let _ = writeln!(out, "  rejected {reason}: {n}");
            }
        }
        Err(_) => {
            let _ = writeln!(
                out,
                "\n(no manifest.json beside the shards: ingest incomplete or shards copied alone)"
            );
        }
    }
    Ok(out)
}

/// `inspect --verify`: every shard of the directory `dir` against the sha256 its manifest
/// records, and every shard the manifest lists present. Returns the report; an error (naming
/// each damaged or missing shard) when any is.
pub fn verify(dir: &Path) -> Result<String> {
    let progress = manifest::progress_dir(dir);
    if !dir.join("manifest.json").exists() && progress.is_dir() {
        let done = std::fs::read_dir(&progress).map_or(0, |d| d.count());
        return Err(crate::Error::Data(format!(
            "{}: no manifest.json: the ingest is not complete ({done} shards committed so far)\nHINT: run the ingest workers that have not finished (the same --workers N with each missing --worker i); the last one to finish writes manifest.json",
            dir.display()
        )));
    }
    let m = manifest::read_manifest(dir)?;
    let mut report = String::new();
    let mut bad = Vec::new();
    for entry in &m.shards {
        let path = dir.join(&entry.file);
        let verdict = match crate::util::sha256_file(&path) {
            Ok(sha) if sha == entry.sha256 => "ok".to_string(),
            Ok(sha) => {
                bad.push(entry.file.clone());
                format!(
                    "DAMAGED: sha256 {sha}, the manifest records {}",
                    entry.sha256
                )
            }
            Err(e) => {
                bad.push(entry.file.clone());
                format!("MISSING: {e}")
            }
        };
        let _ = writeln!(report, "{}: {verdict}", entry.file);
    }
    let listed: std::collections::HashSet<&str> =
        m.shards.iter().map(|s| s.file.as_str()).collect();
    let mut present = list_shards(dir)?;
    if let Some(val) = crate::shards::reader::held_out_split(dir)? {
        present.extend(list_shards(&val)?);
    }
    for file in present {
        let name = file.strip_prefix(dir).unwrap_or(&file).to_string_lossy();
        if !listed.contains(name.as_ref()) {
            let _ = writeln!(
                report,
                "{name}: not in the manifest (not part of this ingest)"
            );
        }
    }
    if bad.is_empty() {
        let _ = writeln!(report, "all {} shards match the manifest", m.shards.len());
        Ok(report)
    } else {
        Err(crate::Error::Data(format!(
            "{report}{} of {} shards damaged or missing in {}: {}\nHINT: re-run the ingest that wrote them: a resumed ingest redoes shards whose bytes do not match",
            bad.len(),
            m.shards.len(),
            dir.display(),
            bad.join(", ")
        )))
    }
}
