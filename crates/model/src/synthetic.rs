//! A real architecture's shapes with random packed weights, for measuring speed where the
//! model itself is not at hand (a GPU host that cannot fetch it, a model too large to
//! download for a quick estimate): decode time depends on the shapes and the format, not on
//! the values. Never for quality: the outputs are meaningless.

use crate::config::{Arch, ModelConfig};
use crate::linear::{Linear, PackedOp};
use crate::llama::{Block, Model};
use anyhow::Result;
use half::f16;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;
use recoup_formats::packed::{GridSpec, PackedLinear, PackedMatrix};
use std::sync::Arc;

/// A `[rows, cols]` matrix of random codes on `spec`'s grid, scaled so that a product with a
/// unit-RMS input has outputs of order one.
fn random_packed(spec: GridSpec, rows: usize, cols: usize, seed: u64) -> Result<Linear> {
    let mut rng = StdRng::seed_from_u64(seed);
    // Every byte pattern is a valid block of codes at every bit width.
    let codes: Vec<u8> = (0..rows * spec.row_bytes(cols))
        .map(|_| rng.random())
        .collect();
    let groups = rows * cols.div_ceil(spec.group);
    let step = 2.0 / (f32::from(spec.max_code()) * (cols as f32).sqrt());
    let scales = (0..groups)
        .map(|_| f16::from_f32(step * rng.random_range(0.5..1.5)))
        .collect();
    let zeros = if spec.sym {
        Vec::new()
    } else {
        (0..groups)
            .map(|_| rng.random_range(0..=spec.max_code()))
            .collect()
    };
    let m = PackedMatrix::new(spec, rows, cols, codes, scales, zeros, "random weights")?;
    Ok(Linear::new(
        Box::new(PackedOp::new(PackedLinear::plain(m))),
        None,
    ))
}

/// `config`'s model with every block linear packed on `spec` and an 8-bit head, all random
/// (seeded), unit norms, random embeddings; Qwen2's q/k/v biases are random too.
pub fn random_model(config: ModelConfig, spec: GridSpec, seed: u64) -> Result<Model> {
    let c = &config;
    let d = c.hidden_size;
    let head_spec = GridSpec::new(8, spec.group, false)?;
    let shapes = [
        (c.q_dim(), d),
        (c.kv_dim(), d),
        (c.kv_dim(), d),
        (d, c.q_dim()),
        (c.intermediate_size, d),
        (c.intermediate_size, d),
        (d, c.intermediate_size),
    ];
    let blocks = (0..c.n_layers)
        .into_par_iter()
        .map(|layer| {
            let mut l = shapes
                .iter()
                .enumerate()
                .map(|(i, &(rows, cols))| {
                    random_packed(spec, rows, cols, seed ^ (layer * 8 + i) as u64)
                })
                .collect::<Result<Vec<_>>>()?;
            if c.arch == Arch::Qwen2 {
                let mut rng = StdRng::seed_from_u64(seed ^ (layer * 8 + 7) as u64);
                for lin in &mut l[..3] {
                    let n = lin.out_features();
                    lin.bias = Some((0..n).map(|_| rng.random_range(-0.1..0.1)).collect());
                }
            }
            let mut it = l.into_iter();
            let mut next = || it.next().expect("seven shapes");
            Ok(Block {
                attn_norm: vec![1.0; d],
                q: next(),
                k: next(),
                v: next(),
                o: next(),
                ffn_norm: vec![1.0; d],
                gate: next(),
                up: next(),
                down: next(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let embed: Vec<f32> = (0..c.vocab_size * d)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let lm_head = random_packed(head_spec, c.vocab_size, d, seed ^ u64::MAX)?;
    Ok(Model::assemble(
        config,
        Arc::new(embed),
        blocks,
        vec![1.0; d],
        lm_head,
    ))
}

/// A small Qwen2 (q/k/v biases, grouped-query attention) for tests: `d` wide, `ff`
/// intermediate, 3 layers, heads of 64, a vocabulary of 500.
#[cfg(test)]
pub(crate) fn tiny_qwen2(d: usize, ff: usize) -> ModelConfig {
    let json = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": d, "intermediate_size": ff, "num_hidden_layers": 3,
        "num_attention_heads": d / 64, "num_key_value_heads": 2, "head_dim": 64,
        "vocab_size": 500, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "max_position_embeddings": 64, "tie_word_embeddings": false
    });
    ModelConfig::from_hf(&json, std::path::Path::new("test.json")).expect("a valid config")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_models_have_the_shapes_and_run() {
        let config = tiny_qwen2(128, 256);
        let spec = GridSpec::new(3, 64, false).unwrap();
        let model = random_model(config, spec, 1).unwrap();
        assert!((model.block_bits_per_weight() - spec_bits(spec)).abs() < 1e-9);
        let mut cache = crate::KvCache::new(&model.config, 8);
        let hidden = model.forward(&[1, 2, 3], &mut cache).unwrap();
        let logits = model.logits(&hidden[2 * 128..], 1);
        assert_eq!(logits.len(), 500);
        assert!(logits.iter().all(|v| v.is_finite()));
        // Random, not constant: the logits spread.
        let (lo, hi) = logits
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        assert!(hi - lo > 1e-3, "{lo}..{hi}");
        // Seeded: the same seed gives the same model.
        let again = random_model(model.config.clone(), spec, 1).unwrap();
        let mut cache = crate::KvCache::new(&again.config, 8);
        let h2 = again.forward(&[1, 2, 3], &mut cache).unwrap();
        assert_eq!(hidden, h2);
    }

    /// 3 bits plus an f16 scale and a u8 zero per group of 64.
    fn spec_bits(spec: GridSpec) -> f64 {
        spec.bits as f64 + 24.0 / spec.group as f64
    }
}
