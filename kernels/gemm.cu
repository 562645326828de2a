// Tiled bf16 tensor-core GEMM, f32 accumulation, f32 or bf16 output, in three operand layouts:
//   gemm_bf16_*     C[M,N] = A·Bᵀ   A [M,K], B [N,K]   (the forward of a linear layer)
//   gemm_bf16_nn_*  C[M,N] = A·B    A [M,K], B [K,N]   (dx = dy·W)
//   gemm_bf16_tn_*  C[M,N] = Aᵀ·B   A [K,M], B [K,N]   (dW = dyᵀ·x)
// Host wrapper: `ops::gemm::launch_gemm` (src/ops/gemm.rs); CPU reference: `ops::gemm::gemm_ref`.
//
// Grid: (ceil(N/128), ceil(M/128)), 256 threads, 36 KiB static shared memory.
// FLOPs: 2·M·N·K. Global bytes requested: A is read ceil(N/128) times and B ceil(M/128) times,
// 2·K·(M·ceil(N/128) + N·ceil(M/128)) B, plus the output M·N·sizeof(out).
#include "simt.h"
#include "params.h"
#include "gemm_tile.cuh"

template <class Out, bool A_KMAJOR, bool B_KMAJOR>
__device__ __forceinline__ void gemm_kernel(const GemmParams& p) {
    __shared__ __align__(16) lf::GemmSmem smem;
    const int block_m = blockIdx.y * lf::GEMM_BM;
    const int block_n = blockIdx.x * lf::GEMM_BN;
    lf::GemmAcc acc = {};
    // Stored shapes: K-major operands hold K rows.
    const auto a = lf::operand<A_KMAJOR>(p.a, A_KMAJOR ? p.k : p.m, A_KMAJOR ? p.m : p.k, p.lda);
    const auto b = lf::operand<B_KMAJOR>(p.b, B_KMAJOR ? p.k : p.n, B_KMAJOR ? p.n : p.k, p.ldb);
    lf::gemm_mainloop(acc, smem, a, b, p.k, block_m, block_n, lf::NoOnTile{});
    lf::store_tile_c(acc, static_cast<Out*>(p.c), p.ldc, block_m, block_n, p.m, p.n, p.alpha);
}

// Entry points are spelled out (not macro-generated) so build/kernel_names.rs can find them in
// the source as well as in the PTX.
extern "C" __global__ void __launch_bounds__(lf::GEMM_THREADS) gemm_bf16_f32out(const GemmParams p) {
    gemm_kernel<float, false, false>(p);
}
SIMT_EXPORT_KERNEL(gemm_bf16_f32out, GemmParams)

extern "C" __global__ void __launch_bounds__(lf::GEMM_THREADS) gemm_bf16_bf16out(const GemmParams p) {
    gemm_kernel<lf_bf16, false, false>(p);
}
SIMT_EXPORT_KERNEL(gemm_bf16_bf16out, GemmParams)

extern "C" __global__ void __launch_bounds__(lf::GEMM_THREADS) gemm_bf16_nn_f32out(const GemmParams p) {
    gemm_kernel<float, false, true>(p);
}
SIMT_EXPORT_KERNEL(gemm_bf16_nn_f32out, GemmParams)

extern "C" __global__ void __launch_bounds__(lf::GEMM_THREADS) gemm_bf16_nn_bf16out(const GemmParams p) {
    gemm_kernel<lf_bf16, false, true>(p);
}
SIMT_EXPORT_KERNEL(gemm_bf16_nn_bf16out, GemmParams)

extern "C" __global__ void __launch_bounds__(lf::GEMM_THREADS) gemm_bf16_tn_f32out(const GemmParams p) {
    gemm_kernel<float, true, true>(p);
}
SIMT_EXPORT_KERNEL(gemm_bf16_tn_f32out, GemmParams)

extern "C" __global__ void __launch_bounds__(lf::GEMM_THREADS) gemm_bf16_tn_bf16out(const GemmParams p) {
    gemm_kernel<lf_bf16, true, true>(p);
}
SIMT_EXPORT_KERNEL(gemm_bf16_tn_bf16out, GemmParams)
