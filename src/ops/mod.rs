//! One Rust function per op: shapes in, a backend does the work.
//!
//! Device ops (launch code for `kernels/*.cu`, each beside its CPU reference): [`gemm`],
//! [`lora_kernels`] (split forward, backward), [`lora_fused`] (single-pass forward),
//! [`lora_unfused`] (the PEFT-style baseline), [`lora_stack`] (several targets sharing x), [`qlora`] (NF4 base weight); [`lora_linear`] is
//! the public LoRA API over every backend, [`report`] the simulator's traffic table. The Llama
//! layer ops have `*_device` wrappers beside their CPU versions below (shared launch helpers in
//! [`rowwise`]), and [`pointwise`] holds the residual add and the f32 → bf16 cast.
//!
//! CPU (f32, rayon) ops of the Llama decoder, each a forward and a manual backward that the
//! autograd tape records: [`lora`] (the LoRA linear, dropout from [`philox`]), [`norm`]
//! (RMSNorm), [`rope`], [`attention`] (causal GQA), [`activation`] (SwiGLU), [`loss`]
//! (causal-LM cross-entropy), [`embedding`]; [`matmul`] is the CPU GEMM they share ([`sgemm`] its
//! packed AVX-512 kernel) and
//! [`simd`] the run-time vector dispatch of their elementwise loops.

pub mod activation;
pub mod attention;
pub mod embedding;
pub mod gemm;
pub mod lora;
pub mod lora_fused;
pub mod lora_kernels;
pub mod lora_linear;
pub mod lora_stack;
pub mod lora_unfused;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod philox;
pub mod pointwise;
pub mod qlora;
pub mod report;
pub mod rope;
pub mod rowwise;
pub mod sgemm;
pub mod simd;
