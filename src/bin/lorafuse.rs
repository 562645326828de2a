//! The `lorafuse` command line.

use lorafuse::device::{cuda, kernels, sim};
use std::process::ExitCode;

const USAGE: &str = "usage: lorafuse <command>

commands:
  info    device, build path, kernels with their registers and shared memory per architecture
  report  simulator traffic of each LoRA strategy vs the base GEMM (bytes, tensor-core FLOPs)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("info") => {
            info();
            ExitCode::SUCCESS
        }
        Some("report") => match lorafuse::ops::report::lora_traffic(512, 512, 512, 16, 0.1) {
            Ok(rows) => {
                println!("SIMT simulator, M = N = K = 512, r = 16, dropout 0.1 (ratios vs base GEMM; fwd+bwd vs forward + dx GEMMs)\n");
                print!("{}", lorafuse::ops::report::format_table(&rows));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("lorafuse report: {e}");
                ExitCode::FAILURE
            }
        },
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("lorafuse: unknown command `{other}`\n{USAGE}");
            ExitCode::from(2)
        }
    }
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
