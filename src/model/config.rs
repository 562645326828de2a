//! `config.json` of a Hugging Face Llama checkpoint, in the transformers v4 form (`rope_theta`,
//! `rope_scaling`, `torch_dtype`) or the v5 form (`rope_parameters`, `dtype`).

use crate::ops::rope::RopeScaling;
use crate::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// Weight dtype of a checkpoint (what `save` writes back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    BF16,
    F16,
}

impl WeightDtype {
    /// From a `torch_dtype`/`dtype` string (`"float32"`, `"bfloat16"`, `"float16"`).
    pub fn from_torch(s: &str) -> Option<Self> {
        match s.trim_start_matches("torch.") {
            "float32" | "float" => Some(WeightDtype::F32),
            "bfloat16" => Some(WeightDtype::BF16),
            "float16" | "half" => Some(WeightDtype::F16),
            _ => None,
        }
    }
    pub fn torch_name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "float32",
            WeightDtype::BF16 => "bfloat16",
            WeightDtype::F16 => "float16",
        }
    }
}

/// The fields of `LlamaConfig` the model uses, with transformers' defaults.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Default: `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Default: `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    /// `rope_type: "llama3"` parameters, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// `rope_type: "linear"` factor, if any (positions divided by it).
    pub rope_linear_factor: Option<f32>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// `dtype` (v5) or `torch_dtype` (v4), if given.
    pub dtype: Option<WeightDtype>,
    pub eos_token_id: Option<u32>,
    /// The parsed JSON, written back unchanged by `save_pretrained`.
    pub raw: Map<String, Value>,
}

struct Fields<'a> {
    file: String,
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn err(&self, field: &str, msg: impl std::fmt::Display) -> Error {
        Error::format(format!("{}: field `{field}`", self.file), msg.to_string())
    }
    fn usize_opt(&self, field: &str) -> Result<Option<usize>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.err(field, format!("expected a non-negative integer, got {v}"))),
        }
    }
    fn usize_req(&self, field: &str) -> Result<usize> {
        match self.usize_opt(field)? {
            Some(0) => Err(self.err(field, "must be positive")),
            Some(v) => Ok(v),
            None => Err(self.err(field, "missing")),
        }
    }
    fn f32_opt(&self, obj: &Map<String, Value>, field: &str) -> Result<Option<f32>> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                v.as_f64().map(|x| Some(x as f32)).ok_or_else(|| self.err(field, format!("expected a number, got {v}")))
            }
        }
    }
    fn bool_opt(&self, field: &str, default: bool) -> Result<bool> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(field, format!("expected true/false, got {v}"))),
        }
    }
}

impl LlamaConfig {
    /// Reads and validates `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses the JSON text of a `config.json`; `file` names it in errors.
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::format(file, format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = v else { return Err(Error::format(file, "not a JSON object")) };
        let f = Fields { file: file.to_string(), obj: &obj };
        if let Some(arch) = obj.get("architectures").and_then(|a| a.as_array()) {
            if let Some(bad) = arch.iter().filter_map(|a| a.as_str()).find(|a| *a != "LlamaForCausalLM") {
                return Err(f.err("architectures", format!("unsupported architecture `{bad}` (only LlamaForCausalLM)")));
            }
        }
        if let Some(mt) = obj.get("model_type").and_then(|m| m.as_str()) {
            if mt != "llama" {
                return Err(f.err("model_type", format!("unsupported model type `{mt}` (only llama)")));
            }
        }
        if let Some(act) = obj.get("hidden_act") {
            if act.as_str() != Some("silu") {
                return Err(f.err("hidden_act", format!("unsupported activation {act} (only silu)")));
            }
        }
        let hidden = f.usize_req("hidden_size")?;
        let heads = f.usize_req("num_attention_heads")?;
        let kv = f.usize_opt("num_key_value_heads")?.unwrap_or(heads);
        if kv == 0 || heads % kv != 0 {
            return Err(f.err("num_key_value_heads", format!("{kv} does not divide num_attention_heads {heads}")));
        }
        let head_dim = f.usize_opt("head_dim")?.unwrap_or(hidden / heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(f.err("head_dim", format!("{head_dim} must be positive and even")));
        }
        // v5: rope_parameters {rope_theta, rope_type, ...}; v4: rope_theta + rope_scaling.
        let (rope_field, rope) = match (obj.get("rope_parameters"), obj.get("rope_scaling")) {
            (Some(Value::Object(p)), _) => ("rope_parameters", Some(p)),
            (_, Some(Value::Object(p))) => ("rope_scaling", Some(p)),
            (Some(Value::Null) | None, Some(Value::Null) | None) => ("rope_scaling", None),
            (Some(v), _) | (_, Some(v)) => return Err(f.err("rope_parameters", format!("expected an object, got {v}"))),
        };
        let empty = Map::new();
        let rp = rope.unwrap_or(&empty);
        let rope_theta = f.f32_opt(rp, "rope_theta")?.or(f.f32_opt(&obj, "rope_theta")?).unwrap_or(10000.0);
        let rope_type = rp.get("rope_type").or(rp.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
        let max_pos = f.usize_opt("max_position_embeddings")?.unwrap_or(2048);
        let num = |k: &str| -> Result<f32> {
            f.f32_opt(rp, k)?.ok_or_else(|| f.err(&format!("{rope_field}.{k}"), "missing (needed by this rope_type)"))
        };
        let (mut rope_scaling, mut rope_linear_factor) = (None, None);
        match rope_type {
            "default" => {}
            "llama3" => {
                rope_scaling = Some(RopeScaling {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: f
                        .f32_opt(rp, "original_max_position_embeddings")?
                        .unwrap_or(max_pos as f32),
                })
            }
            "linear" => rope_linear_factor = Some(num("factor")?),
            other => {
                return Err(f.err(
                    &format!("{rope_field}.rope_type"),
                    format!("unsupported rope type `{other}` (default, linear, llama3)"),
                ))
            }
        }
        let dtype_field = if obj.contains_key("dtype") { "dtype" } else { "torch_dtype" };
        let dtype = match obj.get(dtype_field) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => {
                Some(WeightDtype::from_torch(s).ok_or_else(|| f.err(dtype_field, format!("unsupported dtype `{s}`")))?)
            }
            Some(v) => return Err(f.err(dtype_field, format!("expected a string, got {v}"))),
        };
        let eos_token_id = match obj.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| x as u32),
            Some(Value::Array(a)) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
            _ => None,
        };
        Ok(LlamaConfig {
            vocab_size: f.usize_req("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: f.usize_req("intermediate_size")?,
            num_hidden_layers: f.usize_req("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: f.f32_opt(&obj, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            rope_linear_factor,
            max_position_embeddings: max_pos,
            tie_word_embeddings: f.bool_opt("tie_word_embeddings", false)?,
            attention_bias: f.bool_opt("attention_bias", false)?,
            mlp_bias: f.bool_opt("mlp_bias", false)?,
            dtype,
            eos_token_id,
            raw: obj.clone(),
        })
    }
}
