//! NF4 kernel checks shared by the simulator tests (tests/nf4_sim.rs) and the GPU tests
//! (tests/gpu.rs): the same assertions on every device.
#![allow(dead_code)]

use half::bf16;
use lorafuse::device::{Backend, Device};
use lorafuse::ops::lora_kernels::{lora_backward, lora_forward, LoraWeights};
use lorafuse::ops::philox::DropoutMask;
use lorafuse::ops::qlora::{dequantize_nf4, Nf4DeviceWeight, QloraAdapter, QloraArrangement, QloraLinear};
use lorafuse::quant::{Nf4Config, Nf4Tensor};
use lorafuse::tensor::{DType, HostData, Tensor};
use lorafuse::testing::TestRng;
use std::sync::Arc;

/// bf16 bit patterns of a downloaded tensor.
pub fn bf16_bits(t: &Tensor) -> Vec<u16> {
    match t.to_host().unwrap() {
        HostData::BF16(v) => v.iter().map(|x| x.to_bits()).collect(),
        other => panic!("expected bf16, got {:?}", other.dtype()),
    }
}

/// f32 bit patterns (f32 tensors) or bf16 bit patterns widened (bf16 tensors).
pub fn bits(t: &Tensor) -> Vec<u32> {
    match t.to_host().unwrap() {
        HostData::BF16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
        HostData::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
        other => panic!("unexpected dtype {:?}", other.dtype()),
    }
}

/// Pseudo-normal weights, scaled like an LLM linear, with a few outliers so block scales differ.
pub fn weights(rng: &mut TestRng, n: usize) -> Vec<bf16> {
    (0..n)
        .map(|i| {
            let u = rng.vec_f32(3).iter().sum::<f32>();
            let outlier = if i % 97 == 5 { 8.0 } else { 1.0 };
            bf16::from_f32(u * 0.02 * outlier)
        })
        .collect()
}

/// A bf16 device tensor of `shape` poisoned with 0xFF bytes (NaN), so unwritten elements fail
/// bit comparisons.
pub fn poisoned_bf16(dev: &Arc<dyn Device>, shape: &[usize]) -> Tensor {
    let mut t = Tensor::empty(shape, DType::BF16, &Backend::Device(dev.clone())).unwrap();
    t.fill_bytes(0xFF).unwrap();
    t
}

/// Dequantizes `t` on `dev` into a poisoned buffer and asserts it equals the CPU path bit for bit.
pub fn check_dequant(dev: &Arc<dyn Device>, t: &Nf4Tensor, what: &str) {
    let w = Nf4DeviceWeight::upload(dev, t, what).unwrap();
    let out = poisoned_bf16(dev, &[t.numel()]);
    dequantize_nf4(dev, &w, &out).unwrap();
    let want: Vec<u16> = t.dequantize::<bf16>().unwrap().iter().map(|x| x.to_bits()).collect();
    let got = bf16_bits(&out);
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        panic!("{what}: element {i} of {}: got {:#06x}, want {:#06x}", want.len(), got[i], want[i]);
    }
}

/// Random tensors of every `(n, blocksize)` with and without double quantization, dequantized
/// on `dev` bit-exactly.
pub fn dequant_cases(dev: &Arc<dyn Device>, cases: &[(usize, usize)], seed: u64) {
    let mut rng = TestRng::new(seed);
    for &(n, bs) in cases {
        let w = weights(&mut rng, n);
        for dq in [false, true] {
            let t = Nf4Tensor::quantize(&w, &[n], Nf4Config { blocksize: bs, double_quant: dq }).unwrap();
            check_dequant(dev, &t, &format!("n={n} bs={bs} dq={dq}"));
        }
    }
}

pub fn upload_bf16(dev: &Arc<dyn Device>, shape: &[usize], v: &[bf16]) -> Tensor {
    Tensor::from_host(shape, HostData::BF16(v.to_vec())).unwrap().to_backend(&Backend::Device(dev.clone())).unwrap()
}

/// One QLoRA linear shape.
#[derive(Debug, Clone, Copy)]
pub struct QloraCase {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub r: usize,
    pub p: f32,
    pub blocksize: usize,
    pub double_quant: bool,
}

/// QLoRA forward and backward in `arrangement` vs the bf16 LoRA kernels on the CPU-dequantized
/// W0: both run the same main loop on the same bf16 tile values, so every output (y, S,
/// s_scaled, dx, dA, dB; f32 and bf16 outputs) must be bit-identical, and finite.
pub fn qlora_matches_lora(dev: &Arc<dyn Device>, c: QloraCase, arrangement: QloraArrangement, seed: u64) {
    let QloraCase { m, n, k, r, p, blocksize, double_quant } = c;
    let what = format!("{c:?} {arrangement:?}");
    let mut rng = TestRng::new(seed);
    let w0 = weights(&mut rng, n * k);
    let q = Nf4Tensor::quantize(&w0, &[n, k], Nf4Config { blocksize, double_quant }).unwrap();
    let w0_deq = q.dequantize::<bf16>().unwrap();
    let rnd = |rng: &mut TestRng, len: usize, s: f32| -> Vec<bf16> {
        rng.vec_f32(len).iter().map(|&v| bf16::from_f32(v * s)).collect()
    };
    let x = upload_bf16(dev, &[m, k], &rnd(&mut rng, m * k, 1.0));
    let a = upload_bf16(dev, &[r, k], &rnd(&mut rng, r * k, 0.5));
    let b = upload_bf16(dev, &[n, r], &rnd(&mut rng, n * r, 0.5));
    let dy = upload_bf16(dev, &[m, n], &rnd(&mut rng, m * n, 1.0));
    let cs = Tensor::from_host(&[r], HostData::F32(vec![2.0 / r as f32; r]))
        .unwrap()
        .to_backend(&Backend::Device(dev.clone()))
        .unwrap();
    let tw0 = upload_bf16(dev, &[n, k], &w0_deq);
    let mask = DropoutMask::new(p, 0x5EED ^ seed, 3 * seed);
    let lw = LoraWeights { w0: &tw0, a: &a, b: &b, col_scale: &cs };
    let mut ql = QloraLinear::new(dev, &q, "test.w0", arrangement).unwrap();
    let ad = QloraAdapter { a: &a, b: &b, col_scale: &cs };
    for out in [DType::F32, DType::BF16] {
        let want = lora_forward(dev, &x, &lw, &mask, out).unwrap();
        let got = ql.forward(&x, &ad, &mask, out).unwrap();
        for (name, g, w) in
            [("y", &got.y, &want.y), ("S", &got.s, &want.s), ("s_scaled", &got.s_scaled, &want.s_scaled)]
        {
            assert!(bits(g) == bits(w), "{what} {out:?}: forward {name} differs from the bf16 LoRA path");
            assert_finite(g, &format!("{what}: {name}"));
        }
        let want = lora_backward(dev, &x, &lw, &want.s_scaled, &dy, &mask, out).unwrap();
        let got = ql.backward(&x, &ad, &got.s_scaled, &dy, &mask, out).unwrap();
        for (name, g, w) in [("dx", &got.dx, &want.dx), ("dA", &got.da, &want.da), ("dB", &got.db, &want.db)] {
            assert!(bits(g) == bits(w), "{what} {out:?}: backward {name} differs from the bf16 LoRA path");
            assert_finite(g, &format!("{what}: {name}"));
        }
    }
    let scratch = if arrangement == QloraArrangement::Scratch { 2 * n * k } else { 0 };
    assert_eq!(ql.scratch_bytes(), scratch, "{what}: scratch buffer");
}

/// Every element is finite (an unwritten, 0xFF-poisoned element is NaN).
fn assert_finite(t: &Tensor, what: &str) {
    let v = t.to_host().unwrap().to_f32();
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        panic!("{what}: element {i} is {}", v[i]);
    }
}
