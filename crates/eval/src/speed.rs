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

/// Tokens per generated block of the paired measurement: short enough that both variants
/// see the same machine state, long enough that switching costs nothing.
const PAIRED_BLOCK: usize = 8;

/// Decode speed of two variants of one model measured in the same runs: `tg` greedy steps
/// in blocks of 8 tokens that alternate between `switch(true)` and `switch(false)`, so
/// noise from other load on the machine falls on both alike (and both see the same range
/// of positions). Returns tokens/s with the switch on and off, medians over `reps` runs.
pub fn paired_decode_tokens_per_s(
    model: &Model,
    tg: usize,
    reps: usize,
    switch: &dyn Fn(bool),
) -> Result<(f64, f64)> {
    let mut cache = KvCache::new(&model.config, tg);
    let (mut on_runs, mut off_runs) = (Vec::new(), Vec::new());
    for rep in 0..reps.max(1) {
        cache.clear();
        let mut next = tokens(1, model.config.vocab_size)[0];
        let (mut secs, mut steps) = ([0f64; 2], [0usize; 2]);
        for step in 0..tg {
            // Alternate which variant goes first from one repetition to the next.
            let on = (step / PAIRED_BLOCK + rep).is_multiple_of(2);
            switch(on);
            let t = Instant::now();
            let hidden = model.forward(&[next], &mut cache)?;
            next = argmax(&model.logits(&hidden, 1));
            secs[usize::from(on)] += t.elapsed().as_secs_f64();
            steps[usize::from(on)] += 1;
        }
        on_runs.push(steps[1] as f64 / secs[1]);
        off_runs.push(steps[0] as f64 / secs[0]);
    }
    switch(true);
    Ok((median(on_runs), median(off_runs)))
}
