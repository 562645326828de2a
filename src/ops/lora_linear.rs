//! The public LoRA linear: one API on every backend.
//!
//! `y = x·W0ᵀ + s·(drop(x)·Aᵀ)·Bᵀ` with `x [M,K]`, `W0 [N,K]` (frozen), `A [r,K]`, `B [N,r]`,
//! `s = alpha/r` (rsLoRA: `alpha/√r`), and `drop(x) = x ⊙ mask/(1−p)` with the mask drawn from
//! Philox-4x32-10 keyed by `seed` at counter (element/4, `offset`) — never stored: backward
//! regenerates it. Backward, given `dy [M,N]` and the saved `S = drop(x)·Aᵀ [M,r]`:
//! `dB = s·dyᵀ·S`, `dS = s·dy·B`, `dA = dSᵀ·drop(x)`, `dx = dy·W0 + drop'(dS·A)`.
//!
//! On the CPU the tensors are f32 and [`crate::ops::lora`] does the work; on a device (GPU or
//! simulator) they are bf16 and the fused kernels of `kernels/lora.cu` run (or, with
//! [`Strategy::Unfused`], the PEFT-style sequence of `ops::lora_unfused`).
//!
//! ```
//! use lorafuse::device::Backend;
//! use lorafuse::ops::lora::LoraOpConfig;
//! use lorafuse::ops::lora_linear::{LoraLinear, LoraParams, Strategy};
//! use lorafuse::tensor::{HostData, Tensor};
//!
//! let (m, k, n, r) = (4, 16, 8, 2);
//! let cfg = LoraOpConfig { r, alpha: 16.0, dropout: 0.1, use_rslora: false, seed: 7 };
//! let lora = LoraLinear { cfg, strategy: Strategy::Split };
//! let t = |shape: &[usize]| {
//!     let n: usize = shape.iter().product();
//!     Tensor::from_host(shape, HostData::F32((0..n).map(|i| (i as f32 * 0.37).sin()).collect())).unwrap()
//! };
//! let (x, w0, a, b) = (t(&[m, k]), t(&[n, k]), t(&[r, k]), t(&[n, r]));
//! for backend in [Backend::cpu(), Backend::sim()] {
//!     let on = |t: &Tensor| lora.prepare(t, &backend).unwrap();
//!     let (x, w0, a, b) = (on(&x), on(&w0), on(&a), on(&b));
//!     let p = LoraParams { w0: &w0, a: &a, b: &b };
//!     let (y, saved) = lora.forward(&backend, &x, &p, /* offset */ 0, /* train */ true).unwrap();
//!     assert_eq!(y.shape(), &[m, n]);
//!     let dy = lora.prepare(&t(&[m, n]), &backend).unwrap();
//!     let g = lora.backward(&backend, &x, &p, &saved, &dy).unwrap();
//!     assert_eq!((g.dx.shape(), g.da.shape(), g.db.shape()), (&[m, k][..], &[r, k][..], &[n, r][..]));
//! }
//! ```

use crate::device::Backend;
use crate::ops::lora::{self, LinearShape, LoraOpConfig};
use crate::ops::lora_fused;
use crate::ops::lora_kernels::{self, LoraWeights};
use crate::ops::lora_unfused::{self, UnfusedForward};
use crate::ops::philox::DropoutMask;
use crate::tensor::{DType, HostData, Tensor};
use crate::{Error, Result};
use half::bf16;

/// How a device computes the forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// `lora_down` (S from one read of x, dropout in registers) then the base GEMM with the
    /// up-projection as extra K columns (LoRAFusion's arrangement).
    Split,
    /// One kernel: the base GEMM's main loop also accumulates S from the x tiles in shared
    /// memory, the epilogue adds the up-projection (r ≤ 64; best without dropout and for small
    /// N, see kernels/lora_fused.cu). Backward is the split strategy's.
    SinglePass,
    /// PEFT's sequence of separate kernels with a materialized dropout copy (the baseline).
    Unfused,
}

/// A LoRA-adapted linear layer's hyper-parameters and kernel strategy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraLinear {
    pub cfg: LoraOpConfig,
    pub strategy: Strategy,
}

/// The weights, on the backend the call runs on (f32 on the CPU, bf16 on a device).
#[derive(Debug, Clone, Copy)]
pub struct LoraParams<'a> {
    /// W0 `[N,K]`.
    pub w0: &'a Tensor,
    /// A `[r,K]`.
    pub a: &'a Tensor,
    /// B `[N,r]`.
    pub b: &'a Tensor,
}

/// What backward needs from the forward: S and the dropout call's offset (the mask itself is
/// regenerated).
#[derive(Debug)]
pub struct LoraSaved {
    offset: u64,
    train: bool,
    inner: Saved,
}

#[derive(Debug)]
enum Saved {
    Cpu { s: Vec<f32> },
    Fused { s_scaled: Tensor },
    Unfused(UnfusedForward),
}

/// Gradients: `dx [M,K]`, `dA [r,K]`, `dB [N,r]` (f32 on every backend).
#[derive(Debug)]
pub struct LoraGradients {
    pub dx: Tensor,
    pub da: Tensor,
    pub db: Tensor,
}

fn host_f32(t: &Tensor, what: &str) -> Result<Vec<f32>> {
    match t.to_host()? {
        HostData::F32(v) => Ok(v),
        other => Err(Error::shape("lora_linear", format!("{what} must be f32 on the CPU, got {:?}", other.dtype()))),
    }
}

fn shape2(t: &Tensor, what: &str) -> Result<(usize, usize)> {
    match t.shape() {
        &[r, c] => Ok((r, c)),
        s => Err(Error::shape("lora_linear", format!("{what} must be a matrix, got shape {s:?}"))),
    }
}

impl LoraLinear {
    /// `t` converted to what `backend` computes on: f32 host data for the CPU, bf16 on a device.
    pub fn prepare(&self, t: &Tensor, backend: &Backend) -> Result<Tensor> {
        let values = t.to_host()?.to_f32();
        let data = match backend {
            Backend::Cpu => HostData::F32(values),
            Backend::Device(_) => HostData::BF16(values.iter().map(|&v| bf16::from_f32(v)).collect()),
        };
        Tensor::from_host(t.shape(), data)?.to_backend(backend)
    }

    fn dims(&self, x: &Tensor, p: &LoraParams) -> Result<LinearShape> {
        let ((m, k), (n, kw)) = (shape2(x, "x")?, shape2(p.w0, "W0")?);
        let r = self.cfg.r;
        if kw != k || shape2(p.a, "A")? != (r, k) || shape2(p.b, "B")? != (n, r) {
            return Err(Error::shape(
                "lora_linear",
                format!(
                    "x {:?}, W0 {:?}, A {:?}, B {:?} do not fit r = {r}",
                    x.shape(),
                    p.w0.shape(),
                    p.a.shape(),
                    p.b.shape()
                ),
            ));
        }
        Ok(LinearShape { m, k, n })
    }

    fn mask(&self, offset: u64, train: bool) -> Result<DropoutMask> {
        if !(0.0..1.0).contains(&self.cfg.dropout) {
            return Err(Error::config("lora dropout", format!("{} is not in [0, 1)", self.cfg.dropout)));
        }
        Ok(self.cfg.mask(offset, train))
    }

    /// Forward: returns `y [M,N]` (f32) and what backward needs. `offset` selects this call's
    /// dropout mask (distinct per layer and step); `train = false` disables dropout.
    pub fn forward(
        &self,
        backend: &Backend,
        x: &Tensor,
        p: &LoraParams,
        offset: u64,
        train: bool,
    ) -> Result<(Tensor, LoraSaved)> {
        let sh = self.dims(x, p)?;
        let mask = self.mask(offset, train)?;
        let (y, inner) = match backend {
            Backend::Cpu => {
                let (xs, w0, a, b) =
                    (host_f32(x, "x")?, host_f32(p.w0, "W0")?, host_f32(p.a, "A")?, host_f32(p.b, "B")?);
                let f = lora::lora_forward(&xs, &w0, None, &a, &b, sh, &self.cfg, offset, train)?;
                (Tensor::from_host(&[sh.m, sh.n], HostData::F32(f.y))?, Saved::Cpu { s: f.s })
            }
            Backend::Device(dev) => match self.strategy {
                Strategy::Split | Strategy::SinglePass => {
                    let cs = self.col_scale(backend)?;
                    let w = LoraWeights { w0: p.w0, a: p.a, b: p.b, col_scale: &cs };
                    let f = if self.strategy == Strategy::Split {
                        lora_kernels::lora_forward(dev, x, &w, &mask, DType::F32)?
                    } else {
                        lora_fused::lora_forward_fused(dev, x, &w, &mask, DType::F32)?
                    };
                    (f.y, Saved::Fused { s_scaled: f.s_scaled })
                }
                Strategy::Unfused => {
                    let cs = self.col_scale(backend)?;
                    let w = LoraWeights { w0: p.w0, a: p.a, b: p.b, col_scale: &cs };
                    let mut f = lora_unfused::lora_forward_unfused(dev, x, &w, self.cfg.scaling(), &mask)?;
                    let y = std::mem::replace(&mut f.y, Tensor::empty(&[0], DType::F32, backend)?);
                    (y, Saved::Unfused(f))
                }
            },
        };
        Ok((y, LoraSaved { offset, train, inner }))
    }

    /// Backward: `dx`, `dA`, `dB` from `dy [M,N]` and the forward's saved state.
    pub fn backward(
        &self,
        backend: &Backend,
        x: &Tensor,
        p: &LoraParams,
        saved: &LoraSaved,
        dy: &Tensor,
    ) -> Result<LoraGradients> {
        let sh = self.dims(x, p)?;
        let mask = self.mask(saved.offset, saved.train)?;
        let (m, k, n, r) = (sh.m, sh.k, sh.n, self.cfg.r);
        match (&saved.inner, backend) {
            (Saved::Cpu { s }, Backend::Cpu) => {
                let (xs, w0, a, b, dys) = (
                    host_f32(x, "x")?,
                    host_f32(p.w0, "W0")?,
                    host_f32(p.a, "A")?,
                    host_f32(p.b, "B")?,
                    host_f32(dy, "dy")?,
                );
                let g = lora::lora_backward(&dys, &xs, &w0, &a, &b, s, sh, &self.cfg, saved.offset, saved.train, true)?;
                let dx = g.dx.ok_or_else(|| Error::shape("lora_linear", "CPU backward returned no dx"))?;
                Ok(LoraGradients {
                    dx: Tensor::from_host(&[m, k], HostData::F32(dx))?,
                    da: Tensor::from_host(&[r, k], HostData::F32(g.da))?,
                    db: Tensor::from_host(&[n, r], HostData::F32(g.db))?,
                })
            }
            (Saved::Fused { s_scaled }, Backend::Device(dev)) => {
                let cs = self.col_scale(backend)?;
                let w = LoraWeights { w0: p.w0, a: p.a, b: p.b, col_scale: &cs };
                let g = lora_kernels::lora_backward(dev, x, &w, s_scaled, dy, &mask, DType::F32)?;
                Ok(LoraGradients { dx: g.dx, da: g.da, db: g.db })
            }
            (Saved::Unfused(f), Backend::Device(dev)) => {
                let cs = self.col_scale(backend)?;
                let w = LoraWeights { w0: p.w0, a: p.a, b: p.b, col_scale: &cs };
                let (dx, da, db) = lora_unfused::lora_backward_unfused(dev, x, &w, self.cfg.scaling(), &mask, f, dy)?;
                Ok(LoraGradients { dx, da, db })
            }
            _ => Err(Error::shape("lora_linear", "backward on a different backend than the forward")),
        }
    }

    fn col_scale(&self, backend: &Backend) -> Result<Tensor> {
        Tensor::from_host(&[self.cfg.r], HostData::F32(vec![self.cfg.scaling(); self.cfg.r]))?.to_backend(backend)
    }
}
