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

#[test]
fn residual_add_and_cast() {
    under_every_schedule(llama_ops::residual_add_and_cast);
}

/// The global traffic the kernel headers state, counted by the simulator, exactly: the row
/// kernels read a row twice (the second time from cache on a GPU), everything else once.
#[test]
fn traffic_matches_the_kernel_headers() {
    use half::bf16;
    use lorafuse::device::Backend;
    use lorafuse::ops::activation::{swiglu_backward_device, swiglu_forward_device};
    use lorafuse::ops::embedding::embedding_device;
    use lorafuse::ops::loss::{causal_lm_loss_device, IGNORE_INDEX};
    use lorafuse::ops::norm::{rms_norm_backward_device, rms_norm_forward_device};
    use lorafuse::tensor::{HostData, Tensor};
    let dev: Arc<dyn Device> = Arc::new(Sim::new(Schedule::Lockstep));
    let backend = Backend::Device(dev.clone());
    let t = |shape: &[usize]| {
        let n = shape.iter().product();
        Tensor::from_host(shape, HostData::BF16(vec![bf16::from_f32(0.25); n])).unwrap().to_backend(&backend).unwrap()
    };
    let traffic = |f: &mut dyn FnMut()| {
        dev.take_stats();
        f();
        let s = dev.take_stats().expect("the simulator counts");
        (s.bytes_read, s.bytes_written)
    };
    let (rows, k, s) = (6u64, 136u64, 2u64);
    let (x, w, dy) = (t(&[6, 136]), t(&[136]), t(&[6, 136]));
    let mut rstd = None;
    let fwd = traffic(&mut || rstd = Some(rms_norm_forward_device(&dev, &x, &w, 1e-5).unwrap().1));
    assert_eq!(fwd, (rows * (2 * k * s + k * s), rows * (k * s + 4)), "rms_norm forward: x twice, w, y, rstd");
    let rstd = rstd.unwrap();
    let bwd = traffic(&mut || drop(rms_norm_backward_device(&dev, &dy, &x, &w, &rstd).unwrap()));
    // Every thread loads the row's rstd (one broadcast transaction on a GPU; 128 loads here).
    assert_eq!(bwd, (rows * (2 * 3 * k * s + 128 * 4), rows * k * s), "rms_norm backward: x, dy, w twice, rstd; dx");
    let n = 6 * 136u64;
    let fwd = traffic(&mut || drop(swiglu_forward_device(&dev, &x, &dy).unwrap()));
    assert_eq!(fwd, (2 * n * s, n * s), "swiglu forward");
    let bwd = traffic(&mut || drop(swiglu_backward_device(&dev, &x, &dy, &x).unwrap()));
    assert_eq!(bwd, (3 * n * s, 2 * n * s), "swiglu backward");
    let ids = [3u32, 0, 5, 5];
    let emb = traffic(&mut || drop(embedding_device(&dev, &x, &ids).unwrap()));
    // Each thread of a row reads the id again (from cache on a GPU): 136 / 8 packs per row.
    assert_eq!(emb, (4 * (k * s + 17 * 4), 4 * k * s), "embedding: row and ids read, row written");
    // Cross-entropy over 2 sequences of 3: rows 2 and 5 end a sequence, row 0's target is ignored.
    let logits = t(&[6, 136]);
    let labels = [1, IGNORE_INDEX, 7, 8, 9, 10];
    let ce = traffic(&mut || drop(causal_lm_loss_device(&dev, &logits, &labels, 3, 136).unwrap()));
    // Counted rows read the logits twice and the target logit; every thread of every row loads
    // the target id (a broadcast on a GPU: 256 loads of 8 bytes here).
    let (counted, ignored) = (3u64, 3u64);
    assert_eq!(
        ce,
        (counted * (2 * k * s + s) + (counted + ignored) * 256 * 8, rows * (k * s + 4)),
        "cross-entropy: logits twice per counted row; every row writes its gradient and loss"
    );
}
