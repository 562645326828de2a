//! Double quantization of the NF4 block scales (bitsandbytes `compress_statistics=True`,
//! `SPECS.md` B.3): the f32 `absmax` vector becomes 8-bit codes of `absmax - offset`, quantized
//! blockwise (256 per block) with the signed dynamic map.
//!
//! ```text
//! offset        = mean(absmax)                               f32, torch's CPU summation order
//! nested_absmax = max |absmax - offset|   per 256-block      f32
//! code[i]       = nearest DYNAMIC_MAP entry to (absmax[i] - offset) / nested_absmax[i/256]
//!                 (ties to the lower index, like torch.bucketize(right=False))
//! absmax[i]    ≈ DYNAMIC_MAP[code[i]] * nested_absmax[i/256] + offset
//!                 (f32 product, then a separately rounded f32 add — never fused)
//! ```

use super::nf4::ABSMAX_FLOOR;
use crate::{Error, Result};
use rayon::prelude::*;

/// Block size of the nested (8-bit) quantization; bitsandbytes hard-codes 256.
pub const NESTED_BLOCKSIZE: usize = 256;

/// `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)` as exact f32 bit patterns
/// (SHA-256 of the LE bytes `e732639a…`, `SPECS.md` B.3): 127 negatives, 0.0 at 127, 1.0 at 255.
const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000, 0xbf616666,
    0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333, 0xbf44999a, 0xbf410000,
    0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666, 0xbf27cccd, 0xbf243334, 0xbf20999a,
    0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a, 0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333,
    0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a, 0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a,
    0xbeb86666, 0xbeb13333, 0xbeaa0000, 0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999,
    0xbe6f3333, 0xbe60cccd, 0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000,
    0xbddb3334, 0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d, 0xbd5b851f,
    0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148, 0xbcfeb852, 0xbce7ae15,
    0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148, 0xbc1f3b64, 0xbc160418, 0xbc0ccccd,
    0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4, 0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a,
    0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d, 0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01,
    0xb9c7e283, 0xb98ce705, 0xb923d70b, 0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94,
    0xb513a3b7, 0x00000000, 0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b,
    0x3923d70b, 0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4, 0x3bcfdf3b,
    0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148, 0x3c68f5c3, 0x3c8b851f,
    0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148, 0x3d166667, 0x3d21eb85, 0x3d2d70a3,
    0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d, 0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d,
    0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a, 0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667,
    0x3dc428f7, 0x3dc9eb85, 0x3ddb3334, 0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000,
    0x3e526666, 0x3e60cccd, 0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc,
    0x3eaa0000, 0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a, 0x3f123334,
    0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666, 0x3f2f0000, 0x3f32999a,
    0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333, 0x3f4bcccd, 0x3f4f6666, 0x3f530000,
    0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000, 0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666,
    0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The 256-entry signed dynamic map used for the nested statistics (sorted ascending).
pub const DYNAMIC_MAP: [f32; 256] = {
    let mut out = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        out[i] = f32::from_bits(DYNAMIC_MAP_BITS[i]);
        i += 1;
    }
    out
};

/// Vector width (f32 lanes) of torch's CPU `sum` kernel. Measured: torch 2.15 (on an AVX512
/// machine) matches 8 lanes (a 256-bit `Vectorized<float>`) bit for bit on every length tried.
const TORCH_SUM_LANES: usize = 8;

/// `utils::CeilLog2` from ATen (`x <= 2 → 1`).
fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

fn add<const L: usize>(acc: &mut [f32; L], v: &[f32; L]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

/// ATen's `row_sum` (4 interleaved partial sums) over `multi_row_sum` (a 4-level cascade that
/// flushes every `2^max(4, ceil_log2(size)/4)` items), lane-wise on `L`-wide vectors
/// (`aten/src/ATen/native/cpu/SumKernel.cpp`).
fn row_sum<const L: usize>(v: &[[f32; L]]) -> [f32; L] {
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    let size = v.len() / ILP;
    let power = (ceil_log2(size) / LEVELS).max(4);
    let step = 1usize << power;
    let mask = step - 1;
    let mut acc = [[[0f32; L]; ILP]; LEVELS];
    let mut i = 0;
    let accumulate = |acc: &mut [[[f32; L]; ILP]; LEVELS], i: usize| {
        for k in 0..ILP {
            add(&mut acc[0][k], &v[ILP * i + k]);
        }
    };
    while i + step <= size {
        for _ in 0..step {
            accumulate(&mut acc, i);
            i += 1;
        }
        for j in 1..LEVELS {
            // Flush level j-1 into level j (ATen: acc[j][k] += acc[j-1][k]; acc[j-1][k] = 0).
            let lower = std::mem::replace(&mut acc[j - 1], [[0.0; L]; ILP]);
            for (a, l) in acc[j].iter_mut().zip(&lower) {
                add(a, l);
            }
            if i & (mask << (j * power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        accumulate(&mut acc, i);
        i += 1;
    }
    let mut partial = acc[0];
    for level in &acc[1..] {
        for (p, l) in partial.iter_mut().zip(level) {
            add(p, l);
        }
    }
    for tail in &v[ILP * size..] {
        add(&mut partial[0], tail);
    }
    let [mut sum, rest @ ..] = partial;
    for p in &rest {
        add(&mut sum, p);
    }
    sum
}

/// `torch.mean` of a contiguous f32 vector on the CPU with one thread: ATen's cascade `sum`
/// (`vectorized_inner_sum`: vector partial sums, then the scalar tail, then the lanes in order),
/// divided by `n` in f32. This is the `offset` bitsandbytes computes with `absmax.mean()` on the
/// CPU; a CUDA or multi-threaded torch (≥ 32768 blocks) sums in another order and may differ by
/// an ulp. Dequantization always uses the stored offset, so loading is exact either way.
pub fn torch_cpu_mean(x: &[f32]) -> f32 {
    const W: usize = TORCH_SUM_LANES;
    let sum = if x.len() >= W {
        let vecs: Vec<[f32; W]> = x.chunks_exact(W).map(|c| c.try_into().expect("chunk of W")).collect();
        let lanes = row_sum(&vecs);
        let mut acc = 0.0f32;
        for v in &x[vecs.len() * W..] {
            acc += v;
        }
        for l in lanes {
            acc += l;
        }
        acc
    } else {
        let scalars: Vec<[f32; 1]> = x.iter().map(|&v| [v]).collect();
        row_sum(&scalars)[0]
    };
    // The output starts at 0 and the kernel accumulates into it (`CastStoreAccumulate`).
    (0.0 + sum) / x.len() as f32
}

/// 8-bit blockwise quantization with a sorted 256-entry `map`, exact nearest code (bitsandbytes'
/// default-backend `quantize_blockwise`; its CPU C++ kernel uses an approximate lookup table
/// instead and misses the nearest code about once per 300 blocks). Per block: a full block
/// scales by the f32 reciprocal `1/max(absmax, 1e-38)` and stores `absmax`; a partial last block
/// divides by `max(absmax, 1e-38)` and stores that. Returns `(codes, absmax)`.
pub fn quantize_blockwise(x: &[f32], map: &[f32; 256], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let bounds: [f32; 255] = std::array::from_fn(|i| (map[i] + map[i + 1]) / 2.0);
    let mut codes = vec![0u8; x.len()];
    let mut absmax = vec![0f32; x.len().div_ceil(blocksize)];
    codes.par_chunks_mut(blocksize).zip(x.par_chunks(blocksize)).zip(absmax.par_iter_mut()).for_each(|((q, x), am)| {
        let full = x.len() == blocksize;
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let clamped = amax.max(ABSMAX_FLOOR);
        let inv = 1.0f32 / clamped;
        for (q, &v) in q.iter_mut().zip(x) {
            let s = if full { v * inv } else { v / clamped }.clamp(-1.0, 1.0);
            // bucketize(right=False): the number of bounds strictly below s.
            *q = bounds.partition_point(|&b| b < s) as u8;
        }
        *am = if full { amax } else { clamped };
    });
    (codes, absmax)
}

/// Double-quantized block scales (the `Absmax::Double` side of an NF4 tensor).
///
/// Decoded scale of NF4 block `i`:
/// `absmax[i] = nested_map[codes[i]] * nested_absmax[i / nested_blocksize] + offset`
/// (f32 multiply, then f32 add). Bytes: `nblocks + 4·ceil(nblocks/256) + 4 + 4·256`, i.e.
/// `8/bs + 32/(256·bs)` bits per weight (0.127 at blocksize 64) plus a 1 KiB map per tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    /// One 8-bit code per NF4 block (`weight.absmax`, U8).
    pub codes: Vec<u8>,
    /// f32 scale per nested block (`weight.nested_absmax`).
    pub nested_absmax: Vec<f32>,
    /// The mean that was subtracted before quantizing (`nested_offset`).
    pub offset: f32,
    /// NF4 blocks per nested block (`nested_blocksize`, 256).
    pub nested_blocksize: usize,
    /// The 256-entry code map (`weight.nested_quant_map`; [`DYNAMIC_MAP`] when we quantize).
    pub nested_map: Vec<f32>,
}

impl DoubleQuant {
    /// Compresses f32 block scales like bitsandbytes: `offset = mean(absmax)` (see
    /// [`torch_cpu_mean`]), then [`quantize_blockwise`] of `absmax - offset` with [`DYNAMIC_MAP`]
    /// in blocks of 256.
    pub fn compress(absmax: &[f32]) -> Self {
        Self::compress_with_offset(absmax, torch_cpu_mean(absmax))
    }

    /// As [`DoubleQuant::compress`] with a given offset (e.g. to reproduce a GPU-made checkpoint).
    pub fn compress_with_offset(absmax: &[f32], offset: f32) -> Self {
        let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let (codes, nested_absmax) = quantize_blockwise(&centered, &DYNAMIC_MAP, NESTED_BLOCKSIZE);
        DoubleQuant {
            codes,
            nested_absmax,
            offset,
            nested_blocksize: NESTED_BLOCKSIZE,
            nested_map: DYNAMIC_MAP.to_vec(),
        }
    }

    /// The f32 block scales, `nested_map[code] * nested_absmax[i / nested_blocksize] + offset`.
    /// Call [`DoubleQuant::validate`] first on untrusted state (this indexes without checks).
    pub fn decode(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.codes.len()];
        out.par_chunks_mut(self.nested_blocksize)
            .zip(self.codes.par_chunks(self.nested_blocksize))
            .zip(self.nested_absmax.par_iter())
            .for_each(|((o, c), &s)| {
                for (o, &c) in o.iter_mut().zip(c) {
                    // Two roundings, as bnb: dequantize_blockwise, then `absmax += offset`.
                    let scaled = self.nested_map[c as usize] * s;
                    *o = scaled + self.offset;
                }
            });
        out
    }

    /// Checks sizes and finiteness; `what` names the tensor.
    pub fn validate(&self, what: &str) -> Result<()> {
        if self.nested_map.len() != 256 {
            return Err(Error::format(
                format!("{what}.nested_quant_map"),
                format!("has {} entries, expected 256", self.nested_map.len()),
            ));
        }
        if self.nested_blocksize == 0 {
            return Err(Error::format(what, "nested_blocksize is 0"));
        }
        let want = self.codes.len().div_ceil(self.nested_blocksize);
        if self.nested_absmax.len() != want {
            return Err(Error::format(
                format!("{what}.nested_absmax"),
                format!(
                    "has {} entries, {} absmax codes in blocks of {} need {want}",
                    self.nested_absmax.len(),
                    self.codes.len(),
                    self.nested_blocksize
                ),
            ));
        }
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        if !self.offset.is_finite() || !finite(&self.nested_absmax) || !finite(&self.nested_map) {
            return Err(Error::format(what, "non-finite nested statistics (NaN/Inf)"));
        }
        Ok(())
    }

    /// Bytes: codes + nested absmax + offset + map.
    pub fn nbytes(&self) -> usize {
        self.codes.len() + 4 * self.nested_absmax.len() + 4 + 4 * self.nested_map.len()
    }
}
