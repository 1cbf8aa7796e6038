//! AWQ (Lin et al., 2024): before rounding, input channels that see large activations are
//! scaled up, `W·diag(s)`, and the inverse scale is folded into whatever produces that
//! input (the RMSNorm before q/k/v and gate/up, the up projection before down, and v before
//! o when their shapes match), so the f32 model computes exactly what it did before. The
//! scales are `s = mean|x|^α` (and AutoAWQ's `mean|x|^α / w̄^(1−α)`), α searched on a grid
//! against the output error of the layers sharing the input on a fixed subsample of
//! calibration rows; then each group's range is clipped where that lowers its output error
//! (the group's block of `H`), except for q and k whose errors attention amplifies. The
//! clipping lowers that error on every layer of Qwen2.5 yet raises the model's perplexity
//! (BENCHMARKS.md), hence `max_shrink = 0` to turn it off.
//!
//! Differences from AutoAWQ, on purpose: the scale search measures the error of the linear
//! outputs themselves (AutoAWQ measures q/k/v through the attention and gate/up through the
//! MLP), and the clip search uses every calibration token through `H` instead of a sample.

use crate::calib::BlockStats;
use crate::grid::{Clip, GroupParams, Quantized, quantize_groups, quantize_rtn};
use crate::method::{
    BlockWeights, GridChoice, LinearName, Method, QuantizedLinear, quantize_targets,
};
use anyhow::{Result, anyhow};
use recoup_formats::packed::{GridSpec, PackedLinear};
use recoup_kernels::matmul::matmul_wt;
use recoup_model::llama::Site;

pub struct Awq {
    pub grid: GridChoice,
    /// α is searched over `0, 1/n, …, (n−1)/n`.
    pub scale_grid: usize,
    /// Clipping ratios searched: `1, 1 − 1/n, …` down to `1 − max_shrink`.
    pub clip_grid: usize,
    pub max_shrink: f32,
    /// Calibration rows (over all windows) the scale search evaluates.
    pub sample_rows: usize,
    /// Also search AutoAWQ's scales that divide by the weights' relative magnitude.
    pub duo_scaling: bool,
}

impl Default for Awq {
    fn default() -> Self {
        Self {
            grid: GridChoice {
                bits: 4,
                group: Some(128),
                sym: false,
            },
            scale_grid: 20,
            clip_grid: 20,
            max_shrink: 0.5,
            sample_rows: 2048,
            duo_scaling: true,
        }
    }
}

/// The layers sharing one input, and the tensor that produces that input.
struct ScaleGroup {
    site: Site,
    layers: &'static [LinearName],
    prev: Prev,
}

#[derive(Clone, Copy, PartialEq)]
enum Prev {
    AttnNorm,
    FfnNorm,
    /// The rows of a linear layer (and its bias).
    Linear(LinearName),
}

const GROUPS: [ScaleGroup; 4] = [
    ScaleGroup {
        site: Site::Qkv,
        layers: &[LinearName::Q, LinearName::K, LinearName::V],
        prev: Prev::AttnNorm,
    },
    ScaleGroup {
        site: Site::O,
        layers: &[LinearName::O],
        prev: Prev::Linear(LinearName::V),
    },
    ScaleGroup {
        site: Site::GateUp,
        layers: &[LinearName::Gate, LinearName::Up],
        prev: Prev::FfnNorm,
    },
    ScaleGroup {
        site: Site::Down,
        layers: &[LinearName::Down],
        prev: Prev::Linear(LinearName::Up),
    },
];

/// Multiplies the input channels of `layers` by `s` and divides what produces their input
/// by it: the block's f32 outputs are unchanged. Returns false (and changes nothing) when
/// the producer's outputs are not the layers' inputs one to one (v before o under GQA).
fn fold(block: &mut BlockWeights, layers: &[LinearName], prev: Prev, s: &[f32]) -> bool {
    match prev {
        Prev::AttnNorm => block
            .attn_norm
            .iter_mut()
            .zip(s)
            .for_each(|(w, &si)| *w /= si),
        Prev::FfnNorm => block
            .ffn_norm
            .iter_mut()
            .zip(s)
            .for_each(|(w, &si)| *w /= si),
        Prev::Linear(name) => {
            let p = block.linear_mut(name);
            if p.rows != s.len() {
                return false;
            }
            for (row, &si) in p.w.chunks_exact_mut(p.cols).zip(s) {
                row.iter_mut().for_each(|w| *w /= si);
            }
            if let Some(b) = &mut p.bias {
                b.iter_mut().zip(s).for_each(|(v, &si)| *v /= si);
            }
        }
    }
    for &name in layers {
        let l = block.linear_mut(name);
        for row in l.w.chunks_exact_mut(l.cols) {
            row.iter_mut().zip(s).for_each(|(w, &si)| *w *= si);
        }
    }
    block.modified = true;
    true
}

/// Whether `prev` feeds `site`'s channels one to one in this block.
fn foldable(block: &BlockWeights, prev: Prev, n: usize) -> bool {
    match prev {
        Prev::Linear(name) => block.linear(name).rows == n,
        _ => true,
    }
}

/// Per input channel, the mean over the rows of `layers` of `|w|` divided by the largest
/// `|w|` of its quantization group.
fn relative_weight_mean(
    block: &BlockWeights,
    layers: &[LinearName],
    grid: &GridChoice,
) -> Vec<f64> {
    let cols = block.linear(layers[0]).cols;
    let group = grid.group.unwrap_or(cols);
    let mut sum = vec![0f64; cols];
    let mut rows = 0usize;
    for &name in layers {
        let l = block.linear(name);
        for row in l.w.chunks_exact(cols) {
            for (g, sums) in row.chunks(group).zip(sum.chunks_mut(group)) {
                let max = g.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 + 1e-6;
                sums.iter_mut()
                    .zip(g)
                    .for_each(|(a, &v)| *a += v.abs() as f64 / max);
            }
        }
        rows += l.rows;
    }
    sum.iter_mut().for_each(|v| *v /= rows as f64);
    sum
}

/// `Σ ‖X (Ŵ − W)ᵀ‖²` over `layers` when their input channels are scaled by `s` before RTN.
fn scaled_rtn_loss(
    block: &BlockWeights,
    layers: &[LinearName],
    x: &[f32],
    tokens: usize,
    s: &[f32],
    grid: &GridChoice,
) -> Result<f64> {
    let mut loss = 0f64;
    for &name in layers {
        let l = block.linear(name);
        let spec = grid.spec(l.cols)?;
        let mut scaled = l.w.clone();
        for row in scaled.chunks_exact_mut(l.cols) {
            row.iter_mut().zip(s).for_each(|(w, &si)| *w *= si);
        }
        let q = quantize_rtn(&scaled, l.rows, l.cols, &spec, Clip::None, None);
        let deq = q.pack(spec, l.rows, l.cols).dequantize();
        let err: Vec<f32> = deq
            .chunks_exact(l.cols)
            .zip(l.w.chunks_exact(l.cols))
            .flat_map(|(d, w)| d.iter().zip(s).zip(w).map(|((&d, &si), &w)| d / si - w))
            .collect();
        let mut y = vec![0f32; tokens * l.rows];
        matmul_wt(x, &err, &mut y, tokens, l.cols, l.rows);
        loss += y.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
    }
    Ok(loss)
}

impl Awq {
    /// The candidate with the lowest output error among `s = mean|x|^α` (the paper's) and,
    /// with `duo_scaling`, `s = mean|x|^α / mean_w^(1−α)` (AutoAWQ's default), where `mean_w`
    /// is each input channel's mean weight magnitude relative to its group's maximum; each
    /// normalized so that `max·min = 1`. `α = 0` of the first family is plain RTN, so the
    /// search never does worse than RTN on its sample.
    fn search_scale(
        &self,
        block: &BlockWeights,
        g: &ScaleGroup,
        stats: &BlockStats,
    ) -> Result<Vec<f32>> {
        let st = stats.site(g.site);
        let tokens = st.rows.len() / st.n;
        let w_mean = self
            .duo_scaling
            .then(|| relative_weight_mean(block, g.layers, &self.grid));
        let families: Vec<Option<&[f64]>> = std::iter::once(None)
            .chain(w_mean.as_deref().map(Some))
            .collect();
        let mut best: Option<(f64, Vec<f32>)> = None;
        for i in 0..self.scale_grid {
            let alpha = i as f64 / self.scale_grid as f64;
            for w_mean in &families {
                let mut s: Vec<f32> = st
                    .abs_mean
                    .iter()
                    .enumerate()
                    .map(|(j, &m)| {
                        let w = w_mean.map_or(1.0, |w| w[j].powf(1.0 - alpha) + 1e-4);
                        ((m.powf(alpha) / w) as f32).max(1e-4)
                    })
                    .collect();
                let (lo, hi) = s
                    .iter()
                    .fold((f32::MAX, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                let norm = (lo * hi).sqrt();
                s.iter_mut().for_each(|v| *v /= norm);
                let loss = scaled_rtn_loss(block, g.layers, &st.rows, tokens, &s, &self.grid)?;
                if best.as_ref().is_none_or(|(b, _)| loss < *b) {
                    best = Some((loss, s));
                }
            }
        }
        Ok(best.expect("scale grid is not empty").1)
    }

    /// RTN of a (scaled) layer with each group's clipping ratio chosen against `h`, its
    /// input's Hessian in the scaled basis: the group's error `e` costs `e H_gg eᵀ`.
    pub(crate) fn quantize_clipped(
        &self,
        w: &[f32],
        rows: usize,
        cols: usize,
        spec: &GridSpec,
        h: Option<&[f32]>,
    ) -> Quantized {
        let steps = (self.max_shrink * self.clip_grid as f32).round() as usize;
        let min_ratio = 1.0 - steps.saturating_sub(1) as f32 / self.clip_grid as f32;
        quantize_groups(w, rows, cols, spec, |range, vals| match h {
            None => GroupParams::fit(spec, vals, 1.0),
            Some(h) => {
                GroupParams::fit_clipped(spec, vals, min_ratio, steps.saturating_sub(1), |e| {
                    e.iter()
                        .enumerate()
                        .map(|(i, &ei)| {
                            let hrow = &h[(range.start + i) * cols + range.start
                                ..(range.start + i) * cols + range.end];
                            ei as f64
                                * hrow
                                    .iter()
                                    .zip(e)
                                    .map(|(&hv, &ej)| hv as f64 * ej as f64)
                                    .sum::<f64>()
                        })
                        .sum()
                })
            }
        })
    }
}

impl Method for Awq {
    fn name(&self) -> &'static str {
        "awq"
    }

    fn settings(&self) -> serde_json::Value {
        let mut s = self.grid.settings();
        s["scale_grid"] = self.scale_grid.into();
        s["clip_grid"] = self.clip_grid.into();
        s["max_shrink"] = self.max_shrink.into();
        s["sample_rows"] = self.sample_rows.into();
        s["duo_scaling"] = self.duo_scaling.into();
        s
    }

    fn needs_calibration(&self) -> bool {
        true
    }

    fn sample_rows(&self) -> usize {
        self.sample_rows
    }

    fn rewrites_weights(&self) -> bool {
        true
    }

    fn quantize_block(
        &self,
        block: &mut BlockWeights,
        stats: Option<&BlockStats>,
        targets: &[LinearName],
    ) -> Result<Vec<(LinearName, QuantizedLinear)>> {
        let stats = stats.ok_or_else(|| anyhow!("AWQ needs calibration statistics"))?;
        let scaling = self.scale_block(block, stats, targets)?;
        quantize_targets(block, targets, &self.grid, |name, l, spec| {
            // Clipping against H, except for q and k whose errors attention amplifies.
            let h = (!matches!(name, LinearName::Q | LinearName::K))
                .then(|| scaling.hessian(name, stats));
            let matrix = self
                .quantize_clipped(&l.w, l.rows, l.cols, spec, h.as_deref())
                .pack(*spec, l.rows, l.cols);
            Ok(scaling.wrap(name, PackedLinear::plain(matrix)))
        })
    }
}

/// The channel scales AWQ folded into a block, per linear layer.
pub struct Scaling {
    input: Vec<Option<Vec<f32>>>,
    output: Vec<Option<Vec<f32>>>,
}

impl Scaling {
    pub fn input(&self, name: LinearName) -> Option<&[f32]> {
        self.input[name as usize].as_deref()
    }

    /// `H` of the layer's input in the scaled basis (`X/s`), in f32.
    pub fn hessian(&self, name: LinearName, stats: &BlockStats) -> Vec<f32> {
        let st = stats.site(name.site());
        let n = st.n;
        let s = self.input(name);
        (0..n * n)
            .map(|k| {
                let (i, j) = (k / n, k % n);
                let d = s.map_or(1.0, |s| s[i] as f64 * s[j] as f64);
                (st.h[k] / d) as f32
            })
            .collect()
    }

    /// The mean |x| per input channel in the scaled basis.
    pub fn abs_mean(&self, name: LinearName, stats: &BlockStats) -> Vec<f32> {
        let st = stats.site(name.site());
        let s = self.input(name);
        (0..st.n)
            .map(|i| (st.abs_mean[i] / s.map_or(1.0, |s| s[i] as f64)) as f32)
            .collect()
    }

    /// A layer quantized in the scaled basis, with the scales it needs.
    pub fn wrap(&self, name: LinearName, packed: PackedLinear) -> QuantizedLinear {
        QuantizedLinear {
            packed,
            input_scale: self.input[name as usize].clone(),
            output_scale: self.output[name as usize].clone(),
        }
    }
}

impl Awq {
    /// Searches each input's scales and folds them into the block (the f32 block computes
    /// what it did before); the quantizer then sees the scaled weights.
    pub fn scale_block(
        &self,
        block: &mut BlockWeights,
        stats: &BlockStats,
        targets: &[LinearName],
    ) -> Result<Scaling> {
        let mut scaling = Scaling {
            input: vec![None; LinearName::ALL.len()],
            output: vec![None; LinearName::ALL.len()],
        };
        for g in &GROUPS {
            // Scaling only pays where every layer sharing the input is quantized.
            if !g.layers.iter().all(|l| targets.contains(l))
                || !foldable(block, g.prev, stats.site(g.site).n)
            {
                continue;
            }
            let s = self.search_scale(block, g, stats)?;
            if fold(block, g.layers, g.prev, &s) {
                for &l in g.layers {
                    scaling.input[l as usize] = Some(s.clone());
                }
                if let Prev::Linear(p) = g.prev {
                    scaling.output[p as usize] = Some(s.clone());
                }
            }
        }
        Ok(scaling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::DenseLinear;
    use rand::{RngExt, SeedableRng};

    /// A block whose q/k/v see inputs with a few channels 20× larger than the rest.
    fn outlier_block(seed: u64) -> (BlockWeights, BlockStats) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (d, t) = (256, 512);
        let mut lin = |rows: usize| DenseLinear {
            w: (0..rows * d)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect(),
            rows,
            cols: d,
            bias: None,
        };
        let linears = vec![lin(d), lin(64), lin(64), lin(d), lin(d), lin(d), lin(d)];
        let block = BlockWeights {
            attn_norm: vec![1.0; d],
            ffn_norm: vec![1.0; d],
            linears,
            modified: false,
        };
        let x: Vec<f32> = (0..t * d)
            .map(|i| rng.random_range(-1.0f32..1.0) * if i % d % 37 == 0 { 20.0 } else { 1.0 })
            .collect();
        let mut stats = BlockStats::new([d; 4], t);
        stats.add(Site::Qkv, &x, t);
        stats.finish();
        (block, stats)
    }

    #[test]
    fn the_scale_search_beats_rtn_on_salient_channels() {
        let (block, stats) = outlier_block(23);
        let g = &GROUPS[0];
        let st = stats.site(g.site);
        let tokens = st.rows.len() / st.n;
        for duo_scaling in [false, true] {
            let awq = Awq {
                duo_scaling,
                ..Awq::default()
            };
            let loss = |s: &[f32]| {
                scaled_rtn_loss(&block, g.layers, &st.rows, tokens, s, &awq.grid).unwrap()
            };
            let rtn = loss(&vec![1.0; st.n]);
            let searched = loss(&awq.search_scale(&block, g, &stats).unwrap());
            assert!(
                searched < 0.8 * rtn,
                "duo {duo_scaling}: searched {searched} vs RTN {rtn}"
            );
        }
    }

    #[test]
    fn folding_preserves_the_layers_outputs_up_to_the_producer() {
        // Producer (norm or linear) then consumer: y = C · diag(norm) · x, and y = C · (P x).
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let mut r =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let d = 8;
        let lin = |w: Vec<f32>, rows, cols, bias| DenseLinear {
            w,
            rows,
            cols,
            bias,
        };
        let mut block = BlockWeights {
            attn_norm: r(d),
            ffn_norm: r(d),
            linears: vec![
                lin(r(d * d), d, d, Some(r(d))),
                lin(r(4 * d), 4, d, None),
                lin(r(d * d), d, d, Some(r(d))),
                lin(r(d * d), d, d, None),
                lin(r(d * d), d, d, None),
                lin(r(d * d), d, d, None),
                lin(r(d * d), d, d, None),
            ],
            modified: false,
        };
        let x = r(d);
        let s: Vec<f32> = r(d).iter().map(|v| 0.5 + v.abs()).collect();
        let apply = |b: &BlockWeights| -> (Vec<f32>, Vec<f32>) {
            let mv = |l: &DenseLinear, x: &[f32]| -> Vec<f32> {
                (0..l.rows)
                    .map(|i| {
                        l.w[i * l.cols..(i + 1) * l.cols]
                            .iter()
                            .zip(x)
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            + l.bias.as_ref().map_or(0.0, |b| b[i])
                    })
                    .collect()
            };
            let normed: Vec<f32> = x.iter().zip(&b.attn_norm).map(|(a, w)| a * w).collect();
            let q = mv(b.linear(LinearName::Q), &normed);
            let v = mv(b.linear(LinearName::V), &normed);
            (q, mv(b.linear(LinearName::O), &v))
        };
        let before = apply(&block);
        assert!(fold(
            &mut block,
            &[LinearName::Q, LinearName::K, LinearName::V],
            Prev::AttnNorm,
            &s
        ));
        assert!(fold(
            &mut block,
            &[LinearName::O],
            Prev::Linear(LinearName::V),
            &s
        ));
        // K has 4 rows: it cannot feed an 8-channel consumer.
        assert!(!foldable(&block, Prev::Linear(LinearName::K), d));
        let after = apply(&block);
        for (a, b) in before
            .0
            .iter()
            .chain(&before.1)
            .zip(after.0.iter().chain(&after.1))
        {
            assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
        }
        assert!(block.modified);
    }

    #[test]
    fn folding_leaves_a_real_block_unchanged() {
        use crate::pipeline::{dense_block, read_block_weights};
        use recoup_kernels::ops::RopeTable;
        use recoup_model::llama::embed_tokens;
        let path = recoup_assets::resolve("smollm2-135m", recoup_assets::AssetKind::Model).unwrap();
        let opened = recoup_model::load::open(&path).unwrap();
        let c = &opened.config;
        let src = opened.source.as_ref();
        let tokens = opened
            .tokenizer
            .encode("Folding scales into the norm changes nothing.", false)
            .unwrap();
        let embed = src.tensor("model.embed_tokens.weight").unwrap().data;
        let x = embed_tokens(&embed, c.hidden_size, &tokens).unwrap();
        let t = tokens.len();
        let rope = RopeTable::new(&c.rope_inv_freq(), 0, t);
        let run = |w: &BlockWeights| {
            let mut y = x.clone();
            let (mut k, mut v) = (vec![0f32; t * c.kv_dim()], vec![0f32; t * c.kv_dim()]);
            dense_block(w).forward(c, &mut y, t, &mut k, &mut v, 0, &rope, None, &mut |_, _| {});
            y
        };
        let mut block = read_block_weights(c, src, 3).unwrap();
        let before = run(&block);
        let mut rng = rand::rngs::StdRng::seed_from_u64(22);
        let mut folded = 0;
        for g in &GROUPS {
            let n = block.linear(g.layers[0]).cols;
            let s: Vec<f32> = (0..n).map(|_| rng.random_range(0.25..4.0)).collect();
            folded += usize::from(fold(&mut block, g.layers, g.prev, &s));
        }
        // SmolLM2 uses grouped-query attention, so v cannot carry o's scales.
        assert_eq!(folded, 3);
        let after = run(&block);
        let scale = before.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in before.iter().zip(&after) {
            assert!((a - b).abs() <= 1e-4 * scale, "{a} vs {b}");
        }
    }
}
