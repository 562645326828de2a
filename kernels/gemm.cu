// Tiled bf16 tensor-core GEMM: C[M,N] = A[M,K] · B[N,K]ᵀ, f32 accumulation, f32 or bf16 output.
// Host wrapper: `ops::gemm::launch_gemm` (src/ops/gemm.rs); CPU reference: `ops::gemm::gemm_ref`.
//
// Grid: (ceil(N/128), ceil(M/128)), 256 threads, 36 KiB static shared memory.
// FLOPs: 2·M·N·K. Global bytes requested: A is read ceil(N/128) times and B ceil(M/128) times,
// 2·K·(M·ceil(N/128) + N·ceil(M/128)) B, plus the output M·N·sizeof(out).
#include "simt.h"
#include "params.h"
#include "gemm_tile.cuh"

template <class Out>
__device__ __forceinline__ void gemm_kernel(const GemmParams& p) {
    __shared__ __align__(16) lf::GemmSmem smem;
    const int block_m = blockIdx.y * lf::GEMM_BM;
    const int block_n = blockIdx.x * lf::GEMM_BN;
    lf::GemmAcc acc = {};
    lf::gemm_mainloop(acc, smem, lf::operand<false>(p.a, p.m, p.k, p.lda), lf::operand<false>(p.b, p.n, p.k, p.ldb),
                      p.k, block_m, block_n, lf::NoOnTile{});
    lf::store_tile_c(acc, static_cast<Out*>(p.c), p.ldc, block_m, block_n, p.m, p.n);
}

extern "C" __global__ void __launch_bounds__(lf::GEMM_THREADS) gemm_bf16_f32out(const GemmParams p) {
    gemm_kernel<float>(p);
}
SIMT_EXPORT_KERNEL(gemm_bf16_f32out, GemmParams)

extern "C" __global__ void __launch_bounds__(lf::GEMM_THREADS) gemm_bf16_bf16out(const GemmParams p) {
    gemm_kernel<lf_bf16>(p);
}
SIMT_EXPORT_KERNEL(gemm_bf16_bf16out, GemmParams)
