//! The MiniMind LLM, upstream v1: tied embeddings; per layer RMSNorm → GQA attention with
//! interleaved-pair RoPE (upstream's complex form), causal, no biases; RMSNorm → SwiGLU.
//! Every op here has a backward pass: candle-nn's fused kernels only through `fused`, which
//! gives them one (candle-nn's own drop gradients silently).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{linear_no_bias, Embedding, Linear, VarBuilder};

use super::ModelConfig;

/// Upstream's RMSNorm: `weight * x / sqrt(mean(x²) + eps)`, statistics in f32 (fused kernel).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::fused::rms_norm(x, &self.weight, self.eps)
    }
}

/// cos/sin tables of RoPE: (max_seq_len, head_dim / 2).
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// For the backward pass (the inverse rotation).
    neg_sin: Tensor,
}

impl Rope {
    pub fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let half = cfg.head_dim() / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim() as f64) as f32)
            .collect();
        let inv = Tensor::from_vec(inv, (1, half), device)?;
        let t = Tensor::arange(0u32, cfg.max_seq_len as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((cfg.max_seq_len, 1))?;
        let freqs = t.broadcast_mul(&inv)?;
        let sin = freqs.sin()?.to_dtype(dtype)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            neg_sin: sin.neg()?,
            sin,
        })
    }

    /// Rotate (B, H, T, hd) whose first position is `offset`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        let neg_sin = self.neg_sin.narrow(0, offset, t)?;
        super::fused::rope_i(x, &cos, &sin, &neg_sin)
    }
}

/// Keys and values of the positions seen so far, per layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
        }
    }

    /// Tokens already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone)]
struct Attention {
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let hd = cfg.head_dim();
        Ok(Self {
            wq: linear_no_bias(cfg.dim, cfg.n_heads * hd, vb.pp("wq"))?,
            wk: linear_no_bias(cfg.dim, cfg.n_kv_heads * hd, vb.pp("wk"))?,
            wv: linear_no_bias(cfg.dim, cfg.n_kv_heads * hd, vb.pp("wv"))?,
            wo: linear_no_bias(cfg.n_heads * hd, cfg.dim, vb.pp("wo"))?,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: hd,
        })
    }

    /// (B, KV, T, hd) → (B, H, T, hd): head h reads KV head h / n_rep, as upstream's repeat_kv.
    fn repeat_kv(&self, x: Tensor) -> Result<Tensor> {
        let n_rep = self.n_heads / self.n_kv_heads;
        if n_rep == 1 {
            return Ok(x);
        }
        let (b, kv, t, hd) = x.dims4()?;
        x.unsqueeze(2)?
            .expand((b, kv, n_rep, t, hd))?
            .reshape((b, kv * n_rep, t, hd))
    }

    /// Causal attention of (B, H, T, hd) queries over (B, KV, S, hd) keys and values →
    /// (B, H, T, hd). `grouped`: each KV head's n_rep query heads as one (n_rep·T)-row matrix
    /// against that head's keys, so k and v are never copied n_rep times and the products are
    /// fewer and larger (the model's form on every device); otherwise upstream's repeat_kv, which
    /// a test holds it equal to.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        grouped: bool,
    ) -> Result<Tensor> {
        let (b, h, t, hd) = q.dims4()?;
        let sqrt_hd = (self.head_dim as f64).sqrt();
        let (q, k, v) = if grouped {
            let kv = self.n_kv_heads;
            (q.reshape((b, kv, (h / kv) * t, hd))?, k.clone(), v.clone())
        } else {
            let k = self.repeat_kv(k.clone())?.contiguous()?;
            (q.clone(), k, self.repeat_kv(v.clone())?.contiguous()?)
        };
        let scores = q.matmul(&k.t()?)?; // (B, G, R·T, S)
        let probs = super::fused::attention_probs(&scores, t, sqrt_hd, mask, v.dtype())?;
        probs.matmul(&v)?.reshape((b, h, t, hd))
    }

    /// Attention of the queries at positions `from..T` of `x` (B, T, C) over every key →
    /// (B, T − from, C); `mask` is the causal mask of those queries.
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        from: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?; // (B, T, C)
        let tq = t - from;
        let offset = cache
            .as_ref()
            .and_then(|c| c.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0));
        let q = x
            .narrow(1, from, tq)?
            .apply(&self.wq)?
            .reshape((b, tq, self.n_heads, self.head_dim))?
            .transpose(1, 2)?;
        let k = x
            .apply(&self.wk)?
            .reshape((b, t, self.n_kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        let v = x
            .apply(&self.wv)?
            .reshape((b, t, self.n_kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        let q = rope.apply(&q.contiguous()?, offset + from)?;
        let mut k = rope.apply(&k.contiguous()?, offset)?;
        let mut v = v.contiguous()?;
        if let Some(cache) = cache {
            if let Some((pk, pv)) = cache.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *cache = Some((k.clone(), v.clone()));
        }
        let out = self.attend(&q, &k, &v, mask, true)?; // (B, H, T, hd)
        out.transpose(1, 2)?
            .reshape((b, tq, self.n_heads * self.head_dim))?
            .apply(&self.wo)
    }
}

/// (T, S) additive mask: query i (at absolute position S - T + i) sees keys ≤ its position.
pub fn causal_mask(t: usize, s: usize, device: &Device) -> Result<Tensor> {
    let off = s - t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..s).map(move |j| if j > i + off { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, s), device)
}

#[derive(Debug, Clone)]
struct FeedForward {
    w1: Linear,
    w2: Linear,
    w3: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let h = cfg.ffn_hidden();
        Ok(Self {
            w1: linear_no_bias(cfg.dim, h, vb.pp("w1"))?,
            w2: linear_no_bias(h, cfg.dim, vb.pp("w2"))?,
            w3: linear_no_bias(cfg.dim, h, vb.pp("w3"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::fused::swiglu(&x.apply(&self.w1)?, &x.apply(&self.w3)?)?.apply(&self.w2)
    }
}

#[derive(Debug, Clone)]
struct Block {
    attention_norm: RmsNorm,
    attention: Attention,
    ffn_norm: RmsNorm,
    feed_forward: FeedForward,
}

impl Block {
    fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        Ok(Self {
            attention_norm: RmsNorm::new(vb.pp("attention_norm"), cfg.dim, cfg.norm_eps)?,
            attention: Attention::new(vb.pp("attention"), cfg)?,
            ffn_norm: RmsNorm::new(vb.pp("ffn_norm"), cfg.dim, cfg.norm_eps)?,
            feed_forward: FeedForward::new(vb.pp("feed_forward"), cfg)?,
        })
    }

    /// The block's output at positions `from..T` of `x` (B, T, C): every position's keys and
    /// values, the rest only for those positions (`mask`: the causal mask of their queries).
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        from: usize,
    ) -> Result<Tensor> {
        let a = self
            .attention
            .forward(&x.apply(&self.attention_norm)?, rope, mask, cache, from)?;
        let h = (x.narrow(1, from, a.dim(1)?)? + a)?;
        &h + h.apply(&self.ffn_norm)?.apply(&self.feed_forward)?
    }
}

#[derive(Debug, Clone)]
pub struct MiniMind {
    pub tok_embeddings: Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    /// Tied: the embedding matrix.
    output: Linear,
    rope: Rope,
    pub cfg: ModelConfig,
}

impl MiniMind {
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let emb = vb.get_with_hints(
            (cfg.vocab_size, cfg.dim),
            "tok_embeddings.weight",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let layers = (0..cfg.n_layers)
            .map(|i| Block::new(vb.pp(format!("layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            tok_embeddings: Embedding::new(emb.clone(), cfg.dim),
            layers,
            norm: RmsNorm::new(vb.pp("norm"), cfg.dim, cfg.norm_eps)?,
            output: Linear::new(emb, None),
            rope: Rope::new(cfg, vb.dtype(), vb.device())?,
            cfg: cfg.clone(),
        })
    }

    /// Token embeddings (B, T) → (B, T, C).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        super::fused::embedding(self.tok_embeddings.embeddings(), ids)
    }

    /// Hidden states after the final norm: (B, T, C) → (B, T, C). With a cache, `h` holds only
    /// the new positions and the cache grows by them.
    pub fn hidden(&self, h: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.hidden_from(h, cache, 0)
    }

    /// [`MiniMind::hidden`] at positions `from..T` only: (B, T, C) → (B, T − from, C). Every
    /// layer but the last runs on all positions (later positions read their keys and values);
    /// the last computes keys and values everywhere and the rest — queries, attention output,
    /// feed-forward, final norm — only where asked. Training asks from the first position that
    /// has a loss: the values there are the full forward's, for a fraction of the last layer.
    pub fn hidden_from(
        &self,
        h: &Tensor,
        mut cache: Option<&mut KvCache>,
        from: usize,
    ) -> Result<Tensor> {
        let t = h.dim(1)?;
        if from >= t {
            candle_core::bail!("hidden_from: position {from} of a {t}-token sequence");
        }
        let s = t + cache.as_ref().map_or(0, |c| c.len()); // keys: cached + new
        if s > self.cfg.max_seq_len {
            candle_core::bail!(
                "a sequence of {s} tokens is longer than the model's max_seq_len {} (RoPE has no positions beyond it)",
                self.cfg.max_seq_len
            );
        }
        // One mask for every layer (a single query sees every key: none needed).
        let mask = (t > 1).then(|| causal_mask(t, s, h.device())).transpose()?;
        let mut h = h.clone();
        let last = self.layers.len() - 1; // ModelConfig::validate: at least one layer
        for (i, layer) in self.layers.iter().enumerate() {
            let c = cache.as_mut().map(|c| &mut c.layers[i]);
            if i == last {
                // The last layer's queries: positions from..T, the mask's rows for them.
                let mask = mask
                    .as_ref()
                    .map(|m| m.narrow(0, from, t - from))
                    .transpose()?;
                h = layer.forward(&h, &self.rope, mask.as_ref(), c, from)?;
            } else {
                h = layer.forward(&h, &self.rope, mask.as_ref(), c, 0)?;
            }
        }
        h.apply(&self.norm)
    }

    /// (…, C) → (…, V).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        hidden.apply(&self.output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use candle_nn::VarMap;

    #[test]
    fn grouped_attention_equals_repeat_kv_in_value_and_gradients() {
        // The CUDA form (query heads grouped per KV head) against the CPU's (repeat_kv), with
        // keys before the first query as under a KV cache: 3 queries over 7 keys.
        let cfg = ModelConfig::tiny(); // 4 heads over 2 KV heads
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let att = Attention::new(vb, &cfg).unwrap();
        let hd = cfg.head_dim();
        let var = |shape: (usize, usize, usize, usize)| {
            Var::from_tensor(&Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()).unwrap()
        };
        let (q, k, v) = (var((2, 4, 3, hd)), var((2, 2, 7, hd)), var((2, 2, 7, hd)));
        let mask = causal_mask(3, 7, &Device::Cpu).unwrap();
        let run = |grouped: bool| -> Vec<Vec<f32>> {
            let xs = [q.as_tensor(), k.as_tensor(), v.as_tensor()];
            super::super::fused::weighted_value_and_grads(&xs, |x| {
                att.attend(x[0], x[1], x[2], Some(&mask), grouped)
            })
            .unwrap()
        };
        let (a, b) = (run(true), run(false));
        for (name, (x, y)) in ["out", "dq", "dk", "dv"].iter().zip(a.iter().zip(&b)) {
            crate::compare::Diff::of(x, y)
                .check_abs(1e-5, &format!("{name}: grouped vs repeated"))
                .unwrap();
        }
    }
}
