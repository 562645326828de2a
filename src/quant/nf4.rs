//! The NF4 format: code table, blockwise quantization and dequantization, bit-exact with
//! bitsandbytes ≥ 0.47 (`backends/default/ops.py` `quantize_4bit` / `dequantize_4bit`; the CUDA
//! kernels use the same thresholds, nibble order and f32 reciprocal).

use super::double_quant::DoubleQuant;
use super::{Element, QuantDtype};
use crate::{Error, Result};
use rayon::prelude::*;
use std::borrow::Cow;

/// The 16 NF4 code values (`get_4bit_type("nf4")`, `SPECS.md` B.1), as exact f32 bit patterns.
/// Index 7 is 0.0; the table is sorted ascending, so a nibble's order is its value's order.
pub const NF4_CODE: [f32; 16] = [
    f32::from_bits(0xbf80_0000), // -1.0
    f32::from_bits(0xbf32_39b1), // -0.6961928009986877
    f32::from_bits(0xbf06_6b30), // -0.5250730514526367
    f32::from_bits(0xbeca_32a0), // -0.39491748809814453
    f32::from_bits(0xbe91_a24d), // -0.28444138169288635
    f32::from_bits(0xbe3d_353f), // -0.18477343022823334
    f32::from_bits(0xbdba_7871), // -0.09105003625154495
    f32::from_bits(0x0000_0000), // 0.0
    f32::from_bits(0x3da2_faff), // 0.07958029955625534
    f32::from_bits(0x3e24_cae3), // 0.16093020141124725
    f32::from_bits(0x3e7c_04dd), // 0.24611230194568634
    f32::from_bits(0x3ead_033a), // 0.33791524171829224
    f32::from_bits(0x3ee1_a4b8), // 0.44070982933044434
    f32::from_bits(0x3f10_07ab), // 0.5626170039176941
    f32::from_bits(0x3f39_13b3), // 0.7229568362236023
    f32::from_bits(0x3f80_0000), // 1.0
];

/// Decision thresholds: `NF4_BOUNDS[i] = (NF4_CODE[i] + NF4_CODE[i+1]) / 2` in f32, as torch
/// computes them. The code index of a scaled value `s` is `#{i : NF4_BOUNDS[i] < s}`
/// (`torch.bucketize(s, bounds, right=False)`), so an exact tie goes to the LOWER index.
pub const NF4_BOUNDS: [f32; 15] = midpoints(&NF4_CODE);

const fn midpoints<const N: usize, const M: usize>(code: &[f32; N]) -> [f32; M] {
    let mut out = [0.0f32; M];
    let mut i = 0;
    while i < M {
        out[i] = (code[i] + code[i + 1]) / 2.0;
        i += 1;
    }
    out
}

/// Block sizes bitsandbytes accepts for 4-bit quantization (`functional.quantize_4bit`).
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// The divisor floor bitsandbytes' default kernel applies (`absmax.clamp(min=1e-38)`), so an
/// all-zero block quantizes to index 7 (0.0) instead of NaN.
pub(crate) const ABSMAX_FLOOR: f32 = 1e-38;

/// Index of the nearest NF4 code to `s` (ties to the lower index). Branch-free: 15 compares.
#[inline(always)]
pub fn nf4_index(s: f32) -> u8 {
    let mut q = 0u8;
    for b in NF4_BOUNDS {
        q += (b < s) as u8;
    }
    q
}

/// Quantization settings. `Default` is QLoRA's: blocksize 64, double quantization on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nf4Config {
    /// Elements per absmax block; one of [`BLOCKSIZES`].
    pub blocksize: usize,
    /// Store absmax as 8-bit codes (`compress_statistics=True`, `bnb_4bit_use_double_quant`).
    pub double_quant: bool,
}

impl Default for Nf4Config {
    fn default() -> Self {
        Nf4Config { blocksize: 64, double_quant: true }
    }
}

/// The per-block scales of an [`Nf4Tensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block (`weight.absmax` F32 in a checkpoint): 32 bits per block.
    F32(Vec<f32>),
    /// Double-quantized: one u8 per block plus nested statistics (`weight.absmax` U8,
    /// `weight.nested_absmax`, `weight.nested_quant_map`, `nested_offset`).
    Double(DoubleQuant),
}

impl Absmax {
    /// Number of blocks.
    pub fn len(&self) -> usize {
        match self {
            Absmax::F32(v) => v.len(),
            Absmax::Double(d) => d.codes.len(),
        }
    }

    /// True when there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The f32 scale of every block (decoded when double-quantized, see [`DoubleQuant::decode`]).
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match self {
            Absmax::F32(v) => Cow::Borrowed(v),
            Absmax::Double(d) => Cow::Owned(d.decode()),
        }
    }

    /// Bytes the statistics occupy (absmax, plus nested absmax, offset and the 256-entry map).
    pub fn nbytes(&self) -> usize {
        match self {
            Absmax::F32(v) => 4 * v.len(),
            Absmax::Double(d) => d.nbytes(),
        }
    }
}

/// A bitsandbytes NF4 quantized tensor (`Params4bit` data + `QuantState`).
///
/// * `packed[j] = q[2j] << 4 | q[2j+1]` over the row-major flattened tensor; `packed.len() =
///   ceil(n/2)` (odd `n`: the last low nibble is 7, the code of 0.0).
/// * Block `b` covers elements `b*blocksize .. min((b+1)*blocksize, n)`;
///   `absmax.len() = ceil(n/blocksize)`.
/// * Dequantized value: `W[k] = dtype(NF4_CODE[q[k]] * absmax[k / blocksize])`, the product in f32
///   and rounded once to `dtype` (round to nearest even).
///
/// Bytes: `ceil(n/2)` + `4·ceil(n/bs)` (f32 absmax), or with double quant `ceil(n/2) + ceil(n/bs)
/// + 4·ceil(ceil(n/bs)/256) + 4 + 1024` — 4.127 bits/weight at blocksize 64 (see
/// [`super::memory`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// Original shape (`quant_state["shape"]`, `[out_features, in_features]` for a Linear).
    pub shape: Vec<usize>,
    /// Elements per absmax block.
    pub blocksize: usize,
    /// The dtype the tensor had before quantization; dequantization's default output dtype.
    pub dtype: QuantDtype,
    /// Two 4-bit codes per byte, even element in the high nibble.
    pub packed: Vec<u8>,
    /// Per-block scales.
    pub absmax: Absmax,
}

fn check_blocksize(blocksize: usize, what: &str) -> Result<()> {
    if BLOCKSIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::config(format!("{what}: blocksize"), format!("{blocksize} is not one of {BLOCKSIZES:?}")))
    }
}

/// Quantizes one block into `out` (`ceil(x.len()/2)` bytes); returns the absmax bitsandbytes stores.
///
/// A full block multiplies by the f32 reciprocal `1/max(absmax, 1e-38)` and stores `absmax`
/// unclamped; the partial last block divides by `max(absmax, 1e-38)` and stores that clamped value
/// (both exactly as bnb's default kernel does; the two can differ by an ulp).
fn quantize_block<T: Element>(x: &[T], full: bool, out: &mut [u8]) -> f32 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.to_f32().abs()));
    let clamped = amax.max(ABSMAX_FLOOR);
    let inv = 1.0f32 / clamped;
    let scale = |v: T| -> u8 {
        let s = if full { v.to_f32() * inv } else { v.to_f32() / clamped };
        nf4_index(s.clamp(-1.0, 1.0))
    };
    let mut pairs = x.chunks_exact(2);
    for (o, p) in out.iter_mut().zip(&mut pairs) {
        *o = (scale(p[0]) << 4) | scale(p[1]);
    }
    if let [last] = pairs.remainder() {
        out[x.len() / 2] = (scale(*last) << 4) | 7;
    }
    if full {
        amax
    } else {
        clamped
    }
}

impl Nf4Tensor {
    /// Number of elements (product of the shape).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of absmax blocks, `ceil(numel / blocksize)`.
    pub fn nblocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }

    /// Quantizes `data` (row-major, `shape`) like `bnb.functional.quantize_4bit(A, blocksize,
    /// compress_statistics=cfg.double_quant, quant_type="nf4")`. Parallel over blocks (rayon).
    ///
    /// Errors: bad blocksize, `data.len() != prod(shape)`, empty input, or a NaN/Inf element.
    pub fn quantize<T: Element>(data: &[T], shape: &[usize], cfg: Nf4Config) -> Result<Self> {
        check_blocksize(cfg.blocksize, "nf4 quantize")?;
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape(
                "nf4 quantize",
                format!("shape {shape:?} has {n} elements but the data has {}", data.len()),
            ));
        }
        if n == 0 {
            return Err(Error::shape("nf4 quantize", "cannot quantize an empty tensor"));
        }
        if let Some(i) = data.par_iter().position_any(|v| !v.to_f32().is_finite()) {
            return Err(Error::shape(
                "nf4 quantize",
                format!("element {i} is {} (NaN/Inf cannot be quantized)", data[i].to_f32()),
            ));
        }
        let bs = cfg.blocksize;
        let nblocks = n.div_ceil(bs);
        let mut packed = vec![0u8; n.div_ceil(2)];
        let mut absmax = vec![0f32; nblocks];
        // Blocks are even-sized, so block b owns bytes b*bs/2 .. — independent, parallel chunks.
        packed
            .par_chunks_mut(bs / 2)
            .zip(data.par_chunks(bs))
            .zip(absmax.par_iter_mut())
            .with_min_len((16384 / bs).max(1))
            .for_each(|((out, x), am)| *am = quantize_block(x, x.len() == bs, out));
        let absmax =
            if cfg.double_quant { Absmax::Double(DoubleQuant::compress(&absmax)) } else { Absmax::F32(absmax) };
        Ok(Nf4Tensor { shape: shape.to_vec(), blocksize: bs, dtype: T::DTYPE, packed, absmax })
    }

    /// Checks that the sizes fit together; `what` names the tensor in the error.
    pub fn validate(&self, what: &str) -> Result<()> {
        check_blocksize(self.blocksize, what)?;
        let n = self.numel();
        if n == 0 {
            return Err(Error::format(what, format!("empty shape {:?}", self.shape)));
        }
        if self.packed.len() != n.div_ceil(2) {
            return Err(Error::format(
                what,
                format!(
                    "packed weight has {} bytes, shape {:?} needs {}",
                    self.packed.len(),
                    self.shape,
                    n.div_ceil(2)
                ),
            ));
        }
        if self.absmax.len() != self.nblocks() {
            return Err(Error::format(
                what,
                format!(
                    "absmax has {} entries, shape {:?} with blocksize {} needs {}",
                    self.absmax.len(),
                    self.shape,
                    self.blocksize,
                    self.nblocks()
                ),
            ));
        }
        if let Absmax::Double(d) = &self.absmax {
            d.validate(what)?;
        }
        Ok(())
    }

    /// Dequantizes into `out` (`numel` elements): `out[k] = T(NF4_CODE[q[k]] * absmax[k/bs])`.
    /// Parallel over groups of blocks. Errors if the state is inconsistent or `out` has the wrong
    /// length.
    pub fn dequantize_into<T: Element>(&self, out: &mut [T]) -> Result<()> {
        self.dequantize_with(out, T::from_f32)
    }

    /// Dequantizes to f32 exactly as bitsandbytes' `dequantize_4bit` returns the weight (in the
    /// tensor's own [`Nf4Tensor::dtype`], e.g. rounded to bf16), widened to f32: the values a bnb
    /// model's forward multiplies by.
    pub fn dequantize_f32_into(&self, out: &mut [f32]) -> Result<()> {
        fn via<T: Element>(v: f32) -> f32 {
            T::from_f32(v).to_f32()
        }
        match self.dtype {
            QuantDtype::F32 => self.dequantize_with(out, via::<f32>),
            QuantDtype::BF16 => self.dequantize_with(out, via::<half::bf16>),
            QuantDtype::F16 => self.dequantize_with(out, via::<half::f16>),
        }
    }

    /// The parallel dequantization loop; `entry` converts an f32 product to the output element.
    fn dequantize_with<O: Copy + Send + Sync>(&self, out: &mut [O], entry: impl Fn(f32) -> O + Sync) -> Result<()> {
        self.validate("nf4 dequantize")?;
        let n = self.numel();
        if out.len() != n {
            return Err(Error::shape("nf4 dequantize", format!("output has {} elements, tensor has {n}", out.len())));
        }
        let absmax = self.absmax.to_f32();
        let bs = self.blocksize;
        out.par_chunks_mut(bs)
            .zip(self.packed.par_chunks(bs / 2))
            .zip(absmax.par_iter())
            .with_min_len((16384 / bs).max(1))
            .for_each(|((o, p), &s)| dequantize_block(p, std::array::from_fn(|i| entry(NF4_CODE[i] * s)), o));
        Ok(())
    }

    /// Dequantizes to a new `Vec<T>` (row-major, `shape`).
    pub fn dequantize<T: Element>(&self) -> Result<Vec<T>> {
        let mut out = vec![T::from_f32(0.0); self.numel()];
        self.dequantize_into(&mut out)?;
        Ok(out)
    }

    /// Unpacks the 4-bit code index of every element (`numel` values in 0..16).
    pub fn indices(&self) -> Vec<u8> {
        let mut q: Vec<u8> = self.packed.iter().flat_map(|&b| [b >> 4, b & 15]).collect();
        q.truncate(self.numel());
        q
    }

    /// Bytes of packed weights plus statistics (not counting the 64-byte NF4 table).
    pub fn nbytes(&self) -> usize {
        self.packed.len() + self.absmax.nbytes()
    }
}

/// One block: a 16-entry table of `T(code[i] * scale)` (the same f32 product per element, so
/// bit-identical), then two lookups per byte.
#[inline]
fn dequantize_block<O: Copy>(packed: &[u8], table: [O; 16], out: &mut [O]) {
    let mut pairs = out.chunks_exact_mut(2);
    for (o, &b) in (&mut pairs).zip(packed) {
        o[0] = table[(b >> 4) as usize];
        o[1] = table[(b & 15) as usize];
    }
    if let [last] = pairs.into_remainder() {
        *last = table[(packed[packed.len() - 1] >> 4) as usize];
    }
}
