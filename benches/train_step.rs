//! One LoRA training step on the CPU backend (issue 5's configuration), in tokens/s.
//!
//! Random Llama: hidden 256, 4 layers, 8 heads / 4 KV heads, intermediate 688, vocab 256;
//! batch 8 × 128 tokens; LoRA r = 8, alpha 16 on q/k/v/o/gate/up/down, dropout 0.05; AdamW,
//! clipping at 1.0. Compare with `scripts/bench_peft_step.py` (same configuration, PyTorch +
//! PEFT) run on the same machine:
//!
//! ```text
//! cargo bench --bench train_step            # LORAFUSE_CPU_GEMM=matrixmultiply for the old GEMM
//! .venv/bin/python scripts/bench_peft_step.py
//! ```

use lorafuse::model::{Llama, LlamaConfig, LoraConfig, TargetModules};
use lorafuse::train::{train_step, AdamW};
use std::time::Instant;

/// User + system CPU seconds of this process so far (Linux; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn main() {
    lorafuse::train::retain_heap_memory();
    let cfg = LlamaConfig::from_json(
        r#"{"vocab_size": 256, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
            "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 256}"#,
        "bench config",
    )
    .unwrap();
    let mut model = Llama::random(cfg, 0).unwrap();
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let lora = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.05,
        target_modules: TargetModules::List(targets.iter().map(|s| s.to_string()).collect()),
        seed: 1,
        ..Default::default()
    };
    model.add_lora(&lora).unwrap();
    let (batch, seq) = (8, 128);
    let mut rng = lorafuse::testing::TestRng::new(3);
    let ids: Vec<u32> = (0..batch * seq).map(|_| (rng.next_u64() % 256) as u32).collect();
    let labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let mut opt = AdamW::new(1e-4);
    for _ in 0..2 {
        train_step(&mut model, &mut opt, &ids, &labels, batch, 1.0).unwrap();
    }
    let steps: usize = std::env::var("STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let (t0, c0) = (Instant::now(), cpu_seconds());
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = train_step(&mut model, &mut opt, &ids, &labels, batch, 1.0).unwrap();
    }
    let dt = t0.elapsed().as_secs_f64() / steps as f64;
    let cpu = (cpu_seconds() - c0) / steps as f64;
    println!(
        "lorafuse cpu ({}, {} rayon threads): step={:.1} ms (cpu {:.0} ms)  {:.0} tokens/s  (loss {loss:.4})",
        lorafuse::ops::matmul::library_name(),
        rayon::current_num_threads(),
        dt * 1e3,
        cpu * 1e3,
        (batch * seq) as f64 / dt
    );
}
