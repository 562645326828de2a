//! The public LoRA linear on every backend agrees: CPU (f32), simulator with the fused split
//! kernels, simulator with the unfused PEFT-style kernels — on the same bf16-representable
//! inputs and the same Philox mask.
//!
//! Tolerance 5e-3 relative L2: the device paths round S, dS (and the unfused path drop(x)) to
//! bf16 once (2⁻⁹), the CPU path computes in f32.

use half::bf16;
use lorafuse::device::sim::{Schedule, Sim};
use lorafuse::device::Backend;
use lorafuse::ops::lora::LoraOpConfig;
use lorafuse::ops::lora_linear::{LoraLinear, LoraParams, Strategy};
use lorafuse::ops::philox::DropoutMask;
use lorafuse::tensor::{HostData, Tensor};
use lorafuse::testing::{rel_err, TestRng};
use std::sync::Arc;

const TOL: f64 = 5e-3;

fn bf16_tensor(rng: &mut TestRng, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    let v = rng.vec_f32(n).iter().map(|&x| bf16::from_f32(x * scale).to_f32()).collect();
    Tensor::from_host(shape, HostData::F32(v)).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_host().unwrap().to_f32().iter().map(|&v| v as f64).collect()
}

#[test]
fn cpu_fused_and_unfused_agree() {
    let mut rng = TestRng::new(21);
    for &(m, k, n, r, p, rslora) in
        &[(1, 24, 16, 1, 0.0, false), (37, 72, 40, 8, 0.1, false), (65, 40, 33, 16, 0.5, true)]
    {
        let cfg = LoraOpConfig { r, alpha: 16.0, dropout: p, use_rslora: rslora, seed: 99 };
        let x = bf16_tensor(&mut rng, &[m, k], 1.0);
        let w0 = bf16_tensor(&mut rng, &[n, k], 0.5);
        let a = bf16_tensor(&mut rng, &[r, k], 0.5);
        let b = bf16_tensor(&mut rng, &[n, r], 0.1);
        let dy = bf16_tensor(&mut rng, &[m, n], 1.0);
        let mut results = Vec::new();
        let sim = Backend::Device(Arc::new(Sim::new(Schedule::Random(4))));
        for (backend, strategy) in
            [(Backend::cpu(), Strategy::Split), (sim.clone(), Strategy::Split), (sim, Strategy::Unfused)]
        {
            let lora = LoraLinear { cfg, strategy };
            let on = |t: &Tensor| lora.prepare(t, &backend).unwrap();
            let (xb, w0b, ab, bb, dyb) = (on(&x), on(&w0), on(&a), on(&b), on(&dy));
            let params = LoraParams { w0: &w0b, a: &ab, b: &bb };
            let (y, saved) = lora.forward(&backend, &xb, &params, 5, true).unwrap();
            let g = lora.backward(&backend, &xb, &params, &saved, &dyb).unwrap();
            results.push((
                format!("{} {strategy:?}", backend.name()),
                [values(&y), values(&g.dx), values(&g.da), values(&g.db)],
            ));
        }
        let (ref_name, reference) = &results[0];
        for (name, got) in &results[1..] {
            for (i, what) in ["y", "dx", "dA", "dB"].iter().enumerate() {
                let got32: Vec<f32> = got[i].iter().map(|&v| v as f32).collect();
                let e = rel_err(&got32, &reference[i]);
                assert!(e <= TOL, "m={m} k={k} n={n} r={r} p={p}: {what} of {name} vs {ref_name}: rel err {e:e}");
            }
        }
    }
}

#[test]
fn dropped_fraction_is_within_binomial_bounds() {
    let n = 200_000u64;
    for p in [0.05f32, 0.1, 0.5] {
        let mask = DropoutMask::new(p, 1234, 8);
        let kept = (0..n).filter(|&e| mask.keep(e)).count() as f64;
        let (mean, sd) = (n as f64 * (1.0 - p as f64), (n as f64 * p as f64 * (1.0 - p as f64)).sqrt());
        assert!((kept - mean).abs() <= 5.0 * sd, "p={p}: kept {kept}, expected {mean} ± {sd}");
    }
    assert!((0..1000).all(|e| DropoutMask::new(0.0, 1, 2).keep(e)), "p = 0 must keep everything");
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let cfg = LoraOpConfig { r: 4, alpha: 8.0, dropout: 0.0, use_rslora: false, seed: 0 };
    let lora = LoraLinear { cfg, strategy: Strategy::Split };
    let t = |shape: &[usize]| Tensor::from_host(shape, HostData::F32(vec![0.5; shape.iter().product()])).unwrap();
    let (x, w0, a, b) = (t(&[2, 8]), t(&[3, 8]), t(&[4, 7]), t(&[3, 4]));
    let err = lora.forward(&Backend::cpu(), &x, &LoraParams { w0: &w0, a: &a, b: &b }, 0, true).unwrap_err();
    assert!(err.to_string().contains("A [4, 7]"), "{err}");
    let bad = LoraLinear { cfg: LoraOpConfig { dropout: 1.0, ..cfg }, strategy: Strategy::Split };
    let a = t(&[4, 8]);
    let err = bad.forward(&Backend::cpu(), &x, &LoraParams { w0: &w0, a: &a, b: &b }, 0, true).unwrap_err();
    assert!(err.to_string().contains("dropout"), "{err}");
}
