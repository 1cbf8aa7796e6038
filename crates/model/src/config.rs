//! Model hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`, and
//! written back as the latter.

use anyhow::{Result, anyhow, bail};
use recoup_formats::gguf::GgufFile;
use serde_json::{Value, json};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    fn hf_model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_eps: f32,
    pub rope_theta: f64,
    /// Positions are divided by this (HF "linear" RoPE scaling); 1 when unscaled.
    pub rope_linear_factor: f64,
    /// Per-pair divisors of the rotary frequencies (Llama 3's scaling; GGUF `rope_freqs`).
    pub rope_freq_factors: Option<Vec<f64>>,
    pub max_position: usize,
    pub tie_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl ModelConfig {
    /// Angle per position of each rotary pair.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        (0..self.head_dim / 2)
            .map(|i| {
                let base = 1.0 / self.rope_theta.powf(2.0 * i as f64 / self.head_dim as f64);
                let factor = self.rope_freq_factors.as_ref().map_or(1.0, |f| f[i]);
                base / factor / self.rope_linear_factor
            })
            .collect()
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    fn validate(self, origin: &Path) -> Result<Self> {
        let bad = |what: String| Err(anyhow!("{}: {what}", origin.display()));
        if self.hidden_size == 0 || self.n_layers == 0 || self.n_heads == 0 || self.vocab_size == 0
        {
            return bad("hidden size, layers, heads and vocabulary must all be positive".into());
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} heads is not a multiple of {} KV heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head dimension {} is odd; RoPE needs pairs",
                self.head_dim
            ));
        }
        if let Some(f) = &self.rope_freq_factors
            && f.len() != self.head_dim / 2
        {
            return bad(format!(
                "{} RoPE frequency factors for head dimension {}",
                f.len(),
                self.head_dim
            ));
        }
        Ok(self)
    }

    /// From GGUF metadata (`{arch}.*` keys). `rope_freqs` is the optional frequency-factor tensor.
    pub fn from_gguf(file: &GgufFile, rope_freqs: Option<Vec<f32>>) -> Result<Self> {
        let arch_name = file.get_str("general.architecture")?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => bail!(
                "{}: unsupported architecture '{other}' (recoup runs llama and qwen2)",
                file.path().display()
            ),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let u = |k: &str| file.get_u64(&key(k)).map(|v| v as usize);
        let hidden_size = u("embedding_length")?;
        let n_heads = u("attention.head_count")?;
        let n_kv_heads = if file.get(&key("attention.head_count_kv")).is_some() {
            u("attention.head_count_kv")?
        } else {
            n_heads
        };
        let head_dim = if file.get(&key("attention.key_length")).is_some() {
            u("attention.key_length")?
        } else {
            hidden_size / n_heads
        };
        if let Some(rot) = file
            .get(&key("rope.dimension_count"))
            .and_then(|v| v.as_u64())
            && rot as usize != head_dim
        {
            bail!(
                "{}: partial rotary embeddings ({rot} of {head_dim} dims) are not supported",
                file.path().display()
            );
        }
        let vocab_size = match file.get(&key("vocab_size")) {
            Some(_) => u("vocab_size")?,
            None => file.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let rope_linear_factor = match file.get(&key("rope.scaling.type")) {
            None => 1.0,
            Some(_) => match file.get_str(&key("rope.scaling.type"))? {
                "none" => 1.0,
                "linear" => file.get_f64(&key("rope.scaling.factor"))?,
                other => bail!(
                    "{}: RoPE scaling '{other}' is not supported",
                    file.path().display()
                ),
            },
        };
        let token_id = |k: &str| file.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        ModelConfig {
            arch,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            n_layers: u("block_count")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            rms_eps: file.get_f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
            rope_theta: if file.get(&key("rope.freq_base")).is_some() {
                file.get_f64(&key("rope.freq_base"))?
            } else {
                10000.0
            },
            rope_linear_factor,
            rope_freq_factors: rope_freqs.map(|f| f.into_iter().map(f64::from).collect()),
            max_position: u("context_length")?,
            tie_embeddings: file.tensor_info("output.weight").is_none(),
            bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
            eos_token_id: token_id("tokenizer.ggml.eos_token_id"),
        }
        .validate(file.path())
    }

    /// From a Hugging Face `config.json` value.
    pub fn from_hf(config: &Value, path: &Path) -> Result<Self> {
        let origin = path.join("config.json");
        let get = |k: &str| config.get(k).filter(|v| !v.is_null());
        let need_u = |k: &str| -> Result<usize> {
            get(k)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| anyhow!("{}: missing or non-integer key '{k}'", origin.display()))
        };
        let class = get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("{}: missing key 'architectures'", origin.display()))?;
        let arch = match class {
            "LlamaForCausalLM" | "MistralForCausalLM" => Arch::Llama,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            other => bail!(
                "{}: unsupported architecture '{other}' (recoup runs LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)",
                origin.display()
            ),
        };
        let hidden_size = need_u("hidden_size")?;
        let n_heads = need_u("num_attention_heads")?;
        let head_dim = match get("head_dim") {
            Some(_) => need_u("head_dim")?,
            None => hidden_size / n_heads.max(1),
        };
        let rope_theta = get("rope_theta").and_then(Value::as_f64).unwrap_or(10000.0);
        let (mut rope_linear_factor, mut rope_freq_factors) = (1.0, None);
        if let Some(scaling) = get("rope_scaling") {
            let kind = scaling
                .get("rope_type")
                .or_else(|| scaling.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            let num = |k: &str| {
                scaling
                    .get(k)
                    .and_then(Value::as_f64)
                    .ok_or_else(|| anyhow!("{}: rope_scaling lacks '{k}'", origin.display()))
            };
            match kind {
                "default" => {}
                "linear" => rope_linear_factor = num("factor")?,
                "llama3" => {
                    rope_freq_factors = Some(llama3_freq_factors(
                        rope_theta,
                        head_dim,
                        num("factor")?,
                        num("low_freq_factor")?,
                        num("high_freq_factor")?,
                        num("original_max_position_embeddings")?,
                    ))
                }
                other => bail!(
                    "{}: RoPE scaling '{other}' is not supported",
                    origin.display()
                ),
            }
        }
        let max_position = get("max_position_embeddings")
            .and_then(Value::as_u64)
            .unwrap_or(2048) as usize;
        // Sliding-window attention (Mistral; Qwen2 with use_sliding_window) equals full
        // attention within the window. recoup computes full attention, so the window caps the
        // context it runs, rather than silently computing something else beyond it.
        let uses_window = match arch {
            Arch::Llama => true,
            Arch::Qwen2 => get("use_sliding_window")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        let sliding_window = get("sliding_window")
            .and_then(Value::as_u64)
            .filter(|_| uses_window)
            .map(|w| w as usize);
        let token = |k: &str| {
            get(k)
                .and_then(|v| v.as_u64().or_else(|| v.get(0).and_then(Value::as_u64)))
                .map(|v| v as u32)
        };
        ModelConfig {
            arch,
            hidden_size,
            intermediate_size: need_u("intermediate_size")?,
            n_layers: need_u("num_hidden_layers")?,
            n_heads,
            n_kv_heads: match get("num_key_value_heads") {
                Some(_) => need_u("num_key_value_heads")?,
                None => n_heads,
            },
            head_dim,
            vocab_size: need_u("vocab_size")?,
            rms_eps: get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6) as f32,
            rope_theta,
            rope_linear_factor,
            rope_freq_factors,
            max_position: max_position.min(sliding_window.unwrap_or(usize::MAX)),
            tie_embeddings: get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: token("bos_token_id"),
            eos_token_id: token("eos_token_id"),
        }
        .validate(path)
    }

    /// The Hugging Face `config.json` transformers needs to load this model.
    pub fn to_hf(&self) -> Result<Value> {
        if self.rope_freq_factors.is_some() {
            bail!(
                "RoPE frequency factors (Llama 3 scaling from a GGUF rope_freqs tensor) have no exact config.json form"
            );
        }
        let mut config = json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.hf_model_type(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        });
        if self.rope_linear_factor != 1.0 {
            config["rope_scaling"] =
                json!({ "rope_type": "linear", "factor": self.rope_linear_factor });
        }
        if self.arch == Arch::Llama {
            config["attention_bias"] = json!(false);
            config["mlp_bias"] = json!(false);
        }
        Ok(config)
    }
}

/// Llama 3.1's frequency-dependent RoPE scaling, as per-pair divisors (transformers'
/// `_compute_llama3_parameters`).
fn llama3_freq_factors(
    theta: f64,
    head_dim: usize,
    factor: f64,
    low: f64,
    high: f64,
    original_ctx: f64,
) -> Vec<f64> {
    let (low_wavelen, high_wavelen) = (original_ctx / low, original_ctx / high);
    (0..head_dim / 2)
        .map(|i| {
            let inv_freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original_ctx / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm_like() -> Value {
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
               "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
               "vocab_size": 49152, "rope_theta": 100000.0, "tie_word_embeddings": true})
    }

    #[test]
    fn hf_config_round_trips() {
        let c = ModelConfig::from_hf(&smollm_like(), Path::new("m")).unwrap();
        assert_eq!((c.head_dim, c.n_kv_heads, c.tie_embeddings), (64, 3, true));
        let again = ModelConfig::from_hf(&c.to_hf().unwrap(), Path::new("m")).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn a_sliding_window_caps_the_context() {
        let mut v = smollm_like();
        v["architectures"] = json!(["MistralForCausalLM"]);
        v["max_position_embeddings"] = json!(32768);
        v["sliding_window"] = json!(4096);
        assert_eq!(
            ModelConfig::from_hf(&v, Path::new("m"))
                .unwrap()
                .max_position,
            4096
        );
        v["architectures"] = json!(["Qwen2ForCausalLM"]);
        v["use_sliding_window"] = json!(false);
        assert_eq!(
            ModelConfig::from_hf(&v, Path::new("m"))
                .unwrap()
                .max_position,
            32768
        );
    }

    #[test]
    fn missing_key_is_named() {
        let mut v = smollm_like();
        v.as_object_mut().unwrap().remove("intermediate_size");
        let err = ModelConfig::from_hf(&v, Path::new("dir"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("intermediate_size") && err.contains("dir/config.json"),
            "{err}"
        );
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let mut v = smollm_like();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        let err = ModelConfig::from_hf(&v, Path::new("dir"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("GPT2LMHeadModel"), "{err}");
    }

    #[test]
    fn llama3_scaling_leaves_high_frequencies_alone() {
        let f = llama3_freq_factors(500000.0, 128, 8.0, 1.0, 4.0, 8192.0);
        assert_eq!(f[0], 1.0);
        assert_eq!(f[63], 8.0);
        assert!(f.windows(2).all(|w| w[0] <= w[1]));
    }
}
