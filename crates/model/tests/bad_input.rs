//! Broken model directories give errors that name the file and the problem, never a panic.

use recoup_formats::hf::{HfDir, write_hf_dir};
use recoup_formats::{DenseDtype, Tensor};
use recoup_model::{Model, ModelConfig};
use serde_json::json;
use std::path::Path;

fn tiny_config() -> serde_json::Value {
    json!({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 16, "intermediate_size": 24,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 32, "rope_theta": 10000.0, "tie_word_embeddings": false})
}

/// Tensor shapes a tiny Qwen2 needs, by canonical name.
fn tiny_shapes() -> Vec<(String, Vec<usize>)> {
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![32, 16])];
    for l in 0..2 {
        let p = |m: &str| format!("model.layers.{l}.{m}");
        v.push((p("input_layernorm.weight"), vec![16]));
        for (m, out) in [("q_proj", 16), ("k_proj", 8), ("v_proj", 8)] {
            v.push((p(&format!("self_attn.{m}.weight")), vec![out, 16]));
            v.push((p(&format!("self_attn.{m}.bias")), vec![out]));
        }
        v.push((p("self_attn.o_proj.weight"), vec![16, 16]));
        v.push((p("post_attention_layernorm.weight"), vec![16]));
        v.push((p("mlp.gate_proj.weight"), vec![24, 16]));
        v.push((p("mlp.up_proj.weight"), vec![24, 16]));
        v.push((p("mlp.down_proj.weight"), vec![16, 24]));
    }
    v.push(("model.norm.weight".to_string(), vec![16]));
    v.push(("lm_head.weight".to_string(), vec![32, 16]));
    v
}

fn write_tiny(dir: &Path, shapes: &[(String, Vec<usize>)]) {
    let names: Vec<String> = shapes.iter().map(|(n, _)| n.clone()).collect();
    let load = |name: &str| {
        let shape = shapes.iter().find(|(n, _)| n == name).unwrap().1.clone();
        let n: usize = shape.iter().product();
        // Deterministic, non-zero, varied values.
        let data = (0..n)
            .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 200.0)
            .collect();
        Ok(Tensor { shape, data })
    };
    write_hf_dir(
        dir,
        &tiny_config(),
        &names,
        &load,
        DenseDtype::F32,
        usize::MAX,
        &[],
    )
    .unwrap();
}

fn load_err(dir: &Path) -> String {
    let hf = match HfDir::open(dir) {
        Ok(hf) => hf,
        Err(e) => return format!("{e:#}"),
    };
    let config = ModelConfig::from_hf(&hf.config, dir).unwrap();
    match Model::from_source(config, &hf) {
        Ok(_) => panic!("broken model in {} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn tiny_random_model_loads_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny");
    write_tiny(&path, &tiny_shapes());
    let hf = HfDir::open(&path).unwrap();
    let model = Model::from_source(ModelConfig::from_hf(&hf.config, &path).unwrap(), &hf).unwrap();
    let mut cache = recoup_model::KvCache::new(&model.config, 8);
    let hidden = model.forward(&[1, 5, 9], &mut cache).unwrap();
    let logits = model.logits(&hidden, 3);
    assert_eq!(logits.len(), 3 * 32);
    assert!(logits.iter().all(|v| v.is_finite()) && logits.iter().any(|&v| v != 0.0));
    let err = model.forward(&[40], &mut cache).unwrap_err().to_string();
    assert!(err.contains("token id 40"), "{err}");
}

#[test]
fn mismatched_shape_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny");
    let mut shapes = tiny_shapes();
    shapes
        .iter_mut()
        .find(|(n, _)| n.ends_with("1.mlp.up_proj.weight"))
        .unwrap()
        .1 = vec![23, 16];
    write_tiny(&path, &shapes);
    let err = load_err(&path);
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight")
            && err.contains("[23, 16]")
            && err.contains("tiny"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny");
    let shapes: Vec<_> = tiny_shapes()
        .into_iter()
        .filter(|(n, _)| n != "model.norm.weight")
        .collect();
    write_tiny(&path, &shapes);
    let err = load_err(&path);
    assert!(err.contains("model.norm.weight"), "{err}");
}

#[test]
fn truncated_safetensors_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny");
    write_tiny(&path, &tiny_shapes());
    let file = path.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 10]).unwrap();
    let err = load_err(&path);
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );
}

#[test]
fn directory_without_weights_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), tiny_config().to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");
}
