//! KL-divergence of a model's next-token distribution from a reference model's, per scored
//! token, as llama.cpp's `llama-perplexity --kl-divergence` reports it: KL(P_ref ‖ Q) =
//! Σ_v p_ref(v) · (log p_ref(v) − log q(v)), its mean and quantiles, how often both models
//! rank the same token first, and both perplexities over the same tokens.
//!
//! The reference's log-probabilities are computed once and stored in a file, so many
//! quantized models are compared against one reference run. As llama.cpp's KL base file,
//! each scored position keeps all `vocab` log-probabilities in 16 bits, linear between the
//! row's minimum and 0 (error ≤ |min| / 131 070 nats); the decoded row is renormalized
//! before use, so the divergence of a model from its own file is ≥ 0 and ≈ 0.
//!
//! File layout (little-endian): `RCPKLD01`, u64 header length, the JSON [`Header`], then per
//! window its `ctx` token ids (u32) and per scored position a record: f32 minimum
//! log-probability, f32 step, f32 the observed next token's negative log-likelihood (exact,
//! for the reference's perplexity), u32 the reference's top token, `vocab` u16 codes.

use crate::ppl::Protocol;
use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use recoup_model::sampling::argmax;
use recoup_model::{KvCache, Model};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"RCPKLD01";
pub const FORMAT_VERSION: u32 = 1;

/// Logit rows materialized at once: bounds memory for large vocabularies.
const LOGIT_ROWS: usize = 64;

/// What a reference file was computed from; a later run reuses it only if it matches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub format_version: u32,
    /// The reference model as given, with its size and modification time.
    pub reference: String,
    pub text_sha256: String,
    pub ctx: usize,
    pub protocol: Protocol,
    pub windows: usize,
    pub vocab: usize,
}

impl Header {
    fn scored(&self) -> usize {
        self.protocol.scored_positions(self.ctx).len()
    }

    fn record_bytes(&self) -> usize {
        16 + 2 * self.vocab
    }

    fn window_bytes(&self) -> usize {
        4 * self.ctx + self.scored() * self.record_bytes()
    }
}

/// Log-probabilities of a row of logits, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row.iter().map(|&v| v as f64 - lse).collect()
}

/// One scored position of the reference, encoded.
fn encode_record(row: &[f32], next: u32, out: &mut Vec<u8>) {
    let lp = log_softmax(row);
    let min = lp.iter().copied().fold(0f64, f64::min);
    let step = (-min / 65535.0).max(f64::MIN_POSITIVE);
    out.extend_from_slice(&(min as f32).to_le_bytes());
    out.extend_from_slice(&(step as f32).to_le_bytes());
    out.extend_from_slice(&(-lp[next as usize] as f32).to_le_bytes());
    out.extend_from_slice(&argmax(row).to_le_bytes());
    for &v in &lp {
        let code = ((v - min) / step).round().clamp(0.0, 65535.0) as u16;
        out.extend_from_slice(&code.to_le_bytes());
    }
}

fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// A decoded reference record: normalized log-probabilities, observed-token NLL, top token.
struct Record {
    log_probs: Vec<f64>,
    nll: f64,
    top: u32,
}

fn decode_record(b: &[u8]) -> Record {
    let (min, step) = (f32_at(b, 0) as f64, f32_at(b, 4) as f64);
    let mut log_probs: Vec<f64> = b[16..]
        .chunks_exact(2)
        .map(|c| min + u16::from_le_bytes([c[0], c[1]]) as f64 * step)
        .collect();
    // Renormalize the rounded distribution, so that it is one.
    let lse = log_probs.iter().map(|v| v.exp()).sum::<f64>().ln();
    log_probs.iter_mut().for_each(|v| *v -= lse);
    Record {
        log_probs,
        nll: f32_at(b, 8) as f64,
        top: u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")),
    }
}

/// Runs the reference over the first `header.windows` windows of `tokens` and writes its
/// log-probabilities to `path` (atomically). `on_window(done, total)` after each.
pub fn write_reference(
    path: &Path,
    model: &Model,
    tokens: &[u32],
    bos: Option<u32>,
    header: &Header,
    mut on_window: impl FnMut(usize, usize),
) -> Result<()> {
    let (ctx, protocol) = (header.ctx, header.protocol);
    if header.vocab != model.config.vocab_size {
        bail!(
            "header vocabulary {} is not the model's {}",
            header.vocab,
            model.config.vocab_size
        );
    }
    if tokens.len() < header.windows * ctx {
        bail!(
            "{} tokens hold fewer than {} windows of {ctx}",
            tokens.len(),
            header.windows
        );
    }
    let vocab = header.vocab;
    let d = model.config.hidden_size;
    recoup_formats::atomic::write_file(path, |out| {
        let json = serde_json::to_vec(header)?;
        out.write_all(MAGIC)?;
        out.write_all(&(json.len() as u64).to_le_bytes())?;
        out.write_all(&json)?;
        let mut cache = KvCache::new(&model.config, ctx);
        for w in 0..header.windows {
            let window = protocol.window(tokens, w, ctx, bos);
            for t in &window {
                out.write_all(&t.to_le_bytes())?;
            }
            cache.clear();
            let hidden = model.forward(&window, &mut cache)?;
            let positions: Vec<usize> = protocol.scored_positions(ctx).collect();
            for chunk in positions.chunks(LOGIT_ROWS) {
                let rows = &hidden[chunk[0] * d..(chunk[chunk.len() - 1] + 1) * d];
                let logits = model.logits(rows, chunk.len());
                let records: Vec<Vec<u8>> = chunk
                    .par_iter()
                    .enumerate()
                    .map(|(i, &pos)| {
                        let mut rec = Vec::with_capacity(header.record_bytes());
                        encode_record(
                            &logits[i * vocab..(i + 1) * vocab],
                            window[pos + 1],
                            &mut rec,
                        );
                        rec
                    })
                    .collect();
                for rec in records {
                    out.write_all(&rec)?;
                }
            }
            on_window(w + 1, header.windows);
        }
        Ok(())
    })
}

/// Whether `path` starts as a reference file does (so it may be replaced by a new one).
pub fn is_reference_file(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == MAGIC
}

/// An open reference file, read window by window.
pub struct ReferenceFile {
    pub path: PathBuf,
    pub header: Header,
    reader: BufReader<File>,
}

impl ReferenceFile {
    /// Opens and checks a reference file: magic, header, and a size that holds every window.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let size = file.metadata()?.len();
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut magic = [0u8; 8];
        let mut len = [0u8; 8];
        reader
            .read_exact(&mut magic)
            .and_then(|_| reader.read_exact(&mut len))
            .with_context(|| format!("{}: truncated before its header", path.display()))?;
        if &magic != MAGIC {
            bail!("{} is not a recoup KL reference file", path.display());
        }
        let len = u64::from_le_bytes(len);
        if len > 1 << 20 || 16 + len > size {
            bail!("{}: header length {len} is corrupt", path.display());
        }
        let mut json = vec![0u8; len as usize];
        reader.read_exact(&mut json)?;
        let header: Header = serde_json::from_slice(&json)
            .with_context(|| format!("{}: unreadable header", path.display()))?;
        if header.format_version != FORMAT_VERSION {
            bail!(
                "{}: format version {} (this recoup reads {FORMAT_VERSION})",
                path.display(),
                header.format_version
            );
        }
        let expected = 16 + len + (header.windows * header.window_bytes()) as u64;
        if size != expected {
            bail!(
                "{}: {size} bytes, but its header describes {expected} (truncated or corrupt)",
                path.display()
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            header,
            reader,
        })
    }

    /// The next window: its tokens and its raw records.
    fn next_window(&mut self) -> Result<(Vec<u32>, Vec<u8>)> {
        let h = &self.header;
        let mut buf = vec![0u8; h.window_bytes()];
        self.reader
            .read_exact(&mut buf)
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        let records = buf.split_off(4 * h.ctx);
        let tokens = buf
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        Ok((tokens, records))
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct KldResult {
    pub kld_mean: f64,
    /// Standard error of `kld_mean`.
    pub kld_stderr: f64,
    pub kld_median: f64,
    pub kld_p90: f64,
    pub kld_p99: f64,
    pub kld_max: f64,
    /// Fraction of scored tokens where both models rank the same token first.
    pub top1_agreement: f64,
    pub ppl: f64,
    pub ppl_reference: f64,
    pub tokens_scored: usize,
    pub windows: usize,
    pub ctx: usize,
    pub protocol: Protocol,
}

/// Value at quantile `q` of sorted values (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Compares `model` with the reference over the file's first `windows` windows, checking
/// that `tokens` (the text as this model tokenizes it) are the reference's.
pub fn kl_divergence(
    model: &Model,
    reference: &mut ReferenceFile,
    tokens: &[u32],
    bos: Option<u32>,
    windows: usize,
    mut on_window: impl FnMut(usize, usize, f64),
) -> Result<KldResult> {
    let h = reference.header.clone();
    if h.vocab != model.config.vocab_size {
        bail!(
            "{}: reference vocabulary {} differs from the model's {}",
            reference.path.display(),
            h.vocab,
            model.config.vocab_size
        );
    }
    if windows > h.windows {
        bail!(
            "{}: holds {} windows, {windows} asked",
            reference.path.display(),
            h.windows
        );
    }
    let (ctx, vocab, d) = (h.ctx, h.vocab, model.config.hidden_size);
    let rec = h.record_bytes();
    let mut cache = KvCache::new(&model.config, ctx);
    let mut klds = Vec::new();
    let (mut same_top, mut nll, mut nll_ref) = (0usize, 0f64, 0f64);
    for w in 0..windows {
        let (window, records) = reference.next_window()?;
        if window != h.protocol.window(tokens, w, ctx, bos) {
            bail!(
                "{}: window {w}'s tokens differ from this model's tokenization of the text (a different tokenizer?)",
                reference.path.display()
            );
        }
        cache.clear();
        let hidden = model.forward(&window, &mut cache)?;
        let positions: Vec<usize> = h.protocol.scored_positions(ctx).collect();
        for (c, chunk) in positions.chunks(LOGIT_ROWS).enumerate() {
            let rows = &hidden[chunk[0] * d..(chunk[chunk.len() - 1] + 1) * d];
            let logits = model.logits(rows, chunk.len());
            let per_token: Vec<(f64, bool, f64, f64)> = chunk
                .par_iter()
                .enumerate()
                .map(|(i, &pos)| {
                    let row = &logits[i * vocab..(i + 1) * vocab];
                    let r = decode_record(&records[(c * LOGIT_ROWS + i) * rec..][..rec]);
                    let lq = log_softmax(row);
                    let kl: f64 = r
                        .log_probs
                        .iter()
                        .zip(&lq)
                        .map(|(&lp, &lq)| lp.exp() * (lp - lq))
                        .sum();
                    let next = window[pos + 1] as usize;
                    (kl.max(0.0), argmax(row) == r.top, -lq[next], r.nll)
                })
                .collect();
            for (kl, same, q_nll, r_nll) in per_token {
                klds.push(kl);
                same_top += usize::from(same);
                nll += q_nll;
                nll_ref += r_nll;
            }
        }
        on_window(w + 1, windows, klds.iter().sum::<f64>() / klds.len() as f64);
    }
    let n = klds.len() as f64;
    let mean = klds.iter().sum::<f64>() / n;
    let var = klds.iter().map(|k| (k - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    klds.sort_by(f64::total_cmp);
    Ok(KldResult {
        kld_mean: mean,
        kld_stderr: (var / n).sqrt(),
        kld_median: quantile(&klds, 0.5),
        kld_p90: quantile(&klds, 0.9),
        kld_p99: quantile(&klds, 0.99),
        kld_max: *klds.last().expect("at least one token"),
        top1_agreement: same_top as f64 / n,
        ppl: (nll / n).exp(),
        ppl_reference: (nll_ref / n).exp(),
        tokens_scored: klds.len(),
        windows,
        ctx,
        protocol: h.protocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_within_their_step_and_renormalize() {
        let row: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 40.0 - 10.0)
            .collect();
        let mut bytes = Vec::new();
        encode_record(&row, 17, &mut bytes);
        assert_eq!(bytes.len(), 16 + 2 * row.len());
        let r = decode_record(&bytes);
        let exact = log_softmax(&row);
        let step = f32_at(&bytes, 4) as f64;
        for (a, b) in r.log_probs.iter().zip(&exact) {
            assert!((a - b).abs() <= step, "{a} vs {b} (step {step})");
        }
        let total: f64 = r.log_probs.iter().map(|v| v.exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert!((r.nll + exact[17]).abs() < 1e-5);
        assert_eq!(r.top, argmax(&row));
    }

    #[test]
    fn truncated_or_foreign_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let header = Header {
            format_version: FORMAT_VERSION,
            reference: "r".into(),
            text_sha256: "t".into(),
            ctx: 8,
            protocol: Protocol::Gptq,
            windows: 1,
            vocab: 4,
        };
        let json = serde_json::to_vec(&header).unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&json);
        bytes.extend(vec![0u8; header.window_bytes()]);
        let whole = dir.path().join("whole.kld");
        std::fs::write(&whole, &bytes).unwrap();
        assert!(ReferenceFile::open(&whole).is_ok());
        let cut = dir.path().join("cut.kld");
        std::fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
        let err = ReferenceFile::open(&cut).err().unwrap().to_string();
        assert!(
            err.contains("cut.kld") && err.contains("truncated"),
            "{err}"
        );
        let foreign = dir.path().join("foreign.bin");
        std::fs::write(&foreign, b"GGUF and more bytes").unwrap();
        let err = ReferenceFile::open(&foreign).err().unwrap().to_string();
        assert!(err.contains("not a recoup KL reference file"), "{err}");
        assert!(!is_reference_file(&foreign) && is_reference_file(&cut));
    }

    #[test]
    fn quantiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[3.0], 0.9), 3.0);
    }
}
