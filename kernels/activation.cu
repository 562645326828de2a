// SwiGLU forward and backward (Llama's MLP: h = silu(gate)·up, then down_proj).
// Host wrappers and CPU reference: src/ops/activation.rs.
//
// Grid-stride over 16-byte packs (4 f32 / 8 bf16 per thread and step) when every pointer is
// 16-byte aligned, then the n % pack tail element by element. Per element of s bytes: forward
// reads 2·s and writes s; backward reads 3·s and writes 2·s. ~20 FLOP per element with one exp:
// memory-bound on any sm_80+ part.
#include "rowwise.cuh"

namespace lf {

constexpr int SWIGLU_THREADS = 256;

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// Elements i .. i + N.
template <class T, int N, bool Backward> __device__ __forceinline__ void swiglu_at(const SwigluParams& p, long long i) {
    float g[N], u[N];
    load<T, N>(static_cast<const T*>(p.g) + i, g);
    load<T, N>(static_cast<const T*>(p.u) + i, u);
    if constexpr (!Backward) {
        // Hugging Face: act_fn(gate) in the input dtype, then times up.
#pragma unroll
        for (int j = 0; j < N; ++j) g[j] = Elem<T>::round(g[j] * sigmoid(g[j])) * u[j];
        store<T, N>(static_cast<T*>(p.out) + i, g);
    } else {
        float dh[N];
        load<T, N>(static_cast<const T*>(p.dh) + i, dh);
#pragma unroll
        for (int j = 0; j < N; ++j) {
            const float s = sigmoid(g[j]);
            const float dg = dh[j] * u[j] * s * (1.0f + g[j] * (1.0f - s));
            u[j] = dh[j] * g[j] * s;
            g[j] = dg;
        }
        store<T, N>(static_cast<T*>(p.out) + i, g);
        store<T, N>(static_cast<T*>(p.out2) + i, u);
    }
}

template <class T, bool Backward> __device__ __forceinline__ void swiglu(const SwigluParams& p) {
    constexpr int P = Elem<T>::Pack;
    const bool vec = aligned_to(p.g, 16) && aligned_to(p.u, 16) && aligned_to(p.out, 16) &&
                     (!Backward || (aligned_to(p.dh, 16) && aligned_to(p.out2, 16)));
    const long long packs = vec ? p.n / P : 0;
    const long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
    for (long long g = first; g < packs; g += stride) swiglu_at<T, P, Backward>(p, g * P);
    for (long long i = packs * P + first; i < p.n; i += stride) swiglu_at<T, 1, Backward>(p, i);
}

}  // namespace lf

using namespace lf;

extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS) swiglu_fwd_f32(const SwigluParams p) {
    swiglu<float, false>(p);
}
SIMT_EXPORT_KERNEL(swiglu_fwd_f32, SwigluParams)

extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS) swiglu_fwd_bf16(const SwigluParams p) {
    swiglu<lf_bf16, false>(p);
}
SIMT_EXPORT_KERNEL(swiglu_fwd_bf16, SwigluParams)

extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS) swiglu_bwd_f32(const SwigluParams p) {
    swiglu<float, true>(p);
}
SIMT_EXPORT_KERNEL(swiglu_bwd_f32, SwigluParams)

extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS) swiglu_bwd_bf16(const SwigluParams p) {
    swiglu<lf_bf16, true>(p);
}
SIMT_EXPORT_KERNEL(swiglu_bwd_bf16, SwigluParams)
