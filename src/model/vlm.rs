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
        // The model runs its last layer from the first position with a loss on (its output
        // elsewhere would be thrown away): (B, T − from, C).
        let t = ids.dim(1)?;
        let from = keep.iter().map(|&i| i as usize % t).min().unwrap_or(0);
        let h = self
            .llm
            .hidden_from(&self.embed(ids, images, 0)?, None, from)?;
        let (b, tq, c) = h.dims3()?;
        let rows: Vec<u32> = keep
            .iter()
            .map(|&i| ((i as usize / t) * tq + i as usize % t - from) as u32)
            .collect();
        let h = super::fused::select_rows(&h.reshape((b * tq, c))?, &rows)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    /// The training loss runs the last layer only from the first position with a loss on; its
    /// value and every parameter's gradient must be the full forward's (logits everywhere, then
    /// upstream's masked mean). Rows whose losses start at different positions, one of them only
    /// at the last position, one image each.
    #[test]
    fn the_loss_from_the_first_loss_position_equals_the_full_forward() {
        let cfg = ModelConfig {
            vision_dim: 16,
            image_ids: vec![5, 6, 7],
            ..ModelConfig::tiny()
        };
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let m = Vlm::new(vb, &cfg).unwrap();
        let (b, t) = (3, 12);
        let mut ids: Vec<u32> = (0..(b * t) as u32).map(|i| 10 + i * 7 % 300).collect();
        for r in 0..b {
            ids[r * t + 1..r * t + 4].copy_from_slice(&[5, 6, 7]);
        }
        let targets: Vec<u32> = ids.iter().map(|i| (i * 3 + 1) % 400).collect();
        let ids = Tensor::from_vec(ids, (b, t), &dev).unwrap();
        let targets = Tensor::from_vec(targets, (b, t), &dev).unwrap();
        let mut mask = vec![0f32; b * t];
        for (r, first) in [(0, 6), (1, 9), (2, 11)] {
            mask[r * t + first..(r + 1) * t]
                .iter_mut()
                .for_each(|m| *m = 1.0);
        }
        let mask = Tensor::from_vec(mask, (b, t), &dev).unwrap();
        let feats = Tensor::randn(0f32, 1f32, (b, 3, 16), &dev).unwrap();
        let imgs = Images {
            feats,
            slots: (0..b).map(|r| (r, 1)).collect(),
        };
        let vars = varmap.all_vars();
        let run = |fast: bool| -> (f32, Vec<Vec<f32>>) {
            let loss = if fast {
                m.loss(&ids, Some(&imgs), &targets, &mask).unwrap()
            } else {
                let logits = m.forward(&ids, Some(&imgs)).unwrap();
                masked_loss_full(&logits, &targets, &mask).unwrap()
            };
            let grads = loss.backward().unwrap();
            let g = vars
                .iter()
                .map(|v| {
                    let g = grads
                        .get(v.as_tensor())
                        .expect("every parameter has a gradient");
                    g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                })
                .collect();
            (loss.to_scalar::<f32>().unwrap(), g)
        };
        let ((fast, gf), (full, gw)) = (run(true), run(false));
        assert!(
            fast.is_finite() && (fast - full).abs() <= 1e-5,
            "{fast} vs {full}"
        );
        // f32 sums in another order (log-softmax over the vocabulary, weight gradients summed
        // over fewer rows): within 1e-5 of the largest gradient.
        for (i, (a, w)) in gf.iter().zip(&gw).enumerate() {
            crate::compare::Diff::of(a, w)
                .check_rel(1e-5, &format!("gradient of parameter {i}"))
                .unwrap();
        }
    }
}
