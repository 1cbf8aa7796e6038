use anyhow::{bail, Result};
use recoup_formats::hf::{write_hf_dir, ExportDtype};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Model: a GGUF file, a Hugging Face directory, or an asset name.
    #[arg(long)]
    model: String,
    /// Output directory (written atomically; replaced if it exists).
    #[arg(long)]
    out: PathBuf,
    /// Storage precision of the exported weights.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    dtype: String,
    /// Largest safetensors shard, in MiB (bigger models get an index and several shards).
    #[arg(long, default_value_t = 2048)]
    max_shard_mib: usize,
}

pub fn main(args: Args) -> Result<()> {
    let path = recoup_assets::resolve(&args.model, recoup_assets::AssetKind::Model)?;
    let opened = recoup_model::load::open(&path)?;
    if args.max_shard_mib == 0 {
        bail!("--max-shard-mib must be positive");
    }
    let config = opened.config.to_hf()?;
    let tk = &opened.tokenizer;
    let extra = vec![
        ("tokenizer.json".to_string(), tk.to_json()?),
        ("tokenizer_config.json".to_string(), serde_json::to_string_pretty(&tk.hf_tokenizer_config())? + "\n"),
    ];
    // Only the tensors a transformers model has: GGUF extras (rope_freqs) are refused above.
    let names: Vec<String> = opened.source.names().into_iter().filter(|n| n.starts_with("model.") || n == "lm_head.weight").collect();
    let dtype = if args.dtype == "bf16" { ExportDtype::BF16 } else { ExportDtype::F32 };
    let source = opened.source.as_ref();
    let pb = crate::progress::bar(names.len() as u64, "tensors");
    let load = |name: &str| {
        pb.inc(1);
        source.tensor(name)
    };
    write_hf_dir(&args.out, &config, &names, &load, dtype, args.max_shard_mib << 20, &extra)?;
    pb.finish_and_clear();
    println!("wrote {} ({} tensors, {}, from {} {})", args.out.display(), names.len(), args.dtype, opened.format, path.display());
    Ok(())
}
