use anyhow::{Context, Result};
#[cfg(feature = "cuda")]
use recoup_eval::ppl::perplexity_by_windows;
use recoup_eval::ppl::{Protocol, perplexity};
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
    let mut kernels = args.kernels;
    // Perplexity scores prompt positions only: QDEC corrects each as a decode step would.
    kernels.qdec_prefill = true;
    let loaded = crate::load_model(&args.model, &kernels)?;
    let tk = &loaded.tokenizer;
    let protocol = args.protocol.protocol();
    // Evaluation text is plain text: special-token spellings in it are not control tokens.
    let tokens = tk.encode_with_bos(&text, false)?;
    let bos = if tk.add_bos { tk.bos } else { None };
    let start = Instant::now();
    // The window count is perplexity's to decide; it reports it with each finished window.
    let pb = crate::progress::bar(0, "windows");
    let on_window = |done: usize, total: usize, running: f64| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
        pb.set_message(format!("ppl {running:.4}"));
    };
    let result = match args.device {
        crate::Device::Cpu => perplexity(
            &loaded.model,
            &tokens,
            bos,
            args.ctx,
            protocol,
            args.max_windows,
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
            perplexity_by_windows(&tokens, bos, ctx, protocol, max, on_window, &mut score)
        }
        #[cfg(not(feature = "cuda"))]
        crate::Device::Cuda => unreachable!("refused by Device::check"),
    }
    .with_context(|| format!("text {}", text_path.display()))?;
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let processed = result.windows * result.ctx;
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
        v["tokens_per_second"] = (processed as f64 / secs).into();
        println!("{v}");
    } else {
        println!(
            "protocol: {:?}, ctx {}, {} windows of {} text tokens ({} scored), BOS {}, text {} sha256 {}",
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
