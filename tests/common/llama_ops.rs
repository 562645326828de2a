//! The Llama layer kernels (`kernels/norm.cu`, `activation.cu`, `rope.cu`, `loss.cu`,
//! `attention.cu`, `embedding.cu`, `optim.cu`) against float64 references and the CPU ops they
//! mirror, on random data, at ragged sizes (the scalar path where a row is not whole 16-byte
//! packs, the packed path where it is), into fresh outputs (NaN-filled in the simulator, so an
//! element left unwritten fails). Shared by tests/llama_ops_sim.rs and tests/gpu.rs.
//!
//! Tolerances (relative L2 norm): f32 kernels vs the f32 CPU op: 1e-6 (f32 arithmetic, other
//! summation orders); f32 kernels vs float64: 1e-5; bf16 kernels vs float64 on the same
//! bf16-rounded inputs: 1e-2 (bf16 outputs round at 2⁻⁹ relative, plus Hugging Face's
//! intermediate roundings, which the reference skips).

use super::lora::{download, upload};
use lorafuse::device::{Backend, Device};
use lorafuse::ops::activation::{swiglu_backward, swiglu_backward_device, swiglu_forward, swiglu_forward_device};
use lorafuse::ops::norm::{rms_norm_backward, rms_norm_backward_device, rms_norm_forward, rms_norm_forward_device};
use lorafuse::tensor::DType;
use lorafuse::testing::{rel_err, TestRng};
use std::sync::Arc;

const F32_VS_CPU: f64 = 1e-6;
const F32_VS_F64: f64 = 1e-5;
const BF16_VS_F64: f64 = 1e-2;

/// `v` rounded to what `dtype` stores.
fn rounded(v: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::BF16 => v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect(),
        _ => v.to_vec(),
    }
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::BF16 {
        BF16_VS_F64
    } else {
        F32_VS_F64
    }
}

pub fn rms_norm_forward_and_backward(dev: &Arc<dyn Device>) {
    let (dev, backend) = (dev.clone(), Backend::Device(dev.clone()));
    let mut rng = TestRng::new(41);
    let eps = 1e-5f32;
    // (rows, k): k = 7 and 12 (bf16) take the scalar path; 64 and 136 the 16-byte packs.
    for (rows, k) in [(1, 7), (3, 64), (5, 12), (33, 136)] {
        for dtype in [DType::F32, DType::BF16] {
            let x = rounded(&rng.vec_f32(rows * k).iter().map(|v| 3.0 * v).collect::<Vec<_>>(), dtype);
            let w = rounded(&rng.vec_f32(k).iter().map(|v| 1.0 + 0.5 * v).collect::<Vec<_>>(), dtype);
            let dy = rounded(&rng.vec_f32(rows * k), dtype);
            // float64 reference.
            let (mut y64, mut dx64) = (vec![0f64; rows * k], vec![0f64; rows * k]);
            for r in 0..rows {
                let xr = &x[r * k..][..k];
                let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / k as f64;
                let rs = 1.0 / (ms + eps as f64).sqrt();
                let dot: f64 =
                    (0..k).map(|j| dy[r * k + j] as f64 * w[j] as f64 * xr[j] as f64 * rs).sum::<f64>() / k as f64;
                for j in 0..k {
                    let xh = xr[j] as f64 * rs;
                    y64[r * k + j] = w[j] as f64 * xh;
                    dx64[r * k + j] = rs * (dy[r * k + j] as f64 * w[j] as f64 - xh * dot);
                }
            }
            let what = format!("rows {rows} k {k} {dtype:?}");
            let (xt, wt, dyt) = (
                upload(&backend, &[rows, k], &x, dtype),
                upload(&backend, &[k], &w, dtype),
                upload(&backend, &[rows, k], &dy, dtype),
            );
            let (y, rstd) = rms_norm_forward_device(&dev, &xt, &wt, eps).unwrap();
            let dx = rms_norm_backward_device(&dev, &dyt, &xt, &wt, &rstd).unwrap();
            let (y, rstd, dx) = (download(&y), download(&rstd), download(&dx));
            assert!(rel_err(&y, &y64) < tol(dtype), "y {what}: {}", rel_err(&y, &y64));
            assert!(rel_err(&dx, &dx64) < tol(dtype), "dx {what}: {}", rel_err(&dx, &dx64));
            // The saved rstd and, in f32, every output against the CPU op.
            let (y_cpu, rstd_cpu) = rms_norm_forward(&x, &w, eps).unwrap();
            let as64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            assert!(rel_err(&rstd, &as64(&rstd_cpu)) < F32_VS_CPU, "rstd {what}");
            if dtype == DType::F32 {
                let dx_cpu = rms_norm_backward(&dy, &x, &w, &rstd_cpu);
                assert!(rel_err(&y, &as64(&y_cpu)) < F32_VS_CPU, "y vs CPU {what}");
                assert!(rel_err(&dx, &as64(&dx_cpu)) < F32_VS_CPU, "dx vs CPU {what}");
            }
        }
    }
}

pub fn rms_norm_rejects_bad_operands(dev: &Arc<dyn Device>) {
    let (dev, backend) = (dev.clone(), Backend::Device(dev.clone()));
    let x = upload(&backend, &[2, 8], &[0.5; 16], DType::F32);
    let w16 = upload(&backend, &[8], &[1.0; 8], DType::BF16);
    let err = rms_norm_forward_device(&dev, &x, &w16, 1e-5).unwrap_err().to_string();
    assert!(err.contains("weight") && err.contains("BF16"), "{err}");
    let w6 = upload(&backend, &[6], &[1.0; 6], DType::F32);
    assert!(rms_norm_forward_device(&dev, &x, &w6, 1e-5).unwrap_err().to_string().contains("rows"));
    let host = upload(&Backend::Cpu, &[8], &[1.0; 8], DType::F32);
    assert!(rms_norm_forward_device(&dev, &x, &host, 1e-5).unwrap_err().to_string().contains("CPU"));
}

pub fn swiglu_forward_and_backward(dev: &Arc<dyn Device>) {
    let (dev, backend) = (dev.clone(), Backend::Device(dev.clone()));
    let mut rng = TestRng::new(43);
    // 4096 + 5: several blocks, grid-stride, and a tail after the packs; 13: tail only in bf16.
    for n in [1, 13, 64, 4101] {
        for dtype in [DType::F32, DType::BF16] {
            let scaled =
                |rng: &mut TestRng, s: f32| rounded(&rng.vec_f32(n).iter().map(|v| s * v).collect::<Vec<_>>(), dtype);
            let (g, u, dh) = (scaled(&mut rng, 6.0), scaled(&mut rng, 2.0), scaled(&mut rng, 1.0));
            let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
            let h64: Vec<f64> = (0..n).map(|i| g[i] as f64 * sig(g[i] as f64) * u[i] as f64).collect();
            let dg64: Vec<f64> = (0..n)
                .map(|i| {
                    let (gv, s) = (g[i] as f64, sig(g[i] as f64));
                    dh[i] as f64 * u[i] as f64 * s * (1.0 + gv * (1.0 - s))
                })
                .collect();
            let du64: Vec<f64> = (0..n).map(|i| dh[i] as f64 * g[i] as f64 * sig(g[i] as f64)).collect();
            let up = |v: &[f32]| upload(&backend, &[n], v, dtype);
            let (gt, ut, dht) = (up(&g), up(&u), up(&dh));
            let h = download(&swiglu_forward_device(&dev, &gt, &ut).unwrap());
            let (dg, du) = swiglu_backward_device(&dev, &dht, &gt, &ut).unwrap();
            let (dg, du) = (download(&dg), download(&du));
            let what = format!("n {n} {dtype:?}");
            for (name, got, want) in [("h", &h, &h64), ("dg", &dg, &dg64), ("du", &du, &du64)] {
                assert!(rel_err(got, want) < tol(dtype), "{name} {what}: {}", rel_err(got, want));
            }
            if dtype == DType::F32 {
                let as64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
                let (dg_cpu, du_cpu) = swiglu_backward(&dh, &g, &u);
                assert!(rel_err(&h, &as64(&swiglu_forward(&g, &u).unwrap())) < F32_VS_CPU, "h vs CPU {what}");
                assert!(rel_err(&dg, &as64(&dg_cpu)) < F32_VS_CPU, "dg vs CPU {what}");
                assert!(rel_err(&du, &as64(&du_cpu)) < F32_VS_CPU, "du vs CPU {what}");
            }
        }
    }
    let (a, b) = (upload(&backend, &[4], &[1.0; 4], DType::F32), upload(&backend, &[2, 2], &[1.0; 4], DType::F32));
    assert!(swiglu_forward_device(&dev, &a, &b).unwrap_err().to_string().contains("[2, 2]"));
}

pub fn rope_forward_and_inverse(dev: &Arc<dyn Device>) {
    let (dev, backend) = (dev.clone(), Backend::Device(dev.clone()));
    use lorafuse::ops::rope::{apply, apply_device, inv_freq, RopeScaling, RopeTable};

    let mut rng = TestRng::new(47);
    let scaling = RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64.0,
    };
    // (rows, heads, head dim, seq, pos0): head dim 6 (half 3) takes the scalar path, 16 and 64
    // the packs; rows over several sequences; a start position for cached decoding.
    for (rows, heads, d, seq, pos0, scaled) in
        [(5, 2, 6, 5, 0, false), (12, 3, 16, 4, 2, true), (9, 2, 64, 9, 7, false)]
    {
        let table = RopeTable::new(&inv_freq(d, 10000.0, scaled.then_some(&scaling)), 32);
        let dt = table.to_device(&dev).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let x = rounded(&rng.vec_f32(rows * heads * d), dtype);
            let mut want = vec![0f64; x.len()];
            for (e, w) in want.iter_mut().enumerate() {
                let (row, i) = (e / (heads * d), e % d);
                let (j, pos) = (i % (d / 2), pos0 + row % seq);
                let (c, s) = (table.cos[pos * d / 2 + j] as f64, table.sin[pos * d / 2 + j] as f64);
                let (a, b) = (x[e - i + j] as f64, x[e - i + j + d / 2] as f64);
                *w = if i < d / 2 { a * c - b * s } else { b * c + a * s };
            }
            let what = format!("rows {rows} heads {heads} d {d} {dtype:?}");
            let xt = upload(&backend, &[rows, heads * d], &x, dtype);
            apply_device(&dev, &xt, heads, seq, pos0, &dt, false).unwrap();
            let got = download(&xt);
            assert!(rel_err(&got, &want) < tol(dtype), "forward {what}: {}", rel_err(&got, &want));
            if dtype == DType::F32 {
                let mut cpu = x.clone();
                apply(&mut cpu, heads, seq, pos0, &table, false).unwrap();
                assert!(
                    rel_err(&got, &cpu.iter().map(|&v| v as f64).collect::<Vec<_>>()) < F32_VS_CPU,
                    "vs CPU {what}"
                );
            }
            // The inverse undoes it.
            apply_device(&dev, &xt, heads, seq, pos0, &dt, true).unwrap();
            let back = download(&xt);
            assert!(rel_err(&back, &x.iter().map(|&v| v as f64).collect::<Vec<_>>()) < tol(dtype), "inverse {what}");
        }
    }
    let dt = RopeTable::new(&inv_freq(8, 10000.0, None), 4).to_device(&dev).unwrap();
    let x = upload(&backend, &[6, 8], &[0.5; 48], DType::F32);
    assert!(apply_device(&dev, &x, 1, 6, 0, &dt, false).unwrap_err().to_string().contains("beyond"));
    assert!(apply_device(&dev, &x, 5, 6, 0, &dt, false).unwrap_err().to_string().contains("rows of 5×8"));
}

pub fn cross_entropy_loss_and_gradient(dev: &Arc<dyn Device>) {
    let (dev, backend) = (dev.clone(), Backend::Device(dev.clone()));
    use lorafuse::ops::loss::{causal_lm_loss, causal_lm_loss_device, IGNORE_INDEX};

    let mut rng = TestRng::new(53);
    // (batch, seq, vocab): vocab 7 and (bf16) 300 take the scalar path, 40 and 1000 the packs;
    // 300 and 1000 spread a row over more elements than threads.
    for (batch, seq, vocab) in [(1, 3, 7), (2, 5, 40), (3, 4, 300), (1, 6, 1000)] {
        let rows = batch * seq;
        let mut labels: Vec<i64> = (0..rows).map(|_| (rng.next_u64() % vocab as u64) as i64).collect();
        labels[1] = IGNORE_INDEX; // row 0 does not count
        for dtype in [DType::F32, DType::BF16] {
            let logits = rounded(&rng.vec_f32(rows * vocab).iter().map(|v| 4.0 * v).collect::<Vec<_>>(), dtype);
            // float64 reference.
            let target = |r: usize| if r % seq == seq - 1 { IGNORE_INDEX } else { labels[r + 1] };
            let count = (0..rows).filter(|&r| target(r) != IGNORE_INDEX).count() as f64;
            let (mut loss64, mut grad64) = (0f64, vec![0f64; rows * vocab]);
            for r in (0..rows).filter(|&r| target(r) != IGNORE_INDEX) {
                let l = &logits[r * vocab..][..vocab];
                let mx = l.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                let lse = mx + l.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
                let t = target(r) as usize;
                loss64 += (lse - l[t] as f64) / count;
                for (j, g) in grad64[r * vocab..][..vocab].iter_mut().enumerate() {
                    *g = ((l[j] as f64 - lse).exp() - if j == t { 1.0 } else { 0.0 }) / count;
                }
            }
            let what = format!("batch {batch} seq {seq} vocab {vocab} {dtype:?}");
            let lt = upload(&backend, &[rows, vocab], &logits, dtype);
            let (loss, grad) = causal_lm_loss_device(&dev, &lt, &labels, seq, vocab).unwrap();
            let grad = download(&grad);
            assert!(((loss as f64 - loss64) / loss64).abs() < 1e-5, "loss {what}: {loss} vs {loss64}");
            assert!(rel_err(&grad, &grad64) < tol(dtype), "dlogits {what}: {}", rel_err(&grad, &grad64));
            assert!(grad[..vocab].iter().all(|&g| g == 0.0), "row 0 does not count: zero gradient ({what})");
            if dtype == DType::F32 {
                let (loss_cpu, grad_cpu) = causal_lm_loss(&logits, &labels, seq, vocab).unwrap();
                assert!(((loss - loss_cpu) / loss_cpu).abs() < 1e-6, "loss vs CPU {what}");
                let g64: Vec<f64> = grad_cpu.iter().map(|&v| v as f64).collect();
                assert!(rel_err(&grad, &g64) < F32_VS_CPU, "dlogits vs CPU {what}");
            }
        }
    }
    // The CPU op's input checks, on the device path too.
    let lt = upload(&backend, &[2, 4], &[0.0; 8], DType::F32);
    let err = causal_lm_loss_device(&dev, &lt, &[0, 9], 2, 4).unwrap_err().to_string();
    assert!(err.contains("label 9"), "{err}");
    assert!(causal_lm_loss_device(&dev, &lt, &[0, 1], 2, 5).is_err());
}

pub fn attention_forward_and_backward(dev: &Arc<dyn Device>) {
    let (dev, backend) = (dev.clone(), Backend::Device(dev.clone()));
    use lorafuse::ops::attention::{
        attention_backward, attention_backward_device, attention_forward, attention_forward_device, AttnShape,
    };
    let as64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();

    let mut rng = TestRng::new(59);
    // Head size 8 (scalar path in bf16, one lane in four used), 16, 40 (two dimension
    // registers per lane, clamped), 64; GQA groups of 1, 2, 3; a KV cache (tk > tq); more
    // than 32 keys (several chunks).
    let shapes = [
        AttnShape { batch: 1, tq: 5, tk: 5, heads: 2, kv_heads: 2, head_dim: 8 },
        AttnShape { batch: 2, tq: 7, tk: 9, heads: 4, kv_heads: 2, head_dim: 16 },
        AttnShape { batch: 1, tq: 37, tk: 37, heads: 3, kv_heads: 1, head_dim: 40 },
        AttnShape { batch: 1, tq: 3, tk: 35, heads: 2, kv_heads: 1, head_dim: 64 },
    ];
    for sh in shapes {
        let (nq, nk) = (sh.batch * sh.tq * sh.heads * sh.head_dim, sh.batch * sh.tk * sh.kv_heads * sh.head_dim);
        for dtype in [DType::F32, DType::BF16] {
            let (q, k, v, dout) = (
                rounded(&rng.vec_f32(nq), dtype),
                rounded(&rng.vec_f32(nk), dtype),
                rounded(&rng.vec_f32(nk), dtype),
                rounded(&rng.vec_f32(nq), dtype),
            );
            // The CPU op on the same (rounded) inputs is the reference: itself checked
            // against float64 and finite differences in src/ops/attention.rs's tests.
            let (o_cpu, lse_cpu) = attention_forward(&q, &k, &v, sh).unwrap();
            let (dq_cpu, dk_cpu, dv_cpu) = attention_backward(&dout, &q, &k, &v, &lse_cpu, sh).unwrap();
            let up = |x: &[f32], n: usize, w: usize| upload(&backend, &[n / w, w], x, dtype);
            let (qt, kt, vt) = (
                up(&q, nq, sh.heads * sh.head_dim),
                up(&k, nk, sh.kv_heads * sh.head_dim),
                up(&v, nk, sh.kv_heads * sh.head_dim),
            );
            let (o, lse) = attention_forward_device(&dev, &qt, &kt, &vt, sh).unwrap();
            let dt = up(&dout, nq, sh.heads * sh.head_dim);
            let (dq, dk, dv) = attention_backward_device(&dev, &dt, &qt, &kt, &vt, &lse, sh).unwrap();
            let what = format!("{sh:?} {dtype:?}");
            let limit = if dtype == DType::BF16 { BF16_VS_F64 } else { 1e-5 };
            for (name, got, want) in [
                ("o", download(&o), &o_cpu),
                ("lse", download(&lse), &lse_cpu),
                ("dq", download(&dq), &dq_cpu),
                ("dk", download(&dk), &dk_cpu),
                ("dv", download(&dv), &dv_cpu),
            ] {
                let e = rel_err(&got, &as64(want));
                assert!(e < limit, "{name} {what}: {e}");
            }
        }
    }
    let t = |n: usize| upload(&backend, &[n], &vec![0.5; n], DType::F32);
    let sh = AttnShape { batch: 1, tq: 2, tk: 2, heads: 1, kv_heads: 1, head_dim: 300 };
    let err = attention_forward_device(&dev, &t(600), &t(600), &t(600), sh).unwrap_err().to_string();
    assert!(err.contains("head size 300"), "{err}");
}

/// Three AdamW steps on the device equal the CPU update element by element (same f32
/// formula); the sum of squares behind gradient clipping against float64.
pub fn adamw_and_gradient_norm(dev: &Arc<dyn Device>) {
    let (dev, backend) = (dev.clone(), Backend::Device(dev.clone()));
    use lorafuse::train::{adamw_update_device, sum_squares_device, AdamW};

    let mut rng = TestRng::new(61);
    let mut opt = AdamW::new(1e-2);
    opt.weight_decay = 0.1;
    // 1029 = 257 packs of 4 and a tail; 3: tail only.
    for n in [3, 1029] {
        let (mut p, mut m, mut v) = (rng.vec_f32(n), vec![0f32; n], vec![0f32; n]);
        let (pt, mt, vt) = (
            upload(&backend, &[n], &p, DType::F32),
            upload(&backend, &[n], &m, DType::F32),
            upload(&backend, &[n], &v, DType::F32),
        );
        for t in 1..=3 {
            let (g, scale) = (rng.vec_f32(n), 0.5 + 0.25 * t as f32);
            let gt = upload(&backend, &[n], &g, DType::F32);
            let c = opt.constants(t);
            adamw_update_device(&dev, &c, (&pt, &gt, &mt, &vt), scale).unwrap();
            for i in 0..n {
                c.update(&mut p[i], scale * g[i], &mut m[i], &mut v[i]);
            }
            let as64 = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
            for (name, got, want) in [("p", &pt, &p), ("m", &mt, &m), ("v", &vt, &v)] {
                let e = rel_err(&download(got), &as64(want));
                assert!(e < F32_VS_CPU, "{name} n {n} step {t}: {e}");
            }
        }
        let x = rng.vec_f32(n);
        let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        let got = sum_squares_device(&dev, &upload(&backend, &[n], &x, DType::F32)).unwrap();
        assert!(((got - want) / want).abs() < 1e-6, "sum of squares n {n}: {got} vs {want}");
    }
    let (a, b) = (upload(&backend, &[4], &[1.0; 4], DType::F32), upload(&backend, &[5], &[1.0; 5], DType::F32));
    let err = adamw_update_device(&dev, &opt.constants(1), (&a, &b, &a, &a), 1.0).unwrap_err().to_string();
    assert!(err.contains("gradient"), "{err}");
}

pub fn embedding_gather(dev: &Arc<dyn Device>) {
    let (dev, backend) = (dev.clone(), Backend::Device(dev.clone()));
    use lorafuse::ops::embedding::{embedding, embedding_device};

    let mut rng = TestRng::new(67);
    // dim 12: packs in f32, element by element in bf16; 64: packs in both.
    for (vocab, dim) in [(11, 12), (50, 64)] {
        for dtype in [DType::F32, DType::BF16] {
            let table = rounded(&rng.vec_f32(vocab * dim), dtype);
            let ids: Vec<u32> = (0..37).map(|_| (rng.next_u64() % vocab as u64) as u32).collect();
            let got = download(&embedding_device(&dev, &upload(&backend, &[vocab, dim], &table, dtype), &ids).unwrap());
            let want = embedding(&table, dim, &ids).unwrap();
            assert_eq!(got, want, "vocab {vocab} dim {dim} {dtype:?}: a gather copies exactly");
        }
    }
    let table = upload(&backend, &[4, 8], &[0.5; 32], DType::F32);
    let err = embedding_device(&dev, &table, &[1, 4]).unwrap_err().to_string();
    assert!(err.contains("token id 4"), "{err}");
}

/// The residual add (f32, bf16) and the f32 → bf16 cast, exact: one rounding per output, as
/// the CPU does it.
pub fn residual_add_and_cast(dev: &Arc<dyn Device>) {
    use half::bf16;
    use lorafuse::ops::pointwise::{add_device, cast_to_bf16_device};
    let (dev, backend) = (dev.clone(), Backend::Device(dev.clone()));
    let mut rng = TestRng::new(71);
    // 4101: several blocks and a tail after the packs; 5: tail only.
    for n in [5, 4101] {
        for dtype in [DType::F32, DType::BF16] {
            let (a, b) = (rounded(&rng.vec_f32(n), dtype), rounded(&rng.vec_f32(n), dtype));
            let got = download(
                &add_device(&dev, &upload(&backend, &[n], &a, dtype), &upload(&backend, &[n], &b, dtype)).unwrap(),
            );
            let want = rounded(&a.iter().zip(&b).map(|(x, y)| x + y).collect::<Vec<_>>(), dtype);
            assert_eq!(got, want, "add n {n} {dtype:?}");
        }
        let x: Vec<f32> = rng.vec_f32(n).iter().map(|v| 100.0 * v).collect();
        let got = cast_to_bf16_device(&dev, &upload(&backend, &[n], &x, DType::F32)).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let want: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        assert_eq!(download(&got), want, "cast n {n}");
    }
    let (a, b) = (upload(&backend, &[4], &[1.0; 4], DType::F32), upload(&backend, &[4], &[1.0; 4], DType::BF16));
    assert!(add_device(&dev, &a, &b).unwrap_err().to_string().contains("BF16"));
    assert!(cast_to_bf16_device(&dev, &b).unwrap_err().to_string().contains("f32 expected"));
}
