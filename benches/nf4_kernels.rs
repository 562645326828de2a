//! NF4 dequant throughput and the QLoRA linear vs the LoRA linear, on CUDA when present
//! ("skipped: no CUDA device" otherwise) and on the CPU always.
//!
//! - `dequant`: NF4 (blocksize 64, double quant) → bf16; throughput counts the minimum bytes
//!   moved (packed + statistics + map + bf16 out, 2.52 B/weight), so GB/s compares directly
//!   with the HBM bandwidth.
//! - `linear`: forward + backward of one adapted linear, W0 bf16 (LoRA) vs NF4 (QLoRA: the
//!   Scratch and Fused arrangements of `ops::qlora`). CPU side: f32 ops of `ops::lora`, QLoRA as
//!   the CPU dequant (`src/quant`) + the same op.
//!
//! Run: `cargo bench --bench nf4_kernels`

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use lorafuse::device::cuda::{unavailable_reason, Cuda};
use lorafuse::device::{Backend, Device};
use lorafuse::ops::lora::{lora_backward as cpu_lora_backward, lora_forward as cpu_lora_forward};
use lorafuse::ops::lora::{LinearShape, LoraOpConfig};
use lorafuse::ops::lora_kernels::{lora_backward, lora_forward, LoraWeights};
use lorafuse::ops::philox::DropoutMask;
use lorafuse::ops::qlora::{dequantize_nf4, Nf4DeviceWeight, QloraAdapter, QloraArrangement, QloraLinear};
use lorafuse::quant::{Absmax, Nf4Config, Nf4Tensor};
use lorafuse::tensor::{DType, HostData, Tensor};
use std::sync::Arc;

fn pseudo_normal(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed | 1;
    let mut u = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n).map(|_| (u() + u() + u() - 1.5) * scale).collect()
}

fn bf16s(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn quantized(rows: usize, cols: usize) -> Nf4Tensor {
    Nf4Tensor::quantize(&bf16s(&pseudo_normal(rows * cols, 7, 0.02)), &[rows, cols], Nf4Config::default()).unwrap()
}

/// Minimum bytes of a dequant to bf16: packed + statistics (+ map) + output.
fn dequant_bytes(t: &Nf4Tensor) -> u64 {
    let stats = match &t.absmax {
        Absmax::F32(v) => 4 * v.len(),
        Absmax::Double(d) => d.codes.len() + 4 * d.nested_absmax.len() + 4 * d.nested_map.len(),
    };
    (t.packed.len() + stats + 2 * t.numel()) as u64
}

fn cpu(c: &mut Criterion) {
    let t = quantized(4096, 4096);
    let mut g = c.benchmark_group("nf4_kernels_cpu");
    g.sample_size(10);
    let mut out = vec![bf16::ZERO; t.numel()];
    g.throughput(Throughput::Bytes(dequant_bytes(&t)));
    g.bench_function("dequant_4096x4096_bs64_dq", |b| b.iter(|| t.dequantize_into(black_box(&mut out)).unwrap()));

    // One adapted linear, forward + backward (f32 CPU ops).
    let (m, n, k, r) = (128, 1024, 1024, 16);
    let sh = LinearShape { m, k, n };
    let cfg = LoraOpConfig::default_for(r);
    let q = quantized(n, k);
    let w0: Vec<f32> = q.dequantize::<f32>().unwrap();
    let x = pseudo_normal(m * k, 1, 1.0);
    let a = pseudo_normal(r * k, 2, 0.05);
    let bm = pseudo_normal(n * r, 3, 0.05);
    let dy = pseudo_normal(m * n, 4, 1.0);
    g.throughput(Throughput::Elements((m * n * k) as u64));
    let step = |w0: &[f32]| {
        let f = cpu_lora_forward(&x, w0, None, &a, &bm, sh, &cfg, 0, true).unwrap();
        cpu_lora_backward(&dy, &x, w0, &a, &bm, &f.s, sh, &cfg, 0, true, true).unwrap()
    };
    g.bench_function("lora_linear_fwd_bwd_128x1024x1024", |b| b.iter(|| step(black_box(&w0))));
    let mut scratch = vec![0f32; n * k];
    g.bench_function("qlora_linear_fwd_bwd_128x1024x1024", |b| {
        b.iter(|| {
            // Dequantize for forward and again for backward, as the device path does.
            q.dequantize_into(&mut scratch).unwrap();
            let f = cpu_lora_forward(&x, &scratch, None, &a, &bm, sh, &cfg, 0, true).unwrap();
            q.dequantize_into(&mut scratch).unwrap();
            cpu_lora_backward(&dy, &x, &scratch, &a, &bm, &f.s, sh, &cfg, 0, true, true).unwrap()
        })
    });
    g.finish();
}

fn upload(dev: &Arc<dyn Device>, shape: &[usize], v: &[f32], dtype: DType) -> Tensor {
    let data = match dtype {
        DType::BF16 => HostData::BF16(bf16s(v)),
        _ => HostData::F32(v.to_vec()),
    };
    Tensor::from_host(shape, data).unwrap().to_backend(&Backend::Device(dev.clone())).unwrap()
}

fn cuda(c: &mut Criterion) {
    if let Some(why) = unavailable_reason() {
        println!("nf4_kernels_cuda: skipped: no CUDA device ({why})");
        return;
    }
    let dev: Arc<dyn Device> = Arc::new(Cuda::new(0).expect("a device was reported present"));
    let mut g = c.benchmark_group("nf4_kernels_cuda");
    g.sample_size(20);
    for (rows, cols) in [(4096, 4096), (8192, 8192)] {
        let t = quantized(rows, cols);
        let w = Nf4DeviceWeight::upload(&dev, &t, "w").unwrap();
        let out = Tensor::empty(&[rows, cols], DType::BF16, &Backend::Device(dev.clone())).unwrap();
        g.throughput(Throughput::Bytes(dequant_bytes(&t)));
        g.bench_function(format!("dequant_{rows}x{cols}_bs64_dq"), |b| {
            b.iter(|| {
                dequantize_nf4(&dev, &w, &out).unwrap();
                dev.synchronize().unwrap();
            })
        });
    }

    let (m, n, k, r) = (2048, 4096, 4096, 16);
    let q = quantized(n, k);
    let w0 = upload(&dev, &[n, k], &q.dequantize::<f32>().unwrap(), DType::BF16);
    let x = upload(&dev, &[m, k], &pseudo_normal(m * k, 1, 1.0), DType::BF16);
    let a = upload(&dev, &[r, k], &pseudo_normal(r * k, 2, 0.05), DType::BF16);
    let b = upload(&dev, &[n, r], &pseudo_normal(n * r, 3, 0.05), DType::BF16);
    let dy = upload(&dev, &[m, n], &pseudo_normal(m * n, 4, 1.0), DType::BF16);
    let cs = upload(&dev, &[r], &vec![1.0; r], DType::F32);
    let mask = DropoutMask::new(0.1, 1, 0);
    g.throughput(Throughput::Elements((m * n * k) as u64));
    let lw = LoraWeights { w0: &w0, a: &a, b: &b, col_scale: &cs };
    g.bench_function(format!("lora_linear_fwd_bwd_{m}x{n}x{k}"), |bch| {
        bch.iter(|| {
            let f = lora_forward(&dev, &x, &lw, &mask, DType::BF16).unwrap();
            lora_backward(&dev, &x, &lw, &f.s_scaled, &dy, &mask, DType::BF16).unwrap();
            dev.synchronize().unwrap();
        })
    });
    let ad = QloraAdapter { a: &a, b: &b, col_scale: &cs };
    for arr in [QloraArrangement::Scratch, QloraArrangement::Fused] {
        let mut ql = QloraLinear::new(&dev, &q, "w0", arr).unwrap();
        g.bench_function(format!("qlora_{arr:?}_linear_fwd_bwd_{m}x{n}x{k}"), |bch| {
            bch.iter(|| {
                let f = ql.forward(&x, &ad, &mask, DType::BF16).unwrap();
                ql.backward(&x, &ad, &f.s_scaled, &dy, &mask, DType::BF16).unwrap();
                dev.synchronize().unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, cpu, cuda);
criterion_main!(benches);
