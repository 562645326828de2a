//! Packed f32 GEMM with an AVX-512 micro-kernel: the CPU backend's default GEMM where the CPU
//! has AVX-512 ([`crate::ops::matmul`] falls back to `matrixmultiply` elsewhere).
//!
//! `C[m,n] = α·(A[m,k]·B[k,n] + P[m,r]·Q[r,n]) + β·C`, operands at any strides, the rank-`r`
//! term optional (`Extension`). BLIS's loop order inside each thread's block of `C`: per
//! `NC` columns and `KC`-deep slice, `B` is packed into `NR`-wide strips, then per `MC` rows of
//! `A` (packed with 16 × 16 register transposes, or read in place when `C` is narrow) the
//! `MR × NR` micro-kernel runs over every strip and row tile. Threads split the columns (or the
//! rows, when that packs less) and never wait for each other inside a call.
//!
//! Micro-kernel: a 12 × 32 tile of `C` in 24 `zmm` accumulators; each step of `k` loads two
//! vectors of the `B` strip and broadcasts 12 values of `A`: 24 FMAs per 14 loads, so the FMA
//! ports, not the loads, set the pace (perf: the kernel alone runs at ~97% of the measured
//! 175 GFLOP/s single-core FMA peak here). Work per call: `2·m·n·(k + r)` FLOPs. Bytes: `A`
//! read once per `NC` columns of a thread's block, `B` once per thread that needs its columns,
//! the packed copies written once each, `C` written once per `KC` slice (and read when
//! `β ≠ 0` or after the first slice); `P·Q` adds `r` steps to the last slice (to the first,
//! masked by one bit per element of `C`, with a `KeepBits` mask), no pass over `C`.

use super::simd::AlignedBuf;
use rayon::prelude::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of the micro-kernel's tile of `C`.
const MR: usize = 12;
/// Columns of the micro-kernel's tile (two AVX-512 vectors; one 32-bit word of [`KeepBits`]).
const NR: usize = 32;
/// Depth of a packed slice: one `B` strip (`KC × NR`, 32 KiB) stays in L1 across a row block.
const KC: usize = 256;
/// Most rows in one packed `A` block (`MC × KC`, 192 KiB, in L2).
const MC: usize = 192;
/// Columns of `B` packed at a time (`KC × NC`, 1 MiB, in L2).
const NC: usize = 1024;

/// Whether this CPU runs the AVX-512 kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A read-only strided matrix: element `(i, p)` is at `ptr + i·rs + p·cs`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Strided {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl Strided {
    /// # Safety
    /// `(i, p)` must lie inside the matrix.
    #[inline(always)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    unsafe fn at(&self, i: usize, p: usize) -> f32 {
        *self.ptr.offset(i as isize * self.rs + p as isize * self.cs)
    }
}

/// A second product summed into the same tiles of `C`: `C = α·(A·B + P·Q) + β·C` with
/// `P [m, k]` row-major (`cs = 1`) and `Q [k, n]`. Its `k` steps run after the last slice of
/// `A·B` on the accumulators still in registers, so the sum costs no extra pass over `C`: the
/// LoRA linear's `x·W0ᵀ + S·(s·B)ᵀ` as one GEMM over `[x | S]·[W0 | s·B]ᵀ`.
///
/// With `keep`, the term is masked: `C = α·(A·B + keep ⊙ scale·(P·Q)) + β·C`. Its steps then run
/// first, on zeroed accumulators that are masked before the first slice of `A·B` adds on: the
/// LoRA backward's `dx = dy·W0 + drop'(dS·A)` with the dropout mask as bits, never as floats.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Extension {
    pub p: Strided,
    pub q: Strided,
    pub k: usize,
    pub keep: Option<KeepBits>,
}

/// A 0/1 mask over `C [m, n]`, as bits: element `(i, j)` is kept iff bit `j % 32` of
/// `bits[i·words_per_row + j / 32]` is set; kept elements are multiplied by `scale`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeepBits {
    pub bits: *const u32,
    pub words_per_row: usize,
    pub scale: f32,
}

/// Raw pointers shared by the worker threads; every thread writes a disjoint part of `C` and of
/// the packed buffers.
#[derive(Clone, Copy)]
struct Shared(Strided, Strided, *mut f32, Option<Extension>);
// SAFETY: see `Shared`: the operands are only read, and writes go to disjoint regions.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    /// Used in closures instead of destructuring, which would capture the bare (non-`Send`)
    /// pointers field by field.
    fn get(&self) -> (Strided, Strided, *mut f32, Option<Extension>) {
        (self.0, self.1, self.2, self.3)
    }
}

thread_local! {
    static A_PACK: std::cell::Cell<AlignedBuf> = std::cell::Cell::new(AlignedBuf::default());
    static B_PACK: std::cell::Cell<AlignedBuf> = std::cell::Cell::new(AlignedBuf::default());
}

/// Runs `f` on this thread's buffer of at least `len` floats, aligned so packed strips start on
/// cache lines (taken out while in use, so a nested call on the same thread, e.g. from a stolen
/// rayon job, gets a fresh one).
fn with_buffer<R>(
    key: &'static std::thread::LocalKey<std::cell::Cell<AlignedBuf>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    let mut buf = key.take();
    let out = f(buf.get(len));
    key.set(buf);
    out
}

/// `C = α·(A·B + P·Q) + β·C` (`A` is `m × k`, `B` is `k × n`, `C` row-major with row stride
/// `ldc`, `P·Q` the optional [`Extension`]), split over `threads` rayon tasks. `β = 0` never
/// reads `C`. Requires [`available`] and `k > 0` (the caller scales `C` by `β` when `k = 0`).
///
/// # Safety
/// The operands must hold their matrices (a masked extension's bits `m` rows of
/// `words_per_row ≥ ⌈n/32⌉` words), `C` must be valid for writes of `m` rows of `n` at stride
/// `ldc` (and reads when `β ≠ 0`), and the CPU must support AVX-512F.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Strided,
    b: Strided,
    beta: f32,
    c: *mut f32,
    ldc: usize,
    ext: Option<Extension>,
    threads: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    if let Some(e) = ext {
        assert!(e.p.cs == 1 || e.k == 0, "sgemm: the extension's P must be row-major");
    }
    // Row-major A is read in place when C is narrow: packing costs ~0.5 cycle per element of A,
    // and each element feeds only n/32 kernel cycles (at n = 128, 12% of the GEMM). Measured
    // 7-15% faster at n ≤ 688, k ∈ {256, 688}; no gain at n = 1024, where wide row strides
    // would also alias in L1 (k = 1024: 12 rows 4 KiB apart).
    let direct_a = a.cs == 1 && n <= 768;
    // One task per thread, each packing the operand parts it reads, so a call is one parallel
    // region with no barrier (waking the other thread costs tens of µs on a VM, and a shared
    // packed B needed two per KC slice). Tasks split the columns when that packs less: always
    // with A read in place, else when B (packed by every row task) outweighs A.
    // When one direction has fewer parts than threads (n = 256 is 8 strips), the threads left
    // over split the other direction too.
    let (strips, row_tiles) = (n.div_ceil(NR), m.div_ceil(MR));
    let threads = threads.max(1);
    let split_cols = direct_a || n >= m;
    let (row_tasks, col_tasks) = if split_cols {
        let cols = threads.min(strips);
        ((threads / cols).clamp(1, row_tiles), cols)
    } else {
        let rows = threads.min(row_tiles);
        (rows, (threads / rows).clamp(1, strips))
    };
    let rows_per = m.div_ceil(row_tasks).next_multiple_of(MR);
    let shared = Shared(a, b, c, ext);
    let task = |t: usize| {
        let (a, b, c, ext) = shared.get();
        let (rt, ct) = (t / col_tasks, t % col_tasks);
        let (r0, r1) = ((rt * rows_per).min(m), ((rt + 1) * rows_per).min(m));
        let (s0, s1) = (strips * ct / col_tasks, strips * (ct + 1) / col_tasks);
        if r0 >= r1 || s0 >= s1 {
            return;
        }
        for g0 in (s0..s1).step_by(NC / NR) {
            let strips = (g0, s1.min(g0 + NC / NR), n);
            // SAFETY: the task reads rows r0..r1 of A and P, columns of strips s0..s1 of B and
            // Q, and writes only those rows and columns of C.
            unsafe { sgemm_panel(k, alpha, (a, b, ext), beta, (c, ldc), (r0, r1), strips, direct_a) };
        }
    };
    if row_tasks * col_tasks > 1 {
        (0..row_tasks * col_tasks).into_par_iter().for_each(task);
    } else {
        task(0);
    }
}

/// Rows `r0..r1` and column strips `s0..s1` (at most `NC` columns; `n` is C's width) of `C`,
/// on this thread: for each `KC` slice, the strips of `B` packed (with the extension's `Q` rows
/// after the last slice), then per `MC`-row block of `A` (packed, or read in place when
/// `direct_a`) the micro-kernel over every strip and row tile.
///
/// # Safety
/// As [`sgemm`], for the given rows and strips.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_panel(
    k: usize,
    alpha: f32,
    (a, b, ext): (Strided, Strided, Option<Extension>),
    beta: f32,
    (c, ldc): (*mut f32, usize),
    (r0, r1): (usize, usize),
    (s0, s1, n): (usize, usize, usize),
    direct_a: bool,
) {
    for pc in (0..k).step_by(KC) {
        let kc = KC.min(k - pc);
        let beta = if pc == 0 { beta } else { 1.0 };
        // The extension joins the last slice, its Q rows after B's in each packed strip; a masked
        // one joins the first slice, its Q rows first.
        let keep = ext.and_then(|e| e.keep);
        let k2 = ext.filter(|_| if keep.is_some() { pc == 0 } else { pc + kc == k }).map_or(0, |e| e.k);
        let keep = keep.filter(|_| k2 > 0);
        let depth = kc + k2;
        with_buffer(&B_PACK, (s1 - s0) * NR * depth, |bpack| {
            for (s, strip) in (s0..s1).zip(bpack.chunks_mut(NR * depth)) {
                let cols = (n - s * NR).min(NR);
                let (b_at, q_at) = if keep.is_some() { (k2 * NR, 0) } else { (0, kc * NR) };
                let b_slice = Strided { ptr: b.ptr.offset(pc as isize * b.rs), ..b };
                pack_b(kc, cols, b_slice, s * NR, &mut strip[b_at..b_at + kc * NR]);
                if let Some(e) = ext.filter(|_| k2 > 0) {
                    pack_b(k2, cols, e.q, s * NR, &mut strip[q_at..q_at + k2 * NR]);
                }
            }
            for i0 in (r0..r1).step_by(MC) {
                let rows = MC.min(r1 - i0);
                let a_at = Strided { ptr: a.ptr.offset(i0 as isize * a.rs + pc as isize * a.cs), ..a };
                let run = |strip_a: &dyn Fn(usize) -> *const f32| {
                    for s in s0..s1 {
                        let (j, cols) = (s * NR, (n - s * NR).min(NR));
                        let bs = bpack.as_ptr().add((s - s0) * NR * depth);
                        for (q, ir) in (0..rows).step_by(MR).enumerate() {
                            let cp = c.add((i0 + ir) * ldc + j);
                            let tile = (MR.min(rows - ir), cols);
                            let p = match ext {
                                Some(e) if k2 > 0 => (e.p.ptr.offset((i0 + ir) as isize * e.p.rs), e.p.rs as usize, k2),
                                _ => (std::ptr::null(), 0, 0),
                            };
                            // The tile's first row's mask word for columns j .. j + 32 (j = 32·s).
                            let kb =
                                keep.map(|m| (m.bits.add((i0 + ir) * m.words_per_row + s), m.words_per_row, m.scale));
                            if direct_a {
                                kernel::<true>((strip_a(q), a.rs as usize, kc), p, kb, bs, cp, ldc, tile, alpha, beta);
                            } else {
                                kernel::<false>((strip_a(q), MR, kc), p, kb, bs, cp, ldc, tile, alpha, beta);
                            }
                        }
                    }
                };
                if direct_a {
                    run(&|q| a_at.ptr.add(q * MR * a.rs as usize));
                } else {
                    with_buffer(&A_PACK, rows.next_multiple_of(MR) * kc, |apack| {
                        pack_a(rows, kc, a_at, apack);
                        run(&|q| apack.as_ptr().add(q * MR * kc));
                    })
                }
            }
        });
    }
}

/// Packs `B[0..kc, j0..j0+cols]` into one strip: `out[p·NR + w] = B[p, j0+w]`, zero-padded to
/// `NR` columns.
///
/// # Safety
/// The block must lie inside `b`; AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_b(kc: usize, cols: usize, b: Strided, j0: usize, out: &mut [f32]) {
    if b.cs == 1 {
        if cols < NR {
            out[..kc * NR].fill(0.0);
        }
        for p in 0..kc {
            let src = b.ptr.offset(p as isize * b.rs + j0 as isize);
            if cols == NR {
                // A fixed-size copy compiles to two vector moves; a variable one calls memmove.
                out[p * NR..(p + 1) * NR].copy_from_slice(&*(src as *const [f32; NR]));
            } else {
                out[p * NR..p * NR + cols].copy_from_slice(std::slice::from_raw_parts(src, cols));
            }
        }
    } else if b.rs == 1 {
        // Columns are contiguous (B = Wᵀ of a row-major W): transpose 16 of them at a time.
        for half in 0..NR / 16 {
            let (first, lines) = (16 * half, cols.saturating_sub(16 * half).min(16));
            let src = b.ptr.offset((j0 + first) as isize * b.cs);
            transpose_lines(src, b.cs, lines, kc, out.as_mut_ptr().add(first), NR, 16);
        }
    } else {
        for p in 0..kc {
            for w in 0..NR {
                out[p * NR + w] = if w < cols { b.at(p, j0 + w) } else { 0.0 };
            }
        }
    }
}

/// Packs `A[0..rows, 0..kc]` into `MR`-row strips: strip `q` holds `out[q·MR·kc + p·MR + i] =
/// A[q·MR + i, p]`, zero-padded to a whole strip.
///
/// # Safety
/// The block must lie inside `a`; AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_a(rows: usize, kc: usize, a: Strided, out: &mut [f32]) {
    for (q, i0) in (0..rows).step_by(MR).enumerate() {
        let strip = &mut out[q * MR * kc..(q + 1) * MR * kc];
        let h = MR.min(rows - i0);
        if a.cs == 1 {
            // Row-major A (activations): transpose its rows into the strip, 16 columns at a time.
            transpose_lines(a.ptr.offset(i0 as isize * a.rs), a.rs, h, kc, strip.as_mut_ptr(), MR, MR);
        } else if a.rs == 1 && h == MR {
            // Transposed A: each step's MR values are contiguous.
            for p in 0..kc {
                let src = &*(a.ptr.offset(i0 as isize + p as isize * a.cs) as *const [f32; MR]);
                strip[p * MR..(p + 1) * MR].copy_from_slice(src);
            }
        } else {
            for p in 0..kc {
                for i in 0..MR {
                    strip[p * MR + i] = if i < h { a.at(i0 + i, p) } else { 0.0 };
                }
            }
        }
    }
}

/// `out[p·ld + l] = src[l·stride + p]` for `p < len`, `l < width`: `lines` (≤ 16) contiguous
/// runs of `len` floats written across, lanes `lines..width` zero. Runs 16 × 16 register
/// transposes (64 shuffles per 256 floats) instead of one scalar load and store per element,
/// which made packing 14% of a GEMM.
///
/// # Safety
/// AVX-512F; the runs lie inside their matrix, `out` holds `len` rows of `ld ≥ width` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_lines(
    src: *const f32,
    stride: isize,
    lines: usize,
    len: usize,
    out: *mut f32,
    ld: usize,
    width: usize,
) {
    let store = lane_mask(width);
    for p0 in (0..len).step_by(16) {
        let count = (len - p0).min(16);
        let load = lane_mask(count);
        let mut r = [_mm512_setzero_ps(); 16];
        for (l, r) in r.iter_mut().enumerate().take(lines) {
            *r = _mm512_maskz_loadu_ps(load, src.offset(l as isize * stride + p0 as isize));
        }
        let t = transpose16(r);
        for (q, t) in t.iter().enumerate().take(count) {
            _mm512_mask_storeu_ps(out.add((p0 + q) * ld), store, *t);
        }
    }
}

/// `out [cols, rows] = src [rows, cols]ᵀ` (both row-major), 16 rows at a time through
/// [`transpose_lines`] where the CPU has AVX-512: the LoRA op's `Aᵀ`, `Bᵀ` and `dB` are
/// `16 × 1024`-class transposes, which an element loop ran serially at ~0.1 ms per training
/// call of the op.
pub(crate) fn transpose_into(src: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    assert!(src.len() == rows * cols && out.len() == rows * cols, "transpose_into: sizes differ");
    #[cfg(target_arch = "x86_64")]
    if available() {
        for i0 in (0..rows).step_by(16) {
            let lines = (rows - i0).min(16);
            // SAFETY: AVX-512F checked; the 16-row block lies inside `src`, and its `cols` output
            // rows of `lines` floats at stride `rows` inside `out` (sizes asserted above).
            unsafe {
                let (from, to) = (src.as_ptr().add(i0 * cols), out.as_mut_ptr().add(i0));
                transpose_lines(from, cols as isize, lines, cols, to, rows, lines);
            }
        }
        return;
    }
    for (i, row) in src.chunks_exact(cols.max(1)).enumerate() {
        row.iter().enumerate().for_each(|(j, &v)| out[j * rows + i] = v);
    }
}

/// Transpose of a 16 × 16 block held as 16 rows: element-pair, pair-of-pairs, then two 128-bit
/// lane shuffles.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    let z = _mm512_setzero_ps();
    // t[2g], t[2g+1]: rows 2g, 2g+1 interleaved (columns 4k, 4k+1 | 4k+2, 4k+3 in lane k).
    let mut t = [z; 16];
    for g in 0..8 {
        t[2 * g] = _mm512_unpacklo_ps(r[2 * g], r[2 * g + 1]);
        t[2 * g + 1] = _mm512_unpackhi_ps(r[2 * g], r[2 * g + 1]);
    }
    // u[4g + j], lane k: column 4k + j of rows 4g..4g+3.
    let mut u = [z; 16];
    for g in 0..4 {
        let (lo01, hi01, lo23, hi23) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
        u[4 * g] = _mm512_shuffle_ps::<0x44>(lo01, lo23);
        u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(lo01, lo23);
        u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(hi01, hi23);
        u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(hi01, hi23);
    }
    // Gather lane k of u[j], u[4+j], u[8+j], u[12+j] into out[4k + j].
    let mut out = [z; 16];
    for j in 0..4 {
        let even_a = _mm512_shuffle_f32x4::<0x88>(u[j], u[4 + j]);
        let odd_a = _mm512_shuffle_f32x4::<0xDD>(u[j], u[4 + j]);
        let even_b = _mm512_shuffle_f32x4::<0x88>(u[8 + j], u[12 + j]);
        let odd_b = _mm512_shuffle_f32x4::<0xDD>(u[8 + j], u[12 + j]);
        out[j] = _mm512_shuffle_f32x4::<0x88>(even_a, even_b);
        out[8 + j] = _mm512_shuffle_f32x4::<0xDD>(even_a, even_b);
        out[4 + j] = _mm512_shuffle_f32x4::<0x88>(odd_a, odd_b);
        out[12 + j] = _mm512_shuffle_f32x4::<0xDD>(odd_a, odd_b);
    }
    out
}

/// `C[tile] = α·(Aₛ·Bₛ + Pₛ·Qₛ) + β·C[tile]` for one `MR × NR` tile (`tile = (rows, cols)`
/// valid, the rest masked off). `a = (ptr, lda, kc)`: an `A` strip, packed (`DIRECT = false`,
/// element `(i, p)` at `ptr[p·MR + i]`) or row-major in place (`ptr[i·lda + p]`); `p = (ptr,
/// ldp, k2)`: the extension's rows, row-major; `b`: the `B` strip, `kc + k2` steps of `NR`
/// (`Q`'s `k2` after `B`'s, or before them when `keep` is given). `keep = (bits, words_per_row,
/// scale)`: the masked extension ([`KeepBits`]; `bits` points at the tile's first row's word),
/// whose term is computed first and masked in registers.
///
/// # Safety
/// AVX-512F; the strips hold their steps; `C` holds the valid part of the tile at stride `ldc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const DIRECT: bool>(
    (a, lda, kc): (*const f32, usize, usize),
    (p_ptr, ldp, k2): (*const f32, usize, usize),
    keep: Option<(*const u32, usize, f32)>,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    (rows, cols): (usize, usize),
    alpha: f32,
    beta: f32,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    // `steps` steps of the strip at `b` on the rows `row[i] + p·step`.
    macro_rules! steps {
        ($row:expr, $step:expr, $b:expr, $steps:expr) => {
            for p in 0..$steps {
                let b0 = _mm512_load_ps($b.add(p * NR));
                let b1 = _mm512_load_ps($b.add(p * NR + 16));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let ai = _mm512_set1_ps(*$row[i].add(p * $step));
                    acc[0] = _mm512_fmadd_ps(ai, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(ai, b1, acc[1]);
                }
            }
        };
    }
    // Element (i, p) of the A strip: packed at a[p·MR + i]; direct (row-major A, unpacked) at
    // a[i·lda + p], rows past the tile reading the last valid row (their results are not stored).
    let row: [*const f32; MR] = std::array::from_fn(|i| if DIRECT { a.add(i.min(rows - 1) * lda) } else { a.add(i) });
    let p_row: [*const f32; MR] = std::array::from_fn(|i| p_ptr.wrapping_add(i.min(rows - 1) * ldp));
    let mut b_main = b;
    if let Some((bits, words_per_row, scale)) = keep {
        steps!(p_row, 1, b, k2);
        let scale = _mm512_set1_ps(scale);
        for (i, acc) in acc.iter_mut().enumerate() {
            let word = *bits.add(i.min(rows - 1) * words_per_row);
            acc[0] = _mm512_maskz_mul_ps(word as __mmask16, acc[0], scale);
            acc[1] = _mm512_maskz_mul_ps((word >> 16) as __mmask16, acc[1], scale);
        }
        b_main = b.add(k2 * NR);
    }
    steps!(row, if DIRECT { 1 } else { MR }, b_main, kc);
    if keep.is_none() && k2 > 0 {
        steps!(p_row, 1, b.add(kc * NR), k2);
    }
    let masks: [__mmask16; 2] = [lane_mask(cols), lane_mask(cols.saturating_sub(16))];
    let (va, vb) = (_mm512_set1_ps(alpha), _mm512_set1_ps(beta));
    for (i, acc) in acc.iter().enumerate().take(rows) {
        for (h, (&v, &mask)) in acc.iter().zip(&masks).enumerate() {
            let cp = c.add(i * ldc + 16 * h);
            let mut out = _mm512_mul_ps(va, v);
            if beta != 0.0 {
                out = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mask, cp), out);
            }
            _mm512_mask_storeu_ps(cp, mask, out);
        }
    }
}

// Off x86-64 `available()` is false and `matmul` never calls `sgemm`; these keep it compiling.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_b(_: usize, _: usize, _: Strided, _: usize, _: &mut [f32]) {
    unreachable!("sgemm::available() is false off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_a(_: usize, _: usize, _: Strided, _: &mut [f32]) {
    unreachable!("sgemm::available() is false off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const DIRECT: bool>(
    _: (*const f32, usize, usize),
    _: (*const f32, usize, usize),
    _: Option<(*const u32, usize, f32)>,
    _: *const f32,
    _: *mut f32,
    _: usize,
    _: (usize, usize),
    _: f32,
    _: f32,
) {
    unreachable!("sgemm::available() is false off x86-64")
}

/// The low `n` lanes (of 16) set.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lane_mask(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestRng;

    #[test]
    fn transpose_into_is_exact_on_ragged_shapes() {
        let mut rng = TestRng::new(4);
        for (rows, cols) in [(1, 1), (16, 1024), (17, 5), (33, 70), (5, 1030)] {
            let src = rng.vec_f32(rows * cols);
            let mut out = vec![f32::NAN; rows * cols];
            transpose_into(&src, rows, cols, &mut out);
            for (i, j) in (0..rows).flat_map(|i| (0..cols).map(move |j| (i, j))) {
                assert_eq!(out[j * rows + i].to_bits(), src[i * cols + j].to_bits(), "{rows}x{cols} at ({i}, {j})");
            }
        }
    }

    #[test]
    fn matches_f64_reference_on_ragged_shapes_strides_and_threads() {
        if !available() {
            println!("skipped: no AVX-512 on this CPU (matmul uses matrixmultiply there)");
            return;
        }
        let mut rng = TestRng::new(21);
        // Around every blocking size: MR = 12, NR = 32 (and its 16-lane halves), KC = 256,
        // MC = 192, NC = 1024; plus a single element and a row too few to split.
        // (m, n, k, k2): around every blocking size (MR = 12, NR = 32 and its 16-lane halves,
        // KC = 256, MC = 192, NC = 1024), a single element, a row count too small to split, and
        // an extension (k2 > 0) on one slice or after several.
        // Odd cases mask their extension (the first slice then carries it).
        let shapes = [
            (1, 1, 1, 0),
            (200, 1030, 20, 16),
            (13, 33, 7, 3),
            (5, 40, 513, 8),
            (37, 800, 260, 5),
            (390, 9, 3, 1),
            (24, 64, 256, 0),
            (25, 17, 300, 0),
        ];
        for (case, (m, n, k, k2)) in shapes.into_iter().enumerate() {
            let (pd, qd) = (rng.vec_f32(m * k2), rng.vec_f32(k2 * n));
            // Random keep bits (about 3 in 4 kept), scale 1.25.
            let words = n.div_ceil(32);
            let word = |v: &f32| v.to_bits().wrapping_mul(0x9E37_79B9);
            let bits: Vec<u32> = rng.vec_f32(2 * m * words).chunks(2).map(|p| word(&p[0]) | word(&p[1])).collect();
            let masked = case % 2 == 1;
            let kept = |i: usize, j: usize| {
                if !masked {
                    1.0
                } else if bits[i * words + j / 32] >> (j % 32) & 1 == 1 {
                    1.25
                } else {
                    0.0
                }
            };
            let ext = (k2 > 0).then_some(Extension {
                p: Strided { ptr: pd.as_ptr(), rs: k2 as isize, cs: 1 },
                q: Strided { ptr: qd.as_ptr(), rs: n as isize, cs: 1 },
                k: k2,
                keep: masked.then_some(KeepBits { bits: bits.as_ptr(), words_per_row: words, scale: 1.25 }),
            });
            for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
                let (ad, bd) = (rng.vec_f32(m * k), rng.vec_f32(k * n));
                let a = if a_t {
                    Strided { ptr: ad.as_ptr(), rs: 1, cs: m as isize }
                } else {
                    Strided { ptr: ad.as_ptr(), rs: k as isize, cs: 1 }
                };
                let b = if b_t {
                    Strided { ptr: bd.as_ptr(), rs: 1, cs: k as isize }
                } else {
                    Strided { ptr: bd.as_ptr(), rs: n as isize, cs: 1 }
                };
                // 8 threads: more than the strips (or row tiles) of most shapes, so both split.
                for (threads, alpha, beta) in [(1, 1.0f32, 0.0f32), (2, 1.0, 0.0), (3, 0.5, -1.5), (8, -2.0, 1.0)] {
                    // C has a wider row stride than n (extra columns must stay untouched).
                    let ldc = n + 3;
                    let c0 = rng.vec_f32(m * ldc);
                    let mut c = if beta == 0.0 { vec![f32::NAN; m * ldc] } else { c0.clone() };
                    // SAFETY: the buffers hold the matrices; the test runs only with AVX-512.
                    unsafe { sgemm(m, n, k, alpha, a, b, beta, c.as_mut_ptr(), ldc, ext, threads) };
                    let (mut num, mut den) = (0f64, 0f64);
                    for i in 0..m {
                        for j in 0..n {
                            // SAFETY: (i, p) and (p, j) lie inside A and B.
                            let dot: f64 = (0..k).map(|p| unsafe { a.at(i, p) as f64 * b.at(p, j) as f64 }).sum();
                            let low: f64 =
                                (0..k2).map(|p| pd[i * k2 + p] as f64 * qd[p * n + j] as f64).sum::<f64>() * kept(i, j);
                            let old = if beta == 0.0 { 0.0 } else { beta as f64 * c0[i * ldc + j] as f64 };
                            let want = alpha as f64 * (dot + low) + old;
                            num += (c[i * ldc + j] as f64 - want).powi(2);
                            den += want * want;
                        }
                        for j in n..ldc {
                            let want = if beta == 0.0 { f32::NAN } else { c0[i * ldc + j] };
                            assert!(c[i * ldc + j].to_bits() == want.to_bits(), "column {j} outside C was written");
                        }
                    }
                    let err = (num / den).sqrt();
                    assert!(
                        err < 1e-6,
                        "m{m} n{n} k{k}+{k2} masked {masked} aT{a_t} bT{b_t} threads {threads} α{alpha} β{beta}: {err:e}"
                    );
                }
            }
        }
    }
}
