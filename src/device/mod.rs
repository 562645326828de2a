//! Backends behind one small trait.
//!
//! A [`Device`] allocates memory, copies bytes in and out, and launches a kernel of
//! `kernels/*.cu` by name with its parameter struct (from `kernels/params.h`). Two
//! implementations exist: [`cuda::Cuda`] (a real GPU through cudarc, driver loaded at run time)
//! and [`sim::Sim`] (the same kernel source compiled as host C++ and executed by the SIMT
//! simulator). Launch code in `src/ops` is written once against the trait. The CPU backend is
//! not a `Device`: it computes on host memory directly (see [`Backend`]).

pub mod cuda;
pub mod kernels;
pub mod params;
pub mod sim;

use crate::{Error, Result};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

/// An address in a device's memory (a host address in the simulator).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DevicePtr(pub u64);

impl DevicePtr {
    /// The address `bytes` further on.
    pub fn offset(self, bytes: usize) -> DevicePtr {
        DevicePtr(self.0 + bytes as u64)
    }
    /// As a kernel-parameter pointer field.
    pub fn as_ptr<T>(self) -> *const T {
        self.0 as usize as *const T
    }
    /// As a mutable kernel-parameter pointer field.
    pub fn as_mut_ptr<T>(self) -> *mut T {
        self.0 as usize as *mut T
    }
}

/// Grid, block and dynamic shared memory of a launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub dynamic_smem_bytes: u32,
}

/// Parameter structs generated from `kernels/params.h`: plain `#[repr(C)]` data, passed by value.
///
/// # Safety
/// Implementors must be `#[repr(C)]` structs whose layout matches the C declaration.
pub unsafe trait KernelParams: Copy + 'static {}

/// A borrowed parameter struct, type-erased for [`Device::launch`].
#[derive(Clone, Copy)]
pub struct ParamBytes<'a> {
    ptr: *const u8,
    len: usize,
    _borrow: PhantomData<&'a ()>,
}

impl<'a> ParamBytes<'a> {
    pub fn new<P: KernelParams>(params: &'a P) -> Self {
        ParamBytes { ptr: (params as *const P).cast(), len: std::mem::size_of::<P>(), _borrow: PhantomData }
    }
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Which implementation a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cuda,
    Sim,
}

/// Memory and kernel launches on one device. Every method reports failure as [`Error`];
/// none panics on a bad argument.
pub trait Device: Send + Sync + fmt::Debug {
    fn kind(&self) -> DeviceKind;
    /// Human-readable name, e.g. "NVIDIA H100 80GB HBM3 (sm_90)" or "SIMT simulator".
    fn name(&self) -> String;
    fn alloc(&self, bytes: usize) -> Result<DevicePtr>;
    /// # Safety
    /// `ptr` must come from `alloc` on this device and not be freed twice or used after.
    unsafe fn free(&self, ptr: DevicePtr) -> Result<()>;
    fn copy_to_device(&self, dst: DevicePtr, src: &[u8]) -> Result<()>;
    fn copy_to_host(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()>;
    fn memset(&self, dst: DevicePtr, value: u8, bytes: usize) -> Result<()>;
    /// Launches `kernel` (an `extern "C" __global__` name in `kernels/*.cu`).
    ///
    /// # Safety
    /// The pointers inside `params` must be valid device allocations large enough for what the
    /// kernel reads and writes with the given configuration.
    unsafe fn launch(&self, kernel: &str, cfg: &LaunchConfig, params: ParamBytes<'_>) -> Result<()>;
    fn synchronize(&self) -> Result<()>;
    /// Milliseconds `work` takes on this device. A GPU measures it with events on its stream
    /// (launch overhead between the events included, host work before them not); elsewhere it
    /// is the host clock between two synchronizations.
    fn time_ms(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        self.synchronize()?;
        let start = std::time::Instant::now();
        work()?;
        self.synchronize()?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }
    /// Counters of the launches since the last call (simulator only; `None` on a GPU).
    fn take_stats(&self) -> Option<sim::SimStats> {
        None
    }
}

/// A device allocation freed on drop.
#[derive(Debug)]
pub struct DeviceBuffer {
    device: Arc<dyn Device>,
    ptr: DevicePtr,
    bytes: usize,
}

impl DeviceBuffer {
    pub fn new(device: &Arc<dyn Device>, bytes: usize) -> Result<Self> {
        // Zero-size allocations still get a distinct address so kernels can take it.
        let ptr = device.alloc(bytes.max(1))?;
        Ok(DeviceBuffer { device: device.clone(), ptr, bytes })
    }
    pub fn from_host(device: &Arc<dyn Device>, data: &[u8]) -> Result<Self> {
        let buf = Self::new(device, data.len())?;
        device.copy_to_device(buf.ptr, data)?;
        Ok(buf)
    }
    pub fn ptr(&self) -> DevicePtr {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.bytes
    }
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }
    pub fn device(&self) -> &Arc<dyn Device> {
        &self.device
    }
    pub fn to_host(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.bytes];
        self.device.copy_to_host(self.ptr, &mut out)?;
        Ok(out)
    }
    pub fn fill(&self, value: u8) -> Result<()> {
        self.device.memset(self.ptr, value, self.bytes)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: the buffer owns `ptr`, allocated on `device`, freed exactly once here.
        if let Err(e) = unsafe { self.device.free(self.ptr) } {
            eprintln!("lorafuse: freeing device memory failed: {e}");
        }
    }
}

/// Where tensors live and ops run.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Host memory; ops run on the CPU (rayon).
    Cpu,
    /// A [`Device`]: a GPU or the simulator.
    Device(Arc<dyn Device>),
}

impl Backend {
    pub fn cpu() -> Self {
        Backend::Cpu
    }
    /// The simulator with the default (lockstep) schedule.
    pub fn sim() -> Self {
        Backend::Device(Arc::new(sim::Sim::new(sim::Schedule::Lockstep)))
    }
    /// The first CUDA GPU, or an error saying why there is none.
    pub fn cuda() -> Result<Self> {
        Ok(Backend::Device(Arc::new(cuda::Cuda::new(0)?)))
    }
    pub fn name(&self) -> String {
        match self {
            Backend::Cpu => "cpu".into(),
            Backend::Device(d) => d.name(),
        }
    }
    pub fn device(&self) -> Option<&Arc<dyn Device>> {
        match self {
            Backend::Cpu => None,
            Backend::Device(d) => Some(d),
        }
    }
}

/// Rounds `n` up to a multiple of `tile`, as a grid dimension.
pub fn blocks_for(n: usize, tile: usize) -> Result<u32> {
    u32::try_from(n.div_ceil(tile)).map_err(|_| Error::shape("launch", format!("{n} elements need too many blocks")))
}
