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

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod plot;
pub mod progress;
pub mod schedule;
pub mod trainer;

use crate::autograd::{Grads, Tape};
use crate::model::{Llama, Mode};
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

    /// One update of every adapter `A`/`B` that has a gradient.
    pub fn step(&mut self, model: &mut Llama, grads: &Grads) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2s = (1.0 - b2.powi(self.t as i32)).sqrt();
        let step = self.lr / bc1;
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
                    p[i] -= self.lr * self.weight_decay * p[i];
                    m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                    v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                    p[i] -= step * m[i] / (v[i].sqrt() / bc2s + self.eps);
                }
            }
        }
        Ok(())
    }
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
