use anyhow::{Context, Result};
#[cfg(feature = "cuda")]
use recoup_eval::ppl::perplexity_by_windows;
use recoup_eval::ppl::{Progress, Protocol, perplexity};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Model: a GGUF file, a Hugging Face directory, or an asset name (e.g. smollm2-135m).
    #[arg(long)]
    model: String,
    #[command(flatten)]
    kernels: crate::KernelArgs,
    /// Text: a file, or an asset name (e.g. wiki-heldout, c4).
    #[arg(long)]
    text: String,
    /// Tokens per window.
    #[arg(long, default_value_t = 2048)]
    ctx: usize,
    /// gptq: every token of each window scored; llamacpp: llama-perplexity's second half.
    #[arg(long, value_enum, default_value = "gptq")]
    protocol: ProtocolArg,
    /// Score only the first N windows.
    #[arg(long)]
    max_windows: Option<usize>,
    /// Keep the running sums in FILE after every window (written atomically); run again
    /// with the same FILE and settings to continue after the last finished window. For long
    /// evaluations that may be interrupted; the result equals an uninterrupted run's.
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
    /// Where the model runs: the CPU (windows as batched prefill), or an NVIDIA GPU (a build
    /// with `--features cuda`; every position a decode step).
    #[arg(long, value_enum, default_value = "cpu")]
    device: crate::Device,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ProtocolArg {
    Gptq,
    Llamacpp,
}

impl ProtocolArg {
    pub fn protocol(self) -> Protocol {
        match self {
            ProtocolArg::Gptq => Protocol::Gptq,
            ProtocolArg::Llamacpp => Protocol::Llamacpp,
        }
    }
}

pub fn main(args: Args) -> Result<()> {
    let text_path = recoup_assets::resolve(&args.text, recoup_assets::AssetKind::Text)?;
    let text = std::fs::read_to_string(&text_path)
        .with_context(|| format!("cannot read text {}", text_path.display()))?;
    let text_sha256 = recoup_assets::sha256_file(&text_path)?;
    args.device.check()?;
    let kernels = args.kernels.for_scoring();
    let loaded = crate::load_model(&args.model, &kernels)?;
    let tk = &loaded.tokenizer;
    let protocol = args.protocol.protocol();
    // Evaluation text is plain text: special-token spellings in it are not control tokens.
    let tokens = tk.encode_with_bos(&text, false)?;
    let bos = if tk.add_bos { tk.bos } else { None };
    let start = Instant::now();
    // What a saved state must match to be continued: everything that changes the sums.
    let settings = json!({
        "model": args.model,
        "text_sha256": text_sha256,
        "ctx": args.ctx,
        "protocol": format!("{protocol:?}"),
        "device": if args.device == crate::Device::Cuda { "cuda" } else { "cpu" },
        "reference_kernels": kernels.reference_kernels,
        "low_rank": format!("{:?}", kernels.options().low_rank),
        "prefill": kernels.options().prefill.name(),
        "qdec": kernels.qdec_record(),
    });
    let (from, earlier_seconds) = match &args.state {
        Some(path) => load_state(path, &settings)?,
        None => (Progress::default(), 0.0),
    };
    if from.windows > 0 {
        eprintln!(
            "recoup: continuing from {} after {} windows",
            args.state.as_ref().expect("loaded").display(),
            from.windows
        );
    }
    // The window count is perplexity's to decide; it reports it with each finished window.
    let pb = crate::progress::bar(0, "windows");
    // A state that cannot be written (disk full, say) is reported at once and then left
    // alone: the evaluation itself goes on and prints its result.
    let mut saving = args.state.clone();
    let on_window = |p: &Progress, total: usize| {
        pb.set_length(total as u64);
        pb.set_position(p.windows as u64);
        pb.set_message(format!("ppl {:.4}", p.ppl()));
        if let Some(path) = &saving {
            let seconds = earlier_seconds + start.elapsed().as_secs_f64();
            if let Err(e) = save_state(path, &settings, p, seconds) {
                pb.suspend(|| eprintln!("recoup: warning: {e:#}; no further state is saved"));
                saving = None;
            }
        }
    };
    let result = match args.device {
        crate::Device::Cpu => perplexity(
            &loaded.model,
            &tokens,
            bos,
            args.ctx,
            protocol,
            args.max_windows,
            from,
            on_window,
        ),
        #[cfg(feature = "cuda")]
        crate::Device::Cuda => {
            let mut gpu = crate::gpu_model(&loaded.model, &kernels, args.ctx)?;
            let mut score = |window: &[u32], positions: &[usize]| -> Result<Vec<f64>> {
                gpu.reset();
                let mut nlls = Vec::with_capacity(positions.len());
                for (pos, &token) in window[..window.len() - 1].iter().enumerate() {
                    let logits = gpu.step(token)?;
                    // The scored positions are consecutive.
                    if (positions[0]..=positions[positions.len() - 1]).contains(&pos) {
                        let next = window[pos + 1] as usize;
                        nlls.push(-recoup_kernels::ops::log_prob(&logits, next));
                    }
                }
                Ok(nlls)
            };
            let (ctx, max) = (args.ctx, args.max_windows);
            perplexity_by_windows(
                &tokens, bos, ctx, protocol, max, from, on_window, &mut score,
            )
        }
        #[cfg(not(feature = "cuda"))]
        crate::Device::Cuda => unreachable!("refused by Device::check"),
    }
    .with_context(|| format!("text {}", text_path.display()))?;
    pb.finish_and_clear();
    // A continued run reports the time and throughput of all its parts together.
    let secs = earlier_seconds + start.elapsed().as_secs_f64();
    let processed = result.windows * result.ctx;
    let prefill = kernels.options().prefill.name();
    if args.json {
        let mut v = serde_json::to_value(&result)?;
        v["text"] = text_path.display().to_string().into();
        v["text_sha256"] = text_sha256.into();
        v["model"] = args.model.clone().into();
        v["add_bos"] = tk.add_bos.into();
        v["bits_per_weight"] = loaded.model.block_bits_per_weight().into();
        v["residual_bytes_per_token"] = loaded.model.residual_bytes_per_token().into();
        v["seconds"] = secs.into();
        v["device"] = (if args.device == crate::Device::Cuda {
            "cuda"
        } else {
            "cpu"
        })
        .into();
        v["qdec"] = kernels.qdec_record().into();
        v["prefill"] = prefill.into();
        v["tokens_per_second"] = (processed as f64 / secs).into();
        println!("{v}");
    } else {
        println!(
            "protocol: {:?}, ctx {}, {} windows of {} text tokens ({} scored), BOS {}, text {} sha256 {}, {prefill} prefill",
            result.protocol,
            result.ctx,
            result.windows,
            result.text_tokens,
            result.tokens_scored,
            if tk.add_bos { "added" } else { "not added" },
            text_path.display(),
            text_sha256
        );
        if let Some(q) = kernels.qdec_record() {
            println!("qdec: {q}");
        }
        println!(
            "ppl = {:.4} +/- {:.4} (nll {:.6})",
            result.ppl, result.ppl_stderr, result.nll
        );
        println!(
            "{:.1}s, {:.1} tokens/s processed",
            secs,
            processed as f64 / secs
        );
    }
    Ok(())
}

/// The state file's format version.
const STATE_VERSION: u64 = 1;

/// The progress saved in `path` by an earlier run with the same `settings`, and the seconds
/// it ran; a fresh start when the file does not exist.
fn load_state(path: &Path, settings: &Value) -> Result<(Progress, f64)> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((Progress::default(), 0.0));
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let bad = |why: &str| anyhow::anyhow!("{} is not a ppl state file: {why}", path.display());
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
    if v["recoup_ppl_state"].as_u64() != Some(STATE_VERSION) {
        return Err(bad(&format!("no recoup_ppl_state {STATE_VERSION}")));
    }
    if &v["settings"] != settings {
        anyhow::bail!(
            "{} was saved by a run with other settings: {} (this run: {settings}); \
             use another --state file or delete it",
            path.display(),
            v["settings"]
        );
    }
    // The sums travel as their bits, so the continued sums are exactly the saved ones.
    let bits = |key: &str| -> Result<f64> {
        let hex = v[key].as_str().ok_or_else(|| bad(&format!("no {key}")))?;
        let bits = u64::from_str_radix(hex, 16).map_err(|_| bad(&format!("bad {key}")))?;
        Ok(f64::from_bits(bits))
    };
    let count = |key: &str| -> Result<usize> {
        v[key]
            .as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| bad(&format!("no {key}")))
    };
    let progress = Progress {
        windows: count("windows")?,
        sum: bits("sum")?,
        sum_sq: bits("sum_sq")?,
        count: count("count")?,
    };
    Ok((progress, v["seconds"].as_f64().unwrap_or(0.0)))
}

fn save_state(path: &Path, settings: &Value, p: &Progress, seconds: f64) -> Result<()> {
    let v = json!({
        "recoup_ppl_state": STATE_VERSION,
        "settings": settings,
        "windows": p.windows,
        "sum": format!("{:016x}", p.sum.to_bits()),
        "sum_sq": format!("{:016x}", p.sum_sq.to_bits()),
        "count": p.count,
        "seconds": seconds,
        "ppl_so_far": p.ppl(),
    });
    recoup_formats::atomic::write_file(path, |out| {
        serde_json::to_writer_pretty(&mut *out, &v)?;
        Ok(())
    })
}
