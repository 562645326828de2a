// NF4 → bf16 dequantization with the double-quant statistics decoded in the same pass.
// Host wrapper: src/ops/qlora.rs (dequantize_nf4); CPU reference: src/quant (bit-exact).
//
// A warp handles spans of 1024 elements (grid-stride over spans): each lane issues one 16-byte
// load of packed nibbles (512 contiguous bytes per warp), the warp transposes the 4-byte words
// with 4 shuffles so that store j of lane l is chunk 32j + l (each of the 4 16-byte bf16 stores
// covers 512 contiguous bytes per warp), lane j holds the f32 scale of the span's j-th block
// (≤ 32 blocks: bs ≥ 32), and every element is NF4[q] (register table, one shuffle) times its
// block's scale (one shuffle per 8 elements), rounded once to bf16.
//
// Bytes moved per element (bs = blocksize, n elements, C CTAs):
//   packed 0.5 + bf16 out 2
//   + f32 absmax: 4/min(bs, 1024)          (minimum 4/bs; 2.5625 B at bs 64)
//   + double quant: 1/min(bs, 1024) codes + 4/1024 nested absmax (both once per warp span;
//     the minimum is 1/bs + 4/(256·bs)) + 1024·C/n for the map staged per CTA (minimum 1024/n;
//     on a GPU the map is L2-resident after the first CTA)
//     ≈ 2.5156 + 0.0039 + 1024·C/n at bs 64 (minimum 2.5157).
// Measured with the simulator's counters in tests/nf4_sim.rs. Work: 1 f32 multiply (and 2
// shuffles) per element; ≈ 0.4 FLOP/B, so purely bandwidth-bound.
#include "simt.h"
#include "params.h"
#include "nf4.cuh"

namespace lf {

constexpr int NF4_SPAN = 1024;  // elements per warp per iteration: 16 packed bytes per lane

__device__ __forceinline__ unsigned word_of(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

}  // namespace lf

using namespace lf;

// Grid: any; 256 threads per CTA (the map staging assumes ≥ 256 threads or loops).
extern "C" __global__ void __launch_bounds__(256) nf4_dequant_bf16(const Nf4DequantParams p) {
    __shared__ float smem_map[256];
    const Nf4Weight& w = p.w;
    nf4_stage_map(w, smem_map);
    __syncthreads();
    const int lane = threadIdx.x % 32;
    const float lane_code = nf4_code_value(lane);
    const long long nblocks = ((w.n - 1) >> w.blocksize_log2) + 1;
    const int span_blocks = w.blocksize_log2 >= 10 ? 1 : NF4_SPAN >> w.blocksize_log2;
    const bool vec = aligned_to(w.packed, 16) && aligned_to(p.out, 16);
    const long long nwarps = (long long)gridDim.x * (blockDim.x / 32);
    for (long long s = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32; s * NF4_SPAN < w.n;
         s += nwarps) {  // warp-uniform loop
        const long long e0 = s * NF4_SPAN;
        const long long b0 = e0 >> w.blocksize_log2;

        // Lane j: the scale of block b0 + j. The span's blocks share one nested block
        // (2^(blocksize_log2 + nested_log2) ≥ 1024), read once by lane 0.
        Nf4Stats st{0.0f, 0};
        if (w.absmax_code != nullptr) {
            float nested = 0.0f;
            if (lane == 0) nested = simt::ld_global_nc(w.nested_absmax + (b0 >> w.nested_log2));
            nested = __shfl_sync(NF4_FULL_MASK, nested, 0);
            if (lane < span_blocks && b0 + lane < nblocks) st = Nf4Stats{nested, simt::ld_global_nc(w.absmax_code + b0 + lane)};
            else st = Nf4Stats{nested, 0};
        } else if (lane < span_blocks && b0 + lane < nblocks) {
            st.absmax_or_nested = simt::ld_global_nc(w.absmax + b0 + lane);
        }
        const float my_scale = nf4_scale(w, st, smem_map);

        if (vec && e0 + NF4_SPAN <= w.n) {
            const uint4 raw = simt::ld_global_nc(reinterpret_cast<const uint4*>(w.packed + (e0 >> 1)) + lane);
            // Transpose: lane 4a+b needs word b of lane 8j+a for store j. In round t lane S offers
            // its word (S/8 - t) & 3, and lane 4a+b reads lane 8((b+t)&3) + a: word b of store (b+t)&3.
            unsigned word[4] = {0, 0, 0, 0};
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const unsigned got = __shfl_sync(NF4_FULL_MASK, word_of(raw, ((lane >> 3) - t) & 3),
                                                 8 * (((lane & 3) + t) & 3) + (lane >> 2));
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    if (j == (((lane & 3) + t) & 3)) word[j] = got;
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const long long c = e0 + 8 * (32 * j + lane);
                const float scale = __shfl_sync(NF4_FULL_MASK, my_scale, (int)((c >> w.blocksize_log2) - b0));
                simt::st_global(reinterpret_cast<uint4*>(p.out + c), nf4_decode_word(word[j], scale, lane_code));
            }
        } else {
            // Partial last span or unaligned pointers: byte loads, 2-byte stores, same arithmetic.
#pragma unroll 1
            for (int j = 0; j < 4; ++j) {
                const long long c = e0 + 8 * (32 * j + lane);
                long long local = (c >> w.blocksize_log2) - b0;
                local = local < 31 ? local : 31;
                const float scale = __shfl_sync(NF4_FULL_MASK, my_scale, (int)local);
#pragma unroll
                for (int t = 0; t < 4; ++t) {
                    const long long e = c + 2 * t;
                    const unsigned byte = e < w.n ? simt::ld_global_nc(w.packed + (e >> 1)) : 0u;
                    const float hi = __fmul_rn(nf4_lookup(lane_code, byte >> 4), scale);
                    const float lo = __fmul_rn(nf4_lookup(lane_code, byte & 15u), scale);
                    if (e < w.n) simt::st_global(p.out + e, __float2bfloat16_rn(hi));
                    if (e + 1 < w.n) simt::st_global(p.out + e + 1, __float2bfloat16_rn(lo));
                }
            }
        }
    }
}
SIMT_EXPORT_KERNEL(nf4_dequant_bf16, Nf4DequantParams)
