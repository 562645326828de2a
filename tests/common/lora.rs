//! The LoRA kernel checks shared by the simulator tests (tests/lora_sim.rs) and the GPU tests:
//! fused split kernels and the unfused baseline vs a float64 reference on the same bf16 inputs
//! and the same Philox mask.
//!
//! Tolerances (relative L2 norm):
//! - S, dB: f32 accumulation of exact bf16 products: 1e-5.
//! - y, dx, dA: the LoRA term goes through one bf16 rounding (S⊙c and dS are bf16 operands of
//!   the next product, 2⁻⁹ relative): 5e-3 against the unrounded float64 reference.
#![allow(dead_code)]

use half::bf16;
use lorafuse::device::{Backend, Device};
use lorafuse::ops::lora_kernels::{lora_backward, lora_forward, LoraWeights};
use lorafuse::ops::lora_unfused::{lora_backward_unfused, lora_forward_unfused};
use lorafuse::ops::philox::DropoutMask;
use lorafuse::tensor::{DType, HostData, Tensor};
use lorafuse::testing::{rel_err, TestRng};
use std::sync::Arc;

pub const EXACT_TOL: f64 = 1e-5;
pub const BF16_TOL: f64 = 5e-3;

pub struct Case {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub r: usize,
    pub p: f32,
}

pub fn bf16_vec(rng: &mut TestRng, n: usize, scale: f32) -> Vec<f32> {
    rng.vec_f32(n).iter().map(|&v| bf16::from_f32(v * scale).to_f32()).collect()
}

pub fn upload(backend: &Backend, shape: &[usize], v: &[f32], dtype: DType) -> Tensor {
    let data = match dtype {
        DType::BF16 => HostData::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
        DType::F32 => HostData::F32(v.to_vec()),
        _ => unreachable!(),
    };
    Tensor::from_host(shape, data).unwrap().to_backend(backend).unwrap()
}

pub fn download(t: &Tensor) -> Vec<f32> {
    t.to_host().unwrap().to_f32()
}

/// C[i][j] = Σ_t A(i,t)·B(j,t) in f64 with accessor closures.
fn mm(
    rows: usize,
    cols: usize,
    inner: usize,
    a: impl Fn(usize, usize) -> f64 + Sync,
    b: impl Fn(usize, usize) -> f64 + Sync,
) -> Vec<f64> {
    let mut c = vec![0f64; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            c[i * cols + j] = (0..inner).map(|t| a(i, t) * b(j, t)).sum();
        }
    }
    c
}

pub fn run_case(dev: &Arc<dyn Device>, c: &Case, seed: u64) {
    let Case { m, n, k, r, p } = *c;
    let mut rng = TestRng::new(seed);
    let backend = Backend::Device(dev.clone());
    let x = bf16_vec(&mut rng, m * k, 1.0);
    let w0 = bf16_vec(&mut rng, n * k, 0.5);
    let a = bf16_vec(&mut rng, r * k, 0.5);
    let b = bf16_vec(&mut rng, n * r, 0.5);
    let dy = bf16_vec(&mut rng, m * n, 1.0);
    let scale = 2.0f32 / r as f32; // alpha/r with alpha = 2: the LoRA term is O(1) vs the base
    let col_scale = vec![scale; r];
    let mask = DropoutMask::new(p, 0x5EED ^ seed, 17 * seed);

    let (tx, tw0, ta, tb) = (
        upload(&backend, &[m, k], &x, DType::BF16),
        upload(&backend, &[n, k], &w0, DType::BF16),
        upload(&backend, &[r, k], &a, DType::BF16),
        upload(&backend, &[n, r], &b, DType::BF16),
    );
    let tcs = upload(&backend, &[r], &col_scale, DType::F32);
    let w = LoraWeights { w0: &tw0, a: &ta, b: &tb, col_scale: &tcs };
    let fwd = lora_forward(dev, &tx, &w, &mask, DType::F32).unwrap();

    // float64 reference with the CPU's mask
    let xd: Vec<f64> =
        (0..m * k).map(|e| if mask.keep(e as u64) { x[e] as f64 * mask.scale as f64 } else { 0.0 }).collect();
    let s_ref = mm(m, r, k, |i, t| xd[i * k + t], |j, t| a[j * k + t] as f64);
    let y_ref: Vec<f64> = {
        let base = mm(m, n, k, |i, t| x[i * k + t] as f64, |j, t| w0[j * k + t] as f64);
        let up = mm(m, n, r, |i, t| s_ref[i * r + t] * scale as f64, |j, t| b[j * r + t] as f64);
        base.iter().zip(&up).map(|(u, v)| u + v).collect()
    };
    let what = format!("m={m} n={n} k={k} r={r} p={p}");
    let e_s = rel_err(&download(&fwd.s), &s_ref);
    assert!(e_s <= EXACT_TOL, "{what}: S rel err {e_s:e}");
    let e_y = rel_err(&download(&fwd.y), &y_ref);
    assert!(e_y <= BF16_TOL, "{what}: y rel err {e_y:e}");

    let tdy = upload(&backend, &[m, n], &dy, DType::BF16);
    let g = lora_backward(dev, &tx, &w, &fwd.s_scaled, &tdy, &mask, DType::F32).unwrap();
    let ss = download(&fwd.s_scaled);
    let ds_ref = mm(m, r, n, |i, t| dy[i * n + t] as f64, |j, t| b[t * r + j] as f64 * scale as f64);
    let db_ref = mm(n, r, m, |i, t| dy[t * n + i] as f64, |j, t| ss[t * r + j] as f64);
    let da_ref = mm(r, k, m, |i, t| ds_ref[t * r + i], |j, t| xd[t * k + j]);
    let dx_ref: Vec<f64> = {
        let base = mm(m, k, n, |i, t| dy[i * n + t] as f64, |j, t| w0[t * k + j] as f64);
        let lora = mm(m, k, r, |i, t| ds_ref[i * r + t], |j, t| a[t * k + j] as f64);
        (0..m * k).map(|e| base[e] + if mask.keep(e as u64) { lora[e] * mask.scale as f64 } else { 0.0 }).collect()
    };
    let e_db = rel_err(&download(&g.db), &db_ref);
    assert!(e_db <= EXACT_TOL, "{what}: dB rel err {e_db:e}");
    let e_da = rel_err(&download(&g.da), &da_ref);
    assert!(e_da <= BF16_TOL, "{what}: dA rel err {e_da:e}");
    let e_dx = rel_err(&download(&g.dx), &dx_ref);
    assert!(e_dx <= BF16_TOL, "{what}: dx rel err {e_dx:e}");

    // The unfused (PEFT-style) route reaches the same numbers; its bf16 copies of drop(x) and S
    // add roundings of 2⁻⁹, hence the bf16 tolerance throughout.
    let uf = lora_forward_unfused(dev, &tx, &w, scale, &mask).unwrap();
    assert_eq!(uf.x_dropped.is_some(), p > 0.0, "PEFT materializes drop(x) exactly when p > 0");
    let e_uy = rel_err(&download(&uf.y), &y_ref);
    assert!(e_uy <= BF16_TOL, "{what}: unfused y rel err {e_uy:e}");
    let (udx, uda, udb) = lora_backward_unfused(dev, &tx, &w, scale, &mask, &uf, &tdy).unwrap();
    let db_exact = mm(n, r, m, |i, t| dy[t * n + i] as f64, |j, t| s_ref[t * r + j] * scale as f64);
    for (name, got, want) in [("dx", &udx, &dx_ref), ("dA", &uda, &da_ref), ("dB", &udb, &db_exact)] {
        let e = rel_err(&download(got), want);
        assert!(e <= BF16_TOL, "{what}: unfused {name} rel err {e:e}");
    }
}
