//! The vendored candle-core's changes (vendor/README.md). A node's first gradient is stored as it
//! is instead of being added into zeros, later ones are added (or subtracted) as before: every
//! rule that subtracts, fan-in through several consumers, broadcasts and views — the gradients
//! must equal the hand-derived ones. A batch of matrix products split across threads product by
//! product gives the same bits as one thread and as each product split across the threads.

use candle_core::{Device, Tensor, Var};

fn vals(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "{what}: {got:?} vs {want:?}"
        );
    }
}

#[test]
fn first_gradients_are_stored_and_fan_in_still_accumulates() {
    let xs = [0.5f64, -1.5, 2.0];
    let ys = [1.25f64, 0.75, -2.5];
    let x = Var::new(&xs, &Device::Cpu).unwrap();
    let y = Var::new(&ys, &Device::Cpu).unwrap();
    let (xt, yt) = (x.as_tensor(), y.as_tensor());
    // L = Σ [ (x − y)·x / y  −  y  +  (−x)  +  cos(x) ] — x reaches L through five paths, y
    // through three; Sub, Div, Neg and Cos are the rules whose first gradient is stored negated.
    let a = ((xt - yt).unwrap() * xt).unwrap();
    let b = (a / yt).unwrap();
    let c = ((b - yt).unwrap() + xt.neg().unwrap()).unwrap();
    let l = (c + xt.cos().unwrap()).unwrap().sum_all().unwrap();
    let grads = l.backward().unwrap();
    // ∂L/∂x = (2x − y)/y − 1 − sin x;  ∂L/∂y = −x/y − (x − y)x/y² − 1 = −x²/y² − 1.
    let dx: Vec<f64> = xs
        .iter()
        .zip(&ys)
        .map(|(x, y)| (2.0 * x - y) / y - 1.0 - x.sin())
        .collect();
    let dy: Vec<f64> = xs
        .iter()
        .zip(&ys)
        .map(|(x, y)| -x * x / (y * y) - 1.0)
        .collect();
    close(&vals(grads.get(xt).unwrap()), &dx, "dL/dx");
    close(&vals(grads.get(yt).unwrap()), &dy, "dL/dy");
}

#[test]
fn gradients_through_broadcasts_and_transposes_are_contiguous_and_right() {
    let w = Var::new(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu).unwrap();
    let b = Var::new(&[10.0f32, 20.0, 30.0], &Device::Cpu).unwrap();
    // L = Σ_ij (wᵀ)_ji · (w + b)_ij: b broadcast over rows, w reached twice (once transposed).
    let wt = w.as_tensor().t().unwrap();
    let s = w.as_tensor().broadcast_add(b.as_tensor()).unwrap();
    let l = (wt.t().unwrap() * s).unwrap().sum_all().unwrap();
    let grads = l.backward().unwrap();
    // ∂L/∂w = (w + b) + w = 2w + b;  ∂L/∂b_j = Σ_i w_ij.
    let gw = grads.get(w.as_tensor()).unwrap();
    assert!(gw.is_contiguous());
    close(&vals(gw), &[12.0, 24.0, 36.0, 18.0, 30.0, 42.0], "dL/dw");
    let gb = grads.get(b.as_tensor()).unwrap();
    assert!(gb.is_contiguous());
    close(&vals(gb), &[5.0, 7.0, 9.0], "dL/db");
}

/// `RAYON_NUM_THREADS` is read at every product, so one process can take all three paths:
/// one thread (products in turn), 2 (8 products, whole ones per thread) and 3 (8 products,
/// fewer than 4 per thread and not an even share: each product split across the threads).
#[test]
fn batched_products_give_the_same_bits_however_the_threads_split_them() {
    let (b, m, k, n) = (8, 37, 29, 23);
    let lhs: Vec<f32> = (0..b * m * k)
        .map(|i| ((i * 7919) % 1009) as f32 / 1009.0 - 0.5)
        .collect();
    let rhs: Vec<f32> = (0..b * k * n)
        .map(|i| ((i * 104_729) % 997) as f32 / 997.0 - 0.5)
        .collect();
    let dev = Device::Cpu;
    let a = Tensor::from_vec(lhs.clone(), (b, m, k), &dev).unwrap();
    // The right-hand side as a transposed view, as attention's q·kᵀ reads it.
    let bt = Tensor::from_vec(rhs.clone(), (b, n, k), &dev).unwrap();
    let want: Vec<f64> = (0..b * m * n)
        .map(|i| {
            let (s, r, c) = (i / (m * n), i / n % m, i % n);
            (0..k)
                .map(|j| lhs[(s * m + r) * k + j] as f64 * rhs[(s * n + c) * k + j] as f64)
                .sum()
        })
        .collect();
    let bits = |threads: &str| -> Vec<u32> {
        std::env::set_var("RAYON_NUM_THREADS", threads);
        let c = a.matmul(&bt.t().unwrap()).unwrap();
        std::env::remove_var("RAYON_NUM_THREADS");
        close(&vals(&c), &want, &format!("{threads} thread(s)"));
        c.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    let one = bits("1");
    assert_eq!(bits("2"), one, "whole products per thread");
    assert_eq!(bits("3"), one, "each product split across threads");
}
