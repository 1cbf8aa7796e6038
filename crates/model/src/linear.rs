//! The one abstraction every projection goes through. Quantized, low-rank and
//! residual-compensated layers are further [`LinearOp`]s; the model never sees the difference.

use recoup_formats::packed::PackedLinear;
use recoup_kernels::matmul::matmul_wt;
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

/// Packed low-bit weights, dequantized to f32 for every product: the reference compute path
/// that the fast kernels replace. Only the packed form stays resident, with the low-rank
/// branch's factors in f32 (`rank · (rows + cols)` values).
pub struct PackedDequant {
    packed: PackedLinear,
    /// `A` `[rows, rank]` and `B` `[rank, cols]`.
    low_rank: Option<(Vec<f32>, Vec<f32>)>,
}

impl PackedDequant {
    pub fn new(packed: PackedLinear) -> Self {
        let low_rank = packed.low_rank.as_ref().map(|l| (l.a_f32(), l.b_f32()));
        Self { packed, low_rank }
    }
}

impl LinearOp for PackedDequant {
    fn in_features(&self) -> usize {
        self.packed.matrix.cols
    }

    fn out_features(&self) -> usize {
        self.packed.matrix.rows
    }

    fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let (cols, rows) = (self.in_features(), self.out_features());
        let w = self.packed.dequantize();
        matmul_wt(x, &w, y, n, cols, rows);
        if let Some((a, b)) = &self.low_rank {
            // y += (x Bᵀ) Aᵀ: two thin products instead of forming A·B.
            let rank = b.len() / cols;
            let mut xb = vec![0f32; n * rank];
            matmul_wt(x, b, &mut xb, n, cols, rank);
            let mut branch = vec![0f32; n * rows];
            matmul_wt(&xb, a, &mut branch, n, rank, rows);
            y.iter_mut().zip(&branch).for_each(|(y, v)| *y += v);
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
        format!("{}-bit g{} {sym}{order}{rank}", s.bits, s.group)
    }

    fn weight_bytes(&self) -> usize {
        self.packed.storage_bytes()
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
