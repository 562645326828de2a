// Rotary position embedding, in place on q or k (forward) or on their gradients (backward: the
// rotation by −θ). Host wrapper and CPU reference: src/ops/rope.rs.
//
// One thread per (row, head, pack of dimensions i < half): it reads x[i..i+N] and
// x[i+half..i+half+N] (16-byte packs when half is a multiple of the pack and x is aligned, else
// N = 1), cos/sin[pos, i..i+N] from the f32 tables (L2-resident: max_pos·half·8 bytes), and
// writes both halves back. Per element of s bytes: reads s + 4 (table) and writes s; 6 FLOP per
// pair. Arithmetic in f32 with one rounding per output (Hugging Face's bf16 path rounds after
// each product and the sum; within 2⁻⁸ of this).
#include "rowwise.cuh"

namespace lf {

constexpr int ROPE_THREADS = 256;

// N consecutive f32 of a table row (16-byte loads when N is a multiple of 4: then aligned).
template <int N> __device__ __forceinline__ void load_table(const float* p, float (&v)[N]) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int q = 0; q < N / 4; ++q) {
            const float4 f = simt::ld_global_nc(reinterpret_cast<const float4*>(p) + q);
            v[4 * q] = f.x, v[4 * q + 1] = f.y, v[4 * q + 2] = f.z, v[4 * q + 3] = f.w;
        }
    } else {
#pragma unroll
        for (int j = 0; j < N; ++j) v[j] = simt::ld_global_nc(p + j);
    }
}

template <class T, int N> __device__ __forceinline__ void rope_rows(const RopeParams& p) {
    const int packs = p.half / N;
    const long long units = p.rows * p.heads * packs;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long u = blockIdx.x * (long long)blockDim.x + threadIdx.x; u < units; u += stride) {
        const int i = (int)(u % packs) * N;
        const long long head = u / packs;  // row · heads + head
        const long long row = head / p.heads;
        const long long pos = p.pos0 + row % p.seq;
        T* lo = static_cast<T*>(p.x) + head * 2 * p.half + i;
        T* hi = lo + p.half;
        float a[N], b[N], c[N], s[N];
        load<T, N, false>(lo, a);
        load<T, N, false>(hi, b);
        load_table<N>(p.cos + pos * p.half + i, c);
        load_table<N>(p.sin + pos * p.half + i, s);
#pragma unroll
        for (int j = 0; j < N; ++j) {
            const float sn = p.sign * s[j], x0 = a[j];
            a[j] = x0 * c[j] - b[j] * sn;
            b[j] = b[j] * c[j] + x0 * sn;
        }
        store<T, N>(lo, a);
        store<T, N>(hi, b);
    }
}

template <class T> __device__ __forceinline__ void rope(const RopeParams& p) {
    constexpr int P = Elem<T>::Pack;
    if (p.half % P == 0 && aligned_to(p.x, 16) && aligned_to(p.cos, 16) && aligned_to(p.sin, 16)) rope_rows<T, P>(p);
    else rope_rows<T, 1>(p);
}

}  // namespace lf

using namespace lf;

extern "C" __global__ void __launch_bounds__(ROPE_THREADS) rope_f32(const RopeParams p) { rope<float>(p); }
SIMT_EXPORT_KERNEL(rope_f32, RopeParams)

extern "C" __global__ void __launch_bounds__(ROPE_THREADS) rope_bf16(const RopeParams p) { rope<lf_bf16>(p); }
SIMT_EXPORT_KERNEL(rope_bf16, RopeParams)
