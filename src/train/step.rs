//! The training step — the only one. The trainer's loop, `bench train`, `bench breakdown` and
//! `bench parity` all call [`Trainer::step`]: forward and backward of each micro-batch (its loss
//! divided by their number), gradients summed, averaged over data-parallel ranks together with
//! the step's numbers, clipped to a global norm, then AdamW. Nothing is read back to the host, so
//! a GPU never waits for the CPU between steps.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use super::data::Batch;
use super::dist::Dist;
use super::optim::{clip_global_norm, AdamW, AdamWConfig};
use crate::config::{Precision, Trainable};
use crate::error::Result;
use crate::model::{vlm::Vlm, weights};

/// Set the process-wide matmul mode `precision` asks for (TF32 on or off; CUDA only).
pub fn apply_matmul_mode(precision: Precision) {
    candle_core::cuda::set_gemm_reduced_precision_f32(precision == Precision::Tf32);
}

/// The model a step computes with: the f32 master itself, or (bf16) a copy of the master
/// weights cast to bf16 through differentiable casts, so gradients land on the f32 variables.
pub fn compute_model(
    master: &Vlm,
    varmap: &VarMap,
    precision: Precision,
    device: &Device,
) -> Result<Option<Vlm>> {
    if precision != Precision::Bf16 {
        return Ok(None);
    }
    let cast: std::collections::HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("lock")
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(DType::BF16)?)))
        .collect::<Result<_>>()?;
    let vb = candle_nn::VarBuilder::from_tensors(cast, DType::BF16, device);
    Ok(Some(Vlm::new(vb, &master.cfg)?))
}

/// The parameters that learn, sorted by name: all of them, or the projector's only.
pub fn trainable_params(varmap: &VarMap, trainable: Trainable) -> Vec<(String, Var)> {
    let mut params: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .expect("lock")
        .iter()
        .filter(|(n, _)| trainable == Trainable::All || n.starts_with(weights::PROJECTOR_PREFIX))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    params
}

/// A step's phases in the order [`Trainer::step`] passes through them; it tells its observer
/// as each one ends (`bench breakdown` times them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// bf16: the master weights cast for the step.
    Casts,
    /// A micro-batch read and collated onto the device.
    Collate,
    Forward,
    Backward,
    /// Summed over micro-batches, averaged over ranks, clipped.
    Gradients,
    Optimizer,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Collate,
        Phase::Casts,
        Phase::Forward,
        Phase::Backward,
        Phase::Gradients,
        Phase::Optimizer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Casts => "bf16 weight casts",
            Phase::Collate => "collate + upload",
            Phase::Forward => "forward (loss)",
            Phase::Backward => "backward",
            Phase::Gradients => "gradients + clip",
            Phase::Optimizer => "AdamW step",
        }
    }
}

/// What a step leaves on the device.
pub struct StepOut {
    /// (mean loss, tokens, samples, gradient norm before clipping, then the caller's `extras`),
    /// all but the norm averaged over ranks.
    pub stats: Tensor,
    /// Real tokens and samples in this rank's micro-batches.
    pub tokens: usize,
    pub samples: usize,
}

/// A model being trained: the f32 master, its variables, the optimizer over the trainable ones,
/// and how a step computes.
pub struct Trainer {
    pub model: Vlm,
    pub varmap: VarMap,
    pub opt: AdamW,
    pub precision: Precision,
    pub grad_clip: f64,
}

impl Trainer {
    pub fn new(
        model: Vlm,
        varmap: VarMap,
        trainable: Trainable,
        adam: AdamWConfig,
        precision: Precision,
        grad_clip: f64,
    ) -> Result<Self> {
        let opt = AdamW::new(trainable_params(&varmap, trainable), adam)?;
        Ok(Self {
            model,
            varmap,
            opt,
            precision,
            grad_clip,
        })
    }

    /// One optimizer step at learning rate `lr` over `micro` batches taken from `next_batch`,
    /// gradients averaged over `dist`'s ranks. `observe` hears of each phase as it ends.
    /// `extras` are averaged over the ranks with the step's numbers (how ranks agree on a
    /// decision without a reduction of its own).
    ///
    /// On the CPU the step runs on a thread of rayon's pool (`util::on_pool`): with one thread
    /// per rank, handing each operation to the pool took a seventh of the step's time. Ranks
    /// that are threads of one process (tests) keep their own threads: parked on a pool thread
    /// at their barrier, they could leave the others none.
    pub fn step(
        &mut self,
        micro: usize,
        next_batch: impl FnMut() -> Result<Batch> + Send,
        lr: f64,
        dist: &Dist,
        extras: &[f32],
        observe: impl FnMut(Phase) -> Result<()> + Send,
    ) -> Result<StepOut> {
        let device = crate::model::vlm::device_of(&self.model);
        if device.is_cpu() && !dist.threads_of_one_process() {
            crate::util::on_pool(|| self.step_here(micro, next_batch, lr, dist, extras, observe))
        } else {
            self.step_here(micro, next_batch, lr, dist, extras, observe)
        }
    }

    fn step_here(
        &mut self,
        micro: usize,
        mut next_batch: impl FnMut() -> Result<Batch>,
        lr: f64,
        dist: &Dist,
        extras: &[f32],
        mut observe: impl FnMut(Phase) -> Result<()>,
    ) -> Result<StepOut> {
        let device = crate::model::vlm::device_of(&self.model);
        let shadow = compute_model(&self.model, &self.varmap, self.precision, &device)?;
        if shadow.is_some() {
            observe(Phase::Casts)?;
        }
        let compute = shadow.as_ref().unwrap_or(&self.model);
        let mut grads: Option<Vec<Tensor>> = None;
        let mut loss_sum: Option<Tensor> = None;
        let (mut tokens, mut samples) = (0, 0);
        for _ in 0..micro.max(1) {
            let batch = next_batch()?;
            observe(Phase::Collate)?;
            let loss = (batch.loss(compute)? / micro.max(1) as f64)?;
            observe(Phase::Forward)?;
            tokens += batch.tokens;
            samples += batch.ids.len();
            let store = loss.backward()?;
            observe(Phase::Backward)?;
            let l = loss.detach();
            loss_sum = Some(match loss_sum {
                None => l,
                Some(acc) => (acc + l)?,
            });
            let g: Vec<Tensor> = self.opt.grads(&store)?;
            grads = Some(match grads {
                None => g,
                Some(acc) => acc
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        let mut grads = grads.expect("at least one micro-batch");
        // (loss, tokens, samples, extras) of this step, averaged over ranks with the gradients.
        let mut counts = vec![tokens as f32, samples as f32];
        counts.extend_from_slice(extras);
        let mut totals = Tensor::cat(
            &[
                loss_sum.expect("at least one micro-batch").reshape(1)?,
                Tensor::new(counts.as_slice(), &device)?,
            ],
            0,
        )?;
        if dist.world > 1 {
            grads.push(totals);
            dist.mean(&mut grads)?;
            totals = grads.pop().expect("pushed above");
        }
        let grad_norm = clip_global_norm(&mut grads, self.grad_clip)?;
        observe(Phase::Gradients)?;
        // A non-finite loss is caught when the caller reads the step back.
        self.opt.step(&grads, lr)?;
        observe(Phase::Optimizer)?;
        let n = totals.dim(0)?;
        let stats = Tensor::cat(
            &[
                totals.narrow(0, 0, 3)?,
                grad_norm.reshape(1)?,
                totals.narrow(0, 3, n - 3)?,
            ],
            0,
        )?;
        Ok(StepOut {
            stats,
            tokens,
            samples,
        })
    }
}
