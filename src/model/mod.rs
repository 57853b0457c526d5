//! MiniMind-V in candle: the MiniMind LLM (upstream v1, exactly), the linear vision projector,
//! the splice of projected image features into placeholder positions, the masked loss, and strict
//! weight loading under upstream's parameter names (safetensors or upstream `*.pth`).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fused;
pub mod llm;
pub mod pth;
pub mod vlm;
pub mod weights;

use serde::{Deserialize, Serialize};

use crate::text::placeholder_ids;

/// Model shape, in upstream's `LMConfig` names; `config.json` beside `model.safetensors`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub vocab_size: usize,
    /// Feed-forward width; `None` derives upstream's `multiple_of * ceil(int(8 dim / 3) / multiple_of)`.
    #[serde(default)]
    pub hidden_dim: Option<usize>,
    pub multiple_of: usize,
    pub norm_eps: f64,
    pub max_seq_len: usize,
    pub rope_theta: f64,
    /// Width of the CLIP features the projector takes (768 for ViT-B/32).
    pub vision_dim: usize,
    /// The 50 placeholder ids one image occupies.
    pub image_ids: Vec<u32>,
}

impl ModelConfig {
    fn preset(dim: usize, n_layers: usize, n_heads: usize, n_kv_heads: usize) -> Self {
        Self {
            dim,
            n_layers,
            n_heads,
            n_kv_heads,
            vocab_size: 6400,
            hidden_dim: None,
            multiple_of: 64,
            norm_eps: 1e-5,
            max_seq_len: 512,
            rope_theta: 1e4,
            vision_dim: 768,
            image_ids: placeholder_ids(),
        }
    }

    /// Upstream's default: 27M parameters.
    pub fn minimind_512() -> Self {
        Self::preset(512, 8, 16, 8)
    }

    /// Upstream's larger model: 109M parameters.
    pub fn minimind_768() -> Self {
        Self::preset(768, 16, 16, 8)
    }

    /// The offline demo's model: dim 64, 4 layers, 4 heads over 2 KV heads, reading the
    /// random-initialised demo tower's 192-wide features (`demo_eval::demo_model` sets the width
    /// of a real CLIP's instead when there is one).
    pub fn demo() -> Self {
        Self {
            max_seq_len: 512,
            vision_dim: 192,
            ..Self::preset(64, 4, 4, 2)
        }
    }

    /// For tests: the shape of `../shared/reference/tiny_llm`.
    pub fn tiny() -> Self {
        Self {
            max_seq_len: 128,
            ..Self::preset(64, 2, 4, 2)
        }
    }

    /// Parameters of a model of this shape (the tied output head counted once).
    pub fn parameter_count(&self) -> u64 {
        let (d, h, v) = (
            self.dim as u64,
            self.ffn_hidden() as u64,
            self.vocab_size as u64,
        );
        let kv = (self.n_kv_heads * self.head_dim()) as u64;
        let layer = 2 * d * d + 2 * d * kv + 3 * d * h + 2 * d;
        v * d + self.n_layers as u64 * layer + d + self.vision_dim as u64 * d + d
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    pub fn ffn_hidden(&self) -> usize {
        self.hidden_dim.unwrap_or_else(|| {
            let h = 2 * (4 * self.dim) / 3;
            self.multiple_of * h.div_ceil(self.multiple_of)
        })
    }

    /// Refuse shapes that cannot be built, before anything is allocated: a `config.json` from
    /// elsewhere can ask for 10⁹ layers or a zero-width head.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |m: String| Err(crate::Error::Config(format!("model: {m}")));
        let bounds: [(&str, usize, usize); 8] = [
            ("dim", self.dim, 1 << 14),
            ("n_layers", self.n_layers, 1 << 10),
            ("n_heads", self.n_heads, 1 << 10),
            ("n_kv_heads", self.n_kv_heads, 1 << 10),
            ("vocab_size", self.vocab_size, 1 << 20),
            ("multiple_of", self.multiple_of, 1 << 16),
            ("max_seq_len", self.max_seq_len, 1 << 16),
            ("vision_dim", self.vision_dim, 1 << 14),
        ];
        for (name, v, max) in bounds {
            if v == 0 || v > max {
                return bad(format!("{name} = {v}: it must lie in 1..={max}"));
            }
        }
        if self.hidden_dim.is_some_and(|h| h == 0 || h > 1 << 17) {
            return bad(format!(
                "hidden_dim = {:?}: it must lie in 1..=131072",
                self.hidden_dim
            ));
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.norm_eps) || !positive(self.rope_theta) {
            return bad(format!(
                "norm_eps = {} and rope_theta = {} must be positive numbers",
                self.norm_eps, self.rope_theta
            ));
        }
        let params = self.parameter_count();
        if params > 4_000_000_000 {
            return bad(format!(
                "{params} parameters (over 4 billion): not a MiniMind shape"
            ));
        }
        if !self.dim.is_multiple_of(self.n_heads) || !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "dim {} must split into {} heads of even size",
                self.dim, self.n_heads
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "n_heads {} must be a multiple of n_kv_heads {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.image_ids.is_empty() || self.image_ids.len() > self.max_seq_len {
            return bad(format!(
                "image_ids holds {} ids: an image needs 1..=max_seq_len placeholder tokens",
                self.image_ids.len()
            ));
        }
        Ok(())
    }
}
