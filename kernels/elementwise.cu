// Fused element-wise epilogues for f32, f16 and bf16, so that a convolution's or a linear
// layer's bias, a per-sample channel bias (the resnet's time embedding) and a residual add cost
// one pass over the activations instead of up to three candle kernels (whose broadcast path
// recomputes a strided index per element), and GEGLU costs one pass instead of three.
// Arithmetic is in f32; the result is rounded once.
//
// bias_add_rows_*: x is a contiguous (rows, cols) matrix; out = x + bias[row % groups]
//   (+ residual). A (N, C, H, W) convolution output is rows = N * C, cols = H * W with groups = C
//   (a per-channel bias) or groups = N * C (a per-sample, per-channel bias).
// bias_add_cols_*: x is (rows, cols); out = x + bias[col] (+ residual): a linear layer's output.
// geglu_*: h is (rows, 2f); out (rows, f) = (h[:, j] + b[j]) * gelu_erf(h[:, f + j] + b[f + j]),
//   diffusers' GEGLU with the projection's bias folded in (b may be null).
// layer_norm_*: see layer_norm_rows below (its own launch shape).
//
// Launch: block THREADS; grid (ceil(cols / (THREADS * VEC)), min(rows, 65535)); blocks loop over
// rows in steps of gridDim.y. `vec` != 0 selects 16-byte loads and stores: the caller checks
// that cols (f for GEGLU) is a multiple of VEC and every pointer is 16-byte aligned.

#include "common.cuh"

#define THREADS 256

__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

// PER_COL: the bias is indexed by column (linear layers), else by row % groups (convolutions).
template <typename T, bool PER_COL>
__device__ __forceinline__ void bias_add(const T* __restrict__ x, const T* __restrict__ bias,
                                         const T* __restrict__ residual, T* __restrict__ out, int64_t rows,
                                         int64_t cols, int64_t groups, int vec) {
    constexpr int VEC = Pack<T>::VEC;
    for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
        const float row_bias = PER_COL ? 0.f : to_float(bias[row % groups]);
        const int64_t base = row * cols;
        if (vec) {
            const int64_t col = (static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x) * VEC;
            if (col >= cols) continue;
            Pack<T> xv = load16(x + base + col);
            Pack<T> rv;
            if (residual) rv = load16(residual + base + col);
            Pack<T> bv;
            if (PER_COL) bv = load16(bias + col);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                float y = to_float(xv.v[i]) + (PER_COL ? to_float(bv.v[i]) : row_bias);
                if (residual) y += to_float(rv.v[i]);
                xv.v[i] = from_float<T>(y);
            }
            store16(out + base + col, xv);
        } else {
            for (int64_t col = static_cast<int64_t>(blockIdx.x) * THREADS * VEC + threadIdx.x;
                 col < cols && col < (static_cast<int64_t>(blockIdx.x) + 1) * THREADS * VEC; col += THREADS) {
                float y = to_float(x[base + col]) + (PER_COL ? to_float(bias[col]) : row_bias);
                if (residual) y += to_float(residual[base + col]);
                out[base + col] = from_float<T>(y);
            }
        }
    }
}

template <typename T>
__device__ __forceinline__ void geglu(const T* __restrict__ h, const T* __restrict__ bias, T* __restrict__ out,
                                      int64_t rows, int64_t f, int vec) {
    constexpr int VEC = Pack<T>::VEC;
    for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
        const T* hr = h + row * 2 * f;
        T* orow = out + row * f;
        if (vec) {
            const int64_t col = (static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x) * VEC;
            if (col >= f) continue;
            Pack<T> a = load16(hr + col);
            Pack<T> g = load16(hr + f + col);
            Pack<T> ba, bg;
            if (bias) {
                ba = load16(bias + col);
                bg = load16(bias + f + col);
            }
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                float av = to_float(a.v[i]), gv = to_float(g.v[i]);
                if (bias) {
                    av += to_float(ba.v[i]);
                    gv += to_float(bg.v[i]);
                }
                a.v[i] = from_float<T>(av * gelu_erf(gv));
            }
            store16(orow + col, a);
        } else {
            for (int64_t col = static_cast<int64_t>(blockIdx.x) * THREADS * VEC + threadIdx.x;
                 col < f && col < (static_cast<int64_t>(blockIdx.x) + 1) * THREADS * VEC; col += THREADS) {
                float av = to_float(hr[col]), gv = to_float(hr[f + col]);
                if (bias) {
                    av += to_float(bias[col]);
                    gv += to_float(bias[f + col]);
                }
                orow[col] = from_float<T>(av * gelu_erf(gv));
            }
        }
    }
}

// LayerNorm over rows of `cols` values (cols % VEC == 0, cols <= VEC * 32 * MAX_WORDS): one warp
// per row holds the row in registers, so x is read once; mean and variance in f32 (two passes
// over the registers), then (x - mean) * rstd * gamma + beta. Launch: block THREADS (8 rows),
// grid ceil(rows / 8) capped at 65535 (blocks loop over rows).
constexpr int LN_MAX_WORDS = 8;

template <typename T>
__device__ __forceinline__ void layer_norm_rows(const T* __restrict__ x, const T* __restrict__ gamma,
                                                const T* __restrict__ beta, T* __restrict__ out, int64_t rows,
                                                int cols, float eps) {
    constexpr int VEC = Pack<T>::VEC;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int words = cols / VEC;
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * (THREADS / 32) + warp; row < rows;
         row += static_cast<int64_t>(gridDim.x) * (THREADS / 32)) {
        const T* xr = x + row * cols;
        Pack<T> p[LN_MAX_WORDS];
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < LN_MAX_WORDS; ++k) {
            const int w = lane + 32 * k;
            if (w < words) {
                p[k] = load16(xr + w * VEC);
#pragma unroll
                for (int i = 0; i < VEC; ++i) sum += to_float(p[k].v[i]);
            }
        }
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
        const float mean = sum / cols;
        float var = 0.f;
#pragma unroll
        for (int k = 0; k < LN_MAX_WORDS; ++k) {
            if (lane + 32 * k < words) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    const float d = to_float(p[k].v[i]) - mean;
                    var += d * d;
                }
            }
        }
        for (int o = 16; o > 0; o >>= 1) var += __shfl_xor_sync(0xffffffff, var, o);
        const float rstd = rsqrtf(var / cols + eps);
        T* orow = out + row * cols;
#pragma unroll
        for (int k = 0; k < LN_MAX_WORDS; ++k) {
            const int w = lane + 32 * k;
            if (w < words) {
                const Pack<T> g = load16(gamma + w * VEC), b = load16(beta + w * VEC);
                Pack<T> y;
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    y.v[i] = from_float<T>((to_float(p[k].v[i]) - mean) * rstd * to_float(g.v[i]) + to_float(b.v[i]));
                }
                store16(orow + w * VEC, y);
            }
        }
    }
}

#define ELEMENTWISE(NAME, T)                                                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                      \
        bias_add_rows_##NAME(const T* x, const T* bias, const T* residual, T* out, int64_t rows, int64_t cols, \
                             int64_t groups, int vec) {                                                        \
        bias_add<T, false>(x, bias, residual, out, rows, cols, groups, vec);                                   \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                      \
        bias_add_cols_##NAME(const T* x, const T* bias, const T* residual, T* out, int64_t rows, int64_t cols, \
                             int64_t groups, int vec) {                                                        \
        bias_add<T, true>(x, bias, residual, out, rows, cols, groups, vec);                                    \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                      \
        geglu_##NAME(const T* h, const T* bias, T* out, int64_t rows, int64_t f, int vec) {                    \
        geglu<T>(h, bias, out, rows, f, vec);                                                                  \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                      \
        layer_norm_##NAME(const T* x, const T* gamma, const T* beta, T* out, int64_t rows, int cols, float eps) { \
        layer_norm_rows<T>(x, gamma, beta, out, rows, cols, eps);                                              \
    }

ELEMENTWISE(f32, float)
ELEMENTWISE(f16, __half)
ELEMENTWISE(bf16, __nv_bfloat16)
