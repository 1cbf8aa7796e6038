//! Prompt-processing and generation speed, as llama-bench measures them: `pp` tokens in one
//! batch from an empty cache (logits of the last only), and `tg` tokens decoded one at a time
//! from an empty cache. Each figure is the median over repetitions.

use anyhow::Result;
use recoup_model::sampling::argmax;
use recoup_model::{KvCache, Model};
use std::time::Instant;

/// Deterministic, varied token ids below the vocabulary size (llama-bench uses random ids).
fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Tokens per second of a `pp`-token prefill.
pub fn prefill_tokens_per_s(model: &Model, pp: usize, reps: usize) -> Result<f64> {
    let toks = tokens(pp, model.config.vocab_size);
    let d = model.config.hidden_size;
    let mut cache = KvCache::new(&model.config, pp);
    let mut times = Vec::new();
    for _ in 0..reps.max(1) {
        cache.clear();
        let t = Instant::now();
        let hidden = model.forward(&toks, &mut cache)?;
        std::hint::black_box(model.logits(&hidden[(pp - 1) * d..], 1));
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(pp as f64 / median(times))
}

/// Tokens per second of `tg` greedy decode steps.
pub fn decode_tokens_per_s(model: &Model, tg: usize, reps: usize) -> Result<f64> {
    let mut cache = KvCache::new(&model.config, tg);
    let mut times = Vec::new();
    for _ in 0..reps.max(1) {
        cache.clear();
        let mut next = tokens(1, model.config.vocab_size)[0];
        let t = Instant::now();
        for _ in 0..tg {
            let hidden = model.forward(&[next], &mut cache)?;
            next = argmax(&model.logits(&hidden, 1));
        }
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(tg as f64 / median(times))
}
