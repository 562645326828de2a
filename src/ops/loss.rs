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

use crate::{Error, Result};
use rayon::prelude::*;

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
    let mut grad = vec![0.0; logits.len()];
    let total: f64 = grad
        .par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .enumerate()
        .map(|(r, (g, l))| {
            let t = target(r);
            if t == IGNORE_INDEX {
                return 0.0;
            }
            let mx = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = l.iter().map(|x| (x - mx).exp()).sum();
            let lse = mx + sum.ln();
            g.iter_mut().zip(l).for_each(|(g, x)| *g = (x - lse).exp() * inv);
            g[t as usize] -= inv;
            (lse - l[t as usize]) as f64
        })
        .sum();
    Ok(((total * inv as f64) as f32, grad))
}
