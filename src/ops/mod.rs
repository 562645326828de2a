//! One Rust function per op: shapes in, a backend does the work.

pub mod gemm;
pub mod lora_kernels;
pub mod philox;
