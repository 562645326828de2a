//! End-to-end tests of the `lorafuse` binary: train → adapter → generate → merge → reload, and
//! kill -9 at random moments then `--resume` gives the uninterrupted run's losses bit for bit.

use lorafuse::autograd::Tape;
use lorafuse::model::{Llama, LlamaConfig, Mode};
use lorafuse::testing::rel_err;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lorafuse");

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lorafuse-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny random Llama saved as an HF directory (no tokenizer.json: byte-level).
fn tiny_model(dir: &Path, hidden: usize) -> PathBuf {
    let cfg = format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": 260, "hidden_size": {hidden}, "intermediate_size": {}, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": false, "eos_token_id": 257, "dtype": "float32"}}"#,
        2 * hidden
    );
    let m = Llama::random(LlamaConfig::from_json(&cfg, "tiny").unwrap(), 3).unwrap();
    let p = dir.join("model");
    m.save_pretrained(&p).unwrap();
    p
}

fn tiny_data(dir: &Path) -> PathBuf {
    let mut s = String::new();
    for i in 0..60 {
        if i % 3 == 0 {
            s += &format!("{{\"text\": \"counting {i} {} {}\"}}\n", i + 1, i + 2);
        } else {
            s += &format!(
                "{{\"messages\": [{{\"role\": \"user\", \"content\": \"double {i}\"}}, {{\"role\": \"assistant\", \"content\": \"{}\"}}]}}\n",
                2 * i
            );
        }
    }
    let p = dir.join("data.jsonl");
    std::fs::write(&p, s).unwrap();
    p
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{so}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    so
}

/// `(step, loss, lr, grad_norm, eval_loss)` of each metrics.jsonl row.
fn metrics(dir: &Path) -> Vec<(u64, f32, f32, f32, Option<f32>)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let f = |k: &str| v[k].as_f64().map(|x| x as f32);
            (v["step"].as_u64().unwrap(), f("loss").unwrap(), f("lr").unwrap(), f("grad_norm").unwrap(), f("eval_loss"))
        })
        .collect()
}

#[test]
fn train_generate_merge_reload() {
    let d = scratch("e2e");
    let model = tiny_model(&d, 32);
    let data = tiny_data(&d);
    let out = d.join("run");
    let (m, dt, o) = (model.to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap());
    let so = ok(&run(&[
        "train",
        "--model",
        m,
        "--data",
        dt,
        "--output-dir",
        o,
        "--steps",
        "12",
        "--seq-len",
        "32",
        "--micro-batch",
        "4",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "2",
        "--checkpoint-every",
        "4",
        "--keep-checkpoints",
        "2",
        "--eval-every",
        "6",
        "--targets",
        "q_proj,v_proj,down_proj",
        "--r",
        "4",
        "--loraplus-ratio",
        "4",
    ]));
    assert!(so.contains("done: 12 steps"), "{so}");
    let rows = metrics(&out);
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), (1..=12).collect::<Vec<_>>());
    assert!(rows[11].1 < rows[0].1, "loss {} → {}", rows[0].1, rows[11].1);
    assert!(rows[5].4.is_some() && rows[11].4.is_some() && rows[0].4.is_none());
    assert_eq!(std::fs::read_to_string(out.join("metrics.csv")).unwrap().lines().count(), 13);
    assert!(std::fs::read_to_string(out.join("loss.svg")).unwrap().starts_with("<svg"));
    // keep-last-2 of steps 4, 8, 12.
    let mut ck: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    ck.sort();
    assert_eq!(ck, ["step-00000008", "step-00000012"]);

    // The adapter loads in the Rust reader, with PEFT's names and our targets only.
    let adapter = out.join("adapter");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["peft_type"], "LORA");
    let mut with = Llama::from_dir(&model).unwrap();
    let rep = with.load_adapter(&adapter).unwrap();
    assert_eq!(rep.loaded.len(), 2 * 3 * 2, "{:?}", rep.loaded);
    assert!(rep.missing.is_empty());
    assert!(rep.loaded.iter().any(|k| k == "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));

    let g = ok(&run(&[
        "generate",
        "--model",
        m,
        "--adapter",
        adapter.to_str().unwrap(),
        "--chat",
        "--prompt",
        "double 4",
        "--max-new-tokens",
        "8",
    ]));
    assert!(!g.is_empty());

    // Merge, reload, and compare logits with base + adapter.
    let merged = d.join("merged");
    ok(&run(&["merge", "--model", m, "--adapter", adapter.to_str().unwrap(), "--output", merged.to_str().unwrap()]));
    let reloaded = Llama::from_dir(&merged).unwrap();
    let ids: Vec<u32> = b"double 7".iter().map(|&b| b as u32).collect();
    let tape = Tape::no_grad();
    let a = with.forward(&tape, &ids, 1, None, Mode::default()).unwrap();
    let b = reloaded.forward(&tape, &ids, 1, None, Mode::default()).unwrap();
    let want: Vec<f64> = a.data().iter().map(|&x| x as f64).collect();
    assert!(rel_err(b.data(), &want) < 1e-5);
    let base = Llama::from_dir(&model).unwrap().forward(&tape, &ids, 1, None, Mode::default()).unwrap();
    assert!(rel_err(base.data(), &want) > 1e-4, "the adapter changed nothing");

    // A second train into the same directory refuses to clobber it.
    let again = run(&["train", "--model", m, "--data", dt, "--output-dir", o, "--steps", "2"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    let _ = std::fs::remove_dir_all(&d);
}

/// `train --qlora` → adapter → `generate --qlora` → `merge --qlora` (a dense BF16 checkpoint) →
/// reload: the merged model's logits are the NF4 base + adapter's, up to BF16 rounding.
#[test]
fn qlora_train_generate_merge_reload() {
    let d = scratch("qlora");
    let model = tiny_model(&d, 64);
    let data = tiny_data(&d);
    let out = d.join("run");
    let (m, o) = (model.to_str().unwrap(), out.to_str().unwrap());
    let so = ok(&run(&[
        "train",
        "--model",
        m,
        "--data",
        data.to_str().unwrap(),
        "--output-dir",
        o,
        "--qlora",
        "--steps",
        "8",
        "--seq-len",
        "32",
        "--micro-batch",
        "4",
        "--lr",
        "1e-2",
        "--r",
        "4",
    ]));
    assert!(so.contains("decoder linear weights NF4") && so.contains("done: 8 steps"), "{so}");
    // Without a GPU path for the Llama ops, `--backend auto` says it runs on the CPU.
    assert!(so.contains("backend auto → cpu"), "{so}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let nf4 = summary["base_weight_bytes"]["nf4_weights"].as_u64().unwrap();
    assert_eq!(nf4, 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128), "{summary}");
    let rows = metrics(&out);
    assert!(rows[7].1 < rows[0].1, "loss {} → {}", rows[0].1, rows[7].1);

    let adapter = out.join("adapter");
    let a = adapter.to_str().unwrap();
    let g = ok(&run(&[
        "generate",
        "--model",
        m,
        "--adapter",
        a,
        "--qlora",
        "--prompt",
        "double 4",
        "--max-new-tokens",
        "6",
    ]));
    assert!(!g.is_empty());
    let merged = d.join("merged");
    ok(&run(&["merge", "--model", m, "--adapter", a, "--qlora", "--output", merged.to_str().unwrap()]));
    let cfg = std::fs::read_to_string(merged.join("config.json")).unwrap();
    assert!(cfg.contains("\"bfloat16\"") && !cfg.contains("quantization_config"), "{cfg}");
    let reloaded = Llama::from_dir(&merged).unwrap();
    assert!(!reloaded.is_quantized());

    let mut with = Llama::from_dir_quantized(&model, lorafuse::quant::Nf4Config::default()).unwrap();
    with.load_adapter(&adapter).unwrap();
    let ids: Vec<u32> = b"double 7".iter().map(|&b| b as u32).collect();
    let tape = Tape::no_grad();
    let logits = |m: &Llama| m.forward(&tape, &ids, 1, None, Mode::default()).unwrap().data().to_vec();
    let want: Vec<f64> = logits(&with).iter().map(|&x| x as f64).collect();
    let e = rel_err(&logits(&reloaded), &want);
    assert!(e < 2e-2, "merged bf16 vs NF4 + adapter: rel err {e}");
    with.remove_lora().unwrap();
    assert!(rel_err(&logits(&with), &want) > 1e-3, "the adapter changed nothing");
    let _ = std::fs::remove_dir_all(&d);
}

/// Spawns `lorafuse train … --resume` and SIGKILLs it after it has reported `after_steps` more
/// steps (its `--log-every 1` lines), plus a random fraction of one step's time so that the kill
/// lands in a step or in a checkpoint save. `after_steps == 0`: a kill during start-up, a random
/// few milliseconds after the spawn. Returns whether the process was killed mid-run (it was
/// still running, the last reported step was not the last one, and it reported progress); a run
/// that finished first is checked for success.
fn kill_after_progress(
    args: &[String],
    after_steps: usize,
    total: usize,
    rng: &mut lorafuse::testing::TestRng,
) -> bool {
    use std::io::BufRead;
    let mut child =
        Command::new(BIN).args(args).arg("--resume").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            // "step N/total loss …" (not "step N: eval loss …").
            let step = line.strip_prefix("step ").and_then(|r| r.split_once('/')).and_then(|(n, _)| n.parse().ok());
            if let Some(n) = step {
                if tx.send((n, Instant::now())).is_err() {
                    break;
                }
            }
        }
    });
    let (mut seen, mut last, mut times) = (0, 0usize, Vec::new());
    if after_steps == 0 {
        std::thread::sleep(Duration::from_millis(rng.next_u64() % 30));
    } else {
        // Wait for observed progress, however slow or fast the machine is.
        while seen < after_steps {
            match rx.recv_timeout(Duration::from_secs(120)) {
                Ok((n, t)) => {
                    (seen, last) = (seen + 1, n);
                    times.push(t);
                }
                Err(_) => break, // exited (or hung: the exit check below reports it)
            }
        }
        // Up to one step more: into the next step or the checkpoint save after this one.
        let step_time = match times.as_slice() {
            [.., a, b] => *b - *a,
            _ => Duration::from_millis(20),
        };
        std::thread::sleep(step_time.mul_f64((rng.next_u64() % 1000) as f64 / 1000.0));
    }
    let running = child.try_wait().unwrap().is_none();
    if running {
        child.kill().unwrap(); // SIGKILL
    }
    let status = child.wait().unwrap();
    reader.join().unwrap();
    if !running {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(status.success(), "{err}");
    }
    running && seen == after_steps && after_steps > 0 && last < total
}

/// A crash mid-save, then kill -9 at moments derived from the run's observed progress (during
/// steps, checkpoint saves and start-up), `--resume` until the run completes: every step's loss,
/// lr, grad norm and eval loss, and the final adapter bytes, equal the uninterrupted run's
/// exactly. Exact equality holds because nothing in a step depends on the process: data order,
/// dropout masks and the schedule are functions of the seed and step, the optimizer state is
/// saved in f32 without rounding, and the CPU ops are deterministic for a fixed thread count.
#[test]
fn kill_and_resume_gives_identical_losses() {
    const STEPS: usize = 40;
    /// Kills that must land mid-run. Each comes after 1–2 reported steps plus at most one
    /// step's time, so a kill advances the newest checkpoint by at most 4 steps and all of them
    /// fit in the run (crash at step 7, then 8 × 4 < 40 − 6).
    const MID_RUN_KILLS: usize = 8;
    let d = scratch("resume");
    let model = tiny_model(&d, 64);
    let data = tiny_data(&d);
    let args = |out: &Path| -> Vec<String> {
        let steps = STEPS.to_string();
        [
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--steps",
            &steps,
            "--seq-len",
            "48",
            "--micro-batch",
            "3",
            "--grad-accum",
            "2",
            "--dropout",
            "0.1",
            "--checkpoint-every",
            "1",
            "--keep-checkpoints",
            "2",
            "--eval-every",
            "5",
            "--warmup-steps",
            "3",
            "--lr",
            "5e-3",
            "--log-every",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let full = d.join("full");
    let t = Instant::now();
    ok(&Command::new(BIN).args(args(&full)).output().unwrap());
    let run_time = t.elapsed();

    let killed = d.join("killed");
    // First a crash in the middle of writing checkpoint 7: the half-written directory is left
    // behind, the complete checkpoint 6 is still there, and the resume starts from it.
    let crashed = Command::new(BIN).args(args(&killed)).env("LORAFUSE_CRASH_IN_SAVE", "7").output().unwrap();
    assert!(!crashed.status.success());
    let ck = |name: &str| killed.join("checkpoints").join(name);
    assert!(ck("step-00000007.tmp").exists() && ck("step-00000006").exists() && !ck("step-00000007").exists());
    let mut rng = lorafuse::testing::TestRng::new(11);
    let (mut mid_run, mut start_up_attempts) = (0, 0);
    for i in 0.. {
        if mid_run == MID_RUN_KILLS {
            break;
        }
        // Every third attempt a start-up kill (it may land before or after loading).
        let after = if i % 3 == 2 { 0 } else { 1 + rng.next_u64() as usize % 2 };
        start_up_attempts += usize::from(after == 0);
        mid_run += usize::from(kill_after_progress(&args(&killed), after, STEPS, &mut rng));
        assert!(i < 4 * MID_RUN_KILLS, "{mid_run} mid-run kills after {i} attempts");
    }
    let last_ckpt = checkpoint_steps(&killed);
    assert!(last_ckpt < STEPS, "the run must not have completed under the kills (checkpoint {last_ckpt})");
    ok(&Command::new(BIN).args(args(&killed)).arg("--resume").output().unwrap());
    let (a, b) = (metrics(&full), metrics(&killed));
    assert_eq!(a.len(), STEPS);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.0, y.0);
        assert_eq!(x.1.to_bits(), y.1.to_bits(), "step {}: loss {} vs {}", x.0, x.1, y.1);
        assert_eq!((x.2.to_bits(), x.3.to_bits()), (y.2.to_bits(), y.3.to_bits()), "step {}", x.0);
        assert_eq!(x.4.map(f32::to_bits), y.4.map(f32::to_bits), "step {}", x.0);
    }
    assert_eq!(a.len(), b.len());
    let w = |p: &Path| std::fs::read(p.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(w(&full) == w(&killed), "final adapters differ");
    println!("{mid_run} mid-run kills, {start_up_attempts} start-up kills; resumed from checkpoint {last_ckpt}; uninterrupted run {run_time:?}");
    let _ = std::fs::remove_dir_all(&d);
}

/// The newest complete checkpoint's step in `out/checkpoints` (0 if none).
fn checkpoint_steps(out: &Path) -> usize {
    std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// A model directory with a `tokenizer.json` (word-level, written here) and a ChatML
/// `chat_template` in tokenizer_config.json: the HF tokenizer path, the template, and the
/// assistant-only labels.
#[test]
fn hf_tokenizer_json_and_chat_template() {
    use lorafuse::train::data::Tokenizer;
    let d = scratch("hftok");
    let model = tiny_model(&d, 32);
    let specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"];
    let mut vocab = serde_json::Map::new();
    let words = ["user", "assistant", "double", "counting"];
    for (i, w) in specials.iter().chain(words.iter()).enumerate() {
        vocab.insert(w.to_string(), i.into());
    }
    for n in 0..200 {
        vocab.insert(n.to_string(), (specials.len() + words.len() + n).into());
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tj = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(model.join("tokenizer.json"), tj.to_string()).unwrap();
    let template = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    let tc = serde_json::json!({"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "</s>", "chat_template": template});
    std::fs::write(model.join("tokenizer_config.json"), tc.to_string()).unwrap();

    let tok = Tokenizer::from_model_dir(&model, 260, None).unwrap();
    assert!(tok.template_from_model);
    assert_eq!((tok.eos_id, tok.pad_id), (Some(4), 2));
    let msgs = vec![("user".to_string(), " double 60 ".to_string()), ("assistant".to_string(), "120".to_string())];
    let ex = tok.chat_example(&msgs).unwrap();
    let trained: Vec<u32> = ex.labels.iter().filter(|&&l| l >= 0).map(|&l| l as u32).collect();
    assert_eq!(trained, vec![tok.encode("120").unwrap()[0], 4], "{ex:?}");
    assert_eq!(tok.decode(&ex.ids).unwrap(), "user double 60 assistant 120");

    let data = tiny_data(&d);
    let out = d.join("run");
    let so = ok(&run(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--steps",
        "3",
        "--seq-len",
        "16",
        "--micro-batch",
        "2",
    ]));
    assert!(so.contains("tokenizer.json") && so.contains("chat template: model's"), "{so}");
    let g = run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        out.join("adapter").to_str().unwrap(),
        "--chat",
        "--prompt",
        "double 3",
        "--max-new-tokens",
        "4",
    ]);
    ok(&g);

    // transformers ≥ 4.52 saves the template as chat_template.jinja (and prefers it on load).
    let llama3 = "{% for message in messages %}{% set content = '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    std::fs::write(model.join("chat_template.jinja"), llama3).unwrap();
    let tok = Tokenizer::from_model_dir(&model, 260, None).unwrap();
    assert!(tok.template_from_model);
    let r = tok.render_chat(&[("user".into(), " double 2 ".into())], true).unwrap();
    assert_eq!(r, "<s><|im_start|>user\ndouble 2<|im_end|><|im_start|>assistant\n");
    let _ = std::fs::remove_dir_all(&d);
}
