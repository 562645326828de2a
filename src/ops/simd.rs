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
