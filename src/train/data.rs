//! Training data: JSONL files, tokenization, chat templates, the eval split and packing.
//!
//! Each non-empty line of a data file is one example, either `{"text": "…"}` (every token is
//! trained on) or `{"messages": [{"role": "system"|"user"|"assistant", "content": "…"}, …]}`
//! (OpenAI chat format; only assistant turns are trained on). Chat examples are rendered with
//! the model's `chat_template` (tokenizer_config.json) or [`DEFAULT_CHAT_TEMPLATE`]. Assistant
//! spans are found by rendering each prefix of the conversation with and without the turn:
//! the characters the turn adds are its span (which includes the template's end-of-turn
//! marker, so the model learns to stop). Tokens whose first byte lies in a span get labels.
//!
//! Tokenizers: the model's `tokenizer.json` (Hugging Face `tokenizers`), or, for a model
//! without one, bytes: ids 0–255 are the UTF-8 bytes, 256 is `<s>` and 257 is `</s>`.

use crate::ops::loss::IGNORE_INDEX;
use crate::ops::philox;
use crate::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The template used when the model's tokenizer_config.json has none (ChatML).
pub const DEFAULT_CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Byte-level vocabulary: 256 bytes, then `<s>`, `</s>`.
pub const BYTE_BOS: u32 = 256;
pub const BYTE_EOS: u32 = 257;
const BYTE_SPECIALS: [(&str, u32); 2] = [("<s>", BYTE_BOS), ("</s>", BYTE_EOS)];

enum Kind {
    Bytes,
    Hf(Box<tokenizers::Tokenizer>),
}

/// A tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    kind: Kind,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Id written into padding positions (their labels are ignored).
    pub pad_id: u32,
    /// Jinja chat template (the model's, or [`DEFAULT_CHAT_TEMPLATE`]).
    pub chat_template: String,
    /// Whether the template came from the model (for the run summary).
    pub template_from_model: bool,
    /// Where it came from, for messages.
    pub source: String,
}

/// One tokenized example: ids and unshifted labels (−100 = not trained on).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// The byte-level tokenizer (`template`: a chat template, or `None` for the default).
    pub fn bytes(template: Option<String>) -> Self {
        Tokenizer {
            kind: Kind::Bytes,
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            bos_id: Some(BYTE_BOS),
            eos_id: Some(BYTE_EOS),
            pad_id: BYTE_EOS,
            template_from_model: template.is_some(),
            chat_template: template.unwrap_or_else(|| DEFAULT_CHAT_TEMPLATE.to_string()),
            source: "byte-level".into(),
        }
    }

    /// The tokenizer of model directory `dir`: `tokenizer.json` when present, else bytes
    /// (which needs `vocab_size ≥ 258`). `tokenizer_config.json` supplies the bos/eos tokens and
    /// the chat template, unless `chat_template.jinja` holds it (what transformers ≥ 4.52
    /// writes, and loads in preference); `eos_token_id` is the fallback for eos.
    pub fn from_model_dir(dir: &Path, vocab_size: usize, eos_token_id: Option<u32>) -> Result<Self> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Option<serde_json::Map<String, Value>> = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            match serde_json::from_str(&text) {
                Ok(Value::Object(o)) => Some(o),
                Ok(_) => return Err(Error::format(cfg_path.display().to_string(), "not a JSON object")),
                Err(e) => return Err(Error::format(cfg_path.display().to_string(), format!("invalid JSON: {e}"))),
            }
        } else {
            None
        };
        let jinja = dir.join("chat_template.jinja");
        let template = match cfg.as_ref().and_then(|c| c.get("chat_template")) {
            _ if jinja.exists() => Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?),
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            // Newer files may hold a list of named templates; take "default".
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(String::from)),
            Some(other) => {
                return Err(Error::format(
                    format!("{}: field `chat_template`", cfg_path.display()),
                    format!("expected a string, got {other}"),
                ))
            }
        };
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            if vocab_size < 258 {
                return Err(Error::format(
                    dir.display().to_string(),
                    format!("no tokenizer.json, and vocab_size {vocab_size} is too small for the byte-level fallback (needs 258)"),
                ));
            }
            return Ok(Tokenizer::bytes(template));
        }
        let tok = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::format(tok_path.display().to_string(), format!("cannot load tokenizer: {e}")))?;
        let bos_token = token_string(cfg.as_ref().and_then(|c| c.get("bos_token")));
        let eos_token = token_string(cfg.as_ref().and_then(|c| c.get("eos_token")));
        let bos_id = bos_token.as_deref().and_then(|t| tok.token_to_id(t));
        let eos_id = eos_token.as_deref().and_then(|t| tok.token_to_id(t)).or(eos_token_id);
        let pad_token = token_string(cfg.as_ref().and_then(|c| c.get("pad_token")));
        let pad_id = pad_token.as_deref().and_then(|t| tok.token_to_id(t)).or(eos_id).unwrap_or(0);
        Ok(Tokenizer {
            kind: Kind::Hf(Box::new(tok)),
            bos_token,
            eos_token,
            bos_id,
            eos_id,
            pad_id,
            template_from_model: template.is_some(),
            chat_template: template.unwrap_or_else(|| DEFAULT_CHAT_TEMPLATE.to_string()),
            source: tok_path.display().to_string(),
        })
    }

    /// Token ids and each token's starting byte in `text` (special tokens in the text are
    /// recognized; nothing is added).
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<usize>)> {
        match &self.kind {
            Kind::Bytes => {
                let b = text.as_bytes();
                let (mut ids, mut offs) = (Vec::with_capacity(b.len()), Vec::with_capacity(b.len()));
                let mut i = 0;
                'outer: while i < b.len() {
                    for (s, id) in BYTE_SPECIALS {
                        if b[i..].starts_with(s.as_bytes()) {
                            ids.push(id);
                            offs.push(i);
                            i += s.len();
                            continue 'outer;
                        }
                    }
                    ids.push(b[i] as u32);
                    offs.push(i);
                    i += 1;
                }
                Ok((ids, offs))
            }
            Kind::Hf(t) => {
                let enc = t
                    .encode(text, false)
                    .map_err(|e| Error::format(self.source.clone(), format!("tokenization failed: {e}")))?;
                Ok((enc.get_ids().to_vec(), enc.get_offsets().iter().map(|o| o.0).collect()))
            }
        }
    }

    /// Token ids of `text` (special tokens in the text are recognized; nothing is added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_with_offsets(text)?.0)
    }

    /// Text of `ids` (special tokens dropped; invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.kind {
            Kind::Bytes => {
                let b: Vec<u8> = ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect();
                Ok(String::from_utf8_lossy(&b).into_owned())
            }
            Kind::Hf(t) => {
                t.decode(ids, true).map_err(|e| Error::format(self.source.clone(), format!("decoding failed: {e}")))
            }
        }
    }

    /// Renders a conversation with the chat template.
    pub fn render_chat(&self, messages: &[(String, String)], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        // HF templates call Python string methods (.strip(), .startswith()...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", &self.chat_template)
            .map_err(|e| Error::format(format!("{}: chat_template", self.source), e.to_string()))?;
        let msgs: Vec<minijinja::Value> = messages
            .iter()
            .map(|(r, c)| minijinja::Value::from_pairs([("role", r.as_str()), ("content", c.as_str())]))
            .collect();
        let ctx = minijinja::context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| Error::format(format!("{}: chat_template", self.source), e.to_string()))
    }

    /// A `{"text"}` example: `<bos>? text <eos>?`, every token trained on.
    pub fn text_example(&self, text: &str) -> Result<Example> {
        let mut ids: Vec<u32> = self.bos_id.into_iter().collect();
        ids.extend(self.encode(text)?);
        ids.extend(self.eos_id);
        let labels = ids.iter().map(|&i| i as i64).collect();
        Ok(Example { ids, labels })
    }

    /// A chat example: the rendered conversation, labels on assistant spans only.
    pub fn chat_example(&self, messages: &[(String, String)]) -> Result<Example> {
        let full = self.render_chat(messages, false)?;
        let mut spans = Vec::new();
        for (i, (role, _)) in messages.iter().enumerate() {
            if role != "assistant" {
                continue;
            }
            let before = self.render_chat(&messages[..i], true)?;
            let upto = self.render_chat(&messages[..=i], false)?;
            if !upto.starts_with(&before) || !full.starts_with(&upto) {
                return Err(Error::format(
                    format!("{}: chat_template", self.source),
                    "rendering is not prefix-stable, so assistant turns cannot be located for the loss mask",
                ));
            }
            spans.push(before.len()..upto.len());
        }
        let (ids, offs) = self.encode_with_offsets(&full)?;
        let labels = ids
            .iter()
            .zip(&offs)
            .map(|(&id, o)| if spans.iter().any(|s| s.contains(o)) { id as i64 } else { IGNORE_INDEX })
            .collect();
        Ok(Example { ids, labels })
    }
}

/// One line parsed from a data file.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Text(String),
    /// `(role, content)` pairs.
    Chat(Vec<(String, String)>),
}

/// Parses one JSONL line; the error message says what is wrong (the caller adds file:line).
pub fn parse_record(line: &str) -> std::result::Result<Record, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(o) = v else { return Err("expected a JSON object".into()) };
    match (o.get("text"), o.get("messages")) {
        (Some(Value::String(t)), None) => Ok(Record::Text(t.clone())),
        (Some(other), None) => Err(format!("`text` must be a string, got {other}")),
        (None, Some(Value::Array(msgs))) => {
            if msgs.is_empty() {
                return Err("`messages` is empty".into());
            }
            let mut out = Vec::with_capacity(msgs.len());
            for (i, m) in msgs.iter().enumerate() {
                let role = m.get("role").and_then(|r| r.as_str());
                let content = m.get("content").and_then(|c| c.as_str());
                match (role, content) {
                    (Some(r @ ("system" | "user" | "assistant" | "tool")), Some(c)) => out.push((r.into(), c.into())),
                    (Some(r), Some(_)) => {
                        return Err(format!("messages[{i}]: unknown role `{r}` (system, user, assistant, tool)"))
                    }
                    _ => return Err(format!("messages[{i}]: needs string fields `role` and `content`")),
                }
            }
            Ok(Record::Chat(out))
        }
        (None, Some(other)) => Err(format!("`messages` must be a list, got {other}")),
        (Some(_), Some(_)) => Err("has both `text` and `messages`".into()),
        (None, None) => Err("needs a `text` string or a `messages` list".into()),
    }
}

/// Reads JSONL text (`file` names it in errors); every line is checked before any is used.
pub fn parse_jsonl(text: &str, file: &str) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(parse_record(line).map_err(|msg| Error::format(format!("{file}:{}", n + 1), msg))?);
    }
    Ok(out)
}

/// Reads and parses JSONL files.
pub fn read_jsonl_files(paths: &[PathBuf]) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
        out.extend(parse_jsonl(&text, &p.display().to_string())?);
    }
    if out.is_empty() {
        return Err(Error::config("data", "no examples in the data files"));
    }
    Ok(out)
}

/// Fixed-length sequences `[n, seq_len]` with their labels.
#[derive(Debug, Clone, Default)]
pub struct Sequences {
    pub seq_len: usize,
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Sequences {
    pub fn len(&self) -> usize {
        self.ids.len().checked_div(self.seq_len).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sequence `i`: `(ids, labels)`.
    pub fn get(&self, i: usize) -> (&[u32], &[i64]) {
        let r = i * self.seq_len..(i + 1) * self.seq_len;
        (&self.ids[r.clone()], &self.labels[r])
    }
}

/// Packs examples back to back into `seq_len` sequences (the last one padded), or, without
/// packing, one example per sequence (truncated or padded). Padding has ignored labels.
pub fn pack(examples: &[Example], seq_len: usize, packing: bool, pad_id: u32) -> Sequences {
    let mut s = Sequences { seq_len, ids: Vec::new(), labels: Vec::new() };
    if packing {
        for e in examples {
            s.ids.extend_from_slice(&e.ids);
            s.labels.extend_from_slice(&e.labels);
        }
    } else {
        for e in examples {
            let n = e.ids.len().min(seq_len);
            s.ids.extend_from_slice(&e.ids[..n]);
            s.labels.extend_from_slice(&e.labels[..n]);
            s.ids.resize(s.ids.len().next_multiple_of(seq_len), pad_id);
            s.labels.resize(s.ids.len(), IGNORE_INDEX);
        }
    }
    s.ids.resize(s.ids.len().next_multiple_of(seq_len), pad_id);
    s.labels.resize(s.ids.len(), IGNORE_INDEX);
    s
}

/// Train and eval sequences, and what was read.
pub struct Dataset {
    pub train: Sequences,
    pub eval: Sequences,
    pub n_examples: usize,
    pub n_eval_examples: usize,
    pub n_chat: usize,
    /// Tokens with a label (trained on) in the train split.
    pub train_label_tokens: usize,
}

/// Tokenizes `records`, holds out `eval_split` of them (chosen by the seed), packs both.
pub fn build_dataset(
    records: &[Record],
    tok: &Tokenizer,
    vocab_size: usize,
    seq_len: usize,
    packing: bool,
    eval_split: f32,
    seed: u64,
) -> Result<Dataset> {
    let mut examples = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        let e = match r {
            Record::Text(t) => tok.text_example(t)?,
            Record::Chat(m) => tok.chat_example(m)?,
        };
        if let Some(&bad) = e.ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(Error::config(
                "data",
                format!("example {i}: token id {bad} is outside the model's vocabulary ({vocab_size})"),
            ));
        }
        examples.push(e);
    }
    // The split is a pure function of the seed and the example index.
    let u = philox::uniform(seed ^ 0xE7A1_5B17, 0, examples.len());
    let mut is_eval: Vec<bool> = u.iter().map(|&x| x < eval_split).collect();
    if eval_split > 0.0 && examples.len() >= 2 && !is_eval.iter().any(|&e| e) {
        is_eval[0] = true;
    }
    if is_eval.iter().all(|&e| e) {
        is_eval[0] = false;
    }
    let (tr, ev): (Vec<_>, Vec<_>) = examples.into_iter().zip(&is_eval).partition(|(_, &e)| !e);
    let tr: Vec<Example> = tr.into_iter().map(|x| x.0).collect();
    let ev: Vec<Example> = ev.into_iter().map(|x| x.0).collect();
    let train = pack(&tr, seq_len, packing, tok.pad_id);
    let train_label_tokens = train.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    if train_label_tokens == 0 {
        return Err(Error::config("data", "no token to train on (chat data without assistant turns?)"));
    }
    Ok(Dataset {
        eval: pack(&ev, seq_len, packing, tok.pad_id),
        train,
        n_examples: records.len(),
        n_eval_examples: ev.len(),
        n_chat: records.iter().filter(|r| matches!(r, Record::Chat(_))).count(),
        train_label_tokens,
    })
}

/// A permutation of `0..n` for `epoch` (Fisher–Yates with Philox draws keyed by the seed).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    let u = philox::uniform(seed ^ 0x0DA7_A0DE, epoch, n);
    for i in (1..n).rev() {
        let j = ((u[i] as f64 * (i + 1) as f64) as usize).min(i);
        p.swap(i, j);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_roundtrip_and_specials() {
        let t = Tokenizer::bytes(None);
        let (ids, offs) = t.encode_with_offsets("a</s>é").unwrap();
        assert_eq!(ids, vec![97, BYTE_EOS, 0xC3, 0xA9]);
        assert_eq!(offs, vec![0, 1, 5, 6]);
        assert_eq!(t.decode(&ids).unwrap(), "aé");
    }

    #[test]
    fn chat_labels_only_assistant() {
        let t = Tokenizer::bytes(None);
        let m = vec![("user".to_string(), "hi".to_string()), ("assistant".to_string(), "yo".to_string())];
        let e = t.chat_example(&m).unwrap();
        let trained: Vec<u8> = e.labels.iter().filter(|&&l| l >= 0).map(|&l| l as u8).collect();
        assert_eq!(String::from_utf8(trained).unwrap(), "yo<|im_end|>\n");
    }

    #[test]
    fn bad_lines_name_the_line() {
        let e = parse_jsonl("{\"text\": \"a\"}\n\n{\"txt\": 1}\n", "d.jsonl").unwrap_err().to_string();
        assert!(e.starts_with("d.jsonl:3:"), "{e}");
        let e = parse_jsonl("{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}", "f").unwrap_err().to_string();
        assert!(e.contains("f:1") && e.contains("unknown role"), "{e}");
    }

    #[test]
    fn packing_pads_and_permutation_is_complete() {
        let e = Example { ids: vec![1, 2, 3], labels: vec![1, 2, 3] };
        let s = pack(&[e.clone(), e.clone()], 4, true, 0);
        assert_eq!(s.ids, vec![1, 2, 3, 1, 2, 3, 0, 0]);
        assert_eq!(s.labels[6..], [IGNORE_INDEX, IGNORE_INDEX]);
        let s = pack(&[e.clone(), e], 4, false, 9);
        assert_eq!(s.ids, vec![1, 2, 3, 9, 1, 2, 3, 9]);
        let mut p = epoch_order(100, 1, 3);
        assert_ne!(p, (0..100).collect::<Vec<_>>());
        p.sort();
        assert_eq!(p, (0..100).collect::<Vec<_>>());
    }
}
