//! The CPU forms of the model's causal softmax, RMSNorm backward and SwiGLU gate: one pass over
//! the data each way, rows split across the cores, f32 only.
//!
//! In candle's portable forms (`fused::*_portable`) each of these is a chain of elementwise ops,
//! every one a pass over memory into a fresh tensor and a round through the thread pool: the
//! causal softmax is a scale, a mask add and a fused softmax forward and four ops back; RMSNorm's
//! backward is a dozen; SwiGLU's gate is silu and a product, and silu's backward five more. On a
//! 2-core CPU those passes, not the matrix products, were most of a small model's step.
//! `model::fused` picks these for f32 tensors on the CPU; tests check them against the portable
//! forms in value and gradient. The causal softmax and SwiGLU's gate are graph ops with their own
//! backward, so their output is written once, straight into the tensor's storage.
//!
//! Each kernel's work on a task's rows is a function compiled three times — for AVX-512, for
//! AVX2 and for baseline x86-64 (SSE2) — of which `multiversion` picks the widest the CPU has, at
//! run time (its AVX-512 form needs Ice Lake's set of AVX-512 instructions: it leaves older
//! AVX-512 parts, which slow their clock under them, on AVX2). A baseline build otherwise runs
//! these loops four floats at a time on every CPU. All three give the same bits: the
//! elementwise arithmetic is IEEE in any vector width (Rust never fuses `a * b + c` into an FMA),
//! and every sum over a row runs in the one fixed order of [`lanes`], whatever the registers'
//! width (a training run's losses and gradient norms match bit for bit across the three).

use std::mem::{ManuallyDrop, MaybeUninit};
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

/// Elements per rayon task, about: small enough to split a layer's work across two cores,
/// large enough that scheduling stays a small part of it.
const GRAIN: usize = 1 << 14;

/// The contiguous f32 values of `s` under `l`.
pub fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("minimind CPU kernel: {what} must be contiguous")
    };
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        s => candle_core::bail!("minimind CPU kernel: {what} is {:?}, not f32", s.dtype()),
    }
}

/// [`f32s`], writable (in-place ops).
pub fn f32s_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("minimind CPU kernel: {what} must be contiguous")
    };
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        s => candle_core::bail!("minimind CPU kernel: {what} is {:?}, not f32", s.dtype()),
    }
}

/// Rows of `width` per task for rows of that width.
fn rows_per_task(width: usize) -> usize {
    (GRAIN / width.max(1)).max(1)
}

/// `n` values for a kernel that writes every one of them before the vector is read: no zero-fill
/// first (`vec![0f32; n]` is a pass over memory the kernel then overwrites: without it `memset`
/// fell from 4.1% to 1.4% of a one-rank profile of the demo's model).
fn unwritten(n: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: `MaybeUninit` needs no initialisation; the capacity is `n`.
    unsafe { v.set_len(n) };
    v
}

/// `v`, every value of which has been written (by [`write_all`] or `MaybeUninit::write`).
///
/// # Safety
/// Every element of `v` must be initialised.
unsafe fn written(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = ManuallyDrop::new(v);
    // SAFETY: same layout, and the caller guarantees every element is initialised.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
}

/// Writes `values` (exactly `dst.len()` of them) into `dst`; returns `dst` as the values.
#[inline(always)]
fn write_all(
    dst: &mut [MaybeUninit<f32>],
    values: impl ExactSizeIterator<Item = f32>,
) -> &mut [f32] {
    assert_eq!(dst.len(), values.len(), "write_all: lengths differ");
    for (d, v) in dst.iter_mut().zip(values) {
        d.write(v);
    }
    // SAFETY: every element was written just above.
    unsafe { &mut *(std::ptr::from_mut(dst) as *mut [f32]) }
}

/// `e^x` for every value of `xs`, in place: Cephes' `expf` (a polynomial after reducing by ln 2,
/// within a few ulp of the exact value), written without branches or calls so that the loop
/// vectorises. libm's `expf` is a call per value, and these kernels make millions of them per
/// training step. Arguments are clamped to
/// [−87.3, 88.3], so results below 2⁻¹²⁶ come out as about 1.2·10⁻³⁸ instead of subnormal or 0,
/// and above 2.1·10³⁸ as that instead of ∞; NaN stays NaN (all tested below).
#[inline(always)]
pub fn exp_in_place(xs: &mut [f32]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, the first exact in a few bits, so that x − n·ln 2 stays exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    for x in xs {
        let v = x.clamp(-87.3, 88.3);
        let shifted = v * LOG2E + ROUND;
        let n = shifted - ROUND;
        let r = v - n * LN2_HI - n * LN2_LO;
        let p = 1.987_569_1e-4_f32;
        let p = p * r + 1.398_199_9e-3;
        let p = p * r + 8.333_452e-3;
        let p = p * r + 4.166_579_6e-2;
        let p = p * r + 1.666_666_5e-1;
        let p = p * r + 0.5; // Cephes: 5.0000001e-1, which is 0.5 in f32
        let e = p * r * r + r + 1.0;
        let k = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
        *x = e * f32::from_bits(((k + 127) << 23) as u32);
    }
}

/// Running values of [`lanes`]: 16 f32, one AVX-512 register (two AVX2, four SSE ones).
const LANES: usize = 16;

/// `xs` folded by `f` in a fixed order: value i into running value i mod 16, then the 16 halved
/// pairwise (0 with 8, 1 with 9, …). One order on every CPU, and 16 independent chains instead of
/// one: a plain left-to-right float sum cannot be vectorised (it would change the result), so it
/// ran one add after another, the latency of each.
#[inline(always)]
fn lanes(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = f(*a, x);
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a = f(*a, x);
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        let (low, high) = acc.split_at_mut(width);
        for (a, &b) in low.iter_mut().zip(&high[..width]) {
            *a = f(*a, b);
        }
    }
    acc[0]
}

/// `Σ xs` in [`lanes`]' order.
#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    lanes(xs, 0.0, |a, x| a + x)
}

/// `Σ a ⊙ b` in [`lanes`]' order, through `tmp` (as long as `a`).
#[inline(always)]
fn dot(tmp: &mut [f32], a: &[f32], b: &[f32]) -> f32 {
    for ((t, &a), &b) in tmp.iter_mut().zip(a).zip(b) {
        *t = a * b;
    }
    sum(tmp)
}

/// Writes `out = e^(scale·x − max)` for a row `x` whose scaled maximum is `max`; returns
/// `(out, max, Σ out)` — the shared first half of every softmax here. NaN in `x` makes the sum
/// NaN (the maximum skips it; its own term does not).
#[inline(always)]
fn exp_minus_max<'a>(
    out: &'a mut [MaybeUninit<f32>],
    x: &[f32],
    scale: f32,
) -> (&'a mut [f32], f32, f32) {
    let out = write_all(out, x.iter().map(|&x| x * scale));
    let max = lanes(out, f32::NEG_INFINITY, f32::max);
    out.iter_mut().for_each(|v| *v -= max);
    exp_in_place(out);
    let sum = sum(out);
    (out, max, sum)
}

/// `(B, G, R·T, S)` scores → causal softmax of `scale · scores`: row r of a head is query
/// i = r mod T, which sees keys ≤ i + S − T (the others get probability 0).
pub struct CausalSoftmax {
    /// Queries per block of rows.
    pub t: usize,
    pub scale: f32,
}

/// [`CausalSoftmax`] of the rows of `k` scores `x` into `y`; the first is row `first` of
/// the tensor, whose heads have `rt` rows.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn causal_softmax_rows(
    y: &mut [MaybeUninit<f32>],
    x: &[f32],
    (first, rt, k): (usize, usize, usize),
    t: usize,
    scale: f32,
) {
    for (r, (y, x)) in y.chunks_mut(k).zip(x.chunks(k)).enumerate() {
        let i = (first + r) % rt % t;
        let seen = i + k - t + 1; // keys 0..seen
        let (y, masked) = y.split_at_mut(seen);
        write_all(masked, std::iter::repeat_n(0.0, k - seen));
        let (y, _, sum) = exp_minus_max(y, &x[..seen], scale);
        let inv = 1.0 / sum;
        y.iter_mut().for_each(|y| *y *= inv);
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "minimind-cpu-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, _, rt, k) = l.shape().dims4()?;
        let t = self.t;
        if t == 0 || rt % t != 0 || t > k {
            candle_core::bail!("causal_softmax: {rt} rows per head, {t} queries, {k} keys")
        }
        let x = f32s(s, l, "scores")?;
        let mut y = unwritten(x.len());
        let per = rows_per_task(k);
        let scale = self.scale;
        y.par_chunks_mut(per * k)
            .zip(x.par_chunks(per * k))
            .enumerate()
            .for_each(|(task, (y, x))| causal_softmax_rows(y, x, (task * per, rt, k), t, scale));
        // SAFETY: every row wrote its `seen` probabilities and its masked zeros.
        Ok((CpuStorage::F32(unsafe { written(y) }), l.shape().clone()))
    }

    fn bwd(&self, _scores: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // Detached: a gradient must not carry the forward graph.
        let scale = self.scale;
        let g = grad.detach().contiguous()?;
        Ok(Some(
            y.detach().apply_op2_no_bwd(&g, &SoftmaxBwd { scale })?,
        ))
    }
}

/// Softmax's backward from its output y: `dx = scale · y ⊙ (g − Σ g ⊙ y)` per row.
pub struct SoftmaxBwd {
    pub scale: f32,
}

/// [`SoftmaxBwd`] of the rows of `k` values `y`, `g` into `dx`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn softmax_bwd_rows(dx: &mut [MaybeUninit<f32>], y: &[f32], g: &[f32], k: usize, scale: f32) {
    for ((dx, y), g) in dx.chunks_mut(k).zip(y.chunks(k)).zip(g.chunks(k)) {
        // dx holds the products for their sum, then is overwritten.
        let dx = write_all(dx, y.iter().zip(g).map(|(y, g)| y * g));
        let dot = sum(dx);
        for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
            *dx = scale * y * (g - dot);
        }
    }
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "minimind-cpu-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let k = yl.shape().dims().last().copied().unwrap_or(1);
        let (y, g) = (f32s(ys, yl, "y")?, f32s(gs, gl, "grad")?);
        if y.len() != g.len() {
            candle_core::bail!(
                "softmax backward: {} outputs, {} gradients",
                y.len(),
                g.len()
            )
        }
        let mut dx = unwritten(y.len());
        let per = rows_per_task(k) * k;
        let scale = self.scale;
        dx.par_chunks_mut(per)
            .zip(y.par_chunks(per).zip(g.par_chunks(per)))
            .for_each(|(dx, (y, g))| softmax_bwd_rows(dx, y, g, k, scale));
        // SAFETY: the chunks cover dx, and every value of each was written.
        Ok((CpuStorage::F32(unsafe { written(dx) }), yl.shape().clone()))
    }
}

/// RMSNorm's backward for x (…, C), w (C), g like x: (N + 1, C) holding dx's N rows, then dw.
/// With x̂ = x·r, r = 1/sqrt(mean(x²) + eps): `dx = r (g⊙w − x̂ · mean(g⊙w⊙x̂))`,
/// `dw = Σ_rows g⊙x̂`.
pub struct RmsNormBwd {
    pub eps: f32,
}

/// [`RmsNormBwd`] of the rows `x`, `g` (as wide as `w`) into `dx`; returns their share of dw.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn rms_norm_bwd_rows(
    dx: &mut [MaybeUninit<f32>],
    x: &[f32],
    g: &[f32],
    w: &[f32],
    eps: f32,
) -> Vec<f32> {
    let c = w.len();
    let mut dw = vec![0f32; c];
    let mut gw = vec![0f32; c];
    let mut tmp = vec![0f32; c];
    for ((dx, x), g) in dx.chunks_mut(c).zip(x.chunks(c)).zip(g.chunks(c)) {
        let ms = dot(&mut tmp, x, x) / c as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for (((gw, t), (&g, &w)), &x) in gw.iter_mut().zip(&mut tmp).zip(g.iter().zip(w)).zip(x) {
            *gw = g * w;
            *t = *gw * (x * r);
        }
        let dot = sum(&tmp) / c as f32;
        for ((((dx, dw), &gw), &g), &x) in dx.iter_mut().zip(dw.iter_mut()).zip(&gw).zip(g).zip(x) {
            let xhat = x * r;
            dx.write((gw - xhat * dot) * r);
            *dw += g * xhat;
        }
    }
    dw
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "minimind-cpu-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, g) = (
            f32s(xs, xl, "x")?,
            f32s(ws, wl, "w")?,
            f32s(gs, gl, "grad")?,
        );
        let c = w.len();
        if c == 0 || x.len() % c != 0 || g.len() != x.len() {
            candle_core::bail!(
                "rms_norm backward: {} values, {} gradients, width {c}",
                x.len(),
                g.len()
            )
        }
        let n = x.len() / c;
        let mut out = unwritten((n + 1) * c);
        let (dx, dw) = out.split_at_mut(n * c);
        let dw = write_all(dw, std::iter::repeat_n(0.0, c));
        let per = rows_per_task(c) * c;
        let eps = self.eps;
        // Each task's share of dw, summed in task order (a fixed order: the same bits each run).
        let parts: Vec<Vec<f32>> = dx
            .par_chunks_mut(per)
            .zip(x.par_chunks(per).zip(g.par_chunks(per)))
            .map(|(dx, (x, g))| rms_norm_bwd_rows(dx, x, g, w, eps))
            .collect();
        for part in parts {
            dw.iter_mut().zip(part).for_each(|(d, p)| *d += p);
        }
        // SAFETY: the chunks cover dx, every value of each was written, and dw was zeroed.
        Ok((
            CpuStorage::F32(unsafe { written(out) }),
            Shape::from((n + 1, c)),
        ))
    }
}

/// SwiGLU's gate `silu(a) ⊙ b`, silu(a) = a / (1 + e^−a).
pub struct Swiglu;

/// [`Swiglu`] of the values `a`, `b` into `y`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn swiglu_values(y: &mut [MaybeUninit<f32>], a: &[f32], b: &[f32]) {
    let y = write_all(y, a.iter().map(|&a| -a));
    exp_in_place(y);
    for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
        *y = a / (1.0 + *y) * b;
    }
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "minimind-cpu-swiglu"
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if al.shape() != bl.shape() {
            candle_core::bail!("swiglu: shapes {:?} and {:?}", al.shape(), bl.shape())
        }
        let (a, b) = (f32s(as_, al, "a")?, f32s(bs, bl, "b")?);
        let mut y = unwritten(a.len());
        y.par_chunks_mut(GRAIN)
            .zip(a.par_chunks(GRAIN).zip(b.par_chunks(GRAIN)))
            .for_each(|(y, (a, b))| swiglu_values(y, a, b));
        // SAFETY: the chunks cover y, and each was written whole.
        Ok((CpuStorage::F32(unsafe { written(y) }), al.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Detached: a gradient must not carry the forward graph.
        let both =
            a.detach()
                .apply_op3_no_bwd(&b.detach(), &grad.detach().contiguous()?, &SwigluBwd)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// SwiGLU's backward: (2, …) holding `da = g·b·s(1 + a(1 − s))` (s = sigmoid(a)), then
/// `db = g·silu(a)`.
pub struct SwigluBwd;

/// [`SwigluBwd`] of the values `a`, `b` and gradients `g` into `da`, `db`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn swiglu_bwd_values(
    da: &mut [MaybeUninit<f32>],
    db: &mut [MaybeUninit<f32>],
    (a, b, g): (&[f32], &[f32], &[f32]),
) {
    let da = write_all(da, a.iter().map(|&a| -a));
    exp_in_place(da);
    for ((((da, db), &a), &b), &g) in da.iter_mut().zip(db.iter_mut()).zip(a).zip(b).zip(g) {
        let s = 1.0 / (1.0 + *da);
        *da = g * b * s * (1.0 + a * (1.0 - s));
        db.write(g * a * s);
    }
}

impl CustomOp3 for SwigluBwd {
    fn name(&self) -> &'static str {
        "minimind-cpu-swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b, g) = (
            f32s(as_, al, "a")?,
            f32s(bs, bl, "b")?,
            f32s(gs, gl, "grad")?,
        );
        let n = a.len();
        if b.len() != n || g.len() != n {
            candle_core::bail!("swiglu backward: {n}, {} and {} values", b.len(), g.len())
        }
        let mut out = unwritten(2 * n);
        let (da, db) = out.split_at_mut(n);
        da.par_chunks_mut(GRAIN)
            .zip(db.par_chunks_mut(GRAIN))
            .zip(
                a.par_chunks(GRAIN)
                    .zip(b.par_chunks(GRAIN).zip(g.par_chunks(GRAIN))),
            )
            .for_each(|((da, db), (a, (b, g)))| swiglu_bwd_values(da, db, (a, b, g)));
        let mut dims = vec![2];
        dims.extend_from_slice(al.shape().dims());
        // SAFETY: the chunks cover da and db, and every value of each was written.
        Ok((CpuStorage::F32(unsafe { written(out) }), Shape::from(dims)))
    }
}

/// Mean cross-entropy of (N, V) f32 logits against (N,) u32 targets: `mean(lse(x) − x[target])`,
/// a scalar. Backward: `(softmax(x) − onehot(target)) · g / N`, from the probabilities the
/// forward pass keeps ([`CrossEntropyBwd`] recomputes them if they are gone). candle's form
/// (log_softmax, gather, mean) makes about fifteen passes over the N × V logits each way.
#[derive(Default)]
pub struct CrossEntropy {
    probs: Mutex<Option<Vec<f32>>>,
}

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout, rows: usize, v: usize) -> Result<&'a [u32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("cross_entropy: targets must be contiguous")
    };
    let CpuStorage::U32(t) = s else {
        candle_core::bail!("cross_entropy: targets are {:?}, not u32", s.dtype())
    };
    let t = &t[a..b];
    if t.len() != rows {
        candle_core::bail!("cross_entropy: {rows} rows of logits, {} targets", t.len())
    }
    if let Some(bad) = t.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("cross_entropy: target {bad} outside the vocabulary of {v}")
    }
    Ok(t)
}

/// [`CrossEntropy`]'s probabilities of the rows of `v` logits `x` into `p`; returns the sum of
/// the rows' −log p of their targets `t`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn cross_entropy_rows(p: &mut [MaybeUninit<f32>], x: &[f32], t: &[u32], v: usize) -> f32 {
    let mut nll = 0f32;
    for ((p, x), &t) in p.chunks_mut(v).zip(x.chunks(v)).zip(t) {
        let (p, max, sum) = exp_minus_max(p, x, 1.0);
        let inv = 1.0 / sum;
        p.iter_mut().for_each(|p| *p *= inv);
        nll += sum.ln() - (x[t as usize] - max);
    }
    nll
}

/// `xs ⊙= g`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn scale_in_place(xs: &mut [f32], g: f32) {
    xs.iter_mut().for_each(|x| *x *= g);
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "minimind-cpu-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = xl.shape().dims2()?;
        let x = f32s(xs, xl, "logits")?;
        let t = targets_of(ts, tl, n, v)?;
        let per = rows_per_task(v);
        let mut probs = unwritten(x.len());
        // Each task's sum of its rows' −log p, added in task order.
        let parts: Vec<f32> = probs
            .par_chunks_mut(per * v)
            .zip(x.par_chunks(per * v).zip(t.par_chunks(per)))
            .map(|(p, (x, t))| cross_entropy_rows(p, x, t, v))
            .collect();
        // SAFETY: the chunks cover probs, and every row was written whole.
        *self.probs.lock().expect("probs lock") = Some(unsafe { written(probs) });
        let loss = parts.iter().sum::<f32>() / n.max(1) as f32;
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let probs = self.probs.lock().expect("probs lock").take();
        let (Some(mut dx), Ok(targets)) = (probs, t.to_vec1::<u32>()) else {
            let dx = x
                .detach()
                .apply_op3_no_bwd(&t.detach(), &grad.detach(), &CrossEntropyBwd)?;
            return Ok((Some(dx), None));
        };
        let (n, v) = x.dims2()?;
        let g = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? / n.max(1) as f32;
        dx.par_chunks_mut(rows_per_task(v) * v)
            .for_each(|dx| scale_in_place(dx, g));
        for (r, &t) in targets.iter().enumerate() {
            dx[r * v + t as usize] -= g;
        }
        Ok((Some(Tensor::from_vec(dx, (n, v), x.device())?), None))
    }
}

/// [`CrossEntropy`]'s backward: (logits, targets, scalar gradient) → (N, V).
pub struct CrossEntropyBwd;

/// [`CrossEntropyBwd`] of the rows of `v` logits `x` with targets `t` into `dx`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn cross_entropy_bwd_rows(dx: &mut [MaybeUninit<f32>], x: &[f32], t: &[u32], v: usize, g: f32) {
    for ((dx, x), &t) in dx.chunks_mut(v).zip(x.chunks(v)).zip(t) {
        let (dx, _, sum) = exp_minus_max(dx, x, 1.0);
        let inv = 1.0 / sum;
        for dx in dx.iter_mut() {
            *dx *= inv * g;
        }
        dx[t as usize] -= g;
    }
}

impl CustomOp3 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "minimind-cpu-cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = xl.shape().dims2()?;
        let x = f32s(xs, xl, "logits")?;
        let t = targets_of(ts, tl, n, v)?;
        let g = match f32s(gs, gl, "grad")? {
            [g] => *g / n.max(1) as f32,
            g => candle_core::bail!("cross_entropy backward: {} gradient values", g.len()),
        };
        let mut dx = unwritten(x.len());
        let per = rows_per_task(v);
        dx.par_chunks_mut(per * v)
            .zip(x.par_chunks(per * v).zip(t.par_chunks(per)))
            .for_each(|(dx, (x, t))| cross_entropy_bwd_rows(dx, x, t, v, g));
        // SAFETY: the chunks cover dx, and every row was written whole.
        Ok((CpuStorage::F32(unsafe { written(dx) }), xl.shape().clone()))
    }
}

/// Whether `ts` are all f32 tensors on the CPU (what the kernels here take).
pub fn takes(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}

#[cfg(test)]
mod tests {
    use super::super::fused;
    use candle_core::{DType, Device, Tensor, Var};

    /// `exp_in_place` against f64's exp on a dense grid over its whole range: relative error at
    /// most 4·2⁻²⁴ (a few ulp; libm's expf is within 1), the clamped ends, and NaN kept.
    #[test]
    fn exp_in_place_is_within_a_few_ulp_of_exp() {
        let xs: Vec<f32> = (0..=2_000_000)
            .map(|i| -87.0 + 175.0 * i as f32 / 2_000_000.0)
            .collect();
        let mut ys = xs.clone();
        super::exp_in_place(&mut ys);
        let mut worst = (0f64, 0f32);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = (x as f64).exp();
            let rel = ((y as f64 - want) / want).abs();
            assert!(rel.is_finite(), "exp({x}) = {y}");
            if rel > worst.0 {
                worst = (rel, x);
            }
        }
        assert!(
            worst.0 <= 4.0 * f32::EPSILON as f64 / 2.0,
            "exp relative error {:e} at x = {}",
            worst.0,
            worst.1
        );
        let mut ends = [
            -1e4f32,
            f32::NEG_INFINITY,
            1e4,
            f32::INFINITY,
            f32::NAN,
            0.0,
        ];
        super::exp_in_place(&mut ends);
        assert!(ends[0] > 0.0 && ends[0] < 1.3e-38 && ends[0] == ends[1]);
        assert!(ends[2] > 2.0e38 && ends[2].is_finite() && ends[2] == ends[3]);
        assert!(ends[4].is_nan());
        assert_eq!(ends[5], 1.0);
    }

    /// `sum` adds value i into running sum i mod 16, then halves the 16 pairwise: 1e8, 32 ones
    /// and −1e8 sum to 16 in that order (0 left to right, where 1e8 absorbs every one; 32
    /// exactly). On ordinary values it is within 1e-6 of the exact sum, NaN when a value is NaN;
    /// `lanes` with `max` skips NaN, as `f32::max` does, and `exp_minus_max` still sums to NaN.
    #[test]
    fn row_sums_run_in_the_fixed_lane_order() {
        let mut xs = vec![1e8f32];
        xs.extend([1.0; 32]);
        xs.push(-1e8);
        assert_eq!(xs.iter().sum::<f32>(), 0.0);
        assert_eq!(super::sum(&xs), 16.0);
        let xs: Vec<f32> = (0..37).map(|i| 1.0 + i as f32 * 1.3e-3).collect();
        let exact: f64 = xs.iter().map(|&x| x as f64).sum();
        assert!((super::sum(&xs) as f64 - exact).abs() <= 1e-6 * exact);
        let mut with_nan = xs.clone();
        with_nan[20] = f32::NAN;
        assert!(super::sum(&with_nan).is_nan());
        assert_eq!(super::lanes(&with_nan, f32::NEG_INFINITY, f32::max), xs[36]);
        let mut out = super::unwritten(with_nan.len());
        let (_, max, sum) = super::exp_minus_max(&mut out, &with_nan, 1.0);
        assert!(max == xs[36] && sum.is_nan(), "max {max}, sum {sum}");
    }

    fn var(shape: &[usize], scale: f32) -> Var {
        let t = (Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap() * scale as f64).unwrap();
        Var::from_tensor(&t).unwrap()
    }

    /// Value and every input gradient of the CPU form within `tol` (absolute) of the portable
    /// form's; a non-finite value on either side fails. The CPU kernels sum in another order,
    /// so results agree to f32 rounding, not bit for bit.
    fn agree(
        xs: &[&Var],
        cpu: impl Fn(&[&Tensor]) -> candle_core::Result<Tensor>,
        portable: impl Fn(&[&Tensor]) -> candle_core::Result<Tensor>,
        tol: f64,
        what: &str,
    ) {
        let xs: Vec<&Tensor> = xs.iter().map(|v| v.as_tensor()).collect();
        let a = fused::weighted_value_and_grads(&xs, cpu).unwrap();
        let b = fused::weighted_value_and_grads(&xs, portable).unwrap();
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            let part = if i == 0 {
                "value".to_string()
            } else {
                format!("d/dx{}", i - 1)
            };
            crate::compare::Diff::of(x, y)
                .check_abs(tol, &format!("{what}: {part}, CPU kernel vs portable"))
                .unwrap();
        }
    }

    #[test]
    fn causal_softmax_matches_the_portable_form_in_value_and_gradient() {
        // Four queries per head over 4 keys (training) and over 9 (after 5 cached keys),
        // and one query over 6 keys (decoding: no mask).
        for (t, s) in [(4, 4), (4, 9), (1, 6)] {
            let scores = var(&[2, 3, t, s], 3.0);
            let mask = (t > 1).then(|| crate::model::llm::causal_mask(t, s, &Device::Cpu).unwrap());
            let sqrt_hd = 8f64.sqrt();
            agree(
                &[&scores],
                |x| fused::causal_softmax_cpu(x[0], t, 1.0 / sqrt_hd),
                |x| fused::attention_probs_portable(x[0], t, sqrt_hd, mask.as_ref(), DType::F32),
                1e-6,
                &format!("causal softmax {t}×{s}"),
            );
        }
    }

    #[test]
    fn rms_norm_backward_matches_the_portable_form() {
        // Enough rows (3 × 700 of width 40) for several tasks' shares of dw to be summed.
        let (x, w) = (var(&[3, 700, 40], 2.0), var(&[40], 1.0));
        agree(
            &[&x, &w],
            |v| fused::rms_norm_cpu(v[0], v[1], 1e-5),
            |v| fused::rms_norm_portable(v[0], v[1], 1e-5),
            // dw sums 2,100 rows of magnitude ~1: f32 rounding of that order.
            1e-3,
            "RMSNorm",
        );
    }

    #[test]
    fn swiglu_matches_the_portable_form_in_value_and_gradients() {
        // More values than one task takes, large inputs included (e^−a overflow for a ≪ 0).
        let (a, b) = (var(&[5, 9000], 8.0), var(&[5, 9000], 1.0));
        agree(
            &[&a, &b],
            |v| fused::swiglu_cpu(v[0], v[1]),
            |v| fused::swiglu_portable(v[0], v[1]),
            1e-5,
            "SwiGLU",
        );
    }

    #[test]
    fn cross_entropy_matches_candles_form_in_value_and_gradient() {
        // 37 rows over a vocabulary of 300 (several tasks), logits large enough to need the
        // max subtracted.
        let x = var(&[37, 300], 20.0);
        let targets: Vec<u32> = (0..37).map(|i| (i * 41 % 300) as u32).collect();
        let t = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        let portable = |x: &Tensor| -> candle_core::Result<Tensor> {
            let logp = candle_nn::ops::log_softmax(x, candle_core::D::Minus1)?;
            logp.gather(&t.unsqueeze(1)?, 1)?
                .squeeze(1)?
                .mean_all()?
                .neg()
        };
        agree(
            &[&x],
            |v| v[0].apply_op2(&t, super::CrossEntropy::default()),
            |v| portable(v[0]),
            1e-4,
            "cross-entropy",
        );
        // The backward without the kept probabilities (recomputed) gives the same gradient.
        let loss = x
            .as_tensor()
            .apply_op2(&t, super::CrossEntropy::default())
            .unwrap();
        let kept = loss.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let one = Tensor::new(1f32, &Device::Cpu).unwrap();
        let again = x
            .as_tensor()
            .apply_op3_no_bwd(&t, &one, &super::CrossEntropyBwd)
            .unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        crate::compare::Diff::of(&flat(&kept), &flat(&again))
            .check_abs(
                1e-7,
                "cross-entropy backward: kept vs recomputed probabilities",
            )
            .unwrap();
        let bad = Tensor::new(&[300u32], &Device::Cpu).unwrap();
        let one = Tensor::zeros((1, 300), DType::F32, &Device::Cpu).unwrap();
        let e = one
            .apply_op2_no_bwd(&bad, &super::CrossEntropy::default())
            .unwrap_err();
        assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    }

    #[test]
    fn the_kernels_refuse_what_they_do_not_take() {
        // bf16 and non-f32 tensors go to the portable forms; the kernels say why they refuse.
        let x = Tensor::zeros((2, 2, 3, 3), DType::BF16, &Device::Cpu).unwrap();
        assert!(!super::takes(&[&x]));
        let e = x
            .apply_op1_no_bwd(&super::CausalSoftmax { t: 3, scale: 1.0 })
            .unwrap_err();
        assert!(e.to_string().contains("not f32"), "{e}");
        let y = Tensor::zeros((2, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let e = y
            .apply_op1_no_bwd(&super::CausalSoftmax { t: 2, scale: 1.0 })
            .unwrap_err();
        assert!(e.to_string().contains("2 queries"), "{e}");
    }
}
