//! candle-nn's fused softmax, RMSNorm and interleaved RoPE kernels, given a backward pass.
//!
//! candle-nn's fused ops have none (gradients silently stop there), so the model used chains of
//! differentiable elementary ops instead — about ten full passes over the attention scores for a
//! softmax, each a kernel launch; on an H200 these chains, not the matrix products, took most of a
//! training step (docs/gpu-runs). Here the forward runs the fused kernel on a detached input, and
//! its result enters the graph as the output of a small custom op on the real input whose
//! backward is written out: one extra copy instead of the chain.
//!
//! The model calls the operations here, never candle's directly: `rms_norm`, `attention_probs`,
//! `swiglu` and `embedding` pick this crate's own CUDA kernels (`model::cuda`, one pass each way)
//! for tensors on a CUDA device, its CPU kernels (`model::cpu`) for f32 tensors on the CPU, and
//! the portable `*_portable` forms elsewhere (bf16 on the CPU); tests hold each device form to
//! the portable one.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, D,
};

/// Take `value`'s storage out as the op's output (a copy; `value` is dropped with it).
fn hand_over<S>(
    value: &Mutex<Option<Tensor>>,
    pick: impl Fn(&Storage, &Layout) -> Option<Result<S>>,
) -> Result<(S, Shape)> {
    let v = value
        .lock()
        .expect("fused value lock")
        .take()
        .ok_or_else(|| candle_core::Error::Msg("fused op run twice".into()))?;
    let v = v.contiguous()?;
    let (storage, layout) = v.storage_and_layout();
    if layout.start_offset() != 0 {
        candle_core::bail!("fused op: value with an offset");
    }
    let s = pick(&storage, layout)
        .ok_or_else(|| candle_core::Error::Msg("fused op: value on another device".into()))??;
    Ok((s, layout.shape().clone()))
}

fn cpu(s: &Storage, l: &Layout) -> Option<Result<CpuStorage>> {
    match s {
        Storage::Cpu(c) => Some(c.try_clone(l)),
        _ => None,
    }
}

fn cuda(s: &Storage, l: &Layout) -> Option<Result<CudaStorage>> {
    match s {
        Storage::Cuda(c) => Some(c.try_clone(l)),
        _ => None,
    }
}

type Bwd1 = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;
type Bwd2 = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)> + Send + Sync>;

/// Output `value` (computed from the op's argument without a graph); backward `bwd(res, grad)`.
struct Attach1 {
    name: &'static str,
    value: Mutex<Option<Tensor>>,
    bwd: Bwd1,
}

impl CustomOp1 for Attach1 {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        hand_over(&self.value, cpu)
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        hand_over(&self.value, cuda)
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // Detached: a gradient must not carry the forward graph (a parameter's gradient that
        // did would keep every step's graph alive through the optimizer state).
        Ok(Some((self.bwd)(&res.detach(), &grad.detach())?))
    }
}

/// As [`Attach1`] for two arguments; backward `bwd(arg1, arg2, grad)`.
struct Attach2 {
    name: &'static str,
    value: Mutex<Option<Tensor>>,
    bwd: Bwd2,
}

impl CustomOp2 for Attach2 {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        hand_over(&self.value, cpu)
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        hand_over(&self.value, cuda)
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (ga, gb) = (self.bwd)(&a.detach(), &b.detach(), &grad.detach())?;
        Ok((Some(ga), Some(gb)))
    }
}

/// Softmax over the last dimension: `dx = y ⊙ (g − Σ g ⊙ y)`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.detach().contiguous()?)?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op1(Attach1 {
        name: "fused-softmax",
        value: Mutex::new(Some(y)),
        bwd: Box::new(|y, g| {
            let gy = (g * y)?;
            &gy - y.broadcast_mul(&gy.sum_keepdim(D::Minus1)?)?
        }),
    })
}

/// Whether `t` is on a CUDA device of a build with this crate's own kernels (`model::cuda`).
pub fn on_cuda(t: &Tensor) -> bool {
    cfg!(feature = "cuda") && t.device().is_cuda()
}

/// Upstream's RMSNorm: this crate's CUDA kernels on a CUDA device, else [`rms_norm_portable`].
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if on_cuda(x) {
        return super::cuda::rms_norm(x, w, eps);
    }
    if super::cpu::takes(&[x, w]) {
        return rms_norm_cpu(x, w, eps);
    }
    rms_norm_portable(x, w, eps)
}

/// [`rms_norm`] on the CPU: candle-nn's fused forward, backward in one pass
/// (`model::cpu::RmsNormBwd`).
pub fn rms_norm_cpu(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    rms_norm_with_backward(
        x,
        w,
        eps,
        "cpu-rms-norm",
        Box::new(move |x, w, g| {
            let (n, c) = (x.elem_count() / w.elem_count(), w.elem_count());
            let op = super::cpu::RmsNormBwd { eps: eps as f32 };
            let both = x.contiguous()?.apply_op3_no_bwd(w, &g.contiguous()?, &op)?;
            Ok((
                both.narrow(0, 0, n)?.reshape(x.shape())?,
                both.get(n)?.reshape(c)?,
            ))
        }),
    )
}

/// candle-nn's fused RMSNorm forward, entering the graph with the backward `bwd(x, w, g)`.
fn rms_norm_with_backward(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    name: &'static str,
    bwd: Bwd2,
) -> Result<Tensor> {
    let y = candle_nn::ops::rms_norm(&x.detach().contiguous()?, &w.detach(), eps as f32)?;
    if !x.track_op() && !w.track_op() {
        return Ok(y);
    }
    x.apply_op2(
        w,
        Attach2 {
            name,
            value: Mutex::new(Some(y)),
            bwd,
        },
    )
}

/// SwiGLU's gate `silu(a) ⊙ b`: one kernel each way on CUDA, one pass each way on the CPU
/// (f32), else candle's ops.
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if on_cuda(a) {
        return super::cuda::swiglu(a, b);
    }
    if super::cpu::takes(&[a, b]) {
        return swiglu_cpu(a, b);
    }
    swiglu_portable(a, b)
}

/// [`swiglu`] on the CPU (`model::cpu::Swiglu`, `SwigluBwd`).
pub fn swiglu_cpu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?
        .apply_op2(&b.contiguous()?, super::cpu::Swiglu)
}

/// [`swiglu`] from candle's ops, on any device.
pub fn swiglu_portable(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(a)? * b
}

/// Attention probabilities of (B, G, R·T, S) `scores` = q·kᵀ — G heads (or KV groups) of R
/// blocks of the same T queries (R = 1: one head each) over S keys: softmax of `scores / sqrt_hd`
/// where `mask` (the causal mask of T queries over S keys, or none when T = 1) allows, in f32,
/// as `out` dtype. On CUDA one kernel each way (`model::cuda::causal_softmax`), which derives the
/// causal mask itself; elsewhere [`attention_probs_portable`].
pub fn attention_probs(
    scores: &Tensor,
    t: usize,
    sqrt_hd: f64,
    mask: Option<&Tensor>,
    out: DType,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if on_cuda(scores) {
        return super::cuda::causal_softmax(scores, t, 1.0 / sqrt_hd)?.to_dtype(out);
    }
    if super::cpu::takes(&[scores]) {
        return causal_softmax_cpu(scores, t, 1.0 / sqrt_hd)?.to_dtype(out);
    }
    attention_probs_portable(scores, t, sqrt_hd, mask, out)
}

/// Causal softmax of `scale · scores` (B, G, R·T, S) on the CPU, one pass each way
/// (`model::cpu::CausalSoftmax`, `SoftmaxBwd`); the mask is derived from the shape.
pub fn causal_softmax_cpu(scores: &Tensor, t: usize, scale: f64) -> Result<Tensor> {
    let scale = scale as f32;
    scores
        .contiguous()?
        .apply_op1(super::cpu::CausalSoftmax { t, scale })
}

/// [`attention_probs`] from candle's ops and [`softmax_last_dim`], on any device.
pub fn attention_probs_portable(
    scores: &Tensor,
    t: usize,
    sqrt_hd: f64,
    mask: Option<&Tensor>,
    out: DType,
) -> Result<Tensor> {
    let (b, g, rt, s) = scores.dims4()?;
    let scores = (scores / sqrt_hd)?;
    let scores = match mask {
        Some(m) if rt == t => scores.broadcast_add(&m.to_dtype(scores.dtype())?)?,
        Some(m) => scores
            .reshape((b, g, rt / t, t, s))?
            .broadcast_add(&m.to_dtype(scores.dtype())?)?
            .reshape((b, g, rt, s))?,
        None => scores,
    };
    softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(out)
}

/// Upstream's RMSNorm, `w ⊙ x / sqrt(mean(x²) + eps)`, statistics in f32, on any device.
/// With x̂ = x·r, r = 1/sqrt(mean(x²)+eps): `dx = r (g⊙w − x̂ · mean(g⊙w⊙x̂))`, `dw = Σ_rows g⊙x̂`.
pub fn rms_norm_portable(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    rms_norm_with_backward(
        x,
        w,
        eps,
        "fused-rms-norm",
        Box::new(move |x, w, g| {
            let c = x.dim(D::Minus1)?;
            let (xf, gf, wf) = (
                x.to_dtype(DType::F32)?,
                g.to_dtype(DType::F32)?,
                w.to_dtype(DType::F32)?,
            );
            let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
                .sqrt()?
                .recip()?;
            let xhat = xf.broadcast_mul(&r)?;
            let gw = gf.broadcast_mul(&wf)?;
            let dot = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
            let dx = (gw - xhat.broadcast_mul(&dot)?)?.broadcast_mul(&r)?;
            let dw = (gf * xhat)?.reshape(((), c))?.sum(0)?;
            Ok((dx.to_dtype(x.dtype())?, dw.to_dtype(w.dtype())?))
        }),
    )
}

/// Interleaved-pair RoPE of (B, H, T, D) `x`: a rotation, so the backward is the rotation by
/// the opposite angle — the same kernel with `-sin`.
pub fn rope_i(x: &Tensor, cos: &Tensor, sin: &Tensor, neg_sin: &Tensor) -> Result<Tensor> {
    let y = candle_nn::rotary_emb::rope_i(&x.detach().contiguous()?, cos, sin)?;
    if !x.track_op() {
        return Ok(y);
    }
    let (cos, neg_sin) = (cos.clone(), neg_sin.clone());
    x.apply_op1(Attach1 {
        name: "fused-rope",
        value: Mutex::new(Some(y)),
        bwd: Box::new(move |_, g| candle_nn::rotary_emb::rope_i(&g.contiguous()?, &cos, &neg_sin)),
    })
}

/// Rows `ids` of the (V, C) `table`: ids (…) → (…, C), as candle's `Embedding`. On CUDA the
/// backward is [`scatter_rows_onehot`] instead of candle's `index_add`, which runs one thread
/// per column through all the ids: 13.6 ms of a b256 step on an H100, one kernel.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let mut dims = ids.dims().to_vec();
    dims.push(table.dim(1)?);
    let flat = ids.flatten_all()?;
    if !on_cuda(table) || !table.track_op() {
        return table.index_select(&flat, 0)?.reshape(dims);
    }
    let v = table.dim(0)?;
    table
        .apply_op1(Attach1 {
            name: "embedding",
            value: Mutex::new(Some(table.detach().index_select(&flat, 0)?)),
            bwd: Box::new(move |_, g| scatter_rows_onehot(&flat, g, v, 16_384)),
        })?
        .reshape(dims)
}

/// The (V, C) table whose row v is the sum of the rows n of `g` (N, C) with `ids[n] = v`, as a
/// matrix product one-hot(ids)ᵀ · g (exact 0/1 weights, the GEMM's accumulation), `chunk` rows
/// of `g` at a time to bound the one-hot matrix.
pub fn scatter_rows_onehot(ids: &Tensor, g: &Tensor, v: usize, chunk: usize) -> Result<Tensor> {
    let classes = Tensor::arange(0u32, v as u32, g.device())?.unsqueeze(1)?; // (V, 1)
    let (n, chunk) = (ids.dim(0)?, chunk.max(1));
    let mut sum: Option<Tensor> = None;
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let onehot = classes
            .broadcast_eq(&ids.narrow(0, start, len)?.unsqueeze(0)?)?
            .to_dtype(g.dtype())?; // (V, len)
        let part = onehot.matmul(&g.narrow(0, start, len)?.contiguous()?)?;
        sum = Some(match sum {
            None => part,
            Some(s) => (s + part)?,
        });
    }
    // No ids: a zero table (the only case that needs one filled in).
    sum.map_or_else(|| Tensor::zeros((v, g.dim(1)?), g.dtype(), g.device()), Ok)
}

/// Rows `index` of `src` (R, C), no row picked twice. Its backward is a gather as well: candle's
/// `index_select` backward is `index_add`, which on CUDA runs one thread per column through all the
/// indices (13 ms for 24K rows of 512 on an H200). Here the gradient of source row j is the output
/// gradient of the row that picked it, or zero.
pub fn select_rows(src: &Tensor, index: &[u32]) -> Result<Tensor> {
    let device = src.device();
    let y = src
        .detach()
        .index_select(&Tensor::from_slice(index, index.len(), device)?, 0)?;
    if !src.track_op() {
        return Ok(y);
    }
    let unpicked = index.len() as u32; // the zero row appended to the gradient
    let mut inverse = vec![unpicked; src.dim(0)?];
    for (i, &j) in index.iter().enumerate() {
        let slot = inverse
            .get_mut(j as usize)
            .ok_or_else(|| candle_core::Error::Msg(format!("select_rows: row {j} out of range")))?;
        if *slot != unpicked {
            candle_core::bail!("select_rows: row {j} picked twice");
        }
        *slot = i as u32;
    }
    let inverse = Tensor::from_vec(inverse, src.dim(0)?, device)?;
    src.apply_op1(Attach1 {
        name: "select-rows",
        value: Mutex::new(Some(y)),
        bwd: Box::new(move |_, g| {
            let zero = Tensor::zeros((1, g.dim(1)?), g.dtype(), g.device())?;
            Tensor::cat(&[g, &zero], 0)?.index_select(&inverse, 0)
        }),
    })
}

/// Value and input gradients of `sum(f(xs) ⊙ r)`, as f32: `[value, d/dxs[0], d/dxs[1], …]`, for a
/// fixed uneven weighting r (no gradient comes out uniform). How a fused or device form of an
/// operation is checked against its portable form: the same weighting on both sides (tests,
/// `bench parity`). `xs` must be tracked (variables).
pub fn weighted_value_and_grads(
    xs: &[&Tensor],
    f: impl Fn(&[&Tensor]) -> Result<Tensor>,
) -> Result<Vec<Vec<f32>>> {
    let y = f(xs)?.to_dtype(DType::F32)?;
    let weight: Vec<f32> = (0..y.elem_count())
        .map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.4)
        .collect();
    let weight = Tensor::from_vec(weight, y.shape(), y.device())?;
    let grads = (&y * &weight)?.sum_all()?.backward()?;
    let mut out = vec![y.flatten_all()?.to_vec1::<f32>()?];
    for x in xs {
        let g = grads
            .get(x)
            .ok_or_else(|| candle_core::Error::Msg("no gradient reached an input".into()))?;
        out.push(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// [`weighted_value_and_grads`] of the variables: (value, gradients).
    fn value_and_grads(
        vars: &[&Var],
        f: impl Fn(&[&Tensor]) -> Result<Tensor>,
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let xs: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let mut all = weighted_value_and_grads(&xs, f).unwrap();
        let value = all.remove(0);
        (value, all)
    }

    /// Within 1e-5 of the reference's largest magnitude; any non-finite value fails.
    fn check(a: &[f32], b: &[f32], what: &str) -> std::result::Result<(), String> {
        crate::compare::Diff::of(a, b).check_rel(1e-5, what)
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        check(a, b, what).unwrap();
    }

    #[test]
    fn the_closeness_check_fails_on_non_finite_values() {
        let x = var(&[2, 3, 5, 7]);
        let (y, g) = value_and_grads(&[&x], |t| softmax_last_dim(t[0]));
        check(&y, &y, "softmax").unwrap();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for v in [&y, &g[0]] {
                let mut poisoned = v.clone();
                poisoned[3] = bad;
                assert!(check(&poisoned, v, "x").is_err(), "{bad}");
                assert!(check(v, &poisoned, "x").is_err(), "{bad}");
            }
        }
    }

    fn var(shape: &[usize]) -> Var {
        Var::from_tensor(&Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn fused_softmax_matches_the_elementary_ops_in_value_and_gradient() {
        let x = var(&[2, 3, 5, 7]);
        let (y1, g1) = value_and_grads(&[&x], |t| softmax_last_dim(t[0]));
        let (y2, g2) = value_and_grads(&[&x], |t| candle_nn::ops::softmax(t[0], D::Minus1));
        close(&y1, &y2, "softmax");
        close(&g1[0], &g2[0], "softmax dx");
    }

    #[test]
    fn fused_rms_norm_matches_the_elementary_ops_in_value_and_gradients() {
        let (x, w) = (var(&[2, 5, 16]), var(&[16]));
        let (y1, g1) = value_and_grads(&[&x, &w], |t| rms_norm(t[0], t[1], 1e-5));
        let (y2, g2) = value_and_grads(&[&x, &w], |t| {
            let ms = t[0].sqr()?.mean_keepdim(D::Minus1)?;
            t[0].broadcast_div(&(ms + 1e-5)?.sqrt()?)?
                .broadcast_mul(t[1])
        });
        close(&y1, &y2, "rms_norm");
        close(&g1[0], &g2[0], "rms_norm dx");
        close(&g1[1], &g2[1], "rms_norm dw");
    }

    #[test]
    fn fused_rope_matches_the_elementary_ops_in_value_and_gradient() {
        let x = var(&[2, 3, 6, 8]);
        let freqs = Tensor::randn(0f32, 1f32, (10, 4), &Device::Cpu).unwrap();
        let (cos, sin) = (freqs.cos().unwrap(), freqs.sin().unwrap());
        // Positions 2..8 of the tables, as with a KV cache offset.
        let (c, s) = (cos.narrow(0, 2, 6).unwrap(), sin.narrow(0, 2, 6).unwrap());
        let ns = s.neg().unwrap();
        let (y1, g1) = value_and_grads(&[&x], |t| rope_i(t[0], &c, &s, &ns));
        let (y2, g2) = value_and_grads(&[&x], |t| candle_nn::rotary_emb::rope_i_slow(t[0], &c, &s));
        close(&y1, &y2, "rope");
        close(&g1[0], &g2[0], "rope dx");
    }

    #[test]
    fn select_rows_matches_index_select_in_value_and_gradient() {
        let x = var(&[7, 4]);
        let index = [6u32, 0, 3, 2];
        let idx = Tensor::new(&index, &Device::Cpu).unwrap();
        let (y1, g1) = value_and_grads(&[&x], |t| select_rows(t[0], &index));
        let (y2, g2) = value_and_grads(&[&x], |t| t[0].index_select(&idx, 0));
        assert_eq!(y1, y2);
        assert_eq!(g1, g2); // rows 1, 4, 5 unpicked: zero gradient in both
        assert!(select_rows(x.as_tensor(), &[1, 1]).is_err());
        assert!(select_rows(x.as_tensor(), &[7]).is_err());
    }

    #[test]
    fn onehot_scatter_sums_the_rows_of_each_id_as_index_add_does() {
        let g = Tensor::randn(0f32, 1f32, (9, 4), &Device::Cpu).unwrap();
        let ids = Tensor::new(&[3u32, 0, 3, 5, 3, 0, 1, 6, 5], &Device::Cpu).unwrap();
        let want = Tensor::zeros((7, 4), DType::F32, &Device::Cpu)
            .unwrap()
            .index_add(&ids, &g, 0)
            .unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for chunk in [4, 9, 100] {
            let got = scatter_rows_onehot(&ids, &g, 7, chunk).unwrap();
            close(&flat(&got), &flat(&want), "one-hot scatter");
        }
        let got = scatter_rows_onehot(&ids, &g, 7, 4).unwrap();
        // Row 2 and row 4 are never picked: exactly zero.
        assert_eq!(flat(&got.narrow(0, 2, 1).unwrap()), vec![0.0; 4]);
    }

    #[test]
    fn gradients_from_the_fused_ops_carry_no_graph() {
        // A parameter's gradient that tracked the forward graph kept every step's graph alive
        // through the optimizer state: +1.6 GB of RSS per step of minimind_512 (found by
        // bench train). The gradients reaching the leaves must be plain values.
        let (x, w) = (var(&[2, 5, 16]), var(&[16]));
        let h = (x.as_tensor() * 2.0).unwrap(); // an interior node, as in the model
        let y = rms_norm(&h, w.as_tensor(), 1e-5).unwrap();
        let y = softmax_last_dim(&y).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            assert!(!grads.get(v.as_tensor()).unwrap().track_op());
        }
    }

    #[test]
    fn without_a_graph_the_fused_ops_return_the_kernel_output_directly() {
        let x = Tensor::randn(0f32, 1f32, (3, 4), &Device::Cpu).unwrap();
        let y = softmax_last_dim(&x).unwrap();
        assert!(!y.track_op());
        let sums = y.sum(1).unwrap().to_vec1::<f32>().unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6));
    }
}
