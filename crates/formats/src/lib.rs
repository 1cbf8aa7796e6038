//! Model file formats, each in its own module. Everything a model needs from a file goes
//! through [`TensorSource`], which hands out f32 tensors under canonical Hugging Face names
//! (`model.layers.N.self_attn.q_proj.weight`, shape `[out, in]`), whatever the file stores.

pub mod atomic;
pub mod ggml;
pub mod gguf;
pub mod hf;
pub mod hugepages;
pub mod native;
pub mod packed;
pub mod residual;

use anyhow::Result;
use half::{bf16, f16};
use packed::PackedLinear;
use safetensors::Dtype;
use std::path::Path;

/// A dense f32 tensor, row-major; `shape` is outermost first (`[out, in]` for a weight).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Where a model's weights come from.
pub trait TensorSource: Send + Sync {
    /// The file or directory, for error messages.
    fn path(&self) -> &Path;
    /// Whether a tensor of this canonical name exists.
    fn contains(&self, name: &str) -> bool;
    /// The tensor as f32, dequantized if stored quantized; an error names the file and tensor.
    fn tensor(&self, name: &str) -> Result<Tensor>;
    /// All canonical tensor names, in file order.
    fn names(&self) -> Vec<String>;
    /// The dense precision that holds the tensor without loss (or, for block-quantized GGUF
    /// tensors, f16), so that a tensor recoup does not quantize is written back as it was.
    fn dense_dtype(&self, name: &str) -> DenseDtype;
    /// The packed weights of the linear layer `prefix` (`model.layers.0.mlp.up_proj`), if
    /// the file stores it quantized by recoup.
    fn packed(&self, _prefix: &str) -> Result<Option<PackedLinear>> {
        Ok(None)
    }
}

/// Dense tensor precisions of safetensors files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseDtype {
    F32,
    F16,
    BF16,
}

impl DenseDtype {
    pub fn safetensors(self) -> Dtype {
        match self {
            DenseDtype::F32 => Dtype::F32,
            DenseDtype::F16 => Dtype::F16,
            DenseDtype::BF16 => Dtype::BF16,
        }
    }

    pub fn from_safetensors(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(DenseDtype::F32),
            Dtype::F16 => Some(DenseDtype::F16),
            Dtype::BF16 => Some(DenseDtype::BF16),
            _ => None,
        }
    }

    /// Little-endian bytes of `data` in this precision (rounded to nearest).
    pub fn encode(self, data: &[f32]) -> Vec<u8> {
        match self {
            DenseDtype::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DenseDtype::F16 => data
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            DenseDtype::BF16 => data
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }

    /// f32 values of little-endian `bytes` in this precision.
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            DenseDtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            DenseDtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DenseDtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }
}
