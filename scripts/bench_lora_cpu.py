"""PyTorch + PEFT baseline for benches/lora.rs (CPU): one LoRA linear, forward + backward.

Run in the same session as `cargo bench --bench lora -- lora_cpu` so the two share the machine:

    .venv/bin/python scripts/bench_lora_cpu.py

(.venv: `python3 -m venv .venv && .venv/bin/pip install torch peft`.) Prints, per shape, the
median time of a frozen nn.Linear forward+backward (grad w.r.t. the input only, as for a frozen
base layer) and of PEFT's LoRA layer around it (grads for x, lora_A, lora_B), and their ratio.
"""
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

torch.manual_seed(0)
torch.set_num_threads(torch.get_num_threads())


class One(torch.nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.proj = torch.nn.Linear(k, n, bias=False)


def median_ms(step, reps):
    step()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'shape':<32} {'linear ms':>10} {'peft ms':>10} {'ratio':>7} {'linear GFLOP/s':>15}")
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
        t_plain, t_lora = median_ms(plain, reps), median_ms(lora, reps)
        gflops = 4 * m * n * k / t_plain / 1e6
        print(f"m{m}_k{k}_n{n}_r{r}_p{p:<10} {t_plain:>10.2f} {t_lora:>10.2f} {t_lora / t_plain:>7.3f} {gflops:>15.1f}")


if __name__ == "__main__":
    main()
