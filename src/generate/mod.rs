//! Generation: upstream's sampling (temperature, top-k, repetition penalty; plus top-p) with or
//! without a KV cache, stopping at `</s>`, and UTF-8-safe streaming of the decoded text.
//! Images go through the same preprocessing and frozen CLIP as ingest (`vision`), never a copy.

pub mod chat;
pub mod stop;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::checkpoint::{trained_on, Checkpoint};
use crate::error::Result;
use crate::model::llm::KvCache;
use crate::model::vlm::{Images, Vlm};
use crate::text::{ChatTokenizer, EOS_ID};

#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// Upstream's: logits of tokens already in the sequence are divided by this; 1 = off.
    pub repetition_penalty: f64,
    pub max_new_tokens: usize,
    pub seed: u64,
}

impl Sampling {
    /// Upstream's chat defaults.
    pub fn upstream_chat() -> Self {
        Self {
            temperature: 0.5,
            top_k: Some(8),
            top_p: None,
            repetition_penalty: 1.0,
            max_new_tokens: 512,
            seed: 0,
        }
    }

    /// The one check of sampling settings, for `chat` and `serve` alike: each is a number in its
    /// range (NaN is in none). On a miss: the setting's name and what it must be.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err((
                "temperature",
                format!(
                    "temperature {} must be in [0, 2] (0: greedy)",
                    self.temperature
                ),
            ));
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return Err(("top_p", format!("top_p {p} must be in (0, 1]")));
        }
        let rp = self.repetition_penalty;
        if !(rp.is_finite() && rp > 0.0) {
            return Err((
                "repetition_penalty",
                format!("repetition_penalty {rp} must be a number > 0 (1: off)"),
            ));
        }
        if self.max_new_tokens == 0 {
            return Err(("max_tokens", "max_new_tokens must be ≥ 1".into()));
        }
        Ok(())
    }

    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            max_new_tokens,
            seed: 0,
        }
    }
}

/// Pick the next token from (V,) logits.
pub fn sample(logits: &Tensor, seen: &[u32], s: &Sampling, rng: &mut ChaCha8Rng) -> Result<u32> {
    let mut l: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
    if s.repetition_penalty != 1.0 {
        let mut uniq = seen.to_vec();
        uniq.sort_unstable();
        uniq.dedup();
        for &t in &uniq {
            if let Some(v) = l.get_mut(t as usize) {
                *v /= s.repetition_penalty as f32;
            }
        }
    }
    if s.temperature <= 0.0 {
        return Ok(argmax(&l));
    }
    for v in l.iter_mut() {
        *v /= s.temperature as f32;
    }
    if let Some(k) = s.top_k.filter(|&k| k > 0 && k < l.len()) {
        let mut sorted = l.clone();
        sorted.sort_unstable_by(|a, b| b.total_cmp(a));
        let kth = sorted[k - 1];
        l.iter_mut()
            .filter(|v| **v < kth)
            .for_each(|v| *v = f32::NEG_INFINITY);
    }
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<f64> = l.iter().map(|&v| ((v - max) as f64).exp()).collect();
    if let Some(top_p) = s.top_p.filter(|&p| p < 1.0) {
        let total: f64 = p.iter().sum();
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_unstable_by(|&a, &b| p[b].total_cmp(&p[a]));
        let mut acc = 0.0;
        let mut keep = vec![false; p.len()];
        for &i in &order {
            keep[i] = true;
            acc += p[i] / total;
            if acc >= top_p {
                break;
            }
        }
        p.iter_mut()
            .zip(&keep)
            .filter(|(_, k)| !**k)
            .for_each(|(v, _)| *v = 0.0);
    }
    let total: f64 = p.iter().sum();
    let mut r = rng.random::<f64>() * total;
    for (i, v) in p.iter().enumerate() {
        r -= v;
        if r <= 0.0 && *v > 0.0 {
            return Ok(i as u32);
        }
    }
    Ok(argmax(&l))
}

fn argmax(l: &[f32]) -> u32 {
    l.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0 as u32
}

/// Generate after `prompt`; `on_token` sees each new token and may stop generation by returning
/// false. With `use_cache` false every step recomputes the whole sequence (the reference the
/// cache is tested against). Returns the new tokens, without `</s>`.
pub fn generate(
    model: &Vlm,
    prompt: &[u32],
    images: Option<&Images>,
    s: &Sampling,
    use_cache: bool,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    let device = crate::model::vlm::device_of(model);
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
    let mut seq = prompt.to_vec();
    let mut cache = KvCache::new(model.cfg.n_layers);
    let mut out = Vec::new();
    let limit = model.cfg.max_seq_len;
    while out.len() < s.max_new_tokens && seq.len() < limit {
        let logits = if use_cache {
            let new = &seq[cache.len()..];
            model.forward_cached(&row(new, &device)?, images, &mut cache)?
        } else {
            let full = model.forward(&row(&seq, &device)?, images)?;
            let t = full.dim(1)?;
            full.narrow(1, t - 1, 1)?.squeeze(1)?
        };
        let next = sample(&logits.squeeze(0)?, &seq, s, &mut rng)?;
        if next == EOS_ID {
            break;
        }
        seq.push(next);
        out.push(next);
        if !on_token(next) {
            break;
        }
    }
    Ok(out)
}

fn row(ids: &[u32], device: &Device) -> Result<Tensor> {
    Ok(Tensor::new(ids, device)?.unsqueeze(0)?)
}

/// Most images a prompt may carry (upstream trains with at most two).
pub const MAX_IMAGES: usize = 2;

/// A checkpoint for chatting: a checkpoint directory (`checkpoint`), or a weights file
/// (`.safetensors` / upstream `.pth`) with a preset or config given by the caller.
pub fn load_model(
    ckpt: &std::path::Path,
    preset: Option<&crate::model::ModelConfig>,
    device: &Device,
) -> Result<Vlm> {
    if ckpt.is_dir() {
        return Ok(Checkpoint::open(ckpt)?.load_model(device)?.0);
    }
    let cfg = preset.cloned().ok_or_else(|| {
        crate::error::bad_file(
            ckpt,
            "a bare weights file needs --model (minimind_512, minimind_768, tiny)",
        )
    })?;
    Ok(crate::model::weights::load(ckpt, &cfg, false, device)?.0)
}

/// The CLIP to chat with: the one asked for, else the one the checkpoint was trained with, else
/// ingest's default.
pub fn clip_for(ckpt: &std::path::Path, asked: Option<String>) -> String {
    asked
        .or_else(|| trained_on(ckpt).map(|m| m.clip_source))
        .unwrap_or_else(|| crate::config::DEFAULT_CLIP.to_string())
}

/// A model ready to answer: the VLM, the frozen tower (when it takes images) and the tokenizer.
/// What `chat` and `serve` load.
pub struct Engine {
    pub vlm: Vlm,
    pub tower: Option<crate::vision::clip::ClipTower>,
    pub tokenizer: std::sync::Arc<ChatTokenizer>,
    /// Name reported by `serve` (`/v1/models`, completions).
    pub model_id: String,
}

impl Engine {
    /// Load a checkpoint (see `generate::load_model`) and, unless `clip` is `none`, the frozen
    /// tower, checking that its feature width is what the projector takes. The tokenizer is the
    /// built-in one unless `tokenizer` names another.
    pub fn load(
        ckpt: &std::path::Path,
        preset: Option<&crate::model::ModelConfig>,
        clip: &str,
        tokenizer: Option<&std::path::Path>,
        device: &candle_core::Device,
    ) -> crate::error::Result<Self> {
        let vlm = load_model(ckpt, preset, device)?;
        let trained = trained_on(ckpt);
        let tokenizer = match tokenizer {
            Some(path) => ChatTokenizer::load(path)?,
            None => ChatTokenizer::builtin(),
        };
        if let Some(m) = trained
            .as_ref()
            .filter(|m| !m.tokenizer_sha256.is_empty() && m.tokenizer_sha256 != tokenizer.sha256)
        {
            eprintln!(
                "WARNING: the model was trained on text of another tokenizer (sha256 {}; this one is {}): answers will suffer\nHINT: --tokenizer <the directory ingest used>",
                m.tokenizer_sha256, tokenizer.sha256
            );
        }
        let tower = if clip == "none" {
            None
        } else {
            use crate::shards::ClipPrecision;
            let precision = trained
                .as_ref()
                .map_or(ClipPrecision::F32, |m| m.clip_precision);
            let tower = crate::vision::clip::ClipTower::load_as(
                &clip.parse()?,
                device,
                precision.tower_dtype(),
            )?;
            if let Some(m) = trained.filter(|m| m.clip_weights != tower.weights_id) {
                eprintln!(
                    "WARNING: the model was trained on features of CLIP {} ({}); {clip} has other weights ({}): answers about images will suffer",
                    m.clip_source, m.clip_weights, tower.weights_id
                );
            }
            if precision == ClipPrecision::Tf32 {
                eprintln!("note: the model was trained on TF32 CLIP features; these are f32 (~1e-3 apart)");
            }
            if tower.hidden != vlm.cfg.vision_dim {
                return Err(crate::error::Error::Data(format!(
                    "CLIP {clip} gives {}-wide features but the model's projector takes {}",
                    tower.hidden, vlm.cfg.vision_dim
                )));
            }
            if tower.is_random() {
                eprintln!("NOTE: using a RANDOM-INITIALISED CLIP tower ({clip}): answers cannot depend on real image content");
            }
            Some(tower)
        };
        let model_id = model_name(ckpt);
        Ok(Self {
            vlm,
            tower,
            tokenizer: std::sync::Arc::new(tokenizer),
            model_id,
        })
    }
}

/// The name `serve` reports for a checkpoint: a checkpoint directory of ours (`out/sft/checkpoint`,
/// or its `model.safetensors`) is named after its run (`sft`); any other weights file after itself
/// (`sft_vlm_512.pth` → `sft_vlm_512`).
pub fn model_name(ckpt: &std::path::Path) -> String {
    let abs = std::path::absolute(ckpt).unwrap_or_else(|_| ckpt.to_path_buf());
    let mut p = abs.as_path();
    if p.is_file() && p.file_name().is_some_and(|n| n == "model.safetensors") {
        p = p.parent().unwrap_or(p);
    }
    if p.file_name().is_some_and(|n| n == "checkpoint") {
        p = p.parent().unwrap_or(p);
    }
    let name = if p.is_file() {
        p.file_stem()
    } else {
        p.file_name()
    };
    name.map(|n| n.to_string_lossy().to_string())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "minimind-v".into())
}

/// Features of image files through the ingest path: decode, PIL-bicubic resize, frozen CLIP.
/// (n, tokens, hidden).
pub fn image_features(
    tower: &crate::vision::clip::ClipTower,
    paths: &[std::path::PathBuf],
) -> Result<Option<Tensor>> {
    if paths.is_empty() {
        return Ok(None);
    }
    let mut pixels = Vec::with_capacity(paths.len());
    for p in paths {
        let bytes = std::fs::read(p).map_err(|e| crate::error::bad_file(p, e.to_string()))?;
        let limits = crate::vision::preprocess::ImageLimits::default();
        let img = crate::vision::preprocess::load_resized(&bytes, tower.image_size as u32, &limits)
            .map_err(|(_, d)| crate::error::bad_file(p, format!("not a readable image: {d}")))?;
        pixels.push(img);
    }
    let refs: Vec<&[u8]> = pixels.iter().map(|p| p.as_slice()).collect();
    Ok(Some(tower.features_u8(&refs)?))
}

/// Turns a growing token sequence into text pieces that never split a UTF-8 character.
pub struct TextStream<'a> {
    tokenizer: &'a ChatTokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a ChatTokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Add a token; returns the newly completed text, if any.
    pub fn push(&mut self, id: u32) -> Option<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids);
        // Byte-level BPE decodes an incomplete character as U+FFFD: wait for its other bytes.
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted {
            return None;
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Some(piece)
    }

    pub fn text(&self) -> String {
        self.tokenizer.decode(&self.ids)
    }
}

#[cfg(test)]
mod tests {
    use super::model_name;

    #[test]
    fn a_model_is_named_after_its_run_or_its_file() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpt = tmp.path().join("sft/checkpoint");
        std::fs::create_dir_all(&ckpt).unwrap();
        std::fs::write(ckpt.join("model.safetensors"), b"").unwrap();
        std::fs::write(tmp.path().join("sft_vlm_512.pth"), b"").unwrap();
        assert_eq!(model_name(&ckpt), "sft");
        assert_eq!(model_name(&ckpt.join("model.safetensors")), "sft");
        assert_eq!(
            model_name(&tmp.path().join("sft_vlm_512.pth")),
            "sft_vlm_512"
        );
        assert_eq!(model_name(&tmp.path().join("sft")), "sft");
    }
}
