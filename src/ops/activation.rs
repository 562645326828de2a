//! SwiGLU: `h = silu(g)·u`, `silu(g) = g·σ(g)` (Llama's MLP between gate/up and down).
//!
//! Backward: `dg = dh·u·σ(g)·(1 + g·(1 − σ(g)))`, `du = dh·silu(g)`; it needs `g` and `u`.
//!
//! On a device: [`swiglu_forward_device`], [`swiglu_backward_device`] (`kernels/activation.cu`),
//! f32 or bf16 tensors, f32 arithmetic; in bf16 `silu(g)` is rounded before the product, as
//! Hugging Face's `act_fn(gate) * up` does.

use super::rowwise::{check_same_shape, kernel_for, launch, packs};
use crate::device::params::SwigluParams;
use crate::device::{Backend, Device};
use crate::tensor::Tensor;
use crate::{Error, Result};
use rayon::prelude::*;
use std::sync::Arc;

use super::simd::{exp, par_new};
use std::mem::MaybeUninit;

/// Elements per parallel task.
const GRAIN: usize = 4096;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

// Outputs are written as `MaybeUninit`: every element is written once, so the buffers need no
// zero-fill pass before.
crate::simd_fn! {
    fn swiglu_rows(g: &[f32], u: &[f32], h: &mut [MaybeUninit<f32>]) {
        h.iter_mut().zip(g.iter().zip(u)).for_each(|(h, (&g, &u))| _ = h.write(g * sigmoid(g) * u))
    }
}

crate::simd_fn! {
    fn swiglu_back_rows(dh: &[f32], g: &[f32], u: &[f32], dg: &mut [MaybeUninit<f32>], du: &mut [MaybeUninit<f32>]) {
        for i in 0..dg.len() {
            let s = sigmoid(g[i]);
            dg[i].write(dh[i] * u[i] * s * (1.0 + g[i] * (1.0 - s)));
            du[i].write(dh[i] * g[i] * s);
        }
    }
}

/// `h = silu(g)·u`, elementwise.
pub fn swiglu_forward(g: &[f32], u: &[f32]) -> Result<Vec<f32>> {
    if g.len() != u.len() {
        return Err(Error::shape("swiglu", format!("gate has {} elements, up {}", g.len(), u.len())));
    }
    Ok(par_new(g.len(), GRAIN, |i, h| swiglu_rows(&g[i * GRAIN..][..h.len()], &u[i * GRAIN..][..h.len()], h)))
}

/// `(dg, du)` from `dh` and the saved `g`, `u`.
pub fn swiglu_backward(dh: &[f32], g: &[f32], u: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = g.len().min(u.len()).min(dh.len());
    let (mut dg, mut du) = (Vec::with_capacity(n), Vec::with_capacity(n));
    dg.spare_capacity_mut()[..n]
        .par_chunks_mut(GRAIN)
        .zip(du.spare_capacity_mut()[..n].par_chunks_mut(GRAIN))
        .zip(dh.par_chunks(GRAIN).zip(g.par_chunks(GRAIN).zip(u.par_chunks(GRAIN))))
        .for_each(|((dg, du), (dh, (g, u)))| swiglu_back_rows(dh, g, u, dg, du));
    // SAFETY: swiglu_back_rows wrote every element of the first n of both.
    unsafe {
        dg.set_len(n);
        du.set_len(n);
    }
    (dg, du)
}

/// Threads per block of the `swiglu_*` kernels.
const SWIGLU_THREADS: u32 = 256;

/// [`swiglu_forward`] on a device: `h = silu(g)·u` for `g`, `u` of one shape, both f32 or
/// both bf16.
pub fn swiglu_forward_device(dev: &Arc<dyn Device>, g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let operands = [("gate", g), ("up", u)];
    let kernel = kernel_for("swiglu_fwd", &operands)?;
    check_same_shape("swiglu", &operands)?;
    let h = Tensor::empty(g.shape(), g.dtype(), &Backend::Device(dev.clone()))?;
    let p = SwigluParams {
        g: g.device_ptr()?.as_ptr(),
        u: u.device_ptr()?.as_ptr(),
        dh: std::ptr::null(),
        out: h.device_ptr()?.as_mut_ptr(),
        out2: std::ptr::null_mut(),
        n: g.numel() as i64,
    };
    // SAFETY: g, u, h hold n elements of the kernel's dtype.
    unsafe {
        launch(dev, &kernel, packs(g.numel(), g.dtype().size()).div_ceil(SWIGLU_THREADS as usize), SWIGLU_THREADS, &p)?
    };
    Ok(h)
}

/// [`swiglu_backward`] on a device: `(dg, du)` from `dh` and the saved `g`, `u` (one shape and
/// dtype, f32 or bf16).
pub fn swiglu_backward_device(dev: &Arc<dyn Device>, dh: &Tensor, g: &Tensor, u: &Tensor) -> Result<(Tensor, Tensor)> {
    let operands = [("gate", g), ("up", u), ("output gradient", dh)];
    let kernel = kernel_for("swiglu_bwd", &operands)?;
    check_same_shape("swiglu backward", &operands)?;
    let backend = Backend::Device(dev.clone());
    let (dg, du) = (Tensor::empty(g.shape(), g.dtype(), &backend)?, Tensor::empty(g.shape(), g.dtype(), &backend)?);
    let p = SwigluParams {
        g: g.device_ptr()?.as_ptr(),
        u: u.device_ptr()?.as_ptr(),
        dh: dh.device_ptr()?.as_ptr(),
        out: dg.device_ptr()?.as_mut_ptr(),
        out2: du.device_ptr()?.as_mut_ptr(),
        n: g.numel() as i64,
    };
    // SAFETY: every pointer holds n elements of the kernel's dtype.
    unsafe {
        launch(dev, &kernel, packs(g.numel(), g.dtype().size()).div_ceil(SWIGLU_THREADS as usize), SWIGLU_THREADS, &p)?
    };
    Ok((dg, du))
}
