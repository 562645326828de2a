// RMSNorm forward and backward (Llama's input_layernorm, post_attention_layernorm and norm).
// Host wrappers and CPU reference: src/ops/norm.rs.
//
// One block of 128 threads per row (grid-stride over rows), 16-byte packs when the row length
// and pointers allow (k a multiple of 4 f32 / 8 bf16), scalar otherwise; consecutive threads take
// consecutive packs, so every warp load is coalesced. The row is read twice (sum of squares,
// then scale), the second time from L1/L2 (a 4096-wide bf16 row is 8 KiB). Per row of k
// elements of s bytes: forward reads x twice and w (3·k·s requested; the second pass and w,
// shared by all rows, hit the cache, so k·s from DRAM) and writes k·s + 4; backward reads x, dy
// and w twice each (6·k·s requested, 2·k·s from DRAM) and writes k·s. ~4 FLOP per element
// forward, ~8 backward: memory-bound. tests/llama_ops_sim.rs checks the requested bytes.
#include "rowwise.cuh"

namespace lf {

constexpr int NORM_THREADS = 128;

template <class T, int N> __device__ void rms_norm_fwd_row(const RmsNormParams& p, long long r, float* scratch) {
    const T* x = static_cast<const T*>(p.x) + r * p.k;
    const T* w = static_cast<const T*>(p.w);
    T* y = static_cast<T*>(p.out) + r * p.k;
    float ss = 0.0f;
    for (int j = threadIdx.x * N; j < p.k; j += NORM_THREADS * N) {
        float v[N];
        load<T, N>(x + j, v);
#pragma unroll
        for (int i = 0; i < N; ++i) ss += v[i] * v[i];
    }
    const float rstd = rsqrtf(block_reduce(ss, scratch, SumOp{}, 0.0f) / p.k + p.eps);
    if (threadIdx.x == 0) simt::st_global(p.rstd + r, rstd);
    for (int j = threadIdx.x * N; j < p.k; j += NORM_THREADS * N) {
        float v[N], wv[N];
        load<T, N>(x + j, v);
        load<T, N>(w + j, wv);
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = wv[i] * Elem<T>::round(v[i] * rstd);
        store<T, N>(y + j, v);
    }
}

template <class T, int N> __device__ void rms_norm_bwd_row(const RmsNormParams& p, long long r, float* scratch) {
    const T* x = static_cast<const T*>(p.x) + r * p.k;
    const T* dy = static_cast<const T*>(p.dy) + r * p.k;
    const T* w = static_cast<const T*>(p.w);
    T* dx = static_cast<T*>(p.out) + r * p.k;
    const float rstd = simt::ld_global_nc(p.rstd + r);
    float dot = 0.0f;
    for (int j = threadIdx.x * N; j < p.k; j += NORM_THREADS * N) {
        float xv[N], gv[N], wv[N];
        load<T, N>(x + j, xv);
        load<T, N>(dy + j, gv);
        load<T, N>(w + j, wv);
#pragma unroll
        for (int i = 0; i < N; ++i) dot += gv[i] * wv[i] * xv[i] * rstd;
    }
    const float mean = block_reduce(dot, scratch, SumOp{}, 0.0f) / p.k;
    for (int j = threadIdx.x * N; j < p.k; j += NORM_THREADS * N) {
        float xv[N], gv[N], wv[N];
        load<T, N>(x + j, xv);
        load<T, N>(dy + j, gv);
        load<T, N>(w + j, wv);
#pragma unroll
        for (int i = 0; i < N; ++i) gv[i] = rstd * (gv[i] * wv[i] - xv[i] * rstd * mean);
        store<T, N>(dx + j, gv);
    }
}

template <class T, int N, bool Backward> __device__ __forceinline__ void rms_norm_rows(const RmsNormParams& p, float* scratch) {
    for (long long r = blockIdx.x; r < p.rows; r += gridDim.x) {
        if constexpr (Backward) rms_norm_bwd_row<T, N>(p, r, scratch);
        else rms_norm_fwd_row<T, N>(p, r, scratch);
    }
}

// Packs when k and every row pointer allow 16-byte accesses. (The test sits outside the row
// loop: inside, ptxas for sm_90 kept its predicate on the stack, a 2-byte spill.)
template <class T, bool Backward> __device__ __forceinline__ void rms_norm(const RmsNormParams& p) {
    __shared__ float scratch[32];
    constexpr int P = Elem<T>::Pack;
    const bool vec = p.k % P == 0 && aligned_to(p.x, 16) && aligned_to(p.w, 16) && aligned_to(p.out, 16) &&
                     (!Backward || aligned_to(p.dy, 16));
    if (vec) rms_norm_rows<T, P, Backward>(p, scratch);
    else rms_norm_rows<T, 1, Backward>(p, scratch);
}

}  // namespace lf

using namespace lf;

extern "C" __global__ void __launch_bounds__(NORM_THREADS) rms_norm_fwd_f32(const RmsNormParams p) {
    rms_norm<float, false>(p);
}
SIMT_EXPORT_KERNEL(rms_norm_fwd_f32, RmsNormParams)

extern "C" __global__ void __launch_bounds__(NORM_THREADS) rms_norm_fwd_bf16(const RmsNormParams p) {
    rms_norm<lf_bf16, false>(p);
}
SIMT_EXPORT_KERNEL(rms_norm_fwd_bf16, RmsNormParams)

extern "C" __global__ void __launch_bounds__(NORM_THREADS) rms_norm_bwd_f32(const RmsNormParams p) {
    rms_norm<float, true>(p);
}
SIMT_EXPORT_KERNEL(rms_norm_bwd_f32, RmsNormParams)

extern "C" __global__ void __launch_bounds__(NORM_THREADS) rms_norm_bwd_bf16(const RmsNormParams p) {
    rms_norm<lf_bf16, true>(p);
}
SIMT_EXPORT_KERNEL(rms_norm_bwd_bf16, RmsNormParams)
