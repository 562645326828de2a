#!/usr/bin/env python3
"""Golden fixtures for the Llama + LoRA tests, made with transformers + PEFT on the CPU.

    .venv/bin/python scripts/golden_llama.py                 # (re)writes tests/fixtures/llama/
    .venv/bin/python scripts/golden_llama.py --check DIR     # loads an adapter lorafuse wrote

Fixtures (CI needs no Python: they are committed):
  a/model    f32 checkpoint, config.json in the transformers v5 form (rope_parameters, llama3
             scaling), GQA 4/2, head_dim 12 != hidden/heads, attention biases, untied lm_head,
             random non-unit norm weights.
  a/adapter  PEFT adapter: r=4, alpha=8 on all seven projections, rank_pattern {o_proj: 2},
             alpha_pattern {down_proj: 4}, random non-zero lora_B.
  a/golden.safetensors  input_ids, labels (some -100), base logits, adapter logits, loss,
             grad.<every lora_A/lora_B key>, merged logits, greedy continuation.
  b/model    bf16 checkpoint in two shards, config.json in the v4 form (rope_theta,
             rope_scaling with "type", torch_dtype), tied embeddings, MLP biases.
  b/adapter  target_modules [q_proj, v_proj, down_proj], layers_to_transform [1], rsLoRA,
             gaussian init, dropout 0.1 (goldens in eval mode), tensors stored as BF16.
  targets.json  the modules PEFT adapts for several target_modules / exclude_modules /
             layers_to_transform / rank_pattern settings on model a.
  b/golden.safetensors  as for a, computed with the bf16 weights upcast to f32.

--check DIR: DIR holds adapter_config.json + adapter_model.safetensors written by lorafuse for
model a and logits.safetensors ("input_ids", "logits") computed by lorafuse with it; PEFT loads the
adapter onto a/model and the logits are compared.
"""
import argparse
import json
import os
import shutil
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "llama")
B, T = 2, 10


def randomize(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


def lora_random_b(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def goldens(peft_model, ids, labels):
    """logits, loss and lora grads (eval mode: no dropout), merged logits, greedy tokens."""
    out = {"input_ids": ids.float(), "labels": labels.float()}
    peft_model.eval()
    with peft_model.disable_adapter(), torch.no_grad():
        out["logits_base"] = peft_model(input_ids=ids).logits[0:B].reshape(B * T, -1)
    res = peft_model(input_ids=ids, labels=labels)
    res.loss.backward()
    out["logits"] = res.logits.detach().reshape(B * T, -1)
    out["loss"] = res.loss.detach().reshape(1)
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            key = name.replace(".default", "")
            out["grad." + key] = p.grad.detach().clone()
    with torch.no_grad():
        gen = peft_model.generate(input_ids=ids[:1, :6], max_new_tokens=8, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
        out["generated"] = gen[0, 6:].float()
        merged = peft_model.merge_and_unload()
        out["logits_merged"] = merged(input_ids=ids).logits.reshape(B * T, -1)
    return {k: v.contiguous().float() for k, v in out.items()}


def clean_adapter_dir(d):
    for f in os.listdir(d):
        if f not in ("adapter_config.json", "adapter_model.safetensors"):
            os.remove(os.path.join(d, f))
    # The config embeds the absolute base path: keep the fixture machine-independent.
    p = os.path.join(d, "adapter_config.json")
    cfg = json.load(open(p))
    cfg["base_model_name_or_path"] = "tiny"
    json.dump(cfg, open(p, "w"), indent=2, sort_keys=True)


def ids_labels(gen, vocab):
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 7] = -100
    return ids, labels


def make_a():
    gen = torch.Generator().manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
        rms_norm_eps=1e-5, attention_bias=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16},
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg)
    randomize(model, gen)
    d = os.path.join(ROOT, "a")
    model.save_pretrained(os.path.join(d, "model"))
    base = LlamaForCausalLM.from_pretrained(os.path.join(d, "model"), attn_implementation="eager")
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 4})
    pm = get_peft_model(base, lcfg)
    lora_random_b(pm, gen)
    pm.save_pretrained(os.path.join(d, "adapter"))
    clean_adapter_dir(os.path.join(d, "adapter"))
    ids, labels = ids_labels(gen, 64)
    save_file(goldens(pm, ids, labels), os.path.join(d, "golden.safetensors"), metadata={"format": "pt"})


def make_b():
    gen = torch.Generator().manual_seed(2)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, mlp_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                         "original_max_position_embeddings": 8},
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg)
    randomize(model, gen)
    d = os.path.join(ROOT, "b")
    mdir = os.path.join(d, "model")
    model.to(torch.bfloat16).save_pretrained(mdir, max_shard_size="30KB")
    # Rewrite config.json in the transformers v4 form.
    p = os.path.join(mdir, "config.json")
    c = json.load(open(p))
    rp = c.pop("rope_parameters")
    c["rope_theta"] = rp.pop("rope_theta")
    rp["type"] = rp.pop("rope_type")
    c["rope_scaling"] = rp
    c["torch_dtype"] = c.pop("dtype")
    json.dump(c, open(p, "w"), indent=2, sort_keys=True)
    assert os.path.exists(os.path.join(mdir, "model.safetensors.index.json")), "expected shards"
    # The bf16 weights upcast to f32: what lorafuse's CPU path computes with.
    base = LlamaForCausalLM.from_pretrained(mdir, dtype=torch.float32, attn_implementation="eager")
    assert base.config.rope_parameters["rope_type"] == "llama3"
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, task_type="CAUSAL_LM", use_rslora=True,
                      target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1],
                      init_lora_weights="gaussian")
    pm = get_peft_model(base, lcfg)
    lora_random_b(pm, gen)
    adir = os.path.join(d, "adapter")
    pm.save_pretrained(adir)
    clean_adapter_dir(adir)
    # Store the adapter as BF16 (older PEFT did) and reload it, so goldens use those values.
    w = load_file(os.path.join(adir, "adapter_model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in w.items()}, os.path.join(adir, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    base = LlamaForCausalLM.from_pretrained(mdir, dtype=torch.float32, attn_implementation="eager")
    pm = PeftModel.from_pretrained(base, adir, is_trainable=True)
    ids, labels = ids_labels(gen, 64)
    save_file(goldens(pm, ids, labels), os.path.join(d, "golden.safetensors"), metadata={"format": "pt"})


def make_targets():
    """Which modules PEFT adapts (and with which r / alpha) under several configurations."""
    cases = [
        {"target_modules": "all-linear"},
        {"target_modules": r".*\.(q|v)_proj"},
        {"target_modules": r"model\.layers\.1\.mlp\.\w+_proj"},
        {"target_modules": ["q_proj", "mlp.down_proj"], "layers_to_transform": [0]},
        {"target_modules": "all-linear", "exclude_modules": ["k_proj", "up_proj"]},
        {"target_modules": ["q_proj", "k_proj", "gate_proj"],
         "rank_pattern": {"^model.layers.1.self_attn.q_proj": 3, "k_proj": 5},
         "alpha_pattern": {"layers.0.mlp.gate_proj": 11}},
    ]
    out = []
    for c in cases:
        base = LlamaForCausalLM.from_pretrained(os.path.join(ROOT, "a", "model"))
        pm = get_peft_model(base, LoraConfig(r=2, lora_alpha=6, **c))
        mods = {}
        for name, m in pm.named_modules():
            if hasattr(m, "lora_A") and "default" in m.lora_A:
                key = name.replace("base_model.model.", "", 1)
                mods[key] = [m.r["default"], m.lora_alpha["default"]]
        out.append({"config": c, "modules": mods})
    json.dump(out, open(os.path.join(ROOT, "targets.json"), "w"), indent=1, sort_keys=True)


def check(dirname):
    base = LlamaForCausalLM.from_pretrained(os.path.join(ROOT, "a", "model"), attn_implementation="eager")
    pm = PeftModel.from_pretrained(base, dirname)
    pm.eval()
    ref = load_file(os.path.join(dirname, "logits.safetensors"))
    ids = ref["input_ids"].long()
    with torch.no_grad():
        logits = pm(input_ids=ids).logits.reshape(ref["logits"].shape)
    err = (logits - ref["logits"]).abs().max().item()
    rel = ((logits - ref["logits"]).norm() / ref["logits"].norm()).item()
    keys = sorted(load_file(os.path.join(dirname, "adapter_model.safetensors")).keys())
    print(f"PEFT loaded the lorafuse adapter ({len(keys)} tensors): max |logits diff| = {err:.3g}, "
          f"relative = {rel:.3g}")
    sys.exit(0 if rel < 1e-5 else 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.check:
        return check(a.check)
    torch.manual_seed(0)
    if os.path.exists(ROOT):
        shutil.rmtree(ROOT)
    make_a()
    make_b()
    make_targets()
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(ROOT) for f in fs)
    print(f"wrote {ROOT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
