//! Bad input to `lorafuse train` fails before training with a message naming what is wrong.

use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_lorafuse");

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lorafuse-clierr-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// Asserts failure with `code` and that stderr contains every needle; returns stderr.
fn fails(out: &Output, code: i32, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "stderr: {err}\nstdout: {}", String::from_utf8_lossy(&out.stdout));
    for n in needles {
        assert!(err.contains(n), "missing {n:?} in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn malformed_jsonl_names_file_and_line_and_nothing_is_written() {
    let d = scratch("jsonl");
    let good = d.join("good.jsonl");
    std::fs::write(&good, "{\"text\": \"fine\"}\n").unwrap();
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n\n{\"text\": \"unterminated}\n{\"text\": \"x\"}\n").unwrap();
    let out = d.join("run");
    let data = format!("{},{}", good.display(), bad.display());
    let r = run(&["train", "--data", &data, "--output-dir", out.to_str().unwrap(), "--steps", "1"]);
    fails(&r, 1, &[&format!("{}:3", bad.display()), "invalid JSON"]);
    assert!(!out.join("checkpoints").exists() && !out.join("metrics.jsonl").exists());

    std::fs::write(
        &bad,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"robot\", \"content\": \"x\"}]}\n",
    )
    .unwrap();
    let r = run(&["train", "--data", bad.to_str().unwrap(), "--output-dir", out.to_str().unwrap()]);
    fails(&r, 1, &[&format!("{}:1", bad.display()), "messages[1]", "robot"]);
    std::fs::write(&bad, "[1, 2]\n").unwrap();
    fails(&run(&["train", "--data", bad.to_str().unwrap()]), 1, &[":1", "JSON object"]);
    fails(&run(&["train", "--data", d.join("missing.jsonl").to_str().unwrap()]), 1, &["missing.jsonl"]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_toml_and_bad_values() {
    let d = scratch("toml");
    let cfg = d.join("train.toml");
    std::fs::write(&cfg, "r = 8\nseq_len = \"long\"\n").unwrap();
    fails(&run(&["train", "--config", cfg.to_str().unwrap()]), 1, &["train.toml", "line 2", "seq_len"]);
    std::fs::write(&cfg, "r = 8\nlearning_rate = 1e-3\n").unwrap();
    fails(&run(&["train", "--config", cfg.to_str().unwrap()]), 1, &["train.toml", "learning_rate"]);
    std::fs::write(&cfg, "r = 8\n[lora\n").unwrap();
    fails(&run(&["train", "--config", cfg.to_str().unwrap()]), 1, &["train.toml", "line 2"]);
    // Flags override the file: the file's bad dropout is replaced, the flag's bad one is caught.
    std::fs::write(&cfg, "dropout = 1.5\n").unwrap();
    fails(&run(&["train", "--config", cfg.to_str().unwrap()]), 1, &["dropout", "1.5"]);
    fails(&run(&["train", "--config", cfg.to_str().unwrap(), "--dropout=-1"]), 1, &["dropout", "-1"]);
    fails(&run(&["train", "--seq-len", "1"]), 1, &["seq_len"]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn unknown_flags_and_unsupported_modes() {
    fails(&run(&["train", "--learning-rate", "1"]), 2, &["--learning-rate"]);
    fails(&run(&["train", "--schedule", "exp"]), 2, &["exp", "cosine"]);
    fails(&run(&["frobnicate"]), 2, &["frobnicate"]);
    fails(&run(&["train", "--backend", "cuda"]), 1, &["cuda", "CPU"]);
    let m = std::env::temp_dir().join("lorafuse-no-such-model-dir");
    fails(&run(&["train", "--model", m.to_str().unwrap()]), 1, &["lorafuse-no-such-model-dir"]);
}

#[test]
fn help_documents_every_option() {
    let out = run(&["train", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--config",
        "--resume",
        "--overwrite",
        "--model",
        "--data",
        "--output-dir",
        "--targets",
        "--r ",
        "--alpha",
        "--dropout",
        "--rslora",
        "--qlora",
        "--lr",
        "--loraplus-ratio",
        "--warmup-steps",
        "--schedule",
        "--steps",
        "--epochs",
        "--micro-batch",
        "--grad-accum",
        "--seq-len",
        "--packing",
        "--max-grad-norm",
        "--weight-decay",
        "--seed",
        "--backend",
        "--checkpoint-every",
        "--keep-checkpoints",
        "--eval-split",
        "--eval-every",
        "--eval-max-seqs",
        "--log-every",
    ] {
        assert!(help.contains(opt), "--help lacks {opt}");
    }
    for cmd in ["info", "report", "train", "generate", "merge"] {
        assert!(String::from_utf8_lossy(&run(&["--help"]).stdout).contains(cmd));
    }
}

/// A diverging run stops at the first non-finite loss, naming the last good checkpoint, which
/// is complete on disk.
#[test]
fn nan_loss_stops_and_keeps_the_last_checkpoint() {
    let d = scratch("nan");
    let out = d.join("run");
    let r = run(&[
        "train",
        "--output-dir",
        out.to_str().unwrap(),
        "--steps",
        "8",
        "--lr",
        "1e30",
        "--warmup-steps",
        "0",
        "--seq-len",
        "16",
        "--micro-batch",
        "1",
        "--checkpoint-every",
        "1",
        "--eval-split",
        "0",
        "--max-grad-norm",
        "0",
    ]);
    let err = fails(&r, 1, &["became", "stopping", "Last good checkpoint"]);
    assert!(err.contains("NaN") || err.contains("inf"), "{err}");
    let ckpt = err.split("Last good checkpoint: ").nth(1).unwrap().split(' ').next().unwrap();
    assert!(PathBuf::from(ckpt).join("trainer_state.json").exists(), "{ckpt}");
    assert!(PathBuf::from(ckpt).join("adapter_model.safetensors").exists());
    let _ = std::fs::remove_dir_all(&d);
}
