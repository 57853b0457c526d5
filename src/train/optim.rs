//! AdamW with state we can checkpoint (candle-nn's keeps its moments private), upstream's cosine
//! schedule, and global-norm gradient clipping.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Tensor, Var};

use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch.optim.Adam's defaults; upstream uses Adam, i.e. no weight decay.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

pub struct AdamW {
    pub params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub t: u64,
    cfg: AdamWConfig,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let m = params
            .iter()
            .map(|(_, p)| p.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            params,
            m,
            v,
            t: 0,
            cfg,
        })
    }

    /// The gradients of `params` in a backward pass; zeros where none reached a parameter.
    pub fn grads(&self, store: &candle_core::backprop::GradStore) -> Result<Vec<Tensor>> {
        Ok(self
            .params
            .iter()
            .map(|(_, p)| {
                store
                    .get(p.as_tensor())
                    .cloned()
                    .map_or_else(|| p.as_tensor().zeros_like(), Ok)
            })
            .collect::<candle_core::Result<_>>()?)
    }

    /// One update with gradients in `params` order.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, ((_, p), g)) in self.params.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let mut theta = p.as_tensor().clone();
            if c.weight_decay != 0.0 {
                theta = (theta * (1.0 - lr * c.weight_decay))?;
            }
            p.set(&(theta - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut t = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            t.insert(
                format!("m.{name}"),
                self.m[i].to_device(&candle_core::Device::Cpu)?,
            );
            t.insert(
                format!("v.{name}"),
                self.v[i].to_device(&candle_core::Device::Cpu)?,
            );
        }
        candle_core::safetensors::save(&t, path)?;
        Ok(())
    }

    pub fn load(&mut self, path: &Path, t: u64) -> Result<()> {
        let device = self
            .params
            .first()
            .map(|(_, p)| p.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let state = candle_core::safetensors::load(path, &device)?;
        for (i, (name, _)) in self.params.iter().enumerate() {
            let get = |k: String| {
                state.get(&k).cloned().ok_or_else(|| {
                    crate::error::bad_file(path, format!("optimizer state lacks {k}"))
                })
            };
            self.m[i] = get(format!("m.{name}"))?;
            self.v[i] = get(format!("v.{name}"))?;
        }
        self.t = t;
        Ok(())
    }
}

/// Upstream's schedule: linear warmup, then cosine from `lr` down to `lr / 10` at `total`.
pub fn lr_at(step: usize, total: usize, lr: f64, warmup: usize) -> f64 {
    let min_lr = lr / 10.0;
    if step < warmup {
        return lr * step as f64 / warmup as f64;
    }
    if step > total {
        return min_lr;
    }
    let ratio = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    min_lr + 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos()) * (lr - min_lr)
}

/// Scale gradients so their global L2 norm is at most `max_norm`; returns the norm before, as a
/// scalar tensor on the gradients' device. Nothing is read back to the host, so the device never
/// waits for the CPU here (a host read per step stalls the launch queue on a GPU).
pub fn clip_global_norm(grads: &mut [Tensor], max_norm: f64) -> Result<Tensor> {
    let sums = grads
        .iter()
        .map(|g| g.to_dtype(candle_core::DType::F32)?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let norm = Tensor::stack(&sums, 0)?.sum_all()?.sqrt()?;
    // min(1, max_norm / (norm + 1e-6)): exactly 1 (gradients untouched) below the limit.
    let scale = (norm.affine(1.0, 1e-6)?.recip()? * max_norm)?.minimum(1f32)?;
    for g in grads.iter_mut() {
        *g = g.broadcast_mul(&scale.to_dtype(g.dtype())?)?;
    }
    Ok(norm)
}
