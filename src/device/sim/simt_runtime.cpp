// SIMT simulator runtime: runs kernels compiled as host C++ against kernels/simt.h.
//
// Model (shared/SIMULATOR.md): one fiber per CUDA thread; a persistent pool of worker OS threads
// each runs one block at a time; the block's fibers switch only at __syncthreads and warp
// collectives, in the order the schedule picks. A barrier completes when every thread of the
// block waits at the same call site; a warp collective completes when every lane of its mask has
// arrived, and the last lane to arrive evaluates it for the whole group. When nothing is ready
// and the block is not done, the block is divergent or deadlocked: that is reported as an error
// of the launch and the stuck fibers are reset, never waited for.
//
// Sanitizers are detected at run time through weak symbols, so this file may be built with or
// without -fsanitize and still behaves right in a sanitized program:
//  - ASan: fiber switches are announced; one worker only (static __shared__ is a plain static
//    under ASan); dynamic shared memory is an exact-size heap block per block.
//  - TSan: each fiber is a TSan fiber, switched with no_sync, so the scheduler takes part in no
//    happens-before edge; the runtime's own accesses are not instrumented (SIMT_RT); barriers and
//    collectives publish happens-before through explicit release/acquire tokens.
//
// May be compiled on its own or #included into the translation unit that includes the kernels.

#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "../../../kernels/simt.h"
#include "simt_abi.h"

#if !defined(__x86_64__) || defined(SIMT_UCONTEXT)
#define SIMT_USE_UCONTEXT 1
#include <ucontext.h>
#endif

// Runtime code touches scheduler state shared by all fibers; keep it away from TSan.
#if defined(__SANITIZE_THREAD__)
#define SIMT_RT __attribute__((no_sanitize("thread")))
#else
#define SIMT_RT
#endif

extern "C" {
// Sanitizer fiber APIs; null unless the program is linked with the sanitizer runtime.
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size)
    __attribute__((weak));
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                     size_t* size_old) __attribute__((weak));
void __asan_unpoison_memory_region(void const volatile* addr, size_t size) __attribute__((weak));
void* __tsan_get_current_fiber(void) __attribute__((weak));
void* __tsan_create_fiber(unsigned flags) __attribute__((weak));
void __tsan_destroy_fiber(void* fiber) __attribute__((weak));
void __tsan_switch_to_fiber(void* fiber, unsigned flags) __attribute__((weak));
void __tsan_acquire(void* addr) __attribute__((weak));
void __tsan_release(void* addr) __attribute__((weak));
void __tsan_ignore_thread_begin(void) __attribute__((weak));
void __tsan_ignore_thread_end(void) __attribute__((weak));
}

namespace simt {
namespace detail {

__thread LaneState* g_lane = nullptr;

namespace {

bool asan_active() { return __sanitizer_start_switch_fiber != nullptr; }
bool tsan_active() { return __tsan_create_fiber != nullptr; }
SIMT_RT void tsan_release(void* token) {
    if (__tsan_release) __tsan_release(token);
}
SIMT_RT void tsan_acquire(void* token) {
    if (__tsan_acquire) __tsan_acquire(token);
}
constexpr unsigned kTsanNoSync = 1;  // __tsan_switch_to_fiber_no_sync

// ---- execution contexts -------------------------------------------------------------------

#if !SIMT_USE_UCONTEXT
// x86-64 SysV: save the callee-saved registers on the old stack, swap stack pointers, restore.
// A fresh context "returns" into simt_ctx_start, which calls r13(r12).
extern "C" void simt_ctx_switch(void** save_sp, void* new_sp);
extern "C" void simt_ctx_start();
asm(R"(
    .text
    .globl simt_ctx_switch
    .hidden simt_ctx_switch
    .type simt_ctx_switch,@function
simt_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size simt_ctx_switch,.-simt_ctx_switch
    .globl simt_ctx_start
    .hidden simt_ctx_start
    .type simt_ctx_start,@function
simt_ctx_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size simt_ctx_start,.-simt_ctx_start
)");
#endif

struct Context {
#if SIMT_USE_UCONTEXT
    ucontext_t uc;
#else
    void* sp = nullptr;
#endif
    char* stack_lo = nullptr;  // for the ASan switch annotations
    size_t stack_size = 0;
    void* tsan_fiber = nullptr;
    void* asan_fake_stack = nullptr;
};

// Points `c` at a fresh frame on its stack that will call fn(arg).
SIMT_RT void ctx_init(Context& c, void (*fn)(void*), void* arg) {
#if SIMT_USE_UCONTEXT
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = c.stack_lo;
    c.uc.uc_stack.ss_size = c.stack_size;
    c.uc.uc_link = nullptr;
    const uintptr_t a = reinterpret_cast<uintptr_t>(arg), f = reinterpret_cast<uintptr_t>(fn);
    makecontext(&c.uc, reinterpret_cast<void (*)()>(+[](unsigned f_hi, unsigned f_lo, unsigned a_hi, unsigned a_lo) {
                    auto fn2 = reinterpret_cast<void (*)(void*)>((uintptr_t(f_hi) << 32) | f_lo);
                    fn2(reinterpret_cast<void*>((uintptr_t(a_hi) << 32) | a_lo));
                }),
                4, unsigned(f >> 32), unsigned(f), unsigned(a >> 32), unsigned(a));
#else
    uintptr_t top = (reinterpret_cast<uintptr_t>(c.stack_lo) + c.stack_size) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top - 72);  // 6 registers + return address, 16-aligned
    sp[0] = sp[1] = nullptr;                            // r15, r14
    sp[2] = reinterpret_cast<void*>(fn);                // r13
    sp[3] = arg;                                        // r12
    sp[4] = sp[5] = nullptr;                            // rbx, rbp
    sp[6] = reinterpret_cast<void*>(&simt_ctx_start);
    c.sp = sp;
#endif
}

SIMT_RT void ctx_switch(Context& from, Context& to) {
    if (__sanitizer_start_switch_fiber)
        __sanitizer_start_switch_fiber(&from.asan_fake_stack, to.stack_lo, to.stack_size);
    if (to.tsan_fiber) __tsan_switch_to_fiber(to.tsan_fiber, kTsanNoSync);
#if SIMT_USE_UCONTEXT
    swapcontext(&from.uc, &to.uc);
#else
    simt_ctx_switch(&from.sp, to.sp);
#endif
    if (__sanitizer_finish_switch_fiber)
        __sanitizer_finish_switch_fiber(from.asan_fake_stack, nullptr, nullptr);
}

// ---- registry --------------------------------------------------------------------------

struct KernelInfo {
    const char* name;
    unsigned long long params_size;
    KernelEntry entry;
};
// Function-local: registrars run during static initialisation of other translation units.
std::vector<KernelInfo>& registry() {
    static std::vector<KernelInfo> r;
    return r;
}

// ---- per-block state ---------------------------------------------------------------------

enum State : unsigned char { kReady, kRunning, kAtBarrier, kAtCollective, kExited };

struct Worker;

struct Fiber : LaneState {
    Context ctx;
    Worker* w = nullptr;
    unsigned linear = 0, warp = 0;
    State state = kReady;
    bool in_kernel = false;  // has live kernel frames: must be reset if the block is abandoned
    const char* file = nullptr;  // where it waits
    int line = 0;
    int bar_op = 0, bar_pred = 0, bar_result = 0, bar_parity = 0;
    Collective coll{};
    uint32_t in[10] = {}, out[4] = {};
    unsigned coll_parity = 0;  // TSan: which of its two tokens a group led by this lane uses
    int tsan_ignores = 0;      // TSan: open TsanIgnoreScopes (they nest via fault())
};

// no_sanitize("thread") does not reach libc interceptors (memcpy, snprintf) nor lambdas, so the
// runtime entry points called from kernel code make TSan ignore their memory accesses (not
// their explicit release/acquire). The ignore state is per TSan fiber.
struct TsanIgnoreScope {
    Fiber* f;
    SIMT_RT explicit TsanIgnoreScope(Fiber* fiber) : f(fiber) {
        if (!__tsan_ignore_thread_begin) return;
        __tsan_ignore_thread_begin();
        f->tsan_ignores++;
    }
    SIMT_RT ~TsanIgnoreScope() {
        if (!__tsan_ignore_thread_end) return;
        __tsan_ignore_thread_end();
        f->tsan_ignores--;
    }
};

struct Launch {
    KernelInfo kernel;
    const void* params;
    dim3 grid, block;
    unsigned long long dyn_smem, nblocks;
    int schedule;
    unsigned long long seed;
    std::atomic<unsigned long long> next_block{0};
    std::atomic<bool> failed{false};
    char start_token = 0, done_token = 0;  // TSan: launcher -> all fibers -> launcher
};

SIMT_RT uint64_t splitmix64(uint64_t& s) {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

SIMT_RT const char* coll_name(const Collective& c) {
    static const char* const names[] = {"__syncwarp",    "__shfl_sync",     "__shfl_up_sync",
                                        "__shfl_down_sync", "__shfl_xor_sync", "__ballot_sync",
                                        "__any_sync",    "__all_sync",      "mma.m16n8k16.bf16",
                                        "mma.m16n8k16.f16", "ldmatrix"};
    return names[c.kind];
}

SIMT_RT const char* base_name(const char* path) {
    const char* s = strrchr(path, '/');
    return s ? s + 1 : path;
}

SIMT_RT bool same_site(const char* f1, int l1, const char* f2, int l2) {
    return l1 == l2 && (f1 == f2 || strcmp(f1, f2) == 0);
}

// One per worker OS thread; owns that thread's fibers (which never leave it).
struct Worker {
    Context sched;
    std::vector<Fiber*> fibers;
    size_t stack_size;
    Launch* launch = nullptr;
    // Current block.
    uint3 bid{};
    unsigned n = 0, nwarps = 0, nexited = 0, nbarrier = 0, nready = 0, cursor = 0;
    uint32_t ready[32] = {}, arrived[32] = {}, existing[32] = {};
    unsigned char rank[32] = {};  // warp_ahead: warps in priority order
    uint64_t rng = 0;
    int bar_parity = 0;
    unsigned char* dyn = nullptr;
    size_t dyn_cap = 0;
    // Outcome of this worker's part of the launch.
    bool failed = false;
    unsigned long long failed_block = 0;
    char err[768] = {};
    unsigned long long bytes[2] = {0, 0};
    SimtStats stats{};
    // TSan tokens (only their addresses matter).
    char bar_token[2] = {}, chain_token = 0, lane_token[1024][2] = {};

    SIMT_RT Worker() {
        const char* kb = getenv("SIMT_STACK_KB");
        stack_size = size_t(kb && atoi(kb) > 0 ? atoi(kb) : asan_active() ? 1024 : 256) << 10;
        pthread_attr_t attr;
        if (pthread_getattr_np(pthread_self(), &attr) == 0) {
            void* lo;
            pthread_attr_getstack(&attr, &lo, &sched.stack_size);
            sched.stack_lo = static_cast<char*>(lo);
            pthread_attr_destroy(&attr);
        }
        if (tsan_active()) sched.tsan_fiber = __tsan_get_current_fiber();
    }

    static void fiber_main(void* arg);

    SIMT_RT void ensure_fibers(unsigned count) {
        const size_t page = size_t(sysconf(_SC_PAGESIZE));
        while (fibers.size() < count) {
            Fiber* f = new Fiber;
            f->w = this;
            // Guard page below the stack: an overflow faults instead of corrupting a neighbour.
            char* mem = static_cast<char*>(mmap(nullptr, stack_size + page, PROT_READ | PROT_WRITE,
                                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
            if (mem == MAP_FAILED) {
                perror("simt: fiber stack mmap");
                abort();
            }
            mprotect(mem, page, PROT_NONE);
            f->ctx.stack_lo = mem + page;
            // Stagger the stack tops: at equal offsets mod 4 KiB every fiber's hot frames
            // would compete for the same cache sets.
            f->ctx.stack_size = stack_size - (fibers.size() * 64 * 7) % 4096;
            if (tsan_active()) f->ctx.tsan_fiber = __tsan_create_fiber(0);
            ctx_init(f->ctx, fiber_main, f);
            fibers.push_back(f);
        }
    }

    // A fiber abandoned mid-kernel gets a fresh frame; sanitizer state on its stack is cleared.
    SIMT_RT void reset_fiber(Fiber* f) {
        if (__asan_unpoison_memory_region) __asan_unpoison_memory_region(f->ctx.stack_lo, f->ctx.stack_size);
        if (f->ctx.tsan_fiber) {
            // Publish the dead fiber's history to the next blocks (as a normal exit would), then
            // replace it: its TSan shadow call stack still holds the abandoned frames. Its open
            // ignore scopes must end, or TSan reports the fiber's death.
            __tsan_switch_to_fiber(f->ctx.tsan_fiber, kTsanNoSync);
            for (; f->tsan_ignores > 0; f->tsan_ignores--) __tsan_ignore_thread_end();
            __tsan_release(&chain_token);
            __tsan_switch_to_fiber(sched.tsan_fiber, kTsanNoSync);
            __tsan_destroy_fiber(f->ctx.tsan_fiber);
            f->ctx.tsan_fiber = __tsan_create_fiber(0);
        }
        ctx_init(f->ctx, fiber_main, f);
        f->in_kernel = false;
    }

    // ---- running a launch ------------------------------------------------------------------

    SIMT_RT void run_launch(Launch& L) {
        launch = &L;
        failed = false;
        err[0] = 0;
        bytes[0] = bytes[1] = 0;
        stats = SimtStats{};
        const bool exact_dyn = asan_active();  // exact size, so ASan sees overflows
        if (!exact_dyn && dyn_cap < L.dyn_smem) {
            free(dyn);
            dyn_cap = L.dyn_smem;
            dyn = static_cast<unsigned char*>(malloc(dyn_cap));
        }
        for (;;) {
            const unsigned long long b = L.next_block.fetch_add(1, std::memory_order_relaxed);
            if (b >= L.nblocks || L.failed.load(std::memory_order_relaxed)) break;
            if (exact_dyn) dyn = static_cast<unsigned char*>(malloc(L.dyn_smem));
            const bool ok = run_block(b);
            if (exact_dyn) free(dyn), dyn = nullptr;
            if (!ok) {
                failed = true;
                failed_block = b;
                L.failed.store(true, std::memory_order_relaxed);
                break;
            }
        }
        stats.bytes_read = bytes[0];
        stats.bytes_written = bytes[1];
    }

    SIMT_RT bool run_block(unsigned long long b) {
        const Launch& L = *launch;
        bid = uint3{unsigned(b % L.grid.x), unsigned(b / L.grid.x % L.grid.y),
                    unsigned(b / L.grid.x / L.grid.y)};
        n = L.block.x * L.block.y * L.block.z;
        nwarps = (n + 31) / 32;
        ensure_fibers(n);
        // Shared memory contents are undefined on a GPU: make stale data look like NaNs.
        if (L.dyn_smem && !asan_active()) memset(dyn, 0xff, L.dyn_smem);
        for (unsigned i = 0; i < n; ++i) {
            Fiber* f = fibers[i];
            f->tid = uint3{i % L.block.x, i / L.block.x % L.block.y, i / L.block.x / L.block.y};
            f->bid = bid;
            f->bdim = L.block;
            f->gdim = L.grid;
            f->lane = i % 32;
            f->dyn_smem = dyn;
            f->bytes = bytes;
            f->linear = i;
            f->warp = i / 32;
            f->state = kReady;
        }
        for (unsigned w = 0; w < nwarps; ++w) {
            existing[w] = (n - 32 * w >= 32) ? 0xffffffffu : (1u << (n - 32 * w)) - 1;
            ready[w] = existing[w];
            arrived[w] = 0;
        }
        nready = n;
        nexited = nbarrier = 0;
        cursor = 0;
        rng = L.seed ^ (b * 0xD1B54A32D192ED03ull);
        splitmix64(rng);
        if (L.schedule == SIMT_SCHED_WARP_AHEAD) shuffle_ranks();
        stats.blocks++;
        stats.threads += n;
        // The worker's own setup (e.g. the shared-memory buffer) happens before the block.
        tsan_release(&chain_token);

        bool ok = true;
        for (;;) {
            // Fibers hand over to each other directly (see yield); control comes back here
            // when nothing is ready or the block failed.
            if (nready && !failed) ctx_switch(sched, take_next()->ctx);
            if (failed) { ok = false; break; }
            if (nexited == n) break;
            if (!release_barrier()) { ok = false; break; }
        }
        g_lane = nullptr;
        if (!ok)
            for (unsigned i = 0; i < n; ++i)
                if (fibers[i]->in_kernel) reset_fiber(fibers[i]);
        return ok;
    }

    SIMT_RT void shuffle_ranks() {
        for (unsigned w = 0; w < nwarps; ++w) rank[w] = static_cast<unsigned char>(w);
        for (unsigned w = nwarps; w > 1; --w) std::swap(rank[w - 1], rank[splitmix64(rng) % w]);
    }

    // Removes the next fiber to run from the ready set and makes it current.
    SIMT_RT Fiber* take_next() {
        const unsigned i = pick();
        ready[i >> 5] &= ~(1u << (i & 31));
        --nready;
        Fiber* f = fibers[i];
        f->state = kRunning;
        g_lane = f;
        return f;
    }

    // The next fiber to run, by schedule. `ready` holds one bit per thread.
    SIMT_RT unsigned pick() {
        switch (launch->schedule) {
            case SIMT_SCHED_RANDOM: {
                unsigned r = unsigned(splitmix64(rng) % nready);
                for (unsigned w = 0;; ++w) {
                    const unsigned c = unsigned(__builtin_popcount(ready[w]));
                    if (r >= c) { r -= c; continue; }
                    uint32_t m = ready[w];
                    while (r--) m &= m - 1;
                    return 32 * w + unsigned(__builtin_ctz(m));
                }
            }
            case SIMT_SCHED_WARP_AHEAD:
                for (unsigned k = 0;; ++k)
                    if (ready[rank[k]]) return 32 * rank[k] + unsigned(__builtin_ctz(ready[rank[k]]));
            default: {  // lockstep: round robin over thread ids, starting at the cursor
                unsigned w = cursor >> 5;
                uint32_t m = ready[w] & (~0u << (cursor & 31));
                while (!m) {
                    w = (w + 1 == nwarps) ? 0 : w + 1;
                    m = ready[w];
                }
                const unsigned i = 32 * w + unsigned(__builtin_ctz(m));
                cursor = (i + 1 == n) ? 0 : i + 1;
                return i;
            }
        }
    }

    // ---- errors --------------------------------------------------------------------------

    SIMT_RT const char* thread_name(const Fiber* f, char* buf, size_t len) const {
        if (launch->block.y == 1 && launch->block.z == 1) snprintf(buf, len, "thread %u", f->linear);
        else snprintf(buf, len, "thread (%u,%u,%u)", f->tid.x, f->tid.y, f->tid.z);
        return buf;
    }

    // Records the block's error (the first one) as "block (x,y,z) <message>".
    SIMT_RT void set_error(const char* fmt, ...) __attribute__((format(printf, 2, 3))) {
        if (failed) return;
        failed = true;
        int k = snprintf(err, sizeof err, "block (%u,%u,%u) ", bid.x, bid.y, bid.z);
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err + k, sizeof err - size_t(k), fmt, ap);
        va_end(ap);
    }

    // What a thread is doing, for error messages.
    SIMT_RT const char* describe(const Fiber* f, char* buf, size_t len) const {
        switch (f->state) {
            case kExited: snprintf(buf, len, "exited"); break;
            case kAtBarrier:
                snprintf(buf, len, "waits at __syncthreads at %s:%d", base_name(f->file), f->line);
                break;
            case kAtCollective:
                snprintf(buf, len, "waits at %s (mask 0x%08x) at %s:%d", coll_name(f->coll),
                         f->coll.mask, base_name(f->file), f->line);
                break;
            default: snprintf(buf, len, "is running"); break;
        }
        return buf;
    }

    // Nothing is ready and the block is not done: release the barrier all live threads wait at,
    // or report why that is impossible.
    SIMT_RT bool release_barrier() {
        char t1[48], t2[48], d[160];
        if (nbarrier + nexited != n) {  // someone waits at a warp collective that cannot complete
            for (unsigned i = 0; i < n; ++i) {
                const Fiber* f = fibers[i];
                if (f->state != kAtCollective) continue;
                const uint32_t eff = f->coll.mask & existing[f->warp];
                for (unsigned j = 0; j < 32; ++j) {
                    const Fiber* o = (eff >> j & 1) ? fibers[32 * f->warp + j] : nullptr;
                    if (!o || (o->state == kAtCollective && o->coll.kind == f->coll.kind &&
                               o->coll.mask == f->coll.mask))
                        continue;
                    set_error("%s waits at %s (mask 0x%08x) at %s:%d but lane %u (%s) %s",
                              thread_name(f, t1, sizeof t1), coll_name(f->coll), f->coll.mask,
                              base_name(f->file), f->line, j, thread_name(o, t2, sizeof t2),
                              describe(o, d, sizeof d));
                    return false;
                }
            }
            set_error("deadlock");  // not reachable: a complete group would have been evaluated
            return false;
        }
        const Fiber* first = nullptr;
        for (unsigned i = 0; i < n && !first; ++i)
            if (fibers[i]->state == kAtBarrier) first = fibers[i];
        for (unsigned i = 0; i < n; ++i) {
            const Fiber* f = fibers[i];
            if (f->state == kExited) {
                set_error("%s exited while %s waits at __syncthreads at %s:%d",
                          thread_name(f, t1, sizeof t1), thread_name(first, t2, sizeof t2),
                          base_name(first->file), first->line);
                return false;
            }
            if (!same_site(f->file, f->line, first->file, first->line)) {
                set_error("%s reached __syncthreads at %s:%d while %s waits at %s:%d",
                          thread_name(f, t1, sizeof t1), base_name(f->file), f->line,
                          thread_name(first, t2, sizeof t2), base_name(first->file), first->line);
                return false;
            }
        }
        int count = 0;
        for (unsigned i = 0; i < n; ++i) count += fibers[i]->bar_pred != 0;
        const int result = first->bar_op == kBarCount ? count
                           : first->bar_op == kBarAnd ? count == int(n)
                           : first->bar_op == kBarOr  ? count != 0
                                                      : 0;
        for (unsigned i = 0; i < n; ++i) {
            fibers[i]->state = kReady;
            fibers[i]->bar_result = result;
        }
        for (unsigned w = 0; w < nwarps; ++w) ready[w] = existing[w];
        nready = n;
        nbarrier = 0;
        bar_parity ^= 1;
        stats.barriers++;
        if (launch->schedule == SIMT_SCHED_WARP_AHEAD) shuffle_ranks();
        return true;
    }

    // ---- fiber side ------------------------------------------------------------------------

    // Switches straight to the next ready fiber (one context switch per switch point), or back
    // to the scheduler when there is none.
    SIMT_RT void yield(Fiber* me) {
        if (failed || !nready) return ctx_switch(me->ctx, sched);
        Fiber* next = take_next();
        if (next != me) ctx_switch(me->ctx, next->ctx);
    }

    [[noreturn]] SIMT_RT void abandon(Fiber* me) {
        ctx_switch(me->ctx, sched);
        __builtin_unreachable();  // the scheduler resets this fiber instead of resuming it
    }

    // The last lane of group `eff` in warp `wi` has arrived: check and evaluate the group.
    SIMT_RT void complete(unsigned wi, uint32_t eff, Fiber* me) {
        Fiber* const* lanes = &fibers[32 * wi];
        for (uint32_t m = eff; m; m &= m - 1) {
            const Fiber* o = lanes[__builtin_ctz(m)];
            if (o->coll.kind != me->coll.kind || o->coll.mask != me->coll.mask ||
                (me->coll.kind == kLdmatrix &&
                 (o->coll.arg != me->coll.arg || o->coll.width != me->coll.width))) {
                char t1[48], t2[48];
                set_error("%s reached %s (mask 0x%08x) at %s:%d while %s waits at %s (mask 0x%08x) at %s:%d",
                          thread_name(me, t1, sizeof t1), coll_name(me->coll), me->coll.mask,
                          base_name(me->file), me->line, thread_name(o, t2, sizeof t2),
                          coll_name(o->coll), o->coll.mask, base_name(o->file), o->line);
                abandon(me);
            }
        }
        evaluate(me->coll, lanes, eff);
        for (uint32_t m = eff; m; m &= m - 1) lanes[__builtin_ctz(m)]->state = kReady;
        arrived[wi] &= ~eff;
        ready[wi] |= eff;
        nready += unsigned(__builtin_popcount(eff));
    }

    SIMT_RT void evaluate(const Collective& c, Fiber* const* lanes, uint32_t eff);
};

// Every fiber runs this loop: one kernel execution per block it is scheduled for.
SIMT_RT void Worker::fiber_main(void* arg) {
    Fiber* f = static_cast<Fiber*>(arg);
    if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
    for (;;) {
        Worker* w = f->w;
        Launch* L = w->launch;
        tsan_acquire(&L->start_token);
        tsan_acquire(&w->chain_token);
        f->in_kernel = true;
        L->kernel.entry(L->params);
        f->in_kernel = false;
        TsanIgnoreScope ignore(f);  // scheduling code runs on this fiber until the next block
        tsan_release(&w->chain_token);
        tsan_release(&L->done_token);
        f->state = kExited;
        w->nexited++;
        w->yield(f);
    }
}

// ---- warp collective semantics -------------------------------------------------------------

SIMT_RT inline float half_bits_to_f32(uint32_t h, bool bf16) {
    return bf16 ? bf16_bits_to_f32(uint16_t(h)) : f16_bits_to_f32(uint16_t(h));
}

// mma.m16n8k16.row.col, f32 accumulate, fragment layouts of PTX ISA 9.7.15.5.8 (g = lane/4,
// t = lane%4; the lower-numbered element sits in the low half of a register).
SIMT_RT void eval_mma(Fiber* const* lanes, bool bf16) {
    float A[16][16], B[16][8], C[16][8];
    for (unsigned l = 0; l < 32; ++l) {
        const unsigned g = l >> 2, t = l & 3;
        const uint32_t* in = lanes[l]->in;
        for (unsigned i = 0; i < 8; ++i)  // a_i: row g (+8 for i%4 >= 2), col 2t + i%2 (+8 for i >= 4)
            A[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >> 2)] =
                half_bits_to_f32(in[i >> 1] >> (16 * (i & 1)), bf16);
        for (unsigned i = 0; i < 4; ++i)  // b_i: row (k) 2t + i%2 (+8 for i >= 2), col (n) g
            B[2 * t + (i & 1) + 8 * (i >> 1)][g] = half_bits_to_f32(in[4 + (i >> 1)] >> (16 * (i & 1)), bf16);
        for (unsigned i = 0; i < 4; ++i)  // c_i: row g (+8 for i >= 2), col 2t + i%2
            memcpy(&C[g + 8 * (i >> 1)][2 * t + (i & 1)], &in[6 + i], 4);
    }
    // D = C + A·B, each element summed in k order (the column loop vectorises). Products of
    // 16-bit floats are exact in fp32, so mul+add equals fma here.
    for (unsigned r = 0; r < 16; ++r)
        for (unsigned k = 0; k < 16; ++k)
            for (unsigned col = 0; col < 8; ++col) C[r][col] += A[r][k] * B[k][col];
    for (unsigned l = 0; l < 32; ++l)
        for (unsigned i = 0; i < 4; ++i)
            memcpy(&lanes[l]->out[i], &C[(l >> 2) + 8 * (i >> 1)][2 * (l & 3) + (i & 1)], 4);
}

// ldmatrix.m8n8.xN(.trans).b16: lanes 8j..8j+7 supplied the rows of matrix j; register j of
// lane l receives M_j[l/4][2(l%4)..+1] (transposed: M_j[2(l%4)..+1][l/4]).
SIMT_RT void eval_ldmatrix(Fiber* const* lanes, unsigned nmat, bool trans) {
    auto elem = [&](unsigned j, unsigned row, unsigned col) -> uint32_t {
        return (lanes[8 * j + row]->in[col >> 1] >> (16 * (col & 1))) & 0xffffu;
    };
    for (unsigned l = 0; l < 32; ++l)
        for (unsigned j = 0; j < nmat; ++j) {
            const unsigned a = l >> 2, b = 2 * (l & 3);
            lanes[l]->out[j] = trans ? elem(j, b, a) | elem(j, b + 1, a) << 16
                                     : elem(j, a, b) | elem(j, a, b + 1) << 16;
        }
}

SIMT_RT void Worker::evaluate(const Collective& c, Fiber* const* lanes, uint32_t eff) {
    switch (c.kind) {
        case kSyncwarp: return;
        case kBallot:
        case kAny:
        case kAll: {
            uint32_t votes = 0;
            for (uint32_t m = eff; m; m &= m - 1)
                votes |= (lanes[__builtin_ctz(m)]->in[0] & 1u) << __builtin_ctz(m);
            const uint32_t r = c.kind == kBallot ? votes : c.kind == kAny ? votes != 0 : votes == eff;
            for (uint32_t m = eff; m; m &= m - 1) lanes[__builtin_ctz(m)]->out[0] = r;
            return;
        }
        case kMmaBf16:
        case kMmaF16:
            eval_mma(lanes, c.kind == kMmaBf16);
            stats.mma++;
            return;
        case kLdmatrix:
            eval_ldmatrix(lanes, unsigned(c.arg), c.width != 0);
            stats.ldmatrix++;
            return;
        default: break;
    }
    // Shuffles (CUDA semantics with sub-warp `width` segments). Reading a lane outside the mask
    // is undefined on a GPU: it yields all-ones bits (a NaN), so a kernel relying on it shows.
    for (uint32_t m = eff; m; m &= m - 1) {
        const int i = __builtin_ctz(m);
        Fiber* f = lanes[i];
        const int width = f->coll.width, arg = f->coll.arg, base = i & ~(width - 1);
        int src;
        switch (c.kind) {
            case kShflIdx: src = base + (arg & (width - 1)); break;
            case kShflUp: src = (unsigned(arg) > unsigned(i - base)) ? i : i - arg; break;
            case kShflDown: src = (unsigned(arg) >= unsigned(base + width - i)) ? i : i + arg; break;
            default: src = i ^ (arg & 31); if (src >= base + width) src = i; break;  // xor
        }
        for (int k = 0; k < c.words; ++k) f->out[k] = (eff >> src & 1) ? lanes[src]->in[k] : 0xffffffffu;
    }
    stats.shuffles++;
}

// ---- worker pool ---------------------------------------------------------------------------

struct Pool {
    std::mutex launch_mu;  // one launch at a time, process-wide
    std::mutex mu;
    std::condition_variable work_cv, done_cv;
    std::vector<Worker*> workers;  // index = worker thread; filled by the threads themselves
    Launch* job = nullptr;
    uint64_t generation = 0;
    unsigned wanted = 0, finished = 0, started = 0;

    void thread_main(unsigned idx) {
        // A worker thread only schedules: TSan must never see its accesses (pitfall 5).
        if (__tsan_ignore_thread_begin) __tsan_ignore_thread_begin();
        Worker* w = new Worker;  // lives as long as the process; its fibers belong to this thread
        uint64_t seen = 0;
        std::unique_lock<std::mutex> lk(mu);
        workers[idx] = w;
        ++started;
        done_cv.notify_all();
        for (;;) {
            work_cv.wait(lk, [&] { return generation != seen; });
            seen = generation;
            if (idx >= wanted) continue;
            Launch* L = job;
            lk.unlock();
            w->run_launch(*L);
            lk.lock();
            if (++finished == wanted) done_cv.notify_all();
        }
    }

    // Called with launch_mu held.
    void run(Launch& L, unsigned nworkers) {
        std::unique_lock<std::mutex> lk(mu);
        while (workers.size() < nworkers) {
            workers.push_back(nullptr);
            std::thread(&Pool::thread_main, this, unsigned(workers.size() - 1)).detach();
        }
        done_cv.wait(lk, [&] { return started == workers.size(); });
        job = &L;
        wanted = nworkers;
        finished = 0;
        ++generation;
        work_cv.notify_all();
        done_cv.wait(lk, [&] { return finished == wanted; });
        job = nullptr;
    }
};

Pool& pool() {
    static Pool* p = new Pool;  // never destroyed: detached workers may outlive static teardown
    return *p;
}

unsigned default_workers() {
    const char* s = getenv("SIMT_THREADS");
    if (s && atoi(s) > 0) return unsigned(atoi(s));
    return std::max(1u, std::thread::hardware_concurrency());
}

}  // namespace

// ---- entry points called from kernel code (fiber side) -------------------------------------

SIMT_RT int block_barrier(int op, int pred, const char* file, int line) {
    Fiber* me = static_cast<Fiber*>(g_lane);
    TsanIgnoreScope ignore(me);
    Worker* w = me->w;
    me->state = kAtBarrier;
    me->file = file;
    me->line = line;
    me->bar_op = op;
    me->bar_pred = pred;
    me->bar_parity = w->bar_parity;  // tokens alternate so a fast thread cannot reuse one early
    tsan_release(&w->bar_token[me->bar_parity]);
    w->nbarrier++;
    w->yield(me);
    tsan_acquire(&w->bar_token[me->bar_parity]);
    return me->bar_result;
}

SIMT_RT void warp_collective(const Collective& c, const uint32_t* in, uint32_t* out) {
    Fiber* me = static_cast<Fiber*>(g_lane);
    TsanIgnoreScope ignore(me);
    Worker* w = me->w;
    const unsigned wi = me->warp;
    const uint32_t eff = c.mask & w->existing[wi];
    if (!(eff >> me->lane & 1))
        fault(c.file, c.line, "%s with mask 0x%08x that excludes the calling lane %u",
              coll_name(c), c.mask, me->lane);
    if (c.kind >= kMmaBf16 && w->existing[wi] != 0xffffffffu)
        fault(c.file, c.line, "%s needs all 32 lanes but warp %u has only %d threads",
              coll_name(c), wi, __builtin_popcount(w->existing[wi]));
    if (c.kind >= kShflIdx && c.kind <= kShflXor && (c.width < 1 || c.width > 32 || (c.width & (c.width - 1))))
        fault(c.file, c.line, "%s with width %d (must be a power of two <= 32)", coll_name(c), c.width);
    me->coll = c;
    me->file = c.file;
    me->line = c.line;
    if (c.words) memcpy(me->in, in, sizeof(uint32_t) * unsigned(c.words));
    me->state = kAtCollective;
    w->arrived[wi] |= 1u << me->lane;
    // Everything the group's lanes did before the collective happens before what follows it.
    // The group's token belongs to its lowest lane and alternates with that lane's collectives
    // (a lane is in one pending group at a time), so consecutive groups never share a token.
    const Fiber* leader = w->fibers[32 * wi + unsigned(__builtin_ctz(eff))];
    char* token = &w->lane_token[leader->linear][leader->coll_parity];
    tsan_release(token);
    if ((w->arrived[wi] & eff) == eff) w->complete(wi, eff, me);
    w->yield(me);
    tsan_acquire(token);
    me->coll_parity ^= 1;
    const int out_words = c.kind == kMmaBf16 || c.kind == kMmaF16 ? 4
                          : c.kind == kLdmatrix                 ? c.arg
                          : c.kind >= kBallot                   ? 1
                                                                : c.words;  // shuffles; syncwarp: 0
    if (out_words) memcpy(out, me->out, sizeof(uint32_t) * unsigned(out_words));
}

SIMT_RT void fault(const char* file, int line, const char* fmt, ...) {
    Fiber* me = static_cast<Fiber*>(g_lane);
    TsanIgnoreScope ignore(me);  // ended by reset_fiber: this fiber is abandoned
    char msg[512], t[48];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    me->w->set_error("%s: %s at %s:%d", me->w->thread_name(me, t, sizeof t), msg, base_name(file), line);
    me->w->abandon(me);
}

KernelRegistrar::KernelRegistrar(const char* name, unsigned long long params_size, KernelEntry entry) {
    // The same .cu may be compiled into two translation units: register the name once.
    for (const KernelInfo& k : registry())
        if (strcmp(k.name, name) == 0) return;
    registry().push_back(KernelInfo{name, params_size, entry});
}

}  // namespace detail
}  // namespace simt

// ---- C ABI ----------------------------------------------------------------------------------

using namespace simt::detail;

extern "C" int simt_kernel_count(void) { return int(registry().size()); }
extern "C" const char* simt_kernel_name(int i) {
    return i >= 0 && i < simt_kernel_count() ? registry()[size_t(i)].name : nullptr;
}
extern "C" unsigned long long simt_kernel_params_size(int i) {
    return i >= 0 && i < simt_kernel_count() ? registry()[size_t(i)].params_size : 0;
}

namespace {
// Writes "kernel: message" into err; returns 1.
__attribute__((format(printf, 4, 5))) int launch_error(char* err, unsigned long long err_len,
                                                       const char* kernel, const char* fmt, ...) {
    if (!err || !err_len) return 1;
    int k = snprintf(err, size_t(err_len), "%s: ", kernel ? kernel : "(null)");
    if (k >= 0 && (unsigned long long)k < err_len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err + k, size_t(err_len) - size_t(k), fmt, ap);
        va_end(ap);
    }
    return 1;
}
}  // namespace

extern "C" int simt_launch(const char* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                           unsigned by, unsigned bz, unsigned long long dyn_smem_bytes,
                           const void* params, unsigned long long params_size,
                           const SimtConfig* cfg, SimtStats* stats, char* err,
                           unsigned long long err_len) {
    constexpr unsigned long long kMaxSmem = 232448;  // 227 KiB: sm_80/sm_90 opt-in maximum
    if (err && err_len) err[0] = 0;
    if (stats) *stats = SimtStats{};
    const KernelInfo* info = nullptr;
    for (const KernelInfo& k : registry())
        if (kernel && strcmp(k.name, kernel) == 0) info = &k;
    if (!info) return launch_error(err, err_len, kernel, "unknown kernel");
    if (params_size != info->params_size)
        return launch_error(err, err_len, kernel, "params size %llu != %llu", params_size, info->params_size);
    if (!params && params_size) return launch_error(err, err_len, kernel, "params pointer is null");
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (!bx || !by || !bz || !gx || !gy || !gz)
        return launch_error(err, err_len, kernel, "grid (%u,%u,%u) or block (%u,%u,%u) has a zero dimension",
                            gx, gy, gz, bx, by, bz);
    if (threads > 1024)
        return launch_error(err, err_len, kernel, "block of %llu threads exceeds 1024", threads);
    if (bx > 1024 || by > 1024 || bz > 64)
        return launch_error(err, err_len, kernel, "block (%u,%u,%u) exceeds (1024,1024,64)", bx, by, bz);
    if (gx > 0x7fffffffu || gy > 65535 || gz > 65535)
        return launch_error(err, err_len, kernel, "grid (%u,%u,%u) exceeds (2147483647,65535,65535)", gx, gy, gz);
    if (dyn_smem_bytes > kMaxSmem)
        return launch_error(err, err_len, kernel, "dynamic shared memory %llu B exceeds %llu",
                            dyn_smem_bytes, kMaxSmem);
    const SimtConfig c = cfg ? *cfg : SimtConfig{SIMT_SCHED_LOCKSTEP, 0, 0};
    if (c.schedule < SIMT_SCHED_LOCKSTEP || c.schedule > SIMT_SCHED_WARP_AHEAD)
        return launch_error(err, err_len, kernel, "unknown schedule %d", c.schedule);

    // The kernel reads its parameters from this aligned copy.
    alignas(16) unsigned char param_buf[4096];
    std::vector<unsigned char> big;
    unsigned char* pbuf = param_buf;
    if (params_size > sizeof param_buf) {
        big.resize(params_size + 16);
        pbuf = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(big.data()) + 15) & ~uintptr_t(15));
    }
    if (params_size) memcpy(pbuf, params, params_size);

    Launch L;
    L.kernel = *info;
    L.params = pbuf;
    L.grid = dim3(gx, gy, gz);
    L.block = dim3(bx, by, bz);
    L.dyn_smem = dyn_smem_bytes;
    L.nblocks = (unsigned long long)gx * gy * gz;
    L.schedule = c.schedule;
    L.seed = c.seed;
    // Under ASan static __shared__ is one process-wide variable: one block at a time.
    unsigned nworkers = asan_active() ? 1 : c.worker_threads > 0 ? unsigned(c.worker_threads) : default_workers();
    nworkers = unsigned(std::min<unsigned long long>(std::min(nworkers, 256u), L.nblocks));

    Pool& P = pool();
    std::lock_guard<std::mutex> guard(P.launch_mu);
    tsan_release(&L.start_token);  // the caller's writes (inputs) happen before the kernel
    P.run(L, nworkers);
    tsan_acquire(&L.done_token);   // the kernel's writes happen before the caller's reads

    const Worker* failed = nullptr;
    SimtStats total{};
    for (unsigned i = 0; i < nworkers; ++i) {
        const Worker* w = P.workers[i];
        const SimtStats& s = w->stats;
        total.bytes_read += s.bytes_read;
        total.bytes_written += s.bytes_written;
        total.mma += s.mma;
        total.ldmatrix += s.ldmatrix;
        total.barriers += s.barriers;
        total.shuffles += s.shuffles;
        total.blocks += s.blocks;
        total.threads += s.threads;
        if (w->failed && (!failed || w->failed_block < failed->failed_block)) failed = w;
    }
    if (stats) *stats = total;
    if (failed) return launch_error(err, err_len, kernel, "%s", failed->err);
    return 0;
}
