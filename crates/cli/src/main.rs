//! `recoup`: one binary for fetching, converting, measuring and running models.

mod bench;
mod convert;
mod eval;
mod fetch;
mod inspect;
mod kld;
mod ppl;
mod progress;
mod quantize;
mod report;
mod residual;
mod run;

use anyhow::{Result, anyhow};
use clap::{Parser, Subcommand};
use recoup_formats::hf::HfDir;
use recoup_formats::native::METADATA_KEY;
use recoup_formats::residual::{ResidualFile, Tier};
use recoup_model::linear::{KernelOptions, LowRankPath, Prefill};
use recoup_model::qdec::{KChunk, QdecOptions, Select};
use std::path::Path;

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
    /// Zero-shot accuracy on PIQA, ARC, HellaSwag, WinoGrande, BoolQ, LAMBADA (lm-eval semantics).
    Eval(eval::Args),
    /// KL-divergence of a model's next-token distribution from a reference's, top-1 agreement, Δppl.
    Kld(kld::Args),
    /// Generate text from a prompt, streamed to stdout.
    Run(run::Args),
    /// Prompt-processing and generation speed, weight traffic and bandwidth reached.
    Bench(bench::Args),
    /// Quantize a model block by block (RTN, GPTQ, AWQ, LoRC, LQER, FBQuant), resumable, into a recoup checkpoint.
    Quantize(quantize::Args),
    /// Per-layer method, bits, bits per weight and layer-output error of a checkpoint.
    Inspect(inspect::Args),
    /// Quantize and measure a matrix of models × methods × bits from a TOML file; markdown and plots.
    Report(report::Args),
    /// Build QDEC's residual sidecar (4-bit, input-major) for a quantized checkpoint.
    Residual(residual::Args),
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = real_main(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    if matches!(
        cli.command,
        Command::Ppl(_) | Command::Eval(_) | Command::Kld(_) | Command::Run(_) | Command::Bench(_)
    ) {
        keep_freed_memory();
    }
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()?;
    }
    match cli.command {
        Command::Fetch(a) => fetch::main(a),
        Command::Convert(a) => convert::main(a),
        Command::Ppl(a) => ppl::main(a),
        Command::Eval(a) => eval::main(a),
        Command::Kld(a) => kld::main(a),
        Command::Run(a) => run::main(a),
        Command::Bench(a) => bench::main(a),
        Command::Quantize(a) => quantize::main(a),
        Command::Inspect(a) => inspect::main(a),
        Command::Residual(a) => residual::main(a),
        Command::Report(a) => report::main(a),
    }
}

/// Lets glibc's allocator keep freed blocks instead of returning them to the kernel: a
/// forward pass allocates activation buffers of megabytes per layer, and with the default
/// thresholds each is unmapped when freed and the next layer page-faults fresh zeroed pages
/// (a tenth of SmolLM2's prefill time; keeping them halved the page faults of a 512-token
/// bench at the same peak RSS). Only for the commands that run a model: `quantize` keeps
/// the defaults, so that its peak memory stays what its live buffers need.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
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
    /// QDEC: add the dynamic residual correction of this sidecar (built by `recoup residual`
    /// for this checkpoint) to every layer it covers.
    #[arg(long)]
    qdec: Option<std::path::PathBuf>,
    /// QDEC: channels corrected per 1024 input channels, per token: `K`, or `K` with
    /// overrides per projection, e.g. `8,down=16` (qkv, o, gu, down).
    #[arg(long, default_value = "8", requires = "qdec")]
    qdec_k: String,
    /// QDEC: how channels are chosen each token: exact top-k per chunk, the paper's
    /// 32-bucket approximation, a static set from calibration, or random (the last two for
    /// the ablation; bucket and static need a sidecar built with calibration text).
    #[arg(long, value_enum, default_value = "exact", requires = "qdec")]
    qdec_select: SelectArg,
    /// QDEC: where the residual lives: its own RAM buffer, or read through a memory
    /// mapping of the sidecar (paged in on demand).
    #[arg(long, value_enum, default_value = "ram", requires = "qdec")]
    qdec_tier: TierArg,
    /// QDEC: also correct prompt positions, each with its own selection (serving corrects
    /// decode steps only; `ppl` always corrects every position, as the paper measures).
    #[arg(long, requires = "qdec")]
    qdec_prefill: bool,
    /// How products of many tokens (prompts, perplexity windows) compute packed layers:
    /// `integer` (8-bit activations, decode's formula: the fast path, the default of `run`
    /// and `bench`) or `exact` (dequantized tiles against f32 activations: the reference
    /// path's products, the default of `ppl`, `eval` and `kld`, so that they measure the
    /// weights as the methods' papers do).
    #[arg(long, value_enum)]
    prefill: Option<PrefillArg>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PrefillArg {
    Integer,
    Exact,
}

/// Where a model's decode runs (`ppl`, `run`, `bench`).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Device {
    Cpu,
    /// An NVIDIA GPU: a build with `--features cuda`, one token at a time.
    Cuda,
}

impl Device {
    /// Refuses `cuda` in a build without the backend, before any model loads.
    fn check(self) -> Result<()> {
        if self == Device::Cuda && !cfg!(feature = "cuda") {
            anyhow::bail!(
                "this recoup was built without CUDA: rebuild with `cargo build --release --features cuda` \
                 (no CUDA toolkit needed, only an NVIDIA driver where it runs)"
            );
        }
        Ok(())
    }
}

/// `model` uploaded to GPU 0 with a KV cache of `max_len` positions.
#[cfg(feature = "cuda")]
fn gpu_model(
    model: &recoup_model::Model,
    kernels: &KernelArgs,
    max_len: usize,
) -> Result<recoup_model::cuda::CudaModel> {
    let start = std::time::Instant::now();
    let gpu = recoup_model::cuda::CudaModel::upload(model, 0, max_len, kernels.options().low_rank)?;
    eprintln!(
        "recoup: on {} ({:.0} MB of weights and cache) in {:.1}s",
        gpu.gpu.name(),
        gpu.device_bytes as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    Ok(gpu)
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SelectArg {
    Exact,
    Bucket,
    Static,
    Random,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TierArg {
    Ram,
    Mmap,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LowRankPathArg {
    Fused,
    Unfused,
    Off,
}

impl KernelArgs {
    /// The defaults: fast kernels, fused low-rank branch, no QDEC (a reference model).
    fn plain() -> Self {
        #[derive(Parser)]
        struct Defaults {
            #[command(flatten)]
            kernels: KernelArgs,
        }
        Defaults::parse_from(["recoup"]).kernels
    }

    fn options(&self) -> KernelOptions {
        let low_rank = match (self.no_lowrank, self.lowrank_path) {
            (true, _) | (_, LowRankPathArg::Off) => LowRankPath::Off,
            (_, LowRankPathArg::Fused) => LowRankPath::Fused,
            (_, LowRankPathArg::Unfused) => LowRankPath::Unfused,
        };
        KernelOptions {
            reference: self.reference_kernels,
            low_rank,
            prefill: match self.prefill {
                Some(PrefillArg::Exact) => Prefill::Exact,
                Some(PrefillArg::Integer) | None => Prefill::Integer,
            },
        }
    }

    /// The settings of commands that score every position (`ppl`, `eval`, `kld`): QDEC
    /// corrects each as a decode step would, and prefill is exact unless asked otherwise.
    fn for_scoring(mut self) -> Self {
        self.qdec_prefill = true;
        self.prefill.get_or_insert(PrefillArg::Exact);
        self
    }

    fn qdec_options(&self) -> Result<QdecOptions> {
        Ok(QdecOptions {
            k_chunk: KChunk::parse(&self.qdec_k)?,
            select: match self.qdec_select {
                SelectArg::Exact => Select::Exact,
                SelectArg::Bucket => Select::Bucket,
                SelectArg::Static => Select::Static,
                SelectArg::Random => Select::Random,
            },
            in_prefill: self.qdec_prefill,
        })
    }

    /// `--qdec` and its settings, for the records commands print.
    fn qdec_record(&self) -> Option<serde_json::Value> {
        let sidecar = self.qdec.as_ref()?;
        let o = self.qdec_options().ok()?;
        Some(serde_json::json!({
            "residual": sidecar.display().to_string(),
            "k_chunk": o.k_chunk.describe(),
            "select": o.select.name(),
            "in_prefill": o.in_prefill,
        }))
    }

    /// Checks `--qdec` against the checkpoint `path` before its weights load (seconds on a
    /// large model): the settings parse, the sidecar opens and belongs to the checkpoint.
    fn open_qdec(&self, path: &Path) -> Result<Option<(ResidualFile, QdecOptions)>> {
        let Some(sidecar) = &self.qdec else {
            return Ok(None);
        };
        let options = self.qdec_options()?;
        let file = ResidualFile::open(sidecar)?;
        let meta = path
            .is_dir()
            .then(|| HfDir::open(path).ok())
            .flatten()
            .and_then(|d| d.metadata(METADATA_KEY).map(str::to_string))
            .ok_or_else(|| {
                anyhow!(
                    "--qdec needs a recoup checkpoint (quantized with `recoup quantize`); {} is not one",
                    path.display()
                )
            })?;
        file.check_belongs_to(path, &meta)?;
        Ok(Some((file, options)))
    }

    /// Attaches the sidecar [`Self::open_qdec`] opened to the loaded model.
    fn attach_qdec(
        &self,
        model: &mut recoup_model::Model,
        (file, options): (ResidualFile, QdecOptions),
    ) -> Result<()> {
        let sidecar = self.qdec.as_ref().expect("opened from --qdec");
        let tier = match self.qdec_tier {
            TierArg::Ram => Tier::Ram,
            TierArg::Mmap => Tier::Mmap,
        };
        model.attach_qdec(&file, &options, tier)?;
        let bytes = model.residual_bytes_per_token();
        eprintln!(
            "recoup: QDEC from {}: k_chunk {}, {} selection, residual in {}, {}; {:.2} MB of residual per decoded token (+{:.2} % of the weights' bytes)",
            sidecar.display(),
            options.k_chunk.describe(),
            options.select.name(),
            if tier == Tier::Ram {
                "RAM"
            } else {
                "a memory mapping"
            },
            if options.in_prefill {
                "every position corrected"
            } else {
                "decode steps corrected"
            },
            bytes as f64 / 1e6,
            100.0 * bytes as f64 / model.weight_bytes_per_token() as f64
        );
        Ok(())
    }
}

/// Resolves `--model` (a path, or an asset name fetched on first use) and loads it.
fn load_model(arg: &str, kernels: &KernelArgs) -> Result<recoup_model::Loaded> {
    let path = recoup_assets::resolve(arg, recoup_assets::AssetKind::Model)?;
    let qdec = kernels.open_qdec(&path)?;
    let start = std::time::Instant::now();
    let mut loaded = recoup_model::load(&path)?;
    loaded.model.set_kernel_options(kernels.options());
    if let Some(q) = qdec {
        kernels.attach_qdec(&mut loaded.model, q)?;
    }
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
