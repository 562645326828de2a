// NF4 (bitsandbytes 4-bit NormalFloat) decoding on the device, shared by the dequant kernel
// (kernels/nf4.cu) and the GEMM B-operand loader that dequantizes W0 tile by tile
// (Nf4Operand below, used by the qlora_* kernels of kernels/lora.cu). CPU reference:
// src/quant (Nf4Tensor::dequantize, DoubleQuant::decode); format: SPECS.md part B.
//
//   W[e]     = bf16_rn(NF4[q(e)] · absmax[e >> log2(blocksize)])      (f32 product, one rounding)
//   q(e)     = packed[e/2] >> 4 for even e, packed[e/2] & 15 for odd e
//   absmax[b] = f32 absmax[b], or with double quantization
//              __fadd_rn(__fmul_rn(nested_map[code[b]], nested_absmax[b >> log2(nested_bs)]), offset)
//
// The 16-entry NF4 table lives in registers, one entry per lane (lane l holds NF4[l & 15]); an
// element's code value is one __shfl_sync away, so no per-element memory lookup. The 256-entry
// nested map (double quant) is staged once per CTA in shared memory (1 KiB).
// Every __shfl_sync here is warp-wide: callers run these helpers with all 32 lanes converged.
#pragma once
#include "simt.h"
#include "params.h"
#include "util.cuh"
#include "gemm_tile.cuh"

namespace lf {

constexpr unsigned NF4_FULL_MASK = 0xffffffffu;

// NF4[i & 15] as f32 (exact bit patterns of SPECS.md B.1), by selects: called once per thread,
// so no table in memory and no local-memory array.
__device__ __forceinline__ float nf4_code_value(int i) {
    const unsigned bits[16] = {0xbf800000u, 0xbf3239b1u, 0xbf066b30u, 0xbeca32a0u, 0xbe91a24du, 0xbe3d353fu,
                               0xbdba7871u, 0x00000000u, 0x3da2faffu, 0x3e24cae3u, 0x3e7c04ddu, 0x3ead033au,
                               0x3ee1a4b8u, 0x3f1007abu, 0x3f3913b3u, 0x3f800000u};
    unsigned b = 0;
#pragma unroll
    for (int j = 0; j < 16; ++j) b = ((i & 15) == j) ? bits[j] : b;
    return __uint_as_float(b);
}

// The value of code q (0..15) from the lane-resident table `lane_code` (= nf4_code_value(lane)).
__device__ __forceinline__ float nf4_lookup(float lane_code, unsigned q) {
    return __shfl_sync(NF4_FULL_MASK, lane_code, (int)q);
}

// Copies the 256-entry nested map to shared memory when the weight is double-quantized (one
// 4-byte load per thread of a 256-thread CTA). The caller puts a __syncthreads() after it.
__device__ __forceinline__ void nf4_stage_map(const Nf4Weight& w, float* smem_map) {
    if (w.absmax_code == nullptr) return;
    for (int i = threadIdx.x; i < 256; i += blockDim.x) smem_map[i] = simt::ld_global_nc(w.nested_map + i);
}

// Raw statistics of block b as loaded from global memory; nf4_scale() turns them into the
// f32 absmax. Split so that the loads can be issued early and decoded later.
struct Nf4Stats {
    float absmax_or_nested;  // f32 absmax, or nested_absmax[b >> nested_log2] (double quant)
    unsigned code;           // double-quant code of block b
};

__device__ __forceinline__ Nf4Stats nf4_load_stats(const Nf4Weight& w, long long b) {
    Nf4Stats s;
    if (w.absmax_code != nullptr) {
        s.code = simt::ld_global_nc(w.absmax_code + b);
        s.absmax_or_nested = simt::ld_global_nc(w.nested_absmax + (b >> w.nested_log2));
    } else {
        s.code = 0;
        s.absmax_or_nested = simt::ld_global_nc(w.absmax + b);
    }
    return s;
}

// Two separately rounded f32 ops, as bitsandbytes (dequantize_blockwise, then `+= offset`).
__device__ __forceinline__ float nf4_scale(const Nf4Weight& w, const Nf4Stats& s, const float* smem_map) {
    if (w.absmax_code == nullptr) return s.absmax_or_nested;
    return __fadd_rn(__fmul_rn(smem_map[s.code], s.absmax_or_nested), w.nested_offset);
}

// bf16 of NF4[q] · scale for the 8 codes of a little-endian packed word (byte t holds elements
// 2t (high nibble) and 2t+1 (low nibble)), as a 16-byte chunk. Warp-wide (8 shuffles).
__device__ __forceinline__ uint4 nf4_decode_word(unsigned word, float scale, float lane_code) {
    unsigned out[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        const unsigned byte = (word >> (8 * t)) & 0xffu;
        const float hi = __fmul_rn(nf4_lookup(lane_code, byte >> 4), scale);
        const float lo = __fmul_rn(nf4_lookup(lane_code, byte & 15u), scale);
        __nv_bfloat162 h = __floats2bfloat162_rn(hi, lo);
        out[t] = *reinterpret_cast<unsigned*>(&h);
    }
    return make_uint4(out[0], out[1], out[2], out[3]);
}

// ---- GEMM B operand: W0 [N,K] in NF4, dequantized on the way to shared memory ---------------
//
// The stored matrix is W0 row-major [rows = N, cols = K], flat element e = row·K + col. A tile
// chunk is 8 consecutive elements of one row (gemm_tile.cuh's layout: CPR chunks per tile row,
// so lanes come in groups of CPR (8, or 16 K-major) that cover one row segment of 8·CPR
// elements). load() issues the global loads only — 4 packed bytes per chunk (one 32-bit load
// when K % 8 == 0, else up to 5 byte loads) and, per lane group, the statistics of the ≤ CPR
// quantization blocks the segment touches (lane j of the group loads block b0 + j) — so they
// are in flight during the current tile's MMAs; store() decodes (scale from the group by
// shuffle, NF4 value by shuffle, f32 product, bf16 RNE) and writes shared memory.
//
// Global bytes per K-step tile (128×64 elements): 4 KiB packed + per row segment
// ⌈64/bs⌉(+1 when unaligned) × (1 B code + 4 B nested absmax) for double quant, × 4 B for f32
// absmax — vs 16 KiB for a bf16 tile.
template <bool KMAJOR>
struct Nf4Operand {
    static constexpr bool kKMajor = KMAJOR;
    static constexpr int CPR = TileDims<KMAJOR>::COLS / 8;  // lanes per row segment
    struct Regs {
        unsigned lo[GEMM_CHUNKS];  // packed bytes of the chunk from byte e/2 on (little-endian)
        unsigned hi[GEMM_CHUNKS];  // byte 4 (only when K is odd)
        Nf4Stats stats[GEMM_CHUNKS];
        int row0, col0;
    };
    Nf4Weight w;
    const float* smem_map;
    int rows, cols;   // N, K
    float lane_code;  // nf4_code_value(lane)

    __device__ __forceinline__ long long block_of(long long e) const { return e >> w.blocksize_log2; }

    // First and last block the row segment of tile row `row` (from col0) touches.
    __device__ __forceinline__ void segment_blocks(int row, int col0, long long& b0, long long& b1) const {
        const long long base = (long long)row * cols;
        const int end = col0 + 8 * CPR < cols ? col0 + 8 * CPR : cols;
        b0 = block_of(base + col0);
        b1 = block_of(base + end - 1);
    }

    __device__ __forceinline__ void load(Regs& r, int row0, int col0) const {
        const int lane_in_group = threadIdx.x % CPR;
        r.row0 = row0;
        r.col0 = col0;
        const bool vec = (cols % 8) == 0 && aligned_to(w.packed, 4);
#pragma unroll
        for (int i = 0; i < GEMM_CHUNKS; ++i) {
            const int c = threadIdx.x + i * GEMM_THREADS;
            const int row = row0 + c / CPR;
            const int col = col0 + (c % CPR) * 8;
            const long long e = (long long)row * cols + col;
            r.lo[i] = 0;
            r.hi[i] = 0;
            if (row < rows && col < cols) {
                if (vec) {
                    r.lo[i] = simt::ld_global_nc(reinterpret_cast<const unsigned*>(w.packed + (e >> 1)));
                } else {
                    // Elements e..e+7 (clipped to the row) live in bytes e/2 .. (e+7)/2.
                    const int last = (col + 8 < cols ? col + 8 : cols) - 1;
                    const long long nbytes = ((e + (last - col)) >> 1) - (e >> 1) + 1;
                    for (int t = 0; t < nbytes; ++t) {
                        const unsigned v = simt::ld_global_nc(w.packed + (e >> 1) + t);
                        if (t < 4) r.lo[i] |= v << (8 * t);
                        else r.hi[i] = v;
                    }
                }
            }
            r.stats[i] = Nf4Stats{0.0f, 0};
            if (row < rows && col0 < cols) {
                long long b0, b1;
                segment_blocks(row, col0, b0, b1);
                if (b0 + lane_in_group <= b1) r.stats[i] = nf4_load_stats(w, b0 + lane_in_group);
            }
        }
    }

    __device__ __forceinline__ void store(lf_bf16* tile, const Regs& r) const {
        const int group_base = (threadIdx.x % 32) & ~(CPR - 1);
#pragma unroll
        for (int i = 0; i < GEMM_CHUNKS; ++i) {
            const int c = threadIdx.x + i * GEMM_THREADS;
            const int row = r.row0 + c / CPR;
            const int col = r.col0 + (c % CPR) * 8;
            const bool in = row < rows && col < cols;
            const float my_scale = nf4_scale(w, r.stats[i], smem_map);
            long long b0 = 0, b1 = 0, first = 0, last = 0;
            const long long e = (long long)row * cols + col;
            if (in) {
                segment_blocks(row, r.col0, b0, b1);
                first = block_of(e) - b0;
                last = block_of(e + ((col + 8 < cols ? col + 8 : cols) - 1 - col)) - b0;
            }
            // A chunk spans at most two blocks (8 < 32 ≤ bs); both scales by shuffle.
            const float s_first = __shfl_sync(NF4_FULL_MASK, my_scale, group_base + (int)first);
            const float s_last = __shfl_sync(NF4_FULL_MASK, my_scale, group_base + (int)last);
            uint4 chunk;
            if ((cols % 8) == 0) {  // aligned: one block, one packed word (uniform branch)
                chunk = nf4_decode_word(r.lo[i], s_first, lane_code);
            } else {
                const unsigned long long raw = r.lo[i] | (unsigned long long)r.hi[i] << 32;
                const int ph = (int)(e & 1);
                const long long split = (block_of(e) + 1) << w.blocksize_log2;  // first element of the next block
                unsigned short h[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const int p = ph + j;  // nibble position from the high nibble of byte e/2
                    const unsigned q = (unsigned)(raw >> (8 * (p >> 1) + ((p & 1) ? 0 : 4))) & 15u;
                    const float v = __fmul_rn(nf4_lookup(lane_code, q), e + j >= split ? s_last : s_first);
                    const lf_bf16 b = __float2bfloat16_rn(v);
                    h[j] = (in && col + j < cols) ? *reinterpret_cast<const unsigned short*>(&b) : 0;
                }
                chunk = make_uint4(h[0] | (unsigned)h[1] << 16, h[2] | (unsigned)h[3] << 16,
                                   h[4] | (unsigned)h[5] << 16, h[6] | (unsigned)h[7] << 16);
            }
            if (!in) chunk = make_uint4(0, 0, 0, 0);
            *reinterpret_cast<uint4*>(&tile[(c / CPR) * TileDims<KMAJOR>::LDS + (c % CPR) * 8]) = chunk;
        }
    }
};

// The NF4 W0 [rows, cols] operand; stages the nested map in `smem_map` (256 floats) and
// synchronizes, so call it before gemm_mainloop with every thread of the CTA.
template <bool KMAJOR>
__device__ __forceinline__ Nf4Operand<KMAJOR> nf4_operand(const Nf4Weight& w, float* smem_map, int rows, int cols) {
    nf4_stage_map(w, smem_map);
    __syncthreads();
    return Nf4Operand<KMAJOR>{w, smem_map, rows, cols, nf4_code_value(threadIdx.x % 32)};
}

}  // namespace lf
