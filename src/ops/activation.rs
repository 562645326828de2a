//! SwiGLU: `h = silu(g)·u`, `silu(g) = g·σ(g)` (Llama's MLP between gate/up and down).
//!
//! Backward: `dg = dh·u·σ(g)·(1 + g·(1 − σ(g)))`, `du = dh·silu(g)`; it needs `g` and `u`.

use crate::{Error, Result};
use rayon::prelude::*;

use super::simd::{exp, par_zeros};

/// Elements per parallel task.
const GRAIN: usize = 4096;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

crate::simd_fn! {
    fn swiglu_rows(g: &[f32], u: &[f32], h: &mut [f32]) {
        h.iter_mut().zip(g.iter().zip(u)).for_each(|(h, (&g, &u))| *h = g * sigmoid(g) * u)
    }
}

crate::simd_fn! {
    fn swiglu_back_rows(dh: &[f32], g: &[f32], u: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for i in 0..dg.len() {
            let s = sigmoid(g[i]);
            dg[i] = dh[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            du[i] = dh[i] * g[i] * s;
        }
    }
}

/// `h = silu(g)·u`, elementwise.
pub fn swiglu_forward(g: &[f32], u: &[f32]) -> Result<Vec<f32>> {
    if g.len() != u.len() {
        return Err(Error::shape("swiglu", format!("gate has {} elements, up {}", g.len(), u.len())));
    }
    let mut h = par_zeros(g.len());
    h.par_chunks_mut(GRAIN)
        .zip(g.par_chunks(GRAIN).zip(u.par_chunks(GRAIN)))
        .for_each(|(h, (g, u))| swiglu_rows(g, u, h));
    Ok(h)
}

/// `(dg, du)` from `dh` and the saved `g`, `u`.
pub fn swiglu_backward(dh: &[f32], g: &[f32], u: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut dg, mut du) = (par_zeros(g.len()), par_zeros(g.len()));
    dg.par_chunks_mut(GRAIN)
        .zip(du.par_chunks_mut(GRAIN))
        .zip(dh.par_chunks(GRAIN).zip(g.par_chunks(GRAIN).zip(u.par_chunks(GRAIN))))
        .for_each(|((dg, du), (dh, (g, u)))| swiglu_back_rows(dh, g, u, dg, du));
    (dg, du)
}
