//! A real GPU through cudarc. The driver library is loaded at run time, so the crate starts on
//! machines without one; [`Cuda::new`] probes for it before creating a context and reports a
//! missing driver or device as an error, never a panic.
//!
//! Kernels come from the PTX the build embedded (`kernels::MODULES`), or, when the build had no
//! CUDA compiler, from the embedded sources compiled here with NVRTC at first use.

use super::kernels::{self, KernelModule};
use super::{Device, DeviceKind, DevicePtr, LaunchConfig, ParamBytes};
use crate::{Error, Result};
use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaModule, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One CUDA device with its primary context and default stream.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    /// Whether memory comes from the device's stream-ordered pool (see [`retain_freed_memory`]).
    pooled: bool,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda").field("name", &self.name).finish()
    }
}

fn driver_err(what: &str) -> impl FnOnce(result::DriverError) -> Error + '_ {
    move |e| Error::Device(format!("{what}: {e:?}"))
}

/// Why no CUDA device can be used here, or `None` when one can.
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: only tries to dlopen the driver library by its usual names.
    if !unsafe { sys::is_culib_present() } {
        return Some("no CUDA driver library (libcuda.so) found".into());
    }
    if let Err(e) = result::init() {
        return Some(format!("CUDA driver failed to initialise: {e:?}"));
    }
    match result::device::get_count() {
        Ok(0) => Some("the CUDA driver reports no device".into()),
        Ok(_) => None,
        Err(e) => Some(format!("cuDeviceGetCount failed: {e:?}")),
    }
}

impl Cuda {
    /// Opens device `ordinal`.
    pub fn new(ordinal: usize) -> Result<Self> {
        if let Some(why) = unavailable_reason() {
            return Err(Error::Device(why));
        }
        let count = result::device::get_count().map_err(driver_err("cuDeviceGetCount"))?;
        if ordinal >= count as usize {
            return Err(Error::Device(format!("device {ordinal} requested, {count} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_err("creating a CUDA context"))?;
        let (major, minor) = (
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                .map_err(driver_err("compute capability"))?,
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
                .map_err(driver_err("compute capability"))?,
        );
        if major < 8 {
            return Err(Error::Device(format!(
                "device {ordinal} is sm_{major}{minor}; lorafuse needs sm_80 or newer (bf16 tensor cores)"
            )));
        }
        let name = format!("{} (sm_{major}{minor})", ctx.name().map_err(driver_err("device name"))?);
        let stream = ctx.default_stream();
        let pools = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED);
        // SAFETY: the context's own device.
        let pooled = pools.is_ok_and(|v| v != 0) && unsafe { retain_freed_memory(ctx.cu_device()) }.is_ok();
        Ok(Cuda { ctx, stream, name, pooled, modules: Mutex::default(), functions: Mutex::default() })
    }

    fn module(&self, m: &'static KernelModule) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().map_err(|_| Error::Device("module cache poisoned".into()))?;
        if let Some(module) = modules.get(m.file) {
            return Ok(module.clone());
        }
        let ptx = match m.ptx {
            Some(ptx) => cudarc::nvrtc::Ptx::from_src(ptx),
            None => compile_at_first_use(m)?,
        };
        let module = self.ctx.load_module(ptx).map_err(driver_err(m.file))?;
        modules.insert(m.file, module.clone());
        Ok(module)
    }

    fn function(&self, kernel: &str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().map_err(|_| Error::Device("function cache poisoned".into()))?.get(kernel)
        {
            return Ok(f.clone());
        }
        let m = kernels::module_of(kernel).ok_or_else(|| Error::kernel(kernel, "no such kernel in kernels/*.cu"))?;
        let f = self.module(m)?.load_function(kernel).map_err(|e| Error::kernel(kernel, format!("{e:?}")))?;
        self.functions
            .lock()
            .map_err(|_| Error::Device("function cache poisoned".into()))?
            .insert(kernel.to_string(), f.clone());
        Ok(f)
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(driver_err("binding the CUDA context"))
    }
}

/// Makes the device's default memory pool keep freed blocks for reuse (release threshold =
/// ∞), as PyTorch's caching allocator does. Every op allocates its outputs and workspace; with
/// plain `cuMemAlloc`/`cuMemFree`, each free synchronizes the device and each allocation costs
/// tens of µs, against a 4096³ GEMM's ~0.2 ms on an H100. The pool's memory goes back to the
/// driver when the process exits.
///
/// # Safety
/// `dev` must be a valid device handle.
unsafe fn retain_freed_memory(dev: sys::CUdevice) -> std::result::Result<(), result::DriverError> {
    let pool = result::device::get_default_mem_pool(dev)?;
    let mut threshold = u64::MAX;
    result::mem_pool::set_attribute(
        pool,
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
        (&mut threshold as *mut u64).cast(),
    )
}

/// NVRTC on the user's machine, for builds that had no CUDA compiler: the embedded headers go to a
/// temporary include directory.
fn compile_at_first_use(m: &KernelModule) -> Result<cudarc::nvrtc::Ptx> {
    // SAFETY: only tries to dlopen libnvrtc by its usual names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::Device(format!(
            "{}: this build embedded CUDA sources (no compiler at build time) and libnvrtc is not installed",
            m.file
        )));
    }
    let dir = std::env::temp_dir().join(format!("lorafuse-headers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    for (name, text) in kernels::HEADERS {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    let mut include_paths = vec![dir.display().to_string()];
    if let Some(cuda) = std::env::var_os("CUDA_HOME").or_else(|| std::env::var_os("CUDA_PATH")) {
        include_paths.push(std::path::Path::new(&cuda).join("include").display().to_string());
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some("compute_80"),
        include_paths,
        // The build's own NVRTC options (the architecture goes in `arch`).
        options: kernels::NVRTC_OPTIONS
            .iter()
            .filter(|o| !o.starts_with("--gpu-architecture"))
            .map(|o| o.to_string())
            .collect(),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(m.source, opts).map_err(|e| Error::kernel(m.file, format!("NVRTC: {e:?}")))
}

impl Device for Cuda {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Cuda
    }
    fn name(&self) -> String {
        self.name.clone()
    }
    fn alloc(&self, bytes: usize) -> Result<DevicePtr> {
        self.bind()?;
        let p = if self.pooled {
            // SAFETY: stream-ordered allocation on the one stream every copy and launch uses.
            unsafe { result::malloc_async(self.stream.cu_stream(), bytes) }.map_err(driver_err("cuMemAllocAsync"))?
        } else {
            // SAFETY: plain allocation in the bound context.
            unsafe { result::malloc_sync(bytes) }.map_err(driver_err("cuMemAlloc"))?
        };
        Ok(DevicePtr(p))
    }
    unsafe fn free(&self, ptr: DevicePtr) -> Result<()> {
        self.bind()?;
        if self.pooled {
            // Ordered after every launch already queued that uses `ptr`: all run on this stream.
            result::free_async(ptr.0, self.stream.cu_stream()).map_err(driver_err("cuMemFreeAsync"))
        } else {
            result::free_sync(ptr.0).map_err(driver_err("cuMemFree"))
        }
    }
    fn copy_to_device(&self, dst: DevicePtr, src: &[u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: synchronous copy of `src.len()` bytes; callers size `dst` from the same length.
        unsafe { result::memcpy_htod_sync(dst.0, src) }.map_err(driver_err("cuMemcpyHtoD"))
    }
    fn copy_to_host(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()> {
        self.bind()?;
        self.stream.synchronize().map_err(driver_err("synchronize"))?;
        // SAFETY: synchronous copy into a host slice of the given length.
        unsafe { result::memcpy_dtoh_sync(dst, src.0) }.map_err(driver_err("cuMemcpyDtoH"))
    }
    fn memset(&self, dst: DevicePtr, value: u8, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: `dst` is a device allocation of at least `bytes`.
        unsafe { result::memset_d8_sync(dst.0, value, bytes) }.map_err(driver_err("cuMemsetD8"))
    }
    unsafe fn launch(&self, kernel: &str, cfg: &LaunchConfig, params: ParamBytes<'_>) -> Result<()> {
        let f = self.function(kernel)?;
        self.bind()?;
        if cfg.dynamic_smem_bytes > 48 * 1024 {
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                cfg.dynamic_smem_bytes as i32,
            )
            .map_err(|e| Error::kernel(kernel, format!("dynamic shared memory: {e:?}")))?;
        }
        // The kernel takes one struct by value: one argument pointer to its bytes.
        let mut args = [params.as_ptr() as *mut std::ffi::c_void];
        result::launch_kernel(
            f.cu_function(),
            cfg.grid,
            cfg.block,
            cfg.dynamic_smem_bytes,
            self.stream.cu_stream(),
            &mut args,
        )
        .map_err(|e| Error::kernel(kernel, format!("launch failed: {e:?}")))
    }
    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver_err("synchronize"))
    }
    fn time_ms(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        self.bind()?;
        let event =
            || self.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver_err("cuEventCreate"));
        let (start, end) = (event()?, event()?);
        start.record(&self.stream).map_err(driver_err("cuEventRecord"))?;
        work()?;
        end.record(&self.stream).map_err(driver_err("cuEventRecord"))?;
        end.synchronize().map_err(driver_err("cuEventSynchronize"))?;
        Ok(start.elapsed_ms(&end).map_err(driver_err("cuEventElapsedTime"))? as f64)
    }
}
