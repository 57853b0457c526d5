#!/usr/bin/env bash
# Build `minimind-v --features cuda` on a machine with no GPU and no system CUDA (docs/GPU.md).
# nvcc, headers and libraries for CUDA 13.0 come from NVIDIA's PyPI wheels in a local venv;
# libcuda (the driver) is linked against a generated stub and provided at run time by the GPU
# machine's driver. FEATURES=nccl adds NCCL (nvidia-nccl-cu13) for multi-GPU data parallel.
# Builds in target/cuda (apart from the CPU build); stripped binary: target/minimind-v-cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CUDA_VENV:-.venv-cuda}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}   # H100/H200; 80 for A100, 89 for L4/4090

if [ ! -x "$VENV/bin/pip" ]; then python3 -m venv "$VENV"; fi
VENV=$(cd "$VENV" && pwd)   # absolute: the link directory below holds symlinks into it
# 13.0 on purpose: newer nvcc emits PTX too new for the 580 driver of the H100/H200 machines
# this was measured on.
"$VENV/bin/pip" install -q \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-cccl==13.0.*" \
    "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*"
# libjpeg-turbo is built from source: cmake from PyPI when the machine has none (without nasm it
# builds without SIMD: the same pixels, decoded more slowly).
command -v cmake >/dev/null || { "$VENV/bin/pip" install -q cmake; export PATH="$VENV/bin:$PATH"; }
FEATURES=${FEATURES:-cuda}
case ",$FEATURES," in *,nccl,*) "$VENV/bin/pip" install -q "nvidia-nccl-cu13" ;; esac

NVCC=$(find "$VENV" -path '*/bin/nvcc' -type f | head -1)
[ -n "$NVCC" ] || { echo "nvcc not found under $VENV" >&2; exit 1; }
CUDA_ROOT=$(cd "$(dirname "$NVCC")/.." && pwd)
export CUDA_ROOT CUDA_PATH=$CUDA_ROOT CUDA_HOME=$CUDA_ROOT
export PATH="$CUDA_ROOT/bin:$PATH"
echo "CUDA from wheels: $CUDA_ROOT ($("$NVCC" --version | tail -1))"

# Unversioned .so names for the linker, and a libcuda stub exporting every cu* symbol that
# cuda.h names (the real driver library replaces it at run time).
LINK=$PWD/target/cuda-link
mkdir -p "$LINK"
for lib in "$CUDA_ROOT"/lib/lib*.so.* $(find "$VENV" -name 'libnccl.so.*' -type f); do
    base=$(basename "$lib"); ln -sf "$lib" "$LINK/${base%%.so.*}.so"
done
grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$CUDA_ROOT/include/cuda.h" | sort -u \
    | awk '{print "void " $1 "(void) {}"}' > "$LINK/cuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/cuda_stub.c"

if [ "${CUDA_DEPS_ONLY:-0}" = 1 ]; then echo "toolchain ready in $LINK (CUDA_DEPS_ONLY=1: not building)"; exit 0; fi

export RUSTFLAGS="${RUSTFLAGS:-} -L native=$LINK -L native=$CUDA_ROOT/lib"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
cargo build --release --features "$FEATURES"
strip -o target/minimind-v-cuda "$CARGO_TARGET_DIR/release/minimind-v"
# ~136 MB stripped (kernels for every dtype); the xz copy (~22 MB) is the one to copy to a GPU host.
xz -T0 -6 -k -f -c target/minimind-v-cuda > target/minimind-v-cuda.xz
ls -la target/minimind-v-cuda target/minimind-v-cuda.xz
echo "run on the GPU machine with LD_LIBRARY_PATH pointing at libcublas/libcublasLt/libcurand/libcudart 13 (and libnccl.so.2 for FEATURES=nccl)"
