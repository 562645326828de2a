//! Golden tests against transformers 5.23 + PEFT 0.21 (fixtures from scripts/golden_llama.py).
//!
//! Tolerances (relative L2 error vs the PyTorch f32 values): logits 1e-5, loss 1e-5,
//! LoRA gradients 1e-4, merged logits 1e-5. Greedy continuations must be identical.

use lorafuse::autograd::Tape;
use lorafuse::model::weights::TensorFiles;
use lorafuse::model::{GenerateConfig, Llama, LoraConfig, Mode};
use lorafuse::testing::rel_err;
use std::path::{Path, PathBuf};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama").join(p)
}

struct Golden(TensorFiles);

impl Golden {
    fn open(case: &str) -> Self {
        Golden(TensorFiles::open(&[fixture(case).join("golden.safetensors")]).unwrap())
    }
    fn f32(&self, k: &str) -> Vec<f32> {
        self.0.get(k).unwrap().0
    }
    fn f64(&self, k: &str) -> Vec<f64> {
        self.f32(k).into_iter().map(|x| x as f64).collect()
    }
    fn ids(&self) -> Vec<u32> {
        self.f32("input_ids").into_iter().map(|x| x as u32).collect()
    }
    fn labels(&self) -> Vec<i64> {
        self.f32("labels").into_iter().map(|x| x as i64).collect()
    }
}

fn check(what: &str, got: &[f32], want: &[f64], tol: f64) -> f64 {
    let e = rel_err(got, want);
    let max_abs = got.iter().zip(want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
    println!("{what}: relative {e:.2e}, max abs {max_abs:.2e}");
    assert!(e < tol, "{what}: relative error {e:.3e} ≥ {tol:e}");
    e
}

/// Base logits, adapter logits, loss, every LoRA gradient, merged logits, greedy tokens.
fn run_case(case: &str) {
    let g = Golden::open(case);
    let (ids, labels) = (g.ids(), g.labels());
    let mut model = Llama::from_dir(&fixture(case).join("model")).unwrap();
    let base = model.forward(&Tape::no_grad(), &ids, 2, None, Mode::default()).unwrap();
    check(&format!("{case} base logits"), base.data(), &g.f64("logits_base"), 1e-5);

    let report = model.load_adapter(&fixture(case).join("adapter")).unwrap();
    assert!(report.missing.is_empty() && report.ignored.is_empty(), "{report:?}");
    let tape = Tape::new();
    let (loss, logits) = model.loss(&tape, &ids, &labels, 2, Mode::default()).unwrap();
    check(&format!("{case} logits"), logits.data(), &g.f64("logits"), 1e-5);
    check(&format!("{case} loss"), &[loss.item()], &g.f64("loss"), 1e-5);
    let grads = tape.backward(&loss).unwrap();
    let (mut n, mut worst) = (0, 0f64);
    for lin in model.linears() {
        let Some(l) = &lin.lora else { continue };
        for (which, id) in [('A', 2 * l.index), ('B', 2 * l.index + 1)] {
            let key = format!("grad.base_model.model.{}.lora_{which}.weight", lin.name);
            let got = grads.get(id).unwrap_or_else(|| panic!("no gradient for {key}"));
            let e = rel_err(got, &g.f64(&key));
            assert!(e < 1e-4, "{key}: relative error {e:.3e}");
            worst = worst.max(e);
            n += 1;
        }
    }
    assert_eq!(n, g.0.names().filter(|k| k.starts_with("grad.")).count(), "every golden gradient is checked");
    println!("{case}: {n} LoRA gradients, worst relative error {worst:.2e}");

    let gen = model
        .generate(&ids[..6], &GenerateConfig { max_new_tokens: 8, eos_token_id: Some(u32::MAX), ..Default::default() })
        .unwrap();
    let want: Vec<u32> = g.f32("generated").into_iter().map(|x| x as u32).collect();
    assert_eq!(gen, want, "greedy continuation");

    model.merge().unwrap();
    let merged = model.forward(&Tape::no_grad(), &ids, 2, None, Mode::default()).unwrap();
    check(&format!("{case} merged logits"), merged.data(), &g.f64("logits_merged"), 1e-5);
    model.unmerge().unwrap();
    let unmerged = model.forward(&Tape::no_grad(), &ids, 2, None, Mode::default()).unwrap();
    check(&format!("{case} unmerged logits"), unmerged.data(), &g.f64("logits"), 1e-5);
}

#[test]
fn golden_a_f32_v5_config_gqa_head_dim_biases_patterns() {
    run_case("a");
}

#[test]
fn golden_b_bf16_sharded_v4_config_tied_rslora_layers_bf16_adapter() {
    run_case("b");
}

/// Which modules are adapted, and with which r / alpha, exactly as PEFT decided.
#[test]
fn target_matching_matches_peft() {
    let text = std::fs::read_to_string(fixture("targets.json")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut model = Llama::from_dir(&fixture("a/model")).unwrap();
    for case in cases.as_array().unwrap() {
        let mut c = case["config"].as_object().unwrap().clone();
        c.insert("peft_type".into(), "LORA".into());
        c.insert("r".into(), 2.into());
        c.insert("lora_alpha".into(), 6.into());
        let cfg = LoraConfig::from_json(&serde_json::Value::Object(c).to_string(), "case").unwrap();
        model.add_lora(&cfg).unwrap();
        let mut got: Vec<(String, usize, f32)> = model
            .linears()
            .iter()
            .filter_map(|l| l.lora.as_ref().map(|a| (l.name.clone(), a.op.r, a.op.alpha)))
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let mut want: Vec<(String, usize, f32)> = case["modules"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v[0].as_u64().unwrap() as usize, v[1].as_f64().unwrap() as f32))
            .collect();
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, want, "config {}", case["config"]);
    }
}

/// Save → load round trip is exact; with LORAFUSE_EXPORT_DIR set, also writes the adapter
/// (after one AdamW step, so it differs from the fixture) and lorafuse's logits there for
/// `scripts/golden_llama.py --check DIR`.
#[test]
fn adapter_round_trip_and_export() {
    let g = Golden::open("a");
    let (ids, labels) = (g.ids(), g.labels());
    let mut model = Llama::from_dir(&fixture("a/model")).unwrap();
    model.load_adapter(&fixture("a/adapter")).unwrap();
    let mut opt = lorafuse::train::AdamW::new(1e-2);
    lorafuse::train::train_step(&mut model, &mut opt, &ids, &labels, 2, 1.0).unwrap();
    let dir = std::env::var_os("LORAFUSE_EXPORT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("lorafuse-adapter-{}", std::process::id())));
    model.save_adapter(&dir).unwrap();
    let mut back = Llama::from_dir(&fixture("a/model")).unwrap();
    let report = back.load_adapter(&dir).unwrap();
    assert_eq!(report.loaded.len(), 28);
    for (x, y) in model.linears().iter().zip(back.linears()) {
        match (&x.lora, &y.lora) {
            (Some(a), Some(b)) => {
                assert_eq!((a.a.as_slice(), a.b.as_slice(), a.op), (b.a.as_slice(), b.b.as_slice(), b.op), "{}", x.name)
            }
            (None, None) => {}
            _ => panic!("{}: adapter presence differs", x.name),
        }
    }
    let cfg = LoraConfig::from_file(&dir.join("adapter_config.json")).unwrap();
    assert_eq!(cfg.rank_pattern, vec![("o_proj".to_string(), 2)]);
    assert_eq!(cfg.alpha_pattern, vec![("down_proj".to_string(), 4.0)]);
    let logits = back.forward(&Tape::no_grad(), &ids, 2, None, Mode::default()).unwrap();
    let trained = rel_err(logits.data(), &g.f64("logits"));
    assert!(trained > 1e-4, "the trained adapter should change the logits ({trained:e})");
    let ids_f: Vec<f32> = ids.iter().map(|&x| x as f32).collect();
    let mut t = std::collections::BTreeMap::new();
    t.insert("input_ids".to_string(), (vec![2, ids.len() / 2], ids_f.as_slice()));
    t.insert("logits".to_string(), (logits.shape().to_vec(), logits.data()));
    lorafuse::model::weights::write_safetensors(&dir.join("logits.safetensors"), &t, lorafuse::model::WeightDtype::F32)
        .unwrap();
    if std::env::var_os("LORAFUSE_EXPORT_DIR").is_none() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A merged model saved as a full checkpoint reloads with the same logits (and the dtype and
/// config form of the source).
#[test]
fn merge_and_save_full_checkpoint() {
    let g = Golden::open("b");
    let ids = g.ids();
    let mut model = Llama::from_dir(&fixture("b/model")).unwrap();
    model.load_adapter(&fixture("b/adapter")).unwrap();
    model.merge().unwrap();
    let dir = std::env::temp_dir().join(format!("lorafuse-merged-{}", std::process::id()));
    model.save_pretrained(&dir).unwrap();
    let back = Llama::from_dir(&dir).unwrap();
    assert!(back.config.tie_word_embeddings);
    assert_eq!(back.dtype, lorafuse::model::WeightDtype::BF16);
    let logits = back.forward(&Tape::no_grad(), &ids, 2, None, Mode::default()).unwrap();
    // The merged weights are rounded to bf16 on save: compare loosely.
    check("b merged+saved (bf16) logits", logits.data(), &g.f64("logits_merged"), 2e-2);
    std::fs::remove_dir_all(&dir).unwrap();
}
