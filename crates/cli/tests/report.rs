//! `recoup report` end to end on SmolLM2: what it records, and what a rerun redoes.

mod common;
use common::ok;

const CONFIG: &str = r#"
title = "SmolLM2 report test"
model = "smollm2-135m"

[calibration]
calib = "wiki-calib"
nsamples = 2
seqlen = 64

[ppl]
text = "wiki-heldout"
ctx = 64
max_windows = 2

[[cell]]
name = "rtn-w4"
method = "rtn"
bits = 4

[[qdec]]
cell = "rtn-w4"
k = [K]
"#;

#[test]
fn a_rerun_without_checkpoints_reuses_results_and_remakes_only_what_a_new_step_reads() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("report.toml");
    let out = dir.path().join("out");
    let (config_s, out_s) = (config.to_str().unwrap(), out.to_str().unwrap());
    let report = |k: &str| {
        std::fs::write(&config, CONFIG.replace("[K]", &format!("[{k}]"))).unwrap();
        ok(&["report", "--config", config_s, "--out", out_s]);
        std::fs::read_to_string(out.join("REPORT.md")).unwrap()
    };
    let models = out.join("models");
    let first = report("8");
    assert!(models.join("rtn-w4").is_dir() && models.join("rtn-w4.qdec").is_file());
    for step in ["ppl", "quantize", "residual", "qdec-k8"] {
        let path = out.join("results/rtn-w4").join(format!("{step}.json"));
        assert!(path.is_file(), "{} missing", path.display());
    }

    // The quantization's own report (wall time, peak RSS) is kept and shown.
    let q: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results/rtn-w4/quantize.json")).unwrap())
            .unwrap();
    let run = &q["result"]["run"];
    assert!(run["seconds"].as_f64().unwrap() > 0.0, "{q}");
    assert!(run["peak_rss_bytes"].as_u64().unwrap() > 0, "{q}");
    assert!(first.contains("peak RSS GiB"), "{first}");

    // A clone holds the results but not the checkpoints: nothing is quantized again.
    std::fs::remove_dir_all(&models).unwrap();
    let again = report("8");
    assert_eq!(again, first);
    assert!(!models.join("rtn-w4").exists() && !models.join("rtn-w4.qdec").exists());

    // A new sweep point reads the checkpoint and the sidecar: both are made again, and the
    // recorded point is reused.
    let more = report("8, 16");
    assert!(models.join("rtn-w4").is_dir() && models.join("rtn-w4.qdec").is_file());
    assert!(out.join("results/rtn-w4/qdec-k16.json").is_file());
    assert!(more.len() > first.len());
}
