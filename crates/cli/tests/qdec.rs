//! QDEC end to end on the real default model: `recoup residual`, then `ppl` and `bench`
//! with the correction, every selector and tier, and clear errors on bad sidecars.

mod common;

use common::{checkpoint, ok, ppl_with, recoup, stderr};

/// Builds the sidecar of checkpoint `ck` into `out`, with `calib` flags.
fn residual(ck: &str, out: &str, calib: &[&str]) -> std::process::Output {
    let args = [
        "residual",
        "--model",
        "smollm2-135m",
        "--quantized",
        ck,
        "--out",
        out,
    ];
    ok(&[&args[..], calib].concat())
}

/// Perplexity on the first 2 windows of 512 tokens of wiki-heldout.
fn ppl(model: &str, extra: &[&str]) -> f64 {
    ppl_with(model, "512", "2", extra, &[])
}

#[test]
fn residual_correction_lowers_perplexity_with_every_selector_and_tier() {
    let dir = tempfile::tempdir().unwrap();
    let ck = checkpoint(dir.path(), "rtn3", "3");
    let sidecar = dir.path().join("rtn3.qdec");
    let r = sidecar.to_str().unwrap();
    // Calibration on another text than the one measured.
    let calib = ["--calib", "c4", "--nsamples", "4", "--seqlen", "128"];
    let o = residual(&ck, r, &calib);
    assert!(String::from_utf8_lossy(&o.stdout).contains("residuals of 210 layers"));
    let o = ok(&["inspect", r, "--json"]);
    let meta: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(meta["layers"].as_object().unwrap().len(), 210);
    assert_eq!(meta["calibration"]["nsamples"], 4);
    let down = &meta["layers"]["model.layers.0.mlp.down_proj"];
    // 3-bit RTN leaves a residual a good fraction of the weight; the 4-bit code keeps most.
    let (w, c) = (
        down["weight_rel_error"].as_f64().unwrap(),
        down["code_rel_error"].as_f64().unwrap(),
    );
    assert!(w > 0.05 && w < 0.5 && c > 0.0 && c < 0.2, "{down}");

    let base = ppl(&ck, &[]);
    let q = |extra: &[&str]| ppl(&ck, &[&["--qdec", r][..], extra].concat());
    assert_eq!(q(&["--qdec-k", "0"]), base, "k_chunk 0 changes nothing");
    let exact8 = q(&["--qdec-k", "8"]);
    let exact32 = q(&["--qdec-k", "32"]);
    assert!(exact8 < 0.8 * base, "k 8: {exact8} against {base}");
    assert!(exact32 < exact8, "k 32: {exact32} against k 8: {exact8}");
    // The memory-mapped tier reads the same bytes.
    assert_eq!(q(&["--qdec-k", "8", "--qdec-tier", "mmap"]), exact8);
    // The reference path (dequantized f32 product, scalar correction) agrees.
    let reference = q(&["--qdec-k", "8", "--reference-kernels"]);
    assert!(
        (reference - exact8).abs() < 1e-4 * exact8,
        "{reference} vs {exact8}"
    );
    // Dynamic selection beats the ablation's static and random sets; the bucket
    // approximation stays close to exact top-k.
    let bucket = q(&["--qdec-k", "8", "--qdec-select", "bucket"]);
    let stat = q(&["--qdec-k", "8", "--qdec-select", "static"]);
    let random = q(&["--qdec-k", "8", "--qdec-select", "random"]);
    assert!(bucket < 1.05 * exact8, "bucket {bucket} vs exact {exact8}");
    assert!(
        exact8 < stat && stat < random && random < base,
        "{exact8} {stat} {random} {base}"
    );
    // Overrides per projection: only the down projections corrected lands in between.
    let down = q(&["--qdec-k", "0,down=8"]);
    assert!(exact8 < down && down < base, "{down}");

    // Decode with the correction: bench reports its bytes and the paired slowdown.
    let o = ok(&[
        "bench", "--model", &ck, "--pp", "0", "--tg", "16", "--reps", "1", "--json", "--qdec", r,
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["residual_bytes_per_token"].as_f64().unwrap() > 1e5, "{v}");
    assert!(
        v["tg_tokens_per_s_without_qdec"].as_f64().unwrap() > 0.0,
        "{v}"
    );
    assert!(v["qdec_slowdown"].is_number(), "{v}");
    // 16 tokens are 8 pairs of adjacent tokens, one with the correction and one without.
    assert_eq!(v["qdec_token_pairs"], 8, "{v}");
    assert!(v["qdec_slowdown_quartiles"][1].is_number(), "{v}");
}

#[test]
fn bad_residual_files_and_flags_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ck = checkpoint(dir.path(), "rtn3", "3");
    let other = checkpoint(dir.path(), "rtn4", "4");
    let sidecar = dir.path().join("rtn3.qdec");
    let r = sidecar.to_str().unwrap();
    residual(&ck, r, &["--calib", "none"]);
    let fails = |args: &[&str], want: &str| {
        let o = recoup(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let e = stderr(&o);
        assert!(e.contains(want), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{e}");
    };
    let ppl = |model: &str, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["ppl", "--model", model, "--text", "wiki-heldout"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let call = |a: Vec<String>, want: &str| {
        let args: Vec<&str> = a.iter().map(String::as_str).collect();
        fails(&args, want)
    };
    call(ppl(&other, &["--qdec", r]), "built for another checkpoint");
    // The builder never writes into the checkpoint it reads.
    let inside = format!("{ck}/model.safetensors");
    let args = [
        "residual",
        "--model",
        "smollm2-135m",
        "--quantized",
        &ck,
        "--out",
        &inside,
    ];
    fails(&args, "inside the checkpoint");
    call(
        ppl("smollm2-135m", &["--qdec", r]),
        "needs a recoup checkpoint",
    );
    call(
        ppl(&ck, &["--qdec", r, "--qdec-select", "bucket"]),
        "needs thresholds",
    );
    call(
        ppl(&ck, &["--qdec", r, "--qdec-k", "8,mlp=2"]),
        "unknown projection",
    );
    call(ppl(&ck, &["--qdec-k", "8"]), "--qdec");
    // A truncated sidecar, and one that is not a sidecar at all, name the file.
    let bytes = std::fs::read(&sidecar).unwrap();
    let cut = dir.path().join("cut.qdec");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    call(ppl(&ck, &["--qdec", cut.to_str().unwrap()]), "cut.qdec");
    let block = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    call(
        ppl(&ck, &["--qdec", block.to_str().unwrap()]),
        "not a recoup residual file",
    );
}

#[test]
fn cuda_device_without_a_gpu_is_a_clear_error() {
    // Built without the feature, or with it on a machine without an NVIDIA driver (CI), the
    // GPU path of every command that takes it refuses with a sentence saying why.
    let m = ["--model", "smollm2-135m", "--device", "cuda"];
    for args in [
        vec!["bench", "--pp", "0", "--tg", "16"],
        vec![
            "ppl",
            "--text",
            "wiki-heldout",
            "--ctx",
            "64",
            "--max-windows",
            "1",
        ],
        vec!["run", "--prompt", "Hello", "--max-tokens", "2"],
    ] {
        let o = recoup(&[&args[..], &m[..]].concat());
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?}: {err}");
        assert!(
            err.contains("built without CUDA") || err.contains("no CUDA driver"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
