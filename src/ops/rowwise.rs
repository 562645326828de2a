//! Launch helpers shared by the Llama layer kernels (`kernels/rowwise.cuh` and the kernels that
//! include it: `norm.cu`, `activation.cu`, `rope.cu`, `loss.cu`, `attention.cu`,
//! `embedding.cu`); each op's wrapper sits beside its CPU reference ([`super::norm`],
//! [`super::activation`], [`super::rope`], [`super::loss`], [`super::attention`],
//! [`super::embedding`]).

use crate::device::params::{
    AttentionParams, CrossEntropyParams, EmbeddingParams, RmsNormParams, RopeParams, SwigluParams,
};
use crate::device::{blocks_for, Device, KernelParams, LaunchConfig, ParamBytes};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};
use std::sync::Arc;

// SAFETY: bindgen-generated #[repr(C)] mirrors of kernels/params.h.
unsafe impl KernelParams for RmsNormParams {}
// SAFETY: as above.
unsafe impl KernelParams for SwigluParams {}
// SAFETY: as above.
unsafe impl KernelParams for RopeParams {}
// SAFETY: as above.
unsafe impl KernelParams for CrossEntropyParams {}
// SAFETY: as above.
unsafe impl KernelParams for AttentionParams {}
// SAFETY: as above.
unsafe impl KernelParams for EmbeddingParams {}

/// Most blocks one launch starts; the kernels loop over the rest (grid stride).
const MAX_BLOCKS: u32 = 1 << 16;

/// The dtype of `tensors`, which must all be device tensors of one dtype (named by their
/// labels in the errors).
pub(crate) fn device_dtype(op: &str, tensors: &[(&str, &Tensor)]) -> Result<DType> {
    let dtype = tensors[0].1.dtype();
    for (what, t) in tensors {
        t.device_ptr().map_err(|_| Error::shape(op, format!("{what} is on the CPU; this op runs on a device")))?;
        if t.dtype() != dtype {
            return Err(Error::shape(op, format!("{what} is {:?}, {} is {dtype:?}", t.dtype(), tensors[0].0)));
        }
    }
    Ok(dtype)
}

/// The kernel `{op}_{f32|bf16}` for `tensors`: device tensors of one of those two dtypes.
pub(crate) fn kernel_for(op: &str, tensors: &[(&str, &Tensor)]) -> Result<String> {
    match device_dtype(op, tensors)? {
        DType::F32 => Ok(format!("{op}_f32")),
        DType::BF16 => Ok(format!("{op}_bf16")),
        other => Err(Error::shape(op, format!("{} is {other:?}; f32 or bf16 expected", tensors[0].0))),
    }
}

/// Checks that `tensors` all have the first one's shape.
pub(crate) fn check_same_shape(op: &str, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let shape = tensors[0].1.shape();
    match tensors.iter().find(|(_, t)| t.shape() != shape) {
        Some((what, t)) => Err(Error::shape(op, format!("{what} is {:?}, {} {shape:?}", t.shape(), tensors[0].0))),
        None => Ok(()),
    }
}

/// 16-byte packs of `elem_bytes`-byte elements that cover `len` elements: the threads of a
/// kernel that gives each thread one pack of a row (or of the whole tensor).
pub(crate) fn packs(len: usize, elem_bytes: usize) -> usize {
    len.div_ceil(16 / elem_bytes)
}

/// Launches `kernel` on `blocks` blocks (capped; the kernel strides over the rest) of `threads`.
///
/// # Safety
/// The pointers in `params` must be device allocations the kernel may read and write as its
/// parameter struct describes.
pub(crate) unsafe fn launch<P: KernelParams>(
    dev: &Arc<dyn Device>,
    kernel: &str,
    blocks: usize,
    threads: u32,
    params: &P,
) -> Result<()> {
    if blocks == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid: (blocks_for(blocks, 1)?.min(MAX_BLOCKS), 1, 1),
        block: (threads, 1, 1),
        dynamic_smem_bytes: 0,
    };
    dev.launch(kernel, &cfg, ParamBytes::new(params))
}
