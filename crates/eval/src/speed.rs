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

/// Two variants of one model's decode, measured in the same runs.
#[derive(Clone, Copy, Debug)]
pub struct PairedDecode {
    /// Tokens/s with the switch on and off, medians over the repetitions.
    pub on_tokens_per_s: f64,
    pub off_tokens_per_s: f64,
    /// The median over adjacent (on, off) token pairs of on-time / off-time, minus one:
    /// robust to bursts of load from other tenants, which hit a few pairs, not the median.
    pub slowdown: f64,
    /// The quartiles of that ratio minus one: how much the pairs disagree.
    pub slowdown_quartiles: (f64, f64),
    pub pairs: usize,
}

/// Decode speed of two variants of one model measured in the same runs: `tg` greedy steps
/// alternating token by token between `switch(true)` and `switch(false)`, so noise from
/// other load on the machine falls on both alike (and both see the same range of
/// positions; which goes first alternates from one repetition to the next). Adjacent steps
/// see the same machine state (other tenants' load on a VM comes in bursts longer than a
/// step), switching is one atomic store, and single tokens give 8× more pairs than blocks
/// of 8 did: four runs of one build on the 2-vCPU VM spanned 0.6 points (about three before).
pub fn paired_decode_tokens_per_s(
    model: &Model,
    tg: usize,
    reps: usize,
    switch: &dyn Fn(bool),
) -> Result<PairedDecode> {
    let mut cache = KvCache::new(&model.config, tg);
    let mut step = |restart: bool, token: u32| -> Result<u32> {
        if restart {
            cache.clear();
        }
        let hidden = model.forward(&[token], &mut cache)?;
        Ok(argmax(&model.logits(&hidden, 1)))
    };
    paired_decode(
        model.config.vocab_size,
        tg,
        reps,
        &mut |on| switch(on),
        &mut step,
    )
}

/// [`paired_decode_tokens_per_s`] for any decoder: `step(restart, token)` runs one token
/// (after emptying the cache when `restart`) and returns the next.
pub fn paired_decode(
    vocab: usize,
    tg: usize,
    reps: usize,
    switch: &mut dyn FnMut(bool),
    step: &mut dyn FnMut(bool, u32) -> Result<u32>,
) -> Result<PairedDecode> {
    let (mut on_runs, mut off_runs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps.max(1) {
        let mut next = tokens(1, vocab)[0];
        // Seconds of each step, and whether it ran with the switch on.
        let mut steps: Vec<(f64, bool)> = Vec::with_capacity(tg);
        for i in 0..tg {
            let on = (i + rep).is_multiple_of(2);
            switch(on);
            let t = Instant::now();
            next = step(i == 0, next)?;
            steps.push((t.elapsed().as_secs_f64(), on));
        }
        let rate = |on: bool| -> f64 {
            let mine = steps.iter().filter(|s| s.1 == on);
            let (secs, n) = mine.fold((0.0, 0.0), |(secs, n), s| (secs + s.0, n + 1.0));
            n / secs
        };
        on_runs.push(rate(true));
        off_runs.push(rate(false));
        // Whole pairs only (an odd last step has no partner).
        for pair in steps.chunks_exact(2) {
            let (on, off) = if pair[0].1 {
                (pair[0], pair[1])
            } else {
                (pair[1], pair[0])
            };
            ratios.push(on.0 / off.0);
        }
    }
    switch(true);
    if ratios.is_empty() {
        anyhow::bail!("a paired measurement needs at least 2 tokens");
    }
    ratios.sort_by(f64::total_cmp);
    let at = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize] - 1.0;
    Ok(PairedDecode {
        on_tokens_per_s: median(on_runs),
        off_tokens_per_s: median(off_runs),
        slowdown: at(0.5),
        slowdown_quartiles: (at(0.25), at(0.75)),
        pairs: ratios.len(),
    })
}
