//! What the build script made of `kernels/*.cu`: PTX (or the sources, for NVRTC at first use),
//! and the ptxas resource report per kernel and architecture.
//!
//! `build/main.rs` writes `$OUT_DIR/kernels_build.rs`, included below; it defines
//! [`BUILD_PATH`], [`BUILD_DETAIL`], [`MODULES`], [`HEADERS`], [`RESOURCES`] and [`NVRTC_OPTIONS`].

/// One `kernels/*.cu` file.
#[derive(Debug, Clone, Copy)]
pub struct KernelModule {
    /// File name, e.g. `"gemm.cu"`.
    pub file: &'static str,
    /// PTX for `compute_80`, when the build had a CUDA compiler.
    pub ptx: Option<&'static str>,
    /// The CUDA source, for NVRTC compilation on the user's machine when `ptx` is `None`.
    pub source: &'static str,
    /// `extern "C" __global__` entry points defined in the file.
    pub kernels: &'static [&'static str],
}

/// ptxas' report for one kernel on one architecture (`ptxas -v`).
#[derive(Debug, Clone, Copy)]
pub struct KernelResources {
    pub kernel: &'static str,
    /// `"sm_80"` or `"sm_90"`.
    pub arch: &'static str,
    pub registers: u32,
    /// Static shared memory in bytes.
    pub shared_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    /// Stack frame in bytes.
    pub stack_bytes: u32,
}

include!(concat!(env!("OUT_DIR"), "/kernels_build.rs"));

/// The module that defines `kernel`, if any.
pub fn module_of(kernel: &str) -> Option<&'static KernelModule> {
    MODULES.iter().find(|m| m.kernels.contains(&kernel))
}
