//! Reading and writing safetensors files: single or sharded (`model.safetensors.index.json`),
//! F32/BF16/F16 tensors widened to f32 on read.

use super::config::WeightDtype;
use crate::{Error, Result};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The raw bytes of one or more safetensors files and where each tensor lives.
pub struct TensorFiles {
    files: Vec<(PathBuf, Vec<u8>)>,
    index: HashMap<String, usize>,
}

impl TensorFiles {
    /// Opens `dir/model.safetensors`, or the shards listed by `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Self::open(&[single]);
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
        let mut shards: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        shards.sort();
        shards.dedup();
        let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        Self::open(&paths)
    }

    /// Opens the given files (tensor names must be unique across them).
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
            let st = SafeTensors::deserialize(&bytes)
                .map_err(|e| Error::format(p.display().to_string(), format!("not a safetensors file: {e}")))?;
            for name in st.names() {
                index.insert(name.to_string(), i);
            }
            files.push((p.clone(), bytes));
        }
        Ok(TensorFiles { files, index })
    }

    /// All tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|s| s.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Where tensor `name` would be read from (for error messages).
    pub fn location(&self, name: &str) -> String {
        match self.index.get(name) {
            Some(&i) => self.files[i].0.display().to_string(),
            None => self.files.iter().map(|f| f.0.display().to_string()).collect::<Vec<_>>().join(", "),
        }
    }

    /// Tensor `name` as f32 with its shape and stored dtype; errors name the file and tensor.
    pub fn get(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>, Dtype)> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| Error::format(format!("{}: tensor `{name}`", self.location(name)), "missing"))?;
        let (path, bytes) = &self.files[i];
        let what = || format!("{}: tensor `{name}`", path.display());
        let st = SafeTensors::deserialize(bytes).map_err(|e| Error::format(what(), e.to_string()))?;
        let tv = st.tensor(name).map_err(|e| Error::format(what(), e.to_string()))?;
        let data = decode(tv.dtype(), tv.data())
            .ok_or_else(|| Error::format(what(), format!("unsupported dtype {:?} (F32, BF16, F16)", tv.dtype())))?;
        Ok((data, tv.shape().to_vec(), tv.dtype()))
    }

    /// As [`TensorFiles::get`], checking the shape.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (data, got, _) = self.get(name)?;
        if got != shape {
            return Err(Error::format(
                format!("{}: tensor `{name}`", self.location(name)),
                format!("shape {got:?}, expected {shape:?}"),
            ));
        }
        Ok(data)
    }
}

/// Little-endian F32/BF16/F16 bytes to f32 (`None` for other dtypes).
pub fn decode(dtype: Dtype, b: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    })
}

/// f32 values to little-endian bytes of `dtype` (round to nearest even).
pub fn encode(dtype: WeightDtype, v: &[f32]) -> (Dtype, Vec<u8>) {
    match dtype {
        WeightDtype::F32 => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        WeightDtype::BF16 => (Dtype::BF16, v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect()),
        WeightDtype::F16 => (Dtype::F16, v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect()),
    }
}

/// Writes `tensors` (name → (shape, data)) as one safetensors file with `{"format": "pt"}`
/// metadata, so that `safetensors.torch`, transformers and PEFT load it.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, (Vec<usize>, &[f32])>,
    dtype: WeightDtype,
) -> Result<()> {
    let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, (shape, data))| {
            let (dt, bytes) = encode(dtype, data);
            (k.clone(), dt, shape.clone(), bytes)
        })
        .collect();
    let views = encoded
        .iter()
        .map(|(k, dt, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes)
                .map(|v| (k.as_str(), v))
                .map_err(|e| Error::format(format!("{}: tensor `{k}`", path.display()), e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| Error::format(path.display().to_string(), e.to_string()))
}
