//! Frozen base weights of the linear layers: f32, or NF4 for QLoRA.
//!
//! An NF4 weight ([`Nf4Tensor`]: blocksize 64 and double quantization by default, as
//! `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
//! bnb_4bit_use_double_quant=True)`) stays packed; each use dequantizes it into a transient f32
//! buffer — bit-exact with bitsandbytes' `dequantize_4bit` in the weight's dtype — that lives
//! only for that one op: the forward drops it after its GEMM, and the backward (on a recording
//! tape) dequantizes again for `dx = dy·W` instead of keeping it. So at most one layer's dense
//! weight exists at a time, as in bitsandbytes' `Linear4bit`.
//!
//! Which weights: every linear layer of the decoder (q/k/v/o, gate/up/down) but not `lm_head`,
//! embeddings or norms — what transformers quantizes (it skips the output embedding).

use super::llama::Llama;
use super::weights::TensorFiles;
use crate::autograd::functions as F;
use crate::autograd::{Tape, Var};
use crate::ops::lora::LoraOpConfig;
use crate::quant::checkpoint::QUANT_STATE_NF4;
use crate::quant::{Absmax, Nf4Bytes, Nf4Config, Nf4Tensor, QuantDtype};
use crate::{Error, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The frozen weight `W [out, in]` of a linear layer.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// Dense f32 (checkpoints in BF16/F16 are widened on load).
    F32(Arc<Vec<f32>>),
    /// NF4, dequantized per use.
    Nf4(Arc<Nf4Tensor>),
}

impl LinearWeight {
    /// Reads weight `name` (`[out_f, in_f]`): a bnb-4bit NF4 weight (one with a
    /// `quant_state.bitsandbytes__nf4` entry) as is, a float weight widened to f32 — or quantized
    /// to NF4 when `files` asks for it ([`TensorFiles::quantize_linears`]) and it is not
    /// `lm_head`. Errors name the file and tensor.
    pub fn load(files: &TensorFiles, name: &str, out_f: usize, in_f: usize) -> Result<Self> {
        let at = |key: &str| format!("{}: tensor `{key}`", files.location(key));
        let qs_key = format!("{name}.{QUANT_STATE_NF4}");
        let fp4_key = format!("{name}.quant_state.bitsandbytes__fp4");
        if files.contains(&qs_key) || files.contains(&fp4_key) {
            // The weight's tensors (packed, statistics, maps, quant state), read once.
            let keys =
                ["", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"].map(|s| format!("{name}{s}"));
            let mut parts = HashMap::new();
            for k in keys.iter().chain([&qs_key, &fp4_key]) {
                if let Some(t) = files.raw(k)? {
                    parts.insert(k.as_str(), t);
                }
            }
            let get = |k: &str| parts.get(k).and_then(|t| TensorView::new(t.dtype, t.shape.clone(), &t.data).ok());
            let t = Nf4Tensor::from_lookup(name, &get).map_err(|e| Error::format(at(&qs_key), e.to_string()))?;
            if t.shape != [out_f, in_f] {
                return Err(Error::format(at(&qs_key), format!("shape {:?}, expected {:?}", t.shape, [out_f, in_f])));
            }
            return Ok(LinearWeight::Nf4(Arc::new(t)));
        }
        if let Some((dtype, shape)) =
            files.info(name).filter(|(d, _)| !matches!(d, Dtype::F32 | Dtype::BF16 | Dtype::F16))
        {
            return Err(Error::format(
                at(&qs_key),
                format!(
                    "missing: `{name}` is {dtype:?} {shape:?} (bitsandbytes 4-bit packed data?) and has no quant state"
                ),
            ));
        }
        let (data, shape, dtype) = files.get(name)?;
        if shape != [out_f, in_f] {
            return Err(Error::format(at(name), format!("shape {shape:?}, expected {:?}", [out_f, in_f])));
        }
        let mut w = LinearWeight::F32(Arc::new(data));
        if let Some(cfg) = files.quantize_config().filter(|_| name != "lm_head.weight") {
            let dtype = match dtype {
                Dtype::BF16 => QuantDtype::BF16,
                Dtype::F16 => QuantDtype::F16,
                _ => QuantDtype::F32,
            };
            w.quantize(cfg, dtype, &[out_f, in_f]).map_err(|e| Error::format(at(name), e.to_string()))?;
        }
        Ok(w)
    }

    /// Replaces an f32 weight by its NF4 quantization (a no-op on NF4). `dtype` is the dtype the
    /// values were stored in (exactly representable in it): bitsandbytes records it and
    /// dequantizes back to it, so a BF16 checkpoint's weights dequantize to BF16 values.
    pub fn quantize(&mut self, cfg: Nf4Config, dtype: QuantDtype, shape: &[usize]) -> Result<()> {
        if let LinearWeight::F32(w) = self {
            // Widening is exact, so quantizing the f32 values is quantizing the stored ones.
            let mut t = Nf4Tensor::quantize(w.as_slice(), shape, cfg)?;
            t.dtype = dtype;
            *self = LinearWeight::Nf4(Arc::new(t));
        }
        Ok(())
    }

    /// The dense f32 values: the shared buffer, or a fresh dequantization of NF4.
    pub fn dense(&self) -> Result<Arc<Vec<f32>>> {
        match self {
            LinearWeight::F32(w) => Ok(w.clone()),
            LinearWeight::Nf4(t) => dequantize(t),
        }
    }

    /// The f32 buffer for in-place edits (merging an adapter): an NF4 weight is dequantized and
    /// becomes f32 from then on; a shared f32 buffer is copied first.
    pub fn f32_mut(&mut self) -> Result<&mut Vec<f32>> {
        if let LinearWeight::Nf4(t) = self {
            *self = LinearWeight::F32(dequantize(t)?);
        }
        match self {
            LinearWeight::F32(w) => Ok(Arc::make_mut(w)),
            LinearWeight::Nf4(_) => unreachable!("converted above"),
        }
    }

    /// The NF4 tensor, if quantized.
    pub fn nf4(&self) -> Option<&Nf4Tensor> {
        match self {
            LinearWeight::Nf4(t) => Some(t),
            LinearWeight::F32(_) => None,
        }
    }

    /// Number of weights.
    pub fn numel(&self) -> usize {
        match self {
            LinearWeight::F32(w) => w.len(),
            LinearWeight::Nf4(t) => t.numel(),
        }
    }

    /// Bytes held in memory (NF4: packed codes, statistics and tables).
    pub fn resident_bytes(&self) -> u64 {
        match self {
            LinearWeight::F32(w) => 4 * w.len() as u64,
            LinearWeight::Nf4(t) => Nf4Bytes::measure(t).total(),
        }
    }

    /// `y = x·Wᵀ + bias` on the tape (see [`F::linear`]).
    pub fn linear(&self, tape: &Tape, x: &Var, bias: Option<&Arc<Vec<f32>>>, n: usize) -> Result<Var> {
        match self {
            LinearWeight::F32(w) => F::linear(tape, x, w, bias, n),
            LinearWeight::Nf4(t) => F::linear(tape, x, t, bias, n),
        }
    }

    /// The LoRA linear op with trainable `a`, `b` (see [`F::lora_linear`]).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_linear(
        &self,
        tape: &Tape,
        x: &Var,
        bias: Option<&Arc<Vec<f32>>>,
        a: &Var,
        b: &Var,
        cfg: LoraOpConfig,
        offset: u64,
        train: bool,
    ) -> Result<Var> {
        match self {
            LinearWeight::F32(w) => F::lora_linear(tape, x, w, bias, a, b, cfg, offset, train),
            LinearWeight::Nf4(t) => F::lora_linear(tape, x, t, bias, a, b, cfg, offset, train),
        }
    }
}

/// Each use dequantizes into a transient buffer, bit-exact with bitsandbytes.
impl F::FrozenWeight for Nf4Tensor {
    fn with_dense<R>(&self, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        f(&dequantize(self)?)
    }
}

/// A fresh f32 buffer with `t`'s values as bitsandbytes dequantizes them.
fn dequantize(t: &Nf4Tensor) -> Result<Arc<Vec<f32>>> {
    let mut out = vec![0f32; t.numel()];
    t.dequantize_f32_into(&mut out)?;
    Ok(Arc::new(out))
}

/// Resident bytes of the model's linear weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct BaseWeightBytes {
    /// Weights of the NF4 linear layers.
    pub nf4_weights: u64,
    /// Bytes those NF4 weights occupy (packed codes, statistics, tables).
    pub nf4_bytes: u64,
    /// Bytes of the f32 linear weights (`lm_head` included unless tied to the embeddings).
    pub f32_bytes: u64,
}

impl BaseWeightBytes {
    /// Bits per NF4 weight (4.127 + tables for blocksize 64 with double quantization).
    pub fn nf4_bits_per_weight(&self) -> f64 {
        8.0 * self.nf4_bytes as f64 / self.nf4_weights.max(1) as f64
    }
}

impl Llama {
    /// Loads a Hugging Face directory as [`Llama::from_dir`] does, quantizing the decoder's
    /// float linear weights to NF4 with `cfg` as they are read (QLoRA). A bnb-4bit checkpoint
    /// loads as NF4 either way.
    pub fn from_dir_quantized(dir: &Path, cfg: Nf4Config) -> Result<Self> {
        let config = super::LlamaConfig::from_file(&dir.join("config.json"))?;
        let files = TensorFiles::open_dir(dir)?.quantize_linears(cfg);
        Self::from_files(config, &files, dir)
    }

    /// Quantizes the decoder's linear weights (not `lm_head`) to NF4 in place; their values
    /// count as stored in the model's dtype.
    pub fn quantize_linears(&mut self, cfg: Nf4Config) -> Result<()> {
        let dtype = match self.dtype {
            super::WeightDtype::F32 => QuantDtype::F32,
            super::WeightDtype::BF16 => QuantDtype::BF16,
            super::WeightDtype::F16 => QuantDtype::F16,
        };
        for lin in self.linears_mut().into_iter().filter(|l| l.name != "lm_head") {
            let shape = [lin.out_features, lin.in_features];
            lin.weight.quantize(cfg, dtype, &shape).map_err(|e| Error::format(&lin.name, e.to_string()))?;
        }
        Ok(())
    }

    /// Replaces every NF4 weight by its dequantized f32 values (e.g. before saving a dense
    /// checkpoint).
    pub fn dequantize_linears(&mut self) -> Result<()> {
        for lin in self.linears_mut().into_iter().filter(|l| l.weight.nf4().is_some()) {
            lin.weight.f32_mut()?;
        }
        Ok(())
    }

    /// The `quantization_config` transformers writes for these NF4 weights
    /// (`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", …).to_dict()`).
    pub fn bnb_quantization_config(&self) -> serde_json::Value {
        let double =
            self.linears().iter().filter_map(|l| l.weight.nf4()).any(|t| matches!(t.absmax, Absmax::Double(_)));
        serde_json::json!({
            "_load_in_4bit": true, "_load_in_8bit": false, "bnb_4bit_compute_dtype": self.dtype.torch_name(),
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": double,
            "llm_int8_enable_fp32_cpu_offload": false, "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": null, "llm_int8_threshold": 6.0, "load_in_4bit": true, "load_in_8bit": false,
            "quant_method": "bitsandbytes"
        })
    }

    /// Whether any base weight is NF4.
    pub fn is_quantized(&self) -> bool {
        self.linears().iter().any(|l| l.weight.nf4().is_some())
    }

    /// Resident bytes of the linear weights, NF4 and f32 apart.
    pub fn base_weight_bytes(&self) -> BaseWeightBytes {
        let mut b = BaseWeightBytes::default();
        for lin in self.linears() {
            if lin.name == "lm_head" && self.config.tie_word_embeddings {
                continue;
            }
            match &lin.weight {
                LinearWeight::Nf4(t) => {
                    b.nf4_weights += t.numel() as u64;
                    b.nf4_bytes += lin.weight.resident_bytes();
                }
                LinearWeight::F32(_) => b.f32_bytes += lin.weight.resident_bytes(),
            }
        }
        b
    }
}
