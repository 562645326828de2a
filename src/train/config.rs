//! Training configuration: a TOML file and command-line flags with the same names.
//!
//! [`TrainOptions`] has every setting as an `Option`: it is both the clap argument group of
//! `lorafuse train` and the schema of the TOML file (keys are the flag names with `_` for `-`).
//! [`TrainConfig::resolve`] layers defaults ← file ← flags and checks the values.

use crate::{Error, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Half-cosine from the peak to 0 (transformers' `get_cosine_schedule_with_warmup`).
    Cosine,
    /// Straight line from the peak to 0.
    Linear,
    /// The peak for the rest of the run.
    Constant,
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The CPU now (the Llama ops have no GPU path yet).
    Auto,
    Cpu,
    /// Refused for now, with a message: the Llama ops run on the CPU.
    Cuda,
}

/// Every `lorafuse train` setting; each is optional here and falls back to the config file,
/// then to the default shown in its help.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainOptions {
    /// Hugging Face Llama model directory (config.json, *.safetensors, tokenizer.json).
    /// Default: the small model shipped in the binary, randomly initialized.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// JSONL training data, one or more files (comma-separated or repeated): lines of
    /// {"text": …} or {"messages": [{"role", "content"}, …]}. Default: the shipped dataset.
    #[arg(long, value_name = "FILE", value_delimiter = ',', num_args = 1..)]
    pub data: Option<Vec<PathBuf>>,
    /// Where the adapter, checkpoints, metrics and plot go. Default: runs/default.
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// LoRA target modules (comma-separated names such as q_proj,v_proj, or all-linear).
    /// Default: all-linear.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub targets: Option<Vec<String>>,
    /// LoRA rank. Default: 16.
    #[arg(long)]
    pub r: Option<usize>,
    /// LoRA alpha (scale alpha/r, or alpha/√r with rsLoRA). Default: 2·r.
    #[arg(long)]
    pub alpha: Option<f32>,
    /// Dropout on the LoRA branch's input, in [0, 1). Default: 0.05.
    #[arg(long)]
    pub dropout: Option<f32>,
    /// Rank-stabilized LoRA: scale alpha/√r. Default: false.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub rslora: Option<bool>,
    /// QLoRA: the decoder's frozen linear weights held as NF4 (blocksize 64, double
    /// quantization, as bitsandbytes), dequantized per use. Default: false (a bnb-4bit
    /// checkpoint is NF4 either way).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub qlora: Option<bool>,
    /// Peak learning rate. Default: 2e-4 (3e-3 for the embedded default model, which starts
    /// from random weights).
    #[arg(long)]
    pub lr: Option<f32>,
    /// LoRA+: learning rate of the B matrices = lr × this ratio. Default: 1 (plain LoRA).
    #[arg(long, value_name = "RATIO")]
    pub loraplus_ratio: Option<f32>,
    /// Linear warm-up steps from 0 to the peak learning rate. Default: 10.
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Schedule after warm-up. Default: cosine.
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleKind>,
    /// Optimizer steps to run (overrides epochs). Default: 500 for the shipped data, else from epochs.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Passes over the training data (fractional allowed), used when steps is not given. Default: 1.
    #[arg(long)]
    pub epochs: Option<f32>,
    /// Sequences per forward/backward pass. Default: 8.
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Micro-batches per optimizer step (their gradients are summed, weighted by tokens). Default: 1.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Tokens per sequence. Default: 128.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Pack examples back to back into full sequences (otherwise one example per sequence,
    /// truncated or padded). Default: true.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub packing: Option<bool>,
    /// Clip the global gradient norm to this (0 = off). Default: 1.0.
    #[arg(long)]
    pub max_grad_norm: Option<f32>,
    /// AdamW decoupled weight decay. Default: 0.0.
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// Seed of the model init, LoRA init, data order, eval split and dropout. Default: 42.
    #[arg(long)]
    pub seed: Option<u64>,
    /// auto, cpu or cuda. Default: auto (the CPU: the Llama ops run there for now).
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// Save a checkpoint every N steps (0 = only at the end). Default: 50.
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<usize>,
    /// Checkpoints to keep (older ones are deleted). Default: 2.
    #[arg(long, value_name = "N")]
    pub keep_checkpoints: Option<usize>,
    /// Fraction of the examples held out for evaluation (0 = none). Default: 0.05.
    #[arg(long)]
    pub eval_split: Option<f32>,
    /// Evaluate every N steps (and at the end; 0 = only at the end). Default: 50.
    #[arg(long, value_name = "N")]
    pub eval_every: Option<usize>,
    /// At most this many eval sequences per evaluation. Default: 64.
    #[arg(long, value_name = "N")]
    pub eval_max_seqs: Option<usize>,
    /// Print a progress line every N steps when stdout is not a terminal. Default: 10.
    #[arg(long, value_name = "N")]
    pub log_every: Option<usize>,
}

/// The resolved configuration of a run (written to `output_dir/train_config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// `None`: the embedded default model.
    pub model: Option<PathBuf>,
    /// Empty: the embedded default dataset.
    pub data: Vec<PathBuf>,
    pub output_dir: PathBuf,
    pub targets: Vec<String>,
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub rslora: bool,
    pub qlora: bool,
    pub lr: f32,
    pub loraplus_ratio: f32,
    pub warmup_steps: usize,
    pub schedule: ScheduleKind,
    pub steps: Option<usize>,
    pub epochs: f32,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub seq_len: usize,
    pub packing: bool,
    pub max_grad_norm: f32,
    pub weight_decay: f32,
    pub seed: u64,
    pub backend: Backend,
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    pub eval_split: f32,
    pub eval_every: usize,
    pub eval_max_seqs: usize,
    pub log_every: usize,
}

/// Copies every `Some` field of `$from` over `$into`.
macro_rules! overlay {
    ($into:ident, $from:ident; $($f:ident),* $(,)?) => { $( if $from.$f.is_some() { $into.$f = $from.$f.clone(); } )* };
}

impl TrainOptions {
    /// Parses a TOML config file; errors name the file, line and key.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses TOML text (`file` names it in errors).
    pub fn from_toml(text: &str, file: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::format(file, e.to_string().trim_end().to_string()))
    }

    /// `self` with every option set in `top` replacing it.
    pub fn overlaid(mut self, top: &TrainOptions) -> Self {
        overlay!(self, top; model, data, output_dir, targets, r, alpha, dropout, rslora, qlora, lr,
            loraplus_ratio, warmup_steps, schedule, steps, epochs, micro_batch, grad_accum, seq_len,
            packing, max_grad_norm, weight_decay, seed, backend, checkpoint_every, keep_checkpoints,
            eval_split, eval_every, eval_max_seqs, log_every);
        self
    }
}

impl TrainConfig {
    /// Defaults ← `file` ← `flags`, then range checks (errors name the option).
    pub fn resolve(file: Option<TrainOptions>, flags: &TrainOptions) -> Result<Self> {
        let o = file.unwrap_or_default().overlaid(flags);
        let r = o.r.unwrap_or(16);
        let embedded_data = o.data.as_ref().is_none_or(|d| d.is_empty());
        let lr_default = if o.model.is_none() { 3e-3 } else { 2e-4 };
        let c = TrainConfig {
            model: o.model,
            data: o.data.unwrap_or_default(),
            output_dir: o.output_dir.unwrap_or_else(|| PathBuf::from("runs/default")),
            targets: o.targets.unwrap_or_else(|| vec!["all-linear".into()]),
            r,
            alpha: o.alpha.unwrap_or(2.0 * r as f32),
            dropout: o.dropout.unwrap_or(0.05),
            rslora: o.rslora.unwrap_or(false),
            qlora: o.qlora.unwrap_or(false),
            lr: o.lr.unwrap_or(lr_default),
            loraplus_ratio: o.loraplus_ratio.unwrap_or(1.0),
            warmup_steps: o.warmup_steps.unwrap_or(10),
            schedule: o.schedule.unwrap_or(ScheduleKind::Cosine),
            // The shipped dataset gets a step count sized for a few minutes on two cores.
            steps: o.steps.or(if embedded_data && o.epochs.is_none() { Some(500) } else { None }),
            epochs: o.epochs.unwrap_or(1.0),
            micro_batch: o.micro_batch.unwrap_or(8),
            grad_accum: o.grad_accum.unwrap_or(1),
            seq_len: o.seq_len.unwrap_or(128),
            packing: o.packing.unwrap_or(true),
            max_grad_norm: o.max_grad_norm.unwrap_or(1.0),
            weight_decay: o.weight_decay.unwrap_or(0.0),
            seed: o.seed.unwrap_or(42),
            backend: o.backend.unwrap_or(Backend::Auto),
            checkpoint_every: o.checkpoint_every.unwrap_or(50),
            keep_checkpoints: o.keep_checkpoints.unwrap_or(2),
            eval_split: o.eval_split.unwrap_or(0.05),
            eval_every: o.eval_every.unwrap_or(50),
            eval_max_seqs: o.eval_max_seqs.unwrap_or(64),
            log_every: o.log_every.unwrap_or(10),
        };
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        let pos = |field: &str, v: usize| {
            if v == 0 {
                Err(Error::config(field, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        pos("r", self.r)?;
        pos("micro_batch", self.micro_batch)?;
        pos("grad_accum", self.grad_accum)?;
        pos("keep_checkpoints", self.keep_checkpoints)?;
        if self.seq_len < 2 {
            return Err(Error::config("seq_len", format!("{} is too short (at least 2 tokens)", self.seq_len)));
        }
        if self.steps == Some(0) {
            return Err(Error::config("steps", "must be at least 1"));
        }
        if !(self.epochs > 0.0 && self.epochs.is_finite()) {
            return Err(Error::config("epochs", format!("{} must be positive", self.epochs)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config("dropout", format!("{} is not in [0, 1)", self.dropout)));
        }
        if !(0.0..1.0).contains(&self.eval_split) {
            return Err(Error::config("eval_split", format!("{} is not in [0, 1)", self.eval_split)));
        }
        for (field, v) in [("lr", self.lr), ("loraplus_ratio", self.loraplus_ratio)] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(Error::config(field, format!("{v} must be positive")));
            }
        }
        for (field, v) in
            [("alpha", self.alpha), ("max_grad_norm", self.max_grad_norm), ("weight_decay", self.weight_decay)]
        {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(Error::config(field, format!("{v} must be a non-negative number")));
            }
        }
        if self.targets.is_empty() {
            return Err(Error::config("targets", "empty"));
        }
        Ok(())
    }

    /// Fields whose value differs from `other` (for refusing a resume under another config).
    pub fn differences(&self, other: &TrainConfig) -> Vec<String> {
        let a = serde_json::to_value(self).unwrap_or_default();
        let b = serde_json::to_value(other).unwrap_or_default();
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => a
                .iter()
                .filter(|(k, v)| b.get(k.as_str()) != Some(v) && !matches!(k.as_str(), "log_every"))
                .map(|(k, v)| format!("{k}: checkpoint {} vs now {v}", b.get(k.as_str()).cloned().unwrap_or_default()))
                .collect(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_parses_and_flags_override_it() {
        let file = TrainOptions::from_toml(include_str!("../../train.toml"), "train.toml").unwrap();
        let flags = TrainOptions { r: Some(4), ..Default::default() };
        let c = TrainConfig::resolve(Some(file), &flags).unwrap();
        assert_eq!((c.r, c.alpha, c.seq_len, c.grad_accum), (4, 32.0, 512, 4));
        assert_eq!(c.schedule, ScheduleKind::Cosine);
        let d = TrainConfig::resolve(None, &TrainOptions::default()).unwrap();
        assert_eq!((d.steps, d.lr, d.alpha), (Some(500), 3e-3, 32.0));
        let e = TrainOptions::from_toml("steps = 3\nbogus = 1\n", "x.toml").unwrap_err().to_string();
        assert!(e.contains("x.toml") && e.contains("bogus"), "{e}");
    }
}
