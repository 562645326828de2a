//! `lorafuse train`: the whole run, from config to adapter.
//!
//! Outputs in `output_dir`:
//! - `adapter/`: the final PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`);
//! - `checkpoints/step-N/`: resumable checkpoints (see [`super::checkpoint`]);
//! - `metrics.jsonl`, `metrics.csv`: one row per optimizer step;
//! - `loss.svg`: train loss, eval loss and learning rate;
//! - `train_config.json`: the resolved configuration; `summary.json`: the final numbers;
//! - `base/`: for the embedded default model only, the randomly initialized base model (an HF
//!   directory; a bnb-4bit one with `qlora`), so that `generate` and `merge` can use the adapter.
//!
//! Determinism: the data order is a function of (seed, epoch), the dropout masks of (seed,
//! micro-batch index), the learning rate of the step; the CPU ops are deterministic for a fixed
//! thread count. A resumed run therefore repeats the uninterrupted run's losses bit for bit.

use super::checkpoint::{self, MetricRow, Moments, TrainerState};
use super::config::{Backend, TrainConfig};
use super::data::{self, Dataset, Record, Sequences, Tokenizer};
use super::plot;
use super::progress::{fmt_duration, peak_rss_bytes, Progress};
use super::schedule::Schedule;
use super::{clip_grad_norm, loss_and_grads, AdamW};
use crate::autograd::{Grads, Tape};
use crate::model::base_weight::BaseWeightBytes;
use crate::model::{Llama, LlamaConfig, LoraConfig, Mode, TargetModules};
use crate::ops::loss::IGNORE_INDEX;
use crate::quant::Nf4Config;
use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The embedded default model's `config.json` (random init).
pub const DEFAULT_MODEL_CONFIG: &str = include_str!("../../assets/default/config.json");
/// The embedded default model's `tokenizer_config.json` (chat template, byte-level specials).
pub const DEFAULT_TOKENIZER_CONFIG: &str = include_str!("../../assets/default/tokenizer_config.json");
/// The embedded default dataset.
pub const DEFAULT_DATA: &str = include_str!("../../assets/default/data.jsonl");

/// What a finished run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub steps: usize,
    pub tokens: u64,
    pub elapsed_s: f64,
    pub tokens_per_s: f64,
    pub first_loss: f32,
    pub last_loss: f32,
    /// Mean loss of the last 10 steps (single-batch losses are noisy).
    pub last10_mean_loss: f32,
    pub final_eval_loss: Option<f32>,
    pub peak_rss_bytes: Option<u64>,
    /// Resident bytes of the base model's linear weights (NF4 with `qlora`).
    pub base_weight_bytes: BaseWeightBytes,
    pub adapter_dir: PathBuf,
    pub output_dir: PathBuf,
    pub resumed_from_step: Option<usize>,
}

/// How to start: fresh, resuming, or overwriting an earlier run.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartMode {
    /// Continue from the newest checkpoint in `output_dir` (fresh start if there is none).
    pub resume: bool,
    /// Delete an earlier run's outputs in `output_dir` and start fresh.
    pub overwrite: bool,
}

fn embedded_tokenizer() -> Result<Tokenizer> {
    let v: serde_json::Value = serde_json::from_str(DEFAULT_TOKENIZER_CONFIG)
        .map_err(|e| Error::format("assets/default/tokenizer_config.json", e.to_string()))?;
    Ok(Tokenizer::bytes(v.get("chat_template").and_then(|t| t.as_str()).map(String::from)))
}

/// The base model and its tokenizer per the config. With `qlora` the decoder's linear weights
/// are NF4 (blocksize 64, double quantization), quantized as they are loaded; a bnb-4bit
/// checkpoint is NF4 either way.
pub fn load_model(cfg: &TrainConfig) -> Result<(Llama, Tokenizer)> {
    match &cfg.model {
        Some(dir) => {
            let model =
                if cfg.qlora { Llama::from_dir_quantized(dir, Nf4Config::default())? } else { Llama::from_dir(dir)? };
            let tok = Tokenizer::from_model_dir(dir, model.config.vocab_size, model.config.eos_token_id)?;
            Ok((model, tok))
        }
        None => {
            let c = LlamaConfig::from_json(DEFAULT_MODEL_CONFIG, "assets/default/config.json")?;
            let mut model = Llama::random(c, cfg.seed)?;
            if cfg.qlora {
                model.quantize_linears(Nf4Config::default())?;
            }
            Ok((model, embedded_tokenizer()?))
        }
    }
}

/// The device line: `--backend auto` and `cpu` run on the CPU (the Llama ops have no GPU path).
fn backend_line(backend: Backend) -> String {
    let threads = rayon::current_num_threads();
    match backend {
        Backend::Cpu => format!("cpu ({threads} threads)"),
        _ => match crate::device::cuda::Cuda::new(0) {
            Ok(_) => format!(
                "auto → cpu ({threads} threads): a CUDA device is present, but the Llama ops have no GPU path yet"
            ),
            Err(e) => format!("auto → cpu ({threads} threads): no usable CUDA device ({e})"),
        },
    }
}

/// The base weights' line: resident bytes of the linear layers (NF4 vs f32).
fn base_weights_line(model: &Llama) -> String {
    let b = model.base_weight_bytes();
    let mib = |x: u64| x as f64 / (1 << 20) as f64;
    if b.nf4_weights == 0 {
        return format!("linear weights f32, {:.2} MiB resident", mib(b.f32_bytes));
    }
    format!(
        "decoder linear weights NF4 (double quant): {} weights in {:.2} MiB ({:.3} bits/weight; f32 would be {:.2} MiB){}",
        b.nf4_weights,
        mib(b.nf4_bytes),
        b.nf4_bits_per_weight(),
        mib(4 * b.nf4_weights),
        if b.f32_bytes > 0 { format!(", lm_head f32 {:.2} MiB", mib(b.f32_bytes)) } else { String::new() }
    )
}

/// The training records per the config (the embedded dataset when no file is given).
pub fn load_records(cfg: &TrainConfig) -> Result<Vec<Record>> {
    if cfg.data.is_empty() {
        data::parse_jsonl(DEFAULT_DATA, "assets/default/data.jsonl")
    } else {
        data::read_jsonl_files(&cfg.data)
    }
}

fn lora_config(cfg: &TrainConfig, base: Option<String>) -> LoraConfig {
    let targets = if cfg.targets.len() == 1 && cfg.targets[0] == "all-linear" {
        TargetModules::AllLinear
    } else {
        TargetModules::List(cfg.targets.clone())
    };
    LoraConfig {
        r: cfg.r,
        lora_alpha: cfg.alpha,
        lora_dropout: cfg.dropout,
        target_modules: targets,
        use_rslora: cfg.rslora,
        seed: cfg.seed,
        base_model_name_or_path: base,
        ..Default::default()
    }
}

/// Tokens that count in the loss of these sequences (a label at position t ≥ 1 of its row:
/// the loss shifts labels by one).
fn counted_tokens(labels: &[i64], seq: usize) -> usize {
    labels.chunks(seq).map(|row| row[1..].iter().filter(|&&l| l != IGNORE_INDEX).count()).sum()
}

/// Token-weighted mean loss over (at most `max_seqs` of) `eval`.
pub fn evaluate(model: &Llama, eval: &Sequences, micro_batch: usize, max_seqs: usize) -> Result<Option<f32>> {
    let n = eval.len().min(max_seqs);
    if n == 0 {
        return Ok(None);
    }
    let (mut sum, mut count) = (0f64, 0usize);
    for start in (0..n).step_by(micro_batch) {
        let end = (start + micro_batch).min(n);
        let r = start * eval.seq_len..end * eval.seq_len;
        let (ids, labels) = (&eval.ids[r.clone()], &eval.labels[r]);
        let c = counted_tokens(labels, eval.seq_len);
        if c == 0 {
            continue;
        }
        let tape = Tape::no_grad();
        let (loss, _) = model.loss(&tape, ids, labels, end - start, Mode::default())?;
        sum += loss.item() as f64 * c as f64;
        count += c;
    }
    Ok((count > 0).then(|| (sum / count as f64) as f32))
}

/// Rows as CSV (`eval_loss` empty where not evaluated).
pub fn metrics_csv(rows: &[MetricRow]) -> String {
    let mut s = String::from("step,loss,lr,grad_norm,tokens,tokens_per_s,elapsed_s,eval_loss\n");
    for r in rows {
        let ev = r.eval_loss.map_or(String::new(), |e| e.to_string());
        s += &format!(
            "{},{},{},{},{},{},{:.3},{}\n",
            r.step, r.loss, r.lr, r.grad_norm, r.tokens, r.tokens_per_s, r.elapsed_s, ev
        );
    }
    s
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    // Write-then-rename, so a reader (or a kill) never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn write_reports(out: &Path, rows: &[MetricRow], title: &str) -> Result<()> {
    write_file(&out.join("metrics.csv"), &metrics_csv(rows))?;
    write_file(&out.join("loss.svg"), &plot::svg(rows, title))
}

/// Runs training per `cfg`, printing progress to stdout.
pub fn train(cfg: &TrainConfig, start: StartMode) -> Result<Summary> {
    match cfg.backend {
        Backend::Cuda => {
            return Err(Error::Device(
                "backend cuda: the Llama ops (attention, norms, RoPE, loss) run on the CPU for now; \
                 use --backend cpu (or auto)"
                    .into(),
            ))
        }
        Backend::Auto | Backend::Cpu => {}
    }
    super::retain_heap_memory();
    let out = cfg.output_dir.clone();
    let ckpt_root = out.join("checkpoints");

    // Everything that can fail on input is checked before training starts.
    let (mut model, tok) = load_model(cfg)?;
    let records = load_records(cfg)?;
    if cfg.seq_len > model.config.max_position_embeddings {
        return Err(Error::config(
            "seq_len",
            format!(
                "{} exceeds the model's max_position_embeddings {}",
                cfg.seq_len, model.config.max_position_embeddings
            ),
        ));
    }
    let ds: Dataset = data::build_dataset(
        &records,
        &tok,
        model.config.vocab_size,
        cfg.seq_len,
        cfg.packing,
        cfg.eval_split,
        cfg.seed,
    )?;
    let n_train = ds.train.len();
    let per_step = cfg.micro_batch * cfg.grad_accum;
    let total =
        cfg.steps.unwrap_or_else(|| ((cfg.epochs as f64 * n_train as f64 / per_step as f64).ceil() as usize).max(1));

    // Earlier run in the same directory?
    let existing = checkpoint::list(&ckpt_root)?;
    let had_run = out.join("train_config.json").exists() || !existing.is_empty();
    if had_run && !start.resume && !start.overwrite {
        return Err(Error::config(
            "output_dir",
            format!(
                "{} already holds a run; pass --resume to continue it, --overwrite to replace it, or another --output-dir",
                out.display()
            ),
        ));
    }
    if had_run && start.overwrite {
        // `base/` is ours only for the embedded model (it depends on the seed).
        let base = if cfg.model.is_none() { "base" } else { "checkpoints" };
        for p in [
            "checkpoints",
            "adapter",
            "metrics.jsonl",
            "metrics.csv",
            "loss.svg",
            "summary.json",
            "train_config.json",
            base,
        ] {
            let p = out.join(p);
            if p.is_dir() {
                std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            } else if p.exists() {
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
    }
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;

    let base_name = match &cfg.model {
        Some(d) => d.display().to_string(),
        None => {
            // Save the random base so the adapter has a model to apply to.
            let base = out.join("base");
            if !base.join("model.safetensors").exists() {
                checkpoint::write_dir_atomically(&base, |tmp| {
                    model.save_pretrained(tmp)?;
                    checkpoint::write_synced(&tmp.join("tokenizer_config.json"), DEFAULT_TOKENIZER_CONFIG.as_bytes())
                })?;
            }
            base.display().to_string()
        }
    };
    model.add_lora(&lora_config(cfg, Some(base_name)))?;

    let mut opt_a = AdamW::new(cfg.lr);
    opt_a.weight_decay = cfg.weight_decay;
    let mut opt_b = opt_a.clone();
    let mut rows: Vec<MetricRow> = Vec::new();
    let (mut step0, mut tokens, mut prior_elapsed) = (0usize, 0u64, 0f64);
    let mut resumed_from = None;
    if start.resume {
        if let Some((_, dir)) = existing.last() {
            let loaded = checkpoint::load(dir, &mut model)?;
            let st = loaded.state;
            let diff = st.config.differences(cfg);
            if !diff.is_empty() {
                return Err(Error::config(
                    "resume",
                    format!("{} was written under another configuration: {}", dir.display(), diff.join("; ")),
                ));
            }
            // The adapter file does not carry our seed; the dropout masks need it.
            for lin in model.linears_mut() {
                if let Some(l) = lin.lora.as_mut() {
                    l.op.seed = cfg.seed;
                }
            }
            if let Some(lc) = model.lora_config.as_mut() {
                lc.seed = cfg.seed;
            }
            let (ma, mb): (Moments, Moments) = loaded.moments.into_iter().partition(|(id, _)| id % 2 == 0);
            opt_a.set_moments(ma);
            opt_b.set_moments(mb);
            opt_a.t = st.optimizer_t;
            opt_b.t = st.optimizer_t;
            step0 = st.step;
            tokens = st.tokens;
            prior_elapsed = st.elapsed_s;
            rows = st.metrics;
            resumed_from = Some(st.step);
            println!("resuming from {} (step {}/{})", dir.display(), st.step, total);
        } else {
            println!("no checkpoint in {}: starting from step 0", ckpt_root.display());
        }
    }
    let cfg_json = serde_json::to_string_pretty(cfg).map_err(|e| Error::format("train_config.json", e.to_string()))?;
    write_file(&out.join("train_config.json"), &cfg_json)?;
    // The metrics log restarts from the checkpoint's rows, so a resumed log equals an
    // uninterrupted one.
    let metrics_path = out.join("metrics.jsonl");
    let mut text = String::new();
    for r in &rows {
        text += &serde_json::to_string(r).map_err(|e| Error::format("metrics", e.to_string()))?;
        text.push('\n');
    }
    write_file(&metrics_path, &text)?;
    let mut metrics =
        std::fs::OpenOptions::new().append(true).open(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;

    let n_params: usize = model.linears().iter().filter_map(|l| l.lora.as_ref()).map(|l| l.a.len() + l.b.len()).sum();
    println!(
        "model: {} ({} layers, hidden {}, vocab {}); tokenizer: {}; chat template: {}",
        cfg.model.as_ref().map_or("embedded default (random init)".into(), |d| d.display().to_string()),
        model.config.num_hidden_layers,
        model.config.hidden_size,
        model.config.vocab_size,
        tok.source,
        if tok.template_from_model { "model's" } else { "default (ChatML)" }
    );
    println!(
        "data: {} examples ({} chat), {} train sequences × {} tokens ({} trained-on tokens), {} eval sequences",
        ds.n_examples,
        ds.n_chat,
        n_train,
        cfg.seq_len,
        ds.train_label_tokens,
        ds.eval.len()
    );
    println!(
        "LoRA: r {} alpha {} dropout {} on {} modules ({} trainable parameters); {} steps × {} sequences; backend {}",
        cfg.r,
        cfg.alpha,
        cfg.dropout,
        model.n_adapters(),
        n_params,
        total,
        per_step,
        backend_line(cfg.backend)
    );
    println!("base: {}", base_weights_line(&model));

    let sched = Schedule { kind: cfg.schedule, peak: cfg.lr, warmup: cfg.warmup_steps, total };
    let mut progress = Progress::new(total, cfg.log_every);
    let mut orders: (u64, Vec<usize>) = (u64::MAX, Vec::new());
    let t0 = Instant::now();
    let session_tokens0 = tokens;
    let mut last_ckpt: Option<PathBuf> = existing.last().map(|e| e.1.clone()).filter(|_| start.resume);
    let state_of = |step: usize, t: u64, tokens: u64, elapsed: f64, rows: &[MetricRow]| {
        TrainerState {
        step,
        total_steps: total,
        optimizer_t: t,
        seed: cfg.seed,
        micro_batches: (step * cfg.grad_accum) as u64,
        epoch: (step * per_step / n_train.max(1)) as u64,
        tokens,
        elapsed_s: elapsed,
        rng: "stateless: data order = Philox(seed, epoch); dropout = Philox(seed, micro-batch index · n_adapters + adapter index)".into(),
        metrics: rows.to_vec(),
        config: cfg.clone(),
    }
    };

    for step in step0..total {
        let lr = sched.lr(step);
        opt_a.lr = lr;
        opt_b.lr = lr * cfg.loraplus_ratio;
        let mut batches = Vec::with_capacity(cfg.grad_accum);
        for j in 0..cfg.grad_accum {
            let k = (step * cfg.grad_accum + j) as u64;
            let (mut ids, mut labels) = (Vec::new(), Vec::new());
            for i in 0..cfg.micro_batch {
                let g = k as usize * cfg.micro_batch + i;
                let epoch = (g / n_train) as u64;
                if orders.0 != epoch {
                    orders = (epoch, data::epoch_order(n_train, cfg.seed, epoch));
                }
                let (s_ids, s_labels) = ds.train.get(orders.1[g % n_train]);
                ids.extend_from_slice(s_ids);
                labels.extend_from_slice(s_labels);
            }
            let count = counted_tokens(&labels, cfg.seq_len);
            batches.push((k, ids, labels, count));
        }
        let total_count: usize = batches.iter().map(|b| b.3).sum();
        let mut grads = Grads::default();
        let mut loss = 0f64;
        for (k, ids, labels, count) in &batches {
            if *count == 0 {
                continue;
            }
            let w = *count as f32 / total_count as f32;
            let (l, g) = loss_and_grads(&model, ids, labels, cfg.micro_batch, *k)?;
            if !l.is_finite() {
                progress.finish();
                return Err(nan_error("loss", step + 1, l, &last_ckpt));
            }
            loss += l as f64 * w as f64;
            for (id, gv) in g.0 {
                match grads.0.get_mut(&id) {
                    Some(acc) => acc.iter_mut().zip(&gv).for_each(|(a, b)| *a += w * b),
                    None => {
                        grads.0.insert(id, gv.into_iter().map(|x| x * w).collect());
                    }
                }
            }
        }
        let max_norm = if cfg.max_grad_norm > 0.0 { cfg.max_grad_norm } else { f32::INFINITY };
        let grad_norm = clip_grad_norm(&mut grads, max_norm);
        if !grad_norm.is_finite() {
            progress.finish();
            return Err(nan_error("gradient norm", step + 1, grad_norm, &last_ckpt));
        }
        // LoRA+: A and B are stepped by two AdamWs that differ only in learning rate.
        let (ga, gb): (std::collections::HashMap<_, _>, _) = grads.0.into_iter().partition(|(id, _)| id % 2 == 0);
        opt_a.step(&mut model, &Grads(ga))?;
        opt_b.step(&mut model, &Grads(gb))?;
        tokens += (per_step * cfg.seq_len) as u64;
        let session = t0.elapsed().as_secs_f64();
        let tps = (tokens - session_tokens0) as f64 / session.max(1e-9);
        let done = step + 1;
        let eval_now = done == total || (cfg.eval_every > 0 && done % cfg.eval_every == 0);
        let eval_loss = if eval_now { evaluate(&model, &ds.eval, cfg.micro_batch, cfg.eval_max_seqs)? } else { None };
        let row = MetricRow {
            step: done,
            loss: loss as f32,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: tps as f32,
            elapsed_s: prior_elapsed + session,
            eval_loss,
        };
        writeln!(metrics, "{}", serde_json::to_string(&row).map_err(|e| Error::format("metrics", e.to_string()))?)
            .map_err(|e| Error::io(&metrics_path, e))?;
        rows.push(row);
        progress.update(done, loss as f32, lr, tps, session / (done - step0) as f64);
        if let Some(e) = eval_loss {
            progress.println(&format!("step {done}: eval loss {e:.4}"));
        }
        let ckpt_now = done == total || (cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0);
        if ckpt_now {
            let mut moments = opt_a.moments().clone();
            moments.extend(opt_b.moments().iter().map(|(k, v)| (*k, v.clone())));
            let st = state_of(done, opt_a.t, tokens, prior_elapsed + session, &rows);
            last_ckpt = Some(checkpoint::save(&ckpt_root, &model, &moments, &st, cfg.keep_checkpoints)?);
            write_reports(&out, &rows, &title(cfg))?;
        }
    }
    progress.finish();
    let adapter_dir = out.join("adapter");
    checkpoint::write_dir_atomically(&adapter_dir, |tmp| model.save_adapter(tmp))?;
    write_reports(&out, &rows, &title(cfg))?;
    let session = t0.elapsed().as_secs_f64();
    let summary = Summary {
        steps: total,
        tokens,
        elapsed_s: rows.last().map_or(0.0, |r| r.elapsed_s),
        tokens_per_s: if session > 0.0 { (tokens - session_tokens0) as f64 / session } else { 0.0 },
        first_loss: rows.first().map_or(f32::NAN, |r| r.loss),
        last_loss: rows.last().map_or(f32::NAN, |r| r.loss),
        last10_mean_loss: {
            let tail = &rows[rows.len().saturating_sub(10)..];
            tail.iter().map(|r| r.loss).sum::<f32>() / tail.len().max(1) as f32
        },
        final_eval_loss: rows.iter().rev().find_map(|r| r.eval_loss),
        peak_rss_bytes: peak_rss_bytes(),
        base_weight_bytes: model.base_weight_bytes(),
        adapter_dir,
        output_dir: out.clone(),
        resumed_from_step: resumed_from,
    };
    let js = serde_json::to_string_pretty(&summary).map_err(|e| Error::format("summary", e.to_string()))?;
    write_file(&out.join("summary.json"), &js)?;
    Ok(summary)
}

fn title(cfg: &TrainConfig) -> String {
    format!(
        "{} r={} lr={}",
        cfg.model.as_ref().map_or("embedded default".into(), |m| m.display().to_string()),
        cfg.r,
        cfg.lr
    )
}

fn nan_error(what: &str, step: usize, value: f32, last: &Option<PathBuf>) -> Error {
    Error::config(
        what,
        format!(
            "became {value} at step {step}; stopping. Last good checkpoint: {} (lower --lr, or check the data)",
            last.as_ref().map_or("none yet".into(), |p| p.display().to_string())
        ),
    )
}

/// Human-readable summary lines.
pub fn format_summary(s: &Summary) -> String {
    let mem = s.peak_rss_bytes.map_or("unknown".into(), |b| format!("{:.0} MiB", b as f64 / (1 << 20) as f64));
    let mut out = format!(
        "done: {} steps, {} tokens in {} ({:.0} tokens/s); loss {:.4} → {:.4} (last 10 steps: {:.4})",
        s.steps,
        s.tokens,
        fmt_duration(std::time::Duration::from_secs_f64(s.elapsed_s)),
        s.tokens_per_s,
        s.first_loss,
        s.last_loss,
        s.last10_mean_loss
    );
    if let Some(e) = s.final_eval_loss {
        out += &format!("; eval loss {e:.4}");
    }
    out += &format!(
        "\npeak memory (VmHWM): {mem}\nadapter: {}\nmetrics: {}/metrics.jsonl, metrics.csv; plot: {}/loss.svg",
        s.adapter_dir.display(),
        s.output_dir.display(),
        s.output_dir.display()
    );
    out
}
