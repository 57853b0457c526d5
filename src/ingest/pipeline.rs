//! The ingest pipeline over a plan's pending shards, its stages running concurrently with bounded
//! queues between them: read + decode + resize (one thread reading, rayon decoding), CLIP (one
//! thread per stream; on CUDA each stream has its own tower), putting the chunks back in order
//! and assembling shards, and writing them (`WRITERS` at once). Reads the images; writes shard
//! files and their completion records. The first stage to fail stops the others.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::progress::Progress;
use crossbeam_channel::{bounded, Receiver, Sender};
use rayon::prelude::*;

use super::plan::{Group, Plan};
use super::source::ImageSource;
use crate::config::IngestConfig;
use crate::error::Result;
use crate::shards::manifest::{self, ShardDone};
use crate::shards::reject::{Reason, Reject};
use crate::shards::{self as sh, ShardMeta, ShardRow};
use crate::vision::clip::ClipTower;
use crate::vision::preprocess::{self, ImageLimits};

/// Shards written at once: one Parquet writer is one core's work (docs/BENCHMARKS.md).
pub const WRITERS: usize = 2;

/// Where the pipeline's wall time went, seen from the CLIP stage: the share of it each CLIP
/// stream spent computing, waiting for decoded images, and waiting for the writers. The largest
/// says which stage limits the run.
#[derive(Debug, Clone, Default)]
pub struct Timing {
    pub wall_s: f64,
    pub clip_streams: usize,
    /// Summed over the streams.
    pub clip_s: f64,
    pub wait_images_s: f64,
    pub wait_writer_s: f64,
}

impl Timing {
    /// Two runs of the pipeline (windows of one ingest) as one.
    pub fn add(&self, other: &Timing) -> Timing {
        Timing {
            wall_s: self.wall_s + other.wall_s,
            clip_streams: self.clip_streams,
            clip_s: self.clip_s + other.clip_s,
            wait_images_s: self.wait_images_s + other.wait_images_s,
            wait_writer_s: self.wait_writer_s + other.wait_writer_s,
        }
    }
}

impl std::fmt::Display for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let share = |s: f64| 100.0 * s / (self.wall_s * self.clip_streams as f64).max(1e-9);
        write!(
            f,
            "{:.1} s; CLIP ({} stream{}) busy {:.0}%, waiting for decoded images {:.0}%, for the writer {:.0}%",
            self.wall_s,
            self.clip_streams,
            if self.clip_streams == 1 { "" } else { "s" },
            share(self.clip_s),
            share(self.wait_images_s),
            share(self.wait_writer_s)
        )
    }
}

/// One row's per-image data (resized pixels, then features), or why the row has none.
type RowImages = std::result::Result<Vec<Vec<u8>>, (Reason, String)>;

/// A chunk of rows whose images are decoded and resized.
struct Prepared {
    /// Position in the run: the CLIP streams may finish chunks out of order; stage 3 restores it.
    seq: usize,
    shard: usize,
    groups: std::ops::Range<usize>,
    /// Per row: its resized images, or why it has none.
    images: Vec<RowImages>,
    last: bool,
}

/// The same chunk with features.
struct Featured {
    seq: usize,
    shard: usize,
    groups: std::ops::Range<usize>,
    features: Vec<RowImages>,
    last: bool,
}

/// A whole shard, ready to write: its index, rows and image rejects.
type ShardJob = (usize, Vec<ShardRow>, Vec<Reject>);

/// What every stage reads.
struct Ctx<'a> {
    cfg: &'a IngestConfig,
    plan: &'a Plan,
    meta: &'a ShardMeta,
    /// Per shard of the plan's window, from its first: the fingerprint of its images
    /// (`ImageSource::fingerprint`).
    inputs: &'a [String],
    pb: Progress,
    /// Set by the first stage that fails, so that the others stop too.
    failed: AtomicBool,
}

impl Ctx<'_> {
    fn fail<T>(&self, e: crate::Error) -> Result<T> {
        self.failed.store(true, Ordering::Relaxed);
        Err(e)
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

/// Run the pipeline over the `pending` shards with `streams` CLIP streams (`tower` and the
/// towers in `more`); returns the images through CLIP and where the time went.
pub fn process(
    cfg: &IngestConfig,
    plan: &Plan,
    pending: &[usize],
    (tower, more): (&ClipTower, &[ClipTower]),
    meta: &ShardMeta,
    inputs: &[String],
    progress: bool,
) -> Result<(usize, Timing)> {
    let started = Instant::now();
    let total: usize = pending
        .iter()
        .flat_map(|&i| plan.shard(i, cfg.rows_per_shard))
        .map(|g| g.images.len())
        .sum();
    let ctx = Ctx {
        cfg,
        plan,
        meta,
        inputs,
        pb: Progress::new("ingest", "images", (0, total as u64), progress),
        failed: AtomicBool::new(false),
    };
    let streams = more.len() + 1;
    let (prep_tx, prep_rx) = bounded::<Result<Prepared>>(streams + 1);
    let (feat_tx, feat_rx) = bounded::<Featured>(streams + 1);
    let (shard_tx, shard_rx) = bounded::<ShardJob>(1);
    let ctx = &ctx;
    std::thread::scope(|s| -> Result<(usize, Timing)> {
        let size = tower.image_size as u32;
        // Each stage owns its senders, so that the next one ends when it does.
        s.spawn(move || read_stage(ctx, pending, size, prep_tx));
        s.spawn(move || assemble_stage(ctx, feat_rx, shard_tx));
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                let rx = shard_rx.clone();
                s.spawn(move || write_stage(ctx, rx))
            })
            .collect();
        drop(shard_rx);
        let others: Vec<_> = more
            .iter()
            .map(|t| {
                let (rx, tx) = (prep_rx.clone(), feat_tx.clone());
                s.spawn(move || clip_stage(ctx, t, rx, tx))
            })
            .collect();
        // This thread runs the first stream: on CUDA the tower was made on it.
        let mut clip = vec![clip_stage(ctx, tower, prep_rx, feat_tx)];
        clip.extend(
            others
                .into_iter()
                .map(|h| h.join().expect("CLIP stream panicked")),
        );
        let written: Vec<Result<()>> = writers
            .into_iter()
            .map(|h| h.join().expect("writer thread panicked"))
            .collect();
        ctx.pb.finish();
        let mut processed = 0;
        let mut timing = Timing {
            clip_streams: streams,
            ..Timing::default()
        };
        for r in clip {
            let (n, t) = r?;
            processed += n;
            timing.clip_s += t.clip_s;
            timing.wait_images_s += t.wait_images_s;
            timing.wait_writer_s += t.wait_writer_s;
        }
        written.into_iter().collect::<Result<()>>()?;
        timing.wall_s = started.elapsed().as_secs_f64();
        Ok((processed, timing))
    })
}

/// Stage 1: read each chunk's image bytes (sequentially: one zip) and decode + resize them (in
/// parallel). A failure to read the source goes down the queue as the stage's last item.
fn read_stage(ctx: &Ctx, pending: &[usize], size: u32, tx: Sender<Result<Prepared>>) {
    let (cfg, rows) = (ctx.cfg, ctx.cfg.rows_per_shard);
    let result = (|| -> Result<()> {
        let mut source = ImageSource::for_input(cfg)?;
        let mut seq = 0;
        for &shard in pending {
            let groups = ctx.plan.shard(shard, rows);
            let base = ctx.plan.shard_range(shard, rows).start;
            let n_chunks = groups.len().div_ceil(cfg.clip_batch).max(1);
            for c in 0..n_chunks {
                let range = (c * cfg.clip_batch).min(groups.len())
                    ..((c + 1) * cfg.clip_batch).min(groups.len());
                let chunk = Prepared {
                    seq,
                    shard,
                    groups: base + range.start..base + range.end,
                    images: prepare(&mut source, &groups[range], size, &cfg.image_limits),
                    last: c + 1 == n_chunks,
                };
                seq += 1;
                if ctx.failed() || tx.send(Ok(chunk)).is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = tx.send(Err(e));
    }
}

/// Read every image of `groups`, then decode and resize them in parallel.
fn prepare(
    source: &mut ImageSource,
    groups: &[Group],
    size: u32,
    limits: &ImageLimits,
) -> Vec<RowImages> {
    let bytes: Vec<_> = groups
        .iter()
        .map(|g| source.read_set(g.first_record, &g.images))
        .collect();
    bytes
        .into_par_iter()
        .zip(groups.par_iter())
        .map(|(b, g)| {
            let b = b?;
            b.iter()
                .zip(&g.images)
                .map(|(bytes, name)| {
                    preprocess::load_resized(bytes, size, limits)
                        .map_err(|(r, d)| (r, format!("{name}: {d}")))
                })
                .collect()
        })
        .collect()
}

/// Stage 2, one thread per CLIP stream: features for each chunk; returns the images done and
/// the time spent computing and waiting.
fn clip_stage(
    ctx: &Ctx,
    tower: &ClipTower,
    rx: Receiver<Result<Prepared>>,
    tx: Sender<Featured>,
) -> Result<(usize, Timing)> {
    let mut processed = 0;
    let mut t = Timing::default();
    loop {
        let waited = Instant::now();
        let Ok(chunk) = rx.recv() else { break };
        t.wait_images_s += waited.elapsed().as_secs_f64();
        if ctx.failed() {
            break;
        }
        let busy = Instant::now();
        let chunk = match chunk.and_then(|c| featurize(tower, c)) {
            Ok(c) => c,
            Err(e) => return ctx.fail(e),
        };
        t.clip_s += busy.elapsed().as_secs_f64();
        processed += chunk
            .features
            .iter()
            .map(|f| f.as_ref().map_or(0, |v| v.len()))
            .sum::<usize>();
        let images: usize = ctx.plan.groups[chunk.groups.clone()]
            .iter()
            .map(|g| g.images.len())
            .sum();
        ctx.pb.inc(images as u64);
        let waited = Instant::now();
        if tx.send(chunk).is_err() {
            break;
        }
        t.wait_writer_s += waited.elapsed().as_secs_f64();
    }
    Ok((processed, t))
}

fn featurize(tower: &ClipTower, chunk: Prepared) -> Result<Featured> {
    let flat: Vec<&[u8]> = chunk
        .images
        .iter()
        .flat_map(|r| r.iter().flatten())
        .map(|v| v.as_slice())
        .collect();
    let per_image = if flat.is_empty() {
        Vec::new()
    } else {
        crate::util::on_pool(|| tower.features_f16_bytes(&flat))?
    };
    let mut it = per_image.into_iter();
    let features = chunk
        .images
        .into_iter()
        .map(|r| {
            r.map(|imgs| {
                imgs.iter()
                    .map(|_| it.next().expect("one feature per image"))
                    .collect()
            })
        })
        .collect();
    Ok(Featured {
        seq: chunk.seq,
        shard: chunk.shard,
        groups: chunk.groups,
        features,
        last: chunk.last,
    })
}

/// Stage 3: put the chunks back in order and assemble each shard's rows. A chunk lost to a
/// failed stream leaves its shard (and the later ones) unwritten: the run fails and a rerun does
/// them.
fn assemble_stage(ctx: &Ctx, rx: Receiver<Featured>, tx: Sender<ShardJob>) {
    let mut rows: Vec<ShardRow> = Vec::new();
    let mut rejects: Vec<Reject> = Vec::new();
    let mut in_order = InOrder::default();
    for chunk in rx {
        for chunk in in_order.push(chunk.seq, chunk) {
            let groups = &ctx.plan.groups[chunk.groups.clone()];
            for (g, features) in groups.iter().zip(chunk.features) {
                match features {
                    Ok(features) => rows.push(ShardRow {
                        image_key: g.image_key.clone(),
                        images: g.images.clone(),
                        features,
                        samples: g.samples.clone(),
                    }),
                    Err((reason, detail)) => rejects.push(image_reject(g, reason, detail)),
                }
            }
            if chunk.last {
                let job = (
                    chunk.shard,
                    std::mem::take(&mut rows),
                    std::mem::take(&mut rejects),
                );
                if ctx.failed() || tx.send(job).is_err() {
                    return;
                }
            }
        }
    }
}

/// Restores a sequence numbered from 0 that arrives out of order: `push` gives back every item
/// that is next in line.
struct InOrder<T> {
    next: usize,
    early: BTreeMap<usize, T>,
}

impl<T> Default for InOrder<T> {
    fn default() -> Self {
        Self {
            next: 0,
            early: BTreeMap::new(),
        }
    }
}

impl<T> InOrder<T> {
    fn push(&mut self, seq: usize, item: T) -> Vec<T> {
        self.early.insert(seq, item);
        let mut ready = Vec::new();
        while let Some(item) = self.early.remove(&self.next) {
            ready.push(item);
            self.next += 1;
        }
        ready
    }
}

fn image_reject(g: &Group, reason: Reason, detail: String) -> Reject {
    Reject {
        reason,
        record: g.first_record,
        ids: g.samples.iter().map(|s| s.id.clone()).collect(),
        image: g.image_key.clone(),
        detail,
    }
}

/// Stage 4, `WRITERS` threads: write each shard, then its completion record.
fn write_stage(ctx: &Ctx, rx: Receiver<ShardJob>) -> Result<()> {
    for (index, rows, rejects) in rx {
        if ctx.failed() {
            break;
        }
        if let Err(e) = write_one(ctx, index, rows, rejects) {
            return ctx.fail(e);
        }
        ctx.pb.set_message(format!("shard {index} written"));
    }
    Ok(())
}

fn write_one(ctx: &Ctx, index: usize, rows: Vec<ShardRow>, rejects: Vec<Reject>) -> Result<()> {
    let longest_sample = rows
        .iter()
        .flat_map(|r| r.samples.iter().map(|s| s.input_ids.len()))
        .max()
        .unwrap_or(0);
    let file = ctx.plan.shard_file(index, ctx.cfg.rows_per_shard);
    let (bytes, sha256) = sh::writer::write_shard(&ctx.cfg.out.join(&file), &rows, ctx.meta)?;
    let done = ShardDone {
        index,
        file,
        plan_id: ctx.plan.plan_id.clone(),
        rows: rows.len(),
        samples: rows.iter().map(|r| r.samples.len()).sum(),
        images: rows.iter().map(|r| r.images.len()).sum(),
        bytes,
        sha256,
        rejects,
        longest_sample,
        inputs: ctx.inputs[index - ctx.plan.first_shard].clone(),
    };
    manifest::write_done(&ctx.cfg.out, &done)
}

#[cfg(test)]
mod tests {
    use super::InOrder;

    #[test]
    fn in_order_gives_each_item_once_in_sequence_whatever_the_arrival_order() {
        let mut o = InOrder::default();
        assert!(o.push(2, 'c').is_empty());
        assert!(o.push(1, 'b').is_empty());
        assert_eq!(o.push(0, 'a'), vec!['a', 'b', 'c']);
        assert_eq!(o.push(3, 'd'), vec!['d']);
        assert!(o.push(5, 'f').is_empty());
        assert_eq!(o.push(4, 'e'), vec!['e', 'f']);
        assert!(o.early.is_empty());
    }
}
