//! A checkpoint directory — the one place that writes and reads it, and the only place that
//! knows its file names:
//!
//! | file | what |
//! |---|---|
//! | `model.safetensors` | weights under upstream's names (`model::weights`) |
//! | `config.json` | the model's shape (`ModelConfig`, upstream's `LMConfig` names) |
//! | `optimizer.safetensors` | AdamW's moments (a training checkpoint) |
//! | `state.json` | step, data position, Adam's step count, the run's settings (`TrainState`) |
//! | `shards.json` | the training shards' metadata: which CLIP, which precision (chat and serve take the same) |
//! | `checkpoint.json` | the format version readers check |
//!
//! A model directory (`save_model`) holds the first two and the version. A training checkpoint is
//! written whole into `checkpoint.tmp-PID/` and renamed into place, the previous one kept as
//! `checkpoint.old` only for the instant between the two renames (`tidy` restores it after a kill
//! there), so a reader sees the old checkpoint or the new one, never a mix.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::error::{bad_file, IoContext, Result};
use crate::model::{vlm::Vlm, weights, ModelConfig};
use crate::shards::ShardMeta;

/// The format this build writes and reads. A directory without `checkpoint.json` predates the
/// file and is version 1.
pub const FORMAT_VERSION: u32 = 1;

const WEIGHTS: &str = "model.safetensors";
const CONFIG: &str = "config.json";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";
const SHARDS: &str = "shards.json";
const VERSION: &str = "checkpoint.json";

/// Saved beside the weights; enough to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub step: usize,
    pub data_position: u64,
    pub adam_t: u64,
    pub config: TrainConfig,
}

#[derive(Debug, Serialize, Deserialize)]
struct Version {
    format: String,
    version: u32,
}

/// Where a training run keeps its checkpoint.
pub fn dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

/// The weights file of a checkpoint directory (e.g. to start another stage from it).
pub fn weights_file(dir: &Path) -> PathBuf {
    dir.join(WEIGHTS)
}

/// Write `dir`'s weights, model config and format version (a model directory). Each file is
/// written atomically.
pub fn save_model(dir: &Path, varmap: &VarMap, cfg: &ModelConfig) -> Result<()> {
    std::fs::create_dir_all(dir).at(dir)?;
    weights::save_safetensors(varmap, &dir.join(WEIGHTS))?;
    crate::util::write_bytes_atomic(&dir.join(CONFIG), &serde_json::to_vec_pretty(cfg)?)?;
    let version = Version {
        format: "minimind-v checkpoint".into(),
        version: FORMAT_VERSION,
    };
    crate::util::write_bytes_atomic(&dir.join(VERSION), &serde_json::to_vec_pretty(&version)?)
}

/// What a training checkpoint holds besides the model.
pub struct Training<'a> {
    /// AdamW's state, by tensor name (`AdamW::state_tensors`).
    pub optimizer: HashMap<String, Tensor>,
    pub state: &'a TrainState,
    pub shards: &'a ShardMeta,
}

/// The shards' metadata as a checkpoint keeps it: a CLIP directory given relative to where ingest
/// ran is recorded as the absolute path it is from here, so `chat` and `serve` find it from any
/// directory.
fn portable(meta: &ShardMeta) -> ShardMeta {
    let mut meta = meta.clone();
    let path = Path::new(&meta.clip_source);
    if !meta.clip_random && path.is_relative() {
        if let Ok(abs) = std::fs::canonicalize(path) {
            meta.clip_source = abs.display().to_string();
        }
    }
    meta
}

/// Write `out`'s training checkpoint whole, then swap it into place. On a failure (a full disk,
/// say) the half-written directory is removed and the error names the step and the place.
pub fn save(out: &Path, varmap: &VarMap, cfg: &ModelConfig, training: Training) -> Result<()> {
    let dir = dir(out);
    let tmp = crate::util::tmp_path(&dir);
    let _ = std::fs::remove_dir_all(&tmp);
    let step = training.state.step;
    let written = (|| {
        save_model(&tmp, varmap, cfg)?;
        let optimizer = tmp.join(OPTIMIZER);
        let on_cpu = training
            .optimizer
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        candle_core::safetensors::save(&on_cpu, &optimizer)
            .map_err(|e| bad_file(&optimizer, e.to_string()))?;
        let state = serde_json::to_vec_pretty(training.state)?;
        crate::util::write_bytes_atomic(&tmp.join(STATE), &state)?;
        let shards = serde_json::to_vec_pretty(&portable(training.shards))?;
        crate::util::write_bytes_atomic(&tmp.join(SHARDS), &shards)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(bad_file(
            &dir,
            format!("writing the checkpoint of step {step} failed (the previous checkpoint is kept): {e}"),
        ));
    }
    let old = out.join("checkpoint.old");
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(&dir, &old).at(&dir)?;
    }
    std::fs::rename(&tmp, &dir).at(&dir)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Before a run reads or writes `out`'s checkpoint: remove half-written ones of killed runs
/// (`checkpoint.tmp-PID`), and restore the previous one if a kill came between the two renames of
/// [`save`].
pub fn tidy(out: &Path) -> Result<()> {
    crate::util::remove_stale_tmp(out)?;
    let (dir, previous) = (dir(out), out.join("checkpoint.old"));
    if !dir.exists() && previous.exists() {
        std::fs::rename(&previous, &dir).at(&dir)?;
    }
    Ok(())
}

/// A checkpoint or model directory, its format version checked.
pub struct Checkpoint {
    dir: PathBuf,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.join(WEIGHTS).exists() {
            return Err(bad_file(
                dir,
                format!("not a checkpoint directory (no {WEIGHTS})\nHINT: give a directory written by `minimind-v train` (out/<run>/checkpoint), or a weights file with --model"),
            ));
        }
        let version_file = dir.join(VERSION);
        if version_file.exists() {
            let text = std::fs::read_to_string(&version_file).at(&version_file)?;
            let v: Version =
                serde_json::from_str(&text).map_err(|e| bad_file(&version_file, e.to_string()))?;
            if v.version != FORMAT_VERSION {
                return Err(bad_file(
                    &version_file,
                    format!(
                        "checkpoint format {} is not supported (this build reads {FORMAT_VERSION})\nHINT: use the minimind-v version that wrote it",
                        v.version
                    ),
                ));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn model_config(&self) -> Result<ModelConfig> {
        let path = self.dir.join(CONFIG);
        let text = std::fs::read_to_string(&path).at(&path)?;
        serde_json::from_str(&text).map_err(|e| bad_file(&path, e.to_string()))
    }

    /// The model, trainable (its parameters in the returned `VarMap`).
    pub fn load_model(&self, device: &Device) -> Result<(Vlm, VarMap)> {
        let (vlm, varmap, _) = weights::load(
            &self.dir.join(WEIGHTS),
            &self.model_config()?,
            false,
            device,
        )?;
        Ok((vlm, varmap))
    }

    /// The training state, if this is a training checkpoint.
    pub fn state(&self) -> Result<Option<TrainState>> {
        let path = self.dir.join(STATE);
        if !path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path).at(&path)?;
        Ok(Some(
            serde_json::from_slice(&bytes).map_err(|e| bad_file(&path, e.to_string()))?,
        ))
    }

    /// AdamW's state, by tensor name, on `device`.
    pub fn optimizer(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        let path = self.dir.join(OPTIMIZER);
        candle_core::safetensors::load(&path, device).map_err(|e| bad_file(&path, e.to_string()))
    }

    /// The metadata of the shards the model was trained on, if the checkpoint says.
    pub fn shards(&self) -> Option<ShardMeta> {
        let text = std::fs::read_to_string(self.dir.join(SHARDS)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// The metadata of the shards a checkpoint directory was trained on, if it is one and says.
pub fn trained_on(dir: &Path) -> Option<ShardMeta> {
    Checkpoint::open(dir).ok()?.shards()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_clip_directory_is_kept_as_an_absolute_path() {
        let meta = |source: &str, random: bool| ShardMeta {
            clip_source: source.into(),
            clip_random: random,
            ..ShardMeta::example()
        };
        // Tests run in the crate's root, where assets/ exists.
        let abs = portable(&meta("assets", false)).clip_source;
        assert!(Path::new(&abs).is_absolute(), "{abs}");
        assert_eq!(Path::new(&abs), std::fs::canonicalize("assets").unwrap());
        for (source, random) in [("random-small:1", true), ("no/such/dir", false)] {
            assert_eq!(portable(&meta(source, random)).clip_source, source);
        }
    }

    #[test]
    fn readers_check_the_format_version_and_accept_directories_from_before_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        let cfg = ModelConfig::tiny();
        let state = weights::random_state(&cfg, 0).unwrap();
        let (_, varmap, _) =
            weights::build(Path::new("random"), state, &cfg, false, &Device::Cpu).unwrap();
        save_model(&dir, &varmap, &cfg).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        assert_eq!(ckpt.model_config().unwrap(), cfg);
        assert!(ckpt.state().unwrap().is_none() && ckpt.shards().is_none());

        // Written before the version file existed: read as version 1.
        std::fs::remove_file(dir.join(VERSION)).unwrap();
        assert!(Checkpoint::open(&dir).is_ok());
        // A later format is refused, naming the file.
        std::fs::write(
            dir.join(VERSION),
            r#"{"format": "minimind-v checkpoint", "version": 2}"#,
        )
        .unwrap();
        let err = Checkpoint::open(&dir).err().unwrap().to_string();
        assert!(
            err.contains("checkpoint.json") && err.contains("format 2"),
            "{err}"
        );
        let err = Checkpoint::open(tmp.path()).err().unwrap().to_string();
        assert!(err.contains("not a checkpoint directory"), "{err}");
    }
}
