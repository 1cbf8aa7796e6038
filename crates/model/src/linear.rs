//! The one abstraction every projection goes through. Quantized, low-rank and
//! residual-compensated layers are further [`LinearOp`]s; the model never sees the difference.

use crate::qdec::Compensation;
use anyhow::{Result, bail};
use rayon::prelude::*;
use recoup_formats::packed::{LowRank, PackedLinear};
use recoup_kernels::lowbit::{
    self, Epilogue, Isa, LowRankFactors, QuantizedActivation, Selecting, TiledFactor,
};
use recoup_kernels::matmul::matmul_wt;
use recoup_kernels::qdec::{SelectedCodes, add_residual};
use std::sync::Arc;

/// `y[n×out] = x[n×in] · Wᵀ` for some representation of `W`.
pub trait LinearOp: Send + Sync {
    fn in_features(&self) -> usize;
    fn out_features(&self) -> usize;
    /// Overwrites `y` (`n · out_features` values) with the product of `n` input rows.
    fn forward(&self, x: &[f32], n: usize, y: &mut [f32]);
    /// Short description of the representation, e.g. `f32`.
    fn kind(&self) -> String;
    /// Bytes of weights read by one forward pass of a single row.
    fn weight_bytes(&self) -> usize;
    /// Chooses among the layer's compute paths; layers with only one ignore it.
    fn set_options(&mut self, _options: KernelOptions) {}
    /// Adds QDEC's dynamic residual correction to the layer's output.
    fn attach_residual(&mut self, _residual: Compensation) -> Result<()> {
        bail!(
            "only packed (quantized) layers take a residual; this one is {}",
            self.kind()
        )
    }
    /// Bytes of residual one decoded token reads (0 without QDEC).
    fn residual_bytes(&self) -> usize {
        0
    }
    /// The weights as stored, for a backend that keeps its own copy (the GPU).
    fn weights(&self) -> LayerWeights<'_>;
}

/// A layer's weights as another backend uploads them.
pub enum LayerWeights<'a> {
    Dense(&'a [f32]),
    Packed {
        packed: &'a PackedLinear,
        qdec: Option<&'a Compensation>,
    },
}

/// A dense f32 weight `[out, in]`, shareable (a tied output head shares the embedding).
pub struct DenseF32 {
    weight: Arc<Vec<f32>>,
    out_features: usize,
    in_features: usize,
}

impl DenseF32 {
    pub fn new(weight: Arc<Vec<f32>>, out_features: usize, in_features: usize) -> Self {
        assert_eq!(weight.len(), out_features * in_features, "DenseF32 shape");
        Self {
            weight,
            out_features,
            in_features,
        }
    }

    pub fn weight(&self) -> &[f32] {
        &self.weight
    }
}

impl LinearOp for DenseF32 {
    fn weights(&self) -> LayerWeights<'_> {
        LayerWeights::Dense(&self.weight)
    }

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        matmul_wt(x, &self.weight, y, n, self.in_features, self.out_features);
    }

    fn kind(&self) -> String {
        "f32".into()
    }

    fn weight_bytes(&self) -> usize {
        self.weight.len() * 4
    }
}

/// How a packed layer computes, chosen per run (`recoup bench`, `ppl`, `run` flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOptions {
    /// Dequantize the whole matrix to f32 for every product: the reference path the fast
    /// kernels are checked against.
    pub reference: bool,
    pub low_rank: LowRankPath,
    pub prefill: Prefill,
}

/// How products of many tokens (prompts, perplexity windows) compute packed layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prefill {
    /// The integer GEMM on 8-bit activations: decode's formula, the fast path.
    #[default]
    Integer,
    /// Tiles dequantized to f32 against the f32 activations: exactly the reference path's
    /// products, for evaluations that measure the weights alone.
    Exact,
}

impl Prefill {
    /// The name `--prefill` takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            Prefill::Integer => "integer",
            Prefill::Exact => "exact",
        }
    }
}

/// What a layer with a low-rank branch does with it at run time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LowRankPath {
    /// `⟨A_r, B·x⟩` added to each output row within the main product's job, while the rows
    /// are in cache.
    #[default]
    Fused,
    /// Down-projection, up-projection and addition as separate passes (the baseline the
    /// fused path is measured against).
    Unfused,
    /// The branch switched off: the quantized matrix alone (for measuring what it costs).
    Off,
}

/// Up to this many tokens, a product runs as matrix-vector kernels on the packed codes, one
/// token at a time; beyond, as the prefill GEMM, whose unpacked tiles all tokens share.
const MATVEC_MAX_TOKENS: usize = 8;

/// Packed low-bit weights computed in place: integer matrix-vector kernels for decode, an
/// integer GEMM for prefill, the low-rank branch fused into the former.
pub struct PackedOp {
    packed: PackedLinear,
    /// The branch's `A` laid out for the kernels' epilogue.
    a_tiled: Option<TiledFactor>,
    isa: Isa,
    options: KernelOptions,
    qdec: Option<Compensation>,
}

impl PackedOp {
    pub fn new(packed: PackedLinear) -> Self {
        let rows = packed.matrix.rows;
        let a_tiled = packed
            .low_rank
            .as_ref()
            .map(|l| TiledFactor::new((&l.a).into(), rows, l.rank));
        Self {
            packed,
            a_tiled,
            isa: Isa::best(),
            options: KernelOptions::default(),
            qdec: None,
        }
    }

    fn low_rank(&self) -> Option<&LowRank> {
        match self.options.low_rank {
            LowRankPath::Off => None,
            _ => self.packed.low_rank.as_ref(),
        }
    }

    /// `x` in the stored column order (GPTQ act-order permutes the columns).
    fn stored_order<'a>(&self, x: &'a [f32], n: usize) -> std::borrow::Cow<'a, [f32]> {
        let Some(perm) = &self.packed.perm else {
            return x.into();
        };
        let cols = self.packed.matrix.cols;
        x[..n * cols]
            .chunks_exact(cols)
            .flat_map(|row| perm.iter().map(move |&p| row[p as usize]))
            .collect::<Vec<f32>>()
            .into()
    }

    /// One token through the matrix-vector kernels, QDEC's correction (when `correct`) in
    /// the same pass.
    fn matvec(
        &self,
        x: &[f32],
        x_stored: &[f32],
        act: &mut QuantizedActivation,
        correct: bool,
        y: &mut [f32],
    ) {
        let (m, isa) = (&self.packed.matrix, self.isa);
        act.requantize(x_stored);
        let qdec = self.qdec.as_ref().filter(|_| correct);
        // The selection as the kernels run it, inside their job.
        let select = |f: &mut dyn FnMut(&SelectedCodes)| {
            if let Some(q) = qdec {
                f(&q.select(x).codes)
            }
        };
        let selecting = qdec.map(|q| Selecting {
            residual: q.residual_ref(),
            select: &select,
        });
        let Some(lr) = self.low_rank() else {
            return match selecting {
                Some(c) => lowbit::packed_matvec_selecting(m, act, y, c, isa),
                None => lowbit::packed_matvec(m, act, y, Epilogue::default(), isa),
            };
        };
        let mut v = vec![0f32; lr.rank];
        let a = self.a_tiled.as_ref().expect("tiled with the branch");
        let b = (&lr.b).into();
        if self.options.low_rank == LowRankPath::Unfused {
            // The measured baseline: every step a pass of its own, the selection first.
            let selected = qdec.map(|q| q.select(x));
            let residual = qdec.zip(selected.as_ref()).map(|(q, s)| q.epilogue(s));
            lowbit::factor_matvec(b, x, &mut v, isa);
            let epilogue = Epilogue {
                low_rank: None,
                residual,
            };
            lowbit::packed_matvec(m, act, y, epilogue, isa);
            lowbit::factor_matvec_add(a, &v, y, isa);
        } else {
            let branch = LowRankFactors { a, b };
            lowbit::packed_matvec_low_rank(m, act, x, branch, selecting, y, &mut v, isa);
        }
    }

    /// QDEC's correction of each of `n` tokens after a multi-token product, a token per
    /// task (each selects its own channels, as the paper's perplexity protocol does).
    fn correct_each(&self, x: &[f32], y: &mut [f32], isa: Isa) {
        let Some(q) = &self.qdec else { return };
        let (cols, rows) = (self.in_features(), self.out_features());
        y.par_chunks_mut(rows)
            .zip(x.par_chunks(cols))
            .for_each(|(yt, xt)| {
                let selected = q.select_fresh(xt);
                add_residual(q.epilogue(&selected), 0, yt, isa);
            });
    }
}

impl LinearOp for PackedOp {
    fn weights(&self) -> LayerWeights<'_> {
        LayerWeights::Packed {
            packed: &self.packed,
            qdec: self.qdec.as_ref(),
        }
    }

    fn in_features(&self) -> usize {
        self.packed.matrix.cols
    }

    fn out_features(&self) -> usize {
        self.packed.matrix.rows
    }

    fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let (cols, rows) = (self.in_features(), self.out_features());
        let correct = self.qdec.as_ref().is_some_and(|q| q.applies(n));
        if self.options.reference {
            matmul_wt(x, &self.packed.dequantize(), y, n, cols, rows);
        } else if n <= MATVEC_MAX_TOKENS {
            let x_stored = self.stored_order(x, n);
            let mut act = QuantizedActivation::default();
            for t in 0..n {
                let span = t * cols..(t + 1) * cols;
                let yt = &mut y[t * rows..(t + 1) * rows];
                self.matvec(&x[span.clone()], &x_stored[span], &mut act, correct, yt);
            }
            return;
        } else {
            let (m, x) = (&self.packed.matrix, self.stored_order(x, n));
            match self.options.prefill {
                Prefill::Integer => lowbit::packed_matmul(m, &x, n, y, self.isa),
                Prefill::Exact => lowbit::prefill::dequantized_matmul(m, &x, n, y),
            }
        }
        if let Some(lr) = self.low_rank() {
            // y += (x Bᵀ) Aᵀ: two thin products instead of forming A·B.
            let mut xb = vec![0f32; n * lr.rank];
            matmul_wt(x, &lr.b_f32(), &mut xb, n, cols, lr.rank);
            let mut branch = vec![0f32; n * rows];
            matmul_wt(&xb, &lr.a_f32(), &mut branch, n, lr.rank, rows);
            y.iter_mut().zip(&branch).for_each(|(y, v)| *y += v);
        }
        if correct {
            let isa = if self.options.reference {
                Isa::Scalar
            } else {
                self.isa
            };
            self.correct_each(x, &mut y[..n * rows], isa);
        }
    }

    fn kind(&self) -> String {
        let s = &self.packed.matrix.spec;
        let sym = if s.sym { "sym" } else { "asym" };
        let order = if self.packed.perm.is_some() {
            ", act-order"
        } else {
            ""
        };
        let rank = self.packed.low_rank.as_ref().map_or(String::new(), |l| {
            format!(", rank {} {}", l.rank, l.a.dtype().name())
        });
        let qdec = self
            .qdec
            .as_ref()
            .map_or(String::new(), |q| format!(", {}", q.describe()));
        format!("{}-bit g{} {sym}{order}{rank}{qdec}", s.bits, s.group)
    }

    fn weight_bytes(&self) -> usize {
        let branch = self
            .packed
            .low_rank
            .as_ref()
            .map_or(0, LowRank::storage_bytes);
        let off = self.low_rank().is_none();
        self.packed.storage_bytes() - if off { branch } else { 0 }
    }

    fn set_options(&mut self, options: KernelOptions) {
        self.options = options;
    }

    fn attach_residual(&mut self, residual: Compensation) -> Result<()> {
        let (rows, cols) = (self.out_features(), self.in_features());
        if (residual.rows(), residual.cols()) != (rows, cols) {
            bail!(
                "the residual is [{}, {}], the layer [{rows}, {cols}]",
                residual.rows(),
                residual.cols()
            );
        }
        self.qdec = Some(residual);
        Ok(())
    }

    fn residual_bytes(&self) -> usize {
        self.qdec.as_ref().map_or(0, Compensation::bytes_per_token)
    }
}

/// A projection with its optional bias.
pub struct Linear {
    pub op: Box<dyn LinearOp>,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    pub fn new(op: Box<dyn LinearOp>, bias: Option<Vec<f32>>) -> Self {
        if let Some(b) = &bias {
            assert_eq!(b.len(), op.out_features(), "bias length");
        }
        Self { op, bias }
    }

    pub fn out_features(&self) -> usize {
        self.op.out_features()
    }

    /// `n` rows of `x` in, `n` rows of the output returned.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let m = self.op.out_features();
        let mut y = vec![0f32; n * m];
        self.op.forward(x, n, &mut y);
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(m) {
                row.iter_mut().zip(b).for_each(|(v, &bv)| *v += bv);
            }
        }
        y
    }
}
