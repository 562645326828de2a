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
    /// Time the LoRA linear (forward + backward) against the plain frozen linear (forward + dx),
    /// call by call in alternation so a noisy machine slows all alike; prints medians, ratios
    /// and the ratio's floor (the rank-r FLOPs over the plain linear's). On the CPU: our fused
    /// op; on a GPU (or the simulator): the split, single-pass and unfused kernels.
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
    /// Where to run: the CPU backend, the first CUDA GPU, or the SIMT simulator (which checks
    /// the launch path; its times say nothing about a GPU's).
    #[arg(long, value_enum, default_value_t = BenchBackend::Cpu)]
    backend: BenchBackend,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchBackend {
    Cpu,
    Cuda,
    Sim,
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
    use lorafuse::bench;
    use lorafuse::device::Backend;
    use lorafuse::ops::lora::LinearShape;
    let sh = LinearShape { m: b.m as usize, k: b.k as usize, n: b.n as usize };
    let (r, iters) = (b.r as usize, b.iters as usize);
    bench::check_args(sh, r, &b.dropout, iters)?;
    let device = match b.backend {
        BenchBackend::Cpu => None,
        BenchBackend::Cuda => Some(Backend::cuda()?),
        BenchBackend::Sim => Some(Backend::sim()),
    };
    let (what, reference) = match &device {
        None => (
            format!(
                "CPU, {} GEMM, {} threads, f32",
                lorafuse::ops::matmul::library_name(),
                rayon::current_num_threads()
            ),
            "plain",
        ),
        Some(d) => {
            let clock = match b.backend {
                BenchBackend::Sim => "host time of the simulation (not a GPU's)",
                _ => "device time (CUDA events)",
            };
            (format!("{}, bf16 (unfused: f32 outputs), {clock}", d.name()), "base")
        }
    };
    lorafuse::train::retain_heap_memory();
    println!("{what}: M={} K={} N={} r={r}, medians of {iters} alternated calls", sh.m, sh.k, sh.n);
    println!("FLOP floor of the ratio: {:.3}", bench::flop_floor(sh, r));
    println!("{:>8}  {:<12} {:>12} {:>9}", "dropout", "variant", "median ms", "ratio");
    for &p in &b.dropout {
        let rows = match device.as_ref().and_then(Backend::device) {
            None => bench::cpu(sh, r, p, iters)?,
            Some(dev) => bench::device(dev, sh, r, p, iters)?,
        };
        let base = rows.iter().find(|t| t.variant == reference).map_or(f64::NAN, |t| t.median_ms);
        for t in &rows {
            println!("{p:>8.2}  {:<12} {:>12.4} {:>9.3}", t.variant, t.median_ms, t.median_ms / base);
        }
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
