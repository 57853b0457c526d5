//! Comparing computed numbers with reference numbers: the one helper every tolerance check uses —
//! the reference tests, the model's own tests and `bench parity`. A non-finite value on either
//! side is a failure, never a small difference: `f32::max` skips NaN, so a max-of-differences
//! fold over a broken result scores 0 and passes; here it scores NaN, and NaN is within no
//! tolerance.

use candle_core::{DType, Tensor};

/// How far `got` is from `want`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Diff {
    /// Largest `|got - want|`.
    pub max_abs: f64,
    /// Largest `|want|`: what [`Diff::rel`] divides by.
    pub scale: f64,
    /// Values of either side that are NaN or infinite.
    pub non_finite: usize,
    /// The two sides have different lengths (then nothing else is meaningful).
    pub len_mismatch: bool,
}

impl Diff {
    pub fn of(got: &[f32], want: &[f32]) -> Self {
        let mut d = Self {
            max_abs: 0.0,
            scale: 0.0,
            non_finite: 0,
            len_mismatch: got.len() != want.len(),
        };
        for (&g, &w) in got.iter().zip(want) {
            d.non_finite += usize::from(!g.is_finite()) + usize::from(!w.is_finite());
            d.max_abs = d.max_abs.max((g as f64 - w as f64).abs());
            d.scale = d.scale.max((w as f64).abs());
        }
        d
    }

    /// Both tensors read back as f32 (any dtype, any device).
    pub fn of_tensors(got: &Tensor, want: &Tensor) -> candle_core::Result<Self> {
        let host = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
        let d = Self::of(&host(got)?, &host(want)?);
        Ok(Self {
            len_mismatch: d.len_mismatch || got.dims() != want.dims(),
            ..d
        })
    }

    fn broken(&self) -> bool {
        self.non_finite > 0 || self.len_mismatch
    }

    /// The largest absolute difference; NaN when any value is not finite or the lengths differ.
    pub fn abs(&self) -> f64 {
        if self.broken() {
            f64::NAN
        } else {
            self.max_abs
        }
    }

    /// The largest absolute difference over the largest reference magnitude; NaN as [`Diff::abs`].
    pub fn rel(&self) -> f64 {
        if self.broken() {
            f64::NAN
        } else {
            self.max_abs / self.scale.max(f64::MIN_POSITIVE)
        }
    }

    /// `Err` naming `what`, the difference and the tolerance unless `abs() <= tol`.
    pub fn check_abs(&self, tol: f64, what: &str) -> Result<(), String> {
        self.check(self.abs(), tol, what, "max abs diff")
    }

    /// `Err` naming `what`, the difference and the tolerance unless `rel() <= tol`.
    pub fn check_rel(&self, tol: f64, what: &str) -> Result<(), String> {
        self.check(self.rel(), tol, what, "max abs diff / max abs")
    }

    fn check(&self, v: f64, tol: f64, what: &str, measure: &str) -> Result<(), String> {
        if self.len_mismatch {
            Err(format!("{what}: the two sides differ in length or shape"))
        } else if self.non_finite > 0 {
            Err(format!("{what}: {} non-finite values", self.non_finite))
        } else if within(v, tol) {
            Ok(())
        } else {
            Err(format!("{what}: {measure} {v:.3e} > tolerance {tol:.0e}"))
        }
    }
}

/// `v <= tol` for a finite `v`: NaN and infinity are within no tolerance.
pub fn within(v: f64, tol: f64) -> bool {
    v.is_finite() && v <= tol
}

/// The largest of `metric(got, want)` over the pairs; NaN when any value is not finite or the
/// lengths differ. For element-wise measures such as a loss curve's relative step difference.
pub fn worst(got: &[f32], want: &[f32], metric: impl Fn(f64, f64) -> f64) -> f64 {
    if got.len() != want.len() {
        return f64::NAN;
    }
    got.iter().zip(want).fold(0.0, |m: f64, (&g, &w)| {
        if m.is_nan() || !g.is_finite() || !w.is_finite() {
            return f64::NAN;
        }
        let v = metric(g as f64, w as f64);
        if v.is_nan() {
            f64::NAN
        } else {
            m.max(v)
        }
    })
}

/// The largest `|got - want| / |want|` over the pairs (a loss curve against another).
pub fn worst_rel_each(got: &[f32], want: &[f32]) -> f64 {
    worst(got, want, |g, w| (g - w).abs() / w.abs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BAD: [f32; 3] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];

    #[test]
    fn equal_and_close_values_pass_and_far_ones_fail() {
        let want = [1.0f32, -2.0, 4.0];
        let d = Diff::of(&want, &want);
        assert_eq!((d.abs(), d.rel()), (0.0, 0.0));
        assert!(d.check_abs(0.0, "x").is_ok());
        let d = Diff::of(&[1.0, -2.0, 4.2], &want);
        assert!((d.abs() - 0.2).abs() < 1e-6 && (d.rel() - 0.05).abs() < 1e-6);
        assert!(d.check_rel(0.06, "x").is_ok());
        let err = d.check_rel(0.01, "logits").unwrap_err();
        assert!(err.contains("logits") && err.contains("tolerance"), "{err}");
    }

    #[test]
    fn any_non_finite_value_on_either_side_fails_every_check() {
        let want = [1.0f32, 2.0, 3.0, 4.0];
        for bad in BAD {
            for pos in 0..want.len() {
                let mut got = want;
                got[pos] = bad;
                for d in [Diff::of(&got, &want), Diff::of(&want, &got)] {
                    assert!(d.abs().is_nan() && d.rel().is_nan(), "{bad} at {pos}");
                    assert!(d.check_abs(f64::INFINITY, "x").is_err());
                    let err = d.check_rel(f64::INFINITY, "features").unwrap_err();
                    assert!(err.contains("1 non-finite"), "{err}");
                }
                assert!(worst_rel_each(&got, &want).is_nan());
                assert!(worst_rel_each(&want, &got).is_nan());
            }
        }
        // All NaN: a fold over f32::max would say 0.
        let nan = [f32::NAN; 4];
        assert!(Diff::of(&nan, &nan).check_abs(1.0, "x").is_err());
        assert!(!within(f64::NAN, 1.0) && !within(f64::INFINITY, f64::INFINITY));
    }

    #[test]
    fn lengths_and_shapes_must_agree() {
        assert!(Diff::of(&[1.0], &[1.0, 2.0]).check_abs(1.0, "x").is_err());
        assert!(worst_rel_each(&[1.0], &[1.0, 2.0]).is_nan());
        let dev = &candle_core::Device::Cpu;
        let a = Tensor::zeros((2, 3), DType::F32, dev).unwrap();
        let b = Tensor::zeros((3, 2), DType::F32, dev).unwrap();
        assert!(Diff::of_tensors(&a, &b).unwrap().abs().is_nan());
        let c = Tensor::new(&[[0f32, f32::NAN, 0.0], [0.0; 3]], dev).unwrap();
        assert!(Diff::of_tensors(&c, &a).unwrap().abs().is_nan());
        assert_eq!(Diff::of_tensors(&a, &a).unwrap().abs(), 0.0);
    }
}
