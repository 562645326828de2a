//! LoRA configuration with PEFT's semantics (`LoraConfig`, `adapter_config.json`).
//!
//! Matching (PEFT `check_target_module_exists`, `get_pattern_key`) for a module key such as
//! `model.layers.3.self_attn.q_proj`:
//! - `target_modules` a string: regex full match; a list: exact name or `key.endswith("." + t)`;
//!   `"all-linear"`: every linear layer except `lm_head`; absent: Llama's `["q_proj", "v_proj"]`;
//! - `exclude_modules`: the same rules, removing matches;
//! - `layers_to_transform`: the layer index (`.*\.<layers_pattern>\.(\d+)\.`, default
//!   `.*\.[^.]*\.(\d+)\.`) must be listed;
//! - `rank_pattern`/`alpha_pattern`: the first pattern `p` (file order: PEFT sorts keys) with
//!   `(.*\.)?(p)$` matching the whole key sets `r`/`alpha` of that module.

use crate::ops::lora::LoraOpConfig;
use crate::{Error, Result};
use regex::Regex;
use serde_json::{json, Map, Value};
use std::path::Path;

/// `target_modules` / `exclude_modules`.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Exact names or dotted suffixes.
    List(Vec<String>),
    /// A regex that must match the whole module key.
    Regex(String),
    /// Every linear layer but the output layer.
    AllLinear,
}

/// `init_lora_weights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraInit {
    /// `true`: `A ~ U(±1/√in)` (kaiming-uniform, a = √5), `B = 0`.
    Default,
    /// `"gaussian"`: `A ~ N(0, (1/r)²)`, `B = 0`.
    Gaussian,
    /// `false`: both as `nn.Linear`'s default init, `A ~ U(±1/√in)`, `B ~ U(±1/√r)`.
    NoInit,
}

/// The LoRA settings of an adapter (the subset of PEFT's `LoraConfig` that lorafuse supports).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f32,
    pub lora_dropout: f32,
    pub target_modules: TargetModules,
    pub exclude_modules: Option<TargetModules>,
    pub use_rslora: bool,
    pub init_lora_weights: LoraInit,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Option<Vec<String>>,
    /// `(pattern, r)` in file order.
    pub rank_pattern: Vec<(String, usize)>,
    /// `(pattern, alpha)` in file order.
    pub alpha_pattern: Vec<(String, f32)>,
    pub base_model_name_or_path: Option<String>,
    /// Seed for initialization and the dropout masks (not part of PEFT's file).
    pub seed: u64,
}

impl Default for LoraConfig {
    /// PEFT's defaults (`r = 8`, `alpha = 8`, no dropout, q/v projections).
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: TargetModules::List(vec!["q_proj".into(), "v_proj".into()]),
            exclude_modules: None,
            use_rslora: false,
            init_lora_weights: LoraInit::Default,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            base_model_name_or_path: None,
            seed: 0,
        }
    }
}

/// Full-key regex match, as Python's `re.fullmatch`.
fn full_match(pattern: &str, key: &str, field: &str) -> Result<bool> {
    let re = Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| Error::config(field, format!("bad regex `{pattern}`: {e}")))?;
    Ok(re.is_match(key))
}

impl TargetModules {
    fn matches(&self, key: &str, is_output_layer: bool, field: &str) -> Result<bool> {
        Ok(match self {
            TargetModules::AllLinear => !is_output_layer,
            TargetModules::Regex(p) => full_match(p, key, field)?,
            TargetModules::List(l) => l.iter().any(|t| key == t || key.ends_with(&format!(".{t}"))),
        })
    }
    fn from_json(v: &Value, field: &str, file: &str) -> Result<Option<Self>> {
        Ok(match v {
            Value::Null => None,
            Value::String(s) if s == "all-linear" => Some(TargetModules::AllLinear),
            Value::String(s) => Some(TargetModules::Regex(s.clone())),
            Value::Array(a) => Some(TargetModules::List(
                a.iter()
                    .map(|x| {
                        x.as_str()
                            .map(String::from)
                            .ok_or_else(|| field_err(file, field, format!("expected strings, got {x}")))
                    })
                    .collect::<Result<_>>()?,
            )),
            other => return Err(field_err(file, field, format!("expected a list or a string, got {other}"))),
        })
    }
    fn to_json(&self) -> Value {
        match self {
            TargetModules::AllLinear => json!("all-linear"),
            TargetModules::Regex(s) => json!(s),
            TargetModules::List(l) => json!(l),
        }
    }
}

fn field_err(file: &str, field: &str, msg: impl Into<String>) -> Error {
    Error::format(format!("{file}: field `{field}`"), msg)
}

impl LoraConfig {
    /// `r` and `alpha` of module `key`, or `None` when the module is not adapted.
    /// `is_output_layer` marks `lm_head` (excluded by `all-linear`).
    pub fn module(&self, key: &str, is_output_layer: bool) -> Result<Option<(usize, f32)>> {
        if !self.target_modules.matches(key, is_output_layer, "target_modules")? {
            return Ok(None);
        }
        if let Some(ex) = &self.exclude_modules {
            if ex.matches(key, is_output_layer, "exclude_modules")? {
                return Ok(None);
            }
        }
        if let Some(layers) = &self.layers_to_transform {
            let patterns: Vec<String> = match &self.layers_pattern {
                Some(p) if !p.is_empty() => p.iter().map(|l| format!(r".*\.{l}\.(\d+)\.")).collect(),
                _ => vec![r".*\.[^.]*\.(\d+)\.".to_string()],
            };
            let mut idx = None;
            for p in &patterns {
                let re = Regex::new(&format!("^{p}")).map_err(|e| Error::config("layers_pattern", e.to_string()))?;
                if let Some(c) = re.captures(key) {
                    idx = c[1].parse::<usize>().ok();
                    break;
                }
            }
            match idx {
                Some(i) if layers.contains(&i) => {}
                _ => return Ok(None),
            }
        }
        let pattern_hit = |p: &str, field: &str| full_match(&format!(r"(.*\.)?({p})"), key, field);
        let mut r = self.r;
        for (p, v) in &self.rank_pattern {
            if pattern_hit(p, "rank_pattern")? {
                r = *v;
                break;
            }
        }
        let mut alpha = self.lora_alpha;
        for (p, v) in &self.alpha_pattern {
            if pattern_hit(p, "alpha_pattern")? {
                alpha = *v;
                break;
            }
        }
        Ok(Some((r, alpha)))
    }

    /// The op-level config of a module with rank `r` and `alpha`.
    pub fn op_config(&self, r: usize, alpha: f32) -> LoraOpConfig {
        LoraOpConfig { r, alpha, dropout: self.lora_dropout, use_rslora: self.use_rslora, seed: self.seed }
    }

    /// Checks value ranges.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 || self.rank_pattern.iter().any(|(_, r)| *r == 0) {
            return Err(Error::config("r", "LoRA rank must be positive"));
        }
        if self.layers_to_transform.is_some() && matches!(self.target_modules, TargetModules::Regex(_)) {
            // As PEFT: "`layers_to_transform` cannot be used when `target_modules` is a str."
            return Err(Error::config("layers_to_transform", "cannot be used when target_modules is a regex string"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::config("lora_dropout", format!("{} is not in [0, 1)", self.lora_dropout)));
        }
        Ok(())
    }

    /// Reads an `adapter_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses `adapter_config.json` text: every key but `peft_type` is optional, unknown keys
    /// are ignored, features lorafuse does not implement are errors naming the field.
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::format(file, format!("invalid JSON: {e}")))?;
        let Value::Object(o) = v else { return Err(Error::format(file, "not a JSON object")) };
        let get = |k: &str| o.get(k).unwrap_or(&Value::Null);
        match get("peft_type") {
            Value::String(s) if s == "LORA" => {}
            Value::Null => return Err(field_err(file, "peft_type", "missing")),
            other => return Err(field_err(file, "peft_type", format!("{other} is not supported (only \"LORA\")"))),
        }
        let d = LoraConfig::default();
        let num = |k: &str| -> Result<Option<f64>> {
            match get(k) {
                Value::Null => Ok(None),
                x => x.as_f64().map(Some).ok_or_else(|| field_err(file, k, format!("expected a number, got {x}"))),
            }
        };
        let flag = |k: &str| -> Result<bool> {
            match get(k) {
                Value::Null => Ok(false),
                x => x.as_bool().ok_or_else(|| field_err(file, k, format!("expected true/false, got {x}"))),
            }
        };
        for k in ["use_dora", "lora_bias", "fan_in_fan_out", "use_qalora"] {
            if flag(k)? {
                return Err(field_err(file, k, "true is not supported by lorafuse"));
            }
        }
        if let Some(b) = get("bias").as_str().filter(|b| *b != "none") {
            return Err(field_err(file, "bias", format!("\"{b}\" is not supported (only \"none\")")));
        }
        if !get("modules_to_save").is_null() {
            return Err(field_err(file, "modules_to_save", "not supported by lorafuse"));
        }
        let r = num("r")?.map_or(d.r, |x| x as usize);
        let init_lora_weights = match get("init_lora_weights") {
            Value::Null | Value::Bool(true) => LoraInit::Default,
            Value::Bool(false) => LoraInit::NoInit,
            Value::String(s) if s == "gaussian" => LoraInit::Gaussian,
            // Other modes only change how training starts; a saved adapter loads the same.
            Value::String(_) => LoraInit::Default,
            other => return Err(field_err(file, "init_lora_weights", format!("unexpected {other}"))),
        };
        let layers_to_transform = match get("layers_to_transform") {
            Value::Null => None,
            Value::Number(n) => {
                Some(vec![n.as_u64().ok_or_else(|| field_err(file, "layers_to_transform", "negative"))? as usize])
            }
            Value::Array(a) => Some(
                a.iter()
                    .map(|x| {
                        x.as_u64()
                            .map(|x| x as usize)
                            .ok_or_else(|| field_err(file, "layers_to_transform", format!("bad index {x}")))
                    })
                    .collect::<Result<_>>()?,
            ),
            other => {
                return Err(field_err(file, "layers_to_transform", format!("expected an int or a list, got {other}")))
            }
        };
        let layers_pattern = match get("layers_pattern") {
            Value::Null => None,
            Value::String(s) => Some(vec![s.clone()]),
            Value::Array(a) => Some(a.iter().filter_map(|x| x.as_str().map(String::from)).collect()),
            other => return Err(field_err(file, "layers_pattern", format!("unexpected {other}"))),
        };
        let pattern = |k: &str| -> Result<Vec<(String, f64)>> {
            match get(k) {
                Value::Null => Ok(Vec::new()),
                Value::Object(m) => m
                    .iter()
                    .map(|(p, v)| {
                        v.as_f64()
                            .map(|x| (p.clone(), x))
                            .ok_or_else(|| field_err(file, &format!("{k}.{p}"), "expected a number"))
                    })
                    .collect(),
                other => Err(field_err(file, k, format!("expected an object, got {other}"))),
            }
        };
        let cfg = LoraConfig {
            r,
            lora_alpha: num("lora_alpha")?.map_or(d.lora_alpha, |x| x as f32),
            lora_dropout: num("lora_dropout")?.map_or(0.0, |x| x as f32),
            target_modules: TargetModules::from_json(get("target_modules"), "target_modules", file)?
                .unwrap_or(d.target_modules),
            exclude_modules: TargetModules::from_json(get("exclude_modules"), "exclude_modules", file)?,
            use_rslora: flag("use_rslora")?,
            init_lora_weights,
            layers_to_transform,
            layers_pattern,
            rank_pattern: pattern("rank_pattern")?.into_iter().map(|(p, v)| (p, v as usize)).collect(),
            alpha_pattern: pattern("alpha_pattern")?.into_iter().map(|(p, v)| (p, v as f32)).collect(),
            base_model_name_or_path: get("base_model_name_or_path").as_str().map(String::from),
            seed: 0,
        };
        cfg.validate().map_err(|e| Error::format(file, e.to_string()))?;
        Ok(cfg)
    }

    /// `adapter_config.json` as PEFT 0.21 writes it: every LoRA key, sorted, 2-space indent,
    /// `inference_mode: true`, `task_type: "CAUSAL_LM"`.
    pub fn to_json(&self) -> String {
        let init = match self.init_lora_weights {
            LoraInit::Default => json!(true),
            LoraInit::NoInit => json!(false),
            LoraInit::Gaussian => json!("gaussian"),
        };
        // Shortest f32 text, so 0.05 is written as 0.05 and not 0.05000000074505806.
        let num = |x: f32| {
            if x.fract() == 0.0 {
                json!(x as i64)
            } else {
                json!(x.to_string().parse::<f64>().unwrap_or(x as f64))
            }
        };
        let mut m = Map::new();
        let fields: Vec<(&str, Value)> = vec![
            ("alora_invocation_tokens", Value::Null),
            ("alpha_pattern", Value::Object(self.alpha_pattern.iter().map(|(p, a)| (p.clone(), num(*a))).collect())),
            ("arrow_config", Value::Null),
            ("auto_mapping", Value::Null),
            ("base_model_name_or_path", json!(self.base_model_name_or_path)),
            ("bias", json!("none")),
            ("corda_config", Value::Null),
            ("ensure_weight_tying", json!(false)),
            ("eva_config", Value::Null),
            ("exclude_modules", self.exclude_modules.as_ref().map_or(Value::Null, |t| t.to_json())),
            ("fan_in_fan_out", json!(false)),
            ("inference_mode", json!(true)),
            ("init_lora_weights", init),
            ("kasa_config", Value::Null),
            ("layer_replication", Value::Null),
            ("layers_pattern", json!(self.layers_pattern)),
            ("layers_to_transform", json!(self.layers_to_transform)),
            ("loftq_config", json!({})),
            ("lora_alpha", num(self.lora_alpha)),
            ("lora_bias", json!(false)),
            ("lora_dropout", if self.lora_dropout == 0.0 { json!(0.0) } else { num(self.lora_dropout) }),
            ("lora_ga_config", Value::Null),
            ("megatron_config", Value::Null),
            ("megatron_core", json!("megatron.core")),
            ("modules_to_save", Value::Null),
            ("monteclora_config", Value::Null),
            ("peft_type", json!("LORA")),
            ("qalora_group_size", json!(16)),
            ("r", json!(self.r)),
            ("rank_pattern", Value::Object(self.rank_pattern.iter().map(|(p, r)| (p.clone(), json!(r))).collect())),
            ("revision", Value::Null),
            ("target_modules", self.target_modules.to_json()),
            ("target_parameters", Value::Null),
            ("task_type", json!("CAUSAL_LM")),
            ("trainable_token_indices", Value::Null),
            ("use_bdlora", Value::Null),
            ("use_dora", json!(false)),
            ("use_qalora", json!(false)),
            ("use_rslora", json!(self.use_rslora)),
            ("velora_config", Value::Null),
        ];
        for (k, v) in fields {
            m.insert(k.to_string(), v);
        }
        serde_json::to_string_pretty(&Value::Object(m)).expect("JSON values serialize")
    }
}
