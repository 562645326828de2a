//! Per-op gradient checks against central finite differences, and tape properties.
//! (Attention is checked with one and with several 32-row query blocks.)
//!
//! For an op `y = f(x₁, …)` the objective is `L = Σ wᵢ·yᵢ` (random fixed `w`, summed in f64).
//! For each input a random direction `d` gives the numeric derivative
//! `(L(x + εd) − L(x − εd)) / 2ε`, compared with `⟨∂L/∂x, d⟩` from the tape: relative error
//! below 2e-3 (f32 forward, ε = 1e-3), and NaN fails.

use lorafuse::autograd::functions as F;
use lorafuse::autograd::{Tape, Var};
use lorafuse::ops::attention::AttnShape;
use lorafuse::ops::lora::LoraOpConfig;
use lorafuse::ops::rope::{inv_freq, RopeScaling, RopeTable};
use lorafuse::testing::TestRng;
use std::sync::Arc;

type Op<'a> = dyn Fn(&Tape, &[Var]) -> Var + 'a;

/// `Σ w·y` as a tape op (exercises `Tape::record` from outside the crate).
fn weighted_sum(tape: &Tape, y: &Var, w: &Arc<Vec<f32>>) -> Var {
    let s: f64 = y.data().iter().zip(w.iter()).map(|(a, b)| *a as f64 * *b as f64).sum();
    let w2 = w.clone();
    tape.record(vec![s as f32], &[1], &[y], move || {
        Box::new(move |g| Ok(vec![Some(w2.iter().map(|v| v * g[0]).collect())]))
    })
    .unwrap()
}

fn objective(f: &Op, inputs: &[(Vec<f32>, Vec<usize>)], w: &[f32]) -> f64 {
    let tape = Tape::no_grad();
    let vars: Vec<Var> = inputs.iter().map(|(d, s)| Var::constant(d.clone(), s).unwrap()).collect();
    let y = f(&tape, &vars);
    assert_eq!(tape.len(), 0, "a no-grad tape records nothing");
    y.data().iter().zip(w).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// Checks every input's gradient along a random direction.
fn gradcheck(name: &str, inputs: Vec<(Vec<f32>, Vec<usize>)>, f: &Op) {
    let mut rng = TestRng::new(name.len() as u64 * 7919);
    let tape = Tape::new();
    let vars: Vec<Var> =
        inputs.iter().enumerate().map(|(i, (d, s))| tape.param(i, Arc::new(d.clone()), s).unwrap()).collect();
    let y = f(&tape, &vars);
    let w = Arc::new(rng.vec_f32(y.len()));
    let loss = weighted_sum(&tape, &y, &w);
    let grads = tape.backward(&loss).unwrap();
    for (i, (x, shape)) in inputs.iter().enumerate() {
        let g = grads.get(i).unwrap_or_else(|| panic!("{name}: no gradient for input {i}"));
        assert!(g.iter().all(|v| v.is_finite()), "{name}: non-finite gradient");
        let d = rng.vec_f32(x.len());
        let analytic: f64 = g.iter().zip(&d).map(|(a, b)| *a as f64 * *b as f64).sum();
        let eps = 1e-3f32;
        let shifted = |sign: f32| {
            let mut ins = inputs.clone();
            ins[i] = (x.iter().zip(&d).map(|(a, b)| a + sign * eps * b).collect(), shape.clone());
            objective(f, &ins, &w)
        };
        let numeric = (shifted(1.0) - shifted(-1.0)) / (2.0 * eps as f64);
        let rel = (analytic - numeric).abs() / numeric.abs().max(analytic.abs()).max(1e-3);
        assert!(rel < 2e-3, "{name} input {i}: analytic {analytic} numeric {numeric} (rel {rel:.2e})");
    }
}

fn rand(rng: &mut TestRng, shape: &[usize]) -> (Vec<f32>, Vec<usize>) {
    (rng.vec_f32(shape.iter().product()), shape.to_vec())
}

#[test]
fn linear_and_add() {
    let mut rng = TestRng::new(1);
    let w = Arc::new(rng.vec_f32(6 * 5));
    let bias = Arc::new(rng.vec_f32(6));
    gradcheck("linear", vec![rand(&mut rng, &[7, 5])], &|t, v| F::linear(t, &v[0], &w, Some(&bias), 6).unwrap());
    gradcheck("add", vec![rand(&mut rng, &[4, 3]), rand(&mut rng, &[4, 3])], &|t, v| F::add(t, &v[0], &v[1]).unwrap());
}

#[test]
fn lora_linear_with_and_without_dropout() {
    let mut rng = TestRng::new(2);
    let (m, k, n, r) = (9, 12, 7, 3);
    let w0 = Arc::new(rng.vec_f32(n * k));
    let bias = Arc::new(rng.vec_f32(n));
    for (p, rs) in [(0.0, false), (0.3, true)] {
        let cfg = LoraOpConfig { r, alpha: 5.0, dropout: p, use_rslora: rs, seed: 42 };
        let ins = vec![rand(&mut rng, &[m, k]), rand(&mut rng, &[r, k]), rand(&mut rng, &[n, r])];
        gradcheck(&format!("lora p={p}"), ins, &|t, v| {
            F::lora_linear(t, &v[0], &w0, Some(&bias), &v[1], &v[2], cfg, 11, true).unwrap()
        });
    }
}

#[test]
fn rms_norm_rope_swiglu() {
    let mut rng = TestRng::new(3);
    let w = Arc::new(rng.vec_f32(8));
    gradcheck("rms_norm", vec![rand(&mut rng, &[5, 8])], &|t, v| F::rms_norm(t, &v[0], &w, 1e-5).unwrap());
    let sc =
        RopeScaling { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 4.0 };
    let table = Arc::new(RopeTable::new(&inv_freq(6, 500000.0, Some(&sc)), 16));
    gradcheck("rope", vec![rand(&mut rng, &[2 * 5, 3 * 6])], &|t, v| F::rope(t, &v[0], 3, 5, 2, &table).unwrap());
    gradcheck("swiglu", vec![rand(&mut rng, &[4, 6]), rand(&mut rng, &[4, 6])], &|t, v| {
        F::swiglu(t, &v[0], &v[1]).unwrap()
    });
}

#[test]
fn attention_gqa_causal_with_cache_offset() {
    let mut rng = TestRng::new(4);
    for (tq, tk) in [(6, 6), (3, 7), (40, 40), (37, 45)] {
        let sh = AttnShape { batch: 2, tq, tk, heads: 4, kv_heads: 2, head_dim: 4 };
        let ins = vec![rand(&mut rng, &[2 * tq, 16]), rand(&mut rng, &[2 * tk, 8]), rand(&mut rng, &[2 * tk, 8])];
        gradcheck(&format!("attention tq={tq} tk={tk}"), ins, &|t, v| {
            F::attention(t, &v[0], &v[1], &v[2], sh).unwrap()
        });
    }
}

#[test]
fn causal_lm_loss_with_ignore_index() {
    let mut rng = TestRng::new(5);
    let labels = vec![3, 1, -100, 4, 0, 2, 2, -100, 1, 3];
    gradcheck("loss", vec![rand(&mut rng, &[10, 5])], &|t, v| F::causal_lm_loss(t, &v[0], &labels, 5).unwrap());
    // The value: mean over counted positions of −log softmax.
    let logits: Vec<f32> = rng.vec_f32(10 * 5);
    let l = F::causal_lm_loss(&Tape::no_grad(), &Var::constant(logits.clone(), &[10, 5]).unwrap(), &labels, 5).unwrap();
    let mut want = 0f64;
    let mut n = 0;
    for row in 0..10 {
        let t = if row % 5 == 4 { -100 } else { labels[row + 1] };
        if t == -100 {
            continue;
        }
        let r: Vec<f64> = logits[row * 5..row * 5 + 5].iter().map(|&x| x as f64).collect();
        let lse = r.iter().map(|x| x.exp()).sum::<f64>().ln();
        want += lse - r[t as usize];
        n += 1;
    }
    assert!((l.item() as f64 - want / n as f64).abs() < 1e-6);
}

/// Frozen weights get no gradient and no node; constants cost nothing on the tape.
#[test]
fn only_trainable_parameters_get_gradients() {
    let mut rng = TestRng::new(6);
    let tape = Tape::new();
    let x = Var::constant(rng.vec_f32(4 * 3), &[4, 3]).unwrap();
    let w = Arc::new(rng.vec_f32(2 * 3));
    let y = F::linear(&tape, &x, &w, None, 2).unwrap();
    assert!(!y.requires_grad());
    assert_eq!(tape.len(), 0, "no input needs a gradient: nothing recorded");
    let a = tape.param(7, Arc::new(rng.vec_f32(3)), &[1, 3]).unwrap();
    let b = tape.param(9, Arc::new(vec![0.0; 2]), &[2, 1]).unwrap();
    let cfg = LoraOpConfig { r: 1, alpha: 1.0, dropout: 0.0, use_rslora: false, seed: 0 };
    let y = F::lora_linear(&tape, &x, &w, None, &a, &b, cfg, 0, true).unwrap();
    let loss = weighted_sum(&tape, &y, &Arc::new(vec![1.0; 8]));
    let grads = tape.backward(&loss).unwrap();
    let mut ids: Vec<usize> = grads.0.keys().copied().collect();
    ids.sort();
    assert_eq!(ids, vec![7, 9]);
    assert!(tape.is_empty(), "backward releases the recorded closures");
    // B = 0 ⇒ dA = 0, but dB ≠ 0.
    assert!(grads.get(7).unwrap().iter().all(|&v| v == 0.0));
    assert!(grads.get(9).unwrap().iter().any(|&v| v != 0.0));
}
