//! The vendored candle-core's changes (vendor/README.md). A node's first gradient is stored as it
//! is instead of being added into zeros, later ones are added (or subtracted) as before: every
//! rule that subtracts, fan-in through several consumers, broadcasts and views — the gradients
//! must equal the hand-derived ones. A batch of matrix products split across threads product by
//! product gives the same bits as one thread and as each product split across the threads. An
//! elementwise map split across the pool gives every element its own scalar value.

use candle_core::{Device, Tensor, Var};

fn vals(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Each f32's bits, for comparisons that must be exact.
fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
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
    let product_bits = |threads: &str| -> Vec<u32> {
        std::env::set_var("RAYON_NUM_THREADS", threads);
        let c = a.matmul(&bt.t().unwrap()).unwrap();
        std::env::remove_var("RAYON_NUM_THREADS");
        close(&vals(&c), &want, &format!("{threads} thread(s)"));
        bits(&c)
    };
    let one = product_bits("1");
    assert_eq!(product_bits("2"), one, "whole products per thread");
    assert_eq!(product_bits("3"), one, "each product split across threads");
}

/// A linear layer's weight, used through its transpose (`x.matmul(&w.t())`), gets its gradient
/// as (gradᵀ·x), contiguous, where candle computed (xᵀ·grad) and copied its transpose into place:
/// the same bits (gemm sums each element's products in the same order either way), for shapes
/// whose depth (rows of x) spans one and several of gemm's blocks, on one thread and two; a
/// weight also used directly (tied embeddings) still adds both gradients.
#[test]
fn a_transposed_weights_gradient_is_contiguous_with_the_same_bits() {
    let dev = Device::Cpu;
    let fill = |len: usize, seed: usize| -> Vec<f32> {
        (0..len)
            .map(|i| (((i + seed) * 7919) % 1009) as f32 / 1009.0 - 0.5)
            .collect()
    };
    // (rows of x, in, out): the demo's projections, its output head, a multi-block depth, edges.
    let shapes = [
        (800, 96, 96),
        (800, 96, 256),
        (800, 256, 96),
        (120, 96, 6400),
        (1500, 64, 48),
        (4099, 33, 17),
        (7, 1, 5),
        (9, 5, 1),
    ];
    for threads in ["1", "2"] {
        std::env::set_var("RAYON_NUM_THREADS", threads);
        for &(rows, inp, out) in &shapes {
            let what = format!("{rows}×{inp}→{out}, {threads} thread(s)");
            let x = Tensor::from_vec(fill(rows * inp, 1), (rows, inp), &dev).unwrap();
            let g = Tensor::from_vec(fill(rows * out, 2), (rows, out), &dev).unwrap();
            let w =
                Var::from_tensor(&Tensor::from_vec(fill(out * inp, 3), (out, inp), &dev).unwrap())
                    .unwrap();
            // L = Σ (x·wᵀ) ∘ g, so ∂L/∂(x·wᵀ) = g and ∂L/∂w = (xᵀ·g)ᵀ = gᵀ·x.
            let y = x.matmul(&w.as_tensor().t().unwrap()).unwrap();
            let l = (y * &g).unwrap().sum_all().unwrap();
            let grads = l.backward().unwrap();
            let gw = grads.get(w.as_tensor()).unwrap();
            assert!(gw.is_contiguous(), "{what}");
            let old = x.t().unwrap().matmul(&g).unwrap().t().unwrap();
            assert_eq!(bits(gw), bits(&old.contiguous().unwrap()), "{what}");
            let (xv, gv) = (vals(&x), vals(&g));
            let want: Vec<f64> = (0..(out * inp).min(64))
                .map(|e| {
                    let (o, i) = (e / inp, e % inp);
                    (0..rows).map(|r| gv[r * out + o] * xv[r * inp + i]).sum()
                })
                .collect();
            // The f32 sum of `rows` products of values in ±0.5 against the f64 one: rounding
            // grows with the depth, 1e-6 per row is far above it and far below a wrong element.
            for (got, want) in vals(gw).iter().zip(&want) {
                assert!(
                    (got - want).abs() <= 1e-6 * rows as f64,
                    "{what}: {got} vs {want}"
                );
            }
            // Tied: w also scales x directly, (x·wᵀ)∘g + Σ w∘c.
            if rows == 800 && inp == out {
                let c = Tensor::from_vec(fill(out * inp, 4), (out, inp), &dev).unwrap();
                let y = x.matmul(&w.as_tensor().t().unwrap()).unwrap();
                let direct = (w.as_tensor() * &c).unwrap().sum_all().unwrap();
                let l = ((y * &g).unwrap().sum_all().unwrap() + direct).unwrap();
                let grads = l.backward().unwrap();
                let tied = (old.contiguous().unwrap() + &c).unwrap();
                close(
                    &vals(grads.get(w.as_tensor()).unwrap()),
                    &vals(&tied),
                    &format!("tied, {what}"),
                );
            }
        }
        std::env::remove_var("RAYON_NUM_THREADS");
    }
}

/// Fails at the first element that differs, naming it (whole vectors are too long to print).
fn same_bits<T: PartialEq + std::fmt::Debug>(got: &[T], want: &[T], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!("{what}: element {i} is {:?}, want {:?}", got[i], want[i]);
    }
}

/// Elementwise maps without a vectorised form (affine, sigmoid, dtype casts) split a long
/// contiguous span across the pool: every element must still be its own scalar result, whatever
/// the span's length (not a multiple of the pool's units), its offset (a narrowed view) or the
/// layout (a strided view takes the single-threaded path). Compared bit for bit against the same
/// scalar expression.
#[test]
fn elementwise_maps_split_across_the_pool_give_each_elements_own_value() {
    let dev = Device::Cpu;
    let len = 3 * 64 * 1024 + 17;
    let xs: Vec<f32> = (0..len + 5)
        .map(|i| ((i * 7919) % 100_003) as f32 / 10_000.0 - 5.0)
        .collect();
    let whole = Tensor::from_vec(xs.clone(), len + 5, &dev).unwrap();
    // Offset 5 into the storage, `len` long: one contiguous block that does not start at zero.
    let x = whole.narrow(0, 5, len).unwrap();
    let src = &xs[5..];
    let (mul, add) = (1.702f64, 0.25f64);
    let affine = bits(&x.affine(mul, add).unwrap());
    let want: Vec<u32> = src
        .iter()
        .map(|&v| (v * mul as f32 + add as f32).to_bits())
        .collect();
    same_bits(&affine, &want, "affine");
    let sigmoid = bits(&candle_nn::ops::sigmoid(&x).unwrap());
    let want: Vec<u32> = src
        .iter()
        .map(|&v| ((-v).exp() + 1.0).recip().to_bits())
        .collect();
    same_bits(&sigmoid, &want, "sigmoid");
    let half: Vec<u16> = x
        .to_dtype(candle_core::DType::F16)
        .unwrap()
        .to_vec1::<half::f16>()
        .unwrap()
        .iter()
        .map(|h| h.to_bits())
        .collect();
    let want: Vec<u16> = src
        .iter()
        .map(|&v| half::f16::from_f32(v).to_bits())
        .collect();
    same_bits(&half, &want, "f32 → f16");
    // A transposed view: strided, element by element on one thread, same expression.
    let cols = 1024;
    let rows = len / cols;
    let m = Tensor::from_vec(src[..rows * cols].to_vec(), (rows, cols), &dev).unwrap();
    let t = bits(&m.t().unwrap().affine(mul, add).unwrap());
    let want: Vec<u32> = (0..rows * cols)
        .map(|e| {
            let (c, r) = (e / rows, e % rows);
            (src[r * cols + c] * mul as f32 + add as f32).to_bits()
        })
        .collect();
    same_bits(&t, &want, "affine of a transposed view");
}
