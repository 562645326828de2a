//! Pointwise tensor arithmetic between the layer ops of a training step, on a device
//! (`kernels/pointwise.cu`): the residual add and the f32 → bf16 cast. Their CPU counterparts
//! are [`super::simd::par_add`] and `half::bf16::from_f32` (round to nearest even), which the
//! simulator tests compare with.

use super::rowwise::{kernel_for, launch};
use crate::device::params::PointwiseParams;
use crate::device::{Backend, Device, KernelParams};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};
use std::sync::Arc;

// SAFETY: bindgen-generated #[repr(C)] mirror of kernels/params.h.
unsafe impl KernelParams for PointwiseParams {}

/// Threads per block of the `kernels/pointwise.cu` kernels.
const POINTWISE_THREADS: u32 = 256;

/// Blocks for `n` outputs of `elem_bytes` bytes, one 16-byte pack per thread.
fn blocks(n: usize, elem_bytes: usize) -> usize {
    n.div_ceil(16 / elem_bytes).div_ceil(POINTWISE_THREADS as usize)
}

/// `a + b` for two device tensors of one shape and dtype (f32 or bf16), rounded once.
pub fn add_device(dev: &Arc<dyn Device>, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let kernel = kernel_for("add", &[("a", a), ("b", b)])?;
    if a.shape() != b.shape() {
        return Err(Error::shape("add", format!("a is {:?}, b {:?}", a.shape(), b.shape())));
    }
    let out = Tensor::empty(a.shape(), a.dtype(), &Backend::Device(dev.clone()))?;
    let p = PointwiseParams {
        a: a.device_ptr()?.as_ptr(),
        b: b.device_ptr()?.as_ptr(),
        out: out.device_ptr()?.as_mut_ptr(),
        n: a.numel() as i64,
    };
    // SAFETY: a, b, out hold n elements of the kernel's dtype.
    unsafe { launch(dev, &kernel, blocks(a.numel(), a.dtype().size()), POINTWISE_THREADS, &p)? };
    Ok(out)
}

/// An f32 device tensor as bf16 (round to nearest even), same shape.
pub fn cast_to_bf16_device(dev: &Arc<dyn Device>, a: &Tensor) -> Result<Tensor> {
    kernel_for("cast", &[("input", a)])?;
    if a.dtype() != DType::F32 {
        return Err(Error::shape("cast to bf16", format!("input is {:?}; f32 expected", a.dtype())));
    }
    let out = Tensor::empty(a.shape(), DType::BF16, &Backend::Device(dev.clone()))?;
    let p = PointwiseParams {
        a: a.device_ptr()?.as_ptr(),
        b: std::ptr::null(),
        out: out.device_ptr()?.as_mut_ptr(),
        n: a.numel() as i64,
    };
    // SAFETY: a holds n f32, out n bf16.
    unsafe { launch(dev, "cast_f32_bf16", blocks(a.numel(), 2), POINTWISE_THREADS, &p)? };
    Ok(out)
}
