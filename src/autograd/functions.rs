//! Differentiable ops: a forward from [`crate::ops`] plus the backward closure the tape records.
//!
//! Each op saves only what its backward reads (by `Arc`, so nothing is copied): `linear` saves
//! the weight (packed, for an NF4 weight: see [`FrozenWeight`]); `lora_linear` the input `x`, `W0`, `A`, `B` and `S = drop(x)·Aᵀ`; `rms_norm` the
//! input and `rstd`; `rope` nothing but the table; `attention` `q`, `k`, `v` and the
//! log-sum-exp; `swiglu` its two inputs; the loss its own gradient.

use super::{Tape, Var};
use crate::ops::attention::{attention_backward, attention_forward, AttnShape};
use crate::ops::lora::{self, LinearShape, LoraOpConfig};
use crate::ops::rope::{self, RopeTable};
use crate::ops::simd::{par_add, par_copy};
use crate::ops::{activation, loss, norm};
use crate::{Error, Result};
use std::sync::Arc;

fn rows_cols(x: &Var, op: &str) -> Result<(usize, usize)> {
    match x.shape() {
        [.., k] if *k > 0 => Ok((x.len() / k, *k)),
        s => Err(Error::shape(op, format!("input shape {s:?} has no last dimension"))),
    }
}

/// The shape of `x` with the last dimension replaced by `n`.
fn with_last(x: &Var, n: usize) -> Vec<usize> {
    let mut s = x.shape().to_vec();
    *s.last_mut().unwrap() = n;
    s
}

/// `a + b` (same shapes).
pub fn add(tape: &Tape, a: &Var, b: &Var) -> Result<Var> {
    if a.shape() != b.shape() {
        return Err(Error::shape("add", format!("{:?} + {:?}", a.shape(), b.shape())));
    }
    let y = par_add(a.data(), b.data());
    let (ga, gb) = (a.requires_grad(), b.requires_grad());
    tape.record(y, a.shape(), &[a, b], || Box::new(move |g| Ok(vec![ga.then(|| par_copy(g)), gb.then(|| par_copy(g))])))
}

/// A frozen weight `W [n, k]` as the linear ops read it: dense f32 values, borrowed where the
/// weight is stored dense, or made for the one use (an NF4 weight is dequantized in forward and
/// again in backward, so the tape keeps only the packed weight).
pub trait FrozenWeight: 'static {
    /// Runs `f` on the dense row-major values.
    fn with_dense<R>(&self, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R>;
}

impl FrozenWeight for Vec<f32> {
    fn with_dense<R>(&self, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        f(self)
    }
}

/// Frozen linear layer `y = x·Wᵀ + bias`, `W [n, k]`; backward gives `dx = dy·W`.
pub fn linear<W: FrozenWeight>(
    tape: &Tape,
    x: &Var,
    w: &Arc<W>,
    bias: Option<&Arc<Vec<f32>>>,
    n: usize,
) -> Result<Var> {
    let (m, k) = rows_cols(x, "linear")?;
    let sh = LinearShape { m, k, n };
    let y = w.with_dense(|w| lora::linear(x.data(), w, bias.map(|b| b.as_slice()), sh))?;
    tape.record(y, &with_last(x, n), &[x], || {
        let w = w.clone();
        Box::new(move |g| w.with_dense(|w| Ok(vec![Some(lora::linear_backward_input(g, w, sh))])))
    })
}

/// The LoRA linear op (see [`crate::ops::lora`]) with trainable `a [r, k]`, `b [n, r]`.
#[allow(clippy::too_many_arguments)]
pub fn lora_linear<W: FrozenWeight>(
    tape: &Tape,
    x: &Var,
    w0: &Arc<W>,
    bias: Option<&Arc<Vec<f32>>>,
    a: &Var,
    b: &Var,
    cfg: LoraOpConfig,
    offset: u64,
    train: bool,
) -> Result<Var> {
    let (m, k) = rows_cols(x, "lora_linear")?;
    let n = b.len() / cfg.r.max(1);
    let sh = LinearShape { m, k, n };
    let bias = bias.map(|b| b.as_slice());
    let f = w0.with_dense(|w0| lora::lora_forward(x.data(), w0, bias, a.data(), b.data(), sh, &cfg, offset, train))?;
    let need = [x.requires_grad(), a.requires_grad(), b.requires_grad()];
    let s = f.s;
    tape.record(f.y, &with_last(x, n), &[x, a, b], || {
        let (x, w0, a, b) = (x.arc().clone(), w0.clone(), a.arc().clone(), b.arc().clone());
        Box::new(move |g| {
            let gr =
                w0.with_dense(|w0| lora::lora_backward(g, &x, w0, &a, &b, &s, sh, &cfg, offset, train, need[0]))?;
            Ok(vec![gr.dx, need[1].then_some(gr.da), need[2].then_some(gr.db)])
        })
    })
}

/// RMSNorm with a frozen weight (see [`crate::ops::norm`]).
pub fn rms_norm(tape: &Tape, x: &Var, w: &Arc<Vec<f32>>, eps: f32) -> Result<Var> {
    let (y, rstd) = norm::rms_norm_forward(x.data(), w, eps)?;
    tape.record(y, x.shape(), &[x], || {
        let (x, w) = (x.arc().clone(), w.clone());
        Box::new(move |g| Ok(vec![Some(norm::rms_norm_backward(g, &x, &w, &rstd))]))
    })
}

/// RoPE on `x [rows, heads·d]`, rows at positions `pos0 + r % seq`.
pub fn rope(tape: &Tape, x: &Var, heads: usize, seq: usize, pos0: usize, table: &Arc<RopeTable>) -> Result<Var> {
    let mut y = x.data().to_vec();
    rope::apply(&mut y, heads, seq, pos0, table, false)?;
    tape.record(y, x.shape(), &[x], || {
        let table = table.clone();
        Box::new(move |g| {
            let mut dx = g.to_vec();
            rope::apply(&mut dx, heads, seq, pos0, &table, true)?;
            Ok(vec![Some(dx)])
        })
    })
}

/// Causal GQA attention (see [`crate::ops::attention`]); output shaped like `q`.
pub fn attention(tape: &Tape, q: &Var, k: &Var, v: &Var, sh: AttnShape) -> Result<Var> {
    let (o, lse) = attention_forward(q.data(), k.data(), v.data(), sh)?;
    let need = [q.requires_grad(), k.requires_grad(), v.requires_grad()];
    tape.record(o, q.shape(), &[q, k, v], || {
        let (q, k, v) = (q.arc().clone(), k.arc().clone(), v.arc().clone());
        Box::new(move |g| {
            let (dq, dk, dv) = attention_backward(g, &q, &k, &v, &lse, sh)?;
            Ok(vec![need[0].then_some(dq), need[1].then_some(dk), need[2].then_some(dv)])
        })
    })
}

/// `silu(g)·u` (see [`crate::ops::activation`]).
pub fn swiglu(tape: &Tape, g: &Var, u: &Var) -> Result<Var> {
    let h = activation::swiglu_forward(g.data(), u.data())?;
    let need = [g.requires_grad(), u.requires_grad()];
    tape.record(h, g.shape(), &[g, u], || {
        let (g, u) = (g.arc().clone(), u.arc().clone());
        Box::new(move |dh| {
            let (dg, du) = activation::swiglu_backward(dh, &g, &u);
            Ok(vec![need[0].then_some(dg), need[1].then_some(du)])
        })
    })
}

/// Causal-LM loss of `logits [B·T, V]` against unshifted `labels [B·T]` (`T = seq`): a scalar.
pub fn causal_lm_loss(tape: &Tape, logits: &Var, labels: &[i64], seq: usize) -> Result<Var> {
    let (_, vocab) = rows_cols(logits, "causal_lm_loss")?;
    let (l, grad) = loss::causal_lm_loss(logits.data(), labels, seq, vocab)?;
    tape.record(vec![l], &[1], &[logits], || Box::new(move |g| Ok(vec![Some(grad.iter().map(|v| v * g[0]).collect())])))
}
