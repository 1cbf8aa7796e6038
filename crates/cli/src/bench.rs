use anyhow::{Context, Result, bail};
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
    /// Where decode runs: the CPU kernels, or an NVIDIA GPU (a build with `--features cuda`;
    /// decode only, so --pp is ignored there).
    #[arg(long, value_enum, default_value = "cpu")]
    device: crate::Device,
    /// Speed only, for a model that is not on this machine: --model is then a `config.json`
    /// (or a directory holding one) and every block linear gets random codes of this many
    /// bits (g128 asymmetric; 8-bit head). Decode time depends on the shapes, not the values.
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=8))]
    random_weights: Option<u32>,
}

pub fn main(args: Args) -> Result<()> {
    if args.pp == 0 && args.tg == 0 {
        bail!("--pp and --tg are both 0: nothing to measure");
    }
    args.device.check()?;
    let model = match args.random_weights {
        Some(bits) => random_model(&args, bits)?,
        None => crate::load_model(&args.model, &args.kernels)?.model,
    };
    let model = &model;
    #[cfg(feature = "cuda")]
    if args.device == crate::Device::Cuda {
        return cuda::main(&args, model);
    }
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
            "prefill": args.kernels.options().prefill.name(),
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
            "qdec_token_pairs": paired.map(|p| p.pairs),
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
        let prefill = args.kernels.options().prefill.name();
        println!("pp{:<5} {:>9.1} tokens/s ({prefill} prefill)", args.pp, pp);
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
             decode time {:+.1} % (median of {} adjacent token pairs, quartiles {:+.1} / {:+.1} %)",
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

/// The model of `--random-weights`: the shapes of `--model`'s config.json.
fn random_model(args: &Args, bits: u32) -> Result<recoup_model::Model> {
    if args.kernels.qdec.is_some() {
        bail!(
            "--random-weights has no residual to correct: QDEC needs a real checkpoint and its sidecar"
        );
    }
    let mut path = std::path::PathBuf::from(&args.model);
    if path.is_dir() {
        path = path.join("config.json");
    }
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "--random-weights reads the model's shapes from a config.json: cannot read {}",
            path.display()
        )
    })?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let config = recoup_model::ModelConfig::from_hf(&json, &path)?;
    let spec = recoup_formats::packed::GridSpec::new(bits, 128, false)?;
    let start = std::time::Instant::now();
    let mut model = recoup_model::synthetic::random_model(config, spec, 0)?;
    model.set_kernel_options(args.kernels.options());
    eprintln!(
        "recoup: random {bits}-bit weights in the shapes of {} ({} layers, d={}) made in {:.1}s: speed only",
        path.display(),
        model.config.n_layers,
        model.config.hidden_size,
        start.elapsed().as_secs_f64()
    );
    Ok(model)
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::Args;
    use anyhow::Result;
    use recoup_eval::speed::paired_decode;
    use recoup_model::Model;
    use recoup_model::linear::LayerWeights;
    use recoup_model::sampling::argmax;
    use std::time::Instant;

    /// Decode on the GPU: tokens/s, bytes per token against the device's bandwidth, and
    /// with QDEC the paired slowdown, its memory and the k_chunk the bandwidth model picks.
    pub fn main(args: &Args, model: &Model) -> Result<()> {
        let options = args.kernels.options();
        let mut gpu_model = crate::gpu_model(model, &args.kernels, args.tg.max(16))?;
        let start = model.config.bos_token_id.unwrap_or(1);
        let mut step = |restart: bool, token: u32| -> Result<u32> {
            if restart {
                gpu_model.reset();
            }
            Ok(argmax(&gpu_model.step(token)?))
        };
        // Warm-up: the first steps load modules and fault pages in.
        step(true, start)?;
        let mut times = Vec::new();
        for _ in 0..args.reps.max(1) {
            let t = Instant::now();
            let mut next = step(true, start)?;
            for _ in 1..args.tg {
                next = step(false, next)?;
            }
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let tg = args.tg as f64 / times[times.len() / 2];
        let residual_bytes = model.residual_bytes_per_token();
        let paired = if residual_bytes > 0 {
            let cell = std::cell::RefCell::new(&mut gpu_model);
            let mut switch = |on| cell.borrow_mut().set_qdec_enabled(on);
            let mut step = |restart: bool, token: u32| -> Result<u32> {
                let mut m = cell.borrow_mut();
                if restart {
                    m.reset();
                }
                Ok(argmax(&m.step(token)?))
            };
            let vocab = model.config.vocab_size;
            Some(paired_decode(
                vocab,
                args.tg,
                args.reps,
                &mut switch,
                &mut step,
            )?)
        } else {
            None
        };
        let bits = model
            .block_linears()
            .find_map(|l| match l.op.weights() {
                LayerWeights::Packed { packed, .. } => Some(packed.matrix.spec.bits),
                LayerWeights::Dense(_) => None,
            })
            .unwrap_or(16);
        let (k_model, device_gbps, link_gbps) = gpu_model.k_chunk_model(bits)?;
        let weight_bytes = model.weight_bytes_per_token();
        let gbps = tg * (weight_bytes + residual_bytes) as f64 / 1e9;
        let peak = gpu_model.gpu.peak_gbps();
        let v = serde_json::json!({
            "model": args.model,
            "device": gpu_model.gpu.name(),
            "tg": args.tg,
            "tg_tokens_per_s": tg,
            "weight_bytes_per_token": weight_bytes,
            "achieved_gbps": gbps,
            "peak_gbps": peak,
            "measured_read_gbps": device_gbps,
            "bandwidth_fraction": gbps / device_gbps,
            "bits_per_weight": model.block_bits_per_weight(),
            "lowrank_path": format!("{:?}", options.low_rank).to_lowercase(),
            "residual_bytes_per_token": residual_bytes,
            "qdec_host_bytes": gpu_model.residual_host_bytes(),
            "gpu_bytes": gpu_model.device_bytes,
            "host_link_gbps": link_gbps,
            "qdec_k_chunk_model": k_model,
            "tg_tokens_per_s_without_qdec": paired.map(|p| p.off_tokens_per_s),
            "qdec_slowdown": paired.map(|p| p.slowdown),
            "qdec_slowdown_quartiles": paired.map(|p| [p.slowdown_quartiles.0, p.slowdown_quartiles.1]),
        });
        if args.json {
            println!("{v}");
            return Ok(());
        }
        println!(
            "model {} on {} | {:.2} bits/weight | {:.1} MB of weights per token | {:.1} MB on the GPU",
            args.model,
            gpu_model.gpu.name(),
            model.block_bits_per_weight(),
            weight_bytes as f64 / 1e6,
            gpu_model.device_bytes as f64 / 1e6
        );
        println!(
            "tg{:<5} {:>9.1} tokens/s  {:.0} GB/s = {:.0}% of the {:.0} GB/s measured read ({} peak)",
            args.tg,
            tg,
            gbps,
            100.0 * gbps / device_gbps,
            device_gbps,
            peak.map_or("no".into(), |p| format!("{p:.0} GB/s"))
        );
        println!(
            "host link {link_gbps:.1} GB/s: the bandwidth model picks k_chunk {k_model} at {bits} bits"
        );
        if let Some(p) = paired {
            println!(
                "QDEC: {:.2} MB of residual per token read over the host link ({:.0} MB pinned, 0 B of GPU memory \
                 for residuals); without it {:.1} tokens/s; decode time {:+.1} % (median of {} adjacent token \
                 pairs, quartiles {:+.1} / {:+.1} %)",
                residual_bytes as f64 / 1e6,
                gpu_model.residual_host_bytes() as f64 / 1e6,
                p.off_tokens_per_s,
                100.0 * p.slowdown,
                p.pairs,
                100.0 * p.slowdown_quartiles.0,
                100.0 * p.slowdown_quartiles.1
            );
        }
        Ok(())
    }
}
