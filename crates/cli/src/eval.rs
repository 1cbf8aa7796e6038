use anyhow::{Context, Result};
use recoup_eval::zeroshot::{
    Prompt, Scorer, Scoring, TaskResult, read_instances, task, task_metrics,
};
use std::time::Instant;

const DEFAULT_TASKS: &str = "piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,lambada";

#[derive(clap::Args)]
pub struct Args {
    /// Model: a GGUF file, a Hugging Face directory, a recoup checkpoint, or an asset name.
    #[arg(long)]
    model: String,
    #[command(flatten)]
    kernels: crate::KernelArgs,
    /// Comma-separated tasks (fetched on first use): piqa, arc_easy, arc_challenge,
    /// hellaswag, winogrande, boolq, lambada.
    #[arg(long, default_value = DEFAULT_TASKS, value_delimiter = ',')]
    tasks: Vec<String>,
    /// Score only the first N instances of each task (file order).
    #[arg(long)]
    limit: Option<usize>,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
}

pub fn main(args: Args) -> Result<()> {
    if args.limit == Some(0) {
        anyhow::bail!("--limit must be at least 1");
    }
    let specs = args
        .tasks
        .iter()
        .map(|t| task(t.trim()))
        .collect::<Result<Vec<_>>>()?;
    let mut loaded_tasks = Vec::new();
    for spec in &specs {
        let path = recoup_assets::resolve(spec.name, recoup_assets::AssetKind::Task)?;
        let instances = read_instances(&path, spec, args.limit)?;
        let sha = recoup_assets::sha256_file(&path)?;
        loaded_tasks.push((spec, path, sha, instances));
    }
    let kernels = args.kernels.for_scoring();
    let loaded = crate::load_model(&args.model, &kernels)?;
    let tk = &loaded.tokenizer;
    let total: usize = loaded_tasks.iter().map(|t| t.3.len()).sum();
    let pb = crate::progress::bar(total as u64, "instances");
    let mut scorer = Scorer::new(&loaded.model, tk);
    let start = Instant::now();
    let mut results: Vec<(&str, TaskResult, f64)> = Vec::new();
    for (spec, path, _, instances) in &loaded_tasks {
        pb.set_message(spec.name);
        let task_start = Instant::now();
        let scores = scorer
            .score_all(instances, |n| pb.inc(n as u64))
            .with_context(|| format!("task file {}", path.display()))?;
        let r = task_metrics(spec, instances, &scores);
        results.push((spec.name, r, task_start.elapsed().as_secs_f64()));
    }
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let average = results.iter().map(|r| r.1.acc).sum::<f64>() / results.len() as f64;
    let bos = if tk.add_bos { "added" } else { "not added" };
    if args.json {
        let mut tasks = serde_json::Map::new();
        for ((name, r, s), (spec, path, sha, _)) in results.iter().zip(&loaded_tasks) {
            let mut v = serde_json::to_value(r)?;
            v["split"] = spec.split.into();
            v["file"] = path.display().to_string().into();
            v["sha256"] = sha.clone().into();
            v["seconds"] = (*s).into();
            tasks.insert(name.to_string(), v);
        }
        let v = serde_json::json!({
            "model": args.model,
            "tasks": tasks,
            "average": average,
            "limit": args.limit,
            "bos": tk.add_bos,
            "qdec": kernels.qdec_record(),
            "seconds": secs,
            "tokens_per_second": scorer.tokens_run as f64 / secs,
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "protocol: lm-evaluation-harness log-likelihood scoring, 0-shot, BOS {bos}; acc = most likely choice, acc_norm = most likely per character, lambada = greedy last word; stderr = sample std / sqrt(n)"
    );
    for (spec, path, sha, instances) in &loaded_tasks {
        let prompt = match spec.prompt {
            Prompt::Request => "request context",
            Prompt::Question => "question alone (0-shot from the 5-shot file)",
        };
        let scoring = match spec.scoring {
            Scoring::Choice { .. } => "multiple choice",
            Scoring::LastWord => "last word",
        };
        println!(
            "  {:<14} {} {}, {} instances, {scoring}, {prompt}; {} sha256 {sha}",
            spec.name,
            spec.split,
            if args.limit.is_some() {
                "(first)"
            } else {
                "(all)"
            },
            instances.len(),
            path.display()
        );
    }
    println!(
        "{:<14} {:>7} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "task", "n", "acc", "±", "acc_norm", "±", "ppl"
    );
    let opt =
        |v: Option<f64>, scale: f64| v.map_or("-".to_string(), |v| format!("{:.2}", v * scale));
    for (name, r, _) in &results {
        println!(
            "{:<14} {:>7} {:>9.2} {:>9.2} {:>9} {:>9} {:>7}",
            name,
            r.n,
            100.0 * r.acc,
            100.0 * r.stderr,
            opt(r.acc_norm, 100.0),
            opt(r.acc_norm_stderr, 100.0),
            opt(r.ppl, 1.0)
        );
    }
    println!("{:<14} {:>7} {:>9.2}", "average acc", "", 100.0 * average);
    println!(
        "{:.1}s, {:.0} tokens/s",
        secs,
        scorer.tokens_run as f64 / secs
    );
    Ok(())
}
