use anyhow::{Result, bail};
use recoup_model::KvCache;
use recoup_model::chat::render_user_prompt;
use recoup_model::sampling::Sampler;
use std::io::Write;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Model: a GGUF file, a Hugging Face directory, or an asset name.
    #[arg(long)]
    model: String,
    #[command(flatten)]
    kernels: crate::KernelArgs,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wrap the prompt in the model's chat template as one user message.
    #[arg(long)]
    chat: bool,
    /// Where the model runs: the CPU, or an NVIDIA GPU (a build with `--features cuda`; the
    /// prompt is fed one token at a time there).
    #[arg(long, value_enum, default_value = "cpu")]
    device: crate::Device,
}

/// The model the tokens go through: the CPU model with its cache, or its GPU copy.
enum Engine<'a> {
    Cpu {
        model: &'a recoup_model::Model,
        cache: KvCache,
    },
    #[cfg(feature = "cuda")]
    Gpu(Box<recoup_model::cuda::CudaModel>),
}

impl Engine<'_> {
    /// Runs `tokens` after those seen and returns the logits of the last.
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        match self {
            Engine::Cpu { model, cache } => {
                let d = model.config.hidden_size;
                let hidden = model.forward(tokens, cache)?;
                Ok(model.logits(&hidden[hidden.len() - d..], 1))
            }
            #[cfg(feature = "cuda")]
            Engine::Gpu(gpu) => {
                let mut logits = Vec::new();
                for &t in tokens {
                    logits = gpu.step(t)?;
                }
                Ok(logits)
            }
        }
    }

    /// Positions seen so far.
    fn len(&self) -> usize {
        match self {
            Engine::Cpu { cache, .. } => cache.len(),
            #[cfg(feature = "cuda")]
            Engine::Gpu(gpu) => gpu.len(),
        }
    }
}

pub fn main(args: Args) -> Result<()> {
    if !(0.0..=1.0).contains(&args.top_p) || args.top_p == 0.0 {
        bail!("--top-p must be in (0, 1], got {}", args.top_p);
    }
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if args.temperature < 0.0 {
        bail!(
            "--temperature must be non-negative, got {}",
            args.temperature
        );
    }
    args.device.check()?;
    let loaded = crate::load_model(&args.model, &args.kernels)?;
    let (model, tk) = (&loaded.model, &loaded.tokenizer);
    let prompt = if args.chat {
        let Some(template) = &tk.chat_template else {
            bail!("--chat: the model has no chat template")
        };
        let text = |id: Option<u32>| id.and_then(|i| tk.token_text(i)).unwrap_or_default();
        render_user_prompt(template, &args.prompt, &text(tk.bos), &text(tk.eos))?
    } else {
        args.prompt.clone()
    };
    // A chat template may spell BOS itself; otherwise the model's convention adds it.
    let mut tokens = if args.chat {
        tk.encode(&prompt, true)?
    } else {
        tk.encode_with_bos(&prompt, false)?
    };
    if tokens.is_empty() {
        tokens = tk.bos.into_iter().collect();
    }
    if tokens.is_empty() {
        bail!("the prompt is empty and the model has no BOS token to start from");
    }
    if tokens.len() > model.config.max_position {
        bail!(
            "the prompt has {} tokens, more than the model's context of {}",
            tokens.len(),
            model.config.max_position
        );
    }
    // The last sampled token is never fed back, so it needs no cache slot.
    let capacity = (tokens.len() + args.max_tokens - 1).min(model.config.max_position);
    let mut engine = match args.device {
        crate::Device::Cpu => Engine::Cpu {
            model,
            cache: KvCache::new(&model.config, capacity),
        },
        #[cfg(feature = "cuda")]
        crate::Device::Cuda => {
            Engine::Gpu(Box::new(crate::gpu_model(model, &args.kernels, capacity)?))
        }
        #[cfg(not(feature = "cuda"))]
        crate::Device::Cuda => unreachable!("refused by Device::check"),
    };
    let mut sampler = Sampler::new(args.temperature, args.top_p, args.seed);
    let mut stream = tk.stream();
    let mut out = std::io::stdout().lock();
    if !args.chat {
        write!(out, "{}", args.prompt)?;
        out.flush()?;
    }
    let t0 = Instant::now();
    let mut logits = engine.feed(&tokens)?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut generated = 0;
    while generated < args.max_tokens {
        let next = sampler.sample(&logits);
        generated += 1;
        if Some(next) == tk.eos {
            break;
        }
        write!(out, "{}", stream.push(next)?)?;
        out.flush()?;
        if generated == args.max_tokens || engine.len() == capacity {
            break;
        }
        logits = engine.feed(&[next])?;
    }
    writeln!(out)?;
    // Each generated token but the first cost one decode step.
    let decode_steps = engine.len() - tokens.len();
    let decode_rate = if decode_steps > 0 {
        format!(
            "{:.1} tokens/s",
            decode_steps as f64 / t1.elapsed().as_secs_f64()
        )
    } else {
        "no decode step".to_string()
    };
    eprintln!(
        "prompt: {} tokens, {:.1} tokens/s | generation: {generated} tokens, {decode_rate}",
        tokens.len(),
        tokens.len() as f64 / prefill_secs,
    );
    Ok(())
}
