#!/usr/bin/env python3
"""Checks that an adapter written by `lorafuse train` loads in PEFT and behaves the same.

usage: check_peft_adapter.py RUN_DIR PROMPT EXPECTED [--model DIR] [--merged DIR]
  RUN_DIR: a `lorafuse train` output dir (has adapter/; the embedded default run also has base/)
  EXPECTED: the text `lorafuse generate --chat` printed for PROMPT (greedy, 64 new tokens)
  --model: the Hugging Face base model directory (default: RUN_DIR/base). A bnb-4bit
           checkpoint (QLoRA) loads quantized, through bitsandbytes.
  --merged: also compare the logits of a `lorafuse merge` output with base + adapter

Loads the base with transformers, the adapter with PeftModel.from_pretrained, renders the prompt
with the model's chat template (the byte-level one of the embedded model: `<s><|user|>…`),
decodes greedily and compares. Needs torch, transformers, peft (and bitsandbytes for a
bnb-4bit base); the tests do not.
"""
import argparse
import json
import os

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("run")
ap.add_argument("prompt")
ap.add_argument("expected")
ap.add_argument("--model")
ap.add_argument("--merged")
a = ap.parse_args()
torch.set_num_threads(1)

base_dir = a.model or f"{a.run}/base"
quantized = "quantization_config" in json.load(open(f"{base_dir}/config.json"))
kw = {} if quantized else {"dtype": torch.float32}
base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager", **kw)
model = PeftModel.from_pretrained(base, f"{a.run}/adapter").eval()
if quantized:
    import bitsandbytes as bnb

    # In eval mode bnb's CPU path repacks the weights for an AVX512-BF16 kernel that rounds the
    # block scales to bf16 and needs out_features % 32 == 0 (the embedded model's 344 is not);
    # training mode keeps dequantize + matmul, the reference (SPECS.md, pitfalls). It has no
    # dropout of its own; PEFT's LoRA dropout modules stay in eval mode.
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.training = True
cfg = json.load(open(f"{a.run}/adapter/adapter_config.json"))
print("loaded adapter: r", cfg["r"], "targets", cfg["target_modules"], "peft", model.peft_config["default"].peft_type,
      "base", "bnb-4bit" if quantized else "float")

if os.path.exists(f"{base_dir}/tokenizer.json"):
    tok = AutoTokenizer.from_pretrained(base_dir)
    enc = tok.apply_chat_template([{"role": "user", "content": a.prompt}], add_generation_prompt=True)
    ids = list(enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc)
    stop, decode = tok.eos_token_id, lambda out: tok.decode(out, skip_special_tokens=True)
else:
    # The embedded template: <s><|user|>\n{prompt}\n<|assistant|>\n  (byte ids; <s> = 256, </s> = 257)
    ids = [256] + list(f"<|user|>\n{a.prompt}\n<|assistant|>\n".encode())
    stop, decode = 257, lambda out: bytes(t for t in out if t < 256).decode("utf-8", "replace")
out = []
with torch.no_grad():
    for _ in range(64):
        logits = model(torch.tensor([ids + out])).logits[0, -1]
        t = int(logits.argmax())
        out.append(t)
        if t == stop:
            break
    text = decode(out)
    print("peft:", repr(text), "lorafuse:", repr(a.expected))
    ok = text == a.expected
    if a.merged:
        merged = AutoModelForCausalLM.from_pretrained(a.merged, dtype=torch.float32, attn_implementation="eager")
        x = torch.tensor([ids])
        want, got = model(x).logits.float(), merged(x).logits.float()
        rel = float((got - want).norm() / want.norm())
        print(f"merged vs base + adapter: relative L2 difference of the logits {rel:.2e}")
        ok = ok and rel < 2e-2
raise SystemExit(0 if ok else 1)
