//! Several LoRA targets that share one input (q/k/v, or gate/up) as ONE fused LoRA linear, so
//! x is read once for all of them — by the base GEMM and by the down-projection alike.
//!
//! For targets t with W0_t `[N_t,K]`, A_t `[r_t,K]`, B_t `[N_t,r_t]`, scale s_t:
//! `W0 = [W0_1; W0_2; …]` ([ΣN, K]), `A = [A_1; A_2; …]` ([ΣR, K]), `B` block-diagonal
//! ([ΣN, ΣR], B_t at rows of t × columns of t, zeros elsewhere), `col_scale` = s_t on t's columns.
//! Then `y = x·W0ᵀ + (drop(x)·Aᵀ ⊙ c)·Bᵀ` holds every target's output side by side, and the
//! fused backward gives `dA` stacked and `dB`'s diagonal blocks (the off-diagonal blocks of the
//! full `dB` are gradients of the structural zeros and are dropped). The zeros cost ΣR−r_t
//! extra K columns per output row: for q/k/v at r = 16 that is 32 of 4096+48 columns. Backward
//! reads dy once per 64 columns of ΣR for dS and dB (`lora_bwd_ds_db`): once for q/k/v at r = 16.
//!
//! Host-side assembly (f32 values; the caller converts/uploads with `LoraLinear::prepare` or
//! `Tensor::to_backend`), so every kernel stays one kernel.

use crate::{Error, Result};

/// One target's weights, row-major f32.
#[derive(Debug, Clone, Copy)]
pub struct TargetWeights<'a> {
    /// W0 [n, k].
    pub w0: &'a [f32],
    /// A [r, k].
    pub a: &'a [f32],
    /// B [n, r].
    pub b: &'a [f32],
    pub n: usize,
    pub r: usize,
    /// alpha/r (or alpha/√r).
    pub scale: f32,
}

/// The stacked operands of the fused call.
#[derive(Debug, Clone, PartialEq)]
pub struct Stacked {
    /// W0 [ΣN, K].
    pub w0: Vec<f32>,
    /// A [ΣR, K].
    pub a: Vec<f32>,
    /// B [ΣN, ΣR], block-diagonal.
    pub b: Vec<f32>,
    /// `[ΣR]`.
    pub col_scale: Vec<f32>,
    /// (row offset, column offset, n, r) of each target in the stacked output and in S.
    pub blocks: Vec<(usize, usize, usize, usize)>,
    pub k: usize,
}

impl Stacked {
    pub fn total_n(&self) -> usize {
        self.blocks.iter().map(|b| b.2).sum()
    }
    pub fn total_r(&self) -> usize {
        self.col_scale.len()
    }

    /// Stacks `targets` over inputs of width `k`; errors name the target whose sizes are wrong.
    pub fn new(targets: &[TargetWeights], k: usize) -> Result<Stacked> {
        for (i, t) in targets.iter().enumerate() {
            if t.w0.len() != t.n * k || t.a.len() != t.r * k || t.b.len() != t.n * t.r {
                return Err(Error::shape(
                    "lora_stack",
                    format!(
                        "target {i}: W0 {} / A {} / B {} values do not fit n={} r={} k={k}",
                        t.w0.len(),
                        t.a.len(),
                        t.b.len(),
                        t.n,
                        t.r
                    ),
                ));
            }
        }
        let (sum_n, sum_r) = (targets.iter().map(|t| t.n).sum::<usize>(), targets.iter().map(|t| t.r).sum::<usize>());
        let mut s = Stacked {
            w0: Vec::with_capacity(sum_n * k),
            a: Vec::with_capacity(sum_r * k),
            b: vec![0.0; sum_n * sum_r],
            col_scale: Vec::with_capacity(sum_r),
            blocks: Vec::new(),
            k,
        };
        let (mut row, mut col) = (0, 0);
        for t in targets {
            s.w0.extend_from_slice(t.w0);
            s.a.extend_from_slice(t.a);
            s.col_scale.extend(std::iter::repeat_n(t.scale, t.r));
            for i in 0..t.n {
                s.b[(row + i) * sum_r + col..][..t.r].copy_from_slice(&t.b[i * t.r..][..t.r]);
            }
            s.blocks.push((row, col, t.n, t.r));
            row += t.n;
            col += t.r;
        }
        Ok(s)
    }

    /// Target `t`'s columns of a stacked output `y` [M, ΣN].
    pub fn output_of(&self, y: &[f32], t: usize) -> Vec<f32> {
        let (row, _, n, _) = self.blocks[t];
        y.chunks(self.total_n()).flat_map(|r| r[row..row + n].to_vec()).collect()
    }
    /// Target `t`'s dA [r_t, K] from the stacked dA [ΣR, K].
    pub fn da_of(&self, da: &[f32], t: usize) -> Vec<f32> {
        let (_, col, _, r) = self.blocks[t];
        da[col * self.k..(col + r) * self.k].to_vec()
    }
    /// Target `t`'s dB [n_t, r_t]: its diagonal block of the stacked dB [ΣN, ΣR].
    pub fn db_of(&self, db: &[f32], t: usize) -> Vec<f32> {
        let (row, col, n, r) = self.blocks[t];
        (0..n).flat_map(|i| db[(row + i) * self.total_r() + col..][..r].to_vec()).collect()
    }
}
