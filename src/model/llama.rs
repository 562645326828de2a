//! The Llama decoder (`LlamaForCausalLM`) on the CPU backend, with optional LoRA adapters.
//!
//! ```text
//! x = embed[ids]
//! per layer:  h = x + o_proj(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),  n = rms_norm₁(x)
//!             x = h + down_proj(silu(gate_proj(m))·up_proj(m)),                  m = rms_norm₂(h)
//! logits = lm_head(rms_norm(x))          (lm_head shares embed's weight when tied)
//! ```
//! Every linear layer may carry a LoRA adapter (`y = x·W0ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`). On a
//! recording [`Tape`] the adapters' `A`/`B` are the only trainable parameters.

use super::base_weight::LinearWeight;
use super::config::{LlamaConfig, WeightDtype};
use super::lora::{LoraConfig, LoraInit};
use super::weights::TensorFiles;
use crate::autograd::functions as F;
use crate::autograd::{Tape, Var};
use crate::ops::attention::AttnShape;
use crate::ops::embedding::embedding;
use crate::ops::lora::LoraOpConfig;
use crate::ops::philox;
use crate::ops::rope::{self, RopeTable};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A LoRA adapter on one linear layer: `A [r, in]`, `B [out, r]`.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    pub a: Arc<Vec<f32>>,
    pub b: Arc<Vec<f32>>,
    pub op: LoraOpConfig,
    /// Position among the model's adapted modules: tape ids `2·index` (A), `2·index + 1` (B),
    /// and the dropout offset `step·n_adapters + index`.
    pub index: usize,
}

/// A linear layer `y = x·Wᵀ + b`, `W [out, in]` (frozen), with an optional adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    /// HF module key, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub weight: LinearWeight,
    pub bias: Option<Arc<Vec<f32>>>,
    pub in_features: usize,
    pub out_features: usize,
    pub lora: Option<LoraWeights>,
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Layer {
    pub input_layernorm: Arc<Vec<f32>>,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub post_attention_layernorm: Arc<Vec<f32>>,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Layer {
    fn linears(&self) -> [&Linear; 7] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj, &self.gate_proj, &self.up_proj, &self.down_proj]
    }
    fn linears_mut(&mut self) -> [&mut Linear; 7] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }
}

/// `LlamaForCausalLM` with f32 weights.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: LlamaConfig,
    pub embed_tokens: Arc<Vec<f32>>,
    pub layers: Vec<Layer>,
    pub norm: Arc<Vec<f32>>,
    /// With tied embeddings its weight is the same `Arc` as `embed_tokens`.
    pub lm_head: Linear,
    pub rope: Arc<RopeTable>,
    /// Dtype the checkpoint was stored in (what [`Llama::save_pretrained`] writes).
    pub dtype: WeightDtype,
    /// The adapter configuration, once LoRA is injected.
    pub lora_config: Option<LoraConfig>,
    /// Adapters merged into the base weights (their branch is then skipped).
    pub merged: bool,
    /// Where the model was loaded from (for errors and `base_model_name_or_path`).
    pub source: PathBuf,
}

/// How a forward pass runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mode {
    /// Training: dropout on. (LoRA weights are tape parameters whenever the tape records.)
    pub train: bool,
    /// Selects the dropout masks (one step = one distinct set of masks).
    pub dropout_step: u64,
}

/// Keys and values of earlier tokens, per layer and sequence (`[t, kv_heads·head_dim]` rows).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    k: Vec<Vec<Vec<f32>>>,
    v: Vec<Vec<Vec<f32>>>,
    /// Tokens held per sequence.
    pub len: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }
}

fn err_shape(files: &TensorFiles, name: &str, msg: impl Into<String>) -> Error {
    Error::format(format!("{}: tensor `{name}`", files.location(name)), msg)
}

impl Linear {
    fn load(files: &TensorFiles, name: &str, out_f: usize, in_f: usize, bias: bool) -> Result<Self> {
        let weight = LinearWeight::load(files, &format!("{name}.weight"), out_f, in_f)?;
        let bias = if bias { Some(Arc::new(files.get_shaped(&format!("{name}.bias"), &[out_f])?)) } else { None };
        Ok(Linear { name: name.to_string(), weight, bias, in_features: in_f, out_features: out_f, lora: None })
    }

    /// `y = x·Wᵀ + b (+ LoRA)`; the adapter's A/B become tape parameters when `mode.train`.
    pub fn forward(&self, tape: &Tape, x: &Var, mode: Mode, n_adapters: usize, merged: bool) -> Result<Var> {
        match (&self.lora, merged) {
            (Some(l), false) => {
                let (r, k, n) = (l.op.r, self.in_features, self.out_features);
                let (a, b) = if tape.is_recording() {
                    (tape.param(2 * l.index, l.a.clone(), &[r, k])?, tape.param(2 * l.index + 1, l.b.clone(), &[n, r])?)
                } else {
                    (Var::from_arc(l.a.clone(), &[r, k])?, Var::from_arc(l.b.clone(), &[n, r])?)
                };
                let offset = mode.dropout_step.wrapping_mul(n_adapters as u64).wrapping_add(l.index as u64);
                self.weight.lora_linear(tape, x, self.bias.as_ref(), &a, &b, l.op, offset, mode.train)
            }
            _ => self.weight.linear(tape, x, self.bias.as_ref(), self.out_features),
        }
    }
}

impl Llama {
    /// Loads `dir/config.json` and the safetensors weights (single file or sharded).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let files = TensorFiles::open_dir(dir)?;
        Self::from_files(config, &files, dir)
    }

    /// Builds the model from a parsed config and opened weight files.
    pub fn from_files(config: LlamaConfig, files: &TensorFiles, source: &Path) -> Result<Self> {
        let c = &config;
        let (h, hd, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (qo, kvo) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let embed_tokens = Arc::new(files.get_shaped("model.embed_tokens.weight", &[c.vocab_size, h])?);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let (ab, mb) = (c.attention_bias, c.mlp_bias);
            layers.push(Layer {
                input_layernorm: Arc::new(files.get_shaped(&format!("{p}.input_layernorm.weight"), &[h])?),
                q_proj: Linear::load(files, &format!("{p}.self_attn.q_proj"), qo, h, ab)?,
                k_proj: Linear::load(files, &format!("{p}.self_attn.k_proj"), kvo, h, ab)?,
                v_proj: Linear::load(files, &format!("{p}.self_attn.v_proj"), kvo, h, ab)?,
                o_proj: Linear::load(files, &format!("{p}.self_attn.o_proj"), h, qo, ab)?,
                post_attention_layernorm: Arc::new(
                    files.get_shaped(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                ),
                gate_proj: Linear::load(files, &format!("{p}.mlp.gate_proj"), i, h, mb)?,
                up_proj: Linear::load(files, &format!("{p}.mlp.up_proj"), i, h, mb)?,
                down_proj: Linear::load(files, &format!("{p}.mlp.down_proj"), h, i, mb)?,
            });
        }
        let norm = Arc::new(files.get_shaped("model.norm.weight", &[h])?);
        let lm_head = if c.tie_word_embeddings {
            Linear {
                name: "lm_head".into(),
                weight: LinearWeight::F32(embed_tokens.clone()),
                bias: None,
                in_features: h,
                out_features: c.vocab_size,
                lora: None,
            }
        } else {
            if !files.contains("lm_head.weight") {
                return Err(err_shape(files, "lm_head.weight", "missing (and tie_word_embeddings is false)"));
            }
            Linear::load(files, "lm_head", c.vocab_size, h, false)?
        };
        let dtype = match config.dtype {
            Some(d) => d,
            None => match files.get("model.embed_tokens.weight")?.2 {
                safetensors::Dtype::BF16 => WeightDtype::BF16,
                safetensors::Dtype::F16 => WeightDtype::F16,
                _ => WeightDtype::F32,
            },
        };
        let rope = Arc::new(Self::rope_table(c));
        Ok(Llama {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            dtype,
            lora_config: None,
            merged: false,
            source: source.to_path_buf(),
        })
    }

    /// A randomly initialized model (weights `U(±1/√in)`, norms 1), for tests and benchmarks.
    pub fn random(config: LlamaConfig, seed: u64) -> Result<Self> {
        let c = &config;
        let (h, hd, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (qo, kvo) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let mut off = 0u64;
        let mut rand = |n: usize, bound: f32| -> Arc<Vec<f32>> {
            off += 1;
            Arc::new(philox::uniform(seed, off, n).into_iter().map(|u| (2.0 * u - 1.0) * bound).collect())
        };
        let mut lin = |name: String, out_f: usize, in_f: usize, bias: bool| Linear {
            weight: LinearWeight::F32(rand(out_f * in_f, 1.0 / (in_f as f32).sqrt())),
            bias: bias.then(|| rand(out_f, 0.1)),
            name,
            in_features: in_f,
            out_features: out_f,
            lora: None,
        };
        let ones = || Arc::new(vec![1.0; h]);
        let mut layers = Vec::new();
        for l in 0..c.num_hidden_layers {
            let (p, ab, mb) = (format!("model.layers.{l}"), c.attention_bias, c.mlp_bias);
            layers.push(Layer {
                input_layernorm: ones(),
                q_proj: lin(format!("{p}.self_attn.q_proj"), qo, h, ab),
                k_proj: lin(format!("{p}.self_attn.k_proj"), kvo, h, ab),
                v_proj: lin(format!("{p}.self_attn.v_proj"), kvo, h, ab),
                o_proj: lin(format!("{p}.self_attn.o_proj"), h, qo, ab),
                post_attention_layernorm: ones(),
                gate_proj: lin(format!("{p}.mlp.gate_proj"), i, h, mb),
                up_proj: lin(format!("{p}.mlp.up_proj"), i, h, mb),
                down_proj: lin(format!("{p}.mlp.down_proj"), h, i, mb),
            });
        }
        let mut lm_head = lin("lm_head".into(), c.vocab_size, h, false);
        let embed_tokens = if c.tie_word_embeddings { lm_head.weight.dense()? } else { rand(c.vocab_size * h, 1.0) };
        lm_head.weight = if c.tie_word_embeddings { LinearWeight::F32(embed_tokens.clone()) } else { lm_head.weight };
        let rope = Arc::new(Self::rope_table(c));
        let dtype = c.dtype.unwrap_or(WeightDtype::F32);
        Ok(Llama {
            config,
            embed_tokens,
            layers,
            norm: ones(),
            lm_head,
            rope,
            dtype,
            lora_config: None,
            merged: false,
            source: PathBuf::from("random"),
        })
    }

    fn rope_table(c: &LlamaConfig) -> RopeTable {
        let mut f = rope::inv_freq(c.head_dim, c.rope_theta, c.rope_scaling.as_ref());
        if let Some(factor) = c.rope_linear_factor {
            f.iter_mut().for_each(|x| *x /= factor);
        }
        RopeTable::new(&f, c.max_position_embeddings)
    }

    /// Every linear layer in a fixed order (layer by layer q, k, v, o, gate, up, down; then
    /// `lm_head`), which is also the order of adapter indices.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v: Vec<&Linear> = self.layers.iter().flat_map(|l| l.linears()).collect();
        v.push(&self.lm_head);
        v
    }

    /// As [`Llama::linears`], mutable.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v: Vec<&mut Linear> = self.layers.iter_mut().flat_map(|l| l.linears_mut()).collect();
        v.push(&mut self.lm_head);
        v
    }

    /// Number of adapted linear layers.
    pub fn n_adapters(&self) -> usize {
        self.linears().iter().filter(|l| l.lora.is_some()).count()
    }

    /// Injects LoRA adapters as PEFT's `get_peft_model` would (matching and initialization in
    /// [`super::lora`]). Replaces any previous adapter.
    pub fn add_lora(&mut self, cfg: &LoraConfig) -> Result<()> {
        cfg.validate()?;
        if self.merged {
            return Err(Error::config("lora", "unmerge the current adapter before adding another"));
        }
        let mut index = 0;
        for lin in self.linears_mut() {
            lin.lora = None;
            let Some((r, alpha)) = cfg.module(&lin.name, lin.name == "lm_head")? else { continue };
            let (k, n) = (lin.in_features, lin.out_features);
            // Init draws from a key distinct from the dropout masks'.
            let key = cfg.seed ^ 0x5EED_1A17_0000_0000;
            let unif = |off: u64, len: usize, bound: f32| -> Vec<f32> {
                philox::uniform(key, off, len).into_iter().map(|u| (2.0 * u - 1.0) * bound).collect()
            };
            let (a, b) = match cfg.init_lora_weights {
                LoraInit::Default => (unif(2 * index as u64, r * k, 1.0 / (k as f32).sqrt()), vec![0.0; n * r]),
                LoraInit::Gaussian => {
                    let a = philox::normal(key, 2 * index as u64, r * k).into_iter().map(|z| z / r as f32).collect();
                    (a, vec![0.0; n * r])
                }
                LoraInit::NoInit => (
                    unif(2 * index as u64, r * k, 1.0 / (k as f32).sqrt()),
                    unif(2 * index as u64 + 1, n * r, 1.0 / (r as f32).sqrt()),
                ),
            };
            lin.lora = Some(LoraWeights { a: Arc::new(a), b: Arc::new(b), op: cfg.op_config(r, alpha), index });
            index += 1;
        }
        if index == 0 {
            // PEFT raises here too ("Target modules ... not found in the base model").
            return Err(Error::config(
                "target_modules",
                format!("{:?} matches no linear layer of the model", cfg.target_modules),
            ));
        }
        let mut cfg = cfg.clone();
        if cfg.base_model_name_or_path.is_none() {
            cfg.base_model_name_or_path = Some(self.source.display().to_string());
        }
        self.lora_config = Some(cfg);
        Ok(())
    }

    /// Removes the adapters (unmerging first if merged).
    pub fn remove_lora(&mut self) -> Result<()> {
        if self.merged {
            self.unmerge()?;
        }
        self.linears_mut().into_iter().for_each(|l| l.lora = None);
        self.lora_config = None;
        Ok(())
    }

    /// Logits `[batch·seq, vocab]` for `ids [batch·seq]`.
    ///
    /// With a cache, `ids` are the next `seq` tokens of each sequence (positions
    /// `cache.len..`), the cache grows by them, and nothing is recorded for backward.
    pub fn forward(
        &self,
        tape: &Tape,
        ids: &[u32],
        batch: usize,
        mut cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Result<Var> {
        let c = &self.config;
        if batch == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch) {
            return Err(Error::shape(
                "llama forward",
                format!("{} token ids do not split into {batch} sequences", ids.len()),
            ));
        }
        let seq = ids.len() / batch;
        let (h, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads);
        let pos0 = cache.as_ref().map_or(0, |k| k.len);
        if pos0 + seq > self.rope.max_pos() {
            return Err(Error::shape(
                "llama forward",
                format!("{} positions exceed max_position_embeddings {}", pos0 + seq, self.rope.max_pos()),
            ));
        }
        if let Some(kc) = cache.as_deref_mut() {
            if kc.k.is_empty() {
                kc.k = vec![vec![Vec::new(); batch]; c.num_hidden_layers];
                kc.v = kc.k.clone();
            } else if kc.k[0].len() != batch {
                return Err(Error::shape(
                    "llama forward",
                    format!("cache holds {} sequences, got {batch}", kc.k[0].len()),
                ));
            }
        }
        let n_ad = self.n_adapters();
        let lin = |l: &Linear, x: &Var| l.forward(tape, x, mode, n_ad, self.merged);
        let mut x = Var::constant(embedding(&self.embed_tokens, h, ids)?, &[ids.len(), h])?;
        for (li, layer) in self.layers.iter().enumerate() {
            let n = F::rms_norm(tape, &x, &layer.input_layernorm, c.rms_norm_eps)?;
            let q = F::rope(tape, &lin(&layer.q_proj, &n)?, nh, seq, pos0, &self.rope)?;
            let mut k = F::rope(tape, &lin(&layer.k_proj, &n)?, nkv, seq, pos0, &self.rope)?;
            let mut v = lin(&layer.v_proj, &n)?;
            let mut tk = seq;
            if let Some(kc) = cache.as_deref_mut() {
                let w = nkv * hd;
                let cat = |store: &mut Vec<Vec<f32>>, new: &Var| -> Result<Var> {
                    let mut all = Vec::with_capacity(batch * (pos0 + seq) * w);
                    for (b, s) in store.iter_mut().enumerate() {
                        s.extend_from_slice(&new.data()[b * seq * w..(b + 1) * seq * w]);
                        all.extend_from_slice(s);
                    }
                    Var::constant(all, &[batch * (pos0 + seq), w])
                };
                k = cat(&mut kc.k[li], &k)?;
                v = cat(&mut kc.v[li], &v)?;
                tk = pos0 + seq;
            }
            let sh = AttnShape { batch, tq: seq, tk, heads: nh, kv_heads: nkv, head_dim: hd };
            let att = F::attention(tape, &q, &k, &v, sh)?;
            x = F::add(tape, &x, &lin(&layer.o_proj, &att)?)?;
            let m = F::rms_norm(tape, &x, &layer.post_attention_layernorm, c.rms_norm_eps)?;
            let act = F::swiglu(tape, &lin(&layer.gate_proj, &m)?, &lin(&layer.up_proj, &m)?)?;
            x = F::add(tape, &x, &lin(&layer.down_proj, &act)?)?;
        }
        if let Some(kc) = cache {
            kc.len += seq;
        }
        let xn = F::rms_norm(tape, &x, &self.norm, c.rms_norm_eps)?;
        lin(&self.lm_head, &xn)
    }

    /// Causal-LM loss of `ids` against unshifted `labels` (−100 = ignored), and the logits.
    pub fn loss(&self, tape: &Tape, ids: &[u32], labels: &[i64], batch: usize, mode: Mode) -> Result<(Var, Var)> {
        if labels.len() != ids.len() {
            return Err(Error::shape("llama loss", format!("{} labels for {} tokens", labels.len(), ids.len())));
        }
        let logits = self.forward(tape, ids, batch, None, mode)?;
        let loss = F::causal_lm_loss(tape, &logits, labels, ids.len() / batch)?;
        Ok((loss, logits))
    }
}
