// Token embedding lookup: a gather of rows of the (frozen) table. Host wrapper and CPU
// reference: src/ops/embedding.rs.
//
// Grid-stride over (token, 16-byte pack of the row) when dim and both pointers allow packs,
// else over single elements: consecutive threads copy consecutive parts of a row, so reads and
// writes are coalesced. Bytes: dim·s read and written per token, plus the 4-byte id, which each
// thread of the row loads (cached after the first); no FLOPs. tests/llama_ops_sim.rs checks them.
#include "rowwise.cuh"

namespace lf {

constexpr int EMBEDDING_THREADS = 256;

template <class T, int N> __device__ __forceinline__ void embedding_rows(const EmbeddingParams& p) {
    const int per_row = p.dim / N;
    const long long units = p.tokens * per_row;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long u = blockIdx.x * (long long)blockDim.x + threadIdx.x; u < units; u += stride) {
        const long long t = u / per_row, e = (u % per_row) * N;
        const unsigned id = simt::ld_global_nc(p.ids + t);
        float v[N];
        load<T, N>(static_cast<const T*>(p.table) + (long long)id * p.dim + e, v);
        store<T, N>(static_cast<T*>(p.out) + t * p.dim + e, v);
    }
}

template <class T> __device__ __forceinline__ void embedding(const EmbeddingParams& p) {
    constexpr int P = Elem<T>::Pack;
    if (p.dim % P == 0 && aligned_to(p.table, 16) && aligned_to(p.out, 16)) embedding_rows<T, P>(p);
    else embedding_rows<T, 1>(p);
}

}  // namespace lf

using namespace lf;

extern "C" __global__ void __launch_bounds__(EMBEDDING_THREADS) embedding_f32(const EmbeddingParams p) {
    embedding<float>(p);
}
SIMT_EXPORT_KERNEL(embedding_f32, EmbeddingParams)

extern "C" __global__ void __launch_bounds__(EMBEDDING_THREADS) embedding_bf16(const EmbeddingParams p) {
    embedding<lf_bf16>(p);
}
SIMT_EXPORT_KERNEL(embedding_bf16, EmbeddingParams)
