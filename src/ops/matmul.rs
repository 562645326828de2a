//! CPU f32 GEMM for the reference backend: `C = α·op(A)·op(B) + β·C`, row-major.
//!
//! Two libraries are wired in and were measured on the training step's shapes (M = 1024 tokens,
//! K/N ∈ {8, 128, 256, 688}); `matrixmultiply` is the default (see the issue-5 note for the
//! numbers). `LORAFUSE_CPU_GEMM=gemm` selects the `gemm` crate instead, for comparison.

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
    MatrixMultiply,
    Gemm,
}

fn lib() -> Lib {
    static LIB: OnceLock<Lib> = OnceLock::new();
    *LIB.get_or_init(|| match std::env::var("LORAFUSE_CPU_GEMM").as_deref() {
        Ok("gemm") => Lib::Gemm,
        _ => Lib::MatrixMultiply,
    })
}

/// Name of the GEMM library in use (for benchmark reports).
pub fn library_name() -> &'static str {
    match lib() {
        Lib::MatrixMultiply => "matrixmultiply",
        Lib::Gemm => "gemm",
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
    unsafe { gemm_raw(m, n, k, alpha, a, ta, b, tb, beta, c.as_mut_ptr(), parallel) }
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
    assert!(a.len() >= m * k && b.len() >= k * n, "gemm: operand too short");
    let mut c = Vec::with_capacity(m * n);
    // SAFETY: with beta = 0 both libraries write every element of C without reading it, so the
    // length is set only after all m·n elements are initialized.
    unsafe {
        gemm_raw(m, n, k, alpha, a, ta, b, tb, 0.0, c.as_mut_ptr(), parallel);
        c.set_len(m * n);
    }
    c
}

/// # Safety
/// `c` must be valid for `m·n` writes (and reads when `beta ≠ 0`); `a`, `b` hold their matrices.
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
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m * n {
            *c.add(i) = if beta == 0.0 { 0.0 } else { *c.add(i) * beta };
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
    let par = parallel && m * n * k >= 1 << 18;
    match lib() {
        Lib::MatrixMultiply => {
            // matrixmultiply runs single-threaded here; threads come from rayon (one pool for
            // every op), each computing a block of rows (or of columns when C is short and wide).
            let threads = if par { rayon::current_num_threads().max(1) } else { 1 };
            let (ap, bp, cp) = (a.as_ptr() as usize, b.as_ptr() as usize, c as usize);
            let block = |i0: usize, i1: usize, j0: usize, j1: usize| {
                // SAFETY: the slices hold the dense matrices described by the strides (asserted
                // above); blocks write disjoint parts of C.
                unsafe {
                    matrixmultiply::sgemm(
                        i1 - i0,
                        k,
                        j1 - j0,
                        alpha,
                        (ap as *const f32).offset(i0 as isize * ars),
                        ars,
                        acs,
                        (bp as *const f32).offset(j0 as isize * bcs),
                        brs,
                        bcs,
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
        Lib::Gemm => {
            let parallelism = if par { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
            // SAFETY: as above. gemm computes dst = α_dst·dst + β_dst·lhs·rhs.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c,
                    1,
                    n as isize,
                    beta != 0.0,
                    a.as_ptr(),
                    acs,
                    ars,
                    b.as_ptr(),
                    bcs,
                    brs,
                    beta,
                    alpha,
                    false,
                    false,
                    false,
                    parallelism,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
