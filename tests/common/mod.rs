//! Checks shared by the simulator tests and the GPU tests (tests/gpu.rs): the same assertions
//! run on every device.
#![allow(dead_code)]

pub mod llama_ops;
pub mod lora;
pub mod selftest;

use half::bf16;
use lorafuse::device::{Device, DeviceBuffer};
use lorafuse::ops::gemm::{gemm_ref, launch_gemm, GemmLayout, GemmShape};
use lorafuse::tensor::DType;
use lorafuse::testing::{rel_err, TestRng};
use std::sync::Arc;

/// Shapes that are not tile multiples, plus tile multiples, from the foundation issue.
pub const GEMM_SHAPES: &[(usize, usize, usize)] =
    &[(1, 1, 1), (17, 33, 65), (128, 256, 64), (200, 96, 136), (1, 130, 70), (129, 127, 8), (64, 64, 200)];

fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

/// Runs the GEMM on `dev` with A and B stored as `layout` says with leading dimensions lda, ldb
/// and C [m, ldc] (random data, C poisoned with NaN first) and returns the relative error of C
/// vs a float64 reference on the same bf16-rounded inputs. Panics on a launch error.
pub fn gemm_error(dev: &Arc<dyn Device>, shape: GemmShape, layout: GemmLayout, out: DType, seed: u64) -> f64 {
    let mut rng = TestRng::new(seed);
    let ((a_rows, _), (b_rows, _)) = layout.stored_shapes(shape.m, shape.n, shape.k);
    let a_full = bf16_round(&rng.vec_f32(a_rows * shape.lda));
    let b_full = bf16_round(&rng.vec_f32(b_rows * shape.ldb));
    let to_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect() };
    let a = DeviceBuffer::from_host(dev, &to_bytes(&a_full)).unwrap();
    let b = DeviceBuffer::from_host(dev, &to_bytes(&b_full)).unwrap();
    let c = DeviceBuffer::new(dev, shape.m * shape.ldc * out.size()).unwrap();
    // NaN in f32 and bf16: any element the kernel skips fails the check
    c.fill(0xFF).unwrap();
    // SAFETY: buffers sized from `shape` above.
    unsafe { launch_gemm(dev.as_ref(), a.ptr(), b.ptr(), c.ptr(), shape, layout, out) }.unwrap();
    dev.synchronize().unwrap();

    let want = gemm_ref(&a_full, &b_full, shape, layout);
    let bytes = c.to_host().unwrap();
    let got_full: Vec<f32> = match out {
        DType::F32 => bytemuck::pod_collect_to_vec(&bytes),
        DType::BF16 => bytes.chunks(2).map(|h| bf16::from_le_bytes([h[0], h[1]]).to_f32()).collect(),
        _ => unreachable!(),
    };
    let got: Vec<f32> = (0..shape.m).flat_map(|r| got_full[r * shape.ldc..r * shape.ldc + shape.n].to_vec()).collect();
    rel_err(&got, &want)
}

/// f32 accumulation of exact bf16 products vs float64: only summation rounding, ~1e-7·√K.
pub const GEMM_F32_TOL: f64 = 1e-5;
/// bf16 output adds one rounding of 2⁻⁹ relative per element.
pub const GEMM_BF16_TOL: f64 = 4e-3;
