//! Rotary position embedding in Hugging Face's `rotate_half` layout, with `llama3` scaling.
//!
//! For head dimension `d`, dimension `i < d/2` pairs with `i + d/2`, both at frequency `f_i`:
//! ```text
//! out[i]       = q[i]·cos θ − q[i+d/2]·sin θ        θ = pos·f_i
//! out[i+d/2]   = q[i+d/2]·cos θ + q[i]·sin θ
//! ```
//! Backward is the rotation by `−θ`. `f_i = 1/theta^(2i/d)` in f32, optionally rescaled by
//! the `llama3` rule (see [`RopeScaling`]).
//!
//! On a device: [`apply_device`] (`kernels/rope.cu`) with the table uploaded once
//! ([`RopeTable::to_device`]), in place on f32 or bf16 tensors.

use super::rowwise::{kernel_for, launch, packs};
use crate::device::params::RopeParams;
use crate::device::{Backend, Device};
use crate::tensor::{HostData, Tensor};
use crate::{Error, Result};
use rayon::prelude::*;
use std::sync::Arc;

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
    /// The table on a device, for [`apply_device`].
    pub fn to_device(&self, dev: &Arc<dyn Device>) -> Result<RopeDeviceTable> {
        let backend = Backend::Device(dev.clone());
        let upload = |v: &[f32]| Tensor::from_host(&[v.len()], HostData::F32(v.to_vec()))?.to_backend(&backend);
        Ok(RopeDeviceTable {
            half: self.half,
            max_pos: self.max_pos(),
            cos: upload(&self.cos)?,
            sin: upload(&self.sin)?,
        })
    }
}

/// A [`RopeTable`] on a device (f32 `cos`, `sin`, `[max_pos, half]` each).
#[derive(Debug)]
pub struct RopeDeviceTable {
    pub half: usize,
    pub max_pos: usize,
    cos: Tensor,
    sin: Tensor,
}

/// Threads per block of the `rope_*` kernels.
const ROPE_THREADS: u32 = 256;

/// [`apply`] on a device: rotates `x` (f32 or bf16, rows of `heads·2·half`) in place.
pub fn apply_device(
    dev: &Arc<dyn Device>,
    x: &Tensor,
    heads: usize,
    seq: usize,
    pos0: usize,
    t: &RopeDeviceTable,
    inverse: bool,
) -> Result<()> {
    let kernel = kernel_for("rope", &[("input", x)])?;
    let rows = check_rows(x.numel(), heads, t.half, seq, pos0, t.max_pos)?;
    let too_big = |v: usize| v > i32::MAX as usize;
    if too_big(heads) || too_big(t.half) || too_big(seq) || too_big(pos0) {
        return Err(Error::shape("rope", "heads, head size, sequence or position exceed the kernel's 32 bits"));
    }
    let p = RopeParams {
        x: x.device_ptr()?.as_mut_ptr(),
        cos: t.cos.device_ptr()?.as_ptr(),
        sin: t.sin.device_ptr()?.as_ptr(),
        rows: rows as i64,
        heads: heads as i32,
        half: t.half as i32,
        seq: seq as i32,
        pos0: pos0 as i32,
        sign: if inverse { -1.0 } else { 1.0 },
    };
    // One thread per (row, head, 16-byte pack of the first half).
    let units = rows * heads * packs(t.half, x.dtype().size());
    // SAFETY: x holds rows·heads·2·half elements; the tables max_pos·half f32, and every row's
    // position was checked to be below max_pos.
    unsafe { launch(dev, &kernel, units.div_ceil(ROPE_THREADS as usize), ROPE_THREADS, &p) }
}

/// Rows of `len` elements of `heads` heads of `2·half`, checked against a table of `max_pos`
/// positions: row `r` is at `pos0 + r % seq`.
fn check_rows(len: usize, heads: usize, half: usize, seq: usize, pos0: usize, max_pos: usize) -> Result<usize> {
    let d = 2 * half;
    if heads == 0 || d == 0 || !len.is_multiple_of(heads * d) || seq == 0 {
        return Err(Error::shape("rope", format!("{len} elements are not rows of {heads}×{d}")));
    }
    let rows = len / (heads * d);
    if pos0 + seq.min(rows) > max_pos {
        return Err(Error::shape("rope", format!("position {} beyond the table's {max_pos}", pos0 + seq)));
    }
    Ok(rows)
}

/// Rotates `x [rows, heads·d]` in place; row `r` is at position `pos0 + r % seq`
/// (`seq` rows per sequence). `inverse` rotates by `−θ` (the backward).
pub fn apply(x: &mut [f32], heads: usize, seq: usize, pos0: usize, t: &RopeTable, inverse: bool) -> Result<()> {
    let (h2, d) = (t.half, 2 * t.half);
    check_rows(x.len(), heads, h2, seq, pos0, t.max_pos())?;
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
