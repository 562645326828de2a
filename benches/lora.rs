//! Fused vs unfused LoRA linear, forward and forward+backward.
//!
//! - CPU (always): our plain frozen linear, the fused CPU op (`ops::lora`, dropout mask
//!   regenerated chunk by chunk) and a PEFT-style unfused sequence (dropout materialized as a
//!   copy of x kept for backward), forward and forward+backward: group `lora_cpu` at the shapes
//!   of the CPU targets, group `lora_cpu_7b` at Llama-7B shapes with r ∈ {8, 16, 64}.
//!   Throughput is in FLOPs of the LoRA linear (criterion's "elem/s" = FLOP/s). Compare with
//!   PyTorch + PEFT via `scripts/bench_lora_cpu.py` in the same session; `lorafuse bench` gives
//!   the fused/plain ratio from alternated calls, steadier on a noisy machine.
//! - CUDA (when a device is present): both fused strategies (split, single pass) vs the unfused
//!   kernels vs the base GEMM alone and the plain linear's two GEMMs (forward + dx), at
//!   Llama-7B shapes, timed with CUDA events, warm-up outside the timing. bf16 outputs, except
//!   the unfused kernels', which write f32.
//!   Without a device the group prints "skipped: no CUDA device".

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use half::bf16;
use lorafuse::device::cuda::{unavailable_reason, Cuda};
use lorafuse::device::{Backend, Device};
use lorafuse::ops::gemm::{launch_gemm, GemmLayout, GemmShape};
use lorafuse::ops::lora::{linear, linear_backward_input, lora_backward, lora_forward, LinearShape, LoraOpConfig};
use lorafuse::ops::lora_fused::lora_forward_fused;
use lorafuse::ops::lora_kernels::{self, LoraWeights};
use lorafuse::ops::lora_unfused;
use lorafuse::ops::matmul::{gemm, Tr};
use lorafuse::tensor::{DType, HostData, Tensor};
use lorafuse::testing::TestRng;
use std::sync::Arc;
use std::time::Duration;

/// FLOPs of LoRA forward (base + down + up) and of forward+backward (+ dx base, dS, dB, dA, dS·A).
fn flops(m: usize, k: usize, n: usize, r: usize, backward: bool) -> u64 {
    let (m, k, n, r) = (m as u64, k as u64, n as u64, r as u64);
    let fwd = 2 * m * n * k + 2 * m * r * k + 2 * m * n * r;
    if backward {
        fwd + 2 * m * n * k + 2 * m * n * r * 2 + 2 * r * k * m * 2
    } else {
        fwd
    }
}

/// PEFT's forward on the CPU: drop(x) materialized (and kept for backward), then separate
/// GEMMs. Returns (y, drop(x), S).
fn unfused_cpu_forward(
    x: &[f32],
    w0: &[f32],
    a: &[f32],
    b: &[f32],
    sh: LinearShape,
    cfg: &LoraOpConfig,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let LinearShape { m, k, n } = sh;
    let r = cfg.r;
    let mut xd = vec![0.0; m * k];
    cfg.mask(3, true).apply(0, x, &mut xd);
    let mut y = linear(x, w0, None, sh).expect("shapes checked");
    let mut sv = vec![0.0; m * r];
    gemm(m, r, k, 1.0, &xd, Tr::N, a, Tr::T, 0.0, &mut sv, true);
    gemm(m, n, r, cfg.scaling(), &sv, Tr::N, b, Tr::T, 1.0, &mut y, true);
    (y, xd, sv)
}

/// PEFT's forward + backward on the CPU: the forward above, then dB, dS, dA, dS·A, the mask
/// applied to it as a separate pass, and dx.
#[allow(clippy::too_many_arguments)]
fn unfused_cpu_step(
    x: &[f32],
    w0: &[f32],
    a: &[f32],
    b: &[f32],
    dy: &[f32],
    sh: LinearShape,
    cfg: &LoraOpConfig,
) -> f32 {
    let LinearShape { m, k, n } = sh;
    let (r, s) = (cfg.r, cfg.scaling());
    let (y, xd, sv) = unfused_cpu_forward(x, w0, a, b, sh, cfg);
    let mut db = vec![0.0; n * r];
    gemm(n, r, m, s, dy, Tr::T, &sv, Tr::N, 0.0, &mut db, true);
    let mut ds = vec![0.0; m * r];
    gemm(m, r, n, s, dy, Tr::N, b, Tr::N, 0.0, &mut ds, true);
    let mut da = vec![0.0; r * k];
    gemm(r, k, m, 1.0, &ds, Tr::T, &xd, Tr::N, 0.0, &mut da, true);
    let mut dxd = vec![0.0; m * k];
    gemm(m, k, r, 1.0, &ds, Tr::N, a, Tr::N, 0.0, &mut dxd, true);
    let mut dxl = vec![0.0; m * k];
    cfg.mask(3, true).apply(0, &dxd, &mut dxl);
    let mut dx = linear_backward_input(dy, w0, sh);
    dx.iter_mut().zip(&dxl).for_each(|(d, l)| *d += l);
    y[0] + dx[0] + da[0] + db[0]
}

/// The CPU benches of one shape: the fused op and PEFT's unfused sequence, forward and
/// forward+backward, and (with `plain`) the frozen linear alone.
fn cpu_shape(group: &mut BenchmarkGroup<WallTime>, (m, k, n, r): (usize, usize, usize, usize), p: f32, plain: bool) {
    let mut rng = TestRng::new(1);
    let sh = LinearShape { m, k, n };
    let (x, w0, a, b, dy) =
        (rng.vec_f32(m * k), rng.vec_f32(n * k), rng.vec_f32(r * k), rng.vec_f32(n * r), rng.vec_f32(m * n));
    let cfg = LoraOpConfig { r, alpha: 16.0, dropout: p, use_rslora: false, seed: 5 };
    let (id, plain_id) = (format!("m{m}_k{k}_n{n}_r{r}_p{p}"), format!("m{m}_k{k}_n{n}"));
    if plain {
        group.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        group.bench_function(BenchmarkId::new("plain_linear_fwd", &plain_id), |bch| {
            bch.iter(|| linear(&x, &w0, None, sh).unwrap()[0])
        });
        group.throughput(Throughput::Elements(4 * (m * n * k) as u64));
        group.bench_function(BenchmarkId::new("plain_linear_fwd_bwd", &plain_id), |bch| {
            bch.iter(|| {
                let y = linear(&x, &w0, None, sh).unwrap();
                let dx = linear_backward_input(&dy, &w0, sh);
                y[0] + dx[0]
            })
        });
    }
    group.throughput(Throughput::Elements(flops(m, k, n, r, false)));
    group.bench_function(BenchmarkId::new("fused_fwd", &id), |bch| {
        bch.iter(|| lora_forward(&x, &w0, None, &a, &b, sh, &cfg, 3, true).unwrap().y[0])
    });
    group.bench_function(BenchmarkId::new("unfused_fwd", &id), |bch| {
        bch.iter(|| unfused_cpu_forward(&x, &w0, &a, &b, sh, &cfg).0[0])
    });
    group.throughput(Throughput::Elements(flops(m, k, n, r, true)));
    group.bench_function(BenchmarkId::new("fused_fwd_bwd", &id), |bch| {
        bch.iter(|| {
            let f = lora_forward(&x, &w0, None, &a, &b, sh, &cfg, 3, true).unwrap();
            let g = lora_backward(&dy, &x, &w0, &a, &b, &f.s, sh, &cfg, 3, true, true).unwrap();
            f.y[0] + g.da[0]
        })
    });
    group.bench_function(BenchmarkId::new("unfused_fwd_bwd", &id), |bch| {
        bch.iter(|| unfused_cpu_step(&x, &w0, &a, &b, &dy, sh, &cfg))
    });
}

/// The CPU target shapes (M=512, K=N=1024; 2048³), r = 16.
fn cpu(c: &mut Criterion) {
    // As the trainer does: without it every call's fresh 2 MB outputs come back from mmap as new
    // pages, and the page faults (~2,800 per fwd+bwd here) cost 15-20% of the plain linear's
    // median time on a 2-core machine, hiding the kernels' own cost.
    lorafuse::train::retain_heap_memory();
    let mut group = c.benchmark_group("lora_cpu");
    group.sample_size(10).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    // (shape, dropout, whether the plain linear is timed: once per shape).
    for &(shape, p, plain) in &[
        ((512, 1024, 1024, 16), 0.0f32, true),
        ((512, 1024, 1024, 16), 0.1, false),
        ((2048, 2048, 2048, 16), 0.1, true),
    ] {
        cpu_shape(&mut group, shape, p, plain);
    }
    group.finish();
}

/// Llama-7B projections (M = 4096 tokens; K = N = 4096 attention, N = 11008 MLP), r ∈ {8, 16,
/// 64}, dropout 0.1: about a second per call on 2 cores, so this group takes ~15 minutes there;
/// `cargo bench --bench lora -- lora_cpu/` runs the small shapes alone.
fn cpu_7b(c: &mut Criterion) {
    lorafuse::train::retain_heap_memory();
    let mut group = c.benchmark_group("lora_cpu_7b");
    group.sample_size(10).measurement_time(Duration::from_secs(10)).warm_up_time(Duration::from_secs(1));
    for &(m, k, n) in &[(4096, 4096, 4096), (4096, 4096, 11008)] {
        for (i, r) in [8, 16, 64].into_iter().enumerate() {
            cpu_shape(&mut group, (m, k, n, r), 0.1, i == 0);
        }
    }
    group.finish();
}

fn upload_bf16(dev: &Arc<dyn Device>, shape: &[usize], rng: &mut TestRng) -> Tensor {
    let n = shape.iter().product();
    let v = rng.vec_f32(n).iter().map(|&x| bf16::from_f32(x)).collect();
    Tensor::from_host(shape, HostData::BF16(v)).unwrap().to_backend(&Backend::Device(dev.clone())).unwrap()
}

fn cuda(c: &mut Criterion) {
    if let Some(why) = unavailable_reason() {
        println!("lora_cuda: skipped: no CUDA device ({why})");
        return;
    }
    let dev: Arc<dyn Device> = Arc::new(Cuda::new(0).expect("device reported present"));
    let mut group = c.benchmark_group("lora_cuda");
    group.sample_size(20);
    let mut rng = TestRng::new(2);
    for &(m, k, n) in &[(4096, 4096, 4096), (4096, 4096, 11008)] {
        let (x, w0, dy) = (
            upload_bf16(&dev, &[m, k], &mut rng),
            upload_bf16(&dev, &[n, k], &mut rng),
            upload_bf16(&dev, &[m, n], &mut rng),
        );
        let y = Tensor::empty(&[m, n], DType::BF16, &Backend::Device(dev.clone())).unwrap();
        let dx = Tensor::empty(&[m, k], DType::BF16, &Backend::Device(dev.clone())).unwrap();
        let id = format!("m{m}_k{k}_n{n}");
        // Device time of `iters` calls of `f`, after one untimed call.
        let time = |f: &dyn Fn() -> lorafuse::Result<()>, iters: u64| {
            f().unwrap();
            Duration::from_secs_f64(dev.time_ms(&mut || (0..iters).try_for_each(|_| f())).unwrap() / 1e3)
        };
        // SAFETY (both GEMMs): x, W0, dy, y, dx are live device tensors of the shapes named.
        let base_fwd = || unsafe {
            let nt = GemmLayout::Nt;
            let (a, b, c) = (x.device_ptr()?, w0.device_ptr()?, y.device_ptr()?);
            launch_gemm(dev.as_ref(), a, b, c, GemmShape::dense_for(nt, m, n, k), nt, DType::BF16)
        };
        let base_dx = || unsafe {
            let nn = GemmLayout::Nn;
            let (a, b, c) = (dy.device_ptr()?, w0.device_ptr()?, dx.device_ptr()?);
            launch_gemm(dev.as_ref(), a, b, c, GemmShape::dense_for(nn, m, k, n), nn, DType::BF16)
        };
        group.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        group.bench_function(BenchmarkId::new("base_gemm", &id), |bch| bch.iter_custom(|i| time(&base_fwd, i)));
        // The plain frozen linear's forward + dx: what the "≤ 1.10× the base GEMM" compares
        // split_fwd_bwd with.
        group.throughput(Throughput::Elements(4 * (m * n * k) as u64));
        group.bench_function(BenchmarkId::new("base_gemm_fwd_dx", &id), |bch| {
            bch.iter_custom(|i| time(&|| base_fwd().and_then(|_| base_dx()), i))
        });
        for r in [8usize, 16, 64] {
            let (a, b) = (upload_bf16(&dev, &[r, k], &mut rng), upload_bf16(&dev, &[n, r], &mut rng));
            let cs = Tensor::from_host(&[r], HostData::F32(vec![2.0; r]))
                .unwrap()
                .to_backend(&Backend::Device(dev.clone()))
                .unwrap();
            let w = LoraWeights { w0: &w0, a: &a, b: &b, col_scale: &cs };
            let mask = LoraOpConfig { r, alpha: 16.0, dropout: 0.1, use_rslora: false, seed: 1 }.mask(0, true);
            let rid = format!("{id}_r{r}");
            group.throughput(Throughput::Elements(flops(m, k, n, r, false)));
            group.bench_function(BenchmarkId::new("split_fwd", &rid), |bch| {
                bch.iter_custom(|i| time(&|| lora_kernels::lora_forward(&dev, &x, &w, &mask, DType::BF16).map(drop), i))
            });
            group.bench_function(BenchmarkId::new("single_pass_fwd", &rid), |bch| {
                bch.iter_custom(|i| time(&|| lora_forward_fused(&dev, &x, &w, &mask, DType::BF16).map(drop), i))
            });
            group.bench_function(BenchmarkId::new("unfused_fwd", &rid), |bch| {
                bch.iter_custom(|i| time(&|| lora_unfused::lora_forward_unfused(&dev, &x, &w, 2.0, &mask).map(drop), i))
            });
            group.throughput(Throughput::Elements(flops(m, k, n, r, true)));
            group.bench_function(BenchmarkId::new("split_fwd_bwd", &rid), |bch| {
                bch.iter_custom(|i| {
                    time(
                        &|| {
                            let f = lora_kernels::lora_forward(&dev, &x, &w, &mask, DType::BF16)?;
                            lora_kernels::lora_backward(&dev, &x, &w, &f.s_scaled, &dy, &mask, DType::BF16).map(drop)
                        },
                        i,
                    )
                })
            });
            group.bench_function(BenchmarkId::new("single_pass_fwd_bwd", &rid), |bch| {
                bch.iter_custom(|i| {
                    time(
                        &|| {
                            let f = lora_forward_fused(&dev, &x, &w, &mask, DType::BF16)?;
                            lora_kernels::lora_backward(&dev, &x, &w, &f.s_scaled, &dy, &mask, DType::BF16).map(drop)
                        },
                        i,
                    )
                })
            });
            group.bench_function(BenchmarkId::new("unfused_fwd_bwd", &rid), |bch| {
                bch.iter_custom(|i| {
                    time(
                        &|| {
                            let f = lora_unfused::lora_forward_unfused(&dev, &x, &w, 2.0, &mask)?;
                            lora_unfused::lora_backward_unfused(&dev, &x, &w, 2.0, &mask, &f, &dy).map(drop)
                        },
                        i,
                    )
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, cpu, cpu_7b, cuda);
criterion_main!(benches);
