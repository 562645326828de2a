// A block sum with the __syncthreads between the warp leaders' writes of their partial sums
// and warp 0's reads of them deleted (a read-after-write race across warps). TSan must report
// it, and the random and warp-ahead schedules must make the result wrong
// (tests/sim_sanitizers.rs). With mode 1 the barrier is present (the correct kernel).
// out[block] = Σ in[block's threads]; blockDim.x a multiple of 32, at most 1024.
#include "simt.h"
#include "params.h"

extern "C" __global__ void planted_missing_sync(const SimtSelftestParams p) {
    __shared__ unsigned partial[32];
    const unsigned t = threadIdx.x, lane = t % 32, warp = t / 32;
    unsigned v = simt::ld_global(p.in + blockIdx.x * blockDim.x + t);
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) partial[warp] = v;
    if (p.mode == 1) __syncthreads();  // the barrier the bug deletes
    if (warp == 0) {
        v = lane < blockDim.x / 32 ? partial[lane] : 0;
        for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0) simt::st_global(p.out + blockIdx.x, v);
    }
}
SIMT_EXPORT_KERNEL(planted_missing_sync, SimtSelftestParams)
