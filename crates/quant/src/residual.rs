//! Building QDEC's residual sidecar (papers.md B.3–B.4): for every packed layer of a
//! checkpoint, `R = W_ref − Ŵ` against exactly what the kernels compute (the packed part in
//! the original column order plus the low-rank branch; for AWQ, in the scaled basis the
//! layer was quantized in), coded 4-bit per output row with the scale chosen among 32
//! candidates by squared error; and, from calibration text run through the quantized model
//! itself (the activations its layers really see), each input's envelope of sorted |x| and
//! mean |x| per channel for the bucket and static selectors.

use crate::method::low_rank_product;
use anyhow::{Context, Result, bail};
use half::f16;
use rayon::prelude::*;
use recoup_formats::TensorSource;
use recoup_formats::native::{AWQ_INPUT_SCALE, AWQ_OUTPUT_SCALE};
use recoup_formats::residual::{
    LayerResidualData, MAX_LEVEL, ResidualLayerRecord, pack_input_major,
};
use recoup_model::llama::{BLOCK_LINEARS, Site, block_tensor_name};
use recoup_model::{KvCache, Model};
use std::collections::HashMap;

/// Candidate scales per row (`linspace(m/32, m, 32)`, `m = max|R|/7`).
pub const SCALE_CANDIDATES: usize = 32;

/// Levels (−7…7) and an f16 scale per output row of `r` (`[rows, cols]`), the scale the
/// one of the candidates with the least squared error (each candidate rounded to f16 first,
/// so the levels are those of the stored scale).
pub fn encode_rows(r: &[f32], rows: usize, cols: usize) -> (Vec<i8>, Vec<f16>) {
    assert_eq!(r.len(), rows * cols, "residual shape");
    let coded: Vec<(Vec<i8>, f16)> = r
        .par_chunks_exact(cols)
        .map(|row| {
            let m = row.iter().fold(0f32, |a, v| a.max(v.abs())) / f32::from(MAX_LEVEL);
            let code = |scale: f32, v: f32| {
                if scale > 0.0 {
                    (v / scale)
                        .round()
                        .clamp(-f32::from(MAX_LEVEL), f32::from(MAX_LEVEL))
                } else {
                    0.0
                }
            };
            let mut best = (f64::INFINITY, f16::ZERO);
            for c in 1..=SCALE_CANDIDATES {
                let scale = f16::from_f32(m * c as f32 / SCALE_CANDIDATES as f32);
                let s = scale.to_f32();
                let err: f64 = row
                    .iter()
                    .map(|&v| f64::from(v - code(s, v) * s).powi(2))
                    .sum();
                if err < best.0 {
                    best = (err, scale);
                }
            }
            let s = best.1.to_f32();
            (row.iter().map(|&v| code(s, v) as i8).collect(), best.1)
        })
        .collect();
    let mut levels = Vec::with_capacity(rows * cols);
    let mut scales = Vec::with_capacity(rows);
    for (l, s) in coded {
        levels.extend(l);
        scales.push(s);
    }
    (levels, scales)
}

/// The reference weight of layer `prefix` in the basis its packed weights were quantized
/// in: `diag(1/t)·W·diag(s)` with AWQ's folded scales, `W` otherwise.
fn reference_in_quantized_basis(
    reference: &dyn TensorSource,
    quantized: &dyn TensorSource,
    prefix: &str,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>> {
    let t = reference.tensor(&format!("{prefix}.weight"))?;
    if t.shape != [rows, cols] {
        bail!(
            "{}: {prefix}.weight is {:?}, the checkpoint's layer [{rows}, {cols}]",
            reference.path().display(),
            t.shape
        );
    }
    let mut w = t.data;
    let scale = |suffix: &str, len: usize| -> Result<Option<Vec<f32>>> {
        let name = format!("{prefix}.{suffix}");
        if !quantized.contains(&name) {
            return Ok(None);
        }
        let s = quantized.tensor(&name)?;
        if s.data.len() != len {
            bail!(
                "{}: {name} has {} values, not {len}",
                quantized.path().display(),
                s.data.len()
            );
        }
        Ok(Some(s.data))
    };
    if let Some(s) = scale(AWQ_INPUT_SCALE, cols)? {
        for row in w.chunks_exact_mut(cols) {
            row.iter_mut().zip(&s).for_each(|(v, si)| *v *= si);
        }
    }
    if let Some(t) = scale(AWQ_OUTPUT_SCALE, rows)? {
        for (row, ti) in w.chunks_exact_mut(cols).zip(&t) {
            row.iter_mut().for_each(|v| *v /= ti);
        }
    }
    Ok(w)
}

/// One layer's residual coded, and its record.
pub fn layer_residual(
    reference: &dyn TensorSource,
    quantized: &dyn TensorSource,
    prefix: &str,
) -> Result<Option<(LayerResidualData, ResidualLayerRecord)>> {
    let Some(packed) = quantized.packed(prefix)? else {
        return Ok(None);
    };
    let (rows, cols) = (packed.matrix.rows, packed.matrix.cols);
    if !rows.is_multiple_of(2) {
        bail!("{prefix}: {rows} output rows; residual rows pack two outputs per byte");
    }
    let w = reference_in_quantized_basis(reference, quantized, prefix, rows, cols)?;
    let mut r = packed.dequantize();
    if let Some(l) = &packed.low_rank {
        let sigma = low_rank_product(l, rows, cols);
        r.iter_mut().zip(&sigma).for_each(|(a, b)| *a += b);
    }
    // R = W − Ŵ, in place.
    r.iter_mut().zip(&w).for_each(|(q, &v)| *q = v - *q);
    let (levels, scales) = encode_rows(&r, rows, cols);
    let (mut err, mut norm, mut wnorm) = (0f64, 0f64, 0f64);
    for (o, (row, lv)) in r
        .chunks_exact(cols)
        .zip(levels.chunks_exact(cols))
        .enumerate()
    {
        let s = scales[o].to_f32();
        for (&v, &l) in row.iter().zip(lv) {
            err += f64::from(v - f32::from(l) * s).powi(2);
            norm += f64::from(v).powi(2);
        }
    }
    w.iter().for_each(|&v| wnorm += f64::from(v).powi(2));
    let record = ResidualLayerRecord {
        rows,
        cols,
        code_rel_error: (err / norm.max(f64::MIN_POSITIVE)).sqrt(),
        weight_rel_error: (norm / wnorm.max(f64::MIN_POSITIVE)).sqrt(),
    };
    let data = LayerResidualData {
        rows,
        cols,
        codes: pack_input_major(&levels, rows, cols),
        scales,
        envelope: None,
        mean_abs: None,
    };
    Ok(Some((data, record)))
}

/// Order statistics kept per input: the envelope covers `k_chunk` up to this many channels
/// per 1024 (an eighth), enough for any budget the selector is run with.
pub const ENVELOPE_FRACTION: usize = 8;

/// Statistics of one linear input over calibration tokens.
pub struct InputStats {
    /// Element-wise max over tokens of the token's |x| sorted descending, first
    /// `cols / ENVELOPE_FRACTION` order statistics.
    pub envelope: Vec<f32>,
    sum_abs: Vec<f64>,
    tokens: usize,
}

impl InputStats {
    fn new(cols: usize) -> Self {
        Self {
            envelope: vec![0.0; cols.div_ceil(ENVELOPE_FRACTION)],
            sum_abs: vec![0.0; cols],
            tokens: 0,
        }
    }

    /// Adds rows of `cols` activations.
    pub fn add(&mut self, x: &[f32]) {
        let cols = self.sum_abs.len();
        let keep = self.envelope.len();
        let sorted: Vec<Vec<f32>> = x
            .par_chunks_exact(cols)
            .map(|row| {
                let mut a: Vec<f32> = row.iter().map(|v| v.abs()).collect();
                // Only the top `keep` are needed, in order.
                if keep < cols {
                    a.select_nth_unstable_by(keep - 1, |p, q| q.total_cmp(p));
                    a.truncate(keep);
                }
                a.sort_unstable_by(|p, q| q.total_cmp(p));
                a
            })
            .collect();
        for a in sorted {
            self.envelope
                .iter_mut()
                .zip(&a)
                .for_each(|(e, &v)| *e = e.max(v));
        }
        for row in x.chunks_exact(cols) {
            self.sum_abs
                .iter_mut()
                .zip(row)
                .for_each(|(s, &v)| *s += f64::from(v.abs()));
        }
        self.tokens += x.len() / cols;
    }

    pub fn mean_abs(&self) -> Vec<f32> {
        let t = self.tokens.max(1) as f64;
        self.sum_abs.iter().map(|&s| (s / t) as f32).collect()
    }
}

/// Runs `model` on every window and gathers the statistics of each block's inputs.
pub fn input_stats(
    model: &Model,
    windows: &[Vec<u32>],
    on_window: &mut dyn FnMut(usize),
) -> Result<HashMap<(usize, Site), InputStats>> {
    let seqlen = windows.iter().map(Vec::len).max().unwrap_or(0);
    let mut cache = KvCache::new(&model.config, seqlen);
    let mut stats: HashMap<(usize, Site), InputStats> = HashMap::new();
    for (w, window) in windows.iter().enumerate() {
        cache.clear();
        let t = window.len();
        model.forward_tapped(window, &mut cache, &mut |layer, site, x| {
            let cols = x.len() / t;
            stats
                .entry((layer, site))
                .or_insert_with(|| InputStats::new(cols))
                .add(x);
        })?;
        on_window(w + 1);
    }
    Ok(stats)
}

/// Every packed block layer's residual (with its input's statistics when given), in
/// `BLOCK_LINEARS` order, layer by layer.
pub fn build_residuals(
    reference: &dyn TensorSource,
    quantized: &dyn TensorSource,
    n_layers: usize,
    stats: Option<&HashMap<(usize, Site), InputStats>>,
    on_layer: &mut dyn FnMut(usize),
) -> Result<Vec<(String, LayerResidualData, ResidualLayerRecord)>> {
    let mut out = Vec::new();
    for layer in 0..n_layers {
        for (module, site) in BLOCK_LINEARS {
            let prefix = block_tensor_name(layer, module);
            let Some((mut data, record)) = layer_residual(reference, quantized, &prefix)
                .with_context(|| format!("building the residual of {prefix}"))?
            else {
                continue;
            };
            if let Some(s) = stats.and_then(|s| s.get(&(layer, site))) {
                data.envelope = Some(s.envelope.clone());
                data.mean_abs = Some(s.mean_abs());
            }
            out.push((prefix, data, record));
        }
        on_layer(layer + 1);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    #[test]
    fn row_codes_pick_the_least_error_scale_and_bound_unclipped_errors() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (rows, cols) = (8, 300);
        // Heavy-tailed rows, as residuals are: a few large values clip at the best scale.
        let r: Vec<f32> = (0..rows * cols)
            .map(|_| {
                let v: f32 = rng.random_range(-0.01..0.01);
                if rng.random_bool(0.01) { v * 20.0 } else { v }
            })
            .collect();
        let (levels, scales) = encode_rows(&r, rows, cols);
        for o in 0..rows {
            let row = &r[o * cols..(o + 1) * cols];
            let s = scales[o].to_f32();
            let err = |s: f32| -> f64 {
                row.iter()
                    .map(|&v| {
                        let l = (v / s).round().clamp(-7.0, 7.0);
                        f64::from(v - l * s).powi(2)
                    })
                    .sum()
            };
            let chosen = err(s);
            let max = row.iter().fold(0f32, |a, v| a.max(v.abs())) / 7.0;
            for c in 1..=SCALE_CANDIDATES {
                let cand = f16::from_f32(max * c as f32 / 32.0).to_f32();
                assert!(
                    chosen <= err(cand) + 1e-12,
                    "row {o}: candidate {c} is better"
                );
            }
            assert!(s < max, "row {o}: heavy tails should make the search clip");
            for (i, &v) in row.iter().enumerate() {
                let l = levels[o * cols + i];
                assert!(l.abs() <= 7);
                if v.abs() <= 7.0 * s {
                    assert!(
                        (v - f32::from(l) * s).abs() <= s / 2.0 * 1.0001,
                        "({o}, {i})"
                    );
                }
            }
        }
        // An all-zero row codes to zero.
        let (l, s) = encode_rows(&[0.0; 4], 1, 4);
        assert_eq!((l, s[0].to_f32()), (vec![0; 4], 0.0));
    }

    #[test]
    fn every_channel_with_an_exact_residual_gives_the_reference_output() {
        use recoup_formats::packed::{GridSpec, PackedLinear};
        use recoup_formats::residual::{LayerResidual, ResidualCodes};
        use recoup_model::linear::{LinearOp, PackedOp};
        use recoup_model::qdec::{Compensation, Select, SharedSelection};
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;

        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (rows, cols) = (48, 2048);
        let w0: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-0.1..0.1))
            .collect();
        let spec = GridSpec::new(3, 128, false).unwrap();
        let matrix =
            crate::grid::quantize_rtn(&w0, rows, cols, &spec, crate::grid::Clip::None, None)
                .pack(spec, rows, cols);
        let w_hat = matrix.dequantize();
        // A residual the 4-bit code holds exactly: levels (every row reaching ±7) times an
        // f16 scale per row.
        let levels: Vec<i8> = (0..rows * cols)
            .map(|i| {
                if i % cols == 5 {
                    7
                } else {
                    rng.random_range(-7..=7)
                }
            })
            .collect();
        let scales: Vec<f16> = (0..rows)
            .map(|_| f16::from_f32(rng.random_range(0.001..0.01)))
            .collect();
        let r: Vec<f32> = (0..rows * cols)
            .map(|i| f32::from(levels[i]) * scales[i / cols].to_f32())
            .collect();
        let (coded, coded_scales) = encode_rows(&r, rows, cols);
        assert_eq!(
            (&coded, &coded_scales),
            (&levels, &scales),
            "the code is exact"
        );

        let codes = pack_input_major(&coded, rows, cols);
        let residual = LayerResidual {
            rows,
            cols,
            codes: ResidualCodes::Ram(codes.into()),
            scales: coded_scales,
            envelope: None,
            mean_abs: None,
        };
        let on = Arc::new(AtomicBool::new(true));
        let shared = Arc::new(SharedSelection::new(1));
        let all = Compensation::new(residual, 1024, Select::Exact, false, on, shared).unwrap();
        let mut op = PackedOp::new(PackedLinear::plain(matrix));
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut plain = vec![0f32; rows];
        op.forward(&x, 1, &mut plain);
        op.attach_residual(all).unwrap();
        let mut y = vec![0f32; rows];
        op.forward(&x, 1, &mut y);
        let (mut err, mut size) = (0f64, 0f64);
        for o in 0..rows {
            let dot = |w: &[f32]| -> f64 {
                (0..cols)
                    .map(|i| f64::from(w[o * cols + i]) * f64::from(x[i]))
                    .sum()
            };
            let reference = dot(&w_hat) + dot(&r);
            // What is left is the 8-bit rounding of the activation in both products.
            let bound = 1e-2 * (dot(&w_hat).abs() + 1.0);
            assert!(
                (f64::from(y[o]) - reference).abs() < bound,
                "row {o}: {} vs {reference}",
                y[o]
            );
            err += (f64::from(y[o] - plain[o]) - dot(&r)).abs();
            size += dot(&r).abs();
        }
        assert!(err < 1e-2 * size, "correction off by {err} of {size}");
    }

    #[test]
    fn envelope_is_the_max_of_sorted_magnitudes() {
        let mut st = InputStats::new(16);
        let a: Vec<f32> = (0..16).map(|i| i as f32 - 8.0).collect(); // |x| up to 8
        let b: Vec<f32> = (0..16).map(|i| if i == 3 { 20.0 } else { 0.5 }).collect();
        st.add(&[a.clone(), b].concat());
        assert_eq!(st.envelope, vec![20.0, 7.0]);
        assert!((st.mean_abs()[3] - (5.0 + 20.0) / 2.0).abs() < 1e-6);
    }
}
