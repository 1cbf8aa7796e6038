use anyhow::{Result, bail};
use recoup_formats::hf::HfDir;
use recoup_formats::native::CheckpointMeta;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A recoup checkpoint directory.
    path: PathBuf,
    /// Print the metadata as JSON.
    #[arg(long)]
    json: bool,
}

pub fn main(args: Args) -> Result<()> {
    let dir = HfDir::open(&args.path)?;
    let Some(meta) = CheckpointMeta::from_dir(&dir)? else {
        bail!(
            "{}: not a recoup checkpoint (no recoup metadata)",
            args.path.display()
        );
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&meta)?);
        return Ok(());
    }
    println!("method: {}  settings: {}", meta.method, meta.settings);
    match &meta.calibration {
        Some(c) => println!("calibration: {c}"),
        None => println!("calibration: none"),
    }
    println!("source: {}", meta.source);
    println!(
        "{:<44} {:>6} {:>4} {:>5} {:>5} {:>11} {:>7} {:>10}",
        "layer", "method", "bits", "group", "sym", "shape", "bpw", "rel.error"
    );
    let (mut bits, mut weights) = (0f64, 0f64);
    for (name, l) in &meta.layers {
        let n = (l.rows * l.cols) as f64;
        bits += l.bits_per_weight * n;
        weights += n;
        println!(
            "{:<44} {:>6} {:>4} {:>5} {:>5} {:>11} {:>7.3} {:>10}",
            name,
            l.method,
            l.bits,
            l.group,
            if l.sym { "yes" } else { "no" },
            format!("{}x{}", l.rows, l.cols),
            l.bits_per_weight,
            l.rel_error.map(|e| format!("{e:.5}")).unwrap_or("-".into())
        );
    }
    println!(
        "{} quantized layers, {:.3} bits per weight over them",
        meta.layers.len(),
        if weights > 0.0 { bits / weights } else { 0.0 }
    );
    Ok(())
}
