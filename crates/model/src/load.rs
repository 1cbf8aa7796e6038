//! Opening a model from whatever the user points at: a GGUF file or a Hugging Face directory.

use crate::{Model, ModelConfig, Tokenizer};
use anyhow::{Context, Result, bail};
use recoup_formats::TensorSource;
use recoup_formats::gguf::{GgufFile, GgufTensorSource};
use recoup_formats::hf::HfDir;
use std::io::Read;
use std::path::Path;

/// A model's config, tokenizer and weights, before the weights are read.
pub struct Opened {
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub source: Box<dyn TensorSource>,
    /// "GGUF" or "safetensors".
    pub format: &'static str,
}

/// A model ready to run.
pub struct Loaded {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub format: &'static str,
}

pub fn open(path: &Path) -> Result<Opened> {
    if path.is_dir() {
        let dir = HfDir::open(path)?;
        let config = ModelConfig::from_hf(&dir.config, path)?;
        let tokenizer = Tokenizer::from_hf_dir(path, &dir.config)?;
        return Ok(Opened {
            config,
            tokenizer,
            source: Box::new(dir),
            format: "safetensors",
        });
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .with_context(|| format!("cannot read {}", path.display()))?;
    if &magic != b"GGUF" {
        bail!(
            "{}: not a GGUF file (magic {magic:02x?}) nor a Hugging Face model directory",
            path.display()
        );
    }
    let file = GgufFile::open(path)?;
    let rope_freqs = match file.tensor_info("rope_freqs.weight") {
        Some(_) => Some(file.tensor_f32("rope_freqs.weight")?.data),
        None => None,
    };
    let config = ModelConfig::from_gguf(&file, rope_freqs)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    Ok(Opened {
        config,
        tokenizer,
        source: Box::new(GgufTensorSource::new(file)?),
        format: "GGUF",
    })
}

/// Opens and reads every weight as f32.
pub fn load(path: &Path) -> Result<Loaded> {
    let opened = open(path)?;
    let model = Model::from_source(opened.config, opened.source.as_ref())?;
    Ok(Loaded {
        model,
        tokenizer: opened.tokenizer,
        format: opened.format,
    })
}
