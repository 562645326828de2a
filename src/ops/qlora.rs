//! QLoRA on a [`Device`]: NF4 weights (bitsandbytes layout, [`crate::quant`]) uploaded as they
//! are stored, the NF4 → bf16 dequant kernel (`kernels/nf4.cu`), and the QLoRA linear — the
//! fused LoRA forward and backward of [`crate::ops::lora_kernels`] with an NF4 base weight W0.
//!
//! Two arrangements of the base GEMM ([`QloraArrangement`]):
//! - [`QloraArrangement::Scratch`] (default, as the fastest public trainers do it): dequantize W0
//!   into a bf16 scratch buffer the [`QloraLinear`] owns and reuses, then run the bf16 LoRA
//!   kernels on it; backward dequantizes again rather than keep the copy alive in between.
//! - [`QloraArrangement::Fused`]: the `qlora_*` kernels dequantize each 128×64 W0 tile on its way
//!   to shared memory (`Nf4Operand`, `kernels/nf4.cuh`), so no bf16 W0 exists at all.
//!
//! Global traffic for W0 `[N,K]` (blocksize 64, double quant; simulator counters in
//! `tests/nf4_sim.rs`): Scratch moves ≈ 2.52·N·K bytes for the dequant plus 2·N·K per M-tile
//! row of the GEMM (each of the ⌈M/128⌉ CTA rows reads all of W0); Fused reads ≈ 0.58·N·K per
//! M-tile row and nothing else. Fused therefore wins when ⌈M/128⌉ is small (decode-like and
//! short-sequence steps, M ≲ 1–2k tokens) and whenever memory for the scratch copy matters
//! (2·N·K bytes, 4× the NF4 weight); Scratch wins at large M, where W0 tiles come from L2 anyway
//! and the main loop is MMA-bound: its loader is the plain 16-byte copy, while Fused adds
//! ≈ 10 shuffles and 8 multiplies per 8 W0 elements to every CTA's main loop.

use crate::device::params::{Nf4DequantParams, Nf4Weight};
use crate::device::{blocks_for, Device, DeviceBuffer, KernelParams, LaunchConfig, ParamBytes};
use crate::ops::lora_kernels::{lora_backward_with, lora_forward_with, BaseWeight, LoraForward, LoraGrads, LoraParts};
use crate::ops::philox::DropoutMask;
use crate::quant::{Absmax, Nf4Tensor};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};
use std::sync::Arc;

// SAFETY: bindgen-generated #[repr(C)] mirror of kernels/params.h.
unsafe impl KernelParams for Nf4DequantParams {}

/// Elements a warp of `nf4_dequant_bf16` handles per iteration.
const SPAN: usize = 1024;
/// Threads per CTA of the dequant kernel.
const THREADS: usize = 256;
/// CTAs at most (grid-stride beyond): 8 per SM on 132 SMs, so every SM has 2048 threads'
/// 16-byte loads in flight; each CTA also stages the 1 KiB nested map once.
const MAX_CTAS: usize = 1056;

/// An NF4 weight on a device, stored exactly as in a bnb-4bit checkpoint: packed nibbles, and
/// f32 absmax or double-quantized statistics (u8 codes, nested absmax, the 256-entry map, the
/// offset). Bytes on the device: [`Nf4Tensor::nbytes`].
#[derive(Debug)]
pub struct Nf4DeviceWeight {
    shape: Vec<usize>,
    blocksize: usize,
    packed: DeviceBuffer,
    /// f32 absmax, or the u8 double-quant codes.
    absmax: DeviceBuffer,
    nested: Option<Nested>,
}

#[derive(Debug)]
struct Nested {
    absmax: DeviceBuffer,
    map: DeviceBuffer,
    offset: f32,
    log2: u32,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Nf4DeviceWeight {
    /// Uploads `t` after checking it ([`Nf4Tensor::validate`], [`crate::quant::DoubleQuant::validate`]
    /// and what the kernels assume); `what` names the tensor in errors.
    pub fn upload(dev: &Arc<dyn Device>, t: &Nf4Tensor, what: &str) -> Result<Self> {
        t.validate(what)?;
        if t.numel() > i64::MAX as usize / 2 {
            return Err(Error::shape(what, format!("{} elements exceed the kernels' indices", t.numel())));
        }
        let packed = DeviceBuffer::from_host(dev, &t.packed)?;
        let (absmax, nested) = match &t.absmax {
            Absmax::F32(v) => (DeviceBuffer::from_host(dev, &f32_bytes(v))?, None),
            Absmax::Double(d) => {
                d.validate(what)?;
                let nb = d.nested_blocksize;
                if !nb.is_power_of_two() || nb * t.blocksize < SPAN {
                    return Err(Error::format(
                        what,
                        format!(
                            "nested_blocksize {nb} unsupported: the kernels need a power of two with \
                             nested_blocksize·blocksize ≥ {SPAN} (bitsandbytes writes 256)"
                        ),
                    ));
                }
                let nested = Nested {
                    absmax: DeviceBuffer::from_host(dev, &f32_bytes(&d.nested_absmax))?,
                    map: DeviceBuffer::from_host(dev, &f32_bytes(&d.nested_map))?,
                    offset: d.offset,
                    log2: nb.trailing_zeros(),
                };
                (DeviceBuffer::from_host(dev, &d.codes)?, Some(nested))
            }
        };
        Ok(Nf4DeviceWeight { shape: t.shape.clone(), blocksize: t.blocksize, packed, absmax, nested })
    }

    /// The original shape (`[out_features, in_features]` for a Linear).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Elements per absmax block.
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }

    /// Whether the statistics are double-quantized.
    pub fn double_quant(&self) -> bool {
        self.nested.is_some()
    }

    /// Bytes the weight occupies on the device (packed + statistics + map).
    pub fn nbytes(&self) -> usize {
        self.packed.len() + self.absmax.len() + self.nested.as_ref().map_or(0, |n| n.absmax.len() + n.map.len() + 4)
    }

    /// The kernels' view (`Nf4Weight` of kernels/params.h).
    pub(crate) fn params(&self) -> Nf4Weight {
        use std::ptr::null;
        let (absmax, absmax_code, nested_absmax, nested_map, nested_offset, nested_log2) = match &self.nested {
            None => (self.absmax.ptr().as_ptr(), null::<u8>(), null::<f32>(), null::<f32>(), 0.0, 0),
            Some(n) => (
                null(),
                self.absmax.ptr().as_ptr(),
                n.absmax.ptr().as_ptr(),
                n.map.ptr().as_ptr(),
                n.offset,
                n.log2 as i32,
            ),
        };
        Nf4Weight {
            packed: self.packed.ptr().as_ptr(),
            absmax,
            absmax_code,
            nested_absmax,
            nested_map,
            nested_offset,
            blocksize_log2: self.blocksize.trailing_zeros() as i32,
            nested_log2,
            n: self.numel() as i64,
        }
    }
}

/// Dequantizes `w` into `out` (bf16, `w.numel()` elements, any shape), bit-exact with
/// [`Nf4Tensor::dequantize`] to bf16. One pass; bytes moved per element are in `kernels/nf4.cu`.
pub fn dequantize_nf4(dev: &Arc<dyn Device>, w: &Nf4DeviceWeight, out: &Tensor) -> Result<()> {
    if out.dtype() != DType::BF16 || out.numel() != w.numel() {
        return Err(Error::shape(
            "nf4 dequantize",
            format!(
                "output is {:?} {:?}, the NF4 weight {:?} needs {} bf16 elements",
                out.shape(),
                out.dtype(),
                w.shape(),
                w.numel()
            ),
        ));
    }
    let p = Nf4DequantParams { w: w.params(), out: out.device_ptr()?.as_mut_ptr() };
    let ctas = blocks_for(w.numel().div_ceil(SPAN), THREADS / 32)?.min(MAX_CTAS as u32);
    let cfg = LaunchConfig { grid: (ctas, 1, 1), block: (THREADS as u32, 1, 1), dynamic_smem_bytes: 0 };
    // SAFETY: `w`'s buffers were sized from a validated Nf4Tensor; `out` holds numel bf16.
    unsafe { dev.launch("nf4_dequant_bf16", &cfg, ParamBytes::new(&p)) }
}

/// How the QLoRA linear runs its base GEMM on the NF4 W0 (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QloraArrangement {
    /// Dequantize W0 into a reused bf16 scratch buffer, then the bf16 LoRA kernels.
    #[default]
    Scratch,
    /// Dequantize W0 tile by tile inside the GEMM main loop (`qlora_*` kernels).
    Fused,
}

/// The LoRA adapter of a QLoRA linear (device tensors, as in [`crate::ops::lora_kernels::LoraWeights`] without W0).
#[derive(Debug, Clone, Copy)]
pub struct QloraAdapter<'a> {
    /// A `[R,K]` bf16.
    pub a: &'a Tensor,
    /// B `[N,R]` bf16.
    pub b: &'a Tensor,
    /// `[R]` f32: alpha/r of each column of S.
    pub col_scale: &'a Tensor,
}

/// A LoRA linear over a frozen NF4 base weight W0 `[N,K]`: y = x·W0ᵀ + (drop(x)·Aᵀ ⊙ c)·Bᵀ and its
/// backward, with W0 dequantized per call ([`QloraArrangement`]). Owns the uploaded weight and,
/// for [`QloraArrangement::Scratch`], one bf16 `[N,K]` scratch buffer reused by every call.
#[derive(Debug)]
pub struct QloraLinear {
    dev: Arc<dyn Device>,
    w0: Nf4DeviceWeight,
    arrangement: QloraArrangement,
    scratch: Option<Tensor>,
}

impl QloraLinear {
    /// Uploads `w0` (a 2-D NF4 weight `[N,K]`; `what` names it in errors).
    pub fn new(dev: &Arc<dyn Device>, w0: &Nf4Tensor, what: &str, arrangement: QloraArrangement) -> Result<Self> {
        if w0.shape.len() != 2 {
            return Err(Error::shape(what, format!("QLoRA W0 must be [out, in], got {:?}", w0.shape)));
        }
        let w0 = Nf4DeviceWeight::upload(dev, w0, what)?;
        Ok(QloraLinear { dev: dev.clone(), w0, arrangement, scratch: None })
    }

    /// The uploaded NF4 weight.
    pub fn weight(&self) -> &Nf4DeviceWeight {
        &self.w0
    }

    pub fn arrangement(&self) -> QloraArrangement {
        self.arrangement
    }

    /// Bytes of the bf16 scratch buffer currently held (0 for Fused).
    pub fn scratch_bytes(&self) -> usize {
        self.scratch.as_ref().map_or(0, Tensor::size_bytes)
    }

    /// The base weight for one call: the scratch buffer freshly dequantized, or the NF4 weight.
    fn base(&mut self) -> Result<BaseWeight<'_>> {
        let [n, k] = [self.w0.shape[0], self.w0.shape[1]];
        match self.arrangement {
            QloraArrangement::Fused => Ok(BaseWeight::Nf4 { w: self.w0.params(), n, k }),
            QloraArrangement::Scratch => {
                if self.scratch.is_none() {
                    let backend = crate::device::Backend::Device(self.dev.clone());
                    self.scratch = Some(Tensor::empty(&[n, k], DType::BF16, &backend)?);
                }
                let scratch = self.scratch.as_ref().expect("allocated above");
                dequantize_nf4(&self.dev, &self.w0, scratch)?;
                Ok(BaseWeight::Bf16(scratch))
            }
        }
    }

    /// Forward: as [`crate::ops::lora_kernels::lora_forward`] with W0 dequantized first.
    pub fn forward(&mut self, x: &Tensor, ad: &QloraAdapter, drop: &DropoutMask, out: DType) -> Result<LoraForward> {
        let dev = self.dev.clone();
        let w0 = self.base()?;
        lora_forward_with(&dev, x, &LoraParts { w0, a: ad.a, b: ad.b, col_scale: ad.col_scale }, drop, out)
    }

    /// Backward: as [`crate::ops::lora_kernels::lora_backward`]; W0 is dequantized again (Scratch)
    /// or read as NF4 by the dx kernel (Fused).
    pub fn backward(
        &mut self,
        x: &Tensor,
        ad: &QloraAdapter,
        s_scaled: &Tensor,
        dy: &Tensor,
        drop: &DropoutMask,
        out: DType,
    ) -> Result<LoraGrads> {
        let dev = self.dev.clone();
        let w0 = self.base()?;
        lora_backward_with(
            &dev,
            x,
            &LoraParts { w0, a: ad.a, b: ad.b, col_scale: ad.col_scale },
            s_scaled,
            dy,
            drop,
            out,
        )
    }
}
