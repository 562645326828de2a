// Self-tests of the SIMT simulator (kernels/simt.h, src/device/sim/). Each kernel writes what it
// observed to global buffers; the host side (tests/sim/selftest_driver.cpp, later the Rust Sim
// device tests) computes the expected values independently, from the CUDA and PTX ISA
// definitions. On a GPU the same kernels and checks validate the simulator's fragment layouts
// and shuffle semantics against the hardware, except simt_selftest_diverge, whose every mode is
// a deliberate bug (the simulator must report it; a GPU may hang).
//
// Params: SimtSelftestParams (in, out, fout, n, mode). FULL = all 32 lanes.
#include "simt.h"
#include "params.h"

#define SIMT_FULL 0xffffffffu

__device__ __forceinline__ unsigned selftest_gid() { return blockIdx.x * blockDim.x + threadIdx.x; }

// Block barriers. 1-D blocks. For n rounds: s[t] = v; barrier; v = s[(t+1+r) % B]·3 + t.
// out[gid] = final v; then thread 0 of each block writes, at out[G·B + 4·block]:
// __syncthreads_count(t%3 == 0), _and(true), _or(t == B-1), _and(t != 0).
extern "C" __global__ void simt_selftest_barrier(const SimtSelftestParams p) {
    __shared__ unsigned s[1024];
    const unsigned t = threadIdx.x, B = blockDim.x;
    unsigned v = simt::ld_global(p.in + selftest_gid());
    for (int r = 0; r < p.n; ++r) {
        s[t] = v;
        __syncthreads();
        v = s[(t + 1 + r) % B] * 3u + t;
        __syncthreads();
    }
    simt::st_global(p.out + selftest_gid(), v);
    const int count = __syncthreads_count(t % 3 == 0);
    const int all = __syncthreads_and(1);
    const int any = __syncthreads_or(t == B - 1);
    const int not_all = __syncthreads_and(t != 0);
    if (t == 0) {
        unsigned* o = p.out + gridDim.x * B + 4 * blockIdx.x;
        simt::st_global(o, unsigned(count));
        simt::st_global(o + 1, unsigned(all));
        simt::st_global(o + 2, unsigned(any));
        simt::st_global(o + 3, unsigned(not_all));
    }
}
SIMT_EXPORT_KERNEL(simt_selftest_barrier, SimtSelftestParams)

// Built-in indices for 3-D grids and blocks: out[6·g + i] = threadIdx.{x,y,z}, blockIdx.{x,y,z}
// where g is the thread's global linear index (x fastest, then y, z; blocks likewise).
extern "C" __global__ void simt_selftest_index(const SimtSelftestParams p) {
    const unsigned tb = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    unsigned* o = p.out + 6 * (b * blockDim.x * blockDim.y * blockDim.z + tb);
    const unsigned v[6] = {threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z};
    for (int i = 0; i < 6; ++i) simt::st_global(o + i, v[i]);
}
SIMT_EXPORT_KERNEL(simt_selftest_index, SimtSelftestParams)

// Shuffles. out[24·gid + k], v = in[gid], lane = t % 32. For width = 32, 16, 8, 4, 2 (k = 4·i):
// __shfl_sync(v, 7·lane + 3), __shfl_up_sync(v, 3), __shfl_down_sync(v, 5), __shfl_xor_sync(v, 5);
// then k = 20: float bits of __shfl_xor_sync(float v, 1); k = 21, 22: the 64-bit value
// (v << 32 | v ^ 0xabcdef) xor-shuffled by 16 (low word first); k = 23: __shfl_xor_sync(v, 1)
// with lanes 0-15 and 16-31 in two separate masks.
extern "C" __global__ void simt_selftest_shuffle(const SimtSelftestParams p) {
    const unsigned lane = threadIdx.x % 32;
    const unsigned v = simt::ld_global(p.in + selftest_gid());
    unsigned* o = p.out + 24 * selftest_gid();
    int k = 0;
    for (int width = 32; width >= 2; width /= 2) {
        simt::st_global(o + k++, __shfl_sync(SIMT_FULL, v, int(7 * lane + 3), width));
        simt::st_global(o + k++, __shfl_up_sync(SIMT_FULL, v, 3, width));
        simt::st_global(o + k++, __shfl_down_sync(SIMT_FULL, v, 5, width));
        simt::st_global(o + k++, __shfl_xor_sync(SIMT_FULL, v, 5, width));
    }
    simt::st_global(o + k++, __float_as_uint(__shfl_xor_sync(SIMT_FULL, __uint_as_float(v), 1)));
    const unsigned long long w =
        __shfl_xor_sync(SIMT_FULL, (unsigned long long)v << 32 | (v ^ 0xabcdefu), 16);
    simt::st_global(o + k++, unsigned(w));
    simt::st_global(o + k++, unsigned(w >> 32));
    simt::st_global(o + k++, __shfl_xor_sync(lane < 16 ? 0x0000ffffu : 0xffff0000u, v, 1));
}
SIMT_EXPORT_KERNEL(simt_selftest_shuffle, SimtSelftestParams)

// Votes. pred = in[gid] & 1; out[5·gid + k]: __ballot_sync(FULL), __any_sync(FULL),
// __all_sync(FULL), __ballot_sync over the thread's half warp (lanes 0-15 / 16-31), and
// __syncwarp() followed by __all_sync(FULL, 1).
extern "C" __global__ void simt_selftest_vote(const SimtSelftestParams p) {
    const unsigned lane = threadIdx.x % 32;
    const int pred = int(simt::ld_global(p.in + selftest_gid()) & 1u);
    unsigned* o = p.out + 5 * selftest_gid();
    simt::st_global(o, __ballot_sync(SIMT_FULL, pred));
    simt::st_global(o + 1, unsigned(__any_sync(SIMT_FULL, pred)));
    simt::st_global(o + 2, unsigned(__all_sync(SIMT_FULL, pred)));
    simt::st_global(o + 3, __ballot_sync(lane < 16 ? 0x0000ffffu : 0xffff0000u, pred));
    __syncwarp();
    simt::st_global(o + 4, unsigned(__all_sync(SIMT_FULL, 1)));
}
SIMT_EXPORT_KERNEL(simt_selftest_vote, SimtSelftestParams)

// Atomics from every thread of every block (buffers zeroed except out[2] = 0xffffffff):
// fout[0] += 0.25, fout[1] += gid % 8; out[0] += 1; out[1] = max(gid) (int); out[2] = min(gid+5);
// out[3] += 1 by an atomicCAS loop; out[4..5] (64-bit, 8-byte aligned) += 2^32 + 1;
// out[6] = atomicExch(gid) (some gid); out[7] = atomicInc(limit 9) (count mod 10).
extern "C" __global__ void simt_selftest_atomics(const SimtSelftestParams p) {
    const unsigned gid = selftest_gid();
    atomicAdd(p.fout, 0.25f);
    atomicAdd(p.fout + 1, float(gid % 8));
    atomicAdd(p.out, 1u);
    atomicMax(reinterpret_cast<int*>(p.out + 1), int(gid));
    atomicMin(p.out + 2, gid + 5);
    for (unsigned old = atomicCAS(p.out + 3, 0u, 0u);;) {
        const unsigned prev = atomicCAS(p.out + 3, old, old + 1);
        if (prev == old) break;
        old = prev;
    }
    atomicAdd(reinterpret_cast<unsigned long long*>(p.out + 4), (1ull << 32) + 1);
    atomicExch(p.out + 6, gid);
    atomicInc(p.out + 7, 9u);
}
SIMT_EXPORT_KERNEL(simt_selftest_atomics, SimtSelftestParams)

// mma.m16n8k16 with f32 accumulate, problem i = global warp index (i < n). Lane l of the warp
// reads its fragments raw from in[320·i + 10·l ...]: a[4], b[2] (packed bf16 or f16 pairs), then
// c[4] (f32 bits), and writes d[4] (f32 bits) to out[128·i + 4·l]. mode & 1: f16 (else bf16);
// mode & 2: in place, d aliasing c.
extern "C" __global__ void simt_selftest_mma(const SimtSelftestParams p) {
    const unsigned lane = threadIdx.x % 32, prob = selftest_gid() / 32;
    if (int(prob) >= p.n) return;  // whole warps only
    const unsigned* in = p.in + 320 * prob + 10 * lane;
    unsigned a[4], b[2];
    float c[4], d[4];
    for (int i = 0; i < 4; ++i) a[i] = simt::ld_global(in + i);
    for (int i = 0; i < 2; ++i) b[i] = simt::ld_global(in + 4 + i);
    for (int i = 0; i < 4; ++i) c[i] = __uint_as_float(simt::ld_global(in + 6 + i));
    float* res = (p.mode & 2) ? c : d;
    float(&r)[4] = *reinterpret_cast<float(*)[4]>(res);
    if (p.mode & 1) simt::mma_m16n8k16_f16(r, a, b, c);
    else simt::mma_m16n8k16_bf16(r, a, b, c);
    for (int i = 0; i < 4; ++i) simt::st_global(p.out + 128 * prob + 4 * lane + i, __float_as_uint(r[i]));
}
SIMT_EXPORT_KERNEL(simt_selftest_mma, SimtSelftestParams)

// ldmatrix, 64-thread blocks, problem i = global warp index (i < n). Lane l copies the 8 b16 of
// row l of in[128·i ...] (32 rows × 4 words) into shared row l (48-byte stride); lane 8j + r
// then passes shared row (5·(8j + r) + 3) % 32 as row r of matrix j. Register j of lane l goes to
// out[128·i + 4·l + j]. mode 0..5: x1, x2, x4, x1.trans, x2.trans, x4.trans.
extern "C" __global__ void simt_selftest_ldmatrix(const SimtSelftestParams p) {
    __shared__ __align__(16) unsigned short tile[2][32][24];
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, prob = selftest_gid() / 32;
    if (int(prob) >= p.n) return;
    unsigned short(&t)[32][24] = tile[warp];
    for (int i = 0; i < 4; ++i) {
        const unsigned w = simt::ld_global(p.in + 128 * prob + 4 * lane + i);
        t[lane][2 * i] = static_cast<unsigned short>(w);
        t[lane][2 * i + 1] = static_cast<unsigned short>(w >> 16);
    }
    __syncwarp();
    const void* row = &t[(5 * lane + 3) % 32][0];
    unsigned r[4] = {0, 0, 0, 0};
    unsigned(&r1)[1] = *reinterpret_cast<unsigned(*)[1]>(r);
    unsigned(&r2)[2] = *reinterpret_cast<unsigned(*)[2]>(r);
    switch (p.mode) {
        case 0: simt::ldmatrix_x1(r1, row); break;
        case 1: simt::ldmatrix_x2(r2, row); break;
        case 2: simt::ldmatrix_x4(r, row); break;
        case 3: simt::ldmatrix_x1_trans(r1, row); break;
        case 4: simt::ldmatrix_x2_trans(r2, row); break;
        default: simt::ldmatrix_x4_trans(r, row); break;
    }
    for (int j = 0; j < 4; ++j) simt::st_global(p.out + 128 * prob + 4 * lane + j, r[j]);
}
SIMT_EXPORT_KERNEL(simt_selftest_ldmatrix, SimtSelftestParams)

// Block sum through dynamic shared memory (blockDim.x · 4 bytes; blockDim.x a power of two
// >= 64): tree with __syncthreads down to 32 values, then __shfl_down_sync.
// out[block] = Σ in[block's threads] (mod 2^32).
extern "C" __global__ void simt_selftest_reduce(const SimtSelftestParams p) {
    SIMT_DYN_SHARED(unsigned, s);
    const unsigned t = threadIdx.x;
    s[t] = simt::ld_global(p.in + selftest_gid());
    __syncthreads();
    for (unsigned k = blockDim.x / 2; k >= 32; k /= 2) {
        if (t < k) s[t] += s[t + k];
        __syncthreads();
    }
    if (t < 32) {
        unsigned v = s[t];
        for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(SIMT_FULL, v, off);
        if (t == 0) simt::st_global(p.out + blockIdx.x, v);
    }
}
SIMT_EXPORT_KERNEL(simt_selftest_reduce, SimtSelftestParams)

// Deliberate bugs the simulator must report as launch errors (never run on a GPU), 64-thread
// blocks unless noted. mode 0: two halves of the block at different __syncthreads; 1: thread 5
// exits before a __syncthreads; 2: lane 7 exits before a full-mask shuffle; 3: lanes 0-15 at
// __syncwarp while 16-31 wait at __syncthreads; 4: even lanes at __ballot_sync, odd lanes at
// __shfl_sync; 5: a shuffle whose mask excludes the caller; 6: ldmatrix on a misaligned row;
// 7: mma in a partial warp (launch 48 threads); 8: shuffle width 3.
extern "C" __global__ void simt_selftest_diverge(const SimtSelftestParams p) {
    const unsigned t = threadIdx.x, lane = t % 32;
    unsigned v = t;
    __shared__ __align__(16) unsigned short rows[32][8 + 1];
    switch (p.mode) {
        case 0:
            if (t < 32) __syncthreads();
            else __syncthreads();
            break;
        case 1:
            if (t == 5) return;
            __syncthreads();
            break;
        case 2:
            if (lane == 7) return;
            v = __shfl_xor_sync(SIMT_FULL, v, 1);
            break;
        case 3:
            if (lane < 16) __syncwarp();
            else __syncthreads();
            break;
        case 4:
            if (lane % 2) v = __shfl_sync(SIMT_FULL, v, 0);
            else v = __ballot_sync(SIMT_FULL, 1);
            break;
        case 5: v = __shfl_sync(1u, v, 0); break;
        case 6: {
            unsigned r[1];
            simt::ldmatrix_x1(r, &rows[lane % 8][1]);
            v = r[0];
            break;
        }
        case 7: {
            const unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
            float d[4] = {0, 0, 0, 0};
            simt::mma_m16n8k16_bf16(d, a, b, d);
            v = unsigned(d[0]);
            break;
        }
        default: v = __shfl_xor_sync(SIMT_FULL, v, 1, 3); break;
    }
    if (p.out) simt::st_global(p.out + selftest_gid(), v);
}
SIMT_EXPORT_KERNEL(simt_selftest_diverge, SimtSelftestParams)
