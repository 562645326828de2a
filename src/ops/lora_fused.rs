//! Launch code for the single-pass fused LoRA forward (`kernels/lora_fused.cu`): one kernel runs
//! the base GEMM `x·W0ᵀ`, accumulates `S = drop(x)·Aᵀ` from the same x tiles in shared memory
//! (Philox mask applied on the way, never stored), and adds `(S ⊙ col_scale)·Bᵀ` in its
//! epilogue. S is recomputed by every N-tile; N-tile 0 writes S and `s_scaled` exactly as
//! `lora_down` does, so backward ([`crate::ops::lora_kernels::lora_backward`]) is shared with
//! the split strategy ([`crate::ops::lora_kernels::lora_forward`]).
//!
//! Rank: R ≤ [`FUSED_MAX_RANK`] per launch (S lives in shared memory); larger ranks use the split
//! strategy. Bytes, FLOPs and when to prefer which strategy: the header of the kernel file.

use crate::device::{Device, ParamBytes};
use crate::ops::lora_kernels::{dims, forward_outputs, grid, launch_down, out_kernel, LoraForward, LoraWeights};
use crate::ops::philox::DropoutMask;
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};
use std::sync::Arc;

/// The largest R (columns of S, all stacked targets together) one fused launch handles.
pub const FUSED_MAX_RANK: usize = 64;

/// Dynamic shared memory of `lora_fwd_fused_*` for rank `r`: the GEMM's x and W0 tiles
/// (2·128·72 bf16), the A tile (64·72 bf16), 8 KiB of f32 S accumulators per 16 columns of S,
/// and with dropout the masked x tile (128·72 bf16). Mirrors the layout in the kernel.
pub fn fused_smem_bytes(r: usize, dropout: bool) -> u32 {
    let gemm_tiles = 2 * 128 * 72 * 2;
    let a_tile = 64 * 72 * 2;
    let s_acc = r.div_ceil(16) * 2 * 256 * 16;
    let x_dropped = if dropout { 128 * 72 * 2 } else { 0 };
    (gemm_tiles + a_tile + s_acc + x_dropped) as u32
}

/// Fused forward, single-pass strategy: y `[M,N]` (`out`: f32 or bf16), S `[M,R]` f32 and
/// s_scaled `[M,R]` bf16, from one kernel launch that reads x once per N-tile like the base GEMM.
/// No mask, dropped copy of x, or S round trip goes through global memory.
///
/// Errors: the shape errors of the split strategy, and R > [`FUSED_MAX_RANK`].
pub fn lora_forward_fused(
    dev: &Arc<dyn Device>,
    x: &Tensor,
    w: &LoraWeights,
    drop: &DropoutMask,
    out: DType,
) -> Result<LoraForward> {
    let d = dims(x, w)?;
    if d.r > FUSED_MAX_RANK {
        return Err(Error::shape(
            "lora_forward_fused",
            format!(
                "rank R = {} exceeds the single-pass kernel's {FUSED_MAX_RANK} (S is kept in shared memory); \
                 use the split strategy, ops::lora_kernels::lora_forward",
                d.r
            ),
        ));
    }
    let kernel = out_kernel("lora_fwd_fused", out)?;
    let (fwd, p) = forward_outputs(dev, x, w.w0.device_ptr()?.as_ptr(), w.a, w.b, w.col_scale, d, drop, out)?;
    if d.m == 0 {
        return Ok(fwd);
    }
    // SAFETY: every pointer is a live device tensor whose shape `dims` validated; the dynamic
    // shared memory matches the kernel's layout for this R and dropout setting.
    unsafe {
        if d.n == 0 {
            // No N-tile to carry S: lora_down_rt* alone computes it (y is empty).
            launch_down(dev.as_ref(), &p)?;
        } else {
            let mut cfg = grid(d.n, d.m, 1)?;
            cfg.dynamic_smem_bytes = fused_smem_bytes(d.r, p.dropout.threshold != 0);
            dev.launch(&kernel, &cfg, ParamBytes::new(&p))?;
        }
    }
    Ok(fwd)
}
