// Runs the simulator self-tests (kernels/simt_selftest.cu) under every schedule and checks the
// outputs against references computed here independently of the simulator: shuffles from the
// PTX ISA pseudo-code of shfl.sync, mma and ldmatrix from the PTX ISA fragment-layout formulas.
// Also checks that kernel bugs and launches a GPU would refuse come back as errors, and that
// concurrent launches from several threads work.
//
//   selftest_driver            run all tests (exit status 0 = all passed)
//   selftest_driver --quick    one schedule, small sizes (for sanitizer builds)
//   selftest_driver --bench    timings (barrier, shuffle)
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "params.h"
#include "simt_abi.h"

namespace {

int g_failures = 0;
std::mt19937 g_rng(1234);

#define CHECK(cond, ...)                                        \
    do {                                                        \
        if (!(cond)) {                                          \
            ++g_failures;                                       \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);         \
            printf(__VA_ARGS__);                                \
            printf("\n");                                       \
            return;                                             \
        }                                                       \
    } while (0)

struct Launch {
    const char* kernel;
    dim3 grid, block;
    unsigned long long dyn = 0;
};

// Launches with the given schedule; returns the error message ("" on success).
std::string launch(const Launch& l, const SimtSelftestParams& p, const SimtConfig& cfg,
                   SimtStats* st = nullptr) {
    char err[1024];
    const int rc = simt_launch(l.kernel, l.grid.x, l.grid.y, l.grid.z, l.block.x, l.block.y, l.block.z,
                               l.dyn, &p, sizeof p, &cfg, st, err, sizeof err);
    return rc ? std::string(err[0] ? err : "(empty error message)") : std::string();
}

std::vector<unsigned> random_words(size_t n) {
    std::vector<unsigned> v(n);
    for (auto& x : v) x = unsigned(g_rng());
    return v;
}

// ---- barriers, indices, reductions ------------------------------------------------------

void test_barrier(const SimtConfig& cfg, unsigned G, unsigned B, int rounds) {
    const auto in = random_words(G * B);
    std::vector<unsigned> out(G * B + 4 * G, 0);
    SimtSelftestParams p{in.data(), out.data(), nullptr, rounds, 0};
    const std::string e = launch({"simt_selftest_barrier", dim3(G), dim3(B)}, p, cfg);
    CHECK(e.empty(), "barrier: %s", e.c_str());
    for (unsigned g = 0; g < G; ++g) {
        std::vector<unsigned> v(in.begin() + g * B, in.begin() + (g + 1) * B), next(B);
        for (int r = 0; r < rounds; ++r) {
            for (unsigned t = 0; t < B; ++t) next[t] = v[(t + 1 + unsigned(r)) % B] * 3u + t;
            v.swap(next);
        }
        for (unsigned t = 0; t < B; ++t) CHECK(out[g * B + t] == v[t], "barrier block %u thread %u", g, t);
        const unsigned* o = &out[G * B + 4 * g];
        CHECK(o[0] == (B + 2) / 3 && o[1] == 1 && o[2] == 1 && o[3] == 0,
              "__syncthreads_count/and/or: %u %u %u %u", o[0], o[1], o[2], o[3]);
    }
}

void test_index(const SimtConfig& cfg) {
    const dim3 grid(2, 3, 2), block(4, 2, 3);
    const unsigned total = 12 * 24;
    std::vector<unsigned> out(6 * total, ~0u);
    SimtSelftestParams p{nullptr, out.data(), nullptr, 0, 0};
    const std::string e = launch({"simt_selftest_index", grid, block}, p, cfg);
    CHECK(e.empty(), "index: %s", e.c_str());
    unsigned g = 0;
    for (unsigned bz = 0; bz < 2; ++bz)
        for (unsigned by = 0; by < 3; ++by)
            for (unsigned bx = 0; bx < 2; ++bx)
                for (unsigned tz = 0; tz < 3; ++tz)
                    for (unsigned ty = 0; ty < 2; ++ty)
                        for (unsigned tx = 0; tx < 4; ++tx, ++g) {
                            const unsigned want[6] = {tx, ty, tz, bx, by, bz};
                            CHECK(memcmp(&out[6 * g], want, sizeof want) == 0, "index of thread %u", g);
                        }
}

void test_reduce(const SimtConfig& cfg, unsigned G, unsigned B) {
    const auto in = random_words(G * B);
    std::vector<unsigned> out(G, 0);
    SimtSelftestParams p{in.data(), out.data(), nullptr, 0, 0};
    SimtStats st{};
    const std::string e = launch({"simt_selftest_reduce", dim3(G), dim3(B), B * 4ull}, p, cfg, &st);
    CHECK(e.empty(), "reduce: %s", e.c_str());
    for (unsigned g = 0; g < G; ++g) {
        unsigned s = 0;
        for (unsigned t = 0; t < B; ++t) s += in[g * B + t];
        CHECK(out[g] == s, "reduce block %u: %u != %u", g, out[g], s);
    }
    CHECK(st.bytes_read == 4ull * G * B && st.bytes_written == 4ull * G && st.blocks == G &&
              st.threads == 1ull * G * B && st.shuffles == 5ull * G,
          "reduce stats: read %llu written %llu blocks %llu threads %llu shuffles %llu", st.bytes_read,
          st.bytes_written, st.blocks, st.threads, st.shuffles);
}

// ---- warp collectives ---------------------------------------------------------------------

// shfl.sync per the PTX ISA pseudo-code, with CUDA's c operand ((32 - width) << 8 | clamp).
enum { kIdx, kUp, kDown, kBfly };
unsigned ptx_shfl(int mode, unsigned lane, unsigned b, unsigned width, const unsigned* vals) {
    const unsigned cval = mode == kUp ? 0 : 31, segmask = (32 - width) & 31, bval = b & 31;
    const unsigned max_lane = (lane & segmask) | (cval & ~segmask), min_lane = lane & segmask;
    int j;
    bool pval;
    switch (mode) {
        case kUp: j = int(lane) - int(bval); pval = j >= int(max_lane); break;
        case kDown: j = int(lane + bval); pval = j <= int(max_lane); break;
        case kBfly: j = int(lane ^ bval); pval = j <= int(max_lane); break;
        default: j = int(min_lane | (bval & ~segmask)); pval = j <= int(max_lane); break;
    }
    return vals[pval ? j : int(lane)];
}

void test_shuffle(const SimtConfig& cfg) {
    const unsigned G = 2, B = 64;
    const auto in = random_words(G * B);
    std::vector<unsigned> out(24 * G * B, 0);
    SimtSelftestParams p{in.data(), out.data(), nullptr, 0, 0};
    SimtStats st{};
    const std::string e = launch({"simt_selftest_shuffle", dim3(G), dim3(B)}, p, cfg, &st);
    CHECK(e.empty(), "shuffle: %s", e.c_str());
    for (unsigned gid = 0; gid < G * B; ++gid) {
        const unsigned lane = gid % 32, *warp = &in[gid - lane], *o = &out[24 * gid];
        int k = 0;
        for (unsigned width = 32; width >= 2; width /= 2) {
            CHECK(o[k++] == ptx_shfl(kIdx, lane, 7 * lane + 3, width, warp), "shfl idx width %u lane %u", width, lane);
            CHECK(o[k++] == ptx_shfl(kUp, lane, 3, width, warp), "shfl up width %u lane %u", width, lane);
            CHECK(o[k++] == ptx_shfl(kDown, lane, 5, width, warp), "shfl down width %u lane %u", width, lane);
            CHECK(o[k++] == ptx_shfl(kBfly, lane, 5, width, warp), "shfl xor width %u lane %u", width, lane);
        }
        CHECK(o[20] == warp[lane ^ 1], "float shuffle lane %u", lane);
        const unsigned src = warp[lane ^ 16];
        CHECK(o[21] == (src ^ 0xabcdefu) && o[22] == src, "64-bit shuffle lane %u", lane);
        CHECK(o[23] == warp[lane ^ 1], "half-warp mask shuffle lane %u", lane);
    }
    CHECK(st.shuffles == 24ull * G * B / 32, "shuffle count %llu", st.shuffles);
}

void test_vote(const SimtConfig& cfg) {
    const unsigned G = 1, B = 128;
    auto in = random_words(G * B);
    for (unsigned l = 0; l < 32; ++l) in[l] |= 1, in[32 + l] &= ~1u;  // warp 0 all true, warp 1 all false
    std::vector<unsigned> out(5 * G * B, 0);
    SimtSelftestParams p{in.data(), out.data(), nullptr, 0, 0};
    const std::string e = launch({"simt_selftest_vote", dim3(G), dim3(B)}, p, cfg);
    CHECK(e.empty(), "vote: %s", e.c_str());
    for (unsigned gid = 0; gid < G * B; ++gid) {
        const unsigned lane = gid % 32, *w = &in[gid - lane];
        unsigned ballot = 0;
        for (unsigned l = 0; l < 32; ++l) ballot |= (w[l] & 1) << l;
        const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
        const unsigned* o = &out[5 * gid];
        CHECK(o[0] == ballot && o[1] == (ballot != 0) && o[2] == (ballot == ~0u) && o[3] == (ballot & half) &&
                  o[4] == 1,
              "vote lane %u: %08x %u %u %08x %u (ballot %08x)", gid, o[0], o[1], o[2], o[3], o[4], ballot);
    }
}

void test_atomics(const SimtConfig& cfg) {
    const unsigned G = 37, B = 96, n = G * B;
    std::vector<unsigned> out(8, 0);
    out[2] = ~0u;
    std::vector<float> fout(2, 0.0f);
    SimtSelftestParams p{nullptr, out.data(), fout.data(), 0, 0};
    const std::string e = launch({"simt_selftest_atomics", dim3(G), dim3(B)}, p, cfg);
    CHECK(e.empty(), "atomics: %s", e.c_str());
    double fsum = 0;
    for (unsigned g = 0; g < n; ++g) fsum += g % 8;
    unsigned long long wide;
    memcpy(&wide, &out[4], 8);
    CHECK(fout[0] == 0.25f * n && fout[1] == float(fsum), "float atomicAdd: %g %g", fout[0], fout[1]);
    CHECK(out[0] == n && out[1] == n - 1 && out[2] == 5 && out[3] == n && out[6] < n && out[7] == n % 10,
          "integer atomics: %u %u %u %u %u %u", out[0], out[1], out[2], out[3], out[6], out[7]);
    CHECK(wide == ((unsigned long long)n << 32) + n, "64-bit atomicAdd: %llx", wide);
}

// PTX ISA mma.m16n8k16 fragment layouts (g = lane / 4, t = lane % 4), element i of a fragment
// sits in register i / 2, low half for even i.
struct RC { unsigned r, c; };
RC a_elem(unsigned lane, unsigned i) { return {lane / 4 + ((i % 4) >= 2 ? 8 : 0), 2 * (lane % 4) + i % 2 + (i >= 4 ? 8 : 0)}; }
RC b_elem(unsigned lane, unsigned i) { return {2 * (lane % 4) + i % 2 + (i >= 2 ? 8 : 0), lane / 4}; }
RC c_elem(unsigned lane, unsigned i) { return {lane / 4 + (i >= 2 ? 8 : 0), 2 * (lane % 4) + i % 2}; }

void test_mma(const SimtConfig& cfg, int mode, unsigned problems) {
    const bool f16 = mode & 1;
    std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
    auto to16 = [&](float x, float* back) -> unsigned {
        if (f16) { __half h = __float2half(x); *back = __half2float(h); return __half_as_ushort(h); }
        __nv_bfloat16 h = __float2bfloat16(x); *back = __bfloat162float(h); return __bfloat16_as_ushort(h);
    };
    std::vector<unsigned> in(320 * problems), out(128 * problems, 0);
    std::vector<double> want(128 * problems), mag(128 * problems);
    for (unsigned q = 0; q < problems; ++q) {
        float A[16][16], Bm[16][8], C[16][8];
        unsigned Ab[16][16], Bb[16][8];
        for (auto& row : A) for (auto& x : row) Ab[&row - A][&x - row] = to16(dist(g_rng), &x);
        for (auto& row : Bm) for (auto& x : row) Bb[&row - Bm][&x - row] = to16(dist(g_rng), &x);
        for (auto& row : C) for (auto& x : row) x = dist(g_rng);
        for (unsigned l = 0; l < 32; ++l) {
            unsigned* f = &in[320 * q + 10 * l];
            for (unsigned i = 0; i < 8; ++i) { RC e = a_elem(l, i); f[i / 2] |= Ab[e.r][e.c] << (16 * (i % 2)); }
            for (unsigned i = 0; i < 4; ++i) { RC e = b_elem(l, i); f[4 + i / 2] |= Bb[e.r][e.c] << (16 * (i % 2)); }
            for (unsigned i = 0; i < 4; ++i) { RC e = c_elem(l, i); memcpy(&f[6 + i], &C[e.r][e.c], 4); }
            for (unsigned i = 0; i < 4; ++i) {
                RC e = c_elem(l, i);
                double s = C[e.r][e.c], m = std::fabs(s);
                for (unsigned k = 0; k < 16; ++k) s += double(A[e.r][k]) * Bm[k][e.c], m += std::fabs(double(A[e.r][k]) * Bm[k][e.c]);
                want[128 * q + 4 * l + i] = s;
                mag[128 * q + 4 * l + i] = m;
            }
        }
    }
    SimtSelftestParams p{in.data(), out.data(), nullptr, int(problems), mode};
    SimtStats st{};
    const std::string e = launch({"simt_selftest_mma", dim3((problems + 1) / 2), dim3(64)}, p, cfg, &st);
    CHECK(e.empty(), "mma: %s", e.c_str());
    for (size_t i = 0; i < out.size(); ++i) {
        float d;
        memcpy(&d, &out[i], 4);
        CHECK(std::fabs(d - want[i]) <= 1e-6 * mag[i] + 1e-7, "mma mode %d element %zu: %g != %g", mode, i, d, want[i]);
    }
    CHECK(st.mma == problems, "mma count %llu", st.mma);
}

void test_ldmatrix(const SimtConfig& cfg, int mode, unsigned problems) {
    const unsigned nmat = 1u << (mode % 3);
    const bool trans = mode >= 3;
    const auto in = random_words(128 * problems);
    std::vector<unsigned> out(128 * problems, 0);
    SimtSelftestParams p{in.data(), out.data(), nullptr, int(problems), mode};
    SimtStats st{};
    const std::string e = launch({"simt_selftest_ldmatrix", dim3((problems + 1) / 2), dim3(64)}, p, cfg, &st);
    CHECK(e.empty(), "ldmatrix: %s", e.c_str());
    for (unsigned q = 0; q < problems; ++q) {
        // Matrix j, row r came from the row lane 8j + r pointed at: input row (5(8j+r)+3) % 32.
        auto M = [&](unsigned j, unsigned r, unsigned c) -> unsigned {
            const unsigned src = (5 * (8 * j + r) + 3) % 32, w = in[128 * q + 4 * src + c / 2];
            return (w >> (16 * (c % 2))) & 0xffff;
        };
        for (unsigned l = 0; l < 32; ++l)
            for (unsigned j = 0; j < 4; ++j) {
                const unsigned row = l / 4, col = 2 * (l % 4);
                const unsigned want = j >= nmat ? 0
                                      : trans ? M(j, col, row) | M(j, col + 1, row) << 16
                                              : M(j, row, col) | M(j, row, col + 1) << 16;
                CHECK(out[128 * q + 4 * l + j] == want, "ldmatrix mode %d problem %u lane %u reg %u: %08x != %08x",
                      mode, q, l, j, out[128 * q + 4 * l + j], want);
            }
    }
    CHECK(st.ldmatrix == problems, "ldmatrix count %llu", st.ldmatrix);
}

// ---- errors --------------------------------------------------------------------------------

void expect_error(const char* what, const Launch& l, const SimtSelftestParams& p,
                  std::vector<const char*> needles, unsigned long long params_size = sizeof(SimtSelftestParams)) {
    char err[1024] = "";
    const SimtConfig cfg{SIMT_SCHED_LOCKSTEP, 0, 0};
    const int rc = simt_launch(l.kernel, l.grid.x, l.grid.y, l.grid.z, l.block.x, l.block.y, l.block.z,
                               l.dyn, &p, params_size, &cfg, nullptr, err, sizeof err);
    CHECK(rc != 0, "%s: launch succeeded", what);
    for (const char* n : needles) CHECK(strstr(err, n), "%s: message \"%s\" lacks \"%s\"", what, err, n);
    printf("  %-28s -> %s\n", what, err);
}

void test_errors() {
    SimtSelftestParams p{nullptr, nullptr, nullptr, 0, 0};
    const char* k = "simt_selftest_diverge";
    auto mode = [&](int m) { SimtSelftestParams q = p; q.mode = m; return q; };
    expect_error("different barriers", {k, dim3(1), dim3(64)}, mode(0),
                 {"simt_selftest_diverge: block (0,0,0) thread 32 reached __syncthreads at simt_selftest.cu:",
                  "while thread 0 waits at simt_selftest.cu:"});
    expect_error("exit before barrier", {k, dim3(2), dim3(64)}, mode(1),
                 {"block (0,0,0) thread 5 exited while thread 0 waits at __syncthreads at simt_selftest.cu:"});
    expect_error("exit before shuffle", {k, dim3(1), dim3(64)}, mode(2),
                 {"thread 0 waits at __shfl_xor_sync (mask 0xffffffff) at simt_selftest.cu:", "but lane 7 (thread 7) exited"});
    expect_error("syncwarp vs syncthreads", {k, dim3(1), dim3(64)}, mode(3),
                 {"waits at __syncwarp (mask 0xffffffff)", "lane 16 (thread 16) waits at __syncthreads"});
    expect_error("mismatched collectives", {k, dim3(1), dim3(64)}, mode(4), {"__ballot_sync", "__shfl_sync"});
    expect_error("mask excludes caller", {k, dim3(1), dim3(64)}, mode(5), {"excludes the calling lane"});
    expect_error("misaligned ldmatrix", {k, dim3(1), dim3(64)}, mode(6), {"not 16-byte aligned"});
    expect_error("mma in partial warp", {k, dim3(1), dim3(48)}, mode(7), {"needs all 32 lanes"});
    expect_error("shuffle width 3", {k, dim3(1), dim3(64)}, mode(8), {"width 3"});
    expect_error("too many threads", {k, dim3(1), dim3(2048)}, p, {"block of 2048 threads exceeds 1024"});
    expect_error("block z > 64", {k, dim3(1), dim3(1, 1, 65)}, p, {"exceeds (1024,1024,64)"});
    expect_error("grid y > 65535", {k, dim3(1, 65536), dim3(32)}, p, {"exceeds (2147483647,65535,65535)"});
    expect_error("zero block", {k, dim3(1), dim3(0)}, p, {"zero dimension"});
    expect_error("dynamic smem", {k, dim3(1), dim3(32), 300000}, p, {"dynamic shared memory 300000 B exceeds 232448"});
    expect_error("unknown kernel", {"no_such_kernel", dim3(1), dim3(32)}, p, {"no_such_kernel: unknown kernel"});
    expect_error("params size", {k, dim3(1), dim3(32)}, p, {"params size 40 != 32"}, 40);
}

// Several threads launching at once (as cargo's parallel tests do).
void test_concurrent_launches() {
    std::vector<std::thread> ts;
    std::vector<int> ok(4, 0);
    for (int i = 0; i < 4; ++i)
        ts.emplace_back([&, i] {
            std::vector<unsigned> in(64 * 256, unsigned(i) + 1), out(64, 0);
            SimtSelftestParams p{in.data(), out.data(), nullptr, 0, 0};
            const SimtConfig cfg{i % 3, unsigned(i), 0};
            bool good = true;
            for (int r = 0; r < 5; ++r) {
                good &= launch({"simt_selftest_reduce", dim3(64), dim3(256), 1024}, p, cfg).empty();
                for (unsigned x : out) good &= x == 256u * unsigned(i + 1);
            }
            ok[size_t(i)] = good;
        });
    for (auto& t : ts) t.join();
    for (int i = 0; i < 4; ++i) CHECK(ok[size_t(i)], "concurrent launcher %d", i);
}

// ---- timing ------------------------------------------------------------------------------

double time_launch(const char* kernel, unsigned G, unsigned B, int iters, int reps) {
    SimtSelftestParams p{nullptr, nullptr, nullptr, iters, 0};
    const SimtConfig cfg{SIMT_SCHED_LOCKSTEP, 0, 0};
    double best = 1e30;
    for (int r = 0; r < reps; ++r) {
        const std::clock_t c0 = std::clock();
        if (!launch({kernel, dim3(G), dim3(B)}, p, cfg).empty()) return -1;
        best = std::min(best, double(std::clock() - c0) / CLOCKS_PER_SEC);
    }
    return best;
}

void bench() {
    printf("timings (process CPU time, best of 3; SIMT_THREADS=%s)\n", getenv("SIMT_THREADS") ? getenv("SIMT_THREADS") : "default");
    for (unsigned B : {32u, 256u, 1024u}) {
        const int iters = 2000;
        const double t = time_launch("simt_bench_barrier", 8, B, iters, 3);
        printf("  __syncthreads, %4u threads/block: %.1f ns per thread arrival\n", B, t * 1e9 / (8.0 * B * iters));
    }
    const double t = time_launch("simt_bench_shfl", 8, 256, 2000, 3);
    printf("  __shfl_xor_sync, 256 threads/block: %.1f ns per lane\n", t * 1e9 / (8.0 * 256 * 2000));
}

}  // namespace

int main(int argc, char** argv) {
    const bool quick = argc > 1 && !strcmp(argv[1], "--quick");
    if (argc > 1 && !strcmp(argv[1], "--bench")) {
        bench();
        return 0;
    }
    std::vector<SimtConfig> configs{{SIMT_SCHED_LOCKSTEP, 0, 0}};
    if (!quick)
        for (unsigned long long s : {1ull, 2ull}) {
            configs.push_back({SIMT_SCHED_RANDOM, s, 0});
            configs.push_back({SIMT_SCHED_WARP_AHEAD, s, 0});
        }
    for (const SimtConfig& cfg : configs) {
        printf("schedule %d seed %llu\n", cfg.schedule, cfg.seed);
        test_barrier(cfg, 3, 96, 5);
        if (!quick) test_barrier(cfg, 2, 1024, 3);
        test_index(cfg);
        test_reduce(cfg, 4, 256);
        test_shuffle(cfg);
        test_vote(cfg);
        test_atomics(cfg);
        for (int mode = 0; mode < 4; ++mode) test_mma(cfg, mode, quick ? 2 : 6);
        for (int mode = 0; mode < 6; ++mode) test_ldmatrix(cfg, mode, quick ? 2 : 4);
    }
    printf("errors\n");
    test_errors();
    test_reduce(configs[0], 4, 256);  // the runtime recovers from the faults above
    printf("concurrent launches\n");
    test_concurrent_launches();
    printf("%s (%d failures)\n", g_failures ? "FAILED" : "all self-tests passed", g_failures);
    return g_failures ? 1 : 0;
}
