//! Checkpoints that survive a kill at any moment.
//!
//! A checkpoint is a directory `output_dir/checkpoints/step-NNNNNNNN/` holding the PEFT adapter
//! (`adapter_config.json`, `adapter_model.safetensors`), the AdamW moments
//! (`optimizer.safetensors`: `m.<id>`, `v.<id>` per tape parameter id) and
//! `trainer_state.json` (step, optimizer step, seed, data position, metrics so far, config).
//!
//! Writing: everything goes into `step-NNNNNNNN.tmp`, each file is fsynced, the directory is
//! renamed into place and the parent directory fsynced. A rename is atomic, so a reader sees
//! either the whole checkpoint or none of it; a kill mid-save leaves only a `.tmp` directory,
//! which the next run deletes. Older checkpoints beyond keep-last-N are deleted only after the
//! new one is in place.
//!
//! Nothing random needs saving: the data order is a function of (seed, epoch), the dropout
//! masks of (seed, micro-batch index), and the schedule of the step.

use super::config::TrainConfig;
use crate::model::weights::{decode, write_safetensors};
use crate::model::{Llama, WeightDtype};
use crate::{Error, Result};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Optimizer moments per tape parameter id.
pub type Moments = HashMap<usize, (Vec<f32>, Vec<f32>)>;

/// One row of the metrics log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRow {
    pub step: usize,
    pub loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    /// Tokens processed so far (sequences × seq_len).
    pub tokens: u64,
    pub tokens_per_s: f32,
    pub elapsed_s: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f32>,
}

/// `trainer_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    pub total_steps: usize,
    /// AdamW's step counter (bias correction).
    pub optimizer_t: u64,
    pub seed: u64,
    /// Micro-batches consumed (the data position: epoch = this·micro_batch / n_sequences).
    pub micro_batches: u64,
    pub epoch: u64,
    pub tokens: u64,
    pub elapsed_s: f64,
    /// How the run's randomness is derived (documentation for readers of the file).
    pub rng: String,
    pub metrics: Vec<MetricRow>,
    pub config: TrainConfig,
}

/// Directory name of the checkpoint after `step`.
pub fn dir_name(step: usize) -> String {
    format!("step-{step:08}")
}

fn fsync_path(p: &Path) -> Result<()> {
    std::fs::File::open(p).and_then(|f| f.sync_all()).map_err(|e| Error::io(p, e))
}

/// Writes `bytes` to `path` and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| Error::io(path, e))
}

/// Replaces directory `dest` by a directory filled by `fill`, atomically: `fill` writes into a
/// sibling `.tmp` directory, whose files are then fsynced before the rename.
pub fn write_dir_atomically(dest: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent =
        dest.parent().ok_or_else(|| Error::config("output_dir", format!("{} has no parent", dest.display())))?;
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let mut tmp = dest.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    fill(&tmp)?;
    for entry in std::fs::read_dir(&tmp).map_err(|e| Error::io(&tmp, e))? {
        fsync_path(&entry.map_err(|e| Error::io(&tmp, e))?.path())?;
    }
    fsync_path(&tmp)?;
    if dest.exists() {
        // Only the final adapter directory is ever replaced; move the old one aside first so a
        // kill here still leaves one complete copy.
        let mut old = dest.as_os_str().to_owned();
        old.push(".old");
        let old = PathBuf::from(old);
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dest, &old).map_err(|e| Error::io(dest, e))?;
        std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))?;
    }
    fsync_path(parent)
}

/// Saves a checkpoint into `ckpt_root/step-N`, then deletes all but the newest `keep`.
pub fn save(ckpt_root: &Path, model: &Llama, moments: &Moments, state: &TrainerState, keep: usize) -> Result<PathBuf> {
    let dest = ckpt_root.join(dir_name(state.step));
    write_dir_atomically(&dest, |tmp| {
        model.save_adapter(tmp)?;
        let mut t: BTreeMap<String, (Vec<usize>, &[f32])> = BTreeMap::new();
        for (id, (m, v)) in moments {
            t.insert(format!("m.{id}"), (vec![m.len()], m));
            t.insert(format!("v.{id}"), (vec![v.len()], v));
        }
        write_safetensors(&tmp.join("optimizer.safetensors"), &t, WeightDtype::F32)?;
        let json =
            serde_json::to_string_pretty(state).map_err(|e| Error::format("trainer_state.json", e.to_string()))?;
        write_synced(&tmp.join("trainer_state.json"), json.as_bytes())?;
        crash_point(state.step);
        Ok(())
    })?;
    let all = list(ckpt_root)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
    }
    Ok(dest)
}

/// Test hook: `LORAFUSE_CRASH_IN_SAVE=N` aborts the process while checkpoint N is written but
/// not yet renamed into place, so a test can check that a crash mid-save loses nothing.
fn crash_point(step: usize) {
    if std::env::var("LORAFUSE_CRASH_IN_SAVE").ok().and_then(|s| s.parse::<usize>().ok()) == Some(step) {
        std::process::abort();
    }
}

/// Complete checkpoints under `ckpt_root`, oldest first; deletes leftovers of interrupted saves.
pub fn list(ckpt_root: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(ckpt_root) else { return Ok(out) };
    for e in rd {
        let e = e.map_err(|e| Error::io(ckpt_root, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("step-") else { continue };
        if rest.ends_with(".tmp") {
            std::fs::remove_dir_all(e.path()).map_err(|err| Error::io(e.path(), err))?;
            continue;
        }
        if let Ok(step) = rest.parse::<usize>() {
            out.push((step, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// A loaded checkpoint.
pub struct Loaded {
    pub state: TrainerState,
    pub moments: Moments,
    pub dir: PathBuf,
}

/// Loads the checkpoint in `dir` into `model` (whose adapter layout must match).
pub fn load(dir: &Path, model: &mut Llama) -> Result<Loaded> {
    let sp = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| Error::format(sp.display().to_string(), e.to_string()))?;
    let report = model.load_adapter(dir)?;
    if !report.missing.is_empty() {
        return Err(Error::format(dir.display().to_string(), format!("adapter lacks {:?}", report.missing)));
    }
    let op = dir.join("optimizer.safetensors");
    let bytes = std::fs::read(&op).map_err(|e| Error::io(&op, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::format(op.display().to_string(), e.to_string()))?;
    let mut moments: Moments = HashMap::new();
    for name in st.names() {
        let bad = || Error::format(format!("{}: tensor `{name}`", op.display()), "unexpected name or dtype");
        let (kind, id) = name.split_once('.').ok_or_else(bad)?;
        let id: usize = id.parse().map_err(|_| bad())?;
        let tv = st.tensor(name).map_err(|e| Error::format(op.display().to_string(), e.to_string()))?;
        let data = decode(tv.dtype(), tv.data()).ok_or_else(bad)?;
        let slot = moments.entry(id).or_default();
        match kind {
            "m" => slot.0 = data,
            "v" => slot.1 = data,
            _ => return Err(bad()),
        }
    }
    Ok(Loaded { state, moments, dir: dir.to_path_buf() })
}
