// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), the
// counter-based RNG behind dropout: a mask bit is a pure function of (seed, offset, element), so
// backward regenerates the forward's mask instead of storing it. Mirrors src/ops/philox.rs bit
// for bit (known-answer tests on both sides).
//
// Dropout convention (DESIGN.md): key = (seed lo, seed hi); element e (row-major index of x) uses
// counter (e/4 lo, e/4 hi, offset lo, offset hi) and output word e%4; kept iff word >= threshold,
// threshold = round(p·2³²) (0 keeps all); kept values scale by 1/(1-p).
#pragma once
#include "simt.h"
#include "params.h"

namespace lf {

__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, unsigned k0, unsigned k1) {
    const unsigned M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const unsigned hi0 = __umulhi(M0, ctr.x), lo0 = M0 * ctr.x;
        const unsigned hi1 = __umulhi(M1, ctr.z), lo1 = M1 * ctr.z;
        ctr = make_uint4(hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0);
    }
    return ctr;
}

// Word i (0..3) of a Philox output.
__device__ __forceinline__ unsigned philox_word(const uint4& w, unsigned i) {
    return i == 0 ? w.x : i == 1 ? w.y : i == 2 ? w.z : w.w;
}

// Dropout parameters as the kernels receive them (see DropoutParams in params.h).
struct Dropout {
    unsigned long long seed;
    unsigned long long offset;
    unsigned threshold;  // 0: dropout off
    float scale;         // 1/(1-p)

    static __device__ __forceinline__ Dropout from(const DropoutParams& p) {
        return Dropout{p.seed, p.offset, p.threshold, p.scale};
    }

    __device__ __forceinline__ bool active() const { return threshold != 0; }
    // The factor of kept values: 1/(1-p), or 1 when dropout is off.
    __device__ __forceinline__ float kept_scale() const { return active() ? scale : 1.0f; }

    // The 4 random words of the group of elements 4q .. 4q+3.
    __device__ __forceinline__ uint4 words(unsigned long long q) const {
        return philox4x32_10(make_uint4((unsigned)q, (unsigned)(q >> 32), (unsigned)offset,
                                        (unsigned)(offset >> 32)),
                             (unsigned)seed, (unsigned)(seed >> 32));
    }

    // Zeroes the dropped elements among the 8 bf16 of `chunk`, elements e0 .. e0+7 of x (exact:
    // the 1/(1-p) is applied later in f32). 8 consecutive elements span at most 3 groups.
    __device__ __forceinline__ void mask_chunk(uint4& chunk, unsigned long long e0) const {
        unsigned short* h = reinterpret_cast<unsigned short*>(&chunk);
        unsigned long long q = e0 >> 2;
        uint4 w = words(q);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const unsigned long long e = e0 + j;
            if ((e >> 2) != q) {
                q = e >> 2;
                w = words(q);
            }
            if (philox_word(w, (unsigned)(e & 3)) < threshold) h[j] = 0;
        }
    }

    // Multiplier of element e: 0 if dropped, `scale` if kept.
    __device__ __forceinline__ float factor(unsigned long long e) const {
        const uint4 w = words(e >> 2);
        const unsigned r[4] = {w.x, w.y, w.z, w.w};
        return r[e & 3] >= threshold ? scale : 0.0f;
    }
};

}  // namespace lf
