// Helpers shared by the element-wise, GroupNorm and channels-last kernels: f32 conversions of
// the three float types, 16-byte words of VEC values for vector loads and stores, and a
// block-wide sum of two values.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// VEC values of T in one 16-byte word.
template <typename T> struct Pack {
    static constexpr int VEC = 16 / sizeof(T);
    union {
        uint4 raw;
        T v[VEC];
    };
};

template <typename T> __device__ __forceinline__ Pack<T> load16(const T* p) {
    Pack<T> r;
    r.raw = *reinterpret_cast<const uint4*>(p);
    return r;
}

template <typename T> __device__ __forceinline__ void store16(T* p, const Pack<T>& r) {
    *reinterpret_cast<uint4*>(p) = r.raw;
}

// Block-wide sum of two values over NT threads (a multiple of 32, at most 1024); the result is
// valid in thread 0.
template <int NT> __device__ __forceinline__ void block_sum2(float &a, float &b) {
    __shared__ float sa[NT / 32], sb[NT / 32];
    for (int offset = 16; offset > 0; offset >>= 1) {
        a += __shfl_down_sync(0xffffffff, a, offset);
        b += __shfl_down_sync(0xffffffff, b, offset);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sa[warp] = a;
        sb[warp] = b;
    }
    __syncthreads();
    if (warp == 0) {
        a = lane < NT / 32 ? sa[lane] : 0.f;
        b = lane < NT / 32 ? sb[lane] : 0.f;
        for (int offset = 16; offset > 0; offset >>= 1) {
            a += __shfl_down_sync(0xffffffff, a, offset);
            b += __shfl_down_sync(0xffffffff, b, offset);
        }
    }
}
