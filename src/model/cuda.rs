//! The CUDA forms of the model's causal softmax, RMSNorm and SwiGLU gate: `kernels/fused.cu`,
//! compiled to PTX by build.rs in a `cuda` build, as candle custom ops with a backward of their
//! own. `model::fused` picks them for tensors on a CUDA device.
//!
//! On an H100, a b256 bf16 step of `minimind_512` spent ~30 ms in the causal softmax (scale,
//! mask add, f32 casts, softmax, and a four-op backward over 256×16×111×111 scores per layer)
//! and ~30 ms in RMSNorm backward (broadcast ops in f32) — candle's elementwise kernels run at a
//! third of the memory bandwidth, so passes are what costs (docs/GPU.md). Each operation here is
//! one pass forward and one backward. The CPU keeps the forms in `fused` (the same functions;
//! `bench parity` checks these kernels against them on the device).

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result,
    Shape, Tensor,
};
use half::bf16;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "minimind_fused";
/// Warps (rows) per block.
const ROWS_PER_BLOCK: u32 = 4;

fn row_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((rows as u32).div_ceil(ROWS_PER_BLOCK), 1, 1),
        block_dim: (32, ROWS_PER_BLOCK, 1),
        shared_mem_bytes: 0,
    }
}

/// `name`'s f32 or bf16 form.
fn kernel(dev: &CudaDevice, name: &str, dtype: DType) -> Result<CudaFunction> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        d => candle_core::bail!("minimind CUDA kernel {name}: no {d:?} form (f32, bf16)"),
    };
    Ok(dev
        .get_or_load_custom_func(&format!("{name}_{suffix}"), MODULE, PTX)?
        .into_cuda_function())
}

fn same_dtype(a: &CudaStorage, b: &CudaStorage) -> Result<()> {
    if a.dtype() != b.dtype() {
        candle_core::bail!(
            "minimind CUDA kernel: {:?} and {:?} arguments",
            a.dtype(),
            b.dtype()
        )
    }
    Ok(())
}

fn contiguous<'a, T: CudaDType + DeviceRepr>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("minimind CUDA kernel: {what} must be contiguous")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// `cpu_fwd` of an op with n arguments, all CUDA-only here: an error (the CPU runs `fused`'s
/// portable forms instead).
macro_rules! cuda_only {
    (1) => {
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            no_cpu()
        }
    };
    (2) => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            no_cpu()
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            no_cpu()
        }
    };
}

/// `run::<f32>(args)` or `run::<bf16>(args)` by the storage dtype (others are refused by
/// [`kernel`]).
macro_rules! by_dtype {
    ($dtype:expr, $run:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $run::<f32>($($arg),*),
            _ => $run::<bf16>($($arg),*),
        }
    };
}

fn no_cpu<T>() -> Result<T> {
    candle_core::bail!("a minimind CUDA kernel was called on a CPU tensor")
}

/// `(B, G, R·T, S)` scores → causal softmax of `scale · scores`: row r is query i = r mod T,
/// which sees keys ≤ i + S − T.
pub fn causal_softmax(scores: &Tensor, t: usize, scale: f64) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax {
        t,
        scale: scale as f32,
    })
}

struct CausalSoftmax {
    /// Queries per block of rows.
    t: usize,
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "minimind-causal-softmax"
    }
    cuda_only!(1);
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            op: &CausalSoftmax,
            s: &CudaStorage,
            l: &Layout,
        ) -> Result<CudaStorage> {
            let (_, _, rt, k) = l.shape().dims4()?;
            let t = op.t;
            if t == 0 || rt % t != 0 || t > k {
                candle_core::bail!("causal_softmax: {rt} rows per head, {t} queries, {k} keys")
            }
            let rows = l.shape().elem_count() / k;
            let dev = s.device();
            let func = kernel(dev, "causal_softmax", s.dtype())?;
            let x = contiguous::<T>(s, l, "scores")?;
            let y = unsafe { dev.alloc::<T>(rows * k)? };
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            let (rows_i, t_i, k_i, off) = (rows as i64, t as i32, k as i32, (k - t) as i32);
            b.arg(&x)
                .arg(&y)
                .arg(&rows_i)
                .arg(&t_i)
                .arg(&k_i)
                .arg(&off)
                .arg(&op.scale);
            launch(b, rows)?;
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
        let out = by_dtype!(s.dtype(), run(self, s, l))?;
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.detach().contiguous()?;
        let op = SoftmaxBwd { scale: self.scale };
        Ok(Some(res.detach().apply_op2_no_bwd(&g, &op)?))
    }
}

/// `dx = scale · y ⊙ (g − Σ g ⊙ y)`.
struct SoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "minimind-softmax-bwd"
    }
    cuda_only!(2);
    fn cuda_fwd(
        &self,
        ys: &CudaStorage,
        yl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            scale: f32,
            (ys, yl): (&CudaStorage, &Layout),
            (gs, gl): (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let k = yl.shape().dims().last().copied().unwrap_or(1);
            let rows = yl.shape().elem_count() / k;
            let dev = ys.device();
            let func = kernel(dev, "softmax_bwd", ys.dtype())?;
            let (y, g) = (
                contiguous::<T>(ys, yl, "y")?,
                contiguous::<T>(gs, gl, "grad")?,
            );
            let dx = unsafe { dev.alloc::<T>(rows * k)? };
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            let (rows_i, k_i) = (rows as i64, k as i32);
            b.arg(&y)
                .arg(&g)
                .arg(&dx)
                .arg(&rows_i)
                .arg(&k_i)
                .arg(&scale);
            launch(b, rows)?;
            Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
        }
        same_dtype(ys, gs)?;
        let out = by_dtype!(ys.dtype(), run(self.scale, (ys, yl), (gs, gl)))?;
        Ok((out, yl.shape().clone()))
    }
}

/// Upstream's RMSNorm over the last dimension, statistics in f32.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "minimind-rms-norm"
    }
    cuda_only!(2);
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            eps: f32,
            (xs, xl): (&CudaStorage, &Layout),
            (ws, wl): (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let c = wl.shape().elem_count();
            let rows = xl.shape().elem_count() / c;
            let dev = xs.device();
            let func = kernel(dev, "rms_norm", xs.dtype())?;
            let (x, w) = (contiguous::<T>(xs, xl, "x")?, contiguous::<T>(ws, wl, "w")?);
            let y = unsafe { dev.alloc::<T>(rows * c)? };
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            let (rows_i, c_i) = (rows as i64, c as i32);
            b.arg(&x).arg(&w).arg(&y).arg(&rows_i).arg(&c_i).arg(&eps);
            launch(b, rows)?;
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
        same_dtype(xs, ws)?;
        let out = by_dtype!(xs.dtype(), run(self.eps, (xs, xl), (ws, wl)))?;
        Ok((out, xl.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c = w.elem_count();
        let op = RmsNormBwd {
            eps: self.eps,
            gxh: Mutex::new(None),
        };
        let dx = x
            .detach()
            .apply_op3_no_bwd(&w.detach(), &grad.detach().contiguous()?, &op)?;
        let gxh = op.gxh.lock().expect("gxh lock").take();
        let gxh = dx.apply_op1_no_bwd(&Emit(Mutex::new(gxh)))?;
        let dw = gxh.reshape(((), c))?.sum(0)?.to_dtype(w.dtype())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// RMSNorm's backward: dx as the output; each row's g·x̂ (f32) kept aside for dw.
struct RmsNormBwd {
    eps: f32,
    gxh: Mutex<Option<CudaStorage>>,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "minimind-rms-norm-bwd"
    }
    cuda_only!(3);
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            op: &RmsNormBwd,
            (xs, xl): (&CudaStorage, &Layout),
            (ws, wl): (&CudaStorage, &Layout),
            (gs, gl): (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let c = wl.shape().elem_count();
            let rows = xl.shape().elem_count() / c;
            let dev = xs.device();
            let func = kernel(dev, "rms_norm_bwd", xs.dtype())?;
            let (x, w) = (contiguous::<T>(xs, xl, "x")?, contiguous::<T>(ws, wl, "w")?);
            let g = contiguous::<T>(gs, gl, "grad")?;
            let dx = unsafe { dev.alloc::<T>(rows * c)? };
            let gxh = unsafe { dev.alloc::<f32>(rows * c)? };
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            let (rows_i, c_i) = (rows as i64, c as i32);
            b.arg(&x).arg(&w).arg(&g).arg(&dx).arg(&gxh);
            b.arg(&rows_i).arg(&c_i).arg(&op.eps);
            launch(b, rows)?;
            *op.gxh.lock().expect("gxh lock") =
                Some(CudaStorage::wrap_cuda_slice(gxh, dev.clone()));
            Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
        }
        same_dtype(xs, ws)?;
        same_dtype(xs, gs)?;
        let out = by_dtype!(xs.dtype(), run(self, (xs, xl), (ws, wl), (gs, gl)))?;
        Ok((out, xl.shape().clone()))
    }
}

/// SwiGLU's gate `silu(a) ⊙ b`, one pass each way.
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, Swiglu)
}

struct Swiglu;

/// An elementwise kernel `name(inputs…, out, n)` over `n` values of each input, writing
/// `outputs · n` values to a fresh buffer.
fn elementwise<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    dtype: DType,
    inputs: &[&CudaView<'_, T>],
    n: usize,
    outputs: usize,
) -> Result<CudaStorage> {
    let func = kernel(dev, name, dtype)?;
    let out = unsafe { dev.alloc::<T>(n * outputs)? };
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    for v in inputs {
        b.arg(*v);
    }
    let n_i = n as i64;
    b.arg(&out).arg(&n_i);
    let cfg = LaunchConfig {
        grid_dim: ((n as u32).div_ceil(256).max(1), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the kernel reads n values of each input view and writes n · outputs values.
    unsafe { b.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "minimind-swiglu"
    }
    cuda_only!(2);
    fn cuda_fwd(
        &self,
        as_: &CudaStorage,
        al: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            (as_, al): (&CudaStorage, &Layout),
            (bs, bl): (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let (a, b) = (
                contiguous::<T>(as_, al, "a")?,
                contiguous::<T>(bs, bl, "b")?,
            );
            let n = al.shape().elem_count();
            elementwise::<T>(as_.device(), "swiglu", as_.dtype(), &[&a, &b], n, 1)
        }
        same_dtype(as_, bs)?;
        if al.shape() != bl.shape() {
            candle_core::bail!("swiglu: shapes {:?} and {:?}", al.shape(), bl.shape())
        }
        let out = by_dtype!(as_.dtype(), run((as_, al), (bs, bl)))?;
        Ok((out, al.shape().clone()))
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.detach().contiguous()?;
        let both = a.detach().apply_op3_no_bwd(&b.detach(), &g, &SwigluBwd)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// SwiGLU's backward: (2, …) holding da then db.
struct SwigluBwd;

impl CustomOp3 for SwigluBwd {
    fn name(&self) -> &'static str {
        "minimind-swiglu-bwd"
    }
    cuda_only!(3);
    fn cuda_fwd(
        &self,
        as_: &CudaStorage,
        al: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            (as_, al): (&CudaStorage, &Layout),
            (bs, bl): (&CudaStorage, &Layout),
            (gs, gl): (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let (a, b) = (
                contiguous::<T>(as_, al, "a")?,
                contiguous::<T>(bs, bl, "b")?,
            );
            let g = contiguous::<T>(gs, gl, "grad")?;
            let n = al.shape().elem_count();
            elementwise::<T>(as_.device(), "swiglu_bwd", as_.dtype(), &[&a, &b, &g], n, 2)
        }
        same_dtype(as_, bs)?;
        same_dtype(as_, gs)?;
        let out = by_dtype!(as_.dtype(), run((as_, al), (bs, bl), (gs, gl)))?;
        let mut dims = vec![2];
        dims.extend_from_slice(al.shape().dims());
        Ok((out, Shape::from(dims)))
    }
}

/// Hands a storage made by another op over as a tensor of the argument's shape (no copy).
struct Emit(Mutex<Option<CudaStorage>>);

impl CustomOp1 for Emit {
    fn name(&self) -> &'static str {
        "minimind-emit"
    }
    cuda_only!(1);
    fn cuda_fwd(&self, _: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let s = self.0.lock().expect("emit lock").take();
        let s = s.ok_or_else(|| candle_core::Error::Msg("emit: nothing to hand over".into()))?;
        Ok((s, l.shape().clone()))
    }
}

/// Launch a one-warp-per-row kernel over `rows` rows with the arguments pushed on `b`.
fn launch(mut b: LaunchArgs<'_>, rows: usize) -> Result<()> {
    // SAFETY: the kernels read `rows` rows of the argument views and write as many of the
    // outputs, all sized by the caller from the same shapes.
    unsafe { b.launch(row_config(rows)) }.w()?;
    Ok(())
}
