//! A minimal LoRA training loop: AdamW on the adapters, global-norm gradient clipping.
//! (The trainer issue grows this: data, schedules, checkpoints.)
//!
//! AdamW as `torch.optim.AdamW` (decoupled weight decay), per parameter `p` with gradient `g`
//! at step `t`:
//! ```text
//! p ← p − lr·wd·p
//! m ← β₁m + (1−β₁)g        v ← β₂v + (1−β₂)g²
//! p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)
//! ```
//! Clipping as `torch.nn.utils.clip_grad_norm_`: `g ← g·min(1, max_norm/(‖g‖₂ + 1e-6))` over
//! all adapter gradients together.
//!
//! On a device: [`adamw_update_device`] (the same update, with the clipping factor folded in)
//! and [`sum_squares_device`] (for the norm), `kernels/optim.cu`.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod plot;
pub mod progress;
pub mod schedule;
pub mod trainer;

use crate::autograd::{Grads, Tape};
use crate::device::params::{AdamWParams, SumSquaresParams};
use crate::device::{Backend, Device};
use crate::model::{Llama, Mode};
use crate::ops::rowwise::launch;
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::Arc;

/// AdamW hyper-parameters and state (keyed by tape parameter id).
#[derive(Debug, Clone)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Steps taken.
    pub t: u64,
    state: HashMap<usize, (Vec<f32>, Vec<f32>)>,
}

impl AdamW {
    /// torch's defaults except `lr`: β = (0.9, 0.999), ε = 1e-8, weight decay 0.01.
    pub fn new(lr: f32) -> Self {
        AdamW { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, t: 0, state: HashMap::new() }
    }

    /// The first and second moments per tape parameter id (for checkpoints).
    pub fn moments(&self) -> &HashMap<usize, (Vec<f32>, Vec<f32>)> {
        &self.state
    }

    /// Replaces the moments (resuming from a checkpoint).
    pub fn set_moments(&mut self, moments: HashMap<usize, (Vec<f32>, Vec<f32>)>) {
        self.state = moments;
    }

    /// The constants of update number `t` (1-based).
    pub fn constants(&self, t: u64) -> AdamWStep {
        let (b1, b2) = (self.beta1, self.beta2);
        AdamWStep {
            lr: self.lr,
            beta1: b1,
            beta2: b2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            step: self.lr / (1.0 - b1.powi(t as i32)),
            bc2s: (1.0 - b2.powi(t as i32)).sqrt(),
        }
    }

    /// One update of every adapter `A`/`B` that has a gradient.
    pub fn step(&mut self, model: &mut Llama, grads: &Grads) -> Result<()> {
        self.t += 1;
        let c = self.constants(self.t);
        for lin in model.linears_mut() {
            let Some(l) = lin.lora.as_mut() else { continue };
            for (id, p) in [(2 * l.index, &mut l.a), (2 * l.index + 1, &mut l.b)] {
                let Some(g) = grads.get(id) else { continue };
                let p = Arc::make_mut(p);
                if g.len() != p.len() {
                    return Err(Error::shape(
                        "AdamW",
                        format!("gradient {id} has {} elements, parameter {}", g.len(), p.len()),
                    ));
                }
                let (m, v) = self.state.entry(id).or_insert_with(|| (vec![0.0; g.len()], vec![0.0; g.len()]));
                for i in 0..p.len() {
                    c.update(&mut p[i], g[i], &mut m[i], &mut v[i]);
                }
            }
        }
        Ok(())
    }
}

/// The constants of one AdamW update (torch's `AdamW`, decoupled weight decay), shared by the
/// CPU loop and the device kernel (`kernels/optim.cu`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// `lr / (1 − β1^t)`.
    pub step: f32,
    /// `√(1 − β2^t)`.
    pub bc2s: f32,
}

impl AdamWStep {
    /// One element: `p −= lr·wd·p; m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²;
    /// p −= step·m / (√v / bc2s + eps)`.
    #[inline]
    pub fn update(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        *p -= self.lr * self.weight_decay * *p;
        *m = self.beta1 * *m + (1.0 - self.beta1) * g;
        *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
        *p -= self.step * *m / (v.sqrt() / self.bc2s + self.eps);
    }
}

/// Threads per block of the `kernels/optim.cu` kernels.
const OPTIM_THREADS: u32 = 256;
/// Blocks of `sum_squares_f32`: fixed, so the partials, and the sum, do not depend on timing.
const SUM_SQUARES_BLOCKS: usize = 64;

// SAFETY: bindgen-generated #[repr(C)] mirrors of kernels/params.h.
unsafe impl crate::device::KernelParams for AdamWParams {}
// SAFETY: as above.
unsafe impl crate::device::KernelParams for SumSquaresParams {}

/// Checks that `t` is an f32 device tensor of `n` elements (`n = None`: any).
fn f32_device(what: &str, t: &Tensor, n: Option<usize>) -> Result<()> {
    if t.dtype() != DType::F32 || n.is_some_and(|n| n != t.numel()) || t.device_ptr().is_err() {
        return Err(Error::shape(
            "AdamW (device)",
            format!(
                "{what} is {:?} {:?}; an f32 device tensor of the parameter's size is needed",
                t.dtype(),
                t.shape()
            ),
        ));
    }
    Ok(())
}

/// AdamW on the device (`kernels/optim.cu`): `p`, `m`, `v` updated in place from the gradient
/// `g·grad_scale` (the clipping factor), all f32 device tensors of one size, elementwise as
/// [`AdamWStep::update`].
pub fn adamw_update_device(
    dev: &Arc<dyn Device>,
    c: &AdamWStep,
    (p, g, m, v): (&Tensor, &Tensor, &Tensor, &Tensor),
    grad_scale: f32,
) -> Result<()> {
    let n = p.numel();
    for (what, t) in [("parameter", p), ("gradient", g), ("first moment", m), ("second moment", v)] {
        f32_device(what, t, Some(n))?;
    }
    let a = AdamWParams {
        p: p.device_ptr()?.as_mut_ptr(),
        g: g.device_ptr()?.as_ptr(),
        m: m.device_ptr()?.as_mut_ptr(),
        v: v.device_ptr()?.as_mut_ptr(),
        n: n as i64,
        lr: c.lr,
        beta1: c.beta1,
        beta2: c.beta2,
        eps: c.eps,
        weight_decay: c.weight_decay,
        step: c.step,
        bc2s: c.bc2s,
        grad_scale,
    };
    // SAFETY: the four tensors hold n f32 each.
    unsafe { launch(dev, "adamw_f32", n.div_ceil(4).div_ceil(OPTIM_THREADS as usize), OPTIM_THREADS, &a) }
}

/// `Σ x²` of an f32 device tensor (for [`clip_grad_norm`] on the device): per-block partials
/// in a fixed order, added on the host in f64.
pub fn sum_squares_device(dev: &Arc<dyn Device>, x: &Tensor) -> Result<f64> {
    f32_device("input", x, None)?;
    let blocks = SUM_SQUARES_BLOCKS.min(x.numel().div_ceil(OPTIM_THREADS as usize)).max(1);
    let partials = Tensor::empty(&[blocks], DType::F32, &Backend::Device(dev.clone()))?;
    let s = SumSquaresParams {
        x: x.device_ptr()?.as_ptr(),
        partials: partials.device_ptr()?.as_mut_ptr(),
        n: x.numel() as i64,
    };
    // SAFETY: x holds n f32, partials one f32 per block.
    unsafe { launch(dev, "sum_squares_f32", blocks, OPTIM_THREADS, &s)? };
    Ok(partials.to_host()?.to_f32().iter().map(|&v| v as f64).sum())
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f32) -> f32 {
    let total = grads.0.values().flat_map(|g| g.iter()).map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt() as f32;
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        grads.0.values_mut().for_each(|g| g.iter_mut().for_each(|x| *x *= coef));
    }
    total
}

/// Asks glibc's allocator to keep freed memory instead of returning it to the OS.
///
/// A training step allocates and frees the same large activation buffers every time; with
/// glibc's defaults each comes back from `mmap` as fresh pages, and the page faults cost about
/// a third of a CPU step on the benchmark. (PyTorch avoids the same cost with its caching
/// allocators.) No-op on other platforms.
pub fn retain_heap_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        const M_ARENA_MAX: i32 = -8;
        // SAFETY: mallopt only changes allocator tunables; the values are in range.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 1 << 30);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
            // One arena: the step's buffers are allocated on whichever rayon thread runs the
            // op, and per-thread arenas would each keep a step's worth of freed memory
            // (measured 99 MiB peak instead of 58 MiB for the default run).
            mallopt(M_ARENA_MAX, 1);
        }
    }
}

/// Loss and adapter gradients of one batch (`ids`, unshifted `labels`, `batch` sequences).
pub fn loss_and_grads(
    model: &Llama,
    ids: &[u32],
    labels: &[i64],
    batch: usize,
    dropout_step: u64,
) -> Result<(f32, Grads)> {
    // Inside the pool: the many short parallel ops then start from a worker thread, which works
    // on them itself, instead of the main thread waking a worker and sleeping until it is done
    // (futex round trips that cost 2-4% of a step on the benchmark).
    rayon::scope(|_| {
        let tape = Tape::new();
        let (loss, _) = model.loss(&tape, ids, labels, batch, Mode { train: true, dropout_step })?;
        let grads = tape.backward(&loss)?;
        Ok((loss.item(), grads))
    })
}

/// One training step: forward, backward, clipping (when `max_grad_norm > 0`), AdamW.
/// Returns the loss before the update.
pub fn train_step(
    model: &mut Llama,
    opt: &mut AdamW,
    ids: &[u32],
    labels: &[i64],
    batch: usize,
    max_grad_norm: f32,
) -> Result<f32> {
    let (loss, mut grads) = loss_and_grads(model, ids, labels, batch, opt.t)?;
    if max_grad_norm > 0.0 {
        clip_grad_norm(&mut grads, max_grad_norm);
    }
    opt.step(model, &grads)?;
    Ok(loss)
}
