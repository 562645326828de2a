//! Training, generation and the KV cache on the tiny fixture model.

use lorafuse::autograd::Tape;
use lorafuse::model::generate::sample;
use lorafuse::model::{GenerateConfig, KvCache, Llama, LoraConfig, Mode, TargetModules};
use lorafuse::testing::{rel_err, TestRng};
use lorafuse::train::{clip_grad_norm, loss_and_grads, train_step, AdamW};
use std::path::Path;
use std::sync::Arc;

fn model_a() -> Llama {
    Llama::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/a/model")).unwrap()
}

fn lora(r: usize, dropout: f32) -> LoraConfig {
    LoraConfig {
        r,
        lora_alpha: 2.0 * r as f32,
        lora_dropout: dropout,
        target_modules: TargetModules::AllLinear,
        seed: 9,
        ..Default::default()
    }
}

/// The loss of a tiny model on a fixed pattern falls under AdamW on the adapters alone.
#[test]
fn loss_falls_with_adamw_and_clipping() {
    let mut model = model_a();
    model.add_lora(&lora(8, 0.05)).unwrap();
    let base_embed = model.embed_tokens.clone();
    let (batch, seq) = (4, 16);
    let ids: Vec<u32> = (0..batch * seq).map(|i| ((i % seq) * 3 % 64) as u32).collect();
    let labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let mut opt = AdamW::new(1e-2);
    let first = train_step(&mut model, &mut opt, &ids, &labels, batch, 1.0).unwrap();
    let mut last = first;
    for _ in 0..40 {
        last = train_step(&mut model, &mut opt, &ids, &labels, batch, 1.0).unwrap();
    }
    println!("loss {first:.4} → {last:.4}");
    assert!(last.is_finite() && last < 0.3 * first, "loss {first} → {last}");
    assert!(Arc::ptr_eq(&base_embed, &model.embed_tokens), "frozen weights untouched");
}

/// Directional derivative of the whole model's loss (dropout on) w.r.t. all adapters.
#[test]
fn model_gradient_matches_finite_difference_with_dropout() {
    let mut model = model_a();
    model.add_lora(&lora(4, 0.2)).unwrap();
    let mut rng = TestRng::new(5);
    for lin in model.linears_mut() {
        if let Some(l) = lin.lora.as_mut() {
            l.b = Arc::new(rng.vec_f32(l.b.len()).iter().map(|v| v * 0.3).collect());
        }
    }
    let ids: Vec<u32> = (0..24).map(|_| (rng.next_u64() % 64) as u32).collect();
    let labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let (_, grads) = loss_and_grads(&model, &ids, &labels, 2, 3).unwrap();
    let dirs: Vec<(Vec<f32>, Vec<f32>)> = model
        .linears()
        .iter()
        .filter_map(|l| l.lora.as_ref().map(|a| (rng.vec_f32(a.a.len()), rng.vec_f32(a.b.len()))))
        .collect();
    let mut analytic = 0f64;
    for (l, (da, db)) in model.linears().iter().filter_map(|l| l.lora.as_ref()).zip(&dirs) {
        analytic += grads.get(2 * l.index).unwrap().iter().zip(da).map(|(g, d)| (*g * *d) as f64).sum::<f64>();
        analytic += grads.get(2 * l.index + 1).unwrap().iter().zip(db).map(|(g, d)| (*g * *d) as f64).sum::<f64>();
    }
    let eps = 1e-3f32;
    let loss_at = |sign: f32| {
        let mut m = model.clone();
        for (lin, (da, db)) in m.linears_mut().into_iter().filter(|l| l.lora.is_some()).zip(&dirs) {
            let l = lin.lora.as_mut().unwrap();
            l.a = Arc::new(l.a.iter().zip(da).map(|(p, d)| p + sign * eps * d).collect());
            l.b = Arc::new(l.b.iter().zip(db).map(|(p, d)| p + sign * eps * d).collect());
        }
        let tape = Tape::no_grad();
        m.loss(&tape, &ids, &labels, 2, Mode { train: true, dropout_step: 3 }).unwrap().0.item() as f64
    };
    let numeric = (loss_at(1.0) - loss_at(-1.0)) / (2.0 * eps as f64);
    let rel = (analytic - numeric).abs() / numeric.abs();
    assert!(rel < 5e-3, "analytic {analytic} numeric {numeric} rel {rel:e}");
    // Dropout really is on: another step's masks give another loss.
    let l3 = loss_and_grads(&model, &ids, &labels, 2, 3).unwrap().0;
    let l4 = loss_and_grads(&model, &ids, &labels, 2, 4).unwrap().0;
    assert_ne!(l3, l4);
}

#[test]
fn clipping_scales_to_max_norm() {
    let mut g = lorafuse::autograd::Grads::default();
    g.0.insert(0, vec![3.0, 0.0]);
    g.0.insert(1, vec![4.0]);
    assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
    let n: f32 = g.0.values().flatten().map(|v| v * v).sum::<f32>().sqrt();
    assert!((n - 1.0).abs() < 1e-5);
}

/// Incremental decoding with the cache gives the logits of a full forward.
#[test]
fn kv_cache_matches_full_forward() {
    let mut model = model_a();
    model.add_lora(&LoraConfig { init_lora_weights: lorafuse::model::LoraInit::NoInit, ..lora(4, 0.0) }).unwrap();
    let ids: Vec<u32> = vec![5, 9, 1, 33, 60, 2, 17, 8, 41, 12];
    let tape = Tape::no_grad();
    let full = model.forward(&tape, &ids, 1, None, Mode::default()).unwrap();
    let mut cache = KvCache::new();
    let mut rows = model.forward(&tape, &ids[..4], 1, Some(&mut cache), Mode::default()).unwrap().data().to_vec();
    for &t in &ids[4..] {
        rows.extend_from_slice(model.forward(&tape, &[t], 1, Some(&mut cache), Mode::default()).unwrap().data());
    }
    assert_eq!(cache.len, ids.len());
    let want: Vec<f64> = full.data().iter().map(|&v| v as f64).collect();
    assert!(rel_err(&rows, &want) < 1e-5);
    assert_eq!(tape.len(), 0);
}

#[test]
fn generation_greedy_and_top_p_with_and_without_cache() {
    let mut model = model_a();
    model.add_lora(&LoraConfig { init_lora_weights: lorafuse::model::LoraInit::NoInit, ..lora(4, 0.0) }).unwrap();
    let prompt = [3u32, 14, 15, 9];
    for (temperature, top_p) in [(0.0, 1.0), (0.9, 0.8), (1.5, 1.0)] {
        let cfg = GenerateConfig {
            max_new_tokens: 12,
            temperature,
            top_p,
            seed: 4,
            eos_token_id: Some(u32::MAX),
            use_cache: true,
        };
        let a = model.generate(&prompt, &cfg).unwrap();
        let b = model.generate(&prompt, &GenerateConfig { use_cache: false, ..cfg }).unwrap();
        assert_eq!(a, b, "T={temperature} top_p={top_p}");
        assert_eq!(a.len(), 12);
    }
    // A tiny nucleus is greedy.
    let logits = [0.1f32, 2.0, 1.9, -1.0];
    for u in [0.0, 0.5, 0.999] {
        assert_eq!(sample(&logits, 1.0, 1e-3, u), 1);
    }
    // top_p = 0.6 keeps tokens 1 and 2 only.
    let picks: std::collections::BTreeSet<u32> =
        (0..100).map(|i| sample(&logits, 1.0, 0.6, i as f32 / 100.0)).collect();
    assert_eq!(picks, [1, 2].into_iter().collect());
}
