/* C ABI of the SIMT simulator (src/device/sim/simt_runtime.cpp), called by the Rust Sim device
 * and by the C++ test drivers under tests/sim. Kernels are found by their extern "C" name, as
 * registered by SIMT_EXPORT_KERNEL in kernels/simt.h. */
#ifndef SIMT_ABI_H
#define SIMT_ABI_H

#ifdef __cplusplus
extern "C" {
#endif

/* schedule: the order in which a block's threads run between switch points. */
enum {
    SIMT_SCHED_LOCKSTEP = 0,   /* round robin in thread order: deterministic, GPU-like */
    SIMT_SCHED_RANDOM = 1,     /* a seeded random ready thread at every switch point */
    SIMT_SCHED_WARP_AHEAD = 2  /* warps serialised in a seeded order (redrawn at each barrier):
                                  one warp runs as far as it can before the others */
};

typedef struct SimtConfig {
    int schedule;
    unsigned long long seed;
    int worker_threads; /* 0 = default: env SIMT_THREADS, else hardware concurrency */
} SimtConfig;

/* Per launch. mma, ldmatrix and shuffles count warp-level instructions, barriers count
 * block-wide __syncthreads* completions, bytes count simt::ld_global/st_global/__ldg. */
typedef struct SimtStats {
    unsigned long long bytes_read, bytes_written, mma, ldmatrix, barriers, shuffles, blocks, threads;
} SimtStats;

/* Runs a kernel to completion. Returns 0 on success; otherwise writes a NUL-terminated message
 * naming the kernel and the fault into err and returns nonzero. Thread-safe (launches are
 * serialised). cfg may be NULL (lockstep, seed 0); stats may be NULL. */
int simt_launch(const char* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                unsigned by, unsigned bz, unsigned long long dyn_smem_bytes, const void* params,
                unsigned long long params_size, const SimtConfig* cfg, SimtStats* stats,
                char* err, unsigned long long err_len);

/* The registered kernels, in registration order. */
int simt_kernel_count(void);
const char* simt_kernel_name(int i);
unsigned long long simt_kernel_params_size(int i);

#ifdef __cplusplus
}
#endif
#endif
