//! `lorafuse bench`: the LoRA linear's forward + backward timed against the plain frozen linear
//! (forward + dx), on the CPU or on a device, call by call in alternation, so that a noisy
//! machine slows every variant alike and the ratios stay meaningful.
//!
//! For `x [M,K]`, `W0 [N,K]`, rank `r`, the ratio's arithmetic floor is the rank-`r` FLOPs
//! (S, S·Bᵀ, dS, dB, dA, dS·A: six products of `2·M·r·(K or N)`) over the plain linear's
//! `4·M·N·K`: `1 + 3·r·(K + N) / (2·N·K)` ([`flop_floor`]).

use crate::device::{Backend, Device};
use crate::ops::gemm::{launch_gemm, GemmLayout, GemmShape};
use crate::ops::lora::{linear, linear_backward_input, lora_backward, lora_forward, LinearShape, LoraOpConfig};
use crate::ops::lora_fused::{lora_forward_fused, FUSED_MAX_RANK};
use crate::ops::lora_kernels::{self, LoraWeights};
use crate::ops::lora_unfused::{lora_backward_unfused, lora_forward_unfused};
use crate::tensor::{DType, HostData, Tensor};
use crate::testing::TestRng;
use crate::{Error, Result};
use half::bf16;
use std::sync::Arc;
use std::time::Instant;

/// Untimed rounds before the timed ones (first-use costs: page faults, module loads).
pub const WARMUP_ROUNDS: usize = 3;

/// The largest operand the command allocates, in GiB: shapes beyond it are refused up front
/// instead of aborting in the allocator.
pub const MAX_OPERAND_GIB: f64 = 8.0;

/// One timed variant at one dropout probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// Variant name, one word: `plain`, `fused` (CPU); `base`, `split`, `single_pass`,
    /// `unfused` (device).
    pub variant: &'static str,
    /// Median milliseconds of one call.
    pub median_ms: f64,
}

/// `1 + 3·r·(K + N) / (2·N·K)`: fused over plain if the rank-`r` products ran at the base
/// GEMM's FLOP rate with no other cost.
pub fn flop_floor(sh: LinearShape, r: usize) -> f64 {
    1.0 + 3.0 * r as f64 * (sh.k + sh.n) as f64 / (2.0 * sh.n as f64 * sh.k as f64)
}

/// Checks the arguments before anything is allocated or timed.
pub fn check_args(sh: LinearShape, r: usize, dropouts: &[f32], iters: usize) -> Result<()> {
    if let Some(p) = dropouts.iter().find(|p| !(0.0..1.0).contains(*p)) {
        return Err(Error::config("dropout", format!("{p} is not in [0, 1)")));
    }
    if [sh.m, sh.k, sh.n, r, iters].contains(&0) {
        return Err(Error::config("m/k/n/r/iters", "every size and the iteration count must be at least 1"));
    }
    let gib = [sh.m * sh.k, sh.n * sh.k, sh.m * sh.n].into_iter().max().unwrap_or(0) as f64 * 4.0 / (1u64 << 30) as f64;
    if gib > MAX_OPERAND_GIB {
        return Err(Error::config(
            "m/k/n",
            format!("an operand would take {gib:.1} GiB (at most {MAX_OPERAND_GIB} here)"),
        ));
    }
    Ok(())
}

/// Runs every variant once per round, [`WARMUP_ROUNDS`] untimed then `iters` timed, each
/// variant reporting its own milliseconds; returns the medians in the variants' order.
fn alternate(variants: &mut [(&'static str, &mut dyn FnMut() -> Result<f64>)], iters: usize) -> Result<Vec<Timing>> {
    let mut times = vec![Vec::with_capacity(iters); variants.len()];
    for round in 0..WARMUP_ROUNDS + iters {
        for ((_, run), t) in variants.iter_mut().zip(&mut times) {
            let ms = run()?;
            if round >= WARMUP_ROUNDS {
                t.push(ms);
            }
        }
    }
    Ok(variants
        .iter()
        .zip(times)
        .map(|((variant, _), mut t)| {
            t.sort_by(f64::total_cmp);
            Timing { variant, median_ms: t[t.len() / 2] }
        })
        .collect())
}

/// Host milliseconds of `f`.
fn host_ms<T>(f: impl FnOnce() -> Result<T>) -> Result<f64> {
    let t = Instant::now();
    std::hint::black_box(f()?);
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// CPU backend: `plain` (forward + dx of the frozen linear) and `fused` (LoRA forward +
/// backward with dx), f32, inside the rayon pool as a training step runs them.
pub fn cpu(sh: LinearShape, r: usize, dropout: f32, iters: usize) -> Result<Vec<Timing>> {
    let LinearShape { m, k, n } = sh;
    let mut rng = TestRng::new(1);
    let (x, w0, a, b, dy) =
        (rng.vec_f32(m * k), rng.vec_f32(n * k), rng.vec_f32(r * k), rng.vec_f32(n * r), rng.vec_f32(m * n));
    let cfg = LoraOpConfig { r, alpha: 2.0 * r as f32, dropout, use_rslora: false, seed: 5 };
    let mut plain = || host_ms(|| Ok(linear(&x, &w0, None, sh)?[0] + linear_backward_input(&dy, &w0, sh)[0]));
    let mut fused = || {
        host_ms(|| {
            let f = lora_forward(&x, &w0, None, &a, &b, sh, &cfg, 3, true)?;
            let g = lora_backward(&dy, &x, &w0, &a, &b, &f.s, sh, &cfg, 3, true, true)?;
            Ok(f.y[0] + g.da[0])
        })
    };
    rayon::scope(|_| alternate(&mut [("plain", &mut plain), ("fused", &mut fused)], iters))
}

/// A device: `base` (the frozen linear's two GEMMs, `x·W0ᵀ` and `dy·W0`), `split` (the
/// split-strategy forward + the fused backward), `single_pass` (the single-pass forward + the
/// same backward; only for r ≤ [`FUSED_MAX_RANK`]) and `unfused` (PEFT's sequence). bf16
/// operands and outputs (y, dx), except the unfused kernels', which write f32; device time per
/// call.
pub fn device(dev: &Arc<dyn Device>, sh: LinearShape, r: usize, dropout: f32, iters: usize) -> Result<Vec<Timing>> {
    let LinearShape { m, k, n } = sh;
    let backend = Backend::Device(dev.clone());
    let mut rng = TestRng::new(2);
    let mut upload = |shape: &[usize]| -> Result<Tensor> {
        let v = rng.vec_f32(shape.iter().product()).iter().map(|&v| bf16::from_f32(v)).collect();
        Tensor::from_host(shape, HostData::BF16(v))?.to_backend(&backend)
    };
    let (x, w0, a, b, dy) = (upload(&[m, k])?, upload(&[n, k])?, upload(&[r, k])?, upload(&[n, r])?, upload(&[m, n])?);
    let cfg = LoraOpConfig { r, alpha: 2.0 * r as f32, dropout, use_rslora: false, seed: 5 };
    let scale = cfg.scaling();
    let col_scale = Tensor::from_host(&[r], HostData::F32(vec![scale; r]))?.to_backend(&backend)?;
    let w = LoraWeights { w0: &w0, a: &a, b: &b, col_scale: &col_scale };
    let mask = cfg.mask(3, true);
    let out = DType::BF16;
    let (y, dx) = (Tensor::empty(&[m, n], out, &backend)?, Tensor::empty(&[m, k], out, &backend)?);
    let time = |work: &mut dyn FnMut() -> Result<()>| dev.time_ms(work);
    let mut base = || {
        time(&mut || {
            // SAFETY: x, W0, dy, y, dx are live device tensors of the shapes the GEMMs name.
            unsafe {
                launch_gemm(
                    dev.as_ref(),
                    x.device_ptr()?,
                    w0.device_ptr()?,
                    y.device_ptr()?,
                    GemmShape::dense_for(GemmLayout::Nt, m, n, k),
                    GemmLayout::Nt,
                    out,
                )?;
                launch_gemm(
                    dev.as_ref(),
                    dy.device_ptr()?,
                    w0.device_ptr()?,
                    dx.device_ptr()?,
                    GemmShape::dense_for(GemmLayout::Nn, m, k, n),
                    GemmLayout::Nn,
                    out,
                )
            }
        })
    };
    let mut split = || {
        time(&mut || {
            let f = lora_kernels::lora_forward(dev, &x, &w, &mask, out)?;
            lora_kernels::lora_backward(dev, &x, &w, &f.s_scaled, &dy, &mask, out).map(drop)
        })
    };
    let mut single_pass = || {
        time(&mut || {
            let f = lora_forward_fused(dev, &x, &w, &mask, out)?;
            lora_kernels::lora_backward(dev, &x, &w, &f.s_scaled, &dy, &mask, out).map(drop)
        })
    };
    let mut unfused = || {
        time(&mut || {
            let f = lora_forward_unfused(dev, &x, &w, scale, &mask)?;
            lora_backward_unfused(dev, &x, &w, scale, &mask, &f, &dy).map(drop)
        })
    };
    let mut variants: Vec<(&'static str, &mut dyn FnMut() -> Result<f64>)> =
        vec![("base", &mut base), ("split", &mut split)];
    if r <= FUSED_MAX_RANK {
        variants.push(("single_pass", &mut single_pass));
    }
    variants.push(("unfused", &mut unfused));
    alternate(&mut variants, iters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_and_argument_checks() {
        // 1 + 3·16·2048 / (2·1024·1024) = 1.046875.
        assert!((flop_floor(LinearShape { m: 512, k: 1024, n: 1024 }, 16) - 1.046875).abs() < 1e-12);
        let sh = LinearShape { m: 4, k: 4, n: 4 };
        assert!(check_args(sh, 2, &[0.0, 0.5], 1).is_ok());
        assert!(check_args(sh, 2, &[1.0], 1).unwrap_err().to_string().contains("dropout"));
        assert!(check_args(sh, 0, &[0.0], 1).is_err());
        assert!(check_args(sh, 2, &[0.0], 0).is_err());
        let huge = LinearShape { m: 100_000, k: 100_000, n: 4 };
        assert!(check_args(huge, 2, &[0.0], 1).unwrap_err().to_string().contains("GiB"));
    }

    /// Every variant runs in its slot, warm-up rounds are not counted, and a failing variant's
    /// error comes back instead of a timing.
    #[test]
    fn alternation_counts_and_errors() {
        let (mut a_calls, mut b_calls) = (0, 0);
        let mut a = || {
            a_calls += 1;
            Ok(a_calls as f64)
        };
        let mut b = || {
            b_calls += 1;
            Ok(10.0)
        };
        let t = alternate(&mut [("a", &mut a), ("b", &mut b)], 5).unwrap();
        assert_eq!((a_calls, b_calls), (WARMUP_ROUNDS + 5, WARMUP_ROUNDS + 5));
        // a's timed calls report 4..=8: the median is 6.
        assert_eq!(t, vec![Timing { variant: "a", median_ms: 6.0 }, Timing { variant: "b", median_ms: 10.0 }]);
        let mut bad = || -> Result<f64> { Err(Error::config("x", "broken")) };
        assert!(alternate(&mut [("bad", &mut bad)], 1).is_err());
    }
}
