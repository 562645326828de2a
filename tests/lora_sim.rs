//! The fused LoRA kernels (`kernels/lora.cu`) and the unfused baseline in the SIMT simulator
//! vs a float64 reference on the same bf16 inputs and the same Philox mask (checks and
//! tolerances in tests/common/lora.rs, shared with the GPU tests).

mod common;

use common::lora::*;
use lorafuse::device::sim::{Schedule, Sim};
use lorafuse::device::{Backend, Device};
use lorafuse::ops::lora_kernels::{lora_forward, LoraWeights};
use lorafuse::ops::philox::DropoutMask;
use lorafuse::tensor::DType;
use lorafuse::testing::TestRng;
use std::sync::Arc;

#[test]
fn fused_lora_matches_f64_reference_on_ragged_shapes() {
    let dev: Arc<dyn Device> = Arc::new(Sim::new(Schedule::Random(11)));
    let cases = [
        Case { m: 1, n: 24, k: 40, r: 1, p: 0.0 },
        Case { m: 33, n: 65, k: 72, r: 4, p: 0.1 },
        Case { m: 130, n: 40, k: 136, r: 8, p: 0.5 },
        Case { m: 70, n: 129, k: 64, r: 16, p: 0.1 },
        Case { m: 40, n: 50, k: 30, r: 64, p: 0.5 },
    ];
    for (i, c) in cases.iter().enumerate() {
        run_case(&dev, c, i as u64 + 1);
    }
}

#[test]
fn fused_lora_under_warp_ahead_schedule() {
    let dev: Arc<dyn Device> = Arc::new(Sim::new(Schedule::WarpAhead(5)));
    run_case(&dev, &Case { m: 150, n: 70, k: 200, r: 16, p: 0.1 }, 42);
}

#[test]
fn dropout_changes_the_output() {
    let dev: Arc<dyn Device> = Arc::new(Sim::new(Schedule::Lockstep));
    let backend = Backend::Device(dev.clone());
    let mut rng = TestRng::new(3);
    let (m, n, k, r) = (16, 16, 64, 8);
    let t = |shape: &[usize], s: f32, rng: &mut TestRng| {
        upload(&backend, shape, &bf16_vec(rng, shape.iter().product(), s), DType::BF16)
    };
    let (x, w0, a, b) =
        (t(&[m, k], 1.0, &mut rng), t(&[n, k], 0.5, &mut rng), t(&[r, k], 0.5, &mut rng), t(&[n, r], 0.5, &mut rng));
    let cs = upload(&backend, &[r], &vec![1.0; r], DType::F32);
    let w = LoraWeights { w0: &w0, a: &a, b: &b, col_scale: &cs };
    let s0 = download(&lora_forward(&dev, &x, &w, &DropoutMask::new(0.0, 1, 0), DType::F32).unwrap().s);
    let s1 = download(&lora_forward(&dev, &x, &w, &DropoutMask::new(0.5, 1, 0), DType::F32).unwrap().s);
    let s2 = download(&lora_forward(&dev, &x, &w, &DropoutMask::new(0.5, 1, 1), DType::F32).unwrap().s);
    let diff = |u: &[f32], v: &[f32]| u.iter().zip(v).map(|(p, q)| (p - q).abs()).sum::<f32>();
    assert!(diff(&s0, &s1) > 1e-2, "p=0.5 left S unchanged: dropout did nothing");
    assert!(diff(&s1, &s2) > 1e-2, "a different offset gave the same mask");
}

#[test]
fn unfused_rejects_a_vector_input() {
    let dev: Arc<dyn Device> = Arc::new(Sim::new(Schedule::Lockstep));
    let backend = Backend::Device(dev.clone());
    let t = |shape: &[usize]| upload(&backend, shape, &vec![0.5; shape.iter().product()], DType::BF16);
    let (x, w0, a, b) = (t(&[8]), t(&[4, 8]), t(&[2, 8]), t(&[4, 2]));
    let cs = upload(&backend, &[2], &[1.0, 1.0], DType::F32);
    let w = LoraWeights { w0: &w0, a: &a, b: &b, col_scale: &cs };
    let err =
        lorafuse::ops::lora_unfused::lora_forward_unfused(&dev, &x, &w, 1.0, &DropoutMask::new(0.0, 0, 0)).unwrap_err();
    assert!(err.to_string().contains("matrices"), "{err}");
}
