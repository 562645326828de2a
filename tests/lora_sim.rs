//! The fused LoRA kernels (`kernels/lora.cu`) and the unfused baseline in the SIMT simulator
//! vs a float64 reference on the same bf16 inputs and the same Philox mask (checks and
//! tolerances in tests/common/lora.rs, shared with the GPU tests).

mod common;

use common::lora::*;
use half::bf16;
use lorafuse::device::params::{DropoutParams, LoraBackwardParams, LoraForwardParams};
use lorafuse::device::sim::{Schedule, Sim};
use lorafuse::device::{Backend, Device, DeviceBuffer};
use lorafuse::ops::gemm::{launch_gemm, GemmLayout, GemmShape};
use lorafuse::ops::lora_kernels::{
    ds_db_splits, launch_bwd_da, launch_bwd_ds_db, launch_down, lora_forward, rank_tile, LoraWeights, DS_DB_ROWS,
};
use lorafuse::ops::philox::DropoutMask;
use lorafuse::tensor::DType;
use lorafuse::testing::{rel_err, TestRng};
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
        // 40 = two whole k16 steps and half of a third: the up-projections' short K-step.
        Case { m: 45, n: 70, k: 48, r: 40, p: 0.1 },
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

/// `lora_bwd_ds_db` alone (dS and the dB partials from one pass over dy), on outputs poisoned
/// with NaN, under every schedule: dS equals the GEMM dy·B (`gemm_bf16_nn_f32out` on the same
/// device) scaled per column and rounded to bf16, bit for bit, and float64 within bf16 rounding;
/// every [N,R] partial slab equals float64 over its 128 rows of M (1e-5). Ragged shapes: M = 1,
/// N not a multiple of the 64-wide step (or of 8: 2-byte loads), R ∈ {1, 8, 16, 64} and R = 80
/// (two 64-column blocks).
#[test]
fn bwd_ds_db_matches_gemm_and_f64_on_ragged_shapes() {
    let cases = [(1, 24, 1), (1, 200, 16), (130, 65, 8), (257, 129, 64), (40, 7, 16), (129, 64, 1), (70, 100, 80)];
    for schedule in [Schedule::Lockstep, Schedule::Random(3), Schedule::WarpAhead(7), Schedule::WarpAhead(12)] {
        let dev: Arc<dyn Device> = Arc::new(Sim::new(schedule));
        for (i, &(m, n, r)) in cases.iter().enumerate() {
            check_ds_db(&dev, m, n, r, 100 + i as u64);
        }
    }
}

/// Per-column scales 0.5, 0.75, 1.0, 0.5, …: each column of S or dS scaled differently.
fn col_scales(r: usize) -> Vec<f32> {
    (0..r).map(|j| 0.5 + 0.25 * (j % 3) as f32).collect()
}

/// A device buffer of `bytes` filled with 0xFF: NaN as f32 and as bf16, so unwritten outputs show.
fn poisoned(dev: &Arc<dyn Device>, bytes: usize) -> DeviceBuffer {
    let buf = DeviceBuffer::new(dev, bytes).unwrap();
    buf.fill(0xFF).unwrap();
    buf
}

fn check_ds_db(dev: &Arc<dyn Device>, m: usize, n: usize, r: usize, seed: u64) {
    let backend = Backend::Device(dev.clone());
    let mut rng = TestRng::new(seed);
    let dy = bf16_vec(&mut rng, m * n, 1.0);
    let b = bf16_vec(&mut rng, n * r, 0.5);
    let ss = bf16_vec(&mut rng, m * r, 0.5);
    let cs = col_scales(r);
    let (tdy, tb, tss) = (
        upload(&backend, &[m, n], &dy, DType::BF16),
        upload(&backend, &[n, r], &b, DType::BF16),
        upload(&backend, &[m, r], &ss, DType::BF16),
    );
    let tcs = upload(&backend, &[r], &cs, DType::F32);
    let splits = ds_db_splits(m);
    let (ds, ws, gemm) = (poisoned(dev, m * r * 2), poisoned(dev, splits * n * r * 4), poisoned(dev, m * r * 4));
    let null = std::ptr::null_mut();
    let p = LoraBackwardParams {
        x: null,
        w0: null,
        a: null,
        b: tb.device_ptr().unwrap().as_ptr(),
        s_scaled: tss.device_ptr().unwrap().as_ptr(),
        dy: tdy.device_ptr().unwrap().as_ptr(),
        ds: ds.ptr().as_mut_ptr(),
        workspace: ws.ptr().as_mut_ptr(),
        dx: null.cast(),
        col_scale: tcs.device_ptr().unwrap().as_ptr(),
        m: m as i32,
        n: n as i32,
        k: 0,
        r: r as i32,
        split_rows: 0,
        dropout: DropoutParams { seed: 0, offset: 0, threshold: 0, scale: 1.0 },
    };
    // SAFETY: the buffers hold the sizes launch_bwd_ds_db and launch_gemm document.
    unsafe {
        launch_bwd_ds_db(dev.as_ref(), &p).unwrap();
        let shape = GemmShape::dense_for(GemmLayout::Nn, m, r, n);
        launch_gemm(
            dev.as_ref(),
            tdy.device_ptr().unwrap(),
            tb.device_ptr().unwrap(),
            gemm.ptr(),
            shape,
            GemmLayout::Nn,
            DType::F32,
        )
        .unwrap();
    }
    dev.synchronize().unwrap();
    let what = format!("{} m={m} n={n} r={r}", dev.name());
    let got_ds: Vec<f32> = bytemuck::pod_collect_to_vec::<u8, u16>(&ds.to_host().unwrap())
        .into_iter()
        .map(|h| bf16::from_bits(h).to_f32())
        .collect();
    let dy_b: Vec<f32> = bytemuck::pod_collect_to_vec(&gemm.to_host().unwrap());
    for (e, (&g, &c)) in got_ds.iter().zip(&dy_b).enumerate() {
        let want = bf16::from_f32(c * cs[e % r]).to_f32();
        assert!(g == want, "{what}: dS[{}][{}] = {g}, the GEMM gives {want}", e / r, e % r);
    }
    let ds_ref: Vec<f64> = (0..m * r)
        .map(|e| (0..n).map(|t| dy[e / r * n + t] as f64 * b[t * r + e % r] as f64).sum::<f64>() * cs[e % r] as f64)
        .collect();
    let e_ds = rel_err(&got_ds, &ds_ref);
    assert!(e_ds <= BF16_TOL, "{what}: dS rel err {e_ds:e}");
    let partials: Vec<f32> = bytemuck::pod_collect_to_vec(&ws.to_host().unwrap());
    for z in 0..splits {
        let rows = z * DS_DB_ROWS..(m.min((z + 1) * DS_DB_ROWS));
        let want: Vec<f64> = (0..n * r)
            .map(|e| rows.clone().map(|t| dy[t * n + e / r] as f64 * ss[t * r + e % r] as f64).sum())
            .collect();
        let e_db = rel_err(&partials[z * n * r..][..n * r], &want);
        assert!(e_db <= EXACT_TOL, "{what}: dB partial {z} rel err {e_db:e}");
    }
}

/// `lora_down_rt*` and `lora_bwd_da_rt*` (R tiles 16, 32, 64 wide, MMAs past R skipped) alone, on
/// outputs poisoned with NaN, under every schedule, on ragged shapes (M = 1, M and K not tile
/// multiples, K odd: 2-byte loads; R ∈ {1, 8, 16, 64, 80}, R = 80 being two 64-wide tiles), with
/// and without dropout:
/// - S equals a plain GEMM (`gemm_bf16_f32out`, 128×128 tiles) of the dropped x (0/1 mask applied
///   on the host) by A, times 1/(1-p), bit for bit — the k16 reduction order is the GEMM's — and
///   s_scaled is bf16(S ⊙ c) bit for bit; S is within 1e-5 of float64;
/// - each dA partial slab (64-row splits of M) equals the GEMM dSᵀ·drop(x) over its rows
///   (`gemm_bf16_tn_f32out`) bit for bit, and float64 within 1e-5.
#[test]
fn narrow_rank_tiles_match_gemm_and_f64_on_ragged_shapes() {
    let cases = [(1, 40, 1, 0.0), (1, 200, 16, 0.1), (70, 72, 8, 0.5), (130, 65, 64, 0.1), (33, 136, 80, 0.0)];
    for schedule in [Schedule::Lockstep, Schedule::Random(3), Schedule::WarpAhead(7)] {
        let dev: Arc<dyn Device> = Arc::new(Sim::new(schedule));
        for (i, &(m, k, r, p)) in cases.iter().enumerate() {
            check_rank_tiles(&dev, m, k, r, p, 200 + i as u64);
        }
    }
}

fn check_rank_tiles(dev: &Arc<dyn Device>, m: usize, k: usize, r: usize, p: f32, seed: u64) {
    let backend = Backend::Device(dev.clone());
    let mut rng = TestRng::new(seed);
    let x = bf16_vec(&mut rng, m * k, 1.0);
    let a = bf16_vec(&mut rng, r * k, 0.5);
    let ds = bf16_vec(&mut rng, m * r, 0.5);
    let cs = col_scales(r);
    let mask = DropoutMask::new(p, 0x5EED ^ seed, 3 * seed);
    let xd: Vec<f32> = x.iter().enumerate().map(|(e, &v)| if mask.keep(e as u64) { v } else { 0.0 }).collect();
    let kept = if mask.is_identity() { 1.0 } else { mask.scale };
    let (tx, txd, ta, tds) = (
        upload(&backend, &[m, k], &x, DType::BF16),
        upload(&backend, &[m, k], &xd, DType::BF16),
        upload(&backend, &[r, k], &a, DType::BF16),
        upload(&backend, &[m, r], &ds, DType::BF16),
    );
    let tcs = upload(&backend, &[r], &cs, DType::F32);
    let split_rows = 64;
    let splits = m.div_ceil(split_rows);
    let (s, ss, ws) = (poisoned(dev, m * r * 4), poisoned(dev, m * r * 2), poisoned(dev, splits * r * k * 4));
    let (gemm_s, gemm_da) = (poisoned(dev, m * r * 4), poisoned(dev, splits * r * k * 4));
    let dropout = DropoutParams { seed: mask.seed, offset: mask.offset, threshold: mask.threshold, scale: mask.scale };
    let null = std::ptr::null_mut();
    let fp = LoraForwardParams {
        x: tx.device_ptr().unwrap().as_ptr(),
        w0: null,
        a: ta.device_ptr().unwrap().as_ptr(),
        b: null,
        s: s.ptr().as_mut_ptr(),
        s_scaled: ss.ptr().as_mut_ptr(),
        col_scale: tcs.device_ptr().unwrap().as_ptr(),
        y: null.cast(),
        m: m as i32,
        n: 0,
        k: k as i32,
        r: r as i32,
        dropout,
    };
    let bp = LoraBackwardParams {
        x: tx.device_ptr().unwrap().as_ptr(),
        w0: null,
        a: null,
        b: null,
        s_scaled: null,
        dy: null,
        ds: tds.device_ptr().unwrap().as_mut_ptr(),
        workspace: ws.ptr().as_mut_ptr(),
        dx: null.cast(),
        col_scale: std::ptr::null(),
        m: m as i32,
        n: 0,
        k: k as i32,
        r: r as i32,
        split_rows: split_rows as i32,
        dropout,
    };
    // SAFETY: the buffers hold the sizes launch_down, launch_bwd_da and launch_gemm document.
    unsafe {
        launch_down(dev.as_ref(), &fp).unwrap();
        launch_bwd_da(dev.as_ref(), &bp).unwrap();
        let shape = GemmShape { alpha: kept, ..GemmShape::dense(m, r, k) };
        let (x_ptr, a_ptr) = (txd.device_ptr().unwrap(), ta.device_ptr().unwrap());
        launch_gemm(dev.as_ref(), x_ptr, a_ptr, gemm_s.ptr(), shape, GemmLayout::Nt, DType::F32).unwrap();
        for z in 0..splits {
            let rows = split_rows.min(m - z * split_rows);
            let shape = GemmShape::dense_for(GemmLayout::Tn, r, k, rows);
            let dsz = tds.device_ptr().unwrap().offset(z * split_rows * r * 2);
            let xz = x_ptr.offset(z * split_rows * k * 2);
            launch_gemm(dev.as_ref(), dsz, xz, gemm_da.ptr().offset(z * r * k * 4), shape, GemmLayout::Tn, DType::F32)
                .unwrap();
        }
    }
    dev.synchronize().unwrap();
    let what = format!("{} m={m} k={k} r={r} p={p} (R tile {})", dev.name(), rank_tile(r));
    let f32s = |b: &DeviceBuffer| -> Vec<f32> { bytemuck::pod_collect_to_vec(&b.to_host().unwrap()) };
    let (got_s, want_s) = (f32s(&s), f32s(&gemm_s));
    let got_ss: Vec<u16> = bytemuck::pod_collect_to_vec(&ss.to_host().unwrap());
    for e in 0..m * r {
        let (i, j) = (e / r, e % r);
        assert!(got_s[e].to_bits() == want_s[e].to_bits(), "{what}: S[{i}][{j}] = {}, GEMM {}", got_s[e], want_s[e]);
        let want = bf16::from_f32(want_s[e] * cs[j]).to_bits();
        assert!(got_ss[e] == want, "{what}: s_scaled[{i}][{j}] = {:#x}, want {want:#x}", got_ss[e]);
    }
    let s_ref: Vec<f64> = (0..m * r)
        .map(|e| (0..k).map(|t| xd[e / r * k + t] as f64 * a[e % r * k + t] as f64).sum::<f64>() * kept as f64)
        .collect();
    let e_s = rel_err(&got_s, &s_ref);
    assert!(e_s <= EXACT_TOL, "{what}: S rel err {e_s:e}");
    let (got_da, want_da) = (f32s(&ws), f32s(&gemm_da));
    for (e, (g, w)) in got_da.iter().zip(&want_da).enumerate() {
        assert!(g.to_bits() == w.to_bits(), "{what}: dA partial {} [{}] = {g}, GEMM {w}", e / (r * k), e % (r * k));
    }
    for z in 0..splits {
        let rows = z * split_rows..m.min((z + 1) * split_rows);
        let want: Vec<f64> = (0..r * k)
            .map(|e| rows.clone().map(|t| ds[t * r + e / k] as f64 * xd[t * k + e % k] as f64).sum())
            .collect();
        let e_da = rel_err(&got_da[z * r * k..][..r * k], &want);
        assert!(e_da <= EXACT_TOL, "{what}: dA partial {z} rel err {e_da:e}");
    }
}
