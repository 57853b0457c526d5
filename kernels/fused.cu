// minimind-v's own CUDA kernels (src/model/cuda.rs): the training step's row-wise operations in
// one pass each, forward and backward, where candle's elementary kernels took five to ten
// passes per operation (docs/GPU.md, the H100 profile). Math in f32 whatever the storage type.
// Row-wise kernels: one warp per row, rows indexed by (blockIdx.x * blockDim.y + threadIdx.y);
// elementwise ones: a grid-stride loop.
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
    return __float2bfloat16(v);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

__device__ __forceinline__ long row_index() {
    return (long)blockIdx.x * blockDim.y + threadIdx.y;
}

// Causal attention softmax over rows of s keys: row r is query i = r % t, which sees keys
// j <= i + off (off = s - t: the keys before the first query); y = softmax(scale * x) there,
// 0 beyond. Upstream's scores / sqrt(hd) + causal mask, softmax in f32.
template <typename T>
__device__ void causal_softmax(const T *x, T *y, long rows, int t, int s, int off, float scale) {
    long r = row_index();
    if (r >= rows) return;
    int lim = min((int)(r % t) + off + 1, s);
    const T *xr = x + r * s;
    T *yr = y + r * s;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < lim; j += 32) m = fmaxf(m, to_f(xr[j]) * scale);
    m = warp_max(m);
    float sum = 0.f;
    for (int j = threadIdx.x; j < lim; j += 32) sum += __expf(to_f(xr[j]) * scale - m);
    float inv = 1.f / warp_sum(sum);
    for (int j = threadIdx.x; j < s; j += 32) {
        yr[j] = from_f<T>(j < lim ? __expf(to_f(xr[j]) * scale - m) * inv : 0.f);
    }
}

// Its backward: dx = scale * y * (g - sum(g * y)) (0 where masked, since y is).
template <typename T>
__device__ void softmax_bwd(const T *y, const T *g, T *dx, long rows, int s, float scale) {
    long r = row_index();
    if (r >= rows) return;
    const T *yr = y + r * s;
    const T *gr = g + r * s;
    T *dr = dx + r * s;
    float dot = 0.f;
    for (int j = threadIdx.x; j < s; j += 32) dot += to_f(gr[j]) * to_f(yr[j]);
    dot = warp_sum(dot);
    for (int j = threadIdx.x; j < s; j += 32) {
        dr[j] = from_f<T>(scale * to_f(yr[j]) * (to_f(gr[j]) - dot));
    }
}

// Upstream's RMSNorm over rows of c: y = w * x / sqrt(mean(x^2) + eps).
template <typename T>
__device__ void rms_norm(const T *x, const T *w, T *y, long rows, int c, float eps) {
    long r = row_index();
    if (r >= rows) return;
    const T *xr = x + r * c;
    T *yr = y + r * c;
    float ss = 0.f;
    for (int j = threadIdx.x; j < c; j += 32) {
        float v = to_f(xr[j]);
        ss += v * v;
    }
    float rs = rsqrtf(warp_sum(ss) / c + eps);
    for (int j = threadIdx.x; j < c; j += 32) yr[j] = from_f<T>(to_f(w[j]) * to_f(xr[j]) * rs);
}

// Its backward for x, and each row's share of w's: with xh = x * rs,
// dx = rs * (g*w - xh * mean(g*w*xh)); gxh = g * xh (f32; dw is its sum over rows).
template <typename T>
__device__ void rms_norm_bwd(const T *x, const T *w, const T *g, T *dx, float *gxh, long rows,
                             int c, float eps) {
    long r = row_index();
    if (r >= rows) return;
    const T *xr = x + r * c;
    const T *gr = g + r * c;
    float ss = 0.f;
    for (int j = threadIdx.x; j < c; j += 32) {
        float v = to_f(xr[j]);
        ss += v * v;
    }
    float rs = rsqrtf(warp_sum(ss) / c + eps);
    float dot = 0.f;
    for (int j = threadIdx.x; j < c; j += 32) dot += to_f(gr[j]) * to_f(w[j]) * to_f(xr[j]) * rs;
    dot = warp_sum(dot) / c;
    for (int j = threadIdx.x; j < c; j += 32) {
        float xh = to_f(xr[j]) * rs, gv = to_f(gr[j]);
        dx[r * c + j] = from_f<T>(rs * (gv * to_f(w[j]) - xh * dot));
        gxh[r * c + j] = gv * xh;
    }
}

// SwiGLU's gate: y = silu(a) * b, elementwise over n values, grid-stride.
template <typename T> __device__ void swiglu(const T *a, const T *b, T *y, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long)blockDim.x * gridDim.x) {
        float av = to_f(a[i]);
        y[i] = from_f<T>(av / (1.f + __expf(-av)) * to_f(b[i]));
    }
}

// Its backward into one buffer: dab[0..n) = da = g * b * silu'(a), dab[n..2n) = db = g * silu(a),
// with silu'(a) = s (1 + a (1 - s)), s = sigmoid(a).
template <typename T> __device__ void swiglu_bwd(const T *a, const T *b, const T *g, T *dab, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long)blockDim.x * gridDim.x) {
        float av = to_f(a[i]), gv = to_f(g[i]);
        float s = 1.f / (1.f + __expf(-av));
        dab[i] = from_f<T>(gv * to_f(b[i]) * s * (1.f + av * (1.f - s)));
        dab[n + i] = from_f<T>(gv * av * s);
    }
}

#define KERNELS(T, SUFFIX)                                                                      \
    extern "C" __global__ void causal_softmax_##SUFFIX(const T *x, T *y, long rows, int t,      \
                                                       int s, int off, float scale) {          \
        causal_softmax<T>(x, y, rows, t, s, off, scale);                                        \
    }                                                                                           \
    extern "C" __global__ void softmax_bwd_##SUFFIX(const T *y, const T *g, T *dx, long rows,   \
                                                    int s, float scale) {                       \
        softmax_bwd<T>(y, g, dx, rows, s, scale);                                               \
    }                                                                                           \
    extern "C" __global__ void rms_norm_##SUFFIX(const T *x, const T *w, T *y, long rows,       \
                                                 int c, float eps) {                            \
        rms_norm<T>(x, w, y, rows, c, eps);                                                     \
    }                                                                                           \
    extern "C" __global__ void rms_norm_bwd_##SUFFIX(const T *x, const T *w, const T *g, T *dx, \
                                                     float *gxh, long rows, int c, float eps) { \
        rms_norm_bwd<T>(x, w, g, dx, gxh, rows, c, eps);                                        \
    }                                                                                           \
    extern "C" __global__ void swiglu_##SUFFIX(const T *a, const T *b, T *y, long n) {          \
        swiglu<T>(a, b, y, n);                                                                  \
    }                                                                                           \
    extern "C" __global__ void swiglu_bwd_##SUFFIX(const T *a, const T *b, const T *g, T *dab,  \
                                                   long n) {                                    \
        swiglu_bwd<T>(a, b, g, dab, n);                                                         \
    }

KERNELS(float, f32)
KERNELS(__nv_bfloat16, bf16)
