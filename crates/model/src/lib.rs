//! Decoder-only transformer models of the Llama family (Llama 2/3, SmolLM2, Mistral-style)
//! and Qwen2, computed in f32. Every projection goes through [`linear::Linear`], the seam
//! where quantized, low-rank and residual-compensated layers plug in.

pub mod chat;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod export;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod load;
pub mod qdec;
pub mod sampling;
pub mod synthetic;
pub mod tokenizer;

pub use config::{Arch, ModelConfig};
pub use kv_cache::KvCache;
pub use llama::Model;
pub use load::{Loaded, load};
pub use tokenizer::Tokenizer;
