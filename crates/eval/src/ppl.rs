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

/// The running sums of a perplexity pass after its first `windows` windows: what a pass
/// reports after each window, and what a resumed pass starts from (continuing the same sums
/// in the same order, so the result is bit for bit an uninterrupted pass's).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Progress {
    pub windows: usize,
    /// Σ nll and Σ nll² over the scored tokens so far.
    pub sum: f64,
    pub sum_sq: f64,
    pub count: usize,
}

impl Progress {
    /// Perplexity of the tokens scored so far.
    pub fn ppl(&self) -> f64 {
        (self.sum / self.count as f64).exp()
    }
}

/// How many logit rows are materialized at once: bounds memory for large vocabularies.
const LOGIT_ROWS: usize = 128;

/// Perplexity of `model` over `tokens` (already including a leading BOS where the protocol
/// asks for one), continuing `from` (`Progress::default()` for a fresh pass). `on_window` is
/// called after each window with the progress and the number of windows.
#[allow(clippy::too_many_arguments)]
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    bos: Option<u32>,
    ctx: usize,
    protocol: Protocol,
    max_windows: Option<usize>,
    from: Progress,
    on_window: impl FnMut(&Progress, usize),
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
        from,
        on_window,
        &mut score,
    )
}

/// Scores one window: the negative log-likelihood of the token after each scored position.
pub type WindowScorer<'a> = dyn FnMut(&[u32], &[usize]) -> Result<Vec<f64>> + 'a;

/// [`perplexity`] for any way of scoring a window: `score(window, positions)` returns the
/// negative log-likelihood of the token after each of the (consecutive) scored positions.
#[allow(clippy::too_many_arguments)]
pub fn perplexity_by_windows(
    tokens: &[u32],
    bos: Option<u32>,
    ctx: usize,
    protocol: Protocol,
    max_windows: Option<usize>,
    from: Progress,
    mut on_window: impl FnMut(&Progress, usize),
    score: &mut WindowScorer,
) -> Result<PplResult> {
    let windows = Protocol::window_count(tokens.len(), ctx, max_windows)?;
    if from.windows > windows {
        bail!(
            "the saved progress covers {} windows, more than the {windows} this pass scores",
            from.windows
        );
    }
    let positions: Vec<usize> = protocol.scored_positions(ctx).collect();
    let mut p = from;
    for w in from.windows..windows {
        let window = protocol.window(tokens, w, ctx, bos);
        for nll in score(&window, &positions)? {
            p.sum += nll;
            p.sum_sq += nll * nll;
            p.count += 1;
        }
        p.windows = w + 1;
        on_window(&p, windows);
    }
    if p.count == 0 {
        bail!("no token was scored");
    }
    let nll = p.sum / p.count as f64;
    let var = (p.sum_sq / p.count as f64 - nll * nll).max(0.0);
    let ppl = nll.exp();
    Ok(PplResult {
        ppl,
        nll,
        ppl_stderr: (var / (p.count as f64 - 1.0).max(1.0)).sqrt() * ppl,
        tokens_scored: p.count,
        windows,
        ctx,
        protocol,
        text_tokens: tokens.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scorer whose NLLs depend on the window's tokens, failing at window `fail_at`.
    fn scorer(fail_at: usize) -> impl FnMut(&[u32], &[usize]) -> Result<Vec<f64>> {
        let mut seen = 0;
        move |window: &[u32], positions: &[usize]| {
            seen += 1;
            if seen == fail_at {
                bail!("interrupted");
            }
            Ok(positions
                .iter()
                .map(|&p| 0.1 + (window[p + 1] % 97) as f64 / 13.0)
                .collect())
        }
    }

    #[test]
    fn a_pass_resumed_from_its_progress_equals_an_uninterrupted_one() {
        let tokens: Vec<u32> = (0..5000u32)
            .map(|i| i.wrapping_mul(2654435761) >> 7)
            .collect();
        for protocol in [Protocol::Gptq, Protocol::Llamacpp] {
            let run = |from: Progress, fail_at: usize, saved: &mut Progress| {
                perplexity_by_windows(
                    &tokens,
                    None,
                    256,
                    protocol,
                    Some(12),
                    from,
                    |p, _| *saved = *p,
                    &mut scorer(fail_at),
                )
            };
            let mut last = Progress::default();
            let whole = run(Progress::default(), usize::MAX, &mut last).unwrap();
            assert_eq!(last.windows, 12);
            // Interrupted during its 6th window: the progress holds 5.
            let mut saved = Progress::default();
            assert!(run(Progress::default(), 6, &mut saved).is_err());
            assert_eq!(saved.windows, 5);
            let resumed = run(saved, usize::MAX, &mut last).unwrap();
            assert_eq!(resumed.ppl.to_bits(), whole.ppl.to_bits());
            assert_eq!(resumed.ppl_stderr.to_bits(), whole.ppl_stderr.to_bits());
            assert_eq!(resumed.tokens_scored, whole.tokens_scored);
            // A finished pass resumes to its result without scoring anything.
            let again = run(last, 1, &mut saved).unwrap();
            assert_eq!(again.ppl.to_bits(), whole.ppl.to_bits());
            // Progress beyond this pass's windows is refused.
            let beyond = Progress {
                windows: 13,
                ..last
            };
            let err = run(beyond, usize::MAX, &mut saved).unwrap_err();
            assert!(err.to_string().contains("covers 13 windows"), "{err}");
        }
    }
}
