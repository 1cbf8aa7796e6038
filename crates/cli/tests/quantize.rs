//! `recoup quantize` end to end on the real default model: checkpoints that load and
//! measure, resumption after a kill, and clear errors on bad flags and damaged checkpoints.

mod common;

use common::{ppl_with, recoup, stderr};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A small calibration, so the tests stay quick: 8 windows of 128 tokens.
const CALIB: [&str; 4] = ["--nsamples", "8", "--seqlen", "128"];

fn quantize(extra: &[&str], out: &Path) -> Output {
    let mut args = vec![
        "quantize",
        "--model",
        "smollm2-135m",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(&CALIB);
    args.extend_from_slice(extra);
    recoup(&args)
}

/// Perplexity on the first 2 windows of 512 tokens (gptq protocol): the tests' quick measure.
fn ppl(model: &str) -> f64 {
    ppl_with(model, "512", "2", &[], &[])
}

#[test]
fn gptq_checkpoint_loads_measures_and_inspects() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gptq");
    let o = quantize(
        &[
            "--method",
            "gptq",
            "--bits",
            "4",
            "--group",
            "64",
            "--act-order",
        ],
        &out,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(
        report.contains("210 layers") && report.contains("peak RSS"),
        "{report}"
    );
    assert!(
        !out.with_file_name("gptq.work").exists(),
        "work directory left behind"
    );

    let o = recoup(&["inspect", out.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let meta: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(meta["method"], "gptq");
    assert_eq!(meta["calibration"]["nsamples"], 8);
    let layers = meta["layers"].as_object().unwrap();
    assert_eq!(layers.len(), 30 * 7);
    for (name, l) in layers {
        // 4 bits + (f16 scale + u8 zero) per 64 weights + the i32 permutation.
        let bpw = l["bits_per_weight"].as_f64().unwrap();
        let expect = 4.0 + 24.0 / 64.0 + 32.0 / l["rows"].as_f64().unwrap();
        assert!(
            (bpw - expect).abs() < 1e-9,
            "{name}: {bpw} bits per weight, expected {expect}"
        );
        let err = l["rel_error"].as_f64().unwrap();
        assert!(err > 0.0 && err < 0.2, "{name}: layer-output error {err}");
        assert_eq!(l["act_order"], true);
    }

    let (full, quant) = (ppl("smollm2-135m"), ppl(out.to_str().unwrap()));
    assert!(
        quant > full && quant < 1.6 * full,
        "4-bit GPTQ perplexity {quant} against f32 {full}"
    );
}

#[test]
fn fbquant_checkpoint_keeps_its_bound_loads_and_measures() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fbquant");
    let flags = ["--method", "fbquant", "--bits", "3", "--group", "64"];
    let o = quantize(
        &[&flags[..], &["--rank", "8", "--steps", "20"]].concat(),
        &out,
    );
    assert!(o.status.success(), "{}", stderr(&o));

    let o = recoup(&["inspect", out.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let meta: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(meta["method"], "fbquant");
    assert_eq!(meta["settings"]["rank"], 8);
    assert_eq!(meta["fbquant_bound_violations"], 0);
    for (name, l) in meta["layers"].as_object().unwrap() {
        let (rows, cols) = (l["rows"].as_f64().unwrap(), l["cols"].as_f64().unwrap());
        // 3 bits + (f16 scale + u8 zero) per 64 weights + f16 factors of rank 8.
        let expect = 3.0 + 24.0 / 64.0 + 16.0 * 8.0 * (rows + cols) / (rows * cols);
        let bpw = l["bits_per_weight"].as_f64().unwrap();
        assert!((bpw - expect).abs() < 1e-9, "{name}: {bpw} vs {expect}");
        let steps = l["max_error_steps"].as_f64().unwrap();
        assert!(
            steps <= 0.5 + 1e-4,
            "{name}: |W_F − W| reaches {steps} steps"
        );
        assert_eq!(l["rank"], 8);
    }

    // The branch loads and applies at inference, and buys a better model than RTN alone.
    let (full, fb) = (ppl("smollm2-135m"), ppl(out.to_str().unwrap()));
    assert!(
        fb > full && fb < 3.0 * full,
        "3-bit FBQuant {fb} against f32 {full}"
    );
    let rtn = dir.path().join("rtn");
    let o = quantize(&["--method", "rtn", "--bits", "3", "--group", "64"], &rtn);
    assert!(o.status.success(), "{}", stderr(&o));
    let rtn_ppl = ppl(rtn.to_str().unwrap());
    assert!(fb < rtn_ppl, "3-bit FBQuant {fb} against RTN {rtn_ppl}");

    // int8 factors with per-row scales: stored, counted, loaded and applied.
    let lorc = dir.path().join("lorc");
    let o = quantize(
        &[
            &flags[2..],
            &["--method", "lorc", "--rank", "8", "--factors", "int8"],
        ]
        .concat(),
        &lorc,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = recoup(&["inspect", lorc.to_str().unwrap(), "--json"]);
    let meta: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(meta["settings"]["factor_dtype"], "int8");
    for (name, l) in meta["layers"].as_object().unwrap() {
        let (rows, cols) = (l["rows"].as_f64().unwrap(), l["cols"].as_f64().unwrap());
        // int8 codes of A and B plus one f16 scale per row of each.
        let branch = 8.0 * 8.0 * (rows + cols) + 16.0 * (rows + 8.0);
        let expect = 3.0 + 24.0 / 64.0 + branch / (rows * cols);
        let bpw = l["bits_per_weight"].as_f64().unwrap();
        assert!((bpw - expect).abs() < 1e-9, "{name}: {bpw} vs {expect}");
    }
    let lorc_ppl = ppl(lorc.to_str().unwrap());
    assert!(
        lorc_ppl < rtn_ppl,
        "3-bit LoRC (int8 factors) {lorc_ppl} against RTN {rtn_ppl}"
    );
}

#[test]
fn low_rank_branches_on_gptq_and_awq_bases_load_and_measure() {
    let dir = tempfile::tempdir().unwrap();
    let grid = ["--bits", "3", "--group", "64", "--rank", "8"];
    let rtn = dir.path().join("rtn");
    let o = quantize(&["--method", "rtn", "--bits", "3", "--group", "64"], &rtn);
    assert!(o.status.success(), "{}", stderr(&o));
    let rtn_ppl = ppl(rtn.to_str().unwrap());
    for (name, flags) in [
        (
            "lqer-gptq",
            vec!["--method", "lqer", "--base", "gptq", "--act-order"],
        ),
        (
            "fbquant-awq",
            vec!["--method", "fbquant", "--base", "awq", "--steps", "10"],
        ),
    ] {
        let out = dir.path().join(name);
        let o = quantize(&[&flags[..], &grid[..]].concat(), &out);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let o = recoup(&["inspect", out.to_str().unwrap(), "--json"]);
        let meta: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(meta["settings"]["base"], flags[3], "{name}");
        // In AWQ's scaled basis, which is the one the quantizer saw, the bound still holds.
        assert_eq!(meta["fbquant_bound_violations"], 0, "{name}");
        let q = ppl(out.to_str().unwrap());
        assert!(q < rtn_ppl, "3-bit {name} {q} against RTN {rtn_ppl}");
    }
}

fn bench_bytes(model: &str, extra: &[&str]) -> f64 {
    let mut args = vec![
        "bench", "--model", model, "--pp", "16", "--tg", "4", "--reps", "1", "--json",
    ];
    args.extend_from_slice(extra);
    let o = recoup(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["tg_tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
    v["weight_bytes_per_token"].as_f64().unwrap()
}

#[test]
fn fast_kernels_agree_with_the_reference_path() {
    // Act-order permutation, a low-rank branch and an 8-bit head: every part the kernels
    // handle beyond the plain packed product.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lqer");
    let flags = [
        "--method",
        "lqer",
        "--base",
        "gptq",
        "--act-order",
        "--bits",
        "3",
        "--group",
        "64",
        "--rank",
        "8",
        "--head-bits",
        "8",
    ];
    let o = quantize(&flags, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(report.contains("210 layers"), "{report}");
    let o = recoup(&["inspect", out.to_str().unwrap(), "--json"]);
    let meta: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let head = &meta["layers"]["lm_head"];
    assert_eq!(
        (head["bits"].as_u64(), head["group"].as_u64()),
        (Some(8), Some(128))
    );
    // 576 columns: four groups of 128 and one of 64, each an f16 scale and a u8 zero.
    let head_bpw = 8.0 + 5.0 * 24.0 / 576.0;
    assert!((head["bits_per_weight"].as_f64().unwrap() - head_bpw).abs() < 1e-9);
    let model = out.to_str().unwrap();

    // Prefill (512-token windows). `ppl` defaults to the exact prefill: tiles dequantized
    // exactly as the reference does.
    let exact = ppl_with(model, "512", "2", &[], &[]);
    let reference = ppl_with(model, "512", "2", &["--reference-kernels"], &[]);
    assert!(
        (exact / reference - 1.0).abs() < 1e-5,
        "exact prefill {exact} vs reference {reference}"
    );
    // The integer GEMM on 8-bit activations (the 8-bit head through dequantized tiles):
    // the activations' rounding moves this fragile model's perplexity by 0.7 % (a 3-bit
    // Qwen2.5-Coder-0.5B's by 0.1 %); a wrong code, group or permutation would move it by
    // orders of magnitude.
    let integer = ppl_with(model, "512", "2", &["--prefill", "integer"], &[]);
    assert!(
        (integer / reference - 1.0).abs() < 1e-2,
        "integer prefill {integer} vs reference {reference}"
    );
    // 8-token windows run every token through the matrix-vector kernels. Their integer
    // SIMD code must agree with its scalar twin, which computes the same formula one value
    // at a time. Only the order of the float sums differs, but every layer rounds its input
    // to 8 bits again, so an output on the other side of a rounding boundary flips a code
    // and the difference grows through 30 layers: on this fragile model (perplexity ~750 on
    // 8-token windows) 0.5–1.4 % depending on the kernel's summation order. A wrong code,
    // group or permutation would cost orders of magnitude.
    let fast = ppl_with(model, "8", "40", &[], &[]);
    let twin = ppl_with(model, "8", "40", &[], &[("RECOUP_ISA", "scalar")]);
    assert!(
        (fast / twin - 1.0).abs() < 3e-2,
        "matrix-vector {fast} vs its scalar twin {twin}"
    );
    // Against the f32 reference the 8-bit activations (blocks of 32, as llama.cpp's) cost
    // 0.1–6 % on such fragile 3-bit models at 8-token contexts (0.09 % for a 4-bit model);
    // a wrong code, group or permutation costs orders of magnitude.
    let reference = ppl_with(model, "8", "40", &["--reference-kernels"], &[]);
    assert!(
        (fast / reference - 1.0).abs() < 0.15,
        "matrix-vector {fast} vs reference {reference}"
    );
    let unfused = ppl_with(model, "8", "40", &["--lowrank-path", "unfused"], &[]);
    assert!(
        (unfused / fast - 1.0).abs() < 1e-5,
        "unfused {unfused} vs fused {fast}"
    );
    let off = ppl_with(model, "8", "40", &["--no-lowrank"], &[]);
    assert!(off > fast * 1.01, "without its branch {off} vs with {fast}");

    // The branch's bytes are counted when it runs and not when it is off.
    let with = bench_bytes(model, &[]);
    let without = bench_bytes(model, &["--no-lowrank"]);
    let branch: f64 = meta["layers"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|l| {
            let rank = l["rank"].as_f64()?;
            Some(2.0 * rank * (l["rows"].as_f64().unwrap() + l["cols"].as_f64().unwrap()))
        })
        .sum();
    assert!(branch > 0.0);
    assert_eq!(with - without, branch);
}

#[test]
fn killed_quantization_resumes_to_an_identical_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    let o = quantize(&["--method", "rtn", "--bits", "3", "--group", "64"], &whole);
    assert!(o.status.success(), "{}", stderr(&o));

    let resumed = dir.path().join("resumed");
    let work = dir.path().join("resumed.work");
    let mut args = vec![
        "quantize",
        "--model",
        "smollm2-135m",
        "--method",
        "rtn",
        "--bits",
        "3",
    ];
    args.extend_from_slice(&["--group", "64", "--out", resumed.to_str().unwrap()]);
    args.extend_from_slice(&CALIB);
    let mut child = Command::new(env!("CARGO_BIN_EXE_recoup"))
        .args(&args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !work.join("block-0002.safetensors").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no block finished"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!resumed.exists(), "a killed run left a checkpoint");
    let finished = (0..30)
        .filter(|i| work.join(format!("block-{i:04}.safetensors")).exists())
        .count();
    assert!(
        (3..30).contains(&finished),
        "{finished} blocks finished before the kill"
    );

    // Other settings are refused rather than mixed into the unfinished run.
    let mut other = args.clone();
    other[6] = "4";
    other.push("--resume");
    let o = recoup(&other);
    assert!(
        !o.status.success() && stderr(&o).contains("different settings"),
        "{}",
        stderr(&o)
    );

    args.push("--resume");
    let o = recoup(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming after"), "{}", stderr(&o));
    let read = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    let (a, b) = (read(&whole), read(&resumed));
    if a != b {
        let at = a.iter().zip(&b).position(|(x, y)| x != y);
        let header = |v: &[u8]| {
            String::from_utf8_lossy(
                &v[8..8 + u64::from_le_bytes(v[..8].try_into().unwrap()) as usize],
            )
            .into_owned()
        };
        panic!(
            "resumed checkpoint differs from the uninterrupted one (sizes {} and {}, first difference at {at:?})\n{}\n{}",
            a.len(),
            b.len(),
            header(&a),
            header(&b)
        );
    }
    assert!(!work.exists());
}

#[test]
fn bad_flags_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    for (flags, expect) in [
        (
            vec!["--method", "rtn", "--bits", "5"],
            "5-bit grids are not supported",
        ),
        (vec!["--method", "rtn", "--group", "48"], "group size 48"),
        (vec!["--method", "rtn", "--group", "abc"], "--group abc"),
        (
            vec!["--method", "gptq", "--calib", "none"],
            "needs calibration data",
        ),
        (
            vec!["--method", "awq", "--act-order"],
            "--act-order applies to GPTQ only",
        ),
        (
            vec!["--method", "fbquant", "--base", "gptq"],
            "GPTQ's rounding would break that bound",
        ),
        (
            vec!["--method", "gptq", "--rank", "16"],
            "apply to the low-rank methods",
        ),
        (
            vec!["--method", "awq", "--factors", "int8"],
            "apply to the low-rank methods",
        ),
        (
            vec!["--method", "lqer", "--steps", "10"],
            "apply to the trained branches",
        ),
        (vec!["--method", "fbquant", "--rank", "0"], "--rank must be"),
        (vec!["--method", "fbquant", "--lr", "-1"], "--lr must be"),
        (
            vec!["--method", "gptq", "--skip", "("],
            "--skip is not a valid regular expression",
        ),
        (
            vec!["--method", "gptq", "--calib", "/nonexistent/text"],
            "/nonexistent/text",
        ),
        (vec!["--method", "awq", "--awq-rows", "0"], "--awq-rows"),
    ] {
        let o = quantize(&flags, &out);
        assert!(!o.status.success(), "{flags:?} succeeded");
        let e = stderr(&o);
        assert!(
            e.contains(expect) && !e.contains("panicked"),
            "{flags:?}: {e}"
        );
    }
    assert!(!out.exists());

    // SmolLM2's context is 8192 tokens.
    let o = recoup(&[
        "quantize",
        "--model",
        "smollm2-135m",
        "--method",
        "gptq",
        "--nsamples",
        "1",
        "--seqlen",
        "9000",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("exceed the model's context"),
        "{}",
        stderr(&o)
    );

    // An existing directory that is not a model is never replaced.
    let precious = dir.path().join("precious");
    std::fs::create_dir(&precious).unwrap();
    std::fs::write(precious.join("notes.txt"), "keep me").unwrap();
    let o = quantize(&["--method", "rtn", "--calib", "none"], &precious);
    assert!(
        !o.status.success() && stderr(&o).contains("not a model directory"),
        "{}",
        stderr(&o)
    );
    assert!(precious.join("notes.txt").exists());
}

#[test]
fn damaged_checkpoints_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    let o = quantize(
        &[
            "--method",
            "rtn",
            "--bits",
            "4",
            "--group",
            "64",
            "--calib",
            "none",
            "--skip",
            "down_proj",
        ],
        &good,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = recoup(&["inspect", good.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("180 quantized layers"));

    let copy = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        for f in std::fs::read_dir(&good).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
        }
        d
    };
    let expect_error = |d: &Path, what: &str| {
        let o = recoup(&[
            "ppl",
            "--model",
            d.to_str().unwrap(),
            "--text",
            "wiki-heldout",
            "--max-windows",
            "1",
        ]);
        let e = stderr(&o);
        assert!(
            !o.status.success() && e.contains(what) && !e.contains("panicked"),
            "{what}: {e}"
        );
    };

    let truncated = copy("truncated");
    let file = truncated.join("model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    expect_error(&truncated, "not a valid safetensors file");

    // The metadata says 3 bits where 4-bit codes are stored (the header keeps its length).
    let relabeled = copy("relabeled");
    let file = relabeled.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
    let edited = header.replace("\\\"bits\\\":4", "\\\"bits\\\":3");
    assert_ne!(header, edited, "no bits field in the header");
    bytes[8..8 + header_len].copy_from_slice(edited.as_bytes());
    std::fs::write(&file, bytes).unwrap();
    expect_error(&relabeled, "expected U8");

    let o = recoup(&["inspect", dir.path().join("missing").to_str().unwrap()]);
    assert!(
        !o.status.success() && stderr(&o).contains("missing"),
        "{}",
        stderr(&o)
    );
}
