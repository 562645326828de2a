//! The simulator's traffic report: global bytes and tensor-core FLOPs of each LoRA strategy at
//! one shape, relative to the base GEMM alone — our window on memory traffic without a GPU.
//! Printed by `lorafuse report`.

use crate::device::sim::{Schedule, Sim, SimStats};
use crate::device::{Backend, Device};
use crate::ops::gemm::{launch_gemm, GemmLayout, GemmShape};
use crate::ops::lora_fused;
use crate::ops::lora_kernels::{self, LoraWeights};
use crate::ops::lora_unfused;
use crate::ops::philox::DropoutMask;
use crate::tensor::{DType, HostData, Tensor};
use crate::testing::TestRng;
use crate::Result;
use half::bf16;
use std::sync::Arc;

/// One measured row.
#[derive(Debug, Clone)]
pub struct ReportRow {
    pub name: &'static str,
    pub stats: SimStats,
}

/// Runs base GEMM, fused (split, single pass) and unfused LoRA forward, backward and
/// forward+backward in the simulator on x `[m,k]`, W0 `[n,k]`, rank r, dropout p, and returns their
/// counters. The fused backward reads dy once for dS and dB (`lora_bwd_ds_db`), then once more
/// in the dx GEMM that dy·W0 needs anyway.
pub fn lora_traffic(m: usize, n: usize, k: usize, r: usize, p: f32) -> Result<Vec<ReportRow>> {
    let dev: Arc<dyn Device> = Arc::new(Sim::new(Schedule::Lockstep));
    let backend = Backend::Device(dev.clone());
    let mut rng = TestRng::new(1);
    let mut t = |shape: &[usize]| -> Result<Tensor> {
        let v = rng.vec_f32(shape.iter().product()).iter().map(|&x| bf16::from_f32(x)).collect();
        Tensor::from_host(shape, HostData::BF16(v))?.to_backend(&backend)
    };
    let (x, w0, a, b, dy) = (t(&[m, k])?, t(&[n, k])?, t(&[r, k])?, t(&[n, r])?, t(&[m, n])?);
    let cs = Tensor::from_host(&[r], HostData::F32(vec![2.0; r]))?.to_backend(&backend)?;
    let w = LoraWeights { w0: &w0, a: &a, b: &b, col_scale: &cs };
    let mask = DropoutMask::new(p, 1, 0);
    let y = Tensor::empty(&[m, n], DType::F32, &backend)?;
    let mut rows = Vec::new();
    let mut measure = |name: &'static str, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        dev.take_stats();
        f()?;
        rows.push(ReportRow { name, stats: dev.take_stats().unwrap_or_default() });
        Ok(())
    };
    measure("base GEMM x·W0ᵀ", &mut || unsafe {
        launch_gemm(
            dev.as_ref(),
            x.device_ptr()?,
            w0.device_ptr()?,
            y.device_ptr()?,
            GemmShape::dense(m, n, k),
            GemmLayout::Nt,
            DType::F32,
        )
    })?;
    measure("fused (split) forward", &mut || lora_kernels::lora_forward(&dev, &x, &w, &mask, DType::F32).map(drop))?;
    measure("fused (single pass) fwd", &mut || {
        lora_fused::lora_forward_fused(&dev, &x, &w, &mask, DType::F32).map(drop)
    })?;
    measure("unfused forward", &mut || lora_unfused::lora_forward_unfused(&dev, &x, &w, 2.0, &mask).map(drop))?;
    measure("base dx GEMM dy·W0", &mut || unsafe {
        let out = Tensor::empty(&[m, k], DType::F32, &backend)?;
        launch_gemm(
            dev.as_ref(),
            dy.device_ptr()?,
            w0.device_ptr()?,
            out.device_ptr()?,
            GemmShape::dense_for(GemmLayout::Nn, m, k, n),
            GemmLayout::Nn,
            DType::F32,
        )
    })?;
    let fused = lora_kernels::lora_forward(&dev, &x, &w, &mask, DType::F32)?;
    measure("fused backward", &mut || {
        lora_kernels::lora_backward(&dev, &x, &w, &fused.s_scaled, &dy, &mask, DType::F32).map(drop)
    })?;
    let unfused = lora_unfused::lora_forward_unfused(&dev, &x, &w, 2.0, &mask)?;
    measure("unfused backward", &mut || {
        lora_unfused::lora_backward_unfused(&dev, &x, &w, 2.0, &mask, &unfused, &dy).map(drop)
    })?;
    measure("fused (split) fwd+bwd", &mut || {
        let f = lora_kernels::lora_forward(&dev, &x, &w, &mask, DType::F32)?;
        lora_kernels::lora_backward(&dev, &x, &w, &f.s_scaled, &dy, &mask, DType::F32).map(drop)
    })?;
    measure("unfused fwd+bwd", &mut || {
        let f = lora_unfused::lora_forward_unfused(&dev, &x, &w, 2.0, &mask)?;
        lora_unfused::lora_backward_unfused(&dev, &x, &w, 2.0, &mask, &f, &dy).map(drop)
    })?;
    Ok(rows)
}

/// The table `lorafuse report` prints: bytes and FLOPs, and ratios to the base GEMM(s): forward
/// rows to x·W0ᵀ, backward rows to dy·W0, forward+backward rows to both.
pub fn format_table(rows: &[ReportRow]) -> String {
    let base = |name: &str| rows.iter().find(|r| r.name.starts_with(name)).map(|r| r.stats);
    let fwd_base = base("base GEMM").unwrap_or_default();
    let bwd_base = base("base dx").unwrap_or_default();
    let both = SimStats {
        bytes_read: fwd_base.bytes_read + bwd_base.bytes_read,
        bytes_written: fwd_base.bytes_written + bwd_base.bytes_written,
        mma: fwd_base.mma + bwd_base.mma,
        ..Default::default()
    };
    let mut out = format!(
        "{:<26} {:>12} {:>12} {:>14} {:>9} {:>9}\n",
        "launches", "read (B)", "written (B)", "MMA FLOP", "bytes ×", "FLOP ×"
    );
    for r in rows {
        let reference = if r.name.contains("fwd+bwd") {
            both
        } else if r.name.contains("backward") || r.name.starts_with("base dx") {
            bwd_base
        } else {
            fwd_base
        };
        let ratio = |a: u64, b: u64| if b == 0 { f64::NAN } else { a as f64 / b as f64 };
        let s = r.stats;
        out += &format!(
            "{:<26} {:>12} {:>12} {:>14} {:>9.3} {:>9.3}\n",
            r.name,
            s.bytes_read,
            s.bytes_written,
            s.mma_flops(),
            ratio(s.bytes_read + s.bytes_written, reference.bytes_read + reference.bytes_written),
            ratio(s.mma, reference.mma)
        );
    }
    out
}
