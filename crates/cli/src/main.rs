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
use recoup_model::linear::{KernelOptions, LowRankPath};

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

/// How packed layers compute: shared by every command that runs a model.
#[derive(clap::Args)]
struct KernelArgs {
    /// Compute packed layers by dequantizing each whole matrix to f32 for every product:
    /// the slow reference path the fast kernels are checked against.
    #[arg(long)]
    reference_kernels: bool,
    /// The low-rank branch's path: fused into the main product's pass, unfused (separate
    /// down-projection, up-projection and addition, the baseline), or off.
    #[arg(long, value_enum, default_value = "fused")]
    lowrank_path: LowRankPathArg,
    /// Switch the low-rank branch off (same as --lowrank-path off).
    #[arg(long)]
    no_lowrank: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LowRankPathArg {
    Fused,
    Unfused,
    Off,
}

impl KernelArgs {
    fn options(&self) -> KernelOptions {
        let low_rank = match (self.no_lowrank, self.lowrank_path) {
            (true, _) | (_, LowRankPathArg::Off) => LowRankPath::Off,
            (_, LowRankPathArg::Fused) => LowRankPath::Fused,
            (_, LowRankPathArg::Unfused) => LowRankPath::Unfused,
        };
        KernelOptions {
            reference: self.reference_kernels,
            low_rank,
        }
    }
}

/// Resolves `--model` (a path, or an asset name fetched on first use) and loads it.
fn load_model(arg: &str, kernels: &KernelArgs) -> Result<recoup_model::Loaded> {
    let path = recoup_assets::resolve(arg, recoup_assets::AssetKind::Model)?;
    let start = std::time::Instant::now();
    let mut loaded = recoup_model::load(&path)?;
    loaded.model.set_kernel_options(kernels.options());
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
