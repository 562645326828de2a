//! bf16 GEMMs with f32 accumulation on tensor cores (`kernels/gemm.cu`), in the three operand
//! layouts a linear layer needs ([`GemmLayout`]), their launch code, and the CPU reference.

use crate::device::params::GemmParams;
use crate::device::{blocks_for, Backend, Device, KernelParams, LaunchConfig, ParamBytes};
use crate::ops::matmul::{self, Tr};
use crate::tensor::{DType, HostData, Tensor};
use crate::{Error, Result};
use half::bf16;
use rayon::prelude::*;
use std::sync::Arc;

// SAFETY: bindgen-generated #[repr(C)] mirror of `GemmParams` in kernels/params.h.
unsafe impl KernelParams for GemmParams {}

/// Tile sizes of `kernels/gemm_tile.cuh` (`GEMM_BM`, `GEMM_BN`, `GEMM_THREADS`).
pub const TILE_M: usize = 128;
pub const TILE_N: usize = 128;
pub const THREADS: u32 = 256;

/// How the operands are stored (all row-major, `ld` elements between rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmLayout {
    /// `C = A·Bᵀ`: A `[M,K]`, B `[N,K]` — a linear layer's forward.
    Nt,
    /// `C = A·B`: A `[M,K]`, B `[K,N]` — `dx = dy·W`.
    Nn,
    /// `C = Aᵀ·B`: A `[K,M]`, B `[K,N]` — `dW = dyᵀ·x`.
    Tn,
}

impl GemmLayout {
    fn kernel_prefix(self) -> &'static str {
        match self {
            GemmLayout::Nt => "gemm_bf16",
            GemmLayout::Nn => "gemm_bf16_nn",
            GemmLayout::Tn => "gemm_bf16_tn",
        }
    }
    /// Stored (rows, cols) of A and of B.
    pub fn stored_shapes(self, m: usize, n: usize, k: usize) -> ((usize, usize), (usize, usize)) {
        match self {
            GemmLayout::Nt => ((m, k), (n, k)),
            GemmLayout::Nn => ((m, k), (k, n)),
            GemmLayout::Tn => ((k, m), (k, n)),
        }
    }
}

/// Problem description for [`launch_gemm`]: row-major matrices with leading dimensions.
#[derive(Debug, Clone, Copy)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    /// C = alpha · product.
    pub alpha: f32,
}

impl GemmShape {
    /// Dense operands: lda = ldb = k, ldc = n.
    pub fn dense(m: usize, n: usize, k: usize) -> Self {
        GemmShape { m, n, k, lda: k, ldb: k, ldc: n, alpha: 1.0 }
    }
    /// Dense operands stored as `layout` says.
    pub fn dense_for(layout: GemmLayout, m: usize, n: usize, k: usize) -> Self {
        let ((_, a_cols), (_, b_cols)) = layout.stored_shapes(m, n, k);
        GemmShape { m, n, k, lda: a_cols, ldb: b_cols, ldc: n, alpha: 1.0 }
    }
    fn validate(&self, layout: GemmLayout) -> Result<()> {
        let s = self;
        let ((_, a_cols), (_, b_cols)) = layout.stored_shapes(s.m, s.n, s.k);
        if s.lda < a_cols || s.ldb < b_cols || s.ldc < s.n {
            return Err(Error::shape("gemm", format!("leading dimensions {s:?} smaller than the rows they hold")));
        }
        if [s.m, s.n, s.k, s.lda, s.ldb, s.ldc].iter().any(|&v| v > i32::MAX as usize) {
            return Err(Error::shape("gemm", format!("{s:?} exceeds the kernel's 32-bit indices")));
        }
        Ok(())
    }
    /// Global bytes the kernel requests: each A row panel is read once per N tile, each B panel
    /// once per M tile, and C written once.
    pub fn bytes_requested(&self, out: DType) -> u64 {
        let (m, n, k) = (self.m as u64, self.n as u64, self.k as u64);
        let tiles_n = n.div_ceil(TILE_N as u64);
        let tiles_m = m.div_ceil(TILE_M as u64);
        2 * k * (m * tiles_n + n * tiles_m) + m * n * out.size() as u64
    }
}

/// Launches the GEMM on raw device addresses: `c` gets the product `layout` names, as f32 or
/// bf16 (`out`).
///
/// # Safety
/// `a`, `b`, `c` must be device allocations holding the matrices described by `shape`.
pub unsafe fn launch_gemm(
    dev: &dyn Device,
    a: crate::device::DevicePtr,
    b: crate::device::DevicePtr,
    c: crate::device::DevicePtr,
    shape: GemmShape,
    layout: GemmLayout,
    out: DType,
) -> Result<()> {
    shape.validate(layout)?;
    let suffix = match out {
        DType::F32 => "f32out",
        DType::BF16 => "bf16out",
        other => return Err(Error::shape("gemm", format!("output dtype {other:?} unsupported (f32 or bf16)"))),
    };
    let kernel = format!("{}_{suffix}", layout.kernel_prefix());
    if shape.m == 0 || shape.n == 0 {
        return Ok(());
    }
    let params = GemmParams {
        a: a.as_ptr(),
        b: b.as_ptr(),
        c: c.as_mut_ptr(),
        m: shape.m as i32,
        n: shape.n as i32,
        k: shape.k as i32,
        lda: shape.lda as i32,
        ldb: shape.ldb as i32,
        ldc: shape.ldc as i32,
        alpha: shape.alpha,
    };
    let cfg = LaunchConfig {
        grid: (blocks_for(shape.n, TILE_N)?, blocks_for(shape.m, TILE_M)?, 1),
        block: (THREADS, 1, 1),
        dynamic_smem_bytes: 0,
    };
    if cfg.grid.1 > 65535 {
        return Err(Error::shape("gemm", format!("M = {} needs more than 65535 row tiles", shape.m)));
    }
    dev.launch(&kernel, &cfg, ParamBytes::new(&params))
}

/// `C = A·Bᵀ` for A `[M,K]` and B `[N,K]` bf16 tensors on the same backend; C `[M,N]` in `out` dtype.
///
/// On a device this runs the tensor-core kernel; on the CPU, the CPU backend's f32 GEMM
/// ([`matmul::gemm_new`]) on the bf16 values widened to f32.
pub fn gemm_bf16(a: &Tensor, b: &Tensor, out: DType, backend: &Backend) -> Result<Tensor> {
    let (m, k, n) = check_operands(a, b)?;
    match backend {
        Backend::Cpu => {
            let (ha, hb) = (a.to_host()?, b.to_host()?);
            let (fa, fb) = (ha.to_f32(), hb.to_f32());
            let c = matmul::gemm_new(m, n, k, 1.0, &fa, Tr::N, &fb, Tr::T, true);
            let data = match out {
                DType::F32 => HostData::F32(c),
                DType::BF16 => HostData::BF16(c.iter().map(|&v| bf16::from_f32(v)).collect()),
                other => return Err(Error::shape("gemm", format!("output dtype {other:?} unsupported"))),
            };
            Tensor::from_host(&[m, n], data)
        }
        Backend::Device(dev) => {
            let c = Tensor::empty(&[m, n], out, backend)?;
            // SAFETY: a, b, c are live device tensors of the validated shapes.
            unsafe {
                launch_gemm(
                    dev_ref(dev),
                    a.device_ptr()?,
                    b.device_ptr()?,
                    c.device_ptr()?,
                    GemmShape::dense(m, n, k),
                    GemmLayout::Nt,
                    out,
                )?
            };
            Ok(c)
        }
    }
}

fn dev_ref(d: &Arc<dyn Device>) -> &dyn Device {
    d.as_ref()
}

fn check_operands(a: &Tensor, b: &Tensor) -> Result<(usize, usize, usize)> {
    let (sa, sb) = (a.shape(), b.shape());
    if a.dtype() != DType::BF16 || b.dtype() != DType::BF16 {
        return Err(Error::shape("gemm", format!("operands must be bf16, got {:?} and {:?}", a.dtype(), b.dtype())));
    }
    if sa.len() != 2 || sb.len() != 2 || sa[1] != sb[1] {
        return Err(Error::shape("gemm", format!("A {sa:?} and B {sb:?} must be [M,K] and [N,K]")));
    }
    Ok((sa[0], sa[1], sb[0]))
}

/// Float64 reference of the product `layout` names, on the stored (already bf16-rounded) values
/// `a` and `b` with the leading dimensions of `shape`: `C[i][j] = Σ_t A(i,t)·B(j,t)`.
pub fn gemm_ref(a: &[f32], b: &[f32], shape: GemmShape, layout: GemmLayout) -> Vec<f64> {
    let GemmShape { m, n, k, lda, ldb, .. } = shape;
    let a_at = |i: usize, t: usize| match layout {
        GemmLayout::Tn => a[t * lda + i],
        _ => a[i * lda + t],
    } as f64;
    let b_at = |j: usize, t: usize| match layout {
        GemmLayout::Nt => b[j * ldb + t],
        _ => b[t * ldb + j],
    } as f64;
    let mut c = vec![0f64; m * n];
    c.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
        for (j, cij) in row.iter_mut().enumerate() {
            *cij = shape.alpha as f64 * (0..k).map(|t| a_at(i, t) * b_at(j, t)).sum::<f64>();
        }
    });
    c
}
