// GroupNorm (optionally followed by SiLU) in two launches, for f32, f16 and bf16.
//
// The input is contiguous (batch, channels, spatial...). Row r = b * groups + g is the
// contiguous run of channels_per_group * spatial values of sample b, group g. Rows are split in
// chunks of CHUNK values so that a few large rows (the VAE at 512x512: 32 rows of a million
// values) still fill the GPU.
//
// Pass 1 (group_norm_stats_*): one block per (chunk, row) sums x - shift and (x - shift)^2 in
// f32, where shift is the row's first value: shifting by a sample of the data keeps the
// variance from cancelling when the mean is large against the spread.
// Pass 2 (group_norm_apply_*): each block adds up its row's chunk partials, then writes
// (x - mean) * rstd * gamma[c] + beta[c] (and SiLU) for its chunk.
// `vec` (both passes): 16-byte loads and stores; the caller checks that the input starts
// 16-byte aligned and that spatial (hence row_len) is a multiple of 16 / sizeof(T).
//
// Rows that fit in one block's registers (up to ROW_THREADS x R 16-byte words, R <= 16: 64 Ki
// values in f16, all of the UNet's and ControlNet's GroupNorms at 512x512) take one launch
// instead (group_norm_row_*_r{R}): one block per row loads it once, reduces the mean, then the
// centred sum of squares (exact two-pass statistics, from registers), and writes the output.
// A UNet step has about 90 GroupNorms, each two short launches before.

#include "common.cuh"

#define THREADS 256
#define CHUNK 8192

// partials: rows x chunks x 2 floats (shifted sum, shifted sum of squares).
template <typename T>
__device__ void stats(const T *__restrict__ x, float *__restrict__ partials, int64_t row_len, int chunks, int vec) {
    constexpr int VEC = Pack<T>::VEC;
    const int chunk = blockIdx.x, row = blockIdx.y;
    const T *xr = x + (int64_t)row * row_len;
    const float shift = to_float(xr[0]);
    const int64_t begin = (int64_t)chunk * CHUNK;
    const int64_t end = min(begin + CHUNK, row_len);
    float s = 0.f, ss = 0.f;
    if (vec) {
        for (int64_t i = begin + threadIdx.x * VEC; i < end; i += THREADS * VEC) {
            const Pack<T> p = load16(xr + i);
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const float v = to_float(p.v[j]) - shift;
                s += v;
                ss += v * v;
            }
        }
    } else {
        for (int64_t i = begin + threadIdx.x; i < end; i += THREADS) {
            const float v = to_float(xr[i]) - shift;
            s += v;
            ss += v * v;
        }
    }
    block_sum2<THREADS>(s, ss);
    if (threadIdx.x == 0) {
        float *p = partials + ((int64_t)row * chunks + chunk) * 2;
        p[0] = s;
        p[1] = ss;
    }
}

template <typename T>
__device__ void apply(const T *__restrict__ x, const float *__restrict__ partials, const T *__restrict__ gamma,
                      const T *__restrict__ beta, T *__restrict__ y, int64_t row_len, int chunks, int64_t spatial,
                      int channels_per_group, int groups, float eps, int silu, int vec) {
    constexpr int VEC = Pack<T>::VEC;
    const int chunk = blockIdx.x, row = blockIdx.y;
    __shared__ float mean_rstd[2];
    float s = 0.f, ss = 0.f;
    for (int i = threadIdx.x; i < chunks; i += THREADS) {
        s += partials[((int64_t)row * chunks + i) * 2];
        ss += partials[((int64_t)row * chunks + i) * 2 + 1];
    }
    block_sum2<THREADS>(s, ss);
    const T *xr = x + (int64_t)row * row_len;
    if (threadIdx.x == 0) {
        const float n = (float)row_len;
        const float m = s / n;
        const float var = fmaxf(ss / n - m * m, 0.f);
        mean_rstd[0] = to_float(xr[0]) + m;
        mean_rstd[1] = rsqrtf(var + eps);
    }
    __syncthreads();
    const float mean = mean_rstd[0], rstd = mean_rstd[1];
    const int first_channel = (row % groups) * channels_per_group;
    T *yr = y + (int64_t)row * row_len;
    const int64_t begin = (int64_t)chunk * CHUNK;
    const int64_t end = min(begin + CHUNK, row_len);
    if (vec) {
        // spatial % VEC == 0: the VEC values of a word share a channel.
        for (int64_t i = begin + threadIdx.x * VEC; i < end; i += THREADS * VEC) {
            const int c = first_channel + (int)(i / spatial);
            const float scale = rstd * to_float(gamma[c]);
            const float offset = to_float(beta[c]) - mean * scale;
            Pack<T> p = load16(xr + i);
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                float v = to_float(p.v[j]) * scale + offset;
                if (silu) v = v / (1.f + __expf(-v));
                p.v[j] = from_float<T>(v);
            }
            store16(yr + i, p);
        }
        return;
    }
    for (int64_t i = begin + threadIdx.x; i < end; i += THREADS) {
        const int c = first_channel + (int)(i / spatial);
        float v = (to_float(xr[i]) - mean) * rstd * to_float(gamma[c]) + to_float(beta[c]);
        if (silu) v = v / (1.f + __expf(-v));
        yr[i] = from_float<T>(v);
    }
}

#define ROW_THREADS 512

// Block-wide sum over ROW_THREADS threads, returned to every thread.
__device__ __forceinline__ float row_block_sum(float a, float *shared) {
    for (int offset = 16; offset > 0; offset >>= 1) a += __shfl_xor_sync(0xffffffff, a, offset);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = a;
    __syncthreads();
    a = 0.f;
#pragma unroll
    for (int w = 0; w < ROW_THREADS / 32; ++w) a += shared[w];
    __syncthreads();  // `shared` is reused by the next sum
    return a;
}

// One block per row (blockIdx.x), R 16-byte words per thread; row_len % VEC == 0 and the input
// 16-byte aligned (checked by the caller), row_len <= ROW_THREADS * R * VEC.
template <typename T, int R>
__device__ void row_norm(const T *__restrict__ x, const T *__restrict__ gamma, const T *__restrict__ beta,
                         T *__restrict__ y, int row_len, int spatial, int channels_per_group, int groups, float eps,
                         int silu) {
    constexpr int VEC = Pack<T>::VEC;
    __shared__ float partial[ROW_THREADS / 32];
    const int row = blockIdx.x;
    const T *xr = x + (int64_t)row * row_len;
    T *yr = y + (int64_t)row * row_len;
    Pack<T> p[R];
    float s = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int i = (r * ROW_THREADS + threadIdx.x) * VEC;
        if (i < row_len) {
            p[r] = load16(xr + i);
#pragma unroll
            for (int j = 0; j < VEC; ++j) s += to_float(p[r].v[j]);
        }
    }
    const float n = (float)row_len;
    const float mean = row_block_sum(s, partial) / n;
    float ss = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int i = (r * ROW_THREADS + threadIdx.x) * VEC;
        if (i < row_len) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const float d = to_float(p[r].v[j]) - mean;
                ss += d * d;
            }
        }
    }
    const float rstd = rsqrtf(row_block_sum(ss, partial) / n + eps);
    const int first_channel = (row % groups) * channels_per_group;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int i = (r * ROW_THREADS + threadIdx.x) * VEC;
        if (i < row_len) {
            // spatial % VEC == 0: the VEC values of a word share a channel.
            const int c = first_channel + i / spatial;
            const float scale = rstd * to_float(gamma[c]);
            const float offset = to_float(beta[c]) - mean * scale;
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                float v = to_float(p[r].v[j]) * scale + offset;
                if (silu) v = v / (1.f + __expf(-v));
                p[r].v[j] = from_float<T>(v);
            }
            store16(yr + i, p[r]);
        }
    }
}

#define GROUP_NORM_ROW(NAME, T, R)                                                                             \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS)                                                  \
        group_norm_row_##NAME##_r##R(const T *x, const T *gamma, const T *beta, T *y, int row_len, int spatial, \
                                     int channels_per_group, int groups, float eps, int silu) {                \
        row_norm<T, R>(x, gamma, beta, y, row_len, spatial, channels_per_group, groups, eps, silu);            \
    }
#define GROUP_NORM_ROWS(NAME, T)    \
    GROUP_NORM_ROW(NAME, T, 1)      \
    GROUP_NORM_ROW(NAME, T, 2)      \
    GROUP_NORM_ROW(NAME, T, 4)      \
    GROUP_NORM_ROW(NAME, T, 8)      \
    GROUP_NORM_ROW(NAME, T, 16)

GROUP_NORM_ROWS(f32, float)
GROUP_NORM_ROWS(f16, __half)
GROUP_NORM_ROWS(bf16, __nv_bfloat16)

#define GROUP_NORM(NAME, T)                                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                        \
        group_norm_stats_##NAME(const T *x, float *partials, int64_t row_len, int chunks, int vec) {             \
        stats<T>(x, partials, row_len, chunks, vec);                                                             \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                        \
        group_norm_apply_##NAME(const T *x, const float *partials, const T *gamma, const T *beta, T *y,          \
                                int64_t row_len, int chunks, int64_t spatial, int channels_per_group, int groups, \
                                float eps, int silu, int vec) {                                                  \
        apply<T>(x, partials, gamma, beta, y, row_len, chunks, spatial, channels_per_group, groups, eps, silu,    \
                 vec);                                                                                           \
    }

GROUP_NORM(f32, float)
GROUP_NORM(f16, __half)
GROUP_NORM(bf16, __nv_bfloat16)
