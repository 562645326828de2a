//! CPU NF4 throughput on a 4096×4096 weight: dequantize (NF4 + double-quant stats → bf16/f32) and
//! quantize (bf16 → NF4 with double quant). Throughput counts bytes moved: packed nibbles +
//! 8-bit block codes read, plus the output written (bf16: 2.516 B/weight; f32: 4.516 B/weight).
//!
//! Run: `cargo bench --bench nf4_cpu`

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use lorafuse::quant::{Nf4Config, Nf4Tensor};

const ROWS: usize = 4096;
const COLS: usize = 4096;

fn weight() -> Vec<bf16> {
    // Deterministic pseudo-normal values (sum of uniforms), scale 0.02 like an LLM Linear.
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut u = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..ROWS * COLS).map(|_| bf16::from_f32((u() + u() + u() - 1.5) * 0.02)).collect()
}

fn bench(c: &mut Criterion) {
    let w = weight();
    let n = (ROWS * COLS) as u64;
    let t = Nf4Tensor::quantize(&w, &[ROWS, COLS], Nf4Config::default()).unwrap();
    let stats = t.nbytes() as u64 - t.packed.len() as u64;
    let mut g = c.benchmark_group("nf4_cpu_4096x4096");
    g.sample_size(20);

    let mut out_bf16 = vec![bf16::ZERO; ROWS * COLS];
    g.throughput(Throughput::Bytes(n / 2 + stats + 2 * n));
    g.bench_function("dequant_dq_to_bf16", |b| b.iter(|| t.dequantize_into(black_box(&mut out_bf16)).unwrap()));

    let mut out_f32 = vec![0f32; ROWS * COLS];
    g.throughput(Throughput::Bytes(n / 2 + stats + 4 * n));
    g.bench_function("dequant_dq_to_f32", |b| b.iter(|| t.dequantize_into(black_box(&mut out_f32)).unwrap()));

    g.throughput(Throughput::Bytes(2 * n + n / 2 + stats));
    g.bench_function("quantize_bf16_dq", |b| {
        b.iter(|| Nf4Tensor::quantize(black_box(&w), &[ROWS, COLS], Nf4Config::default()).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
