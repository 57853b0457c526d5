//! AdamW with state we can checkpoint (candle-nn's keeps its moments private), upstream's cosine
//! schedule, and global-norm gradient clipping.

use std::collections::HashMap;
use std::path::Path;

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;

use crate::error::Result;
use crate::model::cpu::{f32s, f32s_mut};

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
        // Separate storage for every moment: the CPU update writes them in place.
        let zeros = || {
            params
                .iter()
                .map(|(_, p)| p.as_tensor().zeros_like())
                .collect::<candle_core::Result<Vec<_>>>()
        };
        let (m, v) = (zeros()?, zeros()?);
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
        for (i, g) in grads.iter().enumerate() {
            let p = &self.params[i].1;
            if p.device().is_cpu() && p.dtype() == DType::F32 && g.dtype() == DType::F32 {
                self.step_cpu(i, g, lr, bc1, bc2)?;
            } else {
                self.step_tensors(i, g, lr, bc1, bc2)?;
            }
        }
        Ok(())
    }

    /// The update of parameter `i` as tensor ops, on its device.
    fn step_tensors(&mut self, i: usize, g: &Tensor, lr: f64, bc1: f64, bc2: f64) -> Result<()> {
        let c = self.cfg;
        let p = &self.params[i].1;
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
        Ok(())
    }

    /// The same update as the tensor path, in place in the parameter's and the moments' own
    /// memory, in one pass across the cores: the tensor path's dozen elementwise ops each
    /// allocate a parameter-sized tensor, and a pass per moment moved ~40 bytes per parameter
    /// where one pass moves 28.
    fn step_cpu(&mut self, i: usize, g: &Tensor, lr: f64, bc1: f64, bc2: f64) -> Result<()> {
        let c = self.cfg;
        let g = g.contiguous()?;
        for t in [self.params[i].1.as_tensor(), &self.m[i], &self.v[i]] {
            if !t.is_contiguous() {
                return Err(candle_core::Error::Msg(format!(
                    "AdamW: {} is not contiguous",
                    self.params[i].0
                ))
                .into());
            }
        }
        let update = Update {
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            lr: lr as f32,
            bc1: bc1 as f32,
            bc2: bc2 as f32,
            eps: c.eps as f32,
            decay: (c.weight_decay != 0.0).then_some((1.0 - lr * c.weight_decay) as f32),
        };
        // One pass over gradient, moments and parameter: each is a tensor whose memory candle
        // hands out inside an in-place op, so the op on `m` opens `v`, and that one the
        // parameter (with the gradient beside it).
        let (theta, v) = (self.params[i].1.as_tensor(), &self.v[i]);
        self.m[i].inplace_op1(&OpenM {
            v,
            theta,
            g: &g,
            update,
        })?;
        Ok(())
    }

    /// The moments by name (`m.<param>`, `v.<param>`): what a checkpoint keeps.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut t = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            t.insert(format!("m.{name}"), self.m[i].clone());
            t.insert(format!("v.{name}"), self.v[i].clone());
        }
        t
    }

    /// Continue from `state` (as [`AdamW::state_tensors`] gave it) after `t` steps. `from` names
    /// where the state came from in errors.
    pub fn load_state(
        &mut self,
        state: &HashMap<String, Tensor>,
        t: u64,
        from: &Path,
    ) -> Result<()> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            let get = |k: String| {
                let t = state.get(&k).ok_or_else(|| {
                    crate::error::bad_file(from, format!("optimizer state lacks {k}"))
                })?;
                // A copy of its own: the CPU update writes the moments in place.
                Ok::<_, crate::Error>(t.to_device(p.device())?.contiguous()?.copy()?)
            };
            self.m[i] = get(format!("m.{name}"))?;
            self.v[i] = get(format!("v.{name}"))?;
        }
        self.t = t;
        Ok(())
    }
}

/// Elements per task of the in-place updates.
const CHUNK: usize = 1 << 15;

/// One AdamW update of a parameter, computed exactly as the tensor path does:
/// `m ← m·β₁ + g·(1−β₁)`, `v ← v·β₂ + g²·(1−β₂)`, `θ ← θ·decay − lr·(m/bc1)/(√(v/bc2)+eps)`.
#[derive(Clone, Copy)]
struct Update {
    beta1: f32,
    beta2: f32,
    lr: f32,
    bc1: f32,
    bc2: f32,
    eps: f32,
    /// `1 − lr·weight_decay` when there is weight decay.
    decay: Option<f32>,
}

impl Update {
    /// One element: gradient `g`, moments `m`, `v` and parameter `t` in place.
    #[inline(always)]
    fn apply(&self, g: f32, m: &mut f32, v: &mut f32, t: &mut f32) {
        *m = *m * self.beta1 + g * (1.0 - self.beta1);
        *v = *v * self.beta2 + g * g * (1.0 - self.beta2);
        let update = (*m / self.bc1) / ((*v / self.bc2).sqrt() + self.eps);
        if let Some(d) = self.decay {
            *t *= d;
        }
        *t -= update * self.lr;
    }
}

/// In place on the first moment: opens the second ([`OpenV`]).
struct OpenM<'a> {
    v: &'a Tensor,
    theta: &'a Tensor,
    g: &'a Tensor,
    update: Update,
}

impl InplaceOp1 for OpenM<'_> {
    fn name(&self) -> &'static str {
        "adamw-m"
    }

    fn cpu_fwd(&self, m: &mut CpuStorage, ml: &Layout) -> candle_core::Result<()> {
        self.v.inplace_op1(&OpenV {
            m: Mutex::new(f32s_mut(m, ml, "m")?),
            theta: self.theta,
            g: self.g,
            update: self.update,
        })
    }
}

/// In place on the second moment, the first in hand: updates the parameter ([`Apply`]).
struct OpenV<'a, 'm> {
    m: Mutex<&'m mut [f32]>,
    theta: &'a Tensor,
    g: &'a Tensor,
    update: Update,
}

impl InplaceOp1 for OpenV<'_, '_> {
    fn name(&self) -> &'static str {
        "adamw-v"
    }

    fn cpu_fwd(&self, v: &mut CpuStorage, vl: &Layout) -> candle_core::Result<()> {
        let mut m = self.m.lock().expect("the first moment's lock");
        self.theta.inplace_op2(
            self.g,
            &Apply {
                moments: Mutex::new((&mut **m, f32s_mut(v, vl, "v")?)),
                update: self.update,
            },
        )
    }
}

/// In place on the parameter, the gradient beside it and both moments in hand.
struct Apply<'m> {
    moments: Mutex<(&'m mut [f32], &'m mut [f32])>,
    update: Update,
}

impl InplaceOp2 for Apply<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let (theta, g) = (f32s_mut(dst, dst_l, "parameter")?, f32s(g, gl, "gradient")?);
        let mut moments = self.moments.lock().expect("the moments' lock");
        let (m, v) = &mut *moments;
        if [g.len(), m.len(), v.len()] != [theta.len(); 3] {
            candle_core::bail!(
                "AdamW: {} parameters, {} gradients, {}/{} moments",
                theta.len(),
                g.len(),
                m.len(),
                v.len()
            );
        }
        let u = self.update;
        theta
            .par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((t, g), (m, v))| apply_chunk(u, t, g, (m, v)));
        Ok(())
    }
}

/// [`Update::apply`] over a chunk, compiled for AVX-512 and AVX2 besides the baseline and picked
/// at run time (as the model's CPU kernels are): the same bits in every width.
#[multiversion::multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn apply_chunk(u: Update, t: &mut [f32], g: &[f32], (m, v): (&mut [f32], &mut [f32])) {
    for (((t, &g), m), v) in t.iter_mut().zip(g).zip(m).zip(v) {
        u.apply(g, m, v, t);
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// NaN (within no tolerance) when either side holds a non-finite value.
    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        crate::compare::Diff::of_tensors(a, b).unwrap().abs()
    }

    /// The fused host update and the tensor update (the one a GPU runs) agree over several steps,
    /// with and without weight decay, with Adam's β₂ and a shorter one.
    #[test]
    fn the_fused_cpu_update_matches_the_tensor_update() {
        let dev = Device::Cpu;
        // The last shape spans several of the update's parallel chunks, the last chunk short.
        for (weight_decay, beta2, shape) in [
            (0.0, 0.999, (7, 5)),
            (0.1, 0.999, (7, 5)),
            (0.0, 0.95, (7, 5)),
            (0.1, 0.95, (300, 230)),
        ] {
            let cfg = AdamWConfig {
                weight_decay,
                beta2,
                ..Default::default()
            };
            let init = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            let mk = || {
                let var = Var::from_tensor(&init.copy().unwrap()).unwrap();
                AdamW::new(vec![("w".into(), var)], cfg).unwrap()
            };
            let (mut fused, mut tensor) = (mk(), mk());
            for step in 0..5u64 {
                let g = Tensor::randn(0f32, 1.0 + step as f32, shape, &dev).unwrap();
                fused.step(std::slice::from_ref(&g), 1e-2).unwrap();
                // The tensor path, the one a GPU takes.
                tensor.t += 1;
                let (bc1, bc2) = (
                    1.0 - cfg.beta1.powi(tensor.t as i32),
                    1.0 - cfg.beta2.powi(tensor.t as i32),
                );
                tensor.step_tensors(0, &g, 1e-2, bc1, bc2).unwrap();
            }
            let a = fused.params[0].1.as_tensor().flatten_all().unwrap();
            let b = tensor.params[0].1.as_tensor().flatten_all().unwrap();
            let diff = max_diff(&a, &b);
            assert!(
                diff < 1e-6,
                "weight_decay {weight_decay}, beta2 {beta2}: max difference {diff}"
            );
            let moved = max_diff(&a, &init.flatten_all().unwrap());
            assert!(moved > 1e-2, "the parameters moved only {moved}");
        }
    }
}
