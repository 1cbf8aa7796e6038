//! Model file formats, each in its own module. Everything a model needs from a file goes
//! through [`TensorSource`], which hands out f32 tensors under canonical Hugging Face names
//! (`model.layers.N.self_attn.q_proj.weight`, shape `[out, in]`), whatever the file stores.

pub mod atomic;
pub mod ggml;
pub mod gguf;
pub mod hf;

use anyhow::Result;
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
}
