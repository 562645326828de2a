// simt.h — the one portability header every kernel includes.
//
// Under the CUDA compiler (nvcc, NVRTC) it adds the few wrappers the kernels need on top of CUDA
// (inline PTX for mma.sync/ldmatrix, counted global loads/stores, dynamic shared memory,
// kernel export). Under a host C++ compiler it turns the same source into a program for the SIMT
// simulator (src/device/sim/): each CUDA thread is a fiber, __syncthreads and warp collectives are
// switch points, and mma/ldmatrix are emulated with the PTX ISA fragment layouts.
// Design notes: shared/SIMULATOR.md. Host flags: -std=c++17 -O2 -fno-strict-aliasing
// -Wno-unknown-pragmas.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
// =====================================================================================
// Device: NVRTC has no standard headers, so nothing but the CUDA type headers here.
// =====================================================================================
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Host-only registration; the driver finds device kernels by their extern "C" name.
#define SIMT_EXPORT_KERNEL(kernel_name, ParamsType)
// `extern __shared__` cannot be expressed as a host macro, hence this declaration form.
#define SIMT_DYN_SHARED(T, name)                                                     \
    extern __shared__ __align__(16) unsigned char simt_dyn_smem_[];                   \
    T* name = reinterpret_cast<T*>(simt_dyn_smem_)

namespace simt {

// Plain load: correct also for data written earlier by the same kernel.
template <class T> __device__ __forceinline__ T ld_global(const T* p) { return *p; }
template <class T> __device__ __forceinline__ void st_global(T* p, const T& v) { *p = v; }

namespace detail {
// __ldg exists only for the built-in vector/scalar types (and bf16/half); other T load plainly.
template <class T> __device__ __forceinline__ auto ldg(const T* p, int) -> decltype(__ldg(p)) {
    return __ldg(p);
}
template <class T> __device__ __forceinline__ T ldg(const T* p, long) { return *p; }
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
}  // namespace detail

// Read-only (non-coherent) load: only for inputs no thread of the launch writes.
template <class T> __device__ __forceinline__ T ld_global_nc(const T* p) {
    return detail::ldg(p, 0);
}

#define SIMT_MMA_16816(fn, ab_type)                                                      \
    __device__ __forceinline__ void fn(float (&d)[4], const unsigned (&a)[4],            \
                                       const unsigned (&b)[2], const float (&c)[4]) {    \
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." ab_type "." ab_type        \
                     ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"  \
                     : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                    \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), \
                       "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));                      \
    }
SIMT_MMA_16816(mma_m16n8k16_bf16, "bf16")
SIMT_MMA_16816(mma_m16n8k16_f16, "f16")
#undef SIMT_MMA_16816

// PTX needs the register list spelled out, so one macro per register count.
#define SIMT_LDMATRIX(fn, shape, n, regs, outs)                                           \
    __device__ __forceinline__ void fn(unsigned (&r)[n], const void* smem_row) {          \
        asm volatile("ldmatrix.sync.aligned.m8n8." shape ".shared.b16 " regs ", [%" #n "];\n" \
                     : outs                                                               \
                     : "r"(detail::smem_u32(smem_row)));                                  \
    }
#define SIMT_R1 "=r"(r[0])
#define SIMT_R2 "=r"(r[0]), "=r"(r[1])
#define SIMT_R4 "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
SIMT_LDMATRIX(ldmatrix_x1, "x1", 1, "{%0}", SIMT_R1)
SIMT_LDMATRIX(ldmatrix_x2, "x2", 2, "{%0,%1}", SIMT_R2)
SIMT_LDMATRIX(ldmatrix_x4, "x4", 4, "{%0,%1,%2,%3}", SIMT_R4)
SIMT_LDMATRIX(ldmatrix_x1_trans, "x1.trans", 1, "{%0}", SIMT_R1)
SIMT_LDMATRIX(ldmatrix_x2_trans, "x2.trans", 2, "{%0,%1}", SIMT_R2)
SIMT_LDMATRIX(ldmatrix_x4_trans, "x4.trans", 4, "{%0,%1,%2,%3}", SIMT_R4)
#undef SIMT_R1
#undef SIMT_R2
#undef SIMT_R4
#undef SIMT_LDMATRIX

}  // namespace simt

#else
// =====================================================================================
// Host: the SIMT simulator.
// =====================================================================================
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <type_traits>

// Runtime-owned state (thread indices, counters) is written by the scheduler and read by all
// fibers; TSan must not see those accesses, or it would report them and, worse, the scheduler
// would take part in happens-before edges and hide real races (SIMULATOR.md pitfall 5).
#if defined(__SANITIZE_THREAD__)
#define SIMT_NO_TSAN inline __attribute__((no_sanitize("thread"), noinline))
#else
#define SIMT_NO_TSAN inline __attribute__((always_inline))
#endif

// ---- qualifiers ------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// ASan puts no redzones around thread_local data (pitfall 2): under ASan shared memory is a
// plain static and the runtime runs one block at a time process-wide.
#if defined(__SANITIZE_ADDRESS__)
#define __shared__ static
#else
#define __shared__ static thread_local
#endif

// ---- vector types (alignment as in CUDA's vector_types.h) -----------------------------
#define SIMT_VECTOR_TYPES(T, N)                                                               \
    struct __attribute__((aligned(2 * sizeof(T)))) N##2 { T x, y; };                          \
    struct N##3 { T x, y, z; };                                                               \
    struct __attribute__((aligned(4 * sizeof(T) < 16 ? 4 * sizeof(T) : 16))) N##4 {           \
        T x, y, z, w;                                                                         \
    };                                                                                        \
    inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }                                  \
    inline N##3 make_##N##3(T x, T y, T z) { return N##3{x, y, z}; }                          \
    inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }
SIMT_VECTOR_TYPES(char, char)
SIMT_VECTOR_TYPES(unsigned char, uchar)
SIMT_VECTOR_TYPES(short, short)
SIMT_VECTOR_TYPES(unsigned short, ushort)
SIMT_VECTOR_TYPES(int, int)
SIMT_VECTOR_TYPES(unsigned, uint)
SIMT_VECTOR_TYPES(long long, longlong)
SIMT_VECTOR_TYPES(unsigned long long, ulonglong)
SIMT_VECTOR_TYPES(float, float)
SIMT_VECTOR_TYPES(double, double)
#undef SIMT_VECTOR_TYPES

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

static constexpr int warpSize = 32;

// ---- bf16 / fp16 ---------------------------------------------------------------------------
namespace simt {
namespace detail {
template <class To, class From> inline To bit_cast(const From& f) {
    static_assert(sizeof(To) == sizeof(From), "bit_cast size");
    To t;
    memcpy(&t, &f, sizeof t);
    return t;
}
// Round to nearest even, as cvt.rn.bf16.f32; NaN -> canonical 0x7fff like CUDA.
inline unsigned short f32_to_bf16_bits(float f) {
    uint32_t u = bit_cast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    return static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_f32(unsigned short h) { return bit_cast<float>(uint32_t(h) << 16); }
// IEEE binary16, round to nearest even (overflow -> inf, gradual underflow).
inline unsigned short f32_to_f16_bits(float f) {
    const uint32_t u = bit_cast<uint32_t>(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7fff;                        // NaN
    if (a >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520: inf
    if (a >= 0x38800000u) {                                    // normal: rebias exponent 127 -> 15
        const uint32_t r = a - 0x38000000u;
        return static_cast<unsigned short>(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
    }
    // Subnormal: the value in units of 2^-24 is exact in float; nearbyintf rounds to even.
    return static_cast<unsigned short>(sign | unsigned(nearbyintf(bit_cast<float>(a) * 16777216.0f)));
}
inline float f16_bits_to_f32(unsigned short h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) return bit_cast<float>(sign | bit_cast<uint32_t>(float(m) * (1.0f / 16777216.0f)));
    if (e == 31) return bit_cast<float>(sign | 0x7f800000u | (m << 13));
    return bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
}
}  // namespace detail
}  // namespace simt

// Mirrors of CUDA's types: one 16-bit member, implicit float conversions, trivial default ctor
// (so they can live in __shared__ arrays).
#define SIMT_HALF_TYPE(T, to_bits, from_bits)                                                 \
    struct __attribute__((aligned(2))) T {                                                    \
        unsigned short __x;                                                                   \
        T() = default;                                                                        \
        T(float f) : __x(simt::detail::to_bits(f)) {}                                         \
        operator float() const { return simt::detail::from_bits(__x); }                       \
        T& operator+=(T o) { return *this = T(float(*this) + float(o)); }                     \
        T& operator-=(T o) { return *this = T(float(*this) - float(o)); }                     \
        T& operator*=(T o) { return *this = T(float(*this) * float(o)); }                     \
        T& operator/=(T o) { return *this = T(float(*this) / float(o)); }                     \
    };                                                                                        \
    inline T operator+(T a, T b) { return a += b; }                                           \
    inline T operator-(T a, T b) { return a -= b; }                                           \
    inline T operator*(T a, T b) { return a *= b; }                                           \
    inline T operator/(T a, T b) { return a /= b; }                                           \
    inline T operator-(T a) { a.__x ^= 0x8000; return a; }                                    \
    struct __attribute__((aligned(4))) T##2 {                                                 \
        T x, y;                                                                               \
    };
SIMT_HALF_TYPE(__nv_bfloat16, f32_to_bf16_bits, bf16_bits_to_f32)
SIMT_HALF_TYPE(__half, f32_to_f16_bits, f16_bits_to_f32)
#undef SIMT_HALF_TYPE
typedef __half half;
typedef __half2 half2;

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return make_float2(float(h.x), float(h.y)); }
inline float __low2float(__nv_bfloat162 h) { return float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return float(h.y); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 h; h.__x = u; return h; }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return float(h); }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline float2 __half22float2(__half2 h) { return make_float2(float(h.x), float(h.y)); }
inline float __low2float(__half2 h) { return float(h.x); }
inline float __high2float(__half2 h) { return float(h.y); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { __half h; h.__x = u; return h; }

// ---- math and bit intrinsics ------------------------------------------------------------
// glibc privately declares __expf & co. (pitfall 6): alias them rather than redefine them.
#define __expf expf
#define __logf logf
#define __log2f log2f
#define __log10f log10f
#define __exp10f exp10f
#define __powf powf
#define __sinf sinf
#define __cosf cosf
#define __tanf tanf

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }  // NaN -> 0
inline int __float2int_rn(float x) { return int(nearbyintf(x)); }
inline int __float2int_rz(float x) { return int(x); }
inline int __float2int_rd(float x) { return int(floorf(x)); }
inline int __float2int_ru(float x) { return int(ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return unsigned(nearbyintf(x)); }
inline float __int2float_rn(int x) { return float(x); }
inline float __uint2float_rn(unsigned x) { return float(x); }
inline int __float_as_int(float x) { return simt::detail::bit_cast<int>(x); }
inline unsigned __float_as_uint(float x) { return simt::detail::bit_cast<unsigned>(x); }
inline float __int_as_float(int x) { return simt::detail::bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return simt::detail::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return simt::detail::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return simt::detail::bit_cast<double>(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz(unsigned(x)) : 32; }
inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(x);
}
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((unsigned long long)a * b >> 32); }
inline int __mulhi(int a, int b) { return int((long long)a * b >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)((unsigned __int128)a * b >> 64);
}
// prmt.b32 default mode: byte i of the result is byte (s >> 4i) & 7 of {b, a}.
inline unsigned __byte_perm(unsigned a, unsigned b, unsigned s) {
    const unsigned long long x = ((unsigned long long)b << 32) | a;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= unsigned((x >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}

// CUDA's min/max overload set (same-type, plus the signed/unsigned mixes CUDA resolves to
// unsigned and float/double mixes to double).
#define SIMT_MINMAX(Ret, A, B)                                    \
    inline Ret min(A a, B b) {                                    \
        return static_cast<Ret>(a) < static_cast<Ret>(b) ? static_cast<Ret>(a) : static_cast<Ret>(b); \
    }                                                             \
    inline Ret max(A a, B b) {                                    \
        return static_cast<Ret>(a) > static_cast<Ret>(b) ? static_cast<Ret>(a) : static_cast<Ret>(b); \
    }
SIMT_MINMAX(int, int, int)
SIMT_MINMAX(unsigned, unsigned, unsigned)
SIMT_MINMAX(unsigned, int, unsigned)
SIMT_MINMAX(unsigned, unsigned, int)
SIMT_MINMAX(long, long, long)
SIMT_MINMAX(unsigned long, unsigned long, unsigned long)
SIMT_MINMAX(long long, long long, long long)
SIMT_MINMAX(unsigned long long, unsigned long long, unsigned long long)
#undef SIMT_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }

// ---- runtime interface (implemented in src/device/sim/simt_runtime.cpp) -----------------
namespace simt {
namespace detail {

// What kernel-side inline code reads about the running CUDA thread. The runtime points
// g_lane at the lane it switches to; fibers never migrate between OS threads (pitfall 4).
struct LaneState {
    uint3 tid, bid;
    dim3 bdim, gdim;
    unsigned lane;  // lane index within the warp
    unsigned char* dyn_smem;
    unsigned long long* bytes;  // [0] read, [1] written: per worker, merged per launch
};
extern __thread LaneState* g_lane;

SIMT_NO_TSAN uint3 thread_idx() { return g_lane->tid; }
SIMT_NO_TSAN uint3 block_idx() { return g_lane->bid; }
SIMT_NO_TSAN dim3 block_dim() { return g_lane->bdim; }
SIMT_NO_TSAN dim3 grid_dim() { return g_lane->gdim; }
SIMT_NO_TSAN unsigned char* dyn_smem() { return g_lane->dyn_smem; }
SIMT_NO_TSAN unsigned lane_id() { return g_lane->lane; }
SIMT_NO_TSAN void count_bytes(int dir, unsigned long long n) { g_lane->bytes[dir] += n; }

// Block barrier: op 0 plain, 1 count, 2 and, 3 or; returns the reduced predicate.
enum BarrierOp { kBarPlain, kBarCount, kBarAnd, kBarOr };
int block_barrier(int op, int pred, const char* file, int line);

// Warp collectives: every lane deposits up to 10 words, the last lane to arrive evaluates the
// whole group once (register data only), and each lane gets up to 4 words back.
enum CollKind {
    kSyncwarp, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll,
    kMmaBf16, kMmaF16, kLdmatrix
};
struct Collective {
    int kind;
    unsigned mask;
    int arg;    // shuffle: srcLane/delta/laneMask; ldmatrix: number of matrices
    int width;  // shuffle: segment width; ldmatrix: 1 = .trans
    int words;  // payload words
    const char* file;
    int line;
};
void warp_collective(const Collective& c, const uint32_t* in, uint32_t* out);
// Ends the block with a kernel fault (the launch returns it as an error).
[[noreturn]] void fault(const char* file, int line, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));

using KernelEntry = void (*)(const void* params);
struct KernelRegistrar {
    KernelRegistrar(const char* name, unsigned long long params_size, KernelEntry entry);
};

template <class T> inline T shuffle(int kind, unsigned mask, T v, int arg, int width,
                                    const char* file, int line) {
    static_assert(sizeof(T) <= 16 && std::is_trivially_copyable<T>::value, "shuffle type");
    uint32_t in[4] = {0, 0, 0, 0}, out[4];
    memcpy(in, &v, sizeof(T));
    warp_collective(Collective{kind, mask, arg, width, int((sizeof(T) + 3) / 4), file, line}, in, out);
    memcpy(&v, out, sizeof(T));
    return v;
}
inline uint32_t vote(int kind, unsigned mask, int pred, const char* file, int line) {
    uint32_t in = pred != 0, out = 0;
    warp_collective(Collective{kind, mask, 0, 32, 1, file, line}, &in, &out);
    return out;
}
template <class T> struct type_identity { using type = T; };
}  // namespace detail
}  // namespace simt

// ---- built-in variables -----------------------------------------------------------------
#define threadIdx (::simt::detail::thread_idx())
#define blockIdx (::simt::detail::block_idx())
#define blockDim (::simt::detail::block_dim())
#define gridDim (::simt::detail::grid_dim())

// Call sites are identified through GCC's __builtin_FILE/__builtin_LINE default arguments, so
// divergence errors can name the two barriers involved.
#define SIMT_SITE_PARAMS const char *simt_file_ = __builtin_FILE(), int simt_line_ = __builtin_LINE()
#define SIMT_SITE simt_file_, simt_line_

// ---- barriers and warp collectives -------------------------------------------------------
inline void __syncthreads(SIMT_SITE_PARAMS) {
    simt::detail::block_barrier(simt::detail::kBarPlain, 1, SIMT_SITE);
}
inline int __syncthreads_count(int pred, SIMT_SITE_PARAMS) {
    return simt::detail::block_barrier(simt::detail::kBarCount, pred, SIMT_SITE);
}
inline int __syncthreads_and(int pred, SIMT_SITE_PARAMS) {
    return simt::detail::block_barrier(simt::detail::kBarAnd, pred, SIMT_SITE);
}
inline int __syncthreads_or(int pred, SIMT_SITE_PARAMS) {
    return simt::detail::block_barrier(simt::detail::kBarOr, pred, SIMT_SITE);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, SIMT_SITE_PARAMS) {
    simt::detail::warp_collective({simt::detail::kSyncwarp, mask, 0, 32, 0, SIMT_SITE}, nullptr, nullptr);
}
#define SIMT_SHFL(fn, kind, argname)                                                          \
    template <class T> inline T fn(unsigned mask, T var, int argname, int width = warpSize,   \
                                   SIMT_SITE_PARAMS) {                                        \
        return simt::detail::shuffle(simt::detail::kind, mask, var, int(argname), width, SIMT_SITE); \
    }
SIMT_SHFL(__shfl_sync, kShflIdx, srcLane)
SIMT_SHFL(__shfl_up_sync, kShflUp, delta)
SIMT_SHFL(__shfl_down_sync, kShflDown, delta)
SIMT_SHFL(__shfl_xor_sync, kShflXor, laneMask)
#undef SIMT_SHFL
inline unsigned __ballot_sync(unsigned mask, int pred, SIMT_SITE_PARAMS) {
    return simt::detail::vote(simt::detail::kBallot, mask, pred, SIMT_SITE);
}
inline int __any_sync(unsigned mask, int pred, SIMT_SITE_PARAMS) {
    return int(simt::detail::vote(simt::detail::kAny, mask, pred, SIMT_SITE));
}
inline int __all_sync(unsigned mask, int pred, SIMT_SITE_PARAMS) {
    return int(simt::detail::vote(simt::detail::kAll, mask, pred, SIMT_SITE));
}

// ---- memory: __ldg, atomics, fences ------------------------------------------------------
template <class T> inline T __ldg(const T* p) {
    simt::detail::count_bytes(0, sizeof(T));
    return *p;
}

// Blocks run on several OS threads, so atomics are real ones. acq_rel rather than CUDA's
// relaxed: TSan ignores fences, and __threadfence + atomic flag patterns must not be reported.
namespace simt {
namespace detail {
template <class T, class F> inline T atomic_update(T* p, F f) {
    using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    static_assert(sizeof(T) == sizeof(Bits), "atomic size");
    Bits* bp = reinterpret_cast<Bits*>(p);
    Bits old = __atomic_load_n(bp, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(bp, &old, bit_cast<Bits>(T(f(bit_cast<T>(old)))), true,
                                        __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
    }
    return bit_cast<T>(old);
}
template <class T> using arg_t = typename type_identity<T>::type;
}  // namespace detail
}  // namespace simt

template <class T> inline T atomicAdd(T* p, simt::detail::arg_t<T> v) {
    if constexpr (std::is_integral<T>::value) return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL);
    else return simt::detail::atomic_update(p, [v](T o) { return o + v; });
}
template <class T> inline T atomicSub(T* p, simt::detail::arg_t<T> v) {
    return __atomic_fetch_sub(p, v, __ATOMIC_ACQ_REL);
}
template <class T> inline T atomicAnd(T* p, simt::detail::arg_t<T> v) { return __atomic_fetch_and(p, v, __ATOMIC_ACQ_REL); }
template <class T> inline T atomicOr(T* p, simt::detail::arg_t<T> v) { return __atomic_fetch_or(p, v, __ATOMIC_ACQ_REL); }
template <class T> inline T atomicXor(T* p, simt::detail::arg_t<T> v) { return __atomic_fetch_xor(p, v, __ATOMIC_ACQ_REL); }
template <class T> inline T atomicExch(T* p, simt::detail::arg_t<T> v) {
    return simt::detail::atomic_update(p, [v](T) { return v; });
}
template <class T> inline T atomicMax(T* p, simt::detail::arg_t<T> v) {
    return simt::detail::atomic_update(p, [v](T o) { return o < v ? v : o; });
}
template <class T> inline T atomicMin(T* p, simt::detail::arg_t<T> v) {
    return simt::detail::atomic_update(p, [v](T o) { return v < o ? v : o; });
}
template <class T> inline T atomicCAS(T* p, simt::detail::arg_t<T> cmp, simt::detail::arg_t<T> v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    return cmp;  // the old value either way
}
inline unsigned atomicInc(unsigned* p, unsigned limit) {
    return simt::detail::atomic_update(p, [limit](unsigned o) { return o >= limit ? 0u : o + 1; });
}
inline unsigned atomicDec(unsigned* p, unsigned limit) {
    return simt::detail::atomic_update(p, [limit](unsigned o) { return (o == 0 || o > limit) ? limit : o - 1; });
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- kernel export and dynamic shared memory -----------------------------------------------
// Registers `extern "C" void kernel_name(const ParamsType)` by name for simt_launch.
#define SIMT_EXPORT_KERNEL(kernel_name, ParamsType)                                           \
    static const ::simt::detail::KernelRegistrar simt_registrar_##kernel_name(                 \
        #kernel_name, sizeof(ParamsType), [](const void* raw) {                                \
            ParamsType p;                                                                     \
            memcpy(static_cast<void*>(&p), raw, sizeof p);                                    \
            kernel_name(p);                                                                   \
        });
#define SIMT_DYN_SHARED(T, name) T* name = reinterpret_cast<T*>(::simt::detail::dyn_smem())

// ---- simt:: wrappers (emulated) -------------------------------------------------------------
namespace simt {

template <class T> inline T ld_global(const T* p) {
    detail::count_bytes(0, sizeof(T));
    return *p;
}
template <class T> inline T ld_global_nc(const T* p) { return ld_global(p); }
template <class T> inline void st_global(T* p, const T& v) {
    detail::count_bytes(1, sizeof(T));
    *p = v;
}

namespace detail {
template <int Kind>
inline void mma_m16n8k16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                         const float (&c)[4], const char* file, int line) {
    uint32_t in[10], out[4];
    memcpy(in, a, 16);
    memcpy(in + 4, b, 8);
    memcpy(in + 6, c, 16);
    warp_collective(Collective{Kind, 0xffffffffu, 0, 32, 10, file, line}, in, out);
    memcpy(d, out, 16);
}
// Each lane reads only the 16-byte row it supplies (so ASan/TSan attribute the smem access to
// the right thread); the collective then hands the 8x8 elements out by the PTX layout.
template <int N, bool Trans>
inline void ldmatrix(unsigned (&r)[N], const void* row, const char* file, int line) {
    uint32_t in[4] = {0, 0, 0, 0};
    if (lane_id() < 8u * N) {
        if (reinterpret_cast<uintptr_t>(row) % 16 != 0)
            fault(file, line, "ldmatrix row address %p is not 16-byte aligned", row);
        memcpy(in, row, 16);
    }
    warp_collective(Collective{kLdmatrix, 0xffffffffu, N, Trans, 4, file, line}, in, r);
}
}  // namespace detail

inline void mma_m16n8k16_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                              const float (&c)[4], SIMT_SITE_PARAMS) {
    detail::mma_m16n8k16<detail::kMmaBf16>(d, a, b, c, SIMT_SITE);
}
inline void mma_m16n8k16_f16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                             const float (&c)[4], SIMT_SITE_PARAMS) {
    detail::mma_m16n8k16<detail::kMmaF16>(d, a, b, c, SIMT_SITE);
}
#define SIMT_LDMATRIX(fn, n, trans)                                           \
    inline void fn(unsigned (&r)[n], const void* smem_row, SIMT_SITE_PARAMS) { \
        detail::ldmatrix<n, trans>(r, smem_row, SIMT_SITE);                   \
    }
SIMT_LDMATRIX(ldmatrix_x1, 1, false)
SIMT_LDMATRIX(ldmatrix_x2, 2, false)
SIMT_LDMATRIX(ldmatrix_x4, 4, false)
SIMT_LDMATRIX(ldmatrix_x1_trans, 1, true)
SIMT_LDMATRIX(ldmatrix_x2_trans, 2, true)
SIMT_LDMATRIX(ldmatrix_x4_trans, 4, true)
#undef SIMT_LDMATRIX

}  // namespace simt

#endif  // host
