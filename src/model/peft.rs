//! PEFT adapter files both ways, merge/unmerge, and saving a full HF checkpoint.
//!
//! Tensor names (PEFT 0.21, adapter name removed): `base_model.model.<module>.lora_A.weight`
//! `[r, in]` and `base_model.model.<module>.lora_B.weight` `[out, r]`, F32, with
//! `{"format": "pt"}` metadata.

use super::base_weight::LinearWeight;
use super::config::WeightDtype;
use super::llama::Llama;
use super::lora::LoraConfig;
use super::weights::{encode_tensors, write_safetensors, TensorFiles};
use crate::ops::lora::merge_into;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// `adapter_config.json`.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// `adapter_model.safetensors`.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// PEFT's key for `lora_A` / `lora_B` of `module`.
pub fn adapter_key(module: &str, which: char) -> String {
    format!("base_model.model.{module}.lora_{which}.weight")
}

/// What [`Llama::load_adapter`] found.
#[derive(Debug, Clone, Default)]
pub struct AdapterReport {
    /// Tensors loaded.
    pub loaded: Vec<String>,
    /// Adapter tensors the file lacks (their modules keep PEFT's initial values).
    pub missing: Vec<String>,
    /// Keys in the file that are not LoRA tensors of this model (ignored).
    pub ignored: Vec<String>,
}

fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

impl Llama {
    /// Writes `adapter_config.json` and `adapter_model.safetensors` (F32) into `dir`.
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        let cfg = self.lora_config.as_ref().ok_or_else(|| Error::config("adapter", "the model has no LoRA adapter"))?;
        mkdir(dir)?;
        let mut tensors = BTreeMap::new();
        for lin in self.linears() {
            if let Some(l) = &lin.lora {
                tensors.insert(adapter_key(&lin.name, 'A'), (vec![l.op.r, lin.in_features], l.a.as_slice()));
                tensors.insert(adapter_key(&lin.name, 'B'), (vec![lin.out_features, l.op.r], l.b.as_slice()));
            }
        }
        write_safetensors(&dir.join(ADAPTER_WEIGHTS), &tensors, WeightDtype::F32)?;
        let path = dir.join(ADAPTER_CONFIG);
        std::fs::write(&path, cfg.to_json()).map_err(|e| Error::io(&path, e))
    }

    /// Loads a PEFT adapter directory: injects LoRA per its `adapter_config.json`, then copies
    /// every `lora_A`/`lora_B` tensor found (F32/BF16/F16). Shapes must match the base; missing
    /// tensors keep their initial values; unknown keys are ignored.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<AdapterReport> {
        let cfg = LoraConfig::from_file(&dir.join(ADAPTER_CONFIG))?;
        let wpath = dir.join(ADAPTER_WEIGHTS);
        let files = TensorFiles::open(std::slice::from_ref(&wpath))?;
        self.add_lora(&cfg)?;
        let mut report = AdapterReport::default();
        let mut known = std::collections::HashSet::new();
        for lin in self.linears_mut() {
            let Some(l) = lin.lora.as_mut() else { continue };
            for (which, shape) in [('A', [l.op.r, lin.in_features]), ('B', [lin.out_features, l.op.r])] {
                let key = adapter_key(&lin.name, which);
                known.insert(key.clone());
                if !files.contains(&key) {
                    report.missing.push(key);
                    continue;
                }
                let data = files.get_shaped(&key, &shape).map_err(|e| match e {
                    Error::Format { what, msg } => {
                        Error::format(what, format!("{msg} (adapter does not fit the base model)"))
                    }
                    e => e,
                })?;
                *(if which == 'A' { &mut l.a } else { &mut l.b }) = Arc::new(data);
                report.loaded.push(key);
            }
        }
        for name in files.names() {
            let is_lora = name.contains(".lora_A.") || name.contains(".lora_B.");
            if is_lora && !known.contains(name) {
                return Err(Error::format(
                    format!("{}: tensor `{name}`", wpath.display()),
                    "no such adapted module in the base model under this adapter_config.json",
                ));
            }
            if !known.contains(name) {
                report.ignored.push(name.to_string());
            }
        }
        report.ignored.sort();
        Ok(report)
    }

    fn merge_sign(&mut self, sign: f32) -> Result<()> {
        for lin in self.linears_mut() {
            if let Some(l) = &lin.lora {
                let (n, k) = (lin.out_features, lin.in_features);
                // make_mut copies a weight still shared (e.g. tied embeddings), never the adapter.
                // An NF4 weight is dequantized first and stays f32 (see `LinearWeight::f32_mut`).
                merge_into(lin.weight.f32_mut()?.as_mut_slice(), &l.a, &l.b, n, k, &l.op, sign)?;
            }
        }
        Ok(())
    }

    /// `W += s·B·A` for every adapted layer; the LoRA branch is then skipped.
    pub fn merge(&mut self) -> Result<()> {
        if self.merged {
            return Err(Error::config("merge", "adapter already merged"));
        }
        self.merge_sign(1.0)?;
        self.merged = true;
        Ok(())
    }

    /// Undoes [`Llama::merge`] (`W −= s·B·A`).
    pub fn unmerge(&mut self) -> Result<()> {
        if !self.merged {
            return Err(Error::config("unmerge", "adapter is not merged"));
        }
        self.merge_sign(-1.0)?;
        self.merged = false;
        Ok(())
    }

    /// Saves a full HF checkpoint (`config.json` + `model.safetensors`, the checkpoint's
    /// dtype). The base weights are saved as they are: merge first to bake an adapter in. NF4
    /// weights are written as bitsandbytes does (a bnb-4bit checkpoint with a
    /// `quantization_config`, which transformers loads with bitsandbytes installed); call
    /// [`Llama::dequantize_linears`] first for a dense checkpoint.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        if self.lora_config.is_some() && !self.merged {
            return Err(Error::config(
                "save_pretrained",
                "the model has an unmerged adapter: merge it or save it with save_adapter",
            ));
        }
        mkdir(dir)?;
        let c = &self.config;
        let mut t: BTreeMap<String, (Vec<usize>, &[f32])> = BTreeMap::new();
        let mut nf4 = Vec::new();
        t.insert("model.embed_tokens.weight".into(), (vec![c.vocab_size, c.hidden_size], &self.embed_tokens));
        t.insert("model.norm.weight".into(), (vec![c.hidden_size], &self.norm));
        for (i, l) in self.layers.iter().enumerate() {
            t.insert(format!("model.layers.{i}.input_layernorm.weight"), (vec![c.hidden_size], &l.input_layernorm));
            t.insert(
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                (vec![c.hidden_size], &l.post_attention_layernorm),
            );
        }
        for lin in self.linears() {
            if lin.name == "lm_head" && c.tie_word_embeddings {
                continue;
            }
            let key = format!("{}.weight", lin.name);
            match &lin.weight {
                LinearWeight::F32(w) => {
                    t.insert(key, (vec![lin.out_features, lin.in_features], w));
                }
                LinearWeight::Nf4(q) => nf4.extend(q.to_safetensors_entries(&key)),
            }
            if let Some(b) = &lin.bias {
                t.insert(format!("{}.bias", lin.name), (vec![lin.out_features], b));
            }
        }
        let quant_config = nf4.first().map(|_| self.bnb_quantization_config());
        let mut entries = encode_tensors(&t, self.dtype);
        entries.extend(nf4);
        crate::quant::checkpoint::write_safetensors(&dir.join("model.safetensors"), &entries)?;
        let mut raw = c.raw.clone();
        match quant_config {
            Some(q) => raw.insert("quantization_config".into(), q),
            None => raw.remove("quantization_config"),
        };
        let key = if raw.contains_key("torch_dtype") { "torch_dtype" } else { "dtype" };
        raw.insert(key.into(), self.dtype.torch_name().into());
        let path = dir.join("config.json");
        let text =
            serde_json::to_string_pretty(&raw).map_err(|e| Error::format(path.display().to_string(), e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    }
}
