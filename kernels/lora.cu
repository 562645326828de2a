// LoRA linear, forward and backward, on the tensor-core main loop of gemm_tile.cuh.
// Host wrappers: src/ops/lora_kernels.rs; CPU reference: src/ops/lora.rs.
//
//   y  = x·W0ᵀ + (drop(x)·Aᵀ ⊙ c)·Bᵀ          c = col_scale (alpha/r per target column)
//   S  = drop(x)·Aᵀ  [M,R]  saved for backward (never a mask, never a dropped copy of x)
//   dS = (dy·B) ⊙ c,  dB = dyᵀ·(S ⊙ c),  dA = dSᵀ·drop(x),  dx = dy·W0 + drop'(dS·A)
//
// Dropout multiplies by mask/(1-p). Kernels apply the 0/1 mask to bf16 tiles (exact) and the
// 1/(1-p) to f32 results, so dropout adds no rounding. The mask is Philox-generated per element
// (philox.cuh) in every kernel that needs it.
//
// Bytes and FLOPs (bf16 in, M·K = |x|, r = R):
//   lora_down            2·M·R·K FLOP;  reads x once (2·M·K B) + A per M-tile; writes 6·M·R B
//   lora_fwd_split_*     2·M·N·(K+R) FLOP; the base GEMM's traffic + the r extra K columns
//   lora_bwd_ds          2·M·N·R FLOP;  reads dy once per R-tile (2·M·N B)
//   lora_bwd_db / _da    2·N·R·M, 2·R·K·M FLOP; split over M, partials reduced by splitk_reduce
//   lora_bwd_dx_*        2·M·K·(N+R) FLOP; the base dx GEMM's traffic + r extra K columns
// The R dimension occupies a 128-wide tile (R ≤ 128 per tile, zero-padded): for R = 16 the
// LoRA products issue 8× their FLOPs on tensor cores, ~3% of a 4096-wide base GEMM each.
#include "simt.h"
#include "params.h"
#include "gemm_tile.cuh"
#include "philox.cuh"
#include "nf4.cuh"

namespace lf {

// Zeroes the dropped elements of a chunk of x: 8 elements from (row + row_offset, col) of the
// dense [·, x_cols] matrix. Applied on the way to shared memory, so x is read once.
struct DropMask {
    Dropout d;
    int x_cols;
    int row_offset;
    __device__ __forceinline__ void operator()(uint4& chunk, int row, int col) const {
        if (d.active()) d.mask_chunk(chunk, (unsigned long long)(row + row_offset) * x_cols + col);
    }
};

// Rows of split z over M: [z·split_rows, min(m, (z+1)·split_rows)).
__device__ __forceinline__ int split_len(int m, int split_rows, int z) {
    const int begin = z * split_rows;
    return begin >= m ? 0 : (m - begin < split_rows ? m - begin : split_rows);
}

}  // namespace lf

using namespace lf;

// S = drop(x)·Aᵀ and s_scaled = S ⊙ c. Grid (ceil(R/128), ceil(M/128)).
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) lora_down(const LoraForwardParams p) {
    __shared__ __align__(16) GemmSmem smem;
    const int block_m = blockIdx.y * GEMM_BM, block_n = blockIdx.x * GEMM_BN;
    GemmAcc acc = {};
    const Operand<false, DropMask> x{MatrixRef{p.x, p.m, p.k, p.k}, DropMask{Dropout::from(p.dropout), p.k, 0}};
    gemm_mainloop(acc, smem, x, operand<false>(p.a, p.r, p.k, p.k), p.k, block_m, block_n, NoOnTile{});
    const float ds = Dropout::from(p.dropout).kept_scale();
    gemm_epilogue(acc, block_m, block_n, p.m, p.r, [&](int row, int col, float v0, float v1) {
        const bool pair = col + 1 < p.r;
        const long long idx = (long long)row * p.r + col;
        v0 *= ds;
        v1 *= ds;
        store_pair(p.s, idx, pair, v0, v1);
        const float c0 = simt::ld_global_nc(p.col_scale + col);
        const float c1 = pair ? simt::ld_global_nc(p.col_scale + col + 1) : 0.0f;
        store_pair(p.s_scaled, idx, pair, v0 * c0, v1 * c1);
    });
}
SIMT_EXPORT_KERNEL(lora_down, LoraForwardParams)

// y = s_scaled·Bᵀ + x·W0ᵀ: the LoRA up-projection is R extra K columns of the base GEMM, so the
// accumulator starts at the LoRA term. W0 is the B operand `w0`: bf16 (lora_fwd_split_*) or NF4
// dequantized tile by tile (qlora_fwd_split_*). Grid (ceil(N/128), ceil(M/128)).
template <class Out, class W0>
__device__ __forceinline__ void lora_fwd_split(const LoraForwardParams& p, const W0& w0) {
    __shared__ __align__(16) GemmSmem smem;
    const int block_m = blockIdx.y * GEMM_BM, block_n = blockIdx.x * GEMM_BN;
    GemmAcc acc = {};
    gemm_mainloop(acc, smem, operand<false>(p.s_scaled, p.m, p.r, p.r), operand<false>(p.b, p.n, p.r, p.r), p.r,
                  block_m, block_n, NoOnTile{});
    gemm_mainloop(acc, smem, operand<false>(p.x, p.m, p.k, p.k), w0, p.k, block_m, block_n, NoOnTile{});
    store_tile_c(acc, static_cast<Out*>(p.y), p.n, block_m, block_n, p.m, p.n);
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS) lora_fwd_split_f32out(const LoraForwardParams p) {
    lora_fwd_split<float>(p, operand<false>(p.w0, p.n, p.k, p.k));
}
SIMT_EXPORT_KERNEL(lora_fwd_split_f32out, LoraForwardParams)

extern "C" __global__ void __launch_bounds__(GEMM_THREADS) lora_fwd_split_bf16out(const LoraForwardParams p) {
    lora_fwd_split<lf_bf16>(p, operand<false>(p.w0, p.n, p.k, p.k));
}
SIMT_EXPORT_KERNEL(lora_fwd_split_bf16out, LoraForwardParams)

// dS = (dy·B) ⊙ c, bf16 [M,R]. B [N,R] is the K-major operand. Grid (ceil(R/128), ceil(M/128)).
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) lora_bwd_ds(const LoraBackwardParams p) {
    __shared__ __align__(16) GemmSmem smem;
    const int block_m = blockIdx.y * GEMM_BM, block_n = blockIdx.x * GEMM_BN;
    GemmAcc acc = {};
    gemm_mainloop(acc, smem, operand<false>(p.dy, p.m, p.n, p.n), operand<true>(p.b, p.n, p.r, p.r), p.n, block_m,
                  block_n, NoOnTile{});
    gemm_epilogue(acc, block_m, block_n, p.m, p.r, [&](int row, int col, float v0, float v1) {
        const bool pair = col + 1 < p.r;
        const float c0 = simt::ld_global_nc(p.col_scale + col);
        const float c1 = pair ? simt::ld_global_nc(p.col_scale + col + 1) : 0.0f;
        store_pair(p.ds, (long long)row * p.r + col, pair, v0 * c0, v1 * c1);
    });
}
SIMT_EXPORT_KERNEL(lora_bwd_ds, LoraBackwardParams)

// Partial dB over split z of M: dy[rows]ᵀ·s_scaled[rows] into workspace[z] as [N,R].
// Both operands K-major. Grid (ceil(R/128), ceil(N/128), splits).
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) lora_bwd_db(const LoraBackwardParams p) {
    __shared__ __align__(16) GemmSmem smem;
    const int block_m = blockIdx.y * GEMM_BM, block_n = blockIdx.x * GEMM_BN, z = blockIdx.z;
    const int rows = split_len(p.m, p.split_rows, z);
    const long long row0 = (long long)z * p.split_rows;
    GemmAcc acc = {};
    gemm_mainloop(acc, smem, operand<true>(p.dy + row0 * p.n, rows, p.n, p.n),
                  operand<true>(p.s_scaled + row0 * p.r, rows, p.r, p.r), rows, block_m, block_n, NoOnTile{});
    store_tile_c(acc, p.workspace + (long long)z * p.n * p.r, p.r, block_m, block_n, p.n, p.r);
}
SIMT_EXPORT_KERNEL(lora_bwd_db, LoraBackwardParams)

// Partial dA over split z of M: ds[rows]ᵀ·(mask⊙x)[rows] into workspace[z] as [R,K]; the
// 1/(1-p) goes into the reduction's scale. Grid (ceil(K/128), ceil(R/128), splits).
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) lora_bwd_da(const LoraBackwardParams p) {
    __shared__ __align__(16) GemmSmem smem;
    const int block_m = blockIdx.y * GEMM_BM, block_n = blockIdx.x * GEMM_BN, z = blockIdx.z;
    const int rows = split_len(p.m, p.split_rows, z);
    const long long row0 = (long long)z * p.split_rows;
    const Operand<true, DropMask> x{MatrixRef{p.x + row0 * p.k, rows, p.k, p.k},
                                    DropMask{Dropout::from(p.dropout), p.k, (int)row0}};
    GemmAcc acc = {};
    gemm_mainloop(acc, smem, operand<true>(p.ds + row0 * p.r, rows, p.r, p.r), x, rows, block_m, block_n, NoOnTile{});
    store_tile_c(acc, p.workspace + (long long)z * p.r * p.k, p.k, block_m, block_n, p.r, p.k);
}
SIMT_EXPORT_KERNEL(lora_bwd_da, LoraBackwardParams)

// dx = drop'(dS·A) + dy·W0: the LoRA term first (R extra K columns), masked in registers, then
// the base GEMM accumulates on top. A [R,K] and W0 [N,K] are K-major operands; W0 is `w0`, bf16
// (lora_bwd_dx_*) or NF4 (qlora_bwd_dx_*). Grid (ceil(K/128), ceil(M/128)).
template <class Out, class W0>
__device__ __forceinline__ void lora_bwd_dx(const LoraBackwardParams& p, const W0& w0) {
    __shared__ __align__(16) GemmSmem smem;
    const int block_m = blockIdx.y * GEMM_BM, block_n = blockIdx.x * GEMM_BN;
    GemmAcc acc = {};
    gemm_mainloop(acc, smem, operand<false>(p.ds, p.m, p.r, p.r), operand<true>(p.a, p.r, p.k, p.k), p.r, block_m,
                  block_n, NoOnTile{});
    const Dropout d = Dropout::from(p.dropout);
    if (d.active()) {
        unsigned long long q = ~0ull;  // accumulators come in column pairs: reuse the group
        uint4 w = make_uint4(0, 0, 0, 0);
        for_each_acc(acc, block_m, block_n, [&](int row, int col, float& v) {
            const unsigned long long e = (unsigned long long)row * p.k + col;
            if ((e >> 2) != q) {
                q = e >> 2;
                w = d.words(q);
            }
            v = philox_word(w, (unsigned)(e & 3)) >= d.threshold ? v * d.scale : 0.0f;
        });
    }
    gemm_mainloop(acc, smem, operand<false>(p.dy, p.m, p.n, p.n), w0, p.n, block_m, block_n, NoOnTile{});
    store_tile_c(acc, static_cast<Out*>(p.dx), p.k, block_m, block_n, p.m, p.k);
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS) lora_bwd_dx_f32out(const LoraBackwardParams p) {
    lora_bwd_dx<float>(p, operand<true>(p.w0, p.n, p.k, p.k));
}
SIMT_EXPORT_KERNEL(lora_bwd_dx_f32out, LoraBackwardParams)

extern "C" __global__ void __launch_bounds__(GEMM_THREADS) lora_bwd_dx_bf16out(const LoraBackwardParams p) {
    lora_bwd_dx<lf_bf16>(p, operand<true>(p.w0, p.n, p.k, p.k));
}
SIMT_EXPORT_KERNEL(lora_bwd_dx_bf16out, LoraBackwardParams)

// QLoRA: the same kernels with W0 read as NF4 and dequantized tile by tile on its way to shared
// memory (Nf4Operand, nf4.cuh): per 128×64 W0 tile 4 KiB of packed nibbles + statistics are
// read instead of 16 KiB of bf16; 1 KiB more static shared memory (the nested map).
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) qlora_fwd_split_f32out(const QloraForwardParams p) {
    __shared__ float nf4_map[256];
    lora_fwd_split<float>(p.lora, nf4_operand<false>(p.w0, nf4_map, p.lora.n, p.lora.k));
}
SIMT_EXPORT_KERNEL(qlora_fwd_split_f32out, QloraForwardParams)

extern "C" __global__ void __launch_bounds__(GEMM_THREADS) qlora_fwd_split_bf16out(const QloraForwardParams p) {
    __shared__ float nf4_map[256];
    lora_fwd_split<lf_bf16>(p.lora, nf4_operand<false>(p.w0, nf4_map, p.lora.n, p.lora.k));
}
SIMT_EXPORT_KERNEL(qlora_fwd_split_bf16out, QloraForwardParams)

extern "C" __global__ void __launch_bounds__(GEMM_THREADS) qlora_bwd_dx_f32out(const QloraBackwardParams p) {
    __shared__ float nf4_map[256];
    lora_bwd_dx<float>(p.lora, nf4_operand<true>(p.w0, nf4_map, p.lora.n, p.lora.k));
}
SIMT_EXPORT_KERNEL(qlora_bwd_dx_f32out, QloraBackwardParams)

extern "C" __global__ void __launch_bounds__(GEMM_THREADS) qlora_bwd_dx_bf16out(const QloraBackwardParams p) {
    __shared__ float nf4_map[256];
    lora_bwd_dx<lf_bf16>(p.lora, nf4_operand<true>(p.w0, nf4_map, p.lora.n, p.lora.k));
}
SIMT_EXPORT_KERNEL(qlora_bwd_dx_bf16out, QloraBackwardParams)

// Deterministic split-K reduction (fixed z order). 256 threads, grid-stride.
extern "C" __global__ void __launch_bounds__(256) splitk_reduce(const SplitKReduceParams p) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < p.len;
         i += (long long)gridDim.x * blockDim.x) {
        float sum = 0.0f;
        for (int z = 0; z < p.splits; ++z) sum += simt::ld_global(p.partial + z * p.len + i);
        simt::st_global(p.out + i, p.scale * sum);
    }
}
SIMT_EXPORT_KERNEL(splitk_reduce, SplitKReduceParams)
