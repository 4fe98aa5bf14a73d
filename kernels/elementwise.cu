// Fused element-wise epilogues for f32, f16 and bf16, so that a convolution's or a linear
// layer's bias, a per-sample channel bias (the resnet's time embedding) and a residual add cost
// one pass over the activations instead of up to three candle kernels (whose broadcast path
// recomputes a strided index per element), and GEGLU costs one pass instead of three.
// Arithmetic is in f32; the result is rounded once.
//
// bias_add_rows_*: x is a contiguous (rows, cols) matrix; out = act((x + bias[row % groups]) *
//   scale (+ residual)); bias may be null (no bias); act 0 is none, 1 ReLU, 2 SiLU. A (N, C, H, W)
//   convolution output is rows = N * C, cols = H * W with groups = C (a per-channel bias) or
//   groups = N * C (a per-sample, per-channel bias).
// bias_add_cols_*: x is (rows, cols); out = act((x + bias[col]) * scale (+ residual)): a linear
//   layer's output, or a channels-last convolution's (rows = N * H * W, cols = C).
// geglu_*: h is (rows, 2f); out (rows, f) = (h[:, j] + b[j]) * gelu_erf(h[:, f + j] + b[f + j]),
//   diffusers' GEGLU with the projection's bias folded in (b may be null).
// layer_norm_*: see layer_norm_rows below (its own launch shape).
//
// Launch: block THREADS. `vec` != 0 selects 16-byte loads and stores (the caller checks that cols,
// f for GEGLU, is a multiple of VEC, every pointer is 16-byte aligned and the output's words
// fit in 31 bits): grid (ceil(words / THREADS) capped, 1), threads loop over the words. Else grid
// (ceil(cols / (THREADS * VEC)), min(rows, 65535)): blocks loop over rows in steps of gridDim.y.

#include "common.cuh"

#define THREADS 256

__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

// PER_COL: the bias is indexed by column (linear layers), else by row % groups (convolutions).
// The vector path walks the whole matrix in 16-byte words (its rows may be shorter than a block:
// a linear layer's 320 features are 40 words), the scalar path one row per block row.
#define ACT_NONE 0
#define ACT_RELU 1
#define ACT_SILU 2

__device__ __forceinline__ float activate(float y, int act) {
    if (act == ACT_RELU) return fmaxf(y, 0.f);
    if (act == ACT_SILU) return y / (1.f + __expf(-y));
    return y;
}

template <typename T, bool PER_COL>
__device__ __forceinline__ void bias_add(const T* __restrict__ x, const T* __restrict__ bias,
                                         const T* __restrict__ residual, T* __restrict__ out, int64_t rows,
                                         int64_t cols, int64_t groups, float scale, int vec, int act) {
    constexpr int VEC = Pack<T>::VEC;
    if (vec) {
        // The caller checks that rows * cols / VEC fits in 31 bits.
        const uint32_t words = static_cast<uint32_t>(rows * cols / VEC), row_words = static_cast<uint32_t>(cols / VEC);
        for (uint32_t w = blockIdx.x * THREADS + threadIdx.x; w < words; w += gridDim.x * THREADS) {
            const uint32_t row = w / row_words, col = (w - row * row_words) * VEC;
            Pack<T> xv = load16(x + static_cast<int64_t>(w) * VEC);
            Pack<T> rv;
            if (residual) rv = load16(residual + static_cast<int64_t>(w) * VEC);
            Pack<T> bv;
            float row_bias = 0.f;
            if (bias && PER_COL) bv = load16(bias + col);
            else if (bias) row_bias = to_float(bias[row % static_cast<uint32_t>(groups)]);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                float y = (to_float(xv.v[i]) + (bias && PER_COL ? to_float(bv.v[i]) : row_bias)) * scale;
                if (residual) y += to_float(rv.v[i]);
                xv.v[i] = from_float<T>(activate(y, act));
            }
            store16(out + static_cast<int64_t>(w) * VEC, xv);
        }
        return;
    }
    for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
        const float row_bias = (PER_COL || !bias) ? 0.f : to_float(bias[row % groups]);
        const int64_t base = row * cols;
        for (int64_t col = static_cast<int64_t>(blockIdx.x) * THREADS * VEC + threadIdx.x;
             col < cols && col < (static_cast<int64_t>(blockIdx.x) + 1) * THREADS * VEC; col += THREADS) {
            float y = (to_float(x[base + col]) + (bias && PER_COL ? to_float(bias[col]) : row_bias)) * scale;
            if (residual) y += to_float(residual[base + col]);
            out[base + col] = from_float<T>(activate(y, act));
        }
    }
}

template <typename T>
__device__ __forceinline__ void geglu(const T* __restrict__ h, const T* __restrict__ bias, T* __restrict__ out,
                                      int64_t rows, int64_t f, int vec) {
    constexpr int VEC = Pack<T>::VEC;
    if (vec) {
        // Flat over the output's 16-byte words, as bias_add (rows * f / VEC fits in 31 bits).
        const uint32_t words = static_cast<uint32_t>(rows * f / VEC), row_words = static_cast<uint32_t>(f / VEC);
        for (uint32_t w = blockIdx.x * THREADS + threadIdx.x; w < words; w += gridDim.x * THREADS) {
            const uint32_t row = w / row_words, col = (w - row * row_words) * VEC;
            const T* hr = h + static_cast<int64_t>(row) * 2 * f;
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
            store16(out + static_cast<int64_t>(w) * VEC, a);
        }
        return;
    }
    for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
        const T* hr = h + row * 2 * f;
        T* orow = out + row * f;
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

// out (n, ca + cb, s) = a (n, ca, s) next to b (n, cb, s) (+ b_add, b's shape) on the channel
// dim: a UNet up block's input and its skip connection (plus the ControlNet residual), one pass.
// s % VEC == 0, 16-byte aligned pointers, fewer than 2^31 output words and 2^32 output values
// (the caller checks). Launch as the flat bias_add.
template <typename T>
__device__ __forceinline__ void concat_channels(const T* __restrict__ a, const T* __restrict__ b,
                                                const T* __restrict__ b_add, T* __restrict__ out, int64_t n,
                                                int64_t a_values, int64_t b_values) {
    constexpr int VEC = Pack<T>::VEC;
    const uint32_t sample = static_cast<uint32_t>(a_values + b_values);
    const uint32_t words = static_cast<uint32_t>(n * (a_values + b_values) / VEC);
    const uint32_t a_len = static_cast<uint32_t>(a_values), b_len = static_cast<uint32_t>(b_values);
    for (uint32_t w = blockIdx.x * THREADS + threadIdx.x; w < words; w += gridDim.x * THREADS) {
        const uint32_t e = w * VEC, row = e / sample, within = e - row * sample;
        Pack<T> v;
        if (within < a_len) {
            v = load16(a + static_cast<int64_t>(row) * a_len + within);
        } else {
            const int64_t at = static_cast<int64_t>(row) * b_len + (within - a_len);
            v = load16(b + at);
            if (b_add) {
                const Pack<T> r = load16(b_add + at);
#pragma unroll
                for (int i = 0; i < VEC; ++i) v.v[i] = from_float<T>(to_float(v.v[i]) + to_float(r.v[i]));
            }
        }
        store16(out + static_cast<int64_t>(w) * VEC, v);
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
                             int64_t groups, float scale, int vec, int act) {                                  \
        bias_add<T, false>(x, bias, residual, out, rows, cols, groups, scale, vec, act);                       \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                      \
        bias_add_cols_##NAME(const T* x, const T* bias, const T* residual, T* out, int64_t rows, int64_t cols, \
                             int64_t groups, float scale, int vec, int act) {                                  \
        bias_add<T, true>(x, bias, residual, out, rows, cols, groups, scale, vec, act);                        \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                      \
        concat_channels_##NAME(const T* a, const T* b, const T* b_add, T* out, int64_t n, int64_t a_values,    \
                               int64_t b_values) {                                                             \
        concat_channels<T>(a, b, b_add, out, n, a_values, b_values);                                           \
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
