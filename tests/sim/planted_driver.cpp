// Launches the planted-bug kernels (planted_oob.cu, planted_missing_sync.cu) for
// tests/sim_sanitizers.rs.
//   planted_driver oob_global|oob_static|oob_dyn   one out-of-bounds write (ASan must abort)
//   planted_driver race [fixed]                    missing __syncthreads, lockstep (TSan reports);
//                                                  with "fixed" the barrier is present
//   planted_driver schedules                       see below
// `schedules` runs the buggy block sum under lockstep, 4 random and 4 warp-ahead seeds and
// prints how many gave a wrong sum; exit 0 iff at least one random and one warp-ahead run did
// and the fixed kernel is right under all of them.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "params.h"
#include "simt_abi.h"

static int run(const char* kernel, unsigned grid, unsigned block, unsigned long long dyn,
               SimtSelftestParams p, SimtConfig cfg) {
    char err[1024];
    if (simt_launch(kernel, grid, 1, 1, block, 1, 1, dyn, &p, sizeof p, &cfg, nullptr, err, sizeof err)) {
        printf("launch failed: %s\n", err);
        return 2;
    }
    return 0;
}

// Number of blocks whose sum is wrong.
static int block_sum_errors(int mode, SimtConfig cfg) {
    const unsigned G = 4, B = 256;
    std::vector<unsigned> in(G * B), out(G, 0);
    for (unsigned i = 0; i < in.size(); ++i) in[i] = i * 2654435761u >> 7;
    if (run("planted_missing_sync", G, B, 0, SimtSelftestParams{in.data(), out.data(), nullptr, 0, mode}, cfg))
        return -1;
    int wrong = 0;
    for (unsigned g = 0; g < G; ++g) {
        unsigned s = 0;
        for (unsigned t = 0; t < B; ++t) s += in[g * B + t];
        wrong += out[g] != s;
    }
    return wrong;
}

int main(int argc, char** argv) {
    const std::string cmd = argc > 1 ? argv[1] : "";
    const SimtConfig lockstep{SIMT_SCHED_LOCKSTEP, 0, 0};
    if (cmd.rfind("oob_", 0) == 0) {
        const int mode = cmd == "oob_global" ? 0 : cmd == "oob_static" ? 1 : 2;
        const unsigned n = 64;
        std::vector<unsigned>* buf = new std::vector<unsigned>(n);  // exact size: ASan redzone at the end
        run("planted_oob", 1, 64, mode == 2 ? 4ull * n : 0, SimtSelftestParams{nullptr, buf->data(), nullptr, int(n), mode}, lockstep);
        printf("NOT DETECTED: %s\n", cmd.c_str());
        return 0;
    }
    if (cmd == "race") {
        const int wrong = block_sum_errors(argc > 2 && !strcmp(argv[2], "fixed") ? 1 : 0, lockstep);
        printf("race: %d wrong blocks under lockstep\n", wrong);
        return wrong < 0 ? 2 : 0;
    }
    if (cmd == "schedules") {
        int random_hits = 0, ahead_hits = 0, fixed_wrong = 0;
        fixed_wrong += block_sum_errors(1, lockstep);
        printf("lockstep: %d wrong blocks\n", block_sum_errors(0, lockstep));
        for (unsigned long long seed = 1; seed <= 4; ++seed) {
            const SimtConfig r{SIMT_SCHED_RANDOM, seed, 0}, w{SIMT_SCHED_WARP_AHEAD, seed, 0};
            const int rw = block_sum_errors(0, r), ww = block_sum_errors(0, w);
            printf("seed %llu: random %d, warp_ahead %d wrong blocks\n", seed, rw, ww);
            random_hits += rw > 0;
            ahead_hits += ww > 0;
            fixed_wrong += block_sum_errors(1, r) + block_sum_errors(1, w);
        }
        printf("fixed kernel: %d wrong blocks\n", fixed_wrong);
        return random_hits && ahead_hits && !fixed_wrong ? 0 : 1;
    }
    fprintf(stderr, "usage: planted_driver oob_global|oob_static|oob_dyn|race [fixed]|schedules\n");
    return 2;
}
