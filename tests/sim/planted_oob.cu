// Planted out-of-bounds accesses that an ASan build of the simulator must catch
// (tests/sim_sanitizers.rs). One thread writes one element past the end of:
// mode 0: the global buffer out[0..n); mode 1: a static __shared__ array of 64 words (index n);
// mode 2: the dynamic shared memory (launched with n words, index n).
#include "simt.h"
#include "params.h"

extern "C" __global__ void planted_oob(const SimtSelftestParams p) {
    __shared__ unsigned s[64];
    SIMT_DYN_SHARED(unsigned, dyn);
    const unsigned t = threadIdx.x;
    const unsigned i = t == 0 ? unsigned(p.n) : t % 64;  // thread 0 is the culprit
    switch (p.mode) {
        case 0: simt::st_global(p.out + i, t); break;
        case 1: s[i] = t; break;
        default: dyn[i] = t; break;
    }
    __syncthreads();
    if (p.out && p.mode == 1 && t == 1) simt::st_global(p.out + 1, s[1]);
}
SIMT_EXPORT_KERNEL(planted_oob, SimtSelftestParams)
