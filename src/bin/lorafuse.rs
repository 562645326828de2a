//! The `lorafuse` command line.

use clap::{Parser, Subcommand};
use lorafuse::device::{cuda, kernels, sim};
use lorafuse::model::{GenerateConfig, Llama, WeightDtype};
use lorafuse::quant::Nf4Config;
use lorafuse::train::config::{TrainConfig, TrainOptions};
use lorafuse::train::data::Tokenizer;
use lorafuse::train::trainer::{self, StartMode};
use std::path::PathBuf;
use std::process::ExitCode;

/// Fused LoRA/QLoRA kernels, an autograd tape and a Llama trainer.
#[derive(Parser)]
#[command(name = "lorafuse", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Device, build path, kernels with their registers and shared memory per architecture.
    Info,
    /// Simulator traffic of each LoRA strategy vs the base GEMM (bytes, tensor-core FLOPs).
    Report,
    /// Fine-tune a LoRA adapter. With no arguments: the shipped small model and dataset.
    ///
    /// Every option can also be set in a TOML file (--config), with the same names written with
    /// underscores (seq_len = 256); flags override the file. See docs/TRAINING.md.
    Train(Box<TrainCmd>),
    /// Continue a prompt with a model (and optionally a PEFT adapter).
    Generate(GenerateCmd),
    /// Merge a PEFT adapter into its base model and save a Hugging Face checkpoint.
    Merge(MergeCmd),
    /// Time the CPU LoRA linear (forward + backward) against the plain frozen linear (forward +
    /// dx), call by call in alternation so a noisy machine slows both alike; prints medians, the
    /// ratio and its floor (the rank-r FLOPs over the plain linear's).
    Bench(BenchCmd),
}

#[derive(clap::Args)]
struct BenchCmd {
    /// Rows of x (batch × sequence).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    m: u32,
    /// Input features.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    k: u32,
    /// Output features.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    n: u32,
    /// LoRA rank.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    r: u32,
    /// Dropout probabilities to run, comma-separated, each in [0, 1).
    #[arg(long, value_delimiter = ',', default_values_t = vec![0.0f32, 0.1])]
    dropout: Vec<f32>,
    /// Timed calls of each op, after 3 untimed ones.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    iters: u32,
}

#[derive(clap::Args)]
struct TrainCmd {
    /// TOML config file; its keys are the option names below with `_` (e.g. micro_batch = 4).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Continue from the newest checkpoint in the output directory (from scratch if none).
    #[arg(long)]
    resume: bool,
    /// Delete an earlier run's outputs in the output directory and start fresh.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    #[command(flatten)]
    opts: TrainOptions,
}

#[derive(clap::Args)]
struct GenerateCmd {
    /// Hugging Face Llama model directory (e.g. runs/default/base after the default run).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user turn with the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Hold the base's decoder linear weights as NF4 (as `train --qlora`); a bnb-4bit
    /// checkpoint is NF4 either way.
    #[arg(long)]
    qlora: bool,
}

#[derive(clap::Args)]
struct MergeCmd {
    /// Base model directory.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// PEFT adapter directory.
    #[arg(long, value_name = "DIR")]
    adapter: PathBuf,
    /// Where to write the merged checkpoint (config.json, model.safetensors, tokenizer files).
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    /// Quantize the base to NF4 first (the base an adapter trained with `train --qlora` saw).
    /// A QLoRA base (this, or a bnb-4bit checkpoint) merges into a dense BF16 checkpoint.
    #[arg(long)]
    qlora: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (name, result) = match cli.command {
        Command::Info => {
            info();
            return ExitCode::SUCCESS;
        }
        Command::Report => ("report", report()),
        Command::Train(t) => ("train", train(*t)),
        Command::Generate(g) => ("generate", generate(g)),
        Command::Merge(m) => ("merge", merge(m)),
        Command::Bench(b) => ("bench", bench(b)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lorafuse {name}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn report() -> lorafuse::Result<()> {
    let rows = lorafuse::ops::report::lora_traffic(512, 512, 512, 16, 0.1)?;
    println!(
        "SIMT simulator, M = N = K = 512, r = 16, dropout 0.1 (ratios vs base GEMM; fwd+bwd vs forward + dx GEMMs)\n"
    );
    print!("{}", lorafuse::ops::report::format_table(&rows));
    Ok(())
}

fn bench(b: BenchCmd) -> lorafuse::Result<()> {
    use lorafuse::ops::lora::{linear, linear_backward_input, lora_backward, lora_forward, LinearShape, LoraOpConfig};
    use std::time::Instant;
    let (m, k, n, r) = (b.m as usize, b.k as usize, b.n as usize, b.r as usize);
    if let Some(p) = b.dropout.iter().find(|p| !(0.0..1.0).contains(*p)) {
        return Err(lorafuse::Error::config("dropout", format!("{p} is not in [0, 1)")));
    }
    // The largest buffer must fit in memory: refuse a shape instead of aborting in the allocator.
    let gib = [m * k, n * k, m * n].into_iter().max().unwrap_or(0) as f64 * 4.0 / (1u64 << 30) as f64;
    if gib > 8.0 {
        return Err(lorafuse::Error::config("m/k/n", format!("an operand would take {gib:.1} GiB (at most 8 here)")));
    }
    lorafuse::train::retain_heap_memory();
    let mut rng = lorafuse::testing::TestRng::new(1);
    let sh = LinearShape { m, k, n };
    let (x, w0, a, bm, dy) =
        (rng.vec_f32(m * k), rng.vec_f32(n * k), rng.vec_f32(r * k), rng.vec_f32(n * r), rng.vec_f32(m * n));
    // Rank-r FLOPs of forward + backward (S, S·Bᵀ, dS, dB, dA, dS·A) over the plain linear's 4·m·n·k.
    let floor = 1.0 + 3.0 * r as f64 * (k + n) as f64 / (2.0 * n as f64 * k as f64);
    println!(
        "CPU LoRA linear, {} GEMM, {} threads: M={m} K={k} N={n} r={r}, medians of {} alternated calls",
        lorafuse::ops::matmul::library_name(),
        rayon::current_num_threads(),
        b.iters
    );
    println!(
        "{:>8} {:>14} {:>14} {:>12} {:>11}",
        "dropout", "plain fwd+dx", "fused fwd+bwd", "fused/plain", "FLOP floor"
    );
    for &p in &b.dropout {
        let cfg = LoraOpConfig { r, alpha: 2.0 * r as f32, dropout: p, use_rslora: false, seed: 5 };
        let plain =
            || -> lorafuse::Result<f32> { Ok(linear(&x, &w0, None, sh)?[0] + linear_backward_input(&dy, &w0, sh)[0]) };
        let fused = || -> lorafuse::Result<f32> {
            let f = lora_forward(&x, &w0, None, &a, &bm, sh, &cfg, 3, true)?;
            let g = lora_backward(&dy, &x, &w0, &a, &bm, &f.s, sh, &cfg, 3, true, true)?;
            Ok(f.y[0] + g.da[0])
        };
        // Inside the pool, as a training step runs.
        let (tp, tf) = rayon::scope(|_| -> lorafuse::Result<(Vec<f64>, Vec<f64>)> {
            let (mut tp, mut tf) = (Vec::new(), Vec::new());
            for i in 0..3 + b.iters {
                let t = Instant::now();
                std::hint::black_box(plain()?);
                let between = Instant::now();
                std::hint::black_box(fused()?);
                if i >= 3 {
                    tp.push((between - t).as_secs_f64() * 1e3);
                    tf.push(between.elapsed().as_secs_f64() * 1e3);
                }
            }
            Ok((tp, tf))
        })?;
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (tp, tf) = (median(tp), median(tf));
        println!("{p:>8.2} {:>11.3} ms {:>11.3} ms {:>12.3} {floor:>11.3}", tp, tf, tf / tp);
    }
    Ok(())
}

fn train(t: TrainCmd) -> lorafuse::Result<()> {
    let file = t.config.as_deref().map(TrainOptions::from_toml_file).transpose()?;
    let cfg = TrainConfig::resolve(file, &t.opts)?;
    let summary = trainer::train(&cfg, StartMode { resume: t.resume, overwrite: t.overwrite })?;
    println!("{}", trainer::format_summary(&summary));
    Ok(())
}

/// The base model (NF4 with `qlora`) with the adapter, if any, loaded.
fn load(model: &std::path::Path, adapter: Option<&std::path::Path>, qlora: bool) -> lorafuse::Result<Llama> {
    let mut m = if qlora { Llama::from_dir_quantized(model, Nf4Config::default())? } else { Llama::from_dir(model)? };
    if let Some(a) = adapter {
        let rep = m.load_adapter(a)?;
        if !rep.missing.is_empty() {
            eprintln!("warning: {} adapter tensors missing (left at their initial values)", rep.missing.len());
        }
    }
    Ok(m)
}

fn generate(g: GenerateCmd) -> lorafuse::Result<()> {
    let model = load(&g.model, g.adapter.as_deref(), g.qlora)?;
    let tok = Tokenizer::from_model_dir(&g.model, model.config.vocab_size, model.config.eos_token_id)?;
    let prompt_ids = if g.chat {
        tok.encode(&tok.render_chat(&[("user".into(), g.prompt.clone())], true)?)?
    } else {
        let mut ids: Vec<u32> = tok.bos_id.into_iter().collect();
        ids.extend(tok.encode(&g.prompt)?);
        ids
    };
    let cfg = GenerateConfig {
        max_new_tokens: g.max_new_tokens,
        temperature: g.temperature,
        top_p: g.top_p,
        seed: g.seed,
        eos_token_id: tok.eos_id,
        use_cache: true,
    };
    let out = model.generate(&prompt_ids, &cfg)?;
    println!("{}", tok.decode(&out)?);
    Ok(())
}

fn merge(m: MergeCmd) -> lorafuse::Result<()> {
    let mut model = load(&m.model, Some(&m.adapter), m.qlora)?;
    if model.is_quantized() {
        // As PEFT's QLoRA recipe: dequantize, merge, save in bf16.
        model.dtype = WeightDtype::BF16;
    }
    model.merge()?;
    model.dequantize_linears()?;
    model.save_pretrained(&m.output)?;
    let files = [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
        "generation_config.json",
    ];
    for f in files {
        let src = m.model.join(f);
        if src.exists() {
            let dst = m.output.join(f);
            std::fs::copy(&src, &dst).map_err(|e| lorafuse::Error::io(&dst, e))?;
        }
    }
    println!("merged {} into {} → {}", m.adapter.display(), m.model.display(), m.output.display());
    Ok(())
}

fn info() {
    println!("lorafuse {}", env!("CARGO_PKG_VERSION"));
    println!("\nbackends:");
    println!("  cpu   available ({} threads)", rayon::current_num_threads());
    match cuda::Cuda::new(0) {
        Ok(c) => println!("  cuda  available: {}", lorafuse::device::Device::name(&c)),
        Err(e) => println!("  cuda  unavailable: {e}"),
    }
    println!("  sim   available: SIMT simulator with {} kernels", sim::kernel_names().len());

    println!("\nkernel build: {}\n  {}", kernels::BUILD_PATH, kernels::BUILD_DETAIL.replace('\n', "\n  "));
    println!(
        "\n{:<32} {:<6} {:>5} {:>10} {:>7} {:>7} {:>6}",
        "kernel", "arch", "regs", "smem (B)", "spill-st", "spill-ld", "stack"
    );
    for m in kernels::MODULES {
        for k in m.kernels {
            let rows: Vec<_> = kernels::RESOURCES.iter().filter(|r| r.kernel == *k).collect();
            if rows.is_empty() {
                println!("{:<32} {:<6} (no ptxas report: {})", k, "-", kernels::BUILD_PATH);
            }
            for r in rows {
                println!(
                    "{:<32} {:<6} {:>5} {:>10} {:>7} {:>7} {:>6}",
                    r.kernel,
                    r.arch,
                    r.registers,
                    r.shared_bytes,
                    r.spill_store_bytes,
                    r.spill_load_bytes,
                    r.stack_bytes
                );
            }
        }
    }
}
