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

use super::matmul::{gemm, gemm_new, gemm_new_plus_low_rank, skinny_gemm, KeepMask, LowRank, Tr, View};
use super::philox::DropoutMask;
use super::sgemm::transpose_into;
use super::simd::AlignedBuf;
use crate::{Error, Result};
use rayon::prelude::*;

/// Rows per task of the rank-`r` branch: the chunk's dropped `x` (and Philox words) lives only
/// in a per-thread buffer, in cache, and each chunk's operands fit in L2.
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
    add_bias(&mut y, bias, sh.n)?;
    Ok(y)
}

/// `y[i, :] += bias` for every row of `y [·, n]`.
fn add_bias(y: &mut [f32], bias: Option<&[f32]>, n: usize) -> Result<()> {
    if let Some(b) = bias {
        check("linear", "bias", b.len(), n)?;
        y.par_chunks_mut(n).for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
    }
    Ok(())
}

/// Input gradient of a linear layer: `dx[m,k] = dy[m,n]·W[n,k]`.
pub fn linear_backward_input(dy: &[f32], w: &[f32], sh: LinearShape) -> Vec<f32> {
    gemm_new(sh.m, sh.k, sh.n, 1.0, dy, Tr::N, w, Tr::N, true)
}

/// Per-thread scratch for the chunk loops (dropped `x`, aligned since it is the wide operand of
/// `dA`, and its Philox words), reused across calls so they neither allocate nor page-fault.
/// Taken out of the cell while in use, so a nested use on the same thread (rayon work stealing)
/// gets fresh buffers instead of a borrow panic.
type Scratch = (AlignedBuf, Vec<u32>);

thread_local! {
    static SCRATCH: std::cell::Cell<Option<Box<Scratch>>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with a buffer of `n` f32 and one of `n` words (contents arbitrary).
fn with_scratch<R>(n: usize, f: impl FnOnce(&mut [f32], &mut [u32]) -> R) -> R {
    let mut sc = SCRATCH.take().unwrap_or_default();
    sc.1.resize(sc.1.len().max(n), 0);
    let out = f(sc.0.get(n), &mut sc.1[..n]);
    SCRATCH.set(Some(sc));
    out
}

/// `drop(x)` for elements of `x` starting at linear index `start`: `x` itself when nothing is
/// dropped, else written to `xd`, with the Philox words left in `words` for reuse.
fn dropped<'a>(mask: &DropoutMask, start: usize, x: &'a [f32], xd: &'a mut [f32], words: &mut [u32]) -> &'a [f32] {
    if mask.is_identity() {
        return x;
    }
    mask.fill_words(start as u64, words);
    mask.apply_words(words, x, xd, false);
    xd
}

/// `[rows, cols]` → `[cols, rows]`.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; rows * cols];
    transpose_into(x, rows, cols, &mut t);
    t
}

/// Row-major `[rows, cols]` operand.
fn rm(d: &[f32], cols: usize) -> View<'_> {
    View { d, rs: cols, cs: 1 }
}

crate::simd_fn! {
    /// `S = xd·Aᵀ` for one chunk of rows into `s [rows, r]`; `xd` is the chunk's `drop(x)`
    /// `[rows, k]`, `at = Aᵀ [k, r]` (dims = `(k, r)`).
    fn down_chunk(xd: &[f32], dims: (usize, usize), at: &[f32], s: &mut [f32]) {
        let (k, r) = dims;
        let rows = s.len() / r;
        skinny_gemm(rows, r, k, rm(xd, k), rm(at, r), &mut |i, j0, v| s[i * r + j0..][..v.len()].copy_from_slice(v));
    }
}

crate::simd_fn! {
    /// Rank-`r` backward of one chunk of rows (dims = `(k, n, r)`): `dS = sc·dy·B` into `ds`,
    /// `dBᵀ = sc·Sᵀ·dy` into `dbt [r, n]`, and `dA = dSᵀ·xd` into `da [r, k]` (this chunk's parts).
    fn backward_chunk(
        dy: &[f32],
        xd: &[f32],
        s: &[f32],
        dims: (usize, usize, usize),
        b: &[f32],
        sc: f32,
        ds: &mut [f32],
        da: &mut [f32],
        dbt: &mut [f32],
    ) {
        let (k, n, r) = dims;
        let rows = s.len() / r;
        skinny_gemm(rows, r, n, rm(dy, n), rm(b, r), &mut |i, j0, v| {
            ds[i * r + j0..][..v.len()].iter_mut().zip(v).for_each(|(d, v)| *d = sc * v)
        });
        // dB transposed: dy's rows are then the contiguous operand and r the short side, the
        // shape skinny_gemm runs fastest (measured 1.3-1.8× faster than dyᵀ·S into [n, r]).
        skinny_gemm(r, n, rows, View { d: s, rs: 1, cs: r }, rm(dy, n), &mut |q, j0, v| {
            dbt[q * n + j0..][..v.len()].iter_mut().zip(v).for_each(|(d, v)| *d = sc * v)
        });
        let dst = View { d: ds, rs: 1, cs: r };
        skinny_gemm(r, k, rows, dst, rm(xd, k), &mut |q, j0, v| da[q * k + j0..][..v.len()].copy_from_slice(v));
    }
}

/// LoRA forward (see the module docs). `offset` selects this call's dropout mask;
/// `train = false` disables dropout.
///
/// `S_c = drop(x_c)·Aᵀ` runs per chunk of rows while the chunk's dropped `x` is in cache (the
/// mask never leaves the chunk); then one parallel GEMM computes `y = [x | S]·[W0 | s·B]ᵀ`,
/// the rank-`r` term summed into the base product's tiles before they are stored.
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
    check("lora_forward", "x", x.len(), m * k)?;
    check("lora_forward", "weight", w0.len(), n * k)?;
    check("lora_forward", "A", a.len(), r * k)?;
    check("lora_forward", "B", b.len(), n * r)?;
    let (mask, sc) = (cfg.mask(offset, train), cfg.scaling());
    let mut s = vec![0.0; m * r];
    if r == 0 {
        return Ok(LoraForward { y: linear(x, w0, bias, sh)?, s });
    }
    let words_len = if mask.is_identity() { 0 } else { CHUNK_ROWS * k };
    // Aᵀ [k, r] is the row operand of the skinny S product: aligned, so its 16-float rows are
    // single cache lines.
    let mut at_buf = AlignedBuf::default();
    let at = at_buf.get(r * k);
    transpose_into(a, r, k, at);
    let at = &*at;
    // S per chunk of rows while the chunk's dropped x is in cache, then the base GEMM with the
    // rank-r term as a K-extension: y = [x | S]·[W0 | s·B]ᵀ, one pass over y.
    s.par_chunks_mut(CHUNK_ROWS * r).enumerate().for_each(|(c, sr)| {
        let (row0, rows) = (c * CHUNK_ROWS, sr.len() / r);
        with_scratch(words_len.min(rows * k), |xd, words| {
            let xd = dropped(&mask, row0 * k, &x[row0 * k..(row0 + rows) * k], xd, words);
            down_chunk(xd, (k, r), at, sr);
        })
    });
    let bt_scaled: Vec<f32> = transpose(b, n, r).iter().map(|v| sc * v).collect();
    let mut y = gemm_new_plus_low_rank(
        m,
        n,
        k,
        1.0,
        (x, Tr::N),
        (w0, Tr::T),
        Some(LowRank { p: &s, q: &bt_scaled, r, keep: None }),
        true,
    );
    add_bias(&mut y, bias, n)?;
    Ok(LoraForward { y, s })
}

/// LoRA backward (see the module docs): `dx` only when `need_dx`.
///
/// Per chunk of rows, as small GEMMs: `dS_c = s·dy_c·B`, `dBᵀ += s·S_cᵀ·dy_c`, and the mask
/// regenerated once for `dA += dS_cᵀ·drop(x_c)` (and, with dropout, kept as bits for `dx`).
/// Then `dx = [dy | dS]·[W0; A]` is one parallel GEMM, the `dS·A` steps masked by those bits on
/// its accumulators. Each chunk's `dA`, `dB` partials are summed in chunk order, so the result
/// does not depend on the thread count.
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
    check("lora_backward", "weight", w0.len(), n * k)?;
    check("lora_backward", "S", s.len(), m * r)?;
    check("lora_backward", "A", a.len(), r * k)?;
    check("lora_backward", "B", b.len(), n * r)?;
    let (mask, sc) = (cfg.mask(offset, train), cfg.scaling());
    if r == 0 {
        return Ok(LoraGrads {
            dx: need_dx.then(|| linear_backward_input(dy, w0, sh)),
            da: Vec::new(),
            db: Vec::new(),
        });
    }
    // dx = dy·W0 + drop'(dS·A) is one GEMM whose K-extension [dy | dS]·[W0; A] adds the rank-r
    // term on the accumulators, masked there by the keep bits the chunk pass writes (M·K/8
    // bytes, only while this call runs) after dS is complete.
    let masked_dx = need_dx && !mask.is_identity() && k > 0;
    // B is the row operand of the skinny dS product: an aligned copy (its rows are 16 floats,
    // one cache line at r = 16, and straddled two in 3 of 4 allocations).
    let mut b_buf = AlignedBuf::default();
    let b = b_buf.copy_of(b);
    let words_per_row = k.div_ceil(32);
    let mut keep = if masked_dx { vec![0u32; m * words_per_row] } else { Vec::new() };
    let mut ds = vec![0.0; m * r];
    let words_len = if mask.is_identity() { 0 } else { CHUNK_ROWS * k };
    // One task per chunk of rows; each returns its partial dA [r,k] and dBᵀ [r,n].
    let chunk = |row0: usize, dsc: &mut [f32], keep: Option<&mut [u32]>| -> (Vec<f32>, Vec<f32>) {
        let rows = (m - row0).min(CHUNK_ROWS);
        let rng = |w: usize| row0 * w..(row0 + rows) * w;
        let (dyc, xc, sc_rows) = (&dy[rng(n)], &x[rng(k)], &s[rng(r)]);
        let (mut da, mut dbt) = (vec![0.0; r * k], vec![0.0; r * n]);
        let nw = words_len.min(rows * k);
        with_scratch(nw, |xd, words| {
            let xd = dropped(&mask, row0 * k, xc, xd, words);
            backward_chunk(dyc, xd, sc_rows, (k, n, r), b, sc, dsc, &mut da, &mut dbt);
            if let Some(keep) = keep {
                mask.keep_bits(words, k, keep);
            }
        });
        (da, dbt)
    };
    let ds_chunks = ds.par_chunks_mut(CHUNK_ROWS * r).enumerate();
    let parts: Vec<(Vec<f32>, Vec<f32>)> = if masked_dx {
        ds_chunks
            .zip(keep.par_chunks_mut(CHUNK_ROWS * words_per_row))
            .map(|((c, dsc), kc)| chunk(c * CHUNK_ROWS, dsc, Some(kc)))
            .collect()
    } else {
        ds_chunks.map(|(c, dsc)| chunk(c * CHUNK_ROWS, dsc, None)).collect()
    };
    let low_rank = LowRank { p: &ds, q: a, r, keep: masked_dx.then_some(KeepMask { bits: &keep, scale: mask.scale }) };
    let dx = need_dx.then(|| gemm_new_plus_low_rank(m, k, n, 1.0, (dy, Tr::N), (w0, Tr::N), Some(low_rank), true));
    let (da, dbt) = sum_in_order(parts, (r * k, r * n));
    Ok(LoraGrads { dx, da, db: transpose(&dbt, r, n) })
}

/// The chunks' `(dA, dBᵀ)` partials summed in chunk order (so the sums do not depend on the
/// thread count), in parallel over slices of columns: at M = 2048 there are 32 pairs of
/// 128 KiB, too much to add up on one thread while the others wait. Slice by slice, not
/// `simd::par_add_assign` once per part: a slice of the sum then stays in L1 across all parts
/// instead of the whole sum being read and written once per part, in one parallel region.
fn sum_in_order(parts: Vec<(Vec<f32>, Vec<f32>)>, (da_len, dbt_len): (usize, usize)) -> (Vec<f32>, Vec<f32>) {
    let (mut das, mut dbts): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
    if das.is_empty() {
        return (vec![0.0; da_len], vec![0.0; dbt_len]);
    }
    let sum = |parts: &mut Vec<Vec<f32>>| {
        const SLICE: usize = 4096;
        let mut total = std::mem::take(&mut parts[0]);
        total.par_chunks_mut(SLICE).enumerate().for_each(|(i, sum)| {
            for part in &parts[1..] {
                let part = &part[i * SLICE..];
                super::simd::with_simd(|| sum.iter_mut().zip(part).for_each(|(s, p)| *s += p));
            }
        });
        total
    };
    (sum(&mut das), sum(&mut dbts))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestRng;

    /// `‖got − want‖ / ‖want‖`; NaN anywhere makes it NaN, which fails every `<` check.
    fn rel_err(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
        (num / want.iter().map(|w| w * w).sum::<f64>()).sqrt()
    }

    /// `C[m,n] = Σ_t P(i,t)·Q(t,j)` in f64, operands given as element functions.
    fn mm(m: usize, n: usize, kk: usize, p: impl Fn(usize, usize) -> f64, q: impl Fn(usize, usize) -> f64) -> Vec<f64> {
        (0..m * n).map(|e| (0..kk).map(|t| p(e / n, t) * q(t, e % n)).sum()).collect()
    }

    /// Empty dimensions give empty or zero results, never a panic (a chunk size of zero would).
    #[test]
    fn empty_dimensions() {
        let mut rng = TestRng::new(5);
        for (m, k, n) in [(0, 8, 6), (7, 0, 6), (7, 8, 0)] {
            let r = 4;
            let (x, w0, a, b, dy) =
                (rng.vec_f32(m * k), rng.vec_f32(n * k), rng.vec_f32(r * k), rng.vec_f32(n * r), rng.vec_f32(m * n));
            let (sh, cfg) = (LinearShape { m, k, n }, LoraOpConfig { dropout: 0.25, ..LoraOpConfig::default_for(r) });
            let f = lora_forward(&x, &w0, None, &a, &b, sh, &cfg, 0, true).unwrap();
            assert_eq!((f.y.len(), f.s.len()), (m * n, m * r));
            assert!(f.s.iter().all(|&v| k > 0 || v == 0.0), "m{m} k{k} n{n}: S of an empty contraction is 0");
            let g = lora_backward(&dy, &x, &w0, &a, &b, &f.s, sh, &cfg, 0, true, true).unwrap();
            assert_eq!((g.dx.map(|d| d.len()), g.da.len(), g.db.len()), (Some(m * k), r * k, n * r));
            assert!(g.da.iter().chain(&g.db).all(|v| v.is_finite()), "m{m} k{k} n{n}");
        }
    }

    /// The chunked rank-`r` kernels at the ranks the trainer uses (8, 16) and a wide one, with
    /// a partial last chunk, against float64, with and without dropout and `dx`.
    #[test]
    fn chunked_branch_matches_f64_reference() {
        let mut rng = TestRng::new(21);
        let (m, k, n) = (130, 200, 150);
        for (r, p, need_dx) in [(16, 0.0, true), (16, 0.3, true), (8, 0.1, false), (40, 0.2, true)] {
            let (x, w0, a, b, dy) =
                (rng.vec_f32(m * k), rng.vec_f32(n * k), rng.vec_f32(r * k), rng.vec_f32(n * r), rng.vec_f32(m * n));
            let cfg = LoraOpConfig { r, alpha: 5.0, dropout: p, use_rslora: false, seed: 77 };
            let (sh, s64) = (LinearShape { m, k, n }, cfg.scaling() as f64);
            let mask = cfg.mask(4, true);
            let keep = |e: usize| if mask.keep(e as u64) { mask.scale as f64 } else { 0.0 };
            let xd = |i: usize, t: usize| x[i * k + t] as f64 * keep(i * k + t);
            let s_ref = mm(m, r, k, xd, |t, q| a[q * k + t] as f64);
            let lo = mm(m, n, r, |i, q| s_ref[i * r + q], |q, j| b[j * r + q] as f64);
            let y_ref = mm(m, n, k, |i, t| x[i * k + t] as f64, |t, j| w0[j * k + t] as f64);
            let y_ref: Vec<f64> = y_ref.iter().zip(&lo).map(|(y, l)| y + s64 * l).collect();
            let f = lora_forward(&x, &w0, None, &a, &b, sh, &cfg, 4, true).unwrap();
            assert!(rel_err(&f.s, &s_ref) < 1e-6, "S r{r} p{p}");
            assert!(rel_err(&f.y, &y_ref) < 1e-6, "y r{r} p{p}");

            let ds = mm(m, r, n, |i, j| s64 * dy[i * n + j] as f64, |j, q| b[j * r + q] as f64);
            let db = mm(n, r, m, |j, i| s64 * dy[i * n + j] as f64, |i, q| s_ref[i * r + q]);
            let da = mm(r, k, m, |q, i| ds[i * r + q], xd);
            let g = lora_backward(&dy, &x, &w0, &a, &b, &f.s, sh, &cfg, 4, true, need_dx).unwrap();
            assert!(rel_err(&g.db, &db) < 1e-6, "dB r{r} p{p}");
            assert!(rel_err(&g.da, &da) < 1e-6, "dA r{r} p{p}");
            assert_eq!(g.dx.is_some(), need_dx);
            if let Some(dx) = g.dx {
                let dsa = mm(m, k, r, |i, q| ds[i * r + q], |q, t| a[q * k + t] as f64);
                let base = mm(m, k, n, |i, j| dy[i * n + j] as f64, |j, t| w0[j * k + t] as f64);
                let dx_ref: Vec<f64> = (0..m * k).map(|e| base[e] + dsa[e] * keep(e)).collect();
                assert!(rel_err(&dx, &dx_ref) < 1e-6, "dx r{r} p{p}");
            }
        }
    }
}
