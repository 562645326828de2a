//! The LoRA linear op (CPU backend): forward and manual backward, with dropout from Philox.
//!
//! ```text
//! y  = x·W0ᵀ (+ bias) + s·(drop(x)·Aᵀ)·Bᵀ        x [M,K], W0 [N,K], A [r,K], B [N,r], y [M,N]
//! S  = drop(x)·Aᵀ                                  [M,r], the only thing forward saves
//! dB = s·dyᵀ·S                                     [N,r]
//! dS = s·dy·B                                      [M,r]
//! dA = dSᵀ·drop(x)                                 [r,K]  (mask regenerated, never stored)
//! dx = dy·W0 + drop'(dS·A)                         [M,K]  (drop' = same mask and 1/(1−p))
//! ```
//! `s = alpha/r`, or `alpha/√r` with rsLoRA. `drop` is PEFT's `nn.Dropout` on the LoRA branch
//! only; its mask is a pure function of `(seed, offset, element index of x)`
//! ([`super::philox`]), so the CUDA kernels reproduce it bit for bit.

use super::matmul::{gemm, gemm_new, Tr};
use super::philox::DropoutMask;
use crate::{Error, Result};
use rayon::prelude::*;

/// Rows of `x` per dropout chunk: the dropped copy lives only chunk by chunk, in cache.
const CHUNK_ROWS: usize = 64;

/// Hyper-parameters of one LoRA-adapted linear layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraOpConfig {
    /// Rank `r` (rows of `A`, columns of `B`).
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f32,
    /// Dropout probability `p ∈ [0, 1)` on the LoRA branch's input (training only).
    pub dropout: f32,
    /// rsLoRA: `s = alpha/√r` instead of `alpha/r`.
    pub use_rslora: bool,
    /// Philox key for the dropout mask.
    pub seed: u64,
}

impl LoraOpConfig {
    /// Rank `r`, `alpha = r` (scaling 1), no dropout, seed 0.
    pub fn default_for(r: usize) -> Self {
        LoraOpConfig { r, alpha: r as f32, dropout: 0.0, use_rslora: false, seed: 0 }
    }
    /// The scaling `s` PEFT uses: `alpha/r`, or `alpha/√r` with rsLoRA.
    pub fn scaling(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.r as f32).sqrt()
        } else {
            self.alpha / self.r as f32
        }
    }
    /// The dropout mask of one call; identity when not training or `p = 0`.
    pub fn mask(&self, offset: u64, train: bool) -> DropoutMask {
        DropoutMask::new(if train { self.dropout } else { 0.0 }, self.seed, offset)
    }
}

/// Problem sizes: `x [m,k]`, `W0 [n,k]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearShape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

/// What [`lora_forward`] returns: the output and the saved `S = drop(x)·Aᵀ`.
#[derive(Debug, Clone)]
pub struct LoraForward {
    /// `y [m,n]`.
    pub y: Vec<f32>,
    /// `S [m,r]`.
    pub s: Vec<f32>,
}

/// Gradients of the LoRA op.
#[derive(Debug, Clone)]
pub struct LoraGrads {
    /// `dx [m,k]`, when asked for.
    pub dx: Option<Vec<f32>>,
    /// `dA [r,k]`.
    pub da: Vec<f32>,
    /// `dB [n,r]`.
    pub db: Vec<f32>,
}

fn check(op: &str, what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::shape(op, format!("{what} has {got} elements, expected {want}")));
    }
    Ok(())
}

/// Plain linear layer: `y[m,n] = x[m,k]·W[n,k]ᵀ + bias[n]`.
pub fn linear(x: &[f32], w: &[f32], bias: Option<&[f32]>, sh: LinearShape) -> Result<Vec<f32>> {
    check("linear", "x", x.len(), sh.m * sh.k)?;
    check("linear", "weight", w.len(), sh.n * sh.k)?;
    let mut y = gemm_new(sh.m, sh.n, sh.k, 1.0, x, Tr::N, w, Tr::T, true);
    if let Some(b) = bias {
        check("linear", "bias", b.len(), sh.n)?;
        y.par_chunks_mut(sh.n).for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
    }
    Ok(y)
}

/// Input gradient of a linear layer: `dx[m,k] = dy[m,n]·W[n,k]`.
pub fn linear_backward_input(dy: &[f32], w: &[f32], sh: LinearShape) -> Vec<f32> {
    gemm_new(sh.m, sh.k, sh.n, 1.0, dy, Tr::N, w, Tr::N, true)
}

/// `Σ a[i]·b[i]` with 16 independent partial sums (vectorizes; fixed order, deterministic).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `y += alpha·x`.
#[inline(always)]
fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x);
}

/// `[rows, cols]` → `[cols, rows]`.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols).map(|i| x[(i % rows) * cols + i / rows]).collect()
}

/// Row `i` of `drop(x)` into `xd`, with the row's Philox words left in `words`.
#[inline(always)]
fn dropped_row(mask: &DropoutMask, i: usize, xr: &[f32], xd: &mut [f32], words: &mut [u32]) {
    mask.fill_words((i * xr.len()) as u64, words);
    let (t, sc) = (mask.threshold, mask.scale);
    xd.iter_mut().zip(xr.iter().zip(words.iter())).for_each(|(d, (&v, &w))| *d = if w >= t { v * sc } else { 0.0 });
}

crate::simd_fn! {
    /// Rank-`r` forward for rows `x [rows, k]` starting at row `row0` (dims = `(k, n, r)`):
    /// `S_i = drop(x_i)·Aᵀ` into `s [rows, r]`, `y_i += sc·S_i·Bᵀ` into `y [rows, n]`
    /// (`bt = Bᵀ [r, n]`).
    fn forward_rows(
        x: &[f32],
        row0: usize,
        dims: (usize, usize, usize),
        a: &[f32],
        bt: &[f32],
        mask: &DropoutMask,
        sc: f32,
        y: &mut [f32],
        s: &mut [f32],
    ) {
        let (k, n, r) = dims;
        let (mut xd, mut words) = (vec![0.0; k], vec![0u32; k]);
        for (j, (yr, sr)) in y.chunks_mut(n).zip(s.chunks_mut(r)).enumerate() {
            let xr = &x[j * k..(j + 1) * k];
            let xi: &[f32] = if mask.is_identity() {
                xr
            } else {
                dropped_row(mask, row0 + j, xr, &mut xd, &mut words);
                &xd
            };
            for (q, sq) in sr.iter_mut().enumerate() {
                *sq = dot(xi, &a[q * k..(q + 1) * k]);
                axpy(yr, sc * *sq, &bt[q * n..(q + 1) * n]);
            }
        }
    }
}

crate::simd_fn! {
    /// Rank-`r` backward for rows starting at `row0` (dims = `(k, n, r)`): accumulates
    /// `dA += dS_iᵀ·drop(x_i)` into `da [r, k]`, `dBᵀ += S_iᵀ·dy_i` into `dbt [r, n]`
    /// (unscaled), and `dx_i += drop'(dS_i·A)` when `dx` is given; `dS_i = sc·dy_i·B`.
    fn backward_rows(
        dy: &[f32],
        x: &[f32],
        s: &[f32],
        row0: usize,
        dims: (usize, usize, usize),
        a: &[f32],
        bt: &[f32],
        mask: &DropoutMask,
        sc: f32,
        dx: Option<&mut [f32]>,
        da: &mut [f32],
        dbt: &mut [f32],
    ) {
        let (k, n, r) = dims;
        let mut dx = dx;
        let (mut xd, mut words, mut t, mut ds) = (vec![0.0; k], vec![0u32; k], vec![0.0; k], vec![0.0; r]);
        for j in 0..s.len() / r {
            let (dyr, xr, sr) = (&dy[j * n..(j + 1) * n], &x[j * k..(j + 1) * k], &s[j * r..(j + 1) * r]);
            for q in 0..r {
                ds[q] = sc * dot(dyr, &bt[q * n..(q + 1) * n]);
                axpy(&mut dbt[q * n..(q + 1) * n], sr[q], dyr);
            }
            let xi: &[f32] = if mask.is_identity() {
                xr
            } else {
                dropped_row(mask, row0 + j, xr, &mut xd, &mut words);
                &xd
            };
            for q in 0..r {
                axpy(&mut da[q * k..(q + 1) * k], ds[q], xi);
            }
            if let Some(dx) = dx.as_deref_mut() {
                let dxr = &mut dx[j * k..(j + 1) * k];
                if mask.is_identity() {
                    (0..r).for_each(|q| axpy(dxr, ds[q], &a[q * k..(q + 1) * k]));
                } else {
                    t.iter_mut().for_each(|v| *v = 0.0);
                    (0..r).for_each(|q| axpy(&mut t, ds[q], &a[q * k..(q + 1) * k]));
                    let (th, scl) = (mask.threshold, mask.scale);
                    dxr.iter_mut().zip(t.iter().zip(words.iter())).for_each(|(d, (&v, &w))| *d += if w >= th { v * scl } else { 0.0 });
                }
            }
        }
    }
}

/// LoRA forward (see the module docs). `offset` selects this call's dropout mask;
/// `train = false` disables dropout.
///
/// The base `x·W0ᵀ` is one GEMM; the rank-`r` branch is fused row by row (dropout mask,
/// `S_i = drop(x_i)·Aᵀ`, `y_i += s·S_i·Bᵀ`), as the CUDA kernel does.
#[allow(clippy::too_many_arguments)]
pub fn lora_forward(
    x: &[f32],
    w0: &[f32],
    bias: Option<&[f32]>,
    a: &[f32],
    b: &[f32],
    sh: LinearShape,
    cfg: &LoraOpConfig,
    offset: u64,
    train: bool,
) -> Result<LoraForward> {
    let LinearShape { m, k, n } = sh;
    let r = cfg.r;
    check("lora_forward", "A", a.len(), r * k)?;
    check("lora_forward", "B", b.len(), n * r)?;
    let mut y = linear(x, w0, bias, sh)?;
    let mask = cfg.mask(offset, train);
    let (sc, bt) = (cfg.scaling(), transpose(b, n, r));
    let mut s = vec![0.0; m * r];
    y.par_chunks_mut(CHUNK_ROWS * n).zip(s.par_chunks_mut(CHUNK_ROWS * r)).enumerate().for_each(
        |(c, (yc, sc_rows))| {
            let row0 = c * CHUNK_ROWS;
            let rows = yc.len() / n;
            forward_rows(&x[row0 * k..(row0 + rows) * k], row0, (k, n, r), a, &bt, &mask, sc, yc, sc_rows);
        },
    );
    Ok(LoraForward { y, s })
}

/// LoRA backward (see the module docs): `dx` only when `need_dx`.
///
/// `dx = dy·W0` is one GEMM; the rest is one fused pass over the rows: `dS_i = s·dy_i·B`,
/// `dBᵀ += S_iᵀ·dy_i`, the mask regenerated once for `dA += dS_iᵀ·drop(x_i)` and
/// `dx_i += drop'(dS_i·A)`.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    dy: &[f32],
    x: &[f32],
    w0: &[f32],
    a: &[f32],
    b: &[f32],
    s: &[f32],
    sh: LinearShape,
    cfg: &LoraOpConfig,
    offset: u64,
    train: bool,
    need_dx: bool,
) -> Result<LoraGrads> {
    let LinearShape { m, k, n } = sh;
    let r = cfg.r;
    check("lora_backward", "dy", dy.len(), m * n)?;
    check("lora_backward", "x", x.len(), m * k)?;
    check("lora_backward", "S", s.len(), m * r)?;
    check("lora_backward", "A", a.len(), r * k)?;
    check("lora_backward", "B", b.len(), n * r)?;
    let (sc, bt) = (cfg.scaling(), transpose(b, n, r));
    let mask = cfg.mask(offset, train);
    let mut dx = need_dx.then(|| linear_backward_input(dy, w0, sh));
    // One task per chunk of rows; each returns its partial dA [r,k] and dBᵀ [r,n].
    let chunk = |row0: usize, dxc: Option<&mut [f32]>| -> (Vec<f32>, Vec<f32>) {
        let rows = (m - row0).min(CHUNK_ROWS);
        let (mut da, mut dbt) = (vec![0.0; r * k], vec![0.0; r * n]);
        let rng = |w: usize| row0 * w..(row0 + rows) * w;
        backward_rows(&dy[rng(n)], &x[rng(k)], &s[rng(r)], row0, (k, n, r), a, &bt, &mask, sc, dxc, &mut da, &mut dbt);
        (da, dbt)
    };
    let parts: Vec<(Vec<f32>, Vec<f32>)> = match dx.as_mut() {
        Some(dx) => {
            dx.par_chunks_mut(CHUNK_ROWS * k).enumerate().map(|(c, dxc)| chunk(c * CHUNK_ROWS, Some(dxc))).collect()
        }
        None => (0..m.div_ceil(CHUNK_ROWS)).into_par_iter().map(|c| chunk(c * CHUNK_ROWS, None)).collect(),
    };
    let (mut da, mut dbt) = (vec![0.0; r * k], vec![0.0; r * n]);
    for (pa, pb) in parts {
        axpy(&mut da, 1.0, &pa);
        axpy(&mut dbt, 1.0, &pb);
    }
    let mut db = transpose(&dbt, r, n);
    db.iter_mut().for_each(|v| *v *= sc);
    Ok(LoraGrads { dx, da, db })
}

/// `W ± s·B·A` in place: merge (`sign = 1`) or unmerge (`sign = −1`) an adapter into `W [n,k]`.
pub fn merge_into(
    w: &mut [f32],
    a: &[f32],
    b: &[f32],
    n: usize,
    k: usize,
    cfg: &LoraOpConfig,
    sign: f32,
) -> Result<()> {
    check("lora_merge", "W", w.len(), n * k)?;
    check("lora_merge", "A", a.len(), cfg.r * k)?;
    check("lora_merge", "B", b.len(), n * cfg.r)?;
    gemm(n, k, cfg.r, sign * cfg.scaling(), b, Tr::N, a, Tr::N, 1.0, w, true);
    Ok(())
}
