//! Calibration data: seeded windows of tokens sampled from one or more texts, and the
//! statistics of each linear layer's inputs gathered while a block runs on them.

use anyhow::{Result, bail};
use rand::{RngExt, SeedableRng};
use recoup_kernels::matmul::gram_upper;
use recoup_model::Tokenizer;
use recoup_model::llama::Site;
use serde_json::json;

/// Token windows to calibrate on, and the record of how they were drawn.
pub struct CalibrationSet {
    pub windows: Vec<Vec<u32>>,
    pub seqlen: usize,
    /// Texts (name, sha256, tokens), samples, sequence length, seed.
    pub record: serde_json::Value,
}

/// A text to calibrate on.
pub struct CalibText {
    pub name: String,
    pub sha256: String,
    pub content: String,
}

/// Draws `nsamples` windows of `seqlen` tokens: window `i` comes from text `i mod texts`,
/// at a uniformly random start (seeded), as GPTQ's data loaders do. A model that adds BOS
/// gets it at the start of every window.
pub fn sample_windows(
    texts: &[CalibText],
    tokenizer: &Tokenizer,
    nsamples: usize,
    seqlen: usize,
    seed: u64,
) -> Result<CalibrationSet> {
    if texts.is_empty() || nsamples == 0 || seqlen < 2 {
        bail!("calibration needs at least one text, one sample and two tokens per sample");
    }
    let bos = if tokenizer.add_bos {
        tokenizer.bos
    } else {
        None
    };
    let body = seqlen - usize::from(bos.is_some());
    let tokenized: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tokenizer.encode(&t.content, false))
        .collect::<Result<_>>()?;
    for (t, toks) in texts.iter().zip(&tokenized) {
        if toks.len() <= body {
            bail!(
                "calibration text {} has {} tokens, fewer than one window of {seqlen}",
                t.name,
                toks.len()
            );
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let windows = (0..nsamples)
        .map(|i| {
            let toks = &tokenized[i % texts.len()];
            let start = rng.random_range(0..=toks.len() - body);
            bos.into_iter()
                .chain(toks[start..start + body].iter().copied())
                .collect()
        })
        .collect();
    let record = json!({
        "texts": texts.iter().zip(&tokenized).map(|(t, toks)| json!({
            "name": t.name, "sha256": t.sha256, "tokens": toks.len(),
        })).collect::<Vec<_>>(),
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "bos": bos.is_some(),
    });
    Ok(CalibrationSet {
        windows,
        seqlen,
        record,
    })
}

/// What one input site saw: `H = Σ xᵀx` in f64, the mean |x| per channel, and (if asked)
/// a fixed subsample of input rows.
pub struct SiteStats {
    pub n: usize,
    pub tokens: usize,
    pub h: Vec<f64>,
    pub abs_mean: Vec<f64>,
    /// `rows.len() / n` kept input rows.
    pub rows: Vec<f32>,
}

/// Statistics of the four input sites of a block.
pub struct BlockStats {
    sites: Vec<SiteStats>,
    rows_per_window: usize,
    /// One window's Gram matrix, reused (up to 320 MB for a 1.5B model's down projection).
    scratch: Vec<f32>,
}

fn site_index(site: Site) -> usize {
    match site {
        Site::Qkv => 0,
        Site::O => 1,
        Site::GateUp => 2,
        Site::Down => 3,
    }
}

impl BlockStats {
    /// Empty statistics for inputs of widths `dims` (qkv, o, gate/up, down); keeps
    /// `rows_per_window` evenly spaced rows of each window.
    pub fn new(dims: [usize; 4], rows_per_window: usize) -> Self {
        let sites = dims
            .iter()
            .map(|&n| SiteStats {
                n,
                tokens: 0,
                h: vec![0.0; n * n],
                abs_mean: vec![0.0; n],
                rows: Vec::new(),
            })
            .collect();
        Self {
            sites,
            rows_per_window,
            scratch: Vec::new(),
        }
    }

    pub fn site(&self, site: Site) -> &SiteStats {
        &self.sites[site_index(site)]
    }

    /// Completes each H from its upper triangle and frees the per-window buffer, once every
    /// window has been added.
    pub fn finish(&mut self) {
        self.scratch = Vec::new();
        for s in &mut self.sites {
            let n = s.n;
            for i in 0..n {
                for j in 0..i {
                    s.h[i * n + j] = s.h[j * n + i];
                }
            }
        }
    }

    /// Adds `t` rows of one window's input at `site`.
    pub fn add(&mut self, site: Site, x: &[f32], t: usize) {
        let s = &mut self.sites[site_index(site)];
        let n = s.n;
        let g = &mut self.scratch;
        g.resize(n * n, 0.0);
        // Within a window f32 sums suffice; windows accumulate in f64.
        gram_upper(x, g, t, n);
        for i in 0..n {
            let row = i * n + i..(i + 1) * n;
            s.h[row.clone()]
                .iter_mut()
                .zip(&g[row])
                .for_each(|(h, &v)| *h += v as f64);
        }
        let old = s.tokens as f64;
        s.tokens += t;
        let mut sums = vec![0f64; n];
        for row in x.chunks_exact(n) {
            sums.iter_mut()
                .zip(row)
                .for_each(|(a, &v)| *a += v.abs() as f64);
        }
        let total = s.tokens as f64;
        for (m, add) in s.abs_mean.iter_mut().zip(sums) {
            *m = (*m * old + add) / total;
        }
        let keep = self.rows_per_window.min(t);
        for i in 0..keep {
            let r = i * t / keep;
            s.rows.extend_from_slice(&x[r * n..(r + 1) * n]);
        }
    }
}
