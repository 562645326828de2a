// LoRA linear, forward and backward, on the tensor-core main loop of gemm_tile.cuh.
// Host wrappers: src/ops/lora_kernels.rs; CPU reference: src/ops/lora.rs.
//
//   y  = x·W0ᵀ + (drop(x)·Aᵀ ⊙ c)·Bᵀ          c = col_scale (alpha/r per target column)
//   S  = drop(x)·Aᵀ  [M,R]  saved for backward (never a mask, never a dropped copy of x)
//   dS = (dy·B) ⊙ c,  dB = dyᵀ·(S ⊙ c),  dA = dSᵀ·drop(x),  dx = dy·W0 + drop'(dS·A)
//
// Dropout multiplies by mask/(1-p). Kernels apply the 0/1 mask to bf16 tiles (exact) and the
// 1/(1-p) to f32 results, so dropout adds no rounding. The mask is Philox-generated per element
// (philox.cuh) in every kernel that needs it.
//
// Bytes and FLOPs (bf16 in, M·K = |x|, r = R):
//   lora_down_rt*        2·M·R16·K FLOP issued (R16 = 16·⌈R/16⌉); reads x once per R tile
//                        (2·M·K·⌈R/64⌉ B for R > 64, else once) + A per M-tile; writes 6·M·R B
//   lora_fwd_split_*     2·M·N·(K+R16) FLOP issued (the up-projection is R extra K columns;
//                        its K-step stops after ⌈R/16⌉ k16 steps); the base GEMM's traffic + the
//                        R extra columns
//   lora_bwd_ds_db       4·M·N·R16 FLOP; reads dy once per 64 columns of R (2·M·N B) for dS and
//                        the per-128-row partials of dB (splitk_reduce sums them), see below
//   lora_bwd_da_rt*      2·R16·K·M FLOP issued; reads x (and dS) once per R tile, split over M,
//                        partials reduced by splitk_reduce
//   lora_bwd_dx_*        2·M·K·(N+R16) FLOP issued; the base dx GEMM's traffic + R extra K
//                        columns
// lora_down and lora_bwd_da run the GEMM main loop on 128×RT / RT×128 tiles, RT = 16, 32 or 64
// along R (the narrowest that holds R, else 64: `rank_tile` in lora_kernels.rs) and skip MMAs
// past R, so R pads to 16 (before: one 128-wide tile, zero-padded, 8× the FLOPs at R = 16).
// RT ≤ 32 keeps them at ≤ 128 registers (__launch_bounds__(256, 2): two blocks per SM, with
// 21–23 KiB of shared memory each).
#include "simt.h"
#include "params.h"
#include "gemm_tile.cuh"
#include "philox.cuh"
#include "nf4.cuh"

namespace lf {

// Zeroes the dropped elements of a chunk of x: 8 elements from (row + row_offset, col) of the
// dense [·, x_cols] matrix. Applied on the way to shared memory, so x is read once.
struct DropMask {
    Dropout d;
    int x_cols;
    int row_offset;
    __device__ __forceinline__ void operator()(uint4& chunk, int row, int col) const {
        if (d.active()) d.mask_chunk(chunk, (unsigned long long)(row + row_offset) * x_cols + col);
    }
};

// Rows of split z over M: [z·split_rows, min(m, (z+1)·split_rows)).
__device__ __forceinline__ int split_len(int m, int split_rows, int z) {
    const int begin = z * split_rows;
    return begin >= m ? 0 : (m - begin < split_rows ? m - begin : split_rows);
}

}  // namespace lf

using namespace lf;

// S = drop(x)·Aᵀ and s_scaled = S ⊙ c on a 128×RT tile (RT columns of R): the x tile (dropout
// applied on its way to shared memory) is the 128-row A operand, A [R,K] the RT-row B operand.
// Grid (⌈R/RT⌉, ⌈M/128⌉); the host picks RT = 16, 32 or 64 from R (lora_kernels.rs,
// `rank_tile`), and MMAs past column R are skipped, so R pads to 16.
template <int RT>
__device__ __forceinline__ void lora_down(const LoraForwardParams& p) {
    __shared__ __align__(16) TileSmem<GEMM_BM, RT> smem;
    const int block_m = blockIdx.y * GEMM_BM, block_n = blockIdx.x * RT;
    TileAcc<GEMM_BM, RT> acc = {};
    const Operand<false, DropMask> x{MatrixRef{p.x, p.m, p.k, p.k}, DropMask{Dropout::from(p.dropout), p.k, 0}};
    gemm_mainloop(acc, smem, x, operand<false, RT>(p.a, p.r, p.k, p.k), p.k, block_m, block_n, NoOnTile{}, p.m, p.r);
    const float ds = Dropout::from(p.dropout).kept_scale();
    gemm_epilogue(acc, block_m, block_n, p.m, p.r, [&](int row, int col, float v0, float v1) {
        const bool pair = col + 1 < p.r;
        const long long idx = (long long)row * p.r + col;
        v0 *= ds;
        v1 *= ds;
        store_pair(p.s, idx, pair, v0, v1);
        const float c0 = simt::ld_global_nc(p.col_scale + col);
        const float c1 = pair ? simt::ld_global_nc(p.col_scale + col + 1) : 0.0f;
        store_pair(p.s_scaled, idx, pair, v0 * c0, v1 * c1);
    });
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 2) lora_down_rt16(const LoraForwardParams p) {
    lora_down<16>(p);
}
SIMT_EXPORT_KERNEL(lora_down_rt16, LoraForwardParams)

extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 2) lora_down_rt32(const LoraForwardParams p) {
    lora_down<32>(p);
}
SIMT_EXPORT_KERNEL(lora_down_rt32, LoraForwardParams)

extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 1) lora_down_rt64(const LoraForwardParams p) {
    lora_down<64>(p);
}
SIMT_EXPORT_KERNEL(lora_down_rt64, LoraForwardParams)

// y = s_scaled·Bᵀ + x·W0ᵀ: the LoRA up-projection is R extra K columns of the base GEMM, so the
// accumulator starts at the LoRA term. W0 is the B operand `w0`: bf16 (lora_fwd_split_*) or NF4
// dequantized tile by tile (qlora_fwd_split_*). Grid (ceil(N/128), ceil(M/128)).
template <class Out, class W0>
__device__ __forceinline__ void lora_fwd_split(const LoraForwardParams& p, const W0& w0) {
    __shared__ __align__(16) GemmSmem smem;
    const int block_m = blockIdx.y * GEMM_BM, block_n = blockIdx.x * GEMM_BN;
    GemmAcc acc = {};
    gemm_mainloop<true>(acc, smem, operand<false>(p.s_scaled, p.m, p.r, p.r), operand<false>(p.b, p.n, p.r, p.r), p.r,
                        block_m, block_n, NoOnTile{});
    gemm_mainloop(acc, smem, operand<false>(p.x, p.m, p.k, p.k), w0, p.k, block_m, block_n, NoOnTile{});
    store_tile_c(acc, static_cast<Out*>(p.y), p.n, block_m, block_n, p.m, p.n);
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS) lora_fwd_split_f32out(const LoraForwardParams p) {
    lora_fwd_split<float>(p, operand<false>(p.w0, p.n, p.k, p.k));
}
SIMT_EXPORT_KERNEL(lora_fwd_split_f32out, LoraForwardParams)

extern "C" __global__ void __launch_bounds__(GEMM_THREADS) lora_fwd_split_bf16out(const LoraForwardParams p) {
    lora_fwd_split<lf_bf16>(p, operand<false>(p.w0, p.n, p.k, p.k));
}
SIMT_EXPORT_KERNEL(lora_fwd_split_bf16out, LoraForwardParams)

// dS = (dy·B) ⊙ c and the partials of dB = dyᵀ·s_scaled from ONE pass over dy (each dy tile is
// read from global memory once and used by both products while it is in shared memory).
//
// Grid (⌈R/64⌉, ⌈M/128⌉), 256 threads. Block (x, z) owns rows [128z, 128z+128) of M and columns
// [64x, 64x+64) of R; it loads its s_scaled tile [128 m, 64 r] once, then walks N in steps of 64:
//   dy tile [128 m, 64 n] (+ the B tile [64 n, 64 r]) → shared memory (next step's loads in
//   flight in registers while this step multiplies, as in gemm_mainloop), then
//   dS[128, 64]      += dy tile · B tile     warp w: rows 16w..16w+15, all 64 columns (f32 in
//                                            registers for the whole N loop; ldmatrix of dy,
//                                            ldmatrix.trans of the K-major B tile)
//   dB_z[64 n, 64 r]  = dy tileᵀ · S tile    warp w: n rows 16·(w%4).., r columns 32·(w/4)..;
//                                            both operands K-major: ldmatrix.trans of the same dy
//                                            tile and of the S tile; written straight to
//                                            workspace[z] (f32 [N,R] slab z)
// and finally writes dS ⊙ c as bf16. The dB slabs are summed by splitk_reduce in z order:
// deterministic, no atomics. dS accumulates over N in the same k16 order as a plain GEMM of dy·B
// (gemm_mainloop), so it is bit-identical to it. MMAs on columns ≥ R, rows ≥ M or N past the
// matrix are skipped (warp- or block-uniform branches), so R pads to 16, not to 64.
//
// Shared memory: dy, S and B tiles, rows padded to 72 bf16 (144 B) like gemm_tile.cuh's 128×64
// tiles — 8 consecutive rows fall in 8 distinct 16-byte bank groups, so ldmatrix (plain and
// .trans) and the 16-byte stores are conflict-free: 2·128·72·2 + 64·72·2 = 46080 B, static.
//
// Bytes and FLOPs, R16 = 16·⌈R/16⌉, Z = ⌈M/128⌉ partial slabs, per 64-column chunk of R:
//   reads   dy once: 2·M·N;  B once per M-block: 2·N·R·Z (L2-resident: N·R·2 B);  S: 2·M·R
//   writes  dS 2·M·R;  dB partials 4·N·R·Z (splitk_reduce reads them back and writes 4·N·R)
//   MMA     2·M·N·R16 (dS) + 2·N·M·R16 (dB)
// In units of M·N at large M: 2 + R/64 + R/16 (dy, B, partials written and read back), against
// 4 + R/32 for the two-kernel path it replaces (lora_bwd_ds: dy + B per 128 rows; lora_bwd_db:
// dy again + s_scaled per 128 columns of N, ≈264/⌈N/128⌉ partial slabs; R padded to 128 in the
// MMAs): fewer bytes up to R ≈ 42 (R = 16: 3.25 vs 4.5), more above (R = 64: 7 vs 6), because
// the partials grow with M/128. The workspace is Z·N·R f32, the size of dy at R = 64. Grid
// parallelism is ⌈M/128⌉·⌈R/64⌉ blocks, as lora_bwd_ds had (lora_bwd_db had ~264).
namespace lf {
namespace {

constexpr int DSDB_BM = GEMM_BM;                                     // 128 rows of M per block
constexpr int DSDB_BN = GEMM_BK;                                     // 64 columns of N per step
constexpr int DSDB_RT = 64;                                          // columns of R per block
constexpr int DSDB_LDS = DSDB_RT + 8;                                // 72: pitch of every tile
constexpr int DSDB_B_CHUNKS = DSDB_BN * DSDB_RT / 8 / GEMM_THREADS;  // 2 per thread
static_assert(TileDims<false>::LDS == DSDB_LDS && DSDB_BN + 8 == DSDB_LDS,
              "the dy and S tiles use load_tile/store_tile's 128×64 layout");

struct DsDbSmem {
    lf_bf16 dy[DSDB_BM * DSDB_LDS];  // [m][n]: A of dS (row-major), A of dB (K-major)
    lf_bf16 s[DSDB_BM * DSDB_LDS];   // [m][r]: B of dB (K-major)
    lf_bf16 b[DSDB_BN * DSDB_LDS];   // [n][r]: B of dS (K-major)
};

// Fragments from a K-major tile [k][·] of pitch DSDB_LDS (gemm_tile.cuh's KMAJOR loaders, whose
// tiles have a 136 pitch). A: rows m0..m0+15 of the product = tile columns.
__device__ __forceinline__ void dsdb_a_frag_kmajor(unsigned (&f)[4], const lf_bf16* tile, int m0, int ks, int lane) {
    simt::ldmatrix_x4_trans(f, &tile[(ks + (lane & 7) + (lane >> 4) * 8) * DSDB_LDS + m0 + ((lane >> 3) & 1) * 8]);
}

// B fragments of product columns n0..n0+7 (lo) and n0+8..n0+15 (hi), k ks..ks+15.
__device__ __forceinline__ void dsdb_b_frags_kmajor(unsigned (&lo)[2], unsigned (&hi)[2], const lf_bf16* tile, int n0,
                                                    int ks, int lane) {
    unsigned r[4];
    simt::ldmatrix_x4_trans(r, &tile[(ks + (lane & 7) + ((lane >> 3) & 1) * 8) * DSDB_LDS + n0 + (lane >> 4) * 8]);
    lo[0] = r[0];
    lo[1] = r[1];
    hi[0] = r[2];
    hi[1] = r[3];
}

}  // namespace
}  // namespace lf

extern "C" __global__ void __launch_bounds__(GEMM_THREADS) lora_bwd_ds_db(const LoraBackwardParams p) {
    __shared__ __align__(16) DsDbSmem sm;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int block_m = blockIdx.y * DSDB_BM, r0 = blockIdx.x * DSDB_RT;
    const int r_len = min(DSDB_RT, p.r - r0);    // columns of R in this block
    const int m_len = min(DSDB_BM, p.m - block_m);  // rows of M in this block
    const MatrixRef dym{p.dy, p.m, p.n, p.n}, bm{p.b, p.n, p.r, p.r};
    const bool dy_vec = dym.vector_ok(), b_vec = bm.vector_ok();

    // The S tile, once; the loop's first barrier makes it visible.
    {
        uint4 rs[GEMM_CHUNKS];
        const MatrixRef sref{p.s_scaled, p.m, p.r, p.r};
        load_tile<false>(rs, sref, sref.vector_ok(), block_m, r0, NoTransform{});
        store_tile<false>(sm.s, rs);
    }
    // B tile chunk c = tid + i·256: row c/8, columns 8·(c%8): 8 threads per 128-byte row segment.
    uint4 rb[DSDB_B_CHUNKS];
    auto load_b = [&](int n0) {
#pragma unroll
        for (int i = 0; i < DSDB_B_CHUNKS; ++i) {
            const int c = tid + i * GEMM_THREADS;
            rb[i] = load_chunk(bm, b_vec, n0 + c / 8, r0 + (c % 8) * 8);
        }
    };
    uint4 rdy[GEMM_CHUNKS];
    load_tile<false>(rdy, dym, dy_vec, block_m, 0, NoTransform{});
    load_b(0);

    float ds[DSDB_RT / 8][4] = {};                               // 8 n8 fragments of dS
    const bool ds_rows = 16 * warp < m_len;                      // warp-uniform
    const int db_n = 16 * (warp % 4), db_r = 32 * (warp / 4);    // this warp's piece of dB_z
    float* slab = p.workspace + (long long)blockIdx.y * p.n * p.r;
    for (int n0 = 0; n0 < p.n; n0 += DSDB_BN) {
        store_tile<false>(sm.dy, rdy);
#pragma unroll
        for (int i = 0; i < DSDB_B_CHUNKS; ++i) {
            const int c = tid + i * GEMM_THREADS;
            *reinterpret_cast<uint4*>(&sm.b[(c / 8) * DSDB_LDS + (c % 8) * 8]) = rb[i];
        }
        __syncthreads();  // tiles visible to every warp
        if (n0 + DSDB_BN < p.n) {
            load_tile<false>(rdy, dym, dy_vec, block_m, n0 + DSDB_BN, NoTransform{});
            load_b(n0 + DSDB_BN);
        }
        const int n_len = min(DSDB_BN, p.n - n0);

        if (ds_rows) {  // dS += dy tile · B tile, k = n
#pragma unroll
            for (int ks = 0; ks < DSDB_BN; ks += 16) {
                if (ks >= n_len) break;
                unsigned af[4];
                load_a_frag<false>(af, sm.dy, 16 * warp, ks, lane);
#pragma unroll
                for (int j = 0; j < DSDB_RT / 16; ++j) {
                    if (16 * j >= r_len) break;
                    unsigned lo[2], hi[2];
                    dsdb_b_frags_kmajor(lo, hi, sm.b, 16 * j, ks, lane);
                    simt::mma_m16n8k16_bf16(ds[2 * j], af, lo, ds[2 * j]);
                    simt::mma_m16n8k16_bf16(ds[2 * j + 1], af, hi, ds[2 * j + 1]);
                }
            }
        }

        if (db_n < n_len && db_r < r_len) {  // dB_z rows n0+db_n.. = dy tileᵀ · S tile, k = m
            float db[4][4] = {};
#pragma unroll
            for (int ks = 0; ks < DSDB_BM; ks += 16) {
                if (ks >= m_len) break;
                unsigned af[4];
                dsdb_a_frag_kmajor(af, sm.dy, db_n, ks, lane);
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    if (db_r + 16 * j >= r_len) break;
                    unsigned lo[2], hi[2];
                    dsdb_b_frags_kmajor(lo, hi, sm.s, db_r + 16 * j, ks, lane);
                    simt::mma_m16n8k16_bf16(db[2 * j], af, lo, db[2 * j]);
                    simt::mma_m16n8k16_bf16(db[2 * j + 1], af, hi, db[2 * j + 1]);
                }
            }
#pragma unroll
            for (int f = 0; f < 4; ++f) {
                const int col = r0 + db_r + 8 * f + 2 * (lane % 4);
                if (col >= p.r) continue;
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int row = n0 + db_n + lane / 4 + 8 * half;
                    if (row < p.n)
                        store_pair(slab, (long long)row * p.r + col, col + 1 < p.r, db[f][2 * half],
                                   db[f][2 * half + 1]);
                }
            }
        }
        __syncthreads();  // every warp done reading before the next store overwrites the tiles
    }

    if (!ds_rows) return;
#pragma unroll
    for (int f = 0; f < DSDB_RT / 8; ++f) {
        const int col = r0 + 8 * f + 2 * (lane % 4);
        if (col >= p.r) continue;
        const bool pair = col + 1 < p.r;
        const float c0 = simt::ld_global_nc(p.col_scale + col);
        const float c1 = pair ? simt::ld_global_nc(p.col_scale + col + 1) : 0.0f;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = block_m + 16 * warp + lane / 4 + 8 * half;
            if (row < p.m)
                store_pair(p.ds, (long long)row * p.r + col, pair, ds[f][2 * half] * c0, ds[f][2 * half + 1] * c1);
        }
    }
}
SIMT_EXPORT_KERNEL(lora_bwd_ds_db, LoraBackwardParams)

// Partial dA over split z of M: ds[rows]ᵀ·(mask⊙x)[rows] into workspace[z] as [R,K]; the
// 1/(1-p) goes into the reduction's scale. An RT×128 tile (RT rows of R, RT = 16, 32 or 64 as
// for lora_down; MMAs past row R skipped): dS is the K-major RT-wide A operand, x the K-major
// 128-wide B operand, masked on its way to shared memory. Grid (⌈K/128⌉, ⌈R/RT⌉, splits).
template <int RT>
__device__ __forceinline__ void lora_bwd_da(const LoraBackwardParams& p) {
    __shared__ __align__(16) TileSmem<RT, GEMM_BN> smem;
    const int block_m = blockIdx.y * RT, block_n = blockIdx.x * GEMM_BN, z = blockIdx.z;
    const int rows = split_len(p.m, p.split_rows, z);
    const long long row0 = (long long)z * p.split_rows;
    const Operand<true, DropMask> x{MatrixRef{p.x + row0 * p.k, rows, p.k, p.k},
                                    DropMask{Dropout::from(p.dropout), p.k, (int)row0}};
    TileAcc<RT, GEMM_BN> acc = {};
    gemm_mainloop(acc, smem, operand<true, RT>(p.ds + row0 * p.r, rows, p.r, p.r), x, rows, block_m, block_n,
                  NoOnTile{}, p.r, p.k);
    store_tile_c(acc, p.workspace + (long long)z * p.r * p.k, p.k, block_m, block_n, p.r, p.k);
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 2) lora_bwd_da_rt16(const LoraBackwardParams p) {
    lora_bwd_da<16>(p);
}
SIMT_EXPORT_KERNEL(lora_bwd_da_rt16, LoraBackwardParams)

extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 2) lora_bwd_da_rt32(const LoraBackwardParams p) {
    lora_bwd_da<32>(p);
}
SIMT_EXPORT_KERNEL(lora_bwd_da_rt32, LoraBackwardParams)

extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 1) lora_bwd_da_rt64(const LoraBackwardParams p) {
    lora_bwd_da<64>(p);
}
SIMT_EXPORT_KERNEL(lora_bwd_da_rt64, LoraBackwardParams)

// dx = drop'(dS·A) + dy·W0: the LoRA term first (R extra K columns), masked in registers, then
// the base GEMM accumulates on top. A [R,K] and W0 [N,K] are K-major operands; W0 is `w0`, bf16
// (lora_bwd_dx_*) or NF4 (qlora_bwd_dx_*). Grid (ceil(K/128), ceil(M/128)).
template <class Out, class W0>
__device__ __forceinline__ void lora_bwd_dx(const LoraBackwardParams& p, const W0& w0) {
    __shared__ __align__(16) GemmSmem smem;
    const int block_m = blockIdx.y * GEMM_BM, block_n = blockIdx.x * GEMM_BN;
    GemmAcc acc = {};
    gemm_mainloop<true>(acc, smem, operand<false>(p.ds, p.m, p.r, p.r), operand<true>(p.a, p.r, p.k, p.k), p.r, block_m,
                        block_n, NoOnTile{});
    const Dropout d = Dropout::from(p.dropout);
    if (d.active()) {
        unsigned long long q = ~0ull;  // accumulators come in column pairs: reuse the group
        uint4 w = make_uint4(0, 0, 0, 0);
        for_each_acc(acc, block_m, block_n, [&](int row, int col, float& v) {
            const unsigned long long e = (unsigned long long)row * p.k + col;
            if ((e >> 2) != q) {
                q = e >> 2;
                w = d.words(q);
            }
            v = philox_word(w, (unsigned)(e & 3)) >= d.threshold ? v * d.scale : 0.0f;
        });
    }
    gemm_mainloop(acc, smem, operand<false>(p.dy, p.m, p.n, p.n), w0, p.n, block_m, block_n, NoOnTile{});
    store_tile_c(acc, static_cast<Out*>(p.dx), p.k, block_m, block_n, p.m, p.k);
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS) lora_bwd_dx_f32out(const LoraBackwardParams p) {
    lora_bwd_dx<float>(p, operand<true>(p.w0, p.n, p.k, p.k));
}
SIMT_EXPORT_KERNEL(lora_bwd_dx_f32out, LoraBackwardParams)

extern "C" __global__ void __launch_bounds__(GEMM_THREADS) lora_bwd_dx_bf16out(const LoraBackwardParams p) {
    lora_bwd_dx<lf_bf16>(p, operand<true>(p.w0, p.n, p.k, p.k));
}
SIMT_EXPORT_KERNEL(lora_bwd_dx_bf16out, LoraBackwardParams)

// QLoRA: the same kernels with W0 read as NF4 and dequantized tile by tile on its way to shared
// memory (Nf4Operand, nf4.cuh): per 128×64 W0 tile 4 KiB of packed nibbles + statistics are
// read instead of 16 KiB of bf16; 1 KiB more static shared memory (the nested map).
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) qlora_fwd_split_f32out(const QloraForwardParams p) {
    __shared__ float nf4_map[256];
    lora_fwd_split<float>(p.lora, nf4_operand<false>(p.w0, nf4_map, p.lora.n, p.lora.k));
}
SIMT_EXPORT_KERNEL(qlora_fwd_split_f32out, QloraForwardParams)

extern "C" __global__ void __launch_bounds__(GEMM_THREADS) qlora_fwd_split_bf16out(const QloraForwardParams p) {
    __shared__ float nf4_map[256];
    lora_fwd_split<lf_bf16>(p.lora, nf4_operand<false>(p.w0, nf4_map, p.lora.n, p.lora.k));
}
SIMT_EXPORT_KERNEL(qlora_fwd_split_bf16out, QloraForwardParams)

extern "C" __global__ void __launch_bounds__(GEMM_THREADS) qlora_bwd_dx_f32out(const QloraBackwardParams p) {
    __shared__ float nf4_map[256];
    lora_bwd_dx<float>(p.lora, nf4_operand<true>(p.w0, nf4_map, p.lora.n, p.lora.k));
}
SIMT_EXPORT_KERNEL(qlora_bwd_dx_f32out, QloraBackwardParams)

extern "C" __global__ void __launch_bounds__(GEMM_THREADS) qlora_bwd_dx_bf16out(const QloraBackwardParams p) {
    __shared__ float nf4_map[256];
    lora_bwd_dx<lf_bf16>(p.lora, nf4_operand<true>(p.w0, nf4_map, p.lora.n, p.lora.k));
}
SIMT_EXPORT_KERNEL(qlora_bwd_dx_bf16out, QloraBackwardParams)

// Deterministic split-K reduction (fixed z order). 256 threads, grid-stride.
extern "C" __global__ void __launch_bounds__(256) splitk_reduce(const SplitKReduceParams p) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < p.len;
         i += (long long)gridDim.x * blockDim.x) {
        float sum = 0.0f;
        for (int z = 0; z < p.splits; ++z) sum += simt::ld_global(p.partial + z * p.len + i);
        simt::st_global(p.out + i, p.scale * sum);
    }
}
SIMT_EXPORT_KERNEL(splitk_reduce, SplitKReduceParams)
