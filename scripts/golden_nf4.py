#!/usr/bin/env python3
"""Golden files for lorafuse's NF4 code (src/quant/), produced by bitsandbytes on the CPU.

How to run (CPU only; CI does not run this, the outputs are committed):

    python -m venv .venv && .venv/bin/pip install torch transformers safetensors 'bitsandbytes>=0.47'
    .venv/bin/python scripts/golden_nf4.py            # writes tests/fixtures/nf4/
    cargo test --test nf4                               # checks the Rust code against them

Made with torch 2.15.0, bitsandbytes 0.50.2, transformers 5.23.0, safetensors 0.8.0 (see SPECS.md B).
Outputs (tests/fixtures/nf4/):
  cases.safetensors     per case `cN.*`: input, packed, absmax (f32), dequant (bnb), and with double
                        quant: offset, exact-nearest codes, nested_absmax, bnb's own CPU codes and the
                        dequant bnb computes from them. `__metadata__["cases"]` is JSON of the cases.
  tiny_llama_bf16/      a tiny random LlamaForCausalLM saved by transformers (bf16)
  tiny_llama_bnb_dq/    the same model loaded with BitsAndBytesConfig(nf4, double quant) on the CPU
                        and saved again by transformers (the real bnb-4bit layout)
  tiny_llama_bnb/       the same without double quant (float16 compute/dtype)
  tiny_llama_*_dequant.safetensors   bnb's dequantize_4bit of every quantized weight
Notes:
  * bnb's CPU 8-bit quantizer (used for double quant) is a lookup table that misses the nearest code
    now and then; the exact-nearest codes come from bnb's default (pure torch) kernel, copied below.
  * bnb's CPU dequantize_4bit is checked against its own default-kernel formula; the formula's result
    is stored (a mismatch is printed; see SPECS.md "Pitfalls").
"""
import json, os, shutil, sys, warnings
import numpy as np
import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from safetensors.torch import save_file

torch._dynamo.config.recompile_limit = 64  # bnb compiles its dequant per shape
torch.set_num_threads(1)  # torch's mean (the double-quant offset) sums in a thread-dependent order
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "nf4")
DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NF4 = F.get_4bit_type("nf4", device="cpu")


def default_quantize_blockwise(A, code, blocksize):
    """bitsandbytes/backends/default/ops.py `quantize_blockwise` (0.50.2), verbatim: exact nearest."""
    A_flat = A.reshape(-1).float()
    n = A_flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = full // blocksize
    A_com = A_flat[:full].reshape(blocks, blocksize)
    absmax = A_com.abs().max(dim=-1)[0]
    scaled = torch.clamp(A_com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = A_flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(A_flat[full:] / am, -1, 1)])
    bounds = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    return q.reshape(A.shape), absmax


def dequant_checked(packed, qs, name):
    out = F.dequantize_4bit(packed, qs)
    absmax = qs.absmax
    if qs.nested:
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    ref = _dequantize_4bit_compute(packed.reshape(-1), absmax, NF4, qs.blocksize, qs.shape, qs.dtype)
    if not torch.equal(out.view(-1).view(torch.int16 if out.element_size() == 2 else torch.int32),
                       ref.view(-1).view(torch.int16 if ref.element_size() == 2 else torch.int32)):
        print(f"  note: bnb CPU dequantize_4bit != its formula for {name} {tuple(qs.shape)} bs={qs.blocksize}; storing the formula")
    return ref


def edge_block(bs, g):
    """Ties and edges: exact midpoints, their f32 neighbours, ±absmax, zeros, -0.0, tiny values."""
    b = NF4[:-1].add(NF4[1:]).div(2)  # the f32 thresholds bnb uses
    v = torch.cat([b, torch.nextafter(b, torch.full_like(b, 2.0)), torch.nextafter(b, torch.full_like(b, -2.0)),
                   torch.tensor([1.0, -1.0, 0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5])])
    v = v[torch.randperm(v.numel(), generator=g)]
    out = torch.zeros(bs)
    out[: min(bs, v.numel())] = v[:bs]
    out[0] = 1.0  # absmax exactly 1 → scaled == value, so midpoints are exact ties
    return out


def make_cases():
    g = torch.Generator().manual_seed(1234)
    cases = []
    dts = ["float32", "bfloat16", "float16"]
    for i, bs in enumerate([32, 64, 128, 256, 512, 1024, 2048, 4096]):
        big = bs >= 1024  # keep the file small: fewer blocks for the large block sizes
        sizes = [((1 if big else 3) * bs, "randn"), ((1 if big else 2) * bs + 37, "randn"), (bs // 2 + 1, "uniform")]
        for j, (n, kind) in enumerate(sizes):
            cases.append(dict(bs=bs, n=n, dtype=dts[(i + j) % 3], kind=kind, dq=(j != 2)))
    cases += [
        dict(bs=64, n=64 * 257 + 13, dtype="bfloat16", kind="randn", dq=True),   # 2 nested blocks, partial
        dict(bs=64, n=64 * 6, dtype="float32", kind="edges", dq=False),
        dict(bs=32, n=32 * 5 + 7, dtype="float32", kind="edges", dq=True),
        dict(bs=64, n=64 * 4 + 5, dtype="float32", kind="zeros", dq=False),     # all-zero blocks, partial zero block
        dict(bs=64, n=1, dtype="float16", kind="randn", dq=True),
        dict(bs=128, n=7 * 33, dtype="bfloat16", kind="scaled", dq=True),      # wide dynamic range of absmax
        dict(bs=64, n=1000, dtype="float16", kind="randn", dq=False),
    ]
    return cases, g


def gen_input(c, g):
    n, kind = c["n"], c["kind"]
    if kind == "randn":
        x = torch.randn(n, generator=g) * 0.05
    elif kind == "uniform":
        x = torch.rand(n, generator=g) * 2 - 1
    elif kind == "edges":
        x = torch.cat([edge_block(c["bs"], g) for _ in range(-(n // -c["bs"]))])[:n]
    elif kind == "zeros":
        x = torch.randn(n, generator=g)
        x[64:128] = 0
        x[192:256] = -0.0
        x[256:] = 0
    elif kind == "scaled":
        x = torch.randn(n, generator=g) * torch.logspace(-6, 2, n).flip(0)[torch.randperm(n, generator=g)]
    return x.to(DT[c["dtype"]])


def cases_file():
    cases, g = make_cases()
    tensors = {}
    for k, c in enumerate(cases):
        A = gen_input(c, g)
        p = f"c{k}."
        packed, qs = F.quantize_4bit(A, blocksize=c["bs"], compress_statistics=False, quant_type="nf4")
        tensors[p + "input"] = A
        tensors[p + "packed"] = packed.reshape(-1)
        tensors[p + "absmax"] = qs.absmax
        tensors[p + "dequant"] = dequant_checked(packed, qs, p)
        if c["dq"]:
            packed2, qs2 = F.quantize_4bit(A, blocksize=c["bs"], compress_statistics=True, quant_type="nf4")
            assert torch.equal(packed, packed2)
            offset = qs.absmax.mean()
            assert offset.item() == qs2.offset.item()
            codes, nabs = default_quantize_blockwise(qs.absmax - offset, F.create_dynamic_map(signed=True), 256)
            tensors[p + "offset"] = offset.reshape(1)
            tensors[p + "codes"] = codes
            tensors[p + "nested_absmax"] = nabs
            tensors[p + "bnb_codes"] = qs2.absmax
            tensors[p + "bnb_nested_absmax"] = qs2.state2.absmax
            tensors[p + "bnb_dequant"] = dequant_checked(packed2, qs2, p + "dq")
            c["lut_mismatch"] = int((codes != qs2.absmax).sum())
    meta = {"cases": json.dumps(cases), "bitsandbytes": bnb.__version__, "torch": torch.__version__}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(ROOT, "cases.safetensors"), metadata=meta)
    print(f"cases.safetensors: {len(cases)} cases; LUT≠nearest codes: {sum(c.get('lut_mismatch', 0) for c in cases)}")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    src = os.path.join(ROOT, "tiny_llama_bf16")
    shutil.rmtree(src, ignore_errors=True)
    model.save_pretrained(src)
    for name, dq, dtype in [("tiny_llama_bnb_dq", True, torch.bfloat16), ("tiny_llama_bnb", False, torch.float16)]:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=dq,
                               bnb_4bit_compute_dtype=dtype)
        m = LlamaForCausalLM.from_pretrained(src, quantization_config=q, device_map="cpu", dtype=dtype)
        out = os.path.join(ROOT, name)
        shutil.rmtree(out, ignore_errors=True)
        m.save_pretrained(out)
        deq = {}
        for mod_name, mod in m.named_modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                w = mod.weight
                deq[mod_name + ".weight"] = dequant_checked(w.data, w.quant_state, mod_name)
        save_file(deq, os.path.join(ROOT, name + "_dequant.safetensors"))
        print(f"{name}: {len(deq)} quantized Linear weights")
    for d in os.listdir(ROOT):  # keep the fixtures small and path-free
        for junk in ("generation_config.json", "README.md"):
            f = os.path.join(ROOT, d, junk)
            if os.path.isfile(f):
                os.remove(f)


if __name__ == "__main__":
    os.makedirs(ROOT, exist_ok=True)
    cases_file()
    if "--no-model" not in sys.argv:
        tiny_llama()
