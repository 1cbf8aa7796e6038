//! The uniform grid quantizer every method shares: per-group scale and zero point by min-max
//! (optionally with a clipping search), codes by round-to-nearest. Scales are rounded *up*
//! to f16 before codes are computed, so the stored grid still spans the group and the
//! rounding error of every unclipped value stays within half a step.

use half::f16;
use rayon::prelude::*;
use recoup_formats::packed::{GridSpec, PackedMatrix};
use std::ops::Range;

/// One group's grid: `value = scale · (code − zero)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupParams {
    pub scale: f16,
    pub zero: u8,
}

/// The smallest f16 not below `v` (`v ≥ 0`).
fn f16_ceil(v: f32) -> f16 {
    let h = f16::from_f32(v);
    if h.to_f32() < v {
        f16::from_bits(h.to_bits() + 1)
    } else {
        h
    }
}

impl GroupParams {
    /// A placeholder before a group is fitted.
    pub const UNIT: Self = Self {
        scale: f16::ONE,
        zero: 0,
    };

    /// Min-max parameters of `w` on `spec`'s grid, its range first shrunk by `clip` (1 = none).
    /// Asymmetric grids always include zero (as GPTQ's do), so the zero point is on the grid.
    pub fn fit(spec: &GridSpec, w: &[f32], clip: f32) -> Self {
        let maxq = f32::from(spec.max_code());
        if spec.sym {
            let amax = w.iter().fold(0f32, |m, v| m.max(v.abs())) * clip;
            let scale = if amax > 0.0 { 2.0 * amax / maxq } else { 1.0 };
            return Self {
                scale: f16_ceil(scale),
                zero: spec.sym_zero(),
            };
        }
        let (lo, hi) = w
            .iter()
            .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let (lo, hi) = (lo * clip, hi * clip);
        let scale = if hi > lo { (hi - lo) / maxq } else { 1.0 };
        let scale = f16_ceil(scale);
        let zero = (-lo / scale.to_f32()).round().clamp(0.0, maxq) as u8;
        Self { scale, zero }
    }

    /// Among the clipping ratios `1, 1 − step, …` down to `min_ratio`, the parameters whose
    /// rounding errors (`Q(w) − w`, one per value) `loss` scores lowest; ties keep the
    /// larger range.
    pub fn fit_clipped(
        spec: &GridSpec,
        w: &[f32],
        min_ratio: f32,
        steps: usize,
        loss: impl Fn(&[f32]) -> f64,
    ) -> Self {
        let mut best = (f64::INFINITY, Self::fit(spec, w, 1.0));
        let mut err = vec![0f32; w.len()];
        for i in 0..=steps {
            let ratio = 1.0 - (1.0 - min_ratio) * i as f32 / steps.max(1) as f32;
            let p = Self::fit(spec, w, ratio);
            for (e, &v) in err.iter_mut().zip(w) {
                *e = p.dequantize(p.quantize(spec, v)) - v;
            }
            let l = loss(&err);
            if l < best.0 {
                best = (l, p);
            }
        }
        best.1
    }

    /// The nearest code of `v`.
    pub fn quantize(&self, spec: &GridSpec, v: f32) -> u8 {
        let q = (v / self.scale.to_f32()).round() + f32::from(self.zero);
        q.clamp(0.0, f32::from(spec.max_code())) as u8
    }

    pub fn dequantize(&self, code: u8) -> f32 {
        self.scale.to_f32() * (f32::from(code) - f32::from(self.zero))
    }
}

/// Codes (one byte per weight, row-major) and per-(row, group) parameters, before packing.
pub struct Quantized {
    pub codes: Vec<u8>,
    pub params: Vec<GroupParams>,
}

impl Quantized {
    /// The values on the grid, `[rows, cols]`, without packing.
    pub fn dequantize(&self, spec: &GridSpec, cols: usize) -> Vec<f32> {
        let gpr = cols.div_ceil(spec.group);
        let mut out = vec![0f32; self.codes.len()];
        out.par_chunks_mut(cols.max(1))
            .zip(self.codes.par_chunks(cols.max(1)))
            .zip(self.params.par_chunks(gpr.max(1)))
            .for_each(|((out, codes), params)| {
                for (j, (o, &c)) in out.iter_mut().zip(codes).enumerate() {
                    *o = params[j / spec.group].dequantize(c);
                }
            });
        out
    }

    /// Packs into the stored layout.
    pub fn pack(self, spec: GridSpec, rows: usize, cols: usize) -> PackedMatrix {
        let rb = spec.row_bytes(cols);
        let mut packed = vec![0u8; rows * rb];
        packed
            .par_chunks_mut(rb.max(1))
            .zip(self.codes.par_chunks(cols.max(1)))
            .for_each(|(p, c)| spec.pack_row(c, p));
        let scales = self.params.iter().map(|p| p.scale).collect();
        let zeros = if spec.sym {
            Vec::new()
        } else {
            self.params.iter().map(|p| p.zero).collect()
        };
        PackedMatrix::new(spec, rows, cols, packed, scales, zeros, "quantized matrix")
            .expect("the quantizer produces consistent parts")
    }
}

/// How each group's range is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Clip {
    /// Plain min-max.
    None,
    /// Search ratios down to `min_ratio` in `steps` steps, weighting each input channel's
    /// squared error by the diagonal of `H` when one is given.
    Search { min_ratio: f32, steps: usize },
}

/// Round-to-nearest of a `[rows, cols]` matrix, each group's grid chosen by
/// `choose(channels, values)` (the group's input channels and its weights), rows in parallel.
pub fn quantize_groups(
    w: &[f32],
    rows: usize,
    cols: usize,
    spec: &GridSpec,
    choose: impl Fn(Range<usize>, &[f32]) -> GroupParams + Sync,
) -> Quantized {
    let g = spec.group;
    let gpr = cols.div_ceil(g);
    let mut codes = vec![0u8; rows * cols];
    let mut params = vec![GroupParams::UNIT; rows * gpr];
    codes
        .par_chunks_mut(cols)
        .zip(params.par_chunks_mut(gpr))
        .enumerate()
        .for_each(|(r, (codes, params))| {
            let row = &w[r * cols..(r + 1) * cols];
            for (j, p) in params.iter_mut().enumerate() {
                let range = j * g..((j + 1) * g).min(cols);
                let vals = &row[range.clone()];
                *p = choose(range.clone(), vals);
                for (c, &v) in codes[range].iter_mut().zip(vals) {
                    *c = p.quantize(spec, v);
                }
            }
        });
    Quantized { codes, params }
}

/// Round-to-nearest with min-max grids, or with each group's clipping ratio searched against
/// its squared error weighted per input channel by `weight` (e.g. `diag H`; uniform if none).
pub fn quantize_rtn(
    w: &[f32],
    rows: usize,
    cols: usize,
    spec: &GridSpec,
    clip: Clip,
    weight: Option<&[f32]>,
) -> Quantized {
    quantize_groups(w, rows, cols, spec, |range, vals| match clip {
        Clip::None => GroupParams::fit(spec, vals, 1.0),
        Clip::Search { min_ratio, steps } => {
            GroupParams::fit_clipped(spec, vals, min_ratio, steps, |err| {
                err.iter()
                    .enumerate()
                    .map(|(i, &e)| {
                        let h = weight.map_or(1.0, |h| h[range.start + i] as f64);
                        (e as f64) * (e as f64) * h
                    })
                    .sum()
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    fn specs() -> Vec<GridSpec> {
        let mut out = Vec::new();
        for bits in [2, 3, 4, 8] {
            for group in [32, 64, 128] {
                for sym in [false, true] {
                    out.push(GridSpec::new(bits, group, sym).unwrap());
                }
            }
        }
        out
    }

    fn random_matrix(rng: &mut rand::rngs::StdRng, rows: usize, cols: usize) -> Vec<f32> {
        // Heavy-ish tails and a per-row offset, as real weight rows have.
        (0..rows * cols)
            .map(|i| {
                let v: f32 = rng.random_range(-1.0..1.0);
                v * v * v * 0.1 + 0.01 * (i / cols) as f32
            })
            .collect()
    }

    #[test]
    fn unclipped_error_is_at_most_half_a_step() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for spec in specs() {
            // 160 columns: g64 and g128 leave a shorter last group.
            let (rows, cols) = (5, 160);
            let w = random_matrix(&mut rng, rows, cols);
            let q = quantize_rtn(&w, rows, cols, &spec, Clip::None, None);
            let packed = q.pack(spec, rows, cols);
            let deq = packed.dequantize();
            for (i, (&a, &b)) in w.iter().zip(&deq).enumerate() {
                let s = packed.scale(i / cols, (i % cols) / spec.group).to_f32();
                assert!(
                    (a - b).abs() <= s / 2.0 * (1.0 + 1e-5),
                    "{spec:?} [{i}]: {a} → {b}, step {s}"
                );
            }
        }
    }

    #[test]
    fn grid_values_and_codes_round_trip() {
        // Every code of every fitted group dequantizes to a value that quantizes back to it,
        // and the packed matrix unpacks to the codes the quantizer chose.
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for spec in specs() {
            let (rows, cols) = (3, 128);
            let w = random_matrix(&mut rng, rows, cols);
            let q = quantize_rtn(&w, rows, cols, &spec, Clip::None, None);
            for p in &q.params {
                for c in 0..=spec.max_code() {
                    assert_eq!(p.quantize(&spec, p.dequantize(c)), c, "{spec:?} {p:?}");
                }
            }
            let codes = q.codes.clone();
            let packed = q.pack(spec, rows, cols);
            let mut row = vec![0u8; cols];
            for r in 0..rows {
                packed.row_codes(r, &mut row);
                assert_eq!(row, codes[r * cols..(r + 1) * cols], "{spec:?} row {r}");
            }
        }
    }

    #[test]
    fn clipping_search_never_increases_the_weighted_error() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for spec in specs().into_iter().filter(|s| s.bits <= 4) {
            let (rows, cols) = (4, 128);
            let w = random_matrix(&mut rng, rows, cols);
            let h: Vec<f32> = (0..cols).map(|_| rng.random_range(0.1..2.0)).collect();
            let err = |clip| {
                let d = quantize_rtn(&w, rows, cols, &spec, clip, Some(&h))
                    .pack(spec, rows, cols)
                    .dequantize();
                w.iter()
                    .zip(&d)
                    .enumerate()
                    .map(|(i, (a, b))| ((a - b) as f64).powi(2) * h[i % cols] as f64)
                    .sum::<f64>()
            };
            let (plain, searched) = (
                err(Clip::None),
                err(Clip::Search {
                    min_ratio: 0.5,
                    steps: 20,
                }),
            );
            assert!(searched <= plain, "{spec:?}: {searched} > {plain}");
        }
    }
}
