use anyhow::{Result, bail};
use recoup_eval::speed::{decode_tokens_per_s, paired_decode_tokens_per_s, prefill_tokens_per_s};
use recoup_kernels::membw::stream_read_gbps;

#[derive(clap::Args)]
pub struct Args {
    /// Model: a GGUF file, a Hugging Face directory, or an asset name.
    #[arg(long)]
    model: String,
    #[command(flatten)]
    kernels: crate::KernelArgs,
    /// Prompt tokens processed in one batch (0 skips the test).
    #[arg(long, default_value_t = 512)]
    pp: usize,
    /// Tokens generated one at a time (0 skips the test).
    #[arg(long, default_value_t = 128)]
    tg: usize,
    /// Repetitions of each test; the median is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
}

pub fn main(args: Args) -> Result<()> {
    if args.pp == 0 && args.tg == 0 {
        bail!("--pp and --tg are both 0: nothing to measure");
    }
    let loaded = crate::load_model(&args.model, &args.kernels)?;
    let model = &loaded.model;
    let stream_gbps = stream_read_gbps(1 << 30, 5);
    let pp = if args.pp > 0 {
        Some(prefill_tokens_per_s(model, args.pp, args.reps)?)
    } else {
        None
    };
    let residual_bytes = model.residual_bytes_per_token();
    let (tg, paired) = match (args.tg, residual_bytes) {
        (0, _) => (None, None),
        (tg, 0) => (Some(decode_tokens_per_s(model, tg, args.reps)?), None),
        // With QDEC, decode alternates with and without it in blocks of tokens, so that the
        // slowdown is a paired measurement on a machine with other load.
        (tg, _) => {
            let switch = |on| model.set_qdec_enabled(on);
            let paired = paired_decode_tokens_per_s(model, tg, args.reps, &switch)?;
            (Some(paired.on_tokens_per_s), Some(paired))
        }
    };
    let weight_bytes = model.weight_bytes_per_token();
    let bits_per_weight = model.block_bits_per_weight();
    let achieved = tg.map(|t| t * (weight_bytes + residual_bytes) as f64 / 1e9);
    let threads = rayon::current_num_threads();
    if args.json {
        let v = serde_json::json!({
            "model": args.model,
            "threads": threads,
            "pp": args.pp,
            "tg": args.tg,
            "pp_tokens_per_s": pp,
            "tg_tokens_per_s": tg,
            "weight_bytes_per_token": weight_bytes,
            "achieved_gbps": achieved,
            "stream_gbps": stream_gbps,
            "bandwidth_fraction": achieved.map(|a| a / stream_gbps),
            "bits_per_weight": bits_per_weight,
            "residual_bytes_per_token": residual_bytes,
            "tg_tokens_per_s_without_qdec": paired.map(|p| p.off_tokens_per_s),
            "qdec_slowdown": paired.map(|p| p.slowdown),
            "qdec_slowdown_quartiles": paired.map(|p| [p.slowdown_quartiles.0, p.slowdown_quartiles.1]),
            "qdec_block_pairs": paired.map(|p| p.pairs),
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "model {} | {} threads | {:.2} bits/weight in the blocks' linear layers | {:.1} MB of weights per token",
        args.model,
        threads,
        bits_per_weight,
        weight_bytes as f64 / 1e6
    );
    if let Some(pp) = pp {
        println!("pp{:<5} {:>9.1} tokens/s", args.pp, pp);
    }
    if let (Some(tg), Some(gbps)) = (tg, achieved) {
        println!(
            "tg{:<5} {:>9.2} tokens/s  {:.1} GB/s = {:.0}% of the {:.1} GB/s streaming read",
            args.tg,
            tg,
            gbps,
            100.0 * gbps / stream_gbps,
            stream_gbps
        );
    }
    if let Some(p) = paired {
        println!(
            "QDEC: {:.2} MB of residual per token (+{:.2} % bytes); without it {:.2} tokens/s; \
             decode time {:+.1} % (median of {} paired blocks of 8 tokens, quartiles {:+.1} / {:+.1} %)",
            residual_bytes as f64 / 1e6,
            100.0 * residual_bytes as f64 / weight_bytes as f64,
            p.off_tokens_per_s,
            100.0 * p.slowdown,
            p.pairs,
            100.0 * p.slowdown_quartiles.0,
            100.0 * p.slowdown_quartiles.1,
        );
    }
    Ok(())
}
