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
    let mut cache = KvCache::new(&model.config, capacity);
    let mut sampler = Sampler::new(args.temperature, args.top_p, args.seed);
    let mut stream = tk.stream();
    let mut out = std::io::stdout().lock();
    if !args.chat {
        write!(out, "{}", args.prompt)?;
        out.flush()?;
    }
    let t0 = Instant::now();
    let d = model.config.hidden_size;
    let hidden = model.forward(&tokens, &mut cache)?;
    let mut logits = model.logits(&hidden[hidden.len() - d..], 1);
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
        if generated == args.max_tokens || cache.len() == capacity {
            break;
        }
        let hidden = model.forward(&[next], &mut cache)?;
        logits = model.logits(&hidden, 1);
    }
    writeln!(out)?;
    // Each generated token but the first cost one decode step.
    let decode_steps = cache.len() - tokens.len();
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
