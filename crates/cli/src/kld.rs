use anyhow::{Context, Result};
use recoup_eval::kld::{
    FORMAT_VERSION, Header, ReferenceFile, is_reference_file, kl_divergence, write_reference,
};
use recoup_eval::ppl::Protocol;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The model measured: a GGUF file, a Hugging Face directory, a recoup checkpoint, or an
    /// asset name.
    #[arg(long)]
    model: String,
    /// The reference model (usually the full-precision original).
    #[arg(long)]
    reference: String,
    #[command(flatten)]
    kernels: crate::KernelArgs,
    /// Text: a file, or an asset name (e.g. wiki-heldout, c4).
    #[arg(long)]
    text: String,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// gptq: every token of each window scored; llamacpp: llama-perplexity's second half.
    #[arg(long, value_enum, default_value = "gptq")]
    protocol: crate::ppl::ProtocolArg,
    /// Score only the first N windows (the reference file then holds N windows).
    #[arg(long)]
    max_windows: Option<usize>,
    /// The reference's log-probabilities file: reused when it matches the reference, text,
    /// ctx and protocol, written otherwise (default: one per setting under $RECOUP_HOME/kld).
    #[arg(long)]
    reference_logits: Option<PathBuf>,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
}

/// The reference as recorded in the file: its path with size and modification time, so a
/// replaced model file is not mistaken for the one the logits came from.
fn describe_reference(path: &Path) -> Result<String> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    Ok(format!(
        "{} ({} bytes, modified {modified})",
        canonical.display(),
        meta.len()
    ))
}

pub fn main(args: Args) -> Result<()> {
    let text_path = recoup_assets::resolve(&args.text, recoup_assets::AssetKind::Text)?;
    let text = std::fs::read_to_string(&text_path)
        .with_context(|| format!("cannot read text {}", text_path.display()))?;
    let text_sha256 = recoup_assets::sha256_file(&text_path)?;
    let reference_path = recoup_assets::resolve(&args.reference, recoup_assets::AssetKind::Model)?;
    let protocol = args.protocol.protocol();
    let reference_desc = describe_reference(&reference_path)?;
    let logits_path = args.reference_logits.clone().unwrap_or_else(|| {
        let key = recoup_assets::sha256_bytes(
            format!("{reference_desc}|{text_sha256}|{}|{protocol:?}", args.ctx).as_bytes(),
        );
        recoup_assets::cache_dir()
            .join("kld")
            .join(format!("{}.kld", &key[..16]))
    });
    // Only an earlier reference file may be replaced, never whatever else the path names.
    if logits_path.exists() && !is_reference_file(&logits_path) {
        anyhow::bail!(
            "{} exists and is not a recoup KL reference file; choose another --reference-logits",
            logits_path.display()
        );
    }
    let start = Instant::now();
    // The windows to score, from the measured model's tokenizer (its weights load later).
    let model_path = recoup_assets::resolve(&args.model, recoup_assets::AssetKind::Model)?;
    let windows = {
        let tk = recoup_model::load::open(&model_path)?.tokenizer;
        let tokens = tk.encode_with_bos(&text, false)?;
        Protocol::window_count(tokens.len(), args.ctx, args.max_windows)
            .with_context(|| format!("text {}", text_path.display()))?
    };
    // A file from the same reference, text, ctx and protocol with enough windows is reused.
    let reuse = logits_path.exists()
        && ReferenceFile::open(&logits_path).is_ok_and(|f| {
            let h = &f.header;
            h.reference == reference_desc
                && h.text_sha256 == text_sha256
                && h.ctx == args.ctx
                && h.protocol == protocol
                && h.windows >= windows
        });
    // The reference runs first and is dropped before the measured model loads.
    if reuse {
        eprintln!(
            "recoup: reusing reference log-probabilities {}",
            logits_path.display()
        );
    } else {
        let reference = crate::load_model(&args.reference, &crate::KernelArgs::plain())?;
        let tk = &reference.tokenizer;
        let tokens = tk.encode_with_bos(&text, false)?;
        let header = Header {
            format_version: FORMAT_VERSION,
            reference: reference_desc.clone(),
            text_sha256: text_sha256.clone(),
            ctx: args.ctx,
            protocol,
            windows,
            vocab: reference.model.config.vocab_size,
        };
        let pb = crate::progress::bar(windows as u64, "reference windows");
        let bos = if tk.add_bos { tk.bos } else { None };
        write_reference(
            &logits_path,
            &reference.model,
            &tokens,
            bos,
            &header,
            |done, _| pb.set_position(done as u64),
        )
        .with_context(|| format!("reference {}", args.reference))?;
        pb.finish_and_clear();
        eprintln!(
            "recoup: wrote reference log-probabilities {} ({:.1} MB) in {:.1}s",
            logits_path.display(),
            std::fs::metadata(&logits_path)?.len() as f64 / 1e6,
            start.elapsed().as_secs_f64()
        );
    }
    let kernels = args.kernels.for_scoring();
    let loaded = crate::load_model(&args.model, &kernels)?;
    let tk = &loaded.tokenizer;
    let tokens = tk.encode_with_bos(&text, false)?;
    let bos = if tk.add_bos { tk.bos } else { None };
    let mut file = ReferenceFile::open(&logits_path)?;
    let pb = crate::progress::bar(windows as u64, "windows");
    let result = kl_divergence(
        &loaded.model,
        &mut file,
        &tokens,
        bos,
        windows,
        |done, _, kld| {
            pb.set_position(done as u64);
            pb.set_message(format!("kld {kld:.5}"));
        },
    )?;
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    if args.json {
        let mut v = serde_json::to_value(&result)?;
        v["model"] = args.model.clone().into();
        v["reference"] = args.reference.clone().into();
        v["reference_logits"] = logits_path.display().to_string().into();
        v["text"] = text_path.display().to_string().into();
        v["text_sha256"] = text_sha256.into();
        v["qdec"] = kernels.qdec_record().into();
        v["seconds"] = secs.into();
        println!("{v}");
        return Ok(());
    }
    println!(
        "protocol: KL(reference ‖ model) per scored token, {:?}, ctx {}, {} windows ({} tokens scored), BOS {}, text {} sha256 {}; reference log-probabilities {}",
        result.protocol,
        result.ctx,
        result.windows,
        result.tokens_scored,
        if tk.add_bos { "added" } else { "not added" },
        text_path.display(),
        text_sha256,
        logits_path.display()
    );
    if let Some(q) = kernels.qdec_record() {
        println!("qdec: {q}");
    }
    println!(
        "kld mean {:.6} ± {:.6}, median {:.6}, p90 {:.6}, p99 {:.6}, max {:.6}",
        result.kld_mean,
        result.kld_stderr,
        result.kld_median,
        result.kld_p90,
        result.kld_p99,
        result.kld_max
    );
    println!(
        "top-1 agreement {:.2} %; ppl {:.4} vs reference {:.4} ({:+.2} %)",
        100.0 * result.top1_agreement,
        result.ppl,
        result.ppl_reference,
        100.0 * (result.ppl / result.ppl_reference - 1.0)
    );
    println!("{secs:.1}s");
    Ok(())
}
