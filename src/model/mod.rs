//! The Llama decoder built from a Hugging Face directory, LoRA injection with PEFT semantics,
//! PEFT adapter files, merge/unmerge, and generation.
//!
//! - [`config`]: `config.json` (transformers v4 and v5 forms);
//! - [`base_weight`]: frozen linear weights, f32 or NF4 (QLoRA), dequantized per use;
//! - [`weights`]: safetensors reading (single/sharded, F32/BF16/F16) and writing;
//! - [`llama`]: the model and its forward (training with the tape, or inference with a KV cache);
//! - [`lora`]: `LoraConfig` / `adapter_config.json` and target matching;
//! - [`peft`]: adapter files, merge/unmerge, full-checkpoint save;
//! - [`generate`]: greedy and top-p sampling.

pub mod base_weight;
pub mod config;
pub mod generate;
pub mod llama;
pub mod lora;
pub mod peft;
pub mod weights;

pub use base_weight::LinearWeight;
pub use config::{LlamaConfig, WeightDtype};
pub use generate::GenerateConfig;
pub use llama::{KvCache, Layer, Linear, Llama, LoraWeights, Mode};
pub use lora::{LoraConfig, LoraInit, TargetModules};
pub use peft::AdapterReport;
