// Shared pieces of the Llama layer kernels (norm.cu, activation.cu, rope.cu, loss.cu): element
// access for the two storage types (f32, bf16) with all arithmetic in f32, 16-byte packs, and
// block reductions.
#pragma once
#include "simt.h"
#include "params.h"
#include "util.cuh"

namespace lf {

// Storage type T seen as f32: `Pack` elements fill 16 bytes (unpacked with bit operations, so
// no pack goes through local memory); `round` is the value T stores.
template <class T> struct Elem;

template <> struct Elem<float> {
    static constexpr int Pack = 4;
    __device__ static float round(float v) { return v; }
    __device__ static float to_f32(float v) { return v; }
    __device__ static float from_f32(float v) { return v; }
    __device__ static void unpack(const uint4& q, float (&v)[4]) {
        v[0] = __uint_as_float(q.x), v[1] = __uint_as_float(q.y), v[2] = __uint_as_float(q.z), v[3] = __uint_as_float(q.w);
    }
    __device__ static uint4 pack(const float (&v)[4]) {
        return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
    }
};

template <> struct Elem<lf_bf16> {
    static constexpr int Pack = 8;
    __device__ static float round(float v) { return __bfloat162float(__float2bfloat16(v)); }
    __device__ static float to_f32(lf_bf16 v) { return __bfloat162float(v); }
    __device__ static lf_bf16 from_f32(float v) { return __float2bfloat16(v); }
    // Element 2i in the low half of word i (little-endian, as the 16 bytes lie in memory).
    __device__ static void unpack(const uint4& q, float (&v)[8]) {
        const unsigned w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) v[2 * i] = __uint_as_float(w[i] << 16), v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
    __device__ static unsigned two(float lo, float hi) {
        return unsigned(__bfloat16_as_ushort(__float2bfloat16(lo))) |
               unsigned(__bfloat16_as_ushort(__float2bfloat16(hi))) << 16;
    }
    __device__ static uint4 pack(const float (&v)[8]) {
        return make_uint4(two(v[0], v[1]), two(v[2], v[3]), two(v[4], v[5]), two(v[6], v[7]));
    }
};

// N consecutive elements at p as f32: one 16-byte load when N is the type's pack (p then
// 16-byte aligned), N scalar loads otherwise. `NC`: read-only input (non-coherent path).
template <class T, int N, bool NC = true> __device__ __forceinline__ void load(const T* p, float (&v)[N]) {
    if constexpr (N == Elem<T>::Pack) {
        const uint4* q = reinterpret_cast<const uint4*>(p);
        Elem<T>::unpack(NC ? simt::ld_global_nc(q) : simt::ld_global(q), v);
    } else {
#pragma unroll
        for (int j = 0; j < N; ++j) v[j] = Elem<T>::to_f32(NC ? simt::ld_global_nc(p + j) : simt::ld_global(p + j));
    }
}

// Stores N f32 values as T (one 16-byte store when N is the pack).
template <class T, int N> __device__ __forceinline__ void store(T* p, const float (&v)[N]) {
    if constexpr (N == Elem<T>::Pack) {
        simt::st_global(reinterpret_cast<uint4*>(p), Elem<T>::pack(v));
    } else {
#pragma unroll
        for (int j = 0; j < N; ++j) simt::st_global(p + j, Elem<T>::from_f32(v[j]));
    }
}

constexpr unsigned WARP_FULL_MASK = 0xffffffffu;

// −∞ (NVRTC has no INFINITY macro).
__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }

struct SumOp {
    __device__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// op over v of the 32 lanes of the warp, returned to all of them (butterfly shuffles).
template <class Op> __device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v = op(v, __shfl_xor_sync(WARP_FULL_MASK, v, o));
    return v;
}

// op over v of every thread of the block, returned to all of them. blockDim.x: a multiple of
// 32, at most 1024; `scratch`: 32 floats of shared memory. Begins with a barrier, so calls may
// follow one another on the same scratch. The order of the sum is fixed: deterministic.
template <class Op> __device__ __forceinline__ float block_reduce(float v, float* scratch, Op op, float identity) {
    v = warp_reduce(v, op);
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_reduce(lane < blockDim.x / 32 ? scratch[lane] : identity, op);
}

}  // namespace lf
