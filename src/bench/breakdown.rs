//! `bench breakdown`: where a training step's time goes on a device. The phases of real steps,
//! each timed with a device synchronisation around it (so the phases add up to more than an
//! unsynchronised step), then single operations at the step's shapes, forward and backward,
//! including the ones suspected of being slow on CUDA (candle's index_add loops over the indices
//! in one thread per column).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};

use super::synthetic_batches;
use crate::config::Precision;
use crate::error::Result;
use crate::train::data::collate;
use crate::train::Phase;

pub struct Breakdown {
    pub model: crate::model::ModelConfig,
    pub batch_size: usize,
    pub steps: usize,
    pub mean_len: usize,
    pub precision: Precision,
}

/// Mean milliseconds of `f` over `reps` runs after one warm-up, synchronising around each.
fn time_ms(device: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    device.synchronize()?;
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    device.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3 / reps as f64)
}

/// Forward + backward of `op` on a fresh variable of `shape` (random normal), in `dtype`. The
/// backward starts from sum(y): one reduction and one broadcast pass beside the op's own.
fn fwd_bwd(
    device: &Device,
    shape: &[usize],
    dtype: DType,
    op: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<f64> {
    let x = Var::from_tensor(&Tensor::randn(0f32, 1f32, shape, device)?.to_dtype(dtype)?)?;
    time_ms(device, 5, || {
        let y = op(x.as_tensor())?;
        let grads = y.sum_all()?.backward()?;
        std::hint::black_box(grads.get(x.as_tensor()));
        Ok(())
    })
}

pub fn run(b: &Breakdown, device: &Device) -> Result<String> {
    let cfg = &b.model;
    crate::train::apply_matmul_mode(b.precision);
    let mut out = format!(
        "batch {}, mean len {}, {:?}, dim {} × {} layers, {:?}\n\n| phase (synchronised) | ms per step |\n|---|---|\n",
        b.batch_size, b.mean_len, b.precision, cfg.dim, cfg.n_layers, device.location()
    );
    let (mut trainer, meta) = super::fresh(cfg, b.precision, device)?;
    let solo = crate::train::dist::Dist::solo();
    let batches = synthetic_batches(cfg, b.batch_size, b.mean_len, b.steps + 1, 3);
    // The trainer's own step, told to synchronise and take the time at the end of each phase.
    let mut ms = [0f64; Phase::ALL.len()];
    let mut tokens = 0;
    for (i, items) in batches.iter().enumerate() {
        let mut tick = [0f64; Phase::ALL.len()];
        device.synchronize()?;
        let mut lap = Instant::now();
        let next = || collate(items, &meta, None, false, &cfg.image_ids, device);
        let out = trainer.step(1, next, 1e-4, &solo, &[], |phase| {
            device.synchronize()?;
            let k = Phase::ALL
                .iter()
                .position(|p| *p == phase)
                .expect("a phase");
            tick[k] += lap.elapsed().as_secs_f64() * 1e3;
            lap = Instant::now();
            Ok(())
        })?;
        if i > 0 {
            tokens += out.tokens;
            for (m, t) in ms.iter_mut().zip(tick) {
                *m += t / b.steps as f64;
            }
        }
    }
    let names = Phase::ALL.map(Phase::name);
    for (name, m) in names.iter().zip(ms) {
        out.push_str(&format!("| {name} | {m:.2} |\n"));
    }
    let total: f64 = ms.iter().sum();
    out.push_str(&format!(
        "| **sum** | **{total:.2}** ({:.0} samples/s, {:.0} tokens/s) |\n",
        b.batch_size as f64 * 1e3 / total,
        tokens as f64 / b.steps as f64 * 1e3 / total
    ));

    // Single operations at this batch's shapes (T: the mean length), forward + backward.
    let (bs, t, c) = (b.batch_size, b.mean_len, cfg.dim);
    let (h, hd, v) = (cfg.n_heads, cfg.head_dim(), cfg.vocab_size);
    let n = bs * t;
    let dt = if b.precision == Precision::Bf16 {
        DType::BF16
    } else {
        DType::F32
    };
    out.push_str(&format!(
        "\n| operation (forward + backward, {dt:?}) | shape | ms |\n|---|---|---|\n"
    ));
    let row = |out: &mut String, name: &str, shape: String, ms: f64| {
        out.push_str(&format!("| {name} | {shape} | {ms:.2} |\n"));
    };
    let ids: Vec<u32> = (0..n as u32)
        .map(|i| (i * 2_654_435_761) % v as u32)
        .collect();
    let ids = Tensor::from_vec(ids, n, device)?;
    row(
        &mut out,
        "embedding: index_select (backward: index_add)",
        format!("{v}×{c} table, {n} ids"),
        fwd_bwd(device, &[v, c], dt, |w| w.index_select(&ids, 0))?,
    );
    let onehot_ms = fwd_bwd(device, &[v, c], dt, |w| {
        let classes = Tensor::arange(0u32, v as u32, device)?;
        let onehot = ids
            .unsqueeze(1)?
            .broadcast_eq(&classes.unsqueeze(0)?)?
            .to_dtype(w.dtype())?;
        onehot.matmul(w)
    })?;
    row(
        &mut out,
        "embedding as one-hot matmul",
        format!("{v}×{c} table, {n} ids"),
        onehot_ms,
    );
    let perm: Vec<u32> = (0..n as u32).rev().collect();
    let perm = Tensor::from_vec(perm, n, device)?;
    row(
        &mut out,
        "row permutation: index_select (image splice)",
        format!("{n}×{c}"),
        fwd_bwd(device, &[n, c], dt, |x| x.index_select(&perm, 0))?,
    );
    row(
        &mut out,
        "softmax (candle_nn::ops::softmax, f32)",
        format!("{bs}×{h}×{t}×{t}"),
        fwd_bwd(device, &[bs, h, t, t], DType::F32, |x| {
            candle_nn::ops::softmax(x, D::Minus1)
        })?,
    );
    row(
        &mut out,
        "attention scores q·kᵀ",
        format!("{bs}×{h}×{t}×{hd}"),
        fwd_bwd(device, &[bs, h, t, hd], dt, |q| q.matmul(&q.t()?))?,
    );
    let cos = Tensor::randn(0f32, 1f32, (t, hd / 2), device)?.to_dtype(dt)?;
    row(
        &mut out,
        "rope_i_slow",
        format!("{bs}×{h}×{t}×{hd}"),
        fwd_bwd(device, &[bs, h, t, hd], dt, |x| {
            candle_nn::rotary_emb::rope_i_slow(x, &cos, &cos)
        })?,
    );
    row(
        &mut out,
        "transpose(1,2) + contiguous",
        format!("{bs}×{t}×{h}×{hd}"),
        fwd_bwd(device, &[bs, t, h, hd], dt, |x| {
            x.transpose(1, 2)?.contiguous()
        })?,
    );
    let norm_w = Tensor::ones(c, dt, device)?;
    row(
        &mut out,
        "RMSNorm (f32 inside)",
        format!("{bs}×{t}×{c}"),
        fwd_bwd(device, &[bs, t, c], dt, |x| {
            let xf = x.to_dtype(DType::F32)?;
            let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
            xf.broadcast_div(&(ms + 1e-5)?.sqrt()?)?
                .to_dtype(x.dtype())?
                .broadcast_mul(&norm_w)
        })?,
    );
    use crate::model::fused;
    row(
        &mut out,
        "RMSNorm, the model's form (CUDA kernels on a GPU)",
        format!("{bs}×{t}×{c}"),
        fwd_bwd(device, &[bs, t, c], dt, |x| {
            fused::rms_norm(x, &norm_w, 1e-5)
        })?,
    );
    let mask = crate::model::llm::causal_mask(t, t, device)?;
    let sqrt_hd = (hd as f64).sqrt();
    row(
        &mut out,
        "causal softmax, the model's form",
        format!("{bs}×{h}×{t}×{t}"),
        fwd_bwd(device, &[bs, h, t, t], dt, |x| {
            fused::attention_probs(x, t, sqrt_hd, Some(&mask), dt)
        })?,
    );
    row(
        &mut out,
        "SwiGLU gate silu(a)·b, the model's form (a = b here)",
        format!("{n}×{}", cfg.ffn_hidden()),
        fwd_bwd(device, &[n, cfg.ffn_hidden()], dt, |x| fused::swiglu(x, x))?,
    );
    let ids2 = ids.reshape((bs, t))?;
    row(
        &mut out,
        "embedding, the model's form (one-hot backward on a GPU)",
        format!("{v}×{c} table, {n} ids"),
        fwd_bwd(device, &[v, c], dt, |w| fused::embedding(w, &ids2))?,
    );
    let neg = cos.neg()?;
    row(
        &mut out,
        "RoPE, fused kernel + written-out backward",
        format!("{bs}×{h}×{t}×{hd}"),
        fwd_bwd(device, &[bs, h, t, hd], dt, |x| {
            crate::model::fused::rope_i(x, &cos, &cos, &neg)
        })?,
    );
    let w1 = Tensor::randn(0f32, 0.02, (cfg.ffn_hidden(), c), device)?.to_dtype(dt)?;
    row(
        &mut out,
        "linear dim→ffn (x·Wᵀ, as candle's Linear: one 2-D product)",
        format!("{n}×{c} · {c}×{}", cfg.ffn_hidden()),
        fwd_bwd(device, &[n, c], dt, |x| x.matmul(&w1.t()?))?,
    );
    row(
        &mut out,
        "silu",
        format!("{n}×{}", cfg.ffn_hidden()),
        fwd_bwd(device, &[n, cfg.ffn_hidden()], dt, candle_nn::ops::silu)?,
    );
    let small = Tensor::zeros(1, DType::F32, device)?;
    out.push_str(&format!(
        "| one tiny op (launch + allocation) | 1 | {:.4} |\n",
        time_ms(device, 200, || {
            std::hint::black_box((&small + 1.0)?);
            Ok(())
        })?
    ));
    Ok(out)
}
