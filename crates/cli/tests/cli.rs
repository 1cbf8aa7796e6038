//! The binary end to end on the real default model: results, determinism, and clear errors.

mod common;

use common::{recoup, stderr};
use std::process::Output;

#[test]
fn gptq_protocol_is_deterministic_and_reports_its_protocol() {
    let args = [
        "ppl",
        "--model",
        "smollm2-135m",
        "--text",
        "wiki-heldout",
        "--ctx",
        "2048",
        "--max-windows",
        "1",
        "--json",
    ];
    let (a, b) = (recoup(&args), recoup(&args));
    assert!(a.status.success(), "{}", stderr(&a));
    let parse = |o: &Output| -> serde_json::Value {
        serde_json::from_slice(&o.stdout).expect("one JSON object")
    };
    let (ja, jb) = (parse(&a), parse(&b));
    for key in [
        "ppl",
        "nll",
        "tokens_scored",
        "windows",
        "ctx",
        "protocol",
        "text_sha256",
    ] {
        assert!(ja.get(key).is_some(), "JSON lacks {key}: {ja}");
    }
    assert_eq!(ja["ppl"], jb["ppl"], "two runs differ");
    assert_eq!(ja["tokens_scored"], 2047);
    assert_eq!(ja["protocol"], "gptq");
    // Evaluation measures the weights: the exact prefill unless asked otherwise.
    assert_eq!(ja["prefill"], "exact");
    assert_eq!(
        ja["text_sha256"],
        "6d62ef2fdd8a9e0d637bd82ae2f529a78e82a8cc7ea4aaa0baeee9c97b2caad8"
    );
    let ppl = ja["ppl"].as_f64().unwrap();
    assert!(
        (5.0..30.0).contains(&ppl),
        "implausible SmolLM2 perplexity {ppl}"
    );
}

#[test]
fn run_generates_greedily() {
    let o = recoup(&[
        "run",
        "--model",
        "smollm2-135m",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "6",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.starts_with("The capital of France is") && text.contains("Paris"),
        "{text}"
    );
    assert!(stderr(&o).contains("tokens/s"), "{}", stderr(&o));
}

#[test]
fn chat_template_is_applied() {
    let o = recoup(&[
        "run",
        "--model",
        "smollm2-135m",
        "--prompt",
        "What is 2+2?",
        "--chat",
        "--max-tokens",
        "12",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).trim().is_empty());
}

#[test]
fn text_shorter_than_a_window_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "Only a few words here.").unwrap();
    let o = recoup(&[
        "ppl",
        "--model",
        "smollm2-135m",
        "--text",
        short.to_str().unwrap(),
        "--ctx",
        "512",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("fewer than one window") && err.contains("short.txt"),
        "{err}"
    );
}

#[test]
fn bad_model_arguments_are_clear_errors() {
    let o = recoup(&["ppl", "--model", "no-such-model", "--text", "wiki-heldout"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("neither an existing path nor a known"),
        "{}",
        stderr(&o)
    );

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"definitely not a model").unwrap();
    let o = recoup(&["run", "--model", junk.to_str().unwrap(), "--prompt", "x"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("junk.gguf") && stderr(&o).contains("not a GGUF file"),
        "{}",
        stderr(&o)
    );

    let o = recoup(&[
        "run",
        "--model",
        "smollm2-135m",
        "--prompt",
        "x",
        "--top-p",
        "1.5",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--top-p"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
}

#[test]
fn convert_then_ppl_on_the_export_matches() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let o = recoup(&[
        "convert",
        "--model",
        "smollm2-135m",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ppl = |model: &str| {
        let o = recoup(&[
            "ppl",
            "--model",
            model,
            "--text",
            "c4",
            "--ctx",
            "256",
            "--max-windows",
            "2",
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["ppl"].clone()
    };
    assert_eq!(ppl(out.to_str().unwrap()), ppl("smollm2-135m"));
    // No temporary directory is left beside the output.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != "hf")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn bench_reports_speed_and_bandwidth() {
    let o = recoup(&[
        "bench",
        "--model",
        "smollm2-135m",
        "--pp",
        "32",
        "--tg",
        "4",
        "--reps",
        "1",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in [
        "pp_tokens_per_s",
        "tg_tokens_per_s",
        "weight_bytes_per_token",
        "achieved_gbps",
        "stream_gbps",
        "bits_per_weight",
    ] {
        assert!(
            v[key].as_f64().is_some_and(|x| x > 0.0),
            "{key} missing or not positive: {v}"
        );
    }
    // f32 weights: exactly 32 bits per weight in the blocks.
    assert_eq!(v["bits_per_weight"].as_f64().unwrap(), 32.0);
    // Bench measures the fast prefill unless asked for the exact one.
    assert_eq!(v["prefill"], "integer");
    let o = recoup(&["bench", "--model", "smollm2-135m", "--pp", "0", "--tg", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("nothing to measure"));
}

#[test]
fn bench_measures_random_weights_in_a_configs_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128,
        "tie_word_embeddings": true
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let d = dir.path().to_str().unwrap();
    let bench = |extra: &[&str]| {
        let args = [
            "bench", "--model", d, "--pp", "16", "--tg", "4", "--reps", "1", "--json",
        ];
        recoup(&[&args[..], extra].concat())
    };
    let o = bench(&["--random-weights", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // 3-bit codes plus an f16 scale and a u8 zero per group of 128.
    let bpw = v["bits_per_weight"].as_f64().unwrap();
    assert!((bpw - (3.0 + 24.0 / 128.0)).abs() < 1e-9, "{v}");
    assert!(v["tg_tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(stderr(&o).contains("speed only"), "{}", stderr(&o));
    for (flags, want) in [
        (
            vec!["--random-weights", "5"],
            "5-bit grids are not supported",
        ),
        (vec!["--random-weights", "9"], "--random-weights"),
    ] {
        let o = bench(&flags);
        assert!(
            !o.status.success() && stderr(&o).contains(want),
            "{}",
            stderr(&o)
        );
    }
    let o = recoup(&[
        "bench",
        "--model",
        "/nonexistent",
        "--random-weights",
        "3",
        "--tg",
        "4",
    ]);
    assert!(
        stderr(&o).contains("cannot read /nonexistent"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_killed_ppl_with_a_state_file_continues_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("ppl.state");
    let state_arg = state.to_str().unwrap();
    let args = |windows: &'static str| {
        vec![
            "ppl",
            "--model",
            "smollm2-135m",
            "--text",
            "wiki-heldout",
            "--ctx",
            "512",
            "--max-windows",
            windows,
            "--json",
        ]
    };
    let parse = |o: &Output| -> serde_json::Value {
        assert!(o.status.success(), "{}", stderr(o));
        serde_json::from_slice(&o.stdout).expect("one JSON object")
    };
    let whole = parse(&recoup(&args("6")));

    // Killed once the first window's state is on disk.
    let mut with_state = args("6");
    with_state.extend(["--state", state_arg]);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_recoup"))
        .args(&with_state)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    while !state.exists() {
        // A run that exits before saving anything has failed: say so rather than wait.
        if let Some(status) = child.try_wait().unwrap() {
            panic!("ppl --state exited ({status}) before saving its state");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert!(saved["windows"].as_u64().unwrap() >= 1, "{saved}");

    let resumed = recoup(&with_state);
    let v = parse(&resumed);
    assert_eq!(v["ppl"], whole["ppl"], "{}", stderr(&resumed));
    assert_eq!(v["tokens_scored"], whole["tokens_scored"]);

    // Other settings are refused, naming the file; so is a file that is not a state.
    let mut other = args("6");
    other.extend(["--protocol", "llamacpp", "--state", state_arg]);
    let o = recoup(&other);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("other settings") && stderr(&o).contains("ppl.state"),
        "{}",
        stderr(&o)
    );
    std::fs::write(&state, b"{\"truncated\": ").unwrap();
    let o = recoup(&with_state);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not a ppl state file"),
        "{}",
        stderr(&o)
    );
}
