use anyhow::{Result, bail};
use recoup_formats::DenseDtype;
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
    if args.max_shard_mib == 0 {
        bail!("--max-shard-mib must be positive");
    }
    let path = recoup_assets::resolve(&args.model, recoup_assets::AssetKind::Model)?;
    let opened = recoup_model::load::open(&path)?;
    let dtype = if args.dtype == "bf16" {
        DenseDtype::BF16
    } else {
        DenseDtype::F32
    };
    let pb = crate::progress::bar(opened.source.names().len() as u64, "tensors");
    let n = recoup_model::export::export_hf(
        &opened,
        &args.out,
        dtype,
        args.max_shard_mib << 20,
        &|| pb.inc(1),
    )?;
    pb.finish_and_clear();
    println!(
        "wrote {} ({n} tensors, {}, from {} {})",
        args.out.display(),
        args.dtype,
        opened.format,
        path.display()
    );
    Ok(())
}
