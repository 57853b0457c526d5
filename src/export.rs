//! A trained model back in upstream's formats: a PyTorch `.pth` (what upstream's scripts load
//! with `torch.load` + `load_state_dict(strict=True)`) or a safetensors directory with upstream's
//! `LMConfig` as `config.json`. Keys are upstream's state-dict names, `output.weight` included
//! (tied to `tok_embeddings.weight` there, stored once per name here).
//!
//! The `.pth` is written the way `torch.save` writes one (a stored zip: `archive/data.pkl`, one
//! `archive/data/N` entry per tensor aligned to 64 bytes, `byteorder`, `version`), with a
//! protocol-2 pickle that names only `torch._utils._rebuild_tensor_v2`, a storage type and
//! `collections.OrderedDict` — globals PyTorch's `weights_only` loader accepts.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, IoContext, Result};
use crate::model::ModelConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A PyTorch checkpoint for `torch.load`.
    Pth,
    /// A directory: `model.safetensors` and `config.json`.
    Safetensors,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    F32,
    F16,
}

impl Precision {
    fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
        }
    }
}

/// The weights of checkpoint `ckpt` (checked strictly against its config) under upstream's names,
/// sorted by name, in `precision`.
pub fn state_dict(
    ckpt: &Path,
    precision: Precision,
) -> Result<(ModelConfig, Vec<(String, Tensor)>)> {
    let ckpt = Checkpoint::open(ckpt)?;
    let cfg = ckpt.model_config()?;
    let (_, varmap) = ckpt.load_model(&Device::Cpu)?;
    let mut state = Vec::new();
    for (name, t) in crate::model::weights::upstream_state(&varmap)? {
        state.push((name, t.to_dtype(precision.dtype())?));
    }
    state.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((cfg, state))
}

/// Write checkpoint `ckpt` to `out` in `format`; returns what was written.
pub fn export(ckpt: &Path, format: Format, precision: Precision, out: &Path) -> Result<String> {
    let (cfg, state) = state_dict(ckpt, precision)?;
    match format {
        Format::Pth => {
            crate::util::write_atomic(out, |f| write_pth(f, &state).at(out))?;
            Ok(format!(
                "{}: {} tensors ({precision:?}), upstream's names; load with torch.load + load_state_dict(strict=True)",
                out.display(),
                state.len()
            ))
        }
        Format::Safetensors => {
            std::fs::create_dir_all(out).at(out)?;
            let tensors = state.iter().cloned().collect();
            crate::model::weights::save_tensors(&tensors, &out.join("model.safetensors"))?;
            crate::util::write_bytes_atomic(
                &out.join("config.json"),
                &serde_json::to_vec_pretty(&LmConfig::of(&cfg))?,
            )?;
            Ok(format!(
                "{}: model.safetensors ({} tensors, {precision:?}) and config.json (upstream's LMConfig fields)",
                out.display(),
                state.len()
            ))
        }
    }
}

/// Upstream v1's `LMConfig` fields (what `LMConfig(**json.load(f))` takes), plus the two this
/// model needs that v1 fixes in code: `rope_theta` and `vision_dim` (extra keys `LMConfig`
/// keeps as attributes).
#[derive(Serialize)]
struct LmConfig {
    model_type: &'static str,
    dim: usize,
    n_layers: usize,
    n_heads: usize,
    n_kv_heads: usize,
    vocab_size: usize,
    hidden_dim: Option<usize>,
    multiple_of: usize,
    norm_eps: f64,
    max_seq_len: usize,
    dropout: f64,
    flash_attn: bool,
    image_special_token: String,
    image_ids: Vec<u32>,
    use_moe: bool,
    rope_theta: f64,
    vision_dim: usize,
}

impl LmConfig {
    fn of(cfg: &ModelConfig) -> Self {
        LmConfig {
            model_type: "minimind",
            dim: cfg.dim,
            n_layers: cfg.n_layers,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            vocab_size: cfg.vocab_size,
            hidden_dim: cfg.hidden_dim,
            multiple_of: cfg.multiple_of,
            norm_eps: cfg.norm_eps,
            max_seq_len: cfg.max_seq_len,
            dropout: 0.0,
            flash_attn: true,
            image_special_token: crate::text::placeholder_text(),
            image_ids: cfg.image_ids.clone(),
            use_moe: false,
            rope_theta: cfg.rope_theta,
            vision_dim: cfg.vision_dim,
        }
    }
}

/// The zip `torch.save` writes for a dict of tensors.
fn write_pth(file: &mut std::fs::File, state: &[(String, Tensor)]) -> std::io::Result<()> {
    use zip::write::SimpleFileOptions;
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut zip = zip::ZipWriter::new(file);
    let io = |e: zip::result::ZipError| std::io::Error::other(e.to_string());
    zip.start_file("archive/data.pkl", stored).map_err(io)?;
    zip.write_all(&pickle(state).map_err(std::io::Error::other)?)?;
    zip.start_file("archive/byteorder", stored).map_err(io)?;
    zip.write_all(b"little")?;
    for (i, (_, t)) in state.iter().enumerate() {
        let bytes = tensor_bytes(t).map_err(|e| std::io::Error::other(e.to_string()))?;
        // Large entries need zip64 headers; torch's reader takes both.
        let options = stored
            .with_alignment(64)
            .large_file(bytes.len() as u64 >= u32::MAX as u64);
        zip.start_file(format!("archive/data/{i}"), options)
            .map_err(io)?;
        zip.write_all(&bytes)?;
    }
    zip.start_file("archive/version", stored).map_err(io)?;
    zip.write_all(b"3\n")?;
    zip.finish().map_err(io)?;
    Ok(())
}

/// A tensor's values, little-endian, in row-major order.
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => return Err(Error::Config(format!("cannot export {other:?} tensors"))),
    })
}

/// The pickle of `{name: tensor}`: protocol 2, each tensor
/// `_rebuild_tensor_v2(persistent storage, 0, shape, stride, False, OrderedDict())`, storage `i`
/// being zip entry `data/i`.
fn pickle(state: &[(String, Tensor)]) -> std::result::Result<Vec<u8>, String> {
    let mut p = Pickler(vec![0x80, 2]); // PROTO 2
    p.0.push(b'}'); // EMPTY_DICT
    p.0.push(b'('); // MARK
    for (i, (name, t)) in state.iter().enumerate() {
        let storage = match t.dtype() {
            DType::F32 => "FloatStorage",
            DType::F16 => "HalfStorage",
            other => return Err(format!("cannot export {other:?} tensors")),
        };
        p.unicode(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.0.push(b'('); // MARK: the arguments
        p.0.push(b'('); // MARK: the persistent id
        p.unicode("storage");
        p.global("torch", storage);
        p.unicode(&i.to_string());
        p.unicode("cpu");
        p.int(t.elem_count())?;
        p.0.extend([b't', b'Q']); // TUPLE, BINPERSID
        p.int(0)?; // storage offset
        p.tuple(t.dims())?;
        // Row-major, as `tensor_bytes` writes the values.
        p.tuple(&row_major_strides(t.dims()))?;
        p.0.push(0x89); // NEWFALSE: requires_grad
        p.global("collections", "OrderedDict");
        p.0.extend([b')', b'R']); // EMPTY_TUPLE, REDUCE: backward hooks
        p.0.extend([b't', b'R']); // TUPLE, REDUCE: the tensor
    }
    p.0.extend([b'u', b'.']); // SETITEMS, STOP
    Ok(p.0)
}

fn row_major_strides(dims: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    strides
}

struct Pickler(Vec<u8>);

impl Pickler {
    fn unicode(&mut self, s: &str) {
        self.0.push(b'X'); // BINUNICODE
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
    }

    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c'); // GLOBAL
        self.0.extend(format!("{module}\n{name}\n").as_bytes());
    }

    fn int(&mut self, v: usize) -> std::result::Result<(), String> {
        let v = i32::try_from(v).map_err(|_| format!("{v} does not fit a 32-bit int"))?;
        self.0.push(b'J'); // BININT
        self.0.extend(v.to_le_bytes());
        Ok(())
    }

    fn tuple(&mut self, values: &[usize]) -> std::result::Result<(), String> {
        self.0.push(b'('); // MARK
        for &v in values {
            self.int(v)?;
        }
        self.0.push(b't'); // TUPLE
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pickle_names_only_globals_a_weights_only_loader_accepts() {
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let state = vec![
            ("a.weight".to_string(), t.clone()),
            ("b".to_string(), t.to_dtype(DType::F16).unwrap()),
        ];
        let bytes = pickle(&state).unwrap();
        let globals = crate::model::pth::pickle_globals(&bytes).unwrap();
        assert_eq!(
            globals,
            [
                "torch._utils._rebuild_tensor_v2",
                "torch.FloatStorage",
                "collections.OrderedDict",
                "torch._utils._rebuild_tensor_v2",
                "torch.HalfStorage",
                "collections.OrderedDict",
            ]
        );
        assert_eq!(row_major_strides(&[4, 3, 2]), [6, 2, 1]);
        assert_eq!(row_major_strides(&[5]), [1]);
        let mut too_big = Pickler(Vec::new());
        assert!(too_big.int(1 << 31).is_err());
    }
}
