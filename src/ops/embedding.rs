//! Token embedding lookup: `out[t] = table[ids[t]]` (`table [V, d]`, frozen: no backward).

use crate::{Error, Result};

/// Gathers rows of `table [V, d]` for `ids`; errors on an id `≥ V`.
pub fn embedding(table: &[f32], dim: usize, ids: &[u32]) -> Result<Vec<f32>> {
    let vocab = table.len() / dim.max(1);
    let mut out = Vec::with_capacity(ids.len() * dim);
    for &id in ids {
        let i = id as usize;
        if i >= vocab {
            return Err(Error::shape("embedding", format!("token id {id} outside the vocabulary 0..{vocab}")));
        }
        out.extend_from_slice(&table[i * dim..(i + 1) * dim]);
    }
    Ok(out)
}
