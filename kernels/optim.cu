// The optimizer step on the device: AdamW on the f32 LoRA parameters, and the sum of squares
// behind gradient-norm clipping. Host wrappers and CPU reference: src/train/mod.rs.
//
// Both are grid-stride over float4 packs (when aligned) then a scalar tail. AdamW reads p, g,
// m, v and writes p, m, v: 28 bytes and ~15 FLOP per element. sum_squares reads 4 bytes per
// element; each block reduces its share in a fixed order and writes one partial, so the norm
// does not depend on timing (no atomics).
#include "rowwise.cuh"

namespace lf {

constexpr int OPTIM_THREADS = 256;

template <int N> __device__ __forceinline__ void adamw_at(const AdamWParams& a, long long i) {
    float p[N], g[N], m[N], v[N];
    load<float, N, false>(a.p + i, p);
    load<float, N>(a.g + i, g);
    load<float, N, false>(a.m + i, m);
    load<float, N, false>(a.v + i, v);
#pragma unroll
    for (int j = 0; j < N; ++j) {
        const float gj = a.grad_scale * g[j];
        p[j] -= a.lr * a.weight_decay * p[j];
        m[j] = a.beta1 * m[j] + (1.0f - a.beta1) * gj;
        v[j] = a.beta2 * v[j] + (1.0f - a.beta2) * gj * gj;
        p[j] -= a.step * m[j] / (sqrtf(v[j]) / a.bc2s + a.eps);
    }
    store<float, N>(a.p + i, p);
    store<float, N>(a.m + i, m);
    store<float, N>(a.v + i, v);
}

}  // namespace lf

using namespace lf;

extern "C" __global__ void __launch_bounds__(OPTIM_THREADS) adamw_f32(const AdamWParams a) {
    const bool vec = aligned_to(a.p, 16) && aligned_to(a.g, 16) && aligned_to(a.m, 16) && aligned_to(a.v, 16);
    const long long packs = vec ? a.n / 4 : 0;
    const long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
    for (long long q = first; q < packs; q += stride) adamw_at<4>(a, 4 * q);
    for (long long i = 4 * packs + first; i < a.n; i += stride) adamw_at<1>(a, i);
}
SIMT_EXPORT_KERNEL(adamw_f32, AdamWParams)

extern "C" __global__ void __launch_bounds__(OPTIM_THREADS) sum_squares_f32(const SumSquaresParams s) {
    __shared__ float scratch[32];
    const bool vec = aligned_to(s.x, 16);
    const long long packs = vec ? s.n / 4 : 0;
    const long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
    float acc = 0.0f;
    for (long long q = first; q < packs; q += stride) {
        float v[4];
        load<float, 4>(s.x + 4 * q, v);
        acc += v[0] * v[0] + v[1] * v[1] + v[2] * v[2] + v[3] * v[3];
    }
    for (long long i = 4 * packs + first; i < s.n; i += stride) {
        const float v = simt::ld_global_nc(s.x + i);
        acc += v * v;
    }
    acc = block_reduce(acc, scratch, SumOp{}, 0.0f);
    if (threadIdx.x == 0) simt::st_global(s.partials + blockIdx.x, acc);
}
SIMT_EXPORT_KERNEL(sum_squares_f32, SumSquaresParams)
