//! The LoRA op on the CPU backend against float64 references, dropout statistics and mask
//! reproducibility (Philox), merge/unmerge.

use lorafuse::ops::lora::{lora_backward, lora_forward, merge_into, LinearShape, LoraOpConfig};
use lorafuse::ops::philox::DropoutMask;
use lorafuse::testing::{rel_err, TestRng};

fn mm64(a: &[f64], b: &[f64], m: usize, k: usize, n: usize, tb: bool) -> Vec<f64> {
    // a [m,k] · (b [k,n] or bᵀ with b [n,k])
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|p| a[i * k + p] * if tb { b[j * k + p] } else { b[p * n + j] }).sum();
        }
    }
    c
}

fn t64(a: &[f64], r: usize, c: usize) -> Vec<f64> {
    (0..c * r).map(|i| a[(i % r) * c + i / r]).collect()
}

fn f64v(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Forward and every gradient vs a float64 reference built from the same mask.
#[test]
fn forward_backward_match_f64_reference_with_dropout() {
    let mut rng = TestRng::new(11);
    let (m, k, n, r) = (70, 33, 21, 4); // m spans two dropout chunks; odd sizes
    let (x, w0, a, b, bias, dy) = (
        rng.vec_f32(m * k),
        rng.vec_f32(n * k),
        rng.vec_f32(r * k),
        rng.vec_f32(n * r),
        rng.vec_f32(n),
        rng.vec_f32(m * n),
    );
    let sh = LinearShape { m, k, n };
    for (p, rs) in [(0.0, false), (0.25, false), (0.1, true)] {
        let cfg = LoraOpConfig { r, alpha: 7.0, dropout: p, use_rslora: rs, seed: 0xabcdef };
        let s = cfg.scaling() as f64;
        assert_eq!(s, if rs { 7.0 / 2.0 } else { 7.0 / 4.0 });
        let off = 5;
        let mask = DropoutMask::new(p, cfg.seed, off);
        let keep: Vec<f64> =
            (0..m * k).map(|e| if mask.keep(e as u64) { 1.0 / (1.0 - p as f64) } else { 0.0 }).collect();
        let xd: Vec<f64> = f64v(&x).iter().zip(&keep).map(|(a, b)| a * b).collect();
        let sref = mm64(&xd, &f64v(&a), m, k, r, true);
        let mut y = mm64(&f64v(&x), &f64v(&w0), m, k, n, true);
        let lo = mm64(&sref, &f64v(&b), m, r, n, true);
        for i in 0..m * n {
            y[i] += bias[i % n] as f64 + s * lo[i];
        }
        let f = lora_forward(&x, &w0, Some(&bias), &a, &b, sh, &cfg, off, true).unwrap();
        assert!(rel_err(&f.y, &y) < 1e-6, "y p={p}");
        assert!(rel_err(&f.s, &sref) < 1e-6, "S p={p}");

        let dy64 = f64v(&dy);
        let db: Vec<f64> = mm64(&t64(&dy64, m, n), &sref, n, m, r, false).iter().map(|v| v * s).collect();
        let ds: Vec<f64> = mm64(&dy64, &f64v(&b), m, n, r, false).iter().map(|v| v * s).collect();
        let da = mm64(&t64(&ds, m, r), &xd, r, m, k, false);
        let mut dx = mm64(&dy64, &f64v(&w0), m, n, k, false);
        let dsa = mm64(&ds, &f64v(&a), m, r, k, false);
        for i in 0..m * k {
            dx[i] += dsa[i] * keep[i];
        }
        let g = lora_backward(&dy, &x, &w0, &a, &b, &f.s, sh, &cfg, off, true, true).unwrap();
        assert!(rel_err(&g.db, &db) < 1e-6, "dB p={p}");
        assert!(rel_err(&g.da, &da) < 1e-6, "dA p={p}");
        assert!(rel_err(g.dx.as_ref().unwrap(), &dx) < 1e-6, "dx p={p}");
        // Eval mode ignores dropout.
        let fe = lora_forward(&x, &w0, Some(&bias), &a, &b, sh, &cfg, off, false).unwrap();
        let fe0 =
            lora_forward(&x, &w0, Some(&bias), &a, &b, sh, &LoraOpConfig { dropout: 0.0, ..cfg }, off, true).unwrap();
        assert_eq!(fe.y, fe0.y);
    }
}

/// Keep rate ≈ 1 − p, kept values scaled by 1/(1−p), masks differ across offsets and seeds
/// and are reproducible.
#[test]
fn dropout_statistics_and_reproducibility() {
    let n = 200_000;
    let x = vec![1.0f32; n];
    for p in [0.05f32, 0.5, 0.9] {
        let m = DropoutMask::new(p, 1234, 99);
        let mut out = vec![0.0; n];
        m.apply(0, &x, &mut out);
        let kept = out.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
        let sd = ((p * (1.0 - p)) as f64 / n as f64).sqrt();
        assert!((kept - (1.0 - p as f64)).abs() < 5.0 * sd, "p={p}: kept {kept}");
        assert!(out.iter().all(|&v| v == 0.0 || (v - 1.0 / (1.0 - p)).abs() < 1e-6));
        let mean = out.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.05, "p={p}: E[drop(x)] = {mean}");
        let mut again = vec![0.0; n];
        m.apply(0, &x, &mut again);
        assert_eq!(out, again, "same (seed, offset) ⇒ same mask");
        for other in [DropoutMask::new(p, 1234, 100), DropoutMask::new(p, 1235, 99)] {
            let mut o = vec![0.0; n];
            other.apply(0, &x, &mut o);
            let agree = out.iter().zip(&o).filter(|(a, b)| (**a == 0.0) == (**b == 0.0)).count() as f64 / n as f64;
            let expect = (p * p + (1.0 - p) * (1.0 - p)) as f64;
            assert!((agree - expect).abs() < 0.01, "independent masks agree at rate {agree}, expected {expect}");
        }
    }
}

/// Merging the adapter into W0 gives the LoRA output (eval), unmerging restores W0.
#[test]
fn merge_unmerge() {
    let mut rng = TestRng::new(12);
    let (m, k, n, r) = (5, 16, 9, 2);
    let (x, w0, a, b) = (rng.vec_f32(m * k), rng.vec_f32(n * k), rng.vec_f32(r * k), rng.vec_f32(n * r));
    let cfg = LoraOpConfig::default_for(r);
    let sh = LinearShape { m, k, n };
    let want = lora_forward(&x, &w0, None, &a, &b, sh, &cfg, 0, false).unwrap().y;
    let mut w = w0.clone();
    merge_into(&mut w, &a, &b, n, k, &cfg, 1.0).unwrap();
    let merged = lorafuse::ops::lora::linear(&x, &w, None, sh).unwrap();
    assert!(rel_err(&merged, &f64v(&want)) < 1e-6);
    merge_into(&mut w, &a, &b, n, k, &cfg, -1.0).unwrap();
    assert!(rel_err(&w, &f64v(&w0)) < 1e-6);
}

#[test]
fn shape_errors_name_the_operand() {
    let cfg = LoraOpConfig::default_for(2);
    let sh = LinearShape { m: 2, k: 3, n: 4 };
    let e = lora_forward(&[0.0; 6], &[0.0; 12], None, &[0.0; 5], &[0.0; 8], sh, &cfg, 0, true).unwrap_err();
    assert!(e.to_string().contains("A has 5 elements, expected 6"), "{e}");
}
