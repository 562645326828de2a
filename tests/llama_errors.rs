//! Bad input gives an error naming the file and the field (or tensor), never a panic.

use lorafuse::model::{Llama, LoraConfig, TargetModules};
use std::path::{Path, PathBuf};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama").join(p)
}

/// A scratch copy of fixture model `a` whose config.json is edited by `edit`.
fn model_dir(tag: &str, edit: impl Fn(&mut serde_json::Map<String, serde_json::Value>)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lorafuse-err-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("a/model/model.safetensors"), dir.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("a/model/config.json")).unwrap()).unwrap();
    edit(cfg.as_object_mut().unwrap());
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    dir
}

fn load_err(tag: &str, edit: impl Fn(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let dir = model_dir(tag, edit);
    let e = Llama::from_dir(&dir).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    e
}

fn assert_has(e: &str, parts: &[&str]) {
    for p in parts {
        assert!(e.contains(p), "error `{e}` should mention `{p}`");
    }
}

#[test]
fn config_errors_name_file_and_field() {
    assert_has(&load_err("missing", |c| drop(c.remove("hidden_size"))), &["config.json", "`hidden_size`", "missing"]);
    assert_has(
        &load_err("type", |c| drop(c.insert("num_attention_heads".into(), "4".into()))),
        &["config.json", "`num_attention_heads`"],
    );
    assert_has(
        &load_err("arch", |c| drop(c.insert("architectures".into(), serde_json::json!(["MistralForCausalLM"])))),
        &["config.json", "`architectures`", "MistralForCausalLM"],
    );
    assert_has(
        &load_err("gqa", |c| drop(c.insert("num_key_value_heads".into(), 3.into()))),
        &["`num_key_value_heads`"],
    );
    assert_has(
        &load_err("rope", |c| {
            drop(c.insert("rope_parameters".into(), serde_json::json!({"rope_type": "yarn", "factor": 2.0})))
        }),
        &["`rope_parameters.rope_type`", "yarn"],
    );
    assert_has(
        &load_err("rope3", |c| {
            drop(c.insert("rope_parameters".into(), serde_json::json!({"rope_type": "llama3", "factor": 2.0})))
        }),
        &["`rope_parameters.low_freq_factor`", "missing"],
    );
    assert_has(&load_err("act", |c| drop(c.insert("hidden_act".into(), "gelu".into()))), &["`hidden_act`"]);
    let dir = model_dir("json", |_| {});
    std::fs::write(dir.join("config.json"), "{\"vocab_size\": 64,").unwrap();
    assert_has(&Llama::from_dir(&dir).unwrap_err().to_string(), &["config.json", "invalid JSON"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn weight_errors_name_file_and_tensor() {
    // Wrong size: the first tensor read has another shape.
    let e = load_err("shape", |c| drop(c.insert("intermediate_size".into(), 65.into())));
    assert_has(&e, &["model.safetensors", "`model.layers.0.mlp.gate_proj.weight`", "[64, 32]", "[65, 32]"]);
    // Missing tensor: more layers than the file has.
    let e = load_err("layers", |c| drop(c.insert("num_hidden_layers".into(), 3.into())));
    assert_has(&e, &["`model.layers.2.input_layernorm.weight`", "missing"]);
    // Untied without lm_head is fine only if the file has it; claiming tied skips it.
    let dir = model_dir("nofile", |_| {});
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_has(&Llama::from_dir(&dir).unwrap_err().to_string(), &["model.safetensors.index.json"]);
    // Two shards holding the same tensor: an error naming it, not a silent pick of one.
    for shard in ["a.safetensors", "b.safetensors"] {
        std::fs::copy(fixture("a/model/model.safetensors"), dir.join(shard)).unwrap();
    }
    let index = r#"{"weight_map": {"model.norm.weight": "a.safetensors", "lm_head.weight": "b.safetensors"}}"#;
    std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    let e = Llama::from_dir(&dir).unwrap_err().to_string();
    // Names are checked in sorted order, so the first duplicate in b is `lm_head.weight`.
    assert_has(&e, &["b.safetensors: tensor `lm_head.weight`", "appears in more than one shard"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn adapter_errors() {
    // Adapter of model a on model b: shapes differ.
    let mut b = Llama::from_dir(&fixture("b/model")).unwrap();
    let e = b.load_adapter(&fixture("a/adapter")).unwrap_err().to_string();
    assert_has(&e, &["adapter_model.safetensors", "lora_", "adapter does not fit the base model"]);
    // adapter_config.json problems.
    let bad = |text: &str| LoraConfig::from_json(text, "adapter_config.json").unwrap_err().to_string();
    assert_has(&bad(r#"{"r": 8}"#), &["adapter_config.json", "`peft_type`", "missing"]);
    assert_has(&bad(r#"{"peft_type": "IA3"}"#), &["`peft_type`"]);
    assert_has(&bad(r#"{"peft_type": "LORA", "use_dora": true}"#), &["`use_dora`"]);
    assert_has(&bad(r#"{"peft_type": "LORA", "r": "eight"}"#), &["`r`"]);
    assert_has(&bad(r#"{"peft_type": "LORA", "target_modules": 5}"#), &["`target_modules`"]);
    assert_has(&bad(r#"{"peft_type": "LORA", "lora_dropout": 1.5}"#), &["lora_dropout"]);
    // Unknown keys are ignored, as PEFT does.
    let ok = LoraConfig::from_json(r#"{"peft_type": "LORA", "r": 4, "some_future_key": 1}"#, "x").unwrap();
    assert_eq!(ok.r, 4);
    // Nothing matched.
    let mut a = Llama::from_dir(&fixture("a/model")).unwrap();
    let cfg = LoraConfig { target_modules: TargetModules::List(vec!["proj".into()]), ..Default::default() };
    assert_has(&a.add_lora(&cfg).unwrap_err().to_string(), &["target_modules", "matches no linear layer"]);
    let cfg = LoraConfig {
        target_modules: TargetModules::Regex(".*q_proj".into()),
        layers_to_transform: Some(vec![0]),
        ..Default::default()
    };
    assert_has(&a.add_lora(&cfg).unwrap_err().to_string(), &["layers_to_transform"]);
}

#[test]
fn input_errors() {
    let m = Llama::from_dir(&fixture("a/model")).unwrap();
    let t = lorafuse::autograd::Tape::no_grad();
    let e = m.forward(&t, &[1, 2, 64], 1, None, Default::default()).unwrap_err().to_string();
    assert_has(&e, &["token id 64", "vocabulary"]);
    let e = m.loss(&t, &[1, 2, 3, 4], &[1, 2, 3, 99], 1, Default::default()).unwrap_err().to_string();
    assert_has(&e, &["label 99"]);
    let e = m.forward(&t, &[1; 65], 1, None, Default::default()).unwrap_err().to_string();
    assert_has(&e, &["max_position_embeddings"]);
}
