// Helpers shared by the element-wise and GroupNorm kernels: f32 conversions of the three float
// types, and 16-byte words of VEC values for vector loads and stores.
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
