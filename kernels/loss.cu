// Causal-LM cross-entropy: per row of logits, the loss term and the gradient in one kernel (the
// gradient is all the backward needs). Host wrapper and CPU reference: src/ops/loss.rs.
//
// One block of 256 threads per row (grid-stride over rows). Pass 1: each thread keeps a running
// maximum and a sum of exponentials rescaled to it (online softmax) over its 16-byte packs; two
// block reductions combine them into logsumexp. Pass 2 re-reads the row (from L2: a 32k-vocab
// f32 row is 128 KiB) and writes (softmax − onehot)·inv_count. Per logit of s bytes: reads 2·s,
// writes s; two exps. Rows that do not count write a zero gradient and a zero loss. (Checked
// by tests/llama_ops_sim.rs, with the target id every thread loads.)
#include "rowwise.cuh"

namespace lf {

constexpr int LOSS_THREADS = 256;
constexpr long long IGNORE_INDEX = -100;

template <class T, int N> __device__ void cross_entropy_row(const CrossEntropyParams& p, long long r, float* scratch) {
    const T* l = static_cast<const T*>(p.logits) + r * p.vocab;
    T* g = static_cast<T*>(p.dlogits) + r * p.vocab;
    const long long t = simt::ld_global_nc(p.targets + r);
    if (t == IGNORE_INDEX) {
        for (int j = threadIdx.x * N; j < p.vocab; j += LOSS_THREADS * N) {
            float z[N] = {};
            store<T, N>(g + j, z);
        }
        if (threadIdx.x == 0) simt::st_global(p.loss_rows + r, 0.0f);
        return;
    }
    float mx = neg_inf(), sum = 0.0f;
    for (int j = threadIdx.x * N; j < p.vocab; j += LOSS_THREADS * N) {
        float v[N];
        load<T, N>(l + j, v);
#pragma unroll
        for (int i = 0; i < N; ++i) {
            if (v[i] > mx) sum *= expf(mx - v[i]), mx = v[i];
            sum += expf(v[i] - mx);
        }
    }
    const float row_max = block_reduce(mx, scratch, MaxOp{}, neg_inf());
    // A thread that saw no logit (vocab < threads) adds nothing.
    const float row_sum = block_reduce(mx == neg_inf() ? 0.0f : sum * expf(mx - row_max), scratch, SumOp{}, 0.0f);
    const float lse = row_max + logf(row_sum);
    if (threadIdx.x == 0) simt::st_global(p.loss_rows + r, lse - Elem<T>::to_f32(simt::ld_global_nc(l + t)));
    for (int j = threadIdx.x * N; j < p.vocab; j += LOSS_THREADS * N) {
        float v[N];
        load<T, N>(l + j, v);
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = (expf(v[i] - lse) - (j + i == t ? 1.0f : 0.0f)) * p.inv_count;
        store<T, N>(g + j, v);
    }
}

template <class T, int N> __device__ __forceinline__ void cross_entropy_rows(const CrossEntropyParams& p, float* scratch) {
    for (long long r = blockIdx.x; r < p.rows; r += gridDim.x) cross_entropy_row<T, N>(p, r, scratch);
}

// Packs when the vocabulary and both pointers allow 16-byte accesses (tested outside the row
// loop, as in norm.cu).
template <class T> __device__ __forceinline__ void cross_entropy(const CrossEntropyParams& p) {
    __shared__ float scratch[32];
    constexpr int P = Elem<T>::Pack;
    if (p.vocab % P == 0 && aligned_to(p.logits, 16) && aligned_to(p.dlogits, 16)) cross_entropy_rows<T, P>(p, scratch);
    else cross_entropy_rows<T, 1>(p, scratch);
}

}  // namespace lf

using namespace lf;

extern "C" __global__ void __launch_bounds__(LOSS_THREADS) cross_entropy_f32(const CrossEntropyParams p) {
    cross_entropy<float>(p);
}
SIMT_EXPORT_KERNEL(cross_entropy_f32, CrossEntropyParams)

extern "C" __global__ void __launch_bounds__(LOSS_THREADS) cross_entropy_bf16(const CrossEntropyParams p) {
    cross_entropy<lf_bf16>(p);
}
SIMT_EXPORT_KERNEL(cross_entropy_bf16, CrossEntropyParams)
