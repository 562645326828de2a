//! Rotary position embedding in Hugging Face's `rotate_half` layout, with `llama3` scaling.
//!
//! For head dimension `d`, dimension `i < d/2` pairs with `i + d/2`, both at frequency `f_i`:
//! ```text
//! out[i]       = q[i]·cos θ − q[i+d/2]·sin θ        θ = pos·f_i
//! out[i+d/2]   = q[i+d/2]·cos θ + q[i]·sin θ
//! ```
//! Backward is the rotation by `−θ`. `f_i = 1/theta^(2i/d)` in f32, optionally rescaled by
//! the `llama3` rule (see [`RopeScaling`]).

use crate::{Error, Result};
use rayon::prelude::*;

/// Llama-3 frequency scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: f32,
}

/// Inverse frequencies `f_i`, `i < d/2`, as transformers computes them in f32.
///
/// llama3: with `λ = 2π/f`, `λ_lo = orig/low`, `λ_hi = orig/high`: `λ < λ_hi` keeps `f`,
/// `λ > λ_lo` gives `f/factor`, otherwise `(1−t)·f/factor + t·f`, `t = (orig/λ − low)/(high − low)`.
pub fn inv_freq(head_dim: usize, theta: f32, scaling: Option<&RopeScaling>) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let f = 1.0 / theta.powf((2 * i) as f32 / head_dim as f32);
            match scaling {
                None => f,
                Some(s) => {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let lo = s.original_max_position_embeddings / s.low_freq_factor;
                    let hi = s.original_max_position_embeddings / s.high_freq_factor;
                    if wavelen < hi {
                        f
                    } else if wavelen > lo {
                        f / s.factor
                    } else {
                        let t = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                            / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - t) * f / s.factor + t * f
                    }
                }
            }
        })
        .collect()
}

/// `cos θ`, `sin θ` for positions `0..max_pos`, `[max_pos, d/2]` each (θ = pos·f in f32).
#[derive(Debug, Clone)]
pub struct RopeTable {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(inv_freq: &[f32], max_pos: usize) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for &f in inv_freq {
                let th = p as f32 * f;
                cos.push(th.cos());
                sin.push(th.sin());
            }
        }
        RopeTable { half, cos, sin }
    }
    pub fn max_pos(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }
}

/// Rotates `x [rows, heads·d]` in place; row `r` is at position `pos0 + r % seq`
/// (`seq` rows per sequence). `inverse` rotates by `−θ` (the backward).
pub fn apply(x: &mut [f32], heads: usize, seq: usize, pos0: usize, t: &RopeTable, inverse: bool) -> Result<()> {
    let (h2, d) = (t.half, 2 * t.half);
    if !x.len().is_multiple_of(heads * d) || seq == 0 {
        return Err(Error::shape("rope", format!("{} elements are not rows of {heads}×{d}", x.len())));
    }
    let rows = x.len() / (heads * d);
    if pos0 + seq.min(rows) > t.max_pos() {
        return Err(Error::shape("rope", format!("position {} beyond the table's {}", pos0 + seq, t.max_pos())));
    }
    let sign = if inverse { -1.0 } else { 1.0 };
    x.par_chunks_mut(heads * d).enumerate().for_each(|(r, row)| {
        let p = pos0 + r % seq;
        let (c, s) = (&t.cos[p * h2..(p + 1) * h2], &t.sin[p * h2..(p + 1) * h2]);
        for head in row.chunks_mut(d) {
            let (lo, hi) = head.split_at_mut(h2);
            for i in 0..h2 {
                let (a, b, sn) = (lo[i], hi[i], sign * s[i]);
                lo[i] = a * c[i] - b * sn;
                hi[i] = b * c[i] + a * sn;
            }
        }
    });
    Ok(())
}
