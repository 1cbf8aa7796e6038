//! The low-rank compensation family. A quantized layer gets a branch `Σ = A·B` (A `[rows,
//! rank]`, the up-projection; B `[rank, cols]`, the down-projection) added to its output.
//!
//! - **LoRC** (ZeroQuant-V2): `W' = Q(W) + Σ`, Σ the rank-r SVD of `W − Q(W)`.
//! - **LQER**: the SVD of `(W − Q(W))·diag(d)`, `d` the mean |x| per input channel, with `B`
//!   un-scaled after, so the rank goes where the activations are.
//! - **FBQuant** (Liu et al., 2025): the branch feeds back before the quantizer,
//!   `W_F = Q(W − Σ) + Σ`, so `W_F − W = Q(U) − U` for `U = W − Σ`: half a step at most,
//!   whatever Σ is. Σ starts at LQER's and is trained with Adam against the layer-output
//!   error `tr(E H Eᵀ)`, using the almost-everywhere gradient — zero through Q, which is
//!   piecewise constant, and the identity through the added Σ; a straight-through estimator
//!   would cancel the two to zero. The loss jumps wherever an element of U crosses a rounding
//!   boundary, so the best iterate is kept; U is finally quantized with the factors as stored
//!   (f16 or int8), so the bound holds for the checkpoint, not only for the f32 factors.
//! - **subbranch-trained**: the same training of `W' = Q(W) + Σ`, with nothing bounding the
//!   weights: the ablation that shows what the feedback buys away from the calibration text.
//!
//! The closed forms and the ablation take their `Q(W)` from the base method (RTN, GPTQ, or
//! AWQ's scaled and clipped weights). FBQuant quantizes U itself, min-max and never clipped
//! (a clipped value would escape the bound), optionally in AWQ's scaled basis.

use crate::awq::Awq;
use crate::calib::BlockStats;
use crate::error::ERROR_ROWS;
use crate::gptq::{GptqOptions, gptq};
use crate::grid::{Clip, quantize_rtn};
use crate::method::{
    BlockWeights, DenseLinear, GridChoice, LinearName, Method, QuantizedLinear, low_rank_product,
    quantize_targets,
};
use anyhow::{Result, anyhow, bail};
use faer::Mat;
use rand::{RngExt, SeedableRng};
use recoup_formats::packed::{FactorDtype, GridSpec, LowRank, PackedLinear};
use recoup_kernels::matmul::{matmul, matmul_tn, matmul_wt};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Branch {
    Lorc,
    Lqer,
    Fbquant,
    SubbranchTrained,
}

impl Branch {
    pub fn name(self) -> &'static str {
        match self {
            Branch::Lorc => "lorc",
            Branch::Lqer => "lqer",
            Branch::Fbquant => "fbquant",
            Branch::SubbranchTrained => "subbranch-trained",
        }
    }

    fn trained(self) -> bool {
        matches!(self, Branch::Fbquant | Branch::SubbranchTrained)
    }
}

/// Adam on the branch's factors, per linear layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Training {
    pub steps: usize,
    /// Step size relative to each factor's initial root-mean-square value.
    pub lr: f32,
    /// The loss that picks the best iterate is measured every this many steps.
    pub eval_every: usize,
}

impl Default for Training {
    fn default() -> Self {
        Self {
            steps: 200,
            lr: 0.01,
            eval_every: 10,
        }
    }
}

/// Where `Q(W)` comes from.
pub enum Base {
    Rtn,
    Gptq(GptqOptions),
    Awq(Awq),
}

impl Base {
    pub fn name(&self) -> &'static str {
        match self {
            Base::Rtn => "rtn",
            Base::Gptq(_) => "gptq",
            Base::Awq(_) => "awq",
        }
    }
}

pub struct LowRankMethod {
    pub branch: Branch,
    pub grid: GridChoice,
    pub rank: usize,
    pub training: Training,
    pub base: Base,
    /// Storage precision of A and B.
    pub factors: FactorDtype,
}

impl LowRankMethod {
    /// Checks the combination before any work starts.
    pub fn new(
        branch: Branch,
        grid: GridChoice,
        rank: usize,
        training: Training,
        base: Base,
        factors: FactorDtype,
    ) -> Result<Self> {
        if rank == 0 {
            bail!("--rank must be at least 1");
        }
        if branch == Branch::Fbquant && matches!(base, Base::Gptq(_)) {
            bail!(
                "fbquant quantizes W − Σ by rounding to nearest, which is what bounds its error; \
                 GPTQ's rounding would break that bound (use --base rtn or awq)"
            );
        }
        if branch.trained() && (training.steps == 0 || training.eval_every == 0) {
            bail!("--steps and the evaluation interval must be at least 1");
        }
        if branch.trained() && !(training.lr > 0.0 && training.lr.is_finite()) {
            bail!("--lr must be a positive number");
        }
        Ok(Self {
            branch,
            grid,
            rank,
            training,
            base,
            factors,
        })
    }

    /// One layer, in the basis it is quantized in (AWQ's scaled one with that base).
    fn quantize_layer(
        &self,
        name: LinearName,
        l: &DenseLinear,
        spec: &GridSpec,
        calib: Option<LayerCalib>,
    ) -> Result<PackedLinear> {
        let (rows, cols, rank) = (l.rows, l.cols, self.rank);
        if self.branch == Branch::Fbquant {
            let c = calib.ok_or_else(|| anyhow!("fbquant needs calibration statistics"))?;
            let (a, b) = fbquant_init(&l.w, &c.d, rows, cols, spec, rank)?;
            let (a, b) = train(&c.h, a, b, rows, cols, &self.training, |sigma| {
                let u = sub(&l.w, sigma);
                sub(&round_to_nearest(&u, rows, cols, spec), &u)
            })?;
            // Quantize U with the factors exactly as stored.
            let low_rank = LowRank::from_f32(rank, &a, &b, self.factors);
            let sigma = low_rank_product(&low_rank, rows, cols);
            let u = sub(&l.w, &sigma);
            let matrix =
                quantize_rtn(&u, rows, cols, spec, Clip::None, None).pack(*spec, rows, cols);
            return Ok(PackedLinear {
                low_rank: Some(low_rank),
                ..PackedLinear::plain(matrix)
            });
        }
        let base = self.quantize_base(name, l, spec, calib.as_ref())?;
        let q = base.dequantize();
        let e0 = sub(&l.w, &q);
        let (a, b) = match (self.branch, &calib) {
            (Branch::Lorc, _) => svd_factors(&e0, rows, cols, rank)?,
            (_, Some(c)) => lqer_factors(&e0, &c.d, rows, cols, rank)?,
            (_, None) => bail!("{} needs calibration statistics", self.branch.name()),
        };
        let (a, b) = match (self.branch, &calib) {
            (Branch::SubbranchTrained, Some(c)) => {
                let (a, b) = avoid_saddle(a, b, &l.w);
                train(&c.h, a, b, rows, cols, &self.training, |sigma| {
                    // W' − W = Q(W) + Σ − W = Σ − E0.
                    sub(sigma, &e0)
                })?
            }
            _ => (a, b),
        };
        Ok(PackedLinear {
            low_rank: Some(LowRank::from_f32(rank, &a, &b, self.factors)),
            ..base
        })
    }

    fn quantize_base(
        &self,
        name: LinearName,
        l: &DenseLinear,
        spec: &GridSpec,
        calib: Option<&LayerCalib>,
    ) -> Result<PackedLinear> {
        let (rows, cols) = (l.rows, l.cols);
        Ok(match (&self.base, calib) {
            (Base::Rtn, _) => PackedLinear::plain(
                quantize_rtn(&l.w, rows, cols, spec, Clip::None, None).pack(*spec, rows, cols),
            ),
            (Base::Gptq(opts), Some(c)) => gptq(&l.w, rows, cols, c.h64, spec, opts)?,
            (Base::Awq(awq), Some(c)) => {
                // As AWQ itself: clipping against H, except for q and k.
                let clip_h = (!matches!(name, LinearName::Q | LinearName::K)).then_some(&c.h[..]);
                PackedLinear::plain(
                    awq.quantize_clipped(&l.w, rows, cols, spec, clip_h)
                        .pack(*spec, rows, cols),
                )
            }
            (base, None) => bail!("--base {} needs calibration statistics", base.name()),
        })
    }
}

/// A layer's calibration statistics in the basis it is quantized in.
struct LayerCalib<'a> {
    h: Vec<f32>,
    /// `H` in f64 in the original basis (what GPTQ factors).
    h64: &'a [f64],
    d: Vec<f32>,
}

impl Method for LowRankMethod {
    fn name(&self) -> &'static str {
        self.branch.name()
    }

    fn settings(&self) -> serde_json::Value {
        let mut s = self.grid.settings();
        s["rank"] = self.rank.into();
        s["factor_dtype"] = self.factors.name().into();
        s["base"] = self.base.name().into();
        if let Base::Gptq(o) = &self.base {
            s["damp"] = o.damp.into();
            s["act_order"] = o.act_order.into();
        }
        if self.branch.trained() {
            s["steps"] = self.training.steps.into();
            s["lr"] = self.training.lr.into();
            s["eval_every"] = self.training.eval_every.into();
            s["optimizer"] = "adam(0.9, 0.999)".into();
        }
        s
    }

    fn needs_calibration(&self) -> bool {
        !(self.branch == Branch::Lorc && matches!(self.base, Base::Rtn))
    }

    fn rewrites_weights(&self) -> bool {
        matches!(self.base, Base::Awq(_))
    }

    fn sample_rows(&self) -> usize {
        match &self.base {
            Base::Awq(awq) => awq.sample_rows,
            _ => 0,
        }
    }

    fn quantize_block(
        &self,
        block: &mut BlockWeights,
        stats: Option<&BlockStats>,
        targets: &[LinearName],
    ) -> Result<Vec<(LinearName, QuantizedLinear)>> {
        let scaling = match (&self.base, stats) {
            (Base::Awq(awq), Some(st)) => Some(awq.scale_block(block, st, targets)?),
            _ => None,
        };
        quantize_targets(block, targets, &self.grid, |name, l, spec| {
            let calib = stats.map(|st| {
                let site = st.site(name.site());
                match &scaling {
                    Some(sc) => LayerCalib {
                        h: sc.hessian(name, st),
                        h64: &site.h,
                        d: sc.abs_mean(name, st),
                    },
                    None => LayerCalib {
                        h: site.h.iter().map(|&v| v as f32).collect(),
                        h64: &site.h,
                        d: site.abs_mean.iter().map(|&v| v as f32).collect(),
                    },
                }
            });
            let packed = self.quantize_layer(name, l, spec, calib)?;
            Ok(match &scaling {
                Some(sc) => sc.wrap(name, packed),
                None => QuantizedLinear::plain(packed),
            })
        })
    }
}

fn sub(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

fn round_to_nearest(w: &[f32], rows: usize, cols: usize, spec: &GridSpec) -> Vec<f32> {
    quantize_rtn(w, rows, cols, spec, Clip::None, None).dequantize(spec, cols)
}

/// The best rank-`rank` approximation of `m` (`[rows, cols]`) by SVD, as balanced factors
/// `A = U_r S_r^½`, `B = S_r^½ V_rᵀ` (zero beyond the matrix's own rank).
pub fn svd_factors(
    m: &[f32],
    rows: usize,
    cols: usize,
    rank: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let mat = Mat::<f64>::from_fn(rows, cols, |i, j| m[i * cols + j] as f64);
    let svd = mat
        .thin_svd()
        .map_err(|e| anyhow!("the SVD did not converge ({e:?})"))?;
    let s = svd.S().column_vector();
    let mut order: Vec<usize> = (0..s.nrows()).collect();
    order.sort_by(|&x, &y| s[y].total_cmp(&s[x]));
    let (mut a, mut b) = (vec![0f32; rows * rank], vec![0f32; rank * cols]);
    for (t, &k) in order.iter().take(rank).enumerate() {
        let root = s[k].max(0.0).sqrt();
        for i in 0..rows {
            a[i * rank + t] = (svd.U()[(i, k)] * root) as f32;
        }
        for j in 0..cols {
            b[t * cols + j] = (svd.V()[(j, k)] * root) as f32;
        }
    }
    Ok((a, b))
}

/// LQER's factors of the error `e0`: the SVD of `e0·diag(d)`, with `B` scaled back by
/// `diag(d)⁻¹`. Channels that never saw an input get a tiny `d` rather than a division by 0.
pub fn lqer_factors(
    e0: &[f32],
    d: &[f32],
    rows: usize,
    cols: usize,
    rank: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let floor = d.iter().fold(0f32, |m, &v| m.max(v)) * 1e-6;
    let d: Vec<f32> = d
        .iter()
        .map(|&v| if floor > 0.0 { v.max(floor) } else { 1.0 })
        .collect();
    let scaled: Vec<f32> = e0
        .chunks_exact(cols)
        .flat_map(|row| row.iter().zip(&d).map(|(e, s)| e * s))
        .collect();
    let (a, mut b) = svd_factors(&scaled, rows, cols, rank)?;
    for row in b.chunks_exact_mut(cols) {
        row.iter_mut().zip(&d).for_each(|(v, s)| *v /= s);
    }
    Ok((a, b))
}

/// FBQuant's starting branch: LQER's factors of the round-to-nearest error, from which
/// `W − Σ` starts close to the grid.
pub fn fbquant_init(
    w: &[f32],
    d: &[f32],
    rows: usize,
    cols: usize,
    spec: &GridSpec,
    rank: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let rtn = round_to_nearest(w, rows, cols, spec);
    let (a, b) = lqer_factors(&sub(w, &rtn), d, rows, cols, rank)?;
    Ok(avoid_saddle(a, b, w))
}

/// `A = B = 0` is a saddle point (both gradients vanish): when the closed form gives that
/// (a layer already on its grid), start LoRA-style from a small random `B` and `A = 0`.
fn avoid_saddle(a: Vec<f32>, b: Vec<f32>, w: &[f32]) -> (Vec<f32>, Vec<f32>) {
    if a.iter().chain(&b).any(|&v| v != 0.0) {
        return (a, b);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(b.len() as u64);
    let scale = (rms(w) as f32).sqrt() * 1e-2;
    let b = b
        .iter()
        .map(|_| rng.random_range(-1.0f32..1.0) * scale)
        .collect();
    (a, b)
}

fn rms(v: &[f32]) -> f64 {
    (v.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

/// Adam's state for one parameter tensor.
struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
    lr: f32,
}

impl Adam {
    const BETA1: f32 = 0.9;
    const BETA2: f32 = 0.999;

    fn new(n: usize, lr: f32) -> Self {
        Self {
            m: vec![0.0; n],
            v: vec![0.0; n],
            lr,
        }
    }

    /// Step `t` (from 1).
    fn step(&mut self, p: &mut [f32], g: &[f32], t: i32) {
        let c1 = 1.0 - Self::BETA1.powi(t);
        let c2 = 1.0 - Self::BETA2.powi(t);
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(&mut self.m).zip(&mut self.v) {
            *m = Self::BETA1 * *m + (1.0 - Self::BETA1) * g;
            *v = Self::BETA2 * *v + (1.0 - Self::BETA2) * g * g;
            *p -= self.lr * (*m / c1) / ((*v / c2).sqrt() + 1e-12);
        }
    }
}

/// The loss `tr(E H Eᵀ)` and its gradients in the factors, `∂L/∂A = 2 E (H Bᵀ)` and
/// `∂L/∂B = 2 (Aᵀ E) H`: `∂L/∂Σ = 2 E H` because `E` moves with Σ one to one almost
/// everywhere, in both the feedback and the plain form.
pub fn branch_gradients(
    e: &[f32],
    h: &[f32],
    a: &[f32],
    b: &[f32],
    rows: usize,
    cols: usize,
) -> (Vec<f32>, Vec<f32>) {
    let rank = a.len() / rows;
    // B·H is (H·Bᵀ)ᵀ, H being symmetric.
    let mut bh = vec![0f32; rank * cols];
    matmul_wt(b, h, &mut bh, rank, cols, cols);
    let mut ga = vec![0f32; rows * rank];
    matmul_wt(e, &bh, &mut ga, rows, cols, rank);
    let mut ate = vec![0f32; rank * cols];
    matmul_tn(a, e, &mut ate, rows, rank, cols);
    let mut gb = vec![0f32; rank * cols];
    matmul_wt(&ate, h, &mut gb, rank, cols, cols);
    ga.iter_mut().chain(gb.iter_mut()).for_each(|v| *v *= 2.0);
    (ga, gb)
}

/// `tr(E H Eᵀ)` over at most [`ERROR_ROWS`] evenly spaced rows of `e`.
fn sampled_loss(e: &[f32], h: &[f32], rows: usize, cols: usize) -> f64 {
    let n = rows.min(ERROR_ROWS);
    let picked: Vec<f32> = (0..n)
        .flat_map(|i| {
            let r = i * rows / n;
            e[r * cols..(r + 1) * cols].iter().copied()
        })
        .collect();
    let mut eh = vec![0f32; n * cols];
    matmul_wt(&picked, h, &mut eh, n, cols, cols);
    picked
        .iter()
        .zip(&eh)
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum()
}

/// Adam on `(A, B)` against `tr(E H Eᵀ)` with `E = error(A·B)` (`[rows, cols]`), keeping
/// the best iterate by the loss on sampled rows. Refuses to start at `A = B = 0`.
pub fn train(
    h: &[f32],
    mut a: Vec<f32>,
    mut b: Vec<f32>,
    rows: usize,
    cols: usize,
    opts: &Training,
    error: impl Fn(&[f32]) -> Vec<f32>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    if a.iter().chain(&b).all(|&v| v == 0.0) {
        bail!("the branch starts at A = B = 0, a saddle point where both gradients vanish");
    }
    let rank = a.len() / rows;
    // H scaled to a unit mean diagonal, so gradients have a similar size in every layer.
    let mean_diag = (0..cols).map(|i| h[i * cols + i] as f64).sum::<f64>() / cols as f64;
    let norm = if mean_diag > 0.0 { mean_diag } else { 1.0 };
    let h: Vec<f32> = h.iter().map(|&v| (v as f64 / norm) as f32).collect();
    // A factor that starts at zero moves at the other's scale.
    let (ra, rb) = (rms(&a), rms(&b));
    let lr_a = opts.lr * if ra > 0.0 { ra } else { rb } as f32;
    let lr_b = opts.lr * if rb > 0.0 { rb } else { ra } as f32;
    let (mut adam_a, mut adam_b) = (Adam::new(a.len(), lr_a), Adam::new(b.len(), lr_b));
    let mut sigma = vec![0f32; rows * cols];
    let mut best: Option<(f64, Vec<f32>, Vec<f32>)> = None;
    for step in 0..=opts.steps {
        matmul(&a, &b, &mut sigma, rows, rank, cols);
        let e = error(&sigma);
        if step % opts.eval_every == 0 || step == opts.steps {
            let loss = sampled_loss(&e, &h, rows, cols);
            if best.as_ref().is_none_or(|(l, _, _)| loss < *l) {
                best = Some((loss, a.clone(), b.clone()));
            }
        }
        if step == opts.steps {
            break;
        }
        let (ga, gb) = branch_gradients(&e, &h, &a, &b, rows, cols);
        adam_a.step(&mut a, &ga, step as i32 + 1);
        adam_b.step(&mut b, &gb, step as i32 + 1);
    }
    let (_, a, b) = best.expect("step 0 is always evaluated");
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{max_error_steps, output_error};
    use crate::grid::Quantized;
    use rand::rngs::StdRng;

    /// A layer whose inputs have a few channels far louder than the rest, as real
    /// activations do.
    struct Layer {
        w: Vec<f32>,
        h: Vec<f32>,
        h64: Vec<f64>,
        d: Vec<f32>,
        rows: usize,
        cols: usize,
    }

    fn layer(seed: u64, rows: usize, cols: usize, loud: f32) -> Layer {
        let mut rng = StdRng::seed_from_u64(seed);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0f32..1.0) * 0.05)
            .collect();
        let tokens = 4 * cols;
        // Correlated inputs: a shared component plus noise, with every 16th channel loud.
        let mut x = vec![0f32; tokens * cols];
        for row in x.chunks_exact_mut(cols) {
            let common = rng.random_range(-1.0f32..1.0);
            for (j, v) in row.iter_mut().enumerate() {
                let gain = if j % 16 == 3 { loud } else { 1.0 };
                *v = gain * (0.5 * common + rng.random_range(-1.0f32..1.0));
            }
        }
        let mut h64 = vec![0f64; cols * cols];
        for row in x.chunks_exact(cols) {
            for i in 0..cols {
                for j in 0..cols {
                    h64[i * cols + j] += row[i] as f64 * row[j] as f64;
                }
            }
        }
        let d = (0..cols)
            .map(|j| x.iter().skip(j).step_by(cols).map(|v| v.abs()).sum::<f32>() / tokens as f32)
            .collect();
        Layer {
            w,
            h: h64.iter().map(|&v| v as f32).collect(),
            h64,
            d,
            rows,
            cols,
        }
    }

    fn method(branch: Branch, bits: u32, steps: usize) -> LowRankMethod {
        method_with(branch, bits, steps, FactorDtype::F16)
    }

    fn method_with(branch: Branch, bits: u32, steps: usize, factors: FactorDtype) -> LowRankMethod {
        let grid = GridChoice {
            bits,
            group: Some(32),
            sym: false,
        };
        let training = Training {
            steps,
            ..Training::default()
        };
        LowRankMethod::new(branch, grid, 4, training, Base::Rtn, factors).unwrap()
    }

    fn run(m: &LowRankMethod, l: &Layer) -> PackedLinear {
        let dense = DenseLinear {
            w: l.w.clone(),
            rows: l.rows,
            cols: l.cols,
            bias: None,
        };
        let spec = m.grid.spec(l.cols).unwrap();
        let calib = LayerCalib {
            h: l.h.clone(),
            h64: &l.h64,
            d: l.d.clone(),
        };
        m.quantize_layer(LinearName::Gate, &dense, &spec, Some(calib))
            .unwrap()
    }

    fn reconstructed(p: PackedLinear) -> (Vec<f32>, PackedLinear) {
        let q = QuantizedLinear::plain(p);
        (q.reconstructed(), q.packed)
    }

    #[test]
    fn the_gradient_matches_finite_differences() {
        let l = layer(1, 8, 64, 4.0);
        let (rows, cols, rank) = (l.rows, l.cols, 2);
        let spec = GridSpec::new(3, 32, false).unwrap();
        let (a, b) = fbquant_init(&l.w, &l.d, rows, cols, &spec, rank).unwrap();
        let quantized = |a: &[f32], b: &[f32]| {
            let mut sigma = vec![0f32; rows * cols];
            matmul(a, b, &mut sigma, rows, rank, cols);
            quantize_rtn(&sub(&l.w, &sigma), rows, cols, &spec, Clip::None, None)
        };
        // The FBQuant loss in f64, through the real quantizer.
        let loss = |a: &[f32], b: &[f32]| -> f64 {
            let q = quantized(a, b).dequantize(&spec, cols);
            let e: Vec<f64> = (0..rows * cols)
                .map(|k| {
                    let (i, j) = (k / cols, k % cols);
                    let s: f64 = (0..rank)
                        .map(|t| a[i * rank + t] as f64 * b[t * cols + j] as f64)
                        .sum();
                    q[k] as f64 - (l.w[k] as f64 - s)
                })
                .collect();
            e.chunks_exact(cols)
                .map(|row| {
                    (0..cols)
                        .map(|i| {
                            let hi = &l.h64[i * cols..(i + 1) * cols];
                            row[i] * hi.iter().zip(row).map(|(h, v)| h * v).sum::<f64>()
                        })
                        .sum::<f64>()
                })
                .sum()
        };
        let base = quantized(&a, &b);
        let mut sigma = vec![0f32; rows * cols];
        matmul(&a, &b, &mut sigma, rows, rank, cols);
        let e = sub(&base.dequantize(&spec, cols), &sub(&l.w, &sigma));
        let (ga, gb) = branch_gradients(&e, &l.h, &a, &b, rows, cols);
        let same = |q: &Quantized| q.codes == base.codes && q.params == base.params;
        for (which, grad) in [(0, &ga), (1, &gb)] {
            for i in (0..grad.len()).step_by(3) {
                // Halve the step until neither side crosses a rounding boundary (nor moves a
                // group's range), where the quantizer is constant and the a.e. gradient holds.
                let mut delta = 1e-3f32;
                let (plus, minus) = loop {
                    let (mut p, mut m) = ((a.clone(), b.clone()), (a.clone(), b.clone()));
                    let (pv, mv) = if which == 0 {
                        (&mut p.0[i], &mut m.0[i])
                    } else {
                        (&mut p.1[i], &mut m.1[i])
                    };
                    *pv += delta;
                    *mv -= delta;
                    if same(&quantized(&p.0, &p.1)) && same(&quantized(&m.0, &m.1)) {
                        break (p, m);
                    }
                    delta /= 2.0;
                    assert!(delta > 1e-9, "no step stays below a rounding boundary");
                };
                let span = if which == 0 {
                    plus.0[i] as f64 - minus.0[i] as f64
                } else {
                    plus.1[i] as f64 - minus.1[i] as f64
                };
                let fd = (loss(&plus.0, &plus.1) - loss(&minus.0, &minus.1)) / span;
                let g = grad[i] as f64;
                assert!(
                    (fd - g).abs() <= 1e-3 * g.abs().max(fd.abs()) + 1e-6,
                    "factor {which} element {i}: finite difference {fd} vs gradient {g}"
                );
            }
        }
    }

    #[test]
    fn a_zero_start_is_refused_by_training_and_avoided_by_the_init() {
        let l = layer(2, 8, 64, 1.0);
        let opts = Training::default();
        let zeros = (vec![0f32; 8 * 2], vec![0f32; 2 * 64]);
        let err = train(&l.h, zeros.0.clone(), zeros.1.clone(), 8, 64, &opts, |s| {
            s.to_vec()
        })
        .unwrap_err();
        assert!(err.to_string().contains("saddle"), "{err}");
        // A layer already on its grid has no error to start the branch from.
        let spec = GridSpec::new(4, 32, false).unwrap();
        let on_grid = round_to_nearest(&l.w, 8, 64, &spec);
        let (a, b) = fbquant_init(&on_grid, &l.d, 8, 64, &spec, 2).unwrap();
        assert!(a.iter().chain(&b).any(|&v| v != 0.0));
    }

    #[test]
    fn the_fbquant_init_is_the_lqer_branch() {
        let l = layer(3, 16, 64, 8.0);
        let m = method(Branch::Lqer, 3, 1);
        let lqer = run(&m, &l).low_rank.unwrap();
        let spec = m.grid.spec(l.cols).unwrap();
        let (a, b) = fbquant_init(&l.w, &l.d, l.rows, l.cols, &spec, 4).unwrap();
        assert_eq!(LowRank::from_f32(4, &a, &b, FactorDtype::F16), lqer);
        // With uniform activations LQER is LoRC.
        let e0 = sub(&l.w, &round_to_nearest(&l.w, l.rows, l.cols, &spec));
        let ones = vec![1f32; l.cols];
        let lorc = svd_factors(&e0, l.rows, l.cols, 4).unwrap();
        let uniform = lqer_factors(&e0, &ones, l.rows, l.cols, 4).unwrap();
        assert_eq!(lorc, uniform);
    }

    #[test]
    fn fbquant_keeps_every_weight_within_half_a_step_under_extreme_activations() {
        for (seed, bits) in [(4, 2), (5, 3), (6, 4)] {
            let l = layer(seed, 24, 96, 1000.0);
            for factors in [FactorDtype::F16, FactorDtype::Int8] {
                let m = method_with(Branch::Fbquant, bits, 30, factors);
                let (fb_w, fb) = reconstructed(run(&m, &l));
                assert_eq!(fb.low_rank.as_ref().unwrap().a.dtype(), factors);
                let fb_steps = max_error_steps(&l.w, &fb_w, &fb);
                assert!(
                    fb_steps <= 0.5 + 1e-4,
                    "{bits}-bit {factors:?}: {fb_steps} steps"
                );
            }
            // Without the feedback nothing bounds the reconstruction.
            let (sb_w, sb) = reconstructed(run(&method(Branch::SubbranchTrained, bits, 30), &l));
            let sb_steps = max_error_steps(&l.w, &sb_w, &sb);
            assert!(
                sb_steps > 0.5,
                "{bits}-bit subbranch-trained: {sb_steps} steps"
            );
        }
    }

    #[test]
    fn training_lowers_the_layer_error_below_the_closed_forms() {
        let l = layer(7, 32, 128, 6.0);
        let err = |p: PackedLinear| {
            let (w_hat, _) = reconstructed(p);
            output_error(&l.w, &w_hat, &l.h64, l.rows, l.cols)
        };
        let spec = GridSpec::new(3, 32, false).unwrap();
        let rtn = output_error(
            &l.w,
            &round_to_nearest(&l.w, l.rows, l.cols, &spec),
            &l.h64,
            l.rows,
            l.cols,
        );
        let lqer = err(run(&method(Branch::Lqer, 3, 1), &l));
        let fbquant = err(run(&method(Branch::Fbquant, 3, 200), &l));
        assert!(lqer < rtn, "LQER {lqer} vs RTN {rtn}");
        assert!(fbquant < lqer, "FBQuant {fbquant} vs LQER {lqer}");
    }
}
