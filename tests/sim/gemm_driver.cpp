// Runs gemm_bf16_f32out (kernels/gemm.cu, params GemmParams) in the SIMT simulator under every
// schedule and compares with a double-precision reference. Used by tests/sim_sanitizers.rs
// (clean runs, sanitizer runs, and the barrier-deletion mutation test) and for timing.
//
//   gemm_driver [M N K] [--seeds S] [--bench R]
// Exit status: 0 all schedules match, 1 some schedule gave a wrong result, 2 a launch failed.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <string>
#include <vector>

#include "params.h"
#include "simt_abi.h"

int main(int argc, char** argv) {
    int M = 128, N = 128, K = 192, seeds = 3, bench = 0;
    std::vector<int> dims;
    for (int i = 1; i < argc; ++i) {
        if (!strcmp(argv[i], "--seeds") && i + 1 < argc) seeds = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--bench") && i + 1 < argc) bench = atoi(argv[++i]);
        else dims.push_back(atoi(argv[i]));
    }
    if (dims.size() == 3) M = dims[0], N = dims[1], K = dims[2];

    std::mt19937 rng(42);
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    std::vector<__nv_bfloat16> a(size_t(M) * K), b(size_t(N) * K);
    for (auto& x : a) x = __float2bfloat16(dist(rng));
    for (auto& x : b) x = __float2bfloat16(dist(rng));
    std::vector<double> ref(size_t(M) * N), mag(size_t(M) * N);
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
            double s = 0, m = 0;
            for (int k = 0; k < K; ++k) {
                const double p = double(float(a[size_t(i) * K + k])) * double(float(b[size_t(j) * K + k]));
                s += p;
                m += std::fabs(p);
            }
            ref[size_t(i) * N + j] = s;
            mag[size_t(i) * N + j] = m;
        }

    std::vector<float> c(size_t(M) * N);
    GemmParams p{};  // by field name: the struct grows
    p.a = a.data();
    p.b = b.data();
    p.c = c.data();
    p.m = M;
    p.n = N;
    p.k = K;
    p.lda = K;
    p.ldb = K;
    p.ldc = N;
    p.alpha = 1.0f;
    const unsigned gx = unsigned((N + 127) / 128), gy = unsigned((M + 127) / 128);
    char err[1024];
    SimtStats st{};

    if (bench) {
        SimtConfig cfg{SIMT_SCHED_LOCKSTEP, 0, 0};
        double best = 1e30, best_cpu = 1e30;  // wall and process CPU time (the box may be shared)
        for (int r = 0; r < bench; ++r) {
            const auto t0 = std::chrono::steady_clock::now();
            const std::clock_t c0 = std::clock();
            if (simt_launch("gemm_bf16_f32out", gx, gy, 1, 256, 1, 1, 0, &p, sizeof p, &cfg, &st, err, sizeof err)) {
                printf("launch failed: %s\n", err);
                return 2;
            }
            best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
            best_cpu = std::min(best_cpu, double(std::clock() - c0) / CLOCKS_PER_SEC);
        }
        printf("gemm %dx%dx%d: best of %d: %.2f ms wall, %.2f ms CPU; mma %llu ldmatrix %llu barriers %llu read %llu B written %llu B\n",
               M, N, K, bench, best * 1e3, best_cpu * 1e3, st.mma, st.ldmatrix, st.barriers, st.bytes_read, st.bytes_written);
    }

    struct Run { int schedule; unsigned long long seed; const char* name; };
    std::vector<Run> runs{{SIMT_SCHED_LOCKSTEP, 0, "lockstep"}};
    for (int s = 1; s <= seeds; ++s) {
        runs.push_back({SIMT_SCHED_RANDOM, (unsigned long long)s, "random"});
        runs.push_back({SIMT_SCHED_WARP_AHEAD, (unsigned long long)s, "warp_ahead"});
    }
    int status = 0;
    for (const Run& r : runs) {
        std::fill(c.begin(), c.end(), 0.0f);
        SimtConfig cfg{r.schedule, r.seed, 0};
        if (simt_launch("gemm_bf16_f32out", gx, gy, 1, 256, 1, 1, 0, &p, sizeof p, &cfg, &st, err, sizeof err)) {
            printf("%s seed %llu: launch failed: %s\n", r.name, r.seed, err);
            return 2;
        }
        double worst = 0;  // error relative to the tolerance; > 1 fails
        for (size_t i = 0; i < c.size(); ++i) {
            const double e = std::fabs(double(c[i]) - ref[i]) / (1e-5 * mag[i] + 1e-6);
            if (!(e <= worst)) worst = e;  // also catches NaN
        }
        const bool ok = worst <= 1.0;
        printf("%-10s seed %llu: %s (max error / tolerance %.3g)\n", r.name, r.seed, ok ? "ok" : "WRONG", worst);
        if (!ok) status = 1;
    }
    return status;
}
