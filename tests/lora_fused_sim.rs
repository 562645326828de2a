//! The single-pass fused LoRA forward (`kernels/lora_fused.cu`) in the SIMT simulator, against
//! a float64 reference on the same bf16 inputs and Philox mask, and against the split strategy
//! (`lora_down` + `lora_fwd_split`) on the same inputs; plus the simulator's traffic and MMA
//! counters for fused vs split vs the plain GEMM.
//!
//! Tolerances (relative L2 norm; NaN or inf never passes, and outputs start poisoned: the
//! simulator fills fresh allocations with 0xFF):
//! - S: f32 accumulation of exact bf16 products (the mask is exact in bf16): 1e-5.
//! - s_scaled: one bf16 rounding of S ⊙ c: 4e-3.
//! - y (f32): the LoRA term's operand S ⊙ c is rounded to bf16 once: 5e-3; bf16 y adds one
//!   more rounding: 8e-3.
//! - fused vs split: S and s_scaled bit for bit (same products, same K order); y within 1e-5
//!   f32 (the strategies add base and LoRA terms in opposite orders) or 8e-3 in bf16.

use half::bf16;
use lorafuse::device::sim::{Schedule, Sim, SimStats};
use lorafuse::device::{Backend, Device, DeviceBuffer};
use lorafuse::ops::gemm::{launch_gemm, GemmLayout, GemmShape};
use lorafuse::ops::lora_fused::{fused_smem_bytes, lora_forward_fused, FUSED_MAX_RANK};
use lorafuse::ops::lora_kernels::{lora_forward, LoraForward, LoraWeights};
use lorafuse::ops::philox::DropoutMask;
use lorafuse::tensor::{DType, HostData, Tensor};
use lorafuse::testing::{rel_err, TestRng};
use std::sync::Arc;

const EXACT_TOL: f64 = 1e-5;
const ROUND_TOL: f64 = 4e-3;
const Y_F32_TOL: f64 = 5e-3;
const Y_BF16_TOL: f64 = 8e-3;
const SPLIT_F32_TOL: f64 = 1e-5;

#[derive(Debug, Clone, Copy)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    r: usize,
    p: f32,
}

fn bf16_vec(rng: &mut TestRng, n: usize, scale: f32) -> Vec<f32> {
    rng.vec_f32(n).iter().map(|&v| bf16::from_f32(v * scale).to_f32()).collect()
}

fn upload(backend: &Backend, shape: &[usize], v: &[f32], dtype: DType) -> Tensor {
    let data = match dtype {
        DType::BF16 => HostData::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
        DType::F32 => HostData::F32(v.to_vec()),
        _ => unreachable!(),
    };
    Tensor::from_host(shape, data).unwrap().to_backend(backend).unwrap()
}

fn download(t: &Tensor) -> Vec<f32> {
    t.to_host().unwrap().to_f32()
}

/// C[i][j] = Σ_t A(i,t)·B(j,t) in f64 with accessor closures.
fn mm(
    rows: usize,
    cols: usize,
    inner: usize,
    a: impl Fn(usize, usize) -> f64,
    b: impl Fn(usize, usize) -> f64,
) -> Vec<f64> {
    let mut c = vec![0f64; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            c[i * cols + j] = (0..inner).map(|t| a(i, t) * b(j, t)).sum();
        }
    }
    c
}

/// Host copies of a case's inputs and their device tensors.
struct Inputs {
    x: Vec<f32>,
    w0: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    col_scale: Vec<f32>,
    t: [Tensor; 5], // x, W0, A, B, col_scale
}

impl Inputs {
    fn new(backend: &Backend, c: &Case, seed: u64) -> Self {
        let Case { m, n, k, r, .. } = *c;
        let mut rng = TestRng::new(seed);
        let x = bf16_vec(&mut rng, m * k, 1.0);
        let w0 = bf16_vec(&mut rng, n * k, 0.5);
        let a = bf16_vec(&mut rng, r * k, 0.5);
        let b = bf16_vec(&mut rng, n * r, 0.5);
        // alpha/r with alpha = 2 (the LoRA term is O(1) vs the base), varied per column as for
        // stacked targets, so a column mix-up in the scale shows.
        let col_scale: Vec<f32> = (0..r).map(|j| 2.0 / r as f32 * (1.0 + 0.5 * (j % 3) as f32)).collect();
        let t = [
            upload(backend, &[m, k], &x, DType::BF16),
            upload(backend, &[n, k], &w0, DType::BF16),
            upload(backend, &[r, k], &a, DType::BF16),
            upload(backend, &[n, r], &b, DType::BF16),
            upload(backend, &[r], &col_scale, DType::F32),
        ];
        Inputs { x, w0, a, b, col_scale, t }
    }
    fn weights(&self) -> LoraWeights<'_> {
        LoraWeights { w0: &self.t[1], a: &self.t[2], b: &self.t[3], col_scale: &self.t[4] }
    }
}

/// float64 S and y for the inputs and mask.
fn reference(inp: &Inputs, c: &Case, mask: &DropoutMask) -> (Vec<f64>, Vec<f64>) {
    let Case { m, n, k, r, .. } = *c;
    let xd: Vec<f64> =
        (0..m * k).map(|e| if mask.keep(e as u64) { inp.x[e] as f64 * mask.scale as f64 } else { 0.0 }).collect();
    let s = mm(m, r, k, |i, t| xd[i * k + t], |j, t| inp.a[j * k + t] as f64);
    let base = mm(m, n, k, |i, t| inp.x[i * k + t] as f64, |j, t| inp.w0[j * k + t] as f64);
    let up = mm(m, n, r, |i, t| s[i * r + t] * inp.col_scale[t] as f64, |j, t| inp.b[j * r + t] as f64);
    (s, base.iter().zip(&up).map(|(u, v)| u + v).collect())
}

fn run_case(dev: &Arc<dyn Device>, c: &Case, seed: u64, out: DType) {
    let Case { m, r, p, .. } = *c;
    let backend = Backend::Device(dev.clone());
    let inp = Inputs::new(&backend, c, seed);
    let mask = DropoutMask::new(p, 0xF05E ^ seed, 31 * seed);
    let fused = lora_forward_fused(dev, &inp.t[0], &inp.weights(), &mask, out).unwrap();
    let split = lora_forward(dev, &inp.t[0], &inp.weights(), &mask, out).unwrap();
    let (s_ref, y_ref) = reference(&inp, c, &mask);
    let what = format!("{c:?} out={out:?}");

    let s = download(&fused.s);
    let e_s = rel_err(&s, &s_ref);
    assert!(e_s <= EXACT_TOL, "{what}: S rel err {e_s:e}");
    let ss_ref: Vec<f64> = (0..m * r).map(|e| s_ref[e] * inp.col_scale[e % r] as f64).collect();
    let ss = download(&fused.s_scaled);
    let e_ss = rel_err(&ss, &ss_ref);
    assert!(e_ss <= ROUND_TOL, "{what}: s_scaled rel err {e_ss:e}");
    let y = download(&fused.y);
    let e_y = rel_err(&y, &y_ref);
    let y_tol = if out == DType::F32 { Y_F32_TOL } else { Y_BF16_TOL };
    assert!(e_y <= y_tol, "{what}: y rel err {e_y:e}");

    // Same inputs through the split strategy: what backward reads must be identical.
    assert!(s == download(&split.s), "{what}: S differs from lora_down's");
    assert!(ss == download(&split.s_scaled), "{what}: s_scaled differs from lora_down's");
    let y_split: Vec<f64> = download(&split.y).iter().map(|&v| v as f64).collect();
    let e_split = rel_err(&y, &y_split);
    let split_tol = if out == DType::F32 { SPLIT_F32_TOL } else { Y_BF16_TOL };
    assert!(e_split <= split_tol, "{what}: y differs from the split strategy's by {e_split:e}");
}

/// Shapes: M = 1, ragged M/N/K (not multiples of 128/64, K not a multiple of 8 for the
/// element-wise load path), several N-tiles (S recomputed per tile, written by tile 0 only),
/// several K-steps (A tile prefetch), r ∈ {1, 4, 8, 16, 24, 64}, p ∈ {0, 0.1, 0.5}.
const CASES: &[Case] = &[
    Case { m: 1, n: 24, k: 40, r: 1, p: 0.0 },
    Case { m: 33, n: 65, k: 72, r: 4, p: 0.1 },
    Case { m: 130, n: 40, k: 136, r: 8, p: 0.5 },
    Case { m: 70, n: 260, k: 64, r: 16, p: 0.1 },
    Case { m: 40, n: 50, k: 30, r: 64, p: 0.5 },
    Case { m: 129, n: 131, k: 200, r: 64, p: 0.0 },
    Case { m: 1, n: 300, k: 130, r: 16, p: 0.5 },
    Case { m: 50, n: 136, k: 99, r: 24, p: 0.1 },
];

#[test]
fn fused_matches_f64_and_split_random_schedule() {
    let dev: Arc<dyn Device> = Arc::new(Sim::new(Schedule::Random(7)));
    for (i, c) in CASES.iter().enumerate() {
        run_case(&dev, c, i as u64 + 1, DType::F32);
    }
}

#[test]
fn fused_matches_f64_and_split_lockstep_bf16_out() {
    let dev: Arc<dyn Device> = Arc::new(Sim::new(Schedule::Lockstep));
    for (i, c) in CASES.iter().enumerate().step_by(2) {
        run_case(&dev, c, i as u64 + 101, DType::BF16);
    }
    run_case(&dev, &Case { m: 64, n: 128, k: 128, r: 16, p: 0.0 }, 200, DType::F32);
}

#[test]
fn fused_under_warp_ahead_schedule() {
    for (seed, c) in [(3, CASES[3]), (4, CASES[7]), (5, CASES[4])] {
        let dev: Arc<dyn Device> = Arc::new(Sim::new(Schedule::WarpAhead(seed)));
        run_case(&dev, &c, 300 + seed, DType::F32);
    }
}

#[test]
fn dropout_changes_the_fused_output() {
    let dev: Arc<dyn Device> = Arc::new(Sim::new(Schedule::Random(2)));
    let c = Case { m: 16, n: 16, k: 64, r: 8, p: 0.0 };
    let inp = Inputs::new(&Backend::Device(dev.clone()), &c, 9);
    let run = |p: f32, offset: u64| -> LoraForward {
        lora_forward_fused(&dev, &inp.t[0], &inp.weights(), &DropoutMask::new(p, 1, offset), DType::F32).unwrap()
    };
    let (f0, f1, f2) = (run(0.0, 0), run(0.5, 0), run(0.5, 1));
    let diff = |u: &Tensor, v: &Tensor| download(u).iter().zip(download(v)).map(|(p, q)| (p - q).abs()).sum::<f32>();
    assert!(diff(&f0.s, &f1.s) > 1e-2 && diff(&f0.y, &f1.y) > 1e-2, "p=0.5 left S/y unchanged");
    assert!(diff(&f1.s, &f2.s) > 1e-2, "a different offset gave the same mask");
}

#[test]
fn rank_above_64_is_a_clear_error_and_n_zero_still_gives_s() {
    let dev: Arc<dyn Device> = Arc::new(Sim::new(Schedule::Lockstep));
    let backend = Backend::Device(dev.clone());
    let c = Case { m: 4, n: 8, k: 16, r: FUSED_MAX_RANK + 1, p: 0.0 };
    let inp = Inputs::new(&backend, &c, 1);
    let err = lora_forward_fused(&dev, &inp.t[0], &inp.weights(), &DropoutMask::new(0.0, 0, 0), DType::F32)
        .expect_err("R = 65 must be refused");
    let msg = err.to_string();
    assert!(msg.contains("65") && msg.contains("split"), "unhelpful error: {msg}");

    // N = 0: y is empty, S still comes out (lora_down does it).
    let c = Case { m: 5, n: 0, k: 24, r: 4, p: 0.1 };
    let inp = Inputs::new(&backend, &c, 2);
    let mask = DropoutMask::new(c.p, 3, 4);
    let f = lora_forward_fused(&dev, &inp.t[0], &inp.weights(), &mask, DType::F32).unwrap();
    let e = rel_err(&download(&f.s), &reference(&inp, &c, &mask).0);
    assert!(e <= EXACT_TOL, "N = 0: S rel err {e:e}");

    // K = 0: no K-step runs; S and y are zero (not the poison of fresh shared memory).
    let c = Case { m: 3, n: 20, k: 0, r: 4, p: 0.1 };
    let inp = Inputs::new(&backend, &c, 3);
    let f = lora_forward_fused(&dev, &inp.t[0], &inp.weights(), &DropoutMask::new(c.p, 3, 4), DType::F32).unwrap();
    assert!(download(&f.s).iter().chain(&download(&f.y)).all(|&v| v == 0.0), "K = 0: S and y must be 0");
}

fn stats(dev: &Arc<dyn Device>) -> SimStats {
    dev.synchronize().unwrap();
    dev.take_stats().expect("the simulator counts")
}

/// Global traffic and tensor-core work of the fused kernel vs the split strategy vs the plain
/// GEMM at M=256, N=512, K=512, r=16 (2×4 tiles of 128×128). Prints the table for the issue.
#[test]
fn traffic_and_flops_vs_split_and_plain_gemm() {
    let dev: Arc<dyn Device> = Arc::new(Sim::new(Schedule::Random(1)));
    let c = Case { m: 256, n: 512, k: 512, r: 16, p: 0.0 };
    let (m, n, k, r) = (c.m as u64, c.n as u64, c.k as u64, c.r as u64);
    let inp = Inputs::new(&Backend::Device(dev.clone()), &c, 5);
    let y = DeviceBuffer::new(&dev, c.m * c.n * 4).unwrap();
    stats(&dev);
    let shape = GemmShape::dense(c.m, c.n, c.k);
    // SAFETY: x [M,K], W0 [N,K] and y [M,N] f32 are live allocations of these shapes.
    unsafe {
        launch_gemm(
            dev.as_ref(),
            inp.t[0].device_ptr().unwrap(),
            inp.t[1].device_ptr().unwrap(),
            y.ptr(),
            shape,
            GemmLayout::Nt,
            DType::F32,
        )
    }
    .unwrap();
    let gemm = stats(&dev);
    let mut rows = vec![("gemm_bf16_f32out", gemm)];
    for p in [0.0f32, 0.1] {
        let mask = DropoutMask::new(p, 11, 0);
        lora_forward(&dev, &inp.t[0], &inp.weights(), &mask, DType::F32).unwrap();
        let split = stats(&dev);
        lora_forward_fused(&dev, &inp.t[0], &inp.weights(), &mask, DType::F32).unwrap();
        let fused = stats(&dev);
        rows.push((if p == 0.0 { "split p=0" } else { "split p=0.1" }, split));
        rows.push((if p == 0.0 { "fused p=0" } else { "fused p=0.1" }, fused));
    }

    println!("\nM={m} N={n} K={k} r={r}, f32 y (SIMT simulator counters; MMA FLOPs as issued, padding included)");
    println!(
        "{:<18} {:>12} {:>12} {:>10} {:>9} {:>9} {:>7}",
        "kernel(s)", "read B", "written B", "MMA MFLOP", "read/gemm", "flop/gemm", "blocks"
    );
    for (name, st) in &rows {
        println!(
            "{:<18} {:>12} {:>12} {:>10.1} {:>9.3} {:>9.3} {:>7}",
            name,
            st.bytes_read,
            st.bytes_written,
            st.mma_flops() as f64 / 1e6,
            st.bytes_read as f64 / gemm.bytes_read as f64,
            st.mma_flops() as f64 / gemm.mma_flops() as f64,
            st.blocks
        );
    }
    println!(
        "fused dynamic shared memory: {} B (p=0), {} B (p>0)",
        fused_smem_bytes(c.r, false),
        fused_smem_bytes(c.r, true)
    );

    // The plain GEMM's traffic is the analytic count.
    assert_eq!(gemm.bytes_read + gemm.bytes_written, shape.bytes_requested(DType::F32));
    let blocks = m.div_ceil(128) * n.div_ceil(128);
    let r16 = r.div_ceil(16) * 16;
    for (i, (name, fused)) in rows.iter().enumerate().filter(|(_, (name, _))| name.starts_with("fused")) {
        let split = rows[i - 1].1;
        // Per block on top of the GEMM: the A rows (2·R·K), the B tile (2·128·R), and col_scale
        // (each thread loads its 2 fragment columns per 8 columns of S: here 4 f32).
        let extra = blocks * (2 * r * k + 2 * 128 * r + 256 * 4 * 4);
        assert_eq!(fused.bytes_read, gemm.bytes_read + extra, "{name}: unexpected reads");
        // Writes: y, plus S (f32) and s_scaled (bf16) once — no x-sized buffer, no mask.
        assert_eq!(fused.bytes_written, gemm.bytes_written + 6 * m * r, "{name}: unexpected writes");
        // The split strategy reads x a second time (lora_down) and s_scaled back per N-tile;
        // the fused kernel re-reads the (L2-resident) A rows per N-tile instead.
        let split_extra = 2 * m * k + n.div_ceil(128) * 2 * m * r;
        let fused_extra = n.div_ceil(128) * m.div_ceil(128) * 2 * r * k;
        assert!(split.bytes_read > fused.bytes_read, "{name}: split should read more");
        println!("{name}: split reads {split_extra} B more for x and s_scaled, fused {fused_extra} B more for A");
        assert_eq!(split.bytes_written, fused.bytes_written, "{name}: both write y, S, s_scaled");
        // MMA (warp-wide m16n8k16): the GEMM, + S recomputed per N-tile (per K-step, 8 warps ×
        // 4 k16 × R16/8), + the up-projection R16 deep (8 warps × 16 per k16).
        let s_mma = blocks * k.div_ceil(16) * 8 * (r16 / 8);
        let up_mma = blocks * 8 * 16 * (r16 / 16);
        assert_eq!(fused.mma, gemm.mma + s_mma + up_mma, "{name}: unexpected MMA count");
        // Split: S once per 128 rows (lora_down), and the same R16-deep up-projection (its
        // K-step stops at R16, not at 64).
        let down_mma = m.div_ceil(128) * k.div_ceil(16) * 8 * (r16 / 8);
        assert_eq!(split.mma, gemm.mma + down_mma + up_mma, "{name}: unexpected split MMA count");
        assert_eq!(fused.blocks, blocks, "{name}: one launch of the GEMM's grid");
    }
}
