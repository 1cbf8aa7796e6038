use anyhow::{Context, Result, bail};
use recoup_formats::packed::FactorDtype;
use recoup_quant::awq::Awq;
use recoup_quant::calib::{CalibText, CalibrationSet, sample_windows};
use recoup_quant::gptq::{Gptq, GptqOptions};
use recoup_quant::grid::Clip;
use recoup_quant::lowrank::{Base, Branch, LowRankMethod, Training};
use recoup_quant::method::{GridChoice, Method};
use recoup_quant::pipeline::{Event, Job, quantize, work_dir};
use recoup_quant::rtn::Rtn;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Model: a GGUF file, a Hugging Face directory, or an asset name (e.g. smollm2-135m).
    #[arg(long)]
    model: String,
    #[arg(long, value_enum)]
    method: MethodArg,
    /// Bits per weight of the grid: 2, 3, 4 or 8.
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Input channels per scale (32, 64, 128, …), or `row` for one scale per output row.
    #[arg(long, default_value = "128")]
    group: String,
    /// Symmetric grid (no zero points).
    #[arg(long)]
    sym: bool,
    /// Calibration texts, comma-separated: files or asset names; `none` for RTN without
    /// recording layer errors.
    #[arg(long, default_value = "wiki-calib", value_delimiter = ',')]
    calib: Vec<String>,
    /// Calibration windows.
    #[arg(long, default_value_t = 128)]
    nsamples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 2048)]
    seqlen: usize,
    /// Seed of the window sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep the linear layers whose name matches this regex dense
    /// (e.g. `layers\.0\.` or `down_proj`).
    #[arg(long)]
    skip: Option<String>,
    /// Which outputs feed the next block during calibration: those of the quantized block
    /// (the standard) or of the f32 one.
    #[arg(long, value_enum, default_value = "quantized")]
    feed: FeedArg,
    /// RTN: search each group's clipping ratio (1 … 0.5) against its squared error, weighted
    /// by the calibration inputs' energy per channel.
    #[arg(long)]
    clip: bool,
    /// GPTQ: quantize columns in order of decreasing activation energy (stores a permutation).
    #[arg(long)]
    act_order: bool,
    /// GPTQ: damping as a fraction of the mean diagonal of H.
    #[arg(long, default_value_t = 0.01)]
    damp: f64,
    /// AWQ: calibration rows (over all windows) on which the scale search is evaluated.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..))]
    awq_rows: u64,
    /// AWQ: the clipping search shrinks each group's range down to `1 − F` (0 turns it off).
    #[arg(long, default_value_t = 0.5, value_parser = parse_shrink)]
    awq_max_shrink: f32,
    /// Low-rank methods: rank of the branch Σ = A·B [default: 32].
    #[arg(long)]
    rank: Option<usize>,
    /// Low-rank methods: where the quantized part comes from; fbquant takes rtn or awq
    /// (quantizing W − Σ in AWQ's scaled basis) [default: rtn].
    #[arg(long, value_enum)]
    base: Option<BaseArg>,
    /// fbquant, subbranch-trained: Adam steps per linear layer [default: 200].
    #[arg(long)]
    steps: Option<usize>,
    /// fbquant, subbranch-trained: Adam step size, relative to each factor's initial RMS
    /// [default: 0.01].
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f32>,
    /// Low-rank methods: storage of A and B — f16, or int8 with one f16 scale per row (half
    /// the branch's bytes) [default: f16].
    #[arg(long, value_enum)]
    factors: Option<FactorArg>,
    /// Output directory (a recoup checkpoint, written atomically).
    #[arg(long)]
    out: PathBuf,
    /// Continue an interrupted run of the same command from its last finished block.
    #[arg(long)]
    resume: bool,
    /// Also round the output head to this many bits (4 or 8; group 128, round-to-nearest).
    /// Decode reads the head once per token; kept in f32 it is most of a small model's
    /// weight traffic (SmolLM2: 113 MB of 170). Default: kept as the source stores it.
    #[arg(long, value_parser = clap::builder::TypedValueParser::map(
        clap::builder::PossibleValuesParser::new(["4", "8"]),
        |b: String| b.parse::<u32>().expect("a listed value"),
    ))]
    head_bits: Option<u32>,
    /// Print one JSON object on stdout instead of the closing line (wall time and peak RSS
    /// included).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MethodArg {
    Rtn,
    Gptq,
    Awq,
    Lorc,
    Lqer,
    Fbquant,
    SubbranchTrained,
}

impl MethodArg {
    fn branch(self) -> Option<Branch> {
        match self {
            MethodArg::Lorc => Some(Branch::Lorc),
            MethodArg::Lqer => Some(Branch::Lqer),
            MethodArg::Fbquant => Some(Branch::Fbquant),
            MethodArg::SubbranchTrained => Some(Branch::SubbranchTrained),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum BaseArg {
    Rtn,
    Gptq,
    Awq,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FactorArg {
    F16,
    Int8,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FeedArg {
    Quantized,
    F32,
}

/// A shrink fraction in `[0, 1)`: a clipping ratio must stay above zero.
fn parse_shrink(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s} is not a fraction in [0, 1)")),
    }
}

fn grid(args: &Args) -> Result<GridChoice> {
    let group = match args.group.as_str() {
        "row" => None,
        g => Some(g.parse::<usize>().with_context(|| {
            format!("--group {g}: expected a number of input channels or `row`")
        })?),
    };
    let choice = GridChoice {
        bits: args.bits,
        group,
        sym: args.sym,
    };
    // Validate bits and group now rather than at the first layer.
    recoup_formats::packed::GridSpec::new(
        args.bits,
        group.unwrap_or(recoup_formats::packed::BLOCK),
        args.sym,
    )?;
    Ok(choice)
}

/// The method the flags describe, refusing flags that do not apply to it.
fn method(args: &Args, grid: GridChoice) -> Result<Box<dyn Method>> {
    let branch = args.method.branch();
    let base = args.base.unwrap_or(BaseArg::Rtn);
    let uses_gptq = matches!(args.method, MethodArg::Gptq) || base == BaseArg::Gptq;
    if args.act_order && !uses_gptq {
        bail!("--act-order applies to GPTQ only (--method gptq, or --base gptq)");
    }
    if args.clip && !matches!(args.method, MethodArg::Rtn) {
        bail!("--clip applies to --method rtn only (AWQ always searches its clipping)");
    }
    if branch.is_none()
        && (args.rank.is_some()
            || args.base.is_some()
            || args.steps.is_some()
            || args.lr.is_some()
            || args.factors.is_some())
    {
        bail!(
            "--rank, --base, --steps, --lr and --factors apply to the low-rank methods \
             (lorc, lqer, fbquant, subbranch-trained)"
        );
    }
    let trained = matches!(branch, Some(Branch::Fbquant | Branch::SubbranchTrained));
    if !trained && (args.steps.is_some() || args.lr.is_some()) {
        bail!("--steps and --lr apply to the trained branches (fbquant, subbranch-trained)");
    }
    let gptq = GptqOptions {
        damp: args.damp,
        act_order: args.act_order,
        ..Default::default()
    };
    let awq = Awq {
        grid,
        sample_rows: args.awq_rows as usize,
        max_shrink: args.awq_max_shrink,
        ..Default::default()
    };
    if let Some(branch) = branch {
        let defaults = Training::default();
        let training = Training {
            steps: args.steps.unwrap_or(defaults.steps),
            lr: args.lr.unwrap_or(defaults.lr),
            ..defaults
        };
        let base = match base {
            BaseArg::Rtn => Base::Rtn,
            BaseArg::Gptq => Base::Gptq(gptq),
            BaseArg::Awq => Base::Awq(awq),
        };
        let rank = args.rank.unwrap_or(32);
        let factors = match args.factors.unwrap_or(FactorArg::F16) {
            FactorArg::F16 => FactorDtype::F16,
            FactorArg::Int8 => FactorDtype::Int8,
        };
        return Ok(Box::new(LowRankMethod::new(
            branch, grid, rank, training, base, factors,
        )?));
    }
    Ok(match args.method {
        MethodArg::Rtn => Box::new(Rtn {
            grid,
            clip: if args.clip {
                Clip::Search {
                    min_ratio: 0.5,
                    steps: 20,
                }
            } else {
                Clip::None
            },
        }),
        MethodArg::Awq => Box::new(awq),
        MethodArg::Gptq => Box::new(Gptq {
            grid,
            options: gptq,
        }),
        _ => unreachable!("the low-rank methods returned above"),
    })
}

/// Seeded windows from the calibration texts `names` (files or asset names).
pub fn calibration_set(
    names: &[String],
    tokenizer: &recoup_model::Tokenizer,
    nsamples: usize,
    seqlen: usize,
    seed: u64,
) -> Result<CalibrationSet> {
    let mut texts = Vec::new();
    for name in names {
        let path = recoup_assets::resolve(name, recoup_assets::AssetKind::Text)?;
        let content = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read calibration text {}", path.display()))?;
        texts.push(CalibText {
            name: name.clone(),
            sha256: recoup_assets::sha256_file(&path)?,
            content,
        });
    }
    let set = sample_windows(&texts, tokenizer, nsamples, seqlen, seed)?;
    eprintln!(
        "recoup: calibrating on {nsamples} windows of {seqlen} tokens from {} (seed {seed})",
        names.join(", "),
    );
    Ok(set)
}

/// sha256 of a model's weight files (the file itself, or a directory's safetensors).
pub fn source_record(path: &Path) -> Result<serde_json::Value> {
    let mut files = Vec::new();
    if path.is_dir() {
        let mut names: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        names.sort();
        for p in names {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            files.push(
                serde_json::json!({ "file": name, "sha256": recoup_assets::sha256_file(&p)? }),
            );
        }
    } else {
        files.push(serde_json::json!({ "file": path.file_name().unwrap().to_string_lossy(), "sha256": recoup_assets::sha256_file(path)? }));
    }
    Ok(serde_json::json!({ "path": path.display().to_string(), "files": files }))
}

/// Peak resident memory of this process so far, in bytes (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn main(args: Args) -> Result<()> {
    let start = Instant::now();
    let grid = grid(&args)?;
    let method = method(&args, grid)?;
    let skip = args
        .skip
        .as_deref()
        .map(regex::Regex::new)
        .transpose()
        .context("--skip is not a valid regular expression")?;
    let model_path = recoup_assets::resolve(&args.model, recoup_assets::AssetKind::Model)?;
    // Refused now rather than after an hour of quantization.
    recoup_formats::atomic::check_replaceable(&args.out)?;
    let same = |a: &Path, b: &Path| {
        a.canonicalize()
            .ok()
            .is_some_and(|a| Some(a) == b.canonicalize().ok())
    };
    if same(&args.out, &model_path) {
        bail!(
            "--out {} is the model being quantized; choose another output path",
            args.out.display()
        );
    }
    let opened = recoup_model::load::open(&model_path)?;
    let no_calib = args.calib.len() == 1 && args.calib[0] == "none";
    if no_calib && method.needs_calibration() {
        bail!(
            "{} needs calibration data: --calib none is for rtn only",
            method.name()
        );
    }
    let calibration = if no_calib {
        None
    } else {
        Some(calibration_set(
            &args.calib,
            &opened.tokenizer,
            args.nsamples,
            args.seqlen,
            args.seed,
        )?)
    };
    let job = Job {
        opened: &opened,
        method: method.as_ref(),
        calibration: calibration.as_ref(),
        skip: skip.as_ref(),
        sequential: matches!(args.feed, FeedArg::Quantized),
        source: source_record(&model_path)?,
        out: &args.out,
        resume: args.resume,
        head_bits: args.head_bits,
    };
    eprintln!(
        "recoup: {} {}-bit, group {}, {} → {} (finished blocks kept in {})",
        method.name(),
        args.bits,
        args.group,
        if args.sym { "symmetric" } else { "asymmetric" },
        args.out.display(),
        work_dir(&args.out).display()
    );
    let pb = crate::progress::bar(0, "blocks");
    let (run_start, first_block) = (Instant::now(), std::cell::Cell::new(0));
    let summary = quantize(&job, &mut |e| match e {
        Event::Started { done, blocks } => {
            first_block.set(done);
            pb.set_length(blocks as u64);
            pb.set_position(done as u64);
            pb.reset_eta();
            if done > 0 {
                eprintln!("recoup: resuming after {done} finished blocks");
            }
        }
        Event::BlockDone { layer, blocks } => {
            pb.set_position(layer as u64 + 1);
            // Without a terminal the bar is hidden: log lines keep long runs observable.
            if !std::io::stderr().is_terminal() {
                let done_here = (layer + 1 - first_block.get()) as f64;
                let secs = run_start.elapsed().as_secs_f64();
                let eta = secs / done_here * (blocks - layer - 1) as f64;
                eprintln!(
                    "recoup: block {}/{blocks} done, {secs:.0}s elapsed, ETA {eta:.0}s, RSS peak {:.2} GiB",
                    layer + 1,
                    peak_rss_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64
                );
            }
        }
        Event::Writing => pb.set_message("writing checkpoint"),
    })?;
    pb.finish_and_clear();
    let (seconds, peak_rss) = (start.elapsed().as_secs_f64(), peak_rss_bytes().unwrap_or(0));
    if args.json {
        let v = serde_json::json!({
            "out": args.out.display().to_string(),
            "method": method.name(),
            "quantized_layers": summary.quantized_layers,
            "bits_per_weight": summary.bits_per_weight,
            "mean_layer_output_error": summary.mean_rel_error,
            "seconds": seconds,
            "peak_rss_bytes": peak_rss,
            // A resumed run's time and memory cover only the blocks it quantized itself.
            "resumed_after_blocks": first_block.get(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "quantized {} layers with {}: {:.3} bits per weight{}; wrote {} in {:.1}s, peak RSS {:.2} GiB",
        summary.quantized_layers,
        method.name(),
        summary.bits_per_weight,
        summary
            .mean_rel_error
            .map(|e| format!(", mean layer-output error {e:.5}"))
            .unwrap_or_default(),
        args.out.display(),
        seconds,
        peak_rss as f64 / (1u64 << 30) as f64
    );
    Ok(())
}
