//! Run-time SIMD dispatch for the CPU ops' elementwise loops, and a vectorizable `exp`.
//!
//! The crate is built for the baseline x86-64 target (SSE2); [`with_simd`] runs a closure
//! inside a function compiled with AVX-512 (or AVX2 + FMA) when the CPU has it, so the loops
//! inlined into it are vectorized for that width. Results do not depend on the path taken
//! (no FMA contraction, the same operations in the same order).

/// Runs `f` compiled for the widest vector extension the CPU supports.
#[inline(always)]
pub fn with_simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports every enabled feature (checked just above).
            return unsafe { avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// Defines `fn name(args) -> ret` whose body is compiled three times (AVX-512, AVX2 + FMA,
/// baseline) and picked at run time. Unlike [`with_simd`], large bodies are vectorized too:
/// the body is an `#[inline(always)]` function, so it is always inlined into the wrappers.
#[macro_export]
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the enabled features (checked just above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}

/// A 64-byte-aligned group of 16 floats: one cache line, one AVX-512 vector.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A reusable f32 buffer that starts on a cache line, so full-vector loads of its rows never
/// straddle two lines. glibc aligns `Vec`s to 16 bytes only; with such an operand in place of
/// an aligned one, the LoRA op's rank-16 products of one 64-row chunk ran 1.4-1.5× slower
/// (`dS = dy·B` 22.9 against 15.5 µs with `B` misaligned, K = N = 1024).
#[derive(Default)]
pub(crate) struct AlignedBuf(Vec<Line>);

impl AlignedBuf {
    /// The first `len` floats, the buffer grown (zeroed) when shorter; contents otherwise
    /// whatever was last written.
    pub fn get(&mut self, len: usize) -> &mut [f32] {
        let lines = len.div_ceil(16);
        if self.0.len() < lines {
            self.0 = vec![Line([0.0; 16]); lines];
        }
        // SAFETY: `Line` is 16 plain f32s with no padding; the slice covers `lines · 16 >= len` floats.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut f32, len) }
    }

    /// An aligned copy of `src`, in this buffer.
    pub fn copy_of(&mut self, src: &[f32]) -> &[f32] {
        let dst = self.get(src.len());
        dst.copy_from_slice(src);
        dst
    }
}

/// Elements per rayon task in the elementwise helpers below.
const PAR_GRAIN: usize = 1 << 14;

/// A vector of `n` elements, chunk `i` (of `grain` elements) written by `f(i, chunk)` on the
/// rayon threads, with no zero-fill pass before: a `vec![0.0; n]` of reused heap memory is a
/// single-threaded memset, and with the other serial buffer passes (residual adds, gradient
/// copies and sums) these were ~4% of a training step's CPU time, idling the other threads.
/// `f` must write every element of its chunk.
pub(crate) fn par_new(n: usize, grain: usize, f: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n].par_chunks_mut(grain).enumerate().for_each(|(i, c)| f(i, c));
    // SAFETY: every caller's `f` writes all elements of its chunk, and the chunks cover 0..n.
    unsafe { v.set_len(n) };
    v
}

/// `n` zeros, written in parallel (see `par_new`).
pub fn par_zeros(n: usize) -> Vec<f32> {
    par_new(n, PAR_GRAIN, |_, c| c.iter_mut().for_each(|x| _ = x.write(0.0)))
}

/// A copy of `a`, written in parallel.
pub fn par_copy(a: &[f32]) -> Vec<f32> {
    par_new(a.len(), PAR_GRAIN, |i, c| c.iter_mut().zip(&a[i * PAR_GRAIN..]).for_each(|(x, &v)| _ = x.write(v)))
}

/// `a + b` elementwise, in parallel (`a`, `b` of one length).
pub fn par_add(a: &[f32], b: &[f32]) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "par_add: lengths differ");
    par_new(a.len(), PAR_GRAIN, |i, c| {
        let (a, b) = (&a[i * PAR_GRAIN..], &b[i * PAR_GRAIN..]);
        with_simd(|| c.iter_mut().zip(a.iter().zip(b)).for_each(|(x, (&a, &b))| _ = x.write(a + b)))
    })
}

/// `acc += b` elementwise, in parallel.
pub fn par_add_assign(acc: &mut [f32], b: &[f32]) {
    use rayon::prelude::*;
    assert_eq!(acc.len(), b.len(), "par_add_assign: lengths differ");
    acc.par_chunks_mut(PAR_GRAIN)
        .zip(b.par_chunks(PAR_GRAIN))
        .for_each(|(a, b)| with_simd(|| a.iter_mut().zip(b).for_each(|(a, b)| *a += b)));
}

/// `eˣ` with branch-free arithmetic that vectorizes; relative error ≤ 2e-7 for
/// `x ∈ [−87, 88]` (inputs below saturate to ≈1.2e-38, above to ≈1.6e38).
///
/// `eˣ = 2ⁿ·eʳ`, `n = round(x·log₂e)`, `r = x − n·ln 2` (two-part ln 2), `eʳ` by its degree-7
/// Taylor polynomial on `|r| ≤ ln2/2`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    // t's low mantissa bits hold n = round(x·log₂e) in two's complement: no float→int cast
    // (a saturating `as` cast would block vectorization).
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let scale = f32::from_bits((t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127)) << 23);
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    p * scale
}

#[cfg(test)]
mod tests {
    #[test]
    fn parallel_buffer_helpers() {
        // Lengths around the task grain, so partial chunks are covered.
        for n in [0, 1, 16383, 16384, 40000] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.0).collect();
            let b: Vec<f32> = (0..n).map(|i| (i % 13) as f32 + 0.25).collect();
            assert!(super::par_zeros(n).iter().all(|&x| x == 0.0) && super::par_zeros(n).len() == n);
            assert_eq!(super::par_copy(&a), a);
            let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
            assert_eq!(super::par_add(&a, &b), sum);
            let mut acc = a.clone();
            super::par_add_assign(&mut acc, &b);
            assert_eq!(acc, sum);
        }
    }

    #[test]
    fn exp_accuracy() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            worst = worst.max(((super::exp(x) as f64) - want).abs() / want);
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
        assert_eq!(super::exp(0.0), 1.0);
    }
}
