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

use super::matmul::{gemm, Tr};
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
    let mut y = vec![0.0; sh.m * sh.n];
    gemm(sh.m, sh.n, sh.k, 1.0, x, Tr::N, w, Tr::T, 0.0, &mut y, true);
    if let Some(b) = bias {
        check("linear", "bias", b.len(), sh.n)?;
        y.par_chunks_mut(sh.n).for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
    }
    Ok(y)
}

/// Input gradient of a linear layer: `dx[m,k] = dy[m,n]·W[n,k]`.
pub fn linear_backward_input(dy: &[f32], w: &[f32], sh: LinearShape) -> Vec<f32> {
    let mut dx = vec![0.0; sh.m * sh.k];
    gemm(sh.m, sh.k, sh.n, 1.0, dy, Tr::N, w, Tr::N, 0.0, &mut dx, true);
    dx
}

/// Calls `f(first_row, dropped_rows)` for each chunk of rows of `drop(x)`, in parallel.
fn map_dropped_chunks<T: Send>(
    x: &[f32],
    k: usize,
    mask: &DropoutMask,
    f: impl Fn(usize, &[f32]) -> T + Sync,
) -> Vec<T> {
    x.par_chunks(CHUNK_ROWS * k)
        .enumerate()
        .map(|(c, xs)| {
            let mut buf = vec![0.0; xs.len()];
            mask.apply((c * CHUNK_ROWS * k) as u64, xs, &mut buf);
            f(c * CHUNK_ROWS, &buf)
        })
        .collect()
}

/// LoRA forward (see the module docs). `offset` selects this call's dropout mask;
/// `train = false` disables dropout.
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
    let mut s = vec![0.0; m * r];
    if mask.is_identity() {
        gemm(m, r, k, 1.0, x, Tr::N, a, Tr::T, 0.0, &mut s, true);
    } else {
        let parts = map_dropped_chunks(x, k, &mask, |_, xd| {
            let rows = xd.len() / k;
            let mut sc = vec![0.0; rows * r];
            gemm(rows, r, k, 1.0, xd, Tr::N, a, Tr::T, 0.0, &mut sc, false);
            sc
        });
        for (dst, src) in s.chunks_mut(CHUNK_ROWS * r).zip(parts) {
            dst.copy_from_slice(&src);
        }
    }
    gemm(m, n, r, cfg.scaling(), &s, Tr::N, b, Tr::T, 1.0, &mut y, true);
    Ok(LoraForward { y, s })
}

/// LoRA backward (see the module docs): `dx` only when `need_dx`.
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
    let sc = cfg.scaling();
    let mask = cfg.mask(offset, train);
    // dB = s·dyᵀ·S
    let mut db = vec![0.0; n * r];
    gemm(n, r, m, sc, dy, Tr::T, s, Tr::N, 0.0, &mut db, true);
    // dS = s·dy·B
    let mut ds = vec![0.0; m * r];
    gemm(m, r, n, sc, dy, Tr::N, b, Tr::N, 0.0, &mut ds, true);
    let mut da = vec![0.0; r * k];
    if mask.is_identity() {
        gemm(r, k, m, 1.0, &ds, Tr::T, x, Tr::N, 0.0, &mut da, true);
        let dx = need_dx.then(|| {
            let mut dx = linear_backward_input(dy, w0, sh);
            gemm(m, k, r, 1.0, &ds, Tr::N, a, Tr::N, 1.0, &mut dx, true);
            dx
        });
        return Ok(LoraGrads { dx, da, db });
    }
    let mut dx = need_dx.then(|| linear_backward_input(dy, w0, sh));
    // One pass per chunk of rows: regenerate the mask once, use it for dA and for dx.
    let chunk = |row0: usize, xs: &[f32], dxc: Option<&mut [f32]>| -> Vec<f32> {
        let rows = xs.len() / k;
        let dsc = &ds[row0 * r..(row0 + rows) * r];
        let mut words = vec![0u32; xs.len()];
        mask.fill_words((row0 * k) as u64, &mut words);
        let keep = |w: u32, v: f32| if w >= mask.threshold { v * mask.scale } else { 0.0 };
        let xd: Vec<f32> = xs.iter().zip(&words).map(|(&v, &w)| keep(w, v)).collect();
        let mut p = vec![0.0; r * k];
        gemm(r, k, rows, 1.0, dsc, Tr::T, &xd, Tr::N, 0.0, &mut p, false);
        if let Some(dxc) = dxc {
            let mut t = xd; // reuse the buffer: t = dS·A
            gemm(rows, k, r, 1.0, dsc, Tr::N, a, Tr::N, 0.0, &mut t, false);
            dxc.iter_mut().zip(t.iter().zip(&words)).for_each(|(d, (&v, &w))| *d += keep(w, v));
        }
        p
    };
    let parts: Vec<Vec<f32>> = match dx.as_mut() {
        Some(dx) => x
            .par_chunks(CHUNK_ROWS * k)
            .zip(dx.par_chunks_mut(CHUNK_ROWS * k))
            .enumerate()
            .map(|(c, (xs, dxc))| chunk(c * CHUNK_ROWS, xs, Some(dxc)))
            .collect(),
        None => x.par_chunks(CHUNK_ROWS * k).enumerate().map(|(c, xs)| chunk(c * CHUNK_ROWS, xs, None)).collect(),
    };
    for p in parts {
        da.iter_mut().zip(p).for_each(|(d, v)| *d += v);
    }
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
