//! CPU f32 GEMM for the reference backend: `C = α·op(A)·op(B) + β·C`, row-major.
//!
//! On CPUs with AVX-512 it is our packed GEMM ([`super::sgemm`], which can also sum a rank-`r`
//! product into the same pass); elsewhere, or with `LORAFUSE_CPU_GEMM=matrixmultiply` (for
//! comparison), the `matrixmultiply` crate, one call per thread's block of rows.

use super::sgemm::{self, Extension, KeepBits, Strided};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Whether an operand is used as stored (`N`) or transposed (`T`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tr {
    /// `A` is stored `[rows, cols]` of `op(A)`.
    N,
    /// `A` is stored transposed: `op(A) = Aᵀ`.
    T,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lib {
    Packed,
    MatrixMultiply,
}

fn lib() -> Lib {
    static LIB: OnceLock<Lib> = OnceLock::new();
    *LIB.get_or_init(|| match std::env::var("LORAFUSE_CPU_GEMM").as_deref() {
        Ok("matrixmultiply") => Lib::MatrixMultiply,
        _ if sgemm::available() => Lib::Packed,
        _ => Lib::MatrixMultiply,
    })
}

/// Name of the GEMM in use (for benchmark reports).
pub fn library_name() -> &'static str {
    match lib() {
        Lib::Packed => "lorafuse packed AVX-512",
        Lib::MatrixMultiply => "matrixmultiply",
    }
}

/// `C[m,n] = alpha·op(A)[m,k]·op(B)[k,n] + beta·C`, all row-major and dense.
///
/// `A` is stored `[m,k]` (`Tr::N`) or `[k,m]` (`Tr::T`); `B` is `[k,n]` or `[n,k]`.
/// `beta = 0` overwrites `C` (its old content may be anything, even NaN).
/// `parallel = false` keeps the call on the current thread (for use inside rayon loops).
/// Panics if a slice is shorter than its shape needs (callers check shapes first).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    ta: Tr,
    b: &[f32],
    tb: Tr,
    beta: f32,
    c: &mut [f32],
    parallel: bool,
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "gemm: operand too short");
    // SAFETY: the operands hold the matrices (asserted above).
    unsafe { gemm_raw(m, n, k, alpha, a, ta, b, tb, beta, c.as_mut_ptr(), None, parallel) }
}

/// `op(A)·op(B)·alpha` into a new `[m, n]` vector (no zero-fill pass: C is written, never read).
#[allow(clippy::too_many_arguments)]
pub fn gemm_new(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    ta: Tr,
    b: &[f32],
    tb: Tr,
    parallel: bool,
) -> Vec<f32> {
    gemm_new_plus_low_rank(m, n, k, alpha, (a, ta), (b, tb), None, parallel)
}

/// A rank-`r` product summed into a GEMM: `P [m, r]`, `Q [r, n]`, both row-major, masked
/// elementwise when `keep` is given.
#[derive(Debug, Clone, Copy)]
pub struct LowRank<'a> {
    pub p: &'a [f32],
    pub q: &'a [f32],
    pub r: usize,
    pub keep: Option<KeepMask<'a>>,
}

/// A 0/1 mask over `C [m, n]` as bits, `⌈n/32⌉` words per row: element `(i, j)` is kept iff bit
/// `j % 32` of `bits[i·⌈n/32⌉ + j/32]` is set, and kept elements are multiplied by `scale`
/// (dropout's `1/(1−p)`).
#[derive(Debug, Clone, Copy)]
pub struct KeepMask<'a> {
    pub bits: &'a [u32],
    pub scale: f32,
}

/// `alpha·(op(A)·op(B) + L)` into a new `[m, n]` vector, the optional rank-`r` term `L = P·Q`
/// (or `keep ⊙ scale·(P·Q)`) summed in the same pass over `C` (with AVX-512 on the
/// accumulators, before they are stored): the LoRA linear's `x·W0ᵀ + (s·S)·Bᵀ` and
/// `dy·W0 + drop'(dS·A)` as one GEMM each.
#[allow(clippy::too_many_arguments)]
pub fn gemm_new_plus_low_rank(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    (a, ta): (&[f32], Tr),
    (b, tb): (&[f32], Tr),
    low_rank: Option<LowRank>,
    parallel: bool,
) -> Vec<f32> {
    assert!(a.len() >= m * k && b.len() >= k * n, "gemm: operand too short");
    if let Some(LowRank { p, q, r, keep }) = low_rank {
        assert!(p.len() >= m * r && q.len() >= r * n, "gemm: low-rank operand too short");
        if let Some(km) = keep {
            assert!(km.bits.len() >= m * n.div_ceil(32), "gemm: keep mask too short");
        }
    }
    let mut c = Vec::with_capacity(m * n);
    // SAFETY: with beta = 0 both libraries write every element of C without reading it, so the
    // length is set only after all m·n elements are initialized.
    unsafe {
        gemm_raw(m, n, k, alpha, a, ta, b, tb, 0.0, c.as_mut_ptr(), low_rank, parallel);
        c.set_len(m * n);
    }
    c
}

/// # Safety
/// `c` must be valid for `m·n` writes (and reads when `beta ≠ 0`); `a`, `b` and the low-rank
/// operands hold their matrices.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    ta: Tr,
    b: &[f32],
    tb: Tr,
    beta: f32,
    c: *mut f32,
    low_rank: Option<LowRank>,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let low_rank = low_rank.filter(|l| l.r > 0);
    if k == 0 {
        for i in 0..m * n {
            *c.add(i) = if beta == 0.0 { 0.0 } else { *c.add(i) * beta };
        }
        if let Some(l) = low_rank {
            add_low_rank(m, n, alpha, l, c, parallel);
        }
        return;
    }
    let (ars, acs) = match ta {
        Tr::N => (k as isize, 1),
        Tr::T => (1, m as isize),
    };
    let (brs, bcs) = match tb {
        Tr::N => (n as isize, 1),
        Tr::T => (1, k as isize),
    };
    // Threads only pay off above ~1 MFLOP.
    let threads = if parallel && m * n * k >= 1 << 18 { rayon::current_num_threads().max(1) } else { 1 };
    let (a, b) = (Strided { ptr: a.as_ptr(), rs: ars, cs: acs }, Strided { ptr: b.as_ptr(), rs: brs, cs: bcs });
    let rm = |d: &[f32], cols: usize| Strided { ptr: d.as_ptr(), rs: cols as isize, cs: 1 };
    match lib() {
        // SAFETY: the operands hold their matrices (callers assert it); `lib()` chose Packed only
        // where sgemm::available().
        Lib::Packed => {
            let ext = low_rank.map(|l| Extension {
                p: rm(l.p, l.r),
                q: rm(l.q, n),
                k: l.r,
                keep: l.keep.map(|km| KeepBits {
                    bits: km.bits.as_ptr(),
                    words_per_row: n.div_ceil(32),
                    scale: km.scale,
                }),
            });
            sgemm::sgemm(m, n, k, alpha, a, b, beta, c, n, ext, threads)
        }
        // SAFETY: as above.
        Lib::MatrixMultiply => {
            with_matrixmultiply(m, n, k, alpha, a, b, beta, c, threads);
            if let Some(l) = low_rank {
                add_low_rank(m, n, alpha, l, c, parallel);
            }
        }
    }
}

/// `C += alpha·L` as a separate product (where the GEMM cannot sum it on its accumulators);
/// a masked term goes through a temporary `[m, n]`.
///
/// # Safety
/// `c` must be valid for reads and writes of `m·n` elements.
unsafe fn add_low_rank(m: usize, n: usize, alpha: f32, l: LowRank, c: *mut f32, parallel: bool) {
    let Some(km) = l.keep else {
        return gemm_raw(m, n, l.r, alpha, l.p, Tr::N, l.q, Tr::N, 1.0, c, None, parallel);
    };
    let t = gemm_new(m, n, l.r, alpha * km.scale, l.p, Tr::N, l.q, Tr::N, parallel);
    let c = std::slice::from_raw_parts_mut(c, m * n);
    let words = n.div_ceil(32);
    for (i, (c, t)) in c.chunks_exact_mut(n).zip(t.chunks_exact(n)).enumerate() {
        for (j, (c, t)) in c.iter_mut().zip(t).enumerate() {
            if km.bits[i * words + j / 32] >> (j % 32) & 1 == 1 {
                *c += t;
            }
        }
    }
}

/// The same product through `matrixmultiply`, which runs single-threaded here: threads come from
/// rayon (one pool for every op), each computing a block of rows (or of columns when C is short
/// and wide).
///
/// # Safety
/// As [`sgemm::sgemm`] (without the AVX-512 requirement), with `C` dense (`ldc = n`).
#[allow(clippy::too_many_arguments)]
unsafe fn with_matrixmultiply(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Strided,
    b: Strided,
    beta: f32,
    c: *mut f32,
    threads: usize,
) {
    let (ap, bp, cp) = (a.ptr as usize, b.ptr as usize, c as usize);
    let block = |i0: usize, i1: usize, j0: usize, j1: usize| {
        // SAFETY: the operands hold the matrices described by the strides; blocks write
        // disjoint parts of C.
        unsafe {
            matrixmultiply::sgemm(
                i1 - i0,
                k,
                j1 - j0,
                alpha,
                (ap as *const f32).offset(i0 as isize * a.rs),
                a.rs,
                a.cs,
                (bp as *const f32).offset(j0 as isize * b.cs),
                b.rs,
                b.cs,
                beta,
                (cp as *mut f32).add(i0 * n + j0),
                n as isize,
                1,
            )
        }
    };
    if threads == 1 {
        block(0, m, 0, n);
    } else if m >= n {
        let step = m.div_ceil(threads).next_multiple_of(16);
        (0..m.div_ceil(step)).into_par_iter().for_each(|t| block(t * step, ((t + 1) * step).min(m), 0, n));
    } else {
        let step = n.div_ceil(threads).next_multiple_of(16);
        (0..n.div_ceil(step)).into_par_iter().for_each(|t| block(0, m, t * step, ((t + 1) * step).min(n)));
    }
}

/// A read-only matrix operand with arbitrary strides: element `(i, t)` is `d[i·rs + t·cs]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View<'a> {
    pub d: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl View<'_> {
    fn check(&self, rows: usize, cols: usize) {
        assert!(rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.d.len(), "view too short");
    }
}

/// `P[m, kk]·Q[kk, n]` for GEMMs with one tiny dimension (a LoRA rank), handed to `put(i, j0, v)`
/// in row pieces: `v[w]` is element `(i, j0 + w)`, so the caller's epilogue (overwrite, scale
/// and add, dropout mask) runs on the registers before anything is stored.
///
/// No packing: with `kk` or `n` at most a few dozen, packing copies as many bytes as the kernel
/// reads, and `matrixmultiply` spends as long packing as multiplying. The operands are read in
/// place (`Q` rows are contiguous, `P` is any [`View`], e.g. a transposed one) while register
/// tiles of `MR × W` accumulate with FMA. `#[inline(always)]`: call it from a
/// [`crate::simd_fn!`] body so the tiles are compiled for AVX-512/AVX2 (the baseline build
/// computes the same values through software `fma`, slowly).
#[inline(always)]
pub(crate) fn skinny_gemm(m: usize, n: usize, kk: usize, p: View, q: View, put: &mut impl FnMut(usize, usize, &[f32])) {
    assert_eq!(q.cs, 1, "skinny_gemm: Q rows must be contiguous");
    // Strides hidden from the optimizer: with a constant `p.rs = 1` (a transposed operand) LLVM
    // vectorizes across the tile's rows instead and keeps the accumulators in memory, gathering
    // and scattering them on every step (measured 30× slower).
    let p = View { d: p.d, rs: std::hint::black_box(p.rs), cs: std::hint::black_box(p.cs) };
    p.check(m, kk);
    q.check(kk, n);
    let mut j0 = 0;
    // Widest tiles first: 6 × 64 keeps 24 accumulators (AVX-512 registers) with 10 loads per 24
    // FMAs; narrower column tails (ranks 8 and 16) take taller tiles to keep enough FMAs in flight.
    j0 = skinny_cols::<6, 64>(m, n, kk, j0, p, q, put);
    j0 = skinny_cols::<8, 16>(m, n, kk, j0, p, q, put);
    j0 = skinny_cols::<8, 8>(m, n, kk, j0, p, q, put);
    skinny_cols::<8, 1>(m, n, kk, j0, p, q, put);
}

/// Column tiles of width `W` from `j0` while they fit; returns the first column left.
#[inline(always)]
fn skinny_cols<const MR: usize, const W: usize>(
    m: usize,
    n: usize,
    kk: usize,
    mut j0: usize,
    p: View,
    q: View,
    put: &mut impl FnMut(usize, usize, &[f32]),
) -> usize {
    while n - j0 >= W {
        let mut i0 = 0;
        while m - i0 >= MR {
            skinny_tile::<MR, W>(kk, i0, j0, p, q, put);
            i0 += MR;
        }
        while m - i0 >= 4 {
            skinny_tile::<4, W>(kk, i0, j0, p, q, put);
            i0 += 4;
        }
        while i0 < m {
            skinny_tile::<1, W>(kk, i0, j0, p, q, put);
            i0 += 1;
        }
        j0 += W;
    }
    j0
}

#[inline(always)]
fn skinny_tile<const MR: usize, const W: usize>(
    kk: usize,
    i0: usize,
    j0: usize,
    p: View,
    q: View,
    put: &mut impl FnMut(usize, usize, &[f32]),
) {
    let mut acc = [[0f32; W]; MR];
    for t in 0..kk {
        // SAFETY: `skinny_gemm` checked that P holds rows 0..m and Q rows 0..kk, columns 0..n;
        // the tile lies inside (i0 + MR <= m, j0 + W <= n).
        let qv: &[f32; W] = unsafe { &*(q.d.as_ptr().add(t * q.rs + j0) as *const [f32; W]) };
        for (i, acc) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let pv = unsafe { *p.d.get_unchecked((i0 + i) * p.rs + t * p.cs) };
            for w in 0..W {
                acc[w] = pv.mul_add(qv[w], acc[w]);
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        put(i0 + i, j0, acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestRng;

    /// `‖got − want‖ / ‖want‖`; NaN anywhere makes it NaN, which fails every `<` check.
    fn rel_err(got: &[f32], want: &[f64]) -> f64 {
        let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
        (num / want.iter().map(|w| w * w).sum::<f64>()).sqrt()
    }

    crate::simd_fn! {
        /// `skinny_gemm` compiled for the widest vector extension, overwriting `c [m, n]`.
        fn skinny_simd(dims: (usize, usize, usize), p: View, q: View, c: &mut [f32]) {
            let (m, n, kk) = dims;
            skinny_gemm(m, n, kk, p, q, &mut |i, j0, v| c[i * n + j0..][..v.len()].copy_from_slice(v));
        }
    }

    #[test]
    fn skinny_gemm_matches_f64_on_ragged_and_transposed_operands() {
        let mut rng = TestRng::new(9);
        // Sizes around every tile width (64, 16, 8, 1) and height (6/8, 4, 1).
        for (m, n, kk) in [(1, 1, 1), (13, 16, 1024), (64, 1024, 16), (16, 203, 70), (203, 8, 33), (7, 79, 5)] {
            for p_transposed in [false, true] {
                let (pd, qd) = (rng.vec_f32(m * kk), rng.vec_f32(kk * n));
                let p = if p_transposed { View { d: &pd, rs: 1, cs: m } } else { View { d: &pd, rs: kk, cs: 1 } };
                let want: Vec<f64> = (0..m * n)
                    .map(|e| (0..kk).map(|t| pd[e / n * p.rs + t * p.cs] as f64 * qd[t * n + e % n] as f64).sum())
                    .collect();
                let mut c = vec![f32::NAN; m * n];
                skinny_simd((m, n, kk), p, View { d: &qd, rs: n, cs: 1 }, &mut c);
                let err = rel_err(&c, &want);
                assert!(err < 1e-6, "m{m} n{n} k{kk} transposed {p_transposed}: {err:e}");
            }
        }
    }

    #[test]
    fn separate_masked_low_rank_matches_f64() {
        // The path that adds a masked rank-r term outside the GEMM (matrixmultiply, or k = 0).
        let mut rng = TestRng::new(8);
        let (m, n, r) = (19, 70, 5);
        let (p, q, c0) = (rng.vec_f32(m * r), rng.vec_f32(r * n), rng.vec_f32(m * n));
        let bits: Vec<u32> = rng.vec_f32(m * 3).iter().map(|v| v.to_bits().wrapping_mul(0x9E37_79B9)).collect();
        let mut c = c0.clone();
        let l = LowRank { p: &p, q: &q, r, keep: Some(KeepMask { bits: &bits, scale: 1.5 }) };
        // SAFETY: c holds m·n elements.
        unsafe { add_low_rank(m, n, 0.5, l, c.as_mut_ptr(), true) };
        let want: Vec<f64> = (0..m * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                let kept = bits[i * 3 + j / 32] >> (j % 32) & 1 == 1;
                let pq: f64 = (0..r).map(|t| p[i * r + t] as f64 * q[t * n + j] as f64).sum();
                c0[e] as f64 + if kept { 0.5 * 1.5 * pq } else { 0.0 }
            })
            .collect();
        assert!(rel_err(&c, &want) < 1e-6);
    }

    #[test]
    fn matrixmultiply_fallback_matches_f64() {
        // The path CPUs without AVX-512 take (this machine takes the packed one by default).
        let mut rng = TestRng::new(5);
        for (m, n, k, threads) in [(37, 70, 129, 1), (70, 37, 129, 2), (200, 9, 31, 2)] {
            let (ad, bd) = (rng.vec_f32(m * k), rng.vec_f32(k * n));
            let a = Strided { ptr: ad.as_ptr(), rs: k as isize, cs: 1 };
            let b = Strided { ptr: bd.as_ptr(), rs: 1, cs: k as isize };
            let mut c = vec![f32::NAN; m * n];
            // SAFETY: the buffers hold A [m,k], Bᵀ [n,k] and C [m,n].
            unsafe { with_matrixmultiply(m, n, k, 1.0, a, b, 0.0, c.as_mut_ptr(), threads) };
            let want: Vec<f64> =
                (0..m * n).map(|e| (0..k).map(|p| ad[e / n * k + p] as f64 * bd[e % n * k + p] as f64).sum()).collect();
            let err = rel_err(&c, &want);
            assert!(err < 1e-6, "m{m} n{n} k{k}: {err:e}");
        }
    }

    #[test]
    fn all_transposes_match_naive() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.71).cos()).collect();
        let at = |i: usize, p: usize, t: Tr| if t == Tr::N { a[i * k + p] } else { a[p * m + i] };
        let bt = |p: usize, j: usize, t: Tr| if t == Tr::N { b[p * n + j] } else { b[j * k + p] };
        for ta in [Tr::N, Tr::T] {
            for tb in [Tr::N, Tr::T] {
                let mut c = vec![1.0f32; m * n];
                gemm(m, n, k, 2.0, &a, ta, &b, tb, 0.5, &mut c, true);
                for i in 0..m {
                    for j in 0..n {
                        let want: f32 = 0.5 + 2.0 * (0..k).map(|p| at(i, p, ta) * bt(p, j, tb)).sum::<f32>();
                        assert!((c[i * n + j] - want).abs() < 1e-5, "{ta:?}{tb:?}");
                    }
                }
            }
        }
    }
}
