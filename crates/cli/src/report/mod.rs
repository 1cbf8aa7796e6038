//! `recoup report`: quantize a matrix of cells, measure each (ppl, kld, eval, bench as
//! configured) by running this binary's own commands, and write a markdown table and plots.
//!
//! Every finished step is kept under `OUT/results/CELL/STEP.json` with the exact command
//! that produced it; a later run reuses a step whose command is unchanged and redoes it
//! otherwise. Checkpoints live in `OUT/models/` (gitignore them when OUT is in a repo) and
//! are made only when a step that reads them has to run, so a clone holding the results but
//! not the checkpoints regenerates the report without quantizing anything again. (A result
//! is matched by its own command only: delete `OUT/results/CELL` to redo a cell whose
//! quantizer changed.)

mod config;
mod plot;

use anyhow::{Context, Result, bail};
use config::{Cell, Config, REFERENCE};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(clap::Args)]
pub struct Args {
    /// The report's TOML configuration (see reports/smollm2.toml).
    #[arg(long)]
    config: PathBuf,
    /// Output directory: REPORT.md, plots (SVG and PNG), results/, models/.
    #[arg(long)]
    out: PathBuf,
}

/// Runs steps as child `recoup` processes, reusing recorded results.
struct Runner {
    exe: PathBuf,
    out: PathBuf,
}

impl Runner {
    /// `recoup ARGS --json`, or its recorded result when it ran with the same arguments;
    /// the files it `reads` are made first when the step has to run.
    fn json_step(
        &self,
        cell: &str,
        step: &str,
        args: &[String],
        reads: &[&Product],
    ) -> Result<Value> {
        let path = self.result_path(cell, step);
        if let Some(v) = self.recorded(&path, args) {
            return Ok(v);
        }
        for p in reads {
            self.make(p)?;
        }
        eprintln!("recoup report: [{cell}] {step}: recoup {}", args.join(" "));
        let output = Command::new(&self.exe)
            .args(args)
            .arg("--json")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("cannot run {}", self.exe.display()))?;
        if !output.status.success() {
            bail!(
                "[{cell}] {step} failed ({}): recoup {}",
                output.status,
                args.join(" ")
            );
        }
        let result: Value = serde_json::from_slice(&output.stdout)
            .with_context(|| format!("[{cell}] {step}: output is not JSON"))?;
        self.record(&path, args, &result)?;
        Ok(result)
    }

    /// Runs `product`'s command (after making what it reads), unless the file exists and
    /// was made by the same arguments.
    fn make(&self, product: &Product) -> Result<()> {
        let Product {
            cell,
            step,
            path: file,
            args,
            unrecorded,
            reads,
        } = product;
        let path = self.result_path(cell, step);
        if file.exists() && self.recorded(&path, args).is_some() {
            return Ok(());
        }
        if let Some(p) = reads {
            self.make(p)?;
        }
        eprintln!("recoup report: [{cell}] {step}: recoup {}", args.join(" "));
        let output = Command::new(&self.exe)
            .args(args)
            .args(*unrecorded)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("cannot run {}", self.exe.display()))?;
        if !output.status.success() {
            bail!(
                "[{cell}] {step} failed ({}): recoup {}",
                output.status,
                args.join(" ")
            );
        }
        // A command that reports in JSON (quantize: wall time, peak RSS) is recorded with it.
        let mut result = json!({ "product": file.display().to_string() });
        match serde_json::from_slice::<Value>(&output.stdout) {
            Ok(run) => result["run"] = run,
            Err(_) => eprint!("{}", String::from_utf8_lossy(&output.stdout)),
        }
        self.record(&path, args, &result)
    }

    fn result_path(&self, cell: &str, step: &str) -> PathBuf {
        self.out
            .join("results")
            .join(cell)
            .join(format!("{step}.json"))
    }

    fn recorded(&self, path: &Path, args: &[String]) -> Option<Value> {
        let v: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        (v["args"] == json!(args)).then(|| v["result"].clone())
    }

    fn record(&self, path: &Path, args: &[String], result: &Value) -> Result<()> {
        let body = serde_json::to_vec_pretty(&json!({ "args": args, "result": result }))?;
        recoup_formats::atomic::write_file(path, |out| Ok(std::io::Write::write_all(out, &body)?))
    }
}

/// A file one step writes (a checkpoint or a residual sidecar) and later steps read.
struct Product<'a> {
    cell: String,
    step: &'static str,
    path: PathBuf,
    args: Vec<String>,
    /// Flags it runs with that are not part of the recorded command: quantize's `--resume`,
    /// so an interrupted report picks a quantization up at its last finished block, and
    /// `--json`, whose summary is recorded beside the product.
    unrecorded: &'static [&'static str],
    reads: Option<&'a Product<'a>>,
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Everything measured of one model.
struct Row {
    name: String,
    series: String,
    bits: Option<u32>,
    ppl: Value,
    kld: Option<Value>,
    eval: Option<Value>,
    bench: Option<Value>,
    /// What `quantize --json` reported when the cell's checkpoint was made (wall time,
    /// peak RSS), if this report made it.
    quantize: Option<Value>,
}

impl Row {
    fn bpw(&self) -> f64 {
        self.ppl["bits_per_weight"].as_f64().unwrap_or(f64::NAN)
    }

    fn ppl(&self) -> f64 {
        self.ppl["ppl"].as_f64().unwrap_or(f64::NAN)
    }

    fn accuracy(&self) -> Option<f64> {
        self.eval.as_ref()?["average"].as_f64()
    }

    fn decode(&self) -> Option<f64> {
        self.bench.as_ref()?["tg_tokens_per_s"].as_f64()
    }
}

/// QDEC's perplexity at one k_chunk of a swept cell (k = 0: the cell itself).
struct SweepPoint {
    k: usize,
    ppl: f64,
    residual_mb: f64,
}

struct Sweep {
    cell: String,
    points: Vec<SweepPoint>,
    /// The selection ablation: k_chunk and each selector's perplexity.
    selectors_at: Option<(usize, Vec<(&'static str, f64)>)>,
}

/// Runs the configured measurements of `model` (result files under `name`).
fn measure(
    runner: &Runner,
    config: &Config,
    name: &str,
    series: &str,
    bits: Option<u32>,
    model: &str,
    product: Option<&Product>,
) -> Result<Row> {
    let reads: Vec<&Product> = product.into_iter().collect();
    let ppl = runner.json_step(name, "ppl", &ppl_args(config, model, &[]), &reads)?;
    let kld = match &config.kld {
        Some(k) if name != REFERENCE => {
            // Hundreds of MB: beside the checkpoints, not among the small result files.
            let logits = runner.out.join("models").join("reference.kld");
            let mut args = strings(&[
                "kld",
                "--model",
                model,
                "--reference",
                &config.model,
                "--text",
                &k.text,
                "--ctx",
                &k.ctx.to_string(),
                "--reference-logits",
                &logits.display().to_string(),
            ]);
            if let Some(w) = k.max_windows {
                args.extend(strings(&["--max-windows", &w.to_string()]));
            }
            Some(runner.json_step(name, "kld", &args, &reads)?)
        }
        _ => None,
    };
    let eval = match &config.eval {
        Some(e) => {
            let mut args = strings(&["eval", "--model", model, "--tasks", &e.tasks.join(",")]);
            if let Some(l) = e.limit {
                args.extend(strings(&["--limit", &l.to_string()]));
            }
            Some(runner.json_step(name, "eval", &args, &reads)?)
        }
        None => None,
    };
    let bench = match &config.bench {
        Some(b) => Some(runner.json_step(
            name,
            "bench",
            &strings(&[
                "bench",
                "--model",
                model,
                "--pp",
                &b.pp.to_string(),
                "--tg",
                &b.tg.to_string(),
                "--reps",
                &b.reps.to_string(),
            ]),
            &reads,
        )?),
        None => None,
    };
    Ok(Row {
        name: name.into(),
        series: series.into(),
        bits,
        ppl,
        kld,
        eval,
        bench,
        quantize: product
            .and_then(|p| runner.recorded(&runner.result_path(&p.cell, p.step), &p.args))
            .and_then(|v| v.get("run").cloned()),
    })
}

/// `recoup ppl` of `model` as configured, with `extra` flags.
fn ppl_args(config: &Config, model: &str, extra: &[String]) -> Vec<String> {
    let p = &config.ppl;
    let mut args = strings(&[
        "ppl",
        "--model",
        model,
        "--text",
        &p.text,
        "--ctx",
        &p.ctx.to_string(),
    ]);
    args.extend(extra.iter().cloned());
    if let Some(protocol) = &p.protocol {
        args.extend(strings(&["--protocol", protocol]));
    }
    if let Some(w) = p.max_windows {
        args.extend(strings(&["--max-windows", &w.to_string()]));
    }
    args
}

fn quantize_args(config: &Config, cell: &Cell, out: &Path) -> Vec<String> {
    let mut args = strings(&[
        "quantize",
        "--model",
        &config.model,
        "--method",
        &cell.method,
        "--bits",
        &cell.bits.to_string(),
    ]);
    if let Some(g) = &cell.group {
        args.extend(strings(&["--group", g]));
    }
    if let Some(r) = cell.rank {
        args.extend(strings(&["--rank", &r.to_string()]));
    }
    // RTN, and LoRC on its default RTN base, use no calibration data: none is loaded.
    let calibration_free =
        cell.method == "rtn" || (cell.method == "lorc" && !cell.args.iter().any(|a| a == "--base"));
    if calibration_free {
        args.extend(strings(&["--calib", "none"]));
    } else {
        args.extend(config.calibration.args());
    }
    args.extend(cell.args.iter().cloned());
    args.extend(strings(&["--out", &out.display().to_string()]));
    args
}

pub fn main(args: Args) -> Result<()> {
    let config = Config::load(&args.config)?;
    std::fs::create_dir_all(args.out.join("models"))
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let runner = Runner {
        exe: std::env::current_exe().context("cannot find the recoup executable")?,
        out: args.out.clone(),
    };
    let mut rows = vec![measure(
        &runner,
        &config,
        REFERENCE,
        REFERENCE,
        None,
        &config.model,
        None,
    )?];
    let checkpoint = |cell: &Cell| {
        let dir = args.out.join("models").join(&cell.name);
        Product {
            cell: cell.name.clone(),
            step: "quantize",
            args: quantize_args(&config, cell, &dir),
            path: dir,
            unrecorded: &["--resume", "--json"],
            reads: None,
        }
    };
    for cell in &config.cells {
        let product = checkpoint(cell);
        rows.push(measure(
            &runner,
            &config,
            &cell.name,
            cell.series(),
            Some(cell.bits),
            &product.path.display().to_string(),
            Some(&product),
        )?);
    }
    // Per swept cell: (k, ppl, residual MB per token), k = 0 being the cell itself.
    let mut sweeps = Vec::new();
    for sweep in &config.qdec {
        let cell = config
            .cells
            .iter()
            .find(|c| c.name == sweep.cell)
            .expect("validated");
        let base_checkpoint = checkpoint(cell);
        let dir = base_checkpoint.path.display().to_string();
        let path = args.out.join("models").join(format!("{}.qdec", sweep.cell));
        let sidecar = Product {
            cell: sweep.cell.clone(),
            step: "residual",
            args: strings(&[
                "residual",
                "--model",
                &config.model,
                "--quantized",
                &dir,
                "--out",
                &path.display().to_string(),
            ])
            .into_iter()
            .chain(config.calibration.args())
            .collect(),
            path,
            unrecorded: &[],
            reads: Some(&base_checkpoint),
        };
        let base = rows
            .iter()
            .find(|r| r.name == sweep.cell)
            .expect("validated");
        let mut points = vec![SweepPoint {
            k: 0,
            ppl: base.ppl(),
            residual_mb: 0.0,
        }];
        let run = |k: usize, select: Option<&str>| -> Result<Value> {
            let mut qdec = strings(&[
                "--qdec",
                &sidecar.path.display().to_string(),
                "--qdec-k",
                &k.to_string(),
            ]);
            let mut step = format!("qdec-k{k}");
            if let Some(select) = select {
                qdec.extend(strings(&["--qdec-select", select]));
                step = format!("{step}-{select}");
            }
            let a = ppl_args(&config, &dir, &qdec);
            runner.json_step(&sweep.cell, &step, &a, &[&base_checkpoint, &sidecar])
        };
        for &k in &sweep.k {
            let v = run(k, None)?;
            let bytes = v["residual_bytes_per_token"].as_f64().unwrap_or(f64::NAN);
            points.push(SweepPoint {
                k,
                ppl: v["ppl"].as_f64().unwrap_or(f64::NAN),
                residual_mb: bytes / 1e6,
            });
        }
        // Exact selection is the sweep's own default, so its point is reused when swept.
        let mut selectors = Vec::new();
        if let Some(k) = sweep.selectors_at {
            for select in [None, Some("bucket"), Some("static"), Some("random")] {
                let v = run(k, select)?;
                selectors.push((
                    select.unwrap_or("exact"),
                    v["ppl"].as_f64().unwrap_or(f64::NAN),
                ));
            }
        }
        sweeps.push(Sweep {
            cell: sweep.cell.clone(),
            points,
            selectors_at: sweep.selectors_at.map(|k| (k, selectors)),
        });
    }
    let plots = draw_plots(&config, &rows, &sweeps, &args.out)?;
    let markdown = markdown(&config, &args, &rows, &sweeps, &plots);
    let path = args.out.join("REPORT.md");
    recoup_formats::atomic::write_file(&path, |out| {
        Ok(std::io::Write::write_all(out, markdown.as_bytes())?)
    })?;
    println!("wrote {}", path.display());
    Ok(())
}

/// The cells on the perplexity-vs-bits Pareto front: no other cell has fewer bits and a
/// lower perplexity.
fn pareto(rows: &[Row]) -> Vec<&Row> {
    let cells: Vec<&Row> = rows.iter().filter(|r| r.bits.is_some()).collect();
    let mut front: Vec<&Row> = cells
        .iter()
        .copied()
        .filter(|r| {
            !cells.iter().any(|o| {
                o.bpw() <= r.bpw() && o.ppl() < r.ppl() && (o.bpw() < r.bpw() || o.ppl() < r.ppl())
            })
        })
        .collect();
    front.sort_by(|a, b| a.bpw().total_cmp(&b.bpw()));
    front
}

/// Points of each series (in order of first appearance), sorted by x.
fn by_series(rows: &[Row], y: impl Fn(&Row) -> Option<f64>) -> Vec<plot::Series> {
    let mut order: Vec<String> = Vec::new();
    let mut points: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.bits.is_some()) {
        if let Some(v) = y(r).filter(|v| v.is_finite()) {
            if !order.contains(&r.series) {
                order.push(r.series.clone());
            }
            points
                .entry(r.series.clone())
                .or_default()
                .push((r.bpw(), v));
        }
    }
    order
        .into_iter()
        .map(|name| {
            let mut pts = points.remove(&name).unwrap_or_default();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            plot::Series { name, points: pts }
        })
        .collect()
}

/// One figure of every cell against its bits per weight, a line per series, the reference's
/// figure as a level.
fn vs_bits(
    rows: &[Row],
    title: String,
    y_label: String,
    y: impl Fn(&Row) -> Option<f64>,
) -> plot::Chart {
    plot::Chart {
        title,
        x_label: "bits per weight".into(),
        y_label,
        series: by_series(rows, &y),
        levels: y(&rows[0])
            .filter(|v| v.is_finite())
            .map(|v| ("full precision".to_string(), v))
            .into_iter()
            .collect(),
        front: None,
        log_y: false,
    }
}

/// Draws every chart the results allow; returns (file stem, caption) of each.
fn draw_plots(
    config: &Config,
    rows: &[Row],
    sweeps: &[Sweep],
    out: &Path,
) -> Result<Vec<(String, String)>> {
    let reference = &rows[0];
    let mut charts = Vec::new();
    let front = pareto(rows);
    let mut ppl = vs_bits(
        rows,
        format!("Perplexity vs bits per weight — {}", config.title),
        format!("perplexity, {} (log scale)", config.ppl.text),
        |r| Some(r.ppl()),
    );
    ppl.x_label = "bits per weight (decoder blocks, scales and branches included)".into();
    ppl.front = (front.len() > 1).then(|| front.iter().map(|r| (r.bpw(), r.ppl())).collect());
    ppl.log_y = true;
    charts.push(("ppl_vs_bpw", ppl));
    if config.eval.is_some() {
        charts.push((
            "accuracy_vs_bpw",
            vs_bits(
                rows,
                format!("Zero-shot accuracy vs bits per weight — {}", config.title),
                "average accuracy (%)".into(),
                |r| r.accuracy().map(|a| 100.0 * a),
            ),
        ));
    }
    if !sweeps.is_empty() {
        charts.push((
            "qdec_ppl_vs_k",
            plot::Chart {
                title: format!("QDEC: perplexity vs k_chunk — {}", config.title),
                x_label: "k_chunk (channels corrected per 1024 inputs per token)".into(),
                y_label: format!("perplexity, {}", config.ppl.text),
                series: sweeps
                    .iter()
                    .map(|s| plot::Series {
                        name: s.cell.clone(),
                        points: s.points.iter().map(|p| (p.k as f64, p.ppl)).collect(),
                    })
                    .collect(),
                levels: vec![("full precision".into(), reference.ppl())],
                front: None,
                log_y: false,
            },
        ));
    }
    if config.bench.is_some() {
        charts.push((
            "speed_vs_bpw",
            vs_bits(
                rows,
                format!("Decode speed vs bits per weight — {}", config.title),
                "decode tokens/s".into(),
                Row::decode,
            ),
        ));
    }
    let mut drawn = Vec::new();
    for (stem, chart) in charts {
        match plot::write(&chart, &out.join(stem)) {
            Ok(()) => drawn.push((stem.to_string(), chart.title.clone())),
            Err(e) => eprintln!("recoup report: plot {stem} not drawn: {e:#}"),
        }
    }
    Ok(drawn)
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.filter(|v| v.is_finite())
        .map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn markdown(
    config: &Config,
    args: &Args,
    rows: &[Row],
    sweeps: &[Sweep],
    plots: &[(String, String)],
) -> String {
    let reference = &rows[0];
    let mut md = String::new();
    let _ = writeln!(md, "# {}\n", config.title);
    let _ = writeln!(
        md,
        "Generated by `recoup report --config {} --out {}`; every figure below comes from a result file under `results/`, which records the exact command that produced it.\n",
        args.config.display(),
        args.out.display()
    );
    let p = &reference.ppl;
    let _ = writeln!(
        md,
        "- **Perplexity**: `{}` protocol, ctx {}, {} windows ({} tokens scored) of `{}`.",
        p["protocol"].as_str().unwrap_or("?"),
        p["ctx"],
        p["windows"],
        p["tokens_scored"],
        config.ppl.text
    );
    if let Some(k) = &config.kld {
        let _ = writeln!(
            md,
            "- **KLD**: KL(full precision ‖ model) per token, mean; top-1 = same most likely token; ctx {}, {} of `{}`.",
            k.ctx,
            k.max_windows
                .map_or("all windows".into(), |w| format!("{w} windows")),
            k.text
        );
    }
    if let Some(e) = &config.eval {
        let _ = writeln!(
            md,
            "- **Zero-shot**: lm-eval log-likelihood scoring, 0-shot, acc (%), {} of each task; average over {}.",
            e.limit
                .map_or("all instances".into(), |l| format!("first {l} instances")),
            e.tasks.join(", ")
        );
    }
    if let Some(b) = &config.bench {
        let _ = writeln!(
            md,
            "- **Speed**: `recoup bench`, prompt {} tokens, {} decoded, median of {}; on the machine that ran the report.",
            b.pp, b.tg, b.reps
        );
    }
    let _ = writeln!(
        md,
        "- **bpw**: bits per weight of the decoder blocks' linear layers, scales, zero points and low-rank branches included (the reference: as held in memory).\n"
    );
    let tasks: Vec<String> = config.eval.as_ref().map_or(Vec::new(), |e| e.tasks.clone());
    let mut header = vec!["model", "method", "bits", "bpw", "ppl", "Δppl"];
    if config.kld.is_some() {
        header.extend(["KLD", "top-1 %"]);
    }
    if config.eval.is_some() {
        header.push("avg acc");
        header.extend(tasks.iter().map(String::as_str));
    }
    if config.bench.is_some() {
        header.extend(["decode tok/s", "prefill tok/s"]);
    }
    header.extend(["quantize s", "peak RSS GiB"]);
    let _ = writeln!(md, "| {} |", header.join(" | "));
    let _ = writeln!(md, "|{}", "---|".repeat(header.len()));
    let front = pareto(rows);
    for r in rows {
        let on_front = front.iter().any(|f| f.name == r.name);
        let mut cols = vec![
            format!("{}{}", r.name, if on_front { " ★" } else { "" }),
            r.series.clone(),
            r.bits.map_or("16/32".into(), |b| b.to_string()),
            fmt(Some(r.bpw()), 3),
            fmt(Some(r.ppl()), 3),
            if r.bits.is_some() {
                format!("{:+.1} %", 100.0 * (r.ppl() / reference.ppl() - 1.0))
            } else {
                "–".into()
            },
        ];
        if config.kld.is_some() {
            let k = r.kld.as_ref();
            cols.push(fmt(k.and_then(|k| k["kld_mean"].as_f64()), 4));
            cols.push(fmt(
                k.and_then(|k| k["top1_agreement"].as_f64())
                    .map(|a| 100.0 * a),
                1,
            ));
        }
        if let Some(e) = &r.eval {
            cols.push(fmt(r.accuracy().map(|a| 100.0 * a), 1));
            for t in &tasks {
                cols.push(fmt(e["tasks"][t]["acc"].as_f64().map(|a| 100.0 * a), 1));
            }
        }
        if let Some(b) = &r.bench {
            cols.push(fmt(b["tg_tokens_per_s"].as_f64(), 1));
            cols.push(fmt(b["pp_tokens_per_s"].as_f64(), 1));
        }
        // A resumed quantization's time covers only its own blocks: marked with †.
        let q = r.quantize.as_ref();
        let resumed = q
            .and_then(|q| q["resumed_after_blocks"].as_u64())
            .unwrap_or(0)
            > 0;
        let dagger = if resumed { " †" } else { "" };
        cols.push(
            q.and_then(|q| q["seconds"].as_f64())
                .map_or("–".into(), |s| format!("{s:.0}{dagger}")),
        );
        cols.push(fmt(
            q.and_then(|q| q["peak_rss_bytes"].as_f64())
                .map(|b| b / (1u64 << 30) as f64),
            2,
        ));
        let _ = writeln!(md, "| {} |", cols.join(" | "));
    }
    let _ = writeln!(
        md,
        "\n★ on the perplexity-vs-bits Pareto front (no cell has fewer bits and a lower perplexity). \
         Quantize time and peak RSS: of the `quantize` run that made the checkpoint (– where it \
         was made before reports recorded them; † resumed, so covering only part of the blocks).\n"
    );
    if !sweeps.is_empty() {
        let _ = writeln!(md, "## QDEC: perplexity vs k_chunk\n");
        let _ = writeln!(
            md,
            "| cell | k_chunk | ppl | residual MB/token |\n|---|---|---|---|"
        );
        for s in sweeps {
            for p in &s.points {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.3} | {:.2} |",
                    s.cell, p.k, p.ppl, p.residual_mb
                );
            }
        }
        let _ = writeln!(md);
        for s in sweeps {
            let Some((k, selectors)) = &s.selectors_at else {
                continue;
            };
            let _ = writeln!(
                md,
                "Selection on `{}` at k_chunk {k} (none: {:.3}): exact top-k per chunk, the 32-bucket approximation, a static channel set from the calibration statistics, random channels.\n",
                s.cell, s.points[0].ppl
            );
            let names: Vec<&str> = selectors.iter().map(|(n, _)| *n).collect();
            let _ = writeln!(
                md,
                "| {} |\n|{}",
                names.join(" | "),
                "---|".repeat(names.len())
            );
            let values: Vec<String> = selectors.iter().map(|(_, p)| format!("{p:.3}")).collect();
            let _ = writeln!(md, "| {} |\n", values.join(" | "));
        }
    }
    for (stem, caption) in plots {
        let _ = writeln!(md, "![{caption}]({stem}.svg)\n");
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, bpw: f64, ppl: f64) -> Row {
        Row {
            name: name.into(),
            series: "m".into(),
            bits: Some(3),
            ppl: json!({"bits_per_weight": bpw, "ppl": ppl}),
            kld: None,
            eval: None,
            bench: None,
            quantize: None,
        }
    }

    #[test]
    fn the_pareto_front_keeps_cells_no_other_beats_on_both_axes() {
        let rows = [
            row("a", 3.2, 40.0),
            row("b", 3.2, 30.0),
            row("c", 4.2, 25.0),
            row("d", 4.6, 26.0),
            row("e", 2.5, 90.0),
        ];
        let names: Vec<&str> = pareto(&rows).iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["e", "b", "c"]);
    }
}
