//! The unfused LoRA linear, as PEFT runs it: separate kernels, dropout materialized as a bf16
//! copy of x that stays alive for backward. It is the "before" of the benches and a second,
//! independent route to the same numbers in the tests.
//!
//! Forward: `xd = drop(x)` (bf16 `[M,K]` written), `y0 = x·W0ᵀ`, `S = xd·Aᵀ` (bf16), `y1 = S·Bᵀ`,
//! `y = y0 + s·y1`. Backward: `dB = s·dyᵀ·S`, `dS = s·dy·B`, `dA = dSᵀ·xd`, `dxd = dS·A`,
//! `dx = dy·W0 + drop'(dxd)`. Seven GEMM/elementwise launches forward, seven backward.

use crate::device::params::ElementwiseParams;
use crate::device::{blocks_for, Backend, Device, DevicePtr, KernelParams, LaunchConfig, ParamBytes};
use crate::ops::gemm::{launch_gemm, GemmLayout, GemmShape};
use crate::ops::lora_kernels::{dims, dropout_params, Dims, LoraWeights};
use crate::ops::philox::DropoutMask;
use crate::tensor::{DType, Tensor};
use crate::Result;
use std::sync::Arc;

// SAFETY: bindgen-generated #[repr(C)] mirror of kernels/params.h.
unsafe impl KernelParams for ElementwiseParams {}

/// What the unfused forward keeps for backward: the dropped copy of x and S.
#[derive(Debug)]
pub struct UnfusedForward {
    /// y `[M,N]` f32.
    pub y: Tensor,
    /// drop(x) `[M,K]` bf16, materialized (None when p = 0: PEFT then uses x itself).
    pub x_dropped: Option<Tensor>,
    /// S = drop(x)·Aᵀ `[M,R]` bf16.
    pub s: Tensor,
}

fn elementwise(dev: &dyn Device, kernel: &str, p: &ElementwiseParams) -> Result<()> {
    if p.n == 0 {
        return Ok(());
    }
    let groups = (p.n as usize).div_ceil(8);
    let cfg =
        LaunchConfig { grid: (blocks_for(groups, 256)?.min(8192), 1, 1), block: (256, 1, 1), dynamic_smem_bytes: 0 };
    // SAFETY: callers pass buffers of `n` elements.
    unsafe { dev.launch(kernel, &cfg, ParamBytes::new(p)) }
}

/// `out = base + alpha · mask ⊙ x` over `n` f32 (base optional).
fn masked_axpy(
    dev: &dyn Device,
    x: DevicePtr,
    base: Option<DevicePtr>,
    out: DevicePtr,
    n: usize,
    alpha: f32,
    mask: &DropoutMask,
) -> Result<()> {
    let p = ElementwiseParams {
        x: x.as_ptr(),
        base: base.map_or(std::ptr::null(), |b| b.as_ptr()),
        out: out.as_mut_ptr(),
        n: n as i64,
        alpha,
        dropout: dropout_params(mask),
    };
    elementwise(dev, "masked_axpy_f32", &p)
}

/// Unfused forward with LoRA scale `s` (one target).
pub fn lora_forward_unfused(
    dev: &Arc<dyn Device>,
    x: &Tensor,
    w: &LoraWeights,
    s: f32,
    drop: &DropoutMask,
) -> Result<UnfusedForward> {
    let Dims { m, n, k, r } = dims(x, w)?;
    let backend = Backend::Device(dev.clone());
    let d = dev.as_ref();
    let x_dropped = if drop.is_identity() {
        None
    } else {
        let xd = Tensor::empty(&[m, k], DType::BF16, &backend)?;
        let p = ElementwiseParams {
            x: x.device_ptr()?.as_ptr(),
            base: std::ptr::null(),
            out: xd.device_ptr()?.as_mut_ptr(),
            n: (m * k) as i64,
            alpha: 1.0,
            dropout: dropout_params(drop),
        };
        elementwise(d, "dropout_bf16", &p)?;
        Some(xd)
    };
    let lora_in = x_dropped.as_ref().unwrap_or(x);
    let y = Tensor::empty(&[m, n], DType::F32, &backend)?;
    let y1 = Tensor::empty(&[m, n], DType::F32, &backend)?;
    let s_t = Tensor::empty(&[m, r], DType::BF16, &backend)?;
    // SAFETY: all tensors are live device tensors of the checked shapes.
    unsafe {
        launch_gemm(
            d,
            x.device_ptr()?,
            w.w0.device_ptr()?,
            y.device_ptr()?,
            GemmShape::dense(m, n, k),
            GemmLayout::Nt,
            DType::F32,
        )?;
        launch_gemm(
            d,
            lora_in.device_ptr()?,
            w.a.device_ptr()?,
            s_t.device_ptr()?,
            GemmShape::dense(m, r, k),
            GemmLayout::Nt,
            DType::BF16,
        )?;
        launch_gemm(
            d,
            s_t.device_ptr()?,
            w.b.device_ptr()?,
            y1.device_ptr()?,
            GemmShape::dense(m, n, r),
            GemmLayout::Nt,
            DType::F32,
        )?;
    }
    masked_axpy(d, y1.device_ptr()?, Some(y.device_ptr()?), y.device_ptr()?, m * n, s, &DropoutMask::new(0.0, 0, 0))?;
    Ok(UnfusedForward { y, x_dropped, s: s_t })
}

/// Unfused backward: (dx f32 `[M,K]`, dA f32 `[R,K]`, dB f32 `[N,R]`).
pub fn lora_backward_unfused(
    dev: &Arc<dyn Device>,
    x: &Tensor,
    w: &LoraWeights,
    s: f32,
    drop: &DropoutMask,
    saved: &UnfusedForward,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let Dims { m, n, k, r } = dims(x, w)?;
    let backend = Backend::Device(dev.clone());
    let d = dev.as_ref();
    let lora_in = saved.x_dropped.as_ref().unwrap_or(x);
    let db = Tensor::empty(&[n, r], DType::F32, &backend)?;
    let ds = Tensor::empty(&[m, r], DType::BF16, &backend)?;
    let da = Tensor::empty(&[r, k], DType::F32, &backend)?;
    let dxd = Tensor::empty(&[m, k], DType::F32, &backend)?;
    let dx = Tensor::empty(&[m, k], DType::F32, &backend)?;
    let scaled = |shape: GemmShape| GemmShape { alpha: s, ..shape };
    // SAFETY: all tensors are live device tensors of the checked shapes.
    unsafe {
        let (dyp, sp, dsp) = (dy.device_ptr()?, saved.s.device_ptr()?, ds.device_ptr()?);
        launch_gemm(
            d,
            dyp,
            sp,
            db.device_ptr()?,
            scaled(GemmShape::dense_for(GemmLayout::Tn, n, r, m)),
            GemmLayout::Tn,
            DType::F32,
        )?;
        launch_gemm(
            d,
            dyp,
            w.b.device_ptr()?,
            dsp,
            scaled(GemmShape::dense_for(GemmLayout::Nn, m, r, n)),
            GemmLayout::Nn,
            DType::BF16,
        )?;
        launch_gemm(
            d,
            dsp,
            lora_in.device_ptr()?,
            da.device_ptr()?,
            GemmShape::dense_for(GemmLayout::Tn, r, k, m),
            GemmLayout::Tn,
            DType::F32,
        )?;
        launch_gemm(
            d,
            dsp,
            w.a.device_ptr()?,
            dxd.device_ptr()?,
            GemmShape::dense_for(GemmLayout::Nn, m, k, r),
            GemmLayout::Nn,
            DType::F32,
        )?;
        launch_gemm(
            d,
            dyp,
            w.w0.device_ptr()?,
            dx.device_ptr()?,
            GemmShape::dense_for(GemmLayout::Nn, m, k, n),
            GemmLayout::Nn,
            DType::F32,
        )?;
    }
    masked_axpy(d, dxd.device_ptr()?, Some(dx.device_ptr()?), dx.device_ptr()?, m * k, 1.0, drop)?;
    Ok((dx, da, db))
}
