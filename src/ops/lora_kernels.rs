//! Launch code for the LoRA kernels of `kernels/lora.cu` (forward: split strategy; backward:
//! dS and dB from one pass over dy, dA, dx), on any [`Device`]. The CPU reference is [`crate::ops::lora`].
//!
//! Shapes: x `[M,K]`, W0 `[N,K]`, A `[R,K]`, B `[N,R]` (bf16); `col_scale` `[R]` f32 = alpha/r (or
//! alpha/√r) per column of S, so several targets stacked along R keep their own scale.

use crate::device::params::{
    DropoutParams, LoraBackwardParams, LoraForwardParams, Nf4Weight, QloraBackwardParams, QloraForwardParams,
    SplitKReduceParams,
};
use crate::device::{blocks_for, Device, DeviceBuffer, DevicePtr, KernelParams, LaunchConfig, ParamBytes};
use crate::ops::philox::DropoutMask;
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};
use std::sync::Arc;

// SAFETY: bindgen-generated #[repr(C)] mirrors of kernels/params.h.
unsafe impl KernelParams for LoraForwardParams {}
unsafe impl KernelParams for LoraBackwardParams {}
unsafe impl KernelParams for SplitKReduceParams {}
unsafe impl KernelParams for QloraForwardParams {}
unsafe impl KernelParams for QloraBackwardParams {}

const TILE: usize = 128;
const THREADS: u32 = 256;
/// Blocks to aim for when splitting the M reduction of dA (≈ 2 waves on 132 SMs).
const TARGET_BLOCKS: usize = 264;
/// Rows of M per block of `lora_bwd_ds_db`, i.e. per dB partial slab.
pub const DS_DB_ROWS: usize = 128;
/// Columns of R per block of `lora_bwd_ds_db` (dy is read once per such chunk of R).
pub const DS_DB_RANK_COLS: usize = 64;

/// Widths of the R tile of `lora_down` and `lora_bwd_da` (kernels `*_rt16`, `*_rt32`, `*_rt64`).
pub const RANK_TILES: [usize; 3] = [16, 32, 64];

/// The R-tile width for rank `r`: the narrowest of [`RANK_TILES`] that holds R rounded up to 16,
/// else 64 (⌈R/64⌉ tiles). The kernels skip MMAs past R, so R pads to 16 either way; a narrower
/// tile needs fewer registers, less shared memory and no idle loads.
pub fn rank_tile(r: usize) -> usize {
    RANK_TILES.into_iter().find(|&t| r <= t).unwrap_or(64)
}

/// Launches `lora_down_rt{W}` (W = [`rank_tile`]`(R)`): `p.s` `[M,R]` f32 = drop(x)·Aᵀ (dropout's
/// 0/1 mask applied to x tiles on their way to shared memory, 1/(1-p) to the f32 result) and
/// `p.s_scaled` `[M,R]` bf16 = S ⊙ col_scale. Grid (⌈R/W⌉, ⌈M/128⌉). Reads x, a, col_scale, m, k,
/// r, dropout of `p`.
///
/// # Safety
/// As [`Device::launch`]: `p.x` `[M,K]`, `p.a` `[R,K]` (bf16), `p.col_scale` `[R]` f32 and the
/// outputs `p.s` `[M,R]` f32, `p.s_scaled` `[M,R]` bf16 must be live device memory.
pub unsafe fn launch_down(dev: &dyn Device, p: &LoraForwardParams) -> Result<()> {
    let (m, r) = (p.m.max(0) as usize, p.r.max(0) as usize);
    if m == 0 || r == 0 {
        return Ok(());
    }
    let w = rank_tile(r);
    let cfg = LaunchConfig {
        grid: (blocks_for(r, w)?, blocks_for(m, TILE)?, 1),
        block: (THREADS, 1, 1),
        dynamic_smem_bytes: 0,
    };
    dev.launch(&format!("lora_down_rt{w}"), &cfg, ParamBytes::new(p))
}

/// Launches `lora_bwd_da_rt{W}` (W = [`rank_tile`]`(R)`): into `p.workspace`, slab z of
/// ⌈M/split_rows⌉ = `ds[rows]ᵀ·(mask⊙x)[rows]` `[R,K]` f32 over rows `split_rows`·z.. of M (the
/// 1/(1-p) is left to `splitk_reduce`'s scale). Grid (⌈K/128⌉, ⌈R/W⌉, splits). Reads x, ds,
/// m, k, r, split_rows, dropout of `p`.
///
/// # Safety
/// As [`Device::launch`]: `p.x` `[M,K]`, `p.ds` `[M,R]` (bf16) and `p.workspace`
/// (⌈M/split_rows⌉·R·K f32) must be live device memory; `p.split_rows` > 0.
pub unsafe fn launch_bwd_da(dev: &dyn Device, p: &LoraBackwardParams) -> Result<()> {
    let (m, k, r) = (p.m.max(0) as usize, p.k.max(0) as usize, p.r.max(0) as usize);
    if m == 0 || k == 0 || r == 0 {
        return Ok(());
    }
    let w = rank_tile(r);
    let cfg = LaunchConfig {
        grid: (blocks_for(k, TILE)?, blocks_for(r, w)?, m.div_ceil(p.split_rows.max(1) as usize) as u32),
        block: (THREADS, 1, 1),
        dynamic_smem_bytes: 0,
    };
    dev.launch(&format!("lora_bwd_da_rt{w}"), &cfg, ParamBytes::new(p))
}

/// The number of `[N,R]` f32 dB partial slabs `lora_bwd_ds_db` writes for M rows.
pub fn ds_db_splits(m: usize) -> usize {
    m.div_ceil(DS_DB_ROWS)
}

/// Launches `lora_bwd_ds_db`: from one read of dy, `p.ds` `[M,R]` bf16 = (dy·B) ⊙ col_scale
/// (bit-identical to a GEMM of dy·B, then scaled and rounded) and, into `p.workspace`, slab z of
/// [`ds_db_splits`]`(M)` = `dy[rows]ᵀ·s_scaled[rows]` `[N,R]` f32 over rows 128z..128z+127 of M, for
/// `splitk_reduce` to sum in z order (deterministic, no atomics). Reads `dy`, `b`, `s_scaled`,
/// `col_scale` and the sizes m, n, r of `p`; nothing else. Any R: blocks take 64 columns each.
///
/// # Safety
/// As [`Device::launch`]: `p.dy` `[M,N]`, `p.b` `[N,R]`, `p.s_scaled` `[M,R]` (bf16), `p.col_scale`
/// `[R]` f32 and the outputs `p.ds` `[M,R]` bf16 and `p.workspace` (`ds_db_splits(M)·N·R` f32) must
/// be live device memory.
pub unsafe fn launch_bwd_ds_db(dev: &dyn Device, p: &LoraBackwardParams) -> Result<()> {
    let (m, r) = (p.m.max(0) as usize, p.r.max(0) as usize);
    if m == 0 || r == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid: (blocks_for(r, DS_DB_RANK_COLS)?, blocks_for(m, DS_DB_ROWS)?, 1),
        block: (THREADS, 1, 1),
        dynamic_smem_bytes: 0,
    };
    dev.launch("lora_bwd_ds_db", &cfg, ParamBytes::new(p))
}

/// The kernels' view of a dropout mask (same bits as the CPU's [`DropoutMask`]).
pub(crate) fn dropout_params(m: &DropoutMask) -> DropoutParams {
    DropoutParams { seed: m.seed, offset: m.offset, threshold: m.threshold, scale: m.scale }
}

/// The frozen base weight and the adapter, as device tensors.
#[derive(Debug, Clone, Copy)]
pub struct LoraWeights<'a> {
    /// W0 `[N,K]` bf16.
    pub w0: &'a Tensor,
    /// A `[R,K]` bf16 (several targets' A stacked along R share one read of x).
    pub a: &'a Tensor,
    /// B `[N,R]` bf16.
    pub b: &'a Tensor,
    /// `[R]` f32: the scale of each column of S (alpha/r of its target).
    pub col_scale: &'a Tensor,
}

/// W0 [N,K] as the base GEMM reads it: a bf16 tensor (the `lora_*` kernels) or an NF4 weight
/// dequantized tile by tile inside the main loop (the `qlora_*` kernels, [`crate::ops::qlora`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum BaseWeight<'a> {
    Bf16(&'a Tensor),
    Nf4 { w: Nf4Weight, n: usize, k: usize },
}

/// [`LoraWeights`] with W0 in either form.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoraParts<'a> {
    pub w0: BaseWeight<'a>,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub col_scale: &'a Tensor,
}

impl<'a> From<&LoraWeights<'a>> for LoraParts<'a> {
    fn from(w: &LoraWeights<'a>) -> Self {
        LoraParts { w0: BaseWeight::Bf16(w.w0), a: w.a, b: w.b, col_scale: w.col_scale }
    }
}

impl BaseWeight<'_> {
    fn shape(&self) -> [usize; 2] {
        match self {
            BaseWeight::Bf16(t) => [t.shape().first().copied().unwrap_or(0), t.shape().get(1).copied().unwrap_or(0)],
            BaseWeight::Nf4 { n, k, .. } => [*n, *k],
        }
    }

    /// The bf16 pointer for the params' `w0` (null for NF4: the kernels read `Nf4Weight`).
    fn bf16_ptr(&self) -> Result<*const u16> {
        match self {
            BaseWeight::Bf16(t) => Ok(t.device_ptr()?.as_ptr()),
            BaseWeight::Nf4 { .. } => Ok(std::ptr::null()),
        }
    }

    /// Launches `{prefix}_{out}` (bf16 W0) or `q{prefix}_{out}` (NF4 W0) with `p`.
    ///
    /// # Safety
    /// As [`Device::launch`]: `p`'s pointers must be live and sized for the grid.
    unsafe fn launch<P: KernelParams, Q: KernelParams>(
        &self,
        dev: &Arc<dyn Device>,
        kernel: &str,
        cfg: &LaunchConfig,
        p: &P,
        wrap: impl FnOnce(P, Nf4Weight) -> Q,
    ) -> Result<()> {
        match self {
            BaseWeight::Bf16(_) => dev.launch(kernel, cfg, ParamBytes::new(p)),
            BaseWeight::Nf4 { w, .. } => {
                let q = wrap(*p, *w);
                dev.launch(&format!("q{kernel}"), cfg, ParamBytes::new(&q))
            }
        }
    }
}

/// Sizes shared by forward and backward.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) r: usize,
}

fn expect(t: &Tensor, name: &str, shape: &[usize], dtype: DType) -> Result<()> {
    if t.shape() != shape || t.dtype() != dtype {
        return Err(Error::shape(
            "lora",
            format!("{name} is {:?} {:?}, expected {shape:?} {dtype:?}", t.shape(), t.dtype()),
        ));
    }
    Ok(())
}

pub(crate) fn dims(x: &Tensor, w: &LoraWeights) -> Result<Dims> {
    dims_of(x, &w.into())
}

/// [`dims`] with W0 bf16 or NF4.
fn dims_of(x: &Tensor, w: &LoraParts) -> Result<Dims> {
    let (xs, as_) = (x.shape(), w.a.shape());
    let ws = match w.w0 {
        BaseWeight::Bf16(t) => t.shape().to_vec(),
        BaseWeight::Nf4 { .. } => w.w0.shape().to_vec(),
    };
    if xs.len() != 2 || ws.len() != 2 || as_.len() != 2 {
        return Err(Error::shape("lora", format!("x {xs:?}, W0 {ws:?}, A {as_:?} must be matrices")));
    }
    let d = Dims { m: xs[0], k: xs[1], n: ws[0], r: as_[0] };
    expect(x, "x", &[d.m, d.k], DType::BF16)?;
    match w.w0 {
        BaseWeight::Bf16(t) => expect(t, "W0", &[d.n, d.k], DType::BF16)?,
        BaseWeight::Nf4 { k, .. } if k != d.k => {
            return Err(Error::shape("lora", format!("NF4 W0 is {ws:?} but x has {} columns", d.k)))
        }
        BaseWeight::Nf4 { .. } => {}
    }
    expect(w.a, "A", &[d.r, d.k], DType::BF16)?;
    expect(w.b, "B", &[d.n, d.r], DType::BF16)?;
    expect(w.col_scale, "col_scale", &[d.r], DType::F32)?;
    if [d.m, d.n, d.k, d.r].iter().any(|&v| v > i32::MAX as usize / 2) {
        return Err(Error::shape("lora", format!("{d:?} exceeds the kernels' 32-bit indices")));
    }
    Ok(d)
}

pub(crate) fn grid(cols: usize, rows: usize, z: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid: (blocks_for(cols, TILE)?, blocks_for(rows, TILE)?, z as u32),
        block: (THREADS, 1, 1),
        dynamic_smem_bytes: 0,
    })
}

pub(crate) fn out_kernel(base: &str, out: DType) -> Result<String> {
    match out {
        DType::F32 => Ok(format!("{base}_f32out")),
        DType::BF16 => Ok(format!("{base}_bf16out")),
        other => Err(Error::shape(base, format!("output dtype {other:?} unsupported (f32 or bf16)"))),
    }
}

/// What the forward returns: y, and what backward needs.
#[derive(Debug)]
pub struct LoraForward {
    /// y `[M,N]` in the requested dtype.
    pub y: Tensor,
    /// S = drop(x)·Aᵀ `[M,R]` f32.
    pub s: Tensor,
    /// S ⊙ col_scale `[M,R]` bf16 (the operand of the up-projection and of dB).
    pub s_scaled: Tensor,
}

/// Fused forward (split strategy): `lora_down` computes S from one read of x with dropout
/// applied in registers, then the base GEMM runs with the LoRA up-projection as R extra K
/// columns. No mask or dropped copy of x is written.
pub fn lora_forward(
    dev: &Arc<dyn Device>,
    x: &Tensor,
    w: &LoraWeights,
    drop: &DropoutMask,
    out: DType,
) -> Result<LoraForward> {
    lora_forward_with(dev, x, &w.into(), drop, out)
}

/// [`lora_forward`] with W0 bf16 or NF4 (then the base kernel is `qlora_fwd_split_*`).
pub(crate) fn lora_forward_with(
    dev: &Arc<dyn Device>,
    x: &Tensor,
    w: &LoraParts,
    drop: &DropoutMask,
    out: DType,
) -> Result<LoraForward> {
    let d = dims_of(x, w)?;
    let kernel = out_kernel("lora_fwd_split", out)?;
    let (fwd, p) = forward_outputs(dev, x, w.w0.bf16_ptr()?, w.a, w.b, w.col_scale, d, drop, out)?;
    if d.m == 0 {
        return Ok(fwd);
    }
    // SAFETY: every pointer is a live device tensor whose shape `dims` validated.
    unsafe {
        launch_down(dev.as_ref(), &p)?;
        if d.n > 0 {
            w.w0.launch(dev, &kernel, &grid(d.n, d.m, 1)?, &p, |lora, w0| QloraForwardParams { lora, w0 })?;
        }
    }
    Ok(fwd)
}

/// The forward's output tensors (y, S, s_scaled) on `dev` and the kernel parameters that point
/// at them, shared by every forward strategy. `w0` may be null for an NF4 base weight.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_outputs(
    dev: &Arc<dyn Device>,
    x: &Tensor,
    w0: *const u16,
    a: &Tensor,
    b: &Tensor,
    col_scale: &Tensor,
    d: Dims,
    drop: &DropoutMask,
    out: DType,
) -> Result<(LoraForward, LoraForwardParams)> {
    let backend = crate::device::Backend::Device(dev.clone());
    let y = Tensor::empty(&[d.m, d.n], out, &backend)?;
    let s = Tensor::empty(&[d.m, d.r], DType::F32, &backend)?;
    let s_scaled = Tensor::empty(&[d.m, d.r], DType::BF16, &backend)?;
    let p = LoraForwardParams {
        x: x.device_ptr()?.as_ptr(),
        w0,
        a: a.device_ptr()?.as_ptr(),
        b: b.device_ptr()?.as_ptr(),
        s: s.device_ptr()?.as_mut_ptr(),
        s_scaled: s_scaled.device_ptr()?.as_mut_ptr(),
        col_scale: col_scale.device_ptr()?.as_ptr(),
        y: y.device_ptr()?.as_mut_ptr(),
        m: d.m as i32,
        n: d.n as i32,
        k: d.k as i32,
        r: d.r as i32,
        dropout: dropout_params(drop),
    };
    Ok((LoraForward { y, s, s_scaled }, p))
}

/// Gradients of the LoRA linear.
#[derive(Debug)]
pub struct LoraGrads {
    /// dx `[M,K]` in the requested dtype.
    pub dx: Tensor,
    /// dA `[R,K]` f32.
    pub da: Tensor,
    /// dB `[N,R]` f32.
    pub db: Tensor,
}

/// K-splits of the M reduction of dA so that `tiles` output tiles become about
/// [`TARGET_BLOCKS`] blocks; each split covers a multiple of 64 rows. (The tile count is that of
/// 128-wide R tiles, as before `lora_bwd_da` got narrow ones: the splits, and so dA's summation
/// order, stay what they were.)
fn splits_for(m: usize, tiles: usize) -> (usize, usize) {
    let want = TARGET_BLOCKS.div_ceil(tiles.max(1)).clamp(1, m.div_ceil(256).max(1));
    let split_rows = m.div_ceil(want).div_ceil(64) * 64;
    (m.div_ceil(split_rows.max(1)).max(1), split_rows.max(64))
}

/// Fused backward: dS and dB from one pass over dy ([`launch_bwd_ds_db`]; dB's per-128-row
/// partials summed by a deterministic reduction), dA (split over M, the same reduction), dx as
/// the base GEMM dy·W0 with its accumulator started at the masked dS·A term.
///
/// Workspace: ⌈M/128⌉·N·R f32 for dB's partials (the size of dy at R = 64), then
/// splits·R·K f32 for dA's.
pub fn lora_backward(
    dev: &Arc<dyn Device>,
    x: &Tensor,
    w: &LoraWeights,
    s_scaled: &Tensor,
    dy: &Tensor,
    drop: &DropoutMask,
    out: DType,
) -> Result<LoraGrads> {
    lora_backward_with(dev, x, &w.into(), s_scaled, dy, drop, out)
}

/// [`lora_backward`] with W0 bf16 or NF4 (then the dx kernel is `qlora_bwd_dx_*`).
pub(crate) fn lora_backward_with(
    dev: &Arc<dyn Device>,
    x: &Tensor,
    w: &LoraParts,
    s_scaled: &Tensor,
    dy: &Tensor,
    drop: &DropoutMask,
    out: DType,
) -> Result<LoraGrads> {
    let d = dims_of(x, w)?;
    expect(s_scaled, "s_scaled", &[d.m, d.r], DType::BF16)?;
    expect(dy, "dy", &[d.m, d.n], DType::BF16)?;
    let backend = crate::device::Backend::Device(dev.clone());
    let dx = Tensor::empty(&[d.m, d.k], out, &backend)?;
    let mut da = Tensor::empty(&[d.r, d.k], DType::F32, &backend)?;
    let mut db = Tensor::empty(&[d.n, d.r], DType::F32, &backend)?;
    let ds = Tensor::empty(&[d.m, d.r], DType::BF16, &backend)?;
    let dx_kernel = out_kernel("lora_bwd_dx", out)?;
    let dropout = dropout_params(drop);

    let db_splits = ds_db_splits(d.m);
    let (da_splits, da_rows) = splits_for(d.m, d.k.div_ceil(TILE) * d.r.div_ceil(TILE));
    let ws_db = DeviceBuffer::new(dev, db_splits * d.n * d.r * 4)?;
    let ws_da = DeviceBuffer::new(dev, da_splits * d.r * d.k * 4)?;
    let mut p = LoraBackwardParams {
        x: x.device_ptr()?.as_ptr(),
        w0: w.w0.bf16_ptr()?,
        a: w.a.device_ptr()?.as_ptr(),
        b: w.b.device_ptr()?.as_ptr(),
        s_scaled: s_scaled.device_ptr()?.as_ptr(),
        dy: dy.device_ptr()?.as_ptr(),
        ds: ds.device_ptr()?.as_mut_ptr(),
        workspace: ws_db.ptr().as_mut_ptr(),
        dx: dx.device_ptr()?.as_mut_ptr(),
        col_scale: w.col_scale.device_ptr()?.as_ptr(),
        m: d.m as i32,
        n: d.n as i32,
        k: d.k as i32,
        r: d.r as i32,
        split_rows: da_rows as i32,
        dropout,
    };
    let reduce = |partial: DevicePtr, out: DevicePtr, len: usize, splits: usize, scale: f32| -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let rp = SplitKReduceParams {
            partial: partial.as_ptr(),
            out: out.as_mut_ptr(),
            len: len as i64,
            splits: splits as i32,
            scale,
        };
        let cfg = LaunchConfig {
            grid: (blocks_for(len, THREADS as usize)?.min(4096), 1, 1),
            block: (THREADS, 1, 1),
            dynamic_smem_bytes: 0,
        };
        // SAFETY: partial holds splits·len f32, out holds len f32.
        unsafe { dev.launch("splitk_reduce", &cfg, ParamBytes::new(&rp)) }
    };
    let drop_scale = if dropout.threshold != 0 { dropout.scale } else { 1.0 };
    // SAFETY: all pointers are live device tensors/buffers of the validated shapes.
    unsafe {
        if d.m > 0 && d.r > 0 {
            launch_bwd_ds_db(dev.as_ref(), &p)?;
            reduce(ws_db.ptr(), db.device_ptr()?, d.n * d.r, db_splits, 1.0)?;
            p.workspace = ws_da.ptr().as_mut_ptr();
            launch_bwd_da(dev.as_ref(), &p)?;
            reduce(ws_da.ptr(), da.device_ptr()?, d.r * d.k, da_splits, drop_scale)?;
        } else {
            // Empty reductions: the gradients are zero, and ds must be for dx.
            da.fill_bytes(0)?;
            db.fill_bytes(0)?;
        }
        if d.m > 0 && d.k > 0 {
            w.w0.launch(dev, &dx_kernel, &grid(d.k, d.m, 1)?, &p, |lora, w0| QloraBackwardParams { lora, w0 })?;
        }
    }
    Ok(LoraGrads { dx, da, db })
}
