//! Shards → training batches, streamed: rows are read a row group at a time, samples pass a
//! seeded shuffle buffer, are grouped into length buckets and padded only to the longest sample
//! of their batch (upstream pads every row to 512). The stream is a pure function of
//! (files, seed, settings), so a position — batches drawn so far — is all a checkpoint needs.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{bad_file, Result};
use crate::model::vlm::{Images, Vlm};
use crate::shards::manifest::Verifier;
use crate::shards::reader::ShardReader;
use crate::shards::ShardMeta;

/// One tokenized sample with its row's image features (shared between a row's samples).
#[derive(Debug, Clone)]
pub struct Item {
    pub id: String,
    pub ids: Vec<u16>,
    pub mask: Vec<u8>,
    pub features: Arc<Vec<Vec<u8>>>,
}

/// Which rows of each global batch this stream hands out: with `world` data-parallel ranks each
/// reading every shard, rank `r` takes rows `r`, `r + world`, … of a batch of `world ×
/// batch_size` samples. Length bucketing sorts a batch's rows, so the shares are of equal length
/// and no rank waits for another's longer batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub rank: usize,
    pub world: usize,
}

impl Share {
    /// Every row: a run of one, or a rank that reads only its own files.
    pub const WHOLE: Share = Share { rank: 0, world: 1 };
}

#[derive(Debug, Clone, PartialEq)]
pub struct DataConfig {
    /// Samples per batch of this stream's share.
    pub batch_size: usize,
    pub share: Share,
    pub shuffle_buffer: usize,
    /// Batches sorted by length together; 1 disables bucketing.
    pub bucket_batches: usize,
    pub seed: u64,
    /// Pad every batch to this length instead (upstream's behaviour, for comparison).
    pub pad_to: Option<usize>,
    /// Check each shard file against its manifest's sha256 the first time it is opened.
    pub verify: bool,
}

/// Endless, epoch after epoch, deterministic stream of item batches.
pub struct Stream {
    files: Vec<PathBuf>,
    cfg: DataConfig,
    epoch: u64,
    /// Batches handed out so far, over all epochs: the resume position.
    pub position: u64,
    rng: ChaCha8Rng,
    order: VecDeque<PathBuf>,
    reader: Option<ShardReader>,
    /// With `cfg.verify`: the files checked so far.
    verifier: Option<(Verifier, HashSet<PathBuf>)>,
    pending: VecDeque<Item>,
    buffer: Vec<Item>,
    ready: VecDeque<Vec<Item>>,
}

impl Stream {
    pub fn new(files: Vec<PathBuf>, cfg: DataConfig) -> Result<Self> {
        if files.is_empty() {
            return Err(crate::Error::Data(
                "no shard files to train on\nHINT: point `shards` at a directory written by `minimind-v ingest`".into(),
            ));
        }
        let mut s = Self {
            files,
            cfg,
            epoch: 0,
            position: 0,
            rng: ChaCha8Rng::seed_from_u64(0),
            order: VecDeque::new(),
            reader: None,
            verifier: None,
            pending: VecDeque::new(),
            buffer: Vec::new(),
            ready: VecDeque::new(),
        };
        s.verifier = s.cfg.verify.then(Default::default);
        s.start_epoch(0);
        Ok(s)
    }

    fn start_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.rng =
            ChaCha8Rng::seed_from_u64(self.cfg.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut files = self.files.clone();
        files.shuffle(&mut self.rng);
        self.order = files.into();
    }

    /// Next sample in file order, or `None` at the end of the epoch.
    fn next_item(&mut self) -> Result<Option<Item>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Ok(Some(item));
            }
            if let Some(reader) = self.reader.as_mut() {
                match reader.next() {
                    Some(row) => {
                        let row = row?;
                        let features = Arc::new(row.features);
                        self.pending.extend(row.samples.into_iter().map(|s| Item {
                            id: s.id,
                            ids: s.input_ids,
                            mask: s.loss_mask,
                            features: features.clone(),
                        }));
                        continue;
                    }
                    None => self.reader = None,
                }
            }
            match self.order.pop_front() {
                Some(path) => {
                    if let Some((verifier, checked)) = self.verifier.as_mut() {
                        if checked.insert(path.clone()) {
                            verifier.verify(&path)?;
                        }
                    }
                    self.reader = Some(ShardReader::open(&path)?)
                }
                None => return Ok(None),
            }
        }
    }

    /// Read samples until the shuffle buffer holds `want` (or the epoch's files run out).
    fn top_up(&mut self, want: usize) -> Result<bool> {
        while self.buffer.len() < want {
            match self.next_item()? {
                Some(item) => self.buffer.push(item),
                None => return Ok(true),
            }
        }
        Ok(false)
    }

    /// Fill the next group of length-sorted global batches.
    fn refill(&mut self) -> Result<()> {
        let world = self.cfg.share.world;
        let global = self.cfg.batch_size * world;
        let group = global * self.cfg.bucket_batches.max(1);
        let mut picked = Vec::with_capacity(group);
        let mut exhausted = false;
        while picked.len() < group {
            exhausted = self.top_up(self.cfg.shuffle_buffer.max(1))?;
            if self.buffer.is_empty() {
                break;
            }
            let i = self.rng.random_range(0..self.buffer.len());
            picked.push(self.buffer.swap_remove(i));
        }
        // Fewer samples left in the epoch than ranks: they join this group, so that every
        // global batch gives each rank at least one row.
        if !exhausted && world > 1 {
            exhausted = self.top_up(self.cfg.shuffle_buffer.max(world))?;
        }
        if exhausted && self.buffer.len() < world {
            while !self.buffer.is_empty() {
                let i = self.rng.random_range(0..self.buffer.len());
                picked.push(self.buffer.swap_remove(i));
            }
        }
        if picked.is_empty() {
            return Ok(());
        }
        if self.cfg.bucket_batches > 1 {
            picked.sort_by_key(|it| it.ids.len());
        }
        let mut batches: Vec<Vec<Item>> = Vec::new();
        let mut iter = picked.into_iter().peekable();
        while iter.peek().is_some() {
            batches.push(iter.by_ref().take(global).collect());
        }
        // An epoch's last batch with fewer rows than ranks joins the one before it.
        if batches.len() > 1 && batches.last().is_some_and(|b| b.len() < world) {
            let short = batches.pop().expect("more than one batch");
            batches.last_mut().expect("one left").extend(short);
        }
        batches.shuffle(&mut self.rng);
        self.ready.extend(batches);
        Ok(())
    }

    /// This stream's share of the next batch; epochs roll over.
    pub fn next_items(&mut self) -> Result<Vec<Item>> {
        let Share { rank, world } = self.cfg.share;
        for _ in 0..3 {
            if let Some(b) = self.ready.pop_front() {
                self.position += 1;
                if b.len() < world {
                    return Err(crate::Error::Data(format!(
                        "the shards hold {} sample(s) in an epoch, fewer than the {world} data-parallel ranks\nHINT: train on fewer ranks",
                        b.len()
                    )));
                }
                return Ok(b.into_iter().skip(rank).step_by(world).collect());
            }
            self.refill()?;
            if self.ready.is_empty() {
                self.start_epoch(self.epoch + 1);
            }
        }
        Err(crate::Error::Data(
            "the shards hold no samples\nHINT: see the ingest's rejects.jsonl for why every record was rejected".into(),
        ))
    }

    /// Advance to `position` without building tensors (resume).
    pub fn skip_to(&mut self, position: u64) -> Result<()> {
        while self.position < position {
            self.next_items()?;
        }
        Ok(())
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// A padded batch on a device, shifted as upstream does: X = ids[:-1], Y = ids[1:], mask[1:].
pub struct Batch {
    pub x: Tensor,
    pub y: Tensor,
    pub mask: Tensor,
    pub images: Option<Images>,
    pub ids: Vec<String>,
    /// Real (unpadded) input tokens.
    pub tokens: usize,
    pub loss_tokens: usize,
    /// Flat (row * T + position) indices where the mask is 1, for [`Vlm::loss_at`].
    pub keep: Vec<u32>,
}

impl Batch {
    /// The model's mean loss over this batch's loss positions.
    pub fn loss(&self, model: &Vlm) -> Result<Tensor> {
        Ok(model.loss_at(&self.x, self.images.as_ref(), &self.y, &self.keep)?)
    }
}

/// Build the device tensors of a batch. `zero_images` replaces features by zeros (ablation).
pub fn collate(
    items: &[Item],
    meta: &ShardMeta,
    pad_to: Option<usize>,
    zero_images: bool,
    image_ids: &[u32],
    device: &Device,
) -> Result<Batch> {
    let longest = items
        .iter()
        .map(|i| i.ids.len().saturating_sub(1))
        .max()
        .unwrap_or(0);
    let t = pad_to.map_or(longest, |p| p.max(longest));
    let b = items.len();
    let (mut x, mut y, mut m) = (vec![0u32; b * t], vec![0u32; b * t], vec![0f32; b * t]);
    let mut tokens = 0;
    for (r, it) in items.iter().enumerate() {
        let n = it.ids.len().saturating_sub(1);
        tokens += n;
        for p in 0..n {
            x[r * t + p] = it.ids[p] as u32;
            y[r * t + p] = it.ids[p + 1] as u32;
            m[r * t + p] = it.mask[p + 1] as f32;
        }
    }
    let keep: Vec<u32> = (0..(b * t) as u32)
        .filter(|&i| m[i as usize] != 0.0)
        .collect();
    // Features travel as the shards store them (f16), in one upload per batch; the model casts
    // them on the device. Only images that have a placeholder window are sent.
    let [tok, hid] = meta.feature_shape;
    let rows: Vec<Vec<u32>> = items
        .iter()
        .map(|it| it.ids.iter().take(t).map(|&v| v as u32).collect())
        .collect();
    let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let counts: Vec<usize> = items.iter().map(|it| it.features.len()).collect();
    let pairs = crate::model::vlm::pair_windows(&rows, &counts, image_ids);
    let mut bytes = Vec::new();
    for &(r, _, k) in &pairs {
        bytes.extend_from_slice(&items[r].features[k]);
    }
    let slots: Vec<(usize, usize)> = pairs.iter().map(|&(r, s, _)| (r, s)).collect();
    let images = if slots.is_empty() {
        None
    } else {
        let shape = (slots.len(), tok, hid);
        let feats = if zero_images {
            Tensor::zeros(shape, DType::F16, device)?
        } else {
            Tensor::from_raw_buffer(&bytes, DType::F16, &[shape.0, tok, hid], device)?
        };
        Some(Images { feats, slots })
    };
    Ok(Batch {
        x: Tensor::from_vec(x, (b, t), device)?,
        y: Tensor::from_vec(y, (b, t), device)?,
        mask: Tensor::from_vec(m, (b, t), device)?,
        loss_tokens: keep.len(),
        keep,
        images,
        ids: items.iter().map(|i| i.id.clone()).collect(),
        tokens,
    })
}

/// `a`'s features must come from the CLIP (weights, shape and precision) that made `b`'s: a model
/// trained on one would read the other's as noise. The error names both.
pub fn check_same_clip(a: (&Path, &ShardMeta), b: (&Path, &ShardMeta)) -> Result<()> {
    let clip = |m: &ShardMeta| {
        format!(
            "{} ({}, {}×{}, {})",
            m.clip_source,
            m.clip_weights,
            m.feature_shape[0],
            m.feature_shape[1],
            m.clip_precision.as_str()
        )
    };
    let (ma, mb) = (a.1, b.1);
    if ma.feature_shape == mb.feature_shape
        && ma.clip_weights == mb.clip_weights
        && ma.clip_precision == mb.clip_precision
    {
        return Ok(());
    }
    Err(bad_file(
        a.0,
        format!(
            "was ingested with another CLIP than {}: {} here, {} there\nHINT: ingest every shard a model trains and validates on with the same [ingest] clip and clip_precision",
            b.0.display(),
            clip(ma),
            clip(mb)
        ),
    ))
}

/// Every shard's metadata must agree and fit the model; refuse before training starts.
pub fn check_shards(files: &[PathBuf], vision_dim: usize) -> Result<ShardMeta> {
    let mut first: Option<(PathBuf, ShardMeta)> = None;
    for f in files {
        let meta = crate::shards::reader::read_meta(f)?;
        if meta.feature_shape[1] != vision_dim {
            return Err(bad_file(
                f,
                format!(
                    "features are {}×{} but the model's projector takes {vision_dim}-wide features\nHINT: set model vision_dim = {} or ingest with the CLIP the model expects",
                    meta.feature_shape[0], meta.feature_shape[1], meta.feature_shape[1]
                ),
            ));
        }
        match &first {
            Some((f0, m)) => check_same_clip((f, &meta), (f0, m))?,
            None => first = Some((f.clone(), meta)),
        }
    }
    first.map(|(_, m)| m).ok_or_else(|| {
        crate::Error::Data(
            "no shard files\nHINT: point `shards` at a directory written by `minimind-v ingest`"
                .into(),
        )
    })
}
