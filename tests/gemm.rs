//! The tensor-core GEMM (`kernels/gemm.cu`) executed by the SIMT simulator under every schedule,
//! vs a float64 reference on the same bf16 inputs.

mod common;

use common::*;
use lorafuse::device::sim::{Schedule, Sim};
use lorafuse::device::Device;
use lorafuse::ops::gemm::{GemmLayout, GemmShape};
use lorafuse::tensor::DType;
use lorafuse::testing::TestRng;
use std::sync::Arc;

fn schedules() -> Vec<Schedule> {
    vec![Schedule::Lockstep, Schedule::Random(1), Schedule::Random(2), Schedule::WarpAhead(1), Schedule::WarpAhead(2)]
}

fn sim(s: Schedule) -> Arc<dyn Device> {
    Arc::new(Sim::new(s))
}

#[test]
fn gemm_matches_f64_reference_under_every_schedule() {
    for s in schedules() {
        let dev = sim(s);
        for (i, &(m, n, k)) in GEMM_SHAPES.iter().enumerate() {
            for layout in [GemmLayout::Nt, GemmLayout::Nn, GemmLayout::Tn] {
                let err = gemm_error(&dev, GemmShape::dense_for(layout, m, n, k), layout, DType::F32, i as u64);
                assert!(err <= GEMM_F32_TOL, "{s:?} {layout:?} {m}x{n}x{k}: rel err {err:e}");
            }
        }
    }
}

#[test]
fn gemm_random_shapes_and_strides() {
    let mut rng = TestRng::new(7);
    let dev = sim(Schedule::Random(3));
    for seed in 0..6 {
        let (m, n, k) = (rng.size(1, 150), rng.size(1, 150), rng.size(1, 150));
        // odd leading dimensions force the 2-byte fallback loads and unpaired stores
        for layout in [GemmLayout::Nt, GemmLayout::Nn, GemmLayout::Tn] {
            let dense = GemmShape::dense_for(layout, m, n, k);
            let shape = GemmShape {
                lda: dense.lda + rng.size(0, 3),
                ldb: dense.ldb + rng.size(0, 9),
                ldc: n + rng.size(0, 2),
                alpha: rng.range(-2.0, 2.0) as f32,
                ..dense
            };
            let err = gemm_error(&dev, shape, layout, DType::F32, 100 + seed);
            assert!(err <= GEMM_F32_TOL, "{layout:?} {shape:?}: rel err {err:e}");
        }
    }
}

#[test]
fn gemm_bf16_output() {
    let dev = sim(Schedule::Lockstep);
    for &(m, n, k) in &[(17, 33, 65), (200, 96, 136)] {
        let err = gemm_error(&dev, GemmShape::dense(m, n, k), GemmLayout::Nt, DType::BF16, 5);
        assert!(err <= GEMM_BF16_TOL, "{m}x{n}x{k}: rel err {err:e}");
        assert!(err > 0.0, "bf16 output equal to the f64 reference means no rounding happened");
    }
}

#[test]
fn gemm_counts_tensor_core_work_and_traffic() {
    let dev = sim(Schedule::Lockstep);
    let shape = GemmShape::dense(128, 256, 64);
    dev.take_stats();
    gemm_error(&dev, shape, GemmLayout::Nt, DType::F32, 9);
    let stats = dev.take_stats().expect("the simulator counts");
    // 2 blocks, each 8 warps × 16 MMAs per k16 step × 4 steps
    assert_eq!(stats.mma_flops(), 2 * 128 * 256 * 64);
    assert_eq!(stats.bytes_read, shape.bytes_requested(DType::F32) - 128 * 256 * 4);
    assert_eq!(stats.bytes_written, 128 * 256 * 4);
}

#[test]
fn gemm_rejects_bad_shapes() {
    let dev = sim(Schedule::Lockstep);
    let buf = lorafuse::device::DeviceBuffer::new(&dev, 64).unwrap();
    let bad = GemmShape { m: 2, n: 2, k: 8, lda: 4, ldb: 8, ldc: 2, alpha: 1.0 };
    // SAFETY: rejected before launch.
    let err = unsafe {
        lorafuse::ops::gemm::launch_gemm(dev.as_ref(), buf.ptr(), buf.ptr(), buf.ptr(), bad, GemmLayout::Nt, DType::F32)
    };
    assert!(err.unwrap_err().to_string().contains("leading dimensions"));
}

#[test]
fn launches_a_gpu_would_refuse_are_errors() {
    use lorafuse::device::{LaunchConfig, ParamBytes};
    let dev = sim(Schedule::Lockstep);
    let buf = lorafuse::device::DeviceBuffer::new(&dev, 4096).unwrap();
    let p = lorafuse::device::params::GemmParams {
        a: buf.ptr().as_ptr(),
        b: buf.ptr().as_ptr(),
        c: buf.ptr().as_mut_ptr(),
        m: 1,
        n: 1,
        k: 1,
        lda: 1,
        ldb: 1,
        ldc: 1,
        alpha: 1.0,
    };
    let launch = |block: u32, smem: u32| {
        let cfg = LaunchConfig { grid: (1, 1, 1), block: (block, 1, 1), dynamic_smem_bytes: smem };
        // SAFETY: refused before any thread runs, or a 1×1×1 product inside `buf`.
        unsafe { dev.launch("gemm_bf16_f32out", &cfg, ParamBytes::new(&p)) }
    };
    let too_many_threads = launch(2048, 0).unwrap_err().to_string();
    assert!(too_many_threads.contains("2048"), "{too_many_threads}");
    let too_much_smem = launch(256, 200 * 1024).unwrap_err().to_string();
    assert!(too_much_smem.contains("shared memory"), "{too_much_smem}");
    launch(256, 0).expect("a valid launch");
}

#[test]
fn cpu_backend_gemm_matches_f64_reference() {
    use half::bf16;
    use lorafuse::device::Backend;
    use lorafuse::ops::gemm::{gemm_bf16, gemm_ref};
    use lorafuse::tensor::{HostData, Tensor};
    let (m, n, k) = (37, 29, 70);
    let mut rng = TestRng::new(12);
    let mut t = |rows: usize| {
        let v: Vec<bf16> = rng.vec_f32(rows * k).iter().map(|&x| bf16::from_f32(x)).collect();
        Tensor::from_host(&[rows, k], HostData::BF16(v)).unwrap()
    };
    let (a, b) = (t(m), t(n));
    let c = gemm_bf16(&a, &b, DType::F32, &Backend::cpu()).unwrap().to_host().unwrap().to_f32();
    let want = gemm_ref(
        &a.to_host().unwrap().to_f32(),
        &b.to_host().unwrap().to_f32(),
        GemmShape::dense(m, n, k),
        GemmLayout::Nt,
    );
    let err = lorafuse::testing::rel_err(&c, &want);
    assert!(err <= GEMM_F32_TOL, "rel err {err:e}");
}
