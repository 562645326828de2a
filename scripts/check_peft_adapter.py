#!/usr/bin/env python3
"""Checks that an adapter written by `lorafuse train` loads in PEFT and behaves the same.

usage: check_peft_adapter.py RUN_DIR PROMPT EXPECTED
  RUN_DIR: output dir of the embedded default run (has base/ and adapter/)
  EXPECTED: the text `lorafuse generate --chat` printed for PROMPT (greedy)

Loads base/ with transformers, the adapter with PeftModel.from_pretrained, renders the prompt
with the byte-level chat template, decodes greedily and compares. Needs torch, transformers,
peft (not needed by the tests).
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

run, prompt, expected = sys.argv[1], sys.argv[2], sys.argv[3]
base = LlamaForCausalLM.from_pretrained(f"{run}/base", torch_dtype=torch.float32, attn_implementation="eager")
model = PeftModel.from_pretrained(base, f"{run}/adapter").eval()
cfg = json.load(open(f"{run}/adapter/adapter_config.json"))
print("loaded adapter: r", cfg["r"], "targets", cfg["target_modules"], "peft", model.peft_config["default"].peft_type)
# The embedded template: <s><|user|>\n{prompt}\n<|assistant|>\n  (byte ids; <s> = 256, </s> = 257)
ids = [256] + list(f"<|user|>\n{prompt}\n<|assistant|>\n".encode())
out = []
with torch.no_grad():
    for _ in range(64):
        logits = model(torch.tensor([ids + out])).logits[0, -1]
        t = int(logits.argmax())
        out.append(t)
        if t == 257:
            break
text = bytes(t for t in out if t < 256).decode("utf-8", "replace")
print("peft:", repr(text), "lorafuse:", repr(expected))
sys.exit(0 if text == expected else 1)
