//! Text generation with a KV cache: greedy, or temperature + top-p (nucleus) sampling.
//!
//! Sampling: `p = softmax(logits / T)`; keep the most probable tokens whose cumulative
//! probability first reaches `top_p` (at least one), renormalize, draw with Philox.

use super::llama::{KvCache, Llama, Mode};
use crate::autograd::Tape;
use crate::ops::philox;
use crate::{Error, Result};

/// Generation settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    /// `0` = greedy (argmax).
    pub temperature: f32,
    /// Nucleus mass in `(0, 1]`.
    pub top_p: f32,
    pub seed: u64,
    /// Stop after emitting this token (default: the config's `eos_token_id`).
    pub eos_token_id: Option<u32>,
    /// Use the KV cache (`false` recomputes the whole prefix each step: for checking).
    pub use_cache: bool,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        GenerateConfig {
            max_new_tokens: 32,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            eos_token_id: None,
            use_cache: true,
        }
    }
}

/// Picks the next token from one row of logits; `u ∈ [0, 1)` is the random draw.
pub fn sample(logits: &[f32], temperature: f32, top_p: f32, u: f32) -> u32 {
    let argmax = || {
        logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32
    };
    if temperature <= 0.0 {
        return argmax();
    }
    let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<(usize, f64)> =
        logits.iter().enumerate().map(|(i, &l)| (i, (((l - mx) / temperature) as f64).exp())).collect();
    let z: f64 = p.iter().map(|x| x.1).sum();
    p.iter_mut().for_each(|x| x.1 /= z);
    p.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut keep = 0;
    let mut mass = 0.0;
    while keep < p.len() && (keep == 0 || mass < top_p as f64) {
        mass += p[keep].1;
        keep += 1;
    }
    let target = u as f64 * mass;
    let mut acc = 0.0;
    for &(i, q) in &p[..keep] {
        acc += q;
        if acc > target {
            return i as u32;
        }
    }
    p[keep - 1].0 as u32
}

impl Llama {
    /// Continues `prompt` by up to `cfg.max_new_tokens` tokens (with the adapter, if any).
    /// Returns the new tokens only.
    pub fn generate(&self, prompt: &[u32], cfg: &GenerateConfig) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(Error::config("prompt", "empty"));
        }
        if !(cfg.top_p > 0.0 && cfg.top_p <= 1.0) {
            return Err(Error::config("top_p", format!("{} is not in (0, 1]", cfg.top_p)));
        }
        let eos = cfg.eos_token_id.or(self.config.eos_token_id);
        let tape = Tape::no_grad();
        let mut cache = KvCache::new();
        let mut all = prompt.to_vec();
        let mut next_input = prompt.to_vec();
        let mut out = Vec::new();
        let vocab = self.config.vocab_size;
        let rand = philox::uniform(cfg.seed, 0, cfg.max_new_tokens);
        for &u in &rand {
            let logits = if cfg.use_cache {
                self.forward(&tape, &next_input, 1, Some(&mut cache), Mode::default())?
            } else {
                self.forward(&tape, &all, 1, None, Mode::default())?
            };
            let last = &logits.data()[logits.len() - vocab..];
            let tok = sample(last, cfg.temperature, cfg.top_p, u);
            out.push(tok);
            all.push(tok);
            next_input = vec![tok];
            if Some(tok) == eos {
                break;
            }
        }
        Ok(out)
    }
}
