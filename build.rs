//! In a `cuda` build, compile kernels/fused.cu to PTX for src/model/cuda.rs with nvcc (NVCC, else
//! CUDA_ROOT/bin/nvcc, else nvcc on PATH), for CUDA_COMPUTE_CAP (default 90) as candle's own
//! kernels are. A CPU build needs no CUDA toolchain and compiles nothing here.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/fused.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_ROOT").map(|r| PathBuf::from(r).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("fused.ptx");
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            &format!("-arch=sm_{cap}"),
            "kernels/fused.cu",
            "-o",
        ])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running {} (set NVCC or CUDA_ROOT): {e}", nvcc.display()));
    assert!(
        status.success(),
        "nvcc failed on kernels/fused.cu ({status})"
    );
}
