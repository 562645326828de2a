//! The kernel checks on a real CUDA device. Without one, every check prints
//! "skipped: no CUDA device" (this binary has no test harness, so the lines are always shown).

mod common;

use common::*;
use lorafuse::device::cuda::{unavailable_reason, Cuda};
use lorafuse::device::Device;
use lorafuse::ops::gemm::{GemmLayout, GemmShape};
use lorafuse::tensor::DType;
use std::sync::Arc;

type Check = fn(&Arc<dyn Device>);

fn gemm_f32(dev: &Arc<dyn Device>) {
    for (i, &(m, n, k)) in GEMM_SHAPES.iter().chain(&[(1024, 1536, 2048)]).enumerate() {
        for layout in [GemmLayout::Nt, GemmLayout::Nn, GemmLayout::Tn] {
            let err = gemm_error(dev, GemmShape::dense_for(layout, m, n, k), layout, DType::F32, i as u64);
            assert!(err <= GEMM_F32_TOL, "{layout:?} {m}x{n}x{k}: rel err {err:e}");
        }
    }
}

fn gemm_bf16(dev: &Arc<dyn Device>) {
    let err = gemm_error(dev, GemmShape::dense(200, 96, 136), GemmLayout::Nt, DType::BF16, 3);
    assert!(err <= GEMM_BF16_TOL, "rel err {err:e}");
}

fn lora_split_and_unfused(dev: &Arc<dyn Device>) {
    use common::lora::{run_case, Case};
    run_case(dev, &Case { m: 130, n: 70, k: 200, r: 16, p: 0.1 }, 1);
    run_case(dev, &Case { m: 1, n: 33, k: 64, r: 64, p: 0.5 }, 2);
    run_case(dev, &Case { m: 513, n: 1030, k: 520, r: 8, p: 0.0 }, 3);
}

const CHECKS: &[(&str, Check)] =
    &[("gemm_f32", gemm_f32), ("gemm_bf16", gemm_bf16), ("lora_split_and_unfused", lora_split_and_unfused)];

fn main() {
    if let Some(why) = unavailable_reason() {
        for (name, _) in CHECKS {
            println!("gpu::{name} ... skipped: no CUDA device ({why})");
        }
        println!("gpu: 0 run, {} skipped: no CUDA device", CHECKS.len());
        return;
    }
    let dev: Arc<dyn Device> = Arc::new(Cuda::new(0).expect("a device was reported present"));
    println!("gpu: running on {}", dev.name());
    for (name, check) in CHECKS {
        check(&dev);
        println!("gpu::{name} ... ok");
    }
    println!("gpu: {} passed", CHECKS.len());
}
