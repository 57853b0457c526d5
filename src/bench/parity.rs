//! `bench parity`: does a device compute what the CPU computes? CLIP features, each of the
//! model's operations in the device's form (this crate's CUDA kernels on a GPU) against its
//! portable form, the loss curve of the same f32 training steps, and bf16 against f32 on the
//! device. Reads nothing, writes a table; the first check to run on a GPU machine (docs/GPU.md).

use candle_core::{DType, Device, Tensor, Var};

use super::{synth_jpegs, synthetic_batches, train_steps};
use crate::error::Result;
use crate::vision::clip::{ClipSource, ClipTower};
use crate::vision::preprocess::load_resized;

/// `bench parity`: does `device` compute what the CPU computes? CLIP features of the same
/// images, and the loss curve of the same training steps (f32); then bf16 against f32 on
/// `device`. Fails when a tolerance is exceeded.
pub struct ParityCheck {
    pub model: crate::model::ModelConfig,
    pub clip: ClipSource,
    pub images: usize,
    pub steps: usize,
    pub batch_size: usize,
    pub bf16_steps: usize,
}

/// The rows of a parity run: each a measured value against its tolerance. A row passes only when
/// its value is finite and within the tolerance (`compare::within`).
#[derive(Debug, Default)]
pub struct Table {
    text: String,
    rows: usize,
    failed: Vec<String>,
}

impl Table {
    pub fn row(&mut self, check: &str, measure: &str, v: f64, tol: f64) {
        let ok = crate::compare::within(v, tol);
        if self.rows == 0 {
            self.text
                .push_str("| check | measure | value | tolerance | ok |\n|---|---|---|---|---|\n");
        }
        self.rows += 1;
        let verdict = match (ok, v.is_finite()) {
            (true, _) => "yes",
            (false, true) => "NO",
            (false, false) => "NO (not finite)",
        };
        if !ok {
            self.failed.push(check.to_string());
        }
        self.text.push_str(&format!(
            "| {check} | {measure} | {v:.3e} | {tol:.0e} | {verdict} |\n"
        ));
    }

    /// The Markdown table.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The checks that missed their tolerance or were not finite.
    pub fn failed(&self) -> &[String] {
        &self.failed
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// Runs every check on `device` (against the CPU) and returns the table; [`Table::failed`] says
/// which missed.
pub fn parity(p: &ParityCheck, device: &Device) -> Result<Table> {
    use crate::compare::{worst_rel_each, Diff};
    use crate::config::Precision;
    let mut t = Table::default();

    let jpegs = synth_jpegs(p.images);
    let features = |tower: &ClipTower| -> Result<Vec<f32>> {
        let px: Vec<Vec<u8>> = jpegs
            .iter()
            .map(|b| {
                load_resized(b, tower.image_size as u32, &Default::default())
                    .expect("synthetic JPEG")
            })
            .collect();
        let refs: Vec<&[u8]> = px.iter().map(|v| v.as_slice()).collect();
        Ok(tower.features_u8(&refs)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let tower = ClipTower::load(&p.clip, device)?;
    let cpu = features(&ClipTower::load(&p.clip, &Device::Cpu)?)?;
    let rel_diff = |a: &[f32]| Diff::of(a, &cpu).rel();
    let on_device = features(&tower)?;
    t.row(
        &format!("CLIP {} features, {} images", p.clip, p.images),
        "max abs diff / max abs (cpu)",
        rel_diff(&on_device),
        1e-3,
    );
    if device.is_cuda() {
        // What `ingest --clip-streams 2` runs beside the first tower: a replica on its own stream.
        let replica = features(&tower.more_streams(1)?[0])?;
        // Bit for bit: a NaN differs from everything, itself included.
        let differ = replica
            .iter()
            .zip(&on_device)
            .filter(|(x, y)| x.to_bits() != y.to_bits() || x.is_nan());
        t.row(
            "CLIP on a second CUDA stream (a replica) vs the first",
            "values that differ",
            differ.count() as f64,
            0.0,
        );
        // `[ingest] clip_precision = "tf32"`.
        let tf32 = crate::device::with_tf32(true, || features(&tower));
        t.row(
            "CLIP features with TF32 matmuls (ingest clip_precision = tf32)",
            "max abs diff / max abs (cpu, f32)",
            rel_diff(&tf32?),
            1e-2,
        );
        t.row(
            "CLIP features of an f16 tower (ingest clip_precision = f16)",
            "max abs diff / max abs (cpu, f32)",
            rel_diff(&features(&tower.with_dtype(DType::F16)?)?),
            1e-2,
        );
    }

    for (what, dtype, tol) in [("f32", DType::F32, 1e-4), ("bf16", DType::BF16, 2e-2)] {
        for (op, rel) in kernel_checks(device, dtype)? {
            t.row(
                &format!("{op}, {what}: the device's form vs the portable one"),
                "max abs diff / max abs, value and gradients",
                rel,
                tol,
            );
        }
    }

    let cfg = &p.model;
    let batches = synthetic_batches(cfg, p.batch_size, 94, p.steps, 11);
    let (dev_losses, _, _) = train_steps(cfg, &batches, None, Precision::F32, device)?;
    let (cpu_losses, _, _) = train_steps(cfg, &batches, None, Precision::F32, &Device::Cpu)?;
    let rel = worst_rel_each(&dev_losses, &cpu_losses);
    t.row(
        &format!("{} f32 steps, dim {} × {}", p.steps, cfg.dim, cfg.n_layers),
        "max step abs loss diff / loss",
        rel,
        1e-3,
    );

    if p.bf16_steps > 0 {
        let batches = synthetic_batches(cfg, p.batch_size, 94, p.bf16_steps, 12);
        let (f32_losses, _, _) = train_steps(cfg, &batches, None, Precision::F32, device)?;
        let (bf16_losses, _, _) = train_steps(cfg, &batches, None, Precision::Bf16, device)?;
        // Compare the curves smoothed over 10 steps: single bf16 steps are noisier.
        let smooth = |v: &[f32]| -> Vec<f32> {
            v.windows(10)
                .map(|w| (w.iter().map(|&x| x as f64).sum::<f64>() / 10.0) as f32)
                .collect()
        };
        let rel = worst_rel_each(&smooth(&bf16_losses), &smooth(&f32_losses));
        t.row(
            &format!("bf16 vs f32 on this device, {} steps", p.bf16_steps),
            "max abs diff of 10-step mean loss / loss",
            rel,
            2e-2,
        );
        t.text.push_str(&format!(
            "\nfinal loss (10-step mean): f32 {:.4}, bf16 {:.4}\n",
            smooth(&f32_losses).last().copied().unwrap_or(f32::NAN),
            smooth(&bf16_losses).last().copied().unwrap_or(f32::NAN)
        ));
    }
    Ok(t)
}

/// The largest [`Diff::rel`](crate::compare::Diff::rel) over parts (a value and its gradients);
/// NaN when any part is not finite or the part counts differ.
fn worst_of_parts(got: &[Vec<f32>], want: &[Vec<f32>]) -> f64 {
    if got.len() != want.len() {
        return f64::NAN;
    }
    got.iter().zip(want).fold(0.0, |m: f64, (a, b)| {
        let r = crate::compare::Diff::of(a, b).rel();
        if m.is_nan() || r.is_nan() {
            f64::NAN
        } else {
            m.max(r)
        }
    })
}

/// The model's operations as `device` runs them (this crate's CUDA kernels on a GPU) against
/// their portable forms on the same device, computed in f32 from the same `dtype`-rounded
/// inputs: the largest difference of the value and of each input's gradient, relative to the
/// largest magnitude of the portable one. Causal attention softmax with keys before the first
/// query (a KV cache), RMSNorm, SwiGLU's gate, and the embedding lookup.
fn kernel_checks(device: &Device, dtype: DType) -> Result<Vec<(&'static str, f64)>> {
    use crate::model::fused;
    type Op<'a> = Box<dyn Fn(&[&Tensor]) -> candle_core::Result<Tensor> + 'a>;
    // fused::weighted_value_and_grads of fresh variables holding `inputs`.
    let run = |f: &Op, inputs: &[Tensor]| -> Result<Vec<Vec<f32>>> {
        let vars = inputs
            .iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let xs: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        Ok(fused::weighted_value_and_grads(&xs, f)?)
    };
    let compare = |fast: Op, portable: Op, shapes: &[&[usize]]| -> Result<f64> {
        let inputs = shapes
            .iter()
            .map(|s| Tensor::randn(0f32, 1f32, *s, device)?.to_dtype(dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let wide = inputs
            .iter()
            .map(|t| t.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let (a, b) = (run(&fast, &inputs)?, run(&portable, &wide)?);
        Ok(worst_of_parts(&a, &b))
    };
    // 5 queries over 8 keys: 3 cached keys before the first query.
    let mask = crate::model::llm::causal_mask(5, 8, device)?;
    let ids = Tensor::new(
        &[[3u32, 0, 7, 3, 49, 3, 0], [12, 12, 12, 1, 2, 3, 4]],
        device,
    )?;
    Ok(vec![
        (
            "causal softmax 2×3×5×8",
            compare(
                Box::new(|x| fused::attention_probs(x[0], 5, 2.5, Some(&mask), DType::F32)),
                Box::new(|x| {
                    fused::attention_probs_portable(x[0], 5, 2.5, Some(&mask), DType::F32)
                }),
                &[&[2, 3, 5, 8]],
            )?,
        ),
        (
            "causal softmax 2×3×(2·5)×8, grouped heads",
            compare(
                Box::new(|x| fused::attention_probs(x[0], 5, 2.5, Some(&mask), DType::F32)),
                Box::new(|x| {
                    fused::attention_probs_portable(x[0], 5, 2.5, Some(&mask), DType::F32)
                }),
                &[&[2, 3, 10, 8]],
            )?,
        ),
        (
            "RMSNorm 2×5×64",
            compare(
                Box::new(|x| fused::rms_norm(x[0], x[1], 1e-5)),
                Box::new(|x| fused::rms_norm_portable(x[0], x[1], 1e-5)),
                &[&[2, 5, 64], &[64]],
            )?,
        ),
        (
            "SwiGLU 3×40",
            compare(
                Box::new(|x| fused::swiglu(x[0], x[1])),
                Box::new(|x| fused::swiglu_portable(x[0], x[1])),
                &[&[3, 40], &[3, 40]],
            )?,
        ),
        (
            "embedding 50×16, 2×7 ids",
            compare(
                Box::new(|x| fused::embedding(x[0], &ids)),
                Box::new(|x| {
                    x[0].index_select(&ids.flatten_all()?, 0)?
                        .reshape((2, 7, 16))
                }),
                &[&[50, 16]],
            )?,
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::{worst_rel_each, Diff};

    #[test]
    fn a_row_fails_on_a_miss_and_on_any_non_finite_value() {
        let mut t = Table::default();
        t.row("fine", "m", 1e-6, 1e-3);
        t.row("exact", "values that differ", 0.0, 0.0);
        assert!(t.failed().is_empty(), "{}", t.text());
        t.row("miss", "m", 2e-3, 1e-3);
        t.row("nan", "m", f64::NAN, 1e-3);
        t.row("inf", "m", f64::INFINITY, f64::INFINITY);
        assert_eq!(t.failed(), ["miss", "nan", "inf"]);
        assert!(
            t.text()
                .contains("| nan | m | NaN | 1e-3 | NO (not finite) |"),
            "{}",
            t.text()
        );
        assert_eq!(t.rows(), 5);
    }

    /// Each kind of row the parity run computes — features, kernel values and gradients, loss
    /// curves — scores NaN, and so fails, when the device's side holds a NaN or an infinity.
    #[test]
    fn every_kind_of_parity_row_fails_on_nan_and_infinity() {
        let cpu = vec![0.5f32, -1.0, 2.0, 0.25];
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut dev = cpu.clone();
            dev[2] = bad;
            let mut t = Table::default();
            t.row("features", "rel", Diff::of(&dev, &cpu).rel(), 1e-3);
            let grads = |v: &Vec<f32>| vec![cpu.clone(), v.clone()];
            t.row(
                "kernel",
                "rel",
                worst_of_parts(&grads(&dev), &grads(&cpu)),
                1e-4,
            );
            t.row("curve", "rel", worst_rel_each(&dev, &cpu), 1e-3);
            assert_eq!(t.failed().len(), 3, "{bad}: {}", t.text());
        }
        let all_nan = vec![f32::NAN; 4];
        let parts = std::slice::from_ref(&all_nan);
        assert!(worst_of_parts(parts, parts).is_nan());
        let parts = std::slice::from_ref(&cpu);
        assert_eq!(worst_of_parts(parts, parts), 0.0);
    }
}
