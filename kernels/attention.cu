// Causal grouped-query attention, forward and backward, flash-style (online softmax; backward
// recomputes P from the saved logsumexp, nothing T×T is stored), on CUDA cores: a first GPU path
// for the trainer. Host wrappers and CPU reference: src/ops/attention.rs.
//
// One warp per row: a query row (forward, dQ) or a key row (dK, dV), four warps per block. The
// warp walks the other side in chunks of 32: lane l computes the full dot products of row
// j0 + l (its own row read as 16-byte packs when d allows), the warp combines the 32 scores
// with shuffles, then every lane accumulates its d/32 output dimensions over the chunk
// (coalesced across lanes). FLOPs per (query, visible key) pair: forward 4·d (q·k, p·v);
// backward dQ 10·d (a first pass for rowsum(P∘dP): q·k, dO·v; then both again and ds·k), dK/dV
// 8·d (k·q, v·dO, p·dO, ds·q). Bytes: each row reads the visible rows of the other side once per
// pass, from L2 after the first warp of the head (K and V of one head are T·d·s bytes).
// At Llama-7B sizes causal attention is ~1% of a layer's FLOPs at T = 512 (4·4096·256 per token
// against 2·202M); CUDA cores run ~1/16 of the H100's bf16 tensor-core rate, so these kernels
// would add roughly 15% to such a step, more at longer T. Tensor-core tiles (FlashAttention-2
// style) are the next step.
#include "rowwise.cuh"

namespace lf {

constexpr int ATT_WARPS = 4;
constexpr int ATT_THREADS = 32 * ATT_WARPS;
constexpr int ATT_MAX_D = 256;

// Σ_e a[e]·row[e] over d elements: `a` f32 in shared memory (read by all lanes alike), `row` in
// global memory, N elements per load.
template <class T, int N> __device__ __forceinline__ float dot(const float* a, const T* row, int d) {
    float s = 0.0f;
    for (int e = 0; e < d; e += N) {
        float v[N];
        load<T, N>(row + e, v);
#pragma unroll
        for (int i = 0; i < N; ++i) s += a[e + i] * v[i];
    }
    return s;
}

// Row `t` of sequence b, head h of a token-major [B·T, nh·d] tensor.
template <class T> __device__ __forceinline__ const T* head_row(const void* x, int b, int t, int seq, int nh, int h, int d) {
    return static_cast<const T*>(x) + ((long long)(b * seq + t) * nh + h) * d;
}

// Copies d elements of a global row into this warp's shared f32 vector.
template <class T> __device__ __forceinline__ void stage(float* dst, const T* row, int d) {
    for (int e = threadIdx.x % 32; e < d; e += 32) dst[e] = Elem<T>::to_f32(simt::ld_global_nc(row + e));
    __syncwarp();
}

// O and lse for query row (b, h, i).
template <class T, int N, int DPL> __device__ void attention_fwd_row(const AttentionParams& p, int b, int h, int i, float* qs) {
    const int d = p.head_dim, lane = threadIdx.x % 32, kvh = h / (p.heads / p.kv_heads);
    const int kend = i + p.tk - p.tq + 1;  // keys 0 .. kend − 1 are visible
    const auto dim = [&](int c) { return min(lane + 32 * c, d - 1); };
    stage<T>(qs, head_row<T>(p.q, b, i, p.tq, p.heads, h, d), d);
    float m = neg_inf(), l = 0.0f, acc[DPL] = {};
    for (int j0 = 0; j0 < kend; j0 += 32) {
        const int j = j0 + lane, n = min(32, kend - j0);
        const float s = j < kend ? p.scale * dot<T, N>(qs, head_row<T>(p.k, b, j, p.tk, p.kv_heads, kvh, d), d) : neg_inf();
        const float m_new = fmaxf(m, warp_reduce(s, MaxOp{}));
        const float pj = j < kend ? expf(s - m_new) : 0.0f, corr = expf(m - m_new);
        l = l * corr + warp_reduce(pj, SumOp{});
#pragma unroll
        for (int c = 0; c < DPL; ++c) acc[c] *= corr;
        for (int jj = 0; jj < n; ++jj) {
            const float w = __shfl_sync(WARP_FULL_MASK, pj, jj);
            const T* vrow = head_row<T>(p.v, b, j0 + jj, p.tk, p.kv_heads, kvh, d);
#pragma unroll
            for (int c = 0; c < DPL; ++c) acc[c] += w * Elem<T>::to_f32(simt::ld_global_nc(vrow + dim(c)));
        }
        m = m_new;
    }
    T* o = static_cast<T*>(p.out) + ((long long)(b * p.tq + i) * p.heads + h) * d;
#pragma unroll
    for (int c = 0; c < DPL; ++c)
        if (lane + 32 * c < d) simt::st_global(o + lane + 32 * c, Elem<T>::from_f32(acc[c] / l));
    if (lane == 0) simt::st_global(p.lse + ((long long)b * p.heads + h) * p.tq + i, m + logf(l));
    __syncwarp();  // qs is restaged by the next row
}

// dQ and delta = rowsum(P∘dP) for query row (b, h, i). P_ij = exp(scale·q·k_j − lse),
// dP_ij = dO·v_j; dQ = scale·Σ_j P_ij·(dP_ij − delta)·k_j.
template <class T, int N, int DPL> __device__ void attention_dq_row(const AttentionParams& p, int b, int h, int i, float* qs, float* dos) {
    const int d = p.head_dim, lane = threadIdx.x % 32, kvh = h / (p.heads / p.kv_heads);
    const int kend = i + p.tk - p.tq + 1;
    const auto dim = [&](int c) { return min(lane + 32 * c, d - 1); };
    const long long at = ((long long)b * p.heads + h) * p.tq + i;
    stage<T>(qs, head_row<T>(p.q, b, i, p.tq, p.heads, h, d), d);
    stage<T>(dos, head_row<T>(p.dout, b, i, p.tq, p.heads, h, d), d);
    const float lse = simt::ld_global_nc(p.lse + at);
    // P and dP of key j (0 past the visible keys).
    auto p_dp = [&](int j, float& pj, float& dpj) {
        pj = dpj = 0.0f;
        if (j < kend) {
            pj = expf(p.scale * dot<T, N>(qs, head_row<T>(p.k, b, j, p.tk, p.kv_heads, kvh, d), d) - lse);
            dpj = dot<T, N>(dos, head_row<T>(p.v, b, j, p.tk, p.kv_heads, kvh, d), d);
        }
    };
    float delta = 0.0f;
    for (int j0 = 0; j0 < kend; j0 += 32) {
        float pj, dpj;
        p_dp(j0 + lane, pj, dpj);
        delta += pj * dpj;
    }
    delta = warp_reduce(delta, SumOp{});
    float acc[DPL] = {};
    for (int j0 = 0; j0 < kend; j0 += 32) {
        float pj, dpj;
        p_dp(j0 + lane, pj, dpj);
        const float ds = pj * (dpj - delta);
        for (int jj = 0; jj < min(32, kend - j0); ++jj) {
            const float w = __shfl_sync(WARP_FULL_MASK, ds, jj);
            const T* krow = head_row<T>(p.k, b, j0 + jj, p.tk, p.kv_heads, kvh, d);
#pragma unroll
            for (int c = 0; c < DPL; ++c) acc[c] += w * Elem<T>::to_f32(simt::ld_global_nc(krow + dim(c)));
        }
    }
    T* dq = static_cast<T*>(p.out) + ((long long)(b * p.tq + i) * p.heads + h) * d;
#pragma unroll
    for (int c = 0; c < DPL; ++c)
        if (lane + 32 * c < d) simt::st_global(dq + lane + 32 * c, Elem<T>::from_f32(p.scale * acc[c]));
    if (lane == 0) simt::st_global(p.delta + at, delta);
    __syncwarp();
}

// dK and dV for key row (b, kv head g, j), summed over the query heads of the group and the
// queries that see key j: dV = Σ P_ij·dO_i, dK = scale·Σ P_ij·(dP_ij − delta_i)·q_i.
template <class T, int N, int DPL> __device__ void attention_dkv_row(const AttentionParams& p, int b, int g, int j, float* ks, float* vs) {
    const int d = p.head_dim, lane = threadIdx.x % 32, rep = p.heads / p.kv_heads;
    const auto dim = [&](int c) { return min(lane + 32 * c, d - 1); };
    const int i0 = max(0, j - (p.tk - p.tq));  // the first query that sees key j
    stage<T>(ks, head_row<T>(p.k, b, j, p.tk, p.kv_heads, g, d), d);
    stage<T>(vs, head_row<T>(p.v, b, j, p.tk, p.kv_heads, g, d), d);
    float dk[DPL] = {}, dv[DPL] = {};
    for (int h = g * rep; h < (g + 1) * rep; ++h) {
        const float* lse = p.lse + ((long long)b * p.heads + h) * p.tq;
        const float* delta = p.delta + ((long long)b * p.heads + h) * p.tq;
        for (int c0 = i0; c0 < p.tq; c0 += 32) {
            const int i = c0 + lane;
            float pi = 0.0f, ds = 0.0f;
            if (i < p.tq) {
                pi = expf(p.scale * dot<T, N>(ks, head_row<T>(p.q, b, i, p.tq, p.heads, h, d), d) -
                          simt::ld_global_nc(lse + i));
                ds = pi * (dot<T, N>(vs, head_row<T>(p.dout, b, i, p.tq, p.heads, h, d), d) - simt::ld_global_nc(delta + i));
            }
            for (int ii = 0; ii < min(32, p.tq - c0); ++ii) {
                const float wp = __shfl_sync(WARP_FULL_MASK, pi, ii), wd = __shfl_sync(WARP_FULL_MASK, ds, ii);
                const T* dorow = head_row<T>(p.dout, b, c0 + ii, p.tq, p.heads, h, d);
                const T* qrow = head_row<T>(p.q, b, c0 + ii, p.tq, p.heads, h, d);
#pragma unroll
                for (int c = 0; c < DPL; ++c) {
                    dv[c] += wp * Elem<T>::to_f32(simt::ld_global_nc(dorow + dim(c)));
                    dk[c] += wd * Elem<T>::to_f32(simt::ld_global_nc(qrow + dim(c)));
                }
            }
        }
    }
    const long long row = ((long long)(b * p.tk + j) * p.kv_heads + g) * d;
#pragma unroll
    for (int c = 0; c < DPL; ++c)
        if (lane + 32 * c < d) {
            simt::st_global(static_cast<T*>(p.out) + row + lane + 32 * c, Elem<T>::from_f32(p.scale * dk[c]));
            simt::st_global(static_cast<T*>(p.out2) + row + lane + 32 * c, Elem<T>::from_f32(dv[c]));
        }
    __syncwarp();
}

enum class AttnPass { Forward, Dq, Dkv };

// Warp w of the grid takes rows w, w + warps, ...: (b, head, t) with t fastest.
template <class T, int N, int DPL, AttnPass Pass> __device__ __forceinline__ void attention_rows(const AttentionParams& p, float* s0, float* s1) {
    const int nh = Pass == AttnPass::Dkv ? p.kv_heads : p.heads, seq = Pass == AttnPass::Dkv ? p.tk : p.tq;
    const long long rows = (long long)p.batch * nh * seq;
    const long long stride = (long long)gridDim.x * ATT_WARPS;
    for (long long r = blockIdx.x * (long long)ATT_WARPS + threadIdx.x / 32; r < rows; r += stride) {
        const int t = (int)(r % seq), h = (int)(r / seq % nh), b = (int)(r / seq / nh);
        if constexpr (Pass == AttnPass::Forward) attention_fwd_row<T, N, DPL>(p, b, h, t, s0);
        else if constexpr (Pass == AttnPass::Dq) attention_dq_row<T, N, DPL>(p, b, h, t, s0, s1);
        else attention_dkv_row<T, N, DPL>(p, b, h, t, s0, s1);
    }
}

// Output dimensions per lane (lane + 32·c, c < DPL) as a compile-time count, so accumulators
// stay in registers: the hot loops read a clamped index instead of testing c against d (eight
// loop-invariant predicates spilled on sm_90); only the stores test it.
template <class T, int N, AttnPass Pass> __device__ __forceinline__ void attention_dims(const AttentionParams& p, float* s0, float* s1) {
    const int dpl = (p.head_dim + 31) / 32;
    if (dpl == 1) attention_rows<T, N, 1, Pass>(p, s0, s1);
    else if (dpl == 2) attention_rows<T, N, 2, Pass>(p, s0, s1);
    else if (dpl <= 4) attention_rows<T, N, 4, Pass>(p, s0, s1);
    else attention_rows<T, N, 8, Pass>(p, s0, s1);
}

template <class T, AttnPass Pass> __device__ __forceinline__ void attention(const AttentionParams& p) {
    __shared__ float staged[ATT_WARPS][2][ATT_MAX_D];
    float* s0 = staged[threadIdx.x / 32][0];
    float* s1 = staged[threadIdx.x / 32][1];
    constexpr int P = Elem<T>::Pack;
    const bool vec = p.head_dim % P == 0 && aligned_to(p.q, 16) && aligned_to(p.k, 16) && aligned_to(p.v, 16) &&
                     (Pass == AttnPass::Forward || aligned_to(p.dout, 16));
    if (vec) attention_dims<T, P, Pass>(p, s0, s1);
    else attention_dims<T, 1, Pass>(p, s0, s1);
}

}  // namespace lf

using namespace lf;

extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_fwd_f32(const AttentionParams p) {
    attention<float, AttnPass::Forward>(p);
}
SIMT_EXPORT_KERNEL(attention_fwd_f32, AttentionParams)

extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_fwd_bf16(const AttentionParams p) {
    attention<lf_bf16, AttnPass::Forward>(p);
}
SIMT_EXPORT_KERNEL(attention_fwd_bf16, AttentionParams)

extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dq_f32(const AttentionParams p) {
    attention<float, AttnPass::Dq>(p);
}
SIMT_EXPORT_KERNEL(attention_bwd_dq_f32, AttentionParams)

extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dq_bf16(const AttentionParams p) {
    attention<lf_bf16, AttnPass::Dq>(p);
}
SIMT_EXPORT_KERNEL(attention_bwd_dq_bf16, AttentionParams)

extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dkv_f32(const AttentionParams p) {
    attention<float, AttnPass::Dkv>(p);
}
SIMT_EXPORT_KERNEL(attention_bwd_dkv_f32, AttentionParams)

extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dkv_bf16(const AttentionParams p) {
    attention<lf_bf16, AttnPass::Dkv>(p);
}
SIMT_EXPORT_KERNEL(attention_bwd_dkv_bf16, AttentionParams)
