// The tensor-core GEMM main loop, shared by every kernel that multiplies bf16 matrices:
// C[M,N] += A[M,K] · B[N,K]ᵀ with f32 accumulation in registers. Each operand is stored either
// K-contiguous ("row-major": A as [M,K], B as [N,K]) or K-major (A as [K,M], B as [K,N]), so
// backward products such as dyᵀ·S or dy·W0 need no transposed copies.
//
// Tiling: a block of 256 threads (8 warps) owns a BM×BN tile of C (GemmTile<BM, BN>):
//   128×128 (the base GEMM and every N- or K-wide product): 2 warps along M × 4 along N, each
//     warp 64×32 = 4×4 mma.m16n8k16 fragments (64 f32 accumulators per thread);
//   128×W, W ∈ {16, 32, 64} (a rank dimension R along N, e.g. lora_down's S = x·Aᵀ): 8 warps
//     along M, each 16×W = 1×(W/8) fragments (W/2 accumulators);
//   W×128 (R along M, e.g. lora_bwd_da's dA = dSᵀ·x): 8 warps along N, each W×16.
// A narrow (W < 128) dimension is a rank: the MMAs of 16-wide fragment rows/columns wholly past
// C's edge are skipped (block-uniform branches), so products pad R to 16, not to the tile. The
// k16 order of every accumulator is the same for every tile shape, so results do not depend on it.
// K advances in steps of 64: every thread loads its 16-byte chunks of A and B into registers
// (the next tile's loads are in flight while the current tile is multiplied), stores them to
// shared memory, and the warps read fragments with ldmatrix (.trans for K-major tiles).
//
// Shared-memory tiles are padded by 8 bf16 per row (a 128×64 tile has 144-byte rows, a 64×128
// tile 272-byte rows, 64×16 / 64×32 / 64×64 tiles 48-, 80-, 144-byte rows): the 8 row addresses
// of an ldmatrix phase then fall in 8 distinct 16-byte bank groups, and (for rows of ≥ 64 bf16)
// 8 threads storing 16 bytes each fill one contiguous 128-byte row segment, so neither ldmatrix
// nor the stores have bank conflicts (the 48- and 80-byte rows of narrow K-major tiles cost some
// 2-way conflicts on the stores).
//
// Cost per block and K-step: global 2·(BM+BN)·64 B read, 2·BM·BN·64 FLOP: at 128×128 32 KiB and
// 2.1 MFLOP, i.e. 64 FLOP per byte from L2, 36 KiB static shared memory; at 128×16, 18 KiB and
// 0.26 MFLOP (14 FLOP per byte: a rank-16 product is bound by reading its wide operand).
#pragma once
#include "simt.h"
#include "params.h"
#include "util.cuh"

namespace lf {

constexpr int GEMM_BM = 128;
constexpr int GEMM_BN = 128;
constexpr int GEMM_BK = 64;
constexpr int GEMM_THREADS = 256;
constexpr int GEMM_WARP_M = 64;                                    // the 128×128 tile's warps
constexpr int GEMM_WARP_N = 32;
constexpr int GEMM_CHUNKS = GEMM_BM * GEMM_BK / 8 / GEMM_THREADS;  // 16-byte chunks per thread: 4

// Shape of an operand tile as stored: W rows × 64 k, or (K-major) 64 k × W (W = the tile's
// extent along M for A, along N for B), and the 16-byte chunks each thread stages.
template <bool KMAJOR, int W = GEMM_BM>
struct TileDims {
    static constexpr int ROWS = KMAJOR ? GEMM_BK : W;
    static constexpr int COLS = KMAJOR ? W : GEMM_BK;
    static constexpr int LDS = COLS + 8;  // padded (bank-conflict-free, see above)
    static constexpr int TOTAL_CHUNKS = ROWS * COLS / 8;
    static constexpr int CHUNKS = (TOTAL_CHUNKS + GEMM_THREADS - 1) / GEMM_THREADS;  // per thread
    static constexpr bool kPartial = TOTAL_CHUNKS % GEMM_THREADS != 0;  // W = 16: threads 0..127
};

// bf16 elements of the shared tile of an operand of width W (either storage order).
template <int W>
struct TileElems {
    static constexpr int R = TileDims<false, W>::ROWS * TileDims<false, W>::LDS;
    static constexpr int K = TileDims<true, W>::ROWS * TileDims<true, W>::LDS;
    static constexpr int value = R > K ? R : K;
};

// The warp layout of a BM×BN tile of C (see the top of this file).
template <int BM, int BN>
struct GemmTile {
    static constexpr int WARPS_M = BM == BN ? 2 : (BM > BN ? 8 : 1);
    static constexpr int WARPS_N = 8 / WARPS_M;
    static constexpr int WARP_M = BM / WARPS_M;
    static constexpr int WARP_N = BN / WARPS_N;
    static constexpr int MFRAGS = WARP_M / 16;
    static constexpr int NFRAGS = WARP_N / 8;
    static constexpr bool kClipM = BM < GEMM_BM;  // a rank along M: skip fragments past C
    static constexpr bool kClipN = BN < GEMM_BN;  // a rank along N
    static_assert((BM == GEMM_BM || BN == GEMM_BN) && WARP_M % 16 == 0 && WARP_N % 16 == 0 &&
                      WARPS_M * WARPS_N * 32 == GEMM_THREADS,
                  "tiles are 128×128, 128×W or W×128 with W a multiple of 16 up to 128");
    // This warp's first row and column inside the tile.
    static __device__ __forceinline__ int warp_m(int warp) { return (warp / WARPS_N) * WARP_M; }
    static __device__ __forceinline__ int warp_n(int warp) { return (warp % WARPS_N) * WARP_N; }
};

template <int BM, int BN>
struct TileSmem {
    lf_bf16 a[TileElems<BM>::value];
    lf_bf16 b[TileElems<BN>::value];
};
using GemmSmem = TileSmem<GEMM_BM, GEMM_BN>;

template <int BM, int BN>
struct TileAcc {
    float v[GemmTile<BM, BN>::MFRAGS][GemmTile<BM, BN>::NFRAGS][4];
};
using GemmAcc = TileAcc<GEMM_BM, GEMM_BN>;

// A row-major bf16 matrix as stored: `rows` × `cols` used, rows `ld` elements apart.
struct MatrixRef {
    const lf_bf16* ptr;
    int rows;
    int cols;
    int ld;
    // 16-byte loads need every row start 16-byte aligned; otherwise fall back to 2-byte loads.
    __device__ __forceinline__ bool vector_ok() const { return (ld % 8) == 0 && aligned_to(ptr, 16); }
};

// For operands that need no change on the way to shared memory.
struct NoTransform {
    __device__ __forceinline__ void operator()(uint4&, int, int) const {}
};

// Loads the 8-element chunk at (row, col) of the stored matrix with one 16-byte load where it
// lies inside and `vec` allows, element by element (zero outside the matrix) otherwise.
__device__ __forceinline__ uint4 load_chunk(const MatrixRef& m, bool vec, int row, int col) {
    const lf_bf16* src = m.ptr + (long long)row * m.ld + col;
    if (row < m.rows && vec && col + 8 <= m.cols) return simt::ld_global_nc(reinterpret_cast<const uint4*>(src));
    unsigned short h[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        h[j] = 0;
        if (row < m.rows && col + j < m.cols) {
            lf_bf16 v = simt::ld_global_nc(src + j);
            h[j] = *reinterpret_cast<unsigned short*>(&v);
        }
    }
    return make_uint4(h[0] | (unsigned)h[1] << 16, h[2] | (unsigned)h[3] << 16, h[4] | (unsigned)h[5] << 16,
                      h[6] | (unsigned)h[7] << 16);
}

// Loads the stored tile at (row0, col0) into registers, zero-filling outside the matrix, and
// applies `xform(chunk, row, col)` to each 8-element chunk. Chunk c = tid + i·256 covers row
// c/(COLS/8), columns 8·(c%(COLS/8)) .. +7: a warp reads whole row segments (128 or 256 bytes
// for W ≥ 64). Tiles of fewer than 256 chunks (W = 16) leave the upper threads idle.
template <bool KMAJOR, int W = GEMM_BM, class Xform>
__device__ __forceinline__ void load_tile(uint4 (&regs)[TileDims<KMAJOR, W>::CHUNKS], const MatrixRef& m, bool vec,
                                          int row0, int col0, const Xform& xform) {
    using D = TileDims<KMAJOR, W>;
    constexpr int CPR = D::COLS / 8;  // chunks per row
#pragma unroll
    for (int i = 0; i < D::CHUNKS; ++i) {
        const int c = threadIdx.x + i * GEMM_THREADS;
        if (D::kPartial && c >= D::TOTAL_CHUNKS) break;
        const int row = row0 + c / CPR;
        const int col = col0 + (c % CPR) * 8;
        regs[i] = load_chunk(m, vec, row, col);
        xform(regs[i], row, col);
    }
}

template <bool KMAJOR, int W = GEMM_BM>
__device__ __forceinline__ void store_tile(lf_bf16* tile, const uint4 (&regs)[TileDims<KMAJOR, W>::CHUNKS]) {
    using D = TileDims<KMAJOR, W>;
    constexpr int CPR = D::COLS / 8;
#pragma unroll
    for (int i = 0; i < D::CHUNKS; ++i) {
        const int c = threadIdx.x + i * GEMM_THREADS;
        if (D::kPartial && c >= D::TOTAL_CHUNKS) break;
        *reinterpret_cast<uint4*>(&tile[(c / CPR) * D::LDS + (c % CPR) * 8]) = regs[i];
    }
}

// A fragment (rows m0..m0+15, k ks..ks+15) of a stored A tile: regs a0a1, a2a3, a4a5, a6a7.
template <bool KMAJOR, int W = GEMM_BM>
__device__ __forceinline__ void load_a_frag(unsigned (&f)[4], const lf_bf16* tile, int m0, int ks, int lane) {
    constexpr int LDS = TileDims<KMAJOR, W>::LDS;
    if (KMAJOR)  // matrices (m lo, k lo), (m hi, k lo), (m lo, k hi), (m hi, k hi), transposed
        simt::ldmatrix_x4_trans(f, &tile[(ks + (lane & 7) + (lane >> 4) * 8) * LDS + m0 + ((lane >> 3) & 1) * 8]);
    else  // lanes 0-15 address rows 0-15 at k, lanes 16-31 the same rows at k+8
        simt::ldmatrix_x4(f, &tile[(m0 + (lane & 15)) * LDS + ks + (lane >> 4) * 8]);
}

// B fragments for two n8 blocks (n0..n0+15, k ks..ks+15) of a stored B tile.
template <bool KMAJOR, int W = GEMM_BN>
__device__ __forceinline__ void load_b_frags(unsigned (&lo)[2], unsigned (&hi)[2], const lf_bf16* tile,
                                             int n0, int ks, int lane) {
    constexpr int LDS = TileDims<KMAJOR, W>::LDS;
    unsigned r[4];  // matrices (n lo, k lo), (n lo, k hi), (n hi, k lo), (n hi, k hi)
    if (KMAJOR)
        simt::ldmatrix_x4_trans(r, &tile[(ks + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + n0 + (lane >> 4) * 8]);
    else
        simt::ldmatrix_x4(r, &tile[(n0 + (lane & 7) + ((lane >> 4) << 3)) * LDS + ks + ((lane >> 3) & 1) * 8]);
    lo[0] = r[0];
    lo[1] = r[1];
    hi[0] = r[2];
    hi[1] = r[3];
}

// acc += A tile · B tileᵀ over one K-step: four k16 steps of MFRAGS×NFRAGS MMAs per warp. A
// shorter product (k_len < 64, e.g. a LoRA up-projection of rank ≤ 64) stops after ⌈k_len/16⌉
// steps. In a narrow dimension (a rank), 16-row/column fragments at or past m_len rows /
// n_len columns of the tile are neither loaded nor multiplied (their accumulators stay zero).
template <bool A_KMAJOR, bool B_KMAJOR, int BM, int BN>
__device__ __forceinline__ void mma_tile(TileAcc<BM, BN>& acc, const TileSmem<BM, BN>& s, int warp_m, int warp_n,
                                         int lane, int k_len = GEMM_BK, int m_len = BM, int n_len = BN) {
    using T = GemmTile<BM, BN>;
#pragma unroll
    for (int ks = 0; ks < GEMM_BK; ks += 16) {
        if (ks >= k_len) break;
        unsigned af[T::MFRAGS][4];
        unsigned bf[T::NFRAGS][2];
#pragma unroll
        for (int mi = 0; mi < T::MFRAGS; ++mi) {
            if (T::kClipM && warp_m + mi * 16 >= m_len) break;
            load_a_frag<A_KMAJOR, BM>(af[mi], s.a, warp_m + mi * 16, ks, lane);
        }
#pragma unroll
        for (int nj = 0; nj < T::NFRAGS / 2; ++nj) {
            if (T::kClipN && warp_n + nj * 16 >= n_len) break;
            load_b_frags<B_KMAJOR, BN>(bf[2 * nj], bf[2 * nj + 1], s.b, warp_n + nj * 16, ks, lane);
        }
#pragma unroll
        for (int mi = 0; mi < T::MFRAGS; ++mi) {
            if (T::kClipM && warp_m + mi * 16 >= m_len) break;
#pragma unroll
            for (int ni = 0; ni < T::NFRAGS; ++ni) {
                if (T::kClipN && warp_n + (ni / 2) * 16 >= n_len) break;
                simt::mma_m16n8k16_bf16(acc.v[mi][ni], af[mi], bf[ni], acc.v[mi][ni]);
            }
        }
    }
}

// One operand of the main loop: the stored matrix, whether it is K-major, its tile width W
// (the tile's extent along M for A, along N for B), and the transform applied to its chunks on
// the way to shared memory.
//
// gemm_mainloop takes any operand type with this interface (Nf4Operand in nf4.cuh is another):
//   static constexpr bool kKMajor;  [static constexpr int kWidth; 128 where absent]
//   Regs (what one thread stages between load and store);
//   load(regs, row0, col0): issue the global loads of the stored tile at (row0, col0);
//   store(tile, regs): finish the tile chunks and write them to shared memory.
template <bool KMAJOR, class Xform = NoTransform, int W = GEMM_BM>
struct Operand {
    static constexpr bool kKMajor = KMAJOR;
    static constexpr int kWidth = W;
    using Regs = uint4[TileDims<KMAJOR, W>::CHUNKS];
    MatrixRef m;
    Xform xform;
    __device__ __forceinline__ void load(Regs& r, int row0, int col0) const {
        load_tile<KMAJOR, W>(r, m, m.vector_ok(), row0, col0, xform);
    }
    __device__ __forceinline__ void store(lf_bf16* tile, const Regs& r) const { store_tile<KMAJOR, W>(tile, r); }
};

template <bool KMAJOR, int W = GEMM_BM>
__device__ __forceinline__ Operand<KMAJOR, NoTransform, W> operand(const lf_bf16* ptr, int rows, int cols, int ld) {
    return Operand<KMAJOR, NoTransform, W>{MatrixRef{ptr, rows, cols, ld}, NoTransform{}};
}

// An operand's tile width: kWidth, or 128 for operand types without one.
template <class Op, class = void>
struct OperandWidth {
    static constexpr int value = GEMM_BM;
};
template <class Op>
struct OperandWidth<Op, decltype(void(Op::kWidth))> {
    static constexpr int value = Op::kWidth;
};

// acc += A·Bᵀ over k in [0, k) for the C tile at (block_m, block_n) of a C of c_rows × c_cols
// (only a narrow tile's rank dimension reads them: its fragments past C are skipped).
// CLIP_K: a short last K-step issues only ⌈(k − k0)/16⌉ k16 steps (see the loop).
// `on_tile(s, k0)` runs once per K-step while both tiles are in shared memory (between the
// barriers), so fused kernels can use the same A tile for a second product; pass a no-op
// otherwise.
template <bool CLIP_K = false, int BM, int BN, class AOp, class BOp, class OnTile>
__device__ __forceinline__ void gemm_mainloop(TileAcc<BM, BN>& acc, TileSmem<BM, BN>& s, const AOp& a, const BOp& b,
                                              int k, int block_m, int block_n, OnTile on_tile,
                                              int c_rows = 0x7fffffff, int c_cols = 0x7fffffff) {
    using T = GemmTile<BM, BN>;
    static_assert(OperandWidth<AOp>::value == BM && OperandWidth<BOp>::value == BN, "operand widths = tile shape");
    constexpr bool A_KMAJOR = AOp::kKMajor;
    constexpr bool B_KMAJOR = BOp::kKMajor;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int warp_m = T::warp_m(warp);
    const int warp_n = T::warp_n(warp);
    const int m_len = c_rows - block_m, n_len = c_cols - block_n;
    // Stored coordinates of the tile at K offset k0.
    auto a_at = [&](typename AOp::Regs& r, int k0) {
        a.load(r, A_KMAJOR ? k0 : block_m, A_KMAJOR ? block_m : k0);
    };
    auto b_at = [&](typename BOp::Regs& r, int k0) {
        b.load(r, B_KMAJOR ? k0 : block_n, B_KMAJOR ? block_n : k0);
    };

    typename AOp::Regs ra;
    typename BOp::Regs rb;
    a_at(ra, 0);
    b_at(rb, 0);
    for (int k0 = 0; k0 < k; k0 += GEMM_BK) {
        a.store(s.a, ra);
        b.store(s.b, rb);
        __syncthreads();  // tile visible to every warp
        if (k0 + GEMM_BK < k) {
            a_at(ra, k0 + GEMM_BK);
            b_at(rb, k0 + GEMM_BK);
        }
        on_tile(s, k0);
        // With CLIP_K (a LoRA up-projection, k = R ≤ 64: one K-step) the step stops after the
        // k16 steps that hold data, 16·⌈R/16⌉ deep instead of 64. The other products keep the
        // constant depth: a run-time bound in their loop changes how nvcc schedules the k16
        // steps (the 128×128 kernels went from 228 to ~178 registers), untested on a GPU.
        mma_tile<A_KMAJOR, B_KMAJOR>(acc, s, warp_m, warp_n, lane, CLIP_K && k - k0 < GEMM_BK ? k - k0 : GEMM_BK,
                                     m_len, n_len);
        __syncthreads();  // every warp done reading before the next store overwrites the tile
    }
}

struct NoOnTile {
    template <class Smem>
    __device__ __forceinline__ void operator()(const Smem&, int) const {}
};

// Calls f(row, col, v) for each accumulator (row, col) of this thread — a reference to the
// value, so epilogues can also rescale in place. Columns come in adjacent pairs (col, col+1).
template <int BM, int BN, class F>
__device__ __forceinline__ void for_each_acc(TileAcc<BM, BN>& acc, int block_m, int block_n, F f) {
    using T = GemmTile<BM, BN>;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int row_base = block_m + T::warp_m(warp) + lane / 4;
    const int col_base = block_n + T::warp_n(warp) + 2 * (lane % 4);
#pragma unroll
    for (int mi = 0; mi < T::MFRAGS; ++mi)
#pragma unroll
        for (int ni = 0; ni < T::NFRAGS; ++ni)
#pragma unroll
            for (int i = 0; i < 4; ++i)
                f(row_base + mi * 16 + (i / 2) * 8, col_base + ni * 8 + (i % 2), acc.v[mi][ni][i]);
}

// Calls store(row, col, v0, v1) for each pair of adjacent accumulators (columns col, col+1)
// of this thread inside the matrix; col+1 may be >= n, the store must check it.
template <int BM, int BN, class Store>
__device__ __forceinline__ void gemm_epilogue(const TileAcc<BM, BN>& acc, int block_m, int block_n, int m, int n,
                                              Store store) {
    using T = GemmTile<BM, BN>;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int row_base = block_m + T::warp_m(warp) + lane / 4;
    const int col_base = block_n + T::warp_n(warp) + 2 * (lane % 4);
#pragma unroll
    for (int mi = 0; mi < T::MFRAGS; ++mi)
#pragma unroll
        for (int ni = 0; ni < T::NFRAGS; ++ni) {
            const int col = col_base + ni * 8;
            if (col >= n) continue;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int row = row_base + mi * 16 + half * 8;
                if (row < m) store(row, col, acc.v[mi][ni][2 * half], acc.v[mi][ni][2 * half + 1]);
            }
        }
}

// Writes an f32 or bf16 pair, 8 (f32) or 4 (bf16) bytes at once when both columns exist and
// the address is aligned for it.
__device__ __forceinline__ void store_pair(float* c, long long idx, bool pair, float v0, float v1) {
    if (pair && aligned_to(c + idx, 8)) {
        simt::st_global(reinterpret_cast<float2*>(c + idx), make_float2(v0, v1));
    } else {
        simt::st_global(c + idx, v0);
        if (pair) simt::st_global(c + idx + 1, v1);
    }
}

__device__ __forceinline__ void store_pair(lf_bf16* c, long long idx, bool pair, float v0, float v1) {
    if (pair && aligned_to(c + idx, 4)) {
        simt::st_global(reinterpret_cast<__nv_bfloat162*>(c + idx), __floats2bfloat162_rn(v0, v1));
    } else {
        simt::st_global(c + idx, __float2bfloat16(v0));
        if (pair) simt::st_global(c + idx + 1, __float2bfloat16(v1));
    }
}

// Stores the C tile to a row-major [m, ldc] matrix of f32 or bf16, scaled by `scale`.
template <class Out, int BM, int BN>
__device__ __forceinline__ void store_tile_c(const TileAcc<BM, BN>& acc, Out* c, int ldc, int block_m, int block_n,
                                             int m, int n, float scale = 1.0f) {
    gemm_epilogue(acc, block_m, block_n, m, n, [&](int row, int col, float v0, float v1) {
        store_pair(c, (long long)row * ldc + col, col + 1 < n, scale * v0, scale * v1);
    });
}

}  // namespace lf
