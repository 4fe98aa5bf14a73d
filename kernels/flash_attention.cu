// Fused scaled dot-product attention (forward only), flash-attention style:
//   out = softmax(scale * Q K^T) V
// Q: (B, H, N, D), K and V: (B, H, M, D), out: (B, H, N, D), f16 or bf16, each addressed through
// its own batch, head and row strides (the head dim is contiguous): the attention layer passes
// its projections (B, N, H * D) as they are and takes the output in that layout too, so no
// head split or merge copies are needed.
// Scores, the online softmax and the output accumulate in f32; the N x M score matrix is
// never materialised: each block keeps 64 or 128 query rows and streams K/V in tiles of 64
// keys (cp.async: the V copy overlaps Q K^T, the next K copy overlaps P V).
//
// Tensor cores through `mma.sync.m16n8k16` (sm_80+) with operands loaded by `ldmatrix`.
// Unlike WMMA fragments, the register layout of mma.sync is documented, so the scores of
// Q K^T can be rescaled, exponentiated and fed back as the A operand of P V without going
// through shared memory.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4:
//   A (16x16, row-major) regs a0..a3: (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)
//   B (16x8, "col")      regs b0, b1: (k 2t..2t+1, n g), (k 2t+8.., n g)
//   C (16x8, f32)        c0..c3:      (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
//
// The head dimension is a template parameter DE = D rounded up to 8 (the kernels exist for a
// fixed list of DE, see the end of the file); shared memory holds DP = DE rounded up to 16
// columns, those from D on zero, so they add nothing to the scores and produce no output. When
// DE is an odd multiple of 8 (SD1.5's 40) the last k-step of Q K^T is an m16n8k8 and the last
// output tile of P V a single n-tile, so the padding costs no tensor-core work.
//
// The softmax runs on raw scores: the row max is taken before scaling (the scale is positive)
// and exp2(s * scale_log2 - max * scale_log2) is one FMA and one ex2 per score; keys past m are
// masked only in the last, partial tile.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

// A block has WARPS warps of 16 query rows each (4 or 8: 64 or 128 rows; more rows per block
// read each K/V tile from L2 fewer times, fewer rows fill the GPU better at small n).
constexpr int BC = 64;  // keys per K/V tile

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// 2^x on the special function unit (about 2 ulp; 2^-inf = 0), what the softmax needs.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm_x2(uint32_t& r0, uint32_t& r1, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                              const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(p)));
}

// c += a * b for one 16x8x16 tile, f32 accumulation.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c += a * b for one 16x8x8 tile: A is the left half of a 16x16 A fragment (regs a0, a1), B one
// register (k 2t..2t+1, n g).
template <typename T>
__device__ __forceinline__ void mma1688(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0);

template <>
__device__ __forceinline__ void mma1688<__half>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(b0));
}

template <>
__device__ __forceinline__ void mma1688<__nv_bfloat16>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(b0));
}

// Two floats into one register of two 16-bit values, `lo` in the low half (the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

// The bits of 1.0 in T.
template <typename T>
__device__ __forceinline__ uint16_t one_bits();
template <>
__device__ __forceinline__ uint16_t one_bits<__half>() {
    return 0x3c00;
}
template <>
__device__ __forceinline__ uint16_t one_bits<__nv_bfloat16>() {
    return 0x3f80;
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
    return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Copies rows [row0, row0 + 64) of a (rows, d) matrix (rows `stride` elements apart) into shared
// memory with row stride DP + 8 (the 16-byte pad keeps ldmatrix free of bank conflicts); rows
// past the end and columns past d are zero, but for column ONES_AT (when not negative), which
// is `one` (see the row sums in flash_fwd). `vec`: every row starts 16-byte aligned, d % 8 == 0.
template <int DP, int NT, int ONES_AT = -1>
__device__ __forceinline__ void load_tile(uint16_t* dst, const uint16_t* src, int64_t stride, int row0, int rows,
                                          int d, bool vec, uint16_t one = 0) {
    constexpr int S = DP + 8;
    constexpr int CHUNKS = DP / 8;
    for (int c = threadIdx.x; c < BC * CHUNKS; c += NT) {
        const int r = c / CHUNKS;
        const int col = (c % CHUNKS) * 8;
        const int gr = row0 + r;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (gr < rows && col < d) {
            const uint16_t* p = src + gr * stride + col;
            if (vec) {
                val = *reinterpret_cast<const uint4*>(p);
            } else {
                uint16_t tmp[8];
#pragma unroll
                for (int i = 0; i < 8; ++i) tmp[i] = (col + i < d) ? p[i] : 0;
                val = make_uint4(tmp[0] | (uint32_t(tmp[1]) << 16), tmp[2] | (uint32_t(tmp[3]) << 16),
                                 tmp[4] | (uint32_t(tmp[5]) << 16), tmp[6] | (uint32_t(tmp[7]) << 16));
            }
        }
        if (ONES_AT >= 0 && col == ONES_AT) val.x = one;
        *reinterpret_cast<uint4*>(dst + r * S + col) = val;
    }
}

// The K/V tile copies through cp.async (16 bytes a chunk, zero-filled past the end), so a copy
// runs in the background while the warps compute; only for the aligned case (`vec`). Each
// thread copies one column chunk of the tile in every pass, in rows ROWS apart: a row's DP / 8
// chunks are spread over a power of two of threads (those past d copy nothing), so where a
// thread copies is worked out once per kernel, not per chunk and tile (the per-chunk division
// and 64-bit address math were about a third of the loop's instructions at head dim 40).
template <int DP, int NT>
struct TileCopy {
    static constexpr int CHUNKS = DP / 8;
    static constexpr int POW2 = CHUNKS <= 2 ? 2 : CHUNKS <= 4 ? 4 : CHUNKS <= 8 ? 8 : CHUNKS <= 16 ? 16 : 32;
    static constexpr int LANES = POW2 * BC >= NT ? POW2 : NT / BC;  // at least one row per pass
    static constexpr int ROWS = NT / LANES;     // rows one pass covers
    static constexpr int PASSES = BC / ROWS;
    static_assert(NT % LANES == 0 && BC % ROWS == 0, "a pass covers whole rows of the tile");

    int row;        // the thread's first row in the tile
    int col;        // its column chunk's first column
    bool active;    // col < d: it copies something
    uint32_t smem;  // shared-memory address of its chunk in the tile's first pass

    __device__ __forceinline__ TileCopy(const uint16_t* tile, int d) {
        row = threadIdx.x / LANES;
        col = (threadIdx.x % LANES) * 8;
        active = col < d;
        smem = smem_addr(tile + row * (DP + 8) + col);
    }

    // Rows [row0, row0 + BC) of a head's (rows, d) matrix `src` (rows `stride` elements apart),
    // the thread's chunks only; rows past `rows` are zero-filled.
    __device__ __forceinline__ void copy(const uint16_t* src, int64_t stride, int row0, int rows) const {
        if (active) {
            const uint16_t* p = src + (row0 + row) * stride + col;
            const int left = rows - row0 - row;  // rows of this thread's column still inside
#pragma unroll
            for (int i = 0; i < PASSES; ++i) {
                const bool inside = i * ROWS < left;
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                                 smem + uint32_t(i * ROWS * (DP + 8) * 2)),
                             "l"(inside ? p : src), "r"(inside ? 16 : 0));
                p += ROWS * stride;
            }
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
};

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Strides in elements: batch, head, row.
struct Strides {
    int64_t batch, head, row;
};

template <typename T, int DE, int WARPS>
__device__ __forceinline__ void flash_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                          T* __restrict__ o, int n, int m, int d, float scale_log2, int heads,
                                          Strides qs_, Strides ks_, Strides vs_, Strides os_) {
    static_assert(DE % 8 == 0 && DE <= 256, "the kernel's head dim must be a multiple of 8");
    constexpr int DP = (DE + 15) / 16 * 16;  // columns in shared memory
    static_assert(WARPS == 4 || WARPS == 8, "the query tile is staged in one or both K/V buffers");
    constexpr int NT = WARPS * 32;
    constexpr int BR = WARPS * 16;
    constexpr int S = DP + 8;
    constexpr int KD = DP / 16;         // k-steps over the head dim (Q K^T); loaded as 16 wide
    constexpr int KF = DE / 16;         // full 16-wide k-steps; DE % 16 == 8 adds one 8-wide step
    constexpr int ND = DE / 8;          // n-tiles over the head dim (P V output)
    constexpr bool HALF_STEP = DE % 16 == 8;
    // With a spare 8-column n-tile (DE % 16 == 8), V's column DE holds ones, so P V's extra
    // output tile is each row's sum of P (in f32, of the very values P V used): no adds per
    // score for the softmax's denominator. Otherwise the sums are added up as P is made.
    constexpr bool SUM_BY_MMA = HALF_STEP;
    constexpr int NO = SUM_BY_MMA ? ND + 1 : ND;  // output n-tiles, the row sums' included
    static_assert(NO % 2 == 0, "P V runs its output tiles in pairs");
    constexpr int NS = BC / 8;   // n-tiles over the keys (scores)
    constexpr int KS = BC / 16;  // k-steps over the keys (P V)
    __shared__ __align__(16) uint16_t ks[BC * S];
    __shared__ __align__(16) uint16_t vs[BC * S];

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4;
    const int t = lane % 4;
    const int q0 = blockIdx.x * BR;
    const int64_t b = blockIdx.y / heads, h = blockIdx.y % heads;
    const uint16_t* qh = reinterpret_cast<const uint16_t*>(q) + b * qs_.batch + h * qs_.head;
    const uint16_t* kh = reinterpret_cast<const uint16_t*>(k) + b * ks_.batch + h * ks_.head;
    const uint16_t* vh = reinterpret_cast<const uint16_t*>(v) + b * vs_.batch + h * vs_.head;
    T* oh = o + b * os_.batch + h * os_.head;
    const bool vec = d % 8 == 0 &&
                     ((reinterpret_cast<uintptr_t>(qh) | reinterpret_cast<uintptr_t>(kh) |
                       reinterpret_cast<uintptr_t>(vh)) & 15) == 0 &&
                     ((qs_.row | ks_.row | vs_.row) & 7) == 0;

    // The query tile goes through the K buffer (and the V buffer for rows 64..127) once, then
    // lives in registers as A fragments.
    load_tile<DP, NT>(ks, qh, qs_.row, q0, n, d, vec);
    if (WARPS > 4) load_tile<DP, NT>(vs, qh, qs_.row, q0 + BC, n, d, vec);
    __syncthreads();
    uint32_t qf[KD][4];
    const uint16_t* qtile = warp < 4 ? ks : vs;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
        ldsm_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3],
                &qtile[((warp % 4) * 16 + lane % 16) * S + kk * 16 + (lane / 16) * 8]);
    }
    __syncthreads();
    // K's columns past d stay zero from the query's staging (the copies below skip them); V's
    // column DE becomes the ones of the row sums (the query has been read out of vs; the
    // unaligned path's tile loads write them again).
    const uint16_t one = one_bits<T>();
    if (SUM_BY_MMA) {
        for (int r = threadIdx.x; r < BC; r += NT) *reinterpret_cast<uint4*>(&vs[r * S + DE]) = make_uint4(one, 0, 0, 0);
    }

    float acc[NO][4];
#pragma unroll
    for (int i = 0; i < NO; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    // Running max (in log2 units, already scaled) and partial sum for rows g and g + 8.
    float row_max[2] = {neg_inf(), neg_inf()};
    float row_sum[2] = {0.f, 0.f};
    const int mi = lane / 8;  // which 8x8 matrix of an ldmatrix.x4 this lane addresses

    // Pipeline (one buffer each for K and V): the V copy of a tile overlaps Q K^T, the K copy of
    // the next tile overlaps P V. Unaligned inputs load synchronously (the waits are then no-ops).
    const TileCopy<DP, NT> k_copy(ks, d), v_copy(vs, d);
    if (vec) k_copy.copy(kh, ks_.row, 0, m);
    for (int k0 = 0; k0 < m; k0 += BC) {
        if (vec) {
            v_copy.copy(vh, vs_.row, k0, m);
            cp_async_wait<1>();  // K of this tile has landed
        } else {
            load_tile<DP, NT>(ks, kh, ks_.row, k0, m, d, false);
            load_tile<DP, NT, SUM_BY_MMA ? DE : -1>(vs, vh, vs_.row, k0, m, d, false, one);
        }
        __syncthreads();

        // S = Q K^T for this warp's 16 rows and 64 keys.
        float s[NS][4];
#pragma unroll
        for (int j = 0; j < NS; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int np = 0; np < NS / 2; ++np) {
#pragma unroll
            for (int kk = 0; kk < KF; ++kk) {
                uint32_t b0, b1, b2, b3;
                ldsm_x4(b0, b1, b2, b3, &ks[(np * 16 + lane % 8 + 8 * (mi / 2)) * S + kk * 16 + 8 * (mi % 2)]);
                mma16816<T>(s[2 * np], qf[kk], b0, b1);
                mma16816<T>(s[2 * np + 1], qf[kk], b2, b3);
            }
            if (HALF_STEP) {
                // Columns KF*16 .. KF*16+7: keys 0-7 and 8-15 of this pair, one matrix each.
                uint32_t b0, b2;
                ldsm_x2(b0, b2, &ks[(np * 16 + lane % 8 + 8 * ((lane / 8) % 2)) * S + KF * 16]);
                mma1688<T>(s[2 * np], qf[KF][0], qf[KF][1], b0);
                mma1688<T>(s[2 * np + 1], qf[KF][0], qf[KF][1], b2);
            }
        }

        // Online softmax on raw scores: mask keys past m (last tile only), new row max, rescale
        // what came before.
        if (k0 + BC > m) {
#pragma unroll
            for (int j = 0; j < NS; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    if (k0 + j * 8 + 2 * t + (e & 1) >= m) s[j][e] = neg_inf();
                }
            }
        }
        float tile_max[2] = {neg_inf(), neg_inf()};
#pragma unroll
        for (int j = 0; j < NS; ++j) {
            tile_max[0] = fmaxf(tile_max[0], fmaxf(s[j][0], s[j][1]));
            tile_max[1] = fmaxf(tile_max[1], fmaxf(s[j][2], s[j][3]));
        }
        float alpha[2], max_scaled[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            // The four lanes of a quad share a row.
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 2));
            const float new_max = fmaxf(row_max[r], tile_max[r]);  // finite: every tile has a key
            alpha[r] = fast_exp2((row_max[r] - new_max) * scale_log2);
            row_max[r] = new_max;
            max_scaled[r] = new_max * scale_log2;
            if (!SUM_BY_MMA) row_sum[r] *= alpha[r];
        }
#pragma unroll
        for (int i = 0; i < NO; ++i) {
            acc[i][0] *= alpha[0];
            acc[i][1] *= alpha[0];
            acc[i][2] *= alpha[1];
            acc[i][3] *= alpha[1];
        }

        // P = exp2(S - max), straight into A fragments: the C tiles of keys 16kk..16kk+7 and
        // 16kk+8..16kk+15 are exactly the left and right halves of A for k-step kk.
        uint32_t pf[KS][4];
#pragma unroll
        for (int j = 0; j < NS; ++j) {
            const float p0 = fast_exp2(fmaf(s[j][0], scale_log2, -max_scaled[0]));
            const float p1 = fast_exp2(fmaf(s[j][1], scale_log2, -max_scaled[0]));
            const float p2 = fast_exp2(fmaf(s[j][2], scale_log2, -max_scaled[1]));
            const float p3 = fast_exp2(fmaf(s[j][3], scale_log2, -max_scaled[1]));
            if (!SUM_BY_MMA) {
                row_sum[0] += p0 + p1;
                row_sum[1] += p2 + p3;
            }
            pf[j / 2][(j % 2) * 2] = pack2<T>(p0, p1);
            pf[j / 2][(j % 2) * 2 + 1] = pack2<T>(p2, p3);
        }

        if (vec) cp_async_wait<0>();  // V of this tile has landed
        __syncthreads();              // and every warp is done with ks
        if (vec && k0 + BC < m) k_copy.copy(kh, ks_.row, k0 + BC, m);

        // O += P V; V (keys x dims, row-major) is the B operand, transposed by ldmatrix.
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
            for (int dp = 0; dp < NO / 2; ++dp) {
                uint32_t b0, b1, b2, b3;
                ldsm_x4_trans(b0, b1, b2, b3, &vs[(kk * 16 + lane % 8 + 8 * (mi % 2)) * S + dp * 16 + 8 * (mi / 2)]);
                mma16816<T>(acc[2 * dp], pf[kk], b0, b1);
                mma16816<T>(acc[2 * dp + 1], pf[kk], b2, b3);
            }
        }
        __syncthreads();  // every warp is done with vs before the next V copy
    }

    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l;
        if (SUM_BY_MMA) {
            // Column DE of the extra tile: c0 / c2 of the quad's first lane (t = 0).
            l = __shfl_sync(0xffffffff, acc[ND][2 * r], lane & ~3);
        } else {
            l = row_sum[r];
            l += __shfl_xor_sync(0xffffffff, l, 1);
            l += __shfl_xor_sync(0xffffffff, l, 2);
        }
        inv[r] = 1.f / l;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = q0 + warp * 16 + g + 8 * r;
        if (row >= n) continue;
        T* out = oh + row * os_.row;
#pragma unroll
        for (int i = 0; i < ND; ++i) {
            const int col = i * 8 + 2 * t;
            if (col < d) out[col] = from_float<T>(acc[i][2 * r] * inv[r]);
            if (col + 1 < d) out[col + 1] = from_float<T>(acc[i][2 * r + 1] * inv[r]);
        }
    }
}

}  // namespace

// Entry points per dtype, kernel head dim and block size: flash_attn_{f16,bf16}_d{16,32,40,48,...,160}
// (4 warps: grid (ceil(n / 64), batch * heads), block 128) and the same names with _w8 (8 warps:
// grid (ceil(n / 128), batch * heads), block 256); no dynamic shared memory. Strides come as
// batch, head, row triples for q, k, v and out.
#define FLASH_KERNEL(FN, T, DE, WARPS)                                                                            \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) FN(                                                  \
        const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o, int n, int m, \
        int d, float scale_log2, int heads, int64_t qb, int64_t qh, int64_t qr, int64_t kb, int64_t kh, int64_t kr, \
        int64_t vb, int64_t vh, int64_t vr, int64_t ob, int64_t oh, int64_t orow) {                              \
        flash_fwd<T, DE, WARPS>(q, k, v, o, n, m, d, scale_log2, heads, Strides{qb, qh, qr}, Strides{kb, kh, kr}, \
                                Strides{vb, vh, vr}, Strides{ob, oh, orow});                                     \
    }
#define FLASH_ENTRY(NAME, T, DE)             \
    FLASH_KERNEL(NAME##_d##DE, T, DE, 4) \
    FLASH_KERNEL(NAME##_d##DE##_w8, T, DE, 8)

#define FLASH_ALL_DIMS(NAME, T) \
    FLASH_ENTRY(NAME, T, 16)    \
    FLASH_ENTRY(NAME, T, 32)    \
    FLASH_ENTRY(NAME, T, 40)    \
    FLASH_ENTRY(NAME, T, 48)    \
    FLASH_ENTRY(NAME, T, 64)    \
    FLASH_ENTRY(NAME, T, 80)    \
    FLASH_ENTRY(NAME, T, 96)    \
    FLASH_ENTRY(NAME, T, 112)   \
    FLASH_ENTRY(NAME, T, 128)   \
    FLASH_ENTRY(NAME, T, 144)   \
    FLASH_ENTRY(NAME, T, 160)

FLASH_ALL_DIMS(flash_attn_f16, __half)
FLASH_ALL_DIMS(flash_attn_bf16, __nv_bfloat16)
