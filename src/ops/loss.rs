//! Causal-LM cross-entropy as transformers computes it (`ForCausalLMLoss`).
//!
//! Labels come unshifted (`[B, T]`): position `t` predicts `labels[b, t+1]`; the last position
//! of each sequence and labels equal to [`IGNORE_INDEX`] do not count. With `N` counted tokens
//! ```text
//! loss = (1/N)·Σ −log softmax(logits[b,t])[labels[b,t+1]]
//! dlogits[b,t] = (softmax(logits[b,t]) − onehot(labels[b,t+1])) / N   (0 where not counted)
//! ```
//! The gradient is computed in the same pass (it is all backward needs), so the op saves
//! `dlogits` instead of the logits.
//!
//! On a device: [`causal_lm_loss_device`] (`kernels/loss.cu`), f32 or bf16 logits; the labels
//! are shifted and checked on the host, as here, so both backends reject the same inputs.

use super::rowwise::{kernel_for, launch};
use super::simd::{exp, par_zeros};
use crate::device::params::CrossEntropyParams;
use crate::device::{Backend, Device, DeviceBuffer};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};
use rayon::prelude::*;
use std::sync::Arc;

crate::simd_fn! {
    /// `g = softmax(l)·scale`; returns `log Σ exp(l)`. One (vectorized) exp per logit: the
    /// exponentials are kept and normalized rather than recomputed from the log-sum-exp.
    fn softmax_row(l: &[f32], scale: f32, g: &mut [f32]) -> f32 {
        // Maximum and sum in 16 lanes each (a single running max or sum does not vectorize).
        let mut mx = [f32::NEG_INFINITY; 16];
        l.chunks(16).for_each(|c| c.iter().zip(&mut mx).for_each(|(&x, m)| *m = m.max(x)));
        let mx = mx.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        g.iter_mut().zip(l).for_each(|(g, &x)| *g = exp(x - mx));
        let mut acc = [0f32; 16];
        let chunks = g.chunks_exact(16);
        let tail: f32 = chunks.remainder().iter().sum();
        chunks.for_each(|c| acc.iter_mut().zip(c).for_each(|(a, &e)| *a += e));
        let sum = acc.iter().sum::<f32>() + tail;
        let s = scale / sum;
        g.iter_mut().for_each(|g| *g *= s);
        mx + sum.ln()
    }
}

/// Label value that is not counted (PyTorch's default `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// The target of each row (`labels` shifted by one within each sequence of `seq`, the last
/// position [`IGNORE_INDEX`]) and `1/N` for the `N` counted rows (0 when none), after checking
/// the shapes and that every counted label is in the vocabulary.
fn targets(logits_len: usize, labels: &[i64], seq: usize, vocab: usize) -> Result<(Vec<i64>, f32)> {
    if seq == 0 || !labels.len().is_multiple_of(seq) || logits_len != labels.len() * vocab {
        return Err(Error::shape(
            "causal_lm_loss",
            format!("logits {logits_len} elements, labels {}, seq {seq}, vocab {vocab}", labels.len()),
        ));
    }
    let targets: Vec<i64> =
        (0..labels.len()).map(|row| if row % seq == seq - 1 { IGNORE_INDEX } else { labels[row + 1] }).collect();
    if let Some(bad) = targets.iter().find(|&&t| t != IGNORE_INDEX && (t < 0 || t as usize >= vocab)) {
        return Err(Error::shape("causal_lm_loss", format!("label {bad} outside the vocabulary 0..{vocab}")));
    }
    let count = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    Ok((targets, if count == 0 { 0.0 } else { 1.0 / count as f32 }))
}

/// Returns `(loss, dlogits)` for `logits [B·T, V]`, `labels [B·T]` (`T = seq`).
/// A batch with no counted token has loss 0 (HF would give NaN) and zero gradient.
pub fn causal_lm_loss(logits: &[f32], labels: &[i64], seq: usize, vocab: usize) -> Result<(f32, Vec<f32>)> {
    let (targets, inv) = targets(logits.len(), labels, seq, vocab)?;
    let mut grad = par_zeros(logits.len());
    let total: f64 = grad
        .par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .enumerate()
        .map(|(r, (g, l))| {
            let t = targets[r];
            if t == IGNORE_INDEX {
                return 0.0;
            }
            let lse = softmax_row(l, inv, g);
            g[t as usize] -= inv;
            (lse - l[t as usize]) as f64
        })
        .sum();
    Ok(((total * inv as f64) as f32, grad))
}

/// Threads per block of the `cross_entropy_*` kernels (one block per row).
const LOSS_THREADS: u32 = 256;

/// [`causal_lm_loss`] on a device: `logits [B·T, V]` (f32 or bf16) in, the loss and `dlogits`
/// (shape and dtype of the logits) out. The per-row terms come back to the host and are summed
/// there in f64, in row order.
pub fn causal_lm_loss_device(
    dev: &Arc<dyn Device>,
    logits: &Tensor,
    labels: &[i64],
    seq: usize,
    vocab: usize,
) -> Result<(f32, Tensor)> {
    let kernel = kernel_for("cross_entropy", &[("logits", logits)])?;
    let (targets, inv) = targets(logits.numel(), labels, seq, vocab)?;
    if vocab > i32::MAX as usize {
        return Err(Error::shape("causal_lm_loss", format!("vocabulary {vocab} exceeds the kernel's 32 bits")));
    }
    let rows = targets.len();
    let backend = Backend::Device(dev.clone());
    let target_bytes: Vec<u8> = targets.iter().flat_map(|t| t.to_le_bytes()).collect();
    let targets_dev = DeviceBuffer::from_host(dev, &target_bytes)?;
    let (loss_rows, dlogits) =
        (Tensor::empty(&[rows], DType::F32, &backend)?, Tensor::empty(logits.shape(), logits.dtype(), &backend)?);
    let p = CrossEntropyParams {
        logits: logits.device_ptr()?.as_ptr(),
        targets: targets_dev.ptr().as_ptr(),
        loss_rows: loss_rows.device_ptr()?.as_mut_ptr(),
        dlogits: dlogits.device_ptr()?.as_mut_ptr(),
        rows: rows as i64,
        vocab: vocab as i32,
        inv_count: inv,
    };
    // SAFETY: logits and dlogits hold rows·vocab elements of the kernel's dtype, targets rows
    // i64 (each IGNORE_INDEX or in 0..vocab), loss_rows rows f32.
    unsafe { launch(dev, &kernel, rows, LOSS_THREADS, &p)? };
    let total: f64 = loss_rows.to_host()?.to_f32().iter().map(|&v| v as f64).sum();
    Ok(((total * inv as f64) as f32, dlogits))
}
