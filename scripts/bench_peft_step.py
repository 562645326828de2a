#!/usr/bin/env python3
"""Time one LoRA training step of PyTorch + transformers + PEFT on the CPU.

The configuration matches `benches/train_step.rs` (issue 5): a random Llama with hidden 256,
4 layers, 8 heads / 4 KV heads, intermediate 688, vocab 256; batch 8 x 128 tokens; LoRA r=8,
alpha 16 on q/k/v/o/gate/up/down, dropout 0.05; AdamW (lr 1e-4); causal-LM loss.

    .venv/bin/python scripts/bench_peft_step.py [--steps 10] [--threads N] [--attn sdpa|eager]

Prints tokens/s over the timed steps (after 2 warm-up steps).
"""
import argparse
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="0: torch default")
    ap.add_argument("--attn", default="sdpa")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
        attn_implementation=a.attn,
    )
    model = LlamaForCausalLM(cfg)
    lcfg = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, lcfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    b, t = 8, 128
    ids = torch.randint(0, 256, (b, t))

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    for _ in range(2):
        step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(a.steps):
        step()
    dt = (time.perf_counter() - t0) / a.steps
    cpu = (time.process_time() - c0) / a.steps
    print(f"pytorch+peft: threads={torch.get_num_threads()} attn={a.attn} "
          f"step={dt * 1e3:.1f} ms (cpu {cpu * 1e3:.0f} ms)  {b * t / dt:.0f} tokens/s")


if __name__ == "__main__":
    main()
