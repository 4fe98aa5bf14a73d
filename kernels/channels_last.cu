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
//     contiguous run, sample x group), 16-byte loads. NHWC: one block per (a few pixels,
//     sample) over every channel, each thread summing the 8 channels of one 16-byte word, the
//     threads' sums then added per group by one warp each, in a fixed order. The last block of a
//     group (NCHW) or sample (NHWC) to finish, found with an atomic ticket, adds the partials
//     (one warp per group, a fixed order) and writes each channel's {mean, gamma / std}: the
//     result does not depend on which blocks ran first (CUDA graph replays must equal eager runs
//     bit for bit), and the apply kernels need no group index or division per value.
//   gn_apply_{nchw,nhwc}_{T}: (x - mean) * gamma / std + beta and SiLU into NHWC: from NHWC flat
//     over the 16-byte words, from NCHW through 32 x 32 tiles in shared memory (coalesced both
//     ways).
// `in_bias` (batch, channels), when not null, is added to the input first and the sum rounded
// to T (the value an NCHW bias pass would have stored): the resnet's first convolution's bias
// plus its time embedding.
// (A first version kept each (sample, group) row in one block's registers, as the NCHW kernel
// does: with NHWC rows of 20-byte runs 640 bytes apart and only batch x 32 blocks, it took
// 60-70 us per 2 x 320 x 64 x 64 call against 13 us for the NCHW kernel. The second summed a
// block's groups and the partials of a sample with one thread per group, and the apply kernels
// divided 64-bit indices per word: about 14 us per NHWC statistics call, 9.9 and 6.4 us per
// apply from NCHW and NHWC, on an H200 at 2 rows; this version 13.4, 7.8 and 5.2 us.)
//
// to_nchw_{f16,bf16}: y (batch, pixels, channels) + bias[c] + residual (batch, channels, pixels)
// -> (batch, channels, pixels), through 32 x 32 tiles in shared memory so that both the NHWC
// reads and the NCHW writes are coalesced; the sum is taken in f32 and rounded once.

#include "common.cuh"

#define STATS_THREADS 256
#define STATS_CHUNK 4096  // values of a group's contiguous NCHW run per block
#define STATS_PIXELS_PER_THREAD 8  // NHWC statistics: pixels each thread adds,
#define STATS_BATCH 4              // loaded STATS_BATCH at a time
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

// Sum of two values over a warp's lanes; every lane ends with the same bits (a butterfly: each
// pair adds the same two values).
__device__ __forceinline__ void warp_sum2(float &a, float &b) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        a += __shfl_xor_sync(0xffffffff, a, offset);
        b += __shfl_xor_sync(0xffffffff, b, offset);
    }
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

// One whole warp: group g of sample n (its first value `shift`) from its chunks' partials (lane
// i adds chunks i, i + 32, ..., loaded FINISH_LOADS rounds at a time, then the lanes' sums are
// added), written per channel as {mean, gamma[c] / std}.
#define FINISH_LOADS 4
template <typename T>
__device__ __forceinline__ void finish_group(const T *__restrict__ gamma, const float *partials,
                                             float2 *__restrict__ chan, int64_t n, int g, float shift, int pixels,
                                             int channels, int cpg, int groups, int chunks, float eps) {
    const int lane = threadIdx.x & 31;
    const float *row = partials + (n * groups + g) * chunks * 2;
    float s = 0.f, ss = 0.f;
    for (int base = lane; base < chunks; base += 32 * FINISH_LOADS) {
        float a[FINISH_LOADS], b[FINISH_LOADS];
#pragma unroll
        for (int k = 0; k < FINISH_LOADS; ++k) {
            const int i = base + 32 * k;
            a[k] = i < chunks ? __ldcg(row + i * 2) : 0.f;
            b[k] = i < chunks ? __ldcg(row + i * 2 + 1) : 0.f;
        }
#pragma unroll
        for (int k = 0; k < FINISH_LOADS; ++k) {
            s += a[k];
            ss += b[k];
        }
    }
    warp_sum2(s, ss);
    const float count = (float)cpg * (float)pixels;
    const float m = s / count;
    const float var = fmaxf(ss / count - m * m, 0.f);
    const float mean = shift + m;
    const float rstd = rsqrtf(var + eps);
    for (int c = g * cpg + lane; c < (g + 1) * cpg; c += 32) {
        chan[n * channels + c] = make_float2(mean, rstd * to_float(gamma[c]));
    }
}

// NCHW: grid (chunks, batch * groups), STATS_THREADS threads; one ticket per (sample, group).
// partials[((n * groups + g) * chunks + chunk) * 2 + {0, 1}], chan[n * channels + c] = {mean,
// gamma / std}. `vec`: 16-byte loads (pixels % VEC == 0, input aligned).
template <typename T>
__device__ void gn_stats_nchw(const T *__restrict__ x, const T *__restrict__ in_bias, const T *__restrict__ gamma,
                              float *partials, unsigned int *tickets, float2 *__restrict__ chan, int pixels,
                              int channels, int cpg, int groups, int chunks, float eps, int vec) {
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
    if (last_block(tickets + row, chunks) && threadIdx.x < 32) {
        finish_group<T>(gamma, partials, chan, n, g, shift, pixels, channels, cpg, groups, chunks, eps);
    }
}

// Rows of pixels an NHWC block covers at once: its threads are (word, row) pairs, words =
// channels / 8, words x rows <= STATS_THREADS where words allows (the launch rounds the block up
// to whole warps; threads past words x rows only help with the sums).
__device__ __forceinline__ int nhwc_rows(int words) { return max(1, STATS_THREADS / words); }

// NHWC: grid (chunks, batch), block words x rows threads (rows = nhwc_rows(words)) rounded up to a
// multiple of 32; a chunk is rows x STATS_PIXELS_PER_THREAD pixels: thread (word j, row r) sums
// channels 8j..8j+7 of pixels chunk start + r, + rows, ..., loading STATS_BATCH words at once
// (this kernel is bound by latency: dependent loads, then the last block's pass over the
// partials, which is why chunks are this large). One ticket per sample. Needs channels % 8 ==
// 0, an aligned input, groups <= 64, rows x channels <= 4096.
template <typename T>
__device__ void gn_stats_nhwc(const T *__restrict__ x, const T *__restrict__ in_bias, const T *__restrict__ gamma,
                              float *partials, unsigned int *tickets, float2 *__restrict__ chan, int pixels,
                              int channels, int cpg, int groups, int chunks, float eps) {
    static_assert(Pack<T>::VEC == 8, "16-bit types");
    __shared__ float shift_s[64];
    __shared__ float sum_s[4096], sq_s[4096];  // [row][channel]
    const int chunk = blockIdx.x;
    const int64_t n = blockIdx.y;
    const int words = channels / 8;
    const int rows = nhwc_rows(words);
    const int j = threadIdx.x % words, r = threadIdx.x / words;
    // The first batch of this thread's words first, so that its loads overlap the shifts' loads.
    const int p0 = chunk * rows * STATS_PIXELS_PER_THREAD + r;
    Pack<T> w[STATS_BATCH];
    if (r < rows) {
#pragma unroll
        for (int k = 0; k < STATS_BATCH; ++k) {
            const int p = p0 + k * rows;
            if (p < pixels) w[k] = load16(x + (n * pixels + p) * channels + j * 8);
        }
    }
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        shift_s[g] = group_shift<T, true>(x, in_bias, n, g, pixels, channels, cpg);
    }
    __syncthreads();
    if (r < rows) {
        float shift[8], bias[8], s[8], ss[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            shift[e] = shift_s[(j * 8 + e) / cpg];
            bias[e] = in_bias == nullptr ? 0.f : to_float(in_bias[n * channels + j * 8 + e]);
            s[e] = ss[e] = 0.f;
        }
        for (int batch = 0; batch < STATS_PIXELS_PER_THREAD; batch += STATS_BATCH) {
            if (batch > 0) {
#pragma unroll
                for (int k = 0; k < STATS_BATCH; ++k) {
                    const int p = p0 + (batch + k) * rows;
                    if (p < pixels) w[k] = load16(x + (n * pixels + p) * channels + j * 8);
                }
            }
#pragma unroll
            for (int k = 0; k < STATS_BATCH; ++k) {
                if (p0 + (batch + k) * rows >= pixels) break;
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const float x_in = to_float(w[k].v[e]);
                    const float v =
                        (in_bias == nullptr ? x_in : to_float(from_float<T>(x_in + bias[e]))) - shift[e];
                    s[e] += v;
                    ss[e] += v * v;
                }
            }
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            sum_s[r * channels + j * 8 + e] = s[e];
            sq_s[r * channels + j * 8 + e] = ss[e];
        }
    }
    __syncthreads();
    // One warp per group: lane i adds entries i, i + 32, ... of its rows x cpg sums.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const int entries = rows * cpg;
    for (int g = warp; g < groups; g += warps) {
        float gs = 0.f, gss = 0.f;
        for (int e = lane; e < entries; e += 32) {
            const int at = (e / cpg) * channels + g * cpg + e % cpg;
            gs += sum_s[at];
            gss += sq_s[at];
        }
        warp_sum2(gs, gss);
        if (lane == 0) {
            float *p = partials + ((n * groups + g) * chunks + chunk) * 2;
            p[0] = gs;
            p[1] = gss;
        }
    }
    if (last_block(tickets + n, chunks)) {
        for (int g = warp; g < groups; g += warps) {
            finish_group<T>(gamma, partials, chan, n, g, shift_s[g], pixels, channels, cpg, groups, chunks, eps);
        }
    }
}

__device__ __forceinline__ float silu_if(float o, int silu) { return silu ? o / (1.f + __expf(-o)) : o; }

// NHWC -> NHWC: grid (ceil(pixels * channels / 8 / APPLY_THREADS), batch), one 16-byte word per
// thread: as many loads in flight as words (one thread per channel word looping over pixels,
// with its channels' constants in registers, took three times as long).
template <typename T>
__device__ void gn_apply_nhwc(const T *__restrict__ x, const T *__restrict__ in_bias, const T *__restrict__ beta,
                              const float2 *__restrict__ chan, T *__restrict__ y, int pixels, int channels,
                              int silu) {
    const int words = channels / 8;
    const int per_sample = pixels * words;
    const int64_t n = blockIdx.y;
    for (int w = blockIdx.x * APPLY_THREADS + threadIdx.x; w < per_sample; w += gridDim.x * APPLY_THREADS) {
        const int c0 = (w % words) * 8;
        const int64_t at = (n * per_sample + w) * 8;
        Pack<T> p = load16(x + at);
        const float4 *cs = reinterpret_cast<const float4 *>(chan + n * channels + c0);  // {mean, scale} x 8
#pragma unroll
        for (int e2 = 0; e2 < 4; ++e2) {
            const float4 m = cs[e2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int e = e2 * 2 + h, c = c0 + e;
                const float v = biased(p.v[e], in_bias, n * channels + c);
                const float mean = h ? m.z : m.x, scale = h ? m.w : m.y;
                p.v[e] = from_float<T>(silu_if((v - mean) * scale + to_float(beta[c]), silu));
            }
        }
        store16(y + at, p);
    }
}

// NCHW -> NHWC: grid (ceil(pixels / 32), ceil(channels / 32), batch), block (32, 8).
template <typename T>
__device__ void gn_apply_nchw(const T *__restrict__ x, const T *__restrict__ in_bias, const T *__restrict__ beta,
                              const float2 *__restrict__ chan, T *__restrict__ y, int pixels, int channels,
                              int silu) {
    __shared__ float tile[32][33];
    const int64_t n = blockIdx.z;
    const int p0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
    for (int k = threadIdx.y; k < 32; k += blockDim.y) {
        const int c = c0 + k, p = p0 + threadIdx.x;
        if (c < channels && p < pixels) {
            const float v = biased(x[(n * channels + c) * pixels + p], in_bias, n * channels + c);
            const float2 cs = chan[n * channels + c];
            tile[k][threadIdx.x] = silu_if((v - cs.x) * cs.y + to_float(beta[c]), silu);
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
    extern "C" __global__ void __launch_bounds__(STATS_THREADS) gn_stats_nchw_##NAME(                               \
        const T *x, const T *in_bias, const T *gamma, float *partials, unsigned int *tickets, float2 *chan,         \
        int pixels, int channels, int cpg, int groups, int chunks, float eps, int vec) {                            \
        gn_stats_nchw<T>(x, in_bias, gamma, partials, tickets, chan, pixels, channels, cpg, groups, chunks, eps,    \
                         vec);                                                                                      \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(1024) gn_stats_nhwc_##NAME(                                        \
        const T *x, const T *in_bias, const T *gamma, float *partials, unsigned int *tickets, float2 *chan,         \
        int pixels, int channels, int cpg, int groups, int chunks, float eps) {                                     \
        gn_stats_nhwc<T>(x, in_bias, gamma, partials, tickets, chan, pixels, channels, cpg, groups, chunks, eps);   \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(APPLY_THREADS)                                                     \
        gn_apply_nchw_##NAME(const T *x, const T *in_bias, const T *beta, const float2 *chan, T *y, int pixels,     \
                             int channels, int silu) {                                                              \
        gn_apply_nchw<T>(x, in_bias, beta, chan, y, pixels, channels, silu);                                        \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(APPLY_THREADS)                                                     \
        gn_apply_nhwc_##NAME(const T *x, const T *in_bias, const T *beta, const float2 *chan, T *y, int pixels,     \
                             int channels, int silu) {                                                              \
        gn_apply_nhwc<T>(x, in_bias, beta, chan, y, pixels, channels, silu);                                        \
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

// Nearest 2x upsampling + a 3x3 convolution (padding 1) in sub-pixel form (src/ops/subpixel.rs):
// output pixel (2i + a, 2j + b) reads input rows {i - 1, i} (a = 0) or {i, i + 1} (a = 1), and
// columns likewise, with the 3x3 filter's taps summed per phase into a 2x2 filter; so all four
// phases are one 2x2 convolution (4 x out channels) over the input padded by one pixel.
//
// pad_to_nhwc_{f16,bf16}: x (batch, channels, h, w) -> (batch, h + 2, w + 2, channels), zero
// border; 32 padded pixels x 32 channels per tile, reads along pixels and writes along channels.
template <typename T>
__device__ void pad_to_nhwc(const T *__restrict__ x, T *__restrict__ out, int h, int w, int channels) {
    __shared__ float tile[32][33];
    const int64_t n = blockIdx.z;
    const int pw = w + 2, padded = (h + 2) * pw;
    const int p0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
    for (int r = threadIdx.y; r < 32; r += blockDim.y) {
        const int c = c0 + r, p = p0 + threadIdx.x;
        if (p < padded && c < channels) {
            const int y = p / pw - 1, xx = p % pw - 1;
            const bool inside = y >= 0 && y < h && xx >= 0 && xx < w;
            tile[threadIdx.x][r] = inside ? to_float(x[((n * channels + c) * h + y) * w + xx]) : 0.f;
        }
    }
    __syncthreads();
    for (int r = threadIdx.y; r < 32; r += blockDim.y) {
        const int p = p0 + r, c = c0 + threadIdx.x;
        if (p < padded && c < channels) out[(n * padded + p) * channels + c] = from_float<T>(tile[r][threadIdx.x]);
    }
}

// phases_to_nchw_{f16,bf16}: y (batch, h + 1, w + 1, 4 * channels), the 2x2 convolution's output
// with phase 2a + b in channels [(2a + b) * channels, (2a + b + 1) * channels), plus bias[c] ->
// out (batch, channels, 2h, 2w): out[n][c][2i + a][2j + b] = y[n][i + a][j + b][(2a + b) * channels + c]
// + bias[c], the sum in f32 rounded once. blockIdx.z = 4 * sample + phase.
template <typename T>
__device__ void phases_to_nchw(const T *__restrict__ y, const T *__restrict__ bias, T *__restrict__ out, int h,
                               int w, int channels) {
    __shared__ float tile[32][33];
    const int64_t n = blockIdx.z >> 2;
    const int phase = blockIdx.z & 3, a = phase >> 1, b = phase & 1;
    const int pixels = h * w;
    const int p0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
    const int64_t y_channels = 4 * (int64_t)channels;
    for (int r = threadIdx.y; r < 32; r += blockDim.y) {
        const int p = p0 + r, c = c0 + threadIdx.x;
        if (p < pixels && c < channels) {
            const int i = p / w, j = p % w;
            const int64_t at = ((n * (h + 1) + i + a) * (w + 1) + j + b) * y_channels + phase * channels + c;
            tile[r][threadIdx.x] = to_float(y[at]) + to_float(bias[c]);
        }
    }
    __syncthreads();
    for (int r = threadIdx.y; r < 32; r += blockDim.y) {
        const int c = c0 + r, p = p0 + threadIdx.x;
        if (p < pixels && c < channels) {
            const int i = p / w, j = p % w;
            out[((n * channels + c) * 2 * h + 2 * i + a) * 2 * w + 2 * j + b] = from_float<T>(tile[threadIdx.x][r]);
        }
    }
}

#define SUBPIXEL(NAME, T)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        pad_to_nhwc_##NAME(const T *x, T *out, int h, int w, int channels) {                                      \
        pad_to_nhwc<T>(x, out, h, w, channels);                                                                    \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        phases_to_nchw_##NAME(const T *y, const T *bias, T *out, int h, int w, int channels) {                    \
        phases_to_nchw<T>(y, bias, out, h, w, channels);                                                           \
    }

SUBPIXEL(f16, __half)
SUBPIXEL(bf16, __nv_bfloat16)
