//! Held-out loss during training: every `val_every` steps and at the end, the mean loss per loss
//! token over the first `val_batches` batches of the validation shards, with the image features
//! and with them zeroed (the gap shows the model uses the image). One `val.jsonl` line each.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::data::{self, DataConfig, Stream};
use crate::error::{IoContext, Result};
use crate::model::vlm::Vlm;
use crate::shards::ShardMeta;

/// One line of `val.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValLog {
    pub step: usize,
    pub loss: f32,
    pub loss_no_image: f32,
}

/// Mean held-out loss per loss token over the first `batches` batches of a fixed stream.
pub fn evaluate(
    model: &Vlm,
    files: &[PathBuf],
    meta: &ShardMeta,
    batch_size: usize,
    batches: usize,
    zero_images: bool,
    device: &Device,
) -> Result<f32> {
    let cfg = DataConfig {
        batch_size,
        share: data::Share::WHOLE,
        shuffle_buffer: 1,
        bucket_batches: 1,
        seed: 0,
        pad_to: None,
        // Checked once when the run starts (`Run::start`), not at every validation.
        verify: false,
    };
    let mut stream = Stream::new(files.to_vec(), cfg)?;
    let (mut sum, mut n) = (0f64, 0usize);
    for _ in 0..batches {
        let items = stream.next_items()?;
        if stream.epoch() > 0 {
            break; // fewer held-out samples than asked for: each counted once
        }
        let b = data::collate(
            &items,
            meta,
            None,
            zero_images,
            &model.cfg.image_ids,
            device,
        )?;
        if b.loss_tokens == 0 {
            continue;
        }
        let l = b.loss(model)?.detach().to_scalar::<f32>()?;
        sum += l as f64 * b.loss_tokens as f64;
        n += b.loss_tokens;
    }
    Ok((sum / n.max(1) as f64) as f32)
}

/// The validation shards of a run and where their losses go.
pub(super) struct Validation {
    pub files: Vec<PathBuf>,
    pub meta: ShardMeta,
    pub batch_size: usize,
    pub batches: usize,
}

impl Validation {
    /// Both held-out losses of `model` at `step`, appended to `out/val.jsonl`.
    pub fn run(&self, model: &Vlm, step: usize, out: &Path, device: &Device) -> Result<ValLog> {
        let loss = |zero: bool| {
            evaluate(
                model,
                &self.files,
                &self.meta,
                self.batch_size,
                self.batches,
                zero,
                device,
            )
        };
        let log = ValLog {
            step,
            loss: loss(false)?,
            loss_no_image: loss(true)?,
        };
        let path = out.join("val.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .at(&path)?;
        writeln!(f, "{}", serde_json::to_string(&log)?).at(&path)?;
        Ok(log)
    }
}
