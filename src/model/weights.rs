//! Reading and writing safetensors files: single or sharded (`model.safetensors.index.json`),
//! F32/BF16/F16 tensors widened to f32 on read; bnb-4bit (NF4) weights are read by
//! [`super::base_weight::LinearWeight::load`] through [`TensorFiles::raw`].
//!
//! Only the headers are read when the files are opened; each tensor's bytes are read when it is
//! asked for, so loading a model never holds the whole checkpoint in memory besides the model
//! (which matters for QLoRA: the f32 weights of a BF16 checkpoint quantized on load are only
//! ever one tensor at a time).

use super::config::WeightDtype;
use crate::quant::checkpoint::{safetensors_shards, RawTensor};
use crate::quant::Nf4Config;
use crate::{Error, Result};
use half::{bf16, f16};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One opened safetensors file: its header, and the file to read tensors from.
struct TensorFile {
    path: PathBuf,
    file: Mutex<std::fs::File>,
    /// Offset of the data section (8 + header length).
    data_start: u64,
    /// Sorted, so that errors over all names (a duplicate across shards) are reproducible.
    tensors: BTreeMap<String, TensorInfo>,
}

impl TensorFile {
    fn open(path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::format(path.display().to_string(), format!("not a safetensors file: {msg}"));
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n).map_err(|e| bad(format!("no header ({e})")))?;
        let n = u64::from_le_bytes(n);
        if n > 100_000_000 || 8 + n > len {
            return Err(bad(format!("header length {n} does not fit the file's {len} bytes")));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
        let meta: Metadata = serde_json::from_slice(&header).map_err(|e| bad(format!("bad header: {e}")))?;
        let data_len = len - 8 - n;
        let mut tensors = BTreeMap::new();
        for (name, info) in meta.tensors() {
            let (start, end) = info.data_offsets;
            let numel: usize = info.shape.iter().product();
            if start > end || end as u64 > data_len || (end - start) * 8 != numel * info.dtype.bitsize() {
                return Err(Error::format(
                    format!("{}: tensor `{name}`", path.display()),
                    format!(
                        "data offsets {:?} do not fit {:?} {:?} in the file",
                        info.data_offsets, info.dtype, info.shape
                    ),
                ));
            }
            tensors.insert(name, info.clone());
        }
        Ok(TensorFile { path: path.to_path_buf(), file: Mutex::new(file), data_start: 8 + n, tensors })
    }

    fn read(&self, name: &str) -> Result<RawTensor> {
        let info = &self.tensors[name];
        let (start, end) = info.data_offsets;
        let mut data = vec![0u8; end - start];
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        f.seek(SeekFrom::Start(self.data_start + start as u64))
            .and_then(|_| f.read_exact(&mut data))
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(RawTensor { dtype: info.dtype, shape: info.shape.clone(), data })
    }
}

/// One or more safetensors files and where each tensor lives.
pub struct TensorFiles {
    files: Vec<TensorFile>,
    index: HashMap<String, usize>,
    quantize: Option<Nf4Config>,
}

impl TensorFiles {
    /// Opens `dir/model.safetensors`, or the shards listed by `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        Self::open(&safetensors_shards(dir)?)
    }

    /// Opens the given files (tensor names must be unique across them).
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let f = TensorFile::open(p)?;
            for name in f.tensors.keys() {
                if index.insert(name.clone(), i).is_some() {
                    return Err(Error::format(
                        format!("{}: tensor `{name}`", p.display()),
                        "appears in more than one shard",
                    ));
                }
            }
            files.push(f);
        }
        Ok(TensorFiles { files, index, quantize: None })
    }

    /// QLoRA loading: float linear weights other than `lm_head` are quantized to NF4 with `cfg`
    /// as they are read (one tensor at a time, so the f32 copy of the model never exists).
    pub fn quantize_linears(mut self, cfg: Nf4Config) -> Self {
        self.quantize = Some(cfg);
        self
    }

    /// The quantization set by [`TensorFiles::quantize_linears`].
    pub fn quantize_config(&self) -> Option<Nf4Config> {
        self.quantize
    }

    /// Tensor `name` as stored (any dtype); `Ok(None)` when there is none.
    pub fn raw(&self, name: &str) -> Result<Option<RawTensor>> {
        self.index.get(name).map(|&i| self.files[i].read(name)).transpose()
    }

    /// The stored dtype and shape of tensor `name`, without reading it.
    pub fn info(&self, name: &str) -> Option<(Dtype, &[usize])> {
        let info = &self.files[*self.index.get(name)?].tensors[name];
        Some((info.dtype, &info.shape))
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
            Some(&i) => self.files[i].path.display().to_string(),
            None => self.files.iter().map(|f| f.path.display().to_string()).collect::<Vec<_>>().join(", "),
        }
    }

    /// Tensor `name` as f32 with its shape and stored dtype; errors name the file and tensor.
    pub fn get(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>, Dtype)> {
        let t = self
            .raw(name)?
            .ok_or_else(|| Error::format(format!("{}: tensor `{name}`", self.location(name)), "missing"))?;
        let data = decode(t.dtype, &t.data).ok_or_else(|| {
            Error::format(
                format!("{}: tensor `{name}`", self.location(name)),
                format!("unsupported dtype {:?} (F32, BF16, F16)", t.dtype),
            )
        })?;
        Ok((data, t.shape, t.dtype))
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

/// `tensors` (name → (shape, data)) encoded as `dtype`.
pub fn encode_tensors(
    tensors: &BTreeMap<String, (Vec<usize>, &[f32])>,
    dtype: WeightDtype,
) -> Vec<(String, RawTensor)> {
    tensors
        .iter()
        .map(|(k, (shape, data))| {
            let (dtype, data) = encode(dtype, data);
            (k.clone(), RawTensor { dtype, shape: shape.clone(), data })
        })
        .collect()
}

/// Writes `tensors` (name → (shape, data)) as one safetensors file with `{"format": "pt"}`
/// metadata, so that `safetensors.torch`, transformers and PEFT load it.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, (Vec<usize>, &[f32])>,
    dtype: WeightDtype,
) -> Result<()> {
    crate::quant::checkpoint::write_safetensors(path, &encode_tensors(tensors, dtype))
}
