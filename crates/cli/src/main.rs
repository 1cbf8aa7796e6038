//! `recoup`: one binary for fetching, converting, measuring and running models.

mod bench;
mod convert;
mod fetch;
mod inspect;
mod ppl;
mod progress;
mod quantize;
mod run;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "recoup",
    version,
    about = "Low-bit LLMs nearly as accurate as full precision, fast on ordinary hardware"
)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download, verify and cache models and texts (all when no name is given).
    Fetch(fetch::Args),
    /// Write a model as a Hugging Face directory (config.json, safetensors, tokenizer.json).
    Convert(convert::Args),
    /// Perplexity of a model on a text, under the GPTQ or llama.cpp protocol.
    Ppl(ppl::Args),
    /// Generate text from a prompt, streamed to stdout.
    Run(run::Args),
    /// Prompt-processing and generation speed, weight traffic and bandwidth reached.
    Bench(bench::Args),
    /// Quantize a model block by block (RTN, GPTQ, AWQ, LoRC, LQER, FBQuant), resumable, into a recoup checkpoint.
    Quantize(quantize::Args),
    /// Per-layer method, bits, bits per weight and layer-output error of a checkpoint.
    Inspect(inspect::Args),
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = real_main(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()?;
    }
    match cli.command {
        Command::Fetch(a) => fetch::main(a),
        Command::Convert(a) => convert::main(a),
        Command::Ppl(a) => ppl::main(a),
        Command::Run(a) => run::main(a),
        Command::Bench(a) => bench::main(a),
        Command::Quantize(a) => quantize::main(a),
        Command::Inspect(a) => inspect::main(a),
    }
}

/// Resolves `--model` (a path, or an asset name fetched on first use) and loads it.
fn load_model(arg: &str) -> Result<recoup_model::Loaded> {
    let path = recoup_assets::resolve(arg, recoup_assets::AssetKind::Model)?;
    let start = std::time::Instant::now();
    let loaded = recoup_model::load(&path)?;
    let c = &loaded.model.config;
    eprintln!(
        "recoup: loaded {} ({} {:?}, {} layers, d={}, {} params as f32) in {:.1}s",
        path.display(),
        loaded.format,
        c.arch,
        c.n_layers,
        c.hidden_size,
        loaded.model.parameter_count(),
        start.elapsed().as_secs_f64()
    );
    Ok(loaded)
}
