//! The kernel checks on a real CUDA device. Without one, every check prints
//! "skipped: no CUDA device" (this binary has no test harness, so the lines are always shown).

mod common;
#[path = "common/nf4_checks.rs"]
mod nf4_checks;

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

/// NF4 → bf16 dequant bit-exact vs the CPU path: odd sizes, every blocksize, a 4096×4096 weight.
fn nf4_dequant(dev: &Arc<dyn Device>) {
    let cases =
        [(1, 32), (1025, 64), (3001, 4096), (9001, 64), (4096, 128), (6145, 512), (4097, 2048), (4096 * 4096, 64)];
    nf4_checks::dequant_cases(dev, &cases, 1);
}

/// QLoRA forward/backward in both arrangements bit-identical to the bf16 LoRA kernels.
fn qlora_linear(dev: &Arc<dyn Device>) {
    use lorafuse::ops::qlora::QloraArrangement;
    use nf4_checks::QloraCase;
    let cases = [
        QloraCase { m: 33, n: 130, k: 72, r: 4, p: 0.1, blocksize: 64, double_quant: true },
        QloraCase { m: 20, n: 41, k: 37, r: 8, p: 0.0, blocksize: 32, double_quant: false },
        QloraCase { m: 300, n: 520, k: 1000, r: 16, p: 0.1, blocksize: 64, double_quant: true },
        QloraCase { m: 1024, n: 1536, k: 2048, r: 64, p: 0.0, blocksize: 256, double_quant: true },
    ];
    for (i, c) in cases.iter().enumerate() {
        for arr in [QloraArrangement::Scratch, QloraArrangement::Fused] {
            nf4_checks::qlora_matches_lora(dev, *c, arr, i as u64 + 1);
        }
    }
}

const CHECKS: &[(&str, Check)] = &[
    ("gemm_f32", gemm_f32),
    ("gemm_bf16", gemm_bf16),
    ("lora_split_and_unfused", lora_split_and_unfused),
    ("nf4_dequant", nf4_dequant),
    ("qlora_linear", qlora_linear),
    ("rms_norm", common::llama_ops::rms_norm_forward_and_backward),
    ("rms_norm_errors", common::llama_ops::rms_norm_rejects_bad_operands),
    ("swiglu", common::llama_ops::swiglu_forward_and_backward),
    ("rope", common::llama_ops::rope_forward_and_inverse),
    ("cross_entropy", common::llama_ops::cross_entropy_loss_and_gradient),
    ("attention", common::llama_ops::attention_forward_and_backward),
    ("adamw", common::llama_ops::adamw_and_gradient_norm),
    ("embedding", common::llama_ops::embedding_gather),
    ("residual_add_and_cast", common::llama_ops::residual_add_and_cast),
    // The simulator self-tests validate its fragment layouts and shuffle semantics against the
    // hardware (simt_selftest_diverge is left out: its deliberate bugs may hang a GPU).
    ("simt_barrier", common::selftest::barrier),
    ("simt_index", common::selftest::index),
    ("simt_reduce", common::selftest::reduce),
    ("simt_shuffle", common::selftest::shuffle),
    ("simt_vote", common::selftest::vote),
    ("simt_atomics", common::selftest::atomics),
    ("simt_mma_bf16", common::selftest::mma_bf16),
    ("simt_mma_f16", common::selftest::mma_f16),
    ("simt_ldmatrix", common::selftest::ldmatrix),
];

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
