//! `recoup residual`: builds QDEC's residual sidecar for a quantized checkpoint.

use crate::quantize::{calibration_set, peak_rss_bytes, source_record};
use anyhow::{Context, Result, anyhow, bail};
use recoup_formats::hf::HfDir;
use recoup_formats::native::METADATA_KEY;
use recoup_formats::residual::{
    RESIDUAL_FORMAT_VERSION, ResidualMeta, checkpoint_digest, write_residual_file,
};
use recoup_quant::residual::{build_residuals, input_stats};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The full-precision model the checkpoint was quantized from (a path or asset name).
    #[arg(long)]
    model: String,
    /// The recoup checkpoint (from `recoup quantize`) whose residual to build.
    #[arg(long)]
    quantized: PathBuf,
    /// Output file (a safetensors sidecar, written atomically).
    #[arg(long)]
    out: PathBuf,
    /// Calibration texts for the selectors' statistics (bucket thresholds, static channel
    /// sets), run through the quantized model; `none` to skip (exact and random selection
    /// need none). Use a text you do not evaluate on.
    #[arg(long, default_value = "c4", value_delimiter = ',')]
    calib: Vec<String>,
    /// Calibration windows (the paper: 100).
    #[arg(long, default_value_t = 100)]
    nsamples: usize,
    /// Tokens per calibration window (the paper: 512).
    #[arg(long, default_value_t = 512)]
    seqlen: usize,
    /// Seed of the window sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn main(args: Args) -> Result<()> {
    let start = Instant::now();
    let model_path = recoup_assets::resolve(&args.model, recoup_assets::AssetKind::Model)?;
    let q = &args.quantized;
    // The sidecar is a file of its own: never one that replaces a checkpoint's weights.
    let out_dir = args.out.parent().filter(|p| !p.as_os_str().is_empty());
    let out_dir = out_dir
        .unwrap_or(std::path::Path::new("."))
        .canonicalize()
        .ok();
    if args.out.is_dir() || (out_dir.is_some() && out_dir == q.canonicalize().ok()) {
        bail!(
            "--out {} would be a directory or a file inside the checkpoint {}; write the sidecar beside it",
            args.out.display(),
            q.display()
        );
    }
    let q_dir = HfDir::open(q).with_context(|| format!("{} is not a checkpoint", q.display()))?;
    let meta_json = q_dir
        .metadata(METADATA_KEY)
        .ok_or_else(|| {
            anyhow!(
                "{}: not a recoup checkpoint (no `{METADATA_KEY}` metadata)",
                q.display()
            )
        })?
        .to_string();
    drop(q_dir);
    let reference = recoup_model::load::open(&model_path)?;
    let quantized = recoup_model::load::open(q)?;
    if reference.config.n_layers != quantized.config.n_layers
        || reference.config.hidden_size != quantized.config.hidden_size
    {
        bail!(
            "{} ({} layers, d={}) is not the model {} was quantized from ({} layers, d={})",
            model_path.display(),
            reference.config.n_layers,
            reference.config.hidden_size,
            q.display(),
            quantized.config.n_layers,
            quantized.config.hidden_size
        );
    }
    let no_calib = args.calib.len() == 1 && args.calib[0] == "none";
    let (stats, calibration) = if no_calib {
        (None, None)
    } else {
        let set = calibration_set(
            &args.calib,
            &quantized.tokenizer,
            args.nsamples,
            args.seqlen,
            args.seed,
        )?;
        let mut model =
            recoup_model::Model::from_source(quantized.config.clone(), quantized.source.as_ref())?;
        // Calibration statistics of the quantized weights themselves, as `ppl` measures them.
        model.set_kernel_options(recoup_model::linear::KernelOptions {
            prefill: recoup_model::linear::Prefill::Exact,
            ..Default::default()
        });
        let pb = crate::progress::bar(set.windows.len() as u64, "windows");
        pb.set_message("activation statistics of the quantized model");
        let stats = input_stats(&model, &set.windows, &mut |w| pb.set_position(w as u64))?;
        pb.finish_and_clear();
        (Some(stats), Some(set.record))
    };
    let layers = quantized.config.n_layers;
    let pb = crate::progress::bar(layers as u64, "blocks");
    pb.set_message("residuals");
    let built = build_residuals(
        reference.source.as_ref(),
        quantized.source.as_ref(),
        layers,
        stats.as_ref(),
        &mut |l| pb.set_position(l as u64),
    )?;
    pb.finish_and_clear();
    if built.is_empty() {
        bail!("{}: no packed layers, nothing to compensate", q.display());
    }
    let mut records = BTreeMap::new();
    let mut data = Vec::new();
    let (mut bytes, mut weights, mut code_err) = (0usize, 0usize, 0f64);
    for (prefix, d, r) in built {
        bytes += d.codes.len() + 2 * d.scales.len();
        weights += r.rows * r.cols;
        code_err += r.code_rel_error;
        records.insert(prefix.clone(), r);
        data.push((prefix, d));
    }
    let meta = ResidualMeta {
        format_version: RESIDUAL_FORMAT_VERSION,
        bits: 4,
        checkpoint_digest: checkpoint_digest(&meta_json),
        quantized: serde_json::json!({
            "path": q.canonicalize().unwrap_or_else(|_| q.clone()).display().to_string(),
        }),
        reference: source_record(&model_path)?,
        calibration,
        layers: records,
    };
    write_residual_file(&args.out, &meta, &data)?;
    println!(
        "residuals of {} layers: {:.1} MB ({:.2} bits per weight), mean code error {:.3} of the residual; {}; wrote {} in {:.1}s, peak RSS {:.2} GiB",
        data.len(),
        bytes as f64 / 1e6,
        8.0 * bytes as f64 / weights as f64,
        code_err / data.len() as f64,
        if stats.is_some() {
            "with selector statistics"
        } else {
            "without selector statistics (exact and random selection only)"
        },
        args.out.display(),
        start.elapsed().as_secs_f64(),
        peak_rss_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64
    );
    Ok(())
}
