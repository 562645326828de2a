//! Bytes a quantized model occupies: packed weights plus statistics, per tensor, in closed form.
//!
//! For a tensor of `n` elements, blocksize `bs`, `B = ceil(n/bs)` blocks:
//!
//! ```text
//! packed        = ceil(n/2)
//! absmax        = 4·B                       (no double quant)
//!               = B + 4·ceil(B/256) + 4     (double quant: u8 codes, f32 nested absmax, f32 offset)
//! tables        = 64 (NF4 quant_map) [+ 1024 (nested_quant_map) with double quant]
//! ```
//!
//! Bits per weight as `n → ∞`: `4 + 32/bs`, or `4 + 8/bs + 32/(256·bs)` with double quant
//! (= 4.126953125 at bs = 64, the "4.127" of the QLoRA paper).

use super::nf4::{Nf4Config, Nf4Tensor};
use super::NESTED_BLOCKSIZE;

/// Byte breakdown of one or more NF4 tensors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Nf4Bytes {
    /// Number of weights.
    pub weights: u64,
    /// Packed 4-bit codes.
    pub packed: u64,
    /// Block statistics: f32 absmax, or u8 codes + nested f32 absmax + f32 offset.
    pub stats: u64,
    /// Per-tensor code tables (16 f32 NF4 values, 256 f32 nested map).
    pub tables: u64,
}

impl Nf4Bytes {
    /// Closed form for one tensor of `numel` elements.
    pub fn for_tensor(numel: u64, cfg: Nf4Config) -> Self {
        let blocks = numel.div_ceil(cfg.blocksize as u64);
        let (stats, tables) = if cfg.double_quant {
            (blocks + 4 * blocks.div_ceil(NESTED_BLOCKSIZE as u64) + 4, 64 + 1024)
        } else {
            (4 * blocks, 64)
        };
        Nf4Bytes { weights: numel, packed: numel.div_ceil(2), stats, tables }
    }

    /// What an actual tensor holds (its buffers' lengths; the NF4 table counted as 64 bytes).
    pub fn measure(t: &Nf4Tensor) -> Self {
        let stats = t.absmax.nbytes() as u64;
        let (stats, tables) = match &t.absmax {
            super::Absmax::F32(_) => (stats, 64),
            super::Absmax::Double(d) => {
                let map = 4 * d.nested_map.len() as u64;
                (stats - map, 64 + map)
            }
        };
        Nf4Bytes { weights: t.numel() as u64, packed: t.packed.len() as u64, stats, tables }
    }

    /// Total bytes.
    pub fn total(&self) -> u64 {
        self.packed + self.stats + self.tables
    }

    /// `8 · total / weights`.
    pub fn bits_per_weight(&self) -> f64 {
        8.0 * self.total() as f64 / self.weights as f64
    }

    /// Bits per weight without the per-tensor tables (the asymptotic figure).
    pub fn bits_per_weight_excluding_tables(&self) -> f64 {
        8.0 * (self.packed + self.stats) as f64 / self.weights as f64
    }
}

impl std::ops::Add for Nf4Bytes {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Nf4Bytes {
            weights: self.weights + o.weights,
            packed: self.packed + o.packed,
            stats: self.stats + o.stats,
            tables: self.tables + o.tables,
        }
    }
}

/// Bytes of a quantized model given the shapes of its quantized tensors (e.g. every Linear
/// `[out, in]`; embeddings, norms and `lm_head` stay in float and are not counted).
pub fn nf4_model_bytes<S: AsRef<[usize]>>(shapes: &[S], cfg: Nf4Config) -> Nf4Bytes {
    shapes
        .iter()
        .map(|s| Nf4Bytes::for_tensor(s.as_ref().iter().product::<usize>() as u64, cfg))
        .fold(Nf4Bytes::default(), |a, b| a + b)
}

/// The Linear layers of a Llama decoder (`[out, in]`, layer by layer: q, k, v, o, gate, up, down).
pub fn llama_linear_shapes(
    layers: usize,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    kv_heads: usize,
) -> Vec<[usize; 2]> {
    let head_dim = hidden / heads;
    let kv = kv_heads * head_dim;
    (0..layers)
        .flat_map(|_| {
            [
                [hidden, hidden],
                [kv, hidden],
                [kv, hidden],
                [hidden, hidden],
                [intermediate, hidden],
                [intermediate, hidden],
                [hidden, intermediate],
            ]
        })
        .collect()
}
