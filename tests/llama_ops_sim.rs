//! The Llama layer kernels in the SIMT simulator, under each schedule: the checks of
//! tests/common/llama_ops.rs (which tests/gpu.rs also runs on a real device).

mod common;

use common::llama_ops;
use lorafuse::device::sim::{Schedule, Sim};
use lorafuse::device::Device;
use std::sync::Arc;

/// Runs `check` on the simulator under each schedule: lockstep; random order between barriers
/// (a read that needs a missing barrier sees stale data); each of the first warps running
/// ahead of the others (a write that needs a missing barrier lands before another warp's read).
fn under_every_schedule(check: fn(&Arc<dyn Device>)) {
    let schedules = [
        Schedule::Lockstep,
        Schedule::Random(3),
        Schedule::WarpAhead(0),
        Schedule::WarpAhead(1),
        Schedule::WarpAhead(2),
    ];
    for s in schedules {
        let dev: Arc<dyn Device> = Arc::new(Sim::new(s));
        check(&dev);
    }
}

#[test]
fn rms_norm_forward_and_backward() {
    under_every_schedule(llama_ops::rms_norm_forward_and_backward);
}

#[test]
fn rms_norm_rejects_bad_operands() {
    under_every_schedule(llama_ops::rms_norm_rejects_bad_operands);
}

#[test]
fn swiglu_forward_and_backward() {
    under_every_schedule(llama_ops::swiglu_forward_and_backward);
}

#[test]
fn rope_forward_and_inverse() {
    under_every_schedule(llama_ops::rope_forward_and_inverse);
}

#[test]
fn cross_entropy_loss_and_gradient() {
    under_every_schedule(llama_ops::cross_entropy_loss_and_gradient);
}

#[test]
fn attention_forward_and_backward() {
    under_every_schedule(llama_ops::attention_forward_and_backward);
}

#[test]
fn adamw_and_gradient_norm() {
    under_every_schedule(llama_ops::adamw_and_gradient_norm);
}

#[test]
fn embedding_gather() {
    under_every_schedule(llama_ops::embedding_gather);
}
