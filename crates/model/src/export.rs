//! Writing an opened model as a standard Hugging Face directory that transformers loads.

use crate::Tokenizer;
use crate::load::Opened;
use anyhow::Result;
use recoup_formats::DenseDtype;
use recoup_formats::hf::write_hf_dir;
use std::path::Path;

/// Writes `opened` to `dest` (atomically): config.json, safetensors shards of at most
/// `max_shard_bytes`, tokenizer.json and tokenizer_config.json. `on_tensor` is called once
/// per tensor, for progress.
pub fn export_hf(
    opened: &Opened,
    dest: &Path,
    dtype: DenseDtype,
    max_shard_bytes: usize,
    on_tensor: &(dyn Fn() + Sync),
) -> Result<usize> {
    let config = opened.config.to_hf()?;
    let extra = tokenizer_files(&opened.tokenizer)?;
    // Only the tensors a transformers model has (GGUF extras such as rope_freqs are not).
    let names: Vec<String> = opened
        .source
        .names()
        .into_iter()
        .filter(|n| n.starts_with("model.") || n == "lm_head.weight")
        .collect();
    let source = opened.source.as_ref();
    let load = |name: &str| {
        on_tensor();
        source.tensor(name)
    };
    write_hf_dir(dest, &config, &names, &load, dtype, max_shard_bytes, &extra)?;
    Ok(names.len())
}

/// `tokenizer.json` and `tokenizer_config.json` of a tokenizer, as (file name, text).
pub fn tokenizer_files(tk: &Tokenizer) -> Result<Vec<(String, String)>> {
    Ok(vec![
        ("tokenizer.json".to_string(), tk.to_json()?),
        (
            "tokenizer_config.json".to_string(),
            serde_json::to_string_pretty(&tk.hf_tokenizer_config())? + "\n",
        ),
    ])
}
