//! MiniMind-V: projector (Linear vision_dim → dim, with bias) + MiniMind. Each image's projected
//! features replace one 50-token placeholder window of its row, left to right; the loss is
//! upstream's `sum(CE * mask) / sum(mask)`, with the output head evaluated only where the mask is 1.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{linear, Linear, VarBuilder};

use super::llm::{KvCache, MiniMind};
use super::ModelConfig;

/// Image features of a batch and where they go.
#[derive(Debug, Clone)]
pub struct Images {
    /// (M, tokens, vision_dim): every image of the batch, in slot order.
    pub feats: Tensor,
    /// Per image: (row, first position of its placeholder window).
    pub slots: Vec<(usize, usize)>,
}

/// Pair each row's placeholder windows, left to right, with that row's `counts[r]` images:
/// `(row, window start, image index within the row)`. Images without a window (and windows
/// without an image) are left out.
pub fn pair_windows(
    rows: &[&[u32]],
    counts: &[usize],
    image_ids: &[u32],
) -> Vec<(usize, usize, usize)> {
    let mut pairs = Vec::new();
    for (r, (ids, &n)) in rows.iter().zip(counts).enumerate() {
        let starts = crate::text::find_windows(ids, image_ids);
        pairs.extend(
            starts
                .into_iter()
                .take(n)
                .enumerate()
                .map(|(k, s)| (r, s, k)),
        );
    }
    pairs
}

impl Images {
    /// Pair each row's placeholder windows, left to right, with that row's images.
    /// `feats[r]` is (n_r, tokens, vision_dim); extra images without a window are not used.
    pub fn for_rows(rows: &[&[u32]], feats: &[Tensor], image_ids: &[u32]) -> Result<Option<Self>> {
        let counts = feats
            .iter()
            .map(|f| f.dim(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pairs = pair_windows(rows, &counts, image_ids);
        if pairs.is_empty() {
            return Ok(None);
        }
        let used = pairs
            .iter()
            .map(|&(r, _, k)| feats[r].get(k))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Some(Self {
            feats: Tensor::stack(&used, 0)?,
            slots: pairs.iter().map(|&(r, s, _)| (r, s)).collect(),
        }))
    }
}

#[derive(Debug, Clone)]
pub struct Vlm {
    pub llm: MiniMind,
    pub vision_proj: Linear,
    pub cfg: ModelConfig,
}

impl Vlm {
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        Ok(Self {
            llm: MiniMind::new(vb.clone(), cfg)?,
            vision_proj: linear(cfg.vision_dim, cfg.dim, vb.pp("vision_proj.vision_proj.0"))?,
            cfg: cfg.clone(),
        })
    }

    /// Token embeddings with image features spliced in: (B, T) → (B, T, C). `pos0` is the
    /// absolute position of column 0 (slots are absolute positions).
    pub fn embed(&self, ids: &Tensor, images: Option<&Images>, pos0: usize) -> Result<Tensor> {
        let h = self.llm.embed(ids)?;
        let Some(images) = images else { return Ok(h) };
        let (b, t, c) = h.dims3()?;
        let tokens = images.feats.dim(1)?;
        let proj = self
            .vision_proj
            .forward(&images.feats.to_dtype(h.dtype())?)?; // (M, tokens, C)
        let mut index: Vec<u32> = (0..(b * t) as u32).collect();
        let mut any = false;
        for (k, &(row, start)) in images.slots.iter().enumerate() {
            for j in 0..tokens {
                let Some(p) = (start + j).checked_sub(pos0).filter(|p| *p < t) else {
                    continue;
                };
                index[row * t + p] = (b * t + k * tokens + j) as u32;
                any = true;
            }
        }
        if !any {
            return Ok(h);
        }
        let all = Tensor::cat(
            &[
                h.reshape((b * t, c))?,
                proj.reshape((images.slots.len() * tokens, c))?,
            ],
            0,
        )?;
        super::fused::select_rows(&all, &index)?.reshape((b, t, c))
    }

    /// Full logits (B, T, V).
    pub fn forward(&self, ids: &Tensor, images: Option<&Images>) -> Result<Tensor> {
        let h = self.embed(ids, images, 0)?;
        self.llm.logits(&self.llm.hidden(&h, None)?)
    }

    /// Logits of the last position only, (B, V), extending `cache` by the new tokens.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        images: Option<&Images>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let pos0 = cache.len();
        let h = self.embed(ids, images, pos0)?;
        let hidden = self.llm.hidden(&h, Some(cache))?;
        let t = hidden.dim(1)?;
        self.llm.logits(&hidden.narrow(1, t - 1, 1)?.squeeze(1)?)
    }

    /// Upstream's loss, `sum(CE(logits, targets) * mask) / sum(mask)`, computing the output head
    /// only at positions whose mask is 1 (they are the only ones that contribute).
    /// `targets`, `mask`: (B, T) u32 / any numeric dtype. Reads the mask back to the host: in a
    /// training loop use [`Vlm::loss_at`] with the batch's host-side `keep`.
    pub fn loss(
        &self,
        ids: &Tensor,
        images: Option<&Images>,
        targets: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let mask: Vec<f32> = mask.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let keep: Vec<u32> = (0..mask.len() as u32)
            .filter(|&i| mask[i as usize] != 0.0)
            .collect();
        self.loss_at(ids, images, targets, &keep)
    }

    /// [`Vlm::loss`] with the mask given as the flat (row * T + position) indices where it is 1.
    pub fn loss_at(
        &self,
        ids: &Tensor,
        images: Option<&Images>,
        targets: &Tensor,
        keep: &[u32],
    ) -> Result<Tensor> {
        if keep.is_empty() {
            candle_core::bail!("loss mask is all zero: no answer token in the batch");
        }
        let h = self.llm.hidden(&self.embed(ids, images, 0)?, None)?; // (B, T, C)
        let (b, t, c) = h.dims3()?;
        let h = super::fused::select_rows(&h.reshape((b * t, c))?, keep)?;
        let keep = Tensor::from_slice(keep, keep.len(), h.device())?;
        let tg = targets
            .flatten_all()?
            .to_dtype(DType::U32)?
            .index_select(&keep, 0)?;
        cross_entropy(&self.llm.logits(&h)?, &tg)
    }
}

/// Mean cross-entropy of (N, V) logits against (N,) u32 targets, in f32: one pass each way on
/// the CPU (`model::cpu::CrossEntropy`), else candle's ops.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if super::cpu::takes(&[logits]) && targets.dtype() == DType::U32 {
        return logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, super::cpu::CrossEntropy::default());
    }
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    picked.mean_all()?.neg()
}

/// The full-logits form of the loss, for checking the fast one: (B, T, V), (B, T), (B, T).
pub fn masked_loss_full(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let logp = candle_nn::ops::log_softmax(
        &logits.to_dtype(DType::F32)?.reshape((b * t, v))?,
        D::Minus1,
    )?;
    let tg = targets.flatten_all()?.to_dtype(DType::U32)?;
    let ce = logp.gather(&tg.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let m = mask.flatten_all()?.to_dtype(DType::F32)?;
    (ce * &m)?.sum_all()? / m.sum_all()?.to_scalar::<f32>()? as f64
}

pub fn device_of(v: &Vlm) -> Device {
    v.vision_proj.weight().device().clone()
}
