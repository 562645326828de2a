//! Causal grouped-query attention (f32), forward and backward, one (sequence, head) per task.
//!
//! `q [B·Tq, H·d]`, `k`, `v [B·Tk, Hkv·d]` (token-major, as the projections produce them);
//! query head `h` reads KV head `h / (H/Hkv)` (HF `repeat_kv`). Query `i` attends to keys
//! `j ≤ i + (Tk − Tq)` (the KV cache holds `Tk − Tq` earlier tokens):
//! ```text
//! P = softmax(Q·Kᵀ·d^-½ + causal mask)      O = P·V      lse_i = log Σ_j exp(S_ij)
//! dP = dO·Vᵀ   dS = P∘(dP − rowsum(P∘dP))   dQ = d^-½·dS·K   dK = d^-½·dSᵀ·Q   dV = Pᵀ·dO
//! ```
//! Forward saves only `lse [B, H, Tq]`; backward recomputes `P` from `q`, `k` and `lse`.
//! Queries are processed in blocks of 32 rows, each against only the keys it can see.
//!
//! On a device: [`attention_forward_device`], [`attention_backward_device`]
//! (`kernels/attention.cu`, flash-style on CUDA cores, f32 or bf16, head size ≤ 256), the same
//! shapes and the same saved `lse`.

use super::matmul::{gemm, gemm_new, Tr};
use super::rowwise::{kernel_for, launch};
use super::simd::{exp, par_zeros, with_simd};
use crate::device::params::AttentionParams;
use crate::device::{Backend, Device};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};
use rayon::prelude::*;
use std::sync::Arc;

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    /// Query tokens per sequence.
    pub tq: usize,
    /// Key/value tokens per sequence (`≥ tq`; the first `tk − tq` come from a cache).
    pub tk: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    fn validate(&self, q: usize, k: usize, v: usize) -> Result<()> {
        let s = self;
        if s.kv_heads == 0 || !s.heads.is_multiple_of(s.kv_heads) || s.tk < s.tq {
            return Err(Error::shape("attention", format!("{s:?}: heads must be a multiple of kv_heads, tk ≥ tq")));
        }
        let (wq, wk) = (s.batch * s.tq * s.heads * s.head_dim, s.batch * s.tk * s.kv_heads * s.head_dim);
        if q != wq || k != wk || v != wk {
            return Err(Error::shape(
                "attention",
                format!("{s:?}: q/k/v have {q}/{k}/{v} elements, expected {wq}/{wk}/{wk}"),
            ));
        }
        Ok(())
    }
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// Copies head `h` of sequence `b` out of a token-major `[B·T, nh·d]` buffer into `[T, d]`.
fn gather(x: &[f32], b: usize, t: usize, nh: usize, h: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(t * d);
    for i in 0..t {
        let row = (b * t + i) * nh * d + h * d;
        out.extend_from_slice(&x[row..row + d]);
    }
    out
}

/// Adds a `[T, d]` head block back into a token-major buffer.
fn scatter_add(dst: &mut [f32], src: &[f32], b: usize, t: usize, nh: usize, h: usize, d: usize) {
    for i in 0..t {
        let row = (b * t + i) * nh * d + h * d;
        dst[row..row + d].iter_mut().zip(&src[i * d..(i + 1) * d]).for_each(|(o, s)| *o += s);
    }
}

/// Query rows per block: block `[i0, i0 + QB)` only sees keys `< i0 + QB + past`, so the
/// GEMMs skip most of the masked upper triangle.
const QB: usize = 32;

/// The query blocks of a head: `(i0, rows, visible keys of the block)`.
fn blocks(sh: &AttnShape) -> impl Iterator<Item = (usize, usize, usize)> {
    let (tq, past) = (sh.tq, sh.tk - sh.tq);
    (0..tq).step_by(QB).map(move |i0| {
        let n = QB.min(tq - i0);
        (i0, n, i0 + n + past)
    })
}

/// `P` of one query block (`q [n, d]` against the first `kend` keys): `exp(S·d^-½ − shift_i)`
/// on each row's visible prefix (`j ≤ i0 + i + past`), 0 beyond. `shift = None` is the forward:
/// shift by the row max and normalize, pushing the log-sum-exp to `lse`; `Some(lse)` the
/// backward's recomputation from the saved values.
fn block_probs(
    q: &[f32],
    k: &[f32],
    sh: &AttnShape,
    i0: usize,
    kend: usize,
    shift: Option<&[f32]>,
    lse: &mut Vec<f32>,
) -> Vec<f32> {
    let (d, n, past, scale) = (sh.head_dim, q.len() / sh.head_dim, sh.tk - sh.tq, sh.scale());
    let mut p = gemm_new(n, kend, d, scale, q, Tr::N, k, Tr::T, false);
    for (i, row) in p.chunks_mut(kend).enumerate() {
        let (vis, masked) = row.split_at_mut(i0 + i + 1 + past);
        masked.iter_mut().for_each(|x| *x = 0.0);
        match shift {
            Some(l) => with_simd(|| vis.iter_mut().for_each(|x| *x = exp(*x - l[i]))),
            None => {
                let mx = vis.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let sum = with_simd(|| {
                    vis.iter_mut().for_each(|x| *x = exp(*x - mx));
                    vis.iter().sum::<f32>()
                });
                let inv = 1.0 / sum;
                vis.iter_mut().for_each(|x| *x *= inv);
                lse.push(mx + sum.ln());
            }
        }
    }
    p
}

/// Forward: returns `o [B·Tq, H·d]` and `lse [B, H, Tq]`.
pub fn attention_forward(q: &[f32], k: &[f32], v: &[f32], sh: AttnShape) -> Result<(Vec<f32>, Vec<f32>)> {
    sh.validate(q.len(), k.len(), v.len())?;
    let (h, hkv, d, rep) = (sh.heads, sh.kv_heads, sh.head_dim, sh.heads / sh.kv_heads);
    let parts: Vec<(Vec<f32>, Vec<f32>)> = (0..sh.batch * h)
        .into_par_iter()
        .map(|bh| {
            let (b, hh) = (bh / h, bh % h);
            let qh = gather(q, b, sh.tq, h, hh, d);
            let kh = gather(k, b, sh.tk, hkv, hh / rep, d);
            let vh = gather(v, b, sh.tk, hkv, hh / rep, d);
            let mut lse = Vec::with_capacity(sh.tq);
            let mut o = vec![0.0; sh.tq * d];
            for (i0, n, kend) in blocks(&sh) {
                let p = block_probs(&qh[i0 * d..(i0 + n) * d], &kh, &sh, i0, kend, None, &mut lse);
                gemm(n, d, kend, 1.0, &p, Tr::N, &vh, Tr::N, 0.0, &mut o[i0 * d..(i0 + n) * d], false);
            }
            (o, lse)
        })
        .collect();
    // Heads back into token-major rows, one batch element per task.
    let mut out = par_zeros(q.len());
    out.par_chunks_mut(sh.tq * h * d).enumerate().for_each(|(b, ob)| {
        (0..h).for_each(|hh| scatter_add(ob, &parts[b * h + hh].0, 0, sh.tq, h, hh, d));
    });
    let lse = parts.iter().flat_map(|(_, l)| l.iter().copied()).collect();
    Ok((out, lse))
}

/// Backward: `(dq, dk, dv)` from `dout` and the saved `q`, `k`, `v`, `lse`.
pub fn attention_backward(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lse: &[f32],
    sh: AttnShape,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    sh.validate(q.len(), k.len(), v.len())?;
    let (h, hkv, d, rep, tq, tk) = (sh.heads, sh.kv_heads, sh.head_dim, sh.heads / sh.kv_heads, sh.tq, sh.tk);
    let scale = sh.scale();
    let parts: Vec<[Vec<f32>; 3]> = (0..sh.batch * h)
        .into_par_iter()
        .map(|bh| {
            let (b, hh) = (bh / h, bh % h);
            let qh = gather(q, b, tq, h, hh, d);
            let kh = gather(k, b, tk, hkv, hh / rep, d);
            let vh = gather(v, b, tk, hkv, hh / rep, d);
            let doh = gather(dout, b, tq, h, hh, d);
            let (mut dq, mut dk, mut dv) = (vec![0.0; tq * d], vec![0.0; tk * d], vec![0.0; tk * d]);
            for (i0, n, kend) in blocks(&sh) {
                let (qb, dob) = (&qh[i0 * d..(i0 + n) * d], &doh[i0 * d..(i0 + n) * d]);
                let l = &lse[bh * tq + i0..bh * tq + i0 + n];
                let p = block_probs(qb, &kh, &sh, i0, kend, Some(l), &mut Vec::new());
                let mut dp = gemm_new(n, kend, d, 1.0, dob, Tr::N, &vh, Tr::T, false);
                for (dr, pr) in dp.chunks_mut(kend).zip(p.chunks(kend)) {
                    let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                    dr.iter_mut().zip(pr).for_each(|(g, p)| *g = p * (*g - dot));
                }
                gemm(n, d, kend, scale, &dp, Tr::N, &kh, Tr::N, 0.0, &mut dq[i0 * d..(i0 + n) * d], false);
                gemm(kend, d, n, scale, &dp, Tr::T, qb, Tr::N, 1.0, &mut dk[..kend * d], false);
                gemm(kend, d, n, 1.0, &p, Tr::T, dob, Tr::N, 1.0, &mut dv[..kend * d], false);
            }
            [dq, dk, dv]
        })
        .collect();
    // One batch element per task; the query heads sharing a KV head add in head order, so the
    // sums do not depend on the thread count.
    let (mut dq, mut dk, mut dv) = (par_zeros(q.len()), par_zeros(k.len()), par_zeros(v.len()));
    let kv_rows = tk * hkv * d;
    dq.par_chunks_mut(tq * h * d).zip(dk.par_chunks_mut(kv_rows).zip(dv.par_chunks_mut(kv_rows))).enumerate().for_each(
        |(b, (dqb, (dkb, dvb)))| {
            for hh in 0..h {
                let [gq, gk, gv] = &parts[b * h + hh];
                scatter_add(dqb, gq, 0, tq, h, hh, d);
                scatter_add(dkb, gk, 0, tk, hkv, hh / rep, d);
                scatter_add(dvb, gv, 0, tk, hkv, hh / rep, d);
            }
        },
    );
    Ok((dq, dk, dv))
}

/// Threads per block of the attention kernels: four warps, one row each.
const ATT_THREADS: u32 = 128;
/// The kernels keep a head's row in 32 lanes × 8 registers.
const ATT_MAX_HEAD_DIM: usize = 256;

/// The kernels' parameters for `sh` (checked), with no pointer set yet.
fn device_params(sh: &AttnShape, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<AttentionParams> {
    sh.validate(q.numel(), k.numel(), v.numel())?;
    if sh.head_dim == 0 || sh.head_dim > ATT_MAX_HEAD_DIM {
        return Err(Error::shape("attention", format!("head size {} not in 1..={ATT_MAX_HEAD_DIM}", sh.head_dim)));
    }
    let dims = [sh.batch, sh.tq, sh.tk, sh.heads, sh.kv_heads, sh.head_dim];
    if dims.iter().any(|&v| v > i32::MAX as usize) || sh.batch * sh.tk * sh.heads > i32::MAX as usize {
        return Err(Error::shape("attention", format!("{sh:?} exceeds the kernels' 32-bit indices")));
    }
    let i = |v: usize| v as i32;
    Ok(AttentionParams {
        q: q.device_ptr()?.as_ptr(),
        k: k.device_ptr()?.as_ptr(),
        v: v.device_ptr()?.as_ptr(),
        dout: std::ptr::null(),
        out: std::ptr::null_mut(),
        out2: std::ptr::null_mut(),
        lse: std::ptr::null_mut(),
        delta: std::ptr::null_mut(),
        batch: i(sh.batch),
        tq: i(sh.tq),
        tk: i(sh.tk),
        heads: i(sh.heads),
        kv_heads: i(sh.kv_heads),
        head_dim: i(sh.head_dim),
        scale: sh.scale(),
    })
}

/// Blocks for one warp per row.
fn warp_blocks(rows: usize) -> usize {
    rows.div_ceil(ATT_THREADS as usize / 32)
}

/// [`attention_forward`] on a device: `(o, lse)` for `q`, `k`, `v` of one dtype (f32 or bf16);
/// `o` has `q`'s shape and dtype, `lse [B, H, Tq]` is f32.
pub fn attention_forward_device(
    dev: &Arc<dyn Device>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sh: AttnShape,
) -> Result<(Tensor, Tensor)> {
    let kernel = kernel_for("attention_fwd", &[("q", q), ("k", k), ("v", v)])?;
    let mut p = device_params(&sh, q, k, v)?;
    let backend = Backend::Device(dev.clone());
    let rows = sh.batch * sh.heads * sh.tq;
    let (o, lse) = (Tensor::empty(q.shape(), q.dtype(), &backend)?, Tensor::empty(&[rows], DType::F32, &backend)?);
    (p.out, p.lse) = (o.device_ptr()?.as_mut_ptr(), lse.device_ptr()?.as_mut_ptr());
    // SAFETY: q, o hold B·Tq·H·d elements, k, v B·Tk·Hkv·d (validated), lse B·H·Tq f32.
    unsafe { launch(dev, &kernel, warp_blocks(rows), ATT_THREADS, &p)? };
    Ok((o, lse))
}

/// [`attention_backward`] on a device: `(dq, dk, dv)` from `dout` (shape and dtype of `q`), the
/// inputs and the forward's `lse`. `dk`, `dv` sum over each KV head's group of query heads.
pub fn attention_backward_device(
    dev: &Arc<dyn Device>,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lse: &Tensor,
    sh: AttnShape,
) -> Result<(Tensor, Tensor, Tensor)> {
    let operands = [("q", q), ("k", k), ("v", v), ("output gradient", dout)];
    let (dq_kernel, dkv_kernel) =
        (kernel_for("attention_bwd_dq", &operands)?, kernel_for("attention_bwd_dkv", &operands)?);
    let mut p = device_params(&sh, q, k, v)?;
    let rows = sh.batch * sh.heads * sh.tq;
    if dout.shape() != q.shape() || lse.dtype() != DType::F32 || lse.numel() != rows {
        return Err(Error::shape(
            "attention backward",
            format!("dout {:?}, lse {:?} {:?} for q {:?}", dout.shape(), lse.shape(), lse.dtype(), q.shape()),
        ));
    }
    let backend = Backend::Device(dev.clone());
    let dq = Tensor::empty(q.shape(), q.dtype(), &backend)?;
    let (dk, dv) = (Tensor::empty(k.shape(), k.dtype(), &backend)?, Tensor::empty(v.shape(), v.dtype(), &backend)?);
    let delta = Tensor::empty(&[rows], DType::F32, &backend)?;
    p.dout = dout.device_ptr()?.as_ptr();
    (p.lse, p.delta) = (lse.device_ptr()?.as_mut_ptr(), delta.device_ptr()?.as_mut_ptr());
    p.out = dq.device_ptr()?.as_mut_ptr();
    // SAFETY: as the forward, plus dout (q's size), dq, and delta (B·H·Tq f32, written here).
    unsafe { launch(dev, &dq_kernel, warp_blocks(rows), ATT_THREADS, &p)? };
    (p.out, p.out2) = (dk.device_ptr()?.as_mut_ptr(), dv.device_ptr()?.as_mut_ptr());
    // SAFETY: dk, dv hold k's size; delta was written by the launch before, on the same stream.
    unsafe { launch(dev, &dkv_kernel, warp_blocks(sh.batch * sh.kv_heads * sh.tk), ATT_THREADS, &p)? };
    Ok((dq, dk, dv))
}
