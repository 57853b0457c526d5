//! What a run logs: one `metrics.jsonl` line per step (`StepLog`), and the helpers that read the
//! JSONL files back and cut them at a resumed run's step.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::dist::Dist;
use crate::error::{bad_file, Error, IoContext, Result};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub samples_per_s: f64,
    /// Share of the step spent waiting for data (reading, collating).
    pub data_wait: f64,
    pub epoch: u64,
}

/// A queued step whose numbers are still on the device.
pub(super) struct Pending {
    pub step: usize,
    pub lr: f64,
    /// (mean loss, tokens, samples, gradient norm); tokens and samples averaged over ranks.
    pub stats: Tensor,
    pub wait: f64,
    pub epoch: u64,
    pub batch_ids: Vec<String>,
}

/// A step read back: its log line, and whether any rank was interrupted (Ctrl-C) by then.
pub(super) struct Read {
    pub log: StepLog,
    pub interrupted: bool,
}

impl Pending {
    /// Read the step back (waits for the device to finish it); a non-finite loss stops the run.
    pub fn read(self, dist: &Dist, secs: f64, ckpt: &Path) -> Result<Read> {
        let v = self.stats.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let w = dist.world as f64;
        let (loss, tokens, samples, norm) = (v[0], v[1] as f64 * w, v[2] as f64 * w, v[3]);
        if !loss.is_finite() || !norm.is_finite() {
            return Err(Error::Numerics(format!(
                "loss is {loss} (gradient norm {norm}) at step {} (rank {}; first ids of its batches {:?}); stopping — the last good checkpoint is in {}\nHINT: lower the learning rate (or raise warmup_steps) and --resume from that checkpoint",
                self.step,
                dist.rank,
                self.batch_ids,
                ckpt.display()
            )));
        }
        let log = StepLog {
            step: self.step,
            loss,
            lr: self.lr,
            grad_norm: norm as f64,
            tokens_per_s: tokens.round() / secs,
            samples_per_s: samples.round() / secs,
            data_wait: self.wait / secs,
            epoch: self.epoch,
        };
        Ok(Read {
            log,
            interrupted: v.get(4).is_some_and(|&i| i > 0.0),
        })
    }
}

/// Keep the lines of `path` that `keep` accepts (a resumed run rewrites the rest).
pub(super) fn truncate_jsonl<T: serde::de::DeserializeOwned>(
    path: &Path,
    keep: impl Fn(&T) -> bool,
) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).at(path)?;
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<T>(l).is_ok_and(|s| keep(&s)))
        .map(|l| format!("{l}\n"))
        .collect();
    crate::util::write_bytes_atomic(path, kept.as_bytes())
}

pub fn read_metrics(out: &Path) -> Result<Vec<StepLog>> {
    read_jsonl(&out.join("metrics.jsonl"))
}

/// All lines of a JSONL file; none if it does not exist.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).at(path)?;
    text.lines()
        .map(|l| serde_json::from_str(l).map_err(|e| bad_file(path, e.to_string())))
        .collect()
}
