//! `recoup eval` and `recoup kld` end to end on the real default model.

mod common;

use common::{checkpoint, ok, ppl_with, recoup, stderr};

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn eval_reports_every_task_asked_and_refuses_bad_flags() {
    let o = ok(&[
        "eval",
        "--model",
        "smollm2-135m",
        "--tasks",
        "piqa,winogrande,lambada",
        "--limit",
        "8",
        "--json",
    ]);
    let v = json(&o);
    let tasks = v["tasks"].as_object().unwrap();
    assert_eq!(tasks.len(), 3);
    let mut sum = 0.0;
    for (name, t) in tasks {
        assert_eq!(t["n"], 8, "{name}");
        let acc = t["acc"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{name}: {acc}");
        assert_eq!(t["sha256"].as_str().unwrap().len(), 64);
        sum += acc;
    }
    assert!(tasks["piqa"]["acc_norm"].is_f64());
    assert!(tasks["winogrande"]["acc_norm"].is_null());
    assert!(tasks["lambada"]["ppl"].as_f64().unwrap() > 1.0);
    assert!((v["average"].as_f64().unwrap() - sum / 3.0).abs() < 1e-12);

    for (args, want) in [
        (&["--tasks", "nope"][..], "unknown task 'nope'"),
        (&["--limit", "0"][..], "--limit must be at least 1"),
    ] {
        let o = recoup(&[&["eval", "--model", "smollm2-135m"][..], args].concat());
        assert!(!o.status.success());
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
}

fn kld(model: &str, reference_logits: &str) -> std::process::Output {
    recoup(&[
        "kld",
        "--model",
        model,
        "--reference",
        "smollm2-135m",
        "--text",
        "wiki-heldout",
        "--ctx",
        "128",
        "--max-windows",
        "3",
        "--reference-logits",
        reference_logits,
        "--json",
    ])
}

#[test]
fn kld_of_a_model_from_itself_is_zero_and_a_3bit_model_diverges() {
    let dir = tempfile::tempdir().unwrap();
    let logits = dir.path().join("ref.kld");
    let logits = logits.to_str().unwrap();
    let same = kld("smollm2-135m", logits);
    assert!(same.status.success(), "{}", stderr(&same));
    let s = json(&same);
    assert!(s["kld_mean"].as_f64().unwrap() < 1e-5, "{s}");
    assert_eq!(s["top1_agreement"], 1.0);
    assert_eq!(s["tokens_scored"], 3 * 127);
    let (ppl, ppl_ref) = (
        s["ppl"].as_f64().unwrap(),
        s["ppl_reference"].as_f64().unwrap(),
    );
    assert!((ppl / ppl_ref - 1.0).abs() < 1e-5, "{ppl} vs {ppl_ref}");
    // The reference perplexity is the one `ppl` measures on the same windows.
    let direct = ppl_with("smollm2-135m", "128", "3", &[], &[]);
    assert!(
        (ppl_ref / direct - 1.0).abs() < 1e-5,
        "{ppl_ref} vs {direct}"
    );

    let q3 = checkpoint(dir.path(), "rtn3", "3");
    let quant = kld(&q3, logits);
    assert!(quant.status.success(), "{}", stderr(&quant));
    assert!(
        stderr(&quant).contains("reusing reference log-probabilities"),
        "{}",
        stderr(&quant)
    );
    let q = json(&quant);
    assert!(q["kld_mean"].as_f64().unwrap() > 0.05, "{q}");
    assert!(q["kld_p99"].as_f64().unwrap() >= q["kld_median"].as_f64().unwrap());
    assert!(q["top1_agreement"].as_f64().unwrap() < 0.95, "{q}");
    assert!(q["ppl"].as_f64().unwrap() > q["ppl_reference"].as_f64().unwrap());
    assert_eq!(q["ppl_reference"], s["ppl_reference"]);

    // A path holding something else is never overwritten.
    let other = dir.path().join("weights.bin");
    std::fs::write(&other, b"not a reference file").unwrap();
    let o = kld("smollm2-135m", other.to_str().unwrap());
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is not a recoup KL reference file"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&other).unwrap(), b"not a reference file");
}
