//! lorafuse: fused CUDA kernels for LoRA and QLoRA fine-tuning, a thin autograd tape and a
//! trainer for a Llama-architecture decoder on one GPU (or the CPU when there is none).
//!
//! Layers, top to bottom (see `DESIGN.md`):
//! - [`train`]: the training loop, optimizer, schedules, checkpoints;
//! - [`model`]: the Llama decoder built from a Hugging Face directory, LoRA injection, PEFT adapters;
//! - [`autograd`]: the tape;
//! - [`ops`]: one function per op, dispatched to a backend;
//! - [`quant`]: NF4 (bitsandbytes-compatible) quantization;
//! - [`device`]: backends (`Cpu`, `Cuda`, `Sim`) behind one trait, and the kernels built from
//!   `kernels/*.cu`;
//! - [`bench`](mod@bench): the alternated timing behind `lorafuse bench`.

pub mod autograd;
pub mod bench;
pub mod device;
pub mod error;
pub mod model;
pub mod ops;
pub mod quant;
pub mod tensor;
pub mod testing;
pub mod train;

pub use error::{Error, Result};
