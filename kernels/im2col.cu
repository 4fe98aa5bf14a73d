// im2col into the transposed ("column-major") layout a GEMM can consume without a copy:
//   cols[n][k][m] = x[n][c][oy * stride - pad + ki][ox * stride - pad + kj]   (0 outside x)
// with k = (c * KH + ki) * KW + kj and m = oy * OW + ox. Then out[n] = W (Cout, K) @ cols[n]
// is already the NCHW output (no transpose copy), and consecutive threads read consecutive
// pixels of one input row and write consecutive outputs (coalesced), unlike candle's im2col,
// which writes (m, k) rows and then transposes its GEMM result.
//
// Values are copied bit for bit, so one entry point serves every 16-bit type (f16, bf16).
// Launch: block THREADS. `flat` != 0 (the caller checks rows * OH * OW < 2^31): grid (capped
// ceil(rows * OH * OW / THREADS), 1), threads loop over all (row, pixel) pairs, so small
// images (8x8: 64 pixels a row) keep every thread busy. Else grid (ceil(OH * OW / THREADS)
// capped, min(N * C * KH * KW, 65535)): blocks loop over rows in steps of gridDim.y and over
// pixels in steps of the x grid.

#include <stdint.h>

#define THREADS 256

// The value of column row `row` (n, c, ki, kj) at output pixel `idx`. I: the row's index type
// (32-bit divisions where the flat launch allows them).
template <typename I>
__device__ __forceinline__ uint16_t tap(const uint16_t* __restrict__ x, I row, int idx, int h, int w, int kh, int kw,
                                        int pad, int stride, int ow) {
    const int kj = static_cast<int>(row % static_cast<I>(kw));
    I t = row / static_cast<I>(kw);
    const int ki = static_cast<int>(t % static_cast<I>(kh));
    t /= static_cast<I>(kh);  // n * c + ci
    const int oy = idx / ow, ox = idx - oy * ow;
    const int iy = oy * stride - pad + ki, ix = ox * stride - pad + kj;
    return (iy >= 0 && iy < h && ix >= 0 && ix < w) ? x[static_cast<int64_t>(t) * h * w + iy * w + ix] : uint16_t(0);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    im2col_t_b16(const uint16_t* __restrict__ x, uint16_t* __restrict__ cols, int c, int h, int w, int kh, int kw,
                 int pad, int stride, int oh, int ow, int64_t rows, int flat) {
    const int m = oh * ow;
    if (flat) {
        const uint32_t total = static_cast<uint32_t>(rows * m), pixels = static_cast<uint32_t>(m);
        for (uint32_t i = blockIdx.x * THREADS + threadIdx.x; i < total; i += gridDim.x * THREADS) {
            const uint32_t row = i / pixels;
            cols[i] = tap<uint32_t>(x, row, static_cast<int>(i - row * pixels), h, w, kh, kw, pad, stride, ow);
        }
        return;
    }
    for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
        uint16_t* out = cols + row * m;
        for (int idx = blockIdx.x * THREADS + threadIdx.x; idx < m; idx += gridDim.x * THREADS) {
            out[idx] = tap<int64_t>(x, row, idx, h, w, kh, kw, pad, stride, ow);
        }
    }
}
