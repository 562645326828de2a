//! RMSNorm as Hugging Face's `LlamaRMSNorm` computes it (f32 path).
//!
//! ```text
//! rstd[m] = 1/√(mean_k x[m,k]² + eps)          y[m,k] = w[k]·(x[m,k]·rstd[m])
//! dx[m,k] = rstd[m]·(g[m,k] − x̂[m,k]·mean_j(g[m,j]·x̂[m,j])),  g = dy·w,  x̂ = x·rstd
//! ```
//! HF normalizes in f32, casts the normalized value back to the input dtype, then multiplies
//! by the weight; on the f32 path the casts are no-ops. The weight is frozen under LoRA, so
//! backward returns `dx` only.

use crate::{Error, Result};
use rayon::prelude::*;

/// Forward over rows of length `k`: returns `y` and the saved `rstd [m]`.
pub fn rms_norm_forward(x: &[f32], w: &[f32], eps: f32) -> Result<(Vec<f32>, Vec<f32>)> {
    let k = w.len();
    if k == 0 || !x.len().is_multiple_of(k) {
        return Err(Error::shape("rms_norm", format!("input of {} elements is not rows of {k}", x.len())));
    }
    let mut y = vec![0.0; x.len()];
    let rstd: Vec<f32> = y
        .par_chunks_mut(k)
        .zip(x.par_chunks(k))
        .map(|(yr, xr)| {
            let var = xr.iter().map(|v| v * v).sum::<f32>() / k as f32;
            let rs = 1.0 / (var + eps).sqrt();
            yr.iter_mut().zip(xr).zip(w).for_each(|((y, x), w)| *y = w * (x * rs));
            rs
        })
        .collect();
    Ok((y, rstd))
}

/// Backward: `dx` from `dy`, the input `x`, the weight and the saved `rstd`.
pub fn rms_norm_backward(dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32]) -> Vec<f32> {
    let k = w.len();
    let mut dx = vec![0.0; x.len()];
    dx.par_chunks_mut(k).zip(x.par_chunks(k)).zip(dy.par_chunks(k)).zip(rstd.par_iter()).for_each(
        |(((dxr, xr), dyr), &rs)| {
            let dot: f32 = xr.iter().zip(dyr).zip(w).map(|((x, dy), w)| dy * w * x * rs).sum::<f32>() / k as f32;
            for j in 0..k {
                let xh = xr[j] * rs;
                dxr[j] = rs * (dyr[j] * w[j] - xh * dot);
            }
        },
    );
    dx
}
