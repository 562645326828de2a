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

use super::simd::{exp, par_zeros};
use crate::{Error, Result};
use rayon::prelude::*;

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

/// Returns `(loss, dlogits)` for `logits [B·T, V]`, `labels [B·T]` (`T = seq`).
/// A batch with no counted token has loss 0 (HF would give NaN) and zero gradient.
pub fn causal_lm_loss(logits: &[f32], labels: &[i64], seq: usize, vocab: usize) -> Result<(f32, Vec<f32>)> {
    if seq == 0 || !labels.len().is_multiple_of(seq) || logits.len() != labels.len() * vocab {
        return Err(Error::shape(
            "causal_lm_loss",
            format!("logits {} elements, labels {}, seq {seq}, vocab {vocab}", logits.len(), labels.len()),
        ));
    }
    let target = |row: usize| if row % seq == seq - 1 { IGNORE_INDEX } else { labels[row + 1] };
    if let Some(bad) = (0..labels.len()).map(target).find(|&t| t != IGNORE_INDEX && (t < 0 || t as usize >= vocab)) {
        return Err(Error::shape("causal_lm_loss", format!("label {bad} outside the vocabulary 0..{vocab}")));
    }
    let count = (0..labels.len()).filter(|&r| target(r) != IGNORE_INDEX).count();
    let inv = if count == 0 { 0.0 } else { 1.0 / count as f32 };
    let mut grad = par_zeros(logits.len());
    let total: f64 = grad
        .par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .enumerate()
        .map(|(r, (g, l))| {
            let t = target(r);
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
