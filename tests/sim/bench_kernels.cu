// Micro-benchmark kernels for the simulator's switch points (tests/sim/selftest_driver --bench).
#include "simt.h"
#include "params.h"

// n block barriers per thread.
extern "C" __global__ void simt_bench_barrier(const SimtSelftestParams p) {
    for (int i = 0; i < p.n; ++i) __syncthreads();
}
SIMT_EXPORT_KERNEL(simt_bench_barrier, SimtSelftestParams)

// n full-warp xor shuffles per thread.
extern "C" __global__ void simt_bench_shfl(const SimtSelftestParams p) {
    unsigned v = threadIdx.x;
    for (int i = 0; i < p.n; ++i) v += __shfl_xor_sync(0xffffffffu, v, 1);
    if (v == 0x12345678u && p.out) simt::st_global(p.out, v);
}
SIMT_EXPORT_KERNEL(simt_bench_shfl, SimtSelftestParams)
