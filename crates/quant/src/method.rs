//! The boundary every quantization method implements: given one decoder block's f32
//! weights and the statistics of its calibration inputs, produce packed linears.

use crate::calib::BlockStats;
use anyhow::{Context, Result};
use recoup_formats::packed::{GridSpec, LowRank, PackedLinear};
use recoup_kernels::matmul::matmul;
use recoup_model::llama::{BLOCK_LINEARS, Site};

/// The seven linear layers of a decoder block, in the order of `BLOCK_LINEARS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearName {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LinearName {
    pub const ALL: [LinearName; 7] = [
        LinearName::Q,
        LinearName::K,
        LinearName::V,
        LinearName::O,
        LinearName::Gate,
        LinearName::Up,
        LinearName::Down,
    ];

    /// The module path inside a block, as Hugging Face names it.
    pub fn module(self) -> &'static str {
        BLOCK_LINEARS[self as usize].0
    }

    /// Where the layer reads its input.
    pub fn site(self) -> Site {
        BLOCK_LINEARS[self as usize].1
    }
}

/// One linear layer in f32: `w` is `[rows, cols]` row-major.
#[derive(Clone, Debug)]
pub struct DenseLinear {
    pub w: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    pub bias: Option<Vec<f32>>,
}

/// A decoder block's weights in f32, which a method may rewrite (AWQ folds scales into
/// the norms and the preceding linear layers).
#[derive(Clone, Debug)]
pub struct BlockWeights {
    pub attn_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    /// Indexed as [`LinearName::ALL`].
    pub linears: Vec<DenseLinear>,
    /// Set by a method that changed any weight, so the unquantized ones are stored in f32
    /// rather than in the source's precision.
    pub modified: bool,
}

impl BlockWeights {
    pub fn linear(&self, name: LinearName) -> &DenseLinear {
        &self.linears[name as usize]
    }

    pub fn linear_mut(&mut self, name: LinearName) -> &mut DenseLinear {
        &mut self.linears[name as usize]
    }
}

/// A quantized linear layer and the channel scales a method folded around it (AWQ): with
/// `input_scale` s the layer stores `Q(W·diag(s))` and receives inputs already divided by
/// `s`; with `output_scale` t it stores `Q(diag(1/t)·W)` and the next layer multiplies its
/// outputs back by `t`.
pub struct QuantizedLinear {
    pub packed: PackedLinear,
    pub input_scale: Option<Vec<f32>>,
    pub output_scale: Option<Vec<f32>>,
}

impl QuantizedLinear {
    pub fn plain(packed: PackedLinear) -> Self {
        Self {
            packed,
            input_scale: None,
            output_scale: None,
        }
    }

    /// The weight the layer stores, in the basis it was quantized in: the packed part plus
    /// the low-rank branch.
    pub fn reconstructed(&self) -> Vec<f32> {
        let mut w = self.packed.dequantize();
        if let Some(l) = &self.packed.low_rank {
            let m = &self.packed.matrix;
            let sigma = low_rank_product(l, m.rows, m.cols);
            w.iter_mut().zip(&sigma).for_each(|(a, b)| *a += b);
        }
        w
    }

    /// The weight this layer effectively applies, in the block's original basis.
    pub fn effective_weight(&self) -> Vec<f32> {
        let mut w = self.reconstructed();
        let cols = self.packed.matrix.cols;
        for (i, row) in w.chunks_exact_mut(cols).enumerate() {
            if let Some(s) = &self.input_scale {
                row.iter_mut().zip(s).for_each(|(v, &si)| *v /= si);
            }
            if let Some(t) = &self.output_scale {
                row.iter_mut().for_each(|v| *v *= t[i]);
            }
        }
        w
    }
}

/// `A·B` of a low-rank branch, `[rows, cols]` in f32.
pub fn low_rank_product(l: &LowRank, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    matmul(&l.a_f32(), &l.b_f32(), &mut out, rows, l.rank, cols);
    out
}

/// A quantization method, applied one decoder block at a time.
pub trait Method: Sync {
    /// `rtn`, `gptq`, `awq`.
    fn name(&self) -> &'static str;
    /// Settings recorded in the checkpoint.
    fn settings(&self) -> serde_json::Value;
    /// Whether the method needs calibration inputs.
    fn needs_calibration(&self) -> bool;
    /// Whether the method rewrites the block's f32 weights (AWQ's folded scales).
    fn rewrites_weights(&self) -> bool {
        false
    }
    /// Input rows per site the method wants to keep (besides `H`), over all samples.
    fn sample_rows(&self) -> usize {
        0
    }
    /// Quantizes the layers `targets` of `block` (others stay dense but may be rewritten).
    fn quantize_block(
        &self,
        block: &mut BlockWeights,
        stats: Option<&BlockStats>,
        targets: &[LinearName],
    ) -> Result<Vec<(LinearName, QuantizedLinear)>>;
}

/// Quantizes each of `targets` in turn with `quantize(name, layer, grid)`, naming the layer
/// in any error.
pub fn quantize_targets(
    block: &BlockWeights,
    targets: &[LinearName],
    grid: &GridChoice,
    quantize: impl Fn(LinearName, &DenseLinear, &GridSpec) -> Result<QuantizedLinear>,
) -> Result<Vec<(LinearName, QuantizedLinear)>> {
    targets
        .iter()
        .map(|&name| {
            let l = block.linear(name);
            let spec = grid.spec(l.cols)?;
            let q = quantize(name, l, &spec).with_context(|| name.module())?;
            Ok((name, q))
        })
        .collect()
}

/// Bits, group size and symmetry chosen for a run; a group of `None` is one per output row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridChoice {
    pub bits: u32,
    pub group: Option<usize>,
    pub sym: bool,
}

impl GridChoice {
    /// The grid for a matrix of `cols` input channels.
    pub fn spec(&self, cols: usize) -> Result<GridSpec> {
        if !cols.is_multiple_of(recoup_formats::packed::BLOCK) {
            anyhow::bail!(
                "{cols} input channels are not a multiple of {}, the packed block size",
                recoup_formats::packed::BLOCK
            );
        }
        GridSpec::new(self.bits, self.group.unwrap_or(cols), self.sym)
    }

    pub fn settings(&self) -> serde_json::Value {
        serde_json::json!({
            "bits": self.bits,
            "group_size": self.group.map_or(-1, |g| g as i64),
            "sym": self.sym,
        })
    }
}
