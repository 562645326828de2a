// The one Rust <-> CUDA contract: one parameter struct per kernel family, passed by value.
//
// Read by three compilers:
//  - NVRTC/nvcc (device code): lf_bf16 = __nv_bfloat16;
//  - the host C++ compiler building the SIMT simulator: lf_bf16 = the simulator's __nv_bfloat16;
//  - bindgen (LF_BINDGEN defined): lf_bf16 = unsigned short, giving src/device/params.rs.
// Only plain C types here: NVRTC has no <stdint.h>. Pointers are device addresses (host
// addresses in the simulator); all matrices are row-major with an explicit leading dimension.
#pragma once

#if defined(LF_BINDGEN)
typedef unsigned short lf_bf16;
#elif defined(__CUDACC__) || defined(__CUDACC_RTC__)
#include <cuda_bf16.h>
typedef __nv_bfloat16 lf_bf16;
#else
#include "simt.h"
typedef __nv_bfloat16 lf_bf16;
#endif

/// C = alpha · op(A)·op(B), bf16 inputs, f32 accumulation; op and output dtype by kernel name
/// (kernels/gemm.cu): gemm_bf16_* C = A·Bᵀ with A `[M, lda≥K]`, B `[N, ldb≥K]`;
/// gemm_bf16_nn_* C = A·B with B `[K, ldb≥N]`; gemm_bf16_tn_* C = Aᵀ·B with A `[K, lda≥M]`.
/// C: `[M, ldc ≥ N]`.
typedef struct GemmParams {
    const lf_bf16* a;
    const lf_bf16* b;
    void* c;
    int m;
    int n;
    int k;
    int lda;
    int ldb;
    int ldc;
    float alpha;
} GemmParams;

/// Dropout of x in the LoRA branch (kernels/philox.cuh): element e of x is kept iff Philox word
/// e%4 of counter (e/4, offset) under key seed is >= threshold; kept values scale by `scale`.
/// threshold = 0 disables dropout.
typedef struct DropoutParams {
    unsigned long long seed;
    unsigned long long offset;
    unsigned int threshold;
    float scale;
} DropoutParams;

/// LoRA linear forward, y = x·W0ᵀ + (drop(x)·Aᵀ ⊙ col_scale)·Bᵀ, kernels lora_down_rt*,
/// lora_fwd_split_*, lora_fwd_fused_*.
/// x `[M,K]`, w0 `[N,K]`, a `[R,K]` (R = Σ ranks of stacked targets), b `[N,R]` (for one target);
/// col_scale `[R]` = alpha/r (or alpha/√r) per column of S.
/// Outputs: s `[M,R]` f32 = drop(x)·Aᵀ (saved for backward), s_scaled `[M,R]` bf16 = S ⊙ col_scale,
/// y `[M,N]` (f32 or bf16 by kernel name). lora_fwd_split reads s_scaled written by lora_down_rt*.
typedef struct LoraForwardParams {
    const lf_bf16* x;
    const lf_bf16* w0;
    const lf_bf16* a;
    const lf_bf16* b;
    float* s;
    lf_bf16* s_scaled;
    const float* col_scale;
    void* y;
    int m;
    int n;
    int k;
    int r;
    DropoutParams dropout;
} LoraForwardParams;

/// LoRA linear backward, kernels lora_bwd_*. Inputs as in the forward plus
/// s_scaled `[M,R]` (saved), dy `[M,N]`. Outputs:
///   ds `[M,R]` bf16 = (dy·B) ⊙ col_scale, and the partials of dB `[N,R]` = dyᵀ·s_scaled into
///     `workspace`, one `[N,R]` f32 slab per 128 rows of M                  (lora_bwd_ds_db)
///   partials of dA `[R,K]` = dsᵀ·(mask⊙x) into `workspace`, one `[R,K]` slab per K-split of
///     `split_rows` rows (a multiple of 64)                               (lora_bwd_da_rt*)
///   dx `[M,K]` = drop'(ds·A) + dy·W0 (f32 or bf16 by kernel name)          (lora_bwd_dx_*)
/// Partials are summed by splitk_reduce.
typedef struct LoraBackwardParams {
    const lf_bf16* x;
    const lf_bf16* w0;
    const lf_bf16* a;
    const lf_bf16* b;
    const lf_bf16* s_scaled;
    const lf_bf16* dy;
    lf_bf16* ds;
    float* workspace;
    void* dx;
    const float* col_scale;
    int m;
    int n;
    int k;
    int r;
    int split_rows;
    DropoutParams dropout;
} LoraBackwardParams;

/// `out[i]` = scale · Σ_z `partial[z·len + i]` for i < len, z < splits, summed in z order
/// (deterministic, unlike f32 atomics).
typedef struct SplitKReduceParams {
    const float* partial;
    float* out;
    long long len;
    int splits;
    float scale;
} SplitKReduceParams;

/// Self-tests of the SIMT simulator (kernels/simt_selftest.cu, kernels simt_selftest_*). Run in
/// the simulator they check it; run on a GPU they check the simulator's fragment layouts
/// against the hardware. Each kernel's comment says how it uses the buffers and `mode`.
typedef struct SimtSelftestParams {
    const unsigned int* in;
    unsigned int* out;
    float* fout;
    int n;
    int mode;
} SimtSelftestParams;

/// Elementwise kernels of the unfused (PEFT-style) LoRA baseline, kernels/elementwise.cu:
///   dropout_bf16:     `out[i]` = bf16(mask_i · `x[i]`)                  (x, out bf16; materialized)
///   masked_axpy_f32:  `out[i]` = `base[i]` + alpha · mask_i · `x[i]`      (x, base, out f32;
///                                                                    base may be null: 0)
/// mask_i = 0 or dropout.scale (Philox, element i), or 1 when dropout.threshold = 0.
typedef struct ElementwiseParams {
    const void* x;
    const float* base;
    void* out;
    long long n;
    float alpha;
    DropoutParams dropout;
} ElementwiseParams;

/// An NF4 weight as the kernels read it (bitsandbytes layout, SPECS.md B; kernels/nf4.cuh):
/// n elements (row-major flat), `packed` `[ceil(n/2)]` bytes (even element in the high nibble),
/// blocks of 2^blocksize_log2 elements (32…4096). Block scales: f32 `absmax` `[nblocks]` when
/// `absmax_code` is null; else double-quantized: `absmax_code` u8 `[nblocks]`, `nested_absmax`
/// f32 `[ceil(nblocks / 2^nested_log2)]`, `nested_map` f32 `[256]`, `nested_offset`, with
/// 2^(blocksize_log2 + nested_log2) ≥ 1024.
typedef struct Nf4Weight {
    const unsigned char* packed;
    const float* absmax;
    const unsigned char* absmax_code;
    const float* nested_absmax;
    const float* nested_map;
    float nested_offset;
    int blocksize_log2;
    int nested_log2;
    long long n;
} Nf4Weight;

/// NF4 → bf16 dequantization, kernel nf4_dequant_bf16 (kernels/nf4.cu): out `[w.n]` bf16.
typedef struct Nf4DequantParams {
    Nf4Weight w;
    lf_bf16* out;
} Nf4DequantParams;

/// QLoRA linear with W0 `[N,K]` dequantized tile by tile inside the GEMM main loop (kernels
/// qlora_fwd_split_*, qlora_bwd_dx_* in kernels/lora.cu): the LoRA parameters (lora.w0 unused)
/// plus the NF4 W0 (w0.n = N·K).
typedef struct QloraForwardParams {
    LoraForwardParams lora;
    Nf4Weight w0;
} QloraForwardParams;

typedef struct QloraBackwardParams {
    LoraBackwardParams lora;
    Nf4Weight w0;
} QloraBackwardParams;

/// RMSNorm over rows of k elements (kernels/norm.cu; CPU reference src/ops/norm.rs), one block
/// per row, element type T by kernel suffix (_f32, _bf16), f32 arithmetic:
/// rms_norm_fwd_*: `rstd[r] = 1/√(mean_k x[r,k]² + eps)` (f32, written), `out = T(w ⊙ T(x·rstd))`
/// (Hugging Face: normalize in f32, cast to the input type, then scale);
/// rms_norm_bwd_*: `out = dx = rstd·(g − x̂·mean_k(g·x̂))`, `g = dy·w`, `x̂ = x·rstd` (rstd read).
typedef struct RmsNormParams {
    const void* x;
    const void* w;
    const void* dy;
    float* rstd;
    void* out;
    long long rows;
    int k;
    float eps;
} RmsNormParams;

/// SwiGLU h = silu(g)·u over n elements (kernels/activation.cu; src/ops/activation.rs), T by
/// kernel suffix: swiglu_fwd_*: out = T(T(silu(g))·u); swiglu_bwd_*: out = dg =
/// dh·u·σ(g)·(1 + g·(1 − σ(g))), out2 = du = dh·silu(g).
typedef struct SwigluParams {
    const void* g;
    const void* u;
    const void* dh;
    void* out;
    void* out2;
    long long n;
} SwigluParams;

/// Rotary embedding in place on x `[rows, heads·2·half]` (kernels/rope.cu; src/ops/rope.rs),
/// rotate_half layout: dimension i < half pairs with i + half. Row r is at position
/// pos0 + r % seq; cos, sin f32 `[max_pos, half]`; sign = −1 rotates by −θ (the backward).
typedef struct RopeParams {
    void* x;
    const float* cos;
    const float* sin;
    long long rows;
    int heads;
    int half;
    int seq;
    int pos0;
    float sign;
} RopeParams;

/// Causal-LM cross-entropy (kernels/loss.cu; src/ops/loss.rs), one block per row of logits
/// `[rows, vocab]` (T by kernel suffix): targets `[rows]` (the host shifts the labels; −100 is
/// not counted). `loss_rows[r] = logsumexp(logits[r]) − logits[r, t]` (f32; 0 when not counted);
/// `dlogits[r] = (softmax(logits[r]) − onehot(t))·inv_count` (all 0 when not counted).
typedef struct CrossEntropyParams {
    const void* logits;
    const long long* targets;
    float* loss_rows;
    void* dlogits;
    long long rows;
    int vocab;
    float inv_count;
} CrossEntropyParams;

/// Causal grouped-query attention on CUDA cores (kernels/attention.cu; src/ops/attention.rs),
/// T by kernel suffix, f32 arithmetic. q `[B·tq, heads·d]`, k, v `[B·tk, kv_heads·d]`
/// (token-major); query head h reads KV head h / (heads/kv_heads); query i sees keys
/// j ≤ i + tk − tq; d ≤ 256. scale = d^-½.
/// attention_fwd_*: out = O `[B·tq, heads·d]`, lse `[B, heads, tq]` f32 written.
/// attention_bwd_dq_*: out = dQ, delta `[B, heads, tq]` = rowsum(P∘dP) written (dout, lse read).
/// attention_bwd_dkv_*: out = dK, out2 = dV `[B·tk, kv_heads·d]` (dout, lse, delta read).
typedef struct AttentionParams {
    const void* q;
    const void* k;
    const void* v;
    const void* dout;
    void* out;
    void* out2;
    float* lse;
    float* delta;
    int batch;
    int tq;
    int tk;
    int heads;
    int kv_heads;
    int head_dim;
    float scale;
} AttentionParams;

/// AdamW on f32 parameters (kernels/optim.cu; CPU: src/train/mod.rs, `AdamW::step`), n elements:
/// g' = grad_scale·g; p −= lr·weight_decay·p; m = β1·m + (1−β1)·g'; v = β2·v + (1−β2)·g'²;
/// p −= step·m / (√v / bc2s + eps), with step = lr/(1−β1^t), bc2s = √(1−β2^t).
typedef struct AdamWParams {
    float* p;
    const float* g;
    float* m;
    float* v;
    long long n;
    float lr;
    float beta1;
    float beta2;
    float eps;
    float weight_decay;
    float step;
    float bc2s;
    float grad_scale;
} AdamWParams;

/// Σ x² of f32 x `[n]` (kernels/optim.cu, sum_squares_f32): block b writes its grid-stride
/// share's sum to `partials[b]`, in a fixed order; the host adds the partials in order.
typedef struct SumSquaresParams {
    const float* x;
    float* partials;
    long long n;
} SumSquaresParams;

/// Token embedding lookup (kernels/embedding.cu; src/ops/embedding.rs), T by kernel suffix:
/// `out[t, :] = table[ids[t], :]` for `tokens` ids (checked < vocab on the host), rows of `dim`.
typedef struct EmbeddingParams {
    const void* table;
    const unsigned* ids;
    void* out;
    long long tokens;
    int dim;
} EmbeddingParams;

/// Pointwise tensor arithmetic (kernels/pointwise.cu; src/ops/pointwise.rs), n elements:
/// add_*: `out = a + b` (T by suffix, rounded once); cast_f32_bf16: `out = bf16(a)` (b unused).
typedef struct PointwiseParams {
    const void* a;
    const void* b;
    void* out;
    long long n;
} PointwiseParams;
