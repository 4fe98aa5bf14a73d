// The kernels of a resnet block run channels-last (NHWC) between its two convolutions, so that
// cuDNN gets NHWC activations and filters and does not transpose them itself on every call
// (measured on an H200: NCHW convolutions of the UNet's shapes spend about a quarter of their
// time in cuDNN's own layout conversions).
//
// GroupNorm + SiLU, reading NCHW (the block's input) or NHWC (the first convolution's output),
// writing NHWC, in two launches:
//   gn_stats_{nchw,nhwc}_{T}: partial sums of x - shift and its square in f32, shift being the
//     group's first value (channel g * cpg, pixel 0), which keeps the variance from cancelling
//     when the mean is large against the spread. NCHW: one block per (chunk of a group's
//     contiguous run, sample x group), 16-byte loads. NHWC: one block per (STATS_PIXELS pixels,
//     sample) over every channel, each thread summing the 8 channels of one 16-byte word, the
//     threads' sums then added per group in a fixed order through shared memory. The last block
//     of a group (NCHW) or sample (NHWC) to finish, found with an atomic ticket, adds the
//     partials in chunk order and writes mean and 1 / std: the result does not depend on
//     which blocks ran first (CUDA graph replays must equal eager runs bit for bit).
//   gn_apply_{nchw,nhwc}_{T}: normalisation, affine and SiLU into NHWC: from NHWC flat over
//     16-byte words, from NCHW through 32 x 32 tiles in shared memory (coalesced both ways).
// `in_bias` (batch, channels), when not null, is added to the input first and the sum rounded
// to T (the value an NCHW bias pass would have stored): the resnet's first convolution's bias
// plus its time embedding.
// (A first version kept each (sample, group) row in one block's registers, as the NCHW kernel
// does: with NHWC rows of 20-byte runs 640 bytes apart and only batch x 32 blocks, it took
// 60-70 us per 2 x 320 x 64 x 64 call against 13 us for the NCHW kernel.)
//
// to_nchw_{f16,bf16}: y (batch, pixels, channels) + bias[c] + residual (batch, channels, pixels)
// -> (batch, channels, pixels), through 32 x 32 tiles in shared memory so that both the NHWC
// reads and the NCHW writes are coalesced; the sum is taken in f32 and rounded once.

#include "common.cuh"

#define STATS_THREADS 256
#define STATS_CHUNK 4096  // values of a group's contiguous NCHW run per block
#define STATS_PIXELS 32   // pixels per NHWC block
#define APPLY_THREADS 256

template <typename T>
__device__ __forceinline__ float biased(T v, const T *__restrict__ in_bias, int64_t at) {
    return in_bias == nullptr ? to_float(v) : to_float(from_float<T>(to_float(v) + to_float(in_bias[at])));
}

// The group's first value (channel g * cpg, pixel 0 of sample n), bias included.
template <typename T, bool NHWC>
__device__ __forceinline__ float group_shift(const T *__restrict__ x, const T *__restrict__ in_bias, int64_t n, int g,
                                             int pixels, int channels, int cpg) {
    const int c = g * cpg;
    const int64_t at = NHWC ? n * pixels * channels + c : (n * channels + c) * (int64_t)pixels;
    return biased(x[at], in_bias, n * channels + c);
}

// Called by every thread after the block wrote its partials: whether this block is the last of
// the `chunks` blocks counted by `ticket` (then the others' partials are visible to it).
__device__ __forceinline__ bool last_block(unsigned int *ticket, int chunks) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(ticket, 1u) == (unsigned int)chunks - 1;
    __syncthreads();
    return last;
}

// Mean and 1 / std of group g of sample n from its chunks' partials (added in chunk order).
template <typename T, bool NHWC>
__device__ __forceinline__ void finish_group(const T *__restrict__ x, const T *__restrict__ in_bias,
                                             const float *partials, float *__restrict__ stats, int64_t n, int g,
                                             int pixels, int channels, int cpg, int groups, int chunks, float eps) {
    const int64_t row = n * groups + g;
    float s = 0.f, ss = 0.f;
    for (int i = 0; i < chunks; ++i) {
        s += __ldcg(partials + (row * chunks + i) * 2);
        ss += __ldcg(partials + (row * chunks + i) * 2 + 1);
    }
    const float count = (float)cpg * (float)pixels;
    const float m = s / count;
    const float var = fmaxf(ss / count - m * m, 0.f);
    stats[row * 2] = group_shift<T, NHWC>(x, in_bias, n, g, pixels, channels, cpg) + m;
    stats[row * 2 + 1] = rsqrtf(var + eps);
}

// NCHW: grid (chunks, batch * groups), STATS_THREADS threads; one ticket per (sample, group).
// partials[((n * groups + g) * chunks + chunk) * 2 + {0, 1}], stats[(n * groups + g) * 2 + {mean,
// rstd}]. `vec`: 16-byte loads (pixels % VEC == 0, input aligned).
template <typename T>
__device__ void gn_stats_nchw(const T *__restrict__ x, const T *__restrict__ in_bias, float *partials,
                              unsigned int *tickets, float *__restrict__ stats, int pixels, int channels, int cpg,
                              int groups, int chunks, float eps, int vec) {
    constexpr int VEC = Pack<T>::VEC;
    const int chunk = blockIdx.x, row = blockIdx.y;
    const int64_t n = row / groups;
    const int g = row % groups;
    const int64_t row_len = (int64_t)cpg * pixels;
    const T *xr = x + row * row_len;  // (n, g) starts at (n * groups + g) * row_len
    const float shift = group_shift<T, false>(x, in_bias, n, g, pixels, channels, cpg);
    const int64_t begin = (int64_t)chunk * STATS_CHUNK;
    const int64_t end = min(begin + STATS_CHUNK, row_len);
    const int64_t bias_row = n * channels + g * cpg;
    float s = 0.f, ss = 0.f;
    if (vec) {
        for (int64_t i = begin + threadIdx.x * VEC; i < end; i += STATS_THREADS * VEC) {
            const Pack<T> p = load16(xr + i);
            const int64_t bias_at = bias_row + i / pixels;  // a word never spans two channels
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const float v = biased(p.v[j], in_bias, bias_at) - shift;
                s += v;
                ss += v * v;
            }
        }
    } else {
        for (int64_t i = begin + threadIdx.x; i < end; i += STATS_THREADS) {
            const float v = biased(xr[i], in_bias, bias_row + i / pixels) - shift;
            s += v;
            ss += v * v;
        }
    }
    block_sum2<STATS_THREADS>(s, ss);
    if (threadIdx.x == 0) {
        float *p = partials + ((int64_t)row * chunks + chunk) * 2;
        p[0] = s;
        p[1] = ss;
    }
    if (last_block(tickets + row, chunks) && threadIdx.x == 0) {
        finish_group<T, false>(x, in_bias, partials, stats, n, g, pixels, channels, cpg, groups, chunks, eps);
    }
}

// NHWC: grid (chunks, batch), block (channels / 8) x rows threads (rows * channels <= 4096):
// thread (word j, row r) sums channels 8j..8j+7 of pixels chunk * STATS_PIXELS + r, + rows, ...
// One ticket per sample. Needs channels % 8 == 0, an aligned input, groups <= 64.
template <typename T>
__device__ void gn_stats_nhwc(const T *__restrict__ x, const T *__restrict__ in_bias, float *partials,
                              unsigned int *tickets, float *__restrict__ stats, int pixels, int channels, int cpg,
                              int groups, int chunks, float eps) {
    static_assert(Pack<T>::VEC == 8, "16-bit types");
    __shared__ float shift_s[64];
    __shared__ float sum_s[4096], sq_s[4096];  // [row][channel]
    const int chunk = blockIdx.x;
    const int64_t n = blockIdx.y;
    const int words = channels / 8;
    const int rows = blockDim.x / words;
    const int j = threadIdx.x % words, r = threadIdx.x / words;
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        shift_s[g] = group_shift<T, true>(x, in_bias, n, g, pixels, channels, cpg);
    }
    __syncthreads();
    float shift[8], bias[8], s[8], ss[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        shift[e] = shift_s[(j * 8 + e) / cpg];
        bias[e] = in_bias == nullptr ? 0.f : to_float(in_bias[n * channels + j * 8 + e]);
        s[e] = ss[e] = 0.f;
    }
    const int p_end = min(pixels, (chunk + 1) * STATS_PIXELS);
    for (int p = chunk * STATS_PIXELS + r; p < p_end; p += rows) {
        const Pack<T> w = load16(x + (n * pixels + p) * channels + j * 8);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float x_in = to_float(w.v[e]);
            const float v = (in_bias == nullptr ? x_in : to_float(from_float<T>(x_in + bias[e]))) - shift[e];
            s[e] += v;
            ss[e] += v * v;
        }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        sum_s[r * channels + j * 8 + e] = s[e];
        sq_s[r * channels + j * 8 + e] = ss[e];
    }
    __syncthreads();
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        float gs = 0.f, gss = 0.f;
        for (int rr = 0; rr < rows; ++rr) {
            for (int c = g * cpg; c < (g + 1) * cpg; ++c) {
                gs += sum_s[rr * channels + c];
                gss += sq_s[rr * channels + c];
            }
        }
        float *p = partials + ((n * groups + g) * chunks + chunk) * 2;
        p[0] = gs;
        p[1] = gss;
    }
    if (last_block(tickets + n, chunks)) {
        for (int g = threadIdx.x; g < groups; g += blockDim.x) {
            finish_group<T, true>(x, in_bias, partials, stats, n, g, pixels, channels, cpg, groups, chunks, eps);
        }
    }
}

template <typename T>
__device__ __forceinline__ float normalise(float v, const float *__restrict__ stats, const T *__restrict__ gamma,
                                           const T *__restrict__ beta, int64_t n, int c, int cpg, int groups,
                                           int silu) {
    const int64_t row = n * groups + c / cpg;
    float o = (v - stats[row * 2]) * stats[row * 2 + 1] * to_float(gamma[c]) + to_float(beta[c]);
    return silu ? o / (1.f + __expf(-o)) : o;
}

// NHWC -> NHWC: flat over the 16-byte words (channels % 8 == 0), grid (blocks, 1).
template <typename T>
__device__ void gn_apply_nhwc(const T *__restrict__ x, const T *__restrict__ in_bias, const T *__restrict__ gamma,
                              const T *__restrict__ beta, const float *__restrict__ stats, T *__restrict__ y,
                              int batch, int pixels, int channels, int cpg, int groups, int silu) {
    const int words = channels / 8;
    const int64_t total = (int64_t)batch * pixels * words;
    for (int64_t w = blockIdx.x * (int64_t)APPLY_THREADS + threadIdx.x; w < total;
         w += (int64_t)gridDim.x * APPLY_THREADS) {
        const int64_t n = w / ((int64_t)pixels * words);
        const int c0 = (int)(w % words) * 8;
        Pack<T> p = load16(x + w * 8);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float v = biased(p.v[e], in_bias, n * channels + c0 + e);
            p.v[e] = from_float<T>(normalise(v, stats, gamma, beta, n, c0 + e, cpg, groups, silu));
        }
        store16(y + w * 8, p);
    }
}

// NCHW -> NHWC: grid (ceil(pixels / 32), ceil(channels / 32), batch), block (32, 8).
template <typename T>
__device__ void gn_apply_nchw(const T *__restrict__ x, const T *__restrict__ in_bias, const T *__restrict__ gamma,
                              const T *__restrict__ beta, const float *__restrict__ stats, T *__restrict__ y,
                              int pixels, int channels, int cpg, int groups, int silu) {
    __shared__ float tile[32][33];
    const int64_t n = blockIdx.z;
    const int p0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
    for (int k = threadIdx.y; k < 32; k += blockDim.y) {
        const int c = c0 + k, p = p0 + threadIdx.x;
        if (c < channels && p < pixels) {
            const float v = biased(x[(n * channels + c) * pixels + p], in_bias, n * channels + c);
            tile[k][threadIdx.x] = normalise(v, stats, gamma, beta, n, c, cpg, groups, silu);
        }
    }
    __syncthreads();
    for (int k = threadIdx.y; k < 32; k += blockDim.y) {
        const int p = p0 + k, c = c0 + threadIdx.x;
        if (c < channels && p < pixels) y[(n * pixels + p) * channels + c] = from_float<T>(tile[threadIdx.x][k]);
    }
}

template <typename T>
__device__ void to_nchw(const T *__restrict__ y, const T *__restrict__ bias, const T *__restrict__ residual,
                        T *__restrict__ out, int pixels, int channels) {
    __shared__ float tile[32][33];
    const int64_t n = blockIdx.z;
    const int p0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
    for (int j = threadIdx.y; j < 32; j += blockDim.y) {
        const int p = p0 + j, c = c0 + threadIdx.x;
        if (p < pixels && c < channels) {
            tile[j][threadIdx.x] = to_float(y[(n * pixels + p) * channels + c]) + to_float(bias[c]);
        }
    }
    __syncthreads();
    for (int j = threadIdx.y; j < 32; j += blockDim.y) {
        const int c = c0 + j, p = p0 + threadIdx.x;
        if (p < pixels && c < channels) {
            float v = tile[threadIdx.x][j];
            const int64_t at = (n * channels + c) * pixels + p;
            if (residual != nullptr) v += to_float(residual[at]);
            out[at] = from_float<T>(v);
        }
    }
}

#define GROUP_NORM_CL(NAME, T)                                                                                      \
    extern "C" __global__ void __launch_bounds__(STATS_THREADS)                                                     \
        gn_stats_nchw_##NAME(const T *x, const T *in_bias, float *partials, unsigned int *tickets, float *stats,    \
                             int pixels, int channels, int cpg, int groups, int chunks, float eps, int vec) {       \
        gn_stats_nchw<T>(x, in_bias, partials, tickets, stats, pixels, channels, cpg, groups, chunks, eps, vec);    \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(1024)                                                              \
        gn_stats_nhwc_##NAME(const T *x, const T *in_bias, float *partials, unsigned int *tickets, float *stats,    \
                             int pixels, int channels, int cpg, int groups, int chunks, float eps) {                \
        gn_stats_nhwc<T>(x, in_bias, partials, tickets, stats, pixels, channels, cpg, groups, chunks, eps);         \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(APPLY_THREADS)                                                     \
        gn_apply_nchw_##NAME(const T *x, const T *in_bias, const T *gamma, const T *beta, const float *stats, T *y, \
                             int pixels, int channels, int cpg, int groups, int silu) {                             \
        gn_apply_nchw<T>(x, in_bias, gamma, beta, stats, y, pixels, channels, cpg, groups, silu);                   \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(APPLY_THREADS)                                                     \
        gn_apply_nhwc_##NAME(const T *x, const T *in_bias, const T *gamma, const T *beta, const float *stats, T *y, \
                             int batch, int pixels, int channels, int cpg, int groups, int silu) {                  \
        gn_apply_nhwc<T>(x, in_bias, gamma, beta, stats, y, batch, pixels, channels, cpg, groups, silu);            \
    }

GROUP_NORM_CL(f16, __half)
GROUP_NORM_CL(bf16, __nv_bfloat16)

#define TO_NCHW(NAME, T)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256)                                                      \
        to_nchw_##NAME(const T *y, const T *bias, const T *residual, T *out, int pixels, int channels) { \
        to_nchw<T>(y, bias, residual, out, pixels, channels);                                             \
    }

TO_NCHW(f16, __half)
TO_NCHW(bf16, __nv_bfloat16)
