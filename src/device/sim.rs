//! The SIMT simulator as a [`Device`]: `kernels/*.cu` compiled as host C++ (build/sim.rs)
//! against `kernels/simt.h`, one fiber per CUDA thread, blocks in parallel on worker threads.
//!
//! Device memory is host memory; every copy and memset is checked against the live allocations,
//! so a launch-code bug that a GPU would turn into silent corruption is an error here.

use super::{Device, DeviceKind, DevicePtr, LaunchConfig, ParamBytes};
use crate::{Error, Result};
use std::alloc::Layout;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr, CString};
use std::sync::Mutex;

/// The order in which the simulator runs a block's threads between synchronisation points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Threads in index order, each to its next switch point.
    Lockstep,
    /// A seeded shuffle at every switch point: exposes missing barriers (read-after-write).
    Random(u64),
    /// One warp, chosen by the seed, runs as far as it can before the others (write-after-read).
    WarpAhead(u64),
}

/// Counters over launches: the simulator's window on memory traffic and work.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// `mma.sync.m16n8k16` instructions (warp-wide): 4096 FLOPs each.
    pub mma: u64,
    pub ldmatrix: u64,
    pub barriers: u64,
    pub shuffles: u64,
    pub blocks: u64,
    pub threads: u64,
}

impl SimStats {
    fn add(&mut self, o: &SimStats) {
        self.bytes_read += o.bytes_read;
        self.bytes_written += o.bytes_written;
        self.mma += o.mma;
        self.ldmatrix += o.ldmatrix;
        self.barriers += o.barriers;
        self.shuffles += o.shuffles;
        self.blocks += o.blocks;
        self.threads += o.threads;
    }
    /// Tensor-core FLOPs: 2·16·8·16 per mma.
    pub fn mma_flops(&self) -> u64 {
        self.mma * 4096
    }
}

#[repr(C)]
struct SimtConfig {
    schedule: c_int,
    seed: c_ulonglong,
    worker_threads: c_int,
}

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn simt_launch(
        kernel: *const c_char,
        gx: c_uint,
        gy: c_uint,
        gz: c_uint,
        bx: c_uint,
        by: c_uint,
        bz: c_uint,
        dyn_smem_bytes: c_ulonglong,
        params: *const c_void,
        params_size: c_ulonglong,
        cfg: *const SimtConfig,
        stats: *mut SimStats,
        err: *mut c_char,
        err_len: c_ulonglong,
    ) -> c_int;
    fn simt_kernel_count() -> c_int;
    fn simt_kernel_name(i: c_int) -> *const c_char;
}

/// Every kernel compiled into the simulator.
pub fn kernel_names() -> Vec<String> {
    // SAFETY: the registry is immutable after static initialisation; names are NUL-terminated.
    unsafe {
        (0..simt_kernel_count()).map(|i| CStr::from_ptr(simt_kernel_name(i)).to_string_lossy().into_owned()).collect()
    }
}

const ALIGN: usize = 256; // as cudaMalloc: enough for any vector access

/// Static shared memory a block may declare, and static + dynamic per block (sm_90; sm_80 allows
/// 163 KiB dynamic, which kernels that need more than that must not exceed either).
const STATIC_SMEM_LIMIT: u32 = 48 * 1024;
const TOTAL_SMEM_LIMIT: u32 = 227 * 1024;

/// Refuses launches a GPU would refuse for shared memory, using ptxas' count of the kernel's
/// static shared memory (the host build cannot measure it; without a ptxas report only the
/// dynamic size is checked, by the runtime).
fn check_shared_memory(kernel: &str, dynamic: u32) -> Result<()> {
    let static_bytes = super::kernels::RESOURCES.iter().filter(|r| r.kernel == kernel).map(|r| r.shared_bytes).max();
    if let Some(st) = static_bytes {
        if st > STATIC_SMEM_LIMIT {
            return Err(Error::kernel(kernel, format!("static shared memory {st} B exceeds {STATIC_SMEM_LIMIT} B")));
        }
        if st + dynamic > TOTAL_SMEM_LIMIT {
            return Err(Error::kernel(
                kernel,
                format!("shared memory {st} B static + {dynamic} B dynamic exceeds {TOTAL_SMEM_LIMIT} B per block"),
            ));
        }
    }
    Ok(())
}

/// The simulator device.
#[derive(Debug)]
pub struct Sim {
    schedule: Schedule,
    worker_threads: i32,
    /// start address → layout of each live allocation
    allocations: Mutex<BTreeMap<u64, Layout>>,
    stats: Mutex<SimStats>,
}

impl Sim {
    pub fn new(schedule: Schedule) -> Self {
        Sim { schedule, worker_threads: 0, allocations: Mutex::default(), stats: Mutex::default() }
    }
    /// Limits the OS threads running blocks (0: `SIMT_THREADS` or all cores).
    pub fn with_worker_threads(mut self, n: i32) -> Self {
        self.worker_threads = n;
        self
    }
    pub fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Errors unless [ptr, ptr+bytes) lies inside one live allocation.
    fn check_range(&self, ptr: DevicePtr, bytes: usize, what: &str) -> Result<()> {
        let allocs = self.allocations.lock().map_err(|_| Error::Device("allocation table poisoned".into()))?;
        match allocs.range(..=ptr.0).next_back() {
            Some((&start, layout)) if ptr.0 + bytes as u64 <= start + layout.size() as u64 => Ok(()),
            _ => Err(Error::Device(format!(
                "{what}: {bytes} bytes at {:#x} are outside every simulator allocation",
                ptr.0
            ))),
        }
    }
}

impl Device for Sim {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Sim
    }
    fn name(&self) -> String {
        format!("SIMT simulator ({:?})", self.schedule)
    }
    fn alloc(&self, bytes: usize) -> Result<DevicePtr> {
        let layout =
            Layout::from_size_align(bytes.max(1), ALIGN).map_err(|e| Error::Device(format!("alloc {bytes} B: {e}")))?;
        // SAFETY: non-zero size. Fresh memory is filled with a NaN pattern (0xFF) so that an
        // output a kernel fails to write is caught by the tests that compare it.
        let p = unsafe { std::alloc::alloc(layout) };
        if p.is_null() {
            return Err(Error::Device(format!("simulator out of memory allocating {bytes} B")));
        }
        unsafe { std::ptr::write_bytes(p, 0xFF, layout.size()) };
        self.allocations
            .lock()
            .map_err(|_| Error::Device("allocation table poisoned".into()))?
            .insert(p as u64, layout);
        Ok(DevicePtr(p as u64))
    }
    unsafe fn free(&self, ptr: DevicePtr) -> Result<()> {
        let layout = self
            .allocations
            .lock()
            .map_err(|_| Error::Device("allocation table poisoned".into()))?
            .remove(&ptr.0)
            .ok_or_else(|| Error::Device(format!("free of {:#x}, which is not a live allocation", ptr.0)))?;
        std::alloc::dealloc(ptr.0 as usize as *mut u8, layout);
        Ok(())
    }
    fn copy_to_device(&self, dst: DevicePtr, src: &[u8]) -> Result<()> {
        self.check_range(dst, src.len(), "copy to device")?;
        // SAFETY: the destination range was checked to lie in a live allocation.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr::<u8>(), src.len()) };
        Ok(())
    }
    fn copy_to_host(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()> {
        self.check_range(src, dst.len(), "copy to host")?;
        // SAFETY: the source range was checked to lie in a live allocation.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr::<u8>(), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
    fn memset(&self, dst: DevicePtr, value: u8, bytes: usize) -> Result<()> {
        self.check_range(dst, bytes, "memset")?;
        // SAFETY: checked range.
        unsafe { std::ptr::write_bytes(dst.as_mut_ptr::<u8>(), value, bytes) };
        Ok(())
    }
    unsafe fn launch(&self, kernel: &str, cfg: &LaunchConfig, params: ParamBytes<'_>) -> Result<()> {
        check_shared_memory(kernel, cfg.dynamic_smem_bytes)?;
        let name = CString::new(kernel).map_err(|_| Error::kernel(kernel, "name contains NUL"))?;
        let (schedule, seed) = match self.schedule {
            Schedule::Lockstep => (0, 0),
            Schedule::Random(s) => (1, s),
            Schedule::WarpAhead(s) => (2, s),
        };
        let sc = SimtConfig { schedule, seed, worker_threads: self.worker_threads };
        let mut stats = SimStats::default();
        let mut err = vec![0 as c_char; 1024];
        let rc = simt_launch(
            name.as_ptr(),
            cfg.grid.0,
            cfg.grid.1,
            cfg.grid.2,
            cfg.block.0,
            cfg.block.1,
            cfg.block.2,
            cfg.dynamic_smem_bytes as u64,
            params.as_ptr().cast(),
            params.len() as u64,
            &sc,
            &mut stats,
            err.as_mut_ptr(),
            err.len() as u64,
        );
        if rc != 0 {
            let msg = CStr::from_ptr(err.as_ptr()).to_string_lossy().into_owned();
            return Err(Error::kernel(kernel, msg));
        }
        self.stats.lock().map_err(|_| Error::Device("stats poisoned".into()))?.add(&stats);
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(()) // launches are synchronous
    }
    fn take_stats(&self) -> Option<SimStats> {
        self.stats.lock().ok().map(|mut s| std::mem::take(&mut *s))
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Ok(allocs) = self.allocations.get_mut() {
            for (&p, &layout) in allocs.iter() {
                // SAFETY: every entry is a live allocation made by `alloc` with this layout.
                unsafe { std::alloc::dealloc(p as usize as *mut u8, layout) };
            }
        }
    }
}
