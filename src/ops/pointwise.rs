//! Pointwise tensor arithmetic between the layer ops of a training step, on a device
//! (`kernels/pointwise.cu`): the residual add and the f32 → bf16 cast. Their CPU counterparts
//! are [`super::simd::par_add`] and `half::bf16::from_f32` (round to nearest even), which the
//! simulator tests compare with.

use super::rowwise::{check_same_shape, device_dtype, kernel_for, launch, packs};
use crate::device::params::PointwiseParams;
use crate::device::{Backend, Device, KernelParams};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};
use std::sync::Arc;

// SAFETY: bindgen-generated #[repr(C)] mirror of kernels/params.h.
unsafe impl KernelParams for PointwiseParams {}

/// Threads per block of the `kernels/pointwise.cu` kernels.
const POINTWISE_THREADS: u32 = 256;

/// `a + b` for two device tensors of one shape and dtype (f32 or bf16), rounded once.
pub fn add_device(dev: &Arc<dyn Device>, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let operands = [("a", a), ("b", b)];
    let kernel = kernel_for("add", &operands)?;
    check_same_shape("add", &operands)?;
    let out = Tensor::empty(a.shape(), a.dtype(), &Backend::Device(dev.clone()))?;
    let p = PointwiseParams {
        a: a.device_ptr()?.as_ptr(),
        b: b.device_ptr()?.as_ptr(),
        out: out.device_ptr()?.as_mut_ptr(),
        n: a.numel() as i64,
    };
    // SAFETY: a, b, out hold n elements of the kernel's dtype.
    unsafe {
        launch(
            dev,
            &kernel,
            packs(a.numel(), a.dtype().size()).div_ceil(POINTWISE_THREADS as usize),
            POINTWISE_THREADS,
            &p,
        )?
    };
    Ok(out)
}

/// An f32 device tensor as bf16 (round to nearest even), same shape.
pub fn cast_to_bf16_device(dev: &Arc<dyn Device>, a: &Tensor) -> Result<Tensor> {
    if device_dtype("cast to bf16", &[("input", a)])? != DType::F32 {
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
    unsafe {
        launch(dev, "cast_f32_bf16", packs(a.numel(), 2).div_ceil(POINTWISE_THREADS as usize), POINTWISE_THREADS, &p)?
    };
    Ok(out)
}
