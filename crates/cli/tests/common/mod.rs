//! Running the `recoup` binary from the integration tests.

use std::path::Path;
use std::process::{Command, Output};

pub fn recoup(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_recoup"))
        .args(args)
        .output()
        .expect("recoup runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Used by some of the test files that include this module.
#[allow(dead_code)]
/// Perplexity on wiki-heldout with `extra` flags and `env` variables for the process.
pub fn ppl_with(
    model: &str,
    ctx: &str,
    windows: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> f64 {
    let mut args = vec![
        "ppl",
        "--model",
        model,
        "--text",
        "wiki-heldout",
        "--ctx",
        ctx,
        "--max-windows",
        windows,
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = Command::new(env!("CARGO_BIN_EXE_recoup"))
        .args(&args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["ppl"].as_f64().unwrap()
}

/// Runs `recoup` and asserts it succeeded.
#[allow(dead_code)]
pub fn ok(args: &[&str]) -> Output {
    let o = recoup(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    o
}

/// A `bits`-bit RTN checkpoint of SmolLM2 in `dir` (no calibration: seconds).
#[allow(dead_code)]
pub fn checkpoint(dir: &Path, name: &str, bits: &str) -> String {
    let out = dir.join(name);
    let out = out.to_str().unwrap();
    ok(&[
        "quantize",
        "--model",
        "smollm2-135m",
        "--method",
        "rtn",
        "--bits",
        bits,
        "--calib",
        "none",
        "--out",
        out,
    ]);
    out.to_string()
}
