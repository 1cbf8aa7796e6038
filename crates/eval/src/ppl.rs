//! Token-level perplexity under the two protocols of the field.
//!
//! * `gptq`: the whole text tokenized once (BOS first only if the model adds one), cut into
//!   non-overlapping windows of `ctx` tokens (tail dropped); in every window each token after
//!   the first is scored, given all before it in the window. This is the GPTQ/FBQuant
//!   evaluation loop (mean NLL over `ctx − 1` predictions per window).
//! * `llamacpp`: llama.cpp's `llama-perplexity`: the same windows, the first token of each
//!   replaced by BOS when the model adds BOS, and only the second half scored: the logits at
//!   positions `ctx/2 … ctx−2` predict tokens `ctx/2+1 … ctx−1`.

use anyhow::{Result, bail};
use rayon::prelude::*;
use recoup_kernels::ops::log_prob;
use recoup_model::{KvCache, Model};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Gptq,
    Llamacpp,
}

impl Protocol {
    /// Positions whose logits are scored in a window of `ctx` (each predicts the next token).
    pub fn scored_positions(self, ctx: usize) -> std::ops::Range<usize> {
        match self {
            Protocol::Gptq => 0..ctx - 1,
            Protocol::Llamacpp => ctx / 2..ctx - 1,
        }
    }

    /// Window `w` of `ctx` tokens, its first replaced by BOS where the protocol asks.
    pub fn window(self, tokens: &[u32], w: usize, ctx: usize, bos: Option<u32>) -> Vec<u32> {
        let mut window = tokens[w * ctx..(w + 1) * ctx].to_vec();
        if self == Protocol::Llamacpp
            && let Some(b) = bos
        {
            window[0] = b;
        }
        window
    }

    /// How many windows of `ctx` to score: all of `tokens`, or the first `max`.
    pub fn window_count(tokens: usize, ctx: usize, max: Option<usize>) -> Result<usize> {
        if ctx < 4 {
            bail!("--ctx {ctx} is too small (at least 4)");
        }
        let available = tokens / ctx;
        if available == 0 {
            bail!("the text has {tokens} tokens, fewer than one window of --ctx {ctx}");
        }
        Ok(max.map_or(available, |m| m.min(available)))
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PplResult {
    pub ppl: f64,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll: f64,
    /// Standard error of `ppl` (delta method over per-token NLLs, as llama.cpp reports it).
    pub ppl_stderr: f64,
    pub tokens_scored: usize,
    pub windows: usize,
    pub ctx: usize,
    pub protocol: Protocol,
    pub text_tokens: usize,
}

/// How many logit rows are materialized at once: bounds memory for large vocabularies.
const LOGIT_ROWS: usize = 128;

/// Perplexity of `model` over `tokens` (already including a leading BOS where the protocol
/// asks for one). `on_window` is called after each window with (done, total, running ppl).
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    bos: Option<u32>,
    ctx: usize,
    protocol: Protocol,
    max_windows: Option<usize>,
    on_window: impl FnMut(usize, usize, f64),
) -> Result<PplResult> {
    let vocab = model.config.vocab_size;
    let d = model.config.hidden_size;
    let mut cache = KvCache::new(&model.config, ctx);
    let mut score = |window: &[u32], positions: &[usize]| -> Result<Vec<f64>> {
        cache.clear();
        let hidden = model.forward(window, &mut cache)?;
        let mut nlls = Vec::with_capacity(positions.len());
        for chunk in positions.chunks(LOGIT_ROWS) {
            let rows = &hidden[chunk[0] * d..(chunk[chunk.len() - 1] + 1) * d];
            let logits = model.logits(rows, chunk.len());
            nlls.par_extend(chunk.par_iter().enumerate().map(|(i, &pos)| {
                -log_prob(
                    &logits[i * vocab..(i + 1) * vocab],
                    window[pos + 1] as usize,
                )
            }));
        }
        Ok(nlls)
    };
    perplexity_by_windows(
        tokens,
        bos,
        ctx,
        protocol,
        max_windows,
        on_window,
        &mut score,
    )
}

/// Scores one window: the negative log-likelihood of the token after each scored position.
pub type WindowScorer<'a> = dyn FnMut(&[u32], &[usize]) -> Result<Vec<f64>> + 'a;

/// [`perplexity`] for any way of scoring a window: `score(window, positions)` returns the
/// negative log-likelihood of the token after each of the (consecutive) scored positions.
pub fn perplexity_by_windows(
    tokens: &[u32],
    bos: Option<u32>,
    ctx: usize,
    protocol: Protocol,
    max_windows: Option<usize>,
    mut on_window: impl FnMut(usize, usize, f64),
    score: &mut WindowScorer,
) -> Result<PplResult> {
    let windows = Protocol::window_count(tokens.len(), ctx, max_windows)?;
    let positions: Vec<usize> = protocol.scored_positions(ctx).collect();
    let (mut sum, mut sum_sq, mut count) = (0f64, 0f64, 0usize);
    for w in 0..windows {
        let window = protocol.window(tokens, w, ctx, bos);
        for nll in score(&window, &positions)? {
            sum += nll;
            sum_sq += nll * nll;
            count += 1;
        }
        on_window(w + 1, windows, (sum / count as f64).exp());
    }
    let nll = sum / count as f64;
    let var = (sum_sq / count as f64 - nll * nll).max(0.0);
    let ppl = nll.exp();
    Ok(PplResult {
        ppl,
        nll,
        ppl_stderr: (var / (count as f64 - 1.0).max(1.0)).sqrt() * ppl,
        tokens_scored: count,
        windows,
        ctx,
        protocol,
        text_tokens: tokens.len(),
    })
}
