pub mod gemm;
pub mod lora_kernels;
pub mod lora_unfused;
pub mod philox;
