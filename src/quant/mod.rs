//! NF4 (4-bit NormalFloat) quantization, bit-compatible with bitsandbytes (`SPECS.md` part B).
//!
//! A weight `W` with `n` elements (flattened row-major) is cut into blocks of `blocksize`
//! consecutive elements (32…4096, default 64; the last block may be partial). Per block `b`:
//!
//! ```text
//! absmax[b] = max |x|                       over the block, f32
//! q[k]      = argmin_i |code[i] - x[k]/absmax[b]|  (NF4 code table, ties to the lower index)
//! packed[j] = q[2j] << 4 | q[2j+1]          (even element in the HIGH nibble; odd n pads with index 7)
//! W[k]     ≈ code[q[k]] * absmax[k / blocksize]   (computed in f32, then rounded to the dtype)
//! ```
//!
//! With double quantization (QLoRA's `bnb_4bit_use_double_quant`) the f32 `absmax` vector is itself
//! stored as 8-bit codes of `absmax - mean(absmax)` in blocks of 256 with the 256-entry dynamic map
//! ([`double_quant`]). Storage per weight:
//!
//! | layout | bits per weight (blocksize 64) |
//! | --- | --- |
//! | packed nibbles | 4 |
//! | f32 absmax | 4 + 32/64 = 4.5 |
//! | double quant | 4 + 8/64 + 32/(64·256) = 4.127 (+ 1 KiB map, 64 B NF4 table per tensor) |
//!
//! Modules: [`nf4`] (the format, quantize/dequantize), [`double_quant`] (8-bit statistics),
//! [`checkpoint`] (bnb-4bit safetensors checkpoints written by transformers), [`memory`] (bytes a
//! quantized model occupies).

pub mod checkpoint;
pub mod double_quant;
pub mod memory;
pub mod nf4;

pub use checkpoint::{load_nf4_checkpoint, BnbQuantConfig, Nf4Checkpoint, QuantizeOnLoad};
pub use double_quant::{DoubleQuant, DYNAMIC_MAP, NESTED_BLOCKSIZE};
pub use memory::{nf4_model_bytes, Nf4Bytes};
pub use nf4::{Absmax, Nf4Config, Nf4Tensor, NF4_BOUNDS, NF4_CODE};

use crate::{Error, Result};
use half::{bf16, f16};

/// The dtype a weight had before quantization, and the dtype dequantization returns by default
/// (`quant_state["dtype"]` in bitsandbytes: `"float32"`, `"float16"` or `"bfloat16"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantDtype {
    F32,
    F16,
    BF16,
}

impl QuantDtype {
    /// The name bitsandbytes writes in the quant-state JSON (`str(torch_dtype).strip("torch.")`).
    pub fn bnb_name(self) -> &'static str {
        match self {
            QuantDtype::F32 => "float32",
            QuantDtype::F16 => "float16",
            QuantDtype::BF16 => "bfloat16",
        }
    }

    /// Parses a bnb dtype name; `what` names the tensor for the error.
    pub fn from_bnb_name(name: &str, what: &str) -> Result<Self> {
        match name {
            "float32" => Ok(QuantDtype::F32),
            "float16" => Ok(QuantDtype::F16),
            "bfloat16" => Ok(QuantDtype::BF16),
            other => Err(Error::format(what, format!("unsupported quant-state dtype {other:?}"))),
        }
    }

    /// The matching safetensors dtype.
    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            QuantDtype::F32 => safetensors::Dtype::F32,
            QuantDtype::F16 => safetensors::Dtype::F16,
            QuantDtype::BF16 => safetensors::Dtype::BF16,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            QuantDtype::F32 => 4,
            QuantDtype::F16 | QuantDtype::BF16 => 2,
        }
    }
}

/// A float element type that can be quantized and dequantized: `f32`, [`half::bf16`],
/// [`half::f16`]. Conversions are exact widening (`to_f32`) and round-to-nearest-even narrowing
/// (`from_f32`), the same as torch's `.float()` / `.to(dtype)`.
pub trait Element: Copy + Send + Sync + 'static {
    /// The dtype tag recorded in the quant state.
    const DTYPE: QuantDtype;
    /// Exact conversion to f32.
    fn to_f32(self) -> f32;
    /// Round-to-nearest-even conversion from f32.
    fn from_f32(v: f32) -> Self;
    /// Decodes one little-endian element (`bytes.len() == DTYPE.size()`).
    fn from_le(bytes: &[u8]) -> Self;
}

impl Element for f32 {
    const DTYPE: QuantDtype = QuantDtype::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn from_le(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl Element for bf16 {
    const DTYPE: QuantDtype = QuantDtype::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[inline(always)]
    fn from_le(b: &[u8]) -> Self {
        bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))
    }
}

impl Element for f16 {
    const DTYPE: QuantDtype = QuantDtype::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline(always)]
    fn from_le(b: &[u8]) -> Self {
        f16::from_bits(u16::from_le_bytes([b[0], b[1]]))
    }
}

/// Decodes little-endian bytes of `T` (safetensors data need not be aligned, so no cast).
pub(crate) fn decode_le<T: Element>(bytes: &[u8]) -> Vec<T> {
    bytes.chunks_exact(T::DTYPE.size()).map(T::from_le).collect()
}
