//! RMSNorm as Hugging Face's `LlamaRMSNorm` computes it (f32 path).
//!
//! ```text
//! rstd[m] = 1/√(mean_k x[m,k]² + eps)          y[m,k] = w[k]·(x[m,k]·rstd[m])
//! dx[m,k] = rstd[m]·(g[m,k] − x̂[m,k]·mean_j(g[m,j]·x̂[m,j])),  g = dy·w,  x̂ = x·rstd
//! ```
//! HF normalizes in f32, casts the normalized value back to the input dtype, then multiplies
//! by the weight; on the f32 path the casts are no-ops. The weight is frozen under LoRA, so
//! backward returns `dx` only.
//!
//! On a device: [`rms_norm_forward_device`], [`rms_norm_backward_device`] (`kernels/norm.cu`),
//! f32 or bf16 tensors, f32 arithmetic, the bf16 path rounding where Hugging Face's does.

use super::rowwise::{kernel_for, launch};
use super::simd::par_zeros;
use crate::device::params::RmsNormParams;
use crate::device::{Backend, Device};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};
use rayon::prelude::*;
use std::sync::Arc;

/// Rows per parallel task (a row is only a few hundred values).
const ROWS: usize = 32;

/// `Σ f(a_i, b_i, c_i)` in 16 interleaved partial sums: vectorizes, unlike one running sum
/// whose every add waits for the previous one; the order is fixed, so results are deterministic.
#[inline(always)]
fn sum16(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb, cc) = (a.chunks_exact(16), b.chunks_exact(16), c.chunks_exact(16));
    let (ra, rb, rc) = (ca.remainder(), cb.remainder(), cc.remainder());
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for l in 0..16 {
            acc[l] += f(x[l], y[l], z[l]);
        }
    }
    let tail: f32 = (0..ra.len()).map(|i| f(ra[i], rb[i], rc[i])).sum();
    acc.iter().sum::<f32>() + tail
}

crate::simd_fn! {
    fn forward_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], rstd: &mut [f32]) {
        let k = w.len();
        for ((yr, xr), rs) in y.chunks_exact_mut(k).zip(x.chunks_exact(k)).zip(rstd) {
            *rs = 1.0 / (sum16(xr, xr, xr, |x, _, _| x * x) / k as f32 + eps).sqrt();
            yr.iter_mut().zip(xr).zip(w).for_each(|((y, x), w)| *y = w * (x * *rs));
        }
    }
}

crate::simd_fn! {
    fn backward_rows(dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32], dx: &mut [f32]) {
        let k = w.len();
        let rows = dx.chunks_exact_mut(k).zip(x.chunks_exact(k)).zip(dy.chunks_exact(k)).zip(rstd);
        for (((dxr, xr), dyr), &rs) in rows {
            let dot = sum16(xr, dyr, w, |x, dy, w| dy * w * x * rs) / k as f32;
            dxr.iter_mut().zip(xr).zip(dyr.iter().zip(w)).for_each(|((dx, &x), (&dy, &w))| {
                *dx = rs * (dy * w - x * rs * dot);
            });
        }
    }
}

/// Forward over rows of length `k`: returns `y` and the saved `rstd [m]`.
pub fn rms_norm_forward(x: &[f32], w: &[f32], eps: f32) -> Result<(Vec<f32>, Vec<f32>)> {
    let k = w.len();
    if k == 0 || !x.len().is_multiple_of(k) {
        return Err(Error::shape("rms_norm", format!("input of {} elements is not rows of {k}", x.len())));
    }
    let (mut y, mut rstd) = (par_zeros(x.len()), vec![0.0; x.len() / k]);
    y.par_chunks_mut(ROWS * k)
        .zip(rstd.par_chunks_mut(ROWS))
        .zip(x.par_chunks(ROWS * k))
        .for_each(|((y, rstd), x)| forward_rows(x, w, eps, y, rstd));
    Ok((y, rstd))
}

/// Backward: `dx` from `dy`, the input `x`, the weight and the saved `rstd`.
pub fn rms_norm_backward(dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32]) -> Vec<f32> {
    let k = w.len();
    let mut dx = par_zeros(x.len());
    dx.par_chunks_mut(ROWS * k)
        .zip(x.par_chunks(ROWS * k))
        .zip(dy.par_chunks(ROWS * k).zip(rstd.par_chunks(ROWS)))
        .for_each(|((dx, x), (dy, rstd))| backward_rows(dy, x, w, rstd, dx));
    dx
}

/// Threads per block of the `rms_norm_*` kernels (one block per row; `NORM_THREADS` in the kernel).
const NORM_THREADS: u32 = 128;

/// `(rows, k)` of `x [rows, k]` normalized with weight `w [k]`.
fn row_shape(x: &Tensor, w: &Tensor) -> Result<(usize, usize)> {
    let k = w.numel();
    if w.shape().len() != 1 || k == 0 || !x.numel().is_multiple_of(k) || x.shape().last() != Some(&k) {
        return Err(Error::shape(
            "rms_norm",
            format!("input {:?} is not rows of the weight's {:?}", x.shape(), w.shape()),
        ));
    }
    if k > i32::MAX as usize {
        return Err(Error::shape("rms_norm", format!("rows of {k} exceed the kernel's 32-bit row length")));
    }
    Ok((x.numel() / k, k))
}

/// [`rms_norm_forward`] on a device: `x [.., k]` and `w [k]`, both f32 or both bf16. Returns `y`
/// (shape and dtype of `x`) and `rstd [rows]` f32 for the backward.
pub fn rms_norm_forward_device(dev: &Arc<dyn Device>, x: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let kernel = kernel_for("rms_norm_fwd", &[("input", x), ("weight", w)])?;
    let (rows, k) = row_shape(x, w)?;
    let backend = Backend::Device(dev.clone());
    let (y, rstd) = (Tensor::empty(x.shape(), x.dtype(), &backend)?, Tensor::empty(&[rows], DType::F32, &backend)?);
    let p = RmsNormParams {
        x: x.device_ptr()?.as_ptr(),
        w: w.device_ptr()?.as_ptr(),
        dy: std::ptr::null(),
        rstd: rstd.device_ptr()?.as_mut_ptr(),
        out: y.device_ptr()?.as_mut_ptr(),
        rows: rows as i64,
        k: k as i32,
        eps,
    };
    // SAFETY: x, y hold rows·k elements of the kernel's dtype, w k of them, rstd rows f32.
    unsafe { launch(dev, &kernel, rows, NORM_THREADS, &p)? };
    Ok((y, rstd))
}

/// [`rms_norm_backward`] on a device: `dx` (shape and dtype of `x`) from `dy` and `x` (same
/// shape and dtype), the weight and the forward's `rstd [rows]` f32.
pub fn rms_norm_backward_device(
    dev: &Arc<dyn Device>,
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
) -> Result<Tensor> {
    let kernel = kernel_for("rms_norm_bwd", &[("input", x), ("weight", w), ("output gradient", dy)])?;
    let (rows, k) = row_shape(x, w)?;
    if dy.shape() != x.shape() || rstd.dtype() != DType::F32 || rstd.numel() != rows {
        return Err(Error::shape(
            "rms_norm backward",
            format!("dy {:?}, rstd {:?} {:?} for input {:?}", dy.shape(), rstd.shape(), rstd.dtype(), x.shape()),
        ));
    }
    let dx = Tensor::empty(x.shape(), x.dtype(), &Backend::Device(dev.clone()))?;
    let p = RmsNormParams {
        x: x.device_ptr()?.as_ptr(),
        w: w.device_ptr()?.as_ptr(),
        dy: dy.device_ptr()?.as_ptr(),
        rstd: rstd.device_ptr()?.as_mut_ptr(),
        out: dx.device_ptr()?.as_mut_ptr(),
        rows: rows as i64,
        k: k as i32,
        eps: 0.0,
    };
    // SAFETY: x, dy, dx hold rows·k elements of the kernel's dtype, w k, rstd rows f32.
    unsafe { launch(dev, &kernel, rows, NORM_THREADS, &p)? };
    Ok(dx)
}
