//! q/k/v-style targets stacked into one fused LoRA call (x read once) give, per target, what the
//! CPU op gives for that target alone — same Philox mask, since it depends only on x's element
//! index. Tolerance 5e-3: the device rounds S and dS to bf16 once.

use half::bf16;
use lorafuse::device::sim::{Schedule, Sim};
use lorafuse::device::{Backend, Device};
use lorafuse::ops::lora::{lora_backward, lora_forward, LinearShape, LoraOpConfig};
use lorafuse::ops::lora_kernels::{self, LoraWeights};
use lorafuse::ops::lora_stack::{Stacked, TargetWeights};
use lorafuse::tensor::{DType, HostData, Tensor};
use lorafuse::testing::{rel_err, TestRng};
use std::sync::Arc;

const TOL: f64 = 5e-3;

fn rounded(rng: &mut TestRng, n: usize, scale: f32) -> Vec<f32> {
    rng.vec_f32(n).iter().map(|&v| bf16::from_f32(v * scale).to_f32()).collect()
}

fn upload(backend: &Backend, shape: &[usize], v: &[f32], dtype: DType) -> Tensor {
    let data = match dtype {
        DType::BF16 => HostData::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
        _ => HostData::F32(v.to_vec()),
    };
    Tensor::from_host(shape, data).unwrap().to_backend(backend).unwrap()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
fn stacked_targets_match_each_target_alone() {
    let (m, k, p, seed, offset) = (40, 72, 0.1f32, 77, 3);
    let mut rng = TestRng::new(8);
    let x = rounded(&mut rng, m * k, 1.0);
    let dims = [(48usize, 8usize, 16.0f32), (16, 4, 8.0), (16, 8, 32.0)]; // (n, r, alpha)
    let weights: Vec<_> = dims
        .iter()
        .map(|&(n, r, _)| (rounded(&mut rng, n * k, 0.5), rounded(&mut rng, r * k, 0.5), rounded(&mut rng, n * r, 0.5)))
        .collect();
    let cfgs: Vec<_> =
        dims.iter().map(|&(_, r, alpha)| LoraOpConfig { r, alpha, dropout: p, use_rslora: false, seed }).collect();
    let targets: Vec<_> = dims
        .iter()
        .zip(&weights)
        .zip(&cfgs)
        .map(|((&(n, r, _), (w0, a, b)), cfg)| TargetWeights { w0, a, b, n, r, scale: cfg.scaling() })
        .collect();
    let st = Stacked::new(&targets, k).unwrap();
    let (sn, sr) = (st.total_n(), st.total_r());
    let dy = rounded(&mut rng, m * sn, 1.0);

    let dev: Arc<dyn Device> = Arc::new(Sim::new(Schedule::Random(2)));
    let be = Backend::Device(dev.clone());
    let (tx, tw0, ta, tb) = (
        upload(&be, &[m, k], &x, DType::BF16),
        upload(&be, &[sn, k], &st.w0, DType::BF16),
        upload(&be, &[sr, k], &st.a, DType::BF16),
        upload(&be, &[sn, sr], &st.b, DType::BF16),
    );
    let tcs = upload(&be, &[sr], &st.col_scale, DType::F32);
    let w = LoraWeights { w0: &tw0, a: &ta, b: &tb, col_scale: &tcs };
    let mask = cfgs[0].mask(offset, true);
    let fwd = lora_kernels::lora_forward(&dev, &tx, &w, &mask, DType::F32).unwrap();
    let g = lora_kernels::lora_backward(
        &dev,
        &tx,
        &w,
        &fwd.s_scaled,
        &upload(&be, &[m, sn], &dy, DType::BF16),
        &mask,
        DType::F32,
    )
    .unwrap();
    let (y, dx, da, db) = [&fwd.y, &g.dx, &g.da, &g.db].map(|t| t.to_host().unwrap().to_f32()).into();

    let mut dx_sum = vec![0f64; m * k];
    for (t, (cfg, (w0, a, b))) in cfgs.iter().zip(&weights).enumerate() {
        let n = dims[t].0;
        let sh = LinearShape { m, k, n };
        let f = lora_forward(&x, w0, None, a, b, sh, cfg, offset, true).unwrap();
        let dy_t = st.output_of(&dy, t);
        let gt = lora_backward(&dy_t, &x, w0, a, b, &f.s, sh, cfg, offset, true, true).unwrap();
        for (name, got, want) in
            [("y", st.output_of(&y, t), &f.y), ("dA", st.da_of(&da, t), &gt.da), ("dB", st.db_of(&db, t), &gt.db)]
        {
            let e = rel_err(&got, &f64s(want));
            assert!(e <= TOL, "target {t}: {name} rel err {e:e}");
        }
        dx_sum.iter_mut().zip(gt.dx.unwrap()).for_each(|(s, v)| *s += v as f64);
    }
    let e = rel_err(&dx, &dx_sum);
    assert!(e <= TOL, "dx (sum over targets) rel err {e:e}");
}

#[test]
fn stacking_rejects_mismatched_sizes() {
    let (w0, a, b) = (vec![0.0; 8 * 4], vec![0.0; 2 * 4], vec![0.0; 8 * 3]);
    let err = Stacked::new(&[TargetWeights { w0: &w0, a: &a, b: &b, n: 8, r: 2, scale: 1.0 }], 4).unwrap_err();
    assert!(err.to_string().contains("target 0"), "{err}");
}
