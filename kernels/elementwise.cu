// Elementwise kernels of the unfused (PEFT-style) LoRA baseline: materialized dropout and a
// masked axpy. Host wrappers: src/ops/lora_unfused.rs (which also holds the CPU reference).
//
// Each thread handles groups of 8 consecutive elements (16-byte bf16 or 2×16-byte f32 loads
// when aligned; a scalar tail otherwise), grid-stride. Bytes per element: dropout_bf16 reads 2
// and writes 2; masked_axpy_f32 reads 8 and writes 4. Memory-bound: 0 FLOP of note apart from
// Philox (10 rounds per 4 elements) when dropout is on.
#include "simt.h"
#include "params.h"
#include "philox.cuh"
#include "util.cuh"

namespace lf {

// Multipliers of the 8 elements from i0 (a multiple of 8, so exactly two Philox groups).
__device__ __forceinline__ void mask8(const DropoutParams& p, long long i0, float (&f)[8]) {
    const Dropout d{p.seed, p.offset, p.threshold, p.scale};
    if (!d.active()) {
#pragma unroll
        for (int j = 0; j < 8; ++j) f[j] = 1.0f;
        return;
    }
    const uint4 w0 = d.words((unsigned long long)i0 >> 2), w1 = d.words(((unsigned long long)i0 >> 2) + 1);
    const unsigned r[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
    for (int j = 0; j < 8; ++j) f[j] = r[j] >= d.threshold ? d.scale : 0.0f;
}

__device__ __forceinline__ long long first_group() { return blockIdx.x * (long long)blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long group_stride() { return (long long)gridDim.x * blockDim.x; }

}  // namespace lf

using namespace lf;

extern "C" __global__ void __launch_bounds__(256) dropout_bf16(const ElementwiseParams p) {
    const lf_bf16* x = static_cast<const lf_bf16*>(p.x);
    lf_bf16* out = static_cast<lf_bf16*>(p.out);
    const bool vec = aligned_to(x, 16) && aligned_to(out, 16);
    for (long long g = first_group(); g * 8 < p.n; g += group_stride()) {
        const long long i0 = g * 8;
        float f[8];
        mask8(p.dropout, i0, f);
        if (vec && i0 + 8 <= p.n) {
            uint4 v = simt::ld_global_nc(reinterpret_cast<const uint4*>(x + i0));
            lf_bf16* h = reinterpret_cast<lf_bf16*>(&v);
#pragma unroll
            for (int j = 0; j < 8; ++j) h[j] = __float2bfloat16(__bfloat162float(h[j]) * f[j]);
            simt::st_global(reinterpret_cast<uint4*>(out + i0), v);
        } else {
            for (int j = 0; j < 8 && i0 + j < p.n; ++j)
                simt::st_global(out + i0 + j, __float2bfloat16(__bfloat162float(simt::ld_global_nc(x + i0 + j)) * f[j]));
        }
    }
}
SIMT_EXPORT_KERNEL(dropout_bf16, ElementwiseParams)

extern "C" __global__ void __launch_bounds__(256) masked_axpy_f32(const ElementwiseParams p) {
    const float* x = static_cast<const float*>(p.x);
    float* out = static_cast<float*>(p.out);
    const bool vec = aligned_to(x, 16) && aligned_to(out, 16) && aligned_to(p.base, 16);
    for (long long g = first_group(); g * 8 < p.n; g += group_stride()) {
        const long long i0 = g * 8;
        float f[8];
        mask8(p.dropout, i0, f);
        if (vec && i0 + 8 <= p.n) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float4 v = simt::ld_global_nc(reinterpret_cast<const float4*>(x + i0) + h);
                float4 b = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (p.base) b = simt::ld_global_nc(reinterpret_cast<const float4*>(p.base + i0) + h);
                const float* fh = f + 4 * h;
                simt::st_global(reinterpret_cast<float4*>(out + i0) + h,
                                make_float4(b.x + p.alpha * fh[0] * v.x, b.y + p.alpha * fh[1] * v.y,
                                            b.z + p.alpha * fh[2] * v.z, b.w + p.alpha * fh[3] * v.w));
            }
        } else {
            for (int j = 0; j < 8 && i0 + j < p.n; ++j) {
                const float b = p.base ? simt::ld_global_nc(p.base + i0 + j) : 0.0f;
                simt::st_global(out + i0 + j, b + p.alpha * f[j] * simt::ld_global_nc(x + i0 + j));
            }
        }
    }
}
SIMT_EXPORT_KERNEL(masked_axpy_f32, ElementwiseParams)
