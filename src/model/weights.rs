//! Weights under upstream's names: read from a safetensors file or upstream's pickled `*.pth`
//! (`_orig_mod.` prefixes stripped, attention `mask` buffers ignored), checked strictly against
//! the config, and written back as safetensors (a checkpoint directory is `checkpoint`'s).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::vlm::Vlm;
use super::ModelConfig;
use crate::error::{bad_file, Result};

pub const PROJECTOR_PREFIX: &str = "vision_proj.";

/// Every parameter name and shape of a model with this config (`output.weight` is tied).
pub fn expected_shapes(cfg: &ModelConfig) -> BTreeMap<String, Vec<usize>> {
    let (d, hd, h) = (cfg.dim, cfg.head_dim(), cfg.ffn_hidden());
    let mut m = BTreeMap::new();
    m.insert("tok_embeddings.weight".into(), vec![cfg.vocab_size, d]);
    m.insert("norm.weight".into(), vec![d]);
    for i in 0..cfg.n_layers {
        let l = format!("layers.{i}");
        m.insert(
            format!("{l}.attention.wq.weight"),
            vec![cfg.n_heads * hd, d],
        );
        m.insert(
            format!("{l}.attention.wk.weight"),
            vec![cfg.n_kv_heads * hd, d],
        );
        m.insert(
            format!("{l}.attention.wv.weight"),
            vec![cfg.n_kv_heads * hd, d],
        );
        m.insert(
            format!("{l}.attention.wo.weight"),
            vec![d, cfg.n_heads * hd],
        );
        m.insert(format!("{l}.attention_norm.weight"), vec![d]);
        m.insert(format!("{l}.ffn_norm.weight"), vec![d]);
        m.insert(format!("{l}.feed_forward.w1.weight"), vec![h, d]);
        m.insert(format!("{l}.feed_forward.w2.weight"), vec![d, h]);
        m.insert(format!("{l}.feed_forward.w3.weight"), vec![h, d]);
    }
    m.insert(
        "vision_proj.vision_proj.0.weight".into(),
        vec![d, cfg.vision_dim],
    );
    m.insert("vision_proj.vision_proj.0.bias".into(), vec![d]);
    m
}

/// Raw tensors of a checkpoint file, names normalised to upstream's; no tensor may hold more than
/// 2^31 elements (use [`load`] to bound them by a model's shape).
pub fn read_state(path: &Path) -> Result<HashMap<String, Tensor>> {
    read_state_bounded(path, 1 << 31)
}

/// [`read_state`], refusing any tensor of more than `max_elems` elements before reading it.
fn read_state_bounded(path: &Path, max_elems: usize) -> Result<HashMap<String, Tensor>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let raw: Vec<(String, Tensor)> = match ext {
        // safetensors checks each tensor's declared size against the bytes it holds.
        "safetensors" => candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| bad_file(path, e.to_string()))?
            .into_iter()
            .collect(),
        "pth" | "pt" | "bin" => read_pth(path, max_elems)?,
        _ => {
            return Err(bad_file(
                path,
                "expected a .safetensors or upstream .pth checkpoint",
            ))
        }
    };
    Ok(raw
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("_orig_mod.").unwrap_or(&k).to_string(), v))
        .filter(|(k, _)| !(k == "mask" || k.ends_with(".mask")))
        .collect())
}

/// A PyTorch zip checkpoint, read through `pth` (globals allowlisted, sizes bounded). zip 9's
/// archive-offset detection rejects some valid files torch writes (seen with
/// `model_orig_mod_prefix.pth`); those are re-packed verbatim, with the offset known to be 0,
/// into a temporary file that the readers accept.
fn read_pth(path: &Path, max_elems: usize) -> Result<Vec<(String, Tensor)>> {
    if zip::ZipArchive::new(std::fs::File::open(path).map_err(|e| bad_file(path, e.to_string()))?)
        .is_ok()
    {
        return super::pth::read(path, max_elems);
    }
    let tmp = tempfile_path(path);
    let repacked = || -> std::result::Result<(), String> {
        let cfg = zip::read::Config {
            archive_offset: zip::read::ArchiveOffset::Known(0),
        };
        let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        let mut archive = zip::ZipArchive::with_config(cfg, file).map_err(|e| e.to_string())?;
        let mut writer =
            zip::ZipWriter::new(std::fs::File::create(&tmp).map_err(|e| e.to_string())?);
        for i in 0..archive.len() {
            let entry = archive.by_index_raw(i).map_err(|e| e.to_string())?;
            writer.raw_copy_file(entry).map_err(|e| e.to_string())?;
        }
        writer.finish().map_err(|e| e.to_string())?;
        Ok(())
    };
    let result = repacked()
        .map_err(|e| bad_file(path, format!("not a readable PyTorch checkpoint: {e}")))
        .and_then(|()| super::pth::read(&tmp, max_elems))
        .map_err(|e| match e {
            crate::Error::BadFile { msg, .. } => bad_file(path, msg),
            other => other,
        });
    let _ = std::fs::remove_file(&tmp);
    result
}

fn tempfile_path(path: &Path) -> std::path::PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    std::env::temp_dir().join(format!("minimind-v-{}-{name}.zip", std::process::id()))
}

/// What loading did beyond copying tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// The checkpoint had no projector (an LLM-only `*_llm.pth`); it was initialised freshly.
    pub fresh_projector: bool,
}

/// Check `state` against `cfg` strictly and build a trainable model from it.
/// A missing projector is allowed only with `allow_fresh_projector`.
pub fn build(
    path: &Path,
    state: HashMap<String, Tensor>,
    cfg: &ModelConfig,
    allow_fresh_projector: bool,
    device: &Device,
) -> Result<(Vlm, VarMap, LoadReport)> {
    let expected = expected_shapes(cfg);
    let mut problems = Vec::new();
    for (name, t) in &state {
        let want = if name == "output.weight" {
            expected.get("tok_embeddings.weight")
        } else {
            expected.get(name)
        };
        match want {
            None => problems.push(format!("unexpected tensor {name} {:?}", t.dims())),
            Some(shape) if t.dims() != shape.as_slice() => problems.push(format!(
                "{name}: shape {:?}, config wants {shape:?}",
                t.dims()
            )),
            _ => {}
        }
    }
    let missing: Vec<&String> = expected
        .keys()
        .filter(|k| !state.contains_key(*k))
        .collect();
    let projector_missing =
        missing.iter().all(|k| k.starts_with(PROJECTOR_PREFIX)) && !missing.is_empty();
    let fresh_projector = projector_missing && allow_fresh_projector;
    for k in missing {
        if !(fresh_projector && k.starts_with(PROJECTOR_PREFIX)) {
            problems.push(format!("missing tensor {k}"));
        }
    }
    if !problems.is_empty() {
        problems.sort();
        return Err(bad_file(
            path,
            format!(
                "does not fit the model config ({} problem(s)):\n  {}\nHINT: check dim/n_layers/n_heads/n_kv_heads/vision_dim in the config, or the checkpoint file",
                problems.len(),
                problems.join("\n  ")
            ),
        ));
    }
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().expect("fresh lock");
        for (name, t) in state {
            if name == "output.weight" {
                continue; // tied to tok_embeddings.weight
            }
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = Vlm::new(vb, cfg)?;
    Ok((model, varmap, LoadReport { fresh_projector }))
}

/// Seeded initial weights, as upstream initialises them: N(0, 0.02) for embeddings and linear
/// layers, N(0, 0.02/sqrt(2·n_layers)) for `w3`/`wo`, ones for norms, zero bias.
pub fn random_state(cfg: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut normal = |n: usize, std: f64| -> Vec<f32> {
        (0..n)
            .map(|_| {
                // Box-Muller: deterministic across platforms for a seed.
                let (u1, u2): (f64, f64) =
                    (rng.random::<f64>().max(f64::MIN_POSITIVE), rng.random());
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
            })
            .collect()
    };
    let mut state = HashMap::new();
    for (name, shape) in expected_shapes(cfg) {
        let n: usize = shape.iter().product();
        let data = if name.ends_with("norm.weight") {
            vec![1f32; n]
        } else if name.ends_with(".bias") {
            vec![0f32; n]
        } else if name.ends_with("w3.weight") || name.ends_with("wo.weight") {
            normal(n, 0.02 / (2.0 * cfg.n_layers as f64).sqrt())
        } else {
            normal(n, 0.02)
        };
        state.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    Ok(state)
}

/// Load a checkpoint file into a trainable model.
pub fn load(
    path: &Path,
    cfg: &ModelConfig,
    allow_fresh_projector: bool,
    device: &Device,
) -> Result<(Vlm, VarMap, LoadReport)> {
    cfg.validate()?;
    // No tensor of the file may be larger than the model's largest: a header's claim is checked
    // before its bytes are read.
    let largest = expected_shapes(cfg)
        .values()
        .map(|s| s.iter().product::<usize>())
        .max()
        .unwrap_or(0);
    let state = read_state_bounded(path, largest)?;
    build(path, state, cfg, allow_fresh_projector, device)
}

/// Write the weights to `path` (safetensors, upstream's names, `output.weight` included as
/// upstream's state dict has it), atomically.
pub fn save_safetensors(varmap: &VarMap, path: &Path) -> Result<()> {
    save_tensors(&upstream_state(varmap)?, path)
}

/// The weights as upstream's state dict holds them, on the CPU: upstream's names, and
/// `output.weight` (tied to `tok_embeddings.weight`) beside the rest.
pub fn upstream_state(varmap: &VarMap) -> Result<HashMap<String, Tensor>> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, var) in varmap.data().lock().expect("lock").iter() {
        tensors.insert(name.clone(), var.as_tensor().to_device(&Device::Cpu)?);
    }
    if let Some(emb) = tensors.get("tok_embeddings.weight").cloned() {
        tensors.insert("output.weight".into(), emb);
    }
    Ok(tensors)
}

/// Write `tensors` to `path` as safetensors, atomically (a temporary file renamed into place,
/// removed if writing fails).
pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = crate::util::tmp_path(path);
    let written = candle_core::safetensors::save(tensors, &tmp)
        .map_err(|e| bad_file(path, e.to_string()))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| bad_file(path, e.to_string())));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
