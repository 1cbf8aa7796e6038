//! The f32 forward pass of the real SmolLM2-135M-Instruct (fetched on first use), checked
//! against an independent float64 numpy implementation (tools/fixtures/smollm2_logits.py),
//! against itself through the KV cache, and through a safetensors round trip.

use recoup_formats::DenseDtype;
use recoup_model::{KvCache, Loaded, load};
use std::path::PathBuf;
use std::sync::OnceLock;

#[derive(serde::Deserialize)]
struct Golden {
    tokens: Vec<u32>,
    stride: usize,
    logits_strided: Vec<Vec<f64>>,
    top5: Vec<Vec<u32>>,
}

fn smollm2_path() -> PathBuf {
    recoup_assets::resolve("smollm2-135m", recoup_assets::AssetKind::Model)
        .expect("SmolLM2 fetches")
}

fn smollm2() -> &'static Loaded {
    static MODEL: OnceLock<Loaded> = OnceLock::new();
    MODEL.get_or_init(|| load(&smollm2_path()).expect("SmolLM2 loads"))
}

fn golden() -> Golden {
    serde_json::from_str(include_str!("fixtures/smollm2_logits.json")).unwrap()
}

/// All logits of a full forward over `tokens` from an empty cache.
fn full_logits(loaded: &Loaded, tokens: &[u32]) -> Vec<f32> {
    let m = &loaded.model;
    let mut cache = KvCache::new(&m.config, tokens.len());
    let hidden = m.forward(tokens, &mut cache).unwrap();
    m.logits(&hidden, tokens.len())
}

#[test]
fn logits_match_independent_implementation() {
    let g = golden();
    let loaded = smollm2();
    let vocab = loaded.model.config.vocab_size;
    let logits = full_logits(loaded, &g.tokens);
    for (pos, (want, top5)) in g.logits_strided.iter().zip(&g.top5).enumerate() {
        let row = &logits[pos * vocab..(pos + 1) * vocab];
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = want
            .iter()
            .enumerate()
            .map(|(i, &w)| (row[i * g.stride] as f64 - w).abs())
            .fold(0f64, f64::max);
        assert!(
            worst <= 1e-3 * scale,
            "position {pos}: max |Δlogit| {worst} exceeds 1e-3 × {scale}"
        );
        let argmax = recoup_model::sampling::argmax(row);
        assert_eq!(argmax, top5[0], "position {pos}: top-1");
    }
}

#[test]
fn kv_cache_decode_equals_full_recompute() {
    let g = golden();
    let loaded = smollm2();
    let m = &loaded.model;
    let vocab = m.config.vocab_size;
    let full = full_logits(loaded, &g.tokens);
    // Prefill part of the prompt, then decode the rest one token at a time.
    let split = 5;
    let mut cache = KvCache::new(&m.config, g.tokens.len());
    m.forward(&g.tokens[..split], &mut cache).unwrap();
    for (pos, &tok) in g.tokens.iter().enumerate().skip(split) {
        let hidden = m.forward(&[tok], &mut cache).unwrap();
        let step = m.logits(&hidden, 1);
        let want = &full[pos * vocab..(pos + 1) * vocab];
        let worst = step
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-3,
            "position {pos}: decode differs from recompute by {worst}"
        );
    }
    assert_eq!(cache.len(), g.tokens.len());
}

/// Exports SmolLM2 into a fresh directory; returns it with the export's path.
fn export(dtype: DenseDtype, max_shard_bytes: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let opened = recoup_model::load::open(&smollm2_path()).unwrap();
    let out = dir.path().join("smollm2-hf");
    recoup_model::export::export_hf(&opened, &out, dtype, max_shard_bytes, &|| {}).unwrap();
    (dir, out)
}

#[test]
fn safetensors_export_reloads_to_identical_logits() {
    let g = golden();
    // A small shard limit forces the sharded layout with an index.
    let (_dir, out) = export(DenseDtype::F32, 64 << 20);
    assert!(
        out.join("model.safetensors.index.json").exists(),
        "expected shards"
    );
    assert!(out.join("tokenizer.json").exists() && out.join("config.json").exists());
    let reloaded = load(&out).unwrap();
    assert_eq!(reloaded.format, "safetensors");
    assert_eq!(
        full_logits(&reloaded, &g.tokens),
        full_logits(smollm2(), &g.tokens)
    );
    let text = "Gravity is 9.81 m/s² — «naïve» café, 12345 tokens!\n\tdef f(x): return x**2";
    let gguf_tk = &smollm2().tokenizer;
    assert_eq!(
        reloaded.tokenizer.encode(text, false).unwrap(),
        gguf_tk.encode(text, false).unwrap()
    );
    assert_eq!(
        (reloaded.tokenizer.bos, reloaded.tokenizer.eos),
        (gguf_tk.bos, gguf_tk.eos)
    );
    assert_eq!(reloaded.tokenizer.chat_template, gguf_tk.chat_template);
}

#[test]
fn bf16_export_stays_close() {
    let g = golden();
    let (_dir, out) = export(DenseDtype::BF16, usize::MAX);
    assert!(
        out.join("model.safetensors").exists(),
        "one file when under the shard limit"
    );
    let reloaded = load(&out).unwrap();
    let (a, b) = (
        full_logits(&reloaded, &g.tokens),
        full_logits(smollm2(), &g.tokens),
    );
    let vocab = smollm2().model.config.vocab_size;
    let last = g.tokens.len() - 1;
    assert_eq!(
        recoup_model::sampling::argmax(&a[last * vocab..]),
        recoup_model::sampling::argmax(&b[last * vocab..])
    );
}
