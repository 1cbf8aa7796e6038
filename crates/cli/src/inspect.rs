use anyhow::{Result, bail};
use recoup_formats::hf::HfDir;
use recoup_formats::native::CheckpointMeta;
use recoup_formats::residual::ResidualFile;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A recoup checkpoint directory, or a QDEC residual sidecar.
    path: PathBuf,
    /// Print the metadata as JSON.
    #[arg(long)]
    json: bool,
}

pub fn main(args: Args) -> Result<()> {
    if args.path.is_file() {
        return sidecar(&args);
    }
    let dir = HfDir::open(&args.path)?;
    let Some(meta) = CheckpointMeta::from_dir(&dir)? else {
        bail!(
            "{}: not a recoup checkpoint (no recoup metadata)",
            args.path.display()
        );
    };
    // FBQuant's guarantee, |W_F − W| ≤ s/2, checked on what quantization recorded; the
    // tolerance covers f32 rounding (about 1e-6 of a step).
    let violations = meta
        .layers
        .values()
        .filter(|l| l.method == "fbquant")
        .filter(|l| l.max_error_steps.is_none_or(|e| e > 0.5 + 1e-4))
        .count();
    if args.json {
        let mut v = serde_json::to_value(&meta)?;
        v["fbquant_bound_violations"] = violations.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("method: {}  settings: {}", meta.method, meta.settings);
    match &meta.calibration {
        Some(c) => println!("calibration: {c}"),
        None => println!("calibration: none"),
    }
    println!("source: {}", meta.source);
    println!(
        "{:<44} {:>7} {:>4} {:>5} {:>4} {:>11} {:>4} {:>7} {:>10} {:>8}",
        "layer", "method", "bits", "group", "sym", "shape", "rank", "bpw", "rel.error", "max|E|/s"
    );
    for (name, l) in &meta.layers {
        let or_dash = |v: Option<String>| v.unwrap_or("-".into());
        println!(
            "{:<44} {:>7} {:>4} {:>5} {:>4} {:>11} {:>4} {:>7.3} {:>10} {:>8}",
            name,
            l.method,
            l.bits,
            l.group,
            if l.sym { "yes" } else { "no" },
            format!("{}x{}", l.rows, l.cols),
            or_dash(l.rank.map(|r| r.to_string())),
            l.bits_per_weight,
            or_dash(l.rel_error.map(|e| format!("{e:.5}"))),
            or_dash(l.max_error_steps.map(|e| format!("{e:.3}"))),
        );
    }
    let (bits, weights) = meta.block_layers().fold((0f64, 0f64), |(b, w), (_, l)| {
        let n = (l.rows * l.cols) as f64;
        (b + l.bits_per_weight * n, w + n)
    });
    println!(
        "{} quantized layers in the decoder blocks, {:.3} bits per weight over them",
        meta.block_layers().count(),
        if weights > 0.0 { bits / weights } else { 0.0 }
    );
    if let Some(head) = meta.layers.get("lm_head") {
        println!(
            "output head: {}-bit g{}, {:.3} bits per weight",
            head.bits, head.group, head.bits_per_weight
        );
    }
    if meta.method == "fbquant" {
        println!("fbquant bound |W_F − W| ≤ s/2 violated in {violations} layers");
    }
    Ok(())
}

/// A QDEC sidecar: what it belongs to, and per layer its shape, size and code error.
fn sidecar(args: &Args) -> Result<()> {
    let file = ResidualFile::open(&args.path)?;
    let meta = &file.meta;
    if args.json {
        println!("{}", serde_json::to_string_pretty(meta)?);
        return Ok(());
    }
    println!(
        "QDEC residual, format {}, {}-bit, for the checkpoint whose metadata hashes to {}",
        meta.format_version, meta.bits, meta.checkpoint_digest
    );
    println!("quantized: {}", meta.quantized);
    println!("reference: {}", meta.reference);
    match &meta.calibration {
        Some(c) => println!("selector statistics from: {c}"),
        None => println!("selector statistics: none (exact and random selection only)"),
    }
    println!(
        "{:<44} {:>11} {:>9} {:>13} {:>12}",
        "layer", "shape", "MB", "‖R‖/‖W‖", "code error"
    );
    let mut bytes = 0;
    for (name, l) in &meta.layers {
        let b = l.rows * l.cols / 2 + 2 * l.rows;
        bytes += b;
        println!(
            "{:<44} {:>11} {:>9.3} {:>13.4} {:>12.4}",
            name,
            format!("{}x{}", l.rows, l.cols),
            b as f64 / 1e6,
            l.weight_rel_error,
            l.code_rel_error
        );
    }
    println!("{} layers, {:.1} MB", meta.layers.len(), bytes as f64 / 1e6);
    Ok(())
}
