// im2col into the transposed ("column-major") layout a GEMM can consume without a copy:
//   cols[n][k][m] = x[n][c][oy * stride - pad + ki][ox * stride - pad + kj]   (0 outside x)
// with k = (c * KH + ki) * KW + kj and m = oy * OW + ox. Then out[n] = W (Cout, K) @ cols[n]
// is already the NCHW output (no transpose copy), and consecutive threads read consecutive
// pixels of one input row and write consecutive outputs (coalesced), unlike candle's im2col,
// which writes (m, k) rows and then transposes its GEMM result.
//
// Values are copied bit for bit, so one entry point serves every 16-bit type (f16, bf16).
// Launch: block THREADS, grid (ceil(OH * OW / THREADS) capped, min(N * C * KH * KW, 65535));
// blocks loop over rows in steps of gridDim.y and over pixels in steps of the x grid.

#include <stdint.h>

#define THREADS 256

extern "C" __global__ void __launch_bounds__(THREADS)
    im2col_t_b16(const uint16_t* __restrict__ x, uint16_t* __restrict__ cols, int c, int h, int w, int kh, int kw,
                 int pad, int stride, int oh, int ow, int64_t rows) {
    const int m = oh * ow;
    for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
        const int kj = static_cast<int>(row % kw);
        int64_t t = row / kw;
        const int ki = static_cast<int>(t % kh);
        t /= kh;  // n * c + ci
        const uint16_t* plane = x + t * h * w;
        uint16_t* out = cols + row * m;
        for (int idx = blockIdx.x * THREADS + threadIdx.x; idx < m; idx += gridDim.x * THREADS) {
            const int oy = idx / ow, ox = idx - (idx / ow) * ow;
            const int iy = oy * stride - pad + ki, ix = ox * stride - pad + kj;
            out[idx] = (iy >= 0 && iy < h && ix >= 0 && ix < w) ? plane[iy * w + ix] : uint16_t(0);
        }
    }
}
