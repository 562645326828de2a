// Pointwise tensor arithmetic between the layer ops of a training step: the residual add and
// the f32 → bf16 cast (LoRA's f32 master weights to the kernels' bf16 operands). Host wrappers
// and CPU references: src/ops/pointwise.rs.
//
// Grid-stride over 16-byte packs of the output type when every pointer is aligned, then the
// n % pack tail element by element. Bytes per element: add reads 2·s and writes s; the cast
// reads 4 and writes 2. Memory-bound; one rounding per output.
#include "rowwise.cuh"

namespace lf {

constexpr int POINTWISE_THREADS = 256;

template <class T, int N> __device__ __forceinline__ void add_at(const PointwiseParams& p, long long i) {
    float a[N], b[N];
    load<T, N>(static_cast<const T*>(p.a) + i, a);
    load<T, N>(static_cast<const T*>(p.b) + i, b);
#pragma unroll
    for (int j = 0; j < N; ++j) a[j] += b[j];
    store<T, N>(static_cast<T*>(p.out) + i, a);
}

// N f32 in (two float4 loads for a bf16 pack of 8), N bf16 out.
template <int N> __device__ __forceinline__ void cast_at(const PointwiseParams& p, long long i) {
    float a[N];
    const float* src = static_cast<const float*>(p.a) + i;
    if constexpr (N == Elem<lf_bf16>::Pack) {
        float lo[4], hi[4];
        load<float, 4>(src, lo);
        load<float, 4>(src + 4, hi);
#pragma unroll
        for (int j = 0; j < 4; ++j) a[j] = lo[j], a[4 + j] = hi[j];
    } else {
        load<float, N>(src, a);
    }
    store<lf_bf16, N>(static_cast<lf_bf16*>(p.out) + i, a);
}

// Packs of the output type, then the tail; `Cast` selects the cast, else the add in T.
template <class T, bool Cast> __device__ __forceinline__ void pointwise(const PointwiseParams& p) {
    constexpr int P = Elem<T>::Pack;
    const bool vec = aligned_to(p.a, 16) && aligned_to(p.out, 16) && (Cast || aligned_to(p.b, 16));
    const long long packs = vec ? p.n / P : 0;
    const long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
    for (long long g = first; g < packs; g += stride) {
        if constexpr (Cast) cast_at<P>(p, g * P);
        else add_at<T, P>(p, g * P);
    }
    for (long long i = packs * P + first; i < p.n; i += stride) {
        if constexpr (Cast) cast_at<1>(p, i);
        else add_at<T, 1>(p, i);
    }
}

}  // namespace lf

using namespace lf;

extern "C" __global__ void __launch_bounds__(POINTWISE_THREADS) add_f32(const PointwiseParams p) {
    pointwise<float, false>(p);
}
SIMT_EXPORT_KERNEL(add_f32, PointwiseParams)

extern "C" __global__ void __launch_bounds__(POINTWISE_THREADS) add_bf16(const PointwiseParams p) {
    pointwise<lf_bf16, false>(p);
}
SIMT_EXPORT_KERNEL(add_bf16, PointwiseParams)

extern "C" __global__ void __launch_bounds__(POINTWISE_THREADS) cast_f32_bf16(const PointwiseParams p) {
    pointwise<lf_bf16, true>(p);
}
SIMT_EXPORT_KERNEL(cast_f32_bf16, PointwiseParams)
