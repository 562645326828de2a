//! bnb-4bit safetensors checkpoints, as transformers writes them (`SPECS.md` B.5).
//!
//! A quantized Linear weight `P.weight` is stored as:
//!
//! | key | dtype, shape |
//! | --- | --- |
//! | `P.weight` | U8 `[ceil(n/2), 1]` packed nibbles (another `quant_storage` dtype: same bytes) |
//! | `P.weight.absmax` | F32 `[nblocks]`, or U8 `[nblocks]` with double quant |
//! | `P.weight.quant_map` | F32 `[16]`, the NF4 table |
//! | `P.weight.nested_absmax` | F32 `[ceil(nblocks/256)]` (double quant only) |
//! | `P.weight.nested_quant_map` | F32 `[256]` (double quant only) |
//! | `P.weight.quant_state.bitsandbytes__nf4` | U8 JSON: `quant_type, blocksize, dtype, shape` (+ `nested_blocksize, nested_dtype, nested_offset`) |
//!
//! Every other tensor (embeddings, norms, `lm_head`, biases) stays in the model dtype.

use super::double_quant::DoubleQuant;
use super::nf4::{Absmax, Nf4Config, Nf4Tensor, NF4_CODE};
use super::{decode_le, Element, QuantDtype};
use crate::{Error, Result};
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Suffix of the JSON quant-state tensor of an NF4 weight.
pub const QUANT_STATE_NF4: &str = "quant_state.bitsandbytes__nf4";
const QUANT_STATE_PREFIX: &str = "quant_state.bitsandbytes__";

/// `quantization_config` of a transformers `config.json` (`BitsAndBytesConfig.to_dict()`); only
/// the fields lorafuse uses, unknown ones are ignored. Defaults are transformers'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BnbQuantConfig {
    /// `"bitsandbytes"` for these checkpoints.
    pub quant_method: String,
    #[serde(default)]
    pub load_in_4bit: bool,
    #[serde(default)]
    pub load_in_8bit: bool,
    /// `"nf4"` or `"fp4"` (transformers' default is `"fp4"`; only NF4 is supported).
    #[serde(default = "default_quant_type")]
    pub bnb_4bit_quant_type: String,
    /// Double quantization of the block scales.
    #[serde(default)]
    pub bnb_4bit_use_double_quant: bool,
    /// Compute dtype (`"bfloat16"`, `"float32"`, …).
    #[serde(default)]
    pub bnb_4bit_compute_dtype: Option<String>,
    /// Storage dtype of the packed weight (`"uint8"` unless FSDP-QLoRA).
    #[serde(default)]
    pub bnb_4bit_quant_storage: Option<String>,
    /// Modules left unquantized besides transformers' defaults.
    #[serde(default)]
    pub llm_int8_skip_modules: Option<Vec<String>>,
}

fn default_quant_type() -> String {
    "fp4".into()
}

impl BnbQuantConfig {
    /// Reads `quantization_config` from a `config.json`; `Ok(None)` when the key is absent.
    pub fn from_config_json(path: &Path) -> Result<Option<Self>> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let what = format!("{}: quantization_config", path.display());
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::format(&what, e.to_string()))?;
        let Some(q) = v.get("quantization_config") else { return Ok(None) };
        let cfg: Self = serde_json::from_value(q.clone()).map_err(|e| Error::format(&what, e.to_string()))?;
        if cfg.quant_method != "bitsandbytes" || !cfg.load_in_4bit {
            return Err(Error::format(
                &what,
                format!(
                    "quant_method {:?} with load_in_4bit={} is not a bitsandbytes 4-bit checkpoint",
                    cfg.quant_method, cfg.load_in_4bit
                ),
            ));
        }
        if cfg.bnb_4bit_quant_type != "nf4" {
            return Err(Error::format(
                &what,
                format!("bnb_4bit_quant_type {:?} is not supported (only nf4)", cfg.bnb_4bit_quant_type),
            ));
        }
        Ok(Some(cfg))
    }
}

/// The non-tensor quant state (`QuantState.as_dict(packed=True)` → JSON bytes).
#[derive(Debug, Clone, Deserialize)]
struct QuantStateJson {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Vec<usize>,
    nested_blocksize: Option<usize>,
    nested_dtype: Option<String>,
    nested_offset: Option<f64>,
}

/// An owned tensor in safetensors terms (dtype, shape, little-endian bytes). Implements
/// [`safetensors::View`], so a list of them can be passed to `safetensors::serialize`.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    fn from_view(v: &TensorView<'_>) -> Self {
        RawTensor { dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data().to_vec() }
    }

    fn f32s(shape: Vec<usize>, v: &[f32]) -> Self {
        RawTensor { dtype: Dtype::F32, shape, data: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
    }

    fn u8s(shape: Vec<usize>, v: &[u8]) -> Self {
        RawTensor { dtype: Dtype::U8, shape, data: v.to_vec() }
    }
}

impl View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Python's `repr(float)` (what `json.dumps` writes): shortest round-trip digits, positional for
/// `1e-4 <= |x| < 1e16` with a trailing `.0` on integers, else `1.5e-05` style.
fn python_float(x: f64) -> String {
    let a = x.abs();
    if x == 0.0 || (1e-4..1e16).contains(&a) {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let s = format!("{x:e}");
        let (mant, exp) = s.split_once('e').expect("LowerExp has an 'e'");
        let (sign, digits) = exp.strip_prefix('-').map_or(("+", exp), |d| ("-", d));
        format!("{mant}e{sign}{digits:0>2}")
    }
}

fn f32_values(v: &TensorView<'_>, what: &str, len: Option<usize>) -> Result<Vec<f32>> {
    if v.dtype() != Dtype::F32 {
        return Err(Error::format(what, format!("dtype {:?}, expected F32", v.dtype())));
    }
    let out: Vec<f32> = decode_le(v.data());
    if let Some(len) = len.filter(|&l| l != out.len()) {
        return Err(Error::format(what, format!("has {} entries, expected {len}", out.len())));
    }
    Ok(out)
}

impl Nf4Tensor {
    /// Reads the NF4 weight `name` (e.g. `"model.layers.0.mlp.down_proj.weight"`) and its quant
    /// state from one safetensors file. Errors name the offending tensor.
    pub fn from_safetensors(st: &SafeTensors<'_>, name: &str) -> Result<Self> {
        Self::from_lookup(name, &|key| st.tensor(key).ok())
    }

    /// As [`Nf4Tensor::from_safetensors`], looking tensors up through `get` (e.g. across shards).
    pub fn from_lookup<'a>(name: &str, get: &dyn Fn(&str) -> Option<TensorView<'a>>) -> Result<Self> {
        let key = |suffix: &str| format!("{name}.{suffix}");
        let need = |suffix: &str| {
            let k = key(suffix);
            get(&k).ok_or_else(|| Error::format(&k, "missing (needed by the NF4 quant state)"))
        };
        let qs_key = key(QUANT_STATE_NF4);
        let Some(qs) = get(&qs_key) else {
            let fp4 = key(&format!("{QUANT_STATE_PREFIX}fp4"));
            if get(&fp4).is_some() {
                return Err(Error::format(&fp4, "quant type \"fp4\" is not supported (only nf4)"));
            }
            return Err(Error::format(&qs_key, "missing: not a bitsandbytes NF4 weight"));
        };
        if qs.dtype() != Dtype::U8 {
            return Err(Error::format(&qs_key, format!("dtype {:?}, expected U8 JSON bytes", qs.dtype())));
        }
        let json: QuantStateJson = serde_json::from_slice(qs.data())
            .map_err(|e| Error::format(&qs_key, format!("bad quant-state JSON: {e}")))?;
        if json.quant_type != "nf4" {
            return Err(Error::format(
                &qs_key,
                format!("quant_type {:?} is not supported (only nf4)", json.quant_type),
            ));
        }
        let dtype = QuantDtype::from_bnb_name(&json.dtype, &qs_key)?;

        let w = get(name).ok_or_else(|| Error::format(name, "missing packed weight"))?;
        let mut t = Nf4Tensor {
            shape: json.shape.clone(),
            blocksize: json.blocksize,
            dtype,
            packed: w.data().to_vec(), // any quant_storage dtype: the bytes are what count
            absmax: Absmax::F32(Vec::new()),
        };
        let nblocks = t.numel().div_ceil(t.blocksize.max(1));
        let absmax_key = key("absmax");
        let absmax = need("absmax")?;
        t.absmax = match json.nested_offset {
            None => Absmax::F32(f32_values(&absmax, &absmax_key, None)?),
            Some(offset) => {
                if absmax.dtype() != Dtype::U8 {
                    return Err(Error::format(
                        &absmax_key,
                        format!("dtype {:?}, expected U8 codes (double quant)", absmax.dtype()),
                    ));
                }
                if let Some(d) = json.nested_dtype.as_deref().filter(|&d| d != "float32") {
                    return Err(Error::format(&qs_key, format!("nested_dtype {d:?} is not float32")));
                }
                let nested_blocksize = json
                    .nested_blocksize
                    .ok_or_else(|| Error::format(&qs_key, "nested_offset without nested_blocksize"))?;
                Absmax::Double(DoubleQuant {
                    codes: absmax.data().to_vec(),
                    nested_absmax: f32_values(&need("nested_absmax")?, &key("nested_absmax"), None)?,
                    // torch.tensor(float(nested_offset)) is f32: round the JSON double once.
                    offset: offset as f32,
                    nested_blocksize,
                    nested_map: f32_values(&need("nested_quant_map")?, &key("nested_quant_map"), Some(256))?,
                })
            }
        };
        let qmap_key = key("quant_map");
        let qmap = f32_values(&need("quant_map")?, &qmap_key, Some(16))?;
        // bnb dequantizes with the built-in table of quant_type, not this copy; a different one
        // means the state is not what we think it is.
        if qmap.iter().zip(NF4_CODE).any(|(a, b)| a.to_bits() != b.to_bits()) {
            return Err(Error::format(&qmap_key, "is not the NF4 code table"));
        }
        if let Absmax::F32(v) = &t.absmax {
            if v.len() != nblocks {
                return Err(Error::format(
                    &absmax_key,
                    format!(
                        "has {} entries, shape {:?} with blocksize {} needs {nblocks}",
                        v.len(),
                        t.shape,
                        t.blocksize
                    ),
                ));
            }
        }
        t.validate(name)?;
        Ok(t)
    }

    /// The safetensors entries bitsandbytes writes for this weight (`name` = the weight key),
    /// including the quant-state JSON in bnb's exact byte format.
    pub fn to_safetensors_entries(&self, name: &str) -> Vec<(String, RawTensor)> {
        let n = self.numel();
        let mut out = vec![
            (name.to_string(), RawTensor::u8s(vec![n.div_ceil(2), 1], &self.packed)),
            (format!("{name}.quant_map"), RawTensor::f32s(vec![16], &NF4_CODE)),
        ];
        let shape = self.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
        let mut json = format!(
            "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{shape}]",
            self.blocksize,
            self.dtype.bnb_name()
        );
        match &self.absmax {
            Absmax::F32(v) => out.push((format!("{name}.absmax"), RawTensor::f32s(vec![v.len()], v))),
            Absmax::Double(d) => {
                out.push((format!("{name}.absmax"), RawTensor::u8s(vec![d.codes.len()], &d.codes)));
                out.push((
                    format!("{name}.nested_absmax"),
                    RawTensor::f32s(vec![d.nested_absmax.len()], &d.nested_absmax),
                ));
                out.push((format!("{name}.nested_quant_map"), RawTensor::f32s(vec![256], &d.nested_map)));
                json += &format!(
                    ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                    d.nested_blocksize,
                    python_float(d.offset as f64)
                );
            }
        }
        json.push('}');
        out.push((format!("{name}.{QUANT_STATE_NF4}"), RawTensor::u8s(vec![json.len()], json.as_bytes())));
        out
    }
}

/// Writes tensors to a safetensors file with `{"format": "pt"}` metadata (loadable by
/// transformers/PEFT).
pub fn write_safetensors(path: &Path, tensors: &[(String, RawTensor)]) -> Result<()> {
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta), path)
        .map_err(|e| Error::format(path.display().to_string(), e.to_string()))
}

/// What [`load_nf4_checkpoint`] does with a float (unquantized) checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantizeOnLoad {
    /// Load as stored; float weights stay in [`Nf4Checkpoint::dense`].
    Never,
    /// Quantize every 2-D float `*.weight` whose name contains none of `skip` (transformers
    /// replaces every `nn.Linear` except `lm_head`; embeddings are not Linear layers).
    Quantize { cfg: Nf4Config, skip: Vec<String> },
}

impl QuantizeOnLoad {
    /// QLoRA defaults: NF4, blocksize 64, double quant; skip `lm_head` and `embed_tokens`.
    pub fn qlora() -> Self {
        QuantizeOnLoad::Quantize { cfg: Nf4Config::default(), skip: vec!["lm_head".into(), "embed_tokens".into()] }
    }
}

/// A model directory loaded for QLoRA: NF4 weights plus the tensors kept in float.
#[derive(Debug, Clone, Default)]
pub struct Nf4Checkpoint {
    /// `quantization_config` of `config.json`, when the checkpoint was saved quantized.
    pub config: Option<BnbQuantConfig>,
    /// NF4 weights by weight key (`"model.layers.0.self_attn.q_proj.weight"`).
    pub quantized: BTreeMap<String, Nf4Tensor>,
    /// Every other tensor, as stored (embeddings, norms, `lm_head`, biases).
    pub dense: BTreeMap<String, RawTensor>,
}

/// The safetensors files of a Hugging Face model directory: `dir/model.safetensors`, or the
/// shards listed by `dir/model.safetensors.index.json` (sorted, each once). Errors name the
/// directory, or the index file and its field.
pub(crate) fn safetensors_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index_path).map_err(|e| {
        Error::format(
            dir.display().to_string(),
            format!("no model.safetensors nor a readable model.safetensors.index.json ({e})"),
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(index_path.display().to_string(), format!("invalid JSON: {e}")))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
        Error::format(format!("{}: field `weight_map`", index_path.display()), "missing or not an object")
    })?;
    let shards: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
    Ok(shards.into_iter().map(|f| dir.join(f)).collect())
}

fn quantize_raw(v: &TensorView<'_>, name: &str, cfg: Nf4Config) -> Result<Nf4Tensor> {
    fn q<T: Element>(v: &TensorView<'_>, cfg: Nf4Config) -> Result<Nf4Tensor> {
        Nf4Tensor::quantize(&decode_le::<T>(v.data()), v.shape(), cfg)
    }
    match v.dtype() {
        Dtype::F32 => q::<f32>(v, cfg),
        Dtype::BF16 => q::<bf16>(v, cfg),
        Dtype::F16 => q::<f16>(v, cfg),
        other => Err(Error::format(name, format!("cannot quantize dtype {other:?}"))),
    }
    .map_err(|e| Error::format(name, e.to_string()))
}

/// Loads a Hugging Face model directory (`config.json` + `model.safetensors` or a sharded index).
///
/// A bnb-4bit checkpoint (weights with a `quant_state.bitsandbytes__nf4` entry) is read as is; its
/// auxiliary tensors (`absmax`, `quant_map`, `nested_*`, `quant_state.*`) are consumed. A float
/// checkpoint is quantized per `on_load`. `config.json` announcing bnb 4-bit while no quant state
/// is found is an error, as is any inconsistent quant state (the message names the tensor).
pub fn load_nf4_checkpoint(dir: &Path, on_load: &QuantizeOnLoad) -> Result<Nf4Checkpoint> {
    let config_path = dir.join("config.json");
    let config = if config_path.exists() { BnbQuantConfig::from_config_json(&config_path)? } else { None };
    let files = safetensors_shards(dir)?;
    let buffers: Vec<Vec<u8>> =
        files.iter().map(|f| std::fs::read(f).map_err(|e| Error::io(f, e))).collect::<Result<_>>()?;
    let parsed: Vec<SafeTensors<'_>> = buffers
        .iter()
        .zip(&files)
        .map(|(b, f)| SafeTensors::deserialize(b).map_err(|e| Error::format(f.display().to_string(), e.to_string())))
        .collect::<Result<_>>()?;
    let mut location: BTreeMap<String, usize> = BTreeMap::new();
    for (i, st) in parsed.iter().enumerate() {
        let mut names = st.names();
        names.sort_unstable(); // reproducible errors: the same duplicate named every run
        for name in names {
            if location.insert(name.to_string(), i).is_some() {
                return Err(Error::format(name, "appears in more than one shard"));
            }
        }
    }
    let get = |k: &str| location.get(k).and_then(|&i| parsed[i].tensor(k).ok());

    let mut ckpt = Nf4Checkpoint { config: config.clone(), ..Default::default() };
    let mut consumed: BTreeSet<String> = BTreeSet::new();
    for name in location.keys() {
        let Some(pos) = name.find(&format!(".{QUANT_STATE_PREFIX}")) else { continue };
        let base = &name[..pos];
        let t = Nf4Tensor::from_lookup(base, &get)?;
        for suffix in ["", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"] {
            consumed.insert(format!("{base}{suffix}"));
        }
        consumed.insert(name.clone());
        ckpt.quantized.insert(base.to_string(), t);
    }
    if config.is_some() && ckpt.quantized.is_empty() {
        return Err(Error::format(
            config_path.display().to_string(),
            "quantization_config says bitsandbytes 4-bit, but no tensor has a quant_state",
        ));
    }
    let quantize = match (on_load, ckpt.quantized.is_empty()) {
        (QuantizeOnLoad::Quantize { cfg, skip }, true) => Some((cfg, skip)),
        _ => None,
    };
    for name in location.keys().filter(|k| !consumed.contains(*k)) {
        let v = get(name).expect("name comes from the index");
        let float = matches!(v.dtype(), Dtype::F32 | Dtype::BF16 | Dtype::F16);
        match quantize {
            Some((cfg, skip))
                if float
                    && v.shape().len() == 2
                    && name.ends_with(".weight")
                    && !skip.iter().any(|s| name.contains(s.as_str())) =>
            {
                ckpt.quantized.insert(name.clone(), quantize_raw(&v, name, *cfg)?);
            }
            _ => {
                ckpt.dense.insert(name.clone(), RawTensor::from_view(&v));
            }
        }
    }
    Ok(ckpt)
}

#[cfg(test)]
mod tests {
    use super::python_float;

    #[test]
    fn python_float_repr() {
        assert_eq!(python_float(0.05164909362792969), "0.05164909362792969");
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(1.5e-5), "1.5e-05");
        assert_eq!(python_float(0.0001), "0.0001");
        assert_eq!(python_float(2e20), "2e+20");
    }
}
