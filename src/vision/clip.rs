//! The frozen CLIP vision tower: HF `clip-vit-base-patch32` (or any CLIP vision config) loaded
//! from disk, or a seeded random-initialised tower when explicitly asked for. Output is the
//! encoder's last hidden state *before* post_layernorm — upstream's image features.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::Activation;
use candle_transformers::models::clip::vision_model::{ClipVisionConfig, ClipVisionTransformer};
use rand::{Rng, SeedableRng};
use serde::Deserialize;

use crate::error::{bad_file, Error, IoContext, Result};
use crate::vision::preprocess::{pixel_values, Normalization};

/// Where the tower's weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ClipSource {
    /// An HF directory: `config.json` + `model.safetensors` or `pytorch_model.bin`.
    Dir(PathBuf),
    /// Seeded random weights of ViT-B/32 shape (`random:<seed>`) or of a small CPU-friendly
    /// shape (`random-small:<seed>`). Never real features: for tests, benchmarks and the demo.
    Random { seed: u64, small: bool },
}

impl std::str::FromStr for ClipSource {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let parse_seed = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| Error::Config(format!("clip {s:?}: the seed must be an integer")))
        };
        if let Some(seed) = s.strip_prefix("random:") {
            Ok(Self::Random {
                seed: parse_seed(seed)?,
                small: false,
            })
        } else if let Some(seed) = s.strip_prefix("random-small:") {
            Ok(Self::Random {
                seed: parse_seed(seed)?,
                small: true,
            })
        } else {
            Ok(Self::Dir(PathBuf::from(s)))
        }
    }
}

impl std::fmt::Display for ClipSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(p) => write!(f, "{}", p.display()),
            Self::Random { seed, small: false } => write!(f, "random:{seed}"),
            Self::Random { seed, small: true } => write!(f, "random-small:{seed}"),
        }
    }
}

/// The subset of HF's `CLIPVisionConfig` we need; a full `CLIPConfig` nests it in `vision_config`.
#[derive(Debug, Clone, Deserialize)]
struct HfVisionConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default = "default_image_size")]
    image_size: usize,
    #[serde(default = "default_patch_size")]
    patch_size: usize,
    #[serde(default = "default_projection_dim")]
    projection_dim: usize,
    #[serde(default = "default_act")]
    hidden_act: String,
}
fn default_image_size() -> usize {
    224
}
fn default_patch_size() -> usize {
    32
}
fn default_projection_dim() -> usize {
    512
}
fn default_act() -> String {
    "quick_gelu".into()
}

impl HfVisionConfig {
    fn to_candle(&self, path: &Path) -> Result<ClipVisionConfig> {
        if self.hidden_act != "quick_gelu" {
            return Err(bad_file(
                path,
                format!(
                    "hidden_act {:?} unsupported (CLIP uses quick_gelu)",
                    self.hidden_act
                ),
            ));
        }
        Ok(ClipVisionConfig {
            embed_dim: self.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            projection_dim: self.projection_dim,
            num_channels: 3,
            image_size: self.image_size,
            patch_size: self.patch_size,
        })
    }
}

/// The shape of a seeded random tower: `random-small` is `TowerShape::small()`, `random` is
/// ViT-B/32. Public so probes can ask what random features of other shapes carry.
#[derive(Debug, Clone, PartialEq)]
pub struct TowerShape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
}

impl TowerShape {
    pub fn small() -> Self {
        Self {
            hidden: 192,
            layers: 4,
            heads: 3,
            image_size: 224,
            patch_size: 32,
        }
    }

    pub fn base_patch32() -> Self {
        Self {
            hidden: 768,
            layers: 12,
            heads: 12,
            image_size: 224,
            patch_size: 32,
        }
    }

    fn hf(&self) -> HfVisionConfig {
        HfVisionConfig {
            hidden_size: self.hidden,
            intermediate_size: 4 * self.hidden,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            image_size: self.image_size,
            patch_size: self.patch_size,
            projection_dim: 64,
            hidden_act: default_act(),
        }
    }
}

/// Where a tower's weights are, kept to build it again on another device or in another dtype.
#[derive(Clone)]
enum Weights {
    /// A safetensors or PyTorch file, opened again for each build (no mapping outlives a build).
    File(PathBuf),
    /// Tensors in memory (a random tower), shared with the model.
    Tensors(HashMap<String, Tensor>),
}

impl Weights {
    fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let (vb, file) = match self {
            Weights::File(p) if p.extension().is_some_and(|e| e == "safetensors") => {
                // SAFETY: mapped read-only while the builder lives: during one build.
                let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[p], dtype, device)? };
                (vb, p)
            }
            Weights::File(p) => (VarBuilder::from_pth(p, dtype, device)?, p),
            Weights::Tensors(t) => return Ok(VarBuilder::from_tensors(t.clone(), dtype, device)),
        };
        // candle silently substitutes a random CLS embedding when the key is absent: refuse.
        if !vb.contains_tensor("vision_model.embeddings.class_embedding") {
            return Err(bad_file(
                file,
                "no vision_model.embeddings.class_embedding: not a CLIP vision checkpoint",
            ));
        }
        Ok(vb)
    }
}

#[derive(Clone)]
pub struct ClipTower {
    model: ClipVisionTransformer,
    weights: Weights,
    hf: HfVisionConfig,
    n_layers: usize,
    pub image_size: usize,
    /// Feature width (768 for ViT-B/32).
    pub hidden: usize,
    /// Tokens per image: patches + CLS (50 for 224/32).
    pub tokens: usize,
    pub norm: Normalization,
    pub source: ClipSource,
    /// The weights' and activations' dtype: F32 (upstream's numbers), or F16 (`with_dtype`).
    pub dtype: DType,
    /// sha256 of the weights file, or `random:<seed>`.
    pub weights_id: String,
    pub device: Device,
}

impl ClipTower {
    pub fn load(source: &ClipSource, device: &Device) -> Result<Self> {
        Self::load_as(source, device, DType::F32)
    }

    /// [`load`](Self::load) with weights and activations in `dtype` (see [`with_dtype`](Self::with_dtype)),
    /// built once.
    pub fn load_as(source: &ClipSource, device: &Device, dtype: DType) -> Result<Self> {
        let (hf, norm, weights, weights_id) = match source {
            ClipSource::Dir(dir) => load_dir(dir)?,
            ClipSource::Random { seed, small } => {
                let shape = if *small {
                    TowerShape::small()
                } else {
                    TowerShape::base_patch32()
                };
                let tower = Self::random(*seed, &shape, device)?;
                return if dtype == DType::F32 {
                    Ok(tower)
                } else {
                    tower.with_dtype(dtype)
                };
            }
        };
        Self::build(hf, norm, weights, dtype, weights_id, source.clone(), device)
    }

    /// A seeded random-initialised tower of any shape. Never real features.
    pub fn random(seed: u64, shape: &TowerShape, device: &Device) -> Result<Self> {
        let hf = shape.hf();
        let weights = Weights::Tensors(random_weights(&hf, seed, device)?);
        let source = ClipSource::Random {
            seed,
            small: *shape == TowerShape::small(),
        };
        let id = if *shape == TowerShape::small() || *shape == TowerShape::base_patch32() {
            source.to_string()
        } else {
            format!("{source}:{shape:?}")
        };
        Self::build(
            hf,
            Normalization::default(),
            weights,
            DType::F32,
            id,
            source,
            device,
        )
    }

    /// The same tower with its weights on `device` (on CUDA: another stream of the same GPU,
    /// from `crate::device::another_stream`). Waits until the weights are there, so the copy can
    /// go to another thread.
    pub fn replica(&self, device: &Device) -> Result<Self> {
        let tower = Self::build(
            self.hf.clone(),
            self.norm,
            self.weights.clone(),
            self.dtype,
            self.weights_id.clone(),
            self.source.clone(),
            device,
        )?;
        device.synchronize()?;
        Ok(tower)
    }

    /// The same tower with weights and activations in `dtype` (F16: half the memory traffic and
    /// f16 tensor cores on a GPU; candle's CLIP still takes the attention scores in f32). The
    /// features then differ from f32 ones: tests/reference_clip.rs bounds by how much.
    pub fn with_dtype(&self, dtype: DType) -> Result<Self> {
        Self::build(
            self.hf.clone(),
            self.norm,
            self.weights.clone(),
            dtype,
            self.weights_id.clone(),
            self.source.clone(),
            &self.device,
        )
    }

    /// `n` more towers to run beside this one, each from its own thread: on CUDA replicas on
    /// streams of their own, on the CPU this tower again (its weights shared).
    pub fn more_streams(&self, n: usize) -> Result<Vec<Self>> {
        (0..n)
            .map(|_| {
                if self.device.is_cuda() {
                    self.replica(&crate::device::another_stream(&self.device)?)
                } else {
                    Ok(self.clone())
                }
            })
            .collect()
    }

    fn build(
        hf: HfVisionConfig,
        norm: Normalization,
        weights: Weights,
        dtype: DType,
        weights_id: String,
        source: ClipSource,
        device: &Device,
    ) -> Result<Self> {
        let cfg = hf.to_candle(Path::new("config.json"))?;
        let vb = weights.var_builder(dtype, device)?;
        let model = ClipVisionTransformer::new(vb.pp("vision_model"), &cfg)?;
        let side = cfg.image_size / cfg.patch_size;
        Ok(Self {
            model,
            dtype,
            weights,
            hf,
            n_layers: cfg.num_hidden_layers,
            image_size: cfg.image_size,
            hidden: cfg.embed_dim,
            tokens: side * side + 1,
            norm,
            source,
            weights_id,
            device: device.clone(),
        })
    }

    pub fn is_random(&self) -> bool {
        matches!(self.source, ClipSource::Random { .. })
    }

    /// (B, 3, H, W) pixel values → (B, tokens, hidden) last encoder hidden state, f32.
    pub fn features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self.hidden_state(pixel_values)?.to_dtype(DType::F32)?)
    }

    /// The same in the tower's own dtype (`dtype`).
    pub(crate) fn hidden_state(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let hidden = self
            .model
            .output_hidden_states(&pixel_values.to_dtype(self.dtype)?)?;
        Ok(hidden[self.n_layers - 1].clone())
    }

    /// Resized HWC u8 images → features, one (tokens, hidden) f32 tensor per image in a batch.
    pub fn features_u8(&self, images: &[&[u8]]) -> Result<Tensor> {
        let px = pixel_values(images, self.image_size, &self.norm, &self.device)?;
        self.features(&px)
    }

    /// Resized HWC u8 images → each image's features as the shards store them: little-endian
    /// f16 bytes. Rounded to f16 on the tower's device (round to nearest even, as
    /// `shards::f32_to_f16_bytes`), so a GPU sends half the bytes back and the host converts none.
    pub fn features_f16_bytes(&self, images: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
        let px = pixel_values(images, self.image_size, &self.norm, &self.device)?;
        let halves = self
            .hidden_state(&px)?
            .to_dtype(DType::F16)?
            .flatten_all()?
            .to_vec1::<half::f16>()?;
        let per = self.tokens * self.hidden;
        Ok(halves
            .chunks_exact(per)
            .map(|c| {
                if cfg!(target_endian = "little") {
                    bytemuck::cast_slice::<half::f16, u8>(c).to_vec()
                } else {
                    c.iter().flat_map(|v| v.to_le_bytes()).collect()
                }
            })
            .collect())
    }
}

type Loaded = (HfVisionConfig, Normalization, Weights, String);

fn load_dir(dir: &Path) -> Result<Loaded> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(Error::ClipMissing {
            path: dir.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(&config_path).at(&config_path)?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad_file(&config_path, e.to_string()))?;
    let vision = value.get("vision_config").cloned().unwrap_or(value);
    let hf: HfVisionConfig =
        serde_json::from_value(vision).map_err(|e| bad_file(&config_path, e.to_string()))?;

    let pre_path = dir.join("preprocessor_config.json");
    let norm = if pre_path.exists() {
        let text = std::fs::read_to_string(&pre_path).at(&pre_path)?;
        serde_json::from_str(&text).map_err(|e| bad_file(&pre_path, e.to_string()))?
    } else {
        Normalization::default()
    };

    let st = dir.join("model.safetensors");
    let bin = dir.join("pytorch_model.bin");
    let weights = if st.exists() {
        st
    } else if bin.exists() {
        bin
    } else {
        return Err(Error::ClipMissing {
            path: dir.to_path_buf(),
        });
    };
    let sha = crate::util::sha256_file(&weights)?;
    Ok((hf, norm, Weights::File(weights), sha))
}

/// Seeded weights of the right names and shapes; scaled like a trained tower so activations stay O(1).
fn random_weights(
    c: &HfVisionConfig,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut w = HashMap::new();
    let d = c.hidden_size;
    let mut put = |name: String,
                   shape: Vec<usize>,
                   scale: f32,
                   rng: &mut rand_chacha::ChaCha8Rng|
     -> Result<()> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
            .collect();
        w.insert(name, Tensor::from_vec(data, shape, device)?);
        Ok(())
    };
    let ones = |shape: usize| Tensor::ones(shape, DType::F32, device);
    let zeros = |shape: usize| Tensor::zeros(shape, DType::F32, device);
    let p = "vision_model";
    let fan = |n: usize| (3.0 / n as f32).sqrt();
    let n_pos = (c.image_size / c.patch_size).pow(2) + 1;
    put(
        format!("{p}.embeddings.class_embedding"),
        vec![d],
        1.0,
        &mut rng,
    )?;
    put(
        format!("{p}.embeddings.patch_embedding.weight"),
        vec![d, 3, c.patch_size, c.patch_size],
        fan(3 * c.patch_size * c.patch_size),
        &mut rng,
    )?;
    put(
        format!("{p}.embeddings.position_embedding.weight"),
        vec![n_pos, d],
        0.5,
        &mut rng,
    )?;
    for i in 0..c.num_hidden_layers {
        let l = format!("{p}.encoder.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            put(
                format!("{l}.self_attn.{proj}.weight"),
                vec![d, d],
                fan(d),
                &mut rng,
            )?;
            put(
                format!("{l}.self_attn.{proj}.bias"),
                vec![d],
                0.02,
                &mut rng,
            )?;
        }
        put(
            format!("{l}.mlp.fc1.weight"),
            vec![c.intermediate_size, d],
            fan(d),
            &mut rng,
        )?;
        put(
            format!("{l}.mlp.fc1.bias"),
            vec![c.intermediate_size],
            0.02,
            &mut rng,
        )?;
        put(
            format!("{l}.mlp.fc2.weight"),
            vec![d, c.intermediate_size],
            fan(c.intermediate_size),
            &mut rng,
        )?;
        put(format!("{l}.mlp.fc2.bias"), vec![d], 0.02, &mut rng)?;
    }
    for i in 0..c.num_hidden_layers {
        let l = format!("{p}.encoder.layers.{i}");
        for ln in ["layer_norm1", "layer_norm2"] {
            w.insert(format!("{l}.{ln}.weight"), ones(d)?);
            w.insert(format!("{l}.{ln}.bias"), zeros(d)?);
        }
    }
    for ln in ["pre_layrnorm", "post_layernorm"] {
        w.insert(format!("{p}.{ln}.weight"), ones(d)?);
        w.insert(format!("{p}.{ln}.bias"), zeros(d)?);
    }
    Ok(w)
}
