//! Device choice lives here and only here.

use candle_core::Device;

use crate::error::Result;

/// `cpu`, `cuda` / `cuda:N`, or `auto` (CUDA when this build has it and a driver is present).
/// `cuda` and `auto` without a number take the GPU `LOCAL_RANK` names when it is set (torchrun
/// and similar launchers start one process per GPU and tell each its index on the machine).
pub fn select(spec: &str) -> Result<Device> {
    let local = || local_ordinal(std::env::var("LOCAL_RANK").ok().as_deref());
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(cuda(local()?).unwrap_or(Device::Cpu)),
        s => {
            let ordinal = match s.strip_prefix("cuda") {
                Some("") => local()?,
                Some(n) => n.trim_start_matches(':').parse().map_err(|_| bad(s))?,
                None => return Err(bad(s)),
            };
            cuda(ordinal).ok_or_else(|| {
                crate::Error::Config(format!(
                    "device {s}: CUDA is not available (build with `--features cuda`, and check the NVIDIA driver: libcuda.so)"
                ))
            })
        }
    }
}

/// Another handle on `device` for work that should overlap with what already runs there: on
/// CUDA the same GPU with its own stream (tensors are not shared between the two), on the CPU
/// the CPU.
pub fn another_stream(device: &Device) -> Result<Device> {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => Ok(Device::new_cuda_with_stream(gpu_id)?),
        _ => Ok(device.clone()),
    }
}

/// `f()` with candle's process-wide switch for TF32 f32 matmuls (CUDA) set to `on`, then as before.
pub fn with_tf32<T>(on: bool, f: impl FnOnce() -> T) -> T {
    let before = candle_core::cuda::gemm_reduced_precision_f32();
    candle_core::cuda::set_gemm_reduced_precision_f32(on);
    let out = f();
    candle_core::cuda::set_gemm_reduced_precision_f32(before);
    out
}

/// How many CLIP streams ingest runs when not told: two on a GPU (one's copies and host work
/// overlap the other's forward), one on the CPU (the forward already uses every core).
pub fn default_clip_streams(device: &Device) -> usize {
    if device.is_cuda() {
        2
    } else {
        1
    }
}

/// The host's CPU model and the cores this process may use, e.g. "AMD EPYC, 2 cores" (Linux's
/// `/proc/cpuinfo`; "unknown CPU" elsewhere). Floating-point results and speed differ between CPU
/// models, so measurements name it.
pub fn cpu_description() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model}, {cores} cores")
}

/// The GPU index a launcher's `LOCAL_RANK` gives (0 without one).
fn local_ordinal(local_rank: Option<&str>) -> Result<usize> {
    match local_rank {
        None => Ok(0),
        Some(v) => v.trim().parse().map_err(|_| {
            crate::Error::Config(format!(
                "LOCAL_RANK={v:?}: expected this process's GPU index on its machine (0, 1, …)"
            ))
        }),
    }
}

fn bad(s: &str) -> crate::Error {
    crate::Error::Config(format!("device {s:?}: expected cpu, cuda, cuda:N or auto"))
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Option<Device> {
    // `Device::new_cuda` panics when libcuda is missing: look for the driver first.
    let has_driver = ["libcuda.so.1", "libcuda.so"]
        .iter()
        .any(|lib| unsafe { libloading_probe(lib) });
    if !has_driver {
        return None;
    }
    Device::new_cuda(ordinal).ok()
}

#[cfg(feature = "cuda")]
unsafe fn libloading_probe(name: &str) -> bool {
    let c = std::ffi::CString::new(name).expect("no NUL in library name");
    extern "C" {
        fn dlopen(filename: *const std::ffi::c_char, flag: i32) -> *mut std::ffi::c_void;
    }
    !dlopen(c.as_ptr(), 1).is_null()
}

#[cfg(not(feature = "cuda"))]
fn cuda(_ordinal: usize) -> Option<Device> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_launchers_local_rank_picks_the_gpu() {
        assert_eq!(local_ordinal(None).unwrap(), 0);
        assert_eq!(local_ordinal(Some("3")).unwrap(), 3);
        let err = local_ordinal(Some("x")).unwrap_err().to_string();
        assert!(err.contains("LOCAL_RANK=\"x\""), "{err}");
        // Without CUDA in the build, `auto` stays on the CPU whatever LOCAL_RANK says.
        if !cfg!(feature = "cuda") {
            assert!(select("auto").unwrap().is_cpu());
        }
    }
}
