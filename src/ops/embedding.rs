//! Token embedding lookup: `out[t] = table[ids[t]]` (`table [V, d]`, frozen: no backward).
//!
//! On a device: [`embedding_device`] (`kernels/embedding.cu`), f32 or bf16 tables.

use super::rowwise::{kernel_for, launch, packs};
use crate::device::params::EmbeddingParams;
use crate::device::{Backend, Device, DeviceBuffer};
use crate::tensor::Tensor;
use crate::{Error, Result};
use std::sync::Arc;

/// The first id `≥ vocab`, as the error both backends give.
fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(Error::shape("embedding", format!("token id {id} outside the vocabulary 0..{vocab}"))),
        None => Ok(()),
    }
}

/// Gathers rows of `table [V, d]` for `ids`; errors on an id `≥ V`.
pub fn embedding(table: &[f32], dim: usize, ids: &[u32]) -> Result<Vec<f32>> {
    let vocab = table.len() / dim.max(1);
    check_ids(ids, vocab)?;
    let mut out = Vec::with_capacity(ids.len() * dim);
    for &id in ids {
        let i = id as usize;
        out.extend_from_slice(&table[i * dim..(i + 1) * dim]);
    }
    Ok(out)
}

/// Threads per block of the `embedding_*` kernels.
const EMBEDDING_THREADS: u32 = 256;

/// [`embedding`] on a device: `table [V, d]` (f32 or bf16) in, `[ids.len(), d]` of its dtype out.
pub fn embedding_device(dev: &Arc<dyn Device>, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let kernel = kernel_for("embedding", &[("embedding table", table)])?;
    let &[vocab, dim] = table.shape() else {
        return Err(Error::shape("embedding", format!("table {:?} is not [vocab, dim]", table.shape())));
    };
    if dim > i32::MAX as usize {
        return Err(Error::shape("embedding", format!("rows of {dim} exceed the kernel's 32 bits")));
    }
    check_ids(ids, vocab)?;
    let out = Tensor::empty(&[ids.len(), dim], table.dtype(), &Backend::Device(dev.clone()))?;
    if ids.is_empty() || dim == 0 {
        return Ok(out);
    }
    let id_bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
    let ids_dev = DeviceBuffer::from_host(dev, &id_bytes)?;
    let p = EmbeddingParams {
        table: table.device_ptr()?.as_ptr(),
        ids: ids_dev.ptr().as_ptr(),
        out: out.device_ptr()?.as_mut_ptr(),
        tokens: ids.len() as i64,
        dim: dim as i32,
    };
    let units = ids.len() * packs(dim, table.dtype().size());
    // SAFETY: table holds vocab·dim elements and every id is < vocab; out holds tokens·dim.
    unsafe { launch(dev, &kernel, units.div_ceil(EMBEDDING_THREADS as usize), EMBEDDING_THREADS, &p) }?;
    Ok(out)
}
