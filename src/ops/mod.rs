pub mod gemm;
pub mod lora;
pub mod lora_kernels;
pub mod lora_linear;
pub mod lora_unfused;
pub mod matmul;
pub mod philox;
pub mod report;
