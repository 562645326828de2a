"""PyTorch + PEFT baseline for benches/lora.rs (CPU): one LoRA linear, forward + backward.

Run in the same session as `cargo bench --bench lora -- lora_cpu` so the two share the machine:

    .venv/bin/python scripts/bench_lora_cpu.py

(.venv: `python3 -m venv .venv && .venv/bin/pip install torch peft`.) Prints, per shape, the
median time of a frozen nn.Linear forward+backward (grad w.r.t. the input only, as for a frozen
base layer) and of PEFT's LoRA layer around it (grads for x, lora_A, lora_B), and their ratio.

On a shared, loaded machine wall times of separate processes are not comparable; then run both
sides single-threaded (`--threads 1` here, `RAYON_NUM_THREADS=1` for the Rust bench) and compare
the minimum process CPU time per step (`cpu` columns), which other processes do not inflate.
"""
import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

torch.manual_seed(0)


class One(torch.nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.proj = torch.nn.Linear(k, n, bias=False)


def time_ms(step, reps):
    """Median wall time and minimum process CPU time of one step, in ms."""
    step()  # warm-up
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(wall), min(cpu)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    torch.set_num_threads(ap.parse_args().threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    head = f"{'linear ms':>10} {'peft ms':>10} {'ratio':>7} {'linear GFLOP/s':>15} {'linear cpu':>11} {'peft cpu':>9}"
    print(f"{'shape':<32} {head}")
    for m, k, n, r, p in [(512, 1024, 1024, 16, 0.0), (512, 1024, 1024, 16, 0.1), (2048, 2048, 2048, 16, 0.1)]:
        base = One(k, n)
        base.proj.weight.requires_grad_(False)
        x = torch.randn(m, k, requires_grad=True)
        dy = torch.randn(m, n)

        def plain():
            x.grad = None
            base.proj(x).backward(dy)

        model = get_peft_model(One(k, n), LoraConfig(r=r, lora_alpha=16, lora_dropout=p, target_modules=["proj"]))
        model.train()
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(prm, std=0.02)  # non-zero B: the real work of training

        def lora():
            x.grad = None
            model.zero_grad(set_to_none=True)
            model.base_model.model.proj(x).backward(dy)

        reps = 20 if m * n * k <= 2**30 else 6
        (t_plain, c_plain), (t_lora, c_lora) = time_ms(plain, reps), time_ms(lora, reps)
        gflops = 4 * m * n * k / t_plain / 1e6
        cols = f"{t_plain:>10.2f} {t_lora:>10.2f} {t_lora / t_plain:>7.3f} {gflops:>15.1f} {c_plain:>11.2f} {c_lora:>9.2f}"
        print(f"m{m}_k{k}_n{n}_r{r}_p{p:<10} {cols}")


if __name__ == "__main__":
    main()
