#!/usr/bin/env python3
"""Writes a small but real-format Hugging Face Llama directory, for trying docs/TRAINING.md's
walkthrough without hub access.

usage: make_hf_test_model.py OUT_DIR [--bnb4bit OUT_BNB_DIR] [--data OUT_JSONL]
                             [--hidden 192 --layers 4 --intermediate 512 --heads 6 --kv-heads 2]

OUT_DIR gets what `hf download` of a Llama-3-style instruct model gives:
  config.json, generation_config.json (transformers 5 `save_pretrained`, BF16),
  model-0000K-of-0000N.safetensors + model.safetensors.index.json (sharded: max_shard_size 1MB),
  tokenizer.json (a byte-level BPE trained here with `tokenizers` on the repo's own synthetic
  dataset, Llama-3 special tokens), tokenizer_config.json / chat_template.jinja (Llama-3 chat
  template), special_tokens_map.json.
The model is a randomly initialized LlamaForCausalLM (by default 4 layers, hidden 192, GQA 6/2
heads, tied embeddings, llama3 RoPE scaling): its outputs are meaningless, its files are not.
(`--hidden 576 --layers 30 --intermediate 1536 --heads 9 --kv-heads 3` has SmolLM2-135M's shapes
but this small vocabulary.)

--bnb4bit: also save the model loaded with BitsAndBytesConfig(load_in_4bit, nf4, double quant)
  on the CPU: a bnb-4bit checkpoint as transformers writes it.
--data: also write chat JSONL training data (the repo's dataset as {"messages": ...} lines,
  plus a system prompt on some).

Needs torch, transformers, tokenizers (and bitsandbytes for --bnb4bit); the tests do not.
"""
import argparse
import json
import os
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Meta-Llama-3-8B-Instruct's chat template (tokenizer_config.json on the hub).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def corpus():
    for line in open(os.path.join(REPO, "assets/default/data.jsonl")):
        rec = json.loads(line)
        if "text" in rec:
            yield rec["text"]
        else:
            for m in rec["messages"]:
                yield m["content"]


def make_tokenizer(vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    bos = SPECIALS[0]
    # As Llama 3: the BOS is added by the post-processor (and by the chat template's bos_token).
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
            ),
        ]
    )
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--bnb4bit")
    ap.add_argument("--data")
    for k, v in [("hidden", 192), ("layers", 4), ("intermediate", 512), ("heads", 6), ("kv-heads", 2)]:
        ap.add_argument(f"--{k}", type=int, default=v)
    a = ap.parse_args()
    torch.manual_seed(0)
    random.seed(0)

    raw = make_tokenizer(2000)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=SPECIALS[0], eos_token="<|eot_id|>", pad_token=SPECIALS[1]
    )
    tok.chat_template = LLAMA3_TEMPLATE
    vocab = len(tok)
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|end_of_text|>"], ids["<|eot_id|>"]],
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config.eos_token_id = cfg.eos_token_id
    # Small shards, so that the index file is exercised.
    model.save_pretrained(a.out, max_shard_size="1MB" if a.hidden <= 256 else "100MB")
    tok.save_pretrained(a.out)
    print(f"{a.out}: vocab {vocab}, {sum(p.numel() for p in model.parameters())} parameters")
    print(sorted(os.listdir(a.out)))

    if a.bnb4bit:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        m4 = AutoModelForCausalLM.from_pretrained(a.out, quantization_config=q, dtype=torch.bfloat16)
        m4.save_pretrained(a.bnb4bit)
        tok.save_pretrained(a.bnb4bit)
        print(a.bnb4bit, sorted(os.listdir(a.bnb4bit)))

    if a.data:
        with open(a.data, "w") as f:
            for line in open(os.path.join(REPO, "assets/default/data.jsonl")):
                rec = json.loads(line)
                if "messages" not in rec:
                    continue
                msgs = rec["messages"]
                if random.random() < 0.3 and msgs[0]["role"] != "system":
                    msgs = [{"role": "system", "content": "Answer briefly."}] + msgs
                f.write(json.dumps({"messages": msgs}) + "\n")
        print(a.data)


if __name__ == "__main__":
    main()
